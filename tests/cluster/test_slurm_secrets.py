"""`fab launch --slurm --env SECRET`: the secret reaches the ranks and nothing else (issue 26,
finding 2), against the test cluster's real Slurm (with AccountingStoreFlags=job_script,job_env,
so the job's script and environment land in the accounting database, as on sites that keep them).

Where a secret must not appear: any argv (`ps -eo args` polled on the controller and inside every
node during the whole job, and sacct's SubmitLine of every step), the dry run, the batch script
(the file and Slurm's copies: scontrol, sacct --batch-script, slurmctld's state), the job's
environment (sacct --env-vars), any file another user (`gemm-attacker`) can read on the
controller or a node. Besides its plain text, the secret is looked for in base64 at each of the
three alignments (the srun transport used to pass env.sh base64-encoded on a command line).

Two secrets: HF_TOKEN given as `--env HF_TOKEN` with the value in fab's environment (nowhere on
any command line), and WANDB_API_KEY typed on the command line, `--env WANDB_API_KEY=...` (ps
shows it in the submitting fab's own argv, the user's choice: nowhere else).
"""
from __future__ import annotations

import base64
import json
import re
import secrets
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.cluster.test_shared_node import ATTACKER, attacker  # noqa: F401 - a fixture
from tests.cluster.test_slurm_launch import (  # noqa: F401 - fixtures
    FAB,
    ROOT,
    SlurmFab,
    run_id_in,
    shared_config,
    slurm_fab,
)
from tests.helpers import wait_until

pytestmark = pytest.mark.cluster


def secret_forms(value: str) -> list[str]:
    """The value, and what any base64 text holding it contains whatever its byte offset: for
    each offset mod 3, the characters that depend on the value's bytes alone."""
    raw = value.encode()
    forms = [value]
    for shift in range(3):
        encoded = base64.b64encode(b"\0" * shift + raw).decode()
        first = -(-8 * shift // 6)                   # first char made of the value's bits only
        last = (8 * (shift + len(raw)) - 6) // 6     # last such char
        forms.append(encoded[first:last + 1])
    return forms


class ArgvWatch:
    """`ps -ww -eo pid=,args=` (full width) polled on the controller (whose /proc shows every node's processes
    too: their pid namespaces are its children) and inside each node, until stopped; every
    line holding one of `forms` is kept, with the round's time."""

    def __init__(self, fab: SlurmFab, forms: list[str]):
        self.fab, self.forms = fab, forms
        self.hits: list[tuple[str, str]] = []
        self.rounds = {"controller": 0, "nodes": 0}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.controller, daemon=True),
                        threading.Thread(target=self.nodes, daemon=True)]

    def look(self, where: str, text: str) -> None:
        for line in text.splitlines():
            if any(form in line for form in self.forms):
                self.hits.append((where, line))

    def controller(self) -> None:
        while not self.stop.is_set():
            self.look("controller", subprocess.run(["ps", "-ww", "-eo", "pid=,args="], text=True,
                                                   capture_output=True).stdout)
            self.rounds["controller"] += 1
            time.sleep(0.02)

    def nodes(self) -> None:
        while not self.stop.is_set():
            for node in self.fab.sim.nodes:
                self.look(f"node{node.index}", self.fab.sim.exec(
                    node.index, "ps -ww -eo pid=,args=", check=False).stdout)
            self.rounds["nodes"] += 1
            time.sleep(0.2)

    def __enter__(self) -> ArgvWatch:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)


def files_holding(run: list[str], patterns: list[str], dirs: list[str], *,
                  node: int | None = None, fab: SlurmFab | None = None) -> list[str]:
    """Files under `dirs` that `grep -F` finds any pattern in, as `run` (e.g. runuser -u X --)
    reads them; the patterns go on grep's stdin, not its command line."""
    command = [*run, "grep", "-rlsaF", "-f", "-", "--", *dirs]
    if node is None:
        result = subprocess.run(command, input="\n".join(patterns) + "\n", text=True,
                                capture_output=True, timeout=120)
    else:
        assert fab is not None
        result = fab.sim.exec(node, " ".join(f"'{arg}'" for arg in command), check=False,
                              input="\n".join(patterns) + "\n", timeout=120)
    # 1: nothing found; 2: also something it may not read (-s keeps quiet about it).
    assert result.returncode in (0, 1, 2), result.stderr[-2000:]
    return sorted(result.stdout.split())


def sacct_text(fab: SlurmFab, *args: str) -> str:
    return fab.sim.slurm_run(["sacct", *args]).stdout


