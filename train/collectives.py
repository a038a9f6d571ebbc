"""Cross-rank analysis of the collectives every rank recorded (pure Python, no torch).

Each rank keeps, per collective call, when it was enqueued (host clock), when it started and
when it ended (device clock on GPU: CUDA events on the comm stream; the comm worker's
perf_counter on CPU), on its own run timeline (ms since an anchor taken right after a
start-of-run barrier). The records are gathered once, at the end of the run.

A collective ends at nearly the same moment on every rank: nobody can finish before the last
rank has contributed its data. So for one collective, the rank that arrived last waited least,
and its duration is the collective's own time:

    collective_ms   = min over ranks of (end - start)           (the last arrival's duration)
    wait_ms[rank]   = (end - start)[rank] - collective_ms        (time spent waiting for it)
    last_rank       = argmin over ranks of (end - start)

This needs no common clock: only durations, each read on one rank's clock. Bandwidths are
computed from collective_ms, so a late rank shows as wait, not as a slow link.

For the timeline (who enqueued what when, across ranks) the ranks' clocks are put on rank 0's
by the same fact: offset[rank] = median over collectives of (end[rank] - end[0]). The spread of
the ends left after that alignment (end_residual_ms) says how well the assumption holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from train.intervals import busbw_factor, percentile

CONTROL = "control"  # the per-step stop-flag all-reduce: a collective, but no gradient data

# Run phases whose collectives are recorded.
TRAIN_PHASE = "train"
COMM_PHASE = "comm"  # comm-only calibration steps


@dataclass(frozen=True)
class OpRecord:
    """One collective call on one rank; times in ms on that rank's run timeline."""

    phase: str
    step: int
    seq: int  # position within the step (control first, then bucket ops in issue order)
    name: str  # all_reduce | reduce_scatter | all_gather | control
    bucket: int  # -1 for the control all-reduce
    size_bytes: int  # nccl-tests size of the call
    enqueue_ms: float | None  # None: issued before the run timeline's anchor
    start_ms: float
    end_ms: float

    @property
    def key(self) -> tuple[str, int, int]:
        return (self.phase, self.step, self.seq)

    @property
    def duration_ms(self) -> float:
        return self.end_ms - self.start_ms


_FIELDS = ("phase", "step", "seq", "name", "bucket", "size_bytes", "enqueue_ms", "start_ms",
           "end_ms")


def pack(records: Sequence[OpRecord]) -> dict[str, list[Any]]:
    """Column lists: what crosses the network in the end-of-run gather."""
    return {name: [getattr(r, name) for r in records] for name in _FIELDS}


def unpack(packed: Mapping[str, Sequence[Any]] | None) -> list[OpRecord]:
    if not packed:
        return []
    columns = [packed.get(name, []) for name in _FIELDS]
    return [OpRecord(*values) for values in zip(*columns, strict=True)]


@dataclass
class OpAnalysis:
    """One collective across ranks."""

    key: tuple[str, int, int]
    name: str
    bucket: int
    size_bytes: int
    durations_ms: list[float]
    collective_ms: float
    last_rank: int
    wait_ms: list[float]
    records: list[OpRecord]  # per rank, in rank order


@dataclass
class StepComm:
    """One step's collectives across ranks."""

    phase: str
    step: int
    collective_ms: float = 0.0  # gradient collectives only (not the control all-reduce)
    comm_bytes: int = 0
    bus_bytes: float = 0.0
    wait_ms: list[float] = field(default_factory=list)  # per rank, every collective
    caused_wait_ms: list[float] = field(default_factory=list)  # per rank: others' wait for it

    def algbw_gbps(self) -> float | None:
        return _gbps(self.comm_bytes, self.collective_ms)

    def busbw_gbps(self) -> float | None:
        return _gbps(self.bus_bytes, self.collective_ms)

    @property
    def waited_for_rank(self) -> int | None:
        """The rank the others waited for longest in this step (None: nobody waited)."""
        if not self.caused_wait_ms or max(self.caused_wait_ms) <= 0:
            return None
        return max(range(len(self.caused_wait_ms)), key=lambda r: self.caused_wait_ms[r])


@dataclass
class Analysis:
    ok: bool
    reason: str | None = None
    world_size: int = 0
    ops: list[OpAnalysis] = field(default_factory=list)
    steps: dict[tuple[str, int], StepComm] = field(default_factory=dict)
    offsets_ms: list[float] = field(default_factory=list)
    end_residual_ms: list[float] = field(default_factory=list)

    def step(self, phase: str, step: int) -> StepComm | None:
        return self.steps.get((phase, step))


