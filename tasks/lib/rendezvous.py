"""Proving the rendezvous path before a run: node 0 listens on the master port, every other
node connects to it over the interfaces its ranks will use, all at once, in a few seconds.

`fab check` and `fab launch` run it after the probe (which resolved every host's route and
interfaces): one command per node, in parallel. The node side is tasks/lib/rendezvous_node.py,
sent as source text; here are the commands, the parsing and the judgement (pure, no network).

A port being free on node 0 and a route existing do not make a rendezvous: a firewall that drops
or rejects the port (SSH still allowed) leaves torchrun's agents retrying until their own
timeout, minutes later, with no word on which node. The check names the node, the address, the
port, the interface and the likely cause.
"""
from __future__ import annotations

import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.lib import rendezvous_node
from tasks.lib.probe import Finding, HostFacts
from tasks.lib.quoting import FedCommand, drain_stdin_after, sh_quote

NODE_SCRIPT = Path(rendezvous_node.__file__).read_text()
# `fab launch --master-port auto` picks from this range (and so does `fab check`'s test).
AUTO_PORT_RANGE = (29500, 29999)
# How long a worker's connect may take: a dropped SYN is sent again at 1 s and 3 s. The workers
# start once node 0's listener said it listens; it ends when every hello came, or at the
# controller's stop once the workers are done (else at its own deadline, a safety net).
CONNECT_WINDOW_S = 3.0
LISTEN_SLACK_S = 6.0
STORE_PATH = "store"      # the route torchrun's store client takes (the kernel's choice)
SOCKET_PATH = "socket"    # GLOO/NCCL_SOCKET_IFNAME's address, where it differs


def new_token() -> str:
    """Tells our hello from anything else on the port (not a secret: it only names a check)."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class ReachPath:
    """One way a worker's ranks reach the master: an interface and the address bound on it."""

    name: str
    ifname: str | None
    source: str | None

    def as_arg(self) -> dict[str, Any]:
        return {"name": self.name, "ifname": self.ifname, "source": self.source}


def interface_address(facts: HostFacts, ifname: str) -> str | None:
    return next((address for name, address in facts.interfaces if name == ifname), None)


def reach_paths(facts: HostFacts, socket_ifname: str | None) -> list[ReachPath]:
    """The store's path (the route to the master, source-bound to its address) and, where the
    Gloo/NCCL socket interface is another one, that interface's address too.

    Interfaces without an IPv4 address are left out: the probe's judgement names them already.
    """
    paths = [ReachPath(STORE_PATH, facts.ifname, facts.address)]
    if socket_ifname and socket_ifname != facts.ifname:
        paths.append(ReachPath(SOCKET_PATH, socket_ifname, interface_address(facts, socket_ifname)))
    return [path for path in paths if path.source]


def master_address(facts: Sequence[HostFacts], socket_ifname: str | None) -> str | None:
    """MASTER_ADDR as the launch sets it: node 0's address toward the workers, or its address
    on the forced socket interface."""
    master = facts[0]
    if socket_ifname:
        return interface_address(master, socket_ifname) or master.address
    return master.address


def _python_command(args: Mapping[str, Any], container: str | None) -> FedCommand:
    """python3 on the host; where the host has none, the run's container (host network: the
    same ports and routes); else a JSON line saying so. The arguments (the master port among
    them) go on stdin, never in an argv: the port is what a squatter needs."""
    run = f"python3 -c {sh_quote(NODE_SCRIPT)}"
    missing = sh_quote(json.dumps({"error": "no python3 on this host"
                                   + (" or in its container" if container else "")}))
    command = f"if command -v python3 >/dev/null 2>&1; then {run}; "
    if container:
        command += (f"elif command -v docker >/dev/null 2>&1 && docker exec {sh_quote(container)} "
                    f"true >/dev/null 2>&1; then docker exec -i {sh_quote(container)} {run}; ")
    return FedCommand(drain_stdin_after(command + f"else echo {missing}; fi"),
                      json.dumps(dict(args), sort_keys=True) + "\n")


def listen_command(port: int, token: str, expect: Sequence[str], *, container: str | None = None,
                   window_s: float = CONNECT_WINDOW_S + LISTEN_SLACK_S) -> FedCommand:
    return _python_command({"mode": "listen", "port": int(port), "token": token,
                            "expect": list(expect), "window_s": window_s}, container)


def stop_command(port: int, token: str, *, container: str | None = None) -> FedCommand:
    """Ends node 0's listener early (the workers are done; some hello will never come)."""
    return _python_command({"mode": "stop", "port": int(port), "token": token}, container)


def parse_first_line(line: str) -> dict[str, Any] | None:
    """The listener's first line (bound or why not), or None for another line."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        data = json.loads(line)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def connect_command(master: str, port: int, token: str, node_index: int,
                    paths: Sequence[ReachPath], *, container: str | None = None,
                    window_s: float = CONNECT_WINDOW_S) -> FedCommand:
    return _python_command({"mode": "connect", "master": master, "port": int(port),
                            "token": token, "node": int(node_index),
                            "paths": [p.as_arg() for p in paths], "window_s": window_s},
                           container)


def expected_hellos(paths_by_node: Mapping[int, Sequence[ReachPath]]) -> list[str]:
    return [f"{node}/{path.name}" for node, paths in sorted(paths_by_node.items())
            for path in paths if path.source]


def parse_report(stdout: str) -> dict[str, Any]:
    """The node script's JSON (its last JSON line: a login script may print before it)."""
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                break
            if isinstance(data, dict):
                return data
            break
    return {"error": f"no report in its output: {stdout.strip()[-160:]!r}"}


