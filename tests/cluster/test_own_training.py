"""Running a training of the user's own with `fab launch --entry`, as a new user would.

- The embedded default (this machine alone) on a checkout that is no git repository (an unpacked
  release archive): `fab check` passes and `fab launch` runs, since the only node's checkout is
  this one.
- On the simulated cluster (real sshd nodes with their own /tmp, real torchrun gloo ranks): a
  training script that is not part of this repository (a small torch.nn model under DDP on gloo,
  written here into a temporary directory with its own module and a YAML our validator rejects)
  on 2 nodes x 2 ranks, over SSH and through Slurm's srun: it sees every variable of env.sh; a
  rank that raises stops the run on every node within seconds, naming the node; a hung rank
  gets stacks; its outputs are collected; a 2 x 2 sweep of it ends with a report whose
  objective is the script's own step metric.

Over SSH the workdir is this checkout (the nodes share /work, not /tmp): the node run
directories each test leaves under <checkout>/experiments are removed after it.
"""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.lib.runspec import RunSpecError, load_train_config
from tests.helpers import REPO, remove_node_run_dirs, wait_until
from tests.simcluster import SimCluster
from tests.simcluster.testing import make_sim_cluster

FAB = str(Path(sys.executable).parent / "fab")
FAST = ["--override", "training.max_steps=4", "--override", "calibration.compute_steps=1",
        "--override", "calibration.comm_steps=1"]


def unpacked_copy(dest: Path) -> Path:
    """This checkout's files (tracked and untracked-not-ignored) without .git, as a release
    archive unpacks."""
    listing = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard",
                              "-z"], capture_output=True, check=True).stdout.decode()
    for name in filter(None, listing.split("\0")):
        source = REPO / name
        if source.is_file():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
    return dest


def fab_here(cwd: Path, config: Path, *args: str, timeout: float = 180):
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in ("CHANNELS", "THREADS", "NPROC_PER_NODE", "CONFIG_FILE", "MASTER_PORT")
           and not k.startswith(("SLURM_", "DOCKER_"))}
    env["COLUMNS"] = "250"
    return subprocess.run([FAB, "-f", str(config), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL)


def test_embedded_default_runs_a_checkout_that_is_no_git_repository(tmp_path):
    checkout = unpacked_copy(tmp_path / "release")
    assert not (checkout / ".git").exists()
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump({"cluster": {
        "hosts_file": str(tmp_path / "no_hosts.txt"), "experiments_dir": str(tmp_path / "exp")}}))
    check = fab_here(checkout, config, "check", timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "neither a git checkout" not in check.stdout + check.stderr
    assert "this one (no git)" in check.stdout
    result = fab_here(checkout, config, "launch", *FAST)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    (run_dir,) = (tmp_path / "exp").iterdir()
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "succeeded"
    assert record["nodes"][0]["commit"] is None  # no git: nothing recorded, nothing compared


# -- a training of the user's own --------------------------------------------------------------------

OWN_TRAIN = r'''
"""A user's training: DDP over gloo, its own YAML, a JSON line per step."""
import argparse, json, os, time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.nn.parallel import DistributedDataParallel

from ownlib.model import make_model  # a module of its own, next to the script


def hang_here():
    while True:
        time.sleep(1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--hang-rank", type=int, default=-1)
    parser.add_argument("--at-step", type=int, default=3)
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = Path(os.environ["GEMM_OUTPUT_DIR"])
    names = os.environ["GEMM_ENV_VARS"].split() + ["GEMM_ENV_VARS", "GEMM_MASKED_VARS"]
    seen = {name: os.environ.get(name) for name in names}
    (out / f"own_env_rank{rank}.json").write_text(json.dumps(
        {"env": seen, "cwd": os.getcwd(), "label": args.label, "config": config}))
    model = DistributedDataParallel(make_model(config["model"]["width"]))
    optimizer = torch.optim.SGD(model.parameters(), lr=config["optimizer"]["lr"])
    data = torch.randn(8, config["model"]["width"])
    for step in range(config["training"]["steps"]):
        if step == args.at_step and rank == args.fail_rank:
            (out / f"own_raised_rank{rank}.txt").write_text(str(time.time()))
            raise RuntimeError(f"own training: rank {rank} failed on purpose at step {step}")
        if step == args.at_step and rank == args.hang_rank:
            hang_here()
        started = time.perf_counter()
        optimizer.zero_grad()
        model(data).square().mean().backward()
        optimizer.step()
        print(json.dumps({"step": step, "step_ms": (time.perf_counter() - started) * 1000}),
              flush=True)
        time.sleep(config["training"]["pause_s"])
    (out / f"own_done_rank{rank}.txt").write_text("done")
    dist.destroy_process_group()


main()
'''
OWN_YAML = {
    "model": {"width": 32},
    "optimizer": {"name": "sgd", "lr": 0.01},   # sections our train config does not know
    "fsdp": {"sharding": "hybrid_shard"},
    "dataset": {"name": "random"},
    "training": {"steps": 6, "pause_s": 0.05},
}


def write_own_training(directory: Path, **training) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.py").write_text(OWN_TRAIN)
    (directory / "ownlib").mkdir(exist_ok=True)
    (directory / "ownlib" / "__init__.py").write_text("")
    (directory / "ownlib" / "model.py").write_text(
        "import torch\n\ndef make_model(width):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(),\n"
        "                               torch.nn.Linear(width, 1))\n")
    config = {**OWN_YAML, "training": {**OWN_YAML["training"], **training}}
    (directory / "my.yaml").write_text(yaml.safe_dump(config))
    return directory / "train.py"


def test_our_validator_would_reject_the_scripts_own_yaml(tmp_path):
    script = write_own_training(tmp_path / "own")
    with pytest.raises(RunSpecError, match="config"):
        load_train_config(script.parent / "my.yaml", ())


@pytest.fixture(scope="module")
def ssh_cluster(tmp_path_factory) -> Iterator[tuple[SimCluster, Path, Path]]:
    """2 nodes (own /tmp, /srv), workdir this checkout, 2 CPU ranks per node."""
    with make_sim_cluster(prefix="ow", nodes=2, ifnames=["eth0", "ens5"]) as sim:
        tmp = tmp_path_factory.mktemp("own")
        data = yaml.safe_load(sim.write_fabric_config(tmp / "sim.yaml").read_text())
        data["cluster"].update(workdir=str(REPO), experiments_dir=str(tmp / "experiments"),
                               registry_dir="/tmp/gemm-runs-own")
        data["docker"] = {"enabled": False, "platform": "cpu"}
        data["launch"] = {"nproc": 2, "stop_grace": 5}
        config = tmp / "own.yaml"
        config.write_text(yaml.safe_dump(data))
        yield sim, config, tmp / "experiments"
        remove_node_run_dirs(tmp / "experiments")


def fab_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("CHANNELS", "THREADS", "NPROC_PER_NODE", "CONFIG_FILE", "MASTER_PORT")
           and not k.startswith(("SLURM_", "DOCKER_"))}
    env.update(COLUMNS="250", PYTHONUNBUFFERED="1")
    return env


