"""`fab tune`'s search: the best point of a grid in far fewer runs than the grid, by coordinate
descent over the ordered axes with successive halving of repeats on the survivors, the objective
being the iteration time under real overlap (not busbw alone).

One *line* varies one axis with every other axis held at the incumbent's values. Its points get
one run each; the slower half (and anything slower beyond the noise) is dropped; the survivors
get a second run, then a third (`max_runs`), halving again in between: the runs go where the
answer is still open (Jamieson & Talwalkar 2016, successive halving; the collective-tuning
literature's coordinate search over NCCL parameters, here with overlap in the loop). The
incumbent is never dropped from its own line, so the line's leader is compared with it on equal
runs; the leader becomes the incumbent, but only a move ahead beyond the noise (the report's
rule) asks for another pass: on a flat surface the search does not wander. Passes over the axes
repeat until one makes no such move; then every point still within noise of the leader
and every neighbour of the leader (one step on one axis: the likeliest ties) get their runs up to
`max_runs`, so the final decision rests on as many runs as the grid's would.
Every run is kept: a point met again on a later line starts from its runs so far.

Pure: the search asks for runs (`next_batch`) and is told what they measured (`observe`); who
runs them (the sim cluster, a GPU cluster, a recorded table in the tests) is not its business.
Decisions use tasks/lib/report/decide.py, the report's own rule, and, given the report's names for
the points (`point_name`, `seed_name`), the same intervals: the search's last decision is the one
`fab report` writes for the same runs.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tasks.lib.report.decide import Candidate, Decision, decide
from tasks.lib.report.stats import Interval, RunSample, bootstrap_interval

Point = tuple[int, ...]   # one index per axis


@dataclass
class Line:
    """One coordinate line being searched: its axis and its surviving points."""

    axis: int
    survivors: list[Point]
    runs_each: int = 1
    asked: bool = False   # this round asked for runs (a round of points already measured is not printed)


class Search:
    """Coordinate descent with successive halving; see the module docstring."""

    def __init__(self, sizes: Sequence[int], *, max_runs: int = 3, start: Point | None = None,
                 labels: Sequence[Sequence[str]] | None = None, names: Sequence[str] | None = None,
                 min_margin: float = 0.01, point_name: Callable[[Point], str] | None = None,
                 seed_name: Callable[[Point], str] | None = None):
        if any(n < 1 for n in sizes):
            raise ValueError("every axis needs at least one value")
        self.sizes = tuple(sizes)
        self.max_runs = max_runs
        self.min_margin = min_margin
        self.labels = labels or [[str(i) for i in range(n)] for n in sizes]
        # How the report names a point (its decision's keys) and seeds its interval (fab tune
        # passes the report's own: the search's decision over the runs is the report's).
        self._point_name = point_name
        self._seed_name = seed_name or self.label
        self.names = list(names) if names else [f"axis {i + 1}" for i in range(len(sizes))]
        # Start in the middle of every axis (ordered axes: the middle value is the least wrong guess).
        self.incumbent: Point = start if start is not None else tuple((n - 1) // 2 for n in sizes)
        self.runs: dict[Point, list[RunSample]] = {}
        self.failed: set[Point] = set()   # a run did not complete: never run again, never chosen
        self._intervals: dict[tuple[Point, int], Interval | None] = {}
        self.pass_number = 1
        self.changed_in_pass = False
        self.axis = 0
        self.line: Line | None = None
        self.done = False
        self.confirming = False
        self.messages: list[str] = []

    # -- what to run ------------------------------------------------------------------------

    def next_batch(self) -> list[Point]:
        """The runs to do next (a point listed twice needs two more runs); [] when finished."""
        while not self.done:
            if self.confirming:
                return self._confirm()
            if self.line is None:
                self._start_line()
                if self.line is None:
                    continue
            line = self.line
            missing = [p for p in line.survivors if p not in self.failed
                       for _ in range(line.runs_each - len(self.runs.get(p, [])))]
            if missing:
                line.asked = True
                return missing
            self._finish_round()
        return []

    def observe(self, point: Point, sample: RunSample) -> None:
        """One run's measured (step, iteration time) pairs for `point`."""
        self.runs.setdefault(point, []).append(sample)

    def fail(self, point: Point) -> None:
        """A run of `point` did not complete: the point is out of the search (as the report
        never chooses a point whose runs did not all complete)."""
        if point not in self.failed:
            self.failed.add(point)
            self.messages.append(f"{self.label(point)}: a run did not complete; out of the search")

    @property
    def runs_done(self) -> int:
        return sum(len(v) for v in self.runs.values())

    # -- the line ---------------------------------------------------------------------------

    def _start_line(self) -> None:
        if self.sizes[self.axis] == 1:
            self._next_axis()
            return
        points = [self.incumbent[:self.axis] + (value,) + self.incumbent[self.axis + 1:]
                  for value in range(self.sizes[self.axis])]
        self.line = Line(self.axis, points)

    def _finish_round(self) -> None:
        line = self.line
        assert line is not None
        line.survivors = [p for p in line.survivors if p not in self.failed]
        if not line.survivors:
            self._next_axis()
            return
        decision = self.decide(line.survivors)
        ranked = [p for p in sorted(line.survivors, key=lambda p: self.estimate(p))]
        keep = ranked[:max(1, math.ceil(len(ranked) / 2))]
        # Slower beyond the noise: out now, whatever its rank; the incumbent stays to be compared.
        keep = [p for p in keep if self.label(p) in decision.within_noise or p == ranked[0]] or ranked[:1]
        if self.incumbent in line.survivors and self.incumbent not in keep:
            keep.append(self.incumbent)
        if line.asked:
            self._round_message(line, ranked, keep)
        line.asked = False
        if line.runs_each < self.max_runs:
            line.survivors, line.runs_each = keep, line.runs_each + 1
            return
        best = ranked[0]
        if best != self.incumbent:
            # The leader is followed either way; only a move beyond the noise earns another pass.
            beyond = self.label(self.incumbent) not in decision.within_noise
            self.changed_in_pass = self.changed_in_pass or beyond
            self.messages.append(f"pass {self.pass_number}: {self.axis_name(line.axis)} moves to "
                                 f"{self.value_name(line.axis, best)}"
                                 + ("" if beyond else " (not ahead beyond the noise: no new pass for it)"))
            self.incumbent = best
        self._next_axis()

    def _round_message(self, line: Line, ranked: list[Point], keep: list[Point]) -> None:
        self.messages.append(
            f"pass {self.pass_number}, {self.axis_name(line.axis)} line at {self.context(line.axis)}: "
            f"{len(line.survivors)} point(s) with {line.runs_each} run(s) each; leader "
            f"{self.value_name(line.axis, ranked[0])} ({self.estimate(ranked[0]):.3f} ms); keeping "
            + ", ".join(self.value_name(line.axis, p) for p in keep))

    def _next_axis(self) -> None:
        self.line = None
        self.axis += 1
        if self.axis < len(self.sizes):
            return
        if not self.changed_in_pass or all(n == 1 for n in self.sizes):
            self.confirming = True
            return
        self.axis, self.pass_number, self.changed_in_pass = 0, self.pass_number + 1, False

    def _confirm(self) -> list[Point]:
        """Runs up to max_runs for every point within noise of the leader; done when none lacks any."""
        decision = self.decide()
        named = {self.label(p): p for p in self.runs}
        if decision.leader not in named:
            self.done = True
            self.messages.append(f"final: {decision.status}: no point completed its runs ({decision.reason})")
            return []
        # The leader's neighbours on every ordered axis too: the likeliest ties, and a point
        # dropped early on one unlucky run must not leave the leader a winner it is not.
        leader = named[decision.leader]
        confirm = [p for p in dict.fromkeys([named[key] for key in decision.within_noise] + self.neighbours(leader))
                   if p not in self.failed]
        missing = [p for p in confirm for _ in range(self.max_runs - len(self.runs.get(p, [])))]
        if not missing:
            self.done = True
            self.messages.append(f"final: {decision.status}: leader {decision.leader} after {self.runs_done} runs")
        else:
            self.messages.append(f"confirming: {len(set(missing))} point(s) within noise of or next to "
                                 f"{decision.leader} get runs up to {self.max_runs}")
        return missing

    def neighbours(self, point: Point) -> list[Point]:
        """The points one step away from `point` on one axis."""
        return [point[:axis] + (value,) + point[axis + 1:] for axis in range(len(self.sizes))
                for value in (point[axis] - 1, point[axis] + 1) if 0 <= value < self.sizes[axis]]

    # -- deciding ----------------------------------------------------------------------------

    def interval(self, point: Point) -> Interval | None:
        runs = self.runs.get(point, [])
        key = (point, len(runs))
        if key not in self._intervals:
            self._intervals[key] = bootstrap_interval(runs, label=self._seed_name(point))
        return self._intervals[key]

    def estimate(self, point: Point) -> float:
        interval = self.interval(point)
        return interval.estimate if interval is not None else math.inf

    def decide(self, points: Sequence[Point] | None = None) -> Decision:
        """The report's rule over `points` (default: every point measured)."""
        chosen = list(points) if points is not None else (
            [p for p in self.runs if self.runs[p] and p not in self.failed] + sorted(self.failed))
        return decide([Candidate(self.label(p), self.interval(p), secondary=p,
                                 why_not="a run did not complete" if p in self.failed else None)
                       for p in chosen],
                      min_margin=self.min_margin)

    # -- names --------------------------------------------------------------------------------

    def label(self, point: Point) -> str:
        if self._point_name is not None:
            return self._point_name(point)
        return " ".join(self.labels[axis][value] for axis, value in enumerate(point))

    def axis_name(self, axis: int) -> str:
        return self.names[axis]

    def value_name(self, axis: int, point: Point) -> str:
        return self.labels[axis][point[axis]]

    def context(self, axis: int) -> str:
        others = [self.labels[a][v] for a, v in enumerate(self.incumbent) if a != axis]
        return " ".join(others) or "-"
