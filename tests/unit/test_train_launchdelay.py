"""train.launchdelay on a real H100 profiler trace and on crafted ones (pure, no GPU).

tests/unit/data/h100_train_step_trace.json is one default-config train step profiled on the
lent H100 (kernels and their launch calls, with the step's own GEMM and collective event
times). At world size 1 NCCL launches no kernel, so collective kernels are added to it where
a test needs them, at known distances from their events.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from train.launchdelay import launch_delays

REAL = json.loads((Path(__file__).parent / "data" / "h100_train_step_trace.json").read_text())
COMPUTE, COMM = 7, 21


def kernel(name: str, ts: float, dur: float, stream: int, correlation: int) -> dict[str, Any]:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
            "args": {"stream": stream, "correlation": correlation}}


def launch(ts: float, dur: float, correlation: int) -> dict[str, Any]:
    return {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": ts, "dur": dur,
            "args": {"correlation": correlation}}


def real_ops() -> list[tuple[str, int, float]]:
    return [(name, bucket, start) for name, bucket, start, _ in REAL["ops"]]


def test_real_trace_clocks_align_on_the_gemm_ends() -> None:
    found = launch_delays(REAL, REAL["gemm_ms"], real_ops())
    # world size 1: nothing to measure, and it says so
    assert found.delays == [] and "world size 1" in (found.reason or "")
    assert found.kernels_seen == 25 and found.collective_kernels_seen == 0
    # The first GEMM's kernel started 0.2 ms after its start event (host launch latency under
    # the profiler); the ends of all 23 GEMMs still agree within microseconds.
    assert found.alignment == "gemm ends"
    assert found.alignment_residual_ms is not None and found.alignment_residual_ms < 0.005


def with_collectives(delay_us: float, late_launch_us: float | None = None) -> dict[str, Any]:
    """The real trace plus one collective kernel per timed collective, `delay_us` after its
    start event (on the trace's clock, from the first GEMM's end); optionally launched by the
    host `late_launch_us` after the event."""
    trace = copy.deepcopy(REAL)
    kernels = sorted((e for e in trace["traceEvents"] if e["cat"] == "kernel"),
                     key=lambda e: e["ts"])
    first_gemm = next(k for k in kernels if k["args"]["stream"] == COMPUTE)
    offset = first_gemm["ts"] + first_gemm["dur"] - REAL["gemm_ms"][0][1] * 1e3
    for i, (name, _, start, _) in enumerate(REAL["ops"]):
        event = start * 1e3 + offset
        correlation = 900_000 + i
        launched = event - 50.0 if late_launch_us is None else event + late_launch_us
        trace["traceEvents"].append(launch(launched - 5.0, 5.0, correlation))
        trace["traceEvents"].append(
            kernel(f"ncclDevKernel_AllReduce_Sum_bf16_RING_LL ({name})", event + delay_us, 20.0,
                   COMM, correlation))
    return trace


def test_delay_is_counted_from_the_stream_ready_event() -> None:
    found = launch_delays(with_collectives(300.0), REAL["gemm_ms"], real_ops())
    assert found.reason is None and len(found.delays) == len(REAL["ops"]) == 9
    assert [d[0] for d in found.delays] == ["control"] + ["all_reduce"] * 8
    assert [d[2] for d in found.delays] == pytest.approx([0.3] * 9, abs=0.005)


def test_a_late_host_launch_is_not_counted_as_waiting_for_sms() -> None:
    # Launched 100 us after the stream was ready, started 150 us after: 50 us queued.
    found = launch_delays(with_collectives(150.0, late_launch_us=100.0), REAL["gemm_ms"],
                          real_ops())
    assert [d[2] for d in found.delays] == pytest.approx([0.05] * 9, abs=0.005)
    # Started during its own launch call: at once, not a negative delay.
    found = launch_delays(with_collectives(50.0, late_launch_us=100.0), REAL["gemm_ms"],
                          real_ops())
    assert [d[2] for d in found.delays] == [0.0] * 9


def test_unpaired_kernels_and_empty_traces_give_a_reason() -> None:
    found = launch_delays(with_collectives(300.0), REAL["gemm_ms"], real_ops()[:3])
    assert found.delays == [] and "9 collective kernels for 3 timed collectives" in (
        found.reason or "")
    found = launch_delays({"traceEvents": []}, REAL["gemm_ms"], [])
    assert found.reason == "the profiler recorded no GPU kernels"
    found = launch_delays(REAL, [], real_ops())
    assert found.reason == "no GEMM events to align the clocks with"
