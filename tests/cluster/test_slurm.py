"""Job steps built by tasks/lib/slurm.py against the test cluster's real Slurm (docs/SLURM.md).

The fixture `cluster_slurm` (tests/conftest.py) runs slurmctld + slurmdbd on the controller's
side and one slurmd per node; the client tools run here, as `fab` will. Every step runs in an
allocation of its own test (`salloc --no-shell`), cancelled at the end, also on failure.
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tasks.lib import slurm
from tasks.lib.quoting import sh_quote
from tests.helpers import REPO, wait_until
from tests.simcluster import SimCluster, procs
from tests.simcluster import cluster as cluster_module
from tests.simcluster import slurm as sim_slurm
from tests.simcluster.cluster import NODE_ENV
from tests.simcluster.testing import make_sim_cluster, unique_name

pytestmark = pytest.mark.cluster

ME = "root"
TINY = REPO / "config" / "multi_node" / "cpu_tiny.yaml"


@pytest.fixture
def shared_dir(cluster_slurm: SimCluster) -> Iterator[tuple[str, Path]]:
    """A fresh directory on the nodes' shared /srv: (path on the nodes, path here)."""
    name = f"slurm-test-{uuid.uuid4().hex[:8]}"
    here = cluster_slurm.nodes[0].srv_dir / name
    here.mkdir()
    yield f"/srv/{name}", here
    subprocess.run(["rm", "-rf", str(here)], check=False)


@pytest.fixture
def allocation(cluster_slurm: SimCluster) -> Iterator[str]:
    """A 2-node allocation of root (like `salloc -N2`); its job id. Cancelled at the end."""
    result = cluster_slurm.slurm_run(["salloc", "--nodes=2", "--no-shell",
                                      "--job-name=gemm-test-alloc"], timeout=30)
    job_id = next(line.rsplit(" ", 1)[1] for line in result.stderr.splitlines()
                  if "Granted job allocation" in line)
    yield job_id
    cluster_slurm.slurm_run(["scancel", job_id], check=False)


