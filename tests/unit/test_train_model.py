"""train.model bucket planning, and the hand-written backward against torch autograd."""

from __future__ import annotations

import pytest
import torch

from train.config import ModelConfig
from train.model import GemmStack, plan_buckets
from train.stepper import COMPUTE, Stepper


def test_buckets_one_layer_each() -> None:
    layout = plan_buckets(layers=3, layer_numel=100, bucket_numel=100, world_size=2)
    assert layout.flat_numel == 300
    assert [(b.start, b.end, b.ready_after) for b in layout.buckets] == [
        (0, 100, 0),
        (100, 200, 1),
        (200, 300, 2),
    ]
    assert layout.layer_offsets == (0, 100, 200)


def test_buckets_end_on_layer_edges_at_24_ranks() -> None:
    # The default GPU model (8 layers of 8192x8192 bf16, 128 MiB buckets) on 3 nodes x 8 GPUs:
    # 24 does not divide 8192*8192, so each bucket is padded. Padding once at the end of the
    # buffer made the buckets complete after layers 1, 2, ..., 7, 7.
    layer = 8192 * 8192
    layout = plan_buckets(layers=8, layer_numel=layer, bucket_numel=128 * 2**20 // 2,
                          world_size=24, align_numel=256 // 2)
    assert [b.ready_after for b in layout.buckets] == list(range(8))
    assert [b.layers for b in layout.buckets] == [(p, p) for p in range(8)]
    # padded to a multiple of 24 (reduce-scatter) and of 128 bf16 elements (256-byte starts)
    assert all(b.numel % 24 == 0 and b.numel % 128 == 0 and 0 <= b.numel - layer < 384
               for b in layout.buckets)
    # Every layer lies inside its own bucket, padding only after it.
    for position, bucket in enumerate(layout.buckets):
        offset = layout.layer_offsets[position]
        assert bucket.start == offset and offset + layer <= bucket.end
    assert layout.flat_numel == layout.buckets[-1].end


def test_multi_layer_buckets_hold_whole_layers_and_pad_at_their_end() -> None:
    # 3 layers of 10 elements, buckets of at least 16 elements: two layers per bucket (DDP's
    # rule: layers are added until the bucket holds the size asked), padded for 3 ranks.
    layout = plan_buckets(layers=3, layer_numel=10, bucket_numel=16, world_size=3)
    assert [(b.start, b.end, b.ready_after, b.layers) for b in layout.buckets] == [
        (0, 21, 1, (0, 1)),   # 20 elements + 1 of padding
        (21, 33, 2, (2, 2)),  # 10 + 2
    ]
    assert layout.layer_offsets == (0, 10, 21)
    assert all(b.numel % 3 == 0 for b in layout.buckets)


def test_buckets_smaller_than_a_layer_split_it_and_pad_its_last_chunk() -> None:
    layout = plan_buckets(layers=2, layer_numel=10, bucket_numel=4, world_size=4)
    assert [(b.start, b.end, b.ready_after) for b in layout.buckets] == [
        (0, 4, 0), (4, 8, 0), (8, 12, 0),     # layer 0: 4 + 4 + 2 (+2 padding)
        (12, 16, 1), (16, 20, 1), (20, 24, 1),
    ]
    assert layout.layer_offsets == (0, 12)
    assert layout.flat_numel == 24


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 7, 24])
@pytest.mark.parametrize("bucket_numel", [3, 10, 16, 25, 1000])
def test_every_layer_is_contiguous_inside_buckets_that_complete_with_it(
    world_size: int, bucket_numel: int
) -> None:
    layers, layer_numel = 5, 10
    layout = plan_buckets(layers, layer_numel, bucket_numel, world_size)
    for position, offset in enumerate(layout.layer_offsets):
        holding = [b for b in layout.buckets if b.start < offset + layer_numel and offset < b.end]
        assert holding and all(b.ready_after == position for b in holding
                               if b.layers == (position, position))
        assert all(b.layers[0] <= position <= b.layers[1] == b.ready_after for b in holding)
    assert all(b.numel % world_size == 0 for b in layout.buckets)
    assert sum(b.numel for b in layout.buckets) == layout.flat_numel


def test_padding_keeps_every_layer_as_aligned_as_the_buffer() -> None:
    # 16x16 fp32 layers (1 KiB) at 3 ranks: each bucket is padded to a multiple of 3 and of
    # 64 elements (256 bytes), so every weight view starts 256-byte aligned like the buffer.
    stack = GemmStack(ModelConfig(layers=3, tokens=4, hidden=16), device=torch.device("cpu"),
                      dtype=torch.float32, seed=3, rank=0, world_size=3,
                      bucket_mb=16 * 16 * 4 / 2**20)
    assert [b.numel for b in stack.buckets] == [384] * 3
    base = stack.params.data_ptr()
    for layer in range(3):
        assert (stack.weight(layer).data_ptr() - base) % 256 == 0
        assert (stack.grad(layer).data_ptr() - stack.grads.data_ptr()) % 256 == 0


def test_padded_layout_keeps_the_weights_and_the_gradients_of_each_layer() -> None:
    def make(world_size: int) -> GemmStack:
        return GemmStack(ModelConfig(layers=3, tokens=4, hidden=5), device=torch.device("cpu"),
                         dtype=torch.float32, seed=3, rank=0, world_size=world_size,
                         bucket_mb=25 * 4 / 2**20)

    plain, padded = make(1), make(3)
    assert padded.flat_numel > plain.flat_numel  # 25 is not a multiple of 3
    for layer in range(3):
        assert torch.equal(plain.weight(layer), padded.weight(layer))
    # Padding holds nothing: the parameters' sum is the layers' sum.
    assert float(padded.params.sum()) == pytest.approx(float(plain.params.sum()))


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
