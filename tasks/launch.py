"""`fab launch`: validate, probe, render, push, start, watch, fail fast, collect, summarise.

The task is a thin sequence over pure helpers (tasks/lib/runspec.py decides every value,
tasks/lib/runrecord.py keeps run.json); what is left here is talking to the nodes. Order matters:
every flag and file is checked before any host is contacted, and every host is probed (one round
trip each, in parallel) before anything is written to one.

Exit status: 0 the run succeeded; 1 it failed or was stopped (run.json says which node failed
first) or a host could not be reached; 2 bad flags, config or cluster state (nothing started);
3 refused: a run is already active on one of the hosts (--force launches anyway); 4 the run hung
(no rank advanced for --hang-timeout seconds: diagnostics in <run dir>/hang/, then stopped);
130 Ctrl-C detached the controller (the run goes on: `fab logs --follow`, `fab stop`).
"""
from __future__ import annotations

import getpass
import json
import os
import posixpath
import random
import re
import secrets
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from invoke import Collection, Task, task
from invoke.exceptions import Exit
from rich.console import Console
from rich.table import Table

from tasks.cluster import launch_context, probe_all, require_matching_checkout
from tasks.lib.console import make_console
from tasks.lib.diagnostics import node_venv
from tasks.lib.localfs import RefusedName, regular_file_size, write_beneath
from tasks.lib.masking import DEFAULT_SECRET_ENV_PATTERNS, mask_assignments, mask_env
from tasks.lib.nodefs import registry_for_uid
from tasks.lib.probe import (
    GIT_SAFE_OPTIONS,
    CheckoutState,
    HostFacts,
    gpu_busy_message,
    judge_cluster,
    judge_host,
)
from tasks.lib.profiling import (
    ProfilerChoice,
    missing_tools_message,
    parse_tool_check,
    profiler_output_dirs,
    profiler_wrapper_argv,
    required_tools,
    rocprof_input_node_path,
    tool_check_command,
)
from tasks.lib.quoting import sh_join
from tasks.lib.registry import launcher_start_command, render_node_launcher
from tasks.lib.render import load_nccl_preset, render_compose, render_env_script
from tasks.lib.runrecord import (
    HEADLINE_METRICS,
    RUN_JSON,
    RunRecord,
    headline_metrics,
    list_files_command,
    new_record,
    now_iso,
    parse_file_list,
    refusal_line,
    write_json_atomic,
)
from tasks.lib.runspec import (
    CONFIG_NAME_ON_NODE,
    LaunchFlags,
    RunSpec,
    RunSpecError,
    explicit_launch_config,
    nccl_env,
    node_run_dir,
    resolve_nproc,
    resolve_run_spec,
    run_id_candidates,
    socket_env,
    torchrun_argv,
)
from tasks.nodes import Node, NodeResults, describe_error, on_each
from tasks.report import write_report
from tasks.runs import active_runs, stop_run
from tasks.session import EXIT_USAGE, PROJECT_ROOT, ClusterSession, load_settings, project_path
from tasks.watch import FAIL_FAST_GRACE_S, Watcher, node_log_path, tail_command

EXIT_FAILED = 1
EXIT_BUSY = 3
EXIT_HUNG = 4
EXIT_DETACHED = 130

ENV_SCRIPT = "env.sh"
COMPOSE_FILE = "docker-compose.yaml"
NODE_LAUNCHER = "node_launcher.sh"
AUTO_PORT_RANGE = (29500, 29999)
AUTO_PORT_TRIES = 5

SHORT_FLAGS = {"channels": "c", "threads": "t", "nproc": "p", "config": "C", "rocprof": "r",
               "stats": "m"}


class LaunchTask(Task):
    """A Task whose short flags are chosen, not derived: -c/-t/-p/-r/-m as in the scripts we
    replace, -C for --config (-f is fab's own --config, so the original's -f would confuse)."""

    def __init__(self, *args: Any, short_flags: Mapping[str, str] | None = None, **kwargs: Any):
        self.short_flags = dict(short_flags or {})
        kwargs["auto_shortflags"] = False
        super().__init__(*args, **kwargs)

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        short = self.short_flags.get(name)
        if short and short not in taken_names:
            opts["names"] = [*opts["names"], short]
        return opts


# -- resolution before any host --------------------------------------------------------------------

def resolve_spec(session: ClusterSession, flags: LaunchFlags, c_config: Any,
                 environ: Mapping[str, str]) -> RunSpec:
    settings = session.settings
    context = launch_context(session)  # the same situation `fab check` judges
    try:
        spec = resolve_run_spec(flags, explicit_launch_config(c_config), environ,
                                accelerator=context.accelerator,
                                docker_default=context.docker_default,
                                project_root=PROJECT_ROOT,
                                builtin_overrides=context.builtin_overrides)
        if spec.nccl_preset:
            try:
                load_nccl_preset(spec.nccl_preset)
            except ValueError as err:
                raise RunSpecError(f"--nccl-preset: {err}") from None
        if spec.docker:
            try:
                # Validation only (the nodes' registry is known after the probe).
                render_compose(docker=settings.docker, workdir=session.workdir,
                               registry_dir=registry_for_uid(settings.cluster.registry_dir,
                                                             os.getuid()))
            except ValueError as err:
                raise RunSpecError(f"docker: {err}") from None
    except RunSpecError as err:
        raise Exit(f"launch: {err}", code=EXIT_USAGE) from None
    return spec


# -- the run's plan: what every node gets ----------------------------------------------------------

