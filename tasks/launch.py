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
import io
import json
import os
import posixpath
import random
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import deque
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
from tasks.diagnose import HangMonitor
from tasks.lib.probe import HostFacts
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
from tasks.lib.quoting import sh_join, sh_quote
from tasks.lib.registry import (
    launcher_start_command,
    parse_status,
    render_node_launcher,
    status_command,
)
from tasks.lib.render import load_nccl_preset, render_compose, render_env_script
from tasks.lib.runrecord import (
    AGENT_DEATH_SIGNAL,
    FINAL_NODE_STATES,
    HEADLINE_METRICS,
    RUN_JSON,
    Evidence,
    RunRecord,
    choose_first_failure,
    classify_line,
    failure_reason,
    exit_reason,
    headline_metrics,
    list_files_command,
    new_record,
    now_iso,
    parse_file_list,
    parse_progress,
)
from tasks.lib.runspec import (
    CONFIG_NAME_ON_NODE,
    LaunchFlags,
    RunSpec,
    RunSpecError,
    explicit_launch_config,
    log_file_name,
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

EXIT_FAILED = 1
EXIT_BUSY = 3
EXIT_HUNG = 4
EXIT_DETACHED = 130

ENV_SCRIPT = "env.sh"
COMPOSE_FILE = "docker-compose.yaml"
NODE_LAUNCHER = "node_launcher.sh"
# A failure is rarely alone: the ranks of other nodes fail right after, as victims. Waiting this
# long after the first sign lets the real culprit's report (a rank killed by a signal) arrive.
FAILURE_SETTLE_S = 2.0
FAIL_FAST_GRACE_S = 3.0        # SIGTERM -> SIGKILL when stopping the survivors of a failure
HEARTBEAT_S = 2.0              # how often each node's registry state is read while attached
HEARTBEAT_TIMEOUT_S = 15.0
# A node counts as lost (and the run as failed) when its registry could not be read for this
# long: a loaded node answers slowly, a dead one never; the NCCL timeout is minutes away.
LOST_AFTER_S = 30.0
PROGRESS_LINE_S = 10.0         # at most this often, a "progress:" line with every node's steps
TAIL_POLL_S = 0.5
# After the registry says every node ended, a tail may still be delivering the last lines (it
# notices the launcher's exit at its next poll): wait this long for the streams to end.
TAIL_DRAIN_S = 5.0
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
                render_compose(docker=settings.docker, workdir=session.workdir,
                               registry_dir=settings.cluster.registry_dir)
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


def controller_info() -> dict[str, Any]:
    commit = None
    try:
        result = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=5)
        if result.returncode == 0:
            commit = result.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"host": socket.gethostname(), "user": getpass.getuser(), "cwd": os.getcwd(),
            "commit": commit, "argv": sys.argv[1:]}


def pick_run_id(spec: RunSpec, experiments_dir: Path, when: datetime, create: bool) -> str:
    """The first free run id; with create, its directory is made atomically (two launches in the
    same second get _1, _2 ...)."""
    for candidate in run_id_candidates(spec.channels, spec.threads, when):
        path = experiments_dir / candidate
        if not create:
            if not path.exists():
                return candidate
            continue
        try:
            path.mkdir(parents=True, exist_ok=False)
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
    files[ENV_SCRIPT] = render_env_script(run_id=run_id, common_env=common_env, node_env=node_env)
    if spec.docker:
        files[COMPOSE_FILE] = render_compose(docker=settings.docker, workdir=workdir,
                                             registry_dir=settings.cluster.registry_dir)
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
                        output_dir=spec.output_dir_name, controller=controller_info(),
                        flags=spec.flags_record(), created_at=now_iso())
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
                common_env=common_env, per_node_env=node_env, torchrun_argv=[str(a) for a in argv],
                wrapper_argv=wrapper)
    return Plan(spec=spec, run_id=run_id, run_dir=run_dir, node_run_dir=remote_run_dir,
                output_dir=output_dir, nproc=nproc, torchrun=[str(a) for a in argv],
                profilers=profilers, files=files,
                launcher=launcher, record=record)


