"""Watching a started run: every node's log streamed to the controller, progress and failure
evidence kept, the registry read as a heartbeat, fail-fast (the first failure stops every node)
and the hang watchdog. A launch starts the run (tasks/run/lifecycle.py), then hands it to a
Watcher.
"""
from __future__ import annotations

import posixpath
import re
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from tasks.lib.blame import Culprit, find_culprit, own_failures
from tasks.lib.console import write_plain
from tasks.lib.entry import count_rank_lines
from tasks.lib.quoting import sh_quote
from tasks.lib.registry import parse_status, status_command
from tasks.lib.nodestream import LineSplitter
from tasks.lib.runrecord import (
    AGENT_DEATH_SIGNAL,
    FAILURE_HINTS,
    FINAL_NODE_STATES,
    Evidence,
    choose_first_failure,
    classify_line,
    exit_reason,
    failure_reason,
    is_failure_sign,
    now_iso,
    last_progress,
)
from tasks.lib.runspec import log_file_name
from tasks.lib.startwatch import StartupStall, StartupWatch
from tasks.lib.watchdog import HANG_STEP_MULTIPLE
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, on_each
from tasks.run.hangwatch import HangMonitor
from tasks.run.plan import Plan
from tasks.lib.untrusted import terminal_text
from tasks.runs import stop_run
from tasks.cluster.session import ClusterSession

# A failure is rarely alone: the ranks of other nodes fail right after, as victims. Waiting this
# long after the first sign lets the real culprit's report (a rank killed by a signal) arrive.
FAILURE_SETTLE_S = 2.0
# When every sign so far is a rank failing *waiting* for a peer (store timeout, closed pair), the
# cause may still be on its way (a rank that dies a moment later): wait this long for it.
CONSEQUENCE_SETTLE_S = 5.0
FAIL_FAST_GRACE_S = 3.0        # SIGTERM -> SIGKILL when stopping the survivors of a failure
HEARTBEAT_S = 2.0              # how often each node's registry state is read while attached
HEARTBEAT_TIMEOUT_S = 15.0
# A node counts as lost (and the run as failed) when its registry could not be read for this
# long: a loaded node answers slowly, a dead one never; the NCCL timeout is minutes away.
LOST_AFTER_S = 30.0
PROGRESS_LINE_S = 10.0         # at most this often, a "progress:" line with every node's steps
# How often a node's `tail --pid` looks whether the launcher is still there (one kill(pid, 0)
# per look; lines themselves come at once, through inotify): the launch's end is seen this late.
TAIL_POLL_S = 0.1
# After the registry says every node ended, a tail may still be delivering the last lines (it
# notices the launcher's exit at its next poll): wait this long for the streams to end.
TAIL_DRAIN_S = 5.0
STREAM_CHECK_S = 0.02
# The node launcher's last line (templates/node_launcher.sh.j2), written after it recorded the
# end in the registry.
LAUNCHER_END_HINT = "[launcher] node "
LAUNCHER_END = re.compile(r"\[launcher\] node ([0-9]+): ended with exit code -?[0-9]+ \(")
# run.json keeps a failed node's last lines, each cut to this (a node's line may be 64 Ki long).
LAST_LINE_CHARS = 2000


def next_move(failure_seen: bool, all_ended: bool, stop_requested: bool,
              first_seen: float | None, now: float, settle_s: float = FAILURE_SETTLE_S) -> str:
    """What the watch loop does this turn, from one snapshot of its state: "fail-fast" (stop
    every node, name the culprit), "end" (every node ended, nothing left to decide) or "wait".
    A failure is acted on once it settled (settle_s), or at once when no node is left to
    report more."""
    if failure_seen and not stop_requested:
        assert first_seen is not None
        if all_ended or now - first_seen >= settle_s:
            return "fail-fast"
    # Ended with a failure not yet acted on is not an end: the next turn names the culprit.
    if all_ended and (stop_requested or not failure_seen):
        return "end"
    return "wait"


def node_log_path(plan: Plan, node_rank: int) -> str:
    return posixpath.join(plan.output_dir, f"node_{node_rank}_output.log")


def tail_command(log_path: str, launcher_pid: int | str, from_start: bool = True) -> str:
    """Stream a node's output log until its launcher exits: from its first line, or (a stream
    reopened after its SSH channel broke) from its end.

    -F waits for the file to appear; --pid ends tail once the launcher is gone and the file has
    been read to the end, so nothing the node wrote is cut off.
    """
    start = "+1" if from_start else "0"
    return (f"exec tail -n {start} -F -s {TAIL_POLL_S} --pid={sh_quote(launcher_pid)} "
            f"{sh_quote(log_path)} 2>/dev/null")


