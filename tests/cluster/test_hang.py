"""Hang diagnostics, the hang watchdog and the profiler flags on the simulated cluster.

- `fab diagnose` against rank-like processes started on the sim nodes with the run markers the
  node launcher sets (GEMM_RUN_ID / GEMM_NODE_RANK, RANK / LOCAL_RANK), bare and inside a
  container, one of them frozen with SIGSTOP: stacks come back from every node, the frozen rank is
  found, nothing is stopped.
- The HangMonitor and `fab diagnose` on a real `fab launch --detach` (gloo ranks), then `fab stop`.
- End to end through `fab launch`: a frozen rank detected, diagnosed, stopped and marked hung;
  profiler command lines in --dry-run; a missing profiler refused before any start; one torch
  profiler trace per rank.

Launches run with workdir = this checkout: each test removes the node run directories its own
runs left under <checkout>/experiments.
"""
from __future__ import annotations

import json
import posixpath
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tasks.lib.quoting import sh_quote
from tests.helpers import (
    FAB,
    FAKE_STEPPER_WAIT_FRAME,
    REPO,
    fab_env,
    fake_stepper_files,
    ready_file,
    remove_node_run_dirs,
    run_fab,
    wait_until,
)
from tests.simcluster import SimCluster

pytestmark = [pytest.mark.cluster]

VENV_PYTHON = str(Path(sys.executable))


@pytest.fixture(autouse=True)
def _remove_node_run_dirs(tmp_path: Path) -> Iterator[None]:
    """The nodes write <checkout>/experiments/<run>: remove this test's runs there."""
    yield
    remove_node_run_dirs(tmp_path / "experiments")


def write_config(cluster: SimCluster, path: Path, **docker: object) -> Path:
    config = yaml.safe_load(cluster.write_fabric_config().read_text())
    config["cluster"]["workdir"] = str(REPO)
    config["cluster"]["registry_dir"] = f"/tmp/gemm-runs-{path.stem}"
    config["cluster"]["experiments_dir"] = str(path.parent / "experiments")
    config.setdefault("docker", {}).update(docker)
    path.write_text(yaml.safe_dump(config))
    return path


def fake_run_on_node(cluster: SimCluster, index: int, run_id: str, registry: str, ranks: list[int],
                     *, container: str | None = None) -> str:
    """Start one rank-like process per rank on node `index` with the run's markers (bare, or
    through `docker exec` into `container`), and the node's registry entry. Returns the node dir."""
    node_dir = f"/tmp/fake-{run_id}"
    lines = [f"mkdir -p {node_dir}/train {node_dir}/out",
             *(f"printf '%s' {sh_quote(text)} > {node_dir}/{name}"
               for name, text in fake_stepper_files().items()),
             f"for i in $(seq 1 40); do echo \"step $i/100 | iter 1 ms\"; done > {node_dir}/out/node_{index}_output.log"]
    for rank in ranks:
        lines.append(f"for s in 1 2 3; do echo '{{\"rank\": {rank}, \"step\": '$s'}}'; done "
                     f"> {node_dir}/out/rank_{rank:02d}_metrics.jsonl")
    entry = f"{registry}/{run_id}/node_{index}"
    meta = {"run_id": run_id, "node_rank": index, "output_log": f"{node_dir}/out/node_{index}_output.log",
            "output_dir": f"{node_dir}/out", "container": container}
    lines += [f"mkdir -p {entry}", f"echo '{json.dumps(meta)}' > {entry}/meta.json",
              f"echo running > {entry}/state"]
    markers = f"GEMM_RUN_ID={run_id} GEMM_NODE_RANK={index}"
    for local, rank in enumerate(ranks):
        env = f"{markers} RANK={rank} LOCAL_RANK={local} NCCL_DEBUG=WARN TORCH_NCCL_BLOCKING_WAIT=1"
        if container:
            flags = " ".join(f"-e {pair}" for pair in env.split())
            lines.append(f"docker exec -d -w {node_dir} {flags} {container} {VENV_PYTHON} -m train")
        else:
            lines.append(f"(cd {node_dir} && exec env {env} setsid {VENV_PYTHON} -m train) "
                         "</dev/null >/dev/null 2>&1 &")
    cluster.exec(index, "\n".join(lines))
    return node_dir