def ranks_venv(session: ClusterSession) -> str | None:
    """The virtualenv the node launcher activates for bare runs.

    cluster.venv when set, else <workdir>/.venv. On this machine alone (no SSH) it is known
    whether that exists; if not, the environment `fab` itself runs in (None: torchrun from PATH).
    """
    settings = session.settings
    if settings.cluster.venv:
        return settings.cluster.venv
    default = posixpath.join(session.workdir, ".venv")
    if not session.inventory.is_local or Path(default, "bin", "activate").is_file():
        return default
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


def node_log_path(plan: Plan, node_rank: int) -> str:
    return posixpath.join(plan.output_dir, f"node_{node_rank}_output.log")


def tail_command(log_path: str, launcher_pid: int | str, from_start: bool = True) -> str:
    """Stream a node's output log until its launcher exits: from its first line, or (a stream
    reopened after its SSH channel broke) from its end.

    -F waits for the file to appear; --pid ends tail once the launcher is gone and the file has
    been read to the end, so nothing the node wrote is cut off.
    """
    start = "+1" if from_start else "0"
    return (f"exec tail -n {start} -F -s {TAIL_POLL_S} --pid={sh_quote(launcher_pid)} "
            f"{sh_quote(log_path)} 2>/dev/null")


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
                                       settings.cluster.registry_dir, run_id)
        out(f"    start: {abbreviate_script(start)}")
        out(f"    watch: {tail_command(node_log_path(plan, node.index), '<launcher pid>')}")
        wrapper = profiler_wrapper_argv(plan.profilers, plan.output_dir, node_rank=node.index)
        argv = [*(wrapper or []), plan.torchrun[0], f"--node-rank={node.index}", *plan.torchrun[1:]]
        out(f"    ranks: {sh_join(argv)}")
    out(f"\n{ENV_SCRIPT}:")
    out(str(plan.files[ENV_SCRIPT]).rstrip("\n"))


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


def check_facts(session: ClusterSession, spec: RunSpec,
                facts: Sequence[HostFacts]) -> tuple[int, list[str], str]:
    """(ranks per node, interface per host, master address), or Exit 2 naming what is wrong."""
    problems: list[str] = []
    socket_ifname = session.settings.cluster.socket_ifname
    ifnames: list[str] = []
    for f in facts:
        if socket_ifname:
            names = {name for name, _ in f.interfaces}
            if f.interfaces and socket_ifname not in names:
                problems.append(f"node {f.node_index} ({f.label}): cluster.socket_ifname "
                                f"{socket_ifname!r} not found (has {', '.join(sorted(names))})")
            ifnames.append(socket_ifname)
        elif f.ifname:
            ifnames.append(f.ifname)
        else:
            problems.append(f"node {f.node_index} ({f.label}): no route to the master; fix name "
                            "resolution on that host or set cluster.socket_ifname")
            ifnames.append("")
        if spec.docker and f.container_state != "running":
            state = f.container_state or "unknown"
            detail = f": {f.docker_error}" if f.docker_error else ""
            problems.append(f"node {f.node_index} ({f.label}): container "
                            f"{session.settings.docker.container} is {state}{detail}; "
                            "run `fab docker-up`")
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
        node.put_files(files, mode=0o644)
        if dirs:
            node.run("mkdir -p -- " + " ".join(sh_quote(d) for d in dirs))

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
        command = launcher_start_command(launcher_path(plan), node.index, registry_dir, plan.run_id)
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


# -- watching --------------------------------------------------------------------------------------

class LineSink(io.TextIOBase):
    """A text stream for Invoke's out_stream that hands over whole lines."""

    def __init__(self, on_line: Callable[[str], None]):
        self._on_line = on_line
        self._partial = ""

    def write(self, text: str) -> int:
        data = self._partial + text
        *lines, self._partial = data.split("\n")
        for line in lines:
            self._on_line(line.rstrip("\r"))
        return len(text)

    def flush(self) -> None:
        pass

    def close_partial(self) -> None:
        if self._partial:
            self._on_line(self._partial)
            self._partial = ""


