"""Secret --env values: the nodes get them, nothing the controller shows or keeps holds them."""
from __future__ import annotations

import io
import json
import stat
import sys
from datetime import datetime
from pathlib import Path

import pytest
from invoke import Config, Context
from rich.console import Console

from tasks.lib import sweep as sw
from tasks.lib.masking import (
    DEFAULT_SECRET_ENV_PATTERNS,
    is_secret_name,
    mask_assignments,
    mask_env,
)
from tasks.lib.runspec import LaunchFlags
from tasks.lib.settings import Settings, SettingsError

SECRET = "hf_live_S3CRET_value"
PASSWORD = "pa55-w0rd"


def test_secret_names_match_any_pattern_in_any_case():
    for name in ("HF_TOKEN", "hf_token", "AWS_SECRET_ACCESS_KEY", "DB_PASSWORD", "API_KEY",
                 "GOOGLE_APPLICATION_CREDENTIALS", "my_Token_2"):
        assert is_secret_name(name, DEFAULT_SECRET_ENV_PATTERNS), name
    for name in ("NCCL_DEBUG", "HF_HOME", "PATH", "NCCL_IB_HCA"):
        assert not is_secret_name(name, DEFAULT_SECRET_ENV_PATTERNS), name
    assert mask_env({"HF_TOKEN": SECRET, "A": "1"}, DEFAULT_SECRET_ENV_PATTERNS) == \
        {"HF_TOKEN": "***", "A": "1"}
    assert mask_env({"HF_TOKEN": SECRET}, ()) == {"HF_TOKEN": SECRET}


def test_command_lines_keep_everything_but_the_secret_values():
    argv = ["launch", "--env", f"HF_TOKEN={SECRET}", f"--env=DB_PASSWORD={PASSWORD}",
            "--env", "NCCL_DEBUG=INFO", "--override", "training.key_size=3", "-c", "42"]
    assert mask_assignments(argv, DEFAULT_SECRET_ENV_PATTERNS) == [
        "launch", "--env", "HF_TOKEN=***", "--env=DB_PASSWORD=***", "--env", "NCCL_DEBUG=INFO",
        "--override", "training.key_size=3", "-c", "42"]


def test_the_patterns_are_a_setting():
    settings = Settings.from_config({"launch": {"secret_env_patterns": ["HF_"]}})
    assert settings.launch.secret_env_patterns == ("HF_",)
    assert Settings.from_config({}).launch.secret_env_patterns == DEFAULT_SECRET_ENV_PATTERNS
    with pytest.raises(SettingsError, match="launch.secret_env_patterns"):
        Settings.from_config({"launch": {"secret_env_patterns": ["TOKEN", ""]}})


# -- what fab launch shows and keeps ------------------------------------------------------------


def local_session(tmp_path: Path, **launch):
    from tasks.cluster.session import ClusterSession

    return ClusterSession(Context(Config(overrides={
        "cluster": {"hosts_file": str(tmp_path / "no_hosts.txt"),
                    "experiments_dir": str(tmp_path / "exp")},
        "launch": launch})))


def env_flags() -> tuple[str, ...]:
    return (f"HF_TOKEN={SECRET}", f"DB_PASSWORD={PASSWORD}", "NCCL_DEBUG=INFO")


def plan_for(session, monkeypatch, tmp_path):
    from tasks.run.plan import build_plan, resolve_spec

    monkeypatch.setattr(sys, "argv", ["fab", "launch", "--env", f"HF_TOKEN={SECRET}",
                                      f"--env=DB_PASSWORD={PASSWORD}"])
    spec = resolve_spec(session, LaunchFlags(env=env_flags(), hang_timeout="0"), {}, {})
    return build_plan(session, spec, run_id="multinode_28ch_256th_20260101_000000",
                      run_dir=tmp_path / "run", nproc=2, master_addr="127.0.0.1",
                      master_port=29500, ifnames=["lo"], facts=None)


def test_run_json_and_the_env_script_copy_hold_no_secret(tmp_path, monkeypatch):
    from tasks.run.plan import ENV_SCRIPT, bundle_for

    with local_session(tmp_path) as session:
        plan = plan_for(session, monkeypatch, tmp_path)
    record = plan.record.to_json()
    shown = plan.shown(ENV_SCRIPT)
    for value in (SECRET, PASSWORD):
        assert value not in record and value not in shown
        # What the nodes source: the real value (the ranks need it).
        assert value in str(plan.files[ENV_SCRIPT])
    data = json.loads(record)
    assert data["flags"]["env"] == {"HF_TOKEN": "***", "DB_PASSWORD": "***", "NCCL_DEBUG": "INFO"}
    assert data["env"]["common"]["HF_TOKEN"] == "***" and data["env"]["common"]["NCCL_DEBUG"] == "INFO"
    assert "--env=DB_PASSWORD=***" in data["controller"]["argv"]
    assert "export GEMM_MASKED_VARS='HF_TOKEN DB_PASSWORD'" in str(plan.files[ENV_SCRIPT])
    assert "export HF_TOKEN='***'" in shown
    # run.json travels with the bundle: the nodes' copy is the masked one too.
    pushed = [content for path, content in bundle_for(plan).items() if path.endswith("run.json")]
    assert pushed and SECRET not in str(pushed[0])


