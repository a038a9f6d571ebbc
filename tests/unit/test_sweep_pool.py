"""fab sweep --pool's pure parts: which points share a process and what the launch is told."""
from __future__ import annotations

import pytest

from tasks.lib import pool as pool_lib
from tasks.lib.design import run_order
from tasks.lib.sweep import SweepError, grid_points
from train.config import build_config


def points(channels: list[int], threads: list[int]) -> list[dict]:
    return [{"index": i, "channels": p.channels, "threads": p.threads, "overrides": []}
            for i, p in enumerate(grid_points(channels, threads))]


def test_pools_cut_the_runs_in_order_and_keep_only_pending() -> None:
    grid = points([28, 42, 56], [512, 256])   # channels-major: 28x512, 28x256, 42x512, ...
    order = [run.config for run in run_order(grid_points([28, 42, 56], [512, 256]), 1, 0)]
    assert order == [1, 3, 5, 0, 2, 4]        # threads-major: the pool order
    assert pool_lib.pool_groups(grid, order) == [[1, 3, 5], [0, 2, 4]]
    assert pool_lib.pool_groups(grid, [3, 0, 4]) == [[3], [0, 4]]   # a resume: what is left


def test_a_pool_never_spans_two_rounds_nor_repeats_a_channel_value() -> None:
    grid = points([28, 42], [256])
    for index, point in enumerate(grid):
        point["repeat"] = 0
    second = [dict(p, index=p["index"] + 2, repeat=1) for p in grid]
    runs = grid + second
    assert pool_lib.pool_groups(runs, [1, 0, 2, 3]) == [[1, 0], [2, 3]]
    runs[2]["repeat"] = 0   # the same channel value twice: two launches
    assert pool_lib.pool_groups(runs, [0, 2]) == [[0], [2]]


def test_overrides_validate_with_the_train_loader() -> None:
    grid = points([28, 42], [256])
    grid[1]["overrides"] = ["model.layers=2"]
    overrides = pool_lib.pool_overrides(grid, [0, 1])
    assert overrides == ["pool.channels=28,42", "pool.layout=children", "pool.threads=256",
                         "pool.point_overrides=42:model.layers=2"]
    config = build_config({}, overrides)
    assert (config.pool.channels, config.pool.layout, config.pool.threads) == ("28,42", "children", 256)


def test_a_pool_has_one_thread_value_and_no_semicolons() -> None:
    grid = points([28], [256, 512])
    with pytest.raises(SweepError, match="one thread value"):
        pool_lib.pool_overrides(grid, [0, 1])
    grid[0]["overrides"] = ["training.output_dir=a;b"]
    with pytest.raises(SweepError, match="';'"):
        pool_lib.pool_overrides(grid, [0])


def test_base_overrides_drop_the_points_own_tail() -> None:
    assert pool_lib.base_overrides(("a.b=1", "c.d=2"), ["c.d=2"]) == ("a.b=1",)
    assert pool_lib.base_overrides(("a.b=1",), []) == ("a.b=1",)
    with pytest.raises(SweepError):
        pool_lib.base_overrides(("a.b=1",), ["x.y=3"])


def test_point_record_from_the_pool_summary() -> None:
    summary = {"pool": {"gap_s": 0.4, "new_group_s": 0.01, "destroy_s": 0.5, "leak_free": True}}
    assert pool_lib.pool_point_record(summary) == {
        "mode": "pool", "gap_before_s": 0.4, "pool_new_group_s": 0.01, "pool_destroy_s": 0.5,
        "pool_leak_free": True}
    assert pool_lib.pool_point_record(None) == {"mode": "pool"}
    leader = {"channels": 28, "threads": 512}
    assert pool_lib.point_output_dir({"channels": 42, "threads": 512}, leader) == (
        "512thread_28channels/512thread_42channels")
