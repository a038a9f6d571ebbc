"""Proving the rendezvous path on the cluster: node 0 listens on the master port, every other
node connects to it over the interfaces its ranks will use, in one parallel round (the commands,
parsing and judgement are tasks/lib/rendezvous.py's). `fab check` runs it after the probe; `fab
launch` after its own probe, on the port and addresses the ranks will be given.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasks.lib.probe import Finding, HostFacts
from tasks.lib.rendezvous import (
    AUTO_PORT_RANGE,
    connect_command,
    expected_hellos,
    judge_reach,
    listen_command,
    master_address,
    new_token,
    parse_report,
    reach_paths,
)
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, on_each
from tasks.cluster.session import ClusterSession

# The node commands end within their windows (seconds); SSH gets some room on top.
REACH_TIMEOUT_S = 30
AUTO_PORT_TRIES = 3


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

    def reach(node: Node) -> dict[str, Any]:
        if node.index == 0:
            command = listen_command(port, token, expect, container=container)
        else:
            command = connect_command(master, port, token, node.index, paths[node.index],
                                      container=container)
        return parse_report(node.run(command, warn=True, timeout=REACH_TIMEOUT_S).stdout)

    results = on_each([by_index[0], *(by_index[index] for index in sorted(paths))], reach)
    reports: dict[int, Any] = {node.index: report for node, report in results.ok.items()}
    reports.update({node.index: RuntimeError(describe_error(error, node))
                    for node, error in results.failed.items()})
    workers = {index: (by_index[index].label, reports[index]) for index in sorted(paths)}
    findings = judge_reach(reports.get(0), workers, master=master, master_label=by_index[0].label,
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
