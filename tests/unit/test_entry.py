"""Your own training as the launch's entry (tasks/lib/entry.py, tasks/lib/runspec.py,
tasks/lib/objective.py, the node launcher and the hang watchdog's line progress): pure parts,
plus the rendered launcher and the flight recorder's dump pipe run by a real bash."""
from __future__ import annotations

import json
import os
import stat
import statistics
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tasks.lib import entry as ent
from tasks.lib.diagnostics import flight_dump_command
from tasks.lib.entry import EntryError, entry_argv, entry_bundle, entry_env, resolve_entry, split_entry
from tasks.lib.objective import (
    MetricError,
    extract_objective,
    parse_metric,
    values_by_rank,
)
from tasks.lib.registry import render_node_launcher
from tasks.lib.runspec import LaunchFlags, RunSpecError, parse_env_pairs, resolve_run_spec, torchrun_argv

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).parent / "data"
NOT_IGNORED = lambda root, relative: False  # noqa: E731


def own_script(tmp_path: Path) -> Path:
    """A user's training directory outside the checkout: a script, its module, its YAML (which
    our validator would reject: sections it does not know), and what must not be pushed."""
    home = tmp_path / "mytrain"
    (home / "lib").mkdir(parents=True)
    (home / "train.py").write_text("import lib.model\n")
    (home / "lib" / "model.py").write_text("X = 1\n")
    (home / "my.yaml").write_text("optimizer: {name: adamw}\nfsdp: {sharding: hybrid}\n")
    for skipped in (".git/config", "__pycache__/train.cpython-311.pyc", ".secret"):
        (home / skipped).parent.mkdir(parents=True, exist_ok=True)
        (home / skipped).write_text("x")
    (home / "data").symlink_to("/usr")
    return home


# -- the entry itself -------------------------------------------------------------------------------

def test_an_entry_is_split_as_a_shell_would_without_expanding_anything():
    assert split_entry("train.py --name 'a b' --x $(id) \"q'\"") == (
        "train.py", "--name", "a b", "--x", "$(id)", "q'")
    assert split_entry(["train.py", "--name", "a b"]) == ("train.py", "--name", "a b")
    for bad, message in (("", "empty"), ("train.py 'open", "quote"), (["a", 3], "neither"),
                         (["a\0b"], "NUL")):
        with pytest.raises(EntryError, match=message):
            split_entry(bad)


def test_a_module_entry_runs_from_the_workdir():
    found = resolve_entry("-m mypkg.train --lr 3e-4", ROOT)
    assert (found.module, found.args) == ("mypkg.train", ("--lr", "3e-4"))
    argv, cwd = entry_argv(found, workdir="/srv/w", node_run_dir="/srv/w/experiments/r")
    assert (argv, cwd) == (["-m", "mypkg.train", "--lr", "3e-4"], "/srv/w")
    for bad, message in (("-m", "module name"), ("-m 1x", "module name"),
                         ("-m train", "default experiment"), ("--nproc 2 x.py", "an option")):
        with pytest.raises(EntryError, match=message):
            resolve_entry(bad, ROOT)


def test_a_script_in_the_checkout_runs_from_the_nodes_checkout():
    found = resolve_entry("scripts/record_trace.py --steps 2", ROOT, is_ignored=NOT_IGNORED)
    assert found.in_checkout == "scripts/record_trace.py" and found.push_root is None
    argv, cwd = entry_argv(found, workdir="/srv/w", node_run_dir="/srv/w/experiments/r")
    assert (argv, cwd) == (["/srv/w/scripts/record_trace.py", "--steps", "2"], "/srv/w/scripts")
    assert entry_bundle(found, "/srv/w/experiments/r") == {}


def test_a_script_git_ignores_in_the_checkout_is_refused(tmp_path):
    (ROOT / "experiments").mkdir(exist_ok=True)
    script = ROOT / "experiments" / f"ignored_{os.getpid()}.py"
    script.write_text("")
    try:
        with pytest.raises(EntryError, match="ignored by git"):
            resolve_entry(str(script), ROOT)
    finally:
        script.unlink()