@dataclass
class Plan:
    spec: RunSpec
    run_id: str
    run_dir: Path                    # on the controller
    node_run_dir: str                # on every node
    output_dir: str                  # on every node
    nproc: int | str
    torchrun: list[str]
    profilers: ProfilerChoice        # rocprof_input there: the path on the nodes
    files: dict[str, str | bytes]    # node run dir file name -> content (launcher excluded)
    launcher: str
    record: RunRecord
    started_wall: datetime = field(default_factory=datetime.now)
    # What the controller shows and keeps of `files` where it differs: env.sh with *** for the
    # values of secret-looking variables (the nodes get the real ones).
    shown_files: dict[str, str] = field(default_factory=dict)

    def shown(self, name: str) -> str:
        return self.shown_files.get(name, str(self.files[name]))


def controller_info(secret_patterns: Sequence[str] = DEFAULT_SECRET_ENV_PATTERNS) -> dict[str, Any]:
    """Where the launch came from, for run.json and sweep.json; `--env NAME=VALUE` items of the
    command line whose name looks secret are masked."""
    commit = None
    try:
        result = subprocess.run(["git", *GIT_SAFE_OPTIONS, "-C", str(PROJECT_ROOT), "rev-parse",
                                 "HEAD"],
                                capture_output=True, text=True, timeout=5)
        if result.returncode == 0:
            commit = result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"host": socket.gethostname(), "user": getpass.getuser(), "cwd": os.getcwd(),
            "commit": commit, "argv": mask_assignments(sys.argv[1:], secret_patterns)}


def pick_run_id(spec: RunSpec, experiments_dir: Path, when: datetime, create: bool,
                token: Callable[[int], str] = secrets.token_hex) -> str:
    """A free run id (timestamp + random suffix); with create, its directory is made
    exclusively: one already there, whoever made it, is never taken over."""
    for candidate in run_id_candidates(spec.channels, spec.threads, when, token=token):
        path = experiments_dir / candidate
        if not create:
            if not path.exists():
                return candidate
            continue
        try:
            # Not world-readable: run.json, logs and outputs are the user's alone.
            path.mkdir(mode=0o700, parents=True, exist_ok=False)
            return candidate
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def build_plan(session: ClusterSession, spec: RunSpec, *, run_id: str, run_dir: Path,
               nproc: int | str, master_addr: str, master_port: int | str, ifnames: list[str],
               facts: Sequence[HostFacts] | None) -> Plan:
    settings = session.settings
    workdir = session.workdir
    remote_run_dir = node_run_dir(workdir, run_id)
    output_dir = posixpath.join(remote_run_dir, spec.output_dir_name)
    common_env: dict[str, str] = {}
    if spec.nccl_preset:
        common_env.update(load_nccl_preset(spec.nccl_preset))
    common_env.update(nccl_env(spec.channels, spec.threads, pin_channels=spec.pin_channels,
                               accelerator=spec.accelerator))
    common_env.update(dict(spec.env))
    node_env = [socket_env(ifname) for ifname in ifnames]

    files: dict[str, str | bytes] = {CONFIG_NAME_ON_NODE: spec.config_path.read_bytes()}
    profilers = spec.profilers
    if spec.rocprof_input is not None:
        node_input = rocprof_input_node_path(remote_run_dir, str(spec.rocprof_input))
        files[posixpath.basename(node_input)] = spec.rocprof_input.read_bytes()
        profilers = replace(profilers, rocprof_input=node_input)
    secret_patterns = settings.launch.secret_env_patterns
    files[ENV_SCRIPT] = render_env_script(run_id=run_id, common_env=common_env, node_env=node_env,
                                          secret_patterns=secret_patterns)
    shown_files = {ENV_SCRIPT: render_env_script(
        run_id=run_id, common_env=common_env, node_env=node_env, secret_patterns=secret_patterns,
        masked=True)}
    if spec.docker:
        # A record of the container's shape (docker-up started it): the master's registry.
        uid = facts[0].uid if facts and facts[0].uid is not None else os.getuid()
        files[COMPOSE_FILE] = render_compose(
            docker=settings.docker, workdir=workdir,
            registry_dir=registry_for_uid(settings.cluster.registry_dir, uid))
    argv = torchrun_argv(nnodes=len(session.nodes), nproc=nproc, master_addr=master_addr,
                         master_port=master_port,
                         config_path=posixpath.join(remote_run_dir, CONFIG_NAME_ON_NODE),
                         output_dir=output_dir, overrides=spec.train_overrides)
    wrapper = profiler_wrapper_argv(profilers, output_dir)
    venv = ranks_venv(session)
    launcher = render_node_launcher(
        run_id=run_id, registry_dir=settings.cluster.registry_dir, run_dir=remote_run_dir,
        output_dir=output_dir, env_script=posixpath.join(remote_run_dir, ENV_SCRIPT),
        workdir=workdir, torchrun_argv=[str(a) for a in argv], wrapper_argv=wrapper,
        container=settings.docker.container if spec.docker else None,
        venv=None if spec.docker else venv,
        venv_required=bool(settings.cluster.venv))

    record = new_record(run_id=run_id, run_dir=str(run_dir), node_run_dir=remote_run_dir,
                        output_dir=spec.output_dir_name,
                        controller=controller_info(secret_patterns),
                        flags=masked_flags(spec.flags_record(), secret_patterns),
                        created_at=now_iso())
    hosts = []
    for index, node in enumerate(session.nodes):
        host: dict[str, Any] = {"host": node.label, "ifname": ifnames[index]}
        if facts is not None:
            f = facts[index]
            host.update(hostname=f.hostname, address=f.address, gpus=f.gpu_count,
                        gpu_names=list(f.gpu_names), commit=f.commit, branch=f.branch)
        hosts.append(host)
    record.plan(master_addr=master_addr, master_port=master_port,
                nproc_per_node=nproc if isinstance(nproc, int) else 0, hosts=hosts,
                common_env=mask_env(common_env, secret_patterns),
                per_node_env=[mask_env(env, secret_patterns) for env in node_env],
                torchrun_argv=[str(a) for a in argv], wrapper_argv=wrapper)
    return Plan(spec=spec, run_id=run_id, run_dir=run_dir, node_run_dir=remote_run_dir,
                output_dir=output_dir, nproc=nproc, torchrun=[str(a) for a in argv],
                profilers=profilers, files=files,
                launcher=launcher, record=record, shown_files=shown_files)