# -- the watcher -------------------------------------------------------------------------------------

@dataclass
class NodeWatch:
    node: Node
    rank: int
    pid: int
    log_file: Any
    started: float
    lines: deque = field(default_factory=lambda: deque(maxlen=40))
    steps_done: int | None = None
    steps_total: int | None = None
    tail_done: threading.Event = field(default_factory=threading.Event)
    # The launcher's own last line came through the stream: everything it wrote is here. The
    # tail itself ends only once the launcher's pid is gone, and a launcher whose parent died
    # stays a zombie until init reaps it: seconds where init is a container's or a sandbox's.
    end_seen: threading.Event = field(default_factory=threading.Event)
    tail_error: BaseException | None = None
    tail_checked: bool = False     # the registry was read once after the stream ended
    tail_restarts: int = 0
    ended_at: float | None = None
    state: str | None = None
    exit_code: int | None = None
    last_ok: float = field(default_factory=time.monotonic)  # last successful registry read
    stopping_from_outside: bool = False
    log_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    @property
    def stream_complete(self) -> bool:
        return self.tail_done.is_set() or self.end_seen.is_set()

    def write_lines(self, block: str) -> bool:
        """Append lines (joined, without the last newline) to the controller's log; False once
        it is closed (a stream that outlived the wait: the lines are still in the node's own
        output log)."""
        with self.log_lock:
            if self.log_file.closed:
                return False
            self.log_file.write(block + "\n")
            self.log_file.flush()
            return True

    def close_log(self) -> None:
        with self.log_lock:
            try:
                self.log_file.close()
            except OSError:
                pass