def test_a_script_outside_the_checkout_is_pushed_with_its_directory(tmp_path):
    home = own_script(tmp_path)
    found = resolve_entry(f"{home}/train.py --config my.yaml", ROOT)
    assert sorted(found.push_files) == ["lib/model.py", "my.yaml", "train.py"]
    assert found.skipped == ("data",)
    bundle = entry_bundle(found, "/srv/w/experiments/r")
    assert bundle["/srv/w/experiments/r/entry/my.yaml"].startswith(b"optimizer:")
    argv, cwd = entry_argv(found, workdir="/srv/w", node_run_dir="/srv/w/experiments/r")
    assert argv == ["/srv/w/experiments/r/entry/train.py", "--config", "my.yaml"]
    assert cwd == "/srv/w/experiments/r/entry"  # my.yaml resolves next to the script
    assert "pushed with the run" in found.describe() and "3 file(s)" in found.describe()


def test_a_big_or_enclosing_directory_is_refused_naming_what_to_do(tmp_path, monkeypatch):
    home = own_script(tmp_path)
    monkeypatch.setattr(ent, "MAX_PUSH_FILES", 2)
    with pytest.raises(EntryError, match="more than 2 files"):
        resolve_entry(str(home / "train.py"), ROOT)
    with pytest.raises(EntryError, match="holds this checkout"):
        ent._push_listing(ROOT.parent, ROOT, "--entry")
    with pytest.raises(EntryError, match="no such file here"):
        resolve_entry("nope/train.py", ROOT)


def test_what_every_rank_of_an_entry_gets_and_what_the_user_keeps():
    env = entry_env({"NCCL_DEBUG": "TRACE", "TORCH_NCCL_TRACE_BUFFER_SIZE": "50"},
                    output_dir="/o", accelerator="cuda", flight_entries=2000)
    assert env["GEMM_OUTPUT_DIR"] == "/o" and env["TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE"] == "[rank${rank}]:"
    assert "TORCH_FR_BUFFER_SIZE" not in env  # the user's buffer size stands
    assert env["TORCH_NCCL_DEBUG_INFO_PIPE_FILE"] == "/o/flight_recorder/pipe_rank_"
    assert env["NCCL_DEBUG"] == "TRACE" and env["NCCL_DEBUG_FILE"] == "/o/nccl_debug_%h_%p.log"
    assert env["NCCL_DEBUG_SUBSYS"] == "INIT,ENV,TUNING"
    mine = entry_env({"NCCL_DEBUG_FILE": "/mine"}, output_dir="/o", accelerator="cuda", flight_entries=0)
    assert "NCCL_DEBUG_FILE" not in mine and "TORCH_FR_BUFFER_SIZE" not in mine
    cpu = entry_env({}, output_dir="/o", accelerator="cpu", flight_entries=2000)
    assert cpu["TORCH_FR_BUFFER_SIZE"] == "2000" and not any(k.startswith("NCCL") for k in cpu)
    for reserved in ("GEMM_OUTPUT_DIR", "TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", "PET_LOG_DIR"):
        with pytest.raises(RunSpecError, match="set by the launch"):
            parse_env_pairs([f"{reserved}=x"])


def test_rank_lines_are_told_apart_by_torchruns_prefix():
    assert ent.split_rank_line("[rank12]:{\"a\": 1}") == (12, '{"a": 1}')
    assert ent.split_rank_line("[rank3]: loss 1") == (3, "loss 1")
    assert ent.split_rank_line("[launcher] node 0") is None
    assert ent.split_rank_line("W1207 torch/distributed/run.py:874]") is None


# -- the launch spec ------------------------------------------------------------------------------

def resolve(flags: LaunchFlags, config: dict | None = None):
    return resolve_run_spec(flags, config or {}, {}, accelerator="cpu", docker_default=False,
                            project_root=ROOT)