def masked_flags(flags: Mapping[str, Any], secret_patterns: Sequence[str]) -> dict[str, Any]:
    """RunSpec.flags_record with the values of secret-looking --env variables masked."""
    return {**flags, "env": mask_env(flags.get("env") or {}, secret_patterns)}


def ranks_venv(session: ClusterSession) -> str | None:
    """The virtualenv the node launcher activates for bare runs.

    cluster.venv when set, else <workdir>/.venv. On this machine alone (no SSH) it is known
    whether that exists; if not, the environment `fab` itself runs in (None: torchrun from PATH).
    """
    chosen = node_venv(session.settings.cluster.venv, session.workdir)
    if session.settings.cluster.venv or not session.inventory.is_local \
            or Path(chosen, "bin", "activate").is_file():
        return chosen
    if sys.prefix != sys.base_prefix and Path(sys.prefix, "bin", "activate").is_file():
        return sys.prefix
    return None


def bundle_for(plan: Plan) -> dict[str, str | bytes]:
    """Every file pushed to a node's run dir, by absolute path (identical on every node)."""
    files = {posixpath.join(plan.node_run_dir, name): content
             for name, content in plan.files.items()}
    files[posixpath.join(plan.node_run_dir, RUN_JSON)] = plan.record.to_json()
    return files


def launcher_path(plan: Plan) -> str:
    return posixpath.join(plan.node_run_dir, NODE_LAUNCHER)


def abbreviate_script(command: str, limit: int = 300) -> str:
    """`bash -c <long script> name args...` with the script's body elided (it is the registry's
    shell library, tasks/lib/registry.py); the arguments stay exact."""
    parts = shlex.split(command)
    if len(parts) >= 3 and parts[:2] == ["bash", "-c"] and len(parts[2]) > limit:
        return (f"bash -c <{len(parts[2])}-byte script of tasks/lib/registry.py> "
                + sh_join(parts[3:]))
    return command


# -- dry run ---------------------------------------------------------------------------------------

def print_dry_run(session: ClusterSession, spec: RunSpec, console: Console) -> None:
    """Print what would be pushed and run on each host, contacting none of them."""
    settings = session.settings
    experiments_dir = project_path(settings.cluster.experiments_dir)
    run_id = pick_run_id(spec, experiments_dir, datetime.now(), create=False)
    master = session.inventory.master
    master_addr = "127.0.0.1" if master.local else master.host
    socket_ifname = settings.cluster.socket_ifname
    ifnames = [socket_ifname or ("lo" if node.is_local else "<route to master>")
               for node in session.nodes]
    nproc = spec.nproc if spec.nproc != "auto" else "<GPUs per node>"
    port = spec.master_port or "<free port>"
    plan = build_plan(session, spec, run_id=run_id, run_dir=experiments_dir / run_id, nproc=nproc,
                      master_addr=master_addr, master_port=port, ifnames=ifnames, facts=None)
    out = console.out
    out(f"dry run of {run_id}: no host contacted, nothing written.")
    out("assumed (the probe decides at launch time):")
    out(f"  master address: {master_addr} (node 0's address on its interface toward the workers)")
    out(f"  socket interface per host: {socket_ifname or 'the one routing to the master'}")
    out(f"  ranks per node: {nproc}; master port: {port}; accelerator: {spec.accelerator}; "
        f"docker: {'on' if spec.docker else 'off'}")
    registry = settings.cluster.registry_dir or "/tmp/gemm-runs-<uid> of the user on each host"
    out(f"  run registry: {registry}")
    for warning in spec.warnings:
        out(f"warning: {warning}")
    out(f"controller run dir: {plan.run_dir}")
    for node in session.nodes:
        where = ", this machine, no SSH" if node.is_local else ""
        out(f"\nnode {node.index} ({node.label}{where}):")
        out(f"  push to {plan.node_run_dir}/:")
        for path, content in sorted(bundle_for(plan).items()):
            out(f"    {posixpath.basename(path)} ({len(content)} bytes)")
        out(f"    {NODE_LAUNCHER} ({len(plan.launcher)} bytes)")
        out("  run:")
        out("    probe: sh -c <tasks/lib/probe.py probe_script> (GPUs, interface, checkout)")
        start = launcher_start_command(launcher_path(plan), node.index,
                                       settings.cluster.registry_dir, run_id,
                                       workdir=session.workdir)
        out(f"    start: {abbreviate_script(start)}")
        out(f"    watch: {tail_command(node_log_path(plan, node.index), '<launcher pid>')}")
        wrapper = profiler_wrapper_argv(plan.profilers, plan.output_dir, node_rank=node.index)
        argv = [*(wrapper or []), plan.torchrun[0], f"--node-rank={node.index}", *plan.torchrun[1:]]
        out(f"    ranks: {sh_join(argv)}")
    out(f"\n{ENV_SCRIPT}:")  # secret-looking values as *** (GEMM_MASKED_VARS names them)
    out(plan.shown(ENV_SCRIPT).rstrip("\n"))


