"""One point of the report: its row (PointRow) and what every kind of row reads from a run the
same way (identity, status words, effective settings). rows.py builds our loop's rows, entry.py
those of your own training, axes.py checks a row's swept variables: all three stand on this."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tasks.lib.report.read import OUTPUT_DIR_RE, RUN_ID_RE, PointSpec, RunData
from tasks.lib.report.stats import Interval
from tasks.lib.report.values import _fmt_int, _get, _integer, _string


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
    # Beyond channels and threads: the point's other axes (fab sweep --axis NAME=V1,V2), in order.
    settings: dict[str, str] = field(default_factory=dict)
    repeat: int | None = None              # this run's repeat (0-based) in a sweep with --repeat
    config: int | None = None              # the point's index in the sweep's configs
    # A run's (step, iteration time) pairs, every rank (the decision's sample; not in the CSV).
    samples: list[tuple[int, float]] = field(default_factory=list)
    output_dir: str | None = None          # the point's own directory (a pool shares run_dir)
    pooled: bool = False                   # run by a rank pool: one launch ran several points
    effective_env: dict[str, str] = field(default_factory=dict)  # axis variables as the library read them
    # A point with repeats: its runs' rows, and the interval of its iteration time.
    runs: list[PointRow] = field(default_factory=list)
    runs_planned: int | None = None
    interval: Interval | None = None


    @property
    def label(self) -> str:
        base = f"{_fmt_int(self.channels)}ch × {_fmt_int(self.threads)}th"
        return " ".join([base, *(f"{k}={v}" for k, v in self.settings.items())])


    @property
    def selector(self) -> str:
        """How --pick and --point-override name the point: CxT[,NAME=VALUE...]."""
        return ",".join([f"{_fmt_int(self.channels)}x{_fmt_int(self.threads)}",
                         *(f"{k}={v}" for k, v in self.settings.items())])


    @property
    def has_metrics(self) -> bool:
        return self.iter_ms_median is not None


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
