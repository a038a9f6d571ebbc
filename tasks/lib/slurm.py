"""Slurm as a transport, the pure half: command lines, parsers and the batch script.

No network, no Fabric, no torch: the tasks run what these functions build (locally, where the
Slurm client tools are) and hand the output back to the parsers here. See docs/SLURM.md.

One run is one job step, named `gemm-run:<run id>` (`step_name`): that name is how `status`,
`stop` and `emergency-stop` find our steps among everyone else's, together with the user (a
step of another user never matches, whatever its name).

Formats read here are the machine-readable ones: `squeue --steps --noheader --Format=F:|,...`
(every field followed by `|`, no padding, no truncation) and `sacct --parsable2 --noheader`
(fields joined by `|`). The step name, the only free-text field, always comes last, so a `|`
inside someone's name cannot shift the other fields.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import hostlist

from .quoting import sh_join, sh_quote

STEP_PREFIX = "gemm-run:"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# Slurm names: partitions, accounts, QOS (the slurm.conf / sacctmgr character set).
SLURM_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# --time: minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS; or UNLIMITED / INFINITE.
TIME_PATTERN = re.compile(
    r"^(?:\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d{1,2}(?::\d{1,2}){0,2}|UNLIMITED|INFINITE)$")
SIGNALS = ("TERM", "INT", "KILL", "HUP", "USR1", "USR2", "QUIT", "CONT", "STOP")
SQUEUE_STEP_FIELDS = ("StepId", "UserName", "StepState", "Nodes", "TimeUsed", "StepName")
SACCT_FIELDS = ("JobID", "User", "State", "ExitCode", "NodeList", "Start", "End", "Elapsed",
                "JobName")
ACTIVE_STATES = frozenset({"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED",
                           "REQUEUED", "RESIZING", "SIGNALING", "STAGE_OUT"})


class SlurmError(ValueError):
    """A value Slurm would misread, or output that is not what the tool prints."""


# -- names ---------------------------------------------------------------------------------------


def step_name(run_id: str) -> str:
    """The job step name that marks a step as the one of run `run_id`."""
    if not RUN_ID_PATTERN.match(run_id):
        raise SlurmError(f"run id {run_id!r} cannot name a Slurm step: use letters, digits, "
                         "'.', '_' and '-' (at most 200)")
    return STEP_PREFIX + run_id


def run_id_of(name: str) -> str | None:
    """The run id a step name carries, or None for a step that is not one of ours."""
    if not name.startswith(STEP_PREFIX):
        return None
    run_id = name[len(STEP_PREFIX):]
    return run_id if RUN_ID_PATTERN.match(run_id) else None


def _check_name(kind: str, value: str) -> str:
    if not SLURM_NAME_PATTERN.match(value):
        raise SlurmError(f"{kind} {value!r} is not a Slurm name (letters, digits, '_', '.', '-')")
    return value


def _check_time(value: str) -> str:
    if not TIME_PATTERN.match(value):
        raise SlurmError(f"time limit {value!r} is not a Slurm time (minutes, HH:MM:SS, "
                         "D-HH:MM:SS or UNLIMITED)")
    return value


def _check_count(kind: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SlurmError(f"{kind} must be a positive integer, not {value!r}")
    return value


def _check_signal(signal: str) -> str:
    name = signal.upper().removeprefix("SIG")
    if name not in SIGNALS:
        raise SlurmError(f"signal {signal!r} is not one of {', '.join(SIGNALS)}")
    return name


# -- the allocation we run in --------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    """The Slurm job this process runs inside (salloc shell, sbatch script or a step)."""

    job_id: str
    nodes: tuple[str, ...]       # expanded, in Slurm's order (the first runs the batch script)
    partition: str | None = None
    step_id: str | None = None   # set inside a job step (srun): we are then one of its tasks
    cluster: str | None = None


def detect_allocation(env: Mapping[str, str]) -> Allocation | None:
    """The allocation `env` (os.environ) describes, or None outside one.

    Raises SlurmError when SLURM_JOB_ID is set without a usable node list: a half-set
    environment is a mistake to report, not a reason to fall back to SSH silently.
    """
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    if not job_id.isdigit():
        raise SlurmError(f"SLURM_JOB_ID={job_id!r} is not a job id")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmError(f"SLURM_JOB_ID={job_id} is set but SLURM_JOB_NODELIST is not")
    nodes = expand_nodelist(nodelist)
    count = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
    if count and count.isdigit() and int(count) != len(nodes):
        raise SlurmError(f"SLURM_JOB_NODELIST={nodelist} names {len(nodes)} nodes but "
                         f"SLURM_JOB_NUM_NODES={count}")
    return Allocation(job_id=job_id, nodes=tuple(nodes),
                      partition=env.get("SLURM_JOB_PARTITION") or None,
                      step_id=env.get("SLURM_STEP_ID") or env.get("SLURM_STEPID") or None,
                      cluster=env.get("SLURM_CLUSTER_NAME") or None)


def expand_nodelist(nodelist: str) -> list[str]:
    try:
        nodes = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as err:
        raise SlurmError(f"node list {nodelist!r} is not a Slurm host list: {err}") from None
    if not nodes:
        raise SlurmError(f"node list {nodelist!r} names no node")
    return nodes


def compress_nodelist(nodes: Iterable[str]) -> str:
    return hostlist.collect_hostlist(list(nodes))


# -- the step of one run -------------------------------------------------------------------------


def srun_argv(
    *, run_id: str, nodes: int, command: Sequence[str], job_id: str | None = None,
    nodelist: Sequence[str] | None = None, overlap: bool = False, output: str | None = None,
    chdir: str | None = None, extra: Sequence[str] = (),
) -> list[str]:
    """argv of the one job step of a run: one task per node, all ended when one fails.

    No --label: lines keep whatever prefix the node launcher gives them. stdin is closed
    (--input=none), so the step never waits on the controller's terminal and runs on when the
    srun that started it was started detached. `output` is srun's --output pattern (e.g.
    `<run dir>/logs/node_%n.txt`: %n is the node's index in the step, %N its name) on a
    filesystem the nodes share; None streams every task's output through srun.
    `job_id` targets an allocation other than the environment's (`--jobid`); `overlap` lets the
    step share CPUs with other steps of the job (a diagnose step next to a running one).
    """
    argv = ["srun", f"--nodes={_check_count('nodes', nodes)}", f"--ntasks={nodes}",
            "--ntasks-per-node=1", "--kill-on-bad-exit=1", f"--job-name={step_name(run_id)}",
            "--input=none"]
    if job_id is not None:
        if not str(job_id).isdigit():
            raise SlurmError(f"job id {job_id!r} is not a number")
        argv.append(f"--jobid={job_id}")
    if nodelist is not None:
        if len(nodelist) != nodes:
            raise SlurmError(f"{len(nodelist)} nodes listed for a {nodes}-node step")
        argv.append(f"--nodelist={compress_nodelist(nodelist)}")
    if overlap:
        argv.append("--overlap")
    if output is not None:
        argv.append(f"--output={output}")
    if chdir is not None:
        argv.append(f"--chdir={chdir}")
    if not command:
        raise SlurmError("a step needs a command")
    return [*argv, *extra, "--", *command]


def srun_command(**kwargs) -> str:
    """`srun_argv` as one shell command line, every value quoted."""
    return sh_join(srun_argv(**kwargs))


# -- step state ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepState:
    """One job step as squeue (running) or sacct (also finished) reports it."""

    job_id: str
    step_id: str            # "0", "1", ...; "batch", "extern" for the special steps
    name: str
    user: str
    state: str              # RUNNING, COMPLETED, FAILED, CANCELLED ("CANCELLED by 0" too), ...
    nodelist: str
    exit_code: int | None = None   # sacct only
    signal: int | None = None      # sacct only: the signal that ended it (0: none)
    start: str | None = None
    end: str | None = None

    @property
    def id(self) -> str:
        """JOB.STEP (JOB for a job's own sacct line)."""
        return f"{self.job_id}.{self.step_id}" if self.step_id else self.job_id

    @property
    def run_id(self) -> str | None:
        return run_id_of(self.name)

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES

    @property
    def nodes(self) -> list[str]:
        return expand_nodelist(self.nodelist) if self.nodelist else []


def squeue_steps_argv(*, job_id: str | None = None, user: str | None = None) -> list[str]:
    """squeue of live steps (of one job, one user), in the format parse_squeue_steps reads."""
    argv = ["squeue", "--steps", "--noheader",
            "--Format=" + ",".join(f"{field}:|" for field in SQUEUE_STEP_FIELDS)]
    if job_id is not None:
        argv.append(f"--jobs={_job_id(job_id)}")
    if user is not None:
        argv.append(f"--user={user}")
    return argv


def parse_squeue_steps(text: str) -> list[StepState]:
    steps = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.endswith("|"):
            raise SlurmError(f"squeue line is not in the --Format=...:| form: {line!r}")
        fields = line[:-1].split("|", len(SQUEUE_STEP_FIELDS) - 1)
        if len(fields) != len(SQUEUE_STEP_FIELDS):
            raise SlurmError(f"squeue line has {len(fields)} fields, expected "
                             f"{len(SQUEUE_STEP_FIELDS)}: {line!r}")
        step, user, state, nodelist, _, name = fields
        job_id, step_id = _split_step_id(step, line)
        steps.append(StepState(job_id=job_id, step_id=step_id, name=name, user=user,
                               state=_base_state(state), nodelist=nodelist))
    return steps


def sacct_argv(*, job_ids: Sequence[str] = (), user: str | None = None,
               all_users: bool = False, starttime: str | None = None) -> list[str]:
    """sacct of jobs and their steps (also finished ones), in parse_sacct's format.

    Needs accounting (slurmdbd); sacct's own default window is "since midnight" unless job ids
    are given, so a status of older runs passes `starttime` (e.g. the run's start).
    """
    argv = ["sacct", "--parsable2", "--noheader", "--format=" + ",".join(SACCT_FIELDS)]
    if job_ids:
        argv.append("--jobs=" + ",".join(_job_id(job) for job in job_ids))
    if user is not None:
        argv.append(f"--user={user}")
    elif all_users:
        argv.append("--allusers")
    if starttime is not None:
        argv.append(f"--starttime={starttime}")
    return argv


def parse_sacct(text: str) -> list[StepState]:
    """Jobs and steps of `sacct --parsable2 --noheader --format=SACCT_FIELDS`.

    sacct prints the user on the job's line only: each step takes it from its job's line.
    Job lines (no step id) come back with step_id "" so callers can tell them apart.
    """
    records: list[StepState] = []
    users: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|", len(SACCT_FIELDS) - 1)
        if len(fields) != len(SACCT_FIELDS):
            raise SlurmError(f"sacct line has {len(fields)} fields, expected "
                             f"{len(SACCT_FIELDS)}: {line!r}")
        job, user, state, exit_code, nodelist, start, end, _, name = fields
        if "." in job:
            job_id, step_id = _split_step_id(job, line)
        else:
            job_id, step_id = job, ""
            if not job_id.isdigit():
                raise SlurmError(f"sacct line with job id {job!r}: {line!r}")
            users[job_id] = user
        code, _, signal = exit_code.partition(":")
        if not (code.isdigit() and signal.isdigit()):
            raise SlurmError(f"sacct ExitCode {exit_code!r} is not CODE:SIGNAL: {line!r}")
        records.append(StepState(
            job_id=job_id, step_id=step_id, name=name, user=user or users.get(job_id, ""),
            state=_base_state(state), nodelist=nodelist, exit_code=int(code),
            signal=int(signal), start=None if start in ("", "Unknown", "None") else start,
            end=None if end in ("", "Unknown", "None") else end))
    return records


def _split_step_id(value: str, line: str) -> tuple[str, str]:
    job_id, dot, step_id = value.partition(".")
    if not (dot and job_id.isdigit() and step_id):
        raise SlurmError(f"step id {value!r} is not JOB.STEP: {line!r}")
    return job_id, step_id


def _base_state(state: str) -> str:
    """"CANCELLED by 0" -> "CANCELLED"; states are one upper-case word otherwise."""
    word = state.split(" ", 1)[0].rstrip("+")
    if not word.isupper():
        raise SlurmError(f"{state!r} is not a Slurm state")
    return word


def _job_id(value: str) -> str:
    value = str(value)
    if not value.isdigit():
        raise SlurmError(f"job id {value!r} is not a number")
    return value


# -- stopping our steps only ---------------------------------------------------------------------


def our_steps(steps: Iterable[StepState], *, user: str, run_id: str | None = None,
              active_only: bool = True) -> list[StepState]:
    """The steps of `user` carrying our marker (of run `run_id`, or of any run when None)."""
    wanted = step_name(run_id) if run_id is not None else None
    return [step for step in steps
            if step.user == user and step.run_id is not None
            and (wanted is None or step.name == wanted)
            and (step.active or not active_only) and step.step_id.isdigit()]


def scancel_argv(steps: Sequence[StepState], *, signal: str = "TERM") -> list[str]:
    """scancel that signals exactly these steps (JOB.STEP ids), nothing else of their jobs.

    Refuses an empty list: `scancel --signal=TERM` with no id would be an error at best.
    """
    if not steps:
        raise SlurmError("no step to signal")
    ids = []
    for step in steps:
        if not step.step_id.isdigit():   # never the batch step (the allocation's script)
            raise SlurmError(f"refusing to signal step {step.id}: not a run step")
        ids.append(f"{_job_id(step.job_id)}.{step.step_id}")
    return ["scancel", f"--signal={_check_signal(signal)}", *ids]


# -- outside an allocation: submit the same launch as a batch job --------------------------------


@dataclass(frozen=True)
class BatchRequest:
    """`fab launch --slurm [--partition --time --account --nodes]`."""

    nodes: int
    job_name: str
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    output: str | None = None   # sbatch --output pattern; %j is the job id

    def sbatch_options(self) -> list[str]:
        options = [f"--job-name={_check_name('job name', self.job_name)}",
                   f"--nodes={_check_count('nodes', self.nodes)}", "--ntasks-per-node=1"]
        if self.partition is not None:
            options.append(f"--partition={_check_name('partition', self.partition)}")
        if self.time is not None:
            options.append(f"--time={_check_time(self.time)}")
        if self.account is not None:
            options.append(f"--account={_check_name('account', self.account)}")
        if self.output is not None:
            if any(ch in self.output for ch in "\n\r\"' \t"):
                raise SlurmError(f"--output {self.output!r}: no spaces, quotes or newlines")
            options.append(f"--output={self.output}")
        return options


def render_batch_script(request: BatchRequest, *, launch_argv: Sequence[str], workdir: str,
                        env: Mapping[str, str] | None = None,
                        source_once: str | None = None) -> str:
    """The batch script: `cd workdir && exec <launch_argv>` inside the allocation.

    #SBATCH lines hold only validated values (sbatch parses them itself, not the shell); the
    command and every environment value are shell-quoted. `launch_argv` is the same
    `fab ... launch ...` the user typed, minus --slurm and its options: inside the allocation
    the launch finds SLURM_JOB_ID and starts its step with srun. `env` is for values anyone may
    read: Slurm keeps the script with the job. Secrets go in `source_once`, a file the script
    sources (bash reads it: no argv holds a value) and removes before the launch starts.
    """
    if not launch_argv:
        raise SlurmError("the batch script needs the launch command")
    lines = ["#!/bin/bash"]
    lines += [f"#SBATCH {option}" for option in request.sbatch_options()]
    lines += [
        "# Rendered by tasks/lib/slurm.py: the same launch, run inside this allocation.",
        "set -euo pipefail",
        f"cd {sh_quote(workdir)}",
    ]
    for key, value in (env or {}).items():
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise SlurmError(f"not an environment variable name: {key!r}")
        lines.append(f"export {key}={sh_quote(value)}")
    if source_once is not None:
        lines += ["# --env secrets: exported from a file of this user's alone, then removed.",
                  f". {sh_quote(source_once)}", f"rm -f -- {sh_quote(source_once)}"]
    lines.append(f"exec {sh_join(launch_argv)}")
    return "\n".join(lines) + "\n"


def sbatch_argv(script_path: str) -> list[str]:
    """sbatch of a rendered script; --parsable prints the job id only (parse_sbatch_output)."""
    return ["sbatch", "--parsable", script_path]


def parse_sbatch_output(text: str) -> str:
    """Job id of `sbatch --parsable` ("1234" or "1234;cluster")."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    job_id = first.split(";", 1)[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id: {text.strip()[:200]!r}")
    return job_id


# -- one command on one node of the allocation (the srun transport's "ssh host command") ---------

HELPER_STEP_NAME = "gemm-ctl"


def node_command_argv(*, job_id: str, node: str, command: str, stdin: bool = False) -> list[str]:
    """argv of a one-task step on `node` that runs `command` with /bin/sh, as SSH would.

    --overlap: the run's own step holds the node's CPUs (salloc grants one per node) and these
    commands (probe, heartbeat, tail, stop, collect) run beside it. Named `gemm-ctl`, never
    `gemm-run:<id>`: stop and emergency-stop signal run steps only. --chdir=/: the directory
    fab runs in need not exist on the node. stdin is forwarded only where the command reads it.
    """
    if not str(job_id).isdigit():
        raise SlurmError(f"job id {job_id!r} is not a number")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,253}", node):
        raise SlurmError(f"{node!r} is not a Slurm node name")
    return ["srun", f"--jobid={job_id}", "--nodes=1", "--ntasks=1", f"--nodelist={node}",
            "--overlap", f"--job-name={HELPER_STEP_NAME}", "--chdir=/", "--quiet",
            f"--input={'all' if stdin else 'none'}", "--", "/bin/sh", "-c", command]


# -- following a batch job (no accounting needed: slurmctld keeps ended jobs MinJobAge seconds) ---


def scontrol_job_argv(job_id: str) -> list[str]:
    if not str(job_id).isdigit():
        raise SlurmError(f"job id {job_id!r} is not a number")
    return ["scontrol", "show", "job", "--oneliner", str(job_id)]


@dataclass(frozen=True)
class JobState:
    state: str                  # PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, ...
    exit_code: int | None       # the batch script's status once ended
    signal: int | None
    stdout: str | None          # the batch output file, %j expanded

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES


def parse_scontrol_job(text: str) -> JobState:
    """`scontrol show job --oneliner` output: KEY=VALUE fields separated by spaces; the first
    token of each key read here counts (the job, and so its name, is the caller's own)."""
    fields: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key in ("JobState", "ExitCode", "StdOut") and key not in fields:
            fields[key] = value
    if "JobState" not in fields:
        raise SlurmError(f"scontrol printed no JobState: {text.strip()[:200]!r}")
    code = signal = None
    if ":" in fields.get("ExitCode", ""):
        left, right = fields["ExitCode"].split(":", 1)
        code, signal = (int(left) if left.isdigit() else None), (
            int(right) if right.isdigit() else None)
    return JobState(state=_base_state(fields["JobState"]), exit_code=code, signal=signal,
                    stdout=fields.get("StdOut"))
