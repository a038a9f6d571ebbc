"""The cross-rank part of summary.json, from every rank's end-of-run report (pure Python).

Rank 0 gets one report per rank in the single end-of-run gather (train.trainer). A report
holds the rank's identity and environment, its measured steps (metrics dicts), its calibration
steps, its packed collective records (train.collectives) and its GEMM intervals per step, the
launch-delay samples, its telemetry and comm-stream description. docs/METRICS.md documents
every field written here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from train.collectives import (
    COMM_PHASE,
    CONTROL,
    TRAIN_PHASE,
    Analysis,
    analyze,
    unpack,
    wait_intervals,
)
from train.clockdrift import telemetry_summary
from train.intervals import intersection_length
from train.kernelactive import kernel_active
from train.metrics import (
    AGGREGATED,
    WORLD_SIZE_ONE,
    distribution,
    env_differences,
    median,
)

# A step is an outlier when its slowest rank took this much longer than the median step's
# slowest rank.
OUTLIER_FACTOR = 1.10
MAX_OUTLIERS_LISTED = 20
PER_RANK_MEDIANS = ("iter_ms", "compute_ms", "comm_ms", "gemm_tflops", "local_busbw_gbps")
PER_RANK_FIELDS = (
    "exposed_comm_ms", "overlap_ms", "contention_slowdown", "gemm_contention_slowdown",
    "control_ms", "sm_clock_mhz",
)


def _r(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def _argmax(values: Sequence[tuple[int, float | None]]) -> tuple[int | None, float | None]:
    known = [(rank, v) for rank, v in values if v is not None]
    if not known:
        return None, None
    rank, value = max(known, key=lambda item: item[1])
    return rank, value


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


def cross_rank_analysis(reports: Sequence[Mapping[str, Any]], world_size: int) -> Analysis:
    """The collectives of every rank's report, paired across ranks (train.collectives)."""
    reports = sorted(reports, key=lambda r: r["rank"])
    if len(reports) != world_size:
        return Analysis(False, f"reports from {len(reports)} of {world_size} ranks (partial)")
    if any(r.get("collectives") is None for r in reports):
        return Analysis(False, "collectives were not timed (timing.granularity=step)")
    return analyze([unpack(r.get("collectives")) for r in reports], world_size)


def _exposed_wait(analysis: Analysis, report: Mapping[str, Any], step: int) -> float | None:
    """The part of a rank's wait in one step that no GEMM of that rank covered."""
    intervals = (report.get("step_intervals") or {}).get(step)
    comm = analysis.step(TRAIN_PHASE, step)
    if intervals is None or comm is None:
        return None
    start_run, gemm = intervals
    rank = report["rank"]
    waits = wait_intervals(analysis, rank, TRAIN_PHASE, step)
    total = sum(e - s for s, e in waits)
    if start_run is None or gemm is None:
        return None
    covered = intersection_length(waits, [(start_run + s, start_run + e) for s, e in gemm])
    return max(0.0, total - covered)


def _block_medians(records: Iterable[Mapping[str, Any]], key: str) -> dict[int, float | None]:
    by_block: dict[int, list[float]] = {}
    for record in records:
        block, value = record.get("calibration_block"), record.get(key)
        if isinstance(block, int) and value is not None:
            by_block.setdefault(block, []).append(float(value))
    return {block: median(values) for block, values in by_block.items()}


