"""The report: reading run/sweep directories, rows, best point, trade-off, files and figures."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.lib import report as rep
from tasks.lib.report.plots import BUSBW_LINES, CONTENTION_HEATMAP, ITERATION_HEATMAP, PARETO, PER_RANK_STEPS
from tasks.lib.report.outputs import write_report
from tests.helpers import FAB, assert_imports_none_of
from tests.unit.report_fixtures import make_run, make_sweep

ROOT = Path(__file__).resolve().parents[2]
# The running interpreter's scripts, wherever its virtualenv lives (not <repo>/.venv).
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory whose outputs come from the train package itself (2 gloo ranks)."""
    run_dir = tmp_path_factory.mktemp("real") / "multinode_42ch_512th_20250101_120000"
    output_dir = run_dir / "512thread_42channels"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NCCL_MAX_NCHANNELS": "42", "RCCL_THREADS_PER_BLOCK": "512"}
    result = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc_per_node", "2", "-m", "train",
         "--config", "config/multi_node/cpu_tiny.yaml",
         "--override", "training.max_steps=4", f"training.output_dir={output_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return run_dir


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == PNG_MAGIC


# -- a real run -----------------------------------------------------------------------------------

def test_real_run_row_matches_the_train_summary(real_run: Path) -> None:
    data = rep.read_run(real_run)
    summary = json.loads((real_run / "512thread_42channels" / "summary.json").read_text())
    row = rep.summarize_run(data)

    assert data.problems == []
    assert sorted(data.steps_by_rank) == [0, 1]
    assert row.status == "completed"
    assert (row.channels, row.threads, row.world_size, row.steps) == (42, 512, 2, 4)
    assert row.iter_ms_median == summary["iter_ms"]["median"]
    assert row.iter_ms_p90 == summary["iter_ms"]["p90"]
    assert row.busbw_gbps_median == summary["stream_busbw_gbps"]["median"]
    assert row.contention_slowdown_median == summary["contention_slowdown"]["median"]
    assert row.gemm_tflops_median == summary["gemm_tflops"]["median"]
    assert row.exposed_comm_fraction_median == summary["exposed_comm_fraction"]["median"]
    assert row.algbw_gbps_median == summary["stream_algbw_gbps"]["median"]
    # gloo: no kernels, so no kernel-active figure, and the notes say why
    assert row.kernel_busbw_gbps_median is None
    assert "kernel_busbw_gbps null: CPU run: no kernels to profile" in row.notes
    # The report's own aggregation of the jsonl lines agrees with the train package's.
    lines = data.steps
    assert rep.quantile([line["iter_ms"] for line in lines], 50) == pytest.approx(summary["iter_ms"]["median"], abs=1e-4)


def test_real_run_report_files(real_run: Path, tmp_path: Path) -> None:
    result = write_report(real_run, tmp_path)

    rows = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert len(rows) == 1 and rows[0]["status"] == "completed" and rows[0]["channels"] == "42"
    summary = json.loads((real_run / "512thread_42channels" / "summary.json").read_text())
    for column, key in (("gemm_tflops_median", "gemm_tflops"),
                        ("busbw_gbps_median", "stream_busbw_gbps"),
                        ("exposed_comm_fraction_median", "exposed_comm_fraction")):
        assert float(rows[0][column]) == pytest.approx(summary[key]["median"], rel=1e-6), column
    markdown = (tmp_path / "report.md").read_text()
    # One point: nothing to compare it with, so no best point; its own directory is named.
    assert "One point: 42ch × 512th at " in markdown and "output: `512thread_42channels`" in markdown
    assert "## Per rank" in markdown
    assert is_png(tmp_path / PER_RANK_STEPS)
    # One point: a heatmap of a single cell says nothing, so none is drawn.
    assert not (tmp_path / ITERATION_HEATMAP).exists()
    assert result.best is None and result.decision.status == rep.ONLY_POINT
    assert result.rows[0].run_id == real_run.name


# -- damaged and partial runs ---------------------------------------------------------------------

