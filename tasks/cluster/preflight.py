"""What every task checks before it starts anything on the nodes: this checkout's state, the
probe of every host, the launch's context (master address, accelerator, nproc/port), and the
table that shows a probe's facts.

Every host is probed by one shell script in one SSH round trip, all hosts at once
(tasks/lib/probe.py builds, parses and judges it). `fab check` and `fab setup` show the result;
launch, docker and sync use `probe_all` and `require_matching_checkout` before they touch a
node. A module of its own, below all of them, so that no task imports another.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from invoke.exceptions import Exit
from rich.console import Console
from rich.table import Table

from tasks.lib import sync as syncing
from tasks.lib.diagnostics import node_venv
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
    probe_input,
    probe_script,
    resolve_master_side,
)
from tasks.lib.rendezvous import reach_cell
from tasks.lib.runspec import (
    LaunchFlags,
    LaunchValues,
    RunSpecError,
    explicit_launch_config,
    resolve_launch_values,
)
from tasks.lib.settings import Settings
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, NodeResults, SshNode, on_each
from tasks.cluster.rendezvous import RendezvousCheck, check_rendezvous_auto
from tasks.cluster.session import EXIT_USAGE, PROJECT_ROOT, ClusterSession, project_path

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
        check_port = node.index == 0 and master_port is not None
        command = sh_command(probe_script(master, session.workdir, check_port=check_port,
                                          container=container, venv=venv))
        if check_port:  # the port on stdin: never in an argv (tasks/lib/probe.py)
            result = node.run_with_input(command, probe_input(master_port),
                                         timeout=PROBE_TIMEOUT_S)
        else:
            result = node.run(command, timeout=PROBE_TIMEOUT_S)
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
            # This machine alone: the node's checkout is this one, whatever it is (git or not).
            compare_checkout=not session.inventory.is_local,
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
    rendezvous: RendezvousCheck | None = None,
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
        *(("rendezvous",) if rendezvous else ()),
    ):
        table.add_column(column, overflow="fold")
    by_index = {node.index: node for node in session.nodes}
    for index in sorted(by_index):
        node = by_index[index]
        if node in results.failed:
            table.add_row(
                str(index), node.label, "[red]no[/]", "", "", "", "", "", "", "", "",
                *([""] if rendezvous else []), style="red"
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
            _checkout_cell(fact, local, session.inventory.is_local),
            _docker_cell(fact) if docker else "off",
            ""
            if index != 0
            else (
                "auto"
                if fact.port_free is None
                else f"{master_port} {_port_state(fact.port_free)}"
            ),
            format_bytes(fact.shm_bytes) if fact.shm_bytes is not None else "?",
            *([reach_cell(rendezvous.reports.get(index), index, rendezvous.port)]
              if rendezvous else []),
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


def _checkout_cell(fact: HostFacts, local: CheckoutState, same: bool = False) -> str:
    """same: the host's workdir is this checkout (this machine alone): shown, never compared."""
    if not fact.workdir_exists:
        return "[red]no workdir[/]"
    if fact.commit is None and fact.tree_hash is None:
        return "this one (no git)" if same else "[red]none[/]"
    text = (
        f"{fact.branch or 'detached'} @ {fact.commit[:12]}"
        if fact.commit
        else f"tree {fact.tree_hash[:12]}"
    )
    if fact.dirty:
        text += " [yellow]dirty[/]"
    if fact.synced:
        text += " (synced)"
    return text if same or checkout_mismatch(fact, local) is None else f"[red]{text}[/]"


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


@dataclass
class Preflight:
    """One probe of every node, judged against this checkout and the launch's own values."""

    launch: LaunchValues
    local: CheckoutState
    results: NodeResults[HostFacts]
    findings: list[Finding]
    rendezvous: RendezvousCheck | None = None


def run_preflight(session: ClusterSession, config: object, console: Console,
                  title: Callable[[CheckoutState], str] | None = None,
                  rendezvous: bool = True) -> Preflight:
    """Probe every node with the values `fab launch` would use, then (rendezvous) prove the
    path from every node to node 0's master port; print the facts table (titled by `title` of
    this checkout's state, else the node count) and the findings. `fab check` and `fab setup`
    share it."""
    launch = launch_defaults(session, config, dict(os.environ))
    local = local_checkout_state(excluded_dirs=sync_excludes(session.settings))
    results = probe_all(session, master_port=launch.master_port)
    findings = list(findings_for(session, results, local, nproc=launch.nproc))
    reach = None
    facts = sorted(results.ok.values(), key=lambda f: f.node_index)
    if rendezvous and facts and facts[0].port_free is not False:
        container = (session.settings.docker.container
                     if launch_context(session).docker_default else None)
        reach = check_rendezvous_auto(session, facts, launch.master_port, container=container)
        if reach is not None:
            findings += reach.findings
    console.print(facts_table(session, results, local,
                              title(local) if title else f"{len(session.nodes)} node(s) probed",
                              launch, reach))
    print_findings(console, findings)
    return Preflight(launch, local, results, findings, reach)
