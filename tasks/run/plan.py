"""The run's plan: everything a launch computes on the controller before any node is touched
(the validated RunSpec, the run id, the rendered bundle every node gets, run.json's first draft).

Below the launch, the watcher and the transports: each of them reads a Plan, none of them builds
one. Pure but for reading the train config and `git rev-parse` (controller_info).
"""

import getpass
import os
import posixpath
import secrets
import shlex
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from invoke.exceptions import Exit

from tasks.cluster.preflight import launch_context
from tasks.lib.diagnostics import node_venv
from tasks.lib.entry import FLIGHT_DIR, entry_argv, entry_bundle, entry_env, torchrun_log_env
from tasks.lib.masking import DEFAULT_SECRET_ENV_PATTERNS, mask_assignments, mask_env
from tasks.lib.nodefs import registry_for_uid
from tasks.lib.probe import GIT_SAFE_OPTIONS, HostFacts
from tasks.lib.profiling import ProfilerChoice, profiler_wrapper_argv, rocprof_input_node_path
from tasks.lib.quoting import sh_join
from tasks.lib.registry import render_node_launcher
from tasks.lib.render import load_nccl_preset, render_compose, render_env_script
from tasks.lib.runrecord import RUN_JSON, RunRecord, new_record, now_iso, write_json_atomic
from tasks.lib.runspec import (
    CONFIG_NAME_ON_NODE,
    LaunchFlags,
    RunSpec,
    RunSpecError,
    explicit_launch_config,
    nccl_env,
    node_run_dir,
    resolve_run_spec,
    run_id_candidates,
    socket_env,
    torchrun_argv,
)
from tasks.cluster.transport import LauncherStart
from tasks.cluster.session import EXIT_USAGE, PROJECT_ROOT, ClusterSession

ENV_SCRIPT = "env.sh"
COMPOSE_FILE = "docker-compose.yaml"
NODE_LAUNCHER = "node_launcher.sh"
# Under srun: the run step's own output (srun's messages, the tasks' start lines), on the controller.
STEP_OUTPUT = "srun_step.txt"
# PyTorch's flight recorder depth for an entry's ranks (train's distributed.flight_recorder_entries).
FLIGHT_RECORDER_ENTRIES = 2000


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
                                builtin_overrides=context.builtin_overrides,
                                preset_loader=load_nccl_preset)
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
    # Directories made on every node with the push (beside the files' own parents).
    dirs: list[str] = field(default_factory=list)

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
    files: dict[str, str | bytes] = {}
    dirs: list[str] = []
    ranks_dir = workdir
    if spec.entry is None:
        files[CONFIG_NAME_ON_NODE] = spec.config_path.read_bytes()
        run_argv: list[str] | None = None
    else:
        # Your own training: what it needs from the launch is in env.sh (every rank sources it,
        # bare and in Docker); its directory, when outside the checkout, comes with the bundle.
        common_env.update(entry_env(common_env, output_dir=output_dir,
                                    accelerator=spec.accelerator,
                                    flight_entries=FLIGHT_RECORDER_ENTRIES))
        node_env = [{**env, **torchrun_log_env(output_dir, rank)}
                    for rank, env in enumerate(node_env)]
        files.update({posixpath.relpath(path, remote_run_dir): content for path, content in
                      entry_bundle(spec.entry, remote_run_dir).items()})
        run_argv, ranks_dir = entry_argv(spec.entry, workdir=workdir, node_run_dir=remote_run_dir)
        dirs.append(posixpath.join(output_dir, FLIGHT_DIR))
    profilers = spec.profilers
    if spec.rocprof_input is not None:
        node_input = rocprof_input_node_path(remote_run_dir, str(spec.rocprof_input))
        files[posixpath.basename(node_input)] = spec.rocprof_input.read_bytes()
        profilers = replace(profilers, rocprof_input=node_input)
    secret_patterns = settings.launch.secret_env_patterns
    # The run's own: every rank checks with it that node 0's store is this run's
    # (train/rendezvous.py). It exists only in the nodes' env.sh (0600).
    rendezvous = {"master_port": master_port, "rendezvous_secret": secrets.token_hex(32)}
    files[ENV_SCRIPT] = render_env_script(run_id=run_id, common_env=common_env, node_env=node_env,
                                          secret_patterns=secret_patterns, **rendezvous)
    shown_files = {ENV_SCRIPT: render_env_script(
        run_id=run_id, common_env=common_env, node_env=node_env, secret_patterns=secret_patterns,
        masked=True, **rendezvous)}
    if spec.docker:
        # A record of the container's shape (docker-up started it): the master's registry.
        uid = facts[0].uid if facts and facts[0].uid is not None else os.getuid()
        files[COMPOSE_FILE] = render_compose(
            docker=settings.docker, workdir=workdir,
            registry_dir=registry_for_uid(settings.cluster.registry_dir, uid))
    argv = torchrun_argv(nnodes=len(session.nodes), nproc=nproc, master_addr=master_addr,
                         config_path=posixpath.join(remote_run_dir, CONFIG_NAME_ON_NODE),
                         output_dir=output_dir, overrides=spec.train_overrides, entry=run_argv)
    wrapper = profiler_wrapper_argv(profilers, output_dir)
    venv = ranks_venv(session)
    launcher = render_node_launcher(
        run_id=run_id, registry_dir=settings.cluster.registry_dir, run_dir=remote_run_dir,
        output_dir=output_dir, env_script=posixpath.join(remote_run_dir, ENV_SCRIPT),
        workdir=workdir, torchrun_argv=[str(a) for a in argv], wrapper_argv=wrapper,
        master_port=master_port,
        container=settings.docker.container if spec.docker else None,
        venv=None if spec.docker else venv,
        venv_required=bool(settings.cluster.venv), ranks_dir=ranks_dir)

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
                launcher=launcher, record=record, shown_files=shown_files, dirs=dirs)


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


def launcher_start(session: ClusterSession, plan: Plan) -> LauncherStart:
    """What the session's transport needs to start this run's node launchers."""
    return LauncherStart(run_id=plan.run_id, launcher_path=launcher_path(plan),
                         registry_dir=session.settings.cluster.registry_dir,
                         workdir=session.workdir, output_path=plan.run_dir / "logs" / STEP_OUTPUT)


def abbreviate_script(command: str, limit: int = 300) -> str:
    """`bash -c <long script> name args...` with the script's body elided (it is the registry's
    shell library, tasks/lib/registry.py); the arguments stay exact."""
    parts = shlex.split(command)
    for i in range(len(parts) - 2):  # at the start, or after srun's own options
        if parts[i:i + 2] == ["bash", "-c"] and len(parts[i + 2]) > limit:
            return " ".join(filter(None, [
                sh_join(parts[:i]), f"bash -c <{len(parts[i + 2])}-byte script of "
                "tasks/lib/registry.py>", sh_join(parts[i + 3:])]))
    return command


# -- ending ----------------------------------------------------------------------------------------

def write_record(plan: Plan) -> None:
    write_json_atomic(plan.run_dir / RUN_JSON, plan.record.to_dict())


