"""JSON documents between ranks, as bytes in uint8 tensors: nothing a peer sends is unpickled.

torch's ``*_object`` collectives pickle on one rank and unpickle on the others: a peer that is not
ours (a rendezvous store someone else holds, docs/SECURITY.md) would run its code in our ranks.
Here a rank only ever parses JSON: its length is agreed first (an all_gather of one int64 per
rank, bounded by ``limit``), then the bytes, padded to the longest, travel as a uint8 tensor.
A document that is too long, not UTF-8 JSON or nested too deep is an ExchangeError naming the
rank that sent it, on every rank that receives it; the exchange itself stays in step (every rank
makes the same collectives whatever it sends).
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

# A rank's end-of-run report with per-step records of a long run stays far below this.
DEFAULT_LIMIT = 256 * 1024 * 1024


class ExchangeError(RuntimeError):
    """What a rank received cannot be used; the message names the rank and why."""


def encode(document: Any) -> bytes:
    """Compact UTF-8 JSON (NaN and infinities kept as Python writes them: timings may hold them)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode(data: bytes, rank: int) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ExchangeError(f"rank {rank} sent {len(data)} bytes that are not a JSON document: "
                            f"{type(exc).__name__}: {exc}"[:300]) from None


def _payload_and_sizes(document: Any, device: torch.device, group: Any,
                       limit: int) -> tuple[bytes, list[int]]:
    """This rank's bytes and every rank's length, in group rank order. A rank that cannot
    encode its document announces 0 bytes, so every rank fails here together, in step."""
    try:
        payload, problem = encode(document), None
    except (TypeError, ValueError, RecursionError) as exc:
        payload, problem = b"", f"{type(exc).__name__}: {exc}"[:300]
    mine = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    if problem is not None:
        raise ExchangeError(f"this rank's document is not JSON: {problem}")
    sizes = [int(t.item()) for t in gathered]
    for rank, size in enumerate(sizes):
        if size == 0:
            raise ExchangeError(f"rank {rank} could not encode its document as JSON")
        if not 0 < size <= limit:  # a negative length: not a rank of ours
            raise ExchangeError(f"rank {rank} announced a {size}-byte document (limit {limit})")
    return payload, sizes


def _padded(payload: bytes, size: int, device: torch.device) -> torch.Tensor:
    tensor = torch.zeros(size, dtype=torch.uint8)
    tensor[:len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    return tensor.to(device)


def _documents(tensors: list[torch.Tensor], sizes: list[int]) -> list[Any]:
    return [decode(t[:size].cpu().numpy().tobytes(), rank)
            for rank, (t, size) in enumerate(zip(tensors, sizes, strict=True))]


def all_gather_json(document: Any, *, device: torch.device, group: Any = None,
                    limit: int = DEFAULT_LIMIT) -> list[Any]:
    """Every rank's document, on every rank, in group rank order."""
    payload, sizes = _payload_and_sizes(document, device, group, limit)
    longest = max(sizes)
    tensors = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
    dist.all_gather(tensors, _padded(payload, longest, device), group=group)
    return _documents(tensors, sizes)


def gather_json(document: Any, *, device: torch.device, dst: int = 0, group: Any = None,
                limit: int = DEFAULT_LIMIT) -> list[Any] | None:
    """Every rank's document on `dst` (a global rank), in group rank order; None elsewhere."""
    payload, sizes = _payload_and_sizes(document, device, group, limit)
    longest = max(sizes)
    receiving = dist.get_rank() == dst
    tensors = ([torch.empty(longest, dtype=torch.uint8, device=device) for _ in sizes]
               if receiving else None)
    dist.gather(_padded(payload, longest, device), tensors, dst=dst, group=group)
    return _documents(tensors, sizes) if tensors is not None else None