def aggregate(
    reports: Sequence[Mapping[str, Any]],
    *,
    world_size: int,
    sample_every: int = 1,
    analysis: Analysis | None = None,
) -> dict[str, Any]:
    """The cross-rank fields of summary.json (see docs/METRICS.md)."""
    reports = sorted(reports, key=lambda r: r["rank"])
    if analysis is None:
        analysis = cross_rank_analysis(reports, world_size)
    steps = [s for r in reports for s in r.get("steps", [])]
    compute_cal = [s for r in reports for s in r.get("calibration_compute", [])]
    comm_cal = [s for r in reports for s in r.get("calibration_comm", [])]
    out: dict[str, Any] = {
        "measured_steps": {
            "per_rank_min": min((len(r.get("steps", [])) for r in reports), default=0),
            "total": len(steps),
        },
    }
    for key in AGGREGATED:
        out[key] = distribution(s.get(key) for s in steps)
    null_reasons: dict[str, str] = {}

    bandwidth_null = None
    if world_size == 1:
        bandwidth_null = WORLD_SIZE_ONE
    elif not analysis.ok:
        bandwidth_null = f"no cross-rank collective analysis: {analysis.reason}"

    # -- collective time, bandwidth and waits, one value per step (all ranks agree) ---------
    # stream_*: from the comm stream's events (queueing behind GEMM blocks included);
    # kernel_*: the same with each collective's queued time taken off (train.kernelactive).
    train_comm = [analysis.steps[k] for k in sorted(analysis.steps) if k[0] == TRAIN_PHASE]
    cal_comm = [analysis.steps[k] for k in sorted(analysis.steps) if k[0] == COMM_PHASE]
    out["stream_collective_ms"] = distribution(c.collective_ms for c in train_comm
                                               if c.comm_bytes)
    cal_block = {s.get("step"): s.get("calibration_block") for s in
                 (reports[0].get("calibration_comm", []) if reports else [])}
    solo_collective: dict[int, list[float]] = {}
    for c in cal_comm:
        block = cal_block.get(c.step)
        if isinstance(block, int) and c.comm_bytes:
            solo_collective.setdefault(block, []).append(c.collective_ms)
    solo_by_block = {b: median(v) for b, v in solo_collective.items()}
    step_block = {s.get("step"): s.get("calibration_block")
                  for s in (reports[0].get("steps", []) if reports else [])}
    if bandwidth_null is None:
        out["stream_algbw_gbps"] = distribution(c.algbw_gbps() for c in train_comm)
        out["stream_busbw_gbps"] = distribution(c.busbw_gbps() for c in train_comm)
        slowdowns = []
        for c in train_comm:
            solo = solo_by_block.get(step_block.get(c.step))  # type: ignore[arg-type]
            if solo and c.comm_bytes:
                slowdowns.append(c.collective_ms / solo - 1.0)
        out["stream_comm_slowdown"] = distribution(slowdowns)
        if out["stream_comm_slowdown"] is None:
            null_reasons["stream_comm_slowdown"] = "no comm-only calibration steps to compare with"
    else:
        for key in ("stream_algbw_gbps", "stream_busbw_gbps", "stream_comm_slowdown"):
            out[key] = None
            null_reasons[key] = bandwidth_null
    kernel = kernel_active(reports, analysis, world_size, step_block=step_block,
                           cal_block=cal_block)
    out.update(kernel["fields"])
    null_reasons.update(kernel["null_reasons"])
    out["kernel_active"] = kernel["section"]
    if analysis.ok:
        out["wait_ms"] = distribution(w for c in train_comm for w in c.wait_ms)
        exposed = [_exposed_wait(analysis, r, c.step) for r in reports for c in train_comm]
        out["exposed_wait_ms"] = distribution(exposed)
    else:
        out["wait_ms"] = out["exposed_wait_ms"] = None
        null_reasons["wait_ms"] = null_reasons["exposed_wait_ms"] = (
            f"no cross-rank collective analysis: {analysis.reason}")
    if out["stream_collective_ms"] is None and "stream_collective_ms" not in null_reasons:
        null_reasons["stream_collective_ms"] = (
            analysis.reason if not analysis.ok else "no gradient collective was timed")
    if world_size == 1:
        null_reasons["local_busbw_gbps"] = null_reasons["local_algbw_gbps"] = WORLD_SIZE_ONE

    # -- solo baselines (pooled over every calibration block) -------------------------------
    solo: dict[str, Any] = {
        "compute_ms": distribution(s.get("compute_ms") for s in compute_cal),
        "gemm_tflops": distribution(s.get("gemm_tflops") for s in compute_cal),
        "comm_ms": distribution(s.get("comm_ms") for s in comm_cal),
        "local_busbw_gbps": distribution(s.get("local_busbw_gbps") for s in comm_cal),
        "stream_collective_ms": distribution(c.collective_ms for c in cal_comm if c.comm_bytes),
    }
    if bandwidth_null is None:
        solo["stream_algbw_gbps"] = distribution(c.algbw_gbps() for c in cal_comm)
        solo["stream_busbw_gbps"] = distribution(c.busbw_gbps() for c in cal_comm)
    else:
        solo["stream_algbw_gbps"] = solo["stream_busbw_gbps"] = None
    solo.update(kernel["solo"])
    out["solo"] = solo

    # -- per step: the slowest rank, not the average ------------------------------------------
    by_rank = {r["rank"]: {s.get("step"): s for s in r.get("steps", [])} for r in reports}
    all_steps = sorted({s for mapping in by_rank.values() for s in mapping if s is not None})
    per_step = []
    for step in all_steps:
        entry: dict[str, Any] = {"step": step}
        for key in ("iter_ms", "compute_ms"):
            rank, value = _argmax([(r, by_rank[r].get(step, {}).get(key)) for r in by_rank])
            entry[f"{key}_max"], entry[f"{key}_max_rank"] = _r(value, 4), rank
        comm = analysis.step(TRAIN_PHASE, step) if analysis.ok else None
        if comm is not None:
            rank, value = _argmax(list(enumerate(comm.wait_ms)))
            entry["wait_ms_max"], entry["wait_ms_max_rank"] = _r(value, 4), rank
            entry["waited_for_rank"] = comm.waited_for_rank
            entry["stream_collective_ms"] = _r(comm.collective_ms, 4)
            entry["stream_busbw_gbps"] = None if bandwidth_null else _r(comm.busbw_gbps(), 3)
        kernel_step = kernel["per_step"].get(step, {})
        entry["kernel_collective_ms"] = kernel_step.get("kernel_collective_ms")
        entry["kernel_busbw_gbps"] = kernel_step.get("kernel_busbw_gbps")
        per_step.append(entry)
    out["per_step"] = per_step
    out["step_max"] = {
        key: distribution(e.get(f"{key}_max") for e in per_step)
        for key in ("iter_ms", "compute_ms", "wait_ms")
    }
    typical = median(e.get("iter_ms_max") for e in per_step)
    outliers = []
    if typical:
        threshold = typical * OUTLIER_FACTOR
        outliers = [
            {"step": e["step"], "iter_ms": e["iter_ms_max"], "rank": e["iter_ms_max_rank"]}
            for e in per_step if e.get("iter_ms_max") is not None and e["iter_ms_max"] > threshold
        ]
    out["outlier_steps"] = {
        "rule": f"slowest rank's iter_ms > {OUTLIER_FACTOR:g} x the median step's",
        "threshold_ms": _r(typical * OUTLIER_FACTOR if typical else None, 4),
        "count": len(outliers),
        "steps": outliers[:MAX_OUTLIERS_LISTED],
    }

    # -- per rank -----------------------------------------------------------------------------
    gradient_ops = [op for op in analysis.ops if op.key[0] == TRAIN_PHASE and op.name != CONTROL]
    per_rank = []
    for r in reports:
        rank = r["rank"]
        rank_steps = r.get("steps", [])
        entry = {
            "rank": rank,
            "host": r.get("host"),
            "device": r.get("device"),
            "steps": len(rank_steps),
        }
        for key in PER_RANK_MEDIANS + PER_RANK_FIELDS:
            entry[f"{key}_median"] = _r(median(s.get(key) for s in rank_steps))
        iters = distribution(s.get("iter_ms") for s in rank_steps)
        entry["iter_ms_p95"] = iters["p95"] if iters else None
        if analysis.ok and rank < world_size:
            waits = distribution(c.wait_ms[rank] for c in train_comm)
            entry["wait_ms_median"] = waits["median"] if waits else None
            entry["wait_ms_p95"] = waits["p95"] if waits else None
            entry["caused_wait_ms_median"] = _r(median(c.caused_wait_ms[rank] for c in train_comm))
            entry["caused_wait_ms_total"] = _r(sum(c.caused_wait_ms[rank] for c in train_comm), 4)
            entry["last_arrival_fraction"] = _r(
                sum(op.last_rank == rank for op in gradient_ops) / len(gradient_ops)
                if gradient_ops else None
            )
        else:
            for key in ("wait_ms_median", "wait_ms_p95", "caused_wait_ms_median",
                        "caused_wait_ms_total", "last_arrival_fraction"):
                entry[key] = None
        per_rank.append(entry)
    out["per_rank"] = per_rank
    out["rank_spread"] = {key: _spread(per_rank, f"{key}_median") for key in PER_RANK_MEDIANS}
    out["slowest_rank"] = _slowest(per_rank, analysis, world_size)

    out["collective_analysis"] = {
        "ok": analysis.ok,
        "reason": analysis.reason,
        "method": "collective time = shortest duration over ranks (the last rank to arrive); "
                  "wait = own duration - that",
        "collectives": len(analysis.ops),
        "clock_offset_ms": [round(o, 4) for o in analysis.offsets_ms],
        "end_residual_ms": distribution(analysis.end_residual_ms),
    }
    out["telemetry"] = telemetry_summary(reports, steps, compute_cal, comm_cal, sample_every)
    out["calibration_blocks"] = _blocks(compute_cal, comm_cal, analysis, cal_block)
    out["launch_delay_ms"] = _launch_delay(reports)
    out["comm_stream"] = reports[0].get("comm_stream") if reports else None
    out["null_reasons"] = null_reasons
    envs = [r.get("env", {}) for r in reports]
    out["env"] = envs[0] if envs else {}
    out["env_differences"] = env_differences(envs)
    out["devices"] = sorted({str(r.get("device")) for r in reports})
    out["hosts"] = sorted({str(r.get("host")) for r in reports})
    return out


