"""A rank pool: several sweep points in one process, each on a communicator of its own.

A restart per point costs the import of torch, a CUDA context, the default group's NCCL init
and a warm-up, seconds each time; a channel count needs none of that to change. NCCL takes
min/max CTAs per communicator (``ncclConfig_t``, which torch exposes as
``ProcessGroupNCCL.Options().config.min_ctas/max_ctas``), so each point gets a new group made
with its own CTAs, runs its warm-up, calibration and measured steps on it exactly as a single
run does (train.trainer with the point's group), writes its own output directory and summary,
and the group is destroyed before the next point, in the same order on every rank.

The channel variables (NCCL_MIN/MAX_NCHANNELS, NCCL_MIN/MAX_CTAS) cap every communicator of
the process, so the pool removes them from its environment before NCCL starts and records
which. Thread counts cannot change here: NCCL reads NCCL_NTHREADS once per process (cached
parameter), so the controller starts one pool per thread value (threads-major order).

The default group stays up for the whole pool and carries only the pool's own agreement
between points (statuses and the leak check); on gloo the same mechanics run with a new gloo
group per point, where channels change nothing (the summary says so).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train.config import TrainConfig, load_config, pool_channels, pool_point_overrides
from train.exchange import all_gather_json
from train.nccl_debug import CHANNEL_KNOBS
from train.outputs import SUMMARY_NAME, check_output_dir, say, write_json_atomic
from train.runtime import RuntimePlan, init_distributed, nccl_options, shutdown_distributed
from train.signals import StopSignals
from train.trainer import (
    EXIT_FAILED,
    EXIT_OK,
    PointContext,
    Trainer,
    start_capture,
    start_flight_recorder,
)

GLOO_CHANNELS_NOTE = ("gloo backend: channels are a no-op (gloo has no channels or CTAs); "
                      "the points differ only in their group")


def point_dir_name(channels: int, threads: int | None) -> str:
    """The launch's layout, <T>thread_<C>channels (T 0 when the process sets no threads)."""
    return f"{threads or 0}thread_{channels}channels"


def pool_threads(config: TrainConfig, environ: Mapping[str, str]) -> int | None:
    if config.pool.threads:
        return config.pool.threads
    for name in ("NCCL_NTHREADS", "RCCL_THREADS_PER_BLOCK"):
        value = environ.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def point_dirs(config: TrainConfig, threads: int | None) -> dict[int, Path]:
    base = Path(config.training.output_dir)
    root = base.parent if config.pool.layout == "siblings" else base
    return {c: root / point_dir_name(c, threads) for c in pool_channels(config.pool.channels)}


def process_groups() -> int | None:
    """How many process groups torch holds (the leak check's second number); None where this
    torch keeps them elsewhere."""
    world = getattr(dist.distributed_c10d, "_world", None)
    pg_map = getattr(world, "pg_map", None)
    return len(pg_map) if pg_map is not None else None


def resources(plan: RuntimePlan) -> dict[str, int | None]:
    gc.collect()
    allocated = None
    if plan.is_cuda:
        torch.cuda.synchronize(plan.device)
        # cuBLAS keeps a workspace per handle and stream in torch's allocator (32 MiB on an
        # H100): a cache, not a leak; freed here so the count is of tensors.
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()
        allocated = int(torch.cuda.memory_allocated(plan.device))
    return {"cuda_allocated_bytes": allocated, "process_groups": process_groups()}


def delta(after: dict[str, int | None], before: dict[str, int | None]) -> dict[str, int | None]:
    return {key: (None if after[key] is None or before.get(key) is None else after[key] - before[key])
            for key in after}


def new_point_group(plan: RuntimePlan, channels: int, timeout_s: float,
                    high_priority: bool) -> Any:
    ranks = list(range(plan.world_size))
    timeout = datetime.timedelta(seconds=timeout_s)
    if plan.backend == "nccl":
        options = nccl_options(high_priority, timeout)
        if options is None:
            raise RuntimeError("this torch build has no ProcessGroupNCCL.Options: per-point "
                               "CTAs cannot be set; use the restart-per-point mode")
        options.config.min_ctas = channels
        options.config.max_ctas = channels
        return dist.new_group(ranks, timeout=timeout, backend="nccl", pg_options=options)
    return dist.new_group(ranks, timeout=timeout, backend=plan.backend)