def _gbps(size_bytes: float, time_ms: float) -> float | None:
    if time_ms <= 0 or size_bytes <= 0:
        return None
    return size_bytes / (time_ms * 1e-3) / 1e9


def analyze(per_rank: Sequence[Sequence[OpRecord]], world_size: int) -> Analysis:
    """Pairs every rank's records by (phase, step, seq) and derives collective time and waits.

    Records must name the same collectives on every rank (they do: every rank runs the same
    steps and buckets); otherwise the analysis is refused with a reason rather than guessed.
    """
    if len(per_rank) != world_size or world_size < 1:
        return Analysis(False, f"records from {len(per_rank)} of {world_size} ranks")
    by_key = [{r.key: r for r in records} for records in per_rank]
    keys = sorted(by_key[0])
    if not keys:
        return Analysis(False, "no collectives were timed", world_size)
    for rank, mapping in enumerate(by_key[1:], start=1):
        if set(mapping) != set(keys):
            return Analysis(
                False,
                f"rank {rank} recorded {len(mapping)} collectives, rank 0 {len(keys)}: "
                "the ranks ran different steps",
                world_size,
            )
    analysis = Analysis(True, None, world_size)
    for key in keys:
        records = [mapping[key] for mapping in by_key]
        first = records[0]
        durations = [max(0.0, r.duration_ms) for r in records]
        shortest = min(durations)
        last = durations.index(shortest)
        waits = [d - shortest for d in durations]
        op = OpAnalysis(key, first.name, first.bucket, first.size_bytes, durations, shortest,
                        last, waits, records)
        analysis.ops.append(op)
        step = analysis.steps.setdefault(
            (first.phase, first.step),
            StepComm(first.phase, first.step, wait_ms=[0.0] * world_size,
                     caused_wait_ms=[0.0] * world_size),
        )
        for rank, wait in enumerate(waits):
            step.wait_ms[rank] += wait
        step.caused_wait_ms[last] += sum(waits)
        if first.name != CONTROL:
            step.collective_ms += shortest
            step.comm_bytes += first.size_bytes
            step.bus_bytes += first.size_bytes * busbw_factor(first.name, world_size)
    _align_clocks(analysis)
    return analysis


def _align_clocks(analysis: Analysis) -> None:
    """Offsets that put every rank's run timeline on rank 0's, from the collectives' ends."""
    n = analysis.world_size
    offsets = [0.0] * n
    for rank in range(1, n):
        diffs = [op.records[rank].end_ms - op.records[0].end_ms for op in analysis.ops]
        offsets[rank] = percentile(diffs, 50) or 0.0
    analysis.offsets_ms = offsets
    residuals = []
    for op in analysis.ops:
        ends = [op.records[r].end_ms - offsets[r] for r in range(n)]
        residuals.append(max(ends) - min(ends))
    analysis.end_residual_ms = residuals


def wait_intervals(
    analysis: Analysis, rank: int, phase: str, step: int
) -> list[tuple[float, float]]:
    """Where on `rank`'s run timeline its collectives of one step were waiting: the first
    wait_ms of each collective's interval."""
    out = []
    for op in analysis.ops:
        if op.key[0] == phase and op.key[1] == step and op.wait_ms[rank] > 0:
            start = op.records[rank].start_ms
            out.append((start, start + op.wait_ms[rank]))
    return out


def timeline_lines(analysis: Analysis) -> Iterable[dict[str, Any]]:
    """One JSON object per collective for collectives.jsonl: every rank's enqueue, start and
    end on rank 0's clock (see _align_clocks), its duration and its wait."""
    offsets = analysis.offsets_ms

    def aligned(values: Iterable[float | None]) -> list[float | None]:
        return [None if v is None else round(v - o, 4)
                for v, o in zip(values, offsets, strict=True)]

    for op in analysis.ops:
        phase, step, seq = op.key
        yield {
            "phase": phase,
            "step": step,
            "seq": seq,
            "op": op.name,
            "bucket": op.bucket,
            "bytes": op.size_bytes,
            "collective_ms": round(op.collective_ms, 4),
            "last_rank": op.last_rank,
            "enqueue_ms": aligned(r.enqueue_ms for r in op.records),
            "start_ms": aligned(r.start_ms for r in op.records),
            "end_ms": aligned(r.end_ms for r in op.records),
            "duration_ms": [round(d, 4) for d in op.durations_ms],
            "wait_ms": [round(w, 4) for w in op.wait_ms],
        }
