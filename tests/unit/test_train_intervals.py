"""train.intervals and train.metrics on crafted intervals (pure, no torch)."""

from __future__ import annotations

import pytest

from train.intervals import (
    busbw_factor,
    gbps,
    intersection_length,
    merge,
    percentile,
    tflops,
    union_length,
)
from train.metrics import (
    CollectiveTiming,
    StepTimes,
    aggregate_ranks,
    collect_env,
    distribution,
    env_differences,
    step_metrics,
)


def test_merge_sorts_joins_touching_and_drops_empty() -> None:
    assert merge([(5, 6), (0, 2), (1, 3), (3, 4), (7, 7), (9, 8)]) == [(0, 4), (5, 6)]


def test_merge_keeps_containing_interval() -> None:
    assert merge([(0, 10), (2, 3), (4, 12)]) == [(0, 12)]


def test_union_length() -> None:
    assert union_length([]) == 0
    assert union_length([(0, 2), (1, 3), (10, 11)]) == pytest.approx(4)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([], [(0, 1)], 0.0),
        ([(0, 10)], [(2, 3), (5, 7)], 3.0),  # b inside a
        ([(0, 2), (4, 6)], [(1, 5)], 2.0),  # b bridges a gap
        ([(0, 1)], [(1, 2)], 0.0),  # touching is no overlap
        ([(0, 3), (2, 5)], [(1, 4), (3, 6)], 4.0),  # overlapping members on both sides
        ([(0, 1), (2, 3), (4, 5)], [(0.5, 4.5)], 2.0),
    ],
)
def test_intersection_length(a: list, b: list, expected: float) -> None:
    assert intersection_length(a, b) == pytest.approx(expected)
    assert intersection_length(b, a) == pytest.approx(expected)


def test_intersection_never_exceeds_either_union() -> None:
    a = [(0.0, 1.5), (2.0, 4.0), (3.5, 9.0)]
    b = [(1.0, 2.5), (8.0, 12.0)]
    both = intersection_length(a, b)
    assert both <= union_length(a) and both <= union_length(b)
    assert both == pytest.approx(0.5 + 0.5 + 1.0)


@pytest.mark.parametrize(
    ("collective", "n", "factor"),
    [
        ("all_reduce", 1, 0.0),
        ("all_reduce", 2, 1.0),
        ("all_reduce", 8, 1.75),
        ("all_reduce", 16, 1.875),
        ("reduce_scatter", 2, 0.5),
        ("reduce_scatter", 8, 0.875),
        ("all_gather", 8, 0.875),
        ("all_gather", 1, 0.0),
    ],
)
def test_busbw_factors_match_nccl_tests(collective: str, n: int, factor: float) -> None:
    assert busbw_factor(collective, n) == pytest.approx(factor)


def test_busbw_factor_rejects_unknown() -> None:
    with pytest.raises(ValueError):
        busbw_factor("alltoall", 4)
    with pytest.raises(ValueError):
        busbw_factor("all_reduce", 0)


def test_rates() -> None:
    assert gbps(1e9, 1000.0) == pytest.approx(1.0)
    assert gbps(1e9, 0) is None
    assert tflops(2e12, 1000.0) == pytest.approx(2.0)


def test_percentile_linear_interpolation() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 50) == pytest.approx(2.5)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile(values, 10) == pytest.approx(1.3)
    assert percentile([], 50) is None


def test_step_metrics_on_crafted_step() -> None:
    # GEMMs busy 0-4 and 5-9 ms; one all_reduce 3-6 ms and one 8-11 ms; step 12 ms.
    times = StepTimes(
        iter_ms=12.0,
        gemm=[(0.0, 2.0), (2.0, 4.0), (5.0, 9.0)],
        comm=[
            CollectiveTiming(3.0, 6.0, "all_reduce", 100_000_000),
            CollectiveTiming(8.0, 11.0, "all_reduce", 200_000_000),
        ],
    )
    m = step_metrics(times, gemm_flops=8e12, world_size=4, solo_compute_ms=7.0, solo_comm_ms=5.0)
    assert m["compute_ms"] == pytest.approx(8.0)
    assert m["comm_ms"] == pytest.approx(6.0)
    assert m["overlap_ms"] == pytest.approx(1.0 + 1.0 + 1.0)  # 3-4, 5-6, 8-9
    assert m["exposed_comm_ms"] == pytest.approx(3.0)
    assert m["exposed_comm_fraction"] == pytest.approx(3.0 / 12.0)
    assert m["overlap_fraction"] == pytest.approx(0.5)
    assert m["gemm_tflops"] == pytest.approx(1000.0)  # 8e12 flop in 8 ms
    assert m["comm_bytes"] == 300_000_000
    assert m["algbw_gbps"] == pytest.approx(50.0)  # 3e8 B / 6 ms
    assert m["busbw_gbps"] == pytest.approx(50.0 * 1.5)  # all_reduce, n=4
    assert m["contention_slowdown"] == pytest.approx(8.0 / 7.0 - 1)
    assert m["comm_slowdown"] == pytest.approx(6.0 / 5.0 - 1)


