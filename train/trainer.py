"""The trainer: process group, calibration, measured loop, outputs, signals (imports torch)."""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train.config import TrainConfig
from train.metrics import AGGREGATED, aggregate_ranks, collect_env, median, step_metrics
from train.model import GemmStack
from train.outputs import PROFILER_DIR, SUMMARY_NAME, MetricsWriter, write_json_atomic
from train.runtime import (
    RuntimePlan,
    blocking_wait_warning,
    device_name,
    init_distributed,
    shutdown_distributed,
    versions,
)
from train.signals import StopSignals
from train.stepper import COMM, COMPUTE, TRAIN, Stepper, StepResult

EXIT_OK, EXIT_FAILED = 0, 1


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


class Trainer:
    def __init__(self, config: TrainConfig, plan: RuntimePlan, signals: StopSignals) -> None:
        self.config = config
        self.plan = plan
        self.signals = signals
        self.output_dir = Path(config.training.output_dir)
        self.rank = plan.rank
        self.world_size = plan.world_size
        self.prints = plan.local_rank == 0  # one progress stream per node
        self.stack: GemmStack | None = None
        self.stepper: Stepper | None = None
        self.writer: MetricsWriter | None = None
        self.step_records: list[dict[str, Any]] = []
        self.calibration: dict[str, list[dict[str, Any]]] = {COMPUTE: [], COMM: []}
        self.solo_compute_ms: float | None = None
        self.solo_comm_ms: float | None = None
        self.started_at = _now_iso()
        self.measured_wall_s: float | None = None
        self.status = "failed"
        self.error: str | None = None

    # ---- output helpers -----------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.prints:
            print(message, flush=True)

    def _metrics(self, result: StepResult) -> dict[str, Any]:
        assert self.stack is not None
        return step_metrics(
            result.times,
            gemm_flops=self.stack.gemm_flops,
            world_size=self.world_size,
            solo_compute_ms=self.solo_compute_ms if result.kind == TRAIN else None,
            solo_comm_ms=self.solo_comm_ms if result.kind == TRAIN else None,
        )

    # ---- phases ---------------------------------------------------------------------------
    def _agree_to_stop(self) -> bool:
        """A synchronous MAX all-reduce of the local stop request (between phases)."""
        device = self.plan.device
        flag = torch.tensor([1.0 if self.signals.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def run_phase(
        self,
        kind: str,
        count: int,
        on_result: Callable[[StepResult], None],
        profiler: Any = None,
    ) -> bool:
        """Runs count steps of a kind; returns True when the ranks agreed to stop.

        Train steps carry the stop flag inside the step and are read one step late on GPU
        (the device keeps working while the host reads); calibration steps are read at once
        and agree on stopping with a separate collective, outside their timed region.
        """
        assert self.stepper is not None
        lag = 1 if (kind == TRAIN and self.plan.is_cuda) else 0
        pending: deque[Any] = deque()
        stop = False
        for index in range(1, count + 1):
            carry_flag = self.signals.requested if kind == TRAIN else None
            pending.append(self.stepper.run(kind, index, stop_requested=carry_flag))
            if profiler is not None:
                profiler.step()
            while len(pending) > lag:
                result = self.stepper.resolve(pending.popleft())
                on_result(result)
                if kind == TRAIN:
                    stop = stop or result.stop_requested
                else:
                    stop = self._agree_to_stop()
            if stop:
                break
        while pending:
            on_result(self.stepper.resolve(pending.popleft()))
        return stop

    def calibrate(self) -> bool:
        cal = self.config.calibration
        phases = ((COMPUTE, cal.compute_steps), (COMM, cal.comm_steps))
        for kind, steps in phases:
            if steps == 0:
                continue
            if cal.warmup_steps and self.run_phase(kind, cal.warmup_steps, lambda r: None):
                return True
            records = self.calibration[kind]
            if self.run_phase(
                kind, steps, lambda r, records=records: records.append(self._metrics(r))
            ):
                return True
        assert self.stack is not None
        compute = self.calibration[COMPUTE]
        comm = self.calibration[COMM]
        self.solo_compute_ms = median(r["compute_ms"] for r in compute)
        self.solo_comm_ms = median(r["comm_ms"] for r in comm)
        if compute:
            self.log(
                f"calibration gemm-only: compute {_fmt(self.solo_compute_ms, '.3f', ' ms')}, "
                f"{_fmt(median(r['gemm_tflops'] for r in compute), '.1f', ' TFLOP/s')} "
                f"(median of {len(compute)} steps, {self.stack.gemm_count} GEMMs/step)"
            )
        if comm:
            n_buckets = len(self.stack.buckets)
            mib = self.stack.bucket_bytes(self.stack.buckets[0]) / 2**20
            self.log(
                f"calibration comm-only: {self.config.comm.collective} {n_buckets} buckets x "
                f"{mib:.2f} MiB: comm {_fmt(self.solo_comm_ms, '.3f', ' ms')}, "
                f"algbw {_fmt(median(r['algbw_gbps'] for r in comm), '.2f', ' GB/s')}, "
                f"busbw {_fmt(median(r['busbw_gbps'] for r in comm), '.2f', ' GB/s')} "
                f"(median of {len(comm)} steps)"
            )
        return False

    def record_step(self, result: StepResult) -> None:
        assert self.writer is not None
        metrics = self._metrics(result)
        record: dict[str, Any] = {
            "rank": self.rank,
            "local_rank": self.plan.local_rank,
            "world_size": self.world_size,
            "step": result.index,
            "wall_time": round(time.time(), 6),
            **metrics,
        }
        if result.checksum is not None:
            record["param_checksum"] = result.checksum
        self.writer.write(record)
        self.step_records.append(record)
        max_steps = self.config.training.max_steps
        if result.index % self.config.training.log_interval == 0 or result.index == max_steps:
            slowdown = metrics["contention_slowdown"]
            self.log(
                f"step {result.index}/{max_steps} | iter {_fmt(metrics['iter_ms'], '.3f')} ms"
                f" | compute {_fmt(metrics['compute_ms'], '.3f')} ms"
                f" | comm {_fmt(metrics['comm_ms'], '.3f')} ms"
                f" | exposed {_fmt(metrics['exposed_comm_ms'], '.3f')} ms"
                f" | gemm {_fmt(metrics['gemm_tflops'], '.1f')} TFLOP/s"
                f" | busbw {_fmt(metrics['busbw_gbps'], '.2f')} GB/s"
                f" | slowdown {_fmt(None if slowdown is None else slowdown * 100, '+.1f', '%')}"
            )

    def _profiler(self) -> Any:
        p = self.config.profiling
        if not p.enabled:
            return None
        trace_dir = self.output_dir / PROFILER_DIR
        trace_dir.mkdir(parents=True, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.plan.is_cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)

        def write_trace(prof: Any) -> None:
            path = trace_dir / f"rank_{self.rank:02d}_step_{prof.step_num}.json"
            prof.export_chrome_trace(str(path))

        return torch.profiler.profile(
            activities=activities,
            schedule=torch.profiler.schedule(
                wait=p.wait, warmup=p.warmup, active=p.active, repeat=p.repeat
            ),
            on_trace_ready=write_trace,
        )

    # ---- the run --------------------------------------------------------------------------
    def setup(self) -> None:
        cfg, plan = self.config, self.plan
        warning = blocking_wait_warning(os.environ) if plan.rank == 0 else None
        if warning is not None:
            print(warning, file=sys.stderr, flush=True)
        init_distributed(plan, cfg.distributed.timeout_s)
        self.stack = GemmStack(
            cfg.model,
            device=plan.device,
            dtype=plan.dtype,
            seed=cfg.training.seed,
            rank=plan.rank,
            world_size=plan.world_size,
            bucket_mb=cfg.comm.bucket_mb,
        )
        dist.broadcast(self.stack.params, src=0)
        self.stepper = Stepper(
            self.stack,
            collective=cfg.comm.collective,
            overlap=cfg.comm.overlap,
            lr=cfg.training.lr,
            world_size=plan.world_size,
            granularity=cfg.timing.granularity,
            checksum=cfg.debug.param_checksum,
        )
        self.writer = MetricsWriter(self.output_dir, plan.rank)
        b = self.stack.buckets
        self.log(
            f"train: world {plan.world_size} ({plan.local_world_size}/node), backend "
            f"{plan.backend}, device {device_name(plan.device)}, {cfg.training.dtype}, "
            f"{cfg.model.layers} layers of [{cfg.model.tokens}x{cfg.model.hidden}]x"
            f"[{cfg.model.hidden}x{cfg.model.hidden}], {len(b)} buckets of "
            f"{self.stack.bucket_bytes(b[0]) / 2**20:.2f} MiB, {cfg.comm.collective}, "
            f"overlap={'on' if cfg.comm.overlap else 'off'}, timing={cfg.timing.granularity}"
        )

    def _train(self) -> bool:
        cfg = self.config.training
        if self._agree_to_stop():
            return True
        # Warm up first: the GPU's clocks settle under load before the solo baselines are
        # taken, so calibration and measured steps run in the same power state.
        if cfg.warmup_steps and self.run_phase(TRAIN, cfg.warmup_steps, lambda r: None):
            return True
        if self.calibrate():
            return True
        profiler = self._profiler()
        started = time.perf_counter()
        try:
            if profiler is not None:
                profiler.__enter__()
            return self.run_phase(TRAIN, cfg.max_steps, self.record_step, profiler)
        finally:
            if profiler is not None:
                profiler.__exit__(None, None, None)
            self.measured_wall_s = time.perf_counter() - started

    def run(self) -> int:
        try:
            self.setup()
            stopped = self._train()
            # Only the agreed decision counts: a signal after the last step changes nothing.
            self.status = "stopped" if stopped else "completed"
        except Exception as exc:  # noqa: BLE001 - any failure ends as status "failed"
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            print(f"train: rank {self.rank} failed: {self.error}", file=sys.stderr, flush=True)
            traceback.print_exc(file=sys.stderr)
        finally:
            try:
                self._finish()
            finally:
                if self.stepper is not None:
                    self.stepper.close()
                if self.writer is not None:
                    self.writer.close()
                try:
                    shutdown_distributed()
                except Exception as exc:  # noqa: BLE001 - the group may already be broken
                    print(f"train: destroy_process_group: {exc}", file=sys.stderr, flush=True)
        if self.status == "completed":
            return EXIT_OK
        if self.status == "stopped":
            return self.signals.exit_code()
        return EXIT_FAILED

    # ---- summary ---------------------------------------------------------------------------
    def _report(self) -> dict[str, Any]:
        """This rank's contribution to summary.json."""
        return {
            "rank": self.rank,
            "host": socket.gethostname(),
            "device": device_name(self.plan.device),
            "env": collect_env(os.environ),
            # Only what the aggregates need: this crosses the network to rank 0.
            "steps": [{k: r.get(k) for k in AGGREGATED} for r in self.step_records],
            "calibration_compute": self.calibration[COMPUTE],
            "calibration_comm": self.calibration[COMM],
            "status": self.status,
            "measured_wall_s": self.measured_wall_s,
        }

    def _finish(self) -> None:
        report = self._report()
        reports = [report]
        partial = True
        if self.status != "failed" and dist.is_initialized():
            try:
                gathered: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
                dist.gather_object(report, gathered, dst=0)
                if gathered is not None:
                    reports = [r for r in gathered if r is not None]
                partial = False
            except Exception as exc:  # noqa: BLE001 - a peer died while gathering
                self.status = "failed"
                self.error = f"gathering rank reports failed: {exc}".splitlines()[0][:500]
        if self.rank != 0:
            return
        statuses = {r["status"] for r in reports}
        status = "failed" if "failed" in statuses else self.status
        write_json_atomic(self.output_dir / SUMMARY_NAME, self._summary(reports, status, partial))
        steps = len(self.step_records)
        self.log(
            f"train: {status} after {steps}/{self.config.training.max_steps} measured steps; "
            f"summary in {self.output_dir / SUMMARY_NAME}"
        )

    def _summary(self, reports: list[dict[str, Any]], status: str, partial: bool) -> dict[str, Any]:
        cfg, stack = self.config, self.stack
        aggregates = aggregate_ranks(reports)
        steps_done = len(self.step_records)
        model: dict[str, Any] = {}
        if stack is not None:
            model = {
                "gemm_count_per_step": stack.gemm_count,
                "gemm_flops_per_step": stack.gemm_flops,
                "bucket_count": len(stack.buckets),
                "bucket_bytes": [stack.bucket_bytes(b) for b in stack.buckets],
                "param_bytes": stack.layers * stack.layer_numel * stack.element_size,
            }
        return {
            "status": status,
            "error": self.error,
            "partial": partial,  # true: only rank 0's data (the group could not gather)
            "started_at": self.started_at,
            "finished_at": _now_iso(),
            "world_size": self.world_size,
            "local_world_size": self.plan.local_world_size,
            "backend": self.plan.backend,
            "dtype": cfg.training.dtype,
            "collective": cfg.comm.collective,
            "overlap": cfg.comm.overlap,
            "timing_granularity": cfg.timing.granularity,
            "max_steps": cfg.training.max_steps,
            "steps_completed": steps_done,
            "measured_wall_s": self.measured_wall_s,
            "steps_per_s": (
                steps_done / self.measured_wall_s if steps_done and self.measured_wall_s else None
            ),
            **aggregates,
            "model": model,
            "versions": versions(),
            "config_file": cfg.source,
            "overrides": list(cfg.overrides),
            "config": cfg.to_dict(),
        }