def test_an_entry_skips_our_config_validation_and_refuses_our_train_flags(tmp_path):
    home = own_script(tmp_path)
    spec = resolve(LaunchFlags(entry=f"{home}/train.py --config my.yaml", metric="json:step_ms"))
    assert spec.entry is not None and spec.config_path is None and spec.hang_auto is False
    assert spec.flags_record()["entry"]["argv"] == [f"{home}/train.py", "--config", "my.yaml"]
    assert spec.flags_record()["metric"] == "json:step_ms"
    from_config = resolve(LaunchFlags(), {"entry": [f"{home}/train.py", "--x"], "config": "a.yaml"})
    assert from_config.sources["entry"] == "config" and from_config.entry.args == ("--x",)
    assert any("not used" in w for w in from_config.warnings)
    for flags, message in (
            (LaunchFlags(entry=f"{home}/train.py", config="my.yaml"), "--config is the train package's"),
            (LaunchFlags(entry=f"{home}/train.py", overrides=("a.b=1",)), "--override is"),
            (LaunchFlags(entry=f"{home}/train.py", torch_profile=True), "--torch-profile is"),
            (LaunchFlags(entry=f"{home}/train.py", metric="a(b)(c)"), "exactly one group"),
            (LaunchFlags(entry="missing.py"), "no such file")):
        with pytest.raises(RunSpecError, match=message):
            resolve(flags)
    # Without --entry, our validator still rejects their YAML.
    with pytest.raises(RunSpecError, match="config"):
        resolve(LaunchFlags(config=str(home / "my.yaml")))


def test_torchrun_runs_the_entry_with_its_output_teed_and_marked():
    argv = torchrun_argv(nnodes=2, nproc=2, master_addr="10.0.0.1",
                         config_path="/x", output_dir="/o", overrides=("a.b=1",),
                         entry=["/e/train.py", "--config", "my yaml"])
    assert argv[-4:] == ["--tee=3", "/e/train.py", "--config", "my yaml"]
    assert "-m" not in argv and "--override" not in argv


def test_the_launcher_hands_entry_arguments_over_byte_for_byte(tmp_path):
    """The rendered node launcher's argument array, evaluated by bash: every hostile argument
    arrives as one literal argument (the template's one quoting filter)."""
    hostile = ["$(touch /tmp/pwned)", "a b", "'", '"', "`id`", "x\ny", "--flag=$HOME"]
    text = render_node_launcher(run_id="multinode_28ch_256th_20260101_000000_abcdef",
                                registry_dir=None, run_dir="/r", output_dir="/r/o",
                                env_script="/r/env.sh", workdir="/w", ranks_dir="/w/e dir",
                                torchrun_argv=["torchrun", "--tee=3", "/w/e dir/t.py", *hostile],
                                wrapper_argv=None, container=None, venv=None)
    assert "RANKS_DIR='/w/e dir'" in text
    assert text.rstrip().endswith('main "$@"\nexit "$?"')
    # The launcher as rendered, its last two lines (run main) swapped for printing the array.
    script = text.rstrip()[:-len('main "$@"\nexit "$?"')] + 'printf "%s\\0" "${TORCHRUN[@]}"\n'
    done = subprocess.run(["bash", "-c", script], capture_output=True, timeout=10)
    assert done.stdout.split(b"\0")[:-1] == [a.encode() for a in
                                             ["torchrun", "--tee=3", "/w/e dir/t.py", *hostile]]
    assert not Path("/tmp/pwned").exists()


# -- the objective ----------------------------------------------------------------------------------

def test_metrics_are_a_regex_a_json_field_or_the_traces():
    assert parse_metric("trace").kind == "trace"
    assert (parse_metric("max:json:perf.tokens_s").pattern, parse_metric("max:json:perf.tokens_s").goal) \
        == ("perf.tokens_s", "max")
    assert parse_metric(r"step_time=(?P<value>[0-9.]+)").kind == "regex"
    for bad, message in (("", "give trace"), ("(", "not a regular expression"),
                         ("a(b)(c)", "exactly one group"), ("json:", "json:FIELD"),
                         ("json:a..b", "json:FIELD")):
        with pytest.raises(MetricError, match=message):
            parse_metric(bad)


