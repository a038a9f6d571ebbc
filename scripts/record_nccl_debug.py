#!/usr/bin/env python3
"""Record NCCL's own account of the communicators it builds and of the kernels it launches, for
the effective-settings parser, the launch check and their tests (tests/unit/data/nccl/).

Per variant (the thread values 64/128/256/512, TREE forced, an invalid thread value, WARN and
INFO timestamps, channel variables) one set of processes runs with NCCL_DEBUG=INFO,
NCCL_DEBUG_SUBSYS=INIT,ENV,TUNING and NCCL_DEBUG_FILE=DIR/nccl_<variant>.<rank>.%p.log:

- world size 1 (one GPU): the default group, then communicators made with
  ``new_group(pg_options=...)`` for min/max CTAs 2/2 .. 16/16 and 1/64, a few 64 Mi bf16
  all_reduces each, destroyed; each phase timed. NCCL prints no TUNING table and launches no
  collective kernel at world size 1 (it copies the buffer).
- world size 2 (``--world 2`` or ``auto`` with two GPUs): a group with min/max CTAs 8/8 runs
  32 MiB all_reduces under torch.profiler; the collective kernels' grid and block are saved to
  DIR/kernels_<variant>.rank<r>.json (what the GPU ran), beside NCCL's TUNING table and
  per-collective lines.

Then this process (no torch) parses every file with train.nccl_debug and, where kernels were
profiled, runs train.launchdelay.launch_check on them, and prints one line per variant: the
version and library read, the threads NCCL launched per algorithm, the measured block.x and
every flag. A run without CUDA says so and exits 0 after checking the repository's recordings.

Usage (GPU machine): python3 scripts/record_nccl_debug.py --out DIR [--world auto|1|2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POINTS = [None, (2, 2), (4, 4), (8, 8), (16, 16), (1, 64)]
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "nthreads64": {"NCCL_NTHREADS": "64"},
    "nthreads128": {"NCCL_NTHREADS": "128"},
    "nthreads256": {"NCCL_NTHREADS": "256"},
    "nthreads512": {"NCCL_NTHREADS": "512"},
    "tree_nthreads256": {"NCCL_NTHREADS": "256", "NCCL_ALGO": "Tree", "NCCL_PROTO": "Simple"},
    "ring_nthreads128": {"NCCL_NTHREADS": "128", "NCCL_ALGO": "Ring", "NCCL_PROTO": "Simple"},
    "nthreads1024_invalid": {"NCCL_NTHREADS": "1024"},
    "timestamps_all": {"NCCL_NTHREADS": "256", "NCCL_DEBUG_TIMESTAMP_LEVELS": "ALL"},
    "minch4": {"NCCL_MIN_NCHANNELS": "4", "NCCL_MAX_NCHANNELS": "4"},
}
PORT = 29577


def port_of(tag: str) -> int:
    """Each variant its own rendezvous port: the previous one's may still be in TIME_WAIT."""
    return PORT + 2 * list(VARIANTS).index(tag)


