"""A real 2-rank gloo run with a secret in its environment: summary.json names the variable, holds
"***" for its value, and no output file holds the value (a few seconds on 2 cores)."""

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
SECRET = "hf_live_S3CRET_value"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_summary_holds_no_value_the_launch_masked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # What the launch's env.sh exports (tasks/lib/render.py): the value, and its name in both lists.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "HF_TOKEN": SECRET, "NCCL_DEBUG": "WARN",
           "GEMM_ENV_VARS": "HF_TOKEN NCCL_DEBUG", "GEMM_MASKED_VARS": "HF_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
         "-m", "train", "--config", str(TINY), "--override", f"training.output_dir={out}",
         "--override", "training.max_steps=2", "--override", "calibration.compute_steps=1",
         "--override", "calibration.comm_steps=1"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["env"]["HF_TOKEN"] == "***" and summary["env"]["NCCL_DEBUG"] == "WARN"
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in proc.stdout + proc.stderr