def test_values_belong_to_the_rank_that_printed_them():
    lines = ['[rank0]:{"step": 1, "timing": {"step_ms": 10.5}}',
             "[rank1]:step 1 step_time=12.0 ms",
             '[rank1]:{"step": 1, "timing": {"step_ms": 11}}',
             '[rank0]:{"step": 2, "timing": {"step_ms": "fast"}}',
             '[launcher] {"timing": {"step_ms": 99}}',
             '[rank2]:{"timing": {"step_ms": true}}',
             "[rank2]:" + "{" * 50_000]
    assert values_by_rank(lines, parse_metric("json:timing.step_ms")) == {0: [10.5], 1: [11.0]}
    assert values_by_rank(lines, parse_metric(r"step_time=([0-9.]+)")) == {1: [12.0]}


def test_the_objective_of_a_collected_run(tmp_path):
    out = tmp_path / "256thread_28channels"
    out.mkdir()
    (out / "node_0_output.log").write_text(
        "[launcher] node 0 started\n" + "".join(f"[rank{r}]:{json.dumps({'step_ms': r + s})}\n"
                                                for s in range(1, 4) for r in (0, 1)))
    (out / "node_1_output.log").write_text("[rank2]:{\"step_ms\": 9}\n[rank3]:oops\n")
    found = extract_objective(out, parse_metric("json:step_ms"))
    assert found.per_rank == {0: [1.0, 2.0, 3.0], 1: [2.0, 3.0, 4.0], 2: [9.0]}
    assert found.median == 3.0 and "2 node log(s), 3 rank(s), 7 value(s)" in found.source
    nothing = extract_objective(out, parse_metric("json:missing"))
    assert nothing.median is None and "no value" in nothing.problems[0]
    assert extract_objective(out, None) is None  # no metric, no trace: nothing to measure by
    traces = out / "torch_profiler"
    traces.mkdir()
    (traces / "rank_00_step_7.json").write_bytes((DATA / "traces" / "gemm_copy_cpu.trace.json").read_bytes())
    by_trace = extract_objective(out, None)
    wall = json.loads((DATA / "traces" / "gemm_copy_cpu.expected.json").read_text())["wall_ms"]
    assert list(by_trace.per_rank) == [0] and len(by_trace.per_rank[0]) == len(wall)
    assert by_trace.median == pytest.approx(statistics.median(wall), rel=0.05)


# -- the hang watchdog's progress and the flight recorder's pipe ----------------------------------

def test_line_progress_feeds_the_hang_watchdog_per_rank():
    from tasks.lib.entry import count_rank_lines
    from tasks.run.hangwatch import HangMonitor

    monitor = HangMonitor(session=None, run_id="r", output_dir="/o", timeout_s=10, world_size=4,
                          started_at=0.0, line_progress=True)
    block = "\n".join(f"[rank{rank}]: loss 1.0" for rank in (0, 1, 1, 3, 7))
    block += "\n[rank-1]: not a rank\nno mark [rank2]: mid-line\n"
    assert count_rank_lines(block) == {0: 1, 1: 2, 3: 1, 7: 1}
    monitor.count_lines(count_rank_lines(block))
    assert monitor.poll([], now=5.0) == [0, 1, 3]
    assert monitor.tick([object()], now=14.0) is None  # 9 s since the last line
    monitor.count_lines(count_rank_lines("[rank2]: step"))
    assert monitor.poll([], now=16.0) == [2]
    report = monitor.tick([object()], now=30.0)
    assert report is not None and report.stalled_for_s == pytest.approx(14.0)


