"""One row per point from the rows of its runs: a sweep with --repeat runs each point N times,
each run its own launch and directory; the point's row carries every run's row, the medians of
their figures and the bootstrap interval of its iteration time (tasks/lib/report/stats.py)."""
from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from tasks.lib.report.read import COMPLETED, ReportInput
from tasks.lib.report.rows import AGGREGATE_COLUMNS, PointRow, collect_rows
from tasks.lib.report.stats import bootstrap_interval

# Figures of a point with several runs: the median over its completed runs.
RUN_MEDIAN_FIELDS = (*AGGREGATE_COLUMNS, "rank_spread", "slowest_step_ms_p95", "caused_wait_ms_median",
                     "launch_delay_ms_median", "clock_drift")
PARTIAL = "partial"   # some runs of the point completed, not all: never chosen


def planned_runs(sweep: Mapping[str, Any] | None) -> dict[int, int]:
    """How many runs each configuration of a sweep document has (its repeats)."""
    counts: dict[int, int] = {}
    for point in (sweep or {}).get("points") or []:
        if isinstance(point, Mapping) and isinstance(point.get("config"), int):
            counts[point["config"]] = counts.get(point["config"], 0) + 1
    return counts


def group_points(run_rows: Sequence[PointRow], report_input: ReportInput,
                 *, with_interval: bool = True) -> list[PointRow]:
    """The point rows, in the sweep's configuration order (a run or a directory of runs: one
    point per run)."""
    planned = planned_runs(report_input.sweep)
    if not planned or any(row.config is None for row in run_rows):
        return [point_row([row], 1, with_interval) for row in run_rows]
    by_config: dict[int, list[PointRow]] = {}
    for row in run_rows:
        by_config.setdefault(int(row.config), []).append(row)  # type: ignore[arg-type]
    return [point_row(sorted(rows, key=lambda r: r.repeat or 0), planned.get(config, len(rows)), with_interval)
            for config, rows in sorted(by_config.items())]


def point_row(runs: Sequence[PointRow], planned: int, with_interval: bool = True) -> PointRow:
    """One point from its runs' rows: the representative run's fields (the completed run whose
    median is the median of the runs'), figures as the median over the completed runs, the
    interval over every completed run's steps; status partial when only some runs completed."""
    completed = [r for r in runs if r.status == COMPLETED]
    if completed:
        ordered = sorted(completed, key=lambda r: (r.iter_ms_median is None, r.iter_ms_median or 0.0))
        base = ordered[(len(ordered) - 1) // 2]
    else:
        base = runs[0]
    row = replace(base, runs=list(runs), runs_planned=planned, repeat=None, samples=[],
                  notes=_union(r.notes for r in runs), settings_flags=_union(r.settings_flags for r in runs),
                  problems=_problems(runs, planned))
    if len(runs) == 1 and planned == 1:
        row.samples = list(base.samples)
    if len(completed) > 1:
        for name in RUN_MEDIAN_FIELDS:
            values = [getattr(r, name) for r in completed if getattr(r, name) is not None]
            setattr(row, name, statistics.median(values) if values else None)
        row.steps = sum(r.steps for r in completed)
    flags = [r.settings_flag for r in runs if r.settings_flag is not None]
    row.settings_flag = any(flags) if flags else None
    if completed and len(completed) < max(planned, len(runs)):
        row.status = PARTIAL
    if with_interval and completed:
        row.interval = bootstrap_interval([r.samples for r in completed], label=row.selector)
        if row.interval is not None and len(completed) > 1:
            row.iter_ms_median = row.interval.estimate
    return row


def _union(groups: Any) -> list[str]:
    seen: list[str] = []
    for group in groups:
        for item in group:
            if item not in seen:
                seen.append(item)
    return seen


def _problems(runs: Sequence[PointRow], planned: int) -> list[str]:
    if len(runs) == 1 and planned == 1:
        return list(runs[0].problems)
    problems = []
    done = sum(r.status == COMPLETED for r in runs)
    if done < planned:
        problems.append(f"{done} of {planned} runs completed")
    for run in runs:
        for problem in run.problems or ([] if run.status == COMPLETED else [f"status {run.status}"]):
            problems.append(f"run {(run.repeat or 0) + 1}: {problem}")
    return problems


def collect_points(report_input: ReportInput) -> tuple[list[PointRow], list[PointRow], dict[str, Any]]:
    """(one row per point, one row per run, the RunData read for each run row with a run)."""
    run_rows, runs = collect_rows(report_input)
    return group_points(run_rows, report_input), run_rows, runs
