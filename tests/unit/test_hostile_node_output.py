"""What a hostile node can send the controller (issue 26, findings 4-6), fed to the controller's
own readers and writers: its output stream (floods, endless lines, terminal escapes), its files
(summary.json, metrics lines, diagnostics reports) and its values (status, host, flags) shown in
results.csv, report.md, the terminal and the figures. Each must be bounded, escaped for where it
is shown, and unable to stop the run's own bookkeeping.
"""
from __future__ import annotations

import csv
import io
import json
import re
import shlex
import subprocess
import time
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console

from tasks.lib.quoting import FedCommand
from tasks.lib import report as rep
from tasks.lib.diagnostics import build_summary, parse_node_report, summary_markdown
from tasks.lib.registry import NodeRunRecord
from tasks.lib.runrecord import headline_metrics
from tasks.lib.watchdog import HangReport, RankProgress, parse_progress_line, parse_progress_poll
from tests.unit.report_fixtures import make_run

ESC = "\x1b"


# -- bounded reading (finding 5) ------------------------------------------------------------------

@pytest.mark.parametrize("text, reason", [
    ("[" * 100_000 + "]" * 100_000, "nested deeper"),
    ('{"a":' * 70 + "1" + "}" * 70, "nested deeper"),
    ('{"step": ' + "9" * 5000 + "}", "4300"),           # Python's own digit limit
    ('{"step": ' + "9" * 4000 + "}", "more than 19 digits"),  # float() would overflow
])
def test_bounded_json_raises_only_value_error(text, reason):
    from tasks.lib import untrusted

    with pytest.raises(ValueError, match=reason):
        untrusted.loads(text)


def test_bounded_json_reads_our_own_documents_and_refuses_oversized_ones():
    from tasks.lib import untrusted

    assert untrusted.loads('{"iter_ms": {"median": -1.5e3}, "steps": [1, 2]}') == {
        "iter_ms": {"median": -1500.0}, "steps": [1, 2]}
    with pytest.raises(ValueError, match="larger than"):
        untrusted.loads(b"[" + b"1," * 100 + b"1]", max_bytes=100)
    # An epoch time in nanoseconds has 19 digits: the flight recorder's time_created_ns.
    assert untrusted.loads('{"time_created_ns": 1796654009059477682}') == {
        "time_created_ns": 1796654009059477682}
    with pytest.raises(ValueError, match="more than 19 digits"):
        untrusted.loads('{"time_created_ns": 17966540090594776820}')


def hostile_run(tmp_path: Path) -> Path:
    """A run directory as collected from a hostile node: summary.json nested 100 000 deep, and
    metrics files with a 5000-digit and a 4000-digit number, a 3 MB line, garbage types."""
    run_dir = make_run(tmp_path, 28, 256, world_size=2, nodes=1, steps=4)
    out = run_dir / "256thread_28channels"
    (out / "summary.json").write_text("[" * 100_000 + "]" * 100_000)
    good = (out / "rank_00_metrics.jsonl").read_text()
    (out / "rank_00_metrics.jsonl").write_text(
        good + '{"step": 5, "iter_ms": ' + "9" * 5000 + "}\n"
        + '{"step": 6, "iter_ms": ' + "9" * 4000 + "}\n"
        + '{"step": 7, "iter_ms": "x", "rank": [1]}\n'
        + '{"step": 8, "pad": "' + "p" * 3_000_000 + '"}\n'
        + "[" * 50_000 + "\n")
    return run_dir


def test_the_report_of_a_hostile_run_directory_lists_what_it_could_not_read(tmp_path):
    run_dir = hostile_run(tmp_path)
    rows, _ = rep.collect_rows(rep.discover(run_dir))
    row = rows[0]
    problems = "; ".join(row.problems)
    assert "summary.json unreadable: nested deeper than 64 levels" in problems
    # The good lines are read; the hostile ones are corrupt lines, not the report's end.
    assert "rank_00_metrics.jsonl: 4 corrupt line(s) skipped" in problems
    assert row.iter_ms_median is not None and row.steps == 4
    markdown = rep.report_markdown(rep.discover(run_dir), rows, [])
    assert "nested deeper than 64 levels" in markdown


