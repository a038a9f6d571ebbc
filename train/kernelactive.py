"""Kernel-active collective time across ranks (pure Python, no torch).

A collective's stream-event interval (start event to end event on the comm stream) begins when
the stream reaches the collective, not when its kernel starts: while GEMM blocks hold every
SM the kernel sits queued, and that time lands in the stream-event figures (collective time,
busbw, the comm slowdown, overlap). The kernel-active figures leave it out.

Where the kernel timestamps come from: the steps the trainer runs under torch.profiler after
the measured ones (``profiling.launch_delay_steps`` train steps and as many comm-only steps).
For each of them and each timed collective, train.launchdelay.kernel_activity gives the
stream-event duration, the kernel's own duration and the time the kernel sat queued. Then:

- sampled steps (exact): a collective's kernel-active time on a rank is its kernel's duration;
  across ranks the shortest (the last rank to start its kernel waited for nobody inside it);
- every measured step and every comm-only calibration step (estimated): a rank's kernel-active
  duration of a collective = its stream-event duration - that rank's median queued time of the
  collective at the same position in the sampled steps of the same kind; across ranks the
  shortest, as for the stream-event figure (train.collectives); per step the sum over the
  gradient collectives, and from it algbw, busbw and the comm slowdown against the same
  calibration block's comm-only steps, estimated the same way;
- per rank and measured step, the kernel-active intervals ([start event + queued, end event])
  give kernel_comm_ms (their union) and kernel_overlap_ms (its overlap with the GEMMs).

No kernels (CPU/gloo, world size 1, no sampled steps): every field is None with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from train.collectives import COMM_PHASE, CONTROL, TRAIN_PHASE, Analysis, OpAnalysis
from train.intervals import busbw_factor, gbps, intersection_length, union_length
from train.metrics import WORLD_SIZE_ONE, distribution, median

# Distributions at the top level of summary.json.
KERNEL_FIELDS = (
    "kernel_collective_ms",
    "kernel_algbw_gbps",
    "kernel_busbw_gbps",
    "kernel_comm_slowdown",
    "kernel_comm_ms",
    "kernel_overlap_ms",
    "kernel_overlap_fraction",
)
BANDWIDTH_FIELDS = ("kernel_algbw_gbps", "kernel_busbw_gbps", "kernel_comm_slowdown")
METHOD = ("per collective and rank: stream-event duration - the rank's median queued time of "
          "the collective at the same position in the profiled steps of the same kind; "
          "collective time = the shortest over ranks, summed over the step's gradient "
          "collectives")


@dataclass
class Queued:
    """One rank's queued time per position of a step of one kind: the (op, bucket) at each
    position and the median queued ms over the rank's sampled steps."""

    ops: list[tuple[str, int]]
    ms: list[float]
    samples: dict[int, list[list[Any]]]  # sampled step index -> its kernel_active rows


def queued_per_position(samples: Sequence[Mapping[str, Any]],
                        missing: str) -> tuple[Queued | None, str | None]:
    """The median queued time per position over the samples that paired their kernels."""
    by_index = {i: s["kernel_active"] for i, s in enumerate(samples)
                if isinstance(s, Mapping) and isinstance(s.get("kernel_active"), list)
                and s["kernel_active"]}
    usable = list(by_index.values())
    if not usable:
        reasons = [str(s.get("reason")) for s in samples
                   if isinstance(s, Mapping) and s.get("reason")]
        return None, reasons[0] if reasons else missing
    signature = [(str(row[0]), int(row[1])) for row in usable[0]]
    if any([(str(row[0]), int(row[1])) for row in rows] != signature for rows in usable):
        return None, "the sampled steps paired different collectives with their kernels"
    ms = [median(float(rows[j][4]) for rows in usable) or 0.0 for j in range(len(signature))]
    return Queued(signature, ms, by_index), None


def _lookup(mapping: Mapping[Any, Any], step: int) -> Any:
    """A per-step entry whether the keys stayed ints or became strings on the way (JSON)."""
    return mapping.get(step, mapping.get(str(step)))


def _signature(ops: Sequence[OpAnalysis]) -> list[tuple[str, int]]:
    return [(op.name, op.bucket) for op in sorted(ops, key=lambda o: o.key[2])]


@dataclass
class _StepKernel:
    collective_ms: float = 0.0
    comm_bytes: int = 0
    bus_bytes: float = 0.0

    def algbw(self) -> float | None:
        return gbps(self.comm_bytes, self.collective_ms) if self.comm_bytes else None

    def busbw(self) -> float | None:
        return gbps(self.bus_bytes, self.collective_ms) if self.comm_bytes else None