def wait_ready(cluster: SimCluster, index: int, run_id: str, ranks: list[int]) -> None:
    """Until every fake rank on node `index` is in its wait loop (frozen there, its innermost
    frame is known)."""
    paths = " ".join(f"/tmp/fake-{run_id}/{ready_file(rank)}" for rank in ranks)
    wait_until(lambda: cluster.exec(index, f"ls {paths}", check=False).returncode == 0,
               timeout=30, what=f"ranks {ranks} of {run_id} on node {index} not ready",
               interval=0.1)


def rank_pid(cluster: SimCluster, index: int, run_id: str, rank: int) -> int:
    """The node-namespace pid of a rank, found the way the registry does: by its markers."""
    script = (f"for f in $(grep -lzx 'GEMM_RUN_ID={run_id}' /proc/[0-9]*/environ 2>/dev/null); do "
              f"grep -qzx 'RANK={rank}' $f && basename $(dirname $f); done")
    for _ in range(100):
        out = cluster.exec(index, script, check=False).stdout.split()
        if out:
            return int(out[0])
        time.sleep(0.1)
    raise AssertionError(f"rank {rank} of {run_id} not running on node {index}")


def proc_state(cluster: SimCluster, index: int, pid: int) -> str:
    return cluster.exec(index, f"cut -d')' -f2 /proc/{pid}/stat").stdout.split()[0]


def stop_fake_run(cluster: SimCluster, run_id: str) -> None:
    for index in range(len(cluster.nodes)):
        cluster.exec(index, f"for f in $(grep -lzx 'GEMM_RUN_ID={run_id}' /proc/[0-9]*/environ "
                     "2>/dev/null); do p=$(basename $(dirname $f)); kill -CONT $p; kill -KILL $p; done; "
                     f"rm -rf /tmp/fake-{run_id}", check=False)


def load_diagnose(experiments: Path, run_id: str) -> tuple[Path, dict]:
    dirs = sorted((experiments / run_id).glob("diagnose_*"))
    assert len(dirs) == 1, dirs
    return dirs[0], json.loads((dirs[0] / "summary.json").read_text())


def test_diagnose_bare_ranks_on_two_nodes_finds_the_frozen_one(cluster3: SimCluster, tmp_path: Path):
    run_id = f"multinode_28ch_256th_diag_{uuid.uuid4().hex[:8]}"
    config = write_config(cluster3, tmp_path / f"diag{run_id[-8:]}.yaml", enabled=False)
    registry = f"/tmp/gemm-runs-diag{run_id[-8:]}"
    try:
        fake_run_on_node(cluster3, 0, run_id, registry, [0, 1])
        fake_run_on_node(cluster3, 1, run_id, registry, [2, 3])
        wait_ready(cluster3, 0, run_id, [0, 1])
        wait_ready(cluster3, 1, run_id, [2, 3])
        frozen = rank_pid(cluster3, 1, run_id, 3)
        running = rank_pid(cluster3, 0, run_id, 0)
        cluster3.exec(1, f"kill -STOP {frozen}")

        result = run_fab(config, "diagnose", "--run", run_id)
        assert result.returncode == 0, result.stdout + result.stderr
        diag_dir, summary = load_diagnose(tmp_path / "experiments", run_id)
        ranks = {r["rank"]: r for r in summary["ranks"]}
        assert sorted(ranks) == [0, 1, 2, 3]
        assert [ranks[r]["node_rank"] for r in range(4)] == [0, 0, 1, 1]
        for rank in ranks.values():
            assert rank["frames"][0] == FAKE_STEPPER_WAIT_FRAME, rank
        assert ranks[3]["state"] == "T"
        assert summary["first_stalled_ranks"] == [3]
        assert summary["node_errors"] == {}
        assert "behind the others: rank(s) 3" in result.stdout
        # Files per node: a dump per rank with the train package's frames, GPU state, log tail, env.
        for node, node_ranks in ((0, (0, 1)), (1, (2, 3))):
            node_dir = diag_dir / f"node_{node}"
            for rank in node_ranks:
                dump = next(node_dir.glob(f"pyspy_rank{rank:02d}_pid*.txt")).read_text()
                assert "train/fake_stepper.py" in dump
            assert (node_dir / "log_tail.txt").read_text().rstrip().endswith("step 40/100 | iter 1 ms")
            assert "TORCH_NCCL_BLOCKING_WAIT=1" in (node_dir / "nccl_env.txt").read_text()
            assert (node_dir / "gpu.txt").read_text().strip()
        assert (diag_dir / "node_2" / "report.json").is_file()  # a node without the run answers too
        # Diagnosing stops nothing.
        assert proc_state(cluster3, 1, frozen) == "T"
        assert proc_state(cluster3, 0, running) in ("S", "R")
    finally:
        stop_fake_run(cluster3, run_id)


