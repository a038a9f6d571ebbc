"""The transport choice (tasks/lib/transports.py), the srun command lines, the run step's start
script run for real here (bash), and the shared-output-directory rule of collect."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tasks.run.collecting import shared_output_leaders
from tasks.lib import slurm
from tasks.lib.registry import launcher_step_command, parse_started_lines
from tasks.lib.settings import Settings, SettingsError
from tasks.lib.slurm import Allocation
from tasks.lib.transports import TransportError, choose_transport

ALLOC = Allocation(job_id="12", nodes=("gpu01", "gpu02"))


def test_auto_picks_srun_only_inside_an_allocation_holding_every_host():
    srun = choose_transport("auto", hosts=["gpu01", "gpu02"], local=False, allocation=ALLOC)
    assert srun.name == "srun" and srun.allocation == ALLOC
    assert "inside Slurm job 12 (SLURM_JOB_ID)" in srun.reason
    ssh = choose_transport("auto", hosts=["gpu01", "gpu09"], local=False, allocation=ALLOC)
    assert ssh.name == "ssh" and "gpu09 is not one of its nodes" in ssh.reason
    outside = choose_transport("auto", hosts=["gpu01"], local=False, allocation=None)
    assert outside.name == "ssh" and "SLURM_JOB_ID unset" in outside.reason
    alone = choose_transport("auto", hosts=["localhost"], local=True, allocation=ALLOC)
    assert alone.name == "local"


@pytest.mark.parametrize("setting, hosts, local, allocation, message", [
    ("srun", ["gpu01"], False, None, "not inside a Slurm allocation"),
    ("srun", ["gpu01", "other"], False, ALLOC, "other is not a node of Slurm job 12"),
    ("srun", ["localhost"], True, ALLOC, "this machine is not a node"),
    ("local", ["gpu01", "gpu02"], False, None, "names gpu01, gpu02"),
    ("ssh", ["localhost"], True, None, "names no host"),
    ("rsh", ["gpu01"], False, None, "is not one of auto, local, ssh, srun"),
])
def test_a_forced_transport_that_cannot_work_says_how_to_fix_it(setting, hosts, local,
                                                                 allocation, message):
    with pytest.raises(TransportError, match=message):
        choose_transport(setting, hosts=hosts, local=local, allocation=allocation)


def test_forced_transports_that_fit():
    assert choose_transport("ssh", hosts=["a"], local=False, allocation=ALLOC).name == "ssh"
    assert choose_transport("srun", hosts=["gpu02"], local=False, allocation=ALLOC).name == "srun"


def test_settings_validate_the_transport_and_srun_options():
    assert Settings.from_config({"cluster": {"transport": "srun"}}).cluster.transport == "srun"
    with pytest.raises(SettingsError, match="cluster.transport: 'slurm' is not one of"):
        Settings.from_config({"cluster": {"transport": "slurm"}})
    with pytest.raises(SettingsError, match="cluster.srun_options: '-N2'"):
        Settings.from_config({"cluster": {"srun_options": ["-N2"]}})
    options = Settings.from_config({"cluster": {"srun_options": ["--gpus-per-node=8"]}})
    assert options.cluster.srun_options == ("--gpus-per-node=8",)


def test_a_node_command_is_a_one_task_overlapping_step_that_is_never_a_run_step():
    argv = slurm.node_command_argv(job_id="12", node="gpu02", command="id -u")
    assert argv[:1] == ["srun"] and argv[-3:] == ["/bin/sh", "-c", "id -u"]
    assert {"--jobid=12", "--nodelist=gpu02", "--ntasks=1", "--overlap", "--input=none",
            "--chdir=/"} <= set(argv)
    assert slurm.run_id_of(argv[argv.index("--job-name=gemm-ctl")].split("=", 1)[1]) is None
    assert "--input=all" in slurm.node_command_argv(job_id="12", node="n", command="cat",
                                                    stdin=True)
    for bad in ("a b", "-x", "n;rm"):
        with pytest.raises(slurm.SlurmError):
            slurm.node_command_argv(job_id="12", node=bad, command="true")
    with pytest.raises(slurm.SlurmError):
        slurm.node_command_argv(job_id="12; x", node="n", command="true")


def test_parse_started_lines_reads_only_our_lines():
    text = ("srun: warning: something\ngemm-started node=1 pid=77\n"
            "gemm-started node=0 pid=12\ngemm-started node=x pid=1\n")
    assert parse_started_lines(text) == {0: 12, 1: 77}


def _launcher(tmp_path: Path, body: str) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    launcher = run_dir / "node_launcher.sh"
    launcher.write_text(body)
    launcher.chmod(0o600)
    return launcher


# A stand-in for the rendered launcher: registers as the real one does, then exits with $EXIT.
FAKE_LAUNCHER = r"""e=$REG/$GEMM_RUN_ID/node_$1
echo "$$ 0" > "$e/launcher.pid"
echo "rank $1 env $GEMM_NODE_RANK" > "$e/ran"
sleep 0.3
exit "${EXIT:-0}"
"""


@pytest.mark.parametrize("exit_code", [0, 3])
def test_the_step_task_finds_its_rank_by_node_name_and_exits_as_its_launcher(tmp_path,
                                                                            exit_code):
    launcher = _launcher(tmp_path, FAKE_LAUNCHER)
    registry = tmp_path / "reg"
    argv = launcher_step_command(str(launcher), ["gpu01", "gpu02"], str(registry), "run_a",
                                 workdir=str(tmp_path))
    started = time.monotonic()
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "SLURMD_NODENAME": "gpu02",
                                 "REG": str(registry), "EXIT": str(exit_code)})
    assert result.returncode == exit_code, result.stderr
    assert time.monotonic() - started >= 0.3  # it waited for the launcher, not just its start
    pid = parse_started_lines(result.stdout)[1]
    assert pid > 0
    assert (registry / "run_a" / "node_1" / "ran").read_text() == "rank 1 env 1\n"


def test_the_step_task_refuses_a_node_that_is_not_the_runs(tmp_path):
    launcher = _launcher(tmp_path, FAKE_LAUNCHER)
    argv = launcher_step_command(str(launcher), ["gpu01", "gpu02"], str(tmp_path / "reg"),
                                 "run_b", workdir=str(tmp_path))
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "SLURMD_NODENAME": "gpu07"})
    assert result.returncode == 2
    assert "node gpu07 is not one of the run's nodes (gpu01 gpu02)" in result.stderr
    assert not (tmp_path / "reg" / "run_b").exists()


def test_shared_output_leaders_from_the_node_logs_each_node_sees():
    # Separate filesystems: each node sees its own log only.
    assert shared_output_leaders({0: ["node_0_output.log", "rank_00_metrics.jsonl"],
                                  1: ["node_1_output.log"]}) == {0: 0, 1: 1}
    # One shared directory: node 1 sees node 0's log, so node 0 copies it for both.
    shared = ["node_0_output.log", "node_1_output.log", "summary.json"]
    assert shared_output_leaders({0: shared, 1: shared, 2: ["node_2_output.log"]}) == \
        {0: 0, 1: 0, 2: 2}
    # A node that is not being collected (lost) cannot lead: node 1 copies its own.
    assert shared_output_leaders({1: shared}) == {1: 1}


def test_the_batch_job_runs_the_typed_launch_without_the_submission_flags():
    from tasks.run.submit import inner_launch_argv

    argv = ["fab", "-f", "c.yaml", "launch", "--slurm", "--nodes", "2", "--time=30",
            "--partition", "gpu", "--account=a1", "--channels", "42", "-t", "512",
            "--env", "X=--nodes"]
    assert inner_launch_argv(argv, "/v/bin/fab") == [
        "/v/bin/fab", "-f", "c.yaml", "launch", "--channels", "42", "-t", "512",
        "--env", "X=--nodes"]


def test_parse_scontrol_job_on_recorded_output():
    text = (Path(__file__).parent / "data" / "slurm" / "scontrol_job_failed.txt").read_text()
    state = slurm.parse_scontrol_job(text)
    assert (state.state, state.exit_code, state.signal, state.active) == ("FAILED", 3, 0, False)
    running = slurm.parse_scontrol_job("JobId=2 JobName=x JobState=RUNNING Reason=None "
                                       "ExitCode=0:0 StdOut=/x/job-2.out")
    assert running.active and running.stdout == "/x/job-2.out"
    with pytest.raises(slurm.SlurmError):
        slurm.parse_scontrol_job("slurm_load_jobs error: Invalid job id specified")
    assert slurm.scontrol_job_argv("12") == ["scontrol", "show", "job", "--oneliner", "12"]


def _session(tmp_path, monkeypatch, environ, **cluster):
    import sys

    from invoke import Config, Context

    from tasks.cluster.session import ClusterSession

    for name in ("SLURM_JOB_ID", "SLURM_JOBID", "SLURM_JOB_NODELIST", "SLURM_NODELIST",
                 "SLURM_JOB_NUM_NODES", "SLURM_NNODES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["fab"])
    return ClusterSession(Context(Config(overrides={"cluster": {
        "hosts_file": str(tmp_path / "no_hosts.txt"), "experiments_dir": str(tmp_path / "exp"),
        "workdir": "/srv/gemm", **cluster}, "docker": {"enabled": False, "platform": "cpu"}})))


def _dry_run(session) -> str:
    import io

    from rich.console import Console

    from tasks.launch import print_dry_run
    from tasks.lib.runspec import LaunchFlags
    from tasks.run.plan import resolve_spec

    buffer = io.StringIO()
    spec = resolve_spec(session, LaunchFlags(nproc="1", dry_run=True), {}, {})
    print_dry_run(session, spec, Console(file=buffer, width=400))
    return buffer.getvalue()


ALLOCATION_ENV = {"SLURM_JOB_ID": "12", "SLURM_JOB_NODELIST": "gpu[01-02]",
                  "SLURM_JOB_NUM_NODES": "2"}


def test_the_dry_run_inside_an_allocation_shows_the_srun_step_and_why(tmp_path, monkeypatch):
    with _session(tmp_path, monkeypatch, ALLOCATION_ENV) as session:
        assert session.transport.name == "srun"
        assert [n.label for n in session.nodes] == ["gpu01", "gpu02"]
        out = _dry_run(session)
    assert ("transport: srun (inside Slurm job 12 (SLURM_JOB_ID) and every host is one of its "
            "nodes)") in out
    start = next(line for line in out.splitlines() if "start: " in line)
    assert ("start: srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --kill-on-bad-exit=1 "
            "--job-name=gemm-run:") in start
    assert "--jobid=12 '--nodelist=gpu[01-02]' --overlap --chdir=/ -- bash -c <" in start
    assert start.rstrip().endswith("step 'gpu01 gpu02'")
    assert not (tmp_path / "exp").exists()


def test_hosts_outside_the_allocation_go_over_ssh_and_a_forced_srun_is_refused(tmp_path,
                                                                              monkeypatch):
    from invoke.exceptions import Exit

    with _session(tmp_path, monkeypatch, ALLOCATION_ENV, hosts=["gpu01", "gpu07"]) as session:
        assert session.transport.name == "ssh"
        assert "gpu07 is not one of its nodes" in session.transport.reason
    with pytest.raises(Exit) as refused:
        _session(tmp_path, monkeypatch, {}, transport="srun")
    assert refused.value.code == 2
    assert "not inside a Slurm allocation" in str(refused.value.message)
    with pytest.raises(Exit, match="SLURM_JOB_NODELIST is not"):
        _session(tmp_path, monkeypatch, {"SLURM_JOB_ID": "12"})
