"""Watching a started run: every node's log streamed to the controller, progress and failure
evidence kept, the registry read as a heartbeat, fail-fast (the first failure stops every node)
and the hang watchdog. `fab launch` starts the run (tasks/launch.py), then hands it to a Watcher.
"""
from __future__ import annotations

import posixpath
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from tasks.diagnose import HangMonitor
from tasks.lib.entry import split_rank_line
from tasks.lib.quoting import sh_quote
from tasks.lib.registry import parse_status, status_command
from tasks.lib.runrecord import (
    AGENT_DEATH_SIGNAL,
    FINAL_NODE_STATES,
    Evidence,
    choose_first_failure,
    classify_line,
    exit_reason,
    failure_reason,
    now_iso,
    parse_progress,
)
from tasks.lib.runspec import log_file_name
from tasks.lib.watchdog import HANG_STEP_MULTIPLE
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, on_each
from tasks.run.plan import Plan
from tasks.runs import LineStream, stop_run
from tasks.cluster.session import ClusterSession

# A failure is rarely alone: the ranks of other nodes fail right after, as victims. Waiting this
# long after the first sign lets the real culprit's report (a rank killed by a signal) arrive.
FAILURE_SETTLE_S = 2.0
FAIL_FAST_GRACE_S = 3.0        # SIGTERM -> SIGKILL when stopping the survivors of a failure
HEARTBEAT_S = 2.0              # how often each node's registry state is read while attached
HEARTBEAT_TIMEOUT_S = 15.0
# A node counts as lost (and the run as failed) when its registry could not be read for this
# long: a loaded node answers slowly, a dead one never; the NCCL timeout is minutes away.
LOST_AFTER_S = 30.0
PROGRESS_LINE_S = 10.0         # at most this often, a "progress:" line with every node's steps
TAIL_POLL_S = 0.5
# After the registry says every node ended, a tail may still be delivering the last lines (it
# notices the launcher's exit at its next poll): wait this long for the streams to end.
TAIL_DRAIN_S = 5.0


def next_move(failure_seen: bool, all_ended: bool, stop_requested: bool,
              first_seen: float | None, now: float) -> str:
    """What the watch loop does this turn, from one snapshot of its state: "fail-fast" (stop
    every node, name the culprit), "end" (every node ended, nothing left to decide) or "wait".
    A failure is acted on once it settled, or at once when no node is left to report more."""
    if failure_seen and not stop_requested:
        assert first_seen is not None
        if all_ended or now - first_seen >= FAILURE_SETTLE_S:
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

    def write_line(self, line: str) -> bool:
        """Append to the controller's log; False once it is closed (a stream that outlived the
        wait: the line is still in the node's own output log)."""
        with self.log_lock:
            if self.log_file.closed:
                return False
            self.log_file.write(line + "\n")
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
            # Imports, rendezvous and calibration come before the first metrics line: allow more.
            self.hang = HangMonitor(session, plan.run_id, plan.output_dir, plan.spec.hang_timeout,
                                    world_size=plan.record.world_size, started_at=now,
                                    startup_timeout_s=max(plan.spec.hang_timeout, 300.0),
                                    step_multiple=HANG_STEP_MULTIPLE if plan.spec.hang_auto else None,
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
        sink = LineStream(lambda line: self._on_line(watch, line))
        command = tail_command(node_log_path(self.plan, watch.rank), watch.pid, from_start)
        try:
            watch.node.run(command, warn=True, hide="err", out_stream=sink)
        except BaseException as err:  # noqa: BLE001 - reported through the heartbeat
            watch.tail_error = err
        finally:
            sink.close_partial()
            watch.tail_done.set()

    def _on_line(self, watch: NodeWatch, line: str) -> None:
        now = time.monotonic()
        watch.write_line(line)
        watch.lines.append(line)
        if (progress := parse_progress(line)):
            watch.steps_done, watch.steps_total = progress
        if self.hang is not None and self.hang.line_progress and (marked := split_rank_line(line)):
            self.hang.count_line(marked[0])
        if AGENT_DEATH_SIGNAL.search(line):
            watch.stopping_from_outside = True
        evidence = classify_line(line, watch.rank, self.nproc, now, watch.stopping_from_outside)
        if evidence is not None:
            with self.lock:
                self.evidence.append(evidence)
        self.console.out(f"[node {watch.rank}] {line}", highlight=False)

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
        try:
            status = self._wait()
        finally:
            self.done.set()
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
        return [w.rank for w in self.watches if not w.tail_done.is_set()]

    def wait_for_streams(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for watch in self.watches:
            watch.tail_done.wait(max(0.0, deadline - time.monotonic()))

    def _wait(self) -> str:
        first_seen: float | None = None
        while True:
            open_watches = [w for w in self.watches if not w.ended]
            # A stream ends when its launcher has exited (look at the registry at once) or when
            # its SSH channel broke (the heartbeat decides; the stream is reopened meanwhile).
            tails_finished = [w for w in open_watches
                              if w.tail_done.is_set() and not w.tail_checked]
            if tails_finished:
                self.poll_states(tails_finished)
                for watch in tails_finished:
                    watch.tail_checked = True
                    if not watch.ended and watch.tail_error is not None and watch.tail_restarts < 3:
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
            move = next_move(bool(evidence), all_ended, self.stop_requested_at is not None,
                             first_seen, time.monotonic())
            if move == "fail-fast":
                if all_ended:
                    # Every launcher is gone; the lines that name the rank that died (a signal,
                    # not a peer's error) may still be on their way through the streams.
                    self.wait_for_streams(FAILURE_SETTLE_S)
                    with self.lock:
                        evidence = list(self.evidence)
                self.fail_fast(choose_first_failure(evidence))
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
        self.plan.record.hang = self.hang.diagnose(report, self.plan.run_dir, container=container,
                                                   console=self.console)
        self.hung = True
        self.stop_requested_at = time.monotonic()
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

    def fail_fast(self, culprit: Evidence) -> None:
        watch = self.watches[culprit.node_rank]
        record = self.plan.record
        reason = failure_reason(culprit)
        record.record_failure(culprit.node_rank, reason=reason, exit_code=culprit.exit_code,
                              at=now_iso(), last_lines=list(watch.lines))
        if culprit.rank is not None:
            record.first_failure.ranks = [culprit.rank]  # type: ignore[union-attr]
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
