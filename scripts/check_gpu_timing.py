#!/usr/bin/env python3
"""GPU checks of issue 23's timing findings 4-7 (runs on the device; --allow-cpu: gloo plumbing).

    python3 scripts/check_gpu_timing.py [--nproc N] [--config FILE] [--out DIR] [--allow-cpu]

N ranks (default: every visible GPU; the kernel-active figures need N >= 2: at world size 1
NCCL launches no collective kernel):

1. control (finding 7): N ranks run train steps the way the trainer does (queued one step ahead
   on GPU) and record, per steady-state step, where the stop-flag all-reduce started against the
   step's own start event. It must start at or after it (>= 0 ms): before the fix the comm stream
   ran it right after the previous step's last bucket, before the step began (negative).
2. run (findings 4-6): `torchrun --nproc_per_node N -m train` on the config, then from its
   summary.json: kernel-active collective time and busbw present (N >= 2) and consistent with the
   stream-event figures (kernel <= stream time, kernel busbw >= stream busbw), the estimate for the
   measured steps against the profiled steps' exact kernel time, the queued time; the buckets'
   layers (one layer per bucket on the default at any N, e.g. N = 3 or 6, which divide no
   layer); the clock-drift fields read at the end of every step and the calibration's own
   variation.

Prints one `CHECK name value PASS|FAIL|INFO` line per figure, writes check.json to --out and
exits 1 when a check fails. No Fabric needed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_CONFIG = ROOT / "config" / "multi_node" / "distributed_multinode.yaml"
CPU_CONFIG = ROOT / "config" / "multi_node" / "cpu_tiny.yaml"
CONTROL_STEPS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def control_worker(config_path: str, out: Path) -> None:
    """One rank of check 1 (started by torchrun): steady-state train steps, control starts."""
    from train.config import load_config
    from train.runtime import plan_runtime, shutdown_distributed
    from train.signals import StopSignals
    from train.stepper import TRAIN
    from train.trainer import Trainer

    with tempfile.TemporaryDirectory(prefix="check_control_") as tmp:
        config = load_config(config_path, [f"training.output_dir={tmp}/out",
                                           "training.log_interval=1000000"])
        runtime = plan_runtime(config)
        trainer = Trainer(config, runtime, StopSignals())
        trainer.setup()
        assert trainer.stepper is not None
        trainer.stepper.set_anchor()
        results: list[Any] = []
        trainer.run_phase(TRAIN, CONTROL_STEPS, results.append)
        starts = [r.times.control.start_ms if r.times.control else None for r in results]
        firsts = [r.times.comm[0].start_ms if r.times.comm else None for r in results]
        ends = [r.times.control.end_ms if r.times.control else None for r in results]
        trainer.stepper.close()
        if trainer.writer is not None:
            trainer.writer.close()
        shutdown_distributed()
    (out / f"control_rank_{runtime.rank:02d}.json").write_text(json.dumps(
        {"rank": runtime.rank, "cuda": runtime.is_cuda, "control_start_ms": starts,
         "control_end_ms": ends, "first_bucket_start_ms": firsts}))


class Checks:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, name: str, value: Any, ok: bool | None) -> None:
        verdict = "INFO" if ok is None else ("PASS" if ok else "FAIL")
        self.rows.append({"check": name, "value": value, "verdict": verdict})
        print(f"CHECK {name} {json.dumps(value, default=str)[:400]} {verdict}", flush=True)

    @property
    def failed(self) -> bool:
        return any(r["verdict"] == "FAIL" for r in self.rows)


def check_control(checks: Checks, nproc: int, config: str, out: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(
        torchrun(nproc, str(Path(__file__).resolve()), "--worker", "control", "--config", config,
                 "--out", str(out)),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        checks.add("control.run", proc.stderr[-1500:], False)
        return
    for rank in range(nproc):
        data = json.loads((out / f"control_rank_{rank:02d}.json").read_text())
        steady = data["control_start_ms"][1:]  # step 1 follows an idle comm stream either way
        checks.add(f"control.rank{rank}.start_ms_min_steady", min(steady), min(steady) >= 0.0)
        ends, firsts = data["control_end_ms"][1:], data["first_bucket_start_ms"][1:]
        before = all(e <= f for e, f in zip(ends, firsts, strict=True) if f is not None)
        checks.add(f"control.rank{rank}.ends_before_first_bucket", before, before)


def median_of(summary: dict[str, Any], *keys: str) -> Any:
    value: Any = summary
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value.get("median") if isinstance(value, dict) else value


def check_run(checks: Checks, nproc: int, config: str, out: Path, env: dict[str, str],
              cuda: bool) -> None:
    run_dir = out / "run"
    overrides = ["training.max_steps=40", "calibration.interval_steps=20",
                 "profiling.launch_delay_steps=3"]
    proc = subprocess.run(
        torchrun(nproc, "-m", "train", "--config", config, "--override",
                 f"training.output_dir={run_dir}", *overrides),
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    checks.add("run.rc", proc.returncode, proc.returncode == 0)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        checks.add("run.summary", proc.stderr[-1500:], False)
        return
    summary = json.loads(summary_path.read_text())
    reasons = summary.get("null_reasons") or {}
    model = summary.get("model") or {}
    layers = (summary.get("config") or {}).get("model", {}).get("layers")
    buckets = model.get("bucket_layers")
    checks.add("buckets.layers", buckets,
               buckets == [[layer] for layer in reversed(range(layers))] if layers else None)
    stream_ms = median_of(summary, "stream_collective_ms")
    kernel_ms = median_of(summary, "kernel_collective_ms")
    stream_bw = median_of(summary, "stream_busbw_gbps")
    kernel_bw = median_of(summary, "kernel_busbw_gbps")
    sampled = (summary.get("kernel_active") or {}).get("sampled") or {}
    checks.add("stream.collective_ms", stream_ms, stream_ms is not None)
    checks.add("stream.busbw_gbps", stream_bw, (stream_bw is not None) if nproc > 1 else None)
    if not cuda or nproc < 2:
        why = reasons.get("kernel_busbw_gbps")
        checks.add("kernel.null_reason", why, bool(why) and kernel_bw is None)
    else:
        checks.add("kernel.collective_ms", kernel_ms, kernel_ms is not None)
        checks.add("kernel.busbw_gbps", kernel_bw, kernel_bw is not None)
        if kernel_ms is not None and stream_ms is not None:
            checks.add("kernel.collective_ms<=stream", [kernel_ms, stream_ms],
                       kernel_ms <= stream_ms * 1.001)
        if kernel_bw is not None and stream_bw is not None:
            checks.add("kernel.busbw>=stream", [kernel_bw, stream_bw],
                       kernel_bw >= stream_bw * 0.999)
        exact = median_of(sampled, "collective_ms")
        if exact and kernel_ms:
            # the measured steps' estimate against the profiled steps' own kernels
            checks.add("kernel.estimate_over_sampled", round(kernel_ms / exact, 4),
                       0.8 <= kernel_ms / exact <= 1.25)
        checks.add("kernel.sampled", sampled, None)
        checks.add("kernel.queued_ms", (summary.get("kernel_active") or {}).get("queued_ms"), None)
        for key in ("kernel_comm_slowdown", "stream_comm_slowdown", "kernel_overlap_ms",
                    "overlap_ms", "kernel_overlap_fraction", "overlap_fraction"):
            checks.add(key, median_of(summary, key), None)
    telemetry = summary.get("telemetry") or {}
    checks.add("telemetry.phase", telemetry.get("phase"), bool(telemetry.get("phase")))
    for key in ("clock_drift", "calibration_variation", "tolerance", "clock_drift_flag"):
        checks.add(f"telemetry.{key}", telemetry.get(key),
                   (telemetry.get(key) is not None) if cuda and key != "clock_drift_flag" else None)
    checks.add("launch_delay_ms", summary.get("launch_delay_ms"), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None, help="ranks (default: visible GPUs)")
    p.add_argument("--config", default=None)
    p.add_argument("--out", default=os.environ.get("OUT") or "check_gpu_timing_out")
    p.add_argument("--allow-cpu", action="store_true", help="gloo ranks on the CPU (plumbing)")
    p.add_argument("--worker", choices=["control"], help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker == "control":
        control_worker(args.config, out)
        return 0
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        raise SystemExit("check_gpu_timing: no GPU (--allow-cpu runs the gloo plumbing)")
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 3)
    config = args.config or str(DEFAULT_CONFIG if cuda else CPU_CONFIG)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    checks = Checks()
    checks.add("setup", {"nproc": nproc, "cuda": cuda, "config": config,
                         "torch": torch.__version__,
                         "device": torch.cuda.get_device_name(0) if cuda else "cpu"}, None)
    check_control(checks, nproc, config, out, env)
    check_run(checks, nproc, config, out, env, cuda)
    (out / "check.json").write_text(json.dumps(checks.rows, indent=2, default=str) + "\n")
    print(f"check_gpu_timing: {'FAILED' if checks.failed else 'passed'} "
          f"({len(checks.rows)} checks, {out / 'check.json'})")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