@pytest.mark.docker
def test_diagnose_dumps_ranks_inside_containers(cluster_docker: SimCluster, tmp_path: Path):
    run_id = f"multinode_28ch_256th_dock_{uuid.uuid4().hex[:8]}"
    container = f"diag-{run_id[-8:]}"
    config = write_config(cluster_docker, tmp_path / f"dock{run_id[-8:]}.yaml",
                          enabled=True, container=container)
    registry = f"/tmp/gemm-runs-dock{run_id[-8:]}"
    volumes = " ".join(f"-v {v}" for v in cluster_docker.container_volumes)
    node_dir = f"/tmp/fake-{run_id}"
    try:
        for index in range(2):
            cluster_docker.exec(index, f"mkdir -p {node_dir} && docker run -d --name {container} "
                                f"--network host -v {node_dir}:{node_dir} {volumes} "
                                f"{cluster_docker.image} sleep infinity")
            fake_run_on_node(cluster_docker, index, run_id, registry, [2 * index, 2 * index + 1],
                             container=container)
        for index in range(2):
            wait_ready(cluster_docker, index, run_id, [2 * index, 2 * index + 1])
        frozen = rank_pid(cluster_docker, 1, run_id, 2)
        cluster_docker.exec(1, f"kill -STOP {frozen}")

        result = run_fab(config, "diagnose", "--run", run_id)
        assert result.returncode == 0, result.stdout + result.stderr
        diag_dir, summary = load_diagnose(tmp_path / "experiments", run_id)
        ranks = {r["rank"]: r for r in summary["ranks"]}
        assert sorted(ranks) == [0, 1, 2, 3], summary
        for rank in ranks.values():
            assert rank["frames"] and rank["frames"][0].startswith("wait_for_peers (train/"), rank
        assert ranks[2]["state"] == "T" and summary["first_stalled_ranks"] == [2]
        report = json.loads((diag_dir / "node_1" / "report.json").read_text())
        in_container = [p for p in report["processes"] if p["role"] == "rank"]
        # Seen from the node, with the container's own pid recorded for docker exec users.
        assert all(p["ns_pid"] != p["pid"] for p in in_container), in_container
    finally:
        stop_fake_run(cluster_docker, run_id)
        for index in range(2):
            cluster_docker.exec(index, f"docker rm -f {container} >/dev/null 2>&1; rm -rf {node_dir}",
                                check=False)


def test_diagnose_without_an_active_run_says_how_to_name_one(cluster3: SimCluster, tmp_path: Path):
    config = write_config(cluster3, tmp_path / "norun.yaml", enabled=False)
    result = run_fab(config, "diagnose")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--run RUN_ID" in result.stderr and "Traceback" not in result.stderr