def test_step_metrics_mixed_collectives_use_own_factor() -> None:
    times = StepTimes(
        iter_ms=4.0,
        gemm=[],
        comm=[
            CollectiveTiming(0.0, 1.0, "reduce_scatter", 1_000_000),
            CollectiveTiming(1.0, 2.0, "all_gather", 1_000_000),
        ],
    )
    m = step_metrics(times, gemm_flops=1.0, world_size=2)
    assert m["algbw_gbps"] == pytest.approx(1.0)  # 2e6 B in 2 ms
    assert m["busbw_gbps"] == pytest.approx(0.5)  # both (n-1)/n = 0.5
    assert m["gemm_tflops"] is None and m["contention_slowdown"] is None


def test_step_metrics_without_gemm_timing() -> None:
    m = step_metrics(StepTimes(iter_ms=5.0, gemm=None), gemm_flops=1.0, world_size=2)
    assert m["iter_ms"] == 5.0
    for key in ("compute_ms", "comm_ms", "overlap_ms", "gemm_tflops", "busbw_gbps"):
        assert m[key] is None


def test_distribution_ignores_nulls() -> None:
    d = distribution([1.0, None, 3.0, 2.0])
    assert d is not None
    assert (d["median"], d["min"], d["max"], d["n"]) == (2.0, 1.0, 3.0, 3)
    assert distribution([None]) is None


def test_env_collection_and_differences() -> None:
    environ = {
        "NCCL_MAX_NCHANNELS": "42",
        "RCCL_THREADS_PER_BLOCK": "512",
        "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
        "HSA_NO_SCRATCH_RECLAIM": "1",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "HOME": "/root",
        "PATH": "/bin",
    }
    env = collect_env(environ)
    assert "HOME" not in env and "PATH" not in env
    # Whatever the launch's env.sh set is recorded too, whatever its prefix.
    launched = collect_env({**environ, "MY_FLAG": "x", "GEMM_ENV_VARS": "MY_FLAG NCCL_MAX_NCHANNELS"})
    assert launched["MY_FLAG"] == "x" and "HOME" not in launched
    assert env["NCCL_MAX_NCHANNELS"] == "42" and env["CUDA_VISIBLE_DEVICES"] == "0,1"
    other = dict(env, NCCL_MAX_NCHANNELS="28")
    del other["HSA_NO_SCRATCH_RECLAIM"]
    diff = env_differences([env, other])
    assert diff == {
        "HSA_NO_SCRATCH_RECLAIM": {"0": "1", "1": None},
        "NCCL_MAX_NCHANNELS": {"0": "42", "1": "28"},
    }


def _steps(iters: list[float], tflops_value: float) -> list[dict]:
    return [{"iter_ms": i, "gemm_tflops": tflops_value, "busbw_gbps": 10.0} for i in iters]


def test_aggregate_ranks_pools_steps_and_reports_spread() -> None:
    reports = [
        {
            "rank": 1,
            "host": "b",
            "device": "gpu",
            "env": {"NCCL_X": "2"},
            "steps": _steps([20.0, 22.0], 500.0),
            "calibration_compute": [{"compute_ms": 9.0, "gemm_tflops": 700.0}],
            "calibration_comm": [{"comm_ms": 3.0, "algbw_gbps": 40.0, "busbw_gbps": 60.0}],
        },
        {
            "rank": 0,
            "host": "a",
            "device": "gpu",
            "env": {"NCCL_X": "1"},
            "steps": _steps([10.0, 12.0], 800.0),
            "calibration_compute": [{"compute_ms": 8.0, "gemm_tflops": 750.0}],
            "calibration_comm": [{"comm_ms": 2.0, "algbw_gbps": 50.0, "busbw_gbps": 75.0}],
        },
    ]
    s = aggregate_ranks(reports)
    assert s["iter_ms"]["n"] == 4 and s["iter_ms"]["median"] == pytest.approx(16.0)
    assert s["measured_steps"] == {"per_rank_min": 2, "total": 4}
    assert s["solo"]["compute_ms"]["median"] == pytest.approx(8.5)
    assert s["solo"]["busbw_gbps"]["max"] == pytest.approx(75.0)
    assert [r["rank"] for r in s["per_rank"]] == [0, 1]
    spread = s["rank_spread"]["iter_ms"]
    assert (spread["min_rank"], spread["max_rank"]) == (0, 1)
    assert spread["max_over_min"] == pytest.approx(21.0 / 11.0)
    assert s["env"] == {"NCCL_X": "1"}  # rank 0's
    assert s["env_differences"] == {"NCCL_X": {"0": "1", "1": "2"}}
    assert s["hosts"] == ["a", "b"]


def test_step_metrics_untimed_collectives_are_unknown_not_zero() -> None:
    # timing.granularity=step: data moved but nothing timed the collectives.
    m = step_metrics(StepTimes(iter_ms=5.0, gemm=None, comm=None), gemm_flops=1.0, world_size=2)
    assert m["iter_ms"] == 5.0
    assert all(m[k] is None for k in m if k != "iter_ms"), m
    # GEMMs timed but collectives not: compute known, every comm-derived field unknown.
    m = step_metrics(StepTimes(iter_ms=5.0, gemm=[(0.0, 2.0)], comm=None), gemm_flops=1.0,
                     world_size=2)
    assert m["compute_ms"] == pytest.approx(2.0)
    for key in ("comm_ms", "comm_bytes", "overlap_ms", "exposed_comm_ms", "busbw_gbps"):
        assert m[key] is None, key
