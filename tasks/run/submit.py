"""`fab launch --slurm`: outside an allocation, submit the same launch as a batch job and follow it.

The batch script (tasks/lib/slurm.render_batch_script) runs the very `fab ... launch ...` that was
typed, minus --slurm and its options, in this directory: inside the allocation that launch finds
SLURM_JOB_ID and runs the training as one srun step (tasks/cluster/transport.py). Here we print the job
id and follow its output file, which must be on a filesystem the first node of the job shares
with this machine (it is where the launch's experiments go too). Ctrl-C stops following only.

Secrets (`--env NAME=VALUE` whose name looks secret, launch.secret_env_patterns) never go into
the batch script, an argv or the job's environment (Slurm keeps the script and the environment
with the job; ps shows every argv to every user): the script's launch gets `--env NAME` and
takes the value from its environment, which the script fills by sourcing a file of this user's
alone (0600 in the 0700 job directory) and removing it.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from invoke.exceptions import Exit
from rich.console import Console

from tasks.lib import slurm
from tasks.lib.masking import DEFAULT_SECRET_ENV_PATTERNS, is_secret_name
from tasks.lib.quoting import is_env_name, sh_quote
from tasks.cluster.session import EXIT_USAGE

EXIT_DETACHED = 130
POLL_S = 0.5
SLURM_TOOL_TIMEOUT_S = 30.0
# The flags that ask for the submission: the job runs the launch without them.
SUBMIT_FLAGS = ("--slurm", "--partition", "--time", "--account", "--nodes")
SUBMIT_VALUE_FLAGS = ("--partition", "--time", "--account", "--nodes")
SECRET_ENV_FILE = "secret-env.sh"


def inner_launch_argv(argv: Sequence[str], fab_path: str) -> list[str]:
    """argv of the launch the batch job runs: `argv` (sys.argv) without the submission flags
    and their values (`--nodes 2` and `--nodes=2` alike), fab named by its absolute path."""
    kept: list[str] = []
    skip = False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in SUBMIT_FLAGS:
            skip = name in SUBMIT_VALUE_FLAGS and "=" not in arg
            continue
        kept.append(arg)
    return [fab_path, *kept]


def move_secret_env(argv: Sequence[str], patterns: Sequence[str],
                    environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """`argv` with every secret-looking `--env NAME=VALUE` (and `--env=NAME=VALUE`) reduced to
    `--env NAME`, and those names' values: what the value-less flag then takes from the
    environment. A secret already given as `--env NAME` takes its value from `environ` now (the
    job's environment will not carry it). Other items are kept as typed."""
    kept: list[str] = []
    secrets: dict[str, str] = {}

    def reduced(item: str) -> str:
        name, sep, value = item.partition("=")
        if not is_env_name(name) or not is_secret_name(name, patterns):
            return item
        if sep:
            secrets[name] = value
        elif name in environ:
            secrets[name] = environ[name]
        return name

    args = iter(argv)
    for arg in args:
        if arg == "--env":
            kept.append(arg)
            item = next(args, None)
            if item is not None:
                kept.append(reduced(item))
        elif arg.startswith("--env="):
            kept.append("--env=" + reduced(arg[len("--env="):]))
        else:
            kept.append(arg)
    return kept, secrets


def secret_env_script(secrets: Mapping[str, str]) -> str:
    """The file the batch script sources: one `export NAME='value'` per secret."""
    return "".join(f"export {name}={sh_quote(value)}\n" for name, value in secrets.items())


def job_environment(environ: Mapping[str, str], patterns: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """What sbatch exports into the job (--export=ALL, its default): `environ` without the
    secret-looking variables, which Slurm would keep with the job (slurmctld's state, and
    `sacct --env-vars` where AccountingStoreFlags has job_env). Also the names left out."""
    dropped = sorted(name for name in environ if is_secret_name(name, patterns))
    return {k: v for k, v in environ.items() if k not in dropped}, dropped


def write_private_file(path: Path, text: str) -> None:
    """A new file only this user can read (never through a symlink, never an existing one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def fab_executable(argv0: str) -> str:
    found = argv0 if os.sep in argv0 else (shutil.which(argv0) or argv0)
    return os.path.abspath(found)


def submit_and_follow(*, nodes: int | None, partition: str | None, time_limit: str | None,
                      account: str | None, default_nodes: int, experiments_dir: Path,
                      dry_run: bool, console: Console, environ: dict[str, str] | None = None,
                      argv: Sequence[str] | None = None,
                      secret_patterns: Sequence[str] = DEFAULT_SECRET_ENV_PATTERNS) -> int:
    """Submit, print the job id, follow the job until it ends; the job's exit status (130 when
    Ctrl-C detached). Bad values exit 2 before anything is submitted."""
    environ = dict(os.environ if environ is None else environ)
    try:
        allocation = slurm.detect_allocation(environ)
    except slurm.SlurmError as err:
        raise Exit(f"launch --slurm: {err}", code=EXIT_USAGE) from None
    if allocation is not None:
        raise Exit(f"launch --slurm: already inside Slurm job {allocation.job_id}: drop --slurm "
                   "(the launch runs as a step of this allocation)", code=EXIT_USAGE)
    count = nodes if nodes is not None else default_nodes
    try:
        count = int(count)
    except (TypeError, ValueError):
        raise Exit(f"launch --slurm: --nodes {nodes!r} is not a number", code=EXIT_USAGE) from None
    if count < 1:
        raise Exit("launch --slurm: how many nodes? give --nodes N (the inventory names no "
                   "hosts to count)", code=EXIT_USAGE)
    stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
    job_dir = experiments_dir / f"slurm_{stamp}_{os.getpid()}"
    request = slurm.BatchRequest(nodes=count, job_name="gemm-launch", partition=partition,
                                 time=time_limit, account=account,
                                 output=str(job_dir / "job-%j.out"))
    inner, secrets = move_secret_env(
        inner_launch_argv(argv if argv is not None else sys.argv,
                          fab_executable((argv or sys.argv)[0])), secret_patterns, environ)
    secret_file = job_dir / SECRET_ENV_FILE
    job_env, dropped = job_environment(environ, secret_patterns)
    try:
        script = slurm.render_batch_script(request, launch_argv=inner, workdir=os.getcwd(),
                                           source_once=str(secret_file) if secrets else None)
    except slurm.SlurmError as err:
        raise Exit(f"launch --slurm: {err}", code=EXIT_USAGE) from None
    if dry_run:
        console.out("dry run: this batch script would be submitted (sbatch --parsable):",
                    highlight=False)
        console.out(script.rstrip("\n"), highlight=False)
        _say_where_secrets_go(console, secrets, secret_file, dropped)
        return 0
    job_dir.mkdir(mode=0o700, parents=True)
    if secrets:
        write_private_file(secret_file, secret_env_script(secrets))
    script_path = job_dir / "batch.sh"
    write_private_file(script_path, script)
    script_path.chmod(0o700)
    _say_where_secrets_go(console, secrets, secret_file, dropped)
    try:
        job_id = slurm.parse_sbatch_output(_tool(slurm.sbatch_argv(str(script_path)), job_env))
    except BaseException:
        secret_file.unlink(missing_ok=True)  # no job will read it
        raise
    output = job_dir / f"job-{job_id}.out"
    console.out(f"launch: submitted batch job {job_id} ({count} node(s)); output {output}",
                highlight=False)
    console.out(f"  following it (Ctrl-C stops following; cancel: scancel {job_id})",
                highlight=False)
    try:
        state = follow_job(job_id, output, console, environ)
    except KeyboardInterrupt:  # the job may still be pending: it needs the secrets file
        console.out(f"\nlaunch: detached (Ctrl-C); batch job {job_id} goes on.\n"
                    f"  output: {output}\n  cancel: scancel {job_id}", highlight=False)
        return EXIT_DETACHED
    # The job removes it once read; a job that never started (cancelled while pending) did not.
    secret_file.unlink(missing_ok=True)
    console.out(f"launch: batch job {job_id} ended: {state.state}, exit code "
                f"{'-' if state.exit_code is None else state.exit_code}", highlight=False)
    if state.state == "COMPLETED":
        return 0
    return state.exit_code or 1


def _say_where_secrets_go(console: Console, secrets: Mapping[str, str], secret_file: Path,
                          dropped: Sequence[str]) -> None:
    if secrets:
        console.out(f"secrets: {', '.join(secrets)} reach the job through {secret_file} (mode "
                    "0600, sourced and removed by the job), never this script or an argv",
                    highlight=False)
    dropped = [name for name in dropped if name not in secrets]
    if dropped:
        console.out(f"secrets: not exported into the job's environment (Slurm keeps it with the "
                    f"job): {', '.join(dropped)}; give --env NAME to pass one to the ranks",
                    highlight=False)


def follow_job(job_id: str, output: Path, console: Console,
               environ: dict[str, str]) -> slurm.JobState:
    """Print the job's output as it grows, until the job has ended; its final state."""
    offset = 0
    pending = ""
    while True:
        state = slurm.parse_scontrol_job(_tool(slurm.scontrol_job_argv(job_id), environ))
        try:
            with open(output, "rb") as handle:
                handle.seek(offset)
                chunk = handle.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            offset += len(chunk)
            pending += chunk.decode(errors="replace")
            *lines, pending = pending.split("\n")
            for line in lines:
                console.out(line, highlight=False)
        if not state.active:
            if pending:
                console.out(pending, highlight=False)
            return state
        time.sleep(POLL_S)


def _tool(argv: Sequence[str], environ: dict[str, str]) -> str:
    try:
        result = subprocess.run(list(argv), capture_output=True, text=True, env=environ,
                                timeout=SLURM_TOOL_TIMEOUT_S)
    except FileNotFoundError:
        raise Exit(f"launch --slurm: {argv[0]} not found: the Slurm client tools must be on "
                   "PATH", code=EXIT_USAGE) from None
    except subprocess.TimeoutExpired:
        raise Exit(f"launch --slurm: {argv[0]} did not answer in {SLURM_TOOL_TIMEOUT_S:.0f} s",
                   code=1) from None
    if result.returncode != 0:
        raise Exit(f"launch --slurm: {' '.join(argv[:2])} exited {result.returncode}: "
                   f"{(result.stderr or result.stdout).strip()[-300:]}", code=1)
    return result.stdout