def _step_kernel(ops: Sequence[OpAnalysis], queued: Sequence[Queued],
                 world_size: int) -> _StepKernel:
    """One step's gradient collectives, kernel-active, across ranks."""
    step = _StepKernel()
    for op in ops:
        if op.name == CONTROL:
            continue
        seq = op.key[2]
        kernel = [max(0.0, d - queued[r].ms[seq]) for r, d in enumerate(op.durations_ms)]
        step.collective_ms += min(kernel)
        step.comm_bytes += op.size_bytes
        step.bus_bytes += op.size_bytes * busbw_factor(op.name, world_size)
    return step


def _rank_intervals(report: Mapping[str, Any], rank: int, ops: Sequence[OpAnalysis],
                    queued: Queued, step: int) -> tuple[float | None, float | None,
                                                          float | None]:
    """(kernel_comm_ms, kernel_overlap_ms, kernel_overlap_fraction) of one rank's step."""
    entry = _lookup(report.get("step_intervals") or {}, step)
    if not entry:
        return None, None, None
    start_run, gemm = entry[0], entry[1]
    if start_run is None:
        return None, None, None
    active = []
    for op in ops:
        if op.name == CONTROL:
            continue
        record = op.records[rank]
        start = record.start_ms - start_run + queued.ms[op.key[2]]
        end = record.end_ms - start_run
        active.append((min(start, end), end))
    comm = union_length(active)
    if gemm is None:
        return comm, None, None
    overlap = intersection_length([(float(s), float(e)) for s, e in gemm], active)
    return comm, overlap, (overlap / comm if comm > 0 else None)


def _sampled(queued: Sequence[Queued], sizes: Sequence[tuple[str, int]],
             world_size: int) -> dict[str, Any]:
    """Exact figures of the profiled train steps: kernel durations, shortest over ranks."""
    kernel_ms, stream_ms, kernel_bw, stream_bw = [], [], [], []
    # the same profiled step on every rank (a rank may have lost one to an unreadable trace)
    common = set.intersection(*(set(q.samples) for q in queued)) if queued else set()
    for i in sorted(common):
        kernel = stream = bus = 0.0
        moved = 0
        for j, (name, size) in enumerate(sizes):
            if name == CONTROL:
                continue
            kernel += min(float(q.samples[i][j][3]) for q in queued)
            stream += min(float(q.samples[i][j][2]) for q in queued)
            bus += size * busbw_factor(name, world_size)
            moved += size
        kernel_ms.append(kernel)
        stream_ms.append(stream)
        if world_size > 1 and moved:
            kernel_bw.append(gbps(bus, kernel))
            stream_bw.append(gbps(bus, stream))
    return {
        "collective_ms": distribution(kernel_ms),
        "busbw_gbps": distribution(kernel_bw),
        "stream_collective_ms": distribution(stream_ms),
        "stream_busbw_gbps": distribution(stream_bw),
    }


def _paired(queued: Sequence[Queued]) -> int:
    """How many profiled steps every rank paired with its kernels."""
    return len(set.intersection(*(set(q.samples) for q in queued))) if queued else 0


def _nothing(reason: str, train_steps: int = 0, comm_steps: int = 0) -> dict[str, Any]:
    return {
        "fields": dict.fromkeys(KERNEL_FIELDS),
        "per_step": {},
        "solo": {"kernel_collective_ms": None, "kernel_busbw_gbps": None},
        "section": {"method": METHOD, "reason": reason, "sampled_train_steps": train_steps,
                    "sampled_comm_steps": comm_steps, "queued_ms": None, "sampled": None},
        "null_reasons": dict.fromkeys(KERNEL_FIELDS, reason),
    }