def run_fab(config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FAB, "-f", str(config), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=fab_env(), stdin=subprocess.DEVNULL)


def run_dir_of(experiments: Path, output: str) -> Path:
    match = re.search(r"launch: (multinode_\d+ch_\d+th_\d{8}_\d{6}_[0-9a-f]+):", output)
    assert match, output[-3000:]
    return experiments / match.group(1)


def run_processes(sim: SimCluster, run_id: str) -> list[str]:
    found = []
    for node in sim.nodes:
        out = sim.exec(node.index, f"grep -lzxsF -e GEMM_RUN_ID={run_id} "
                                   "/proc/[0-9]*/environ || true").stdout
        found += [f"node{node.index}:{line}" for line in out.split()]
    return found


HOSTILE = "$(touch /tmp/own-pwned) it's \"q\""


def check_every_env_variable_reached_every_rank(run_dir: Path, world: int) -> dict:
    """The script recorded, per rank, every variable env.sh names: each has env.sh's value
    (common, or its node's), the hostile one literally."""
    record = json.loads((run_dir / "run.json").read_text())
    outputs = run_dir / record["output_dir"]
    common, per_node = record["env"]["common"], record["env"]["per_node"]
    nproc = record["nproc_per_node"]
    seen = {}
    for rank in range(world):
        data = json.loads((outputs / f"own_env_rank{rank}.json").read_text())
        env = data["env"]
        expected = {**common, **per_node[rank // nproc]}
        assert set(expected) <= set(env), sorted(set(expected) - set(env))
        for name, value in expected.items():
            assert env[name] == value, (rank, name, env[name], value)
        assert env["GEMMTEST_HOSTILE"] == HOSTILE
        assert env["GEMM_OUTPUT_DIR"] == posixpath_join(record["node_run_dir"], record["output_dir"])
        assert env["PET_LOG_DIR"].endswith(f"torchrun_logs/node_{rank // nproc}")
        assert env["TORCH_FR_BUFFER_SIZE"] == "2000"
        assert data["cwd"] == posixpath_join(record["node_run_dir"], "entry")
        assert data["config"]["fsdp"] == {"sharding": "hybrid_shard"}  # pushed as is
        seen[rank] = data
    return record


def posixpath_join(*parts: str) -> str:
    import posixpath

    return posixpath.join(*parts)


@pytest.mark.cluster
def test_own_training_on_two_nodes_over_ssh(ssh_cluster, tmp_path):
    sim, config, experiments = ssh_cluster
    script = write_own_training(tmp_path / "own")
    entry = f"{script} --config my.yaml --label 'a b $(id)'"
    result = run_fab(config, "launch", "--entry", entry, "--metric", "json:step_ms",
                     "--env", f"GEMMTEST_HOSTILE={HOSTILE}", "-c", "4", "-t", "128")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    first = output.splitlines()[0]
    assert first.startswith(f"entry: {shlex.join([str(script), '--config', 'my.yaml', '--label', 'a b $(id)'])}"), first
    assert "(pushed with the run:" in first
    run_dir = run_dir_of(experiments, output)
    record = check_every_env_variable_reached_every_rank(run_dir, world=4)
    assert record["status"] == "succeeded" and [n["exit_code"] for n in record["nodes"]] == [0, 0]
    assert record["flags"]["entry"]["argv"][0] == str(script)
    assert record["flags"]["sources"]["config"] == "built-in"
    labels = {json.loads((run_dir / record["output_dir"] / f"own_env_rank{r}.json").read_text())["label"]
              for r in range(4)}
    assert labels == {"a b $(id)"}
    # Every rank's outputs, from both nodes' own filesystems: what it wrote, its log lines, the
    # per-rank stdout files of each node's torchrun.
    outputs = run_dir / record["output_dir"]
    names = {p.name for p in outputs.iterdir()}
    assert {f"own_done_rank{r}.txt" for r in range(4)} <= names
    assert {"node_0_output.log", "node_1_output.log"} <= names
    for node in (0, 1):
        logs = list((outputs / "torchrun_logs" / f"node_{node}").rglob("stdout.log"))
        assert len(logs) == 2 and all('"step_ms"' in p.read_text() for p in logs)
    assert re.search(r"\[node 1\] \[rank3\]:\{\"step\": 5", output), output[-3000:]
    # The report's objective is the script's own step metric.
    with open(run_dir / "results.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["status"] == "completed" and float(row["iter_ms_median"]) > 0
    assert row["objective"].startswith("JSON field 'step_ms'") and row["steps"] == "6"
    for node in sim.nodes:
        assert sim.exec(node.index, "test -e /tmp/own-pwned", check=False).returncode == 1
    assert not Path("/tmp/own-pwned").exists()


@pytest.mark.cluster
def test_a_raising_rank_of_own_training_stops_every_node_naming_it(ssh_cluster, tmp_path):
    sim, config, experiments = ssh_cluster
    script = write_own_training(tmp_path / "own", steps=100000, pause_s=0.2)
    output_path = tmp_path / "launch-output.txt"
    with open(output_path, "w") as output_file:
        proc = subprocess.Popen(
            [FAB, "-f", str(config), "launch", "--entry",
             f"{script} --config my.yaml --fail-rank 3 --at-step 5"],
            cwd=REPO, env=fab_env(), stdin=subprocess.DEVNULL, stdout=output_file,
            stderr=subprocess.STDOUT)
    try:
        # The nodes write the run's outputs under this checkout (shared /work): the raise is seen.
        raised = wait_until(lambda: [
            path for path in (REPO / "experiments").glob(
                "multinode_*/256thread_28channels/own_raised_rank3.txt")
            if (experiments / path.parents[1].name).exists()], 180, "rank 3 raising")
        raised_at = time.monotonic()
        run_id = raised[0].parents[1].name
        wait_until(lambda: not run_processes(sim, run_id), 30, "the run's processes gone",
                   interval=0.2)
        gone_after = time.monotonic() - raised_at
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = output_path.read_text()
    assert proc.returncode == 1, output[-5000:]
    assert gone_after < 10, f"every node clean only {gone_after:.1f} s after the raise"
    assert re.search(r"launch: node 1 \([0-9.]+\) failed first: rank 3 failed", output), output[-4000:]
    run_dir = experiments / run_id
    record = json.loads((run_dir / "run.json").read_text())
    failure = record["first_failure"]
    assert failure["node_rank"] == 1 and failure["ranks"] == [3], failure
    assert record["status"] == "failed"
    # The failing rank's own words reach the report (its exception line, rank-marked).
    report = (run_dir / "report.md").read_text()
    assert "rank 3: RuntimeError: own training: rank 3 failed on purpose at step 5" in report, report[-2000:]


@pytest.mark.cluster
def test_a_hung_rank_of_own_training_gets_stacks(ssh_cluster, tmp_path):
    sim, config, experiments = ssh_cluster
    script = write_own_training(tmp_path / "own", steps=100000, pause_s=0.2)
    result = run_fab(config, "launch", "--entry",
                     f"{script} --config my.yaml --hang-rank 3 --at-step 5",
                     "--hang-timeout", "10", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 4, output[-5000:]
    run_dir = run_dir_of(experiments, output)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "hung" and record["hang"]["stalled_for_s"] <= 25, record.get("hang")
    summary = json.loads((run_dir / "hang" / "summary.json").read_text())
    dumps = {r["rank"]: (run_dir / "hang" / r["dump_file"]).read_text()
             for r in summary["ranks"] if r.get("dump_file")}
    assert sorted(dumps) == [0, 1, 2, 3], summary["ranks"]
    assert "hang_here" in dumps[3] and "train.py" in dumps[3]
    assert all("hang_here" not in dumps[r] for r in (0, 1, 2))
    assert not run_processes(sim, run_dir.name)
    # The flight recorder's files came back with the outputs (the dump request's trigger).
    assert (run_dir / record["output_dir"] / "flight_recorder" / "DUMP").exists()


@pytest.mark.cluster
def test_own_training_detached_then_status_logs_and_stop(ssh_cluster, tmp_path):
    """The registry is the truth for any program: a detached run of your own training shows in
    `fab status`, its rank lines in `fab logs`, and `fab stop` ends it on every node."""
    sim, config, experiments = ssh_cluster
    script = write_own_training(tmp_path / "own", steps=100000, pause_s=0.2)
    started = run_fab(config, "launch", "--detach", "--entry", f"{script} --config my.yaml")
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = run_dir_of(experiments, started.stdout).name
    try:
        wait_until(lambda: "[rank3]:" in run_fab(config, "logs", "--run", run_id).stdout, 120,
                   "rank 3's lines in fab logs", interval=2)
        status = run_fab(config, "status")
        assert status.returncode == 0 and run_id in status.stdout, status.stdout
        stopped = run_fab(config, "stop", "--run", run_id)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        wait_until(lambda: not run_processes(sim, run_id), 30, "the run's processes gone",
                   interval=0.5)
    finally:
        if run_processes(sim, run_id):
            run_fab(config, "emergency-stop", timeout=60)


@pytest.mark.cluster
def test_a_sweep_of_own_training_reports_its_own_step_metric(ssh_cluster, tmp_path):
    sim, config, experiments = ssh_cluster
    script = write_own_training(tmp_path / "own", steps=4, pause_s=0.0)
    result = run_fab(config, "sweep", "--channels", "2,4", "--threads", "64,128",
                     "--entry", f"{script} --config my.yaml",
                     "--metric", r"max:\"step\": (\d+)", timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "one launch per point (--entry runs your own program" in output
    (sweep_dir,) = experiments.glob("sweep_*")
    with open(sweep_dir / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted((r["channels"], r["threads"]) for r in rows) == [
        ("2", "128"), ("2", "64"), ("4", "128"), ("4", "64")]
    for row in rows:
        assert row["status"] == "completed", row
        # The regex's group is the step number: values 0..3 of each of the 4 ranks.
        assert (float(row["iter_ms_median"]), float(row["iter_ms_p90"])) == (1.5, 3.0), row
        assert "regex" in row["objective"] and "higher is better" in row["objective"]
    report = (sweep_dir / "report.md").read_text()
    assert "Objective (your own training; in the iter ms columns): regex" in report
    # Every point gave the same values (the metric is the step number, 0 included: a
    # higher-is-better objective with a 0 cannot be compared as a rate), so the report crowns
    # none (issue 24's decision) and says why.
    assert "## Decision" in report and "**Best point:" not in report, report
    assert "**no best point**" in report or "**No single best point**" in report, report


# -- the same through Slurm's srun -----------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_config(cluster_slurm: SimCluster, tmp_path_factory) -> Iterator[tuple[SimCluster, Path, Path]]:
    """The session's Slurm cluster (2 nodes sharing /srv, workdir /srv/gemm synced once): no
    host in the config, the allocation names the nodes and srun reaches them."""
    tmp = tmp_path_factory.mktemp("own-slurm")
    config = tmp / "srun.yaml"
    config.write_text(yaml.safe_dump({
        "cluster": {"workdir": cluster_slurm.workdir,
                    "venv": str(cluster_slurm.venv) if cluster_slurm.venv else None,
                    "experiments_dir": str(tmp / "experiments")},
        "docker": {"enabled": False, "platform": "cpu"},
        "launch": {"nproc": 2, "stop_grace": 5},
    }))
    synced = salloc(cluster_slurm, config, "sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    yield cluster_slurm, config, tmp / "experiments"


def salloc(sim: SimCluster, config: Path, *args: str, timeout: float = 300):
    """`salloc -N2 fab -f CONFIG ARGS...`: fab is the allocation's command."""
    env = {k: v for k, v in fab_env().items() if not k.startswith("SLURM_")}
    env.update(sim.slurm_env)
    return subprocess.run(["salloc", "--nodes=2", f"--job-name=gemm-own-{os.getpid()}", "--",
                           FAB, "-f", str(config), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.mark.cluster
def test_own_training_on_two_nodes_through_srun(slurm_config, tmp_path):
    sim, config, experiments = slurm_config
    script = write_own_training(tmp_path / "own")
    result = salloc(sim, config, "launch", "--entry", f"{script} --config my.yaml",
                    "--metric", "json:step_ms", "--env", f"GEMMTEST_HOSTILE={HOSTILE}")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert "via srun (inside Slurm job" in output and output.startswith("entry: ")
    run_dir = run_dir_of(experiments, output)
    record = check_every_env_variable_reached_every_rank(run_dir, world=4)
    assert record["status"] == "succeeded"
    outputs = run_dir / record["output_dir"]
    assert {f"own_done_rank{r}.txt" for r in range(4)} <= {p.name for p in outputs.iterdir()}
    with open(run_dir / "results.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["status"] == "completed" and row["objective"].startswith("JSON field 'step_ms'")


@pytest.mark.cluster
def test_a_raising_rank_of_own_training_ends_the_srun_step(slurm_config, tmp_path):
    sim, config, experiments = slurm_config
    script = write_own_training(tmp_path / "own", steps=100000, pause_s=0.2)
    result = salloc(sim, config, "launch", "--entry",
                    f"{script} --config my.yaml --fail-rank 2 --at-step 5")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-5000:]
    assert re.search(r"launch: node 1 \(\S+\) failed first: rank 2 failed", output), output[-4000:]
    run_dir = run_dir_of(experiments, output)
    record = json.loads((run_dir / "run.json").read_text())
    assert record["first_failure"]["ranks"] == [2] and record["status"] == "failed"
    assert not run_processes(sim, run_dir.name)


# -- the same in the experiment container ------------------------------------------------------------

@pytest.mark.cluster
@pytest.mark.docker
def test_own_training_in_docker_sees_every_env_variable(cluster_docker, tmp_path):
    """The script's pushed directory is inside the workdir, which the container mounts at the same
    path: the ranks start there inside the container and source env.sh there."""
    sim = cluster_docker
    data = yaml.safe_load(sim.write_fabric_config(tmp_path / "sim.yaml").read_text())
    data["cluster"].update(experiments_dir=str(tmp_path / "experiments"),
                           registry_dir="/tmp/gemm-runs-own-docker")
    data["docker"]["container"] = "gemm-own-test"
    # As tests/cluster/test_launch.py: the sim image has no Python; the checkout's venv is
    # mounted and goes first on the container's PATH.
    venv_bin = str(Path(sys.executable).parent)
    data["docker"]["env"] = {"PATH": f"{venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:"
                                     "/usr/bin:/sbin:/bin"}
    data["launch"] = {"nproc": 2, "stop_grace": 5}
    config = tmp_path / "docker.yaml"
    config.write_text(yaml.safe_dump(data))
    synced = run_fab(config, "sync", timeout=180)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    up = run_fab(config, "docker-up", timeout=240)
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        script = write_own_training(tmp_path / "own")
        result = run_fab(config, "launch", "--docker", "--entry", f"{script} --config my.yaml",
                         "--env", f"GEMMTEST_HOSTILE={HOSTILE}")
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-5000:]
        assert "in container gemm-own-test" in output
        record = check_every_env_variable_reached_every_rank(
            run_dir_of(tmp_path / "experiments", output), world=4)
        assert record["status"] == "succeeded" and record["flags"]["docker"] is True
        for node in sim.nodes:
            inside = sim.exec(node.index, "docker exec gemm-own-test test -e /tmp/own-pwned",
                              check=False)
            assert inside.returncode == 1, inside.stderr
    finally:
        run_fab(config, "docker-down", timeout=240)
