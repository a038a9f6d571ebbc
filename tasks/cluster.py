"""Getting a cluster ready to launch on: `fab check`, `fab setup`, `fab sync`.

Every host is probed by one shell script in one SSH round trip, all hosts at once
(tasks/lib/probe.py builds, parses and judges it). Other task modules use `probe_all` and
`require_matching_checkout` before they start anything on the nodes.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.console import Console
from rich.prompt import Confirm, Prompt
from rich.table import Table

from tasks.lib import sync as syncing
from tasks.lib.configedit import ConfigEditError, set_yaml_key
from tasks.lib.console import make_console
from tasks.lib.diagnostics import node_venv
from tasks.lib.inventory import HostSpec, Inventory, render_hosts_file
from tasks.lib.probe import (
    GIT_DIFF_OPTIONS,
    GIT_SAFE_OPTIONS,
    CheckoutState,
    Finding,
    HostFacts,
    checkout_mismatch,
    format_bytes,
    judge_cluster,
    judge_host,
    mismatch_hint,
    parse_probe_output,
    sh_command,
    probe_script,
    resolve_master_side,
)
from tasks.lib.runspec import (
    LaunchFlags,
    LaunchValues,
    RunSpecError,
    explicit_launch_config,
    resolve_launch_values,
)
from tasks.lib.settings import Settings
from tasks.nodes import Node, NodeResults, SshNode, describe_error, on_each
from tasks.session import (
    EXIT_USAGE,
    HOSTS_HELP,
    PROJECT_ROOT,
    ClusterSession,
    load_inventory,
    load_settings,
    project_path,
)

PROBE_TIMEOUT_S = 60  # a hung nvidia-smi or docker must not hold the whole check


# -- the controller's checkout --------------------------------------------------------------------


def sync_excludes(settings: Settings | None = None) -> tuple[str, ...]:
    """Directories never synced: experiments (as configured) besides the default one."""
    excluded = {"experiments"}
    if settings is not None:
        path = project_path(settings.cluster.experiments_dir)
        try:
            excluded.add(path.resolve().relative_to(PROJECT_ROOT.resolve()).as_posix())
        except ValueError:
            pass  # outside the checkout: git lists nothing there anyway
    return tuple(sorted(excluded))


def _git(root: Path, *args: str) -> str | None:
    try:
        completed = subprocess.run(
            ["git", *GIT_SAFE_OPTIONS, "-C", str(root), *args], capture_output=True, check=False
        )
    except FileNotFoundError:
        return None
    return completed.stdout.decode(errors="surrogateescape") if completed.returncode == 0 else None


def checkout_files(
    root: Path = PROJECT_ROOT, excluded_dirs: Sequence[str] = ("experiments",)
) -> list[str]:
    """The files `fab sync` sends: tracked and untracked-not-ignored, regular files only."""
    listing = _git(root, "ls-files", "-co", "--exclude-standard", "-z")
    if listing is None:
        return []
    selected = syncing.select_sync_files(listing.split("\0"), excluded_dirs)
    # Deleted-but-tracked files, submodule directories and dangling links are not sent.
    return [path for path in selected if (root / path).is_file()]


def local_checkout_state(
    root: Path = PROJECT_ROOT, excluded_dirs: Sequence[str] = ("experiments",)
) -> CheckoutState:
    """(branch, commit, dirty, tree_hash) of the controller's checkout; None where unknown."""
    commit = (_git(root, "rev-parse", "HEAD") or "").strip() or None
    if commit is None:
        return CheckoutState(None, None, None, None)
    branch = (_git(root, "rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    files = checkout_files(root, excluded_dirs)
    diff = subprocess.run(
        ["git", *GIT_SAFE_OPTIONS, "-C", str(root), *GIT_DIFF_OPTIONS],
        capture_output=True,
        check=False,
    ).stdout
    return CheckoutState(
        branch,
        commit,
        bool(status and status.strip()),
        syncing.tree_hash(root, files),
        hashlib.sha256(diff).hexdigest(),
    )


# -- probing --------------------------------------------------------------------------------------


def master_address(session: ClusterSession) -> str:
    """The master as nodes should resolve it: ssh_config's HostName when the entry is an alias."""
    master = session.master
    if isinstance(master, SshNode):
        return master.connection.host
    # This machine alone; else a node reached without SSH (srun): its name as Slurm gave it.
    return "localhost" if master.is_local else master.spec.host


def local_accelerator() -> str:
    """This machine's GPUs by their tools (the embedded default runs here, GPU if present)."""
    if shutil.which("nvidia-smi"):
        return "cuda"
    if shutil.which("rocm-smi") or Path("/dev/kfd").exists():
        return "rocm"
    return "cpu"


@dataclass(frozen=True)
class LaunchContext:
    """What the nodes run on, and the built-ins of that situation (launch and check agree)."""

    accelerator: str
    docker_default: bool
    builtin_overrides: dict[str, object]


def launch_context(session: ClusterSession) -> LaunchContext:
    if session.inventory.is_local:
        # This machine alone: its own hardware decides (all of its GPUs unless told otherwise),
        # and Docker only when asked for.
        accelerator = local_accelerator()
        return LaunchContext(accelerator, False, {"nproc": "auto"} if accelerator != "cpu" else {})
    return LaunchContext(session.settings.docker.platform, session.settings.docker.enabled, {})


def launch_defaults(session: ClusterSession, config: object, environ: dict[str, str]) -> LaunchValues:
    """The nproc, master port ... a `fab launch` without flags would use (config, then the
    original env variables NPROC_PER_NODE, MASTER_PORT ..., then built-ins); Exit 2 when bad."""
    context = launch_context(session)
    try:
        return resolve_launch_values(LaunchFlags(), explicit_launch_config(config), environ,
                                     accelerator=context.accelerator,
                                     builtin_overrides=context.builtin_overrides)
    except RunSpecError as err:
        raise Exit(f"launch settings: {err}", code=EXIT_USAGE) from None


def probe_all(
    session: ClusterSession, *, master_port: int | None = None, docker: bool | None = None
) -> NodeResults[HostFacts]:
    """Probe every host at once, one SSH round trip each; failures are collected per host.

    master_port: checked on the master (default launch.master_port; None: not checked).
    docker: ask for the engine and container (default: whether a launch would use Docker).
    """
    settings = session.settings
    if master_port is None:
        master_port = settings.launch.master_port
    if docker is None:
        docker = launch_context(session).docker_default
    master = master_address(session)
    container = settings.docker.container if docker else None
    venv = node_venv(settings.cluster.venv, session.workdir)

    def probe(node: Node) -> HostFacts:
        script = probe_script(
            master,
            session.workdir,
            master_port=master_port if node.index == 0 else None,
            container=container,
            venv=venv,
        )
        result = node.run(sh_command(script), timeout=PROBE_TIMEOUT_S)
        return parse_probe_output(node.index, node.label, result.stdout)

    results = on_each(session.nodes, probe)
    ordered = sorted(results.ok.values(), key=lambda f: f.node_index)
    if ordered and ordered[0].node_index == 0:
        fixed = {f.node_index: f for f in resolve_master_side(ordered)}
        results.ok = {node: fixed[node.index] for node in results.ok}
    return results


def findings_for(
    session: ClusterSession,
    results: NodeResults[HostFacts],
    local: CheckoutState,
    nproc: int | str | None = None,
) -> list[Finding]:
    """Every error and warning: unreachable hosts first, then per host, then cluster-wide."""
    settings = session.settings
    docker = launch_context(session).docker_default  # judged as a launch without --docker runs
    found = [
        Finding("error", node.index, node.label, describe_error(error, node))
        for node, error in sorted(results.failed.items(), key=lambda item: item[0].index)
    ]
    facts = sorted(results.ok.values(), key=lambda f: f.node_index)
    for fact in facts:
        found += judge_host(
            fact,
            local=local,
            workdir=session.workdir,
            nproc=settings.launch.nproc if nproc is None else nproc,
            docker_enabled=docker,
            socket_ifname=settings.cluster.socket_ifname,
        )
    found += judge_cluster(facts)
    return found


def require_matching_checkout(
    session: ClusterSession, facts: NodeResults[HostFacts] | None = None
) -> None:
    """Raise Exit naming every host whose checkout differs from this one (or that cannot be asked).

    For other tasks (docker-up, launch) before they start anything: probes without Docker when
    `facts` is not given.
    """
    if session.inventory.is_local:
        return  # the only node is this checkout
    if facts is None:
        facts = probe_all(session, docker=False)
    facts.raise_if_failed("checking the checkout", hint="fix the hosts above, then retry")
    local = local_checkout_state(excluded_dirs=sync_excludes(session.settings))
    lines = []
    for fact in sorted(facts.ok.values(), key=lambda f: f.node_index):
        if not fact.workdir_exists:
            lines.append(
                f"  node {fact.node_index} ({fact.label}): workdir {session.workdir} is "
                "missing: run `fab sync` or set cluster.workdir"
            )
            continue
        why = checkout_mismatch(fact, local)
        if why:
            lines.append(
                f"  node {fact.node_index} ({fact.label}): {why}; "
                f"{mismatch_hint(fact, local, session.workdir)}"
            )
    if lines:
        raise Exit(
            f"checkout differs from this one ({describe_checkout(local)}) on "
            f"{len(lines)} host(s):\n" + "\n".join(lines),
            code=1,
        )


def describe_checkout(state: CheckoutState) -> str:
    if state.commit is None:
        return "no git checkout"
    dirty = " +uncommitted changes" if state.dirty else ""
    return f"{state.branch or 'detached'} @ {state.commit[:12]}{dirty}"


# -- presentation ---------------------------------------------------------------------------------


def _yes_no(value: bool | None, yes: str = "yes", no: str = "no") -> str:
    return "-" if value is None else (yes if value else no)


def facts_table(
    session: ClusterSession,
    results: NodeResults[HostFacts],
    local: CheckoutState,
    title: str,
    launch: LaunchValues | None = None,
):
    settings = session.settings
    nproc = settings.launch.nproc if launch is None else launch.nproc
    master_port = settings.launch.master_port if launch is None else launch.master_port
    docker = launch_context(session).docker_default
    table = Table(title=title, title_justify="left")
    for column in (
        "node",
        "host",
        "reachable",
        "hostname",
        "address",
        "iface",
        "GPUs",
        "checkout",
        "docker",
        "port",
        "shm",
    ):
        table.add_column(column, overflow="fold")
    by_index = {node.index: node for node in session.nodes}
    for index in sorted(by_index):
        node = by_index[index]
        if node in results.failed:
            table.add_row(
                str(index), node.label, "[red]no[/]", "", "", "", "", "", "", "", "", style="red"
            )
            continue
        fact = results.ok[node]
        table.add_row(
            str(index),
            node.label,
            "yes",
            fact.hostname,
            fact.address or "?",
            settings.cluster.socket_ifname or fact.ifname or "[red]?[/]",
            _gpu_cell(fact, nproc),
            _checkout_cell(fact, local),
            _docker_cell(fact) if docker else "off",
            ""
            if index != 0
            else (
                "auto"
                if fact.port_free is None
                else f"{master_port} {_port_state(fact.port_free)}"
            ),
            format_bytes(fact.shm_bytes) if fact.shm_bytes is not None else "?",
        )
    return table


def _port_state(free: bool | None) -> str:
    return _yes_no(free, "free", "[red]busy[/]")


def _gpu_cell(fact: HostFacts, nproc: int | str) -> str:
    if not fact.gpu_count:
        return "none (cpu/gloo)"
    names = sorted(set(fact.gpu_names))
    text = f"{fact.gpu_count}x {names[0] if len(names) == 1 else ', '.join(names)}"
    if isinstance(nproc, int):
        text += " [green]>= nproc[/]" if fact.gpu_count >= nproc else f" [red]< nproc {nproc}[/]"
    return text


def _checkout_cell(fact: HostFacts, local: CheckoutState) -> str:
    if not fact.workdir_exists:
        return "[red]no workdir[/]"
    if fact.commit is None and fact.tree_hash is None:
        return "[red]none[/]"
    text = (
        f"{fact.branch or 'detached'} @ {fact.commit[:12]}"
        if fact.commit
        else f"tree {fact.tree_hash[:12]}"
    )
    if fact.dirty:
        text += " [yellow]dirty[/]"
    if fact.synced:
        text += " (synced)"
    return text if checkout_mismatch(fact, local) is None else f"[red]{text}[/]"


def _docker_cell(fact: HostFacts) -> str:
    if fact.docker_engine is None:
        return "[red]no engine[/]"
    state = fact.container_state or "?"
    color = "green" if state == "running" else "yellow"
    return f"{fact.docker_engine} / [{color}]{state}[/]"


def print_findings(console: Console, findings: Sequence[Finding]) -> None:
    for finding in findings:
        color = "red" if finding.is_error else "yellow"
        console.print(f"[{color}]{finding.line()}[/]", soft_wrap=True)


# -- fab check ------------------------------------------------------------------------------------


@task(help={"hosts": HOSTS_HELP})
def check(c, hosts=None):
    """Preflight every node at once: reachability, GPUs, route to the master, checkout, Docker.

    Exits non-zero when anything would block a launch (unreachable host, host key, checkout
    different from this one, too few GPUs for the launch's nproc, busy master port, no Docker
    engine where launch would use it); warnings do not. nproc, the master port and Docker are
    what `fab launch` would use: launch.* config, else $NPROC_PER_NODE / $MASTER_PORT, else
    built-ins; Docker per docker.enabled, except on this machine alone, which runs bare.
    """
    started = time.monotonic()
    with ClusterSession(c, hosts=hosts) as session:
        launch = launch_defaults(session, c.config, dict(os.environ))
        local = local_checkout_state(excluded_dirs=sync_excludes(session.settings))
        results = probe_all(session, master_port=launch.master_port)
        findings = findings_for(session, results, local, nproc=launch.nproc)
        console = make_console()
        console.print(
            facts_table(
                session,
                results,
                local,
                f"{len(session.nodes)} node(s) from {session.inventory.source}; "
                f"this checkout: {describe_checkout(local)}; "
                f"workdir {session.workdir}",
                launch,
            )
        )
        print_findings(console, findings)
    errors = [f for f in findings if f.is_error]
    elapsed = time.monotonic() - started
    if errors:
        raise Exit(
            f"check failed: {len(errors)} problem(s) block a launch ({elapsed:.1f}s)", code=1
        )
    warnings = len(findings) - len(errors)
    console.print(
        f"[green]check passed[/] on {len(session.nodes)} node(s) in {elapsed:.1f}s"
        + (f" with {warnings} warning(s)" if warnings else "")
    )


# -- fab setup ------------------------------------------------------------------------------------


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
        launch = launch_defaults(session, c.config, dict(os.environ))
        local = local_checkout_state(excluded_dirs=sync_excludes(settings))
        results = probe_all(session, master_port=launch.master_port)
        findings = findings_for(session, results, local, nproc=launch.nproc)
        console.print(
            facts_table(session, results, local, f"{len(session.nodes)} node(s) probed", launch)
        )
        print_findings(console, findings)
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


# -- fab sync -------------------------------------------------------------------------------------


@task(help={"hosts": HOSTS_HELP})
def sync(c, hosts=None):
    """Make every node's workdir match this checkout (tracked and non-ignored files).

    Skips nodes whose workdir is this checkout (shared filesystem) and writes once per group of
    nodes that share one. Files an earlier sync wrote and this checkout no longer has are
    deleted; anything else on the node (experiments, logs, venvs) is left alone.
    """
    started = time.monotonic()
    with ClusterSession(c, hosts=hosts) as session:
        if session.inventory.is_local:
            print("nothing to sync: the only node is this machine")
            return
        outcome = sync_nodes(session)
        console = make_console()
        table = Table(
            title=f"sync of {outcome.files} file(s), tree {outcome.tree_hash[:12]}, "
            f"to {session.workdir}",
            title_justify="left",
        )
        for column in ("node", "host", "result"):
            table.add_column(column)
        for node in session.nodes:
            if node in outcome.results.failed:
                text = f"[red]failed: {describe_error(outcome.results.failed[node], node)}[/]"
            else:
                text = outcome.results.ok[node]
            table.add_row(str(node.index), node.label, text)
        console.print(table)
    outcome.results.raise_if_failed("sync")
    console.print(f"[green]synced[/] in {time.monotonic() - started:.1f}s")


@dataclass
class SyncOutcome:
    results: NodeResults[str]  # per node: what was done, or why it failed
    files: int
    tree_hash: str


def sync_nodes(session: ClusterSession) -> SyncOutcome:
    """Three parallel rounds: mark, look for markers (find shared filesystems), send to leaders."""
    excluded = sync_excludes(session.settings)
    local = local_checkout_state(excluded_dirs=excluded)
    if local.commit is None:
        raise Exit(
            f"{PROJECT_ROOT} is not a git checkout: sync sends `git ls-files` files",
            code=EXIT_USAGE,
        )
    files = checkout_files(PROJECT_ROOT, excluded)
    workdir = session.workdir
    token = secrets.token_hex(8)
    controller_marker = PROJECT_ROOT / syncing.marker_name(token, syncing.CONTROLLER_MARK)
    controller_marker.touch()
    try:
        marked = on_each(
            session.nodes, lambda node: node.run(syncing.mark_script(workdir, token, node.index))
        )
        seen_results = on_each(
            list(marked.ok),
            lambda node: syncing.parse_seen(
                node.run(syncing.seen_script(workdir, token, len(session.nodes))).stdout
            ),
        )
        with_controller, groups = syncing.filesystem_groups(
            {node.index: seen for node, (seen, _) in seen_results.ok.items()}
        )
        by_index = {node.index: node for node in session.nodes}
        previous = {node.index: old for node, (_, old) in seen_results.ok.items()}
        record = syncing.sync_record(
            tree=local.tree_hash,
            branch=local.branch,
            commit=local.commit,
            dirty=local.dirty,
            files=len(files),
            source=f"{socket.gethostname()}:{PROJECT_ROOT}",
        )
        try:
            tarball = syncing.build_tarball(
                PROJECT_ROOT,
                files,
                {
                    syncing.SYNC_FILES: syncing.files_list_bytes(files),
                    syncing.SYNC_RECORD: record,
                },
            )
        except FileNotFoundError as err:  # deleted (or renamed by an editor) since the listing
            raise Exit(f"sync: {err.filename} vanished while it was being packed (an editor "
                       "saving?): no file of the checkout was written on the nodes; run "
                       "`fab sync` again", code=1) from None

        def send(node: Node) -> str:
            stale = syncing.stale_files(previous.get(node.index, []), files)
            node.run_with_input(syncing.extract_script(workdir, token, stale), tarball)
            return f"wrote {len(files)} file(s) ({format_bytes(len(tarball))} compressed)" + (
                f", deleted {len(stale)} stale" if stale else ""
            )

        sent = on_each([by_index[leader] for leader in groups], send)
    finally:
        for marker in PROJECT_ROOT.glob(syncing.MARKER_PREFIX + token + "-*"):
            marker.unlink(missing_ok=True)
    results: NodeResults[str] = NodeResults()
    for node in session.nodes:
        error = marked.failed.get(node) or seen_results.failed.get(node) or sent.failed.get(node)
        if error is not None:
            results.failed[node] = error
        elif node.index in with_controller:
            results.ok[node] = "skipped: its workdir is this checkout (shared filesystem)"
        elif node in sent.ok:
            results.ok[node] = sent.ok[node]
        else:
            leader = next(lead for lead, members in groups.items() if node.index in members)
            results.ok[node] = f"skipped: shares its workdir with node {leader}" + (
                "" if by_index[leader] in sent.ok else " (which failed)"
            )
    return SyncOutcome(results, len(files), local.tree_hash)


ns = Collection(check, setup, sync)
