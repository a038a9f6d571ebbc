"""A sweep as an experiment design: its points (channels × threads × every --axis), how many runs
each gets (--repeat), the order they run in, and which points may share a rank pool.

Order. With repeats, runs go in rounds, every point once per round (A B C A B C ...), each round
shuffled with a recorded seed (random.Random(seed)): a drift over the sweep's minutes (clocks,
temperature, a neighbour's job) then falls on every point alike instead of on whichever ran
last, and the order can be replayed. A point never runs twice in a row (the boundary between
rounds is checked). Where rank pools share a launch, a round keeps each pool's points together
(the pools' order and the order inside each pool are shuffled). With one run per point the grid
order is kept (channels-major; pools threads-major), as before repeats existed.

Pools. A launch keeps its ranks across points only where the knobs that change between them are
per-communicator: channels are (min/max CTAs through ProcessGroupNCCL options); threads are not
(NCCL reads NCCL_NTHREADS once per process) and neither is any --axis variable (NCCL reads
NCCL_PROTO/NCCL_ALGO in its tuning at communicator set-up, but as process environment: a pool's
points share one environment). So the restart key of a point is its threads and axis values.

Pure: no files, no network.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from tasks.lib.knobs import Axis


@dataclass(frozen=True)
class GridPoint:
    """One point of the grid: channels, threads, and the value of each --axis variable."""

    channels: int
    threads: int
    settings: tuple[tuple[str, str], ...] = ()

    @property
    def label(self) -> str:
        return " ".join([f"{self.channels}ch × {self.threads}th", *(f"{k}={v}" for k, v in self.settings)])

    @property
    def env(self) -> list[str]:
        """The point's --axis values as --env items."""
        return [f"{name}={value}" for name, value in self.settings]


def grid_points(channels: Sequence[int], threads: Sequence[int], axes: Sequence[Axis] = ()) -> list[GridPoint]:
    """Channels-major, like the original shell loop (for c in channels; for t in threads), then
    each axis in the order given."""
    points = [GridPoint(c, t) for c in channels for t in threads]
    for axis in axes:
        points = [GridPoint(p.channels, p.threads, (*p.settings, (axis.name, value)))
                  for p in points for value in axis.values]
    return points


# Per-communicator knobs: a pool keeps its ranks across points that differ only in these.
PER_COMMUNICATOR = ("channels",)


def restart_key(point: GridPoint) -> tuple[Hashable, ...]:
    """What forces a new launch between two points: threads and every --axis value."""
    return (point.threads, point.settings)


def restart_reason(axes: Sequence[Axis], threads: Sequence[int]) -> str:
    """Which axes force a restart, in words (printed when pools are planned)."""
    forcing = (["threads (NCCL reads NCCL_NTHREADS once per process)"] if len(threads) > 1 else []) + [
        f"{axis.name} (process environment: one value per launch)" for axis in axes if len(axis.values) > 1]
    return "; ".join(forcing) if forcing else "nothing: every point shares one launch"


@dataclass(frozen=True)
class Run:
    """One run of the design: which point (its index in the grid) and which repeat."""

    config: int
    repeat: int


def run_order(points: Sequence[GridPoint], repeat: int, seed: int,
              key: Callable[[GridPoint], Hashable] | None = restart_key) -> list[Run]:
    """Every run, in the order they go (see the module docstring). `key`: the pool's restart key
    (None: no pools, every run on its own)."""
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    indexes = list(range(len(points)))
    if key is not None:
        # Threads-major (the pool order): stable on the grid order inside each key.
        groups: dict[Hashable, list[int]] = {}
        for index in indexes:
            groups.setdefault(key(points[index]), []).append(index)
        keys = sorted(groups, key=_sortable)
    rng = random.Random(seed)
    order: list[Run] = []
    for round_ in range(repeat):
        if key is None:
            sequence = indexes[:]
            if repeat > 1:
                rng.shuffle(sequence)
        else:
            round_keys = keys[:]
            members = {k: groups[k][:] for k in keys}
            if repeat > 1:
                rng.shuffle(round_keys)
                for k in round_keys:
                    rng.shuffle(members[k])
            sequence = [i for k in round_keys for i in members[k]]
        if order:
            sequence = _not_back_to_back(order[-1].config, sequence, points, key)
        order += [Run(index, round_) for index in sequence]
    return order


def _not_back_to_back(previous: int, sequence: list[int], points: Sequence[GridPoint],
                      key: Callable[[GridPoint], Hashable] | None) -> list[int]:
    """The round's sequence with its first run not the point that ended the previous round."""
    if len(sequence) < 2 or sequence[0] != previous:
        return sequence
    if key is None:
        return [sequence[1], sequence[0], *sequence[2:]]
    first = key(points[sequence[0]])
    block = [i for i in sequence if key(points[i]) == first]
    rest = [i for i in sequence if key(points[i]) != first]
    if len(block) > 1:
        # Same pool first again: start it with another of its points.
        return [block[1], block[0], *block[2:], *rest]
    # A pool of one point: move the next pool in front of it.
    second = key(points[rest[0]])
    following = [i for i in rest if key(points[i]) == second]
    return [*following, *block, *(i for i in rest if key(points[i]) != second)]


def _sortable(value: Hashable) -> tuple[str, str]:
    # Keys mix ints and tuples of strings: sort them as text of a fixed shape, threads first.
    threads, settings = value if isinstance(value, tuple) and len(value) == 2 else (value, ())
    return (f"{threads:>12}" if isinstance(threads, int) else str(threads), repr(settings))


def pool_batches(order: Sequence[tuple[int, int, GridPoint]],
                 key: Callable[[GridPoint], Hashable] = restart_key) -> list[list[int]]:
    """The runs (`order`: (run index, round, point) in run order) cut into pools: consecutive runs
    of one round with the same restart key and distinct channels share a launch."""
    batches: list[list[int]] = []
    current: list[int] = []
    current_key: tuple[Hashable, ...] | None = None
    channels: set[int] = set()
    for index, round_, point in order:
        this = (round_, key(point))
        if current and (this != current_key or point.channels in channels):
            batches.append(current)
            current, channels = [], set()
        current.append(index)
        channels.add(point.channels)
        current_key = this
    if current:
        batches.append(current)
    return batches
