"""One row per point: what a run measured (summary.json's cross-rank aggregates, else the metrics'
own), what NCCL really built, and how it ended (docs/METRICS.md)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tasks.lib.report.read import (
    COMPLETED, MISSING, NOT_RUN, PointSpec, ReportInput, RunData, error_line_in_logs, read_run,
)
from tasks.lib.report.axes import check_axes
from tasks.lib.report.entry import entry_row  # rows of your own training (--entry)
from tasks.lib.report.point import (  # noqa: F401 - re-exported: the package's names
    RUN_OK_STATES, RUN_OPEN_STATES, VERDICTS, PointRow, _failure_problem, _fill_effective,
    _grid_values, _nodes, _run_id, _summary_aggregates, _world_size,
)
from tasks.lib.report.stats import run_sample
from tasks.lib.report.values import _get, _integer, _number, _string, quantile


# -- one row per point ----------------------------------------------------------------------------


CSV_FIELDS = (
    "channels", "threads", "nodes", "world_size", "status", "steps", "runs", "runs_planned",
    "iter_ms_median", "iter_ms_ci_low", "iter_ms_ci_high", "run_spread", "decision", "iter_ms_p90", "gemm_tflops_median", "contention_slowdown_median",
    "exposed_comm_fraction_median", "busbw_gbps_median", "algbw_gbps_median",
    "kernel_busbw_gbps_median", "kernel_collective_ms_median",
    "slowest_rank", "rank_spread",
    "iter_ms_p95", "slowest_step_ms_p95", "slowest_host", "slowest_by", "caused_wait_ms_median",
    "wait_ms_median", "wait_ms_p95", "collective_ms_median", "local_busbw_gbps_median",
    "gemm_contention_slowdown_median", "overlapped_gemm_fraction_median",
    "launch_delay_ms_median", "control_ms_median", "reduce_local_ms_median",
    "sm_clock_mhz_median", "clock_drift", "clock_flag", "comm_stream_priority", "outlier_steps",
    "effective_channels", "effective_threads", "effective_algorithms", "effective_transports",
    "settings_flag", "settings_flags", "objective",
    "notes", "run_id", "run_dir", "output_dir", "repeat", "problems",
)
# Columns computed for the CSV (not PointRow attributes); a sweep's --axis columns go after threads.
CSV_COMPUTED = ("runs", "runs_planned", "iter_ms_ci_low", "iter_ms_ci_high", "run_spread", "decision")

# Aggregated metric -> (summary.json key, statistic) and the PointRow attribute it fills. The
# metrics lines stand in when summary.json is missing, for the keys they carry.
AGGREGATE_COLUMNS = {
    "iter_ms_median": ("iter_ms", "median"),
    "iter_ms_p90": ("iter_ms", "p90"),
    "iter_ms_p95": ("iter_ms", "p95"),
    "gemm_tflops_median": ("gemm_tflops", "median"),
    "contention_slowdown_median": ("contention_slowdown", "median"),
    "exposed_comm_fraction_median": ("exposed_comm_fraction", "median"),
    "busbw_gbps_median": ("stream_busbw_gbps", "median"),
    "algbw_gbps_median": ("stream_algbw_gbps", "median"),
    "kernel_busbw_gbps_median": ("kernel_busbw_gbps", "median"),
    "kernel_collective_ms_median": ("kernel_collective_ms", "median"),
    "wait_ms_median": ("wait_ms", "median"),
    "wait_ms_p95": ("wait_ms", "p95"),
    "collective_ms_median": ("stream_collective_ms", "median"),
    "local_busbw_gbps_median": ("local_busbw_gbps", "median"),
    "gemm_contention_slowdown_median": ("gemm_contention_slowdown", "median"),
    "overlapped_gemm_fraction_median": ("overlapped_gemm_fraction", "median"),
    "control_ms_median": ("control_ms", "median"),
    "reduce_local_ms_median": ("reduce_local_ms", "median"),
    "sm_clock_mhz_median": ("sm_clock_mhz", "median"),
}
STATISTIC_PERCENT = {"median": 50, "p90": 90, "p95": 95}
# Summary fields that are null for a stated reason: the reason goes into the row's notes.
NULL_REASON_FIELDS = ("stream_busbw_gbps", "kernel_busbw_gbps", "wait_ms")
# Summaries written before the stream-event figures were named so: new key -> old key.
RENAMED_SUMMARY_KEYS = {"stream_busbw_gbps": "busbw_gbps", "stream_algbw_gbps": "algbw_gbps",
                        "stream_collective_ms": "collective_ms",
                        "stream_comm_slowdown": "comm_slowdown"}


def summarize_run(data: RunData, spec: PointSpec | None = None, sweep_status: str | None = None) -> PointRow:
    """The results row of one run: the summary's cross-rank aggregates, else the metrics' own."""
    if _get(data.run_json, "flags", "entry"):
        return entry_row(data, spec, sweep_status)
    steps = data.steps
    channels, threads = _grid_values(data, spec)
    row = PointRow(
        run_id=_run_id(data),
        run_dir=str(data.run_dir),
        channels=channels,
        threads=threads,
        nodes=_nodes(data),
        world_size=_world_size(data),
        status=_status(data, sweep_status),
        steps=_measured_steps(data),
        problems=list(data.problems),
    )
    pool_point_ok = (_get(data.summary, "pool", "mode") == "in_process"
                     and _get(data.summary, "status") == COMPLETED)
    # A pool's first failure belongs to the point that failed, not to every point of the pool.
    if (failure := _failure_problem(data.run_json)) and not pool_point_ok:
        row.problems.insert(0, failure)
    if row.status != COMPLETED and (cause := error_line_in_logs(data)):
        row.problems.insert(1 if failure else 0, cause)
    aggregates = _summary_aggregates(data.summary)
    for attribute, (key, statistic) in AGGREGATE_COLUMNS.items():
        old = RENAMED_SUMMARY_KEYS.get(key)
        if old is not None and key not in aggregates and old in aggregates:
            key = old
        value = _number(_get(aggregates, key, statistic))
        if value is None and steps and not isinstance(_get(aggregates, "null_reasons", key), str):
            value = quantile([line.get(key) for line in steps], STATISTIC_PERCENT[statistic])
        setattr(row, attribute, value)
    row.slowest_rank, row.rank_spread = _rank_spread(data)
    _fill_cross_rank(row, aggregates)
    _fill_effective(row, data.summary)
    _fill_identity(row, data, spec)
    return row


def _fill_identity(row: PointRow, data: RunData, spec: PointSpec | None) -> None:
    """Which point and run of a sweep the row is, where its outputs are, and its step sample."""
    if spec is not None:
        row.settings = dict(spec.settings)
        row.config, row.repeat = spec.config, spec.repeat
    row.samples = run_sample(data.steps_by_rank)
    if data.output_dir is not None:
        row.output_dir = str(data.output_dir)
    row.pooled = _get(data.summary, "pool", "mode") == "in_process"
    check_axes(row, data.summary)


def flag_shared_settings(rows: Sequence[PointRow], sweep: Mapping[str, Any] | None = None) -> None:
    """Cross-point checks: two points that asked for different settings but ran with the same
    effective ones (a clamped or no-op axis: their difference measures nothing), and a sweep
    with the ib preset whose NCCL used sockets."""
    by_effective: dict[tuple[Any, ...], list[PointRow]] = {}
    for row in rows:
        if row.effective_channels is None:
            continue
        key = (row.effective_channels, row.effective_threads, row.effective_algorithms,
               tuple(sorted(row.effective_env.items())))
        by_effective.setdefault(key, []).append(row)
    for same in by_effective.values():
        asked = {(r.channels, r.threads, tuple(r.settings.items())) for r in same}
        if len(same) > 1 and len(asked) > 1:
            labels = ", ".join(r.label for r in same)
            for row in same:
                row.settings_flags.append(f"same effective settings as another point ({labels}): "
                                          f"{row.effective_channels} channels, threads "
                                          f"{row.effective_threads or 'unknown'}")
                row.settings_flag = True
    preset = _get(sweep, "launch_flags", "nccl_preset")
    if preset == "ib":
        for row in rows:
            if row.effective_transports and "NET/Socket" in row.effective_transports:
                row.settings_flags.append("nccl_preset ib, but NCCL used NET/Socket")
                row.settings_flag = True


def _fill_cross_rank(row: PointRow, aggregates: Mapping[str, Any]) -> None:
    """The train summary's cross-rank findings: who held the others up, clocks, launch delay."""
    slowest = _get(aggregates, "slowest_rank")
    if isinstance(slowest, Mapping) and _integer(slowest.get("rank")) is not None:
        row.slowest_rank = _integer(slowest.get("rank"))
        row.slowest_host = _string(slowest.get("host"))
        row.slowest_by = _string(slowest.get("by"))
        row.caused_wait_ms_median = _number(slowest.get("caused_wait_ms_median"))
    row.slowest_step_ms_p95 = _number(_get(aggregates, "step_max", "iter_ms", "p95"))
    row.launch_delay_ms_median = _number(
        _get(aggregates, "launch_delay_ms", "first_collective", "median"))
    row.launch_delay_reason = _string(_get(aggregates, "launch_delay_ms", "reason"))
    row.clock_drift = _number(_get(aggregates, "telemetry", "clock_drift"))
    flag = _get(aggregates, "telemetry", "clock_drift_flag")
    row.clock_flag = flag if isinstance(flag, bool) else None
    row.comm_stream_priority = _string(_get(aggregates, "comm_stream_priority"))
    outliers = _get(aggregates, "outlier_steps", "steps")
    if isinstance(outliers, list) and outliers:
        listed = [str(o.get("step")) for o in outliers if isinstance(o, Mapping)]
        count = _integer(_get(aggregates, "outlier_steps", "count")) or len(listed)
        row.outlier_steps = ",".join(listed) + (",..." if count > len(listed) else "")
    reasons = _get(aggregates, "null_reasons")
    if isinstance(reasons, Mapping):
        for key in NULL_REASON_FIELDS:
            reason = reasons.get(key, reasons.get(RENAMED_SUMMARY_KEYS.get(key, key)))
            if isinstance(reason, str):
                row.notes.append(f"{key} null: {reason}")


