"""How the nodes are reached, and how a run's node launchers are started and stopped.

Three transports behind one small interface (`Transport`):

- local: this machine alone (the embedded default), commands through a local shell;
- ssh:   one Fabric connection per host (host keys checked), launchers started detached over it;
- srun:  inside a Slurm allocation. A command for one node is a one-task step on it
         (`srun --overlap --nodelist=NODE`), and the run itself is ONE job step with one task
         per node (`srun --nodes=N --ntasks-per-node=1 --kill-on-bad-exit=1`) whose tasks run
         the same node launcher in their foreground: Slurm accounts, signals and ends it.

Everything above this module (probe, push, watch, collect, status, logs, diagnose) talks to a
`Node` and does not care which transport it came from. Which one is used is decided once per
task by tasks/lib/transports.choose_transport (pure), with the reason the launch prints.
"""
from __future__ import annotations

import os
import posixpath
import pwd
import re
import selectors
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from fabric import Config
from invoke.exceptions import Exit

from tasks.lib import slurm
from tasks.lib.inventory import HostSpec, Inventory
from tasks.lib.quoting import sh_join, sh_quote
from tasks.lib.registry import launcher_start_command, launcher_step_command, parse_started_lines
from tasks.lib.settings import ClusterSettings
from tasks.lib.transports import TransportChoice, TransportError, choose_transport
from tasks.lib.exits import EXIT_USAGE
from tasks.cluster.node_errors import NodeError
from tasks.cluster.nodes import (
    SFTP_STALL_TIMEOUT_S,
    LocalNode,
    Node,
    NodeResults,
    on_each,
    open_nodes,
)

START_TIMEOUT_S = 30.0        # a launcher registers itself within a second; a step may queue
SLURM_TOOL_TIMEOUT_S = 30.0
# A copy from a node that receives nothing for this long is dead, not slow (as over SFTP).
GET_STALL_TIMEOUT_S = SFTP_STALL_TIMEOUT_S
_PID = re.compile(r"(\d+)\s*$")


@dataclass(frozen=True)
class LauncherStart:
    """What starting a run's node launchers needs (tasks/run/plan.py builds it from the Plan)."""

    run_id: str
    launcher_path: str            # on every node
    registry_dir: str | None
    workdir: str
    output_path: Path             # on the controller: the transport's own output of the start


class Transport:
    """The interface; the base class is the SSH/local behaviour shared by both."""

    name = "ssh"

    def __init__(self, choice: TransportChoice, cluster: ClusterSettings):
        self.choice = choice
        self.cluster = cluster

    @property
    def reason(self) -> str:
        return self.choice.reason

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"

    def open_nodes(self, config: Config, inventory: Inventory) -> list[Node]:
        return open_nodes(config, inventory, self.cluster)

    def start_command(self, start: LauncherStart, node: Node) -> str:
        return launcher_start_command(start.launcher_path, node.index, start.registry_dir,
                                      start.run_id, workdir=start.workdir)

    def start_launchers(self, nodes: Sequence[Node], start: LauncherStart) -> NodeResults[int]:
        """Start every node's launcher (detached: own session on the node); node -> its pid."""
        def one(node: Node) -> int:
            result = node.run(self.start_command(start, node), timeout=30)
            match = _PID.search(result.stdout.strip())
            if not match:
                raise NodeError("the launcher start printed no pid: "
                                f"{result.stdout.strip()[-200:]!r}")
            return int(match.group(1))
        return on_each(nodes, one)

    def signal_run(self, run_id: str | None, *, kill: bool) -> list[str]:
        """Before the registry stop (tasks/runs.stop_run): what the transport itself signals.
        Over SSH nothing: the nodes' registries are the whole truth."""
        return []

    def step_states(self, run_id: str | None) -> list[slurm.StepState]:
        return []

    def close(self) -> None:
        pass


class LocalTransport(Transport):
    name = "local"

    def open_nodes(self, config: Config, inventory: Inventory) -> list[Node]:
        return [LocalNode(0, inventory.master, config)]


class SshTransport(Transport):
    name = "ssh"