@dataclass
class NodeWatch:
    node: Node
    rank: int
    pid: int
    log_file: Any
    started: float
    lines: deque = field(default_factory=lambda: deque(maxlen=40))
    steps_done: int | None = None
    steps_total: int | None = None
    tail_done: threading.Event = field(default_factory=threading.Event)
    tail_error: BaseException | None = None
    tail_checked: bool = False     # the registry was read once after the stream ended
    tail_restarts: int = 0
    ended_at: float | None = None
    state: str | None = None
    exit_code: int | None = None
    last_ok: float = field(default_factory=time.monotonic)  # last successful registry read
    stopping_from_outside: bool = False
    log_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def ended(self) -> bool:
        return self.ended_at is not None

    def write_line(self, line: str) -> bool:
        """Append to the controller's log; False once it is closed (a stream that outlived the
        wait: the line is still in the node's own output log)."""
        with self.log_lock:
            if self.log_file.closed:
                return False
            self.log_file.write(line + "\n")
            self.log_file.flush()
            return True

    def close_log(self) -> None:
        with self.log_lock:
            try:
                self.log_file.close()
            except OSError:
                pass


class Watcher:
    """Streams every node's log, keeps progress and failure evidence, decides how the run ends."""

    def __init__(self, session: ClusterSession, plan: Plan, pids: Mapping[int, int],
                 console: Console):
        self.session = session
        self.plan = plan
        self.console = console
        self.lock = threading.Lock()
        self.evidence: list[Evidence] = []
        self.nproc = int(plan.nproc)
        logs_dir = plan.run_dir / "logs"
        logs_dir.mkdir(parents=True, exist_ok=True)
        now = time.monotonic()
        self.watches: list[NodeWatch] = []
        for node in session.nodes:
            name = log_file_name(node.index, plan.started_wall)
            plan.record.node(node.index).log = f"logs/{name}"
            handle = open(logs_dir / name, "a", encoding="utf-8", errors="replace")  # noqa: SIM115
            self.watches.append(NodeWatch(node=node, rank=node.index, pid=pids[node.index],
                                          log_file=handle, started=now))
        self.stop_requested_at: float | None = None
        self.last_progress_print = now
        self.hung = False
        self.done = threading.Event()
        self.heartbeat: threading.Thread | None = None
        self.hang = None
        if plan.spec.hang_timeout > 0:
            # Imports, rendezvous and calibration come before the first metrics line: allow more.
            self.hang = HangMonitor(session, plan.run_id, plan.output_dir, plan.spec.hang_timeout,
                                    world_size=plan.record.world_size, started_at=now,
                                    startup_timeout_s=max(plan.spec.hang_timeout, 300.0))
        self.last_progress_text = ""

    # the tail threads ---------------------------------------------------------------------------

    def start_tails(self) -> None:
        for watch in self.watches:
            self._start_tail(watch, from_start=True)

    def _start_tail(self, watch: NodeWatch, from_start: bool) -> None:
        watch.tail_done.clear()
        watch.tail_checked = False
        thread = threading.Thread(target=self._tail, args=(watch, from_start), daemon=True,
                                  name=f"tail-node{watch.rank}")
        thread.start()

    def _tail(self, watch: NodeWatch, from_start: bool) -> None:
        sink = LineSink(lambda line: self._on_line(watch, line))
        command = tail_command(node_log_path(self.plan, watch.rank), watch.pid, from_start)
        try:
            watch.node.run(command, warn=True, hide="err", out_stream=sink)
        except BaseException as err:  # noqa: BLE001 - reported through the heartbeat
            watch.tail_error = err
        finally:
            sink.close_partial()
            watch.tail_done.set()

    def _on_line(self, watch: NodeWatch, line: str) -> None:
        now = time.monotonic()
        watch.write_line(line)
        watch.lines.append(line)
        if (progress := parse_progress(line)):
            watch.steps_done, watch.steps_total = progress
        if AGENT_DEATH_SIGNAL.search(line):
            watch.stopping_from_outside = True
        evidence = classify_line(line, watch.rank, self.nproc, now, watch.stopping_from_outside)
        if evidence is not None:
            with self.lock:
                self.evidence.append(evidence)
        self.console.out(f"[node {watch.rank}] {line}", highlight=False)

    # the main loop --------------------------------------------------------------------------------

    def poll_states(self, watches: Sequence[NodeWatch]) -> None:
        """Read the registry state of these nodes (concurrently); record endings and losses."""
        command = status_command(self.session.settings.cluster.registry_dir, self.plan.run_id,
                                 recent=1)

        def read(node: Node) -> Any:
            return parse_status(node.run(command, timeout=HEARTBEAT_TIMEOUT_S).stdout)

        results = on_each([w.node for w in watches], read)
        now = time.monotonic()
        with self.lock:
            for watch in watches:
                if watch.node in results.failed:
                    if now - watch.last_ok >= LOST_AFTER_S and not watch.ended:
                        watch.state, watch.ended_at = "lost", now
                        self.evidence.append(Evidence(
                            watch.rank, now, "lost", None, None,
                            f"no answer for {now - watch.last_ok:.0f} s: "
                            f"{describe_error(results.failed[watch.node])}"))
                    continue
                watch.last_ok = now
                mine = [r for r in results.ok[watch.node]
                        if r.run_id == self.plan.run_id and r.node_rank == watch.rank]
                if mine:
                    self._update(watch, mine[0], now)

    def _update(self, watch: NodeWatch, record: Any, now: float) -> None:
        if record.steps_done is not None and (watch.steps_done or 0) < record.steps_done:
            watch.steps_done = record.steps_done
        if watch.ended or (record.state not in FINAL_NODE_STATES and record.pid_alive):
            return
        watch.state = record.state if record.state in FINAL_NODE_STATES else "killed"
        watch.exit_code = record.exit_code
        watch.ended_at = now
        # "stopped": someone ran `fab stop`; that ends the run but is nobody's failure.
        if watch.state != "stopped" and watch.exit_code != 0 and self.stop_requested_at is None:
            self.evidence.append(Evidence(watch.rank, now, "node-exit", None, watch.exit_code,
                                          exit_reason(watch.state, watch.exit_code)))

    def _heartbeat(self) -> None:
        """Every HEARTBEAT_S, the registry of every open node, off the main loop (a slow node
        must not delay fail-fast decisions about the others)."""
        while not self.done.wait(HEARTBEAT_S):
            open_watches = [w for w in self.watches if not w.ended]
            if not open_watches:
                return
            try:
                self.poll_states(open_watches)
            except Exception as err:  # noqa: BLE001 - the next beat tries again
                self.console.out(f"launch: heartbeat: {err}", highlight=False)

    def wait(self) -> str:
        """Until every node ended and its log stream delivered its last lines; returns
        "succeeded", "failed", "stopped" or "hung"."""
        self.heartbeat = threading.Thread(target=self._heartbeat, daemon=True, name="heartbeat")
        self.heartbeat.start()
        try:
            status = self._wait()
        finally:
            self.done.set()
        for rank in self.drain():
            self.console.out(f"launch: the log stream of node {rank} did not end within "
                             f"{TAIL_DRAIN_S:.0f} s; its last lines are in the node's output log",
                             highlight=False)
        return status

    def drain(self, timeout: float = TAIL_DRAIN_S) -> list[int]:
        """The registry may report a node's end before its tail delivered the last lines: wait
        (bounded: a lost node's stream may never end) for every stream and the heartbeat.
        Returns the node ranks whose stream was still open."""
        if self.heartbeat is not None:
            self.heartbeat.join(HEARTBEAT_TIMEOUT_S + 1)
        deadline = time.monotonic() + timeout
        for watch in self.watches:
            watch.tail_done.wait(max(0.0, deadline - time.monotonic()))
        return [w.rank for w in self.watches if not w.tail_done.is_set()]

    def _wait(self) -> str:
        first_seen: float | None = None
        while True:
            open_watches = [w for w in self.watches if not w.ended]
            # A stream ends when its launcher has exited (look at the registry at once) or when
            # its SSH channel broke (the heartbeat decides; the stream is reopened meanwhile).
            tails_finished = [w for w in open_watches
                              if w.tail_done.is_set() and not w.tail_checked]
            if tails_finished:
                self.poll_states(tails_finished)
                for watch in tails_finished:
                    watch.tail_checked = True
                    if not watch.ended and watch.tail_error is not None and watch.tail_restarts < 3:
                        watch.tail_restarts += 1
                        self.console.out(
                            f"launch: log stream of node {watch.rank} broke "
                            f"({describe_error(watch.tail_error)}); reopening it (lines in "
                            "between are in the node's output log)", highlight=False)
                        watch.tail_error = None
                        self._start_tail(watch, from_start=False)
            with self.lock:
                evidence = list(self.evidence)
            if evidence and self.stop_requested_at is None:
                first_seen = first_seen or min(e.at for e in evidence)
                all_ended = all(w.ended for w in self.watches)
                if time.monotonic() - first_seen >= FAILURE_SETTLE_S or all_ended:
                    self.fail_fast(choose_first_failure(evidence))
            if self.hang is not None and self.stop_requested_at is None:
                report = self.hang.tick([w.node for w in self.watches if not w.ended],
                                        time.monotonic())
                if report is not None:
                    self.on_hang(report)
            if all(w.ended for w in self.watches):
                break
            self.print_progress()
            time.sleep(0.1)
        if self.hung:
            return "hung"
        if self.stop_requested_at is not None:
            return "failed"
        if all(w.state == "exited" and w.exit_code == 0 for w in self.watches):
            return "succeeded"
        if any(w.state == "stopped" for w in self.watches):
            return "stopped"
        return "failed"

    def on_hang(self, report: Any) -> None:
        """No rank advanced for hang_timeout seconds: diagnostics first (stacks of the live
        processes), then stop everything; hung ranks ignore SIGTERM, so the grace is short."""
        container = self.session.settings.docker.container if self.plan.spec.docker else None
        assert self.hang is not None
        self.plan.record.hang = self.hang.diagnose(report, self.plan.run_dir, container=container,
                                                   console=self.console)
        self.hung = True
        self.stop_requested_at = time.monotonic()
        results = stop_run(self.session, self.plan.run_id, FAIL_FAST_GRACE_S)
        for node, error in results.failed.items():
            self.console.out(f"launch: stopping node {node.index} ({node.label}) failed: "
                             f"{describe_error(error)}", highlight=False)
        self.final_look()

    def final_look(self) -> None:
        """After a stop: read the registry until every launcher recorded its end (or give up)."""
        deadline = time.monotonic() + FAIL_FAST_GRACE_S + 10
        while time.monotonic() < deadline and not all(w.ended for w in self.watches):
            self.poll_states([w for w in self.watches if not w.ended])
            time.sleep(0.3)
        for watch in self.watches:
            if not watch.ended:
                watch.state, watch.ended_at = "lost", time.monotonic()

    def fail_fast(self, culprit: Evidence) -> None:
        watch = self.watches[culprit.node_rank]
        record = self.plan.record
        reason = failure_reason(culprit)
        record.record_failure(culprit.node_rank, reason=reason, exit_code=culprit.exit_code,
                              at=now_iso(), last_lines=list(watch.lines))
        if culprit.rank is not None:
            record.first_failure.ranks = [culprit.rank]  # type: ignore[union-attr]
        self.stop_requested_at = time.monotonic()
        self.console.out(f"launch: node {culprit.node_rank} ({watch.node.label}) failed first: "
                         f"{reason}; stopping every node (SIGTERM, {FAIL_FAST_GRACE_S:.0f} s, "
                         "SIGKILL)", highlight=False)
        survivors = [w for w in self.watches if not w.ended and w.state != "lost"]
        if survivors:
            results = stop_run(self.session, self.plan.run_id, FAIL_FAST_GRACE_S)
            for node, error in results.failed.items():
                self.console.out(f"launch: stopping node {node.index} ({node.label}) failed: "
                                 f"{describe_error(error)}", highlight=False)
        # Launchers stopped before the tails notice: give the registry a final look now.
        self.final_look()

    def print_progress(self) -> None:
        now = time.monotonic()
        if now - self.last_progress_print < PROGRESS_LINE_S:
            return
        parts = []
        for watch in self.watches:
            done = "-" if watch.steps_done is None else str(watch.steps_done)
            total = f"/{watch.steps_total}" if watch.steps_total else ""
            parts.append(f"node {watch.rank} {done}{total}{' (ended)' if watch.ended else ''}")
        text = "progress: " + " | ".join(parts)
        self.last_progress_print = now
        if text != self.last_progress_text:
            self.last_progress_text = text
            self.console.out(text, highlight=False)

    def close(self) -> None:
        for watch in self.watches:
            watch.close_log()