def start_step(cluster: SimCluster, **kwargs) -> subprocess.Popen[str]:
    """Runs the srun command line slurm.srun_command builds through a real shell, detached."""
    command = slurm.srun_command(**kwargs)
    return subprocess.Popen(["bash", "-c", command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd="/tmp",
                            env={**NODE_ENV, **cluster.slurm_env}, start_new_session=True)


def live_steps(cluster: SimCluster, **kwargs) -> list[slurm.StepState]:
    return slurm.parse_squeue_steps(cluster.slurm_run(slurm.squeue_steps_argv(**kwargs)).stdout)


def accounted(cluster: SimCluster, job_id: str) -> dict[str, slurm.StepState]:
    output = cluster.slurm_run(slurm.sacct_argv(job_ids=[job_id])).stdout
    return {record.id: record for record in slurm.parse_sacct(output)}


def finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.communicate()


# -- the sim Slurm itself -------------------------------------------------------------------------


def test_nodes_idle_and_srun_reaches_every_node(cluster_slurm: SimCluster):
    states = sim_slurm.node_states(cluster_slurm.slurm_layout, NODE_ENV)
    assert states == {node.hostname: "idle" for node in cluster_slurm.nodes}
    took = []
    for _ in range(5):
        started = time.monotonic()
        result = cluster_slurm.slurm_run(["srun", "-N2", "--ntasks-per-node=1", "hostname"])
        took.append(time.monotonic() - started)
        assert sorted(result.stdout.split()) == [n.hostname for n in cluster_slurm.nodes]
    print(f"srun -N2 hostname: median {statistics.median(took):.3f} s of {len(took)}; "
          f"bring-up {cluster_slurm.up_seconds:.2f} s")


def test_salloc_and_sbatch(cluster_slurm: SimCluster, shared_dir: tuple[str, Path]):
    on_nodes, here = shared_dir
    result = cluster_slurm.slurm_run(["salloc", "-N2", "srun", "hostname"])
    assert sorted(result.stdout.split()) == [n.hostname for n in cluster_slurm.nodes]
    assert "Granted job allocation" in result.stderr
    # Not `sbatch --wait`: it polls every few seconds. The job's own sacct line says it ended.
    submitted = cluster_slurm.slurm_run([
        "sbatch", "--parsable", "-N2", f"--output={on_nodes}/batch-%j.out",
        "--wrap", "srun --ntasks-per-node=1 hostname"])
    job_id = slurm.parse_sbatch_output(submitted.stdout)
    job = wait_until(lambda: (r := accounted(cluster_slurm, job_id).get(job_id)) and not r.active
                     and r, 30, f"batch job {job_id} ended")
    assert (job.state, job.exit_code) == ("COMPLETED", 0)
    assert sorted((here / f"batch-{job_id}.out").read_text().split()) == \
        [n.hostname for n in cluster_slurm.nodes]


def test_another_user_submits_and_its_job_runs_as_that_user(cluster_slurm: SimCluster):
    result = cluster_slurm.slurm_run(["srun", "-N2", "--ntasks-per-node=1", "id", "-un"],
                                     user=sim_slurm.OTHER_USER)
    assert result.stdout.split() == [sim_slurm.OTHER_USER] * 2


# -- one step per run, built by tasks/lib/slurm.py ------------------------------------------------


def test_step_runs_the_payload_once_per_node_and_is_seen_by_squeue_and_sacct(
        cluster_slurm: SimCluster, allocation: str, shared_dir: tuple[str, Path]):
    on_nodes, here = shared_dir
    run_id = f"payload_{uuid.uuid4().hex[:6]}"
    hostile = "it's $(touch /tmp/pwned) `id` ;|&"
    payload = ("set -e; d=$1; printf '%s\\n' \"$SLURM_NODEID\" \"$(hostname)\" \"$2\" "
               ">\"$d/node_$SLURM_NODEID\"; while [ ! -e \"$d/release\" ]; do sleep 0.05; done")
    step = start_step(cluster_slurm, run_id=run_id, nodes=2, job_id=allocation,
                      command=["bash", "-c", payload, "payload", on_nodes, hostile],
                      output=f"{on_nodes}/out_%n.txt")
    try:
        wait_until(lambda: all((here / f"node_{i}").exists() for i in (0, 1)), 20,
                   "both tasks started")
        ours = slurm.our_steps(live_steps(cluster_slurm, job_id=allocation), user=ME,
                               run_id=run_id)
        assert [(s.job_id, s.state, s.nodes) for s in ours] == \
            [(allocation, "RUNNING", [n.hostname for n in cluster_slurm.nodes])]
        (here / "release").touch()
        finish(step)
        assert step.returncode == 0, step.stderr
    finally:
        (here / "release").touch()
        finish(step)
    for i, node in enumerate(cluster_slurm.nodes):
        assert (here / f"node_{i}").read_text().splitlines() == [str(i), node.hostname, hostile]
    assert not Path("/tmp/pwned").exists()
    # Accounting is asynchronous (slurmctld -> slurmdbd): poll for the step's final record.
    record = wait_until(
        lambda: next((r for r in accounted(cluster_slurm, allocation).values()
                      if r.run_id == run_id and not r.active), None), 20, "sacct has the step")
    assert (record.state, record.exit_code, record.user) == ("COMPLETED", 0, ME)


def test_a_killed_task_ends_the_step_within_10_s(
        cluster_slurm: SimCluster, allocation: str, shared_dir: tuple[str, Path]):
    on_nodes, here = shared_dir
    run_id = f"kill_{uuid.uuid4().hex[:6]}"
    payload = "echo $$ >\"$1/pid_$SLURM_NODEID\"; exec sleep 300"
    step = start_step(cluster_slurm, run_id=run_id, nodes=2, job_id=allocation,
                      command=["bash", "-c", payload, "payload", on_nodes])
    try:
        wait_until(lambda: all((here / f"pid_{i}").exists() for i in (0, 1)), 20,
                   "both tasks started")
        survivor = (here / "pid_0").read_text().strip()
        victim = (here / "pid_1").read_text().strip()
        # The task's pid is the one its node sees: kill it inside node 1 (a dead rank).
        killed_at = time.monotonic()
        cluster_slurm.exec(1, f"kill -9 {sh_quote(victim)}")
        finish(step, timeout=10)
        took = time.monotonic() - killed_at
    finally:
        finish(step)
    assert step.returncode != 0
    assert took < 10, f"step ended {took:.1f} s after the kill"
    print(f"step ended {took:.2f} s after one task was killed")
    # Node 0's task was ended by Slurm, not left running.
    gone = cluster_slurm.exec(0, f"kill -0 {sh_quote(survivor)}", check=False)
    assert gone.returncode != 0
    assert slurm.our_steps(live_steps(cluster_slurm, job_id=allocation), user=ME,
                           run_id=run_id) == []
    record = wait_until(
        lambda: next((r for r in accounted(cluster_slurm, allocation).values()
                      if r.run_id == run_id and not r.active), None), 20, "sacct has the step")
    assert record.state in ("CANCELLED", "FAILED"), record


def test_scancel_of_our_step_leaves_another_users_job_running(
        cluster_slurm: SimCluster, allocation: str, shared_dir: tuple[str, Path]):
    on_nodes, here = shared_dir
    other = cluster_slurm.slurm_run(
        ["sbatch", "--parsable", "-N2", "--job-name=other-job", "--chdir=/tmp",
         "--output=/dev/null", "--wrap",
         f"srun --ntasks-per-node=1 --job-name={slurm.step_name('other_run')} sleep 300"],
        user=sim_slurm.OTHER_USER)
    other_job = slurm.parse_sbatch_output(other.stdout)
    run_id = f"stop_{uuid.uuid4().hex[:6]}"
    step = start_step(cluster_slurm, run_id=run_id, nodes=2, job_id=allocation,
                      command=["bash", "-c", "trap 'echo term >\"$1/term_$SLURM_NODEID\"; exit 0'"
                               " TERM; touch \"$1/up_$SLURM_NODEID\"; while :; do sleep 0.1; "
                               "done", "payload", on_nodes])
    try:
        wait_until(lambda: all((here / f"up_{i}").exists() for i in (0, 1)), 20,
                   "our tasks started")
        wait_until(lambda: any(s.job_id == other_job and s.step_id == "0"
                               for s in live_steps(cluster_slurm)), 20,
                   "the other user's step runs")
        everything = live_steps(cluster_slurm)
        # The other user's step carries our marker too; only the user tells it apart.
        assert any(s.job_id == other_job and s.run_id == "other_run" for s in everything)
        ours = slurm.our_steps(everything, user=ME, run_id=run_id)
        assert [s.job_id for s in ours] == [allocation]
        cluster_slurm.slurm_run(slurm.scancel_argv(ours, signal="TERM"))
        finish(step, timeout=15)
        assert sorted(p.name for p in here.glob("term_*")) == ["term_0", "term_1"]
        # Ours is gone, the allocation and the other user's job and step are still running.
        after = live_steps(cluster_slurm)
        assert slurm.our_steps(after, user=ME, run_id=run_id) == []
        assert {(s.id, s.state) for s in after if s.job_id == other_job} >= \
            {(f"{other_job}.0", "RUNNING"), (f"{other_job}.batch", "RUNNING")}
        jobs = cluster_slurm.slurm_run(["squeue", "--noheader", "--Format=JobId:|,State:|"]).stdout
        assert f"{allocation}|RUNNING|" in jobs.splitlines()
        assert f"{other_job}|RUNNING|" in jobs.splitlines()
    finally:
        finish(step)
        cluster_slurm.slurm_run(["scancel", other_job], user=sim_slurm.OTHER_USER, check=False)


def test_two_node_gloo_torchrun_in_one_step(
        cluster_slurm: SimCluster, allocation: str, shared_dir: tuple[str, Path]):
    """The train package on both nodes, one torchrun per node started by the step's task."""
    on_nodes, here = shared_dir
    master = cluster_slurm.nodes[0].hostname
    python = str(cluster_slurm.venv / "bin" / "python") if cluster_slurm.venv else "python3"
    out = f"{on_nodes}/run"
    # SLURM_NODEID is the node rank; the port is fixed per test directory, free on node 0's
    # own network namespace (nothing else listens there).
    launcher = " ".join([
        "cd", sh_quote(str(REPO)), "&&", "OMP_NUM_THREADS=1", f"PYTHONPATH={sh_quote(str(REPO))}",
        "exec", sh_quote(python), "-m", "torch.distributed.run", "--nnodes=2",
        '--node_rank="$SLURM_NODEID"', "--nproc_per_node=1", f"--master_addr={master}",
        "--master_port=29517", "-m", "train", "--config", sh_quote(str(TINY)),
        "--override", sh_quote(f"training.output_dir={out}"),
        "--override", "training.max_steps=4"])
    step = start_step(cluster_slurm, run_id=f"gloo_{uuid.uuid4().hex[:6]}", nodes=2,
                      job_id=allocation, command=["bash", "-c", launcher],
                      output=f"{on_nodes}/node_%n.txt")
    stdout, stderr = finish(step, timeout=240)
    logs = {p.name: p.read_text()[-800:] for p in here.glob("node_*.txt")}
    assert step.returncode == 0, (stderr, logs)
    summary = wait_until(lambda: next(iter(here.glob("run/**/summary.json")), None), 10,
                         f"summary.json under {here}/run: {sorted(here.rglob('*'))[:20]}")
    assert summary.stat().st_size > 0


# -- tear-down of the Slurm mode ------------------------------------------------------------------


def slurm_traces(cluster: SimCluster, ctld_pid_ns: int) -> dict[str, list[str]]:
    from tests.cluster.test_simcluster import cluster_traces

    traces = cluster_traces(cluster)
    traces["ctld_namespace"] = [str(pid) for pid in procs.pids_in_namespace("pid", ctld_pid_ns)]
    return traces


def test_teardown_ends_every_slurm_daemon_also_after_a_failure_midway():
    with pytest.raises(RuntimeError, match="mid-way"):
        with make_sim_cluster(prefix="sh", nodes=2, slurm=True) as cluster:
            # A step still running on both nodes and a job of the other user pending behind it.
            cluster.slurm_run(["sbatch", "-N2", "--exclusive", "--output=/dev/null", "--wrap",
                               "srun --ntasks-per-node=1 sleep 1000"])
            cluster.slurm_run(["sbatch", "-N2", "--exclusive", "--output=/dev/null", "--wrap",
                               "true"], user=sim_slurm.OTHER_USER)
            ctld_ns = procs.namespace_inode(cluster.host_pids["slurmctld"].pid, "pid")
            assert ctld_ns is not None
            wait_until(lambda: cluster.exec(1, "pgrep -x sleep", check=False).returncode == 0,
                       20, "the step's task runs on node 1")
            traces = slurm_traces(cluster, ctld_ns)
            # The check below must be able to fail: everything is there while the cluster is up.
            assert set(cluster.host_pids) == {"munged", "mariadbd", "slurmdbd",
                                              "slurmdbd-holder", "slurmctld",
                                              "slurmctld-holder"}
            assert all(procs.is_running(pid) for pid in cluster.host_pids.values())
            assert len(traces["ctld_namespace"]) >= 2   # slurmctld and its slurmscriptd
            raise RuntimeError("test failed mid-way")
    traces = slurm_traces(cluster, ctld_ns)
    assert not any(traces.values()), f"left behind: {traces}"


def test_a_killed_owners_slurm_is_torn_down_from_its_state_file():
    name = unique_name("sk")
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import time
            from tests.simcluster import SimCluster
            SimCluster(name={name!r}, nodes=2, slurm=True).up()
            print("up", flush=True)
            time.sleep(600)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert owner.stdout.readline() == "up\n"
    finally:
        owner.send_signal(signal.SIGKILL)  # no atexit, no finalizer: like a killed CI job
        owner.wait()
    cluster = SimCluster.attach(name)
    ctld_ns = procs.namespace_inode(cluster.host_pids["slurmctld"].pid, "pid")
    assert ctld_ns is not None and cluster.slurm
    assert all(procs.is_running(pid) for pid in cluster.host_pids.values())
    states = cluster_module.list_states()
    state = next(state for path, state in states if path == cluster.state_dir)
    assert cluster_module.is_stale(state)
    cluster_module.teardown(cluster.state_dir)
    traces = slurm_traces(cluster, ctld_ns)
    assert not any(traces.values()), f"left behind: {traces}"
