"""What went wrong on a host, in one line that says how to fix it where that is known.

Every task reports per-host failures through `describe_error` (NodeResults.raise_if_failed, the
launch's and sweep's progress lines), so a host-key, SSH, timeout or command failure reads the
same wherever it surfaces.
"""
from __future__ import annotations

import re
import socket
from typing import Protocol

import paramiko
from fabric import Connection
from invoke.exceptions import CommandTimedOut, UnexpectedExit

from tasks.cluster.hostkeys import HostKeyChanged, HostKeyRevoked
from tasks.cluster.hostkeys import fingerprint as _fingerprint
from tasks.lib.knownhosts import known_hosts_name
from tasks.lib.quoting import sh_quote


class SshNode(Protocol):
    """What a message about a host needs of its node (tasks.cluster.nodes.Node, which imports
    this module: the messages stay below the nodes). Its `known_hosts`, where it has one, is the
    file a host-key message names."""

    def ssh_hops(self) -> list[Connection]: ...


class NodeError(Exception):
    """An expected failure on a host whose message is already written for the user."""


# paramiko's RejectPolicy text: "Server '[host]:port' not found in known_hosts".
_UNKNOWN_HOST_KEY = re.compile(r"Server '(.*)' not found in known_hosts")


def _hop_named(node: SshNode | None, name: str) -> Connection | None:
    """The connection of `node`'s chain a host-key error is about: the node or a jump host."""
    chain = node.ssh_hops() if node is not None else []
    if not chain:
        return None
    named = [hop for hop in chain if _name(hop) == name]
    return named[0] if named else chain[0]


def _hop_role(node: SshNode | None, hop: Connection | None) -> str:
    chain = node.ssh_hops() if node is not None else []
    if hop is not None and chain and hop is not chain[0]:
        return "jump host "
    return ""


def _name(connection: Connection) -> str:
    return known_hosts_name(connection.host, connection.port)


def describe_error(error: BaseException, node: SshNode | None = None) -> str:
    """One line that says what went wrong on a host and, where known, how to fix it.

    With the node, host-key messages name the known_hosts file and the entry to fix.
    """
    if isinstance(error, NodeError):
        return str(error)
    known_hosts = getattr(node, "known_hosts", None)
    file_text = str(known_hosts) if known_hosts else "<known_hosts>"
    if isinstance(error, HostKeyRevoked):
        hop = _hop_named(node, error.hostname)
        name = _name(hop) if hop else error.hostname
        return (f"host key REVOKED for {_hop_role(node, hop)}{name}: it offered "
                f"{error.key.get_name()} SHA256:{_fingerprint(error.key)}, marked @revoked at "
                f"{error.line.where}; not connecting: the host needs a new host key (ask its "
                f"admin), then add that key to {file_text}")
    if isinstance(error, paramiko.BadHostKeyException):
        hop = _hop_named(node, error.hostname)
        name = _name(hop) if hop else error.hostname
        if isinstance(error, HostKeyChanged) and error.line.lineno:
            file_text = error.line.source  # the other key may be in the global file
        return (f"host key CHANGED for {_hop_role(node, hop)}{name} (offered "
                f"{error.key.get_name()} SHA256:{_fingerprint(error.key)}, {file_text} has "
                f"another); if the host was reinstalled, remove the old key with: ssh-keygen -R "
                f"{sh_quote(name)} -f {sh_quote(file_text)}, then retry")
    unknown = _UNKNOWN_HOST_KEY.search(str(error))
    if isinstance(error, paramiko.SSHException) and unknown:
        hop = _hop_named(node, unknown.group(1))
        if hop is not None:
            port_flag = f"-p {hop.port} " if hop.port != 22 else ""
            keyscan = f"ssh-keyscan {port_flag}{sh_quote(hop.host)}"
            key_name = _hop_role(node, hop) + _name(hop)
        else:
            keyscan, key_name = "ssh-keyscan <host>", "the host"
        return (f"unknown host key: {key_name} is not in {file_text} and "
                f"host_key_policy is 'reject'; after checking its fingerprint, add it with "
                f"`{keyscan} >> {sh_quote(file_text)}`, or use host_key_policy accept-new")
    if isinstance(error, paramiko.AuthenticationException):
        return f"SSH authentication failed: {error} (check user, key_filename, ssh-agent)"
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "unreachable: connect timed out (timeouts.connect)"
    if isinstance(error, paramiko.ssh_exception.NoValidConnectionsError):
        # Its own text ("Unable to connect to port 22 on X") hides why: say what the OS said.
        reasons = sorted({err.strerror or str(err) for err in error.errors.values()})
        ports = sorted({port for _, port, *_ in error.errors})
        where = f"port {ports[0]}" if len(ports) == 1 else "SSH port"
        return f"unreachable: cannot connect to {where}: {', '.join(reasons) or error}"
    if isinstance(error, socket.gaierror):
        return f"unknown host name: {error}"
    if isinstance(error, OSError) and error.errno is not None:
        return f"unreachable: {error.strerror or error}"
    if isinstance(error, CommandTimedOut):
        return f"command timed out after {error.timeout}s"
    if isinstance(error, UnexpectedExit):
        result = error.result
        detail = (result.stderr.strip() or result.stdout.strip()).splitlines()
        return f"command exited {result.exited}: {detail[-1] if detail else '(no output)'}"
    return f"{type(error).__name__}: {error}"
