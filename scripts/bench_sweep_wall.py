#!/usr/bin/env python3
"""A sweep's wall time against its work, itemised (issue 24: wall ≤ 1.3 × work).

    python3 scripts/bench_sweep_wall.py [--checkout DIR ...] [--repeat 3]
                                        [--sweep-args "-c 4,32 -t 256,512"] [--json FILE]

Runs `fab sweep` on the embedded default (this machine alone, no SSH; GPU if present, else
CPU) from each checkout in turn, `--repeat` times, interleaved (A B A B ...: drift hits both),
and prints per checkout the medians of: the command's wall time, the sweep's own wall time of
its points, the work (one start-up per launch + each point's warm-up, calibration and measured
steps: sweep.json's wall_account), their ratio, launch start-up and teardown with its parts
(sweep.json's dead_time). A checkout whose sweep.json predates a figure shows "-".

Every checkout runs with this checkout's .venv (`fab` from it), in the checkout's directory
(its fabfile, tasks and train); outputs go to a temporary experiments directory each run.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAB = ROOT / ".venv" / "bin" / "fab"
TEARDOWN_PARTS = ("train_end_s", "exit_s", "collect_s", "finish_s", "report_s")


def one_sweep(checkout: Path, sweep_args: list[str]) -> dict[str, float | None]:
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        config = Path(tmp) / "fabric.yaml"
        config.write_text(f"cluster:\n  experiments_dir: {tmp}/experiments\n")
        started = time.monotonic()
        result = subprocess.run([str(FAB), "-f", str(config), "sweep", *sweep_args], cwd=checkout,
                                capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - started
        if result.returncode != 0:
            sys.exit(f"{checkout}: fab sweep exited {result.returncode}:\n{result.stdout[-3000:]}"
                     f"{result.stderr[-3000:]}")
        [sweep_json] = Path(tmp, "experiments").glob("sweep_*/sweep.json")
        document = json.loads(sweep_json.read_text())
    dead = document.get("dead_time") or {}
    account = document.get("wall_account") or {}
    figures: dict[str, float | None] = {
        "command_s": wall, "points_wall_s": account.get("wall_s"), "work_s": account.get("work_s"),
        "ratio": account.get("ratio"),
        "startup_s": (dead.get("startup_s") or {}).get("median"),
        "teardown_s": (dead.get("teardown_s") or {}).get("median")}
    for part in TEARDOWN_PARTS:
        figures[part] = (dead.get(f"teardown.{part}") or {}).get("median")
    return figures


def median(values: list[float | None]) -> float | None:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(numbers) if numbers else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", type=Path,
                        help="a checkout to time (repeatable; default: this one)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sweep-args", default="-c 4,32 -t 256,512")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    checkouts = [c.resolve() for c in (args.checkout or [ROOT])]
    sweep_args = shlex.split(args.sweep_args)
    runs: dict[str, list[dict[str, float | None]]] = {str(c): [] for c in checkouts}
    for round_index in range(args.repeat):
        for checkout in checkouts:
            figures = one_sweep(checkout, sweep_args)
            runs[str(checkout)].append(figures)
            print(f"round {round_index + 1} {checkout}: command {figures['command_s']:.2f} s",
                  flush=True)
    keys = list(next(iter(runs.values()))[0])
    print(f"\nfab sweep {args.sweep_args}, median of {args.repeat} (seconds; ratio = points' "
          f"wall / work), {os.cpu_count()} cores")
    print(f"{'figure':<14}" + "".join(f"{Path(c).name[:22]:>24}" for c in runs))
    for key in keys:
        cells = []
        for figures in runs.values():
            value = median([f[key] for f in figures])
            cells.append(f"{'-' if value is None else f'{value:.3f}':>24}")
        print(f"{key:<14}" + "".join(cells))
    if args.json:
        args.json.write_text(json.dumps(runs, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
