"""Interval arithmetic and bandwidth conventions used to turn timestamps into step metrics.

Pure Python (no torch): intervals are ``(start_ms, end_ms)`` pairs relative to the step start.
Bandwidth factors follow nccl-tests (doc/PERFORMANCE.md there): algbw = size / time and
busbw = algbw * factor, with size the total buffer size of the operation (the input of a
reduce_scatter, the output of an all_gather).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

Interval = tuple[float, float]


def merge(intervals: Iterable[Interval]) -> list[Interval]:
    """Sorted, disjoint union of intervals; empty and inverted intervals are dropped."""
    ordered = sorted((s, e) for s, e in intervals if e > s)
    merged: list[Interval] = []
    for start, end in ordered:
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def union_length(intervals: Iterable[Interval]) -> float:
    """Total time covered by at least one interval."""
    return sum(end - start for start, end in merge(intervals))


def intersection_length(a: Iterable[Interval], b: Iterable[Interval]) -> float:
    """Time covered by at least one interval of ``a`` and at least one of ``b``."""
    left, right = merge(a), merge(b)
    i = j = 0
    total = 0.0
    while i < len(left) and j < len(right):
        start = max(left[i][0], right[j][0])
        end = min(left[i][1], right[j][1])
        if end > start:
            total += end - start
        # Advance whichever interval ends first; the other may still overlap the next one.
        if left[i][1] < right[j][1]:
            i += 1
        else:
            j += 1
    return total


def busbw_factor(collective: str, world_size: int) -> float:
    """nccl-tests bus-bandwidth factor: all_reduce 2(n-1)/n; reduce_scatter, all_gather (n-1)/n."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    n = world_size
    if collective == "all_reduce":
        return 2.0 * (n - 1) / n
    if collective in ("reduce_scatter", "all_gather"):
        return (n - 1) / n
    if collective in ("broadcast", "reduce"):
        return 1.0
    raise ValueError(f"unknown collective {collective!r}")


def gbps(size_bytes: float, time_ms: float) -> float | None:
    """Bytes over milliseconds as GB/s (1e9 bytes, like nccl-tests); None without time."""
    if time_ms <= 0:
        return None
    return size_bytes / (time_ms * 1e-3) / 1e9


def tflops(flops: float, time_ms: float) -> float | None:
    if time_ms <= 0:
        return None
    return flops / (time_ms * 1e-3) / 1e12


def percentile(values: Sequence[float], q: float) -> float | None:
    """q-th percentile (0..100) by linear interpolation between order statistics
    (numpy's default method); None for no values."""
    data = sorted(v for v in values if v is not None)
    if not data:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    position = (len(data) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (position - low)
