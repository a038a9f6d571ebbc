"""Per-step metrics and the cross-rank summary, from timestamps already read off the device.

Pure Python (no torch), so it is unit-tested on crafted intervals and usable by the
controller's report code.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from train.intervals import (
    Interval,
    busbw_factor,
    gbps,
    intersection_length,
    percentile,
    tflops,
    union_length,
)

# Variables that change collective behaviour or device placement; recorded in summary.json.
ENV_PREFIXES = ("NCCL_", "RCCL_", "TORCH_NCCL_", "HSA_", "GLOO_", "UCX_", "FI_")
ENV_NAMES = (
    "CUDA_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "OMP_NUM_THREADS",
)

# Fields every metrics line carries (None where the timing granularity cannot tell).
STEP_FIELDS = (
    "rank",
    "world_size",
    "step",
    "wall_time",
    "iter_ms",
    "compute_ms",
    "comm_ms",
    "overlap_ms",
    "exposed_comm_ms",
    "exposed_comm_fraction",
    "overlap_fraction",
    "gemm_tflops",
    "comm_bytes",
    "algbw_gbps",
    "busbw_gbps",
    "contention_slowdown",
    "comm_slowdown",
)

# Metrics aggregated into summary.json (median/p10/p90 over every measured step of every rank).
# Identity and counters are not distributions.
AGGREGATED = tuple(
    name for name in STEP_FIELDS
    if name not in ("rank", "world_size", "step", "wall_time", "comm_bytes")
)
CALIBRATION_AGGREGATED = ("compute_ms", "gemm_tflops", "comm_ms", "algbw_gbps", "busbw_gbps")
PER_RANK_MEDIANS = ("iter_ms", "compute_ms", "comm_ms", "gemm_tflops", "busbw_gbps")


@dataclass(frozen=True)
class CollectiveTiming:
    """One collective call: its interval (ms from step start) and nccl-tests size in bytes."""

    start_ms: float
    end_ms: float
    collective: str
    size_bytes: int


@dataclass
class StepTimes:
    """What one step's clock produced. ``gemm`` is None when GEMMs were not timed; ``comm``
    is None when collectives ran but were not timed (an empty list: none ran)."""

    iter_ms: float
    gemm: list[Interval] | None = None
    comm: list[CollectiveTiming] | None = field(default_factory=list)


def _ratio_minus_one(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline - 1.0


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def step_metrics(
    times: StepTimes,
    *,
    gemm_flops: float,
    world_size: int,
    solo_compute_ms: float | None = None,
    solo_comm_ms: float | None = None,
) -> dict[str, Any]:
    """Derives the per-step metrics (see STEP_FIELDS) from one step's intervals.

    compute_ms is the union of GEMM intervals, comm_ms the union of collective intervals,
    overlap_ms their intersection, exposed_comm_ms = comm_ms - overlap_ms. busbw sums each
    collective's size times its own nccl-tests factor, over the communication time. When the
    collectives ran untimed (times.comm is None) every communication field is None: a
    comm_bytes of 0 would claim that no data moved.
    """
    comm_timed = times.comm is not None
    comm = times.comm or []
    comm_intervals = [(c.start_ms, c.end_ms) for c in comm]
    comm_ms = union_length(comm_intervals) if times.gemm is not None and comm_timed else None
    comm_bytes = sum(c.size_bytes for c in comm) if comm_timed else None
    bus_bytes = sum(c.size_bytes * busbw_factor(c.collective, world_size) for c in comm)

    compute_ms = overlap_ms = exposed_ms = None
    if times.gemm is not None:
        compute_ms = union_length(times.gemm)
        if comm_timed:
            overlap_ms = intersection_length(times.gemm, comm_intervals)
            exposed_ms = max(0.0, (comm_ms or 0.0) - overlap_ms)

    has_comm = bool(comm) and comm_ms is not None and comm_ms > 0
    return {
        "iter_ms": _rounded(times.iter_ms),
        "compute_ms": _rounded(compute_ms),
        "comm_ms": _rounded(comm_ms),
        "overlap_ms": _rounded(overlap_ms),
        "exposed_comm_ms": _rounded(exposed_ms),
        "exposed_comm_fraction": _rounded(
            exposed_ms / times.iter_ms if exposed_ms is not None and times.iter_ms > 0 else None, 6
        ),
        "overlap_fraction": _rounded(
            overlap_ms / comm_ms if has_comm and overlap_ms is not None else None, 6
        ),
        "gemm_tflops": _rounded(tflops(gemm_flops, compute_ms) if compute_ms else None, 3),
        "comm_bytes": comm_bytes,
        "algbw_gbps": _rounded(gbps(comm_bytes, comm_ms) if has_comm else None, 3),
        "busbw_gbps": _rounded(gbps(bus_bytes, comm_ms) if has_comm else None, 3),
        "contention_slowdown": _rounded(_ratio_minus_one(compute_ms, solo_compute_ms), 6),
        "comm_slowdown": _rounded(_ratio_minus_one(comm_ms if has_comm else None, solo_comm_ms), 6),
    }


def distribution(values: Iterable[float | None]) -> dict[str, Any] | None:
    """median/p10/p90/mean/min/max/n of the non-null values; None when there are none."""
    data = [float(v) for v in values if v is not None]
    if not data:
        return None
    return {
        "median": round(percentile(data, 50) or 0.0, 6),
        "p10": round(percentile(data, 10) or 0.0, 6),
        "p90": round(percentile(data, 90) or 0.0, 6),
        "mean": round(sum(data) / len(data), 6),
        "min": round(min(data), 6),
        "max": round(max(data), 6),
        "n": len(data),
    }


def median(values: Iterable[float | None]) -> float | None:
    return percentile([v for v in values if v is not None], 50)


def collect_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ENV_PREFIXES/ENV_NAMES and those the launch's env.sh lists in
    GEMM_ENV_VARS (so every setting of a run shows whether it reached the ranks), sorted by name."""
    launched = set(environ.get("GEMM_ENV_VARS", "").split())
    return {k: environ[k] for k in sorted(environ)
            if k.startswith(ENV_PREFIXES) or k in ENV_NAMES or k in launched}


