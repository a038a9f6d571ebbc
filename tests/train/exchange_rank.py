"""One gloo rank for tests/train/test_exchange.py: `python exchange_rank.py MARKER SCENARIO...`.

Rank and world come from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). The
last rank plays a peer that is not ours where the scenario says so: it speaks the exchange's
wire format (a length, then padded bytes) with bytes of its choosing. The scenarios run in
order in one process group (each leaves the ranks in step); one JSON line per scenario: what
this rank got, or the ExchangeError it raised.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from train.exchange import ExchangeError, all_gather_json, gather_json

CPU = torch.device("cpu")


class Payload:
    """Unpickling this runs `touch MARKER`: what a peer could send to a *_object collective."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def hostile_all_gather(data: bytes, announced: int | None = None) -> None:
    """The exchange's two collectives, from a peer that sends `data` as its document."""
    world = dist.get_world_size()
    length = torch.tensor([len(data) if announced is None else announced], dtype=torch.int64)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    if announced is not None:
        return  # the honest ranks refuse the length: no second collective
    longest = max(int(t.item()) for t in lengths)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    dist.all_gather([torch.empty(longest, dtype=torch.uint8) for _ in range(world)], mine)


def scenario_result(scenario: str, marker: str, rank: int, world: int) -> dict[str, object]:
    hostile = rank == world - 1 and scenario in ("pickle", "huge", "deep", "not_utf8")
    document = {"rank": rank, "text": "é" * rank, "nested": {"list": [1, 2.5, None, True]},
                "nan": float("nan"), "steps": list(range(rank * 1000))}
    result: dict[str, object] = {"scenario": scenario, "rank": rank}
    try:
        if hostile:
            data = {"pickle": pickle.dumps([Payload(marker)]),
                    "deep": b"[" * 200_000 + b"]" * 200_000,
                    "not_utf8": b"\xff\xfe{}"}.get(scenario, b"{}")
            hostile_all_gather(data, announced=2**40 if scenario == "huge" else None)
            result["hostile"] = True
        elif scenario == "unencodable" and rank == 1:
            all_gather_json({"a set": {1, 2}}, device=CPU)
        elif scenario == "gather":
            got = gather_json(document, device=CPU, dst=1)
            result["got"] = None if got is None else [json.dumps(d, sort_keys=True) for d in got]
        else:
            got = all_gather_json(document, device=CPU)
            result["got"] = [json.dumps(d, sort_keys=True) for d in got]
    except ExchangeError as exc:
        result["error"] = str(exc)
    return result


def main() -> int:
    marker, scenarios = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    for scenario in scenarios:
        print(json.dumps(scenario_result(scenario, marker, rank, world)), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
