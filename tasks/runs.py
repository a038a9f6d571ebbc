"""Runs on the cluster: `fab status`, `fab logs`, `fab stop`, `fab emergency-stop`.

Each node's run registry (tasks/lib/registry.py) is the truth, so these work from any controller,
also one that never launched the run. Every command goes to all hosts at once; a host that fails
costs one line, not the others' answers. Stop and emergency-stop act only on processes carrying a
run's markers (GEMM_RUN_ID and GEMM_NODE_RANK in their environment), never on names: someone
else's `python train.py` or `torchrun` survives them.
"""
from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone

from invoke import Collection, task
from invoke.exceptions import Exit, UnexpectedExit
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tasks.lib.console import make_console
from tasks.lib.nodestream import LineSplitter
from tasks.lib.registry import (
    EXIT_NO_SUCH_RUN,
    KILL_CONFIRM_POLLS,
    LAUNCHER_RECORD_POLLS,
    STOP_POLL_SECONDS,
    NodeRunRecord,
    RegistryError,
    StopOutcome,
    latest_run_id,
    logs_command,
    parse_status,
    parse_stop_output,
    status_command,
    stop_command,
    validate_run_id,
)
from tasks.lib.untrusted import int_text, short_text, terminal_text
from tasks.cluster.node_errors import NodeError
from tasks.cluster.nodes import Node, NodeResults, on_each
from tasks.cluster.session import EXIT_USAGE, HOSTS_HELP, ClusterSession

DEFAULT_RECENT = 5
STATUS_TIMEOUT_S = 30.0
# Beyond the grace period, what the node's stop command may take (SIGKILL, confirmations).
STOP_MARGIN_S = (KILL_CONFIRM_POLLS + LAUNCHER_RECORD_POLLS) * STOP_POLL_SECONDS + 30.0

LinesSink = Callable[[Node, int, list[str]], None]


# -- helpers the launch and the sweep use ----------------------------------------------------------

def node_statuses(session: ClusterSession, run_id: str | None = None,
                  recent: int = DEFAULT_RECENT) -> NodeResults[list[NodeRunRecord]]:
    """Every host's registry: its active entries and its `recent` latest finished ones."""
    command = status_command(session.settings.cluster.registry_dir, run_id, recent)
    return on_each(session.nodes, lambda node: parse_status(
        node.run(command, timeout=STATUS_TIMEOUT_S).stdout))


def active_runs(session: ClusterSession) -> dict[Node, list[NodeRunRecord]]:
    """The active registry entries of every host (empty lists included).

    Raises Exit (one line per host) when a host cannot be read: a host we cannot see may well
    be running something.
    """
    results = node_statuses(session, recent=0)
    results.raise_if_failed("reading the run registry", hint="fix or leave out those hosts")
    return {node: [r for r in records if r.active] for node, records in results.ok.items()}


def stop_run(session: ClusterSession, run_id: str | None, grace: float,
             kill: bool = False, all_users: bool = False) -> NodeResults[list[StopOutcome]]:
    """Stop a run (None: every active run of ours) on every host at once.

    kill=False: SIGTERM through each launcher, `grace` seconds, then SIGKILL. kill=True: SIGKILL
    at once, inside containers too. all_users: every user's runs (root on the nodes only; the
    nodes refuse it otherwise). A host where processes survived SIGKILL, or that could not be
    reached, is in `.failed`; the caller decides whether that is fatal.
    """
    # Under srun the run's own step is signalled first (scancel --signal of our step only): Slurm
    # delivers it inside the job, to every process of the step. The registry stop below then
    # waits, escalates and records the end exactly as over SSH.
    for note in session.transport.signal_run(run_id, kill=kill):
        print(note, file=sys.stderr)
    command = stop_command(session.settings.cluster.registry_dir, run_id, grace, kill,
                           all_users=all_users)
    timeout = grace + STOP_MARGIN_S
    return on_each(session.nodes, lambda node: parse_stop_output(
        node.run(command, timeout=timeout).stdout))


@dataclass(frozen=True)
class LogStream:
    """How one host's log stream ended."""

    node_rank: int | None   # None: the host has no entry of the run
    lines: int


