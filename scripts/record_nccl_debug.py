#!/usr/bin/env python3
"""Record NCCL's own account of the communicators it builds, for the effective-settings parser
and its tests (tests/unit/data/nccl/), and time what one sweep point costs in-process.

One process, one GPU, world size 1 (NCCL builds channels for a single rank too). For each
point it creates a communicator through ``new_group(pg_options=...)`` with the point's
min/max CTAs, runs a few all_reduces, destroys the group, and times each phase. NCCL writes
its INIT/ENV/TUNING lines to ``NCCL_DEBUG_FILE`` (one file for the process: the parser has
to tell the communicators apart). A second process started with NCCL_NTHREADS set shows
what the thread knob does (NCCL reads it once per process).

Usage (on a GPU machine): python3 scripts/record_nccl_debug.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

POINTS = [None, (2, 2), (4, 4), (8, 8), (16, 16), (1, 64)]


def point_run(out: Path, tag: str) -> None:
    t0 = time.perf_counter()
    import torch
    import torch.distributed as dist

    t_import = time.perf_counter()
    torch.cuda.set_device(0)
    torch.empty(1, device="cuda")
    torch.cuda.synchronize()
    t_cuda = time.perf_counter()
    dist.init_process_group(
        "nccl", init_method="tcp://127.0.0.1:29577", rank=0, world_size=1,
        device_id=torch.device("cuda", 0),
    )
    x = torch.ones(64 << 20, dtype=torch.bfloat16, device="cuda")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    t_init = time.perf_counter()
    timings = {
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
    print(tag, json.dumps(timings))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "nccl_out"))
    p.add_argument("--child", default="")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        point_run(out, args.child)
        return 0
    for tag, extra in (("default", {}), ("nthreads256", {"NCCL_NTHREADS": "256"}),
                       ("minch4", {"NCCL_MIN_NCHANNELS": "4", "NCCL_MAX_NCHANNELS": "4"})):
        env = {**os.environ, **extra, "NCCL_DEBUG": "INFO",
               "NCCL_DEBUG_SUBSYS": "INIT,ENV,TUNING",
               "NCCL_DEBUG_FILE": str(out / f"nccl_{tag}.%p.log")}
        subprocess.run([sys.executable, __file__, "--out", str(out), "--child", tag],
                       env=env, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
