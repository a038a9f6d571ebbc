#!/usr/bin/env python3
"""A stand-in for torchrun in tests of the node launcher and stop (standard library only).

Like torchrun it starts its workers in sessions of their own (torch's subprocess handler uses
start_new_session=True), so a process-group kill of torchrun does not reach them, and forwards
SIGTERM to them once. Each worker writes rank_XX_metrics.jsonl lines with a "step" and, for local
rank 0, prints "step N/M" lines; on SIGTERM it finishes its step and exits 143.

    fake_torchrun.py --node-rank=N [--nproc K] [--steps S] [--interval SEC] [--output-dir DIR]
                     [--ignore-term]
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--node-rank", type=int, required=True)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=100000)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--output-dir", default=".")
    parser.add_argument("--ignore-term", action="store_true", help="workers ignore SIGTERM")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> int:
    stop = {"requested": False}
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))
    rank = args.node_rank * args.nproc + args.worker
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, f"rank_{rank:02d}_metrics.jsonl")
    with open(path, "a") as metrics:
        for step in range(1, args.steps + 1):
            time.sleep(args.interval)
            metrics.write(json.dumps({"rank": rank, "step": step}) + "\n")
            metrics.flush()
            if args.worker == 0:
                print(f"step {step}/{args.steps} | rank {rank}", flush=True)
            if stop["requested"]:
                print(f"rank {rank}: stopping after step {step}", flush=True)
                return 143
    return 0


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.worker is not None:
        return worker(args)
    print(f"fake torchrun: node {args.node_rank}, env FAKE_ENV={os.environ.get('FAKE_ENV')!r}",
          flush=True)
    workers = [
        subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, f"--worker={i}"],
                         start_new_session=True)
        for i in range(args.nproc)
    ]

    def forward(signum: int, _frame: object) -> None:
        for proc in workers:
            try:
                os.killpg(proc.pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    codes = [proc.wait() for proc in workers]
    return max(codes, key=abs) if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
