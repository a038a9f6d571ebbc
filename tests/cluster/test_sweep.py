"""`fab sweep` and `fab report` end to end on 2 nodes of the simulated cluster (tiny CPU model).

Bare runs (no Docker), the nodes' workdir is this checkout (the sim nodes see /work/main), the
controller's experiments in tmp_path. Node-side run directories under /work/main/experiments and
registry entries are removed afterwards.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tasks.lib.quoting import sh_quote
from tasks.lib.registry import SCAN_KILL_SH
from tasks.lib.sweep import Leftovers, parse_leftovers, parse_pids, run_processes_command
from tests.simcluster import SimCluster
from tests.simcluster.image import container_volumes

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).parent / "fab")
STEPS = "training.max_steps=4"
FIGURES = ("heatmap_iter_ms.png", "heatmap_contention_slowdown.png", "busbw_vs_channels.png",
           "per_rank_step_time.png")


@pytest.fixture
def sweep_env(cluster3: SimCluster, tmp_path: Path):
    """A runtime config for the first 2 nodes; cleans node-side run dirs and the registry after."""
    registry = f"/tmp/gemm-runs-sweep-{uuid.uuid4().hex[:8]}"
    config = yaml.safe_load(cluster3.write_fabric_config().read_text())
    config["cluster"].update(hosts=cluster3.hosts[:2], workdir=str(REPO), registry_dir=registry,
                             experiments_dir=str(tmp_path / "experiments"))
    config.setdefault("docker", {})["enabled"] = False
    path = tmp_path / "runtime.yaml"
    path.write_text(yaml.safe_dump(config))
    experiments = tmp_path / "experiments"
    yield path, experiments
    for run_dir in experiments.glob("multinode_*"):
        shutil.rmtree(REPO / "experiments" / run_dir.name, ignore_errors=True)
    for index in (0, 1):
        cluster3.exec(index, f"rm -rf {registry}", check=False)


def fab(config: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FAB, "-f", str(config), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})


def only_sweep(experiments: Path) -> Path:
    sweeps = list(experiments.glob("sweep_*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def run_dirs(experiments: Path) -> set[str]:
    return {p.name for p in experiments.glob("multinode_*")}


def leftover_pids(cluster: SimCluster, run_id: str) -> dict[int, list[int]]:
    found = {}
    for index in (0, 1):
        pids = parse_pids(cluster.exec(index, run_processes_command(run_id)).stdout)
        if pids:
            found[index] = pids
    return found


def test_sweep_2x2_with_one_failing_point(cluster3: SimCluster, sweep_env) -> None:
    config, experiments = sweep_env
    started = time.monotonic()
    # distributed.backend=nccl passes the controller's config check but fails on CPU nodes: a
    # point that really fails at run time, on the nodes.
    result = fab(config, "sweep", "--no-pool", "--channels", "28,42", "--threads", "256,512",
                 "--override", STEPS, "--point-override", "42x512:distributed.backend=nccl")
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "1 of 4 point(s) did not complete (42x512 failed)" in result.stderr

    sweep_dir = only_sweep(experiments)
    document = json.loads((sweep_dir / "sweep.json").read_text())
    assert [p["status"] for p in document["points"]] == ["completed", "completed", "completed", "failed"]
    assert document["status"] == "partial"
    assert len(run_dirs(experiments)) == 4
    for point in document["points"]:
        assert (sweep_dir / point["run_dir"]).resolve().is_dir()
        assert leftover_pids(cluster3, point["run_id"]) == {}
        assert point["cleanup_wait_s"] is not None and point["cleanup_wait_s"] < 5
    # Back to back: the sweep's own gap between points is a status round trip, not a sleep.
    gaps = [p["gap_before_s"] for p in document["points"][1:]]
    assert all(gap is not None and gap < 2.0 for gap in gaps), gaps
    assert document["dead_time"]["idle_s"]["n"] >= 2

    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["channels"], r["threads"], r["status"]) for r in rows] == [
        ("28", "256", "completed"), ("28", "512", "completed"), ("42", "256", "completed"),
        ("42", "512", "failed")]
    assert all(r["nodes"] == "2" and r["world_size"] == "4" and r["steps"] == "4" for r in rows[:3])
    assert all(float(r["iter_ms_median"]) > 0 and float(r["busbw_gbps_median"]) > 0 for r in rows[:3])
    leader = min(rows[:3], key=lambda r: float(r["iter_ms_median"]))
    report = (sweep_dir / "report.md").read_text()
    # One run per point: a leader, but no best point without the run-to-run noise.
    assert "**No decision**: one run per point" in report
    assert f"Leader by median: {leader['channels']}ch × {leader['threads']}th" in report
    assert "42ch × 512th" in report.split("## Problems")[1]
    for name in FIGURES:
        assert (sweep_dir / name).read_bytes()[:4] == b"\x89PNG", name
    print(f"2x2 sweep on 2 nodes: {elapsed:.1f} s; dead time {document['dead_time']}")

    # A grid flag that contradicts the resumed sweep is refused before anything runs.
    refused = fab(config, "sweep", "--resume", str(sweep_dir), "--threads", "256")
    assert refused.returncode == 2 and "differs from the resumed sweep's 256,512" in refused.stderr


def test_interrupted_sweep_resumes_then_a_finished_sweep_runs_nothing(cluster3: SimCluster, sweep_env) -> None:
    config, experiments = sweep_env
    # Long enough that Ctrl-C lands while point 2 runs; short enough for the resumed run.
    process = subprocess.Popen(
        [FAB, "-f", str(config), "sweep", "--no-pool", "-c", "28", "-t", "256,512",
         "--override", "training.max_steps=100", "--override", "training.log_interval=10"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "COLUMNS": "200"})
    lines: list[str] = []
    second_point = False
    try:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            second_point = second_point or line.startswith("sweep: point 2/2")
            if second_point and line.startswith("[node ") and " step " in line:
                os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
                break
        lines += process.stdout.readlines()
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    output = "".join(lines)
    assert code == 130, output[-4000:]
    assert "fab sweep --resume" in output

    sweep_dir = only_sweep(experiments)
    document = json.loads((sweep_dir / "sweep.json").read_text())
    assert document["status"] == "interrupted"
    assert [p["status"] for p in document["points"]] == ["completed", "interrupted"]
    interrupted_run = document["points"][1]["run_id"]
    assert interrupted_run and leftover_pids(cluster3, interrupted_run) == {}
    assert len(run_dirs(experiments)) == 2

    # Resume skips the completed point and runs the interrupted one again.
    resumed = fab(config, "sweep", "--resume", str(sweep_dir))
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert "(2 points, 1 to run)" in resumed.stdout
    document = json.loads((sweep_dir / "sweep.json").read_text())
    assert document["status"] == "completed"
    assert [(p["status"], p["attempts"]) for p in document["points"]] == [("completed", 1), ("completed", 2)]
    assert len(document["sessions"]) == 2 and document["sessions"][1]["ran"] == [1]
    assert len(run_dirs(experiments)) == 3

    # On a finished sweep, --resume starts no run.
    again = fab(config, "sweep", "--resume", str(sweep_dir))
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "every point has completed; nothing to run" in again.stdout
    assert len(run_dirs(experiments)) == 3
    with (sweep_dir / "results.csv").open() as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["completed", "completed"]


def test_hung_point_is_stopped_and_fail_fast_ends_the_sweep(cluster3: SimCluster, sweep_env) -> None:
    config, experiments = sweep_env
    result = fab(config, "sweep", "--no-pool", "-c", "28", "-t", "256,512", "--override", STEPS,
                 "--point-override", "28x256:training.max_steps=1000000", "--point-timeout", "25",
                 "--fail-fast")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "--fail-fast: point 1 hung" in result.stderr and "fab sweep --resume" in result.stderr

    sweep_dir = only_sweep(experiments)
    document = json.loads((sweep_dir / "sweep.json").read_text())
    assert document["status"] == "aborted"
    assert [p["status"] for p in document["points"]] == ["hung", "pending"]
    assert document["points"][0]["error"] == "exceeded --point-timeout 25 s"
    assert leftover_pids(cluster3, document["points"][0]["run_id"]) == {}
    assert len(run_dirs(experiments)) == 1
    with (sweep_dir / "results.csv").open() as handle:
        assert [r["status"] for r in csv.DictReader(handle)] == ["hung", "not_run"]


@pytest.mark.docker
def test_leftover_check_counts_processes_inside_the_container(cluster_docker: SimCluster) -> None:
    """A --docker point's leftovers: a root process inside the container, carrying the run's
    markers, that a non-root SSH user cannot see through /proc/PID/environ on the host."""
    suffix = uuid.uuid4().hex[:8]
    container, run_id = f"sweepscan-{suffix}", f"multinode_28ch_256th_scan{suffix}"
    # The image has no toolchain of its own: the host's comes in read-only, as for docker-up.
    volumes = " ".join(f"-v {sh_quote(volume)}" for volume in container_volumes())
    cluster_docker.exec(0, f"docker run -d --network none {volumes} --name {container} "
                        f"{cluster_docker.image} sleep 600 >/dev/null")
    try:
        cluster_docker.exec(0, f"docker exec -d -e GEMM_RUN_ID={run_id} -e GEMM_NODE_RANK=0 {container} "
                            "sleep 600")
        time.sleep(0.5)
        # What the old host-only scan saw as a user other than the container's (root).
        as_nobody = cluster_docker.exec(0, "setpriv --reuid=65534 --regid=65534 --clear-groups "
                                        f"bash -c {sh_quote(run_processes_command(run_id))}").stdout
        assert parse_leftovers(as_nobody) == Leftovers()

        def check(run: str, rank: int) -> Leftovers:
            return parse_leftovers(cluster_docker.exec(0, run_processes_command(run, container, rank)).stdout)

        assert check(run_id, 0).in_container == 1
        assert check(run_id, 1).in_container == 0            # node 1's processes are not node 0's
        assert not check(run_id + "_1", 0)                    # nor another run's
        cluster_docker.exec(0, f"docker exec {container} sh -c {sh_quote(SCAN_KILL_SH)} gemm-kill TERM "
                            f"{run_id} 0")
        deadline = time.monotonic() + 10
        while check(run_id, 0) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not check(run_id, 0)
    finally:
        cluster_docker.exec(0, f"docker rm -f {container} >/dev/null 2>&1", check=False)


def test_pool_sweep_keeps_ranks_between_points(cluster3: SimCluster, sweep_env) -> None:
    """Rank pools, the default: one launch per thread value on 2 nodes, every channel value in
    the same rank processes (pids recorded per point), a failing point recorded while the next
    one runs; resumed, the sweep stays pooled and runs only the failed point."""
    config, experiments = sweep_env
    result = fab(config, "sweep", "--channels", "4,8,16", "--threads", "256,512",
                 "--override", STEPS, "--point-override", "8x512:model.hidden=1000000",
                 "--point-override", "8x512:comm.bucket_mb=1000000")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-4000:]
    assert "1 of 6 point(s) did not complete (8x512 failed)" in result.stderr
    sweep_dir = only_sweep(experiments)
    document = json.loads((sweep_dir / "sweep.json").read_text())
    assert document["pool"] is True
    by_point = {(p["channels"], p["threads"]): p for p in document["points"]}
    assert by_point[(8, 512)]["status"] == "failed"
    assert all(p["status"] == "completed" for k, p in by_point.items() if k != (8, 512))
    # One launch (run directory) per thread value.
    assert len(run_dirs(experiments)) == 2
    for threads in (256, 512):
        pool = [by_point[(c, threads)] for c in (4, 8, 16)]
        assert len({p["run_id"] for p in pool}) == 1
        pids = set()
        for point in pool:
            out = (sweep_dir / point["run_dir"] / point["output_dir"]).resolve()
            if point["status"] == "completed":
                summary = json.loads((out / "summary.json").read_text())
                assert summary["world_size"] == 4 and summary["pool"]["leak_free"] is True
                pids.add(tuple(summary["pool"]["rank_pids"]))
        assert len(pids) == 1  # the same 4 processes (2 per node) ran every point
        assert all(p["gap_before_s"] is not None for p in pool[1:])
    with (sweep_dir / "results.csv").open() as handle:
        rows = {(r["channels"], r["threads"]): r for r in csv.DictReader(handle)}
    assert rows[("16", "512")]["status"] == "completed" and rows[("16", "512")]["steps"] == "4"
    assert rows[("8", "512")]["status"] == "failed"
    assert "sweep: rank pools: channels change inside a launch (per communicator); a new launch for " \
           "each value of threads" in result.stdout

    resumed = fab(config, "sweep", "--resume", str(sweep_dir))
    assert resumed.returncode == 1, (resumed.stdout + resumed.stderr)[-3000:]
    assert "(6 points, 1 to run)" in resumed.stdout
    assert "sweep: rank pools: channels change inside a launch" in resumed.stdout
    assert len(run_dirs(experiments)) == 3  # one launch: a pool of the one pending point
    document = json.loads((sweep_dir / "sweep.json").read_text())
    again = {(p["channels"], p["threads"]): p for p in document["points"]}[(8, 512)]
    assert (again["status"], again["attempts"]) == ("failed", 2)
