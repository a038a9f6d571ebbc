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
    Baseline,
    CollectiveTiming,
    StepTimes,
    collect_env,
    distribution,
    env_differences,
    gemm_contention,
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
    m = step_metrics(times, gemm_flops=8e12, world_size=4, baseline=Baseline(0, 7.0))
    assert m["compute_ms"] == pytest.approx(8.0)
    assert m["comm_ms"] == pytest.approx(6.0)
    assert m["overlap_ms"] == pytest.approx(1.0 + 1.0 + 1.0)  # 3-4, 5-6, 8-9
    assert m["exposed_comm_ms"] == pytest.approx(3.0)
    assert m["exposed_comm_fraction"] == pytest.approx(3.0 / 12.0)
    assert m["overlap_fraction"] == pytest.approx(0.5)
    assert m["gemm_tflops"] == pytest.approx(1000.0)  # 8e12 flop in 8 ms
    assert m["comm_bytes"] == 300_000_000
    assert m["local_algbw_gbps"] == pytest.approx(50.0)  # 3e8 B / 6 ms
    assert m["local_busbw_gbps"] == pytest.approx(50.0 * 1.5)  # all_reduce, n=4
    assert m["contention_slowdown"] == pytest.approx(8.0 / 7.0 - 1)
    # phase-style intervals (per_gemm False): no per-GEMM comparison
    assert m["gemm_contention_slowdown"] is None and m["overlapped_gemm_fraction"] is None


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
    assert m["local_algbw_gbps"] == pytest.approx(1.0)  # 2e6 B in 2 ms
    assert m["local_busbw_gbps"] == pytest.approx(0.5)  # both (n-1)/n = 0.5
    assert m["gemm_tflops"] is None and m["contention_slowdown"] is None


def test_step_metrics_without_gemm_timing() -> None:
    m = step_metrics(StepTimes(iter_ms=5.0, gemm=None), gemm_flops=1.0, world_size=2)
    assert m["iter_ms"] == 5.0
    for key in ("compute_ms", "comm_ms", "overlap_ms", "gemm_tflops", "local_busbw_gbps"):
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


def test_step_metrics_untimed_collectives_are_unknown_not_zero() -> None:
    # timing.granularity=step: data moved but nothing timed the collectives.
    m = step_metrics(StepTimes(iter_ms=5.0, gemm=None, comm=None), gemm_flops=1.0, world_size=2)
    assert m["iter_ms"] == 5.0
    assert all(m[k] is None for k in m if k != "iter_ms"), m
    # GEMMs timed but collectives not: compute known, every comm-derived field unknown.
    m = step_metrics(StepTimes(iter_ms=5.0, gemm=[(0.0, 2.0)], comm=None), gemm_flops=1.0,
                     world_size=2)
    assert m["compute_ms"] == pytest.approx(2.0)
    for key in ("comm_ms", "comm_bytes", "overlap_ms", "exposed_comm_ms", "local_busbw_gbps"):
        assert m[key] is None, key


def test_world_size_one_reports_no_bandwidth() -> None:
    # A one-rank all_reduce moves nothing between ranks: no bandwidth, not 0 and not size/time.
    times = StepTimes(iter_ms=4.0, gemm=[(0.0, 3.0)],
                      comm=[CollectiveTiming(1.0, 1.5, "all_reduce", 1_000_000, 0)])
    m = step_metrics(times, gemm_flops=1.0, world_size=1)
    assert m["comm_ms"] == pytest.approx(0.5) and m["comm_bytes"] == 1_000_000
    assert m["local_algbw_gbps"] is None and m["local_busbw_gbps"] is None


def test_per_gemm_contention_compares_only_the_overlapped_gemms() -> None:
    # Four GEMMs; a collective runs 2.5-5.5 ms, over GEMMs 1 and 2 only. Those two ran 1.5x
    # their solo time; GEMMs 0 and 3 ran at their solo time.
    gemm = [(0.0, 1.0), (1.0, 2.5), (2.5, 4.0), (4.0, 5.0)]
    solo = (1.0, 1.0, 1.0, 1.0)
    slowdown, fraction = gemm_contention(gemm, [(2.0, 3.0)], solo)
    assert fraction == pytest.approx(0.5)
    assert slowdown == pytest.approx(3.0 / 2.0 - 1)  # 3 ms measured against 2 ms solo
    # The whole-step figure, diluted by the untouched GEMMs: 5 ms against 4 ms.
    times = StepTimes(iter_ms=6.0, gemm=gemm, per_gemm=True,
                      comm=[CollectiveTiming(2.0, 3.0, "all_reduce", 10, 0)])
    m = step_metrics(times, gemm_flops=1.0, world_size=2, baseline=Baseline(0, 4.0, solo))
    assert m["gemm_contention_slowdown"] == pytest.approx(0.5)
    assert m["overlapped_gemm_fraction"] == pytest.approx(0.5)
    assert m["contention_slowdown"] == pytest.approx(0.25)
    # No collective in flight: nothing overlapped, nothing to compare.
    assert gemm_contention(gemm, [], solo) == (None, 0.0)
    # A baseline of another shape (timing granularity changed) is not compared.
    assert gemm_contention(gemm, [(2.0, 3.0)], (1.0, 1.0))[0] is None


def test_control_and_local_reduce_are_timed_apart_from_comm() -> None:
    times = StepTimes(
        iter_ms=10.0, gemm=[(0.0, 4.0)], per_gemm=True,
        comm=[CollectiveTiming(5.0, 7.0, "all_gather", 100, 0)],
        control=CollectiveTiming(0.5, 1.25, "control", 4, -1),
        reduce_local=[(7.0, 7.5)],
    )
    m = step_metrics(times, gemm_flops=1.0, world_size=2)
    assert m["control_ms"] == pytest.approx(0.75)
    assert m["reduce_local_ms"] == pytest.approx(0.5)
    assert m["comm_ms"] == pytest.approx(2.0)  # neither the control nor the sum
    # The control all-reduce ran under the GEMM: that GEMM counts as overlapped.
    assert m["overlapped_gemm_fraction"] == pytest.approx(1.0)


def test_distribution_has_p95() -> None:
    d = distribution([float(v) for v in range(1, 101)])
    assert d is not None and d["p95"] == pytest.approx(95.05) and d["median"] == pytest.approx(50.5)
