"""PyTorch's flight recorder dumped on request while a rank is held back (real gloo ranks).

Rank 1 sleeps before the backward pass of step 2 (debug.delay_rank); rank 0 meanwhile waits in
that step's gradient all-reduce. The trigger file the hang watchdog writes makes both ranks dump
their recorder, and the controller's reading of the dumps names rank 1 as the one out of step.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lib.diagnostics import flight_recorder_findings, read_flight_dumps
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "config" / "multi_node" / "cpu_tiny.yaml"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dump_on_request_names_the_rank_out_of_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "-m", "train", "--config", str(TINY), "--override", f"training.output_dir={out}",
            "training.max_steps=2", "training.warmup_steps=0", "calibration.interval_steps=0",
            "calibration.warmup_steps=0", "debug.delay_rank=1", "debug.delay_ms=8000",
            "debug.delay_every=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        metrics = out / "rank_00_metrics.jsonl"
        wait_until(lambda: metrics.exists() and metrics.read_text().count("\n") >= 1, 90,
                   "step 1 on rank 0")
        time.sleep(1.0)  # rank 1 is now asleep before step 2's backward
        (out / "flight_recorder").mkdir(exist_ok=True)
        (out / "flight_recorder" / "DUMP").touch()
        wait_until(lambda: all((out / "flight_recorder" / f"rank_{r:02d}.json").exists()
                               for r in (0, 1)), 10, "both ranks' dumps")
        dumps = read_flight_dumps(out)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert set(dumps) == {0, 1} and all("entries" in d for d in dumps.values())
    findings = flight_recorder_findings(dumps)
    default = findings["groups"]["0"]
    assert default["behind"] == [1], findings
    assert default["collective"].startswith("gloo:") and default["state"]["0"] != "completed"
    assert "rank(s) [1] never reached" in findings["summary"]


def test_findings_on_hand_made_dumps() -> None:
    entry = lambda seq, state: {"collective_seq_id": seq, "process_group": ["0", "default_pg"],  # noqa: E731
                                "profiling_name": "nccl:all_reduce", "state": state,
                                "input_sizes": [[1024]]}
    dumps = {0: {"entries": [entry(1, "completed"), entry(2, "started")]},
             1: {"entries": [entry(1, "completed")]},
             2: {"error": "RuntimeError: no flight recorder"}}
    findings = flight_recorder_findings(dumps)
    assert findings["groups"]["0"]["behind"] == [1] and findings["groups"]["0"]["seq"] == 2
    assert findings["errors"] == {"2": "RuntimeError: no flight recorder"}
    assert findings["summary"].startswith("group default_pg: rank(s) [1] never reached nccl:all_reduce #2")
    same = flight_recorder_findings({0: dumps[1], 1: dumps[1]})
    assert same["summary"] == "every rank reached the same last collective"
    assert json.dumps(findings)  # JSON-ready for run.json