# -- collection ------------------------------------------------------------------------------------

def collect_outputs(session: ClusterSession, remote_output_dir: str,
                    target: Path) -> NodeResults[dict[str, int]]:
    """Copy every node's <T>thread_<C>channels/ into the controller's run dir, unless the same file
    (same size at the same place) is already there: local runs and shared filesystems copy nothing.
    A name another node already delivered with different content goes under node_<rank>/.
    A host without the output directory, or whose files cannot be listed or copied, fails."""
    claimed: dict[Path, int] = {}
    lock = threading.Lock()

    def collect(node: Node) -> dict[str, int]:
        listed = node.run(list_files_command(remote_output_dir), timeout=60).stdout
        listing = parse_file_list(listed)
        stats = {"files": 0, "bytes": 0, "skipped": 0}
        for size, relative in listing:
            local = target / relative
            with lock:
                same = local.exists() and local.stat().st_size == size
                if same and claimed.get(local) in (None, node.index):
                    stats["skipped"] += 1
                    claimed.setdefault(local, node.index)
                    continue
                if claimed.get(local, node.index) != node.index:
                    local = target / f"node_{node.index}" / relative
                claimed[local] = node.index
            node.get_file(posixpath.join(remote_output_dir, relative), local)
            stats["files"] += 1
            stats["bytes"] += size
        return stats

    return on_each(session.nodes, collect)


