#!/usr/bin/env python3
"""Dead time between sweep points: in-process (rank pool) against a restart per point.

    python3 scripts/bench_sweep_points.py [--channels 4,8,16,32] [--config FILE]
                                          [--override key=value ...] [--out DIR] [--json FILE]

One rank (world size 1; gloo on CPU, NCCL on a GPU), no Fabric needed (runs on the device).

- restart: one `python -m train` process per channel value, the channels in the process's
  environment (NCCL_MIN/MAX_NCHANNELS and NCCL_MIN/MAX_CTAS, as a restart-per-point sweep
  exports them). Each point's start-up is itemised from its summary's `startup` section
  (interpreter, torch import, CUDA context, process group / NCCL init, model, warm-up +
  calibration); teardown = summary written → process gone.
- pool: one `python -m train` process with pool.channels=... (train.pool): per point the
  pool's own figures (gap, new_group, destroy) and the warm-up + calibration every point
  pays in both modes.

Dead time between points = the previous point's last measured step → the next point's first
measured step (both wall clocks of the same host): everything a sweep spends not measuring.
Printed as a table; --json writes every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHANNEL_VARS = ("NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "NCCL_MIN_CTAS", "NCCL_MAX_CTAS")


def steps_wall(out: Path) -> tuple[float, float] | None:
    """First measured step's start and last one's end on rank 0 (wall clock)."""
    path = out / "rank_00_metrics.jsonl"
    try:
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    if not lines:
        return None
    first = lines[0]
    return first["wall_time"] - (first.get("iter_ms") or 0.0) / 1e3, lines[-1]["wall_time"]


def train_argv(config: str, out: Path, overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "train", "--config", config, "--override",
            f"training.output_dir={out}", *overrides]


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CHANNEL_VARS}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def run_restart(config: str, channels: list[int], overrides: list[str], work: Path) -> dict:
    points = []
    previous_end = None
    for c in channels:
        out = work / f"restart_{c}"
        env = {**base_env(), **{name: str(c) for name in CHANNEL_VARS}}
        began = time.time()
        result = subprocess.run(train_argv(config, out, overrides), cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        gone = time.time()
        if result.returncode != 0:
            raise SystemExit(f"bench: restart point {c} failed (exit {result.returncode}): "
                             f"{result.stderr.strip().splitlines()[-1:]}")
        summary = json.loads((out / "summary.json").read_text())
        wall = steps_wall(out)
        finished = (out / "summary.json").stat().st_mtime
        point = {"channels": c, "spawn_to_exit_s": round(gone - began, 3),
                 "startup": summary.get("startup"),
                 "teardown_s": round(gone - finished, 3),
                 "effective_channels": (summary.get("effective_settings") or {}).get("channels"),
                 "flags": (summary.get("effective_settings") or {}).get("flags")}
        if wall and previous_end is not None:
            point["dead_before_s"] = round(wall[0] - previous_end, 3)
        previous_end = wall[1] if wall else None
        points.append(point)
    return {"points": points}


def run_pool(config: str, channels: list[int], overrides: list[str], work: Path) -> dict:
    out = work / "pool"
    argv = train_argv(config, out, [*overrides, f"pool.channels={','.join(map(str, channels))}"])
    began = time.time()
    result = subprocess.run(argv, cwd=ROOT, env=base_env(), capture_output=True, text=True,
                            timeout=600)
    gone = time.time()
    if result.returncode != 0:
        # Exit 1 also when a point is flagged (leak check): its figures are still reported.
        print(f"bench: pool exited {result.returncode}: "
              f"{[line for line in result.stderr.splitlines() if 'train:' in line][-3:]}")
    points = []
    previous_end = None
    dirs = sorted((p for p in out.iterdir() if p.is_dir() and p.name.endswith("channels")),
                  key=lambda p: channels.index(int(p.name.split("thread_")[1].removesuffix("channels"))))
    for directory in dirs:
        summary = json.loads((directory / "summary.json").read_text())
        pool = summary["pool"]
        wall = steps_wall(directory)
        point = {"channels": pool["channels_asked"], "gap_s": pool.get("gap_s"),
                 "new_group_s": pool.get("new_group_s"), "destroy_s": pool.get("destroy_s"),
                 "leak_free": pool.get("leak_free"),
                 "warmup_calibration_s": round(wall[0] - pool["started_unix"], 3) if wall else None,
                 "effective_channels": (summary.get("effective_settings") or {}).get("channels"),
                 "flags": (summary.get("effective_settings") or {}).get("flags")}
        if wall and previous_end is not None:
            point["dead_before_s"] = round(wall[0] - previous_end, 3)
        previous_end = wall[1] if wall else None
        points.append(point)
    return {"points": points, "process_s": round(gone - began, 3),
            "default_group_init_s": pool.get("default_group_init_s")}


def run_sweep(config: str, channels: list[int], threads: list[int], overrides: list[str],
              work: Path) -> list[dict]:
    """A channels x threads sweep as `fab sweep --pool` runs it, without Fabric: one pool per
    thread value (threads-major; NCCL_NTHREADS and RCCL_THREADS_PER_BLOCK exported, as the
    launch does), the points' effective settings read back from NCCL. Writes sweep.json so
    `fab report <work>/sweep` reads it on any machine."""
    sweep = work / "sweep"
    sweep.mkdir(parents=True, exist_ok=True)
    entries, rows = [], []
    for t in threads:
        run_id = f"multinode_{channels[0]}ch_{t}th_bench"
        launch_dir = sweep.parent / run_id / f"{t}thread_{channels[0]}channels"
        env = {**base_env(), "NCCL_NTHREADS": str(t), "RCCL_THREADS_PER_BLOCK": str(t)}
        argv = train_argv(config, launch_dir, [*overrides, f"pool.channels={','.join(map(str, channels))}",
                                               "pool.layout=children", f"pool.threads={t}"])
        result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        for c in channels:
            name = f"{t}thread_{channels[0]}channels/{t}thread_{c}channels"
            try:
                summary = json.loads((sweep.parent / run_id / name / "summary.json").read_text())
            except (OSError, ValueError):
                summary = {"status": "missing", "error": result.stderr.strip().splitlines()[-1:]}
            eff = summary.get("effective_settings") or {}
            entries.append({"index": len(entries), "channels": c, "threads": t,
                            "status": summary.get("status"), "run_id": run_id,
                            "run_dir": f"../{run_id}", "output_dir": name})
            rows.append({"channels": c, "threads": t, "status": summary.get("status"),
                         "effective_channels": eff.get("channels"), "min_ctas": eff.get("min_ctas"),
                         "max_ctas": eff.get("max_ctas"), "threads_read": (eff.get("env_read") or {}).get("NCCL_NTHREADS"),
                         "flags": eff.get("flags") or [], "leak_free": (summary.get("pool") or {}).get("leak_free")})
    (sweep / "sweep.json").write_text(json.dumps({
        "schema": 1, "sweep_id": "sweep", "pool": True, "points": entries,
        "grid": {"channels": channels, "threads": threads}}, indent=2))
    return rows


def median(values: list[float | None]) -> float | None:
    seen = [v for v in values if v is not None]
    return round(statistics.median(seen), 3) if seen else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", default="4,8,16,32")
    parser.add_argument("--config", default=str(ROOT / "config" / "multi_node" / "cpu_tiny.yaml"))
    parser.add_argument("--override", action="append", default=[])
    parser.add_argument("--out", default=None, help="keep the run directories here")
    parser.add_argument("--json", default=None, help="write every figure to this file")
    parser.add_argument("--sweep-threads", default="",
                        help="also run a --channels x these threads pool sweep (e.g. 256,512) "
                             "and print each point's effective settings (needs --out)")
    parser.add_argument("--sweep-channels", default="",
                        help="the sweep's channel values (default: --channels)")
    args = parser.parse_args()
    try:
        channels = [int(c) for c in args.channels.split(",") if c.strip()]
    except ValueError:
        print(f"bench: --channels {args.channels!r} is not a comma-separated list of integers",
              file=sys.stderr)
        return 2
    if len(channels) < 2:
        print("bench: give at least two --channels values (dead time is between points)",
              file=sys.stderr)
        return 2
    overrides = ["training.max_steps=10", "training.log_interval=1000", *args.override]
    with tempfile.TemporaryDirectory(prefix="bench_points_") as tmp:
        work = Path(args.out) if args.out else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        restart = run_restart(args.config, channels, overrides, work)
        pool = run_pool(args.config, channels, overrides, work)
        sweep_rows = []
        if args.sweep_threads:
            sweep_channels = [int(c) for c in (args.sweep_channels or args.channels).split(",")]
            sweep_rows = run_sweep(args.config, sweep_channels,
                                   [int(t) for t in args.sweep_threads.split(",")], overrides, work)
    results = {"channels": channels, "config": args.config, "overrides": overrides,
               "restart": restart, "pool": pool}
    rp, pp = restart["points"], pool["points"]
    startup_keys = ("interpreter_s", "import_torch_s", "cuda_context_s", "process_group_init_s",
                    "model_s", "warmup_calibration_s")
    print(f"channels {channels}; config {args.config}; overrides {overrides}")
    print(f"restart per point: dead time between points median "
          f"{median([p.get('dead_before_s') for p in rp])} s (n={len(rp) - 1})")
    for key in startup_keys:
        print(f"  start-up {key:24s} median {median([(p['startup'] or {}).get(key) for p in rp])} s")
    print(f"  teardown (summary → exit)        median {median([p['teardown_s'] for p in rp])} s")
    print(f"pool (in process): dead time between points median "
          f"{median([p.get('dead_before_s') for p in pp])} s (n={len(pp) - 1})")
    for key in ("gap_s", "new_group_s", "destroy_s", "warmup_calibration_s"):
        print(f"  {key:32s} median {median([p.get(key) for p in pp])} s")
    print(f"  default group init (once)        {pool['default_group_init_s']} s; leak-free "
          f"{all(p['leak_free'] for p in pp)}")
    print("effective channels: restart " + str([p["effective_channels"] for p in rp])
          + ", pool " + str([p["effective_channels"] for p in pp]))
    for mode, points in (("restart", rp), ("pool", pp)):
        for p in points:
            for flag in p.get("flags") or []:
                print(f"  FLAG {mode} {p['channels']}ch: {flag}")
    if sweep_rows:
        print("pool sweep (threads-major): point | status | NCCL built | min/max CTAs | "
              "NCCL_NTHREADS read | leak-free | flags")
        for r in sweep_rows:
            print(f"  {r['channels']}ch x {r['threads']}th | {r['status']} | {r['effective_channels']} | "
                  f"{r['min_ctas']}/{r['max_ctas']} | {r['threads_read']} | {r['leak_free']} | "
                  + ("; ".join(r["flags"]) or "as asked"))
        results["sweep"] = sweep_rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
