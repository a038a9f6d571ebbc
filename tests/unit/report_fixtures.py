"""Crafted run and sweep directories in the layout launch and train write (for report/sweep tests)."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from tasks.lib.runspec import nccl_env

STEP_KEYS = ("iter_ms", "compute_ms", "comm_ms", "overlap_ms", "exposed_comm_ms", "exposed_comm_fraction",
             "gemm_tflops", "comm_bytes", "local_algbw_gbps", "local_busbw_gbps", "contention_slowdown",
             "gemm_contention_slowdown", "control_ms")
WORLD_SIZE_ONE = "world size 1: no data crosses ranks, so there is no bandwidth to report"


def step_line(rank: int, world_size: int, step: int, iter_ms: float, *, busbw: float = 10.0,
              contention: float = 0.05, tflops: float = 1.5) -> dict[str, Any]:
    compute = iter_ms * 0.8
    comm = iter_ms * 0.4
    overlap = comm * 0.75
    return {
        "rank": rank, "world_size": world_size, "step": step, "wall_time": 1_700_000_000.0 + step,
        "iter_ms": iter_ms, "compute_ms": compute, "comm_ms": comm, "overlap_ms": overlap,
        "exposed_comm_ms": comm - overlap, "exposed_comm_fraction": (comm - overlap) / iter_ms,
        "overlap_fraction": 0.75, "gemm_tflops": tflops, "comm_bytes": 1 << 20,
        "local_algbw_gbps": None if world_size == 1 else busbw / 1.5,
        "local_busbw_gbps": None if world_size == 1 else busbw,
        "contention_slowdown": contention, "gemm_contention_slowdown": contention * 2,
        "overlapped_gemm_fraction": 0.5, "control_ms": 0.05, "reduce_local_ms": None,
        "sm_clock_mhz": None, "power_w": None, "temperature_c": None, "calibration_block": 0,
    }


def distribution(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        pos = (len(ordered) - 1) * p / 100
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"median": q(50), "p10": q(10), "p90": q(90), "p95": q(95), "mean": sum(values) / len(values),
            "min": ordered[0], "max": ordered[-1], "n": len(values)}


def make_run(parent: Path, channels: int, threads: int, *, iter_ms: float = 100.0, busbw: float = 10.0,
             contention: float = 0.05, world_size: int = 4, nodes: int = 2, steps: int = 6,
             status: str = "completed", summary: bool = True, slow_rank: int | None = None,
             run_id: str | None = None, late_rank: int | None = None, wait_ms: float = 0.5,
             sm_clock: float | None = None, calibration_clock: float | None = None,
             noise: float = 0.0, seed: int = 0, pooled: bool = False,
             settings: dict[str, str] | None = None, accelerator: str = "cuda") -> Path:
    """A run directory: run.json, <T>thread_<C>channels/ with rank jsonl files and summary.json
    in the train package's layout. late_rank: the rank the others waited `wait_ms` for (the
    summary's cross-rank analysis); sm_clock/calibration_clock: telemetry of measured and
    GEMM-only steps; noise: the standard deviation (ms) of a step's random part, the same for
    every rank of the step (seeded by `seed`); pooled: the summary of a rank pool's point."""
    run_id = run_id or f"multinode_{channels}ch_{threads}th_20250101_120000"
    run_dir = parent / run_id
    out = run_dir / f"{threads}thread_{channels}channels"
    out.mkdir(parents=True)
    run_status = "succeeded" if status == "completed" else status
    (run_dir / "run.json").write_text(json.dumps({
        "schema": 1, "run_id": run_id, "status": run_status, "output_dir": out.name,
        "flags": {"channels": channels, "threads": threads, "nproc": world_size // nodes,
                  "accelerator": accelerator, "pin_channels": True, "env": dict(settings or {})},
        # What env.sh exported for every node, as the launch records it (tasks/run/plan.py).
        "env": {**nccl_env(channels, threads, pin_channels=True, accelerator=accelerator), **(settings or {})},
        "nnodes": nodes, "nproc_per_node": world_size // nodes, "world_size": world_size,
        "nodes": [{"node_rank": i, "host": f"node{i}"} for i in range(nodes)],
        "first_failure": None if status == "completed" else {
            "node_rank": 1, "host": "node1", "ranks": [2, 3], "exit_code": 1,
            "reason": "exited 1", "at": "2025-01-01T12:00:00Z", "last_lines": []},
    }))
    lines = []
    jitter = random.Random(seed)
    step_noise = [jitter.gauss(0.0, noise) if noise else 0.0 for _ in range(steps)]
    for rank in range(world_size):
        rank_lines = []
        for step in range(steps):
            ms = iter_ms * (1.5 if rank == slow_rank else 1.0) + step * 0.1 + step_noise[step]
            rank_lines.append(step_line(rank, world_size, step, ms, busbw=busbw, contention=contention))
        lines += rank_lines
        (out / f"rank_{rank:02d}_metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in rank_lines))
    if summary:
        # The train package's layout: aggregates at the top level beside status and env.
        aggregates = {key: distribution([l[key] for l in lines if l[key] is not None]) if any(
            l[key] is not None for l in lines) else None for key in STEP_KEYS}
        null_reasons = {}
        if world_size == 1:
            bandwidth = {"stream_busbw_gbps": None, "stream_algbw_gbps": None,
                         "stream_comm_slowdown": None, "kernel_busbw_gbps": None}
            null_reasons = {key: WORLD_SIZE_ONE for key in bandwidth}
        else:
            # kernel-active: the same collectives without the time their kernels sat queued
            bandwidth = {"stream_busbw_gbps": distribution([busbw] * steps),
                         "stream_algbw_gbps": distribution([busbw / 1.5] * steps),
                         "stream_comm_slowdown": distribution([0.02] * steps),
                         "kernel_busbw_gbps": distribution([busbw * 1.25] * steps),
                         "kernel_collective_ms": distribution([iter_ms * 0.24] * steps)}
        waits = [wait_ms if late_rank is not None and rank != late_rank else 0.0
                 for rank in range(world_size) for _ in range(steps)]
        per_step = [max(l["iter_ms"] for l in lines if l["step"] == step) for step in range(steps)]
        hosts = [f"node{rank * nodes // world_size}" for rank in range(world_size)]
        if late_rank is not None:
            slowest = {"rank": late_rank, "host": hosts[late_rank], "by": "caused_wait",
                       "caused_wait_ms_median": wait_ms * (world_size - 1),
                       "last_arrival_fraction": 0.9, "iter_ms_median": iter_ms}
        else:
            rank = slow_rank if slow_rank is not None else 0
            slowest = {"rank": rank, "host": hosts[rank], "by": "iter_ms",
                       "caused_wait_ms_median": None, "last_arrival_fraction": None,
                       "iter_ms_median": iter_ms}
        drift = (sm_clock / calibration_clock - 1.0) if sm_clock and calibration_clock else None
        (out / "summary.json").write_text(json.dumps({
            "status": status, "world_size": world_size, **aggregates, **bandwidth,
            "stream_collective_ms": distribution([iter_ms * 0.3] * steps),
            "wait_ms": distribution(waits),
            "step_max": {"iter_ms": distribution(per_step)},
            "slowest_rank": slowest,
            "per_rank": [{"rank": rank, "host": hosts[rank], "wait_ms_median": waits[rank * steps],
                          "wait_ms_p95": waits[rank * steps], "caused_wait_ms_median": 0.0,
                          "last_arrival_fraction": 0.1, "compute_ms_median": iter_ms * 0.8,
                          "exposed_comm_ms_median": iter_ms * 0.1,
                          "contention_slowdown_median": contention} for rank in range(world_size)],
            "outlier_steps": {"count": 0, "steps": []},
            "telemetry": {"source": "nvml" if sm_clock else None, "clock_drift": drift,
                          "clock_drift_flag": None if drift is None else abs(drift) > 0.02,
                          "train": {"sm_clock_mhz": distribution([sm_clock]) if sm_clock else None}},
            "launch_delay_ms": {"first_collective": None, "reason": "CPU run: no kernels to profile"},
            "comm_stream_priority": "high",
            "null_reasons": null_reasons,
            "measured_steps": {"per_rank_min": steps, "total": steps * world_size},
            "env": {"NCCL_MAX_NCHANNELS": str(channels), "RCCL_THREADS_PER_BLOCK": str(threads)},
            "hosts": [f"node{i}" for i in range(nodes)],
            **({"pool": {"mode": "in_process", "leak_free": True}} if pooled else {}),
        }))
    return run_dir


def make_sweep(experiments: Path, grid: list[tuple[int, int, dict[str, Any]]], *,
               sweep_id: str = "sweep_20250101_120000") -> Path:
    """A sweep directory whose sweep.json points at sibling run directories."""
    sweep_dir = experiments / sweep_id
    sweep_dir.mkdir(parents=True)
    points = []
    channels_axis, threads_axis = [], []
    for index, (channels, threads, options) in enumerate(grid):
        channels_axis.append(channels)
        threads_axis.append(threads)
        sweep_status = options.pop("sweep_status", None)
        entry: dict[str, Any] = {"index": index, "channels": channels, "threads": threads}
        if sweep_status == "pending":
            entry["status"] = "pending"
        else:
            run_dir = make_run(experiments, channels, threads,
                               run_id=f"multinode_{channels}ch_{threads}th_20250101_12{index:02d}00", **options)
            entry.update(status=sweep_status or options.get("status", "completed"), run_id=run_dir.name,
                         run_dir=f"../{run_dir.name}")
        points.append(entry)
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "schema": 1, "sweep_id": sweep_id,
        "grid": {"channels": sorted(set(channels_axis)), "threads": sorted(set(threads_axis))},
        "points": points,
    }))
    return sweep_dir