def record_collection(record: RunRecord, results: NodeResults[dict[str, int]]) -> None:
    for node, stats in results.ok.items():
        record.node(node.index).collected = stats
    for node, error in results.failed.items():
        record.node(node.index).collect_error = describe_error(error, node)


# -- ending ----------------------------------------------------------------------------------------

def write_record(plan: Plan) -> None:
    path = plan.run_dir / RUN_JSON
    tmp = path.with_name(f".{RUN_JSON}.tmp")
    tmp.write_text(plan.record.to_json())
    tmp.replace(path)


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
    collected = collect_outputs(session, plan.output_dir, plan.run_dir / plan.spec.output_dir_name)
    # A node that failed early may never have made its output directory: run.json says so, and
    # the launch ends as the run did.
    record_collection(record, collected)
    for node, error in sorted(collected.failed.items(), key=lambda item: item[0].index):
        console.out(f"launch: collecting outputs of node {node.index} ({node.label}) failed: "
                    f"{describe_error(error, node)}", highlight=False)
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
    console = Console(highlight=False, soft_wrap=True)
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
            (run_dir / name).write_text(str(plan.files[name]))
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
    for node, stats in sorted(collected.ok.items(), key=lambda item: item[0].index):
        print(f"node {node.index}: {stats['files']} file(s), {stats['bytes']} bytes copied, "
              f"{stats['skipped']} already there")
    tmp = run_dir / f".{RUN_JSON}.tmp"
    tmp.write_text(record.to_json())
    tmp.replace(run_dir / RUN_JSON)
    collected.raise_if_failed("collecting outputs", code=EXIT_FAILED,
                              hint=f"the files stay on those hosts; `fab collect --run "
                                   f"{record.run_id}` retries")


ns = Collection(launch, collect)
