"""Blame the cause, not the victim: which rank a failed run waited for.

When one rank freezes, dies or never arrives, the others fail *waiting* for it: a store wait
times out naming the key the missing rank never set, a Gloo pair reports its peer's address
closing, a collective times out. Those errors come first (the culprit may not fail at all), so
the earliest error names a victim. Here each failure sign is read for what it waited on, and the
run's first failure goes to the rank the others waited for, with the evidence, the waiting
ranks' errors kept as consequences.

Pure: the watch loop feeds the evidence (tasks/lib/runrecord.py classify_line) and what it knows
of the ranks (addresses, ports seen by the start-up scan, start-up phases).

The messages read, with their sources:
- `DistStoreError: wait timeout after 60000ms, keys: /default_pg/0//cpu//0/3`: torch 2.13.0's
  TCPStore wait, from init_process_group with gloo (captured on this machine; the key's last
  part is the rank whose pair addresses gloo waits for, torch/csrc/distributed/c10d
  ProcessGroupGloo + gloo rendezvous Context::connectFullMesh).
- `retrieving ncclUniqueId from [0] via c10d key-value store`: ProcessGroupNCCL.cpp
  broadcastUniqueNCCLID (rank 0 sets the id, every other rank waits for it).
- `Read error [ADDR]:PORT: ...`, `Connection closed by peer [ADDR]:PORT`: gloo
  transport/tcp/pair.cc (peer_.str() is the peer's address and port).
- `Timed out waiting Nms for recv operation to complete`: gloo transport/tcp/unbound_buffer.cc.
- `Watchdog caught collective operation timeout`: ProcessGroupNCCL's watchdog.
- `The client socket has failed to connect to ... (ADDR, PORT)` / `has timed out after ...
  while trying to connect to (ADDR, PORT)`: c10d's socket.cpp, a store that does not answer.
"""
from __future__ import annotations

import re
from signal import SIGABRT
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

_STORE_TIMEOUT = re.compile(r"wait timeout after \d+ms, keys: (?P<keys>[^\s,]+(?:,\s*[^\s,]+)*)")
_NCCL_ID = re.compile(r"retrieving ncclUniqueId from \[(?P<root>\d+)\]")
_PEER = re.compile(r"(?:Read error|Write error|Connection closed by peer|Connection reset by peer)"
                   r" \[(?P<addr>[^\]\s]+)\]:(?P<port>\d+)")
_PEER_PLAIN = re.compile(r"Connection (?:closed|reset) by peer|Broken pipe")
_COLLECTIVE_TIMEOUT = re.compile(r"Timed out waiting \d+ms for (?:recv|send) operation"
                                 r"|Watchdog caught collective operation timeout"
                                 r"|remote process exited or there was a network error")
_STORE_CONNECT = re.compile(r"client socket has (?:failed to connect|timed out after \d+ms while "
                            r"trying to connect) to .*?\((?P<addr>[^,()\s]+), (?P<port>\d+)\)")
_RANK_PREFIX = re.compile(r"^\[rank(?P<rank>\d+)\]:")
_RANK_MARKS = re.compile(r"^(?:\[rank\d+\]:\s*)+")
_TRAIN_FAILED = re.compile(r"train: rank (?P<rank>\d+) failed: ")
# A line that reports an error (not a warning that mentions one): an exception's last line,
# torch's "[rankN]: XError: ..." or train's own "train: rank N failed: ...".
# torchrun's --tee marks a rank's lines "[rankN]:" and torch marks its uncaught exception the
# same way: a user's script's error arrives as "[rank2]:[rank2]: RuntimeError: ...".
_ERROR_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)*(?:[A-Za-z_][\w.]*(?:Error|Exception)|"
                         r"train: rank \d+ failed): ")


@dataclass(frozen=True)
class WaitSign:
    """What a failure line says its rank was waiting for."""

    kind: str                         # store-timeout | nccl-id | peer | collective | store-connect
    ranks: tuple[int, ...] = ()       # awaited ranks the message names
    peer: str | None = None           # "address:port" of the awaited peer
    detail: str = ""                  # the keys, the peer, the operation


