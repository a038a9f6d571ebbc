"""Reading run and sweep directories into one row per point, and writing results.csv / report.md.

Pure and tolerant: the report reads only what the run directories hold (run.json, the train
package's rank_XX_metrics.jsonl and summary.json), so it works on sweeps copied from another
machine and on partial sweeps. A missing, truncated or corrupt file becomes a problem listed
for its point, never an exception: one broken point must not hide the others.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tasks.lib import untrusted
from tasks.lib.runrecord import RUN_JSON
from tasks.lib.sweep import SWEEP_JSON
SUMMARY_JSON = "summary.json"
RESULTS_CSV = "results.csv"
REPORT_MD = "report.md"
METRICS_RE = re.compile(r"^rank_(\d+)_metrics\.jsonl$")
OUTPUT_DIR_RE = re.compile(r"^(\d+)thread_(\d+)channels$")
RUN_ID_RE = re.compile(r"^multinode_(\d+)ch_(\d+)th_")

COMPLETED = "completed"
# Statuses of points that produced no run to read.
NOT_RUN = "not_run"
MISSING = "missing"

# Lines of a metrics file whose phase names one of these are not measured steps.
NON_MEASURED_PHASES = ("warmup", "calibration", "calibration_compute", "calibration_comm")


class ReportError(Exception):
    """The report cannot start at all (no such directory, unreadable sweep.json)."""


# -- reading files --------------------------------------------------------------------------------

def read_json_file(path: Path) -> tuple[Any, str | None]:
    """(document, None) or (None, one-line problem). The file is a node's word: bounded in
    size, depth and number length (tasks/lib/untrusted.py)."""
    try:
        return untrusted.read_json(path), None
    except FileNotFoundError:
        return None, f"{path.name} missing"
    except OSError as err:
        return None, f"{path.name} unreadable: {err.strerror or err}"
    except json.JSONDecodeError as err:
        return None, f"{path.name} is not valid JSON (line {err.lineno}: {err.msg})"
    except ValueError as err:
        return None, f"{path.name} unreadable: {str(err)[:200]}"


def read_jsonl_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON object lines of a metrics file; bad lines are skipped and reported.

    A last line without its newline is what a killed rank leaves behind: it is reported as
    truncated rather than corrupt, since nothing is wrong with the run's earlier steps.
    """
    lines: list[dict[str, Any]] = []
    bad: list[int] = []
    truncated = False
    try:
        # Line by line, each bounded: a line too long, too deep or with a 5000-digit number is
        # one corrupt line, never the report's end.
        for number, raw, complete in untrusted.read_lines(path):
            if raw is None:
                bad.append(number)
                continue
            if not raw.strip():
                continue
            try:
                value = untrusted.loads(raw, max_bytes=untrusted.MAX_JSON_LINE_BYTES)
            except ValueError:
                if not complete:  # no newline after it: the writer died mid-line
                    truncated = True
                else:
                    bad.append(number)
                continue
            if isinstance(value, dict):
                lines.append(value)
            else:
                bad.append(number)
    except OSError as err:
        return [], [f"{path.name} unreadable: {err.strerror or err}"]
    problems = []
    if bad:
        shown = ", ".join(str(n) for n in bad[:5]) + (" ..." if len(bad) > 5 else "")
        problems.append(f"{path.name}: {len(bad)} corrupt line(s) skipped (line {shown})")
    if truncated:
        problems.append(f"{path.name}: last line truncated (skipped)")
    return lines, problems


def find_output_dirs(run_dir: Path) -> list[Path]:
    """Directories holding the train outputs: the run dir itself or its <T>thread_<C>channels/."""
    if _holds_outputs(run_dir):
        return [run_dir]
    try:
        children = sorted(p for p in run_dir.iterdir() if p.is_dir())
    except OSError:
        return []
    named = [p for p in children if OUTPUT_DIR_RE.match(p.name)]
    if len(named) == 1 and not _holds_outputs(named[0]):
        # A rank pool's launch directory: its points are <T>thread_<C>channels/ inside it.
        inner = find_output_dirs(named[0])
        if inner and inner != [named[0]]:
            return inner
    return named or [p for p in children if _holds_outputs(p)]


def _holds_outputs(directory: Path) -> bool:
    try:
        return any(METRICS_RE.match(p.name) or p.name == SUMMARY_JSON for p in directory.iterdir())
    except OSError:
        return False


def is_measured(line: Mapping[str, Any]) -> bool:
    phase = line.get("phase")
    return not (isinstance(phase, str) and phase in NON_MEASURED_PHASES) and "iter_ms" in line


@dataclass
class RunData:
    """Everything read from one run directory, with what could not be read."""

    run_dir: Path
    output_dir: Path | None = None
    run_json: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    steps_by_rank: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [line for rank in sorted(self.steps_by_rank) for line in self.steps_by_rank[rank]]


def _json_object(path: Path, problems: list[str]) -> dict | None:
    """A JSON object file, or None with the reason appended to `problems`."""
    document, problem = read_json_file(path)
    if problem:
        problems.append(problem)
    elif isinstance(document, dict):
        return document
    else:
        problems.append(f"{path.name} is not a JSON object")
    return None


