"""The trainer: process group, calibration, measured loop, outputs, signals (imports torch).

Timeline of a run: warm-up train steps; a start-of-run barrier and the run-timeline anchor;
calibration block 0 (GEMM-only, then comm-only steps); the measured train steps, with another
calibration block every ``calibration.interval_steps`` of them; on GPU a few extra train steps
under torch.profiler for the collectives' launch delay; then one gather of every rank's report
to rank 0, which analyses the collectives across ranks and writes summary.json and
collectives.jsonl.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from train.collectives import COMM_PHASE, CONTROL, TRAIN_PHASE, OpRecord, pack, timeline_lines
from train.config import TrainConfig
from train.exchange import gather_json
from train.launchdelay import kernel_activity_by_step, launch_check, launch_delays
from train.metrics import AGGREGATED, TELEMETRY_FIELDS, Baseline, collect_env, median, step_metrics
from train import startup
from train.flight import FlightDumper, flight_recorder_env
from train.model import GemmStack
from train.nccl_debug import DEBUG_FILE_PATTERN, CaptureFile, asked_from_env, capture_env, summarize_ranks
from train.outputs import (
    COLLECTIVES_NAME,
    PROFILER_DIR,
    SUMMARY_NAME,
    MetricsWriter,
    say,
    write_json_atomic,
    write_jsonl_atomic,
)
from train.runtime import (
    RuntimePlan,
    blocking_wait_warning,
    device_identity,
    device_name,
    init_distributed,
    shutdown_distributed,
    versions,
)
from train.signals import StopSignals
from train.stepper import COMM, COMPUTE, TRAIN, Stepper, StepResult
from train.summary import aggregate, cross_rank_analysis
from train.telemetry import Telemetry, open_telemetry, unavailable

EXIT_OK, EXIT_FAILED = 0, 1


@dataclass
class PointContext:
    """One sweep point of a rank pool (train.pool): the group its collectives run on (made
    for the point, destroyed after it) and what the summary says about the point."""

    group: Any
    channels: int | None                 # asked: min = max CTAs of the point's communicator
    capture: CaptureFile | None          # the process's NCCL debug file, marked at the point
    info: dict[str, Any] = field(default_factory=dict)   # summary.json "pool" section


def start_flight_recorder(output_dir: Path, plan: RuntimePlan, cfg: TrainConfig) -> FlightDumper | None:
    """The flight recorder on (before the first group starts) and its on-request dumper."""
    entries = cfg.distributed.flight_recorder_entries
    if entries <= 0:
        return None
    os.environ.update(flight_recorder_env(os.environ, entries, output_dir, plan.backend == "nccl"))
    return FlightDumper(output_dir, plan.rank).start()


def start_capture(output_dir: Path, rank: int, subsystems: str) -> CaptureFile:
    """Sends NCCL's debug output to a per-rank file (before NCCL first runs: it reads the
    variables once). NCCL expands only %h and %p in NCCL_DEBUG_FILE, so the rank is put in
    the name here."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / DEBUG_FILE_PATTERN.format(rank=rank)
    os.environ.update(capture_env(os.environ, path, [s for s in subsystems.split(",") if s]))
    return CaptureFile(path, start=path.stat().st_size if path.exists() else 0)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 6)


def _median_of(summary: dict[str, Any], key: str) -> float | None:
    return (summary.get(key) or {}).get("median")


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