def test_the_launch_headline_keeps_only_numbers_from_a_summary():
    headline = headline_metrics({"status": "x" * 10_000, "world_size": "2",
                                 "steps_per_s": 10 ** 400, "iter_ms": {"median": "[/]"},
                                 "gemm_tflops": {"median": float("nan")},
                                 "overlap_fraction": {"median": 0.25}})
    assert headline["iter_ms"] is None and headline["gemm_tflops"] is None
    assert headline["steps_per_s"] is None and headline["world_size"] is None
    assert headline["overlap_fraction"] == 0.25 and len(headline["status"]) < 50
    # The launch prints each with "{value:.4g}": every kept value must take it.
    for value in headline.values():
        if value is not None and not isinstance(value, str):
            format(value, ".4g")


def test_progress_readers_take_hostile_lines_without_raising():
    assert parse_progress_line("[" * 100_000) is None
    assert parse_progress_line('{"rank": 0, "step": ' + "9" * 5000 + "}") is None
    assert parse_progress_line('{"rank": "²", "step": 3}') is None
    assert parse_progress_line("step ²/3") is None
    assert parse_progress_line("rank 3: step 12/100") == (3, 12)
    poll = parse_progress_poll("rank_00_metrics.jsonl\t²\t{}\n"
                               "rank_01_metrics.jsonl\t" + "9" * 5000 + "\t{}\n"
                               "rank_02_metrics.jsonl\t7\t" + '{"rank": 2, "step": 6}' + "\n")
    assert poll == {2: (7, 6)}


def test_a_long_line_without_progress_costs_linear_time():
    """The progress pattern was retried from every position of a line (quadratic): 44 KB of
    "step " took 25 s on this machine, 20 KB ~5 s. Every line of a node's output goes through
    it; now a line costs microseconds per KB."""
    started = time.monotonic()
    assert parse_progress_line("rank 3: foo step step " * 900) is None
    assert time.monotonic() - started < 2.0


# -- hang diagnostics from a hostile node (finding 5) -------------------------------------------

HOSTILE_PROCESSES = [
    {"pid": 101, "role": "rank", "rank": "x", "state": "S"},           # a rank that is no number
    {"pid": "1/../../x", "role": "rank", "rank": 1, "state": "S"},      # a pid that is no number
    {"pid": [5], "role": "rank", "rank": 2, "state": "S"},
    {"pid": 104, "role": "rank", "rank": 3, "state": {"a": 1}, "cmdline": "python -m train",
     "env": {"A": 1, "RANK": "3"}, "stack": {"ok": True, "command": "py-spy", "text": 5}},
    "not a process",
    {"pid": 105, "role": "rank", "rank": 4, "state": "S", "cmdline": ["python", "-m", "train"],
     "stack": {"ok": True, "command": ["py-spy", "dump"],
               "text": 'Thread 0x1 (idle): "MainThread"\n    step (train/trainer.py:10)\n'}},
]


def hostile_report_json() -> str:
    return json.dumps({"processes": HOSTILE_PROCESSES, "gpu": "nvidia", "log_tail": [1],
                       "progress": {"x": 1, "4": {"step": "7"}, "9" * 5000: {}},
                       "container_report": {"processes": 7}})