def kernel_active(reports: Sequence[Mapping[str, Any]], analysis: Analysis, world_size: int,
                  *, step_block: Mapping[Any, Any], cal_block: Mapping[Any, Any]
                  ) -> dict[str, Any]:
    """The kernel-active fields of summary.json: ``fields`` (top-level distributions),
    ``per_step`` (step -> kernel_collective_ms, kernel_busbw_gbps), ``solo``, ``section``
    (summary.json's ``kernel_active``) and ``null_reasons``."""
    reports = sorted(reports, key=lambda r: r["rank"])
    train_queued: list[Queued] = []
    comm_queued: list[Queued | None] = []
    comm_reason = None
    for report in reports:
        sampled = report.get("launch_delay")
        sampled = sampled if isinstance(sampled, Mapping) else {}
        missing = str(sampled.get("reason") or "no step was profiled")
        queued, reason = queued_per_position(sampled.get("samples") or [], missing)
        if queued is None:
            return _nothing(str(reason))
        train_queued.append(queued)
        queued, reason = queued_per_position(sampled.get("comm_samples") or [], missing)
        comm_queued.append(queued)
        comm_reason = comm_reason or reason
    train_count = _paired(train_queued)
    comm_count = _paired([q for q in comm_queued if q is not None])
    if not analysis.ok:
        return _nothing(f"no cross-rank collective analysis: {analysis.reason}", train_count,
                        comm_count)
    if len(train_queued) != world_size:
        return _nothing(f"profiled steps from {len(train_queued)} of {world_size} ranks",
                        train_count, comm_count)

    by_step: dict[tuple[str, int], list[OpAnalysis]] = {}
    for op in analysis.ops:
        by_step.setdefault((op.key[0], op.key[1]), []).append(op)
    train_steps = sorted(k for k in by_step if k[0] == TRAIN_PHASE)
    comm_steps = sorted(k for k in by_step if k[0] == COMM_PHASE)
    if not train_steps:
        return _nothing("no measured step's collectives were recorded", train_count, comm_count)
    expected = _signature(by_step[train_steps[0]])
    if any(q.ops != expected for q in train_queued):
        return _nothing("the profiled train steps ran other collectives than the measured ones",
                        train_count, comm_count)
    if comm_steps and comm_reason is None and any(
            q is None or q.ops != _signature(by_step[comm_steps[0]]) for q in comm_queued):
        comm_reason = "the profiled comm-only steps ran other collectives than the calibration's"
    comm_ready = [q for q in comm_queued if q is not None]
    if not comm_steps:
        comm_reason = comm_reason or "no comm-only calibration steps to compare with"

    per_step: dict[int, dict[str, float | None]] = {}
    kernel_steps: dict[int, _StepKernel] = {}
    for key in train_steps:
        found = _step_kernel(by_step[key], train_queued, world_size)
        if not found.comm_bytes:
            continue
        kernel_steps[key[1]] = found
        per_step[key[1]] = {
            "kernel_collective_ms": round(found.collective_ms, 4),
            "kernel_busbw_gbps": None if world_size == 1 else _round(found.busbw(), 3),
        }

    solo_by_block: dict[int, list[float]] = {}
    solo_bw: list[float | None] = []
    if comm_reason is None:
        for key in comm_steps:
            found = _step_kernel(by_step[key], comm_ready, world_size)
            block = cal_block.get(key[1])
            if found.comm_bytes and isinstance(block, int):
                solo_by_block.setdefault(block, []).append(found.collective_ms)
                solo_bw.append(found.busbw())
    solo_median = {b: median(v) for b, v in solo_by_block.items()}
    slowdowns = []
    for step, found in kernel_steps.items():
        solo = solo_median.get(step_block.get(step))  # type: ignore[arg-type]
        if solo:
            slowdowns.append(found.collective_ms / solo - 1.0)

    comm, overlap, fraction = [], [], []
    for rank, report in enumerate(reports):
        for key in train_steps:
            values = _rank_intervals(report, rank, by_step[key], train_queued[rank], key[1])
            comm.append(values[0])
            overlap.append(values[1])
            fraction.append(values[2])

    null_reasons: dict[str, str] = {}
    fields: dict[str, Any] = {
        "kernel_collective_ms": distribution(s.collective_ms for s in kernel_steps.values()),
        "kernel_algbw_gbps": distribution(s.algbw() for s in kernel_steps.values()),
        "kernel_busbw_gbps": distribution(s.busbw() for s in kernel_steps.values()),
        "kernel_comm_slowdown": distribution(slowdowns),
        "kernel_comm_ms": distribution(comm),
        "kernel_overlap_ms": distribution(overlap),
        "kernel_overlap_fraction": distribution(fraction),
    }
    if fields["kernel_comm_slowdown"] is None:
        null_reasons["kernel_comm_slowdown"] = comm_reason or "no comm-only calibration steps"
    if world_size == 1:
        for key in BANDWIDTH_FIELDS:
            fields[key] = None
            null_reasons[key] = WORLD_SIZE_ONE
    for key, value in fields.items():
        if value is None and key not in null_reasons:
            null_reasons[key] = "no gradient collective was timed"
    sizes = [(op.name, op.size_bytes) for op in sorted(by_step[train_steps[0]],
                                                        key=lambda o: o.key[2])]
    section = {
        "method": METHOD,
        "reason": None,
        "sampled_train_steps": train_count,
        "sampled_comm_steps": comm_count,
        "queued_ms": {
            "train": distribution(ms for q in train_queued
                                  for (name, _), ms in zip(q.ops, q.ms, strict=True)
                                  if name != CONTROL),
            "comm": distribution(ms for q in comm_ready for ms in q.ms),
        },
        "sampled": _sampled(train_queued, sizes, world_size),
    }
    solo = {
        "kernel_collective_ms": distribution(v for values in solo_by_block.values()
                                             for v in values),
        "kernel_busbw_gbps": None if world_size == 1 else distribution(solo_bw),
    }
    return {"fields": fields, "per_step": per_step, "solo": solo, "section": section,
            "null_reasons": null_reasons}


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