def env_differences(envs: Sequence[Mapping[str, str]]) -> dict[str, dict[str, str | None]]:
    """For every variable not identical on all ranks: {name: {rank: value or None}}."""
    names = sorted({k for env in envs for k in env})
    differing: dict[str, dict[str, str | None]] = {}
    for name in names:
        seen = [env.get(name) for env in envs]
        if len(set(seen)) > 1:
            differing[name] = {str(rank): value for rank, value in enumerate(seen)}
    return differing


def _spread(per_rank: Sequence[Mapping[str, Any]], key: str) -> dict[str, Any] | None:
    valued = [(r["rank"], r[key]) for r in per_rank if r.get(key) is not None]
    if not valued:
        return None
    low_rank, low = min(valued, key=lambda item: item[1])
    high_rank, high = max(valued, key=lambda item: item[1])
    return {
        "min": round(low, 6),
        "min_rank": low_rank,
        "max": round(high, 6),
        "max_rank": high_rank,
        "max_over_min": round(high / low, 6) if low > 0 else None,
    }


def aggregate_ranks(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Cross-rank aggregates from every rank's report.

    A report holds ``rank``, ``host``, ``device``, ``env``, ``steps`` (metrics dicts of the
    measured steps), ``calibration_compute`` and ``calibration_comm`` (metrics dicts of the
    calibration steps).
    """
    reports = sorted(reports, key=lambda r: r["rank"])
    steps = [s for r in reports for s in r.get("steps", [])]
    aggregates = {key: distribution(s.get(key) for s in steps) for key in AGGREGATED}

    solo: dict[str, Any] = {}
    compute_cal = [s for r in reports for s in r.get("calibration_compute", [])]
    comm_cal = [s for r in reports for s in r.get("calibration_comm", [])]
    for key in ("compute_ms", "gemm_tflops"):
        solo[key] = distribution(s.get(key) for s in compute_cal)
    for key in ("comm_ms", "algbw_gbps", "busbw_gbps"):
        solo[key] = distribution(s.get(key) for s in comm_cal)

    per_rank = []
    for r in reports:
        entry: dict[str, Any] = {
            "rank": r["rank"],
            "host": r.get("host"),
            "device": r.get("device"),
            "steps": len(r.get("steps", [])),
        }
        for key in PER_RANK_MEDIANS:
            value = median(s.get(key) for s in r.get("steps", []))
            entry[f"{key}_median"] = None if value is None else round(value, 6)
        per_rank.append(entry)

    envs = [r.get("env", {}) for r in reports]
    return {
        "measured_steps": {
            "per_rank_min": min((len(r.get("steps", [])) for r in reports), default=0),
            "total": len(steps),
        },
        **aggregates,
        "solo": solo,
        "per_rank": per_rank,
        "rank_spread": {key: _spread(per_rank, f"{key}_median") for key in PER_RANK_MEDIANS},
        "env": envs[0] if envs else {},
        "env_differences": env_differences(envs),
        "devices": sorted({str(r.get("device")) for r in reports}),
        "hosts": sorted({str(r.get("host")) for r in reports}),
    }