class _NodeLog:
    """One host's log lines to a sink, under the node rank its `@@ node_rank N` header names."""

    def __init__(self, node: Node, sink: LinesSink):
        self.node = node
        self.sink = sink
        self.node_rank: int | None = None
        self.header_seen = False
        self.lines = 0
        self.splitter = LineSplitter(self._lines)

    def _lines(self, lines: list[str]) -> None:
        if not self.header_seen:
            self.header_seen = True
            if lines[0].startswith("@@ node_rank "):
                rank = int_text(lines[0].split()[-1])
                self.node_rank = self.node.index if rank is None else rank
                lines = lines[1:]
                if not lines:
                    return
        self.lines += len(lines)
        self.sink(self.node, self.node.index if self.node_rank is None else self.node_rank, lines)


_print_lock = threading.Lock()


def print_prefixed(node: Node, node_rank: int, lines: list[str]) -> None:
    """The default sink: `[node N] line` on stdout, plain text (log lines may hold markup) with
    control characters shown, never acted on by the terminal; one write per batch."""
    prefix = f"[node {node_rank}] "
    text = terminal_text(prefix + ("\n" + prefix).join(lines), keep_newlines=True) + "\n"
    with _print_lock:
        sys.stdout.write(text)
        sys.stdout.flush()


def follow_logs(session: ClusterSession, run_id: str, *, follow: bool = True,
                lines: int | None = None, sink: LinesSink = print_prefixed) -> NodeResults[LogStream]:
    """Stream every host's output log of the run to `sink(node, node_rank, lines)`.

    follow: until each host's launcher has exited (the last lines included); else what is there.
    lines: only the last N lines first (None: from the start). Hosts without the run report
    LogStream(node_rank=None). Ctrl-C propagates at once (the remote tails end with the session).
    Memory stays bounded whatever a node sends (tasks/lib/nodestream.py).
    """
    command = logs_command(session.settings.cluster.registry_dir, run_id, follow, lines)

    def stream(node: Node) -> LogStream:
        log = _NodeLog(node, sink)
        try:
            end = node.stream(command, log.splitter.feed)
        finally:
            log.splitter.close()
        if end.exited == EXIT_NO_SUCH_RUN:
            return LogStream(None, 0)
        if end.exited != 0 and log.node_rank is None:
            raise UnexpectedExit(end.as_result(command))
        return LogStream(log.node_rank, log.lines)

    # on_each waits for its threads; run it aside so Ctrl-C reaches this (main) thread at once.
    box: dict[str, NodeResults[LogStream]] = {}
    runner = threading.Thread(target=lambda: box.update(results=on_each(session.nodes, stream)),
                              name="logs", daemon=True)
    runner.start()
    while runner.is_alive():
        runner.join(0.2)
    return box["results"]


def latest_run(session: ClusterSession) -> str:
    """The run started last on any host (per the registries)."""
    results = node_statuses(session, recent=1)
    records = [r for recs in results.ok.values() for r in recs]
    run_id = latest_run_id(records)
    if run_id is None:
        results.raise_if_failed("reading the run registry")
        raise Exit("no run found in the run registry of any host (fab launch starts one)", code=1)
    return run_id


# -- presentation -----------------------------------------------------------------------------------

def _parse_time(text: str | None) -> datetime | None:
    """A registry time (the node's word): aware, within what local time can show, else None
    (a naive time minus an aware one, or year 1 in local time, would raise)."""
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        moment.astimezone()
        return moment
    except (ValueError, OverflowError):
        return None


