"""Per-step metrics of one rank, from timestamps already read off the device, and the run
environment record. The cross-rank summary is train.summary.

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

# Fields every metrics line carries (None where the timing granularity cannot tell, where
# there is nothing to measure, or, for telemetry, where the device exposes no counter).
# docs/METRICS.md says what each one means and how it is computed.
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
    "local_algbw_gbps",
    "local_busbw_gbps",
    "contention_slowdown",
    "gemm_contention_slowdown",
    "overlapped_gemm_fraction",
    "control_ms",
    "reduce_local_ms",
    "sm_clock_mhz",
    "power_w",
    "temperature_c",
    "calibration_block",
)

# Metrics aggregated into summary.json (distributions over every measured step of every rank).
# Identity and counters are not distributions.
AGGREGATED = tuple(
    name for name in STEP_FIELDS
    if name not in ("rank", "world_size", "step", "wall_time", "comm_bytes", "calibration_block")
)
TELEMETRY_FIELDS = ("sm_clock_mhz", "power_w", "temperature_c")

WORLD_SIZE_ONE = "world size 1: no data crosses ranks, so there is no bandwidth to report"


@dataclass(frozen=True)
class CollectiveTiming:
    """One collective call: its interval (ms from step start), nccl-tests size in bytes, its
    bucket (-1: the control all-reduce) and when the host issued it (ms from step start on the
    host clock; negative on GPU, where the host runs ahead of the device)."""

    start_ms: float
    end_ms: float
    collective: str
    size_bytes: int
    bucket: int = -1
    enqueue_ms: float | None = None


@dataclass
class StepTimes:
    """What one step's clock produced. ``gemm`` is None when GEMMs were not timed (one
    interval per GEMM when ``per_gemm``, else one per phase); ``comm`` is None when collectives
    ran but were not timed (an empty list: none ran). ``start_run_ms`` is the step's start on
    the rank's run timeline (None before the run's anchor is set)."""

    iter_ms: float
    gemm: list[Interval] | None = None
    comm: list[CollectiveTiming] | None = field(default_factory=list)
    control: CollectiveTiming | None = None
    reduce_local: list[Interval] | None = None
    per_gemm: bool = False
    start_run_ms: float | None = None


@dataclass(frozen=True)
class Baseline:
    """The solo figures a train step is compared with: the latest calibration block's medians
    (whole GEMM-only step, and each GEMM by its index in the step)."""

    block: int
    compute_ms: float | None
    per_gemm_ms: tuple[float, ...] | None = None


def _ratio_minus_one(value: float | None, baseline: float | None) -> float | None:
    if value is None or not baseline:
        return None
    return value / baseline - 1.0


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def overlapped_gemms(gemm: Sequence[Interval], in_flight: Sequence[Interval]) -> list[int]:
    """Indices of the GEMMs that ran, for any part of their time, while a collective of the
    same rank was in flight."""
    return [i for i, g in enumerate(gemm) if intersection_length([g], in_flight) > 0]


def gemm_contention(
    gemm: Sequence[Interval], in_flight: Sequence[Interval], solo_ms: Sequence[float] | None
) -> tuple[float | None, float | None]:
    """(slowdown of the overlapped GEMMs against the same GEMMs solo, fraction overlapped).

    Only GEMMs that overlapped a collective are compared, each with the GEMM of the same index
    (same shape and operands) in the GEMM-only calibration steps: the GEMMs no collective
    touched would dilute the figure towards 0.
    """
    if not gemm:
        return None, None
    hit = overlapped_gemms(gemm, in_flight)
    fraction = len(hit) / len(gemm)
    if not hit or solo_ms is None or len(solo_ms) != len(gemm):
        return None, fraction
    measured = sum(gemm[i][1] - gemm[i][0] for i in hit)
    solo = sum(solo_ms[i] for i in hit)
    return _ratio_minus_one(measured, solo), fraction


def step_metrics(
    times: StepTimes,
    *,
    gemm_flops: float,
    world_size: int,
    baseline: Baseline | None = None,
) -> dict[str, Any]:
    """Derives one rank's per-step metrics (the STEP_FIELDS a step's clock can give).

    compute_ms is the union of GEMM intervals, comm_ms the union of the gradient collectives'
    intervals on this rank (waiting for late ranks included), overlap_ms their intersection,
    exposed_comm_ms = comm_ms - overlap_ms. local_busbw sums each collective's size times its
    own nccl-tests factor over comm_ms: a lower bound, since comm_ms holds waits too; the
    summary's busbw_gbps, from the cross-rank analysis, does not. When the collectives ran
    untimed (times.comm is None) every communication field is None: a comm_bytes of 0 would
    claim that no data moved. At world size 1 no data crosses ranks: no bandwidth (None).
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

    slowdown = fraction = None
    if times.gemm is not None and times.per_gemm and comm_timed:
        in_flight = comm_intervals + (
            [(times.control.start_ms, times.control.end_ms)] if times.control else []
        )
        solo = baseline.per_gemm_ms if baseline is not None else None
        slowdown, fraction = gemm_contention(times.gemm, in_flight, solo)

    has_comm = bool(comm) and comm_ms is not None and comm_ms > 0
    moves_data = has_comm and world_size > 1
    control = times.control
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
        "local_algbw_gbps": _rounded(gbps(comm_bytes, comm_ms) if moves_data else None, 3),
        "local_busbw_gbps": _rounded(gbps(bus_bytes, comm_ms) if moves_data else None, 3),
        "contention_slowdown": _rounded(
            _ratio_minus_one(compute_ms, baseline.compute_ms if baseline else None), 6
        ),
        "gemm_contention_slowdown": _rounded(slowdown, 6),
        "overlapped_gemm_fraction": _rounded(fraction, 6),
        "control_ms": _rounded(control.end_ms - control.start_ms if control else None),
        "reduce_local_ms": _rounded(
            union_length(times.reduce_local) if times.reduce_local is not None else None
        ),
    }


def distribution(values: Iterable[float | None]) -> dict[str, Any] | None:
    """median/p10/p90/p95/mean/min/max/n of the non-null values; None when there are none."""
    data = [float(v) for v in values if v is not None]
    if not data:
        return None
    return {
        "median": round(percentile(data, 50) or 0.0, 6),
        "p10": round(percentile(data, 10) or 0.0, 6),
        "p90": round(percentile(data, 90) or 0.0, 6),
        "p95": round(percentile(data, 95) or 0.0, 6),
        "mean": round(sum(data) / len(data), 6),
        "min": round(min(data), 6),
        "max": round(max(data), 6),
        "n": len(data),
    }


def median(values: Iterable[float | None]) -> float | None:
    return percentile([v for v in values if v is not None], 50)


def collect_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of ENV_PREFIXES/ENV_NAMES and those the launch's env.sh lists in
    GEMM_ENV_VARS (so every setting of a run shows whether it reached the ranks), sorted by name.
    Those it lists in GEMM_MASKED_VARS (secret-looking names) are recorded as "***"."""
    launched = set(environ.get("GEMM_ENV_VARS", "").split())
    masked = set(environ.get("GEMM_MASKED_VARS", "").split())
    return {k: "***" if k in masked else environ[k] for k in sorted(environ)
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
