"""A sweep's rank pools (`fab sweep`, unless --no-pool): which points share a process, and how
one launch tells the train package to run them all (pure: no torch, no network).

NCCL reads its thread count once per process, and every --axis variable is process
environment, so the restart key of a point is its threads and axis values
(tasks/lib/design.py): consecutive runs of one round with the same key run in one launch, one
after another on a new communicator each (train.pool). Each point writes <T>thread_<C>channels/
inside the launch's own output directory (pool.layout=children): the launch collects that
directory from every node, so the points come home with it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tasks.lib.runspec import output_dir_name
from tasks.lib.design import pool_batches
from tasks.lib.sweep import SweepError, point_of


def pool_groups(points: Sequence[Mapping[str, Any]], indexes: Sequence[int]) -> list[list[int]]:
    """The pending runs (indexes, in the order they run) cut into pools: consecutive runs of one
    round with the same restart key (threads, axis values) and distinct channels."""
    return pool_batches([(i, int(points[i].get("repeat") or 0), point_of(points[i])) for i in indexes])


def pool_overrides(points: Sequence[Mapping[str, Any]], group: Sequence[int]) -> list[str]:
    """The train overrides that make one launch run every point of `group`: its channel values,
    the sibling layout, its thread value (the directories' names) and each point's own
    overrides (`fab sweep --point-override`) as pool.point_overrides."""
    channels = [int(points[i]["channels"]) for i in group]
    threads = {int(points[i]["threads"]) for i in group}
    if len(threads) != 1:
        raise SweepError(f"a pool runs one thread value; got {sorted(threads)}")
    if len({tuple(sorted((points[i].get("settings") or {}).items())) for i in group}) != 1:
        raise SweepError("a pool runs one value of every --axis variable (they are process environment)")
    extra = []
    for index in group:
        for pair in points[index].get("overrides") or []:
            if ";" in pair:
                raise SweepError(f"--point-override {pair!r}: a value with ';' cannot travel in "
                                 "pool.point_overrides; run this sweep with --no-pool")
            extra.append(f"{points[index]['channels']}:{pair}")
    overrides = [f"pool.channels={','.join(map(str, channels))}", "pool.layout=children",
                 f"pool.threads={threads.pop()}"]
    if extra:
        overrides.append(f"pool.point_overrides={';'.join(extra)}")
    return overrides


def point_output_dir(point: Mapping[str, Any], leader: Mapping[str, Any]) -> str:
    """The point's directory relative to the pool's run directory (what sweep.json records):
    <leader's T>thread_<C>channels/<T>thread_<C>channels."""
    launch = output_dir_name(int(leader["channels"]), int(leader["threads"]))
    return f"{launch}/{output_dir_name(int(point['channels']), int(point['threads']))}"


def base_overrides(spec_overrides: Sequence[str], point_extra: Sequence[str]) -> tuple[str, ...]:
    """A point's resolved overrides without its own --point-override tail (the pool carries
    those per point instead)."""
    tail = len(point_extra)
    if tail and tuple(spec_overrides[-tail:]) != tuple(point_extra):
        raise SweepError("internal: a point's overrides do not end with its --point-override values")
    return tuple(spec_overrides[:len(spec_overrides) - tail]) if tail else tuple(spec_overrides)


def pool_point_record(summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """sweep.json's timing fields of an in-process point, from its summary's pool section."""
    pool = (summary or {}).get("pool") if isinstance(summary, Mapping) else None
    if not isinstance(pool, Mapping):
        return {"mode": "pool"}
    return {"mode": "pool", "gap_before_s": pool.get("gap_s"), "pool_new_group_s": pool.get("new_group_s"),
            "pool_destroy_s": pool.get("destroy_s"), "pool_leak_free": pool.get("leak_free")}