def test_the_dump_request_writes_into_every_live_pipe_and_never_blocks_on_a_dead_one(tmp_path):
    flight = tmp_path / "flight_recorder"
    flight.mkdir()
    live, dead = flight / "pipe_rank_0.pipe", flight / "pipe_rank_1.pipe"
    os.mkfifo(live)
    os.mkfifo(dead)
    got: list[bytes] = []
    # As ProcessGroupNCCL's DumpPipe: opened for reading, non-blocking, polled.
    fd = os.open(live, os.O_RDONLY | os.O_NONBLOCK)

    def poll() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not got:
            try:
                data = os.read(fd, 128)
            except BlockingIOError:
                data = b""
            if data:
                got.append(data)
            time.sleep(0.05)

    reader = threading.Thread(target=poll)
    reader.start()
    started = time.monotonic()
    done = subprocess.run(["bash", "-c", flight_dump_command(str(tmp_path))], timeout=20)
    elapsed = time.monotonic() - started
    reader.join()
    os.close(fd)
    assert done.returncode == 0 and got == [b"1"]
    assert (flight / "DUMP").exists() and stat.S_ISFIFO(dead.stat().st_mode)
    assert elapsed < 8  # the pipe nobody reads gave up after 2 s


# -- the report of an entry run ---------------------------------------------------------------------

def entry_run(base: Path, name: str, values: list[float], status: str = "succeeded",
              metric: str = "json:step_ms") -> Path:
    run = base / name
    out = run / "256thread_28channels"
    out.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "run_id": name, "status": status, "world_size": 2, "nodes": [{}, {}],
        "flags": {"channels": 28, "threads": 256, "entry": {"argv": ["train.py"]},
                  "metric": metric, "accelerator": "cpu"},
        "env": {"common": {"NCCL_MAX_NCHANNELS": "28"}, "per_node": [{}, {}]}}))
    (out / "node_0_output.log").write_text("".join(
        f"[rank{i % 2}]:{json.dumps({'step_ms': v})}\n" for i, v in enumerate(values)))
    return run


def test_the_report_of_an_entry_run_holds_its_objective_not_our_metrics(tmp_path):
    from tasks.lib import report as rep
    from tasks.lib.report.outputs import write_report

    run = entry_run(tmp_path, "multinode_28ch_256th_20260101_000000_aaaaaa", [4.0, 5.0, 6.0, 7.0])
    result = write_report(run, plots=False)
    (row,) = result.rows
    assert (row.status, row.iter_ms_median, row.steps) == (rep.COMPLETED, 5.5, 2)
    assert row.objective == "JSON field 'step_ms' of the ranks' output lines (lower is better)"
    assert not any("summary.json" in p or "metrics.jsonl" in p for p in row.problems), row.problems
    text = (run / "report.md").read_text()
    assert "Objective (your own training; in the iter ms columns): JSON field 'step_ms'" in text
    assert "objective" in (run / "results.csv").read_text().splitlines()[0]


def test_the_best_point_follows_the_objectives_direction(tmp_path):
    from tasks.lib import report as rep

    rows = []
    for name, values in (("a", [10.0]), ("b", [20.0])):
        data = rep.read_run(entry_run(tmp_path / "max", f"multinode_28ch_256th_20260101_00000{name}_aaaaaa",
                                      values, metric="max:json:step_ms"))
        rows.append(rep.summarize_run(data))
    assert rep.best_point(rows).iter_ms_median == 20.0
    failed = rep.summarize_run(rep.read_run(entry_run(tmp_path, "multinode_28ch_256th_20260101_000009_bbbbbb",
                                                      [1.0], status="failed")))
    assert failed.status == "failed" and rep.best_point([*rows, failed]).iter_ms_median == 20.0