def read_run(run_dir: Path, output_name: str | None = None) -> RunData:
    """output_name: the point's <T>thread_<C>channels/ inside run_dir (a rank pool runs several
    points in one run directory); None: the one run.json names, else the only one."""
    data = RunData(run_dir=run_dir)
    if not run_dir.is_dir():
        data.problems.append(f"run directory {run_dir} not found")
        return data
    run_json_path = run_dir / RUN_JSON
    if run_json_path.exists():
        data.run_json = _json_object(run_json_path, data.problems)

    output_dirs = find_output_dirs(run_dir)
    if output_name:
        named = run_dir / output_name
        output_dirs = [named] if named.is_dir() else []
        if not output_dirs:
            data.problems.append(f"point directory {output_name} not found in the run")
            return data
    if len(output_dirs) > 1:
        wanted = _output_dir_name(data.run_json)
        chosen = [d for d in output_dirs if d.name == wanted] or output_dirs[-1:]
        data.problems.append(f"several output directories; reading {chosen[0].name}")
        output_dirs = chosen
    if not output_dirs:
        data.problems.append("no train outputs (no rank_XX_metrics.jsonl, no summary.json)")
        return data
    data.output_dir = output_dirs[0]
    if _get(data.run_json, "flags", "entry"):
        return data  # your own training: no summary.json, no metrics files (see _entry_row)

    data.summary = _json_object(data.output_dir / SUMMARY_JSON, data.problems)

    metrics_files = sorted(
        (int(m.group(1)), p) for p in data.output_dir.iterdir() if (m := METRICS_RE.match(p.name))
    )
    if not metrics_files:
        data.problems.append("no rank_XX_metrics.jsonl")
    for rank, path in metrics_files:
        lines, problems = read_jsonl_file(path)
        data.problems.extend(problems)
        data.steps_by_rank[rank] = [line for line in lines if is_measured(line)]
    return data


def _output_dir_name(run_json: Mapping[str, Any] | None) -> str | None:
    if not run_json:
        return None
    value = run_json.get("output_dir") or _get(run_json, "paths", "output_dir")
    return Path(str(value)).name if value else None


# -- one row per point ----------------------------------------------------------------------------

@dataclass(frozen=True)
class PointSpec:
    """What a sweep meant to run at one grid point."""

    channels: int
    threads: int


@dataclass
class PointRow:
    """One line of results.csv: a grid point and what its run measured (docs/METRICS.md)."""

    run_id: str | None
    run_dir: str | None
    channels: int | None
    threads: int | None
    nodes: int | None
    world_size: int | None
    status: str
    steps: int
    iter_ms_median: float | None = None
    iter_ms_p90: float | None = None
    gemm_tflops_median: float | None = None
    contention_slowdown_median: float | None = None
    exposed_comm_fraction_median: float | None = None
    busbw_gbps_median: float | None = None   # stream events (summary stream_busbw_gbps)
    algbw_gbps_median: float | None = None
    kernel_busbw_gbps_median: float | None = None  # kernel-active (summary kernel_busbw_gbps)
    slowest_rank: int | None = None
    rank_spread: float | None = None     # slowest rank's median iter_ms over the fastest's
    iter_ms_p95: float | None = None
    slowest_step_ms_p95: float | None = None  # p95 over steps of the slowest rank's iter_ms
    slowest_host: str | None = None
    slowest_by: str | None = None        # caused_wait | iter_ms
    caused_wait_ms_median: float | None = None
    wait_ms_median: float | None = None
    wait_ms_p95: float | None = None
    collective_ms_median: float | None = None  # stream events (summary stream_collective_ms)
    kernel_collective_ms_median: float | None = None
    local_busbw_gbps_median: float | None = None
    gemm_contention_slowdown_median: float | None = None
    overlapped_gemm_fraction_median: float | None = None
    launch_delay_ms_median: float | None = None
    control_ms_median: float | None = None
    reduce_local_ms_median: float | None = None
    sm_clock_mhz_median: float | None = None
    clock_drift: float | None = None     # measured steps' SM clock / calibration's - 1
    clock_flag: bool | None = None
    comm_stream_priority: str | None = None
    outlier_steps: str | None = None     # "12,40" (step indices)
    effective_channels: int | None = None  # what NCCL built (summary effective_settings)
    effective_threads: str | None = None   # "256" or "256,512"
    effective_algorithms: str | None = None
    effective_transports: str | None = None
    settings_flag: bool | None = None      # effective settings differ from the point's (None: unknown)
    settings_flags: list[str] = field(default_factory=list)
    # A run of your own training: what its iter_ms columns hold (tasks/lib/objective.py).
    objective: str | None = None
    objective_goal: str = "min"
    launch_delay_reason: str | None = None  # why launch_delay_ms_median is null (not in the CSV)
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{_fmt_int(self.channels)}ch × {_fmt_int(self.threads)}th"

    @property
    def has_metrics(self) -> bool:
        return self.iter_ms_median is not None


CSV_FIELDS = (
    "channels", "threads", "nodes", "world_size", "status", "steps",
    "iter_ms_median", "iter_ms_p90", "gemm_tflops_median", "contention_slowdown_median",
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
    "notes", "run_id", "run_dir", "problems",
)

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
        return _entry_row(data, spec, sweep_status)
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
    return row