def _slowest(per_rank: Sequence[Mapping[str, Any]], analysis: Analysis,
             world_size: int) -> dict[str, Any] | None:
    """The rank that held the others up: the one they waited for longest (the last to arrive
    at the collectives); without a cross-rank analysis, the rank with the slowest median step.
    A late rank's own steps are not slower than its peers' (they wait for it), so the wait it
    caused is the telling figure."""
    if not per_rank:
        return None
    caused = [(e["rank"], e.get("caused_wait_ms_total")) for e in per_rank]
    rank, total = _argmax(caused)
    by = "caused_wait"
    if world_size < 2 or not analysis.ok or rank is None or not total:
        rank, _ = _argmax([(e["rank"], e.get("iter_ms_median")) for e in per_rank])
        by = "iter_ms"
    if rank is None:
        return None
    entry = next(e for e in per_rank if e["rank"] == rank)
    return {
        "rank": rank,
        "host": entry.get("host"),
        "by": by,
        "caused_wait_ms_median": entry.get("caused_wait_ms_median"),
        "last_arrival_fraction": entry.get("last_arrival_fraction"),
        "iter_ms_median": entry.get("iter_ms_median"),
    }


def _blocks(compute_cal: Sequence[Mapping[str, Any]], comm_cal: Sequence[Mapping[str, Any]],
            analysis: Analysis, cal_block: Mapping[Any, Any]) -> dict[str, Any]:
    compute = _block_medians(compute_cal, "compute_ms")
    clocks = _block_medians(compute_cal, "sm_clock_mhz")
    after = {s.get("calibration_block"): s.get("after_step") for s in [*compute_cal, *comm_cal]}
    collective: dict[int, list[float]] = {}
    for key, comm in analysis.steps.items():
        block = cal_block.get(key[1]) if key[0] == COMM_PHASE else None
        if isinstance(block, int) and comm.comm_bytes:
            collective.setdefault(block, []).append(comm.collective_ms)
    blocks = sorted(set(compute) | set(collective) | {b for b in after if isinstance(b, int)})
    listed = [
        {
            "block": b,
            "after_step": after.get(b),
            "compute_ms": _r(compute.get(b)),
            "stream_collective_ms": _r(median(collective.get(b, []))),
            "sm_clock_mhz": _r(clocks.get(b)),
        }
        for b in blocks
    ]
    first = next((e["compute_ms"] for e in listed if e["compute_ms"]), None)
    last = next((e["compute_ms"] for e in reversed(listed) if e["compute_ms"]), None)
    return {
        "blocks": listed,
        "compute_drift": _r(last / first - 1.0) if first and last and len(listed) > 1 else None,
    }