def missing_row(spec: PointSpec | None, status: str, run_dir: str | None = None,
                run_id: str | None = None, problem: str | None = None) -> PointRow:
    """The row of a point that has no run directory to read (not run yet, lost, failed to start)."""
    return PointRow(
        run_id=run_id, run_dir=run_dir,
        channels=spec.channels if spec else None, threads=spec.threads if spec else None,
        nodes=None, world_size=None, status=status, steps=0,
        problems=[problem] if problem else [],
        settings=dict(spec.settings) if spec else {},
        config=spec.config if spec else None, repeat=spec.repeat if spec else None,
    )


def _status(data: RunData, sweep_status: str | None) -> str:
    """completed only when nothing that knows says otherwise (summary, run.json, the sweep)."""
    summary_status = _string(_get(data.summary, "status"))
    run_status = _string(_get(data.run_json, "status"))
    if run_status in RUN_OK_STATES:
        run_status = COMPLETED
    still_open = run_status in RUN_OPEN_STATES
    if still_open:
        run_status = None
    if _get(data.summary, "pool", "mode") == "in_process" and run_status not in VERDICTS:
        # One launch ran a whole rank pool: its exit status is the pool's (any point failed),
        # not this point's; the point's own summary says how it ended.
        run_status = None
    for verdict in (sweep_status, run_status):
        if verdict in VERDICTS:
            return verdict
    failures = [s for s in (summary_status, run_status, sweep_status) if s and s != COMPLETED]
    if failures:
        # The train package's own word first: it knows whether the ranks stopped or failed.
        return failures[0]
    if data.summary is None:
        # A run that never got as far as summary.json is not complete, whatever else says so.
        if still_open:
            return "running"
        return "incomplete" if data.steps else "no_output"
    return COMPLETED if summary_status else "unknown"


