#!/usr/bin/env python3
"""GPU benchmark of the train package: is the loop's GEMM as fast as bare cuBLAS, and what
do its timing and logging cost?

In one process, on one GPU (world size 1, NCCL):
  1. checks one step's GEMM results against an fp32 reference;
  2. times bare ``torch.mm`` for the configured shapes (forward NN, dW TN, dX NT, and the
     step's whole sequence of 3L-1 GEMMs back to back) against the loop's GEMM-only
     calibration step (same GEMMs through train.stepper, CUDA events around each), in
     alternating rounds, and prints both and their ratio;
  3. runs the full training step loop (forward, bucketed all_reduce on the comm stream,
     update) with every record on (per-GEMM and per-collective events, the control
     all-reduce's events, each collective's enqueue time and run-timeline record, NVML clock,
     power and temperature every step, metrics and a jsonl line) against the same loop with
     only the step's start/end events, no telemetry and no logging: the difference is the
     measurement cost;
  4. times NVML's three readings, and the launch-delay sampling (train steps under
     torch.profiler) the trainer runs after the measured steps.
Then, unless --no-cli, it runs ``torchrun --nproc_per_node 1 -m train`` on the config (and a
few short variants: reduce_scatter, all_gather without overlap, phase timing with the
profiler, a debug delay with the comm stream at default priority) and reports their
summaries.

Usage (from the repo root, on a GPU machine):
    python3 scripts/bench_gemm.py [--config config/multi_node/distributed_multinode.yaml]
        [--override key=value ...] [--out DIR]
Results: a table on stdout, bench.json (and the CLI run's summary) under --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from train.config import load_config  # noqa: E402  (after the path fix above)

DEFAULT_CONFIG = REPO / "config" / "multi_node" / "distributed_multinode.yaml"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--override", action="extend", nargs="+", default=[])
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds per comparison")
    p.add_argument("--reps", type=int, default=10, help="steps/sequences per round")
    p.add_argument("--loop-steps", type=int, default=40, help="train steps per loop round")
    p.add_argument("--cli-steps", type=int, default=100)
    p.add_argument("--no-cli", action="store_true", help="skip the torchrun runs")
    p.add_argument("--allow-cpu", action="store_true", help="run on the CPU (to test the script)")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_in_process(args: argparse.Namespace, out: Path, work: Path) -> dict[str, Any]:
    import torch

    from train.intervals import union_length
    from train.runtime import device_name, plan_runtime, versions
    from train.signals import StopSignals
    from train.stepper import COMPUTE, TRAIN, Stepper
    from train.telemetry import unavailable
    from train.trainer import Trainer

    config = load_config(
        args.config,
        [*args.override, f"training.output_dir={work / 'inproc'}", "training.log_interval=1000000"],
    )
    plan = plan_runtime(config)
    if not plan.is_cuda and not args.allow_cpu:
        raise SystemExit("bench_gemm: needs a GPU (the config resolved to the CPU)")
    trainer = Trainer(config, plan, StopSignals())
    trainer.setup()
    stack = trainer.stack
    assert stack is not None and trainer.stepper is not None
    # The run timeline: from here on every collective is recorded for the cross-rank analysis.
    trainer.stepper.set_anchor()
    L, T, H = stack.layers, stack.tokens, stack.hidden
    dtype, device = stack.dtype, stack.device
    flops_gemm = 2.0 * T * H * H
    result: dict[str, Any] = {
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "config": config.to_dict(),
        "gemm_count": stack.gemm_count,
        "gemm_shape": f"[{T}x{H}]x[{H}x{H}] {config.training.dtype}",
    }

    # 1. correctness: one GEMM-only step, the last layer's dW and the first layer's output
    # against fp32 references from the same (bf16) operands.
    stepper = trainer.stepper
    stepper.resolve(stepper.run(COMPUTE, 1))
    ref_dw = stack.activations[L - 1].float().t() @ stack.upstream_grad.float()
    ref_y1 = stack.inputs.float() @ stack.weight(0).float()
    y1 = stack.activations[1] if L > 1 else stack.output

    def rel_err(x: Any, ref: Any) -> float:
        return float((x.float() - ref).norm() / ref.norm())

    result["check"] = {
        "dW_last_rel_err": rel_err(stack.grad(L - 1), ref_dw),
        "y_first_rel_err": rel_err(y1, ref_y1),
        "finite": bool(torch.isfinite(stack.grads).all() and torch.isfinite(stack.output).all()),
    }
    del ref_dw, ref_y1

    # 2. bare torch.mm vs the loop's GEMM-only step
    gen = torch.Generator(device=device).manual_seed(99)
    x = torch.randn(T, H, dtype=dtype, device=device, generator=gen)
    w = torch.randn(H, H, dtype=dtype, device=device, generator=gen) / H**0.5
    dy = torch.randn(T, H, dtype=dtype, device=device, generator=gen)
    shapes = {
        "forward_NN": lambda: torch.mm(x, w),
        "dW_TN": lambda: torch.mm(x.t(), dy),
        "dX_NT": lambda: torch.mm(dy, w.t()),
    }
    sequence = [shapes["forward_NN"]] * L
    for layer in reversed(range(L)):
        sequence.append(shapes["dW_TN"])
        if layer > 0:
            sequence.append(shapes["dX_NT"])
    seq_flops = flops_gemm * len(sequence)
    assert len(sequence) == stack.gemm_count

    def time_calls(calls: list[Any], reps: int) -> list[float]:
        times = []
        for _ in range(reps):
            if not plan.is_cuda:
                t0 = time.perf_counter()
                for call in calls:
                    call()
                times.append((time.perf_counter() - t0) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for call in calls:
                call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times

    def make_stepper(granularity: str) -> Stepper:
        st = Stepper(
            stack,
            collective=config.comm.collective,
            overlap=config.comm.overlap,
            lr=config.training.lr,
            world_size=plan.world_size,
            granularity=granularity,
            checksum=False,
            stream_priority=config.comm.stream_priority,
        )
        st.set_anchor()
        return st

    def loop_compute(st: Stepper, reps: int) -> tuple[list[float], list[float]]:
        compute, iters = [], []
        for i in range(reps):
            r = st.resolve(st.run(COMPUTE, i))
            iters.append(r.times.iter_ms)
            if r.times.gemm is not None:
                compute.append(union_length(r.times.gemm))
        return compute, iters

    def with_events(timing: bool) -> list[Any]:
        """The bare sequence with two events between GEMMs, as per-GEMM timing records."""
        events = [torch.cuda.Event(enable_timing=timing) for _ in range(2 * len(sequence))]
        calls: list[Any] = []
        for i, call in enumerate(sequence):
            calls += [events[2 * i].record, call, events[2 * i + 1].record]
        return calls

    steppers = {"gemm": stepper, "phase": make_stepper("phase"), "step": make_stepper("step")}
    variants: dict[str, Any] = {"bare": lambda n: (time_calls(sequence, n), None)}
    if plan.is_cuda:
        timed_calls, plain_calls = with_events(True), with_events(False)
        variants["bare+timing_events"] = lambda n: (time_calls(timed_calls, n), None)
        variants["bare+plain_events"] = lambda n: (time_calls(plain_calls, n), None)
    for name, st in steppers.items():
        variants[f"loop[{name}]"] = lambda n, st=st: loop_compute(st, n)[::-1]
    # iteration time and (for the loop's gemm/phase timing) the union of GEMM intervals
    iter_ms: dict[str, list[float]] = {k: [] for k in variants}
    union_ms: dict[str, list[float]] = {k: [] for k in variants}
    for fn in variants.values():
        fn(3)  # warm up cuBLAS handles and heuristics
    per_shape: dict[str, list[float]] = {k: [] for k in shapes}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            iters, unions = fn(args.reps)
            iter_ms[name] += iters
            union_ms[name] += unions or []
        for name, call in shapes.items():
            per_shape[name] += [t / 10 for t in time_calls([call] * 10, 2)]
    med = statistics.median
    bare_ms = med(iter_ms["bare"])
    bare_tflops = seq_flops / (bare_ms * 1e-3) / 1e12
    loop_ms = med(union_ms["loop[gemm]"])
    loop_tflops = seq_flops / (loop_ms * 1e-3) / 1e12
    result["gemm"] = {
        "bare_sequence_ms": bare_ms,
        "bare_sequence_tflops": bare_tflops,
        "bare_per_shape_tflops": {
            k: flops_gemm / (med(v) * 1e-3) / 1e12 for k, v in per_shape.items()
        },
        "loop_compute_ms": loop_ms,
        "loop_compute_tflops": loop_tflops,
        "ratio_loop_over_bare": loop_tflops / bare_tflops,
        "iter_ms_median": {k: med(v) for k, v in iter_ms.items()},
        "iter_over_bare": {k: med(v) / bare_ms for k, v in iter_ms.items()},
        "compute_union_ms_median": {k: med(v) for k, v in union_ms.items() if v},
        "iter_ms_minmax": {k: [min(v), max(v)] for k, v in iter_ms.items()},
    }

    # 4a. NVML: what one step's three readings cost on the host
    telemetry = trainer.telemetry
    samples = []
    t0 = time.perf_counter()
    for _ in range(300):
        samples.append(telemetry.sample())
    sample_us = (time.perf_counter() - t0) / 300 * 1e6
    result["telemetry"] = {
        **telemetry.describe(),
        "sample_cost_us": sample_us,
        "first_sample": samples[0],
    }

    # 3. the full loop: every record on vs bare (step events only, no telemetry, no logging)
    trainer.calibrate()
    trainer.run_phase(TRAIN, 5, lambda r: None)
    bookkeeping: list[float] = []

    def record(r: Any) -> None:
        t0 = time.perf_counter()
        trainer.record_step(r)
        bookkeeping.append((time.perf_counter() - t0) * 1e3)

    # measured variants log every step (metrics + jsonl line); "bare" only reads iter_ms
    loop_variants = [("gemm", True), ("phase", True), ("step", False)]
    wall: dict[str, list[float]] = {g: [] for g, _ in loop_variants}
    gpu_iter: dict[str, list[float]] = {g: [] for g, _ in loop_variants}
    compute: dict[str, list[float]] = {g: [] for g, _ in loop_variants}
    for _ in range(args.rounds):
        for granularity, logs in loop_variants:
            trainer.stepper = steppers[granularity]
            trainer.telemetry = telemetry if logs else unavailable("bench: the bare loop")
            first = len(trainer.step_records)
            if logs:
                collect = record
            else:
                collect = lambda r, g=granularity: gpu_iter[g].append(r.times.iter_ms)  # noqa: E731
            t0 = time.perf_counter()
            trainer.run_phase(TRAIN, args.loop_steps, collect)
            wall[granularity].append((time.perf_counter() - t0) * 1e3 / args.loop_steps)
            for r in trainer.step_records[first:]:
                gpu_iter[granularity].append(r["iter_ms"])
                if r["compute_ms"] is not None:
                    compute[granularity].append(r["compute_ms"])
    bare_wall = med(wall["step"])
    result["loop"] = {
        "steps_per_round": args.loop_steps,
        "rounds": args.rounds,
        "wall_ms_per_step": {g: med(v) for g, v in wall.items()},
        "overhead_vs_bare": {g: med(v) / bare_wall - 1.0 for g, v in wall.items()},
        "gpu_iter_ms_median": {g: med(v) for g, v in gpu_iter.items()},
        "compute_ms_median": {g: med(v) for g, v in compute.items() if v},
        "gemm_tflops_median": {
            g: seq_flops / (med(v) * 1e-3) / 1e12 for g, v in compute.items() if v
        },
        "wall_rounds": wall,
        "solo_compute_ms": trainer.solo_compute_ms,
        "host_bookkeeping_ms_per_step_median": med(bookkeeping),
        "peak_memory_gib": (
            torch.cuda.max_memory_allocated(device) / 2**30 if plan.is_cuda else 0.0
        ),
    }
    trainer.telemetry = telemetry
    measured = [r for r in trainer.step_records if r.get("sm_clock_mhz") is not None]
    result["loop"]["records"] = {
        "collective_records": len(trainer.op_records),
        "steps_with_telemetry": len(measured),
        "steps_logged": len(trainer.step_records),
        "sm_clock_mhz_median": med([r["sm_clock_mhz"] for r in measured]) if measured else None,
        "power_w_median": med([r["power_w"] for r in measured if r["power_w"] is not None])
        if measured else None,
        "temperature_c_median": med(
            [r["temperature_c"] for r in measured if r["temperature_c"] is not None])
        if measured else None,
        "control_ms_median": med([r["control_ms"] for r in trainer.step_records
                                  if r.get("control_ms") is not None] or [float("nan")]),
        "comm_stream": trainer._comm_stream(),
    }

    # 4b. launch delay: extra train steps under torch.profiler, as the trainer runs them
    trainer.stepper = stepper
    t0 = time.perf_counter()
    launch = trainer._sample_launch_delay()
    result["launch_delay"] = {**launch, "wall_s": time.perf_counter() - t0}
    if plan.is_cuda:
        # One more, its trace kept with the step's own event times: the parser can be checked
        # against a real trace off the GPU machine.
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            r = stepper.resolve(stepper.run(TRAIN, 10**6, stop_requested=False))
        sample = Trainer._launch_delay_of(prof, r, out / "launch_delay_trace.json")
        ops = ([r.times.control] if r.times.control else []) + list(r.times.comm or [])
        (out / "launch_delay_events.json").write_text(json.dumps({
            "gemm_ms": r.times.gemm,
            "ops": [[op.collective, op.bucket, op.start_ms, op.end_ms] for op in ops],
            "parsed": sample,
        }))

    trainer.stepper = stepper
    for st in steppers.values():
        st.close()
    if trainer.writer is not None:
        trainer.writer.close()
    from train.runtime import shutdown_distributed

    shutdown_distributed()
    return result


def run_cli(name: str, out_dir: Path, config: str, overrides: list[str]) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "1",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "train",
        "--config",
        config,
        "--override",
        f"training.output_dir={out_dir}",
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
    )
    wall = time.perf_counter() - t0
    entry: dict[str, Any] = {
        "name": name,
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "overrides": overrides,
    }
    summary_path = out_dir / "summary.json"
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        pick = lambda k: (s.get(k) or {}).get("median")  # noqa: E731
        entry.update(
            status=s["status"],
            steps=s["steps_completed"],
            iter_ms=pick("iter_ms"),
            compute_ms=pick("compute_ms"),
            gemm_tflops=pick("gemm_tflops"),
            comm_ms=pick("comm_ms"),
            exposed_comm_ms=pick("exposed_comm_ms"),
            contention_slowdown=pick("contention_slowdown"),
            steps_per_s=s.get("steps_per_s"),
            solo_tflops=((s.get("solo") or {}).get("gemm_tflops") or {}).get("median"),
            gemm_contention_slowdown=pick("gemm_contention_slowdown"),
            overlapped_gemm_fraction=pick("overlapped_gemm_fraction"),
            stream_collective_ms=pick("stream_collective_ms"),
            stream_busbw_gbps=pick("stream_busbw_gbps"),
            kernel_collective_ms=pick("kernel_collective_ms"),
            kernel_busbw_gbps=pick("kernel_busbw_gbps"),
            kernel_active=s.get("kernel_active"),
            wait_ms=pick("wait_ms"),
            control_ms=pick("control_ms"),
            reduce_local_ms=pick("reduce_local_ms"),
            sm_clock_mhz=pick("sm_clock_mhz"),
            power_w=pick("power_w"),
            temperature_c=pick("temperature_c"),
            telemetry_source=(s.get("telemetry") or {}).get("source"),
            clock_drift=(s.get("telemetry") or {}).get("clock_drift"),
            clock_drift_flag=(s.get("telemetry") or {}).get("clock_drift_flag"),
            clock_drift_tolerance=(s.get("telemetry") or {}).get("tolerance"),
            launch_delay=s.get("launch_delay_ms"),
            comm_stream=s.get("comm_stream"),
            null_reasons=s.get("null_reasons"),
            calibration_blocks=len((s.get("calibration_blocks") or {}).get("blocks", [])),
        )
    traces = list((out_dir / "torch_profiler").glob("*.json"))
    if traces:
        entry["profiler_traces"] = [f"{t.name} ({t.stat().st_size // 1024} KiB)" for t in traces]
    if proc.returncode != 0:
        entry["stderr_tail"] = proc.stderr[-1500:]
    entry["stdout_tail"] = proc.stdout[-600:]
    return entry


def main() -> int:
    args = parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_gemm_"))
    t0 = time.perf_counter()
    result = bench_in_process(args, out, work)
    result["in_process_wall_s"] = round(time.perf_counter() - t0, 1)

    if not args.no_cli:
        steps = str(args.cli_steps)
        runs = [
            ("default", [f"training.max_steps={steps}", *args.override]),
            (
                "reduce_scatter",
                [
                    "training.max_steps=20",
                    "comm.collective=reduce_scatter",
                    "calibration.compute_steps=3",
                    "calibration.comm_steps=3",
                ],
            ),
            (
                "all_gather_no_overlap",
                [
                    "training.max_steps=20",
                    "comm.collective=all_gather",
                    "comm.overlap=false",
                    "calibration.compute_steps=3",
                    "calibration.comm_steps=3",
                ],
            ),
            (
                "phase_timing_profiler",
                [
                    "training.max_steps=20",
                    "timing.granularity=phase",
                    "profiling.enabled=true",
                    "profiling.wait=2",
                    "profiling.warmup=1",
                    "profiling.active=2",
                    "calibration.compute_steps=3",
                    "calibration.comm_steps=3",
                ],
            ),
            (
                "delay_5ms_priority_default",
                [
                    "training.max_steps=20",
                    "debug.delay_rank=0",
                    "debug.delay_ms=5",
                    "comm.stream_priority=default",
                    "calibration.compute_steps=3",
                    "calibration.comm_steps=3",
                ],
            ),
        ]
        result["cli"] = []
        for name, overrides in runs:
            entry = run_cli(name, work / name, args.config, overrides)
            result["cli"].append(entry)
            print(
                f"cli {name}: rc={entry['rc']} status={entry.get('status')} "
                f"iter={entry.get('iter_ms')} ms wall={entry['wall_s']} s",
                flush=True,
            )
        default_dir = work / "default"
        for fname in ("summary.json", "rank_00_metrics.jsonl"):
            if (default_dir / fname).exists():
                shutil.copy(default_dir / fname, out / f"cli_default_{fname}")

    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    g, loop = result["gemm"], result["loop"]
    print("\n=== bench_gemm ===")
    print(
        f"device {result['device']}  torch {result['versions']['torch']}  "
        f"nccl {result['versions'].get('nccl')}  {result['date']}"
    )
    print(f"shape {result['gemm_shape']}, {result['gemm_count']} GEMMs/step")
    print(
        f"check: dW rel err {result['check']['dW_last_rel_err']:.2e}, "
        f"y rel err {result['check']['y_first_rel_err']:.2e}, finite {result['check']['finite']}"
    )
    for k, v in g["bare_per_shape_tflops"].items():
        print(f"bare torch.mm {k:12s} {v:8.1f} TFLOP/s")
    print(
        f"bare sequence       {g['bare_sequence_ms']:8.3f} ms  "
        f"{g['bare_sequence_tflops']:8.1f} TFLOP/s"
    )
    print(
        f"loop GEMM-only      {g['loop_compute_ms']:8.3f} ms  "
        f"{g['loop_compute_tflops']:8.1f} TFLOP/s  (union of per-GEMM event intervals)"
    )
    print(f"RATIO loop/bare     {g['ratio_loop_over_bare']:.4f}")
    print("GEMM-only step, iteration time vs the bare sequence:")
    for k, v in g["iter_ms_median"].items():
        print(f"  {k:22s} {v:8.3f} ms  x{g['iter_over_bare'][k]:.4f}")
    print(
        f"full loop ({loop['steps_per_round']} steps x {loop['rounds']} rounds), wall ms/step, "
        f"GPU iter ms, overhead vs bare (step events, no logging):"
    )
    for k, v in loop["wall_ms_per_step"].items():
        print(
            f"  timing={k:6s} wall {v:8.3f}  iter {loop['gpu_iter_ms_median'][k]:8.3f}  "
            f"overhead {loop['overhead_vs_bare'][k] * 100:+.2f}%  "
            f"tflops {loop['gemm_tflops_median'].get(k, float('nan')):.1f}"
        )
    print(
        f"  solo compute {loop['solo_compute_ms']:.3f} ms; host bookkeeping "
        f"{loop['host_bookkeeping_ms_per_step_median']:.3f} ms/step (overlapped with the GPU); "
        f"peak mem {loop['peak_memory_gib']:.1f} GiB"
    )
    tel, rec = result["telemetry"], loop["records"]
    why = f" ({tel['reason']})" if tel["reason"] else ""
    print(
        f"telemetry {tel['source']}{why}: 3 readings {tel['sample_cost_us']:.1f} us "
        f"per step; first {tel['first_sample']}; measured steps: SM {rec['sm_clock_mhz_median']} "
        f"MHz, {rec['power_w_median']} W, {rec['temperature_c_median']} C "
        f"({rec['steps_with_telemetry']}/{rec['steps_logged']} steps)"
    )
    print(
        f"records: {rec['collective_records']} collectives kept; control all-reduce "
        f"{rec['control_ms_median']:.4f} ms; comm stream {rec['comm_stream']}"
    )
    ld = result["launch_delay"]
    print(
        f"launch delay sampling: {len(ld['samples'])} steps in {ld['wall_s']:.2f} s: "
        + "; ".join(f"{x['kernels']} kernels, {x['collective_kernels']} collective, "
                    f"delays {x['delays'][:3]} {x['reason'] or ''}" for x in ld["samples"])
    )
    for entry in result.get("cli", []):
        print(
            f"cli {entry['name']:24s} rc={entry['rc']} {entry.get('status')} "
            f"iter={entry.get('iter_ms')} compute={entry.get('compute_ms')} "
            f"tflops={entry.get('gemm_tflops')} solo={entry.get('solo_tflops')} "
            f"comm={entry.get('comm_ms')} exposed={entry.get('exposed_comm_ms')} "
            f"wall={entry['wall_s']}s {entry.get('profiler_traces', '')}"
        )
        print(
            f"    gemm_contention={entry.get('gemm_contention_slowdown')} "
            f"overlapped={entry.get('overlapped_gemm_fraction')} "
            f"collective stream={entry.get('stream_collective_ms')} "
            f"kernel={entry.get('kernel_collective_ms')} busbw stream="
            f"{entry.get('stream_busbw_gbps')} kernel={entry.get('kernel_busbw_gbps')} "
            f"wait={entry.get('wait_ms')} control={entry.get('control_ms')} "
            f"reduce_local={entry.get('reduce_local_ms')} SM={entry.get('sm_clock_mhz')} "
            f"P={entry.get('power_w')} T={entry.get('temperature_c')} "
            f"src={entry.get('telemetry_source')} drift={entry.get('clock_drift')} "
            f"(flag {entry.get('clock_drift_flag')}, tolerance "
            f"{entry.get('clock_drift_tolerance')}) "
            f"blocks={entry.get('calibration_blocks')}\n"
            f"    launch_delay={entry.get('launch_delay')}\n    comm_stream="
            f"{entry.get('comm_stream')} null={entry.get('null_reasons')}"
        )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
