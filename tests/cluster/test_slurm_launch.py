"""`fab` with the srun transport, against the test cluster's real Slurm (docs/SLURM.md).

The controller is this machine, inside an allocation of the session cluster `cluster_slurm`
(2 nodes sharing /srv, so the workdir /srv/gemm is synced once). The config names no host and no
SSH key: the nodes come from the allocation and are reached through srun only. Two ways of being
"inside an allocation", as users are: `salloc -N2 fab ...` (fab is salloc's command), and an
allocation made beforehand (`salloc --no-shell`) whose SLURM_JOB_* variables fab inherits, as in
the shell an interactive salloc gives.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tasks.lib import slurm
from tasks.lib.registry import parse_started_lines
from tests.helpers import wait_until
from tests.simcluster import SimCluster
from tests.simcluster import slurm as sim_slurm

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).with_name("fab"))
LONG = ["--override", "training.max_steps=100000"]


@dataclass
class SlurmFab:
    sim: SimCluster
    config: Path
    experiments: Path

    def env(self, allocation: dict[str, str] | None = None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items()
               if not key.startswith(("SLURM_", "DOCKER_"))}
        env.update(COLUMNS="250", PYTHONUNBUFFERED="1", **self.sim.slurm_env)
        for name in ("CHANNELS", "THREADS", "NPROC_PER_NODE", "CONFIG_FILE", "MASTER_PORT"):
            env.pop(name, None)
        env.update(allocation or {})
        return env

    def salloc(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        """`salloc -N2 fab -f CONFIG ARGS...`: fab is the allocation's command."""
        argv = ["salloc", "--nodes=2", f"--job-name=gemm-test-{uuid.uuid4().hex[:6]}", "--",
                FAB, "-f", str(self.config), *args]
        return subprocess.run(argv, cwd=ROOT, env=self.env(), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def fab(self, allocation: dict[str, str], *args: str,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([FAB, "-f", str(self.config), *args], cwd=ROOT,
                              env=self.env(allocation), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def popen(self, allocation: dict[str, str], *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([FAB, "-f", str(self.config), *args], cwd=ROOT,
                                env=self.env(allocation), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
                                start_new_session=True)

    def steps(self, job_id: str | None = None, user: str | None = None) -> list[slurm.StepState]:
        out = self.sim.slurm_run(slurm.squeue_steps_argv(job_id=job_id, user=user)).stdout
        return slurm.parse_squeue_steps(out)

    def accounted(self, job_id: str) -> list[slurm.StepState]:
        return slurm.parse_sacct(self.sim.slurm_run(slurm.sacct_argv(job_ids=[job_id])).stdout)

    def run_processes(self, run_id: str) -> list[str]:
        found = []
        for node in self.sim.nodes:
            out = self.sim.exec(node.index, f"grep -lzxsF -e GEMM_RUN_ID={run_id} "
                                            "/proc/[0-9]*/environ || true").stdout
            found += [f"node{node.index}:{line}" for line in out.split()]
        return found


@pytest.fixture(scope="module")
def slurm_fab(cluster_slurm: SimCluster, tmp_path_factory) -> Iterator[SlurmFab]:
    tmp = tmp_path_factory.mktemp("slurm-launch")
    tiny = yaml.safe_load((ROOT / "config" / "multi_node" / "cpu_tiny.yaml").read_text())
    tiny["training"]["max_steps"] = 4
    tiny["calibration"].update(compute_steps=1, comm_steps=1)
    (tmp / "tiny4.yaml").write_text(yaml.safe_dump(tiny))
    venv = str(cluster_slurm.venv) if cluster_slurm.venv else None
    config = tmp / "srun.yaml"
    # No hosts, no SSH key: the allocation names the nodes, srun reaches them.
    config.write_text(yaml.safe_dump({
        "cluster": {"workdir": cluster_slurm.workdir, "venv": venv,
                    "experiments_dir": str(tmp / "experiments")},
        "docker": {"enabled": False, "platform": "cpu"},
        "launch": {"nproc": 1, "config": str(tmp / "tiny4.yaml"), "stop_grace": 5},
    }))
    made = SlurmFab(cluster_slurm, config, tmp / "experiments")
    synced = made.salloc("sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    yield made


@pytest.fixture
def allocation(slurm_fab: SlurmFab) -> Iterator[dict[str, str]]:
    """A 2-node allocation made beforehand (`salloc --no-shell`): the SLURM_JOB_* variables the
    shell of an interactive salloc has. Cancelled at the end, with whatever still runs in it."""
    sim = slurm_fab.sim
    result = sim.slurm_run(["salloc", "--nodes=2", "--no-shell",
                            f"--job-name=gemm-test-{uuid.uuid4().hex[:6]}"], timeout=30)
    job_id = next(line.rsplit(" ", 1)[1] for line in result.stderr.splitlines()
                  if "Granted job allocation" in line)
    nodelist = sim.slurm_run(["squeue", "-h", "-j", job_id, "-o", "%N"]).stdout.strip()
    yield {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_NUM_NODES": "2"}
    sim.slurm_run(["scancel", job_id], check=False)
    wait_until(lambda: not slurm_fab.steps(job_id=job_id), 30, f"job {job_id} gone")


def run_id_in(output: str) -> str:
    match = re.search(r"launch: (multinode_\d+ch_\d+th_\d{8}_\d{6}_[0-9a-f]+):", output)
    assert match, output[-3000:]
    return match.group(1)


def read_until(proc: subprocess.Popen[str], pattern: str, timeout: float) -> list[str]:
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if re.search(pattern, line):
                found.set()
                return

    threading.Thread(target=reader, daemon=True).start()
    found.wait(timeout)
    assert found.is_set(), f"no {pattern!r} within {timeout} s:\n" + "".join(lines[-30:])
    return lines


def kill_group(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def test_the_same_launch_command_runs_as_one_srun_step_in_an_allocation(slurm_fab: SlurmFab):
    result = slurm_fab.salloc("launch", "--channels", "42", "--threads", "512")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "via srun (inside Slurm job" in output, output[-3000:]
    job_id = re.search(r"Granted job allocation (\d+)", output).group(1)
    run_id = run_id_in(output)
    run_dir = slurm_fab.experiments / run_id
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded" and [n["exit_code"] for n in record["nodes"]] == [0, 0]
    assert [n["host"] for n in record["nodes"]] == [n.hostname for n in slurm_fab.sim.nodes]
    outputs = run_dir / "512thread_42channels"
    names = {p.name for p in outputs.iterdir()}
    assert {"rank_00_metrics.jsonl", "rank_01_metrics.jsonl", "node_0_output.log",
            "node_1_output.log", "summary.json"} <= names
    # /srv is shared: the directory is copied once (from node 0), never as node_<rank>/ copies.
    assert not any(p.is_dir() for p in outputs.iterdir()), sorted(names)
    assert "[node 1] step 4/4" in output
    # The run was one step of the job, named after the run, with one task per node.
    started = (run_dir / "logs" / "srun_step.txt").read_text()
    assert sorted(parse_started_lines(started)) == [0, 1]
    wanted = slurm.step_name(run_id)
    step = wait_until(lambda: next((s for s in slurm_fab.accounted(job_id)
                                    if s.name == wanted and not s.active), None),
                      15, f"sacct of step {wanted}")
    assert (step.state, step.exit_code) == ("COMPLETED", 0)
    assert step.nodes == [n.hostname for n in slurm_fab.sim.nodes]


def test_a_killed_rank_ends_the_step_within_10_s(slurm_fab: SlurmFab,
                                                 allocation: dict[str, str]):
    proc = slurm_fab.popen(allocation, "launch", *LONG)
    try:
        lines = read_until(proc, r"\[node 1\] step \d+/", timeout=150)
        run_id = run_id_in("".join(lines))
        killed = slurm_fab.sim.exec(1, (
            f"for e in /proc/[0-9]*/environ; do grep -qzxF GEMM_RUN_ID={run_id} $e 2>/dev/null"
            f" && grep -qzxF LOCAL_RANK=0 $e 2>/dev/null && p=${{e#/proc/}} && "
            f"p=${{p%/environ}} && kill -9 $p && echo $p; done; true")).stdout.strip()
        killed_at = time.monotonic()
        assert killed, "no rank process found on node 1"
        wanted = slurm.step_name(run_id)
        wait_until(lambda: not [s for s in slurm_fab.steps(job_id=allocation["SLURM_JOB_ID"])
                                if s.name == wanted] and not slurm_fab.run_processes(run_id),
                   15, "the run's step and processes gone", interval=0.1)
        gone_after = time.monotonic() - killed_at
        rest, _ = proc.communicate(timeout=60)
    finally:
        kill_group(proc)
    output = "".join(lines) + rest
    assert gone_after < 10, f"the step ended {gone_after:.1f} s after the rank died"
    assert proc.returncode == 1, output[-3000:]
    assert re.search(r"node 1 \(\S+\) failed first", output), output[-3000:]
    record = json.loads((slurm_fab.experiments / run_id / "run.json").read_text())
    assert record["status"] == "failed" and record["first_failure"]["node_rank"] == 1
    print(f"killed rank -> step and processes gone: {gone_after:.2f} s")


def test_ctrl_c_detaches_status_logs_and_stop_touch_only_our_step(slurm_fab: SlurmFab,
                                                                   allocation: dict[str, str]):
    sim = slurm_fab.sim
    other = sim.slurm_run(["sbatch", "--parsable", "--nodes=2", "--job-name=other-job",
                           "--chdir=/tmp", "--output=/dev/null", "--wrap",
                           "srun --ntasks-per-node=1 --job-name=gemm-run:not-yours sleep 300"],
                          user=sim_slurm.OTHER_USER)
    other_job = slurm.parse_sbatch_output(other.stdout)
    job_id = allocation["SLURM_JOB_ID"]
    try:
        wait_until(lambda: [s for s in slurm_fab.steps(job_id=other_job) if s.step_id == "0"],
                   30, "the other user's step running")
        proc = slurm_fab.popen(allocation, "launch", *LONG)
        try:
            lines = read_until(proc, r"\[node 1\] step \d+/", timeout=150)
            os.killpg(proc.pid, signal.SIGINT)
            rest, _ = proc.communicate(timeout=30)
        finally:
            kill_group(proc)
        output = "".join(lines) + rest
        run_id = run_id_in(output)
        assert proc.returncode == 130 and "detached (Ctrl-C)" in output, output[-3000:]
        wanted = slurm.step_name(run_id)
        time.sleep(2)  # still running some time after the controller went away
        [ours] = [s for s in slurm_fab.steps(job_id=job_id) if s.name == wanted]
        assert ours.state == "RUNNING"

        status = slurm_fab.fab(allocation, "status", "--run", run_id)
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count("running") == 2, status.stdout
        assert re.search(rf"{re.escape(ours.id)}\s+│ {run_id}\s+│ RUNNING", status.stdout), \
            status.stdout
        logs = slurm_fab.fab(allocation, "logs", "--run", run_id, "--lines", "5")
        assert "[node 0]" in logs.stdout and "[node 1]" in logs.stdout, logs.stdout

        stop = slurm_fab.fab(allocation, "stop", "--run", run_id, "--grace", "5")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert f"sent TERM to step {ours.id}" in stop.stderr, stop.stderr
        wait_until(lambda: not [s for s in slurm_fab.steps(job_id=job_id) if s.name == wanted],
                   15, "our step gone")
        assert not slurm_fab.run_processes(run_id)
        # The other user's step (named like ours, on the same nodes) runs on.
        assert [s.state for s in slurm_fab.steps(job_id=other_job) if s.step_id == "0"] == \
            ["RUNNING"]

        # emergency-stop: every run step of ours, at once, and again nothing of theirs.
        detached = slurm_fab.fab(allocation, "launch", "--detach", *LONG)
        assert detached.returncode == 0, detached.stdout + detached.stderr
        second = run_id_in(detached.stdout)
        wait_until(lambda: "step" in slurm_fab.fab(allocation, "logs", "--run", second,
                                                   "--lines", "3").stdout, 120,
                   "the detached run stepping")
        emergency = slurm_fab.fab(allocation, "emergency-stop")
        assert emergency.returncode == 0, emergency.stdout + emergency.stderr
        assert "sent KILL to step" in emergency.stderr, emergency.stderr
        wait_until(lambda: not [s for s in slurm_fab.steps(job_id=job_id)
                                if s.name == slurm.step_name(second)], 15, "second step gone")
        assert not slurm_fab.run_processes(second)
        assert [s.state for s in slurm_fab.steps(job_id=other_job) if s.step_id == "0"] == \
            ["RUNNING"]
    finally:
        sim.slurm_run(["scancel", other_job], check=False)


def run_steps_of(slurm_fab: SlurmFab, job_id: str, count: int) -> list[slurm.StepState]:
    """The allocation's finished run steps, once sacct lists `count` of them."""
    def finished() -> list[slurm.StepState]:
        found = [s for s in slurm_fab.accounted(job_id) if s.run_id and not s.active]
        return found if len(found) == count else []

    return wait_until(finished, 15, f"{count} run steps in sacct")


def test_a_2x2_sweep_runs_in_one_allocation_pooled_and_per_point(slurm_fab: SlurmFab):
    """Rank pools (the default): one step per thread value; --no-pool: one step per point."""
    pooled = slurm_fab.salloc("sweep", "--channels", "28,42", "--threads", "256,512",
                              timeout=500)
    output = pooled.stdout + pooled.stderr
    assert pooled.returncode == 0, output[-4000:]
    assert "sweep: rank pools: channels change inside a launch (per communicator); a new launch " \
           "for each value of threads" in output, output[-3000:]
    job_id = re.search(r"Granted job allocation (\d+)", output).group(1)
    steps = run_steps_of(slurm_fab, job_id, 2)
    assert [s.state for s in steps] == ["COMPLETED"] * 2
    assert sorted(re.search(r"_(\d+)ch_(\d+)th_", s.run_id).groups() for s in steps) == \
        [("28", "256"), ("28", "512")]  # each pool's launch is named after its first point

    per_point = slurm_fab.salloc("sweep", "--no-pool", "--channels", "28,42",
                                 "--threads", "256,512", timeout=500)
    output = per_point.stdout + per_point.stderr
    assert per_point.returncode == 0, output[-4000:]
    job_id = re.search(r"Granted job allocation (\d+)", output).group(1)
    steps = run_steps_of(slurm_fab, job_id, 4)
    assert [s.state for s in steps] == ["COMPLETED"] * 4
    assert sorted(re.search(r"_(\d+)ch_(\d+)th_", s.run_id).groups() for s in steps) == \
        [("28", "256"), ("28", "512"), ("42", "256"), ("42", "512")]


@pytest.fixture
def shared_config(slurm_fab: SlurmFab) -> Iterator[tuple[Path, Path]]:
    """The fab config and experiments dir where a batch job's first node sees them too: the
    nodes share this machine's filesystem except /tmp, /run and /srv (docs/SIM_CLUSTER.md)."""
    where = Path("/var/tmp") / f"gemm-slurm-test-{uuid.uuid4().hex[:8]}"
    where.mkdir(mode=0o700)
    data = yaml.safe_load(slurm_fab.config.read_text())
    data["cluster"]["experiments_dir"] = str(where / "experiments")
    tiny = where / "tiny4.yaml"
    tiny.write_text(Path(data["launch"]["config"]).read_text())
    data["launch"]["config"] = str(tiny)
    config = where / "srun.yaml"
    config.write_text(yaml.safe_dump(data))
    yield config, where / "experiments"
    subprocess.run(["rm", "-rf", str(where)], check=False)


def test_launch_slurm_outside_an_allocation_submits_follows_and_detaches(
        slurm_fab: SlurmFab, shared_config: tuple[Path, Path]):
    config, experiments = shared_config
    argv = [FAB, "-f", str(config), "launch", "--slurm", "--nodes", "2", "--time", "10",
            "--channels", "42", "--threads", "512"]
    result = subprocess.run(argv, cwd=ROOT, env=slurm_fab.env(), capture_output=True, text=True,
                            timeout=240, stdin=subprocess.DEVNULL)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    job_id = re.search(r"launch: submitted batch job (\d+) \(2 node\(s\)\)", output).group(1)
    # Followed: the inner launch's own lines, then the job's end.
    assert f"via srun (inside Slurm job {job_id}" in output, output[-3000:]
    assert "[node 1] step 4/4" in output
    assert f"batch job {job_id} ended: COMPLETED, exit code 0" in output
    run_id = run_id_in(output)
    record = json.loads((experiments / run_id / "run.json").read_text())
    assert record["status"] == "succeeded"

    # Ctrl-C stops following; the job and its run step go on until cancelled.
    proc = subprocess.Popen([*argv, *LONG], cwd=ROOT, env=slurm_fab.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    second = None
    try:
        lines = read_until(proc, r"\[node 1\] step \d+/", timeout=150)
        second = re.search(r"submitted batch job (\d+)", "".join(lines)).group(1)
        os.killpg(proc.pid, signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
        assert proc.returncode == 130, "".join(lines) + rest
        assert f"batch job {second} goes on" in rest
        time.sleep(2)
        run_steps = [s for s in slurm_fab.steps(job_id=second) if s.run_id]
        assert [s.state for s in run_steps] == ["RUNNING"], run_steps
    finally:
        kill_group(proc)
        if second:
            slurm_fab.sim.slurm_run(["scancel", second], check=False)
            wait_until(lambda: not slurm_fab.steps(job_id=second), 30, f"job {second} gone")


def test_launch_slurm_refuses_bad_values_and_inside_an_allocation_submitting_nothing(
        slurm_fab: SlurmFab, allocation: dict[str, str]):
    before = slurm_fab.sim.slurm_run(["squeue", "-h", "-o", "%i"]).stdout.split()
    inside = slurm_fab.fab(allocation, "launch", "--slurm", "--nodes", "2")
    assert inside.returncode == 2
    assert f"already inside Slurm job {allocation['SLURM_JOB_ID']}: drop --slurm" in inside.stderr
    bad = subprocess.run([FAB, "-f", str(slurm_fab.config), "launch", "--slurm", "--time",
                          "soon", "--nodes", "2"], cwd=ROOT, env=slurm_fab.env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "is not a Slurm time" in bad.stderr, bad.stderr
    no_count = subprocess.run([FAB, "-f", str(slurm_fab.config), "launch", "--slurm"], cwd=ROOT,
                              env=slurm_fab.env(), capture_output=True, text=True, timeout=60)
    assert no_count.returncode == 2 and "give --nodes N" in no_count.stderr, no_count.stderr
    stray = subprocess.run([FAB, "-f", str(slurm_fab.config), "launch", "--nodes", "2"],
                           cwd=ROOT, env=slurm_fab.env(), capture_output=True, text=True,
                           timeout=60)
    assert stray.returncode == 2 and "go with --slurm" in stray.stderr, stray.stderr
    assert slurm_fab.sim.slurm_run(["squeue", "-h", "-o", "%i"]).stdout.split() == before


@pytest.mark.docker
def test_a_dockerized_run_is_one_step_and_fab_stop_reaches_into_the_container(sim_cluster,
                                                                            tmp_path):
    """The same launcher's `docker exec` path inside a step: docker-up, a run to its end, and a
    detached run stopped by `fab stop` (scancel of the step, then the registry stop, which
    signals torchrun's group inside the container: killing a `docker exec` client would not)."""
    sim = sim_cluster(nodes=2, docker=True, slurm=True, slurm_accounting=False, shared_fs=True)
    data = yaml.safe_load(sim.write_fabric_config(tmp_path / "sim.yaml").read_text())
    docker = data["docker"]
    # The sim image has no Python of its own: the checkout's venv is mounted and goes first.
    docker["env"] = {"PATH": f"{Path(sys.executable).parent}:/usr/local/sbin:/usr/local/bin:"
                             "/usr/sbin:/usr/bin:/sbin:/bin"}
    config = tmp_path / "docker-srun.yaml"
    config.write_text(yaml.safe_dump({
        "cluster": {"workdir": sim.workdir, "venv": data["cluster"].get("venv"),
                    "experiments_dir": str(tmp_path / "experiments")},
        "docker": docker, "launch": {"nproc": 1, "config": "config/multi_node/cpu_tiny.yaml"}}))
    made = SlurmFab(sim, config, tmp_path / "experiments")
    granted = sim.slurm_run(["salloc", "--nodes=2", "--no-shell", "--job-name=gemm-docker"])
    job_id = next(line.rsplit(" ", 1)[1] for line in granted.stderr.splitlines()
                  if "Granted job allocation" in line)
    nodelist = sim.slurm_run(["squeue", "-h", "-j", job_id, "-o", "%N"]).stdout.strip()
    allocation = {"SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist,
                  "SLURM_JOB_NUM_NODES": "2"}
    try:
        for task in (["sync"], ["docker-up"]):
            done = made.fab(allocation, *task, timeout=240)
            assert done.returncode == 0, done.stdout + done.stderr
        result = made.fab(allocation, "launch", "--docker", "--channels", "42", "--threads",
                          "512", "--override", "training.max_steps=4", timeout=240)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        assert "docker, via srun" in output and "started in container training-overlap" in output
        detached = made.fab(allocation, "launch", "--docker", "--detach", *LONG, timeout=240)
        assert detached.returncode == 0, detached.stdout + detached.stderr
        run_id = run_id_in(detached.stdout)
        wait_until(lambda: "[node 1] step" in made.fab(allocation, "logs", "--run", run_id,
                                                       "--lines", "3").stdout, 120,
                   "the detached run stepping")
        stop = made.fab(allocation, "stop", "--run", run_id, "--grace", "5")
        assert stop.returncode == 0, stop.stdout + stop.stderr
        assert "sent TERM to step" in stop.stderr
        wait_until(lambda: not [s for s in made.steps(job_id=job_id)
                                if s.name == slurm.step_name(run_id)], 15, "the step gone")
        assert not made.run_processes(run_id)
        for node in sim.nodes:  # the ranks ran in the containers: nothing of the run left there
            inside = sim.exec(node.index, f"docker exec training-overlap sh -c 'grep -lzxsF "
                                          f"GEMM_RUN_ID={run_id} /proc/[0-9]*/environ || true'"
                              ).stdout
            assert not inside.split(), f"node {node.index}: {inside}"
    finally:
        made.fab(allocation, "docker-down", timeout=120)
        sim.slurm_run(["scancel", job_id], check=False)


def test_the_hang_watchdog_diagnoses_and_stops_a_frozen_rank_in_a_step(
        slurm_fab: SlurmFab, allocation: dict[str, str], tmp_path: Path):
    timeout_s = 15
    output_path = tmp_path / "launch-output.txt"
    with open(output_path, "w") as output_file:  # a file: a full pipe would block fab
        proc = subprocess.Popen(
            [FAB, "-f", str(slurm_fab.config), "launch", "--hang-timeout", str(timeout_s),
             *LONG, "--override", "training.log_interval=1"], cwd=ROOT,
            env=slurm_fab.env(allocation), stdout=output_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: re.search(r"\[node 1\] step \d+/", output_path.read_text()), 150,
                   "node 1 stepping")
        run_id = run_id_in(output_path.read_text())
        frozen = slurm_fab.sim.exec(1, (
            f"for f in $(grep -lzx 'GEMM_RUN_ID={run_id}' /proc/[0-9]*/environ 2>/dev/null); do "
            f"grep -qzx 'RANK=1' $f && basename $(dirname $f); done")).stdout.split()
        assert frozen, "rank 1 not found on node 1"
        slurm_fab.sim.exec(1, f"kill -STOP {frozen[0]}")
        proc.wait(timeout=timeout_s + 150)
    finally:
        kill_group(proc)
    output = output_path.read_text()
    assert proc.returncode == 4, output[-3000:]
    run_dir = slurm_fab.experiments / run_id
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "hung" and record["hang"]["first_stalled_ranks"] == [1]
    summary = json.loads((run_dir / "hang" / "summary.json").read_text())
    [rank0] = [r for r in summary["ranks"] if r["rank"] == 0]
    assert "(train/" in (run_dir / "hang" / rank0["dump_file"]).read_text()
    assert not [s for s in slurm_fab.steps(job_id=allocation["SLURM_JOB_ID"])
                if s.name == slurm.step_name(run_id)]
    assert not slurm_fab.run_processes(run_id)