def _measured_steps(data: RunData) -> int:
    """Steps every rank measured (the slowest rank's count)."""
    counts = [len({line.get("step") for line in lines}) for lines in data.steps_by_rank.values()]
    if counts:
        return min(counts)
    return _integer(_get(_summary_aggregates(data.summary), "measured_steps", "per_rank_min")) or 0


def _rank_spread(data: RunData) -> tuple[int | None, float | None]:
    medians = {rank: quantile([line.get("iter_ms") for line in lines], 50)
               for rank, lines in data.steps_by_rank.items()}
    medians = {rank: value for rank, value in medians.items() if value is not None}
    if len(medians) < 2:
        return None, None
    slowest = max(medians, key=lambda rank: medians[rank])
    fastest = min(medians.values())
    return slowest, (medians[slowest] / fastest if fastest > 0 else None)


def per_rank_step_times(data: RunData) -> dict[int, list[tuple[int, float]]]:
    """(step, iter_ms) per rank, in step order, for the straggler plot."""
    series: dict[int, list[tuple[int, float]]] = {}
    for rank, lines in sorted(data.steps_by_rank.items()):
        points = [(int(step), float(ms)) for line in lines
                  if (step := _integer(line.get("step"))) is not None
                  and (ms := _number(line.get("iter_ms"))) is not None]
        if points:
            series[rank] = sorted(points)
    return series


def collect_rows(report_input: ReportInput) -> tuple[list[PointRow], dict[str, RunData]]:
    """The results rows, in grid order, and the RunData read for each row that has a run."""
    rows: list[PointRow] = []
    runs: dict[str, RunData] = {}
    for source in report_input.points:
        if source.run_dir is None:
            status = source.sweep_status or NOT_RUN
            if status in ("pending", "running", "interrupted"):
                status = NOT_RUN
            rows.append(missing_row(source.spec, status, run_id=source.run_id, problem=source.error))
            continue
        if not source.run_dir.is_dir():
            rows.append(missing_row(source.spec, MISSING if source.sweep_status else "no_output",
                                    run_dir=str(source.run_dir), run_id=source.run_id,
                                    problem=source.error or f"run directory {source.run_dir} not found"))
            continue
        data = read_run(source.run_dir, source.output_dir)
        row = summarize_run(data, source.spec, _final_sweep_status(source.sweep_status))
        if source.output_dir and data.output_dir is not None:
            # Pool points share a run directory: each row names its own point directory.
            row.run_dir = str(data.output_dir)
        if source.error and source.error not in "; ".join(row.problems):
            row.problems.insert(0, source.error)
        rows.append(row)
        runs[row.run_dir or ""] = data
    flag_shared_settings(rows, report_input.sweep)
    return rows, runs


def _final_sweep_status(status: str | None) -> str | None:
    # "running" in sweep.json means the sweep itself was killed: the run directory knows better.
    return None if status in (None, "running", "pending") else status
