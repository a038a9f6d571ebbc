"""Proving the rendezvous path on the cluster: node 0 listens on the master port, every other
node connects to it over the interfaces its ranks will use, in one parallel round (the commands,
parsing and judgement are tasks/lib/rendezvous.py's). `fab check` runs it after the probe; `fab
launch` after its own probe, on the port and addresses the ranks will be given.
"""
from __future__ import annotations

import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasks.lib.probe import Finding, HostFacts
from tasks.lib.quoting import FedCommand
from tasks.lib.rendezvous import (
    AUTO_PORT_RANGE,
    connect_command,
    expected_hellos,
    judge_reach,
    listen_command,
    master_address,
    new_token,
    parse_first_line,
    parse_report,
    reach_paths,
    stop_command,
)
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, on_each
from tasks.cluster.session import ClusterSession

# The node commands end within their windows (seconds); SSH gets some room on top.
REACH_TIMEOUT_S = 30
AUTO_PORT_TRIES = 3


class _Listener:
    """Node 0's listener, run in a thread: its first line says whether it listens."""

    def __init__(self, node: Node, call: FedCommand):
        self.node = node
        self.ready = threading.Event()
        self.first: dict[str, Any] | None = None
        self.report: dict[str, Any] | BaseException | None = None
        self.partial = ""
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True,
                                       name="rendezvous-listener")
        self.thread.start()

    def _run(self, call: FedCommand) -> None:
        try:
            result = self.node.run_fed(call, warn=True, hide="err", out_stream=self,
                                       timeout=REACH_TIMEOUT_S)
            self.report = parse_report(result.stdout)
        except Exception as err:  # noqa: BLE001 - reported as the listener's failure
            self.report = RuntimeError(describe_error(err, self.node))
        finally:
            self.ready.set()

    # The out_stream Fabric writes the listener's output to, as it comes.
    def write(self, text: str) -> int:
        self.partial += text
        while "\n" in self.partial and self.first is None:
            line, self.partial = self.partial.split("\n", 1)
            self.first = parse_first_line(line)
            if self.first is not None:
                self.ready.set()
        return len(text)

    def flush(self) -> None:
        pass

    def wait_ready(self, timeout: float) -> dict[str, Any] | None:
        self.ready.wait(timeout)
        if self.first is None and isinstance(self.report, dict):
            return self.report  # ended before its first line was seen (no python3, ...)
        return self.first

    def result(self, timeout: float) -> dict[str, Any] | BaseException | None:
        self.thread.join(timeout)
        return self.report


@dataclass
class RendezvousCheck:
    """Node 0 listened on `port`; every other node connected to `master` over its interfaces."""

    port: int
    master: str
    reports: dict[int, Any]  # node index -> the node script's report, or the error reaching it
    findings: list[Finding]

    @property
    def busy(self) -> bool:
        listener = self.reports.get(0)
        return isinstance(listener, dict) and listener.get("error") == "EADDRINUSE"


def check_rendezvous(session: ClusterSession, facts: Sequence[HostFacts], port: int, *,
                     container: str | None = None) -> RendezvousCheck | None:
    """Prove the path every rank will take to the master: node 0 listens on `port` (a listener
    of ours, no torch), every other node connects to it from the store's route and the
    Gloo/NCCL socket interface, all at once (tasks/lib/rendezvous.py). None where there is
    nothing to check: one node, or no address or route known (the probe's findings say why)."""
    if session.inventory.is_local or len(facts) < 2 or facts[0].node_index != 0:
        return None
    socket_ifname = session.settings.cluster.socket_ifname
    master = master_address(facts, socket_ifname)
    paths = {f.node_index: reach_paths(f, socket_ifname) for f in facts[1:]}
    paths = {index: found for index, found in paths.items() if found}
    if not master or not paths:
        return None
    token = new_token()
    expect = expected_hellos(paths)
    by_index = {node.index: node for node in session.nodes}
    master_node = by_index[0]
    listener = _Listener(master_node, listen_command(port, token, expect, container=container))
    reports: dict[int, Any] = {}
    first = listener.wait_ready(REACH_TIMEOUT_S)
    if first is not None and first.get("bound"):
        # Node 0 listens: every worker connects now, so a refusal is a refusal.
        results = on_each([by_index[index] for index in sorted(paths)], lambda node: parse_report(
            node.run_fed(connect_command(master, port, token, node.index, paths[node.index],
                                         container=container),
                         warn=True, hide=True, timeout=REACH_TIMEOUT_S).stdout))
        reports.update({node.index: report for node, report in results.ok.items()})
        reports.update({node.index: RuntimeError(describe_error(error, node))
                        for node, error in results.failed.items()})
        if not all(isinstance(r, dict) and all(p.get("ok") for p in r.get("paths", [{}]))
                   for r in reports.values()):
            try:  # some hello never comes: end the listener now, not at its deadline
                master_node.run_fed(stop_command(port, token, container=container), warn=True,
                                    hide=True, timeout=REACH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - it ends at its own deadline then
                pass
    reports[0] = listener.result(REACH_TIMEOUT_S) or first or RuntimeError("no answer")
    workers = {index: (by_index[index].label, reports.get(index, RuntimeError(
        "not asked: node 0's listener did not start"))) for index in sorted(paths)}
    findings = judge_reach(reports[0], workers, master=master, master_label=master_node.label,
                           port=port)
    return RendezvousCheck(port, master, reports, findings)


def check_rendezvous_auto(session: ClusterSession, facts: Sequence[HostFacts], port: int | None,
                          *, container: str | None = None) -> RendezvousCheck | None:
    """check_rendezvous on `port`, or (auto) on a port of the launch's range, another one where
    the first is taken."""
    for _ in range(1 if port else AUTO_PORT_TRIES):
        checked = check_rendezvous(session, facts, port or random.randint(*AUTO_PORT_RANGE),
                                   container=container)
        if checked is None or port or not checked.busy:
            return checked
    return checked
