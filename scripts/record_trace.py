#!/usr/bin/env python3
"""Record small, real PyTorch profiler traces, each with the workload's own event-based
figures beside it, and check tasks/lib/traces.py against them (GPU or CPU).

    python3 scripts/record_trace.py [--out tests/unit/data/traces] [--steps 6]
        [--size 4096] [--no-train] [--train-config FILE]

Workloads (one process, one device, no torch.distributed needed):

1. ``gemm_copy``: every profiled step runs GEMMs on the default stream; in the second half of
   the steps a dtype-converting copy kernel (an SM-using, bandwidth-bound kernel, standing in
   for a collective at world size 1) runs on a side stream at the same time. CUDA events
   around every GEMM and the copy give the loop's own figures per step: compute (union of
   the GEMMs), "communication" (the copy), hidden, exposed, and the GEMMs' slowdown while the
   copy ran against the same GEMMs alone. On CPU: GEMMs only, wall time per step.
2. ``train`` (GPU; --no-train skips it): `python -m train` on one GPU with its torch profiler
   on; its rank_00_metrics.jsonl holds the loop's event-based compute_ms per step.

For each, `<name>.trace.json` (the trace, trimmed to what tasks/lib/traces.py reads: kernels,
memory copies, their launch calls, ProfilerStep#N) and `<name>.expected.json` (the figures
the workload measured itself, the patterns that tell communication and GEMMs apart, the
device) are written to --out; tests/unit/test_traces.py checks every pair it finds there.
Then the analysis runs on each trace and `AGREE name figure trace=X events=Y diff=Z%` lines
give the agreement (record them in docs/PERFORMANCE.md).

No Fabric needed; the analysis module is pure (stdlib JSON) and imported from the checkout.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tasks.lib import traces  # noqa: E402  (pure: no Fabric, no torch)

KEPT_CATS = {"kernel", "gpu_memcpy", "gpu_memset", "cuda_runtime", "cuda_driver", "hip_runtime",
             "hip_driver", "user_annotation", "gpu_user_annotation"}
GEMM_PATTERN = r"(?i)gemm|nvjet|cutlass|xmma|sm\d\d_|Cijk|matmul|addmm"


def trim(trace_path: Path) -> dict:
    """The trace without CPU ops and python frames: what the analysis reads, small enough to
    check in. ProfilerStep#N only among the annotations."""
    document = json.loads(trace_path.read_text())
    events = []
    for event in document.get("traceEvents", []):
        cat = event.get("cat")
        if cat not in KEPT_CATS:
            continue
        if "annotation" in str(cat) and not str(event.get("name", "")).startswith("ProfilerStep#"):
            continue
        if cat in ("cuda_runtime", "cuda_driver", "hip_runtime", "hip_driver") and \
                "Launch" not in event.get("name", "") and "Memcpy" not in event.get("name", ""):
            continue
        events.append(event)
    kept = {key: document[key] for key in ("schemaVersion", "distributedInfo", "deviceProperties")
            if key in document}
    return {**kept, "traceEvents": events}


def intervals_union(intervals):
    return traces.length(traces.union(intervals))


