"""The noise of a point's iteration time: a bootstrap confidence interval over its runs and steps.

A point's sample is a set of runs (repeats, each its own launch), each a set of measured steps,
each step one iteration time per rank. Steps are the independent unit inside a run (ranks wait
for one another within a step, so their values move together) and runs are the unit above it
(a restart redraws NCCL's set-up, placement, clocks). The interval resamples both levels, the
two-stage bootstrap for nested data (Davison & Hinkley 1997, sec. 3.8): draw the runs with
replacement, then, in each drawn run, its steps with replacement, every drawn step bringing all
its ranks' values; the statistic is the median of the pooled values, the same statistic as a
run's `iter_ms` median in summary.json. Resampling both levels errs on the wide side, which is
the side a "do not crown a winner on noise" rule wants to err on.

With one run the interval covers only step-to-step noise: the run-to-run part is unknown, and
the decision (tasks/lib/report/decide.py) does not rest on such an interval alone.

numpy is imported inside the function (it is there with matplotlib; `fab --list` does not pay).
"""
from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tasks.lib.report.values import quantile

LEVEL = 0.95
RESAMPLES = 2000
SEED = 20240
_CHUNK = 250   # replicates computed at once (bounds the weight matrix's memory)

# One run's sample: (step, iteration time) pairs, one per rank and step.
RunSample = Sequence[tuple[int, float]]


@dataclass(frozen=True)
class Interval:
    """A point's iteration time: the median over every run's steps and ranks, its bootstrap
    confidence interval, and the runs' own medians (their spread is the run-to-run noise)."""

    estimate: float
    low: float
    high: float
    runs: int
    steps: int
    run_medians: tuple[float, ...]
    level: float = LEVEL

    @property
    def run_spread(self) -> float | None:
        """(slowest run's median - fastest run's) / the estimate; None with one run."""
        if len(self.run_medians) < 2 or not self.estimate:
            return None
        return (max(self.run_medians) - min(self.run_medians)) / self.estimate

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0

    def overlaps(self, other: Interval) -> bool:
        return self.low <= other.high and other.low <= self.high


def run_sample(steps_by_rank: Mapping[int, Sequence[Mapping[str, object]]],
               key: str = "iter_ms") -> list[tuple[int, float]]:
    """A run's (step, value) pairs from its metrics lines (every rank's measured steps)."""
    pairs = []
    for lines in steps_by_rank.values():
        for line in lines:
            step, value = line.get("step"), line.get(key)
            if isinstance(step, int) and not isinstance(step, bool) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and math.isfinite(value):
                pairs.append((step, float(value)))
    return pairs


def seed_for(label: str, seed: int = SEED) -> int:
    """A point's own seed: its interval does not depend on which other points are reported."""
    return (seed * 1_000_003 + zlib.crc32(label.encode())) % (2 ** 32)


def bootstrap_interval(runs: Sequence[RunSample], *, label: str = "", level: float = LEVEL,
                       resamples: int = RESAMPLES, seed: int = SEED) -> Interval | None:
    """The interval of the pooled median over `runs` (empty runs are dropped); None without a
    value. Deterministic for a given label, seed and data."""
    import numpy as np

    prepared = []
    for run in runs:
        if not run:
            continue
        steps = sorted({step for step, _ in run})
        position = {step: i for i, step in enumerate(steps)}
        prepared.append((np.array([v for _, v in run], dtype=float),
                         np.array([position[s] for s, _ in run], dtype=np.int64), len(steps)))
    if not prepared:
        return None
    values = np.concatenate([v for v, _, _ in prepared])
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    run_medians = tuple(float(quantile(v.tolist(), 50)) for v, _, _ in prepared)  # type: ignore[arg-type]
    estimate = float(quantile(values.tolist(), 50))  # type: ignore[arg-type]
    total_steps = sum(n for _, _, n in prepared)
    rng = np.random.default_rng(seed_for(label, seed))
    count = len(prepared)
    replicates = []
    for start in range(0, resamples, _CHUNK):
        size = min(_CHUNK, resamples - start)
        # How often each run is drawn, then each drawn copy's steps: a run drawn m times
        # contributes m independent resamplings of its steps (a multinomial of m * steps).
        multiplicity = rng.multinomial(count, [1.0 / count] * count, size=size)
        weights = []
        for index, (_, step_of, steps) in enumerate(prepared):
            per_step = rng.multinomial(multiplicity[:, index] * steps, [1.0 / steps] * steps)
            weights.append(per_step[:, step_of])
        weight = np.concatenate(weights, axis=1)[:, order]
        cumulative = np.cumsum(weight, axis=1)
        half = cumulative[:, -1] / 2.0
        replicates.append(ordered[np.argmax(cumulative >= half[:, None], axis=1)])
    spread = np.concatenate(replicates)
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(spread, [tail, 100.0 - tail])
    return Interval(estimate=estimate, low=float(min(low, estimate)), high=float(max(high, estimate)),
                    runs=count, steps=total_steps, run_medians=run_medians, level=level)