# -- probe, checks, start --------------------------------------------------------------------------

def probe_cluster(session: ClusterSession, spec: RunSpec) -> tuple[list[HostFacts], int]:
    """Facts of every host (one round trip each, in parallel) and a master port free on node 0."""
    tries = 1 if spec.master_port else AUTO_PORT_TRIES
    port = spec.master_port or random.randint(*AUTO_PORT_RANGE)
    for _ in range(tries):
        results: NodeResults[HostFacts] = probe_all(session, master_port=port, docker=spec.docker)
        results.raise_if_failed("probe", code=EXIT_FAILED)
        facts = [results.ok[node] for node in session.nodes]
        if facts[0].port_free is not False:
            break
        if spec.master_port:
            raise Exit(f"launch: master port {port} is in use on {session.master.label}: pick "
                       "another with --master-port (or auto)", code=EXIT_USAGE)
        port = random.randint(*AUTO_PORT_RANGE)
    else:
        raise Exit(f"launch: no free master port found on {session.master.label} after "
                   f"{tries} tries in {AUTO_PORT_RANGE}; pass --master-port", code=EXIT_USAGE)
    require_matching_checkout(session, results)
    return facts, port


def launch_refusals(facts: Sequence[HostFacts], *, workdir: str, socket_ifname: str | None,
                    docker: bool, container: str) -> list[str]:
    """What `fab check` calls an error (probe.judge_host per host, judge_cluster across hosts),
    plus launch's own rule that a dockerized run needs its container running (check only warns).

    The checkout is not judged here: require_matching_checkout did that with the same facts
    (each host is compared with its own state). nproc is resolve_nproc's to judge.
    """
    problems: list[str] = []
    for f in facts:
        own_checkout = CheckoutState(f.branch, f.commit, f.dirty, f.tree_hash, f.diff_hash)
        problems += [finding.line().removeprefix("error: ")
                     for finding in judge_host(f, local=own_checkout, workdir=workdir, nproc="auto",
                                               docker_enabled=docker, socket_ifname=socket_ifname)
                     if finding.is_error]
        if docker and f.docker_engine is not None and f.container_state != "running":
            problems.append(f"node {f.node_index} ({f.label}): container {container} is "
                            f"{f.container_state or 'unknown'}; run `fab docker-up`")
    problems += [finding.line().removeprefix("error: ")
                 for finding in judge_cluster(facts) if finding.is_error]
    return problems


def check_facts(session: ClusterSession, spec: RunSpec,
                facts: Sequence[HostFacts]) -> tuple[int, list[str], str]:
    """(ranks per node, interface per host, master address), or Exit 2 naming what is wrong."""
    socket_ifname = session.settings.cluster.socket_ifname
    problems = launch_refusals(facts, workdir=session.workdir, socket_ifname=socket_ifname,
                               docker=spec.docker,
                               container=session.settings.docker.container)
    ifnames = [socket_ifname or f.ifname or "" for f in facts]
    try:
        nproc = resolve_nproc(spec.nproc, {f"node {f.node_index} ({f.label})": f.gpu_count
                                           for f in facts}, spec.accelerator)
    except RunSpecError as err:
        problems.append(str(err))
        nproc = 0
    master = facts[0]
    master_addr = master.address
    if socket_ifname:
        master_addr = next((addr for name, addr in master.interfaces if name == socket_ifname),
                           master_addr)
    if session.inventory.is_local:
        master_addr = "127.0.0.1"  # one node: rendezvous never leaves this machine
    if not master_addr:
        problems.append(f"node 0 ({master.label}): no address found for the master")
    if problems:
        raise Exit("launch: refused before starting anything:\n  " + "\n  ".join(problems),
                   code=EXIT_USAGE)
    return nproc, ifnames, str(master_addr)


def check_profiler(session: ClusterSession, spec: RunSpec) -> None:
    """Every profiler the flags ask for must exist where torchrun runs (in the container when
    dockerized), or nothing starts: one line per host that lacks one."""
    tools = required_tools(spec.profilers)
    if not tools:
        return
    container = session.settings.docker.container if spec.docker else None
    command = tool_check_command(tools, container=container)
    results = on_each(session.nodes, lambda node: node.run(command, timeout=30).stdout)
    results.raise_if_failed("profiler check", code=EXIT_FAILED)
    missing = {node.label: parse_tool_check(text, tools)
               for node, text in sorted(results.ok.items(), key=lambda item: item[0].index)}
    missing = {host: names for host, names in missing.items() if names}
    if missing:
        raise Exit(missing_tools_message(missing, container), code=EXIT_USAGE)


def refuse_if_busy(session: ClusterSession, force: bool, console: Console) -> None:
    active = {node: runs for node, runs in active_runs(session).items() if runs}
    if not active:
        return
    lines = [f"node {node.index} ({node.label}): run {', '.join(sorted({r.run_id for r in runs}))}"
             for node, runs in sorted(active.items(), key=lambda item: item[0].index)]
    if force:
        console.out("warning: --force: launching beside active run(s):\n  " + "\n  ".join(lines))
        return
    run_ids = sorted({r.run_id for runs in active.values() for r in runs})
    raise Exit("launch: a run is active on the cluster (two runs would share the GPUs and "
               "ports):\n  " + "\n  ".join(lines)
               + f"\nwait for it, stop it (fab stop --run {run_ids[0]}), or launch anyway with "
               "--force",
               code=EXIT_BUSY)


