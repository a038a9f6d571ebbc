"""Which hosts a run uses, master first.

Resolution order (first non-empty wins): config `cluster.hosts`, the hosts file
(`cluster.hosts_file`, default node_ip_list.txt), a Slurm allocation (SLURM_JOB_NODELIST), and
finally this machine alone: the embedded default, driven without SSH.
"""
from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import hostlist

# Hostnames and IPv4; a ProxyJump alias from ~/.ssh/config is a hostname too. IPv6 is recognised
# only to be refused (see _refuse_ipv6).
_HOST = r"(?P<host>\[[^\]]*\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)"
_ENTRY = re.compile(rf"^(?:(?P<user>[A-Za-z_][A-Za-z0-9_.-]*)@)?{_HOST}(?::(?P<port>[0-9]+))?$")
LOCAL_HOST = "localhost"
DEFAULT_SSH_PORT = 22


class InventoryError(ValueError):
    """An inventory entry or source that cannot be used; the message says which and how to fix."""


@dataclass(frozen=True)
class HostSpec:
    """One node as the user named it. user/port None: Fabric's config and ~/.ssh/config decide."""

    host: str
    user: str | None = None
    port: int | None = None
    local: bool = False  # the embedded default: this machine, no SSH

    @property
    def label(self) -> str:
        """How the host appears in tables and error lines."""
        # Bracketed IPv6, so the label parses back to the same host (setup writes labels).
        text = f"[{self.host}]" if ":" in self.host else self.host
        if self.user:
            text = f"{self.user}@{text}"
        if self.port:
            text = f"{text}:{self.port}"
        return text


@dataclass(frozen=True)
class Inventory:
    hosts: tuple[HostSpec, ...]
    source: str  # "cluster.hosts", "<path>", "slurm", "local"

    @property
    def master(self) -> HostSpec:
        return self.hosts[0]

    @property
    def is_local(self) -> bool:
        return len(self.hosts) == 1 and self.hosts[0].local


