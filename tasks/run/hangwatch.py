"""The launch's hang watchdog: from the moment the launchers start until the last step.

During start-up a thread scans every node every STARTUP_POLL_S (the run's processes, their
states and sockets: tasks/lib/diagnostics_node.py, mode "phases") and feeds a StartupWatch
(tasks/lib/startwatch.py): a rank or node stuck in a phase is named with the phase, stacks of
every rank are taken and the run is stopped. Once every rank is connected to its peers (or one
made a step), the step watchdog alone watches: every node's per-rank metrics files, polled from
the watch loop (`tick`), feed a HangWatchdog (tasks/lib/watchdog.py).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from tasks.run.diagnosing import collect_diagnostics, print_summary
from tasks.lib import diagnostics as diag
from tasks.lib.startwatch import StartupStall, StartupWatch, parse_node_phases, phase_index
from tasks.lib.watchdog import HangReport, HangWatchdog, parse_progress_poll, progress_poll_command
from tasks.cluster.nodes import Node, on_each
from tasks.cluster.session import ClusterSession

# How long the ranks get to write their flight recorder before the stacks are taken.
FLIGHT_DUMP_SETTLE_S = 2.0
# The start-up scan: often enough that a stopped rank is named seconds after, cheap enough (one
# short Python per node, no py-spy) to run while the ranks import torch.
STARTUP_POLL_S = 2.0
STARTUP_SCAN_TIMEOUT_S = 20.0


class HangMonitor:
    """The watch loop's hang watchdog: start-up phases (a thread, when `startup` is given), then
    the ranks' metrics files now and then; on a hang collects the diagnostics into
    `<run dir>/hang/`.

    `tick` is cheap to call often (it polls at most every `poll_s`); its SSH calls run in parallel
    and a node that does not answer a poll is simply not counted (the heartbeat finds lost nodes).

    line_progress: the run is not our train package (no metrics files): a rank's progress is the
    number of output lines it printed (marked with its rank, tasks/lib/entry.py), which the
    watcher passes in with `count_lines` as the lines arrive; no metrics file is polled.
    """

    def __init__(self, session: ClusterSession, run_id: str, output_dir: str, timeout_s: float, *,
                 world_size: int, started_at: float, startup_timeout_s: float | None = None,
                 poll_s: float | None = None, step_multiple: float | None = None,
                 startup: StartupWatch | None = None, master_port: int | None = None,
                 container: str | None = None, startup_poll_s: float = STARTUP_POLL_S,
                 line_progress: bool = False):
        self.session = session
        self.run_id = run_id
        self.output_dir = output_dir
        self.world_size = world_size
        self.watchdog = HangWatchdog(timeout_s=timeout_s, started_at=started_at,
                                     expected_ranks=range(world_size),
                                     startup_timeout_s=startup_timeout_s,
                                     step_multiple=step_multiple)
        # Often enough that detection lands within a few seconds of the timeout, rarely enough
        # that a 600 s timeout costs no SSH traffic to speak of.
        self.poll_s = poll_s if poll_s is not None else min(10.0, max(1.0, timeout_s / 10))
        self.next_poll = started_at
        self.command = progress_poll_command(output_dir)
        self.startup = startup
        self.startup_poll_s = startup_poll_s
        self.master_port = master_port
        self.container = container
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self.scanner: threading.Thread | None = None
        self.line_progress = line_progress
        self.lines_seen: dict[int, int] = {}

    # -- start-up ------------------------------------------------------------------------------

    @property
    def starting(self) -> bool:
        """The start-up watch still decides (not done, not fired)."""
        return self.startup is not None and self.startup.fired is None and not self.startup.done

    def start(self, open_nodes: Callable[[], list[Node]]) -> None:
        """Scan the nodes' start-up phases in a thread of its own (a slow node must not delay
        the watch loop's fail-fast decisions), until the start-up is over."""
        if self.startup is None or self.scanner is not None:
            return
        self.scanner = threading.Thread(target=self._scan_loop, args=(open_nodes,), daemon=True,
                                        name="startup-scan")
        self.scanner.start()

    def close(self) -> None:
        self.closed.set()

    def _scan_loop(self, open_nodes: Callable[[], list[Node]]) -> None:
        while not self.closed.is_set() and self.starting:
            began = time.monotonic()
            nodes = open_nodes()
            if nodes:
                try:
                    self.scan_phases(nodes)
                except Exception:  # noqa: BLE001 - the next scan tries again
                    pass
            self.closed.wait(max(0.1, self.startup_poll_s - (time.monotonic() - began)))

    def scan_phases(self, nodes: Iterable[Node]) -> None:
        """One phase scan of these nodes, fed to the start-up watch (and the ranks' metrics
        progress to the step watchdog)."""
        assert self.startup is not None
        settings = self.session.settings

        def scan(node: Node) -> dict[str, Any]:
            command = diag.node_phases_command(self.run_id, node.index,
                                               settings.cluster.registry_dir,
                                               master_port=self.master_port,
                                               output_dir=self.output_dir,
                                               container=self.container)
            result = node.run_fed(command, warn=True, timeout=STARTUP_SCAN_TIMEOUT_S)
            return diag.parse_node_report(result.stdout, node.index, node.label).data

        results = on_each(list(nodes), scan)
        now = time.monotonic()
        with self.lock:
            for node, data in sorted(results.ok.items(), key=lambda item: item[0].index):
                phases = parse_node_phases(data, node.index, self.startup.node_ranks(node.index))
                self.startup.observe(phases, now)
                self.watchdog.observe_poll({rank: (lines, None)
                                            for rank, lines in phases.progress.items()}, now)
        # A node that did not answer keeps its phases: the heartbeat decides when it is lost.

    # -- steps -----------------------------------------------------------------------------------

    def count_lines(self, counts: dict[int, int]) -> None:
        """More output lines of these ranks (called from the log stream threads)."""
        with self.lock:
            for rank, count in counts.items():
                if 0 <= rank < self.world_size:
                    self.lines_seen[rank] = self.lines_seen.get(rank, 0) + count

    def poll(self, nodes: Iterable[Node], now: float) -> list[int]:
        """Read every node's metrics files once (or the line counts); the ranks that advanced."""
        if self.line_progress:
            with self.lock:
                return self.watchdog.observe_poll({rank: (count, None)
                                                   for rank, count in self.lines_seen.items()}, now)
        results = on_each(list(nodes), lambda node: node.run(self.command, warn=True, timeout=30).stdout)
        snapshot: dict[int, tuple[int, int | None]] = {}
        for text in results.ok.values():
            snapshot.update(parse_progress_poll(text))
        with self.lock:
            return self.watchdog.observe_poll(snapshot, now)

    def tick(self, open_nodes: Iterable[Node], now: float,
             alive: bool = True) -> HangReport | StartupStall | None:
        open_nodes = list(open_nodes)
        if self.startup is not None:
            with self.lock:
                stall = self.startup.check(now)
                starting = self.starting
            if stall is not None:
                return stall
            if starting:
                # Phases decide; the step watchdog's own start-up limit still stands behind them.
                with self.lock:
                    return self.watchdog.check(now, alive=alive and bool(open_nodes))
        if now >= self.next_poll and open_nodes:
            self.poll(open_nodes, now)
            self.next_poll = now + self.poll_s
        with self.lock:
            return self.watchdog.check(now, alive=alive and bool(open_nodes))

    # -- diagnostics -----------------------------------------------------------------------------

    def request_flight_dumps(self, settle_s: float | None = None) -> None:
        """Every rank writes PyTorch's flight recorder next to its outputs (train.flight polls a
        trigger file): the collective each rank last issued, taken while the hang is live. The
        dumps come back with the outputs; the report names the rank out of step."""
        on_each(list(self.session.nodes), lambda node: node.run(
            diag.flight_dump_command(self.output_dir), warn=True, timeout=15))
        time.sleep(FLIGHT_DUMP_SETTLE_S if settle_s is None else settle_s)  # ranks poll every 0.5 s

    def diagnose(self, report: HangReport | StartupStall, run_dir: Path, *,
                 container: str | None, console: Console) -> dict[str, Any]:
        """Collect `<run dir>/hang/`, print the summary; returns run.json's `hang` record."""
        dest = run_dir / diag.HANG_DIR
        if isinstance(report, StartupStall):
            console.print(f"[bold red]launch: start-up stuck: {escape(report.headline())}; "
                          f"collecting diagnostics from {len(self.session.nodes)} host(s) "
                          "before stopping[/bold red]")
            hang: dict[str, Any] = {
                "timeout_s": round(report.limit_s, 3), "stalled_for_s": round(report.waited_s, 3),
                "first_stalled_ranks": list(report.ranks), "missing_ranks": [],
                "rank_steps": {str(rank): None for rank in range(self.world_size)},
                "startup": report.as_dict()}
            # The flight recorder holds collectives: only where a process group exists.
            if any(phase_index(name) >= phase_index("group") for name in report.phases.values()):
                self.request_flight_dumps()
            kind = "startup"
        else:
            console.print(f"[bold red]launch: no rank advanced for {report.stalled_for_s:.0f} s "
                          f"(hang timeout {report.timeout_s:.0f} s): collecting diagnostics from "
                          f"{len(self.session.nodes)} host(s) before stopping[/bold red]")
            self.request_flight_dumps()
            hang, kind = report.as_dict(), "hang"
        summary = collect_diagnostics(self.session, self.run_id, dest, kind=kind, hang=hang,
                                      expected_ranks=range(self.world_size), container=container)
        print_summary(console, summary, dest)
        record = diag.hang_record(summary, diag.HANG_DIR)
        record["detected_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
        return record


__all__ = ["HangMonitor", "STARTUP_POLL_S", "FLIGHT_DUMP_SETTLE_S"]