def test_the_decision_over_entry_runs_has_intervals_and_follows_a_max_objective(tmp_path):
    """Each rank's k-th value is step k of the interval's resampling, so entry runs get the
    report's decision, not only a minimum; a max: objective is compared as 1/x: the highest
    throughput wins, by its ratio over the runner-up, and is shown as measured."""
    from tasks.lib import report as rep

    rows = []
    for name, level in (("a", 100.0), ("b", 130.0)):
        values = [level + (i % 5) for i in range(40)]
        row = rep.summarize_run(rep.read_run(entry_run(tmp_path, f"multinode_28ch_256th_20260101_00000{name}_aaaaaa",
                                                       values, metric="max:json:step_ms")))
        assert len(row.samples) == 40 and {step for step, _ in row.samples} == set(range(20))
        # Two runs' worth: the same values again (a real sweep would have --repeat 2).
        point = rep.point_row([row, row], 2)
        point.channels = 28 if name == "a" else 56
        rows.append(point)
    decision = rep.decide_rows(rows)
    assert decision.status == rep.WINNER and decision.winner == rows[1].label, decision.reason
    assert decision.margin == pytest.approx(132.0 / 102.0 - 1.0, rel=0.02)
    from tasks.lib.report.conclusion import interval_text

    assert interval_text(rows[1], decision).startswith("132.00 ms")
    # Lower is better (the default): the same values crown the other point.
    for row in rows:
        row.objective_goal = "min"
    assert rep.decide_rows(rows).winner == rows[0].label


def test_a_sweep_of_an_entry_restarts_every_point():
    from tasks.sweep import sweep_mode

    assert sweep_mode(True, {"entry": "train.py"}, None) == (
        False, "--entry runs your own program, which has no rank pool")
    assert sweep_mode(True, {"entry": None}, None) == (True, None)


def test_a_failed_entry_run_says_why_in_the_failing_ranks_words(tmp_path):
    from tasks.lib import report as rep

    run = entry_run(tmp_path, "multinode_28ch_256th_20260101_000000_cccccc", [1.0], status="failed")
    record = json.loads((run / "run.json").read_text())
    record["first_failure"] = {"node_rank": 1, "host": "n1", "ranks": [3], "reason": "rank 3 failed"}
    (run / "run.json").write_text(json.dumps(record))
    # As the simulated cluster's node log held it: torch marks the rank again, peers fail after.
    (run / "256thread_28channels" / "node_1_output.log").write_text(
        "[rank3]:[rank3]: Traceback (most recent call last):\n"
        "[rank3]:[rank3]: RuntimeError: own training: rank 3 failed on purpose at step 5\n"
        "[rank2]:[rank2]: RuntimeError: Connection closed by peer\n")
    row = rep.summarize_run(rep.read_run(run))
    assert row.problems == ["node 1 (n1): rank 3 failed",
                            "rank 3: RuntimeError: own training: rank 3 failed on purpose at step 5"]


def test_an_entry_runs_effective_settings_come_from_its_ranks_nccl_debug_files(tmp_path):
    """The launch sends an entry's NCCL INFO lines to nccl_debug_<host>_<pid>.log; the report
    reads them with our loop's parser and checks (real NCCL 2.28.9 H100 log, data/nccl/)."""
    from tasks.lib import report as rep

    run = entry_run(tmp_path, "multinode_28ch_256th_20260101_000000_dddddd", [1.0, 2.0])
    record = json.loads((run / "run.json").read_text())
    # What the recording's process had (data/nccl/README.md), and the threads env.sh adds, where
    # run.json keeps them (tasks/lib/runrecord.py: env.common, then env.per_node).
    record["env"]["common"] = {"NCCL_MIN_NCHANNELS": "4", "NCCL_MAX_NCHANNELS": "4",
                               "NCCL_NTHREADS": "256"}
    record["flags"]["accelerator"] = "cuda"
    (run / "run.json").write_text(json.dumps(record))
    (run / "256thread_28channels" / "nccl_debug_node0_4242.log").write_bytes(
        (DATA / "nccl" / "nccl-2.28.9_h100_world1_env-channels4.log").read_bytes())
    row = rep.summarize_run(rep.read_run(run))
    assert row.effective_channels == 4 and row.settings_flag is True
    assert "grid channels 28, NCCL built 4" in row.settings_flags
    assert any("NCCL_NTHREADS=256 was set but NCCL never reported reading it" in f
               for f in row.settings_flags)
    without = rep.summarize_run(rep.read_run(entry_run(tmp_path / "b", run.name, [1.0])))
    assert without.effective_channels is None and without.settings_flag is None