def parse_host_entry(entry: object, where: str = "cluster.hosts") -> HostSpec:
    """Parse "host", "user@host:port" or a mapping {host, user, port}."""
    if isinstance(entry, Mapping):
        unknown = set(entry) - {"host", "user", "port"}
        if unknown:
            raise InventoryError(f"{where}: unknown key(s) {sorted(unknown)} in {dict(entry)}; "
                                 "use host, user, port")
        host = entry.get("host")
        if not isinstance(host, str) or not host.strip():
            raise InventoryError(f"{where}: entry {dict(entry)} has no 'host'")
        text = host.strip()
        user, port = entry.get("user"), entry.get("port")
        spec = parse_host_entry(text, where)
        if spec.user or spec.port:
            raise InventoryError(f"{where}: put user/port in their own keys, not in host {text!r}")
        if user is not None and (not isinstance(user, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", user)):
            raise InventoryError(f"{where}: bad user {user!r} for host {text!r}")
        return HostSpec(spec.host, user, _check_port(port, text, where) if port is not None else None)
    if not isinstance(entry, str):
        raise InventoryError(f"{where}: entry {entry!r} is neither a string nor a mapping")
    text = entry.strip()
    if not text:
        raise InventoryError(f"{where}: empty host entry")
    _refuse_ipv6(text, where)
    match = _ENTRY.match(text)
    if not match or match.group("host").startswith("["):
        raise InventoryError(f"{where}: malformed host {text!r}; expected host, user@host or user@host:port")
    port = match.group("port")
    host = match.group("host")
    return HostSpec(
        host=host,
        user=match.group("user"),
        port=_check_port(int(port), text, where) if port else None,
    )


def _refuse_ipv6(text: str, where: str) -> None:
    """IPv6 addresses reach the nodes over SSH, but `fab check` and `fab launch` find each node's
    route and NCCL/gloo interface to the master over IPv4 only: refuse them here, clearly, rather
    than as a puzzling "no route to the master" later."""
    host = text.rsplit("@", 1)[-1]
    if host.startswith("[") and "]" in host:
        host = host[1:host.index("]")]
    elif host.count(":") < 2:
        return
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return
    raise InventoryError(f"{where}: {text!r} is an IPv6 address: not supported, as "
                         "check and launch reach the master over IPv4; give the node's IPv4 "
                         "address or a hostname")


def _check_port(port: object, host: str, where: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InventoryError(f"{where}: bad port {port!r} for host {host!r} (1-65535)")
    return port


def parse_hosts_file_text(text: str, source: str) -> list[HostSpec]:
    """One host per line, master first; '#' starts a comment; blank lines are skipped."""
    hosts = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if entry:
            hosts.append(parse_host_entry(entry, f"{source}:{lineno}"))
    return hosts


def expand_slurm_nodelist(nodelist: str) -> list[HostSpec]:
    """Expand SLURM_JOB_NODELIST ("gpu[01-04,07]") in allocation order; the first is the master."""
    try:
        names = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as err:
        raise InventoryError(f"SLURM_JOB_NODELIST={nodelist!r} cannot be expanded: {err}") from None
    return [parse_host_entry(name, "SLURM_JOB_NODELIST") for name in names]


Resolver = Callable[[Sequence[str]], Mapping[str, Collection[str]]]


def resolve_inventory(
    hosts: Sequence[object],
    hosts_file: Path | None,
    environ: Mapping[str, str],
    *,
    default_port: Callable[[str], int] | None = None,
    resolve: Resolver | None = None,
) -> Inventory:
    """Apply the resolution order and reject empty or duplicate inventories.

    default_port: the SSH port of a host given without one (None: 22). resolve: names to their
    addresses, so that a name and its address count as one node (None: names are not resolved;
    a name missing from the answer is compared as written).
    """
    if hosts:
        inventory = Inventory(tuple(parse_host_entry(h) for h in hosts), "cluster.hosts")
    elif hosts_file is not None and hosts_file.exists():
        try:
            text = hosts_file.read_text()
        except (OSError, UnicodeDecodeError) as err:
            raise InventoryError(f"cannot read hosts file {hosts_file}: {err}") from None
        specs = parse_hosts_file_text(text, str(hosts_file))
        if not specs:
            raise InventoryError(f"{hosts_file} lists no host; add one host per line (master first) "
                                 "or delete the file to run on this machine alone")
        inventory = Inventory(tuple(specs), str(hosts_file))
    elif environ.get("SLURM_JOB_NODELIST"):
        inventory = Inventory(tuple(expand_slurm_nodelist(environ["SLURM_JOB_NODELIST"])), "slurm")
    else:
        return Inventory((HostSpec(LOCAL_HOST, local=True),), "local")
    _reject_duplicates(inventory, default_port or (lambda host: DEFAULT_SSH_PORT), resolve)
    return inventory


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _reject_duplicates(inventory: Inventory, default_port: Callable[[str], int],
                       resolve: Resolver | None) -> None:
    """One sshd (address and port, whoever logs in) is one node: user@h and h, h and h:22, a name
    and its address are the same node listed twice."""
    names = sorted({spec.host for spec in inventory.hosts if not _is_address(spec.host)})
    addresses = dict(resolve(names)) if resolve and names else {}
    seen: dict[tuple[str, int], HostSpec] = {}
    for spec in inventory.hosts:
        port = spec.port if spec.port is not None else default_port(spec.host)
        targets = {spec.host.lower(), *(str(a).lower() for a in addresses.get(spec.host, ()))}
        for target in sorted(targets):
            other = seen.get((target, port))
            if other is None:
                continue
            if other.label.lower() == spec.label.lower():
                why = ""
            elif spec.host.lower() == other.host.lower():
                why = f" (as {other.label!r}: same host, port {port})"
            else:
                why = f" (as {other.label!r}: both are {target}, port {port})"
            raise InventoryError(f"{inventory.source}: host {spec.label!r} is listed twice{why}; "
                                 "each node must appear once")
        for target in targets:
            seen[(target, port)] = spec


def render_hosts_file(hosts: Sequence[HostSpec], comment: str = "") -> str:
    """The hosts file for `hosts` (master first), which `parse_hosts_file_text` reads back."""
    lines = [f"# {line}" if line else "#" for line in comment.splitlines()]
    lines += [spec.label for spec in hosts]
    return "\n".join(lines) + "\n"