def test_corrupt_and_truncated_jsonl_lines_are_skipped_and_reported(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, 28, 256, world_size=2, nodes=1, steps=5, iter_ms=50.0)
    metrics = run_dir / "256thread_28channels" / "rank_01_metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:20] + "#garbage"
    metrics.write_text("\n".join(lines[:4]) + "\n" + lines[4][:30])  # killed mid-line

    data = rep.read_run(run_dir)
    row = rep.summarize_run(data)

    assert len(data.steps_by_rank[0]) == 5
    assert [line["step"] for line in data.steps_by_rank[1]] == [0, 1, 3]
    assert any("rank_01_metrics.jsonl: 1 corrupt line(s) skipped (line 3)" in p for p in row.problems)
    assert any("last line truncated" in p for p in row.problems)
    assert row.steps == 3
    assert row.status == "completed"


def test_missing_summary_uses_the_metrics_and_says_so(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, 28, 256, summary=False, status="completed", iter_ms=80.0, world_size=2, nodes=1)
    (run_dir / "run.json").write_text(json.dumps({"schema": 1, "status": "running"}))

    row = rep.summarize_run(rep.read_run(run_dir))

    assert row.status == "running"
    assert "summary.json missing" in row.problems
    assert row.iter_ms_median == pytest.approx(80.25)
    # Each rank's own busbw (waits included) is in its lines; the skew-free busbw needs every
    # rank's collectives, which only the summary holds.
    assert row.local_busbw_gbps_median == pytest.approx(10.0)
    assert row.busbw_gbps_median is None and row.wait_ms_p95 is None


def test_a_launch_that_says_succeeded_without_summary_is_incomplete(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, 28, 256, summary=False, world_size=2, nodes=1)
    assert rep.summarize_run(rep.read_run(run_dir)).status == "incomplete"


def test_corrupt_summary_and_run_json_do_not_stop_the_report(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, 56, 512, world_size=2, nodes=1)
    (run_dir / "512thread_56channels" / "summary.json").write_text('{"status": "comp')
    (run_dir / "run.json").write_text("[1, 2]")

    row = rep.summarize_run(rep.read_run(run_dir))

    assert (row.channels, row.threads) == (56, 512)  # from the directory names
    assert row.status == "incomplete"
    assert any(p.startswith("summary.json is not valid JSON") for p in row.problems)
    assert "run.json is not a JSON object" in row.problems
    assert row.iter_ms_median is not None


def test_run_without_outputs(tmp_path: Path) -> None:
    run_dir = tmp_path / "multinode_28ch_256th_20250101_120000"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"schema": 1, "status": "failed", "nnodes": 2, "first_failure": {
        "node_rank": 1, "host": "node1", "reason": "exited 2"}}))

    row = rep.summarize_run(rep.read_run(run_dir))

    assert row.status == "failed"
    assert row.nodes == 2
    assert row.problems[0] == "node 1 (node1): exited 2"
    assert row.iter_ms_median is None


def test_summary_status_stopped_wins_over_a_succeeded_launch(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, 28, 256, status="stopped", world_size=2, nodes=1)
    record = json.loads((run_dir / "run.json").read_text())
    record["status"] = "succeeded"
    (run_dir / "run.json").write_text(json.dumps(record))
    assert rep.summarize_run(rep.read_run(run_dir)).status == "stopped"


# -- sweeps ---------------------------------------------------------------------------------------

def grid_2x2(experiments: Path, **failing: dict) -> Path:
    return make_sweep(experiments, [
        (28, 256, dict(iter_ms=100.0, busbw=8.0, contention=0.02)),
        (28, 512, dict(iter_ms=97.0, busbw=9.0, contention=0.06)),
        (42, 256, dict(iter_ms=95.0, busbw=11.0, contention=0.09)),
        (42, 512, failing.get("last") or dict(iter_ms=99.0, busbw=12.0, contention=0.15)),
    ])


def test_sweep_best_point_and_trade_off(tmp_path: Path) -> None:
    sweep_dir = grid_2x2(tmp_path)
    rows, _ = rep.collect_rows(rep.discover(sweep_dir))

    best = rep.best_point(rows)
    trade = rep.trade_off(rows)

    assert [(r.channels, r.threads) for r in rows] == [(28, 256), (28, 512), (42, 256), (42, 512)]
    assert best is not None and (best.channels, best.threads) == (42, 256)
    assert trade is not None and not trade.same_point
    assert (trade.highest_busbw.channels, trade.highest_busbw.threads) == (42, 512)
    assert (trade.lowest_contention.channels, trade.lowest_contention.threads) == (28, 256)
    assert trade.busbw_gain_pct == pytest.approx(50.0)
    assert trade.contention_delta_pp == pytest.approx(13.0)
    assert trade.iter_ms_delta_pct == pytest.approx((99.25 / 100.25 - 1) * 100)


