"""train.model bucket planning, and the hand-written backward against torch autograd."""

from __future__ import annotations

import pytest
import torch

from train.config import ModelConfig
from train.model import GemmStack, plan_buckets
from train.stepper import COMPUTE, Stepper


def test_buckets_one_layer_each() -> None:
    padded, buckets = plan_buckets(layers=3, layer_numel=100, bucket_numel=100, world_size=2)
    assert padded == 300
    assert [(b.start, b.end, b.ready_after) for b in buckets] == [
        (0, 100, 0),
        (100, 200, 1),
        (200, 300, 2),
    ]


def test_buckets_span_layers_and_pad_for_reduce_scatter() -> None:
    # 3 layers of 10 elements, buckets of 16 rounded up to 18 for world size 3... 30 total.
    padded, buckets = plan_buckets(layers=3, layer_numel=10, bucket_numel=16, world_size=3)
    assert padded == 30
    assert [(b.start, b.end) for b in buckets] == [(0, 18), (18, 30)]
    assert all(b.numel % 3 == 0 for b in buckets)
    assert [b.ready_after for b in buckets] == [1, 2]  # element 17 is in layer slot 1


def test_buckets_cover_padding_after_the_last_layer() -> None:
    padded, buckets = plan_buckets(layers=2, layer_numel=5, bucket_numel=4, world_size=4)
    assert padded == 12  # 10 rounded up to a multiple of 4
    assert buckets[-1].end == 12
    assert buckets[-1].ready_after == 1  # padding-only tail waits for the last real layer
    assert sum(b.numel for b in buckets) == padded


def test_bucket_planning_rejects_zero() -> None:
    with pytest.raises(ValueError):
        plan_buckets(layers=0, layer_numel=1, bucket_numel=1, world_size=1)


def test_backward_matches_autograd() -> None:
    torch.manual_seed(0)
    model = ModelConfig(layers=3, tokens=16, hidden=8)
    stack = GemmStack(
        model,
        device=torch.device("cpu"),
        dtype=torch.float64,
        seed=7,
        rank=1,
        world_size=2,
        bucket_mb=1e-4,
    )
    stepper = Stepper(
        stack,
        collective="all_reduce",
        overlap=True,
        lr=0.1,
        world_size=2,
        granularity="gemm",
        checksum=False,
    )
    try:
        result = stepper.resolve(stepper.run(COMPUTE, 1))
    finally:
        stepper.close()
    assert result.times.gemm is not None and len(result.times.gemm) == stack.gemm_count == 8

    weights = [stack.weight(i).detach().clone().requires_grad_(True) for i in range(3)]
    x = stack.inputs
    for w in weights:
        x = x @ w
    (x * stack.upstream_grad).sum().backward()
    torch.testing.assert_close(stack.output, x.detach())
    for i, w in enumerate(weights):
        torch.testing.assert_close(stack.grad(i), w.grad)


def test_ranks_share_weights_but_not_data() -> None:
    def make(rank: int) -> GemmStack:
        return GemmStack(
            ModelConfig(layers=2, tokens=4, hidden=4),
            device=torch.device("cpu"),
            dtype=torch.float32,
            seed=3,
            rank=rank,
            world_size=2,
            bucket_mb=1.0,
        )

    a, b = make(0), make(1)
    assert torch.equal(a.params, b.params)
    assert not torch.equal(a.inputs, b.inputs)
    assert a.gemm_flops == 5 * 2 * 4 * 4 * 4