def test_the_dry_run_never_prints_a_secret(tmp_path, monkeypatch):
    from tasks.launch import print_dry_run
    from tasks.run.plan import resolve_spec

    monkeypatch.setattr(sys, "argv", ["fab"])
    buffer = io.StringIO()
    with local_session(tmp_path) as session:
        spec = resolve_spec(session, LaunchFlags(env=env_flags(), dry_run=True), {}, {})
        print_dry_run(session, spec, Console(file=buffer, width=250))
    out = buffer.getvalue()
    assert "export HF_TOKEN='***'" in out and "export NCCL_DEBUG=INFO" in out
    assert SECRET not in out and PASSWORD not in out
    assert not (tmp_path / "exp").exists()


def test_configured_patterns_decide_what_is_masked(tmp_path, monkeypatch):
    from tasks.run.plan import ENV_SCRIPT

    with local_session(tmp_path, secret_env_patterns=["NCCL_DEBUG"]) as session:
        plan = plan_for(session, monkeypatch, tmp_path)
    assert "export NCCL_DEBUG='***'" in plan.shown(ENV_SCRIPT)
    assert SECRET in plan.shown(ENV_SCRIPT)  # HF_TOKEN matches no configured pattern


def test_controller_run_and_sweep_directories_are_private(tmp_path):
    from tasks.run.plan import pick_run_id
    from tasks.sweeping.runner import create_sweep_dir

    with local_session(tmp_path) as session:
        from tasks.run.plan import resolve_spec

        spec = resolve_spec(session, LaunchFlags(), {}, {})
    run_id = pick_run_id(spec, tmp_path / "exp", datetime.now(), create=True)
    sweep_dir = create_sweep_dir(tmp_path / "exp", datetime.now())
    for directory in (tmp_path / "exp" / run_id, sweep_dir):
        assert stat.S_IMODE(directory.stat().st_mode) & 0o077 == 0, directory


# -- fab sweep ----------------------------------------------------------------------------------


def test_sweep_json_masks_and_a_resume_asks_for_the_values_again(tmp_path):
    from tasks.sweep import plan_sweep
    from tasks.sweeping.runner import FLAG_DEFAULTS, masked_launch_flags

    given = {**FLAG_DEFAULTS, "env": [f"HF_TOKEN={SECRET}", "NCCL_DEBUG=INFO"]}
    recorded = masked_launch_flags(given, DEFAULT_SECRET_ENV_PATTERNS)
    assert recorded["env"] == ["HF_TOKEN=***", "NCCL_DEBUG=INFO"]
    sweep_dir = tmp_path / "sweep_x"
    sweep_dir.mkdir()
    document = sw.new_sweep(sweep_id="sweep_x", channels=[28], threads=[256],
                            launch_flags=recorded, hosts=["localhost"], fail_fast=False,
                            controller={}, created_at="t")
    (sweep_dir / sw.SWEEP_JSON).write_text(json.dumps(document))
    assert SECRET not in (sweep_dir / sw.SWEEP_JSON).read_text()

    with pytest.raises(sw.SweepError, match=r"HF_TOKEN as \*\*\*: give it again") as missing:
        plan_sweep(dict(FLAG_DEFAULTS), None, None, str(sweep_dir))
    assert SECRET not in str(missing.value)
    # Only the masked value again, or the whole list as first given: the real value runs.
    for env in ([f"HF_TOKEN={SECRET}"], [f"HF_TOKEN={SECRET}", "NCCL_DEBUG=INFO"]):
        plan = plan_sweep({**FLAG_DEFAULTS, "env": env}, None, None, str(sweep_dir))
        assert plan.flags_record["env"] == [f"HF_TOKEN={SECRET}", "NCCL_DEBUG=INFO"]
        assert plan.document["launch_flags"]["env"] == ["HF_TOKEN=***", "NCCL_DEBUG=INFO"]
    with pytest.raises(sw.SweepError, match="differs") as other:
        plan_sweep({**FLAG_DEFAULTS, "env": ["HF_TOKEN=other", "NCCL_DEBUG=WARN"]}, None, None,
                   str(sweep_dir))
    assert "other" not in str(other.value)


def test_the_ranks_record_the_masked_variables_as_stars():
    from train.metrics import collect_env

    env = {"GEMM_ENV_VARS": "HF_TOKEN NCCL_DEBUG", "GEMM_MASKED_VARS": "HF_TOKEN",
           "HF_TOKEN": SECRET, "NCCL_DEBUG": "INFO", "NCCL_API_KEY": "k"}
    assert collect_env(env)["HF_TOKEN"] == "***" and collect_env(env)["NCCL_DEBUG"] == "INFO"
    assert collect_env(env)["NCCL_API_KEY"] == "k"  # masked only when the launch named it