def push_bundle(session: ClusterSession, plan: Plan) -> None:
    """Every file to every node at once (one mkdir round trip and one SFTP session per node).
    The launcher needs no execute bit: it is started as `bash node_launcher.sh RANK`."""
    files = {**bundle_for(plan), launcher_path(plan): plan.launcher}
    # Profilers write where the ranks cannot create the directory first (nsys' report parent).
    dirs = profiler_output_dirs(plan.profilers, plan.output_dir)

    def push(node: Node) -> None:
        node.put_files(files, mode=0o600, dirs=dirs)

    results = on_each(session.nodes, push)
    record_host_failures(plan, "push", results)
    results.raise_if_failed("pushing the run bundle", code=EXIT_FAILED)


def record_host_failures(plan: Plan, phase: str, results: NodeResults[Any]) -> None:
    """run.json's first_failure for a phase that failed on some hosts (one line per host)."""
    if results.failed:
        plan.record.record_phase_failure(
            phase, {node.index: describe_error(error, node) for node, error in results.failed.items()},
            at=now_iso())


_PID = re.compile(r"(\d+)\s*$")


def start_launchers(session: ClusterSession, plan: Plan) -> dict[int, int]:
    """Start every node's launcher (detached); node rank -> launcher pid."""
    registry_dir = session.settings.cluster.registry_dir

    def start(node: Node) -> int:
        command = launcher_start_command(launcher_path(plan), node.index, registry_dir, plan.run_id,
                                         workdir=session.workdir)
        result = node.run(command, timeout=30)
        match = _PID.search(result.stdout.strip())
        if not match:
            raise RuntimeError("the launcher start printed no pid: "
                               f"{result.stdout.strip()[-200:]!r}")
        return int(match.group(1))

    results = on_each(session.nodes, start)
    if results.failed:
        record_host_failures(plan, "start", results)
        hint = ""
        if results.ok:  # never leave half a run waiting for peers that will not come
            hint = stop_after_failed_start(session, plan)
        results.raise_if_failed("starting the node launchers", code=EXIT_FAILED, hint=hint)
    return {node.index: pid for node, pid in results.ok.items()}


def stop_after_failed_start(session: ClusterSession, plan: Plan) -> str:
    """Stop the launchers that did start; what happened, for the error message (and run.json)."""
    try:
        stopped = stop_run(session, plan.run_id, FAIL_FAST_GRACE_S)
    except Exception as err:  # noqa: BLE001 - the start's failure is the error to report
        failed_lines = [f"stopping the started nodes failed: {err}"]
    else:
        failed_lines = [f"stopping node {node.index} ({node.label}) failed: "
                        f"{describe_error(error, node)}"
                        for node, error in sorted(stopped.failed.items(), key=lambda i: i[0].index)]
    if plan.record.first_failure is not None:
        plan.record.first_failure.last_lines.extend(failed_lines)
    if not failed_lines:
        return "the nodes that had started were stopped"
    return ("\n".join(failed_lines)
            + f"\nprocesses of the run may be left there: fab stop --run {plan.run_id}")


# -- collection ------------------------------------------------------------------------------------

@dataclass
class NodeCollection:
    """What one node's collection did; `refused`: (name as shown, why) of every entry of its
    output directory that was not copied."""

    files: int = 0
    bytes: int = 0
    skipped: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"files": self.files, "bytes": self.bytes, "skipped": self.skipped,
                "refused": len(self.refused)}


# run.json keeps this many refused names per node (a hostile node may list millions).
RECORDED_REFUSALS = 50


def collect_outputs(session: ClusterSession, remote_output_dir: str, target: Path,
                    nodes: Sequence[Node] | None = None) -> NodeResults[NodeCollection]:
    """Copy every node's <T>thread_<C>channels/ into the controller's run dir, unless the same file
    (same size at the same place) is already there: local runs and shared filesystems copy nothing.
    A name another node already delivered with different content goes under node_<rank>/.
    A host without the output directory, or whose files cannot be listed or copied, fails.

    A node is not trusted: only regular files with plain relative names are copied, each written
    beneath `target` without following a symlink (tasks.lib.localfs); the rest is refused and
    the node's other files still arrive."""
    claimed: dict[str, int] = {}
    lock = threading.Lock()

    def collect(node: Node) -> NodeCollection:
        listed = node.run(list_files_command(remote_output_dir), timeout=60).stdout
        listing = parse_file_list(listed)
        done = NodeCollection(refused=listing.refused)
        if node.is_local and os.path.realpath(remote_output_dir) == os.path.realpath(target):
            done.skipped = len(listing.files)  # the outputs were written where they belong
            return done
        for size, relative in listing.files:
            local = relative
            with lock:
                same = regular_file_size(target, relative) == size
                if same and claimed.get(local) in (None, node.index):
                    done.skipped += 1
                    claimed.setdefault(local, node.index)
                    continue
                if claimed.get(local, node.index) != node.index:
                    local = f"node_{node.index}/{relative}"
                claimed[local] = node.index
            try:
                with write_beneath(target, local) as handle:
                    node.get_file(posixpath.join(remote_output_dir, relative), handle)
            except RefusedName as refused:  # on this side: a file or symlink where a dir goes
                done.refused.append((refused.shown, refused.why))
                continue
            done.files += 1
            done.bytes += size
        return done

    return on_each(session.nodes if nodes is None else nodes, collect)


def record_collection(record: RunRecord, results: NodeResults[NodeCollection]) -> None:
    for node, done in results.ok.items():
        entry = record.node(node.index)
        entry.collected = done.counts()
        entry.collect_refused = [f"{name} ({why})" for name, why in done.refused[:RECORDED_REFUSALS]]
    for node, error in results.failed.items():
        record.node(node.index).collect_error = describe_error(error, node)