def make_repeated_sweep(experiments: Path, configs: list[tuple[int, int, dict[str, str], list[float], dict[str, Any]]],
                        *, repeat: int, sweep_id: str = "sweep_20250102_120000", seed: int = 7,
                        noise: float = 0.5, steps: int = 12) -> Path:
    """A sweep of fab sweep --repeat N (sweep.json schema 2): `configs` are (channels, threads,
    axis settings, the median iteration time of each of its runs, make_run options); the runs are
    interleaved round by round, each its own run directory."""
    sweep_dir = experiments / sweep_id
    sweep_dir.mkdir(parents=True)
    points = []
    axes: dict[str, list[str]] = {}
    for config, (_, _, settings, _, _) in enumerate(configs):
        for name, value in settings.items():
            axes.setdefault(name, [])
            if value not in axes[name]:
                axes[name].append(value)
    for round_ in range(repeat):
        for config, (channels, threads, settings, medians, options) in enumerate(configs):
            index = len(points)
            run_id = f"multinode_{channels}ch_{threads}th_20250102_{index:06d}"
            entry: dict[str, Any] = {"index": index, "config": config, "repeat": round_,
                                     "channels": channels, "threads": threads, "settings": dict(settings)}
            if round_ >= len(medians):
                entry["status"] = "pending"
            else:
                make_run(experiments, channels, threads, run_id=run_id, iter_ms=medians[round_], noise=noise,
                         seed=seed * 7919 + index, steps=steps, settings=settings, **options)
                entry.update(status=options.get("status", "completed"), run_id=run_id, run_dir=f"../{run_id}")
            points.append(entry)
    (sweep_dir / "sweep.json").write_text(json.dumps({
        "schema": 2, "sweep_id": sweep_id,
        "grid": {"channels": sorted({c[0] for c in configs}), "threads": sorted({c[1] for c in configs}),
                 "axes": [{"name": n, "values": v} for n, v in axes.items()], "repeat": repeat, "seed": seed},
        "configs": [{"index": i, "channels": c[0], "threads": c[1], "settings": dict(c[2])}
                    for i, c in enumerate(configs)],
        "points": points,
    }))
    return sweep_dir