class Watcher:
    """Streams every node's log, keeps progress and failure evidence, decides how the run ends."""

    def __init__(self, session: ClusterSession, plan: Plan, pids: Mapping[int, int],
                 console: Console):
        self.session = session
        self.plan = plan
        self.console = console
        self.lock = threading.Lock()
        self.evidence: list[Evidence] = []
        # Error lines without a rank (a traceback's last line): what the blame reads beside.
        self.context: list[Evidence] = []
        self.nproc = int(plan.nproc)
        logs_dir = plan.run_dir / "logs"
        logs_dir.mkdir(parents=True, exist_ok=True)
        now = time.monotonic()
        self.watches: list[NodeWatch] = []
        for node in session.nodes:
            name = log_file_name(node.index, plan.started_wall)
            plan.record.node(node.index).log = f"logs/{name}"
            handle = open(logs_dir / name, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
            self.watches.append(NodeWatch(node=node, rank=node.index, pid=pids[node.index],
                                          log_file=handle, started=now))
        self.stop_requested_at: float | None = None
        self.last_progress_print = now
        self.hung = False
        self.done = threading.Event()
        self.heartbeat: threading.Thread | None = None
        self.hang = None
        if plan.spec.hang_timeout > 0:
            # Armed as the launchers start: start-up phases first (processes and sockets seen
            # from outside, so any script under torchrun is covered), then steps. Imports,
            # rendezvous and calibration come before the first metrics line: the step
            # watchdog allows more before it.
            startup = StartupWatch(nnodes=len(session.nodes), nproc=self.nproc, started_at=now,
                                   hang_timeout_s=plan.spec.hang_timeout)
            master_port = plan.record.master.get("port")
            self.hang = HangMonitor(session, plan.run_id, plan.output_dir, plan.spec.hang_timeout,
                                    world_size=plan.record.world_size, started_at=now,
                                    startup_timeout_s=max(plan.spec.hang_timeout, 300.0),
                                    step_multiple=HANG_STEP_MULTIPLE if plan.spec.hang_auto else None,
                                    startup=startup,
                                    master_port=master_port if isinstance(master_port, int) else None,
                                    container=(session.settings.docker.container
                                               if plan.spec.docker else None),
                                    line_progress=plan.spec.entry is not None)
        self.last_progress_text = ""

    # the tail threads ---------------------------------------------------------------------------

    def start_tails(self) -> None:
        for watch in self.watches:
            self._start_tail(watch, from_start=True)

    def _start_tail(self, watch: NodeWatch, from_start: bool) -> None:
        watch.tail_done.clear()
        watch.tail_checked = False
        thread = threading.Thread(target=self._tail, args=(watch, from_start), daemon=True,
                                  name=f"tail-node{watch.rank}")
        thread.start()

    def _tail(self, watch: NodeWatch, from_start: bool) -> None:
        splitter = LineSplitter(lambda lines: self._on_lines(watch, lines))
        command = tail_command(node_log_path(self.plan, watch.rank), watch.pid, from_start)
        try:
            watch.node.stream(command, splitter.feed)
        except BaseException as err:  # noqa: BLE001 - reported through the heartbeat
            watch.tail_error = err
        finally:
            splitter.close()
            watch.tail_done.set()

    def _on_lines(self, watch: NodeWatch, lines: list[str]) -> None:
        """A batch of a node's lines (one per chunk that arrived): the log, progress, failure
        evidence and the console, at the rate a node can send (a verbose or hostile node must not
        delay fail-fast). Work per line is in C (str.find, replace, join); a line is looked at
        in Python only where the block holds a progress or failure sign."""
        now = time.monotonic()
        block = "\n".join(lines)
        watch.write_lines(block)
        watch.lines.extend(lines)
        if (progress := last_progress(block)):
            watch.steps_done, watch.steps_total = progress
        if self.hang is not None and self.hang.line_progress:
            self.hang.count_lines(count_rank_lines(block))
        if LAUNCHER_END_HINT in block and any(
                (m := LAUNCHER_END.match(line)) and int(m.group(1)) == watch.rank for line in lines):
            watch.end_seen.set()
        if any(hint in block for hint in FAILURE_HINTS):
            for line in lines:
                if AGENT_DEATH_SIGNAL.search(line):
                    watch.stopping_from_outside = True
                evidence = classify_line(line, watch.rank, self.nproc, now,
                                         watch.stopping_from_outside, self.plan.record.world_size)
                if evidence is not None:
                    with self.lock:
                        (self.evidence if is_failure_sign(evidence)
                         else self.context).append(evidence)
        prefix = f"[node {watch.rank}] "
        write_plain(self.console, terminal_text(prefix + block.replace("\n", "\n" + prefix),
                                                keep_newlines=True) + "\n")

    # the main loop --------------------------------------------------------------------------------

    def poll_states(self, watches: Sequence[NodeWatch]) -> None:
        """Read the registry state of these nodes (concurrently); record endings and losses."""
        command = status_command(self.session.settings.cluster.registry_dir, self.plan.run_id,
                                 recent=1)

        def read(node: Node) -> Any:
            return parse_status(node.run(command, timeout=HEARTBEAT_TIMEOUT_S).stdout)

        results = on_each([w.node for w in watches], read)
        now = time.monotonic()
        with self.lock:
            for watch in watches:
                if watch.node in results.failed:
                    if now - watch.last_ok >= LOST_AFTER_S and not watch.ended:
                        watch.state, watch.ended_at = "lost", now
                        self.evidence.append(Evidence(
                            watch.rank, now, "lost", None, None,
                            f"no answer for {now - watch.last_ok:.0f} s: "
                            f"{describe_error(results.failed[watch.node])}"))
                    continue
                watch.last_ok = now
                mine = [r for r in results.ok[watch.node]
                        if r.run_id == self.plan.run_id and r.node_rank == watch.rank]
                if mine:
                    self._update(watch, mine[0], now)

    def _update(self, watch: NodeWatch, record: Any, now: float) -> None:
        if record.steps_done is not None and (watch.steps_done or 0) < record.steps_done:
            watch.steps_done = record.steps_done
        if watch.ended or (record.state not in FINAL_NODE_STATES and record.pid_alive):
            return
        watch.state = record.state if record.state in FINAL_NODE_STATES else "killed"
        watch.exit_code = record.exit_code
        watch.ended_at = now
        # "stopped": someone ran `fab stop`; that ends the run but is nobody's failure.
        if watch.state != "stopped" and watch.exit_code != 0 and self.stop_requested_at is None:
            self.evidence.append(Evidence(watch.rank, now, "node-exit", None, watch.exit_code,
                                          exit_reason(watch.state, watch.exit_code)))

    def _heartbeat(self) -> None:
        """Every HEARTBEAT_S, the registry of every open node, off the main loop (a slow node
        must not delay fail-fast decisions about the others)."""
        while not self.done.wait(HEARTBEAT_S):
            open_watches = [w for w in self.watches if not w.ended]
            if not open_watches:
                return
            try:
                self.poll_states(open_watches)
            except Exception as err:  # noqa: BLE001 - the next beat tries again
                self.console.out(f"launch: heartbeat: {err}", highlight=False)

    def wait(self) -> str:
        """Until every node ended and its log stream delivered its last lines; returns
        "succeeded", "failed", "stopped" or "hung"."""
        self.heartbeat = threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat")
        self.heartbeat.start()
        if self.hang is not None:
            self.hang.start(lambda: [w.node for w in self.watches if not w.ended])
        try:
            status = self._wait()
        finally:
            self.done.set()
            if self.hang is not None:
                self.hang.close()
        for rank in self.drain():
            self.console.out(f"launch: the log stream of node {rank} did not end within "
                             f"{TAIL_DRAIN_S:.0f} s; its last lines are in the node's output log",
                             highlight=False)
        return status

    def drain(self, timeout: float = TAIL_DRAIN_S) -> list[int]:
        """The registry may report a node's end before its tail delivered the last lines: wait
        (bounded: a lost node's stream may never end) for every stream and the heartbeat.
        Returns the node ranks whose stream was still open."""
        if self.heartbeat is not None:
            self.heartbeat.join(HEARTBEAT_TIMEOUT_S + 1)
        self.wait_for_streams(timeout)
        return [w.rank for w in self.watches if not w.stream_complete]

    def wait_for_streams(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for watch in self.watches:
            while not watch.stream_complete and time.monotonic() < deadline:
                watch.tail_done.wait(min(STREAM_CHECK_S, max(0.0, deadline - time.monotonic())))

    def _wait(self) -> str:
        first_seen: float | None = None
        while True:
            open_watches = [w for w in self.watches if not w.ended]
            # A stream ends when its launcher has exited (look at the registry at once) or when
            # its SSH channel broke (the heartbeat decides; the stream is reopened meanwhile).
            tails_finished = [w for w in open_watches
                              if w.stream_complete and not w.tail_checked]
            if tails_finished:
                self.poll_states(tails_finished)
                for watch in tails_finished:
                    watch.tail_checked = True
                    if (not watch.ended and watch.tail_done.is_set() and watch.tail_error is not None
                            and watch.tail_restarts < 3):
                        watch.tail_restarts += 1
                        self.console.out(
                            f"launch: log stream of node {watch.rank} broke "
                            f"({describe_error(watch.tail_error)}); reopening it (lines in "
                            "between are in the node's output log)", highlight=False)
                        watch.tail_error = None
                        self._start_tail(watch, from_start=False)
            # One snapshot decides this turn: the heartbeat thread may end the last node between
            # two separate reads, and the loop must not end a failed run without naming a culprit.
            with self.lock:
                evidence = list(self.evidence)
                all_ended = all(w.ended for w in self.watches)
            first_seen = first_seen or (min(e.at for e in evidence) if evidence else None)
            # Only ranks that failed waiting for a peer so far: give the cause time to show.
            settle = FAILURE_SETTLE_S if own_failures(evidence) else CONSEQUENCE_SETTLE_S
            move = next_move(bool(evidence), all_ended, self.stop_requested_at is not None,
                             first_seen, time.monotonic(), settle)
            if move == "fail-fast":
                if all_ended:
                    # Every launcher is gone; the lines that name the rank that died (a signal,
                    # not a peer's error) may still be on their way through the streams.
                    self.wait_for_streams(FAILURE_SETTLE_S)
                    with self.lock:
                        evidence = list(self.evidence)
                self.fail_fast(self.culprit(evidence))
            if self.hang is not None and self.stop_requested_at is None:
                report = self.hang.tick([w.node for w in self.watches if not w.ended],
                                        time.monotonic())
                if report is not None:
                    self.on_hang(report)
            if move == "end":
                break
            self.print_progress()
            time.sleep(0.1)
        if self.hung:
            return "hung"
        if self.stop_requested_at is not None:
            return "failed"
        if all(w.state == "exited" and w.exit_code == 0 for w in self.watches):
            return "succeeded"
        if any(w.state == "stopped" for w in self.watches):
            return "stopped"
        return "failed"

    def on_hang(self, report: Any) -> None:
        """No rank advanced for hang_timeout seconds: diagnostics first (stacks of the live
        processes), then stop everything; hung ranks ignore SIGTERM, so the grace is short."""
        container = self.session.settings.docker.container if self.plan.spec.docker else None
        assert self.hang is not None
        self.hung = True
        self.stop_requested_at = time.monotonic()
        try:
            try:
                self.plan.record.hang = self.hang.diagnose(
                    report, self.plan.run_dir, container=container, console=self.console)
            except Exception as err:  # noqa: BLE001 - stop anyway
                self.plan.record.hang = {
                    **report.as_dict(),
                    "diagnostics_error": f"{type(err).__name__}: {str(err)[:300]}"}
                self.console.out(f"launch: hang diagnostics failed ({type(err).__name__}: "
                                 f"{terminal_text(str(err)[:300])}); stopping the run anyway",
                                 highlight=False)
            if isinstance(report, StartupStall):
                # Stuck before its first step: the run's first failure is the rank that never
                # got on.
                if isinstance(self.plan.record.hang, dict):
                    self.plan.record.hang["startup"] = report.as_dict()
                node = report.nodes[0]
                self.plan.record.record_failure(
                    node, reason=report.headline(), exit_code=None, at=now_iso(),
                    last_lines=[line[:LAST_LINE_CHARS] for line in self.watches[node].lines])
                failure = self.plan.record.first_failure
                failure.ranks = list(report.ranks)  # type: ignore[union-attr]
        finally:
            self.stop_all()

    def stop_all(self, *, signal_nodes: bool = True) -> None:
        """Stop every node's launcher (SIGTERM, grace, SIGKILL), name each host where that
        failed, then read the registry until every launcher recorded its end."""
        if signal_nodes:
            results = stop_run(self.session, self.plan.run_id, FAIL_FAST_GRACE_S)
            for node, error in results.failed.items():
                self.console.out(f"launch: stopping node {node.index} ({node.label}) failed: "
                                 f"{describe_error(error)}", highlight=False)
        self.final_look()

    def final_look(self) -> None:
        """After a stop: read the registry until every launcher recorded its end (or give up)."""
        deadline = time.monotonic() + FAIL_FAST_GRACE_S + 10
        while time.monotonic() < deadline and not all(w.ended for w in self.watches):
            self.poll_states([w for w in self.watches if not w.ended])
            time.sleep(0.3)
        for watch in self.watches:
            if not watch.ended:
                watch.state, watch.ended_at = "lost", time.monotonic()

    def culprit(self, evidence: list[Evidence]) -> Culprit:
        """Who the failure is pinned on: the rank the others waited for (tasks/lib/blame.py),
        else the earliest sign (a signal death first)."""
        with self.lock:
            context = list(self.context)
        ports: dict[int, list[str]] = {}
        phases: dict[int, str] = {}
        laggards: list[int] = []
        startup = self.hang.startup if self.hang is not None else None
        if startup is not None:
            with self.hang.lock:  # type: ignore[union-attr]
                ports = startup.rank_ports()
                phases = startup.phases()
                laggards = startup.laggards()
        addresses = {node.node_rank: node.address for node in self.plan.record.nodes
                     if node.address}
        found = find_culprit([*evidence, *context], nproc=self.nproc,
                             world_size=self.plan.record.world_size, node_addresses=addresses,
                             rank_ports=ports, phases=phases, laggards=laggards)
        if found is not None:
            return found
        first = choose_first_failure(evidence)
        return Culprit(first.node_rank, [first.rank] if first.rank is not None else [],
                       failure_reason(first), "first sign", [first.line.strip()[:300]],
                       [], first.exit_code, first)  # type: ignore[arg-type]

    def fail_fast(self, culprit: Culprit) -> None:
        watch = self.watches[culprit.node_rank]
        record = self.plan.record
        reason = culprit.reason
        record.record_failure(culprit.node_rank, reason=reason, exit_code=culprit.exit_code,
                              at=now_iso(),
                              last_lines=[line[:LAST_LINE_CHARS] for line in watch.lines])
        failure = record.first_failure
        if failure is not None:
            if culprit.ranks:
                failure.ranks = list(culprit.ranks)
            failure.basis = culprit.basis
            failure.evidence = list(culprit.evidence)
            failure.consequences = list(culprit.consequences)
        self.stop_requested_at = time.monotonic()
        self.console.out(f"launch: node {culprit.node_rank} ({watch.node.label}) failed first: "
                         f"{reason}; stopping every node (SIGTERM, {FAIL_FAST_GRACE_S:.0f} s, "
                         "SIGKILL)", highlight=False)
        survivors = [w for w in self.watches if not w.ended and w.state != "lost"]
        # Launchers stopped before the tails notice: the registry gets a final look in any case.
        self.stop_all(signal_nodes=bool(survivors))

    def print_progress(self) -> None:
        now = time.monotonic()
        if now - self.last_progress_print < PROGRESS_LINE_S:
            return
        parts = []
        for watch in self.watches:
            done = "-" if watch.steps_done is None else str(watch.steps_done)
            total = f"/{watch.steps_total}" if watch.steps_total else ""
            parts.append(f"node {watch.rank} {done}{total}{' (ended)' if watch.ended else ''}")
        text = "progress: " + " | ".join(parts)
        self.last_progress_print = now
        if text != self.last_progress_text:
            self.last_progress_text = text
            self.console.out(text, highlight=False)

    def close(self) -> None:
        for watch in self.watches:
            watch.close_log()


__all__ = ["Watcher", "NodeWatch", "next_move", "node_log_path", "tail_command", "FAIL_FAST_GRACE_S"]
