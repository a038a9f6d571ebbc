"""Diagnostics: py-spy dump parsing, and the node collector run for real on processes of this
machine that carry the run markers (one of them frozen with SIGSTOP, as in a hang)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tasks.lib.diagnostics import (
    DiagnosticsSummary,
    NodeReport,
    Frame,
    build_summary,
    first_stalled,
    hang_record,
    hang_summary_markdown,
    innermost_frames,
    innermost_train_frame,
    main_thread,
    node_diagnostics_command,
    node_report_files,
    node_venv,
    parse_node_report,
    parse_pyspy_dump,
    summary_lines,
    thread_line,
)
from tasks.lib.diagnostics_node import parse_environ, parse_stat
from tasks.cluster.session import PROJECT_ROOT
from tests.helpers import FAKE_STEPPER_WAIT_FRAME, fake_stepper_files, ready_file, wait_until

NATIVE_DUMP = """\
Process 4242: /usr/bin/python3 -m train --config c.yaml
Python v3.11.7 (/usr/bin/python3.11)

Thread 4242 (idle): "MainThread"
    pthread_cond_wait (libc.so.6)
    c10d::ProcessGroupGloo::AsyncWork::wait (libtorch_cpu.so)
    wait (torch/distributed/distributed_c10d.py:123)
        Arguments:
            self: <Work at 0x7f>
    _finish_step (train/stepper.py:210)
    run (train/stepper.py:150)
    _run_phase (train/trainer.py:106)
    <module> (train/__main__.py:4)
    0x7f10c704524a (libc.so.6)
Thread 0x7F00AB (active+gil): "comm"
    _bucket (train/stepper.py:77)
"""


def test_parse_pyspy_dump_threads_and_frames():
    threads = parse_pyspy_dump(NATIVE_DUMP)
    assert [(t.thread_id, t.status, t.name) for t in threads] == [
        ("4242", "idle", "MainThread"), ("0x7F00AB", "active+gil", "comm")]
    main = main_thread(threads)
    assert main.frames[0] == Frame("pthread_cond_wait", "libc.so.6")
    assert not main.frames[0].is_python and main.frames[2].is_python
    assert len(main.frames) == 8  # the "Arguments:" lines are not frames
    assert [str(f) for f in innermost_frames(main, 2)] == [
        "wait (torch/distributed/distributed_c10d.py:123)", "_finish_step (train/stepper.py:210)"]
    assert str(innermost_train_frame(main)) == "_finish_step (train/stepper.py:210)"
    assert thread_line(threads[1]) == "comm: _bucket (train/stepper.py:77)"


def test_thread_line_points_from_the_collective_to_the_train_code():
    dump = NATIVE_DUMP + """Thread 77 (idle): "comm-worker"
    pthread_cond_wait (libc.so.6)
    all_reduce (torch/distributed/distributed_c10d.py:3252)
    _run_bucket (train/stepper.py:254)
Thread 78 (idle): "pt_elastic"
    wait (threading.py:331)
