"""Crafted run and sweep directories in the layout launch and train write (for report/sweep tests)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

STEP_KEYS = ("iter_ms", "compute_ms", "comm_ms", "overlap_ms", "exposed_comm_ms", "exposed_comm_fraction",
             "gemm_tflops", "comm_bytes", "algbw_gbps", "busbw_gbps", "contention_slowdown")


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
        "algbw_gbps": busbw / 1.5, "busbw_gbps": busbw, "contention_slowdown": contention,
        "comm_slowdown": 0.1,
    }


def distribution(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        pos = (len(ordered) - 1) * p / 100
        lo = int(pos)
        hi = min(lo + 1, len(ordered) - 1)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"median": q(50), "p10": q(10), "p90": q(90), "mean": sum(values) / len(values),
            "min": ordered[0], "max": ordered[-1], "n": len(values)}


def make_run(parent: Path, channels: int, threads: int, *, iter_ms: float = 100.0, busbw: float = 10.0,
             contention: float = 0.05, world_size: int = 4, nodes: int = 2, steps: int = 6,
             status: str = "completed", summary: bool = True, slow_rank: int | None = None,
             run_id: str | None = None) -> Path:
    """A run directory: run.json, <T>thread_<C>channels/ with rank jsonl files and summary.json."""
    run_id = run_id or f"multinode_{channels}ch_{threads}th_20250101_120000"
    run_dir = parent / run_id
    out = run_dir / f"{threads}thread_{channels}channels"
    out.mkdir(parents=True)
    run_status = "succeeded" if status == "completed" else status
    (run_dir / "run.json").write_text(json.dumps({
        "schema": 1, "run_id": run_id, "status": run_status, "output_dir": out.name,
        "flags": {"channels": channels, "threads": threads, "nproc": world_size // nodes},
        "nnodes": nodes, "nproc_per_node": world_size // nodes, "world_size": world_size,
        "nodes": [{"node_rank": i, "host": f"node{i}"} for i in range(nodes)],
        "first_failure": None if status == "completed" else {
            "node_rank": 1, "host": "node1", "ranks": [2, 3], "exit_code": 1,
            "reason": "exited 1", "at": "2025-01-01T12:00:00Z", "last_lines": []},
    }))
    lines = []
    for rank in range(world_size):
        rank_lines = []
        for step in range(steps):
            ms = iter_ms * (1.5 if rank == slow_rank else 1.0) + step * 0.1
            rank_lines.append(step_line(rank, world_size, step, ms, busbw=busbw, contention=contention))
        lines += rank_lines
        (out / f"rank_{rank:02d}_metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in rank_lines))
    if summary:
        # The train package's layout: aggregates at the top level beside status and env.
        aggregates = {key: distribution([l[key] for l in lines]) for key in STEP_KEYS}
        (out / "summary.json").write_text(json.dumps({
            "status": status, "world_size": world_size, **aggregates,
            "measured_steps": {"per_rank_min": steps, "total": steps * world_size},
            "env": {"NCCL_MAX_NCHANNELS": str(channels), "RCCL_THREADS_PER_BLOCK": str(threads)},
            "hosts": [f"node{i}" for i in range(nodes)],
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
