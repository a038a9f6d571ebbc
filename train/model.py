"""The GEMM stack: weights, gradients, activations and gradient buckets (imports torch).

Layer i computes ``X[i+1] = X[i] @ W[i]`` ([tokens x hidden] times [hidden x hidden]). Weights
and gradients live in one flat buffer each, laid out in backward order (the last layer first),
so a gradient bucket is a contiguous slice that is complete as soon as the backward pass has
produced the dW of the layers it spans, and the dW GEMMs write straight into it (no copies).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from train.config import ModelConfig


@dataclass(frozen=True)
class Bucket:
    index: int
    start: int  # flat element offsets, end exclusive
    end: int
    ready_after: int  # position in the backward pass (0 = last layer) that completes it

    @property
    def numel(self) -> int:
        return self.end - self.start


def plan_buckets(
    layers: int, layer_numel: int, bucket_numel: int, world_size: int
) -> tuple[int, list[Bucket]]:
    """Splits the flat gradient (layers*layer_numel, padded to a multiple of world_size) into
    buckets of bucket_numel elements (rounded up to a multiple of world_size, so a bucket can be
    reduce-scattered evenly). Returns (padded_numel, buckets)."""
    if layers < 1 or layer_numel < 1 or bucket_numel < 1 or world_size < 1:
        raise ValueError("layers, layer_numel, bucket_numel and world_size must be >= 1")
    total = layers * layer_numel
    padded = math.ceil(total / world_size) * world_size
    size = math.ceil(bucket_numel / world_size) * world_size
    buckets = []
    for index, start in enumerate(range(0, padded, size)):
        end = min(start + size, padded)
        last_real = min(end, total) - 1
        buckets.append(Bucket(index, start, end, ready_after=last_real // layer_numel))
    return padded, buckets


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
        self.flat_numel, self.buckets = plan_buckets(
            self.layers, self.layer_numel, bucket_numel, world_size
        )
        self.element_size = element

        # Same seed on every rank gives identical initial weights; the trainer also broadcasts
        # them from rank 0 so heterogeneous nodes cannot drift apart.
        weights_gen = torch.Generator(device=device).manual_seed(seed)
        self.params = torch.zeros(self.flat_numel, dtype=dtype, device=device)
        std = 1.0 / math.sqrt(self.hidden)  # keeps activations O(1) through the stack
        self.params[: self.layers * self.layer_numel].normal_(0.0, std, generator=weights_gen)
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
        return slice(position * self.layer_numel, (position + 1) * self.layer_numel)

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