"""
    threads = parse_pyspy_dump(dump)
    assert thread_line(threads[2]) == \
        "comm-worker: all_reduce (torch/distributed/distributed_c10d.py:3252) <- _run_bucket (train/stepper.py:254)"
    assert thread_line(threads[3]) is None


def test_parse_empty_or_error_output():
    assert parse_pyspy_dump("") == []
    assert parse_pyspy_dump("Error: Failed to find python version from target process\n") == []


def test_proc_parsers():
    assert parse_environ(b"A=1\0B=x=y\0\0junk\0") == {"A": "1", "B": "x=y"}
    stat = parse_stat("123 (python3 (a) b) T 1 123 100 0 -1")
    assert stat == {"comm": "python3 (a) b", "state": "T", "ppid": 1, "pgrp": 123, "session": 100}


def test_first_stalled_uses_process_state_to_break_ties():
    assert first_stalled([0, 1, 2, 3], [2]) == ([2], "progress, narrowed by process state")
    assert first_stalled([1], [2]) == ([1], "progress")
    assert first_stalled([], [3]) == ([3], "process state")
    assert first_stalled([0, 1], []) == ([0, 1], "progress")


# -- the collector on real processes ----------------------------------------------------------

@pytest.fixture
def fake_run(tmp_path):
    """Two 'ranks' of node 0 of a run (rank 1 frozen), one process of another run, one of node 1
    of the same run; a registry entry and an output dir with metrics and a log."""
    run_id = f"multinode_28ch_256th_test_{uuid.uuid4().hex[:8]}"
    (tmp_path / "train").mkdir()
    for name, text in fake_stepper_files().items():
        (tmp_path / name).write_text(text)
    output_dir = tmp_path / "experiments" / run_id / "256thread_28channels"
    output_dir.mkdir(parents=True)
    log = output_dir / "node_0_output.log"
    log.write_text("".join(f"step {i}/100 | iter 1 ms\n" for i in range(1, 301)))
    (output_dir / "rank_00_metrics.jsonl").write_text(
        "".join(json.dumps({"rank": 0, "step": s}) + "\n" for s in range(1, 8)))
    (output_dir / "rank_01_metrics.jsonl").write_text(
        "".join(json.dumps({"rank": 1, "step": s}) + "\n" for s in range(1, 7)))
    registry = tmp_path / "registry"
    entry = registry / run_id / "node_0"
    entry.mkdir(parents=True)
    (entry / "meta.json").write_text(json.dumps({"run_id": run_id, "node_rank": 0,
                                                 "output_log": str(log), "container": None}))
    (entry / "state").write_text("running\n")

    def start(env_extra):
        env = {"PATH": os.environ["PATH"], **env_extra}
        return subprocess.Popen([sys.executable, "-m", "train"], cwd=tmp_path, env=env)

    marker = {"GEMM_RUN_ID": run_id, "GEMM_NODE_RANK": "0", "NCCL_DEBUG": "INFO",
              "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NOT_COLLECTED": "x"}
    procs = {
        "rank0": start({**marker, "RANK": "0", "LOCAL_RANK": "0"}),
        "rank1": start({**marker, "RANK": "1", "LOCAL_RANK": "1"}),
        "other_run": start({"GEMM_RUN_ID": run_id + "x", "GEMM_NODE_RANK": "0", "RANK": "5",
                            "LOCAL_RANK": "0"}),
        "other_node": start({**marker, "GEMM_NODE_RANK": "1", "RANK": "2", "LOCAL_RANK": "0"}),
    }
    try:
        # Every fake in its wait loop before rank 1 is frozen: the stacks are known.
        ready = [tmp_path / ready_file(rank) for rank in (0, 1, 5, 2)]
        wait_until(lambda: all(path.exists() for path in ready), timeout=30,
                   what="fake ranks not in their wait loop")
        os.kill(procs["rank1"].pid, signal.SIGSTOP)
        yield {"run_id": run_id, "registry": registry, "procs": procs, "log": log,
               "output_dir": output_dir}
    finally:
        for proc in procs.values():
            proc.kill()  # SIGKILL ends a stopped process too
            proc.wait()


def proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def collect(fake_run) -> NodeReport:
    command = node_diagnostics_command(fake_run["run_id"], 0, str(fake_run["registry"]),
                                       workdir=str(PROJECT_ROOT), log_lines=50)
    done = subprocess.run(["bash", "-c", command.command], input=command.stdin,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return parse_node_report(done.stdout, 0, "node-a")


def test_collector_dumps_every_rank_of_the_run_and_leaves_them_as_they_were(fake_run):
    report = collect(fake_run)
    procs = fake_run["procs"]
    by_pid = {p["pid"]: p for p in report.processes}
    assert set(by_pid) == {procs["rank0"].pid, procs["rank1"].pid}, "only this run, only this node"
    rank0, rank1 = by_pid[procs["rank0"].pid], by_pid[procs["rank1"].pid]
    assert (rank0["rank"], rank0["role"], rank1["rank"], rank1["state"]) == (0, "rank", 1, "T")
    for proc in (rank0, rank1):
        assert proc["stack"]["ok"], proc["stack"]["errors"]
        assert FAKE_STEPPER_WAIT_FRAME in proc["stack"]["text"]
    assert "--nonblocking" in rank1["stack"]["command"]  # a stopped process cannot be suspended
    assert rank0["env"]["NCCL_DEBUG"] == "INFO" and "NOT_COLLECTED" not in rank0["env"]
    assert report.data["log_tail"]["lines"][-1] == "step 300/100 | iter 1 ms"
    assert len(report.data["log_tail"]["lines"]) == 50
    assert report.progress == {0: {"lines": 7, "step": 7, "mtime": pytest.approx(time.time(), abs=60)},
                               1: {"lines": 6, "step": 6, "mtime": pytest.approx(time.time(), abs=60)}}
    # Diagnosing changes nothing: the frozen rank stays frozen, the other keeps running.
    assert proc_state(procs["rank1"].pid) == "T"
    assert proc_state(procs["rank0"].pid) in ("S", "R")


def test_summary_files_and_markdown_from_a_real_collection(fake_run, tmp_path):
    report = collect(fake_run)
    files = node_report_files(report)
    rank1_pid = fake_run["procs"]["rank1"].pid
    assert f"pyspy_rank01_pid{rank1_pid}.txt" in files
    assert "train/fake_stepper.py" in files[f"pyspy_rank01_pid{rank1_pid}.txt"]
    assert "NCCL_DEBUG=INFO" in files["nccl_env.txt"]
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in files["nccl_env.txt"]
    assert files["log_tail.txt"].rstrip().endswith("step 300/100 | iter 1 ms")
    tools = [tool for tool in ("nvidia-smi", "rocm-smi", "amd-smi") if shutil.which(tool)]
    if tools:  # each tool's command line and its output, rc included
        for tool in tools:
            assert re.search(rf"^\$ {tool}\b.*\(rc=-?\d+\)$", files["gpu.txt"], re.M), tool
    else:
        assert files["gpu.txt"] == "no GPU tool (nvidia-smi, rocm-smi, amd-smi) on this host\n"

    hang = {"timeout_s": 30.0, "stalled_for_s": 30.5, "first_stalled_ranks": [1],
            "rank_steps": {"0": 7, "1": 6}}
    summary = build_summary(fake_run["run_id"], "hang", [report], 123.0, hang=hang)
    assert summary.first_stalled_ranks == [1]
    assert summary.suspects == [1]
    assert [(s.rank, s.step, s.state) for s in summary.ranks] == [(0, 7, "S"), (1, 6, "T")] or \
        [(s.rank, s.step, s.state) for s in summary.ranks] == [(0, 7, "R"), (1, 6, "T")]
    assert summary.ranks[0].frames[0] == FAKE_STEPPER_WAIT_FRAME
    assert summary.ranks[1].train_frame == FAKE_STEPPER_WAIT_FRAME
    text = "\n".join(summary_lines(summary))
    assert "HUNG" in text and "rank 1 (node 0, node-a" in text and "state T (stopped)" in text

    run_dir = tmp_path / "run"
    (run_dir / "hang").mkdir(parents=True)
    (run_dir / "hang" / "summary.json").write_text(json.dumps(summary.as_dict()))
    markdown = hang_summary_markdown(run_dir)
    assert "Stopped advancing first: **rank 1**" in markdown
    assert f"| 1 | 0 | node-a | 6 | T (stopped) | `{FAKE_STEPPER_WAIT_FRAME}`" in markdown
    assert DiagnosticsSummary.from_dict(json.loads(json.dumps(summary.as_dict()))).ranks == summary.ranks
    record = hang_record(summary, "hang")
    assert record["first_stalled_ranks"] == [1] and record["diagnostics"] == "hang"


def test_a_start_up_stall_summary_names_rank_phase_and_rule(fake_run, tmp_path):
    from tasks.lib.startwatch import StartupStall

    report = collect(fake_run)
    stall = StartupStall(rule="behind", phase="worker", missing="store", ranks=(0,), nodes=(0,),
                         limit_s=24.0, waited_s=25.0, detail="rank 1 (node 0) reached 'store' "
                         "25 s before (limit 24 s)", phases={0: "worker", 1: "store"},
                         detected_at=1.0)
    hang = {"timeout_s": 24.0, "stalled_for_s": 25.0, "first_stalled_ranks": [0],
            "rank_steps": {"0": None, "1": None}, "startup": stall.as_dict()}
    # The phases decide, not the process states (rank 1 is the stopped one here).
    summary = build_summary(fake_run["run_id"], "startup", [report], 1.0, hang=hang)
    assert summary.first_stalled_ranks == [0]
    assert summary.basis == "start-up phase 'worker', rule behind"
    text = "\n".join(summary_lines(summary))
    assert text.splitlines()[0] == (f"run {fake_run['run_id']} STUCK IN START-UP: rank 0 (node 0) "
                                    "stuck in start-up phase 'worker' (rank process started), "
                                    "never reached 'store': rank 1 (node 0) reached 'store' 25 s "
                                    "before (limit 24 s)")
    assert "stuck in start-up: rank(s) 0" in text
    assert re.search(r"rank 0 \(node 0, node-a, pid \d+\): phase worker", text)
    assert re.search(r"rank 1 \(node 0, node-a, pid \d+\): phase store, state T", text)
    run_dir = tmp_path / "run"
    (run_dir / "hang").mkdir(parents=True)
    (run_dir / "hang" / "summary.json").write_text(json.dumps(summary.as_dict()))
    markdown = hang_summary_markdown(run_dir)
    assert markdown.startswith(f"## Stuck in start-up: {fake_run['run_id']}")
    assert "Stuck in start-up: **rank 0**" in markdown


def test_progress_ties_are_narrowed_by_the_frozen_process(fake_run):
    report = collect(fake_run)
    hang = {"timeout_s": 5, "first_stalled_ranks": [0, 1], "rank_steps": {"0": 6, "1": 6}}
    summary = build_summary(fake_run["run_id"], "hang", [report], 1.0, hang=hang)
    assert summary.first_stalled_ranks == [1]
    assert summary.basis == "progress, narrowed by process state"


def test_no_hang_no_markdown(tmp_path):
    assert hang_summary_markdown(tmp_path) == ""


def test_collector_for_an_unknown_run_reports_nothing_found(tmp_path):
    command = node_diagnostics_command("no-such-run", 0, str(tmp_path), workdir=str(PROJECT_ROOT))
    done = subprocess.run(["bash", "-c", command.command], input=command.stdin,
                          capture_output=True, text=True, timeout=60)
    report = parse_node_report(done.stdout, 0, "node-a")
    assert report.processes == [] and report.data["log_tail"]["error"]
    summary = build_summary("no-such-run", "diagnose", [report], 0.0, expected_ranks=[0, 1])
    assert summary.first_stalled_ranks == [0, 1]
    assert "no process found" in "\n".join(summary_lines(summary))


def test_parse_node_report_skips_noise_and_names_the_host_on_garbage():
    assert parse_node_report('noise from env.sh\n{"processes": []}\n', 1, "h").data == {"processes": []}
    with pytest.raises(ValueError, match="node-b"):
        parse_node_report("bash: python3: command not found\n", 1, "node-b")


def test_hang_monitor_polls_real_files_fires_and_writes_the_hang_dir(fake_run, tmp_path):
    """The launch's watchdog loop through a real LocalNode (the embedded default's shell)."""
    import io

    from invoke import Config, Context
    from rich.console import Console

    from tasks.run.hangwatch import HangMonitor
    from tasks.lib.settings import default_config
    from tasks.cluster.session import ClusterSession

    config = default_config()
    config["cluster"]["registry_dir"] = str(fake_run["registry"])
    config["cluster"]["workdir"] = str(PROJECT_ROOT)
    with ClusterSession(Context(Config(overrides=config))) as session:
        monitor = HangMonitor(session, fake_run["run_id"], str(fake_run["output_dir"]), 5.0,
                              world_size=2, started_at=0.0, poll_s=1.0)
        assert monitor.tick(session.nodes, 0.0) is None
        assert {r: p.progress for r, p in monitor.watchdog.ranks.items()} == {0: 7, 1: 6}
        with (fake_run["output_dir"] / "rank_00_metrics.jsonl").open("a") as handle:
            handle.write(json.dumps({"rank": 0, "step": 8}) + "\n")
        assert monitor.tick(session.nodes, 2.0) is None
        assert monitor.tick(session.nodes, 6.9) is None
        report = monitor.tick(session.nodes, 7.0)
        assert report is not None and report.first_stalled == (1,)
        out = io.StringIO()
        record = monitor.diagnose(report, tmp_path / "run", container=None,
                                  console=Console(file=out, width=200))
    assert record["first_stalled_ranks"] == [1] and record["rank_steps"] == {"0": 8, "1": 6}
    assert record["diagnostics"] == "hang" and record["stalled_for_s"] == 5.0
    assert "rank 1 (node 0, localhost" in out.getvalue() and "state T (stopped)" in out.getvalue()
    hang_dir = tmp_path / "run" / "hang"
    assert (hang_dir / "summary.md").read_text() == hang_summary_markdown(tmp_path / "run")
    assert len(list((hang_dir / "node_0").glob("pyspy_rank*_pid*.txt"))) == 2


@pytest.mark.parametrize("run_id", ["*", "run-?", "a/b", "..", ".hidden", "x" * 201, ""])
def test_diagnose_refuses_a_run_id_that_is_no_run_id(run_id):
    from invoke.exceptions import Exit

    from tasks.diagnose import checked_run_id

    with pytest.raises(Exit) as raised:
        checked_run_id(run_id)
    assert raised.value.code == 2 and raised.value.message.startswith("--run: run id ")
    assert checked_run_id("20240101_120000-gemm.2") == "20240101_120000-gemm.2"


def test_fab_diagnose_with_a_glob_run_exits_2_before_connecting(tmp_path):
    # Hosts that do not exist: the refusal must come before any connection is tried.
    config = tmp_path / "runtime.yaml"
    config.write_text("cluster:\n  hosts: [no-such-host.invalid]\n")
    done = subprocess.run([str(PROJECT_ROOT / ".venv" / "bin" / "fab"), "-f", str(config),
                           "diagnose", "--run", "*"], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("--run: run id '*' must be") and "Traceback" not in done.stderr


def test_node_venv_is_the_configured_one_else_the_checkouts():
    assert node_venv("/opt/venv", "/srv/gemm") == "/opt/venv"
    assert node_venv(None, "/srv/gemm") == "/srv/gemm/.venv"
    assert node_venv("", "/srv/gemm/") == "/srv/gemm/.venv"
