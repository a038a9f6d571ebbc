#!/usr/bin/env python3
"""A deliberately late rank on 2 gloo ranks (CPU): does the delay stay out of busbw?

Runs the configuration of tests/train/test_train_straggler.py (rank 1 sleeps --delay-ms before
the backward pass of every even measured step; the odd steps of the same run are the undelayed
reference) --runs times and prints, per run: the busbw ratio delayed / undelayed steps
(medians of the summary's per-step stream_busbw_gbps), the wait the delay added (rank 0's wait minus
rank 1's on each step's first gradient collective, from collectives.jsonl, delayed minus
undelayed medians), the median of the
per-step maximum wait on delayed steps, rank 0's own local_busbw ratio (waits counted as
communication), the slowest rank the summary names, and the load average.

Usage (from the repo root): python3 scripts/bench_straggler.py [--runs 3] [--delay-ms 30]
    [--steps 160] [--layers 4] [--tokens 16] [--override key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "config" / "multi_node" / "cpu_tiny.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def one_run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(tempfile.mkdtemp(prefix="straggler_")) / "out"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "train", "--config", str(TINY), "--override", f"training.output_dir={out}",
        f"training.max_steps={args.steps}", "training.log_interval=1000",
        f"model.layers={args.layers}", f"model.tokens={args.tokens}", "model.hidden=2048",
        "comm.bucket_mb=8", "comm.overlap=false", "calibration.interval_steps=16",
        "debug.delay_rank=1",
        f"debug.delay_ms={args.delay_ms}", "debug.delay_every=2", *args.override,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise SystemExit(f"run failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    per_step = summary["per_step"]
    delayed = [s for s in per_step if s["step"] % 2 == 0]
    undelayed = [s for s in per_step if s["step"] % 2]
    busbw = (statistics.median(s["stream_busbw_gbps"] for s in delayed)
             / statistics.median(s["stream_busbw_gbps"] for s in undelayed))
    # rank 0's wait minus rank 1's on each step's first gradient collective (the one the
    # delay lands on); signed, so centred on 0 without a delay
    first: dict[int, tuple[int, float]] = {}
    for op in lines(out / "collectives.jsonl"):
        if op["phase"] == "train" and op["op"] != "control":
            seen = first.get(op["step"])
            if seen is None or op["seq"] < seen[0]:
                first[op["step"]] = (op["seq"], op["wait_ms"][0] - op["wait_ms"][1])
    skew = {step: value for step, (_, value) in first.items()}
    added = (statistics.median(v for k, v in skew.items() if k % 2 == 0)
             - statistics.median(v for k, v in skew.items() if k % 2))
    records = lines(out / "rank_00_metrics.jsonl")
    local = (statistics.median(r["local_busbw_gbps"] for r in records if r["step"] % 2 == 0)
             / statistics.median(r["local_busbw_gbps"] for r in records if r["step"] % 2))
    return {
        "busbw_ratio": busbw,
        "added_wait_ms": added,
        "wait_ms_max_delayed": statistics.median(s["wait_ms_max"] for s in delayed),
        "local_busbw_ratio_rank0": local,
        "slowest_rank": summary["slowest_rank"]["rank"],
        "slowest_by": summary["slowest_rank"]["by"],
        "busbw_gbps_undelayed": statistics.median(s["stream_busbw_gbps"] for s in undelayed),
        "load_1min": load,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--delay-ms", type=float, default=30.0)
    p.add_argument("--steps", type=int, default=160)
    p.add_argument("--layers", type=int, default=4, help="2 buckets of 8 MiB per layer")
    p.add_argument("--tokens", type=int, default=16, help="rows of each GEMM: its compute")
    p.add_argument("--override", action="extend", nargs="+", default=[])
    args = p.parse_args()
    for i in range(args.runs):
        r = one_run(args)
        print(
            f"run {i + 1}: busbw delayed/undelayed {r['busbw_ratio']:.3f} "
            f"(undelayed {r['busbw_gbps_undelayed']:.3f} GB/s); wait added by the delay "
            f"{r['added_wait_ms']:.2f} ms for {args.delay_ms:g} ms injected; max wait per "
            f"delayed step {r['wait_ms_max_delayed']:.2f} ms; rank 0 local busbw ratio "
            f"{r['local_busbw_ratio_rank0']:.3f}; slowest rank {r['slowest_rank']} "
            f"(by {r['slowest_by']}); load {r['load_1min']:.2f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