# -- the watchdog on a real detached launch ------------------------------------------------------

def wait_for_steps(cluster: SimCluster, node: int, metrics_glob: str, steps: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = cluster.exec(node, f"cat {metrics_glob} 2>/dev/null | wc -l", check=False).stdout.strip()
        if out.isdigit() and int(out) >= steps:
            return
        time.sleep(1)
    raise AssertionError(f"{metrics_glob} on node {node}: fewer than {steps} steps after {timeout} s")


@pytest.mark.slow
def test_hang_monitor_and_diagnose_on_a_detached_launch(cluster3: SimCluster, tmp_path: Path):
    """`fab launch --detach` (real node launchers, registry, torchrun, gloo ranks) on 2 nodes; rank 3
    frozen with SIGSTOP. The launch's HangMonitor, over SSH, fires within the timeout plus a few
    seconds; its hang/ directory shows the train package's frames for the ranks still alive; `fab
    diagnose` finds the run by itself, stops nothing; `fab stop` then ends it on every node."""
    from fabric import Config
    from invoke import Context
    from rich.console import Console

    from tasks.run.hangwatch import HangMonitor
    from tasks.cluster.session import ClusterSession

    timeout_s = 15.0
    config = write_config(cluster3, tmp_path / "wd.yaml", enabled=False, platform="cpu")
    data = yaml.safe_load(config.read_text())
    data["cluster"]["hosts"] = data["cluster"]["hosts"][:2]
    config.write_text(yaml.safe_dump(data))
    started = run_fab(config, "launch", "--no-docker", "--nproc", "2", "--detach",
                      "--override", "training.max_steps=100000")
    assert started.returncode == 0, started.stdout + started.stderr
    run_dir = newest_run_dir(tmp_path / "experiments")
    run_id = run_dir.name
    record = json.loads((run_dir / "run.json").read_text())
    output_dir = posixpath.join(record["node_run_dir"], record["output_dir"])
    try:
        wait_for_steps(cluster3, 1, f"{output_dir}/rank_03_metrics.jsonl", 3, 240)
        with ClusterSession(Context(Config(overrides=data))) as session:
            monitor = HangMonitor(session, run_id, output_dir, timeout_s, world_size=4,
                                  started_at=time.monotonic(), poll_s=1.0)
            assert monitor.tick(session.nodes, time.monotonic()) is None
            cluster3.exec(1, f"kill -STOP {rank_pid(cluster3, 1, run_id, 3)}")
            frozen_at = time.monotonic()
            report = None
            while report is None and time.monotonic() < frozen_at + timeout_s + 30:
                report = monitor.tick(session.nodes, time.monotonic())
                time.sleep(0.2)
            detected_after = time.monotonic() - frozen_at
            assert report is not None, "no hang detected"
            assert detected_after <= timeout_s + 5, detected_after
            with open(tmp_path / "console.txt", "w") as console_file:
                hang = monitor.diagnose(report, run_dir, container=None,
                                        console=Console(file=console_file, width=200))
        diagnosed = run_fab(config, "diagnose")
        assert diagnosed.returncode == 0, diagnosed.stdout + diagnosed.stderr
        assert run_id in diagnosed.stdout and "state T (stopped)" in diagnosed.stdout
        assert proc_state(cluster3, 1, rank_pid(cluster3, 1, run_id, 3)) == "T"  # nothing stopped
    finally:
        stopped = run_fab(config, "stop", "--run", run_id, "--grace", "3")
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    for index in range(2):
        left = cluster3.exec(index, f"grep -lzx 'GEMM_RUN_ID={run_id}' /proc/[0-9]*/environ "
                             "2>/dev/null | wc -l", check=False).stdout.strip()
        assert left == "0", f"node {index}: {left} process(es) of the run left"

    assert hang["first_stalled_ranks"] == [3], hang
    summary = json.loads((run_dir / "hang" / "summary.json").read_text())
    ranks = {r["rank"]: r for r in summary["ranks"]}
    assert sorted(ranks) == [0, 1, 2, 3] and ranks[3]["state"] == "T"
    for rank in (0, 1, 2):
        assert "(train/" in (run_dir / "hang" / ranks[rank]["dump_file"]).read_text()
        assert ranks[rank]["train_frame"], ranks[rank]
    log_tail = (run_dir / "hang" / "node_1" / "log_tail.txt").read_text()
    assert re.search(r"^step \d+/100000 ", log_tail, re.M), log_tail
    console = (tmp_path / "console.txt").read_text()
    assert "stopped advancing first: rank(s) 3" in console, console


# -- end to end through `fab launch` ---------------------------------------------------------------

# Two of cluster3's nodes: 4 ranks already load this machine's 2 cores (and others' tests).
LAUNCH_NODES = 2


def launch_config(cluster: SimCluster, path: Path, platform: str = "cpu") -> Path:
    """Bare runs of 2 ranks per node on LAUNCH_NODES nodes. `platform` is what the launch believes
    the nodes are (a dry run contacts no host, so rocm/cuda command lines can be checked on CPU
    nodes)."""
    config = write_config(cluster, path, enabled=False, platform=platform)
    data = yaml.safe_load(config.read_text())
    data["cluster"]["hosts"] = data["cluster"]["hosts"][:LAUNCH_NODES]
    data.setdefault("launch", {})["nproc"] = 2
    config.write_text(yaml.safe_dump(data))
    return config


def newest_run_dir(experiments: Path) -> Path:
    runs = sorted(experiments.glob("multinode_*"), key=lambda p: p.stat().st_mtime)
    assert runs, f"no run directory under {experiments}"
    return runs[-1]


@pytest.mark.slow
def test_frozen_rank_is_detected_diagnosed_stopped_and_marked_hung(cluster3: SimCluster,
                                                                     tmp_path: Path):
    timeout_s = 20
    config = launch_config(cluster3, tmp_path / "hang.yaml")
    experiments = tmp_path / "experiments"
    # Output to a file: nothing reads while the test polls, and a full pipe would block fab.
    output_path = tmp_path / "launch-output.txt"
    with open(output_path, "w") as output_file:
        proc = subprocess.Popen(
            [FAB, "-f", str(config), "launch", "--no-docker", "--hang-timeout", str(timeout_s),
             "--override", "training.max_steps=100000", "--override", "training.log_interval=1"],
            cwd=REPO, stdin=subprocess.DEVNULL, stdout=output_file, stderr=subprocess.STDOUT,
            env=fab_env())
    try:
        deadline = time.monotonic() + 180
        run_dir = None
        while time.monotonic() < deadline:
            found = sorted(experiments.glob("multinode_*"))
            if found:
                run_dir = found[-1]
                steps = cluster3.exec(1, f"cat {REPO}/experiments/{run_dir.name}/*/rank_03_metrics.jsonl "
                                      "2>/dev/null | wc -l", check=False).stdout.strip()
                if steps.isdigit() and int(steps) >= 3:
                    break
            time.sleep(1)
        assert run_dir is not None, "the launch made no run directory"
        pid = rank_pid(cluster3, 1, run_dir.name, 3)
        cluster3.exec(1, f"kill -STOP {pid}")
        frozen_at = time.monotonic()
        proc.wait(timeout=timeout_s + 180)
        detected = time.monotonic() - frozen_at
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = output_path.read_text()
    assert proc.returncode != 0, output
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "hung", record.get("status")
    assert record["hang"]["first_stalled_ranks"] == [3], record["hang"]
    # Detected within the timeout plus a few seconds; diagnostics and the stop come on top.
    assert record["hang"]["stalled_for_s"] <= timeout_s + 10, record["hang"]
    assert detected <= timeout_s + 90, detected
    summary = json.loads((run_dir / "hang" / "summary.json").read_text())
    others = [r for r in summary["ranks"] if r["rank"] != 3]
    assert len(others) == 2 * LAUNCH_NODES - 1
    for rank in others:
        dump = (run_dir / "hang" / rank["dump_file"]).read_text()
        assert "(train/" in dump, rank
    assert re.search(r"rank 3 .*state T", output), output
    assert "stopped advancing first: rank(s) 3" in output, output
    # The user-facing summary also lands in the run's report.md.
    assert "Stopped advancing first: **rank 3**" in (run_dir / "report.md").read_text()
    for index in range(LAUNCH_NODES):
        left = cluster3.exec(index, f"grep -lzx 'GEMM_RUN_ID={run_dir.name}' /proc/[0-9]*/environ "
                             "2>/dev/null | wc -l", check=False).stdout.strip()
        assert left == "0", f"node {index} still runs {left} process(es) of the hung run"


@pytest.mark.parametrize("flag, platform, expected", [
    ("--rocprof", "rocm",
     "rocprofv3 --kernel-trace --output-format pftrace csv -d {out}/rocprof_traces/node_{n} --"),
    ("--stats", "rocm",
     "rocprofv3 --kernel-trace --stats --output-format pftrace csv -d {out}/rocprof_traces/node_{n} --"),
    ("--nsys", "cuda",
     "nsys profile --trace=cuda,nvtx,osrt --force-overwrite=true --output {out}/nsys/node_{n} torchrun"),
])
def test_profiler_wrappers_in_dry_run(cluster3: SimCluster, tmp_path: Path, flag: str,
                                      platform: str, expected: str):
    config = launch_config(cluster3, tmp_path / "dry.yaml", platform)
    result = run_fab(config, "launch", "--no-docker", flag, "--dry-run")
    text = result.stdout + result.stderr
    assert result.returncode == 0, text
    for n in range(LAUNCH_NODES):
        pattern = re.escape(expected.format(out="OUT", n=n)).replace("OUT", r"/\S+")
        assert re.search(pattern, text), f"node {n}: {expected}\n{text}"
    for index in range(len(cluster3.nodes)):  # a dry run touches no host
        assert cluster3.exec(index, "ls /tmp/gemm-runs-dry 2>/dev/null | wc -l").stdout.strip() == "0"


def test_missing_profiler_fails_before_any_start_naming_each_host(cluster3: SimCluster,
                                                                  tmp_path: Path):
    config = launch_config(cluster3, tmp_path / "noprof.yaml", "rocm")
    result = run_fab(config, "launch", "--no-docker", "--rocprof")
    assert result.returncode != 0, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "rocprofv3" in line]
    for node in cluster3.nodes[:LAUNCH_NODES]:
        assert any(node.address in line for line in lines), result.stderr
    assert "Traceback" not in result.stderr
    for index in range(len(cluster3.nodes)):
        assert cluster3.exec(index, "ls /tmp/gemm-runs-noprof 2>/dev/null | wc -l").stdout.strip() == "0"


@pytest.mark.slow
def test_torch_profile_yields_one_trace_per_rank(cluster3: SimCluster, tmp_path: Path):
    config = launch_config(cluster3, tmp_path / "torchprof.yaml")
    result = run_fab(config, "launch", "--no-docker", "--torch-profile",
                     "--override", "training.max_steps=6")
    assert result.returncode == 0, result.stdout + result.stderr
    run_dir = newest_run_dir(tmp_path / "experiments")
    traces = sorted(run_dir.glob("*/torch_profiler/rank_*_step_*.json"))
    world = 2 * LAUNCH_NODES
    assert sorted({t.name.split("_step_")[0] for t in traces}) == [f"rank_{r:02d}" for r in range(world)]
    for trace in traces:
        assert "traceEvents" in json.loads(trace.read_text())
