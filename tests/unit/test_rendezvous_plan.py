"""The rendezvous in the run's plan: the master port and the run's secret travel in env.sh (0600)
alone, never in an argv every user of a node can read (/proc/PID/cmdline), nor in run.json, the
controller's copy of env.sh, the dry run or the list of variables the ranks record."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from invoke import Config, Context
from rich.console import Console

from tasks.lib.runspec import LaunchFlags, RunSpecError, parse_env_pairs

PORT = 29517


def local_session(tmp_path: Path, **launch):
    from tasks.cluster.session import ClusterSession

    return ClusterSession(Context(Config(overrides={
        "cluster": {"hosts_file": str(tmp_path / "no_hosts.txt"),
                    "experiments_dir": str(tmp_path / "exp")},
        "launch": launch})))


def plan(tmp_path: Path, monkeypatch, **launch):
    from tasks.run.plan import build_plan, resolve_spec

    monkeypatch.setattr(sys, "argv", ["fab", "launch"])
    with local_session(tmp_path, **launch) as session:
        spec = resolve_spec(session, LaunchFlags(hang_timeout="0"), {}, {})
        return build_plan(session, spec, run_id="multinode_28ch_256th_20260101_000000",
                          run_dir=tmp_path / "run", nproc=2, master_addr="127.0.0.1",
                          master_port=PORT, ifnames=["lo"], facts=None)


def secret_of(env_script: str) -> str:
    match = re.search(r"^export GEMM_RENDEZVOUS_SECRET=([0-9a-f]{64})$", env_script, re.M)
    assert match, env_script
    return match.group(1)


def test_the_port_and_the_secret_are_in_env_sh_and_no_argv(tmp_path, monkeypatch):
    from tasks.run.plan import ENV_SCRIPT, bundle_for

    made = plan(tmp_path, monkeypatch)
    env_sh = str(made.files[ENV_SCRIPT])
    assert f"export PET_MASTER_PORT={PORT}\n" in env_sh
    secret = secret_of(env_sh)
    # torchrun's argv and the command the launcher records (meta.json): no port.
    assert not any(str(PORT) in arg for arg in made.torchrun), made.torchrun
    command = re.search(r"^COMMAND_JSON=(.*)$", made.launcher, re.M).group(1)
    assert str(PORT) not in command
    # The ranks record the variables GEMM_ENV_VARS names: the secret is not one of them.
    names = re.search(r"^export GEMM_ENV_VARS=(.*)$", env_sh, re.M).group(1)
    assert "GEMM_RENDEZVOUS_SECRET" not in names
    # Nothing the controller shows or keeps, nor the nodes' run.json, holds the secret.
    assert "export GEMM_RENDEZVOUS_SECRET='***'" in made.shown(ENV_SCRIPT)
    kept = [made.record.to_json(), made.shown(ENV_SCRIPT), made.launcher,
            *(str(content) for path, content in bundle_for(made).items()
              if not path.endswith(ENV_SCRIPT))]
    assert not [text for text in kept if secret in text]
    # A secret per run.
    assert secret_of(str(plan(tmp_path / "again", monkeypatch).files[ENV_SCRIPT])) != secret


def test_the_secret_is_masked_whatever_the_secret_patterns(tmp_path, monkeypatch):
    from tasks.run.plan import ENV_SCRIPT

    made = plan(tmp_path, monkeypatch, secret_env_patterns=["NOTHING_OF_OURS"])
    assert secret_of(str(made.files[ENV_SCRIPT]))
    assert "export GEMM_RENDEZVOUS_SECRET='***'" in made.shown(ENV_SCRIPT)
    assert "GEMM_RENDEZVOUS_SECRET" not in json.dumps(made.record.to_dict())


def test_the_env_script_hands_torchrun_the_port(tmp_path, monkeypatch):
    """torchrun takes --master-port from PET_MASTER_PORT (torch.distributed.argparse_util.env,
    torch 2.13): sourcing env.sh as the launcher does sets it."""
    from tasks.run.plan import ENV_SCRIPT

    script = tmp_path / "env.sh"
    script.write_text(str(plan(tmp_path, monkeypatch).files[ENV_SCRIPT]))
    out = subprocess.run(["bash", "-c", f'NODE_RANK=0; . {script} && echo "$PET_MASTER_PORT"'],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(PORT)


def test_the_dry_run_shows_no_port_in_the_ranks_command_and_no_secret(tmp_path, monkeypatch):
    from tasks.launch import print_dry_run
    from tasks.run.plan import resolve_spec

    monkeypatch.setattr(sys, "argv", ["fab"])
    buffer = io.StringIO()
    with local_session(tmp_path) as session:
        spec = resolve_spec(session, LaunchFlags(dry_run=True, master_port=str(PORT)), {}, {})
        print_dry_run(session, spec, Console(file=buffer, width=250))
    out = buffer.getvalue()
    ranks = [line for line in out.splitlines() if line.strip().startswith("ranks:")]
    assert ranks and not any(str(PORT) in line for line in ranks), ranks
    assert f"export PET_MASTER_PORT={PORT}" in out
    assert "export GEMM_RENDEZVOUS_SECRET='***'" in out
    assert not re.search(r"[0-9a-f]{64}", out)


@pytest.mark.parametrize("pair, word", [
    ("GEMM_RENDEZVOUS_SECRET=x", "set by the launch"),
    ("PET_MASTER_PORT=1", "torchrun's settings"),
    ("PET_RDZV_BACKEND=c10d", "torchrun's settings"),
])
def test_env_flags_cannot_change_the_rendezvous(pair, word):
    with pytest.raises(RunSpecError, match=word):
        parse_env_pairs([pair])