class SrunNode(LocalNode):
    """A node of the allocation: each command is a one-task step there (see node_command_argv).
    The controller runs srun locally, so this is a LocalNode whose commands are wrapped."""

    def __init__(self, index: int, spec: HostSpec, config: Config, job_id: str):
        super().__init__(index, spec, config)
        self.job_id = job_id

    def wrap(self, command: str, stdin: bool = False) -> str:
        return sh_join(slurm.node_command_argv(job_id=self.job_id, node=self.spec.host,
                                               command=command, stdin=stdin))

    def run(self, command: str, *, warn: bool = False, timeout: float | None = None, **kwargs):
        fed = kwargs.get("in_stream") not in (None, False)  # run_fed: the step forwards stdin
        return super().run(self.wrap(command, stdin=fed), warn=warn, timeout=timeout, **kwargs)

    def run_with_input(self, command: str, data: bytes, *, warn: bool = False,
                       timeout: float | None = 600.0):
        return super().run_with_input(self.wrap(command, stdin=True), data, warn=warn,
                                      timeout=timeout)

    def put_files(self, files: Mapping[str, str | bytes], mode: int = 0o600,
                  dirs: Iterable[str] = ()) -> None:
        """Each file written beside its target and renamed over it, as over SFTP, in one step.
        The contents travel on the step's stdin (srun --input=all), never in an argv: env.sh
        holds the --env secrets, and every user of the controller and the node reads argvs
        (ps), as does sacct (SubmitLine). On a shared filesystem every node writes the same
        bytes."""
        self.prepare_dirs(files, dirs)
        if not files:
            return
        script: list[str] = []
        payload = bytearray()
        for path, content in files.items():
            data = content.encode() if isinstance(content, str) else content
            partial = sh_quote(posixpath.join(
                posixpath.dirname(path), f".{posixpath.basename(path)}.part-{uuid.uuid4().hex[:12]}"))
            # GNU head -c reads exactly that many bytes from a pipe: the next file's are left.
            script.append(f"head -c {len(data)} >{partial} && [ \"$(wc -c <{partial})\" -eq "
                          f"{len(data)} ] && chmod {mode:o} {partial} && mv -f -- {partial} "
                          f"{sh_quote(path)}")
            payload += data
        self.run_with_input("umask 077 && " + " && ".join(script), bytes(payload))

    def get_file(self, remote_path: str, into: BinaryIO) -> None:
        """As SFTP's get, bounded the same way: a node that stops sending for
        GET_STALL_TIMEOUT_S is dead, not slow (its step is killed, NodeError)."""
        # Never through a symlink swapped in after the listing (as O_NOFOLLOW locally).
        command = f"[ ! -L {sh_quote(remote_path)} ] && exec cat -- {sh_quote(remote_path)}"
        stalled = False
        error = bytearray()
        with subprocess.Popen(["/bin/sh", "-c", self.wrap(command)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                              start_new_session=True) as process:
            assert process.stdout is not None and process.stderr is not None
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ, into.write)
                selector.register(process.stderr, selectors.EVENT_READ,
                                  lambda chunk: error.extend(chunk[:4096 - len(error)]))
                while selector.get_map():
                    ready = selector.select(GET_STALL_TIMEOUT_S)
                    if not ready:
                        stalled = True
                        _kill_session(process)
                        break
                    for key, _ in ready:
                        chunk = os.read(key.fd, 1 << 16)
                        if chunk:
                            key.data(chunk)
                        else:
                            selector.unregister(key.fileobj)
        if stalled:
            raise NodeError(f"reading {remote_path}: nothing arrived for "
                            f"{GET_STALL_TIMEOUT_S:.0f} s (the node or its step stalled)")
        if process.returncode != 0:
            text = error.decode(errors="replace").strip()[-200:]
            raise NodeError(f"reading {remote_path} failed (exit {process.returncode}): "
                            f"{text or 'a symlink, or no such file'}")


def _kill_session(process: subprocess.Popen) -> None:
    """End a node command's srun: SIGTERM first (srun then cancels its step, which SIGKILL
    would leave behind in the job), SIGKILL if it does not go."""
    for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