def gemm_copy(out: Path, steps: int, size: int) -> str:
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    n = size if cuda else min(size, 512)
    gemms_per_step = 6
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    # The stand-in for communication: a float32 -> bfloat16 copy, a kernel on the SMs.
    src = torch.randn(64 << 20 if cuda else 1 << 20, device=device, dtype=torch.float32)
    dst = torch.empty_like(src, dtype=torch.bfloat16)
    side = torch.cuda.Stream() if cuda else None
    for _ in range(3):  # cuBLAS heuristics, allocations, lazy kernel loads: all before measuring
        a @ b
        if cuda:  # the copy's first launch loads its kernel: 31.7 ms inside its events on an H100
            with torch.cuda.stream(side):
                dst.copy_(src)
    if cuda:
        torch.cuda.synchronize()

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    per_step = []
    path = Path(tempfile.mkdtemp()) / "gemm_copy.json"
    wall: list[float] = []
    with torch.profiler.profile(activities=activities,
                                schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps),
                                on_trace_ready=lambda p: p.export_chrome_trace(str(path))) as prof:
        for step in range(steps + 1):
            overlapped = step > (steps + 1) // 2
            started = time.perf_counter()
            if cuda:
                base = torch.cuda.Event(enable_timing=True)
                base.record()
                # A spin kernel holds the GPU while the host queues the step, so each GEMM's
                # events bracket the kernel, not the host's launch latency (the first GEMM's
                # events held 0.05 ms of it on an H100, the trace none).
                torch.cuda._sleep(1_000_000)
                ready = torch.cuda.Event()
                ready.record()
                events = []
                if overlapped:
                    side.wait_event(ready)
                    with torch.cuda.stream(side):
                        c0, c1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        c0.record()
                        dst.copy_(src)
                        c1.record()
                for _ in range(gemms_per_step):
                    g0, g1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    g0.record()
                    a @ b
                    g1.record()
                    events.append((g0, g1))
                torch.cuda.current_stream().wait_stream(side)
                torch.cuda.synchronize()
                gemm = [(base.elapsed_time(s), base.elapsed_time(e)) for s, e in events]
                copy = [(base.elapsed_time(c0), base.elapsed_time(c1))] if overlapped else []
                compute = traces.union(gemm)
                comm = traces.union(copy)
                hidden = traces.intersection_length(comm, compute)
                per_step.append({"step_in_trace": step, "overlapped": overlapped,
                                 "gemm_ms": [e - s for s, e in gemm],
                                 "gemm_overlaps_copy": [bool(copy) and traces.intersection_length([g], comm) > 0
                                                        for g in gemm],
                                 "compute_ms": traces.length(compute), "comm_ms": traces.length(comm),
                                 "hidden_comm_ms": hidden,
                                 "exposed_comm_ms": traces.length(comm) - hidden})
            else:
                for _ in range(gemms_per_step):
                    a @ b
            wall.append((time.perf_counter() - started) * 1000)
            prof.step()
    trace = trim(path)
    # The copy's kernels are those off the GEMMs' stream. The trace numbers streams as CUPTI does,
    # not as torch.cuda.Stream.stream_id (a first recording matched nothing that way): the
    # stream with the most kernels is the GEMMs' (6 a step against 1 copy), the rest the copy's.
    kernels = [e for e in trace["traceEvents"] if e.get("cat") == "kernel"]
    streams = Counter(e.get("args", {}).get("stream") for e in kernels)
    gemm_stream = streams.most_common(1)[0][0] if streams else None
    comm_names = sorted({e["name"] for e in kernels
                         if side is not None and e.get("args", {}).get("stream") != gemm_stream})
    expected = {
        "workload": "gemm_copy", "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__, "recorded": time.strftime("%Y-%m-%d"),
        "comm_pattern": "|".join(re.escape(n) for n in comm_names) or "(?!)",
        "compute_pattern": None,
        # The warm-up step is not in the trace: the profiled steps are wall[1:].
        "wall_ms": wall[1:], "steps": per_step[1:],
    }
    return write(out, "gemm_copy" + ("" if cuda else "_cpu"), trace, expected)


