"""The GEMM stack: weights, gradients, activations and gradient buckets (imports torch).

Layer i computes ``X[i+1] = X[i] @ W[i]`` ([tokens x hidden] times [hidden x hidden]). Weights
and gradients live in one flat buffer each, laid out in backward order (the last layer first),
so a gradient bucket is a contiguous slice that is complete as soon as the backward pass has
produced the dW of the layers it spans, and the dW GEMMs write straight into it (no copies).
Each bucket ends on a layer edge and is padded there to a multiple of the world size
(plan_buckets), so its collective starts right after its own last dW at any world size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from train.config import ModelConfig


# Padding keeps every bucket's start (and so its first layer) aligned to this: the GEMM operands
# are views into the flat buffers, and cuBLAS picks kernels by their alignment up to 256 bytes.
OPERAND_ALIGNMENT_BYTES = 256


@dataclass(frozen=True)
class Bucket:
    index: int
    start: int  # flat element offsets, end exclusive (padding included)
    end: int
    ready_after: int  # position in the backward pass (0 = last layer) that completes it
    layers: tuple[int, int]  # first and last backward position it holds

    @property
    def numel(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BucketLayout:
    """Where every layer's gradient (and weight) sits in the flat buffers, and the buckets.

    layer_offsets[p] is the flat offset of backward position p's layer (p = 0: the last
    layer); a layer occupies layer_numel elements from there. Padding only ever follows the
    last layer of a bucket (or, for buckets smaller than a layer, the layer's last chunk)."""

    flat_numel: int
    buckets: tuple[Bucket, ...]
    layer_offsets: tuple[int, ...]


def _round_up(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def plan_buckets(
    layers: int, layer_numel: int, bucket_numel: int, world_size: int, align_numel: int = 1
) -> BucketLayout:
    """Groups the layers' gradients (backward order) into buckets that end on layer edges.

    A bucket holds whole layers: layers are added until it holds at least bucket_numel
    elements (DDP's rule), then the bucket is padded at its end to a multiple of world_size
    (so it can be reduce-scattered evenly) and of align_numel (so the next bucket's first
    layer starts as aligned as the buffer: cuBLAS picks its kernels by the operands' alignment,
    up to 256 bytes). A bucket_numel smaller than one layer splits each layer into chunks of
    bucket_numel rounded up the same way, the layer's last chunk padded. Padding per bucket,
    not once for the whole buffer: with one padding at the end, a world size that does not
    divide the bucket size moved every edge a little further off its layer (at 24 ranks, 8
    layers of 8192x8192: buckets completed after layers 1, 2, ..., 7, 7 instead of 0 ... 7),
    so every collective started a layer late."""
    if min(layers, layer_numel, bucket_numel, world_size, align_numel) < 1:
        raise ValueError("layers, layer_numel, bucket_numel, world_size and align_numel must be "
                         ">= 1")
    multiple = math.lcm(world_size, align_numel)
    buckets: list[Bucket] = []
    offsets: list[int] = []
    cursor = 0

    def add(numel: int, first: int, last: int) -> None:
        nonlocal cursor
        size = _round_up(numel, multiple)
        buckets.append(Bucket(len(buckets), cursor, cursor + size, last, (first, last)))
        cursor += size

    if bucket_numel >= layer_numel:
        per_bucket = math.ceil(bucket_numel / layer_numel)
        for first in range(0, layers, per_bucket):
            last = min(first + per_bucket, layers) - 1
            offsets += [cursor + (p - first) * layer_numel for p in range(first, last + 1)]
            add((last - first + 1) * layer_numel, first, last)
    else:
        chunk = _round_up(bucket_numel, multiple)
        for position in range(layers):
            offsets.append(cursor)
            done = 0
            while done < layer_numel:
                part = min(chunk, layer_numel - done)
                add(part, position, position)
                done += part
    return BucketLayout(cursor, tuple(buckets), tuple(offsets))


class GemmStack:
    """Parameters, gradients and buffers of the layer stack on one rank."""

    def __init__(
        self,
        model: ModelConfig,
        *,
        device: torch.device,
        dtype: torch.dtype,
        seed: int,
        rank: int,
        world_size: int,
        bucket_mb: float,
    ) -> None:
        self.layers = model.layers
        self.tokens = model.tokens
        self.hidden = model.hidden
        self.device = device
        self.dtype = dtype
        self.layer_numel = self.hidden * self.hidden
        element = torch.tensor([], dtype=dtype).element_size()
        bucket_numel = max(1, int(bucket_mb * 2**20) // element)
        self.layout = plan_buckets(self.layers, self.layer_numel, bucket_numel, world_size,
                                   align_numel=max(1, OPERAND_ALIGNMENT_BYTES // element))
        self.flat_numel = self.layout.flat_numel
        self.buckets = list(self.layout.buckets)
        self.element_size = element

        # Same seed on every rank gives identical initial weights; the trainer also broadcasts
        # them from rank 0 so heterogeneous nodes cannot drift apart.
        weights_gen = torch.Generator(device=device).manual_seed(seed)
        self.params = torch.zeros(self.flat_numel, dtype=dtype, device=device)
        std = 1.0 / math.sqrt(self.hidden)  # keeps activations O(1) through the stack
        real = self.layers * self.layer_numel
        offsets = self.layout.layer_offsets
        if all(offset == p * self.layer_numel for p, offset in enumerate(offsets)):
            self.params[:real].normal_(0.0, std, generator=weights_gen)
        else:
            # The same draw as without padding (same size, same generator), then each layer
            # into its slot: the weights do not depend on the world size.
            drawn = torch.empty(real, dtype=dtype, device=device).normal_(
                0.0, std, generator=weights_gen)
            for position, offset in enumerate(offsets):
                chunk = drawn[position * self.layer_numel : (position + 1) * self.layer_numel]
                self.params[offset : offset + self.layer_numel].copy_(chunk)
            del drawn
        self.grads = torch.zeros_like(self.params)

        # Every rank gets its own data: a different input batch and upstream gradient.
        data_gen = torch.Generator(device=device).manual_seed(seed + 1000003 * (rank + 1))
        shape = (self.tokens, self.hidden)
        self.inputs = torch.randn(shape, dtype=dtype, device=device, generator=data_gen)
        self.upstream_grad = torch.randn(shape, dtype=dtype, device=device, generator=data_gen)
        # Training steps alternate the sign of the upstream gradient (loss <Y, +-G>). With one
        # fixed G, SGD would drive every weight the same way step after step; the weights drift
        # towards low rank, the GEMM operands get more regular and the GPU draws less power and
        # clocks higher (seen on an H100: 690 -> 825 TFLOP/s within 20 steps), so measured steps
        # would no longer be comparable with the calibration. Alternating keeps the weights
        # within one update of where they started.
        self.upstream_grad_negated = torch.neg(self.upstream_grad)
        # activations[i] is the input of layer i; the last layer writes to self.output.
        self.activations = [self.inputs] + [
            torch.empty(shape, dtype=dtype, device=device) for _ in range(self.layers - 1)
        ]
        self.output = torch.empty(shape, dtype=dtype, device=device)
        self.grad_buffers = [torch.empty(shape, dtype=dtype, device=device) for _ in range(2)]

    def _slot(self, layer: int) -> slice:
        position = self.layers - 1 - layer  # backward order: last layer first
        offset = self.layout.layer_offsets[position]
        return slice(offset, offset + self.layer_numel)

    def weight(self, layer: int) -> torch.Tensor:
        return self.params[self._slot(layer)].view(self.hidden, self.hidden)

    def grad(self, layer: int) -> torch.Tensor:
        return self.grads[self._slot(layer)].view(self.hidden, self.hidden)

    @property
    def gemm_count(self) -> int:
        # forward L, backward L dW and L-1 dX (the input needs no gradient)
        return 3 * self.layers - 1

    @property
    def gemm_flops(self) -> float:
        """Floating-point operations of one forward+backward (2*M*N*K per GEMM)."""
        return float(self.gemm_count) * 2.0 * self.tokens * self.hidden * self.hidden

    @property
    def forward_flops(self) -> float:
        return float(self.layers) * 2.0 * self.tokens * self.hidden * self.hidden

    def bucket_view(self, bucket: Bucket) -> torch.Tensor:
        return self.grads[bucket.start : bucket.end]

    def bucket_bytes(self, bucket: Bucket) -> int:
        return bucket.numel * self.element_size
