"""The rank pool (train.pool) on real gloo ranks: several sweep points in one process.

Points run back to back in the same rank processes (their pids are recorded per point), each
on a new group with its own output directory and summary; a point that fails (a real
allocation failure, on every rank) leaves the next point intact; nothing leaks (process-group
count back to the baseline after every point).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "config" / "multi_node" / "cpu_tiny.yaml"
# 4 TB of parameters: the allocation fails at once, on every rank.
FAILING = "8:model.hidden=1000000;8:comm.bucket_mb=1000000"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_pool(out: Path, *overrides: str, nproc: int = 2,
             extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           **(extra_env or {})}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "train", "--config", str(TINY), "--override", f"training.output_dir={out}",
            "training.max_steps=4", "calibration.interval_steps=0", *overrides]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def summary(path: Path) -> dict:
    return json.loads((path / "summary.json").read_text())


def test_points_share_processes_and_survive_a_failed_point(tmp_path: Path) -> None:
    out = tmp_path / "pool"
    result = run_pool(out, "pool.channels=4,8,16", f"pool.point_overrides={FAILING}",
                      extra_env={"NCCL_NTHREADS": "256", "NCCL_MAX_NCHANNELS": "42",
                                 "NCCL_MIN_CTAS": "42"})
    # A failed point makes the pool's exit status 1, after every point ran.
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    dirs = {c: out / f"256thread_{c}channels" for c in (4, 8, 16)}
    first, failed, last = (summary(dirs[c]) for c in (4, 8, 16))
    assert first["status"] == last["status"] == "completed"
    assert failed["status"] == "failed" and "allocate" in failed["error"]
    for c in (4, 16):
        for rank in (0, 1):
            lines = (dirs[c] / f"rank_{rank:02d}_metrics.jsonl").read_text().splitlines()
            assert len(lines) == 4
    assert not list(dirs[8].glob("rank_*_metrics.jsonl")) or all(
        not p.read_text().strip() for p in dirs[8].glob("rank_*_metrics.jsonl"))
    pools = [s["pool"] for s in (first, failed, last)]
    assert [p["index"] for p in pools] == [0, 1, 2]
    assert [p["channels_asked"] for p in pools] == [4, 8, 16]
    # One pair of processes ran all three points.
    assert len({tuple(p["rank_pids"]) for p in pools}) == 1
    assert all(p["leak_free"] for p in pools), [p["leak"] for p in pools]
    assert all(p["leak"]["0"]["process_groups"] == 0 for p in pools)
    assert pools[1]["rank_statuses"] == ["failed", "failed"]
    assert pools[0]["gap_s"] is None and pools[2]["gap_s"] is not None
    # The channel variables would cap every point's communicator: taken out, and said so.
    assert pools[0]["removed_env"] == {"NCCL_MAX_NCHANNELS": "42", "NCCL_MIN_CTAS": "42"}
    assert "NCCL_MAX_NCHANNELS" not in first["env"] and first["env"]["NCCL_NTHREADS"] == "256"
    assert "channels are a no-op" in pools[0]["note"]
    assert first["effective_settings"]["capture"].startswith("off: gloo backend")
    assert "pool point 3/3 (16 channels): completed" in result.stdout


def test_sibling_layout_and_world_size_one(tmp_path: Path) -> None:
    """layout=siblings: the launch's <T>thread_<C>channels directories next to the first."""
    out = tmp_path / "run" / "0thread_2channels"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("NCCL_NTHREADS", None)
    result = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(TINY), "--override",
         f"training.output_dir={out}", "training.max_steps=3", "pool.channels=2,6",
         "pool.layout=siblings"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert summary(out)["pool"]["channels_asked"] == 2
    assert summary(tmp_path / "run" / "0thread_6channels")["status"] == "completed"


@pytest.mark.parametrize(("override", "message"), [
    ("pool.channels=4,x", "pool.channels '4,x': 'x' is not a positive integer"),
    ("pool.point_overrides=9:model.layers=2", "9 is not one of pool.channels"),
])
def test_bad_pool_config_exits_2_in_one_line(tmp_path: Path, override: str, message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(TINY), "--override",
         f"training.output_dir={tmp_path}", "pool.channels=4", override],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=60)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_used_point_directory_is_refused_before_start(tmp_path: Path) -> None:
    used = tmp_path / "0thread_8channels"
    used.mkdir(parents=True)
    (used / "summary.json").write_text("{}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("NCCL_NTHREADS", None)
    result = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(TINY), "--override",
         f"training.output_dir={tmp_path}", "pool.channels=4,8"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "0thread_8channels already holds an earlier run's results" in result.stderr
    assert not (tmp_path / "0thread_4channels").exists()


def test_leak_check_sees_a_group_left_behind(tmp_path: Path) -> None:
    """The leak check's process-group count is real: a group not destroyed shows as +1."""
    code = (
        "import os, torch.distributed as dist\n"
        "from train.runtime import RuntimePlan\n"
        "from train.pool import resources, new_point_group\n"
        "import torch\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=os.environ['PORT'])\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "plan = RuntimePlan('gloo', torch.device('cpu'), torch.float32, 0, 1, 0, 1)\n"
        "base = resources(plan)['process_groups']\n"
        "g = new_point_group(plan, 4, 30.0, True)\n"
        "leaked = resources(plan)['process_groups'] - base\n"
        "dist.destroy_process_group(g)\n"
        "back = resources(plan)['process_groups'] - base\n"
        "print(leaked, back)\n"
        "dist.destroy_process_group()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PORT": str(free_port())},
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1", "0"]
