#!/usr/bin/env python3
"""GPU checks of what a hang and a sweep point leave behind, at world size 1 (runs on the device).

    python3 scripts/check_gpu_flight.py [--config FILE] [--out DIR]

1. probe: one NCCL process group, a few all-reduces, then every flight-recorder dump this torch
   build has (`_dump_nccl_trace_json`, `_dump_fr_trace_json`): how many entries each holds.
2. train: a real `python -m train` run; after its third measured step the hang watchdog's
   trigger file (flight_recorder/DUMP) is created, as `fab diagnose` does on every node, and
   the rank's dump train.flight writes is counted. The summary's `effective_settings`
   (kernel_launch included) and `launch_delay` reasons are printed.

Prints one `CHECK name value` line per figure; the dump and the summary land in --out.
No Fabric needed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRIES = "2000"


def probe() -> None:
    """Entries in each dump after four NCCL all-reduces, in this very process."""
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", ENTRIES)
    os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", ENTRIES)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    import torch
    import torch.distributed as dist
    import torch._C._distributed_c10d as c10d

    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    x = torch.ones(1 << 20, device="cuda")
    for _ in range(4):
        dist.all_reduce(x)
    torch.cuda.synchronize()
    print(f"CHECK torch {torch.__version__}")
    for name in ("_dump_nccl_trace_json", "_dump_fr_trace_json"):
        fn = getattr(c10d, name, None)
        if fn is None:
            print(f"CHECK probe.{name} absent")
            continue
        try:
            raw = fn()
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
            entries = json.loads(text).get("entries", [])
            names = sorted({e.get("profiling_name") for e in entries})
            print(f"CHECK probe.{name} entries={len(entries)} names={names}")
        except Exception as exc:  # noqa: BLE001 - a failing dump is a finding, not a crash
            print(f"CHECK probe.{name} error {type(exc).__name__}: {exc}"[:300])
    dist.destroy_process_group()


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def measured_steps(out: Path) -> int:
    try:
        return (out / "rank_00_metrics.jsonl").read_text().count("\n")
    except OSError:
        return 0


def train_run(config: str, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "train", "--config", config, "--override",
            f"training.output_dir={out}", "training.max_steps=60"]
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    dump = out / "flight_recorder" / "rank_00.json"
    try:
        if not wait_for(lambda: measured_steps(out) >= 3, 300):
            print("CHECK train.dump not requested: no third measured step in 300 s")
        else:
            (out / "flight_recorder").mkdir(exist_ok=True)
            (out / "flight_recorder" / "DUMP").touch()
            written = wait_for(dump.exists, 15)
            print(f"CHECK train.dump_written {written}")
        output, _ = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
    print(f"CHECK train.exit {process.returncode}")
    if process.returncode != 0:
        print(output[-3000:])
    if dump.exists():
        document = json.loads(dump.read_text())
        entries = document.get("entries", [])
        states = sorted({e.get("state") for e in entries})
        names = sorted({e.get("profiling_name") for e in entries})
        print(f"CHECK train.dump entries={len(entries)} states={states} names={names} "
              f"error={document.get('error')}")
    summaries = sorted(out.glob("summary*.json"))
    if summaries:
        summary = json.loads(summaries[0].read_text())
        found = summary.get("effective_settings") or {}
        print(f"CHECK train.effective_channels {found.get('channels')}")
        print(f"CHECK train.kernel_launch {json.dumps(found.get('kernel_launch'))}")
        print(f"CHECK train.flags {json.dumps(found.get('flags'))}")
        delay = summary.get("launch_delay") or {}
        reasons = sorted({s.get("reason") for s in delay.get("samples", [])})
        print(f"CHECK train.launch_delay_reasons {reasons}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "config/multi_node/distributed_multinode.yaml"))
    parser.add_argument("--out", default="/tmp/check_gpu_flight")
    parser.add_argument("--probe-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe_only:
        probe()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # The probe runs in a child so its process group and environment do not touch the train run.
    subprocess.run([sys.executable, __file__, "--probe-only"], check=False)
    train_run(args.config, out / "train")
    return 0


if __name__ == "__main__":
    sys.exit(main())