def world_one(out: Path, tag: str) -> None:
    t0 = time.perf_counter()
    import torch
    import torch.distributed as dist

    t_import = time.perf_counter()
    torch.cuda.set_device(0)
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    t_cuda = time.perf_counter()
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port_of(tag)}", rank=0,
                            world_size=1, device_id=torch.device("cuda", 0))
    x = torch.ones(64 << 20, dtype=torch.bfloat16, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    t_init = time.perf_counter()
    timings: dict[str, Any] = {
        "import_s": t_import - t0, "cuda_context_s": t_cuda - t_import,
        "default_pg_init_first_collective_s": t_init - t_cuda, "points": [],
    }
    for point in POINTS:
        begin = time.perf_counter()
        opts = dist.ProcessGroupNCCL.Options()
        if point is not None:
            opts.config.min_ctas, opts.config.max_ctas = point
        group = dist.new_group([0], backend="nccl", pg_options=opts)
        made = time.perf_counter()
        dist.all_reduce(x, group=group)
        torch.cuda.synchronize()
        first = time.perf_counter()
        for _ in range(5):
            dist.all_reduce(x, group=group)
        torch.cuda.synchronize()
        steady = (time.perf_counter() - first) / 5
        dist.destroy_process_group(group)
        torch.cuda.synchronize()
        gone = time.perf_counter()
        timings["points"].append({
            "ctas": point, "new_group_s": made - begin, "first_collective_s": first - made,
            "steady_all_reduce_ms": steady * 1e3, "destroy_s": gone - first - 5 * steady,
            "memory_allocated": torch.cuda.memory_allocated(),
        })
    dist.destroy_process_group()
    timings["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
    timings["torch"] = torch.__version__
    (out / f"timings_{tag}.json").write_text(json.dumps(timings, indent=2))


def world_two(out: Path, tag: str, rank: int) -> None:
    """One of two ranks: a CTAs 8/8 group, 32 MiB all_reduces profiled for their kernels."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from train.launchdelay import is_collective_kernel, launch_config

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port_of(tag) + 1}", rank=rank,
                            world_size=2, device_id=torch.device("cuda", rank))
    opts = dist.ProcessGroupNCCL.Options()
    opts.config.min_ctas, opts.config.max_ctas = 8, 8
    group = dist.new_group([0, 1], backend="nccl", pg_options=opts)
    x = torch.ones(16 << 20, dtype=torch.bfloat16, device="cuda")   # 32 MiB
    for _ in range(3):
        dist.all_reduce(x, group=group)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            dist.all_reduce(x, group=group)
        torch.cuda.synchronize()
    trace = out / f"trace_{tag}.rank{rank}.json"
    prof.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text()).get("traceEvents", [])
    kernels = [launch_config(e) for e in events
               if e.get("cat") == "kernel" and is_collective_kernel(str(e.get("name", "")))]
    (out / f"kernels_{tag}.rank{rank}.json").write_text(json.dumps(kernels, indent=1))
    trace.unlink()
    dist.destroy_process_group(group)
    dist.destroy_process_group()


def analyse(out: Path, world: int) -> list[dict[str, Any]]:
    """Parse every recorded file with the project's own reader and launch check."""
    from train.launchdelay import launch_check
    from train.nccl_debug import asked_from_env, effective_settings, parse_nccl_log

    rows = []
    for tag, extra in VARIANTS.items():
        env = {**extra}
        for path in sorted(out.glob(f"nccl_{tag}.rank*.log")):
            rank = int(path.name.split(".rank")[1].split(".")[0])
            text = path.read_text(errors="replace")
            marker = "Comm config Min CTAs set to 8"
            start = text.rfind("\n", 0, text.index(marker)) + 1 if marker in text else 0
            point = effective_settings(parse_nccl_log(text[start:]), asked_from_env(env, 8, 8), env,
                                       process=parse_nccl_log(text))
            kernels_file = out / f"kernels_{tag}.rank{rank}.json"
            check = None
            if kernels_file.exists():
                launches = [dict(k, op="all_reduce") for k in json.loads(kernels_file.read_text())
                            if k.get("grid") and k["grid"][0] > 1]
                check = launch_check([{"collective_launches": launches}], point["channels"],
                                     point["asked"]["threads"], "control", point["launch_expectation"])
            rows.append({"variant": tag, "rank": rank, "world": world, "library": point["vendor"],
                         "version": point["nccl_version"], "channels": point["channels"],
                         "threads": point["threads"], "threads_reason": point["threads_reason"],
                         "per_algorithm": point["threads_per_algorithm"],
                         "algorithms": point["algorithms"],
                         "kernel_block_x": check and check["block_x"],
                         "kernel_grid_x": check and check["grid_x"],
                         "flags": point["flags"] + (check["flags"] if check else []),
                         "notes": point["notes"], "warnings": point["nccl_warnings"]})
    return rows


def self_check() -> int:
    """Without CUDA: the repository's recordings through the same analysis."""
    from train.nccl_debug import asked_from_env, effective_settings, parse_nccl_log

    data = ROOT / "tests" / "unit" / "data" / "nccl"
    for path in sorted(data.glob("nccl-*.log")):
        log = parse_nccl_log(path.read_text())
        env = {"NCCL_NTHREADS": "256"} if "nthreads256" in path.name else {}
        point = effective_settings(log, asked_from_env(env), env)
        print(json.dumps({"file": path.name, "library": point["vendor"], "version": log.version,
                          "communicators": len(log.communicators), "flags": point["flags"],
                          "threads_reason": point["threads_reason"]}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "nccl_out"))
    p.add_argument("--world", default="auto", choices=("auto", "1", "2"))
    p.add_argument("--child", default="")
    p.add_argument("--rank", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        tag, world = args.child.rsplit(":", 1)
        world_one(out, tag) if world == "1" else world_two(out, tag, args.rank)
        return 0
    try:
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        gpus = 0
    if gpus == 0:
        print("no CUDA device: nothing recorded; checking the repository's recordings instead")
        return self_check()
    world = min(2, gpus) if args.world == "auto" else int(args.world)
    for tag, extra in VARIANTS.items():
        env = {**os.environ, **extra, "NCCL_DEBUG": "INFO",
               "NCCL_DEBUG_SUBSYS": "INIT,ENV,TUNING", "PYTHONPATH": str(ROOT)}
        procs = []
        for rank in range(world):
            env_rank = {**env, "NCCL_DEBUG_FILE": str(out / f"nccl_{tag}.rank{rank}.%p.log")}
            procs.append(subprocess.Popen([sys.executable, __file__, "--out", str(out), "--child",
                                           f"{tag}:{world}", "--rank", str(rank)], env=env_rank))
        codes = [proc.wait() for proc in procs]
        if any(codes):
            print(f"{tag}: exit codes {codes}", file=sys.stderr)
    # One file per rank and variant, named without the pid for the analysis and the tests.
    for path in out.glob("nccl_*.rank*.*.log"):
        path.rename(path.with_name(".".join(path.name.split(".")[:2]) + ".log"))
    rows = analyse(out, world)
    (out / "analysis.json").write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
