"""A point's thread setting as NCCL/RCCL really ran it (pure: no torch).

From one rank's parsed debug output: the thread variable the library read and what it made of
it (its own "Invalid NCCL_NTHREADS ..." or "RCCL Threads per block ... to N" lines), the block
each of the point's collectives launched with (train.nccl_launch: the libraries' launch rules),
and the flags a performance engineer needs: a thread value outside what the library takes, and
an algorithm whose block does not follow the thread variable at all (a no-op sweep axis). A
value the output cannot establish is None with the reason, never a flag.
"""

from __future__ import annotations

from typing import Any

from train.nccl_launch import (
    Block,
    max_threads_for,
    nccl_block,
    nccl_nthreads_effective,
    rccl_block,
)
from train.nccl_log import DATA_COLLECTIVE_BYTES, Communicator, NcclLog

WORLD_ONE = ("world size 1: the library copies the buffer instead of launching a collective "
             "kernel (nRanks == 1), so no thread count applies")
# What NCCL may pick for a gradient all-reduce when this rank's log does not say (ranks other
# than 0 print no per-collective line): the launch check accepts any of their blocks.
CANDIDATES = tuple(f"{a}/{p}" for a in ("RING", "TREE") for p in ("SIMPLE", "LL", "LL128"))


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def knob_of(log: NcclLog, vendor: str | None) -> dict[str, Any]:
    """The thread variable that sizes this library's blocks, as read and as used."""
    if vendor == "rccl" and "RCCL_THREADS_PER_BLOCK" in log.env:
        read = _int(log.env["RCCL_THREADS_PER_BLOCK"])
        adjusted = log.rccl_threads_adjusted
        return {"name": "RCCL_THREADS_PER_BLOCK", "read": read,
                "effective": adjusted if adjusted is not None else read,
                "why": None if adjusted in (None, read) else f"adjusted by RCCL to {adjusted}"}
    read = _int(log.env.get("NCCL_NTHREADS"))
    invalid = log.invalid.get("NCCL_NTHREADS")
    return {"name": "NCCL_NTHREADS", "read": read,
            "effective": nccl_nthreads_effective(read, invalid),
            "why": invalid["why"] if invalid else None}


def block_of(log: NcclLog, comm: Communicator, vendor: str | None, knob: dict[str, Any],
             algorithm: str, protocol: str, nbytes: int | None = None,
             channels: int | None = None) -> Block:
    if vendor == "rccl":
        tpb = knob["read"] if knob["name"] == "RCCL_THREADS_PER_BLOCK" else None
        return rccl_block(tpb, log.rccl_threads_adjusted)
    if vendor is None:
        return Block(None, None, "library unknown (no version line): launch rule not known")
    key = f"{algorithm}/{protocol}"
    table = comm.max_threads.get(key)
    nthreads = knob["effective"] if knob["read"] is not None else None
    max_threads = table if table is not None else max_threads_for(
        algorithm, protocol, nthreads, _int(log.env.get("NCCL_LL128_NTHREADS")), log.version_tuple)
    threshold = comm.thresholds.get(key)
    if channels is None and None not in (nbytes, max_threads, threshold, comm.channels):
        # The numeric lines (2.19-2.22) name no channels: NCCL's own first loop gives them
        # ("while (nBytes < nc*nt*threadThreshold) if (nc >= 2) nc--").
        channels = comm.channels
        while nbytes < channels * max_threads * threshold and channels >= 2:
            channels -= 1
    return nccl_block(log.version_tuple, algorithm, protocol, max_threads, nbytes=nbytes,
                      channels=channels, threshold=threshold)