class Trainer:
    def __init__(self, config: TrainConfig, plan: RuntimePlan, signals: StopSignals,
                 point: PointContext | None = None) -> None:
        self.config = config
        # A pool point runs on its own group, made and destroyed by the pool; otherwise the
        # trainer owns the default group for the whole process.
        self.point = point
        self.group = point.group if point is not None else None
        self.capture: CaptureFile | None = point.capture if point is not None else None
        self.flight: FlightDumper | None = None
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
        self.baseline: Baseline | None = None
        self.solo_compute_ms: float | None = None
        self.block = -1  # calibration blocks run so far, minus one
        self.measured_done = 0
        self.comm_index = 0  # comm-only calibration steps run, over every block
        self.op_records: list[OpRecord] = []
        self.step_intervals: dict[int, tuple[float | None, list[tuple[float, float]] | None]] = {}
        self.launch_delay: dict[str, Any] = {"samples": [], "reason": "not measured"}
        self.telemetry: Telemetry = unavailable("not opened")
        self._samples_taken = 0
        self.started_at = _now_iso()
        self.measured_wall_s: float | None = None
        self.calibration_wall_s = 0.0
        # Where a run's time goes besides its measured steps (a sweep's wall-time account):
        # warm-up with the first calibration, and the launch-delay sampling after the last step.
        self.warmup_wall_s: float | None = None
        self.launch_delay_wall_s: float | None = None
        self.status = "failed"
        self.error: str | None = None

    # ---- output helpers -----------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.prints:
            say(message)

    def _metrics(self, result: StepResult) -> dict[str, Any]:
        assert self.stack is not None
        metrics = step_metrics(
            result.times,
            gemm_flops=self.stack.gemm_flops,
            world_size=self.world_size,
            baseline=self.baseline if result.kind == TRAIN else None,
        )
        telemetry = result.telemetry or {}
        for name in TELEMETRY_FIELDS:
            metrics[name] = telemetry.get(name)
        metrics["calibration_block"] = self.block if self.block >= 0 else None
        return metrics

    def _sample(self, kind: str) -> dict[str, float | None] | None:
        """Device counters, read on the host right after the step's synchronize returned:
        at the end of the step, for every kind of step. Read before the synchronize, a
        calibration step (queued right after an idle gap: the host waits for each one) was
        read at its start with the clocks still high, a train step (queued a step ahead) under
        continuous load. Calibration steps are always sampled: they are the clocks the train
        steps are compared with."""
        if self.telemetry.source is None:
            return None
        if kind == TRAIN:
            self._samples_taken += 1
            if (self._samples_taken - 1) % self.config.telemetry.sample_every:
                return None
        return self.telemetry.sample()

    def _keep_collectives(self, phase: str, step: int, result: StepResult) -> None:
        """This rank's collectives of one step on its run timeline, for the end-of-run
        analysis (memory only: gathered once, at the end)."""
        times = result.times
        if times.comm is None or times.start_run_ms is None:
            return
        base = times.start_run_ms
        ops = ([times.control] if times.control is not None else []) + list(times.comm)
        for seq, op in enumerate(ops):
            enqueue = base + op.enqueue_ms if op.enqueue_ms is not None else None
            self.op_records.append(OpRecord(
                phase, step, seq, op.collective, op.bucket, op.size_bytes, enqueue,
                base + op.start_ms, base + op.end_ms,
            ))

    # ---- phases ---------------------------------------------------------------------------
    def _agree_to_stop(self) -> bool:
        """A synchronous MAX all-reduce of the local stop request (between phases)."""
        device = self.plan.device
        flag = torch.tensor([1.0 if self.signals.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item() > 0)

    def run_phase(
        self,
        kind: str,
        count: int,
        on_result: Callable[[StepResult], None],
        profiler: Any = None,
        first_index: int = 1,
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

        def resolve() -> StepResult:
            result = self.stepper.resolve(pending.popleft())
            result.telemetry = self._sample(kind)
            return result

        for index in range(first_index, first_index + count):
            carry_flag = self.signals.requested if kind == TRAIN else None
            pending.append(self.stepper.run(kind, index, stop_requested=carry_flag))
            if profiler is not None:
                profiler.step()
            while len(pending) > lag:
                result = resolve()
                on_result(result)
                if kind == TRAIN:
                    stop = stop or result.stop_requested
                else:
                    stop = self._agree_to_stop()
            if stop:
                break
        while pending:
            on_result(resolve())
        return stop

    def calibrate(self, initial: bool = True) -> bool:
        """Runs one calibration block (GEMM-only steps, then comm-only steps) and makes its
        medians the baseline of the train steps that follow. Returns True on an agreed stop."""
        cal = self.config.calibration
        self.block += 1
        block = self.block
        compute_steps = cal.compute_steps if initial else cal.interval_compute_steps
        comm_steps = cal.comm_steps if initial else cal.interval_comm_steps
        per_gemm: list[list[float]] = []
        compute: list[dict[str, Any]] = []
        comm: list[dict[str, Any]] = []

        def on_compute(result: StepResult) -> None:
            record = {**self._metrics(result), "after_step": self.measured_done}
            compute.append(record)
            if result.times.per_gemm and result.times.gemm:
                per_gemm.append([e - s for s, e in result.times.gemm])

        def on_comm(result: StepResult) -> None:
            self.comm_index += 1
            record = {**self._metrics(result), "step": self.comm_index,
                      "after_step": self.measured_done}
            comm.append(record)
            self._keep_collectives(COMM_PHASE, self.comm_index, result)

        for kind, steps, on_result in ((COMPUTE, compute_steps, on_compute),
                                       (COMM, comm_steps, on_comm)):
            if steps == 0:
                continue
            if initial and cal.warmup_steps and self.run_phase(kind, cal.warmup_steps,
                                                               lambda r: None):
                return True
            if self.run_phase(kind, steps, on_result):
                return True
        self.calibration[COMPUTE] += compute
        self.calibration[COMM] += comm
        if compute:
            solo = median(r["compute_ms"] for r in compute)
            gemms = None
            if per_gemm and all(len(p) == len(per_gemm[0]) for p in per_gemm):
                gemms = tuple(median(column) or 0.0 for column in zip(*per_gemm, strict=True))
            self.baseline = Baseline(block, solo, gemms)
            self.solo_compute_ms = solo
        if initial:
            self._log_calibration(compute, comm)
        return False

    def _log_calibration(self, compute: list[dict[str, Any]], comm: list[dict[str, Any]]) -> None:
        assert self.stack is not None
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
                f"{mib:.2f} MiB: comm {_fmt(median(r['comm_ms'] for r in comm), '.3f', ' ms')}, "
                f"local busbw {_fmt(median(r['local_busbw_gbps'] for r in comm), '.2f', ' GB/s')} "
                f"(median of {len(comm)} steps; the summary's busbw leaves rank skew out)"
            )

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
        self.measured_done = result.index
        self._keep_collectives(TRAIN_PHASE, result.index, result)
        self.step_intervals[result.index] = (result.times.start_run_ms, result.times.gemm)
        max_steps = self.config.training.max_steps
        if result.index % self.config.training.log_interval == 0 or result.index == max_steps:
            slowdown = metrics["contention_slowdown"]
            self.log(
                f"step {result.index}/{max_steps} | iter {_fmt(metrics['iter_ms'], '.3f')} ms"
                f" | compute {_fmt(metrics['compute_ms'], '.3f')} ms"
                f" | comm {_fmt(metrics['comm_ms'], '.3f')} ms"
                f" | exposed {_fmt(metrics['exposed_comm_ms'], '.3f')} ms"
                f" | gemm {_fmt(metrics['gemm_tflops'], '.1f')} TFLOP/s"
                f" | busbw(local) {_fmt(metrics['local_busbw_gbps'], '.2f')} GB/s"
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
            say(warning, sys.stderr)
        if self.point is None:
            if plan.backend == "nccl" and cfg.nccl.capture:
                self.capture = start_capture(self.output_dir, plan.rank, cfg.nccl.subsystems)
            self.flight = start_flight_recorder(self.output_dir, plan, cfg)
            if plan.is_cuda:
                # The CUDA context on its own, so the start-up figures tell it from NCCL's init.
                torch.cuda.set_device(plan.device)
                torch.empty(1, device=plan.device)
                torch.cuda.synchronize(plan.device)
            startup.mark("cuda_context")
            init_distributed(plan, cfg.distributed.timeout_s,
                             high_priority=cfg.comm.stream_priority == "high")
            startup.mark("process_group")
        self.stack = GemmStack(
            cfg.model,
            device=plan.device,
            dtype=plan.dtype,
            seed=cfg.training.seed,
            rank=plan.rank,
            world_size=plan.world_size,
            bucket_mb=cfg.comm.bucket_mb,
        )
        dist.broadcast(self.stack.params, src=0, group=self.group)
        if self.point is None:
            startup.mark("model")
        self.stepper = Stepper(
            self.stack,
            collective=cfg.comm.collective,
            overlap=cfg.comm.overlap,
            lr=cfg.training.lr,
            world_size=plan.world_size,
            granularity=cfg.timing.granularity,
            checksum=cfg.debug.param_checksum,
            stream_priority=cfg.comm.stream_priority,
            delay_ms=cfg.debug.delay_ms if cfg.debug.delay_rank == plan.rank else 0.0,
            delay_every=cfg.debug.delay_every,
            group=self.group,
        )
        self.telemetry = open_telemetry(device_identity(plan.device), cfg.telemetry.enabled)
        self.writer = MetricsWriter(self.output_dir, plan.rank)
        b = self.stack.buckets
        self.log(
            f"train: world {plan.world_size} ({plan.local_world_size}/node), backend "
            f"{plan.backend}, device {device_name(plan.device)}, {cfg.training.dtype}, "
            f"{cfg.model.layers} layers of [{cfg.model.tokens}x{cfg.model.hidden}]x"
            f"[{cfg.model.hidden}x{cfg.model.hidden}], {len(b)} buckets of "
            f"{self.stack.bucket_bytes(b[0]) / 2**20:.2f} MiB, {cfg.comm.collective}, "
            f"overlap={'on' if cfg.comm.overlap else 'off'}, timing={cfg.timing.granularity}, "
            f"comm stream priority {cfg.comm.stream_priority}, telemetry "
            f"{self.telemetry.source or 'none (' + str(self.telemetry.reason) + ')'}"
        )
        if cfg.debug.delay_rank >= 0 and cfg.debug.delay_ms > 0:
            n = cfg.debug.delay_every
            which = "every train step" if n == 1 else f"train steps {n}, {2 * n}, {3 * n}, ..."
            self.log(f"train: debug: rank {cfg.debug.delay_rank} sleeps {cfg.debug.delay_ms:g} ms "
                     f"before the backward pass of {which}")

    def _train(self) -> bool:
        cfg = self.config.training
        if self._agree_to_stop():
            return True
        warmup_started = time.perf_counter()
        # Warm up first: the GPU's clocks settle under load before the solo baselines are
        # taken, so calibration and measured steps run in the same power state.
        if cfg.warmup_steps and self.run_phase(TRAIN, cfg.warmup_steps, lambda r: None):
            return True
        # The all-reduce of the stop flag is the start-of-run barrier the anchor needs.
        if self._agree_to_stop():
            return True
        assert self.stepper is not None
        self.stepper.set_anchor()
        if self.calibrate(initial=True):
            return True
        self.warmup_wall_s = time.perf_counter() - warmup_started
        profiler = self._profiler()
        interval = self.config.calibration.interval_steps
        started = time.perf_counter()
        try:
            if profiler is not None:
                profiler.__enter__()
            while self.measured_done < cfg.max_steps:
                chunk = cfg.max_steps - self.measured_done
                if interval:
                    chunk = min(chunk, interval)
                if self.run_phase(TRAIN, chunk, self.record_step, profiler,
                                  first_index=self.measured_done + 1):
                    return True
                if interval and self.measured_done < cfg.max_steps:
                    block_started = time.perf_counter()
                    stopped = self.calibrate(initial=False)
                    self.calibration_wall_s += time.perf_counter() - block_started
                    if stopped:
                        return True
        finally:
            if profiler is not None:
                profiler.__exit__(None, None, None)
            self.measured_wall_s = time.perf_counter() - started - self.calibration_wall_s
        sampling_started = time.perf_counter()
        try:
            self.launch_delay = self._sample_launch_delay()
        except Exception as exc:  # noqa: BLE001 - an auxiliary figure must not fail the run
            reason = f"launch-delay sampling failed: {type(exc).__name__}: {exc}"
            self.launch_delay = {"samples": [], "reason": reason.splitlines()[0][:300]}
        self.launch_delay_wall_s = time.perf_counter() - sampling_started
        return False

    def _sample_launch_delay(self) -> dict[str, Any]:
        """A few extra train steps, each under torch.profiler, then as many comm-only steps
        under one more (GPU only), after the measured ones so the profiler's cost touches no
        measured step:
        when did each collective kernel start, against the moment its stream reached it, and
        how long did it run (train.launchdelay). The summary takes each collective's queued
        time off the measured steps' stream-event durations (train.kernelactive)."""
        steps = self.config.profiling.launch_delay_steps
        if not self.plan.is_cuda:
            return {"samples": [], "reason": "CPU run: no kernels to profile"}
        if steps == 0:
            return {"samples": [], "reason": "profiling.launch_delay_steps is 0"}
        if self.config.timing.granularity == "step":
            return {"samples": [], "reason": "timing.granularity=step: collectives not timed"}
        assert self.stepper is not None
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        samples = []
        with tempfile.TemporaryDirectory(prefix="launch_delay_") as tmp:
            for i in range(steps):
                index = self.config.training.max_steps + i + 1
                with torch.profiler.profile(activities=activities) as prof:
                    result = self.stepper.resolve(
                        self.stepper.run(TRAIN, index, stop_requested=False))
                # Every rank runs every sampled step whatever its own parsing gives: a rank
                # that stopped early would leave the others in the next step's collectives.
                try:
                    samples.append(self._launch_delay_of(prof, result, Path(tmp) / f"{i}.json"))
                except Exception as exc:  # noqa: BLE001 - one unreadable trace, one sample lost
                    samples.append({"delays": [], "reason": f"trace unreadable: {exc}"[:300],
                                    "kernels": 0, "collective_kernels": 0, "kernel_active": []})
            # The comm-only steps share one profiler session (their kernels pair with their
            # collectives in order, no clock fit needed): one session's cost, not `steps`.
            with torch.profiler.profile(activities=activities) as prof:
                results = [self.stepper.resolve(self.stepper.run(COMM, i + 1))
                           for i in range(steps)]
            try:
                comm_samples = self._kernel_activity_of(prof, results, Path(tmp) / "comm.json")
            except Exception as exc:  # noqa: BLE001 - an unreadable trace loses these samples
                comm_samples = [{"kernel_active": [], "reason": f"trace unreadable: {exc}"[:300]}]
        return {"samples": samples, "comm_samples": comm_samples, "reason": None}

    @staticmethod
    def _timed_ops(result: StepResult) -> list[tuple[str, int, float, float]]:
        times = result.times
        ops = ([times.control] if times.control else []) + list(times.comm or [])
        return [(op.collective, op.bucket, op.start_ms, op.end_ms) for op in ops]

    @staticmethod
    def _kernel_activity_of(prof: Any, results: list[StepResult],
                            path: Path) -> list[dict[str, Any]]:
        """One sample per step of a profiler session that ran these steps back to back."""
        prof.export_chrome_trace(str(path))
        found = kernel_activity_by_step(json.loads(path.read_text()),
                                        [Trainer._timed_ops(result) for result in results])
        return [{"kernel_active": [list(row) for row in step.active], "reason": step.reason}
                for step in found]

    @staticmethod
    def _launch_delay_of(prof: Any, result: StepResult, path: Path) -> dict[str, Any]:
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
        found = launch_delays(trace, result.times.gemm or [], Trainer._timed_ops(result))
        return {
            "delays": [list(d) for d in found.delays],
            "reason": found.reason,
            "kernels": found.kernels_seen,
            "collective_kernels": found.collective_kernels_seen,
            "alignment": found.alignment,
            "alignment_residual_ms": found.alignment_residual_ms,
            "collective_launches": found.collective_launches,
            "kernel_active": [list(a) for a in found.kernel_active],
        }

    def run(self) -> int:
        try:
            self.setup()
            stopped = self._train()
            # Only the agreed decision counts: a signal after the last step changes nothing.
            self.status = "stopped" if stopped else "completed"
        except Exception as exc:  # noqa: BLE001 - any failure ends as status "failed"
            self.status = "failed"
            self.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
            # The line and its traceback in one write: the node's other ranks write to the same log.
            say(f"train: rank {self.rank} failed: {self.error}\n{traceback.format_exc().rstrip()}",
                sys.stderr)
        finally:
            try:
                self._finish()
            finally:
                if self.stepper is not None:
                    self.stepper.close()
                if self.writer is not None:
                    self.writer.close()
                self.telemetry.close()
                if self.flight is not None:
                    self.flight.close()
                try:
                    if self.point is None:  # a pool destroys the point's group itself
                        shutdown_distributed()
                except Exception as exc:  # noqa: BLE001 - the group may already be broken
                    say(f"train: destroy_process_group: {exc}", sys.stderr)
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
            "steps": [
                {k: r.get(k) for k in ("step", "calibration_block", *AGGREGATED)}
                for r in self.step_records
            ],
            "calibration_compute": self.calibration[COMPUTE],
            "calibration_comm": self.calibration[COMM],
            "collectives": pack(self.op_records) if self.stepper and self.stepper.time_comm
            else None,
            "step_intervals": self.step_intervals,
            "launch_delay": self.launch_delay,
            "telemetry": self.telemetry.describe(),
            "comm_stream": self._comm_stream(),
            "status": self.status,
            "measured_wall_s": self.measured_wall_s,
            "effective_settings": self._effective_settings(),
        }

    def _effective_settings(self) -> dict[str, Any] | None:
        """What NCCL built for this rank's point, read back from its debug output (None when
        not captured: the summary says why)."""
        if self.capture is None:
            return None
        try:
            min_ctas = max_ctas = self.point.channels if self.point is not None else None
            asked = asked_from_env(os.environ, min_ctas, max_ctas)
            accelerator = "rocm" if versions().get("hip") else "cuda"
            found = self.capture.effective(asked, os.environ, accelerator)
            # The kernels' own launch configuration (sampled under the profiler, GPU only):
            # evidence beside NCCL's account of what it built.
            found["kernel_launch"] = launch_check(self.launch_delay.get("samples", []),
                                                  found.get("channels"), asked.threads, CONTROL,
                                                  found.get("launch_expectation"))
            found["flags"] = [*found.get("flags", []), *found["kernel_launch"]["flags"]]
            return found
        except Exception as exc:  # noqa: BLE001 - a parse problem must not fail the run
            return {"channels": None, "flags": [f"NCCL debug output unreadable: {exc}"[:300]]}

    def _comm_stream(self) -> dict[str, Any]:
        setting = self.config.comm.stream_priority
        if self.stepper is None or not self.stepper.is_cuda:
            return {"setting": setting, "priority": None, "priority_range": None,
                    "reason": "CPU run: collectives run in a worker thread (no streams)"}
        return {
            "setting": setting,
            "priority": self.stepper.priority,
            "priority_range": list(self.stepper.priority_range or ()),
            "nccl_high_priority_stream": setting == "high",
            "reason": None,
        }

    def _finish(self) -> None:
        report = self._report()
        reports = [report]
        partial = True
        if self.status != "failed" and dist.is_initialized():
            try:
                gathered = gather_json(report, device=self.plan.device, dst=0, group=self.group)
                if gathered is not None:
                    reports = [r for r in gathered if isinstance(r, dict)]
                partial = False
            except Exception as exc:  # noqa: BLE001 - a peer died while gathering
                self.status = "failed"
                self.error = f"gathering rank reports failed: {exc}".splitlines()[0][:500]
        if self.rank != 0:
            return
        statuses = {r["status"] for r in reports}
        status = "failed" if "failed" in statuses else self.status
        analysis = cross_rank_analysis(reports, self.world_size)
        summary = self._summary(reports, status, partial, analysis)
        if analysis.ok:
            write_jsonl_atomic(self.output_dir / COLLECTIVES_NAME, timeline_lines(analysis))
        write_json_atomic(self.output_dir / SUMMARY_NAME, summary)
        steps = len(self.step_records)
        self.log(
            f"train: {status} after {steps}/{self.config.training.max_steps} measured steps; "
            f"summary in {self.output_dir / SUMMARY_NAME}"
        )
        slowest = summary.get("slowest_rank")
        if slowest and self.world_size > 1:
            waited = slowest.get("caused_wait_ms_median")
            self.log(
                f"train: slowest rank {slowest['rank']} ({slowest.get('host')}), by "
                f"{slowest['by']}: the others waited {_fmt(waited, '.3f', ' ms')} per step for "
                f"it; busbw {_fmt(_median_of(summary, 'stream_busbw_gbps'), '.2f', ' GB/s')} "
                f"from stream events, "
                f"{_fmt(_median_of(summary, 'kernel_busbw_gbps'), '.2f', ' GB/s')} "
                f"kernel-active (rank skew left out)"
            )

    def _summary(self, reports: list[dict[str, Any]], status: str, partial: bool,
                 analysis: Any) -> dict[str, Any]:
        cfg, stack = self.config, self.stack
        aggregates = aggregate(reports, world_size=self.world_size,
                               sample_every=cfg.telemetry.sample_every, analysis=analysis)
        steps_done = len(self.step_records)
        model: dict[str, Any] = {}
        if stack is not None:
            model = {
                "gemm_count_per_step": stack.gemm_count,
                "gemm_flops_per_step": stack.gemm_flops,
                "bucket_count": len(stack.buckets),
                "bucket_bytes": [stack.bucket_bytes(b) for b in stack.buckets],
                # the layers (forward numbering) each bucket holds: it goes out after the dW
                # of the last one listed
                "bucket_layers": [
                    [stack.layers - 1 - p for p in range(b.layers[0], b.layers[1] + 1)]
                    for b in stack.buckets
                ],
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
            "comm_stream_priority": cfg.comm.stream_priority,
            "calibration_interval_steps": cfg.calibration.interval_steps,
            "max_steps": cfg.training.max_steps,
            "steps_completed": steps_done,
            "measured_wall_s": self.measured_wall_s,
            "calibration_wall_s": round(self.calibration_wall_s, 6),
            "warmup_wall_s": _rounded(self.warmup_wall_s),
            "launch_delay_wall_s": _rounded(self.launch_delay_wall_s),
            # The clock the sweep's teardown account starts from (finished_at is whole seconds).
            "finished_unix": round(time.time(), 3),
            "steps_per_s": (
                steps_done / self.measured_wall_s if steps_done and self.measured_wall_s else None
            ),
            **aggregates,
            "model": model,
            "versions": versions(),
            "config_file": cfg.source,
            "overrides": list(cfg.overrides),
            "config": cfg.to_dict(),
            "effective_settings": self._effective_summary(reports),
            "pool": self.point.info if self.point is not None else None,
            # A pool point starts in a running process: its start-up is the pool's.
            "startup": startup.startup_section(self._first_step_unix())
            if self.point is None else None,
        }

    def _first_step_unix(self) -> float | None:
        times = [r["wall_time"] for r in self.step_records if r.get("wall_time") is not None]
        # wall_time is stamped when the step was read back: the first step's start is its
        # stamp minus its own duration.
        if not times:
            return None
        first = self.step_records[0]
        return times[0] - (first.get("iter_ms") or 0.0) / 1e3

    def _effective_summary(self, reports: list[dict[str, Any]]) -> dict[str, Any]:
        cfg = self.config
        if self.plan.backend != "nccl":
            return {"capture": f"off: {self.plan.backend} backend (NCCL not used; channel and "
                               "thread variables are no-ops)", "channels": None, "flags": []}
        if not cfg.nccl.capture:
            return {"capture": "off: nccl.capture is false", "channels": None, "flags": []}
        by_rank: dict[int, Any] = {r.get("rank"): r.get("effective_settings") for r in reports}
        per_rank = [by_rank.get(rank) for rank in range(self.world_size)]
        return {"capture": "on", **summarize_ranks(per_rank)}
