"""Response surfaces with a known optimum and noise, the full grid's decision over them, and
`fab tune`'s search replayed on them: shared by tests/unit/test_tune_search.py and
scripts/bench_tune_search.py (which prints the success rate over many seeds).

A table holds REPEAT recorded runs of every point, as a sweep with --repeat 3 would have them;
the search replays it (the k-th run it asks of a point is the point's k-th recorded run), so the
tune and the grid are judged on the same measurements.
"""
from __future__ import annotations

import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

from tasks.lib import report as rep
from tasks.sweeping.search import Point, Search

SIZES = (6, 4, 2)
REPEAT = 3                      # the full grid's runs per point: 6 x 4 x 2 x 3 = 144 runs
GRID_RUNS = SIZES[0] * SIZES[1] * SIZES[2] * REPEAT
BOUND = 0.40 * GRID_RUNS        # 57.6

Table = dict[Point, list[list[tuple[int, float]]]]
Surface = Callable[[Point], float]


def make_table(surface: Surface, *, seed: int, run_noise: float = 0.01, step_noise: float = 0.02,
               steps: int = 20, ranks: int = 2, sizes: tuple[int, ...] = SIZES) -> Table:
    """REPEAT recorded runs of every point: a run-level offset (relative sd `run_noise`), then
    per-step noise shared by the step's ranks (relative sd `step_noise`), then a little per rank."""
    rng = random.Random(seed)
    table = {}
    for point in itertools.product(*(range(n) for n in sizes)):
        mean = surface(point)
        runs = []
        for _ in range(REPEAT):
            level = mean * (1.0 + rng.gauss(0.0, run_noise))
            run = []
            for step in range(steps):
                value = level * (1.0 + rng.gauss(0.0, step_noise))
                run += [(step, value * (1.0 + rng.gauss(0.0, 0.002))) for _ in range(ranks)]
            runs.append(run)
        table[point] = runs
    return table


def label(point: Point) -> str:
    return " ".join(str(v) for v in point)


def grid_decision(table: Table, name: Callable[[Point], str] = label,
                  seed_name: Callable[[Point], str] | None = None) -> rep.Decision:
    """The full grid's decision: every point, every recorded run (the report's rule; `name` and
    `seed_name` as the report names a point and seeds its interval)."""
    seed_name = seed_name or name
    return rep.decide([rep.Candidate(name(p), rep.bootstrap_interval(runs, label=seed_name(p)), secondary=p)
                       for p, runs in table.items()])


def tune(table: Table, sizes: tuple[int, ...] = SIZES, **options) -> Search:
    """The search, replaying the table."""
    search = Search(sizes, labels=[[str(i) for i in range(n)] for n in sizes], **options)
    while batch := search.next_batch():
        for point in batch:
            search.observe(point, table[point][len(search.runs.get(point, []))])
    return search


# Neighbours of the optimum differ by at least 6 %: a difference the full grid at 3 runs per point
# resolves under this noise (1 % run-to-run, 2 % step-to-step), so "the grid's best" is known.
SURFACES: dict[str, tuple[Surface, Point | None]] = {
    # A separable bowl, optimum inside the grid.
    "bowl": (lambda p: 100 + 6 * (p[0] - 4) ** 2 + 6 * abs(p[1] - 1) + 8 * p[2], (4, 1, 0)),
    # An interaction between channels and threads (positive definite: one optimum).
    "interaction": (lambda p: 100 + 6 * (p[0] - 1) ** 2 + 8 * (p[1] - 2) ** 2 + 4 * (p[0] - 1) * (p[1] - 2)
                    + 8 * (1 - p[2]), (1, 2, 1)),
    # The optimum in a corner, far from the middle where the search starts.
    "corner": (lambda p: 100 + 6 * p[0] + 6 * (3 - p[1]) + 8 * p[2], (0, 3, 0)),
    # Nothing matters beyond the noise: the grid names no winner; the tune must not either.
    "flat": (lambda p: 100 + 0.05 * p[0], None),
}


def random_surface(seed: int, sizes: tuple[int, ...] = SIZES, *, gap: float = 0.03) -> tuple[Surface, Point]:
    """A unimodal surface with its optimum at a random grid point: per axis a random weight
    (at least `gap` of the optimum's time per step away from it) and power (1: a V, 2: a bowl),
    plus a random channels x threads interaction small enough to keep one optimum."""
    rng = random.Random(10_000 + seed)
    optimum = tuple(rng.randrange(n) for n in sizes)
    weights = [100 * rng.uniform(gap, 3 * gap) for _ in sizes]
    powers = [rng.choice((1, 2)) for _ in sizes]
    twist = rng.uniform(-0.4, 0.4) * min(weights[0], weights[1])

    def surface(p: Point) -> float:
        d = [p[i] - optimum[i] for i in range(len(sizes))]
        value = 100 + sum(w * abs(x) ** k for w, x, k in zip(weights, d, powers))
        # |d0 d1| / (|d0| + |d1|) <= min(|d0|, |d1|): the twist never outweighs the separable part.
        return value + twist * d[0] * d[1] / max(1, abs(d[0]) + abs(d[1]))

    return surface, optimum


@dataclass
class Outcome:
    """One search against the full grid on one table."""

    runs: int
    grid: rep.Decision
    found: rep.Decision

    @property
    def success(self) -> bool:
        """The tune reaches the grid's conclusion: the same status (a winner, or none), the same
        winner where there is one, and otherwise a leader inside the grid's within-noise set."""
        if self.found.status != self.grid.status:
            return False
        if self.grid.winner is not None:
            return self.found.winner == self.grid.winner
        return self.found.leader in self.grid.within_noise

    @property
    def within_bound(self) -> bool:
        return self.runs <= BOUND


def outcome(table: Table, sizes: tuple[int, ...] = SIZES) -> Outcome:
    search = tune(table, sizes)
    return Outcome(search.runs_done, grid_decision(table), search.decide())