def _launch_delay(reports: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    first, every, control, reasons, samples = [], [], [], [], 0
    methods: set[str] = set()
    residuals: list[float] = []
    for r in reports:
        sampled = r.get("launch_delay")
        if not isinstance(sampled, Mapping):
            continue
        if sampled.get("reason") and not sampled.get("samples"):
            reasons.append(str(sampled["reason"]))
        for sample in sampled.get("samples", []):
            samples += 1
            if sample.get("reason"):
                reasons.append(str(sample["reason"]))
            if sample.get("alignment"):
                methods.add(str(sample["alignment"]))
            if isinstance(sample.get("alignment_residual_ms"), (int, float)):
                residuals.append(float(sample["alignment_residual_ms"]))
            delays = [(name, ms) for name, _, ms in sample.get("delays", [])]
            gradient = [ms for name, ms in delays if name != CONTROL]
            if gradient:
                first.append(gradient[0])
            every += gradient
            control += [ms for name, ms in delays if name == CONTROL]
    return {
        "first_collective": distribution(first),
        "collectives": distribution(every),
        "control": distribution(control),
        "sampled_steps": samples,
        "alignment": sorted(methods),
        "alignment_residual_ms": distribution(residuals),
        "reason": None if first else (reasons[0] if reasons else "not measured"),
    }
