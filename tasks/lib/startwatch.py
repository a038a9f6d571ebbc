"""The start-up of a run, watched like its steps: phases every rank goes through before its
first step, seen from outside the ranks, and the rules that call a start-up stuck.

Pure: the node side (tasks/lib/diagnostics_node.py, mode "phases") reports the run's processes,
their states and TCP sockets; `parse_node_phases` reads that report, `StartupWatch` keeps when
each rank reached each phase (clock injected) and `check` says when to take stacks and stop.

Nothing here depends on the train package: the phases come from the node launcher's registry
entry, torchrun's and its workers' processes, and their connections to the master port (the
store torchrun hosts on node 0) and to each other (the process group's Gloo/NCCL sockets), which
any script started by torchrun shows. Metrics lines (train's own reports) only add "step".

Rules, checked in this order:
- stopped: a rank or torchrun process stopped or traced (state T/t) for STOPPED_S while the run
  starts: it cannot reach any phase.
- behind: a rank has not reached a phase BEHIND_S[phase] after the first rank reached it (peers
  wait for it: in torchrun's rendezvous, in the store, in the group's connect).
- stalled: no rank reached a new phase for STALL_S[phase], phase being the lowest one some
  rank still lacks (everyone stuck alike: a hung import, a filesystem, a launcher).
Where the ranks ahead wait inside the process group's timeout (phases worker, store, group), the
limit is capped at half the hang timeout, so stacks are taken before that timeout ends them.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

PHASES = ("launcher", "torchrun", "rendezvous", "worker", "store", "group", "step")
PHASE_TEXT = {
    "launcher": "node launcher up",
    "torchrun": "torchrun started",
    "rendezvous": "torchrun joined the store",
    "worker": "rank process started",
    "store": "rank joined the store",
    "group": "rank connected to its peers (process group)",
    "step": "first step",
}
# A rank may reach a phase this long after the first rank that reached it (seconds): launchers
# start together, agents import torch at their own pace, workers spawn together once every agent
# joined, a worker's imports and its script's code before init_process_group take their time,
# the group connects as soon as the last rank joined the store.
BEHIND_S = {"torchrun": 30.0, "rendezvous": 60.0, "worker": 30.0, "store": 60.0, "group": 30.0}
# No rank reached a new phase for this long while some rank still lacks `phase` (seconds).
# "group" is left to the hang watchdog's start-up limit: a script may build its model before its
# first collective (NCCL connects lazily), and nobody waits on a laggard then.
STALL_S = {"torchrun": 60.0, "rendezvous": 180.0, "worker": 120.0, "store": 300.0}
# Phases whose laggards keep the others waiting inside the process group's timeout.
IN_GROUP_TIMEOUT = ("worker", "store", "group")
STOPPED_STATES = {"T": "stopped", "t": "traced"}
STOPPED_S = 4.0
MIN_CAP_S = 10.0


def phase_index(name: str) -> int:
    return PHASES.index(name)


@dataclass(frozen=True)
class ProcessView:
    """One process of the run on a node, as the phase scan saw it."""

    pid: int
    state: str
    store: str | None = None     # established | syn_sent | listen | ... | None (no socket)
    peers: int = 0               # established TCP connections not to the store
    listening: int = 0
    ports: tuple[str, ...] = ()  # "address:port" of its established/listening sockets


@dataclass(frozen=True)
class NodePhases:
    """What one node's phase scan reported, kept to that node's own ranks."""

    node_rank: int
    launcher: str | None                     # registry state: starting | running | exited ...
    torchrun: tuple[ProcessView, ...]
    ranks: dict[int, ProcessView]
    progress: dict[int, int]                 # rank -> metrics lines written


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _view(proc: Mapping[str, Any]) -> ProcessView | None:
    pid = _int(proc.get("pid"))
    state = proc.get("state")
    if pid is None or not isinstance(state, str) or len(state) != 1:
        return None
    store = proc.get("store")
    ports = proc.get("ports") if isinstance(proc.get("ports"), list) else []
    return ProcessView(pid=pid, state=state,
                       store=store if isinstance(store, str) and len(store) <= 16 else None,
                       peers=_int(proc.get("peers")) or 0, listening=_int(proc.get("listening")) or 0,
                       ports=tuple(str(p)[:64] for p in ports[:64] if isinstance(p, str)))


def parse_node_phases(data: Mapping[str, Any], node_rank: int, ranks: Iterable[int]) -> NodePhases:
    """A node's phase report, trusted for nothing: only well-formed entries about this node's
    own ranks are kept (a node cannot move another node's ranks)."""
    own = set(ranks)
    registry = data.get("registry") if isinstance(data.get("registry"), list) else []
    states = [e.get("state") for e in registry if isinstance(e, Mapping)]
    launcher = next((s for s in states if isinstance(s, str)), None)
    torchrun: list[ProcessView] = []
    by_rank: dict[int, ProcessView] = {}
    processes = data.get("processes") if isinstance(data.get("processes"), list) else []
    for proc in processes:
        if not isinstance(proc, Mapping):
            continue
        view = _view(proc)
        if view is None:
            continue
        if proc.get("role") == "torchrun":
            torchrun.append(view)
        elif proc.get("role") == "rank" and _int(proc.get("rank")) in own:
            rank = proc["rank"]
            # Two processes claiming one rank (a wrapper, a respawn): keep the furthest one.
            if rank not in by_rank or _progress_key(view) > _progress_key(by_rank[rank]):
                by_rank[rank] = view
    progress: dict[int, int] = {}
    raw = data.get("progress") if isinstance(data.get("progress"), Mapping) else {}
    for key, value in raw.items():
        rank = int(key) if isinstance(key, str) and key.isdigit() else None
        lines = _int(value.get("lines")) if isinstance(value, Mapping) else None
        if rank in own and lines is not None:
            progress[rank] = lines
    return NodePhases(node_rank, launcher, tuple(torchrun), by_rank, progress)


def _progress_key(view: ProcessView) -> tuple[int, int]:
    return (view.store == "established", view.peers)


def node_phase(node: NodePhases) -> int:
    """The phase a node's launcher and torchrun reached (before its ranks exist)."""
    phase = phase_index("launcher")
    if node.torchrun:
        phase = phase_index("torchrun")
        if any(p.store in ("established", "listen") for p in node.torchrun):
            phase = phase_index("rendezvous")
    return phase


def rank_phase(node: NodePhases, rank: int) -> int:
    phase = node_phase(node)
    view = node.ranks.get(rank)
    if view is not None:
        phase = max(phase, phase_index("worker"))
        if view.store == "established":
            phase = phase_index("store")
        if view.peers > 0:
            phase = phase_index("group")
    if node.progress.get(rank, 0) > 0:
        phase = phase_index("step")
    return phase


@dataclass
class RankStart:
    rank: int
    node_rank: int
    phase: int = 0                                   # PHASES index reached (highest seen)
    reached_at: dict[int, float] = field(default_factory=dict)
    pid: int | None = None
    state: str | None = None                         # process state at the last scan
    stopped_since: float | None = None
    store: str | None = None
    ports: tuple[str, ...] = ()                      # its sockets' "address:port", last seen


@dataclass(frozen=True)
class StartupStall:
    """Why the watch called the start-up stuck: run.json's `hang.startup` record."""

    rule: str                      # stopped | behind | stalled
    phase: str                     # the phase the blamed ranks are in
    missing: str                   # the phase they did not reach
    ranks: tuple[int, ...]
    nodes: tuple[int, ...]
    limit_s: float
    waited_s: float
    detail: str
    phases: dict[int, str]
    detected_at: float

    def headline(self) -> str:
        who = ", ".join(f"rank {r}" for r in self.ranks[:8]) + (
            f" and {len(self.ranks) - 8} more" if len(self.ranks) > 8 else "")
        nodes = ", ".join(str(n) for n in self.nodes)
        return (f"{who} (node{'s' if len(self.nodes) > 1 else ''} {nodes}) stuck in start-up "
                f"phase '{self.phase}' ({PHASE_TEXT[self.phase]}), never reached "
                f"'{self.missing}': {self.detail}")

    def as_dict(self) -> dict[str, Any]:
        """For run.json (only durations: the clock is the caller's)."""
        return {"rule": self.rule, "phase": self.phase, "missing": self.missing,
                "ranks": list(self.ranks), "nodes": list(self.nodes),
                "limit_s": round(self.limit_s, 3), "waited_s": round(self.waited_s, 3),
                "detail": self.detail, "headline": self.headline(),
                "phases": {str(rank): name for rank, name in sorted(self.phases.items())}}


@dataclass
class StartupWatch:
    """Feed it every node's phase scan with `observe`, ask `check(now)` on every watch tick."""

    nnodes: int
    nproc: int
    started_at: float
    hang_timeout_s: float | None = None       # caps the limits where peers wait in a timeout
    behind_s: Mapping[str, float] = field(default_factory=lambda: dict(BEHIND_S))
    stall_s: Mapping[str, float] = field(default_factory=lambda: dict(STALL_S))
    stopped_s: float = STOPPED_S
    ranks: dict[int, RankStart] = field(default_factory=dict)
    last_advance_at: float = field(init=False)
    fired: StartupStall | None = field(default=None, init=False)
    torchrun_store: dict[int, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.last_advance_at = self.started_at
        for node in range(self.nnodes):
            for local in range(self.nproc):
                rank = node * self.nproc + local
                # start_launchers returned: every launcher is up.
                self.ranks[rank] = RankStart(rank, node, 0, {0: self.started_at})

    def node_ranks(self, node_rank: int) -> list[int]:
        return list(range(node_rank * self.nproc, (node_rank + 1) * self.nproc))

    @property
    def done(self) -> bool:
        """Every rank connected to its peers, or one made a step: the step watchdog's turn."""
        return all(r.phase >= phase_index("group") for r in self.ranks.values()) or any(
            r.phase >= phase_index("step") for r in self.ranks.values())

    def observe(self, node: NodePhases, now: float) -> list[int]:
        """Record one node's scan; returns the ranks that reached a new phase."""
        advanced = []
        stores = [p.store for p in node.torchrun]
        self.torchrun_store[node.node_rank] = next(
            (s for s in ("established", "listen", "syn_sent", "syn_recv") if s in stores),
            stores[0] if stores else None)
        stopped_agent = next((p for p in node.torchrun if p.state in STOPPED_STATES), None)
        for rank in self.node_ranks(node.node_rank):
            entry = self.ranks[rank]
            phase = rank_phase(node, rank)
            if phase > entry.phase:
                for reached in range(entry.phase + 1, phase + 1):
                    entry.reached_at.setdefault(reached, now)
                entry.phase = phase
                advanced.append(rank)
            view = node.ranks.get(rank)
            # Before its rank exists, a rank's process is its node's torchrun.
            shown = view or (stopped_agent if phase < phase_index("worker") else None)
            entry.pid = shown.pid if shown else None
            entry.state = shown.state if shown else None
            entry.store = view.store if view else None
            if view is not None and view.ports:
                entry.ports = view.ports
            if entry.state in STOPPED_STATES:
                entry.stopped_since = entry.stopped_since if entry.stopped_since is not None else now
            else:
                entry.stopped_since = None
        if advanced:
            self.last_advance_at = max(self.last_advance_at, now)
        return advanced

    def rank_ports(self) -> dict[int, list[str]]:
        """Each rank's sockets as last seen: a peer's "address:port" in an error names a rank."""
        return {rank: list(entry.ports) for rank, entry in self.ranks.items() if entry.ports}

    def phases(self) -> dict[int, str]:
        return {rank: PHASES[entry.phase] for rank, entry in sorted(self.ranks.items())}

    def laggards(self) -> list[int]:
        """The ranks at the lowest phase, when some rank is further (else [])."""
        low = min(r.phase for r in self.ranks.values())
        high = max(r.phase for r in self.ranks.values())
        return [] if low == high else sorted(r.rank for r in self.ranks.values() if r.phase == low)

    def limit(self, table: Mapping[str, float], phase: str) -> float:
        limit = table[phase]
        if phase in IN_GROUP_TIMEOUT and self.hang_timeout_s and self.hang_timeout_s > 0:
            limit = min(limit, max(MIN_CAP_S, 0.5 * self.hang_timeout_s))
        return limit

    def check(self, now: float) -> StartupStall | None:
        """A StartupStall once a rule fires (then always the same one), else None."""
        if self.fired is not None:
            return self.fired
        if self.done:
            return None
        stall = self._stopped(now) or self._behind(now) or self._stalled(now)
        self.fired = stall
        return stall

    def _stall(self, rule: str, ranks: list[int], missing: int, limit: float, waited: float,
               detail: str, now: float) -> StartupStall:
        phase = min(self.ranks[r].phase for r in ranks)
        return StartupStall(rule=rule, phase=PHASES[phase], missing=PHASES[missing],
                            ranks=tuple(sorted(ranks)),
                            nodes=tuple(sorted({self.ranks[r].node_rank for r in ranks})),
                            limit_s=limit, waited_s=waited, detail=detail, phases=self.phases(),
                            detected_at=now)

    def _stopped(self, now: float) -> StartupStall | None:
        stopped = [r for r in self.ranks.values()
                   if r.stopped_since is not None and now - r.stopped_since >= self.stopped_s]
        if not stopped:
            return None
        first = min(stopped, key=lambda r: (r.stopped_since, r.rank))
        ranks = [r.rank for r in stopped]
        pids = ", ".join(sorted({f"pid {r.pid} state {r.state} ({STOPPED_STATES[r.state]})"
                                 for r in stopped if r.state}))
        what = "its process" if first.phase >= phase_index("worker") else "torchrun"
        return self._stall("stopped", ranks, min(first.phase + 1, len(PHASES) - 1),
                           self.stopped_s, now - first.stopped_since,
                           f"{what} is stopped ({pids}) for {now - first.stopped_since:.0f} s: "
                           "a stopped process reaches no phase", now)

    def _behind(self, now: float) -> StartupStall | None:
        for name in ("torchrun", "rendezvous", "worker", "store", "group"):
            index = phase_index(name)
            ahead = [r for r in self.ranks.values() if r.phase >= index]
            behind = [r.rank for r in self.ranks.values() if r.phase < index]
            if not ahead or not behind:
                continue
            first = min(ahead, key=lambda r: (r.reached_at.get(index, now), r.rank))
            waited = now - first.reached_at.get(index, now)
            limit = self.limit(self.behind_s, name)
            if waited < limit:
                continue
            # The lowest of those behind: the ones the others wait for.
            low = min(self.ranks[r].phase for r in behind)
            culprits = [r for r in behind if self.ranks[r].phase == low]
            detail = (f"rank {first.rank} (node {first.node_rank}) reached '{name}' "
                      f"{waited:.0f} s before (limit {limit:g} s)")
            agent = self._agent_note(culprits)
            return self._stall("behind", culprits, low + 1, limit, waited,
                               detail + (f"; {agent}" if agent else ""), now)
        return None

    def _stalled(self, now: float) -> StartupStall | None:
        low = min(r.phase for r in self.ranks.values())
        missing = low + 1
        if missing >= len(PHASES) or PHASES[missing] not in self.stall_s:
            return None
        limit = self.limit(self.stall_s, PHASES[missing])
        waited = now - self.last_advance_at
        if waited < limit:
            return None
        culprits = [r.rank for r in self.ranks.values() if r.phase == low]
        agent = self._agent_note(culprits)
        return self._stall("stalled", culprits, missing, limit, waited,
                           f"no rank reached a new phase for {waited:.0f} s (limit {limit:g} s)"
                           + (f"; {agent}" if agent else ""), now)

    def _agent_note(self, ranks: Iterable[int]) -> str:
        """torchrun's store connection on the blamed nodes, where it says why."""
        notes = []
        for node in sorted({self.ranks[r].node_rank for r in ranks}):
            state = self.torchrun_store.get(node)
            if state in ("syn_sent", "syn_recv"):
                notes.append(f"node {node}'s torchrun has no answer from the master port "
                             f"(its connection is {state.upper()}: a firewall or a wrong address)")
        return "; ".join(notes)


__all__ = ["PHASES", "PHASE_TEXT", "BEHIND_S", "STALL_S", "StartupWatch", "StartupStall",
           "NodePhases", "ProcessView", "parse_node_phases", "node_phase", "rank_phase"]