def key_rank(key: str, world_size: int) -> int | None:
    """The rank a store key waits for: gloo's rendezvous keys end in the awaited rank
    ("/default_pg/0//cpu//0/3"); NCCL's unique-id key ("...//cuda//0") is set by rank 0."""
    parts = key.rstrip("/").split("/")
    if "cuda" in parts:
        return 0
    if "cpu" in parts and parts[-1].isdigit() and int(parts[-1]) < world_size:
        return int(parts[-1])
    return None


def waiting_sign(line: str, world_size: int) -> WaitSign | None:
    """The wait a failure line reports, or None when the line is no such failure."""
    if (match := _STORE_TIMEOUT.search(line)):
        keys = [k.strip() for k in match.group("keys").split(",") if k.strip()]
        ranks = tuple(sorted({r for k in keys if (r := key_rank(k, world_size)) is not None}))
        return WaitSign("store-timeout", ranks, None, ", ".join(keys)[:300])
    if (match := _NCCL_ID.search(line)):
        return WaitSign("nccl-id", (int(match.group("root")),), None, "ncclUniqueId")
    if (match := _STORE_CONNECT.search(line)):
        return WaitSign("store-connect", (), f"{match.group('addr')}:{match.group('port')}",
                        "the store")
    if (match := _PEER.search(line)):
        peer = f"{match.group('addr')}:{match.group('port')}"
        return WaitSign("peer", (), peer, peer)
    if (match := _COLLECTIVE_TIMEOUT.search(line)):
        return WaitSign("collective", (), None, match.group(0)[:120])
    if _PEER_PLAIN.search(line):
        return WaitSign("peer", (), None, "a peer")
    return None


def is_error_line(line: str) -> bool:
    return bool(_ERROR_LINE.search(line.strip()))


def line_rank(line: str) -> int | None:
    """The rank a rank's own line names: train's "train: rank N failed:" or torch's "[rankN]:"."""
    match = _TRAIN_FAILED.search(line) or _RANK_PREFIX.search(line.strip())
    return int(match.group("rank")) if match else None


@dataclass(frozen=True)
class Sign:
    """One failure sign as the blame reads it (runrecord.Evidence, without the import)."""

    node_rank: int
    at: float
    kind: str                  # rank-signal | rank-exit | rank-error | rank-waiting | ...
    rank: int | None
    exit_code: int | None
    line: str
    waits: WaitSign | None = None


@dataclass
class Culprit:
    """Who the run's first failure is pinned on, why, and what the others' errors were."""

    node_rank: int
    ranks: list[int]
    reason: str
    basis: str                 # own failure | store keys | ncclUniqueId | peer address | ...
    evidence: list[str] = field(default_factory=list)
    consequences: list[str] = field(default_factory=list)
    exit_code: int | None = None
    sign: Sign | None = None   # the sign chosen, when the culprit reported one itself


OWN_KINDS = ("rank-signal", "rank-error", "rank-exit", "lost")


def own_failures(signs: Sequence[Sign]) -> list[Sign]:
    """Signs of a rank failing on its own: killed by a signal, an error that is not a wait, an
    exit of a rank not known to have been waiting, a node lost."""
    waiting_ranks = {s.rank for s in signs if s.kind == "rank-waiting" and s.rank is not None}
    waiting_nodes = {s.node_rank for s in signs if s.kind == "rank-waiting" and s.rank is None}
    erring_ranks = {s.rank for s in signs if s.kind == "rank-error"}
    own = []
    for sign in signs:
        if sign.kind not in OWN_KINDS:
            continue
        if sign.kind == "rank-exit" and (sign.rank in waiting_ranks or (
                sign.node_rank in waiting_nodes and sign.rank not in erring_ranks)):
            continue  # torchrun's report of a rank that failed waiting: a consequence
        if sign.kind == "rank-signal" and sign.exit_code == -SIGABRT and sign.rank in waiting_ranks:
            continue  # gloo's "connection closed by peer", then C++ terminate: abort, a consequence
        own.append(sign)
    return own


def _first(signs: Sequence[Sign]) -> Sign:
    signalled = [s for s in signs if s.kind == "rank-signal"]
    return min(signalled or signs, key=lambda s: s.at)