def train_run(out: Path, config: str | None) -> str | None:
    import torch

    if not torch.cuda.is_available():
        print("SKIP train: no GPU (its trace would hold no kernels)")
        return None
    work = Path(tempfile.mkdtemp())
    argv = [sys.executable, "-m", "train", "--config",
            config or str(ROOT / "config/multi_node/distributed_multinode.yaml"),
            "--override", f"training.output_dir={work}", "--override", "training.max_steps=12",
            "--override", "profiling.enabled=true", "--override", "profiling.wait=2",
            "--override", "profiling.warmup=1", "--override", "profiling.active=4",
            "--override", "profiling.launch_delay_steps=0"]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29541", "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-4000:])
        raise SystemExit("train run failed")
    (trace_path,) = sorted((work / "torch_profiler").glob("rank_00_step_*.json"))[-1:]
    metrics = [json.loads(line) for line in (work / "rank_00_metrics.jsonl").read_text().splitlines()
               if line.strip()]
    measured = [m for m in metrics if m.get("phase") in (None, "train") and m.get("compute_ms")]
    expected = {"workload": "train", "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__, "recorded": time.strftime("%Y-%m-%d"),
                "comm_pattern": traces.DEFAULT_COMM_PATTERN, "compute_pattern": GEMM_PATTERN,
                "metrics": [{k: m.get(k) for k in ("step", "iter_ms", "compute_ms", "comm_ms",
                                                    "overlap_ms", "exposed_comm_ms")}
                            for m in measured]}
    return write(out, "train", trim(trace_path), expected)


def write(out: Path, name: str, trace: dict, expected: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.trace.json").write_text(json.dumps(trace))
    (out / f"{name}.expected.json").write_text(json.dumps(expected, indent=1))
    print(f"wrote {out / name}.trace.json ({len(trace['traceEvents'])} events) and .expected.json")
    return name


def agree(label: str, figure: str, trace_value: float | None, event_value: float | None) -> None:
    if trace_value is None or event_value is None:
        print(f"AGREE {label} {figure} trace={trace_value} events={event_value} diff=n/a")
        return
    diff = (trace_value / event_value - 1) * 100 if event_value else float("nan")
    print(f"AGREE {label} {figure} trace={trace_value:.4f} events={event_value:.4f} diff={diff:+.2f}%")


def check(out: Path, name: str) -> None:
    expected = json.loads((out / f"{name}.expected.json").read_text())
    trace = traces.load_trace(out / f"{name}.trace.json")
    analysis = traces.analyse_trace(trace, comm_pattern=expected["comm_pattern"],
                                    compute_pattern=expected.get("compute_pattern"), name=name)
    for problem in analysis.problems:
        print(f"PROBLEM {name}: {problem}")
    median = lambda values: statistics.median(values) if values else None  # noqa: E731
    if "wall_ms" in expected:
        agree(name, "step_ms_median", analysis.median("step_ms"), median(expected["wall_ms"]))
    steps = expected.get("steps") or []
    if steps:
        by_trace = [s for s in analysis.steps if s.step is not None]
        for key in ("compute_ms", "comm_ms", "hidden_comm_ms", "exposed_comm_ms"):
            agree(name, f"{key}_total", sum(getattr(s, key) for s in by_trace),
                  sum(s[key] for s in steps))
        alone = [d for s in steps for d, hit in zip(s["gemm_ms"], s["gemm_overlaps_copy"]) if not hit]
        under = [d for s in steps for d, hit in zip(s["gemm_ms"], s["gemm_overlaps_copy"]) if hit]
        events_slowdown = (sum(under) / (len(under) * median(alone)) - 1) if under and alone else None
        agree(name, "gemm_slowdown_under_comm", analysis.slowdown_overall, events_slowdown)
    if expected.get("metrics"):
        agree(name, "compute_ms_median", analysis.median("compute_ms"),
              median([m["compute_ms"] for m in expected["metrics"]]))
        agree(name, "exposed_comm_ms_median", analysis.median("exposed_comm_ms"),
              median([m["exposed_comm_ms"] for m in expected["metrics"] if m["exposed_comm_ms"] is not None]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests/unit/data/traces")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--train-config")
    args = parser.parse_args()
    names = [gemm_copy(args.out, args.steps, args.size)]
    if not args.no_train:
        names.append(train_run(args.out, args.train_config))
    for name in filter(None, names):
        check(args.out, name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