def refusal_lines(results: NodeResults[NodeCollection]) -> list[str]:
    """One line per node whose listing had entries that were not copied."""
    return [f"node {node.index} ({node.label}): {refusal_line(done.refused)}"
            for node, done in sorted(results.ok.items(), key=lambda item: item[0].index)
            if done.refused]


# -- ending ----------------------------------------------------------------------------------------

def write_record(plan: Plan) -> None:
    write_json_atomic(plan.run_dir / RUN_JSON, plan.record.to_dict())


def print_summary(console: Console, plan: Plan, watcher: Watcher | None) -> None:
    table = Table(title=f"run {plan.run_id}", title_justify="left")
    for column in ("node", "host", "status", "exit", "steps", "duration"):
        table.add_column(column)
    for node in plan.record.nodes:
        duration = "-"
        if watcher is not None:
            watch = watcher.watches[node.node_rank]
            if watch.ended_at is not None:
                duration = f"{watch.ended_at - watch.started:.1f} s"
        steps = "-" if node.steps_done is None else f"{node.steps_done}" + (
            f"/{node.steps_total}" if node.steps_total else "")
        table.add_row(str(node.node_rank), node.host, node.state,
                      "-" if node.exit_code is None else str(node.exit_code), steps, duration)
    console.print(table)
    headline = plan.record.headline
    if headline:
        metrics = Table(title="headline (median over measured steps and ranks)",
                        title_justify="left")
        metrics.add_column("metric")
        metrics.add_column("value", justify="right")
        for key, label in HEADLINE_METRICS:
            value = headline.get(key)
            metrics.add_row(label, "-" if value is None else f"{value:.4g}")
        steps_per_s = headline.get("steps_per_s")
        metrics.add_row("steps/s", "-" if steps_per_s is None else f"{steps_per_s:.4g}")
        console.print(metrics)
    failure = plan.record.first_failure
    if failure is not None:
        console.out(f"first failure: node {failure.node_rank} ({failure.host}), ranks "
                    f"{failure.ranks}: {failure.reason}", highlight=False)
        for line in failure.last_lines[-10:]:
            console.out(f"  | {line}", highlight=False)
    console.out(f"run dir: {plan.run_dir}", highlight=False)


def finish(session: ClusterSession, plan: Plan, watcher: Watcher, status: str,
           console: Console, clock: PhaseClock) -> int:
    record = plan.record
    for watch in watcher.watches:
        node = record.node(watch.rank)
        node.steps_done, node.steps_total = watch.steps_done, watch.steps_total
        record.mark_node_ended(watch.rank, state=watch.state or "lost", exit_code=watch.exit_code,
                               at=now_iso())
    # A lost node does not answer: asking it again would only add a timeout per node.
    lost = [node for node in session.nodes if record.node(node.index).state == "lost"]
    collected = collect_outputs(session, plan.output_dir, plan.run_dir / plan.spec.output_dir_name,
                                nodes=[node for node in session.nodes if node not in lost])
    # A node that failed early may never have made its output directory: run.json says so, and
    # the launch ends as the run did.
    record_collection(record, collected)
    for node, error in sorted(collected.failed.items(), key=lambda item: item[0].index):
        console.out(f"launch: collecting outputs of node {node.index} ({node.label}) failed: "
                    f"{describe_error(error, node)}", highlight=False)
    for line in refusal_lines(collected):
        console.out(f"launch: collecting outputs of {line}", highlight=False)
    for node in lost:
        record.node(node.index).collect_error = "not collected: the node was lost"
        console.out(f"launch: node {node.index} ({node.label}) was lost: its outputs stay there; "
                    f"once it answers: fab collect --run {plan.run_id}", highlight=False)
    clock.mark("collect")
    summary_path = plan.run_dir / plan.spec.output_dir_name / "summary.json"
    if summary_path.is_file():
        try:
            record.headline = headline_metrics(json.loads(summary_path.read_text()))
        except (OSError, ValueError):
            pass
    code = {"succeeded": 0, "hung": EXIT_HUNG}.get(status, EXIT_FAILED)
    record.finish(status=status, exit_status=code, at=now_iso())
    write_record(plan)
    print_summary(console, plan, watcher)
    if status == "hung" and record.hang:
        console.out(f"run hung: rank(s) {record.hang.get('first_stalled_ranks')} stopped advancing "
                    f"first; diagnostics in {plan.run_dir / 'hang'}/", highlight=False)
    write_run_report(plan, console)
    return code


def write_run_report(plan: Plan, console: Console) -> None:
    """results.csv, report.md and plots next to run.json (tasks/report.py). A report problem is
    reported, never the launch's failure: the run itself is over and recorded."""
    try:
        result = write_report(plan.run_dir)
        console.out(f"report: {plan.run_dir / 'report.md'} ({len(result.files)} file(s))",
                    highlight=False)
    except Exception as err:  # noqa: BLE001 - see the docstring
        console.out(f"launch: no report written ({type(err).__name__}: {err}); "
                    f"`fab report {plan.run_dir}` retries", highlight=False)


def detach_message(run_id: str) -> str:
    return (f"run {run_id} goes on without this controller.\n"
            f"  follow: fab logs --follow --run {run_id}\n"
            f"  status: fab status\n"
            f"  stop:   fab stop --run {run_id}\n"
            f"  outputs (separate filesystems): fab collect --run {run_id}")


# -- the task --------------------------------------------------------------------------------------