def _consequence_lines(signs: Iterable[Sign], culprit_ranks: Iterable[int] = ()) -> list[str]:
    skip = set(culprit_ranks)
    signs = list(signs)
    # A traceback's last line repeats its rank's own report: kept only where no rank spoke.
    ranked_nodes = {s.node_rank for s in signs if s.kind == "rank-waiting" and s.rank is not None}
    lines, seen = [], set()
    for sign in sorted(signs, key=lambda s: s.at):
        if sign.kind != "rank-waiting" or sign.rank in skip:
            continue
        if sign.rank is None and sign.node_rank in ranked_nodes:
            continue
        who = f"rank {sign.rank}" if sign.rank is not None else f"node {sign.node_rank}"
        text = f"{who}: {sign.line.strip()[:300]}"
        key = (sign.rank, sign.node_rank, sign.waits.kind if sign.waits else None)
        if key not in seen:
            seen.add(key)
            lines.append(text)
    return lines


def own_reason(sign: Sign) -> str:
    if sign.kind == "lost":
        return sign.line
    if sign.kind == "rank-signal" and sign.exit_code is not None:
        return f"rank {sign.rank} killed by signal {-sign.exit_code}"
    if sign.rank is not None:
        message = ""
        if sign.kind == "rank-error":
            text = sign.line.strip()
            message = text.split(" failed: ", 1)[1] if " failed: " in text else \
                _RANK_MARKS.sub("", text).strip()
        return f"rank {sign.rank} failed" + (f": {message[:200]}" if message else "")
    return "a rank failed"


def find_culprit(signs: Sequence[Sign], *, nproc: int, world_size: int,
                 node_addresses: Mapping[int, str] | None = None,
                 rank_ports: Mapping[int, Iterable[str]] | None = None,
                 phases: Mapping[int, str] | None = None,
                 laggards: Sequence[int] = ()) -> Culprit | None:
    """The rank (and node) the failure is pinned on, or None when the signs name nobody (the
    caller falls back to the earliest sign)."""
    if not signs:
        return None
    waiting = [s for s in signs if s.kind == "rank-waiting"]
    own = own_failures(signs)
    if own:
        first = _first(own)
        ranks = [first.rank] if first.rank is not None else []
        reason = own_reason(first)
        phase = (phases or {}).get(first.rank) if first.rank is not None else None
        # A rank connected to its peers is past start-up (a script of yours that writes no
        # metrics never shows a step to the scan): only an earlier phase says something.
        if phase and phase not in ("group", "step"):
            reason = reason.replace(f"rank {first.rank} ",
                                    f"rank {first.rank} (start-up phase {phase}) ", 1)
        return Culprit(first.node_rank, ranks, reason, "own failure",
                       [first.line.strip()[:300]] if first.line else [],
                       _consequence_lines(waiting, ranks), first.exit_code, first)
    if not waiting:
        return None
    waiting_ranks = {s.rank for s in waiting if s.rank is not None}

    def pinned(ranks: Iterable[int], basis: str, why: str, evidence: list[str]) -> Culprit:
        ranks = sorted(set(ranks))
        node = ranks[0] // nproc
        who = ", ".join(f"rank {r} (node {r // nproc})" for r in ranks)
        phase = ""
        if phases and all(r in phases for r in ranks):
            phase = f" (start-up phase {', '.join(sorted({phases[r] for r in ranks}))})"
        waiters = sorted(waiting_ranks) or sorted({s.node_rank for s in waiting})
        by = (f"ranks {', '.join(map(str, waiters))}" if waiting_ranks
              else f"node(s) {', '.join(map(str, waiters))}")
        return Culprit(node, ranks, f"{who}{phase}: {why}; {by} failed waiting for it", basis,
                       evidence, _consequence_lines(waiting, ranks))

    # 1. Store keys and NCCL's unique id name the awaited rank outright.
    named: dict[int, list[str]] = {}
    for sign in waiting:
        if sign.waits and sign.waits.kind in ("store-timeout", "nccl-id"):
            for rank in sign.waits.ranks:
                named.setdefault(rank, []).append(sign.waits.detail)
    named = {rank: keys for rank, keys in named.items() if rank not in waiting_ranks}
    if named:
        keys = sorted({k for ks in named.values() for k in ks})
        store = any(s.waits and s.waits.kind == "store-timeout" for s in waiting)
        return pinned(named, "store keys" if store else "ncclUniqueId",
                      "never set what the others waited for in the store"
                      + (f" (missing key(s): {', '.join(keys)[:200]})" if store else
                         " (the NCCL unique id)"), [f"missing: {k}" for k in keys][:8])
    # 2. A peer's address and port: the rank whose socket it was, else that node's ranks that
    #    were not themselves waiting.
    peers = sorted({s.waits.peer for s in waiting if s.waits and s.waits.peer})
    if peers:
        owners = {rank for rank, ports in (rank_ports or {}).items()
                  for port in ports if port in peers}
        owners -= waiting_ranks
        if owners:
            return pinned(owners, "peer address", f"its socket ({', '.join(peers[:4])}) closed "
                          "or stopped answering", [f"peer {p}" for p in peers[:8]])
        addresses = {p.rsplit(":", 1)[0] for p in peers}
        nodes = sorted(n for n, address in (node_addresses or {}).items() if address in addresses)
        candidates = [r for n in nodes for r in range(n * nproc, (n + 1) * nproc)
                      if r not in waiting_ranks]
        if candidates:
            return pinned(candidates, "peer address",
                          f"the others lost their connection to {', '.join(peers[:4])}",
                          [f"peer {p}" for p in peers[:8]])
    # 3. Where the start-up watch saw ranks behind the others.
    lagging = [r for r in laggards if r not in waiting_ranks]
    if lagging:
        return pinned(lagging, "start-up phase", "behind the other ranks in start-up", [])
    # 4. Ranks that reported nothing while the others failed waiting: silent, so stuck.
    reported = waiting_ranks | {s.rank for s in signs if s.rank is not None}
    silent = [r for r in range(world_size) if r not in reported]
    if waiting_ranks and silent and len(silent) < len(waiting_ranks):
        return pinned(silent, "silent ranks", "reported no failure while the others failed "
                      "waiting (stuck, or stopped)", [])
    return None


