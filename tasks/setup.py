"""`fab setup`: write the inventory and the network interface a first launch needs (asked, or
given as flags), probe the result and say what to run next."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.console import Console
from rich.prompt import Confirm, Prompt

from tasks.lib.configedit import ConfigEditError, set_yaml_key
from tasks.lib.console import make_console
from tasks.lib.inventory import HostSpec, Inventory, render_hosts_file
from tasks.lib.probe import Finding, HostFacts
from tasks.lib.settings import Settings
from tasks.cluster.preflight import run_preflight
from tasks.cluster.session import (
    EXIT_USAGE,
    PROJECT_ROOT,
    ClusterSession,
    load_inventory,
    load_settings,
    project_path,
)


def _config_file_setting(c, prefix: str, section: str, key: str) -> bool:
    """Whether the config file at level `prefix` ("runtime", "project") sets section.key.

    Invoke keeps each level's data apart (`_runtime`, `_project`): private but stable in the
    pinned invoke 2.2.1, and the only way to know which file a value came from.
    """
    data = getattr(c.config, f"_{prefix}", None) or {}
    value = (data.get(section) or {}) if isinstance(data, dict) else {}
    return isinstance(value, dict) and value.get(key) not in (None, [], ())


def _config_file_path(c, prefix: str) -> Path | None:
    path = getattr(c.config, f"_{prefix}_path", None)
    return Path(path) if path else None


def inventory_target(c, settings: Settings) -> tuple[str, Path]:
    """Where setup writes the hosts so the next task reads them: ("hosts_file"|"config", path).

    The hosts file (cluster.hosts_file, default node_ip_list.txt) unless cluster.hosts is set in
    a config file, which would shadow it: then that file's cluster.hosts is updated.
    """
    if settings.cluster.hosts:
        for prefix in ("runtime", "project"):
            path = _config_file_path(c, prefix)
            if path and _config_file_setting(c, prefix, "cluster", "hosts"):
                return "config", path
        raise Exit(
            "cluster.hosts is set outside this project's config files (user or system "
            "fabric config, or the environment) and would override what setup writes; "
            "remove it there, or set the hosts yourself",
            code=EXIT_USAGE,
        )
    return "hosts_file", project_path(settings.cluster.hosts_file)


def iface_target(c) -> Path:
    """cluster.socket_ifname goes to the runtime file (-f) if any, else the project fabric.yaml."""
    return (
        _config_file_path(c, "runtime")
        or _config_file_path(c, "project")
        or PROJECT_ROOT / "fabric.yaml"
    )


def _update_yaml(path: Path, key: str, value: object) -> None:
    text = path.read_text() if path.exists() else ""
    try:
        path.write_text(set_yaml_key(text, "cluster", key, value))
    except ConfigEditError as err:
        raise Exit(
            f"cannot update {path}: {err}; set cluster.{key} there yourself", code=1
        ) from None


def _prompt_hosts(console: Console, current: Inventory) -> str:
    default = ",".join(h.label for h in current.hosts) if not current.is_local else None
    console.print(
        "Hosts of this cluster, master first (node 0 runs the rendezvous), "
        "comma- or space-separated; [user@]host[:port]."
    )
    answer = Prompt.ask("hosts", default=default, console=console)
    return ",".join((answer or "").replace(",", " ").split())


@task(
    help={
        "hosts": "Comma-separated hosts, master first ([user@]host[:port]); default: the current "
        "inventory (config, hosts file or Slurm allocation).",
        "iface": "Force this network interface on every host (writes cluster.socket_ifname); by "
        "default each host's interface is resolved by its route to the master at launch.",
        "yes": "Do not ask: write without confirmation (required without a terminal).",
    }
)
def setup(c, hosts=None, iface=None, yes=False):
    """Probe the nodes and write the inventory (and a forced interface), then print next steps.

    The hosts go to cluster.hosts_file (node_ip_list.txt), master first, or to the config file
    that sets cluster.hosts. Never touches authorized_keys: SSH access must already work.
    """
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if not yes and not interactive:
        raise Exit(
            "fab setup asks questions but there is no terminal; run it unattended with "
            "--yes (and --hosts h1,h2,...)",
            code=EXIT_USAGE,
        )
    settings = load_settings(c)
    console = make_console()
    if hosts is None and not yes:
        hosts = _prompt_hosts(console, load_inventory(settings)) or None
    if iface is not None and not is_ifname(iface):
        raise Exit(
            f"--iface {iface!r} is not an interface name (1-15 of letters, digits, '_.-')",
            code=EXIT_USAGE,
        )
    target_kind, target = inventory_target(c, settings)
    with ClusterSession(c, hosts=hosts) as session:
        if session.inventory.is_local:
            raise Exit(
                "no hosts to set up: pass --hosts master,worker1,... (master first)",
                code=EXIT_USAGE,
            )
        preflight = run_preflight(session, c.config, console)
        results, findings = preflight.results, preflight.findings
        results.raise_if_failed(
            "setup",
            hint="fix SSH access first (setup never edits authorized_keys: use "
            "ssh-copy-id or your site's key registration), then run setup again",
        )
        facts = [results.ok[node] for node in session.nodes]
        if iface:
            missing = [f for f in facts if iface not in {name for name, _ in f.interfaces}]
            if missing:
                raise Exit(
                    f"--iface {iface}: no IPv4 address on "
                    + ", ".join(f"node {f.node_index} ({f.label})" for f in missing)
                    + "; pick an interface present on every host or omit --iface",
                    code=1,
                )
        specs = session.inventory.hosts
    plan = [
        f"hosts ({len(specs)}, master {specs[0].label}) -> "
        + (f"{target}" if target_kind == "hosts_file" else f"cluster.hosts in {target}")
    ]
    if iface:
        plan.append(f"cluster.socket_ifname = {iface} -> {iface_target(c)}")
    console.print("Will write:\n  " + "\n  ".join(plan))
    if not yes:
        if not Confirm.ask("Write these?", default=True, console=console):
            raise Exit("nothing written", code=1)
    write_inventory(target_kind, target, specs)
    if iface:
        _update_yaml(iface_target(c), "socket_ifname", iface)
    console.print(
        "[green]written[/]. "
        + "Next steps:\n  "
        + "\n  ".join(next_steps(facts, findings, settings))
    )


def is_ifname(name: str) -> bool:
    return (
        bool(name)
        and len(name) <= 15
        and all(ch.isalnum() or ch in "_.-" for ch in name)
        and name.isascii()
    )


def write_inventory(kind: str, path: Path, specs: Sequence[HostSpec]) -> None:
    if kind == "hosts_file":
        path.parent.mkdir(parents=True, exist_ok=True)
        comment = (
            f"Written by `fab setup` on {socket.gethostname()} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}. One host per line, master first."
        )
        path.write_text(render_hosts_file(specs, comment))
    else:
        _update_yaml(path, "hosts", [spec.label for spec in specs])


def next_steps(
    facts: Sequence[HostFacts], findings: Sequence[Finding], settings: Settings
) -> list[str]:
    steps = []
    messages = " ".join(f.message for f in findings)
    if "checkout differs" in messages or "workdir" in messages:
        steps.append("fab sync            # make every node's checkout match this one")
    if settings.docker.enabled and any(f.container_state != "running" for f in facts):
        steps.append("fab docker-up       # start the container on every node")
    steps.append("fab check           # preflight again")
    gpus = min(f.gpu_count for f in facts)
    nproc = gpus if gpus else 1
    steps.append(
        f"fab launch --channels {settings.launch.channels} --threads {settings.launch.threads}"
        f" --nproc {nproc}"
    )
    return steps


ns = Collection(setup)