def thread_settings(log: NcclLog, comm: Communicator | None, asked_threads: int | None,
                    vendor: str | None) -> dict[str, Any]:
    """threads (the blocks the point's gradient collectives launched with) or None with
    threads_reason; the knob; the launch expectation for train.launchdelay.launch_check;
    flags and notes."""
    knob = knob_of(log, vendor)
    knob["asked"] = asked_threads
    library = (vendor or "the library").upper()
    flags: list[str] = []
    if knob["why"] and knob["read"] is not None and knob["name"] == "NCCL_NTHREADS":
        flags.append(f"threads: NCCL_NTHREADS={knob['read']} is {knob['why']}; {library} ran "
                     f"{knob['effective'] if knob['effective'] is not None else 'its maximum'}")
    elif knob["why"]:
        flags.append(f"threads: {knob['name']}={knob['read']} {knob['why']} (its own log line)")
    result: dict[str, Any] = {"threads": None, "threads_reason": None, "threads_knob": knob,
                              "per_algorithm": None, "launch_expectation": None,
                              "flags": flags, "notes": []}
    if comm is None:
        result["threads_reason"] = "no communicator in the debug output"
        return result
    if comm.nranks == 1:
        result["threads_reason"] = WORLD_ONE
        result["launch_expectation"] = {"allowed": None, "reason": WORLD_ONE}
        return result
    data: dict[str, Block] = {}
    allowed: dict[int, str] = {}        # the gradient buckets' blocks
    allowed_any: dict[int, str] = {}    # and the small collectives' (stop flag), for kernels
    for entry in comm.collectives.values():   # the check could not pair with a collective
        key = f"{entry['algorithm']}/{entry['protocol']}"
        is_data = entry["bytes_max"] >= DATA_COLLECTIVE_BYTES
        for nbytes in {entry["bytes_min"], entry["bytes_max"]}:
            block = block_of(log, comm, vendor, knob, entry["algorithm"], entry["protocol"],
                             nbytes, entry.get("channels_used"))
            if block.value is not None:
                allowed_any.setdefault(block.value, f"{key}: {block.why}")
                if is_data:
                    allowed.setdefault(block.value, f"{key}: {block.why}")
            if is_data and nbytes == entry["bytes_max"]:
                data[key] = block
    if data:
        _data_flags(data, knob, asked_threads, library, result)
        unknown = [k for k, b in data.items() if b.value is None]
        result["launch_expectation"] = (
            {"allowed": None, "reason": "; ".join(f"{k}: {data[k].why}" for k in unknown)}
            if unknown else {"allowed": dict(sorted(allowed.items())),
                             "allowed_unpaired": dict(sorted(allowed_any.items())), "reason": None})
        return result
    result["threads_reason"] = (
        f"{library} printed no per-collective algorithm on this rank (NCCL prints them on rank 0, "
        "from 2.19; RCCL likewise): the block depends on the algorithm")
    candidates = {key: block_of(log, comm, vendor, knob, *key.split("/")) for key in CANDIDATES}
    unknown = [k for k, b in candidates.items() if b.value is None]
    if unknown:
        result["launch_expectation"] = {"allowed": None, "reason": result["threads_reason"] + "; "
                                        + "; ".join(f"{k}: {candidates[k].why}" for k in unknown)}
    else:
        blocks = {b.value: f"{k}: {b.why}" for k, b in candidates.items()}
        result["launch_expectation"] = {
            "allowed": dict(sorted(blocks.items())),
            "reason": "algorithm not printed on this rank: any block of RING/TREE accepted"}
    return result


def _data_flags(data: dict[str, Block], knob: dict[str, Any], asked_threads: int | None,
                library: str, result: dict[str, Any]) -> None:
    result["per_algorithm"] = {k: {"block": b.value, "follows_knob": b.knob_effective, "why": b.why}
                               for k, b in sorted(data.items())}
    values = sorted({b.value for b in data.values() if b.value is not None})
    result["threads"] = values or None
    if not values:
        result["threads_reason"] = "; ".join(b.why for b in data.values())
    if asked_threads is None or knob["read"] is None:
        return
    for key, block in sorted(data.items()):
        if block.knob_effective is False:
            result["flags"].append(
                f"threads: asked {asked_threads} ({knob['name']}), but {block.why}: the thread "
                f"setting is a no-op for {key}")
        elif block.knob_effective and block.value is None:
            result["notes"].append(f"threads: {key} block not derivable: {block.why}")