def remove_channel_env(environ: Any) -> dict[str, str]:
    """Takes the process-wide channel variables out (they would clamp every point's CTAs)."""
    return {name: environ.pop(name) for name in CHANNEL_KNOBS if name in environ}


class Pool:
    def __init__(self, config: TrainConfig, plan: RuntimePlan, signals: StopSignals) -> None:
        self.config, self.plan, self.signals = config, plan, signals
        self.channels = pool_channels(config.pool.channels)
        self.extra = pool_point_overrides(config.pool.point_overrides, self.channels)
        self.threads = pool_threads(config, os.environ)
        self.dirs = point_dirs(config, self.threads)
        self.rank = plan.rank
        self.results: list[dict[str, Any]] = []

    def log(self, message: str) -> None:
        if self.plan.local_rank == 0:
            say(message)

    def check(self) -> None:
        """Every point's output directory is free before anything starts (exit 2 if not)."""
        for path in self.dirs.values():
            check_output_dir(path, self.config.source)

    def run(self) -> int:
        cfg, plan = self.config, self.plan
        removed = remove_channel_env(os.environ)
        capture = None
        if plan.backend == "nccl" and cfg.nccl.capture:
            capture = start_capture(Path(cfg.training.output_dir), plan.rank, cfg.nccl.subsystems)
        # One recorder for the whole pool: the dump covers every point's groups.
        flight = start_flight_recorder(Path(cfg.training.output_dir), plan, cfg)
        started = time.perf_counter()
        init_distributed(plan, cfg.distributed.timeout_s,
                         high_priority=cfg.comm.stream_priority == "high")
        init_s = time.perf_counter() - started
        self.log(f"train: pool of {len(self.channels)} points ({', '.join(map(str, self.channels))} "
                 f"channels, threads {self.threads or 'not set'}), backend {plan.backend}; "
                 f"default group up in {init_s:.2f} s"
                 + (f"; removed from the environment: {', '.join(removed)}" if removed else ""))
        baseline = resources(plan)
        self.baseline: dict[str, Any] | None = None   # after the first point: see run_point
        codes: list[int] = []
        previous_end: float | None = None
        try:
            for index, channels in enumerate(self.channels):
                code, previous_end = self.run_point(index, channels, capture, removed, baseline,
                                                    previous_end, init_s)
                codes.append(code)
                if self.signals.requested:
                    break
        finally:
            if flight is not None:
                flight.close()
            try:
                shutdown_distributed()
            except Exception as exc:  # noqa: BLE001 - the group may already be broken
                say(f"train: destroy_process_group: {exc}", sys.stderr)
        if self.signals.requested:
            return self.signals.exit_code()
        return EXIT_OK if codes and all(c == EXIT_OK for c in codes) else EXIT_FAILED

    def run_point(self, index: int, channels: int, capture: Any, removed: dict[str, str],
                  baseline: dict[str, Any], previous_end: float | None,
                  init_s: float) -> tuple[int, float]:
        cfg, plan = self.config, self.plan
        out = self.dirs[channels]
        began = time.perf_counter()
        info: dict[str, Any] = {
            "mode": "in_process", "index": index, "points": len(self.channels),
            "started_unix": round(time.time(), 6),
            "channels_asked": channels, "threads": self.threads, "backend": plan.backend,
            "note": GLOO_CHANNELS_NOTE if plan.backend != "nccl" else None,
            "removed_env": dict(removed), "default_group_init_s": round(init_s, 6),
            "gap_s": None if previous_end is None else round(began - previous_end, 6),
            "point_overrides": self.extra.get(channels, []),
        }
        error = None
        trainer = None
        group = None
        code = EXIT_FAILED
        try:
            point_config = load_config(cfg.source, [*cfg.overrides, *self.extra.get(channels, []),
                                                    f"training.output_dir={out}"])
            if capture is not None:
                capture.mark()
            made = time.perf_counter()
            group = new_point_group(plan, channels, cfg.distributed.timeout_s,
                                    cfg.comm.stream_priority == "high")
            info["new_group_s"] = round(time.perf_counter() - made, 6)
            trainer = Trainer(point_config, plan, self.signals,
                              PointContext(group=group, channels=channels, capture=capture,
                                           info=info))
            code = trainer.run()
            error = trainer.error
        except Exception as exc:  # noqa: BLE001 - a config or runtime error: the next point still runs
            error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            say(f"train: rank {self.rank} point {channels} channels failed: {error}", sys.stderr)
        finished = time.perf_counter()
        status = trainer.status if trainer is not None else "failed"
        del trainer
        # Every rank is done with the point before any destroys its group: a communicator
        # torn down under a peer still in a collective can hang that peer.
        dist.barrier()
        destroy_began = time.perf_counter()
        if group is not None:
            try:
                dist.destroy_process_group(group)
            except Exception as exc:  # noqa: BLE001 - recorded; the leak check then shows it
                error = error or f"destroying the point's group failed: {exc}"[:500]
        destroy_s = time.perf_counter() - destroy_began
        after = resources(plan)
        # One-time caches (allocator blocks, library handles) land in the first point; the
        # points after it must each come back to the state the first one left. The first
        # point's growth over the pool's start is recorded, not counted as a leak.
        # Process groups are no cache: they are counted against the pool's start every time.
        first_growth = None
        if self.baseline is None:
            self.baseline = after
            first_growth = delta(after, baseline)
        reference = {**self.baseline, "process_groups": baseline["process_groups"]}
        leak = delta(after, reference)
        mine = {"rank": self.rank, "pid": os.getpid(), "status": status, "error": error, "leak": leak,
                "first_growth": first_growth,
                "destroy_s": round(destroy_s, 6), "point_s": round(finished - began, 6)}
        gathered = all_gather_json(mine, device=plan.device)
        if self.rank == 0:
            self.record_point(out, info, gathered, status, error)
        ended = time.perf_counter()
        statuses = {g["status"] for g in gathered}
        leaked = [g["rank"] for g in gathered if any(v for v in g["leak"].values())]
        self.log(f"train: pool point {index + 1}/{len(self.channels)} ({channels} channels): "
                 f"{'failed' if 'failed' in statuses else status}, "
                 f"{finished - began:.2f} s, destroy {destroy_s:.3f} s"
                 + (f"; LEAK on rank {leaked}" if leaked else ""))
        ok = code == EXIT_OK and not leaked and statuses == {"completed"}
        return (EXIT_OK if ok else EXIT_FAILED), ended

    def record_point(self, out: Path, info: dict[str, Any], gathered: list[dict[str, Any]],
                     status: str, error: str | None) -> None:
        """The point's summary gets the pool's view (teardown time, leak check) once the
        group is gone; a point that failed before its trainer wrote anything gets a summary
        saying so, so the report never mistakes it for one not run."""
        path = out / SUMMARY_NAME
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            out.mkdir(parents=True, exist_ok=True)
            summary = {"status": "failed", "error": error, "partial": True,
                       "world_size": self.plan.world_size, "backend": self.plan.backend}
        leaks = {g["rank"]: g["leak"] for g in gathered}
        pool = dict(summary.get("pool") or info)
        pool.update(
            destroy_s=max(g["destroy_s"] for g in gathered),
            point_s=max(g["point_s"] for g in gathered),
            leak=leaks,
            first_point_growth=({g["rank"]: g["first_growth"] for g in gathered}
                                if gathered[0]["first_growth"] is not None else None),
            leak_free=all(not any(v for v in leak.values()) for leak in leaks.values()),
            rank_statuses=[g["status"] for g in gathered],
            rank_pids=[g["pid"] for g in gathered],   # the same on every point: one process
            rank_errors=[g["error"] for g in gathered if g["error"]],
        )
        summary["pool"] = pool
        if not pool["leak_free"]:
            summary.setdefault("problems", []).append("pool: resources not back to the baseline "
                                                      f"after the point: {leaks}")
        write_json_atomic(path, summary)


def run_pool(config: TrainConfig, plan: RuntimePlan, signals: StopSignals) -> int:
    pool = Pool(config, plan, signals)
    pool.check()
    return pool.run()