def test_world_size_one_has_no_bandwidth_trade_off(tmp_path: Path) -> None:
    # One rank moves no data between ranks: busbw null with the reason (as on a single GPU).
    sweep_dir = make_sweep(tmp_path, [
        (28, 256, dict(iter_ms=100.0, contention=0.02, world_size=1, nodes=1)),
        (42, 256, dict(iter_ms=90.0, contention=0.04, world_size=1, nodes=1)),
    ])
    result = write_report(sweep_dir)
    rows = rep.collect_rows(rep.discover(sweep_dir))[0]
    assert rep.trade_off(rows) is None
    assert all(r.busbw_gbps_median is None and r.local_busbw_gbps_median is None for r in rows)
    markdown = (sweep_dir / "report.md").read_text()
    assert "busbw is null at world size 1" in markdown
    assert "stream_busbw_gbps null: world size 1: no data crosses ranks" in markdown
    csv_rows = list(csv.DictReader(io.StringIO((sweep_dir / "results.csv").read_text())))
    assert csv_rows[0]["busbw_gbps_median"] == "" and "world size 1" in csv_rows[0]["notes"]
    # One run per point: the run-to-run noise is unknown, so 42 leads but is not named best.
    assert result.best is None and result.decision.status == rep.UNDECIDED
    assert result.decision.leader == "42ch × 256th"
    assert not (sweep_dir / BUSBW_LINES).exists()  # nothing to draw


def test_sweep_with_a_failed_point_still_reports_the_others(tmp_path: Path) -> None:
    sweep_dir = grid_2x2(tmp_path, last=dict(status="failed", summary=False, steps=2, iter_ms=50.0))
    result = write_report(sweep_dir)

    rows = list(csv.DictReader(io.StringIO((sweep_dir / "results.csv").read_text())))
    assert [r["status"] for r in rows] == ["completed", "completed", "completed", "failed"]
    assert rows[3]["problems"].startswith("node 1 (node1): exited 1")
    assert rows[0]["run_dir"] == "../multinode_28ch_256th_20250101_120000"
    # The failed point is faster on paper (50 ms) but is never chosen, nor the leader.
    assert result.decision.leader == "42ch × 256th" and result.best is None
    assert result.decision.excluded == {"42ch × 512th": "status failed"}
    markdown = (sweep_dir / "report.md").read_text()
    assert "**No decision**: one run per point" in markdown
    assert "Never chosen: 42ch × 512th (status failed)." in markdown
    assert "- 42ch × 512th (`multinode_42ch_512th_20250101_120300`): status failed" in markdown
    for name in (ITERATION_HEATMAP, CONTENTION_HEATMAP, BUSBW_LINES, PER_RANK_STEPS):
        assert is_png(sweep_dir / name), name