def _entry_row(data: RunData, spec: PointSpec | None, sweep_status: str | None) -> PointRow:
    """A run of the user's own training: its objective (the metric it was launched with, else its
    profiler traces' step time) in the iter_ms columns, and NCCL's effective settings."""
    from tasks.lib.objective import (MetricError, effective_from_debug_logs, extract_objective,
                                     parse_metric, rank_error_line)

    channels, threads = _grid_values(data, spec)
    run_status = _string(_get(data.run_json, "status"))
    status = next((v for v in (sweep_status, run_status) if v in VERDICTS), None) or (
        COMPLETED if run_status in RUN_OK_STATES else "running" if run_status in RUN_OPEN_STATES
        else run_status or sweep_status or "unknown")
    row = PointRow(run_id=_run_id(data), run_dir=str(data.run_dir), channels=channels,
                   threads=threads, nodes=_nodes(data), world_size=_world_size(data),
                   status=status, steps=0, problems=list(data.problems))
    if (failure := _failure_problem(data.run_json)):
        row.problems.insert(0, failure)
    culprits = _get(data.run_json, "first_failure", "ranks") or []
    if status != COMPLETED and data.output_dir is not None and len(culprits) == 1 and (
            cause := rank_error_line(data.output_dir, int(culprits[0]))):
        row.problems.append(cause)
    elif status != COMPLETED and (cause := error_line_in_logs(data)):
        row.problems.append(cause)
    if data.output_dir is None:
        return row
    metric_text = _get(data.run_json, "flags", "metric")
    try:
        metric = parse_metric(metric_text) if metric_text else None
    except MetricError as err:
        row.problems.append(str(err))
        return row
    objective = extract_objective(data.output_dir, metric)
    if objective is None:
        row.notes.append("no objective: name one with --metric (trace, json:FIELD or a regex)")
    else:
        row.objective, row.objective_goal = objective.metric.describe(), objective.metric.goal
        row.iter_ms_median, row.iter_ms_p90 = objective.median, objective.p90
        row.steps = max((len(v) for v in objective.per_rank.values()), default=0)
        row.problems += objective.problems
    common_env = _get(data.run_json, "common_env") or {}
    accelerator = _string(_get(data.run_json, "flags", "accelerator")) or "cuda"
    effective = effective_from_debug_logs(data.output_dir, common_env, accelerator)
    _fill_effective(row, {"effective_settings": effective} if effective else None)
    return row


def _fill_effective(row: PointRow, summary: Mapping[str, Any] | None) -> None:
    """What NCCL really built for the point (train.nccl_debug) and every way it differs from
    what the point asked: a flagged point is kept in the table but never silently."""
    effective = _get(summary, "effective_settings")
    flags: list[str] = []
    if isinstance(effective, Mapping):
        row.effective_channels = _integer(effective.get("channels"))
        for attribute, key in (("effective_threads", "threads"), ("effective_algorithms", "algorithms"),
                               ("effective_transports", "transports")):
            values = effective.get(key)
            if isinstance(values, list) and values:
                setattr(row, attribute, ",".join(str(v) for v in values))
        if row.effective_threads is None:
            # No kernel block known (world size 1, or no per-collective line on any rank): the
            # thread variable as the library used it stands in (after its own clamping, e.g.
            # RCCL's NCCL_NTHREADS minimum), so points of different threads are not taken for
            # equal, and points the library clamped to one value are.
            knob = _get(effective, "threads_knob")
            read = _get(effective, "env_read") or {}
            if isinstance(knob, Mapping) and knob.get("read") is not None and knob.get("effective") is not None:
                row.effective_threads = f"{knob['effective']} ({knob.get('name')} read)"
            else:
                value = read.get("NCCL_NTHREADS") or read.get("RCCL_THREADS_PER_BLOCK") if isinstance(read, Mapping) else None
                if value is not None:
                    row.effective_threads = f"{value} (read)"
        flags += [str(f) for f in effective.get("flags") or [] if isinstance(f, str)]
        row.notes += [str(n) for n in effective.get("notes") or [] if isinstance(n, str)]
        captured = effective.get("capture") == "on"
        if captured and row.channels is not None and row.effective_channels is not None \
                and row.effective_channels != row.channels:
            text = f"grid channels {row.channels}, NCCL built {row.effective_channels}"
            if not any(text.split(",")[1].strip() in f for f in flags):
                flags.append(text)
        if captured or flags:
            row.settings_flag = bool(flags)
    pool = _get(summary, "pool")
    if isinstance(pool, Mapping) and pool.get("leak_free") is False:
        flags.append(f"pool: resources not back to the baseline after the point ({pool.get('leak')})")
        row.settings_flag = True
    row.settings_flags = flags


def flag_shared_settings(rows: Sequence[PointRow], sweep: Mapping[str, Any] | None = None) -> None:
    """Cross-point checks: two points that asked for different settings but ran with the same
    effective ones (a clamped or no-op axis: their difference measures nothing), and a sweep
    with the ib preset whose NCCL used sockets."""
    by_effective: dict[tuple[Any, ...], list[PointRow]] = {}
    for row in rows:
        if row.effective_channels is None:
            continue
        key = (row.effective_channels, row.effective_threads, row.effective_algorithms)
        by_effective.setdefault(key, []).append(row)
    for same in by_effective.values():
        asked = {(r.channels, r.threads) for r in same}
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
    )