@task(
    klass=LaunchTask,
    short_flags=SHORT_FLAGS,
    iterable=["override", "env", "hosts"],
    help={
        "channels": "NCCL channels, 1-64: NCCL_MIN/MAX_NCHANNELS (and NCCL_MIN/MAX_CTAS on CUDA). "
                    "Default: launch.channels, $CHANNELS, 28",
        "threads": "threads per block, 64/128/256/512: RCCL_THREADS_PER_BLOCK and NCCL_NTHREADS. "
                   "Default: launch.threads, $THREADS, 256",
        "nproc": "ranks per node, or 'auto' = the GPUs of each node. Default: launch.nproc, "
                 "$NPROC_PER_NODE, 8 (2 on CPU nodes)",
        "config": "train config YAML, validated before any host is contacted. Default: "
                  "launch.config, $CONFIG_FILE, config/multi_node/distributed_multinode.yaml "
                  "(cpu_tiny.yaml on CPU nodes)",
        "rocprof": "wrap torchrun in rocprofv3 (kernel trace into rocprof_traces/node_<rank>/)",
        "stats": "rocprofv3 kernel statistics (implies --rocprof)",
        "rocprof_input": "rocprofv3 input file (yaml/json; implies --rocprof), pushed with the run",
        "nsys": "wrap torchrun in Nsight Systems (CUDA nodes; reports into nsys/node_<rank>)",
        "torch_profile": "turn on the train package's torch profiler (traces in torch_profiler/)",
        "hang_timeout": "seconds without progress of any rank before diagnostics and a stop "
                        "(default: launch.hang_timeout, 600; 0: off)",
        "master_port": "rendezvous port on node 0, checked free there; 'auto' (default) picks one",
        "nccl_preset": "NCCL settings from config/nccl/<name>.yaml: ib, ethernet, debug",
        "override": "train config override section.key=value (repeatable), "
                    "e.g. training.max_steps=50",
        "env": "extra variable KEY=VALUE for every rank (repeatable); the value arrives literally",
        "docker": "run the ranks in the experiment container (fab docker-up) on every node",
        "no_docker": "run the ranks bare on every node (activating cluster.venv)",
        "detach": "return right after the start, printing the run id (fab logs/status/stop)",
        "dry_run": "print, per host, the files it would push and the commands; contact no host",
        "force": "launch even while another run is active on one of the hosts",
        "pin_channels": "pin channels (min = max); --no-pin-channels sets only the maxima",
        "hosts": "hosts for this run, master first (comma-separated or repeated); "
                 "default: the inventory",
    },
)
def launch(c, channels=None, threads=None, nproc=None, config=None, rocprof=False, stats=False,
           rocprof_input=None, nsys=False, torch_profile=False, master_port=None,
           nccl_preset=None, override=None, env=None, docker=False, no_docker=False,
           detach=False, dry_run=False, force=False, pin_channels=True, hang_timeout=None,
           hosts=None):
    """Run the GEMM training on every node: validate, probe, push, start, watch, collect.

    With no inventory this machine alone runs it, without SSH (GPU if present, else 2 CPU ranks
    with gloo and config/multi_node/cpu_tiny.yaml). Ctrl-C detaches; the run goes on.
    """
    if docker and no_docker:
        raise Exit("launch: --docker and --no-docker contradict each other; give one",
                   code=EXIT_USAGE)
    console = make_console(soft_wrap=True)
    flags = LaunchFlags(
        channels=channels, threads=threads, nproc=nproc, config=config, master_port=master_port,
        nccl_preset=nccl_preset, overrides=tuple(override or ()), env=tuple(env or ()),
        docker=True if docker else (False if no_docker else None), rocprof=rocprof, stats=stats,
        rocprof_input=rocprof_input, nsys=nsys, torch_profile=torch_profile,
        hang_timeout=hang_timeout, pin_channels=pin_channels, detach=detach, dry_run=dry_run,
        force=force)
    started = time.monotonic()
    with ClusterSession(c, hosts) as session:  # no host is contacted until the probe
        spec = resolve_spec(session, flags, c.config, os.environ)
        if spec.dry_run:
            print_dry_run(session, spec, console)
            return
        code = run_launch(session, spec, console, started=started)
    if code:
        raise Exit(code=code)


@dataclass
class RunOutcome:
    """What run_launch got to, filled in as it goes: the caller (fab sweep) still knows which run
    it started when Ctrl-C or an Exit ends the call half-way."""

    run_id: str | None = None     # set as soon as the run id is chosen (before any push)
    run_dir: Path | None = None   # the controller's run directory
    started: bool = False         # at least one node launcher was started
    status: str | None = None     # run.json's final status: succeeded|failed|stopped|hung|detached
    exit_code: int | None = None  # what run_launch returned


class PhaseClock:
    """Seconds spent in each launch phase, for run.json (and docs/PERFORMANCE.md)."""

    def __init__(self, started: float):
        self.last = started
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = round(now - self.last, 3)
        self.last = now


def run_launch(session: ClusterSession, spec: RunSpec, console: Console,
               outcome: RunOutcome | None = None, started: float | None = None) -> int:
    """Probe, start and (unless detached) watch one run; the launch's exit status."""
    outcome = outcome if outcome is not None else RunOutcome()
    code = _run_launch(session, spec, console, outcome, started or time.monotonic())
    outcome.exit_code = code
    return code