# Bases that rest on inference rather than on what a rank or the store said.
WEAK_BASES = ("start-up phase", "silent ranks", "first sign", "progress")


def flight_out_of_step(findings: Mapping[str, object]) -> tuple[list[int], str | None]:
    """The ranks PyTorch's flight recorder shows out of step (behind the others' last
    collective, or absent from a group), from diagnostics.flight_recorder_findings, and its
    one-line summary; ([], None) when every rank reached the same collective."""
    groups = findings.get("groups") if isinstance(findings.get("groups"), Mapping) else {}
    for group in groups.values():  # type: ignore[union-attr]
        if not isinstance(group, Mapping):
            continue
        ranks = sorted({int(r) for r in [*group.get("behind", []), *group.get("never_seen", [])]
                        if isinstance(r, int) or (isinstance(r, str) and r.isdigit())})
        if ranks:
            return ranks, str(findings.get("summary"))
    return [], None


def pin_on_flight_recorder(record: Any, findings: Mapping[str, object] | None, status: str,
                           at: str) -> None:
    """Once a run's outputs are home (runrecord.RunRecord, duck-typed): the ranks PyTorch's
    flight recorder shows out of step become evidence of the first failure, and its culprit
    where that rested on inference only; a hung run gets a first failure too: the rank(s) the
    others waited for."""
    ranks, line = flight_out_of_step(findings) if findings else ([], None)
    failure = record.first_failure
    nproc = max(1, int(record.nproc_per_node or 1))
    if failure is None and status == "hung" and record.hang:
        ranks = ranks or [r for r in record.hang.get("first_stalled_ranks") or []
                          if isinstance(r, int)]
        if not ranks:
            return
        record.record_failure(ranks[0] // nproc, reason=f"rank(s) {', '.join(map(str, ranks))} "
                              "stopped advancing first: the others waited for them",
                              exit_code=None, at=at, last_lines=[])
        failure = record.first_failure
        failure.ranks = ranks
        failure.basis = "flight recorder" if line else "progress"
        failure.evidence = [f"flight recorder: {line}"] if line else []
        return
    if failure is None or not line:
        return
    failure.evidence.append(f"flight recorder: {line}")
    if ranks and (failure.basis in WEAK_BASES or not failure.ranks):
        failure.ranks, failure.basis = ranks, "flight recorder"
        failure.node_rank = ranks[0] // nproc
        failure.host = record.node(failure.node_rank).host


__all__ = ["WaitSign", "Sign", "Culprit", "waiting_sign", "line_rank", "key_rank",
           "find_culprit", "is_error_line", "own_failures", "flight_out_of_step", "WEAK_BASES",
           "pin_on_flight_recorder"]
