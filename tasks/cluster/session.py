"""What every task starts from: validated settings, the inventory, and one Node per host."""
from __future__ import annotations

import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fabric import Connection
from invoke import Context
from invoke.exceptions import Exit

from tasks.lib.inventory import Inventory, InventoryError, parse_host_entry, resolve_inventory
from tasks.lib.settings import Settings, SettingsError
from tasks.lib.exits import EXIT_USAGE
from tasks.cluster.nodes import Node, close_all
from tasks.cluster.transport import Transport, select_transport

# Relative paths in the config (hosts_file, experiments_dir, launch.config) are relative to the
# project checkout, not to wherever `fab` was started from.
PROJECT_ROOT = Path(__file__).resolve().parents[2]

RESOLVE_TIMEOUT_S = 2.0  # for all the inventory's names together (/etc/hosts answers at once)
HOSTS_HELP = "comma-separated hosts to use instead of the configured inventory (master first)"


def project_path(path: str | os.PathLike) -> Path:
    expanded = Path(os.path.expanduser(path))
    return expanded if expanded.is_absolute() else PROJECT_ROOT / expanded


def cli_path(path: str) -> Path:
    """A path typed on the command line: relative to where fab runs, else to the checkout."""
    given = Path(path).expanduser()
    return given if given.is_absolute() or given.exists() else project_path(given)


def load_settings(c: Context) -> Settings:
    try:
        return Settings.from_config(c.config)
    except SettingsError as err:
        raise Exit(f"config error: {err}", code=EXIT_USAGE) from None


def load_inventory(settings: Settings, hosts: list[str] | None = None,
                   config: Any = None) -> Inventory:
    """Hosts from a flag (comma-separated) win over the config's resolution order.

    config: the Fabric config, for the port a host without one gets (as Connection decides it);
    without it, 22.
    """
    same_node = {"default_port": ssh_port_for(config), "resolve": resolve_names}
    try:
        if hosts:
            entries = [h for item in hosts for h in item.split(",") if h.strip()]
            return resolve_inventory(entries, None, {}, **same_node) if entries else _empty_flag()
        return resolve_inventory(
            settings.cluster.hosts, project_path(settings.cluster.hosts_file), os.environ,
            **same_node,
        )
    except InventoryError as err:
        raise Exit(f"inventory error: {err}", code=EXIT_USAGE) from None


def ssh_port_for(config: Any) -> Callable[[str], int]:
    """The port Fabric's Connection uses for a host named without one: ~/.ssh/config's Port for
    it, else the config's `port` (22)."""
    base = (config.get("port") if config is not None else None) or 22
    ssh_config = getattr(config, "base_ssh_config", None) if config is not None else None

    def port(host: str) -> int:
        try:
            value = ssh_config.lookup(host).get("port") if ssh_config is not None else None
            return int(value) if value is not None else int(base)
        except Exception:  # noqa: BLE001 - a broken ~/.ssh/config is Connection's to report
            return int(base)
    return port


def resolve_names(names: Sequence[str],
                  timeout: float = RESOLVE_TIMEOUT_S) -> dict[str, frozenset[str]]:
    """Each name's addresses as this machine resolves them, so that a name and its address count
    as one node. Names that do not resolve within `timeout` (all together) are left out: the
    probe reports an unreachable host later, and a slow DNS must not stall every task."""
    found: dict[str, frozenset[str]] = {}
    lock = threading.Lock()
    pending: queue.SimpleQueue[str] = queue.SimpleQueue()
    for name in names:
        pending.put(name)

    def work() -> None:
        while True:
            try:
                name = pending.get_nowait()
            except queue.Empty:
                return
            try:
                infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                continue
            with lock:
                found[name] = frozenset(str(info[4][0]) for info in infos)

    # Daemon threads: a lookup stuck past the deadline must not keep fab from exiting.
    workers = [threading.Thread(target=work, daemon=True, name="resolve")
               for _ in range(min(16, len(names)))]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + timeout
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
    with lock:
        return dict(found)


def _empty_flag() -> Inventory:
    raise InventoryError("--hosts was given but names no host")


class ClusterSession:
    """Settings, inventory and nodes of one task invocation; closes connections on exit."""

    def __init__(self, c: Context, hosts: str | list[str] | None = None):
        """hosts: a task's --hosts value ("a,b") or a list of such; empty or None: the config's."""
        if isinstance(c, Connection):
            # `fab -H a,b task` runs the task once per host, one after another: node 0 of a
            # launch would wait for node 1 forever. Our tasks fan out themselves.
            raise Exit("use the task's --hosts a,b (or cluster.hosts), not fab -H: -H runs the "
                       "task once per host, one after another", code=EXIT_USAGE)
        self.settings = load_settings(c)
        if isinstance(hosts, str):
            hosts = [hosts] if hosts else None
        self.inventory = load_inventory(self.settings, hosts, c.config)
        # How the nodes are reached (this machine, SSH or srun) is decided here, once, before
        # any host is contacted: a transport that cannot work is an error naming the fix.
        self.transport: Transport = select_transport(self.settings.cluster, self.inventory,
                                                     os.environ)
        self.nodes: list[Node] = self.transport.open_nodes(c.config, self.inventory)

    @property
    def master(self) -> Node:
        return self.nodes[0]

    @property
    def workdir(self) -> str:
        """The project checkout on every node (the local checkout's path unless configured)."""
        if self.inventory.is_local or not self.settings.cluster.workdir:
            return str(PROJECT_ROOT)
        return self.settings.cluster.workdir

    def __enter__(self) -> ClusterSession:
        return self

    def __exit__(self, *exc: object) -> None:
        close_all(self.nodes)
        self.transport.close()


__all__ = ["ClusterSession", "PROJECT_ROOT", "EXIT_USAGE", "HOSTS_HELP", "project_path", "cli_path",
           "load_settings", "load_inventory", "parse_host_entry"]