def test_a_hostile_diagnostics_report_cannot_raise_on_the_way_to_the_stop(tmp_path):
    from tasks.run.diagnosing import write_diagnostics

    report = parse_node_report("noise\n" + hostile_report_json() + "\n", 0, "node-a")
    assert [p["pid"] for p in report.processes] == [101, 104, 105]
    assert report.data["unreadable"] == ["3 of 6 process entries unreadable (no usable pid, or "
                                         "beyond the first 4096)"]
    summary = build_summary("run", "hang", [report], 0.0, expected_ranks=range(5))
    assert [s.rank for s in summary.ranks] == [3, 4]
    assert summary.ranks[1].train_frame == "step (train/trainer.py:10)"
    write_diagnostics(tmp_path / "hang", [report], summary)
    assert "| 4 | 0 | node-a |" in summary_markdown(summary, "hang")


def test_a_report_too_deep_to_read_names_the_node():
    with pytest.raises(ValueError, match="the diagnostics report of node-b is unreadable"):
        parse_node_report("{" + '"a":{' * 100_000, 1, "node-b")


def local_watcher(tmp_path: Path, pid: int, *, hang_timeout: str = "0", console_file=None):
    """A Watcher of this machine alone (LocalNode: real shell, real tail), its plan's node output
    directory under tmp_path."""
    from invoke import Config, Context

    from tasks.cluster.session import ClusterSession
    from tasks.lib.runspec import LaunchFlags
    from tasks.run.plan import build_plan, resolve_spec
    from tasks.run.watch import Watcher

    session = ClusterSession(Context(Config(overrides={"cluster": {
        "hosts_file": str(tmp_path / "no_hosts.txt"), "experiments_dir": str(tmp_path / "exp")}})))
    spec = resolve_spec(session, LaunchFlags(hang_timeout=hang_timeout), {}, {})
    plan = build_plan(session, spec, run_id="multinode_28ch_256th_20260101_000000",
                      run_dir=tmp_path / "run", nproc=1, master_addr="127.0.0.1",
                      master_port=29500, ifnames=["lo"], facts=None)
    plan = replace(plan, output_dir=str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    console = Console(file=console_file or io.StringIO(), soft_wrap=True)
    return session, plan, Watcher(session, plan, {0: pid}, console)


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_hung_run_is_stopped_whatever_the_nodes_diagnostics_report_says(tmp_path, monkeypatch):
    """The node's collector answers with the hostile report (what a compromised node prints):
    the watcher still records the hang and stops every node."""
    from tasks.lib import diagnostics

    report_file = tmp_path / "report.json"
    report_file.write_text(hostile_report_json())
    monkeypatch.setattr(diagnostics, "node_diagnostics_command",
                        lambda *args, **kwargs: FedCommand(f"cat {shlex.quote(str(report_file))}", ""))
    monkeypatch.setattr(diagnostics, "flight_dump_command", lambda output_dir: "true")
    session, plan, watcher = local_watcher(tmp_path, dead_pid(), hang_timeout="60")
    stops: list[bool] = []
    monkeypatch.setattr(watcher, "stop_all", lambda **kwargs: stops.append(True))
    monkeypatch.setattr("tasks.run.hangwatch.FLIGHT_DUMP_SETTLE_S", 0.0)
    hang = HangReport(detected_at=100.0, timeout_s=60.0, last_progress_at=10.0,
                      ranks=(RankProgress(3, 5, 5, 10.0), RankProgress(4, 5, 5, 10.0)),
                      first_stalled=(3, 4))
    with session:
        watcher.on_hang(hang)
        watcher.close()
    assert stops == [True] and watcher.hung
    assert plan.record.hang["first_stalled_ranks"] == [3, 4]
    assert (plan.run_dir / "hang" / "node_0" / "report.json").is_file()


def test_the_hung_run_is_stopped_even_when_its_diagnostics_fail(tmp_path, monkeypatch):
    session, plan, watcher = local_watcher(tmp_path, dead_pid(), hang_timeout="60")
    stops: list[bool] = []
    monkeypatch.setattr(watcher, "stop_all", lambda **kwargs: stops.append(True))

    def broken(*args, **kwargs):
        raise RecursionError("a report nested too deep")

    monkeypatch.setattr(watcher.hang, "diagnose", broken)
    hang = HangReport(detected_at=100.0, timeout_s=60.0, last_progress_at=10.0, ranks=(),
                      first_stalled=(0,))
    with session:
        watcher.on_hang(hang)
        watcher.close()
    assert stops == [True]
    assert plan.record.hang["diagnostics_error"] == "RecursionError: a report nested too deep"


# -- the output stream (finding 4) --------------------------------------------------------------

def test_a_flood_of_node_output_is_streamed_in_bounded_memory_and_its_failure_line_is_seen(tmp_path):
    """3 MB of lines, an endless line of 1 MB and terminal escapes, then the line that names a
    failed rank: through the real tail and the watcher's line handling (controller log, progress,
    failure evidence, console). Memory stays far below the output's size; the failure after the
    flood is found; the console gets no escape sequence."""
    console_path = tmp_path / "console.txt"
    console_file = open(console_path, "w")  # noqa: SIM115 - closed below
    session, plan, watcher = local_watcher(tmp_path, dead_pid(), console_file=console_file)
    log = Path(plan.output_dir) / "node_0_output.log"
    line = b"node0:1:2 [0] NCCL INFO Channel 00/32 :    0   1   2   3 via P2P/IPC/read\n"
    with open(log, "wb") as handle:
        handle.write(line * (3_000_000 // len(line)))
        handle.write(b"step 7/100 | iter 1.0 ms\n")
        handle.write(b"y" * 1_000_000)
        handle.write(f"\n{ESC}]0;owned{ESC}\\{ESC}[2J\rtrain: rank 0 failed: boom\n".encode())
    watch = watcher.watches[0]
    tracemalloc.start()
    try:
        with session:
            watcher._tail(watch, True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        watcher.close()
        console_file.close()
    assert watch.tail_error is None
    assert peak < 2_000_000, peak  # Invoke's capture held all 4 MB (and re-joined it per chunk)
    assert (watch.steps_done, watch.steps_total) == (7, 100)
    assert [(e.kind, e.rank) for e in watcher.evidence] == [("rank-error", 0)]
    shown = console_path.read_text()
    assert ESC not in shown and "\r" not in shown
    assert "[node 0] \\x1b]0;owned\\x1b\\\\x1b[2J\\x0dtrain: rank 0 failed: boom" in shown
    from tasks.lib.nodestream import CUT_MARKER, MAX_LINE_CHARS

    written = (plan.run_dir / plan.record.node(0).log).read_text()
    assert ("y" * MAX_LINE_CHARS + CUT_MARKER.format(limit=MAX_LINE_CHARS)) in written
    assert len(written) < 3_200_000


def test_fab_logs_prints_node_lines_without_terminal_escapes(capsys):
    from tasks.runs import print_prefixed

    print_prefixed(None, 3, ["ok", f"{ESC}[31mred{ESC}[0m\rover\x07", "tab\there"])
    assert capsys.readouterr().out == ("[node 3] ok\n[node 3] \\x1b[31mred\\x1b[0m\\x0dover\\x07\n"
                                       "[node 3] tab\there\n")


# -- values shown (finding 6) --------------------------------------------------------------------

FORGED_STATUS = ("completed\n\n## Best point\n\n**Best point: 64ch × 512th** <script>alert(1)</script>"
                 " <img src=x onerror=alert(2)> [click](http://evil.example) | fake | cell |")


def forged_sweep_rows() -> list[rep.PointRow]:
    row = rep.PointRow(run_id="multinode_28ch_256th_x`y", run_dir=None, channels=28, threads=256,
                       nodes=1, world_size=2, status=FORGED_STATUS, steps=4, iter_ms_median=10.0,
                       contention_slowdown_median=-0.05, slowest_rank=1,
                       slowest_host="<b>host</b>\n## Stragglers",
                       notes=["=HYPERLINK(\"http://evil\",\"x\")"], settings_flag=True,
                       settings_flags=["+cmd|' /C calc'!A0"], problems=["@SUM(1+1)*cmd|' /C calc'!A0"],
                       outlier_steps="-2+3", effective_threads="-1", comm_stream_priority="\t=1+1")
    good = rep.PointRow(run_id="multinode_42ch_256th_y", run_dir=None, channels=42, threads=256,
                        nodes=1, world_size=2, status="completed", steps=4, iter_ms_median=20.0)
    return [row, good]


def test_results_csv_neutralises_formulas_and_keeps_negative_numbers():
    rows = list(csv.DictReader(io.StringIO(rep.results_csv(forged_sweep_rows()))))
    forged = rows[0]
    assert forged["contention_slowdown_median"] == "-0.05"   # a real number stays a number
    assert forged["effective_threads"] == "-1"
    for column in ("notes", "settings_flags", "problems", "outlier_steps", "comm_stream_priority"):
        assert forged[column].startswith("'"), (column, forged[column])
    for value in (v for row in rows for v in row.values()):
        assert not value.startswith(("=", "+", "@", "\t")) and (
            not value.startswith("-") or value.lstrip("-").replace(".", "").isdigit()), value


def test_report_markdown_cannot_be_forged_by_a_node_value(tmp_path):
    rows = forged_sweep_rows()
    report_input = rep.ReportInput("runs", tmp_path, [])
    markdown = rep.report_markdown(report_input, rows, [])
    lines = markdown.splitlines()
    assert lines.count("## Decision") == 1 and lines.count("## Stragglers") == 1
    assert not any(line.startswith("## Best point") for line in lines)
    assert not any(line.startswith("**Best point: 64ch") for line in lines)
    assert "**Best point: 28ch × 256th**" not in markdown  # the forged row is not completed
    # Escaped (a backslash before it), the text shows; unescaped, it would be markup.
    assert not re.search(r"(?<!\\)(<script|<img|<b>|\]\(http)", markdown)
    table_rows = [line for line in lines if line.startswith("| 28 |")]
    assert len(table_rows) == 1 and table_rows[0].count(" | ") == len(rep.MD_COLUMNS) - 1
    assert r"\<script\>alert(1)\</script\>" in table_rows[0]
    assert "`` multinode_28ch_256th_x`y ``" in markdown  # a backtick cannot end the code span


def test_fab_report_prints_node_values_as_text():
    from tasks.lib.report.cli import print_report
    from tasks.lib.report.outputs import ReportResult

    rows = forged_sweep_rows()
    rows[0].problems.append("[/] [bold red]closing tags of nothing[/bold red] [/]")
    result = ReportResult(rep.ReportInput("runs", Path("/x"), []), rows, rep.decide_rows(rows), Path("/x"), [])
    out = io.StringIO()
    print_report(Console(file=out, width=10_000), result)
    assert "[/] [bold red]closing tags of nothing[/bold red] [/]" in out.getvalue()


def test_fab_status_shows_a_nodes_markup_as_text():
    from tasks.runs import status_table

    class FakeNode:
        index, label = 0, "node-a"

    record = NodeRunRecord(run_id="[bold]multinode_x", node_rank=0, state="[/]", exit_code=None,
                           started_at="0001-01-01T00:00:00", ended_at="garbage",
                           pid_alive=True, steps_done=3, output_log=None)
    table, rows = status_table({FakeNode(): [record]})
    out = io.StringIO()
    Console(file=out, width=300).print(table)
    assert rows == 1 and "[/]" in out.getvalue() and "[bold]multinode_x" in out.getvalue()


def test_figures_draw_a_nodes_status_as_plain_text(tmp_path):
    from tasks.lib.report.plots import write_sweep_figures

    rows = forged_sweep_rows()
    rows[0].status = r"$\frac{$ and $x^$"
    written = write_sweep_figures(rows, tmp_path)
    assert written and all(path.stat().st_size > 0 for path in written)