def _run_launch(session: ClusterSession, spec: RunSpec, console: Console, outcome: RunOutcome,
                started: float) -> int:
    clock = PhaseClock(started)
    clock.mark("validate")
    for warning in spec.warnings:
        console.out(f"warning: {warning}", highlight=False)
    facts, port = probe_cluster(session, spec)
    check_profiler(session, spec)  # before the GPU checks: a missing profiler is named per host
    nproc, ifnames, master_addr = check_facts(session, spec, facts)
    for f in facts:  # another user's job on our GPUs is theirs: named, never counted as ours
        busy = gpu_busy_message(f)
        if busy:
            console.out(f"warning: node {f.node_index} ({f.label}): {busy}", highlight=False)
    clock.mark("probe")
    refuse_if_busy(session, spec.force, console)
    clock.mark("busy_check")

    experiments_dir = project_path(session.settings.cluster.experiments_dir)
    started_wall = datetime.now()
    run_id = pick_run_id(spec, experiments_dir, started_wall, create=True)
    run_dir = experiments_dir / run_id
    outcome.run_id, outcome.run_dir = run_id, run_dir
    plan = build_plan(session, spec, run_id=run_id, run_dir=run_dir, nproc=nproc,
                      master_addr=master_addr, master_port=port, ifnames=ifnames, facts=facts)
    plan.started_wall = started_wall
    plan.record.timings = clock.phases
    for name in (ENV_SCRIPT, COMPOSE_FILE):
        if name in plan.files:
            (run_dir / name).write_text(plan.shown(name))
    write_record(plan)
    clock.mark("render")
    phase = "push"
    try:
        push_bundle(session, plan)
        clock.mark("push")
        phase = "start"
        pids = start_launchers(session, plan)
    except BaseException as err:
        # run.json exists: it must not stay "rendered" (the report would show it running).
        fail_record(plan, phase, err)
        outcome.status = plan.record.status
        raise
    outcome.started = True
    clock.mark("start")
    at = now_iso()
    for rank, pid in pids.items():
        plan.record.mark_started(rank, pid, at)
    if spec.detach:
        plan.record.status = "detached"
    write_record(plan)
    console.out(f"launch: {run_id}: {len(session.nodes)} node(s) x {nproc} rank(s), master "
                f"{master_addr}:{port}, {'docker' if spec.docker else 'bare'}", highlight=False)
    if spec.detach:
        outcome.status = "detached"
        console.out(detach_message(run_id), highlight=False)
        return 0

    watcher = Watcher(session, plan, pids, console)
    try:
        watcher.start_tails()
        status = watcher.wait()
    except KeyboardInterrupt:
        plan.record.status = outcome.status = "detached"
        write_record(plan)
        console.out(f"\nlaunch: detached (Ctrl-C). {detach_message(run_id)}", highlight=False)
        return EXIT_DETACHED
    finally:
        watcher.close()
    clock.mark("watch")
    code = finish(session, plan, watcher, status, console, clock)
    outcome.status = plan.record.status
    return code


def fail_record(plan: Plan, phase: str, error: BaseException) -> None:
    """Finish run.json as failed in `phase` (the per-host lines when the phase recorded them)."""
    record = plan.record
    if record.first_failure is None:
        detail = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else (
            str(getattr(error, "message", "") or error) or type(error).__name__)
        record.record_phase_failure(phase, {}, at=now_iso(), detail=detail)
    record.finish(status="failed", exit_status=EXIT_FAILED, at=now_iso())
    write_record(plan)


def latest_run_dir(experiments_dir: Path) -> Path | None:
    runs = [p for p in experiments_dir.glob("multinode_*") if (p / RUN_JSON).is_file()]
    return max(runs, key=lambda p: (p / RUN_JSON).stat().st_mtime) if runs else None


@task(iterable=["hosts"], help={
    "run": "run id (a directory under experiments/); default: the latest run",
    "hosts": "hosts of that run, master first; default: the inventory (as for the launch)",
})
def collect(c, run=None, hosts=None):
    """Copy a run's outputs from every node into its run directory on this controller.

    For runs started with --detach or left by Ctrl-C: `fab launch` does this itself when it
    watches a run to its end. Files already here with the same size are skipped.
    """
    experiments_dir = project_path(load_settings(c).cluster.experiments_dir)
    run_dir = experiments_dir / run if run else latest_run_dir(experiments_dir)
    if run_dir is None or not (run_dir / RUN_JSON).is_file():
        raise Exit(f"collect: no run.json for {run or 'any run'} under {experiments_dir} "
                   "(give --run with a directory name from there)", code=EXIT_USAGE)
    try:
        record = RunRecord.from_json((run_dir / RUN_JSON).read_text())
    except ValueError as err:
        raise Exit(f"collect: {run_dir / RUN_JSON}: {err}", code=EXIT_USAGE) from None
    with ClusterSession(c, hosts) as session:
        labels = [node.label for node in session.nodes]
        recorded = [node.host for node in record.nodes]
        if recorded and labels != recorded:
            raise Exit(f"collect: run {record.run_id} ran on {', '.join(recorded)} but the "
                       f"inventory is {', '.join(labels)}; pass --hosts {','.join(recorded)}",
                       code=EXIT_USAGE)
        collected = collect_outputs(session, posixpath.join(record.node_run_dir, record.output_dir),
                                    run_dir / record.output_dir)
    record_collection(record, collected)
    for node, done in sorted(collected.ok.items(), key=lambda item: item[0].index):
        print(f"node {node.index}: {done.files} file(s), {done.bytes} bytes copied, "
              f"{done.skipped} already there")
    write_json_atomic(run_dir / RUN_JSON, record.to_dict())
    refused = refusal_lines(collected)
    not_copied = "\n  ".join(["some outputs were not copied:", *refused]) if refused else ""
    collected.raise_if_failed("collecting outputs", code=EXIT_FAILED,
                              hint="\n".join(filter(None, [
                                  f"the files stay on those hosts; `fab collect --run "
                                  f"{record.run_id}` retries", not_copied])))
    if refused:
        # Everything else was collected: the exit status says the outputs are not all here.
        raise Exit(f"collect: {not_copied}", code=EXIT_FAILED)


ns = Collection(launch, collect)
