"""`--env` secrets on the Slurm path (issue 26, finding 2), and the srun node's file transfers.

The batch script, the job's environment and every argv are readable by others (Slurm keeps the
script and the environment with the job; `ps` and sacct's SubmitLine show argvs): a secret
travels only in a 0600 file the batch script sources and removes, and in the bytes of a step's
stdin. The real Slurm is in tests/cluster/test_slurm_secrets.py; here the pure parts, the batch
script run by a real bash, the dry run of a real `fab launch --slurm`, and SrunNode's transfers
through a real /bin/sh standing in for srun's.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from invoke import Config

from tasks.cluster import transport
from tasks.cluster.node_errors import NodeError
from tasks.cluster.transport import SrunNode
from tasks.lib import slurm
from tasks.lib.inventory import HostSpec
from tasks.lib.masking import DEFAULT_SECRET_ENV_PATTERNS
from tasks.lib.quoting import sh_join
from tasks.lib.runspec import RunSpecError, parse_env_pairs
from tasks.run.submit import job_environment, move_secret_env, secret_env_script
from tests.helpers import REPO

FAB = str(Path(sys.executable).with_name("fab"))
TOKEN = "hf_unit_0123456789abcdef"


def test_secret_env_values_leave_the_argv_and_other_items_stay_as_typed():
    argv = ["/v/bin/fab", "-f", "c.yaml", "launch", "--env", f"HF_TOKEN={TOKEN}",
            "--env=WANDB_API_KEY=wb=x y", "--env", "NCCL_DEBUG=INFO", "--env", "MY_SECRET",
            "--override", "training.max_steps=3", "--env", "GONE_PASSWORD"]
    kept, secrets = move_secret_env(argv, DEFAULT_SECRET_ENV_PATTERNS,
                                    {"MY_SECRET": "from env", "PATH": "/bin"})
    assert kept == ["/v/bin/fab", "-f", "c.yaml", "launch", "--env", "HF_TOKEN",
                    "--env=WANDB_API_KEY", "--env", "NCCL_DEBUG=INFO", "--env", "MY_SECRET",
                    "--override", "training.max_steps=3", "--env", "GONE_PASSWORD"]
    assert secrets == {"HF_TOKEN": TOKEN, "WANDB_API_KEY": "wb=x y", "MY_SECRET": "from env"}


def test_the_jobs_environment_leaves_out_secret_looking_variables():
    env, dropped = job_environment({"PATH": "/bin", "HF_TOKEN": TOKEN, "aws_secret_key": "s",
                                    "SLURM_CONF": "/x"}, DEFAULT_SECRET_ENV_PATTERNS)
    assert env == {"PATH": "/bin", "SLURM_CONF": "/x"}
    assert dropped == ["HF_TOKEN", "aws_secret_key"]


def test_env_name_alone_takes_the_value_from_the_environment():
    assert parse_env_pairs(["HF_TOKEN", "A=1"], {"HF_TOKEN": "x y\n"}) == (
        ("HF_TOKEN", "x y\n"), ("A", "1"))
    with pytest.raises(RunSpecError, match="not KEY=VALUE .*nor the name of a variable set"):
        parse_env_pairs(["HF_TOKEN"], {})
    with pytest.raises(RunSpecError, match="not KEY=VALUE"):
        parse_env_pairs(["HF_TOKEN"])


def test_the_batch_script_sources_the_secret_file_removes_it_and_holds_no_value(tmp_path):
    hostile = "it's $(id) `id`\nline2 \\ \""
    secret_file = tmp_path / "job dir" / "secret-env.sh"
    secret_file.parent.mkdir(mode=0o700)
    secret_file.write_text(secret_env_script({"HF_TOKEN": TOKEN, "WANDB_API_KEY": hostile}))
    launch = ["/v/bin/fab", "launch", "--env", "HF_TOKEN", "--env=WANDB_API_KEY"]
    script = slurm.render_batch_script(
        slurm.BatchRequest(nodes=2, job_name="gemm-launch"), launch_argv=launch,
        workdir=str(tmp_path), source_once=str(secret_file))
    assert TOKEN not in script and "id" not in script.split("exec", 1)[0].split("cd", 1)[1] \
        .replace(str(tmp_path), "")
    # Run it for real, `exec` swapped for printing the argv and the values it would exec with.
    body = script.replace("exec ", "printf '%s\\0' ")
    shown = subprocess.run(["bash", "-c", body + 'printf "%s\\0" "$HF_TOKEN" "$WANDB_API_KEY"'],
                           capture_output=True, check=True).stdout.split(b"\0")[:-1]
    assert [arg.decode() for arg in shown] == [*launch, TOKEN, hostile]
    assert not secret_file.exists()


def test_the_dry_run_of_launch_slurm_shows_no_secret_value(tmp_path):
    """A real `fab launch --slurm --dry-run` (contacts nothing, submits nothing)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(COLUMNS="250", FROM_ENV_TOKEN="tok_from_env_42")
    result = subprocess.run(
        [FAB, "launch", "--slurm", "--nodes", "2", "--dry-run", "--env", f"HF_TOKEN={TOKEN}",
         "--env", "FROM_ENV_TOKEN", "--env", "NCCL_DEBUG=INFO"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert TOKEN not in out and "tok_from_env_42" not in out
    assert "#SBATCH --nodes=2" in out and "--env HF_TOKEN --env FROM_ENV_TOKEN --env " \
        "NCCL_DEBUG=INFO" in out, out
    assert "secrets: HF_TOKEN, FROM_ENV_TOKEN reach the job through" in out, out
    assert "secret-env.sh (mode 0600, sourced and removed by the job)" in out


class HereNode(SrunNode):
    """SrunNode whose step is `/bin/sh -c COMMAND` on this machine, as srun runs it on the node
    (tasks/lib/slurm.node_command_argv); records every shell command it runs."""

    def __init__(self):
        super().__init__(0, HostSpec("here"), Config(), job_id="1")
        self.commands: list[str] = []

    def wrap(self, command: str, stdin: bool = False) -> str:
        self.commands.append(command)
        return sh_join(["/bin/sh", "-c", command])


def test_put_files_sends_contents_on_stdin_never_in_a_command_line(tmp_path):
    node = HereNode()
    blob = os.urandom(300_000) + b"\n\0tail"
    files = {str(tmp_path / "run" / "env.sh"): f"export HF_TOKEN='{TOKEN}'\n",
             str(tmp_path / "run" / "empty"): b"",
             str(tmp_path / "run" / "sub dir" / "blob.bin"): blob}
    node.put_files(files, dirs=[str(tmp_path / "run")])
    assert (tmp_path / "run" / "env.sh").read_text() == f"export HF_TOKEN='{TOKEN}'\n"
    assert (tmp_path / "run" / "empty").read_bytes() == b""
    assert (tmp_path / "run" / "sub dir" / "blob.bin").read_bytes() == blob
    for path in files:
        assert os.stat(path).st_mode & 0o777 == 0o600
    assert not [p for p in (tmp_path / "run").rglob(".*part-*")]
    # The commands (directory checks, then the writes) carry names and sizes only.
    assert len(node.commands) == 2 and TOKEN not in "".join(node.commands)
    assert sum(map(len, node.commands)) < 100_000 < len(blob)


def test_get_file_gives_up_on_a_node_that_stops_sending(tmp_path, monkeypatch):
    monkeypatch.setattr(transport, "GET_STALL_TIMEOUT_S", 1.0, raising=False)
    marker = f"gemm-stall-{os.getpid()}-{time.monotonic_ns()}"

    class StallingNode(HereNode):
        def wrap(self, command: str, stdin: bool = False) -> str:
            # Sends a little, then nothing for 30 s (a node gone silent mid-copy).
            return sh_join(["/bin/sh", "-c", f"printf abc; exec bash -c 'sleep 30; : {marker}'"])

    into = open(tmp_path / "copy", "wb")
    outcome: list[BaseException | None] = []

    def copy() -> None:
        try:
            StallingNode().get_file("/x", into)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - what the copy raised is the result
            outcome.append(err)

    started = time.monotonic()
    worker = threading.Thread(target=copy, daemon=True)
    worker.start()
    worker.join(20)
    took = time.monotonic() - started
    into.close()
    assert outcome, "get_file still waiting after 20 s"
    assert isinstance(outcome[0], NodeError) and "nothing arrived for 1 s" in str(outcome[0])
    assert took < 15 and (tmp_path / "copy").read_bytes() == b"abc"
    left = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    assert left.strip() == "", "the stalled step's process is still there"


def test_get_file_copies_a_slow_but_steady_sender_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(transport, "GET_STALL_TIMEOUT_S", 1.0, raising=False)

    class SlowNode(HereNode):
        def wrap(self, command: str, stdin: bool = False) -> str:
            return sh_join(["/bin/sh", "-c", "for i in 1 2 3 4; do printf x; sleep 0.5; done"])

    with open(tmp_path / "copy", "wb") as into:
        SlowNode().get_file("/x", into)
    assert (tmp_path / "copy").read_bytes() == b"xxxx"