def _summary_aggregates(summary: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not summary:
        return {}
    nested = summary.get("aggregates")
    return nested if isinstance(nested, Mapping) else summary


# run.json's words for a launch that ended well or has not ended (tasks/lib/runrecord.py).
RUN_OK_STATES = ("completed", "succeeded")
RUN_OPEN_STATES = ("running", "detached", "rendered")
# Why the launch or the sweep stopped a run: more telling than the ranks' own "stopped".
VERDICTS = ("hung", "interrupted")


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


TRAIN_ERROR_RE = re.compile(r"train: error: .*")
# An entry's rank lines carry torchrun's `[rankN]:` (tasks/lib/entry.py).
PYTHON_ERROR_RE = re.compile(r"^(?:\[rank\d+\]:\s*)*(?:[\w.]+\.)?\w*(?:Error|Exception): .+")
LOG_TAIL_BYTES = 256 * 1024
ERROR_LINE_CHARS = 240


def error_line_in_logs(data: RunData) -> str | None:
    """Why a run failed, in the ranks' own words: the first `train: error:` line of the node logs
    (the train package's one-line reasons), else the last Python exception line. The launcher
    only knows that a rank exited non-zero; the logs say why."""
    logs = sorted((data.run_dir / "logs").glob("node_*.txt")) if (data.run_dir / "logs").is_dir() else []
    if data.output_dir is not None:
        logs += sorted(data.output_dir.glob("node_*_output.log"))
    python_error = None
    for path in logs:
        try:
            with path.open("rb") as handle:
                handle.seek(0, 2)
                handle.seek(max(0, handle.tell() - LOG_TAIL_BYTES))
                text = handle.read().decode(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if (match := TRAIN_ERROR_RE.search(line)):
                return match.group(0)[:ERROR_LINE_CHARS]
            if PYTHON_ERROR_RE.match(line):
                python_error = line.strip()[:ERROR_LINE_CHARS]
    return python_error


def _failure_problem(run_json: Mapping[str, Any] | None) -> str | None:
    failure = _get(run_json, "first_failure")
    if not isinstance(failure, Mapping):
        return None
    where = f"node {failure.get('node_rank', '?')}"
    if failure.get("host"):
        where += f" ({failure['host']})"
    return f"{where}: {failure.get('reason') or 'failed'}"


def _grid_values(data: RunData, spec: PointSpec | None) -> tuple[int | None, int | None]:
    if spec is not None:
        return spec.channels, spec.threads
    run_json = data.run_json or {}
    channels = _integer(_get(run_json, "flags", "channels") or run_json.get("channels"))
    threads = _integer(_get(run_json, "flags", "threads") or run_json.get("threads"))
    for name in (data.output_dir.name if data.output_dir else "", data.run_dir.name):
        if channels is not None and threads is not None:
            break
        if match := OUTPUT_DIR_RE.match(name):
            threads = threads if threads is not None else int(match.group(1))
            channels = channels if channels is not None else int(match.group(2))
        elif match := RUN_ID_RE.match(name):
            channels = channels if channels is not None else int(match.group(1))
            threads = threads if threads is not None else int(match.group(2))
    env = _get(data.summary, "env") or _get(_summary_aggregates(data.summary), "env") or {}
    if channels is None and isinstance(env, Mapping):
        channels = _integer(env.get("NCCL_MAX_NCHANNELS"))
    if threads is None and isinstance(env, Mapping):
        threads = _integer(env.get("RCCL_THREADS_PER_BLOCK") or env.get("NCCL_NTHREADS"))
    return channels, threads


def _run_id(data: RunData) -> str:
    return _string(_get(data.run_json, "run_id")) or data.run_dir.name


def _nodes(data: RunData) -> int | None:
    run_json = data.run_json or {}
    if (nnodes := _integer(run_json.get("nnodes"))):
        return nnodes
    for key in ("nodes", "hosts"):
        if isinstance(run_json.get(key), list) and run_json[key]:
            return len(run_json[key])
    summary_hosts = _get(data.summary, "hosts") or _get(_summary_aggregates(data.summary), "hosts")
    if isinstance(summary_hosts, list) and summary_hosts:
        return len(summary_hosts)
    hosts_in_lines = {line.get("host") for line in data.steps if line.get("host")}
    return len(hosts_in_lines) or None


def _world_size(data: RunData) -> int | None:
    for candidate in (_get(data.summary, "world_size"), _get(data.run_json, "world_size")):
        if (value := _integer(candidate)):
            return value
    sizes = {_integer(line.get("world_size")) for line in data.steps} - {None}
    if sizes:
        return max(sizes)  # type: ignore[type-var]
    return len(data.steps_by_rank) or None


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


# -- what a directory is --------------------------------------------------------------------------

@dataclass
class PointSource:
    """One point to report: its grid position (sweeps) and where its run is, if anywhere."""

    spec: PointSpec | None
    run_dir: Path | None
    sweep_status: str | None = None
    run_id: str | None = None
    error: str | None = None
    output_dir: str | None = None   # a pool point's directory inside its (shared) run


@dataclass
class ReportInput:
    kind: str                            # "run" | "sweep" | "runs"
    root: Path
    points: list[PointSource]
    sweep: dict[str, Any] | None = None


def discover(path: Path) -> ReportInput:
    """A sweep directory (sweep.json), one run directory, or a directory of run directories."""
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory; give a run or sweep directory (experiments/...)")
    sweep_path = path / SWEEP_JSON
    if sweep_path.exists():
        document, problem = read_json_file(sweep_path)
        if problem or not isinstance(document, dict) or not isinstance(document.get("points"), list):
            reason = problem or "has no 'points' list"
            raise ReportError(f"{sweep_path}: {reason}; restore it or report the run directories one by one")
        return ReportInput("sweep", path, [sweep_point_source(path, p) for p in document["points"]], document)
    if (path / RUN_JSON).exists() or find_output_dirs(path):
        return ReportInput("run", path, [PointSource(None, path.resolve())])
    runs = sorted(p for p in path.iterdir() if p.is_dir() and ((p / RUN_JSON).exists() or RUN_ID_RE.match(p.name)))
    if runs:
        return ReportInput("runs", path, [PointSource(None, run.resolve()) for run in runs])
    raise ReportError(f"{path} holds no run.json, sweep.json, train outputs or run directories")


def sweep_point_source(sweep_dir: Path, entry: Mapping[str, Any]) -> PointSource:
    spec = None
    channels, threads = _integer(entry.get("channels")), _integer(entry.get("threads"))
    if channels is not None and threads is not None:
        spec = PointSpec(channels, threads)
    run_id = _string(entry.get("run_id"))
    run_dir = resolve_run_dir(sweep_dir, _string(entry.get("run_dir")), run_id)
    output_dir = _string(entry.get("output_dir"))
    parts = Path(output_dir).parts if output_dir else ()
    if output_dir is not None and (Path(output_dir).is_absolute() or not parts
                                   or any(part in (".", "..") for part in parts)):
        output_dir = None  # inside the run only: sweep.json must not point the report elsewhere
    return PointSource(spec, run_dir, _string(entry.get("status")), run_id, _string(entry.get("error")),
                       output_dir)


def resolve_run_dir(sweep_dir: Path, recorded: str | None, run_id: str | None) -> Path | None:
    """Where a sweep point's run lives: as recorded (relative to the sweep directory), else a
    directory of the run id next to the sweep or inside it (a sweep copied with its runs)."""
    candidates = []
    if recorded:
        candidates.append(sweep_dir / recorded)
    if run_id:
        candidates += [sweep_dir.parent / run_id, sweep_dir / run_id]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0].resolve() if candidates else None


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


# -- decisions ------------------------------------------------------------------------------------

def best_point(rows: Sequence[PointRow]) -> PointRow | None:
    """The completed point with the lowest median iteration time (ties: lower p90); the highest
    where the rows hold an objective named higher-is-better (max:)."""
    candidates = [r for r in rows if r.status == COMPLETED and r.iter_ms_median is not None]
    if not candidates:
        return None
    if all(r.objective_goal == "max" for r in candidates):
        return max(candidates, key=lambda r: r.iter_ms_median)
    return min(candidates, key=lambda r: (r.iter_ms_median, r.iter_ms_p90 if r.iter_ms_p90 is not None else math.inf))


@dataclass
class TradeOff:
    highest_busbw: PointRow
    lowest_contention: PointRow

    @property
    def same_point(self) -> bool:
        return self.highest_busbw is self.lowest_contention

    @property
    def busbw_gain_pct(self) -> float | None:
        """How much more bus bandwidth the highest-busbw point gets than the lowest-contention one."""
        low, high = self.lowest_contention.busbw_gbps_median, self.highest_busbw.busbw_gbps_median
        return None if not low or high is None else (high / low - 1.0) * 100.0

    @property
    def contention_delta_pp(self) -> float | None:
        """Extra GEMM slowdown of the highest-busbw point, in percentage points."""
        high, low = self.highest_busbw.contention_slowdown_median, self.lowest_contention.contention_slowdown_median
        return None if high is None or low is None else (high - low) * 100.0

    @property
    def iter_ms_delta_pct(self) -> float | None:
        base, other = self.lowest_contention.iter_ms_median, self.highest_busbw.iter_ms_median
        return None if not base or other is None else (other / base - 1.0) * 100.0


def trade_off(rows: Sequence[PointRow]) -> TradeOff | None:
    completed = [r for r in rows if r.status == COMPLETED]
    # busbw is 0 where no data crosses ranks (world size 1): no bandwidth to trade.
    with_busbw = [r for r in completed if r.busbw_gbps_median]
    with_contention = [r for r in completed if r.contention_slowdown_median is not None]
    if not with_busbw or not with_contention:
        return None
    return TradeOff(
        highest_busbw=max(with_busbw, key=lambda r: r.busbw_gbps_median),
        lowest_contention=min(with_contention, key=lambda r: r.contention_slowdown_median),
    )


# -- writing --------------------------------------------------------------------------------------

def results_csv(rows: Iterable[PointRow], base: Path | None = None) -> str:
    """One CSV line per point; run_dir relative to `base` (where the CSV goes) so a copied
    experiments tree keeps working."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = {name: getattr(row, name) for name in CSV_FIELDS
                  if name not in ("problems", "notes", "settings_flags")}
        if row.run_dir and base is not None:
            record["run_dir"] = os.path.relpath(row.run_dir, base)
        record["notes"] = "; ".join(row.notes)
        record["settings_flags"] = "; ".join(row.settings_flags)
        record["problems"] = "; ".join(row.problems)
        writer.writerow({k: untrusted.csv_cell(_csv_value(v)) for k, v in record.items()})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def markdown_row(row: PointRow) -> PointRow:
    """The row as report.md shows it: every text field a node may have written (status, host,
    notes, flags, problems, NCCL's names) escaped for Markdown/HTML on one line (a node's status
    must not forge a "Best point" line or inject HTML). run_dir stays (paths are read from it)."""
    escaped: dict[str, Any] = {}
    for item in fields(row):
        value = getattr(row, item.name)
        if item.name in ("run_id", "run_dir"):
            continue
        if isinstance(value, str):
            escaped[item.name] = untrusted.md_text(value)
        elif isinstance(value, list):
            escaped[item.name] = [untrusted.md_text(v) for v in value]
    return replace(row, **escaped)


def report_markdown(report_input: ReportInput, rows: Sequence[PointRow], figures: Sequence[str],
                    single_run: RunData | None = None) -> str:
    """report.md: what was measured, the best point, the trade-off, the problems, the figures."""
    rows = [markdown_row(row) for row in rows]
    lines = [f"# Report: {untrusted.md_text(report_input.root.name)}", ""]
    completed = sum(r.status == COMPLETED for r in rows)
    lines.append(f"{len(rows)} point(s), {completed} completed. Source: `{report_input.root}`"
                 + (f" (sweep of channels {_grid_text(report_input.sweep, 'channels')} × threads "
                    f"{_grid_text(report_input.sweep, 'threads')})" if report_input.sweep else "") + ".")
    lines.append("")
    best = best_point(rows)
    lines.append("## Best point")
    lines.append("")
    if (objectives := sorted({r.objective for r in rows if r.objective})):
        lines.append(f"Objective (your own training; in the iter ms columns): {'; '.join(objectives)}.")
        lines.append("")
    if best is None:
        lines.append("No completed point with metrics: no best point.")
    else:
        lines.append(f"**Best point: {best.label}** (channels={best.channels}, threads={best.threads}): "
                     f"median iteration {_fmt(best.iter_ms_median, '.2f')} ms "
                     f"(p90 {_fmt(best.iter_ms_p90, '.2f')} ms), GEMM {_fmt(best.gemm_tflops_median, '.3g')} TFLOP/s, "
                     f"contention slowdown {_pct(best.contention_slowdown_median)} "
                     f"(overlapped GEMMs {_pct(best.gemm_contention_slowdown_median)}), "
                     f"busbw {_fmt(best.busbw_gbps_median, '.3g')} GB/s, "
                     f"wait p95 {_fmt(best.wait_ms_p95, '.3g')} ms. Run: {untrusted.md_code(best.run_id)}.")
        others = sorted((r for r in rows if r is not best and r.status == COMPLETED and r.iter_ms_median),
                        key=lambda r: r.iter_ms_median)
        if others and best.iter_ms_median:
            runner = others[0]
            lines.append("")
            lines.append(f"Next: {runner.label} at {_fmt(runner.iter_ms_median, '.2f')} ms "
                         f"(+{(runner.iter_ms_median / best.iter_ms_median - 1) * 100:.1f} %).")
    lines.append("")
    lines.append("## Trade-off")
    lines.append("")
    lines.extend(_trade_off_lines(trade_off(rows)))
    lines.append("")
    lines.append("## Points")
    lines.append("")
    lines.extend(_markdown_table(rows))
    problem_rows = [r for r in rows if r.problems or r.status != COMPLETED]
    if problem_rows:
        lines.append("")
        lines.append("## Problems")
        lines.append("")
        for row in problem_rows:
            detail = "; ".join(row.problems) or (
                "not run yet (fab sweep --resume finishes it)" if row.status == NOT_RUN else "no detail recorded")
            lines.append(f"- {row.label} ({untrusted.md_code(row.run_id or '-')}): status {row.status}; {detail}")
    lines.extend(_effective_lines(rows))
    lines.extend(_straggler_lines(rows))
    lines.extend(_clock_lines(rows))
    lines.extend(_communication_lines(rows))
    for row in rows:
        if row.run_dir and (section := _hang_section(Path(row.run_dir))):
            lines.extend(["", section.rstrip("\n")])
    if report_input.sweep is not None:
        lines.extend(_sweep_timing_lines(report_input.sweep))
    if single_run is not None and len(single_run.steps_by_rank) > 1:
        lines.append("")
        lines.extend(_per_rank_lines(single_run))
    if figures:
        lines.append("")
        lines.append("## Figures")
        lines.append("")
        for name in figures:
            lines.append(f"![{name}]({name})")
    lines.append("")
    return "\n".join(lines)


def _effective_lines(rows: Sequence[PointRow]) -> list[str]:
    """Did each point run with what it names? Read back from NCCL, not assumed."""
    read = [r for r in rows if r.settings_flag is not None]
    if not read:
        return []
    lines = ["", "## Effective settings", ""]
    for row in read:
        built = (f"NCCL built {_fmt_int(row.effective_channels)} channels, threads "
                 f"{row.effective_threads or 'not reported'}"
                 + (f", {row.effective_algorithms}" if row.effective_algorithms else "")
                 + (f", via {row.effective_transports}" if row.effective_transports else ""))
        if row.settings_flag:
            lines.append(f"- **{row.label}: FLAGGED**: {built}; " + "; ".join(row.settings_flags) + ".")
        else:
            lines.append(f"- {row.label}: as asked ({built}).")
    return lines


def _straggler_lines(rows: Sequence[PointRow]) -> list[str]:
    """Who held each point back: the rank the others waited for, not an average."""
    named = [r for r in rows if r.slowest_rank is not None and (r.world_size or 0) > 1]
    if not named:
        return []
    lines = ["", "## Stragglers", ""]
    for row in named:
        who = f"rank {row.slowest_rank}" + (f" ({row.slowest_host})" if row.slowest_host else "")
        if row.slowest_by == "caused_wait":
            text = (f"- {row.label}: slowest {who}: the others waited "
                    f"{_fmt(row.caused_wait_ms_median, '.3g')} ms per step for it (median); "
                    f"wait per rank and step p50 {_fmt(row.wait_ms_median, '.3g')} ms, "
                    f"p95 {_fmt(row.wait_ms_p95, '.3g')} ms")
        else:
            text = (f"- {row.label}: slowest {who} by median iteration time "
                    f"({_fmt(None if row.rank_spread is None else (row.rank_spread - 1) * 100, '.1f')} % "
                    f"above the fastest rank)")
        text += (f"; iteration p50 {_fmt(row.iter_ms_median, '.2f')} ms, p95 "
                 f"{_fmt(row.iter_ms_p95, '.2f')} ms, slowest rank per step p95 "
                 f"{_fmt(row.slowest_step_ms_p95, '.2f')} ms")
        if row.outlier_steps:
            text += f"; outlier steps {row.outlier_steps}"
        lines.append(text + ".")
    return lines


def _clock_lines(rows: Sequence[PointRow]) -> list[str]:
    """Points whose measured steps ran at another SM clock than their GEMM-only calibration."""
    read = [r for r in rows if r.clock_drift is not None]
    if not read:
        return []
    lines = ["", "## Clocks", ""]
    flagged = [r for r in read if r.clock_flag]
    for row in flagged:
        lines.append(f"- **{row.label}: clocks differed from the calibration**: measured steps ran "
                     f"at {_signed(row.clock_drift * 100 if row.clock_drift is not None else None, ' %')} "
                     f"SM clock against the GEMM-only steps (median "
                     f"{_fmt(row.sm_clock_mhz_median, '.0f')} MHz): its contention figures compare two "
                     "power states.")
    if not flagged:
        lines.append(f"Every point's measured steps ran within tolerance of their calibration's SM "
                     f"clock ({len(read)} point(s) read).")
    return lines


def _communication_lines(rows: Sequence[PointRow]) -> list[str]:
    """Collective time against what the ranks saw, the launch delay, and why figures are null."""
    shown = [r for r in rows if r.collective_ms_median is not None or r.notes
             or r.launch_delay_ms_median is not None]
    if not shown:
        return []
    lines = ["", "## Communication", ""]
    for row in shown:
        parts = [f"collective {_fmt(row.collective_ms_median, '.3g')} ms per step from stream "
                 f"events, {_fmt(row.kernel_collective_ms_median, '.3g')} ms kernel-active (p50, "
                 f"rank skew left out; kernel-active busbw "
                 f"{_fmt(row.kernel_busbw_gbps_median, '.3g')} GB/s; local busbw with waits "
                 f"{_fmt(row.local_busbw_gbps_median, '.3g')} GB/s)",
                 (f"launch delay of the first collective {_fmt(row.launch_delay_ms_median, '.3g')} ms"
                  if row.launch_delay_ms_median is not None or not row.launch_delay_reason
                  else f"launch delay not measured ({row.launch_delay_reason})"),
                 f"control all-reduce {_fmt(row.control_ms_median, '.3g')} ms"]
        if row.reduce_local_ms_median is not None:
            parts.append(f"local sum {_fmt(row.reduce_local_ms_median, '.3g')} ms")
        if row.comm_stream_priority:
            parts.append(f"comm stream priority {row.comm_stream_priority}")
        parts += row.notes
        lines.append(f"- {row.label}: " + "; ".join(parts) + ".")
    return lines


def _trade_off_lines(result: TradeOff | None) -> list[str]:
    if result is None:
        return ["Not enough completed points with busbw and contention figures for a trade-off "
                "(busbw is null at world size 1: no data crosses ranks)."]
    high, low = result.highest_busbw, result.lowest_contention
    lines = [
        f"- Highest busbw: **{high.label}**: {_fmt(high.busbw_gbps_median, '.3g')} GB/s, "
        f"contention slowdown {_pct(high.contention_slowdown_median)}, iteration {_fmt(high.iter_ms_median, '.2f')} ms.",
        f"- Lowest contention: **{low.label}**: contention slowdown {_pct(low.contention_slowdown_median)}, "
        f"busbw {_fmt(low.busbw_gbps_median, '.3g')} GB/s, iteration {_fmt(low.iter_ms_median, '.2f')} ms.",
    ]
    if result.same_point:
        lines.append("- The same point gives both: no trade-off in this grid.")
    else:
        lines.append(
            f"- How far apart: the highest-busbw point moves {_signed(result.busbw_gain_pct, ' %')} busbw "
            f"for {_signed(result.contention_delta_pp, ' pp')} GEMM slowdown and "
            f"{_signed(result.iter_ms_delta_pct, ' %')} iteration time against the lowest-contention point "
            f"(channels {_fmt_int(low.channels)} → {_fmt_int(high.channels)}, "
            f"threads {_fmt_int(low.threads)} → {_fmt_int(high.threads)}).")
    return lines


MD_COLUMNS = (
    ("channels", "channels", None), ("threads", "threads", None), ("nodes", "nodes", None),
    ("world", "world_size", None), ("status", "status", None), ("steps", "steps", None),
    ("iter ms p50", "iter_ms_median", ".2f"), ("iter ms p90", "iter_ms_p90", ".2f"),
    ("GEMM TFLOP/s", "gemm_tflops_median", ".3g"), ("contention", "contention_slowdown_median", "pct"),
    ("exposed comm", "exposed_comm_fraction_median", "pct"), ("busbw GB/s", "busbw_gbps_median", ".3g"),
    ("wait ms p95", "wait_ms_p95", ".3g"), ("slowest rank", "slowest_rank", None),
)
# The terminal table's share of them: it must fit an 80-column terminal (the stragglers are
# printed below it).
TERMINAL_MD_COLUMNS = MD_COLUMNS[:12]


def table_cells(row: PointRow, columns: Sequence[tuple[str, str, str | None]] = MD_COLUMNS) -> list[str]:
    """The row formatted for people (shared by report.md and the terminal table)."""
    cells = []
    for _, attribute, spec in columns:
        value = getattr(row, attribute)
        if spec == "pct":
            cells.append(_pct(value))
        elif spec:
            cells.append(_fmt(value, spec))
        else:
            cells.append("-" if value is None else str(value))
    return cells


def table_headers() -> list[str]:
    return [header for header, _, _ in MD_COLUMNS]


def _markdown_table(rows: Sequence[PointRow]) -> list[str]:
    best = best_point(rows)
    lines = ["| " + " | ".join(table_headers()) + " |",
             "|" + "|".join("---" if attribute == "status" else "---:" for _, attribute, _ in MD_COLUMNS) + "|"]
    for row in rows:
        cells = table_cells(row)
        if row is best:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


PER_RANK_SUMMARY = (
    ("wait ms p50", "wait_ms_median", ".3g"), ("wait ms p95", "wait_ms_p95", ".3g"),
    ("others waited ms/step", "caused_wait_ms_median", ".3g"),
    ("arrived last", "last_arrival_fraction", "pct"), ("compute ms", "compute_ms_median", ".3g"),
    ("exposed comm ms", "exposed_comm_ms_median", ".3g"),
    ("contention", "contention_slowdown_median", "pct"),
)


def _per_rank_lines(data: RunData) -> list[str]:
    """Every rank's own figures: the summary's per-rank entries where it has them."""
    per_rank = {}
    for entry in _get(_summary_aggregates(data.summary), "per_rank") or []:
        if isinstance(entry, Mapping) and _integer(entry.get("rank")) is not None:
            per_rank[_integer(entry.get("rank"))] = entry
    extra = PER_RANK_SUMMARY if per_rank else ()
    headers = ["rank", "host", "steps", "iter ms p50", "iter ms p95", "iter ms max",
               *(h for h, _, _ in extra)]
    lines = ["## Per rank", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if h == "host" else "---:" for h in headers) + "|"]
    for rank, steps in sorted(data.steps_by_rank.items()):
        values = [line.get("iter_ms") for line in steps]
        numbers = [v for v in (_number(x) for x in values) if v is not None]
        entry = per_rank.get(rank, {})
        cells = [str(rank), untrusted.md_text(entry.get("host") or "-"), str(len(steps)),
                 _fmt(quantile(values, 50), ".2f"), _fmt(quantile(values, 95), ".2f"),
                 _fmt(max(numbers) if numbers else None, ".2f")]
        for _, key, spec in extra:
            value = _number(entry.get(key))
            cells.append(_pct(value) if spec == "pct" else _fmt(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _hang_section(run_dir: Path) -> str:
    """The hang diagnostics of a run (fab launch's watchdog writes <run dir>/hang/), or ""."""
    if not (run_dir / "hang").is_dir():
        return ""
    try:
        from tasks.lib.diagnostics import hang_summary_markdown

        return hang_summary_markdown(run_dir)
    except Exception as err:  # noqa: BLE001 - a broken diagnostics file must not stop the report
        return f"## Hang: {run_dir.name}\n\nhang/ diagnostics unreadable: {type(err).__name__}: {err}\n"


DEAD_TIME_LABELS = (
    ("gap_s", "sweep's own gap (previous launch returned → next launch called)"),
    ("cleanup_wait_s", "wait until no process of the run was left on any host"),
    ("idle_s", "idle between points (last measured step → next point's first)"),
    ("startup_s", "launch start-up (launch called → first measured step)"),
    ("teardown_s", "teardown (last measured step → launch returned)"),
)


def _sweep_timing_lines(sweep: Mapping[str, Any]) -> list[str]:
    dead = sweep.get("dead_time")
    if not isinstance(dead, Mapping) or not dead:
        return []
    lines = ["", "## Sweep timing", "", "| between points | median s | max s | n |", "|---|---:|---:|---:|"]
    for key, label in DEAD_TIME_LABELS:
        figures = dead.get(key)
        if isinstance(figures, Mapping):
            lines.append(f"| {label} | {_fmt(_number(figures.get('median')), '.2f')} | "
                         f"{_fmt(_number(figures.get('max')), '.2f')} | {figures.get('n', '-')} |")
    return lines


def _grid_text(sweep: Mapping[str, Any] | None, key: str) -> str:
    values = _get(sweep, "grid", key)
    return ",".join(str(v) for v in values) if isinstance(values, list) else "?"


# -- small helpers --------------------------------------------------------------------------------

def quantile(values: Iterable[Any], q: float) -> float | None:
    """q-th percentile (0..100), linear interpolation (numpy's default); non-numbers ignored."""
    data = sorted(v for v in (_number(x) for x in values) if v is not None)
    if not data:
        return None
    position = (len(data) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)


def _get(document: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(document, Mapping):
            return None
        document = document.get(key)
    return document


def _number(value: Any) -> float | None:
    return untrusted.finite_number(value)


def _integer(value: Any) -> int | None:
    """An int of a document or a digit string, bounded (a node's summary may hold anything)."""
    if isinstance(value, str):
        text = value.strip()
        return untrusted.int_text(text) if text.isascii() and text.isdigit() else None
    return untrusted.plain_int(value)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_int(value: int | None) -> str:
    return "?" if value is None else str(value)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _signed(value: float | None, unit: str) -> str:
    return "?" if value is None else f"{value:+.1f}{unit}"