class SrunTransport(Transport):
    name = "srun"

    def __init__(self, choice: TransportChoice, cluster: ClusterSettings,
                 environ: Mapping[str, str]):
        super().__init__(choice, cluster)
        assert choice.allocation is not None
        self.allocation = choice.allocation
        self.environ = dict(environ)
        self.step: subprocess.Popen | None = None
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.names: list[str] = []

    def open_nodes(self, config: Config, inventory: Inventory) -> list[Node]:
        self.names = [spec.host for spec in inventory.hosts]
        return [SrunNode(index, spec, config, self.allocation.job_id)
                for index, spec in enumerate(inventory.hosts)]

    def step_argv(self, start: LauncherStart, names: Sequence[str]) -> list[str]:
        # --overlap: the one CPU per node salloc grants must not keep the controller's own
        # commands (heartbeat, tail, stop) from running beside the run.
        return slurm.srun_argv(
            run_id=start.run_id, nodes=len(names),
            command=launcher_step_command(start.launcher_path, names, start.registry_dir,
                                          start.run_id, workdir=start.workdir),
            job_id=self.allocation.job_id, nodelist=list(names), overlap=True, chdir="/",
            extra=list(self.cluster.srun_options))

    def start_command(self, start: LauncherStart, node: Node) -> str:
        return sh_join(self.step_argv(start, self.names))  # one step for every node

    def start_launchers(self, nodes: Sequence[Node], start: LauncherStart) -> NodeResults[int]:
        """One step for the whole run, started detached from this controller (own session,
        stdin closed, output to a file): Ctrl-C of `fab` never reaches it, and the run goes on
        without us. Returns once every task has registered its launcher."""
        argv = self.step_argv(start, [node.label for node in nodes])
        start.output_path.parent.mkdir(parents=True, exist_ok=True)
        with open(start.output_path, "ab") as output:
            self.step = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         env=self.environ)
        deadline = time.monotonic() + START_TIMEOUT_S
        started: dict[int, int] = {}
        while time.monotonic() < deadline:
            started = parse_started_lines(_read_text(start.output_path))
            if len(started) == len(nodes) or self.step.poll() is not None:
                break
            time.sleep(0.05)
        started = parse_started_lines(_read_text(start.output_path))
        results: NodeResults[int] = NodeResults()
        tail = " | ".join(line for line in _read_text(start.output_path).splitlines()[-3:]
                          if not line.startswith("gemm-started"))
        for node in nodes:
            if node.index in started:
                results.ok[node] = started[node.index]
            else:
                how = (f"srun exited {self.step.returncode}" if self.step.poll() is not None
                       else f"not registered within {START_TIMEOUT_S:.0f} s")
                results.failed[node] = NodeError(f"the run's job step did not start its "
                                                 f"launcher ({how}): {tail or 'no output'}")
        return results

    def our_steps(self, run_id: str | None) -> list[slurm.StepState]:
        listed = self._tool(slurm.squeue_steps_argv(job_id=self.allocation.job_id,
                                                    user=self.user))
        return slurm.our_steps(slurm.parse_squeue_steps(listed), user=self.user, run_id=run_id)

    def signal_run(self, run_id: str | None, *, kill: bool) -> list[str]:
        """scancel --signal of our run's step(s) only: never the allocation, another step of
        ours (a diagnose, a heartbeat) or anybody else's job."""
        try:
            steps = self.our_steps(run_id)
            if not steps:
                return []
            signal = "KILL" if kill else "TERM"
            self._tool(slurm.scancel_argv(steps, signal=signal))
        except NodeError as err:
            return [f"slurm: {err}"]
        return [f"slurm: sent {signal} to step {step.id} ({step.name})" for step in steps]

    def step_states(self, run_id: str | None) -> list[slurm.StepState]:
        """Our run steps of this job: live ones from squeue, ended ones from sacct (when the
        cluster keeps accounting; sacct lags a few seconds behind)."""
        live = self.our_steps(run_id)
        try:
            accounted = slurm.parse_sacct(self._tool(slurm.sacct_argv(
                job_ids=[self.allocation.job_id])))
        except (NodeError, slurm.SlurmError):
            accounted = []
        seen = {step.id for step in live}
        ended = [step for step in slurm.our_steps(accounted, user=self.user, run_id=run_id,
                                                  active_only=False)
                 if step.id not in seen]
        return live + ended

    def _tool(self, argv: Sequence[str]) -> str:
        try:
            result = subprocess.run(list(argv), capture_output=True, text=True,
                                    timeout=SLURM_TOOL_TIMEOUT_S, env=self.environ)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise NodeError(f"{argv[0]}: {err}") from None
        if result.returncode != 0:
            raise NodeError(f"{argv[0]} exited {result.returncode}: "
                            f"{(result.stderr or result.stdout).strip()[-200:]}")
        return result.stdout

    def close(self) -> None:
        if self.step is not None:
            self.step.poll()  # reaps an ended step's srun; a running one stays (detached)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def select_transport(cluster: ClusterSettings, inventory: Inventory,
                     environ: Mapping[str, str]) -> Transport:
    """The transport of this task invocation, or Exit 2 (nothing touched) saying why none fits."""
    try:
        allocation = slurm.detect_allocation(environ)
        choice = choose_transport(cluster.transport,
                                  hosts=[spec.host for spec in inventory.hosts],
                                  local=inventory.is_local, allocation=allocation)
    except (slurm.SlurmError, TransportError) as err:
        raise Exit(f"transport: {err}", code=EXIT_USAGE) from None
    if choice.name == "srun":
        return SrunTransport(choice, cluster, environ)
    if choice.name == "local":
        return LocalTransport(choice, cluster)
    return SshTransport(choice, cluster)


__all__ = ["Transport", "LocalTransport", "SshTransport", "SrunTransport", "SrunNode",
           "LauncherStart", "select_transport"]
