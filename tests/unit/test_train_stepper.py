"""The Stepper on a real one-rank gloo group (in process, HashStore): where its timestamps sit,
what it reports when collectives are not timed; and the blocking-wait warning."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

from train.config import ModelConfig
from train.metrics import STEP_FIELDS, TELEMETRY_FIELDS, step_metrics
from train.model import GemmStack
from train.runtime import blocking_wait_warning
from train.stepper import COMM, TRAIN, Stepper

SLOW_MS = 40.0  # every all_reduce takes at least this long


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def make_stepper(granularity: str, *, overlap: bool = True) -> Stepper:
    stack = GemmStack(
        ModelConfig(layers=3, tokens=16, hidden=16),
        device=torch.device("cpu"),
        dtype=torch.float32,
        seed=3,
        rank=0,
        world_size=1,
        bucket_mb=16 * 16 * 4 / 2**20,  # one layer per bucket
    )
    return Stepper(
        stack,
        collective="all_reduce",
        overlap=overlap,
        lr=0.1,
        world_size=1,
        granularity=granularity,
        checksum=False,
    )


@pytest.fixture
def slow_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real all_reduce, then a sleep: a collective with a known minimum duration."""
    real = dist.all_reduce

    def slow(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = real(tensor, *args, **kwargs)
        time.sleep(SLOW_MS / 1e3)
        return result

    monkeypatch.setattr(dist, "all_reduce", slow)


@pytest.mark.usefixtures("one_rank_group", "slow_all_reduce")
def test_comm_interval_spans_the_collective_and_follows_its_dw_gemm() -> None:
    stepper = make_stepper("gemm")
    try:
        times = stepper.resolve(stepper.run(TRAIN, 1)).times
    finally:
        stepper.close()
    stack = stepper.stack
    assert times.gemm is not None and times.comm is not None
    assert len(times.gemm) == stack.gemm_count and len(times.comm) == len(stack.buckets) == 3
    for bucket, timing in zip(stack.buckets, times.comm, strict=True):
        # The end mark comes after the collective completed, not when it was started.
        assert timing.end_ms - timing.start_ms >= SLOW_MS * 0.95
        # GEMM order: L forward, then per backward position dW and (but for the last) dX.
        dw_end = times.gemm[stack.layers + 2 * bucket.ready_after][1]
        assert timing.start_ms >= dw_end
    starts = [c.start_ms for c in times.comm]
    ends = [c.end_ms for c in times.comm]
    assert all(s >= e for s, e in zip(starts[1:], ends, strict=False))  # one comm stream
    m = step_metrics(times, gemm_flops=stack.gemm_flops, world_size=1)
    assert m["comm_ms"] >= 3 * SLOW_MS * 0.95
    assert m["comm_ms"] <= m["iter_ms"]


@pytest.fixture
def slow_gemms(monkeypatch: pytest.MonkeyPatch) -> None:
    """The real torch.mm, then a sleep: backward GEMMs long enough for a collective to overlap."""
    real = torch.mm

    def slow(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        time.sleep(SLOW_GEMM_MS / 1e3)
        return result

    monkeypatch.setattr(torch, "mm", slow)


SLOW_GEMM_MS = 25.0  # 4 GEMMs after the first bucket: 75 ms for the comm thread to wake


@pytest.mark.usefixtures("one_rank_group", "slow_all_reduce", "slow_gemms")
@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_buckets_overlap_the_remaining_backward_only_when_overlap_is_on(overlap: bool) -> None:
    stepper = make_stepper("gemm", overlap=overlap)
    try:
        times = stepper.resolve(stepper.run(TRAIN, 1)).times
    finally:
        stepper.close()
    assert times.gemm is not None and times.comm is not None
    last_gemm_end = times.gemm[-1][1]
    m = step_metrics(times, gemm_flops=stepper.stack.gemm_flops, world_size=1)
    if overlap:
        # The last layer's bucket goes out while the earlier layers' dX/dW GEMMs still run.
        assert times.comm[0].start_ms < last_gemm_end - SLOW_GEMM_MS
        assert m["overlap_ms"] >= SLOW_GEMM_MS
    else:
        assert all(c.start_ms >= last_gemm_end for c in times.comm)
        assert m["overlap_ms"] == 0
        assert m["exposed_comm_ms"] == pytest.approx(m["comm_ms"])


@pytest.mark.usefixtures("one_rank_group", "slow_all_reduce")
def test_comm_only_step_times_every_collective() -> None:
    stepper = make_stepper("phase")
    try:
        times = stepper.resolve(stepper.run(COMM, 1)).times
    finally:
        stepper.close()
    m = step_metrics(times, gemm_flops=stepper.stack.gemm_flops, world_size=1)
    assert m["comm_ms"] >= 3 * SLOW_MS * 0.95
    assert m["comm_bytes"] == 3 * 16 * 16 * 4


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("kind", [TRAIN, COMM])
def test_step_granularity_reports_comm_fields_as_unknown(kind: str) -> None:
    stepper = make_stepper("step")
    try:
        times = stepper.resolve(stepper.run(kind, 1)).times
    finally:
        stepper.close()
    m = step_metrics(times, gemm_flops=stepper.stack.gemm_flops, world_size=1)
    added_by_trainer = {"rank", "world_size", "step", "wall_time", "calibration_block",
                        *TELEMETRY_FIELDS}
    assert set(STEP_FIELDS) - added_by_trainer == set(m)
    assert m["iter_ms"] > 0
    for key in ("comm_ms", "comm_bytes", "local_algbw_gbps", "local_busbw_gbps", "overlap_ms",
                "exposed_comm_ms", "overlap_fraction", "control_ms", "reduce_local_ms",
                "overlapped_gemm_fraction", "gemm_contention_slowdown"):
        assert m[key] is None, key


@pytest.mark.parametrize(
    ("environ", "warns"),
    [
        ({"TORCH_NCCL_BLOCKING_WAIT": "1"}, True),
        ({"TORCH_NCCL_BLOCKING_WAIT": "true"}, True),
        ({"NCCL_BLOCKING_WAIT": "1"}, True),
        ({"TORCH_NCCL_BLOCKING_WAIT": "0"}, False),
        ({"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}, False),
        ({}, False),
    ],
)
def test_blocking_wait_warning(environ: dict[str, str], warns: bool) -> None:
    warning = blocking_wait_warning(environ)
    assert (warning is not None) == warns
    if warning is not None:
        assert "overlap" in warning and "\n" not in warning