def test_launch_slurm_keeps_env_secrets_out_of_every_argv_file_and_job_record(
        slurm_fab: SlurmFab, shared_config: tuple[Path, Path], attacker):
    config, experiments = shared_config
    where = config.parent
    hidden = f"hf_{secrets.token_hex(16)}"   # in fab's environment only
    typed = f"wb_{secrets.token_hex(16)}"    # on fab's command line
    sentinel = f"visible_{secrets.token_hex(8)}"  # a plain variable: the job's env is recorded
    hidden_forms, typed_forms = secret_forms(hidden), secret_forms(typed)
    env = {**slurm_fab.env(), "HF_TOKEN": hidden, "GEMM_TEST_SENTINEL": sentinel}
    argv = [FAB, "-f", str(config), "launch", "--slurm", "--nodes", "2", "--time", "10",
            "--env", "HF_TOKEN", "--env", f"WANDB_API_KEY={typed}", "--env", "NCCL_DEBUG=WARN"]

    dry = subprocess.run([*argv, "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120, stdin=subprocess.DEVNULL)
    shown = dry.stdout + dry.stderr
    assert dry.returncode == 0, shown
    assert "exec " in shown and "--env HF_TOKEN --env WANDB_API_KEY --env NCCL_DEBUG=WARN" in shown
    assert not [f for f in hidden_forms + typed_forms if f in shown], shown
    assert not list(experiments.glob("slurm_*")), "a dry run writes nothing"

    with ArgvWatch(slurm_fab, hidden_forms + typed_forms) as watch:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        try:
            output, _ = proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, output[-4000:]
    job_id = re.search(r"launch: submitted batch job (\d+)", output).group(1)
    assert f"batch job {job_id} ended: COMPLETED, exit code 0" in output, output[-3000:]
    run_id = run_id_in(output)

    # ps: the typed one in the command line the user typed only (the submitting fab, and its
    # children between fork and exec, which show their parent's); the other nowhere, ever.
    assert watch.rounds["controller"] > 50 and watch.rounds["nodes"] > 5, watch.rounds
    typed_line = " ".join(argv)  # after the pid and fab's interpreter (its #! line)
    theirs = [(where_, line) for where_, line in watch.hits
              if where_ == "controller" and line.split(None, 2)[2:] == [typed_line]]
    assert [(w, l) for w, l in watch.hits if (w, l) not in theirs] == [], (typed_line, watch.hits)
    assert any(line.split()[0] == str(proc.pid) for _, line in theirs), \
        "the watch saw the submitting fab's own argv (the typed secret): it sees argvs"
    all_forms = hidden_forms + typed_forms
    assert not [f for f in all_forms if f in output], "the launch's output shows a secret"

    # The ranks got both: the env.sh the nodes source (0600, in the 0700 run dir) holds them.
    node_run_dir = f"{slurm_fab.sim.workdir}/experiments/{run_id}"
    env_sh = slurm_fab.sim.exec(0, f"stat -c '%a %a' {node_run_dir} {node_run_dir}/env.sh && "
                                   f"cat {node_run_dir}/env.sh").stdout
    assert env_sh.splitlines()[:2] == ["700 700", "600 600"], env_sh[:200]
    assert hidden in env_sh and typed in env_sh
    record = json.loads((experiments / run_id / "run.json").read_text())
    assert record["flags"]["env"] == {"HF_TOKEN": "***", "WANDB_API_KEY": "***",
                                      "NCCL_DEBUG": "WARN"}

    # The batch script, and Slurm's copies of it and of the job's environment.
    job_dir = next(experiments.glob("slurm_*"))
    script = (job_dir / "batch.sh").read_text()
    assert "--env HF_TOKEN --env WANDB_API_KEY" in script
    assert not (job_dir / "secret-env.sh").exists(), "the job removes the file it sourced"
    scontrol = slurm_fab.sim.slurm_run(["scontrol", "show", "job", "-dd", job_id]).stdout
    stored = slurm_fab.sim.slurm_run(["scontrol", "write", "batch_script", job_id, "-"]).stdout
    assert "--env HF_TOKEN" in stored and f"JobId={job_id}" in scontrol
    wait_until(lambda: "exec " in sacct_text(slurm_fab, "-j", job_id, "--batch-script"), 30,
               "the batch script in accounting")
    recorded_env = sacct_text(slurm_fab, "-j", job_id, "--env-vars")
    assert f"GEMM_TEST_SENTINEL={sentinel}" in recorded_env, recorded_env[-2000:]
    submit_lines = sacct_text(slurm_fab, "-j", job_id, "--parsable2", "--noheader",
                              "--format=JobID,JobName,SubmitLine")
    assert submit_lines.count("gemm-ctl") >= 4, submit_lines  # the node commands' steps
    for text in (script, stored, scontrol, recorded_env, submit_lines,
                 sacct_text(slurm_fab, "-j", job_id, "--batch-script")):
        assert not [f for f in all_forms if f in text], text[-3000:]

    # Files: as the attacker, nothing anywhere they can read; as root, the controller's side
    # and Slurm's state hold no secret at all, the nodes only the run's env.sh.
    state = str(slurm_fab.sim.state_dir)
    as_them = ["runuser", "-u", ATTACKER, "--"]
    assert files_holding(as_them, all_forms, [str(where), state, "/var/tmp"]) == []
    for node in slurm_fab.sim.nodes:
        assert files_holding(as_them, all_forms, ["/tmp", "/srv", "/dev/shm", "/run"],
                             node=node.index, fab=slurm_fab) == []
    assert files_holding([], all_forms, [str(where)]) == []
    # The nodes' shared /srv lives in the state directory too: there, the env.sh alone.
    assert files_holding([], all_forms, [state]) == [
        f"{state}/shared-srv/{node_run_dir.removeprefix('/srv/')}/env.sh"]
    # (That search reads the database's files: it finds the plain variable sacct showed.)
    assert files_holding([], [sentinel], [state]) != []
    for node in slurm_fab.sim.nodes:
        found = files_holding([], all_forms, ["/tmp", "/srv", "/dev/shm", "/run"],
                              node=node.index, fab=slurm_fab)
        assert found == [f"{node_run_dir}/env.sh"], found