def duration_text(record: NodeRunRecord, now: datetime | None = None) -> str:
    started = _parse_time(record.started_at)
    if started is None:
        return "-"
    ended = _parse_time(record.ended_at) or (now or datetime.now(timezone.utc))
    seconds = max(0, int((ended - started).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def state_text(record: NodeRunRecord) -> str:
    if record.lost:
        return "lost (launcher gone, no end recorded)"
    if record.state in ("exited", "stopped", "killed") and record.procs:
        return f"{record.state}, {record.procs} process(es) left"
    return record.state


def _node_text(value: str) -> Text:
    """A value from a node's registry for a rich table: shown as it is, never read as markup
    or terminal control."""
    return Text(terminal_text(short_text(value) or ""))


def _started_text(record: NodeRunRecord) -> str:
    started = _parse_time(record.started_at)
    return started.astimezone().strftime("%m-%d %H:%M:%S") if started else "-"


def status_table(registries: Mapping[Node, list[NodeRunRecord]]) -> tuple[Table, int]:
    """`fab status`'s table of every host's registry entries (newest first), and its row count."""
    table = Table(title="runs (from the nodes' registries)")
    for column in ("host", "run", "node", "state", "exit", "steps", "procs", "started",
                   "duration"):
        table.add_column(column, no_wrap=column in ("run", "started"),
                         justify="right" if column in ("node", "exit", "steps", "procs")
                         else "left")
    rows = 0
    for node in sorted(registries, key=lambda n: n.index):
        for record in sorted(registries[node], key=lambda r: r.started_at or "", reverse=True):
            rows += 1
            # Text, not markup: run id and state are the node's word ("[/]" would raise).
            table.add_row(
                node.label, _node_text(record.run_id), str(record.node_rank),
                _node_text(state_text(record)),
                "-" if record.exit_code is None else str(record.exit_code),
                "-" if record.steps_done is None else str(record.steps_done),
                str(record.procs), _started_text(record), duration_text(record))
    return table, rows


def print_step_states(console: Console, session: ClusterSession, run_id: str | None) -> None:
    """Under srun: our run steps of the allocation (squeue live, sacct ended), next to the
    registries' view. Nothing over SSH or on this machine alone."""
    if session.transport.name != "srun":
        return
    try:
        steps = session.transport.step_states(run_id)
    except NodeError as err:
        console.out(f"slurm: step states unavailable: {err}", highlight=False)
        return
    if not steps:
        console.out("slurm: no run step of yours in this allocation", highlight=False)
        return
    table = Table(title="slurm steps (squeue, sacct)")
    for column in ("step", "run", "state", "exit", "nodes", "start"):
        table.add_column(column, no_wrap=column in ("step", "run"))
    for step in steps:
        exit_text = "-" if step.exit_code is None else str(step.exit_code)
        if step.signal:
            exit_text += f" (signal {step.signal})"
        table.add_row(step.id, step.run_id or "-", step.state, exit_text,
                      step.nodelist or "-", step.start or "-")
    console.print(table)


def _run_id_arg(run: str | None) -> str | None:
    if run is None:
        return None
    try:
        return validate_run_id(run)
    except RegistryError as err:
        raise Exit(f"--run: {err}", code=EXIT_USAGE) from None


def _grace_arg(grace: str | float | None, default: float) -> float:
    if grace is None:
        return default
    try:
        value = float(grace)
    except ValueError:
        value = -1.0
    if not (value >= 0 and value != float("inf")):
        raise Exit(f"--grace: {grace!r} is not a number of seconds >= 0", code=EXIT_USAGE)
    return value


def _print_stop_results(console: Console, results: NodeResults[list[StopOutcome]],
                        verb: str, show_user: bool = False) -> None:
    for node in sorted(results.ok, key=lambda n: n.index):
        outcomes = results.ok[node]
        if not outcomes:
            console.out(f"node {node.index} ({node.label}): nothing to stop", highlight=False)
        for outcome in outcomes:
            code = "-" if outcome.exit_code is None else outcome.exit_code
            whose = f" of user {outcome.user}" if show_user and outcome.user else ""
            note = "" if outcome.recorded else " (not recorded: root writes nothing into " \
                "another user's registry)"
            console.out(f"node {node.index} ({node.label}): run {outcome.run_id}{whose} node "
                        f"{outcome.node_rank} {verb}: {outcome.state}, exit code {code}{note}",
                        highlight=False)


# -- tasks ------------------------------------------------------------------------------------------

@task(
    help={
        "run": "show only this run id (default: every active run and the latest finished ones)",
        "recent": f"finished runs to show per host (default {DEFAULT_RECENT})",
        "hosts": HOSTS_HELP,
    },
)
def status(c, run=None, recent=DEFAULT_RECENT, hosts=None):
    """Active and recent runs on every host, with step progress (read from each node's registry)."""
    run_id = _run_id_arg(run)
    try:
        recent = int(recent)
    except ValueError:
        raise Exit(f"--recent: {recent!r} is not a number", code=EXIT_USAGE) from None
    console = make_console()
    with ClusterSession(c, hosts) as session:
        results = node_statuses(session, run_id, recent)
        table, rows = status_table(results.ok)
        if rows:
            console.print(table)
        elif results.ok:
            console.out(f"no runs{' named ' + run_id if run_id else ''} in the registries of "
                        f"{len(results.ok)} host(s)", highlight=False)
        print_step_states(console, session, run_id)
        results.raise_if_failed("reading the run registry")


@task(
    help={
        "run": "run id (default: the run started last, per the nodes' registries)",
        "follow": "keep streaming until every node's launcher has exited (Ctrl-C stops following;"
                  " the run goes on)",
        "lines": "start with only the last N lines of each node (default: the whole log)",
        "hosts": HOSTS_HELP,
    },
)
def logs(c, run=None, follow=False, lines=None, hosts=None):
    """Print every node's output log of a run, each line prefixed with [node N]."""
    run_id = _run_id_arg(run)
    if lines is not None:
        try:
            lines = int(lines)
        except ValueError:
            raise Exit(f"--lines: {lines!r} is not a number", code=EXIT_USAGE) from None
    with ClusterSession(c, hosts) as session:
        run_id = run_id or latest_run(session)
        print(f"logs of {run_id}" + (" (following; Ctrl-C stops following)" if follow else ""),
              file=sys.stderr)
        try:
            results = follow_logs(session, run_id, follow=follow, lines=lines)
        except KeyboardInterrupt:
            print(f"\nstopped following; the run goes on (fab stop --run {run_id} stops it)",
                  file=sys.stderr)
            return
        if results.ok and all(s.node_rank is None for s in results.ok.values()):
            results.raise_if_failed("reading the logs")
            raise Exit(f"run {run_id} has no entry in the registry of any host", code=1)
        results.raise_if_failed("reading the logs")


@task(
    help={
        "run": "run id to stop (default: every active run of yours on the hosts)",
        "grace": "seconds between SIGTERM and SIGKILL (default: launch.stop_grace)",
        "hosts": HOSTS_HELP,
    },
)
def stop(c, run=None, grace=None, hosts=None):
    """Stop a run gracefully: SIGTERM to torchrun (ranks finish their step and write their
    summary), wait up to --grace seconds, then SIGKILL what is left, in containers too."""
    run_id = _run_id_arg(run)
    console = make_console()
    with ClusterSession(c, hosts) as session:
        grace_s = _grace_arg(grace, session.settings.launch.stop_grace)
        started = time.monotonic()
        results = stop_run(session, run_id, grace_s)
        _print_stop_results(console, results, "stopped")
        console.out(f"stop took {time.monotonic() - started:.1f} s", highlight=False)
        results.raise_if_failed("stop")


@task(help={
    "hosts": HOSTS_HELP,
    "all-users": "also kill other users' runs (needs root on the nodes; default: only yours, "
                 "even as root)",
})
def emergency_stop(c, hosts=None, all_users=False):
    """SIGKILL every process of every active run of yours on every host at once, inside
    containers too. Only processes marked as your runs' and owned by you are touched, never
    others by their name; root too kills only its own unless --all-users."""
    console = make_console()
    with ClusterSession(c, hosts) as session:
        started = time.monotonic()
        results = stop_run(session, None, 0.0, kill=True, all_users=all_users)
        _print_stop_results(console, results, "killed", show_user=all_users)
        console.out(f"emergency stop took {time.monotonic() - started:.1f} s", highlight=False)
        results.raise_if_failed("emergency stop")


ns = Collection(status, logs, stop, emergency_stop)

__all__ = ["ns", "status", "logs", "stop", "emergency_stop", "node_statuses", "active_runs",
           "stop_run", "follow_logs", "latest_run", "LogStream", "print_prefixed", "status_table"]