# -- judgement --------------------------------------------------------------------------------------

_CAUSES = {
    "ECONNREFUSED": "connection refused while our listener was up: a firewall rejects port "
                    "{port} (a REJECT rule on node 0 or on the way), or {master} is not node 0",
    "ETIMEDOUT": "no answer in {window:g} s: packets to port {port} are dropped (a firewall "
                 "DROP rule on node 0, on this node or on the way)",
    "EHOSTUNREACH": "host unreachable from {ifname}: wrong subnet or interface, node 0 down, or "
                    "a firewall answering host-prohibited",
    "ENETUNREACH": "no route from {ifname} to {master}'s network",
    "EFOREIGN": "something else answered on port {port} of {master}, not our listener: is "
                "{master} node 0's address on this network?",
    "ECONNRESET": "the connection was reset before our listener answered (a middlebox or "
                  "firewall cutting it)",
}


def describe_failure(result: Mapping[str, Any], *, master: str, port: int,
                     window_s: float = CONNECT_WINDOW_S) -> str:
    """Why one path failed, in words: the cause errno suggests."""
    ifname = result.get("ifname") or "?"
    error = str(result.get("error") or "?")
    if result.get("stage") == "bind":
        if error == "EADDRNOTAVAIL":
            return f"address {result.get('source')} of {ifname} is not on this host"
        return f"binding {result.get('source')} ({ifname}) failed: {error}"
    cause = _CAUSES.get(error)
    if cause is None:
        return f"{error} ({result.get('stage') or 'connect'})"
    return f"{error}: " + cause.format(port=port, window=window_s, ifname=ifname, master=master)


def judge_reach(listener: Mapping[str, Any] | BaseException | None,
                workers: Mapping[int, tuple[str, Mapping[str, Any] | BaseException]],
                *, master: str, master_label: str, port: int,
                window_s: float = CONNECT_WINDOW_S) -> list[Finding]:
    """Errors for every worker path that did not reach node 0's listener; warnings where the
    check could not run. `workers`: node index -> (label, parsed report or the SSH error)."""
    found: list[Finding] = []
    if isinstance(listener, BaseException) or listener is None or "error" in listener \
            and "bound" not in listener:
        why = (str(listener) if isinstance(listener, BaseException)
               else (listener or {}).get("error", "no answer"))
        found.append(Finding("warning", 0, master_label,
                             f"rendezvous path not checked: the listener on port {port} did not "
                             f"run ({why})"))
        return found
    if not listener.get("bound"):
        found.append(Finding("error", 0, master_label,
                             f"cannot listen on the master port {port} ({listener.get('error')}: "
                             f"{listener.get('detail', '')}): pick another with --master-port "
                             "(launch.master_port)"))
        return found
    for index, (label, report) in sorted(workers.items()):
        if isinstance(report, BaseException):
            found.append(Finding("warning", index, label,
                                 f"rendezvous path not checked: {report}"))
            continue
        if "error" in report and "paths" not in report:
            found.append(Finding("warning", index, label,
                                 f"rendezvous path not checked: {report['error']}"))
            continue
        paths = {p.get("name"): p for p in report.get("paths", [])}
        store = paths.get(STORE_PATH)
        for name, result in paths.items():
            if result.get("ok"):
                continue
            what = ("the store (torchrun's rendezvous)" if name == STORE_PATH
                    else "Gloo/NCCL's socket interface")
            cause = describe_failure(result, master=master, port=port, window_s=window_s)
            if name == SOCKET_PATH and store and store.get("ok") and result.get("stage") != "bind":
                cause += (f"; the store's route ({store.get('ifname')}) does reach it: wrong "
                          f"interface? set cluster.socket_ifname to {store.get('ifname')} or "
                          "fix the route")
            found.append(Finding("error", index, label,
                                 f"cannot reach {master}:{port} (node 0, {master_label}) for "
                                 f"{what} from {result.get('ifname') or '?'} "
                                 f"({result.get('source') or 'no address'}): {cause}"))
    return found


def reach_cell(report: Mapping[str, Any] | BaseException | None, node_index: int,
               port: int) -> str:
    """The facts table's short word per node (rich markup)."""
    if report is None:
        return ""
    if isinstance(report, BaseException) or ("error" in report and "bound" not in report
                                             and "paths" not in report):
        return "[yellow]not checked[/]"
    if node_index == 0:
        return f"listening {port}" if report.get("bound") else f"[red]{report.get('error')}[/]"
    words = []
    for path in report.get("paths", []):
        word = "ok" if path.get("ok") else f"[red]{path.get('error')}[/]"
        words.append(f"{word} ({path.get('ifname')})")
    return ", ".join(words)


__all__ = [
    "AUTO_PORT_RANGE", "CONNECT_WINDOW_S", "ReachPath", "reach_paths", "master_address",
    "listen_command", "connect_command", "stop_command", "parse_first_line", "expected_hellos",
    "parse_report", "judge_reach",
    "describe_failure", "reach_cell", "new_token", "interface_address",
]