def test_partial_sweep_lists_points_not_run_and_lost_runs(tmp_path: Path) -> None:
    sweep_dir = make_sweep(tmp_path, [
        (28, 256, dict(iter_ms=100.0)),
        (28, 512, dict(iter_ms=90.0)),
        (42, 256, dict(sweep_status="pending")),
        (42, 512, dict(sweep_status="pending")),
    ])
    # A run directory deleted after the sweep recorded it.
    lost = tmp_path / "multinode_28ch_512th_20250101_120100"
    for path in sorted(lost.rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    lost.rmdir()

    rows, _ = rep.collect_rows(rep.discover(sweep_dir))

    assert [r.status for r in rows] == ["completed", "missing", "not_run", "not_run"]
    assert "not found" in rows[1].problems[0]
    assert rep.best_point(rows) is rows[0]
    assert rep.trade_off(rows) is not None and rep.trade_off(rows).same_point


def test_sweep_copied_with_its_runs_inside(tmp_path: Path) -> None:
    original = tmp_path / "a"
    sweep_dir = grid_2x2(original)
    copied = tmp_path / "b" / sweep_dir.name
    copied.parent.mkdir()
    sweep_dir.rename(copied)
    for run in original.glob("multinode_*"):
        run.rename(copied / run.name)

    rows, _ = rep.collect_rows(rep.discover(copied))
    assert [r.status for r in rows] == ["completed"] * 4


def test_directory_of_runs_and_errors(tmp_path: Path) -> None:
    make_run(tmp_path, 28, 256, iter_ms=100.0)
    make_run(tmp_path, 42, 256, iter_ms=90.0)
    report_input = rep.discover(tmp_path)
    assert report_input.kind == "runs" and len(report_input.points) == 2

    with pytest.raises(rep.ReportError, match="is not a directory"):
        rep.discover(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(rep.ReportError, match="holds no run.json"):
        rep.discover(empty)
    broken = tmp_path / "sweep_broken"
    broken.mkdir()
    (broken / "sweep.json").write_text("{")
    with pytest.raises(rep.ReportError, match="sweep.json: sweep.json is not valid JSON"):
        rep.discover(broken)


# -- decisions and helpers ------------------------------------------------------------------------

def row(channels: int, threads: int, iter_ms: float | None, p90: float | None = None, status: str = "completed",
        busbw: float | None = None, contention: float | None = None) -> rep.PointRow:
    return rep.PointRow(run_id=f"r{channels}_{threads}", run_dir=None, channels=channels, threads=threads,
                        nodes=2, world_size=4, status=status, steps=5, iter_ms_median=iter_ms,
                        iter_ms_p90=p90, busbw_gbps_median=busbw, contention_slowdown_median=contention)


def test_best_point_ties_break_on_p90_and_ignore_unfinished_points() -> None:
    rows = [row(28, 256, 10.0, 14.0), row(42, 256, 10.0, 12.0), row(56, 256, 5.0, status="stopped"),
            row(70, 256, None)]
    assert rep.best_point(rows) is rows[1]
    assert rep.best_point([row(28, 256, 3.0, status="failed")]) is None


def test_quantile_matches_numpy_linear() -> None:
    np = pytest.importorskip("numpy")
    values = [5.0, 1.0, 9.5, 3.25, 7.0, None, "x", float("nan")]
    clean = [5.0, 1.0, 9.5, 3.25, 7.0]
    for q in (10, 50, 90):
        assert rep.quantile(values, q) == pytest.approx(float(np.percentile(clean, q)))
    assert rep.quantile([], 50) is None


def test_markdown_without_completed_points_names_no_best(tmp_path: Path) -> None:
    rows = [row(28, 256, 10.0, status="failed")]
    text = rep.report_markdown(rep.ReportInput("runs", tmp_path, []), rows, [])
    assert "No completed point with unflagged settings and metrics: **no best point**." in text
    assert "Not enough completed points" in text


def test_report_task_import_stays_light() -> None:
    """fab --list imports every task module: matplotlib must not come with them."""
    assert_imports_none_of(("matplotlib", "torch"), "import tasks.report, tasks.lib.report")


def test_fab_report_cli(tmp_path: Path) -> None:
    sweep_dir = grid_2x2(tmp_path)
    fab = FAB
    ok = subprocess.run([fab, "report", str(sweep_dir), "--no-plots"], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert "no decision: one run per point" in ok.stdout
    assert not (sweep_dir / ITERATION_HEATMAP).exists()

    missing = subprocess.run([fab, "report", str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip().count("\n") == 0 and "is not a directory" in missing.stderr


def test_hung_run_reports_hung_and_its_diagnostics(tmp_path: Path) -> None:
    from tasks.lib.diagnostics import DiagnosticsSummary, RankStack

    run_dir = make_run(tmp_path, 28, 256, status="stopped", world_size=2, nodes=1)
    record = json.loads((run_dir / "run.json").read_text())
    record["status"] = "hung"
    (run_dir / "run.json").write_text(json.dumps(record))
    (run_dir / "hang").mkdir()
    summary = DiagnosticsSummary(run_id=run_dir.name, kind="hang", collected_at=0.0, ranks=[
        RankStack(rank=1, node_rank=0, host="node0", pid=42, state="T", step=3,
                  frames=["wait_for_peers (train/stepper.py:10)"])],
        first_stalled_ranks=[1], basis="step counts", rank_steps={0: 5, 1: 3},
        hang={"stalled_for_s": 30, "timeout_s": 30})
    (run_dir / "hang" / "summary.json").write_text(json.dumps(summary.as_dict()))

    result = write_report(run_dir, tmp_path / "out", plots=False)

    assert result.rows[0].status == "hung"
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert f"## Hang: {run_dir.name}" in markdown
    assert "`wait_for_peers (train/stepper.py:10)`" in markdown
    (run_dir / "hang" / "summary.json").write_text("{broken")
    write_report(run_dir, tmp_path / "out", plots=False)
    assert "hang/ diagnostics unreadable" in (tmp_path / "out" / "report.md").read_text()


def test_failed_run_names_the_ranks_own_error(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, 28, 256, status="failed", summary=False, world_size=2, nodes=2)
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "node_0_20250101_120000.txt").write_text("[launcher] started\nW1124 noise\n")
    (run_dir / "logs" / "node_1_20250101_120000.txt").write_text(
        "W1124 08:22:57 torch/distributed/run.py:874]\n"
        "train: error: cfg.yaml: distributed.backend nccl needs a GPU but none is visible; use gloo or auto\n"
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n")

    row = rep.summarize_run(rep.read_run(run_dir))

    assert row.problems[:2] == [
        "node 1 (node1): exited 1",
        "train: error: cfg.yaml: distributed.backend nccl needs a GPU but none is visible; use gloo or auto"]

    (run_dir / "logs" / "node_1_20250101_120000.txt").write_text(
        "Traceback (most recent call last):\n  File \"x.py\", line 1\nRuntimeError: Connection reset by peer\n")
    assert rep.summarize_run(rep.read_run(run_dir)).problems[1] == "RuntimeError: Connection reset by peer"
    # A completed run's logs are not searched for errors.
    done = make_run(tmp_path / "ok", 28, 256, world_size=2, nodes=1)
    (done / "logs").mkdir()
    (done / "logs" / "node_0_x.txt").write_text("train: error: not this one\n")
    assert rep.summarize_run(rep.read_run(done)).problems == []


def test_sweep_figures_have_labelled_axes_and_readable_values(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What a reader sees: each figure's axis labels, colorbar label and cell values, read from
    the real matplotlib figures just before they are written."""
    from matplotlib.figure import Figure

    seen: dict[str, Figure] = {}
    original = Figure.savefig

    def spy(fig: Figure, path: object, *args: object, **kwargs: object) -> object:
        seen[Path(str(path)).name] = fig
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    write_report(grid_2x2(tmp_path))
    assert set(seen) == {ITERATION_HEATMAP, CONTENTION_HEATMAP, BUSBW_LINES, PER_RANK_STEPS, PARETO}

    for name, colorbar_words in ((ITERATION_HEATMAP, "iteration time"),
                                 (CONTENTION_HEATMAP, "GEMM time")):
        heatmap, colorbar = seen[name].axes
        assert heatmap.get_xlabel().startswith("NCCL channels"), name
        assert heatmap.get_ylabel() == "threads per block", name
        assert [t.get_text() for t in heatmap.get_xticklabels()] == ["28", "42"], name
        assert [t.get_text() for t in heatmap.get_yticklabels()] == ["256", "512"], name
        assert colorbar_words in colorbar.get_ylabel(), name
        cells = [text.get_text() for text in heatmap.texts
                 if "red box" not in text.get_text() and "dashed" not in text.get_text()]
        assert len(cells) == 4 and all(cell.strip() for cell in cells), (name, cells)

    busbw = seen[BUSBW_LINES].axes[0]
    assert busbw.get_xlabel() == "NCCL channels" and "bus bandwidth" in busbw.get_ylabel()
    assert [text.get_text() for text in busbw.get_legend().get_texts()] == [
        "256 threads", "512 threads"]  # one line per thread count
    per_rank = seen[PER_RANK_STEPS].axes
    assert any(ax.get_xlabel() == "step" for ax in per_rank)
    assert any(ax.get_ylabel() == "iteration time (ms)" for ax in per_rank)


# -- cross-rank findings of the train summary ---------------------------------------------------

def test_the_late_rank_and_its_host_are_named(tmp_path: Path) -> None:
    run_dir = make_run(tmp_path, 42, 512, world_size=4, nodes=2, late_rank=2, wait_ms=30.0)
    result = write_report(run_dir, tmp_path / "out", plots=False)

    row = result.rows[0]
    assert (row.slowest_rank, row.slowest_host, row.slowest_by) == (2, "node1", "caused_wait")
    assert row.wait_ms_p95 == pytest.approx(30.0)
    record = next(csv.DictReader(io.StringIO((tmp_path / "out" / "results.csv").read_text())))
    assert (record["slowest_rank"], record["slowest_host"], record["slowest_by"]) == (
        "2", "node1", "caused_wait")
    assert float(record["caused_wait_ms_median"]) == pytest.approx(90.0)
    markdown = (tmp_path / "out" / "report.md").read_text()
    stragglers = markdown.split("## Stragglers", 1)[1]
    assert "slowest rank 2 (node1): the others waited 90 ms per step for it" in stragglers
    assert "p95 30 ms" in stragglers
    # The per-rank table carries each rank's wait from the summary.
    per_rank = markdown.split("## Per rank", 1)[1]
    assert "wait ms p95" in per_rank and "| 0 | node0 | 6 |" in per_rank


def test_a_point_whose_clocks_moved_is_flagged(tmp_path: Path) -> None:
    sweep_dir = make_sweep(tmp_path, [
        (28, 256, dict(iter_ms=100.0, sm_clock=1700.0, calibration_clock=1980.0)),
        (42, 256, dict(iter_ms=95.0, sm_clock=1975.0, calibration_clock=1980.0)),
    ])
    write_report(sweep_dir, plots=False)
    records = list(csv.DictReader(io.StringIO((sweep_dir / "results.csv").read_text())))
    assert [r["clock_flag"] for r in records] == ["True", "False"]
    assert float(records[0]["clock_drift"]) == pytest.approx(1700 / 1980 - 1, rel=1e-4)
    clocks = (sweep_dir / "report.md").read_text().split("## Clocks", 1)[1]
    assert "**28ch × 256th: clocks differed from the calibration**" in clocks
    assert "-14.1 %" in clocks and "42ch" not in clocks.split("##", 1)[0]


def test_the_per_rank_figure_names_the_rank_the_others_waited_for(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from matplotlib.figure import Figure

    seen: dict[str, Figure] = {}
    original = Figure.savefig

    def spy(fig: Figure, path: object, *args: object, **kwargs: object) -> object:
        seen[Path(str(path)).name] = fig
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    # Rank 3's lines look no slower than the others (they wait for it): the figure must
    # still name it.
    run_dir = make_run(tmp_path, 28, 256, world_size=4, nodes=2, late_rank=3, wait_ms=5.0)
    write_report(run_dir, tmp_path / "out")
    texts = [t.get_text() for ax in seen[PER_RANK_STEPS].axes for t in ax.texts]
    assert any(t.startswith("slowest: rank 3 (others waited 15 ms/step") for t in texts), texts


def test_every_results_column_is_documented() -> None:
    doc = (ROOT / "docs" / "METRICS.md").read_text().split("## `results.csv`", 1)[1]
    spans = {word for span in re.findall(r"`([^`]+)`", doc)
             for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}
    assert not [name for name in rep.CSV_FIELDS if name not in spans]


def test_summaries_from_before_the_stream_names_still_fill_the_row(tmp_path: Path) -> None:
    """A summary.json written before busbw/algbw/collective_ms became stream_*: same columns."""
    sweep_dir = make_sweep(tmp_path, [(28, 256, dict(iter_ms=100.0, busbw=40.0))])
    summary_path = next(tmp_path.rglob("summary.json"))
    summary = json.loads(summary_path.read_text())
    for new, old in rep.RENAMED_SUMMARY_KEYS.items():
        summary[old] = summary.pop(new)
    del summary["kernel_busbw_gbps"], summary["kernel_collective_ms"]
    summary_path.write_text(json.dumps(summary))
    row = rep.collect_rows(rep.discover(sweep_dir))[0][0]
    assert row.busbw_gbps_median == pytest.approx(40.0)
    assert row.collective_ms_median == pytest.approx(30.0)
    assert row.kernel_busbw_gbps_median is None


def test_kernel_active_columns_come_from_the_summary(tmp_path: Path) -> None:
    sweep_dir = make_sweep(tmp_path, [(28, 256, dict(iter_ms=100.0, busbw=40.0))])
    write_report(sweep_dir)
    row = list(csv.DictReader(io.StringIO((sweep_dir / "results.csv").read_text())))[0]
    assert float(row["busbw_gbps_median"]) == pytest.approx(40.0)
    assert float(row["kernel_busbw_gbps_median"]) == pytest.approx(50.0)
    assert float(row["kernel_collective_ms_median"]) == pytest.approx(24.0)
    markdown = (sweep_dir / "report.md").read_text()
    assert "24 ms kernel-active" in markdown and "kernel-active busbw 50 GB/s" in markdown
