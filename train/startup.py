"""When each phase of this process's start-up ended (wall clock), for the summary's `startup`
section: where a restart-per-point sweep spends its seconds (no torch import here)."""

from __future__ import annotations

import os
import time

MARKS: dict[str, float] = {}


def mark(name: str) -> None:
    MARKS.setdefault(name, time.time())


def process_start_time() -> float | None:
    """This process's start (Linux /proc: clock ticks since boot + boot time), else None."""
    try:
        with open("/proc/self/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5); the first two are before ")"
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def startup_section(first_step_unix: float | None) -> dict[str, float | None]:
    """Seconds per phase: interpreter + train import (process start → cli), torch import,
    CUDA context, default process group init (NCCL/gloo), model build + parameter broadcast,
    warm-up + calibration (→ the first measured step)."""
    order = [("process_start", process_start_time()), ("cli", MARKS.get("cli")),
             ("torch_imported", MARKS.get("torch_imported")),
             ("cuda_context", MARKS.get("cuda_context")),
             ("process_group", MARKS.get("process_group")), ("model", MARKS.get("model")),
             ("first_step", first_step_unix)]
    names = {"cli": "interpreter_s", "torch_imported": "import_torch_s",
             "cuda_context": "cuda_context_s", "process_group": "process_group_init_s",
             "model": "model_s", "first_step": "warmup_calibration_s"}
    section: dict[str, float | None] = {}
    previous = order[0][1]
    for name, value in order[1:]:
        section[names[name]] = (round(value - previous, 6)
                                if value is not None and previous is not None else None)
        if value is not None:
            previous = value
    start = order[0][1]
    section["to_first_step_s"] = (round(first_step_unix - start, 6)
                                  if first_step_unix is not None and start is not None else None)
    return section
