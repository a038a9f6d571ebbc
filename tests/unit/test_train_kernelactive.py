"""Kernel-active collective time (issue 23, finding 4) from profiler kernel events (pure, no GPU).

The kernel events are real: tests/unit/data/h100_train_step_trace.json is one default-config
train step profiled on the lent H100 (torch 2.11.0+cu130, NCCL 2.28.9: its GEMM kernels, their
launch calls and the step's own GEMM and collective event times), and
h100_world1_step_kernels.json holds the same kind of step's kernel events with every argument
the profiler records. At world size 1 NCCL launches no collective kernel, so the collective
kernels of a two-rank step are added in the trace's own event format (kernel name as NCCL 2.28
names its device kernels and torch.profiler prints them, `ncclDevKernel_<Coll>_<Op>_<type>_
<ALGO>_<PROTO>(ncclDevKernelArgsStorage<4096ul>)`), each launched by a cuLaunchKernelEx call
with its correlation id, at known distances from the stream events.

The scenario, per bucket: both ranks' comm streams reach the collective when its dW GEMM ends
(S). GEMM blocks hold rank 0's SMs for 600 us, rank 1's for 200 us; rank 1's kernel then
waits inside for rank 0, and the transfer takes 300 us once both are in: both end at S + 900.
Stream events say 900 us on both ranks; the collective ran 300 us.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from train.collectives import COMM_PHASE, TRAIN_PHASE, OpRecord, pack
from train.kernelactive import KERNEL_FIELDS, kernel_active, queued_per_position
from train.launchdelay import kernel_activity, kernel_activity_by_step, launch_delays
from train.summary import aggregate

DATA = Path(__file__).parent / "data"
REAL = json.loads((DATA / "h100_train_step_trace.json").read_text())
REAL_KERNELS = json.loads((DATA / "h100_world1_step_kernels.json").read_text())
COMPUTE_STREAM, NCCL_STREAM = 7, 21
BUCKET_BYTES = 128 * 2**20
QUEUED_US = (600.0, 200.0)  # per rank: GEMM blocks ahead of the kernel
TRANSFER_US = 300.0
STREAM_US = 900.0  # start event to end event, both ranks
NCCL_KERNEL = "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)"
# The real fill kernel's args (grid, block, registers, ...) as the template of an added kernel.
REAL_ARGS = next(e for e in REAL_KERNELS["traceEvents"] if "FillFunctor" in e["name"])["args"]


def trace_offset_us() -> float:
    """trace us = event ms * 1e3 + offset, from the first GEMM's kernel end (its end event)."""
    kernels = sorted((e for e in REAL["traceEvents"] if e["cat"] == "kernel"),
                     key=lambda e: e["ts"])
    first = next(k for k in kernels if k["args"]["stream"] == COMPUTE_STREAM)
    return first["ts"] + first["dur"] - REAL["gemm_ms"][0][1] * 1e3


def nccl_kernel(ts: float, dur: float, correlation: int, grid_x: int) -> dict[str, Any]:
    args = {**copy.deepcopy(REAL_ARGS), "stream": NCCL_STREAM, "correlation": correlation,
            "grid": [grid_x, 1, 1], "block": [544, 1, 1]}
    return {"ph": "X", "cat": "kernel", "name": NCCL_KERNEL, "pid": 0, "tid": NCCL_STREAM,
            "ts": ts, "dur": dur, "args": args}


def launch_call(ts: float, dur: float, correlation: int) -> dict[str, Any]:
    return {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": ts, "dur": dur,
            "args": {"correlation": correlation}}


def train_step(rank: int, host_late_us: float | None = None
               ) -> tuple[dict[str, Any], list[tuple[str, int, float, float]]]:
    """The real step's trace with this rank's collective kernels, and its timed collectives
    (name, bucket, start event ms, end event ms): the control all-reduce as recorded, each
    bucket's collective as in the scenario above."""
    trace = copy.deepcopy(REAL)
    offset = trace_offset_us()
    ops = []
    for i, (name, bucket, start, end) in enumerate(REAL["ops"]):
        correlation = 800_000 + i
        ready = start * 1e3 + offset
        if name == "control":  # a tiny kernel as soon as its stream got there
            queued, duration, end_ms = 0.0, 8.0, start + 0.008
        else:
            queued = QUEUED_US[rank]
            duration = STREAM_US - queued
            end_ms = start + STREAM_US / 1e3
        launched = ready - 40.0 if host_late_us is None else ready + host_late_us
        trace["traceEvents"].append(launch_call(launched - 6.0, 6.0, correlation))
        trace["traceEvents"].append(nccl_kernel(ready + queued, duration, correlation, 8))
        ops.append((name, bucket, start, end_ms))
    return trace, ops


def comm_step() -> tuple[dict[str, Any], list[tuple[str, int, float, float]]]:
    """A comm-only step: the 8 buckets back to back, nothing in their way; real launch-call
    and kernel event format, no GEMM."""
    trace: dict[str, Any] = {"traceEvents": []}
    base = REAL_KERNELS["traceEvents"][0]["ts"]
    ops = []
    for bucket in range(8):
        start = bucket * TRANSFER_US / 1e3
        correlation = 900_000 + bucket
        trace["traceEvents"].append(launch_call(base - 100.0 + bucket, 6.0, correlation))
        trace["traceEvents"].append(
            nccl_kernel(base + start * 1e3 + 1.0, TRANSFER_US - 1.0, correlation, 8))
        ops.append(("all_reduce", bucket, start, start + TRANSFER_US / 1e3))
    return trace, ops


def sample_of(trace: dict[str, Any], ops: list[tuple[str, int, float, float]]) -> dict[str, Any]:
    """What the trainer keeps of one profiled train step (Trainer._launch_delay_of)."""
    found = launch_delays(trace, REAL["gemm_ms"], ops)
    return {"delays": [list(d) for d in found.delays], "reason": found.reason,
            "kernel_active": [list(a) for a in found.kernel_active]}


def comm_sample_of(trace: dict[str, Any], ops: list[tuple[str, int, float, float]]
                   ) -> dict[str, Any]:
    found = kernel_activity(trace, ops)
    return {"kernel_active": [list(a) for a in found.active], "reason": found.reason}


# -- one rank's profiled step ------------------------------------------------------------------


def test_kernel_time_and_queueing_come_from_the_kernel_events() -> None:
    for rank, queued in enumerate(QUEUED_US):
        trace, ops = train_step(rank)
        found = kernel_activity(trace, ops)
        assert found.reason is None and found.collective_kernels_seen == 9
        control, *buckets = found.active
        assert control[0] == "control" and control[3] == pytest.approx(0.008)
        assert [row[:2] for row in buckets] == [("all_reduce", b) for b in range(8)]
        for _, _, stream_ms, kernel_ms, queued_ms in buckets:
            assert stream_ms == pytest.approx(STREAM_US / 1e3)
            assert kernel_ms == pytest.approx((STREAM_US - queued) / 1e3)
            assert queued_ms == pytest.approx(queued / 1e3, abs=1e-3)


def test_queued_time_agrees_with_the_clock_fitted_launch_delay() -> None:
    trace, ops = train_step(0)
    found = launch_delays(trace, REAL["gemm_ms"], ops)
    assert found.alignment == "gemm ends"
    delays = [d[2] for d in found.delays]
    queued = [a[4] for a in found.kernel_active]
    assert queued == pytest.approx(delays, abs=0.002)
    assert queued[1:] == pytest.approx([0.6] * 8, abs=0.002)


def test_a_late_host_launch_is_not_counted_as_queueing() -> None:
    # Launched 150 us after the stream got there: only what follows the launch call is queued.
    trace, ops = train_step(0, host_late_us=150.0)
    queued = [a[4] for a in kernel_activity(trace, ops).active[1:]]
    assert queued == pytest.approx([0.6 - 0.15] * 8, abs=0.002)


def test_world_size_one_and_unpaired_kernels_give_a_reason() -> None:
    ops = [(n, b, s, e) for n, b, s, e in REAL["ops"]]
    found = kernel_activity(REAL_KERNELS, ops)
    assert found.active == [] and found.kernels_seen == 25
    assert "world size 1" in (found.reason or "")
    trace, ops = train_step(0)
    found = kernel_activity(trace, ops[:4])
    assert found.active == [] and "9 collective kernels for 4 timed collectives" in found.reason
    found = kernel_activity(trace, [op[:3] for op in ops])
    assert found.active == [] and "end events" in (found.reason or "")


def test_comm_only_steps_of_one_profiler_session_split_by_step() -> None:
    """The trainer profiles its comm-only steps in one session: one trace, two steps' kernels."""
    first, ops = comm_step()
    second, _ = comm_step()
    shift = 20_000.0  # the second step 20 ms later, its own correlation ids
    for event in second["traceEvents"]:
        event["ts"] += shift
        event["args"]["correlation"] += 100
    trace = {"traceEvents": first["traceEvents"] + second["traceEvents"]}
    later = [(n, b, s + shift / 1e3, e + shift / 1e3) for n, b, s, e in ops]
    found = kernel_activity_by_step(trace, [ops, later])
    assert [f.reason for f in found] == [None, None]
    assert [[row[1] for row in f.active] for f in found] == [list(range(8))] * 2
    assert all(row[3] == pytest.approx(0.299) and row[4] == pytest.approx(0.001, abs=1e-3)
               for f in found for row in f.active)
    missing = kernel_activity_by_step(trace, [ops])  # 16 kernels, 8 collectives
    assert missing[0].active == [] and "16 collective kernels for 8" in missing[0].reason


def test_queued_medians_per_position_and_mismatched_samples() -> None:
    samples = [sample_of(*train_step(0)), sample_of(*train_step(0, host_late_us=300.0))]
    queued, reason = queued_per_position(samples, "none")
    assert reason is None and queued is not None
    assert queued.ops == [("control", -1)] + [("all_reduce", b) for b in range(8)]
    assert queued.ms[1:] == pytest.approx([(0.6 + 0.3) / 2] * 8, abs=0.002)
    odd = copy.deepcopy(samples[1])
    odd["kernel_active"][3][1] = 7
    assert queued_per_position([samples[0], odd], "none")[0] is None
    assert queued_per_position([], "CPU run: no kernels to profile") == (
        None, "CPU run: no kernels to profile")


# -- across ranks: the summary -----------------------------------------------------------------

STEPS = 4
STEP_MS = 50.0


def records(rank: int) -> list[OpRecord]:
    """Measured steps and comm-only calibration steps as the rank's events saw them."""
    out = []
    for step in range(1, STEPS + 1):
        base = step * STEP_MS
        for seq, (name, bucket, start, end) in enumerate(REAL["ops"]):
            end = start + (0.008 if name == "control" else STREAM_US / 1e3)
            size = 4 if name == "control" else BUCKET_BYTES
            out.append(OpRecord(TRAIN_PHASE, step, seq, name, bucket, size, base + start - 1,
                                base + start, base + end))
    for step in (1, 2):
        base = 1000.0 + step * STEP_MS
        for bucket in range(8):
            start = bucket * TRANSFER_US / 1e3
            out.append(OpRecord(COMM_PHASE, step, bucket, "all_reduce", bucket, BUCKET_BYTES,
                                base + start, base + start, base + start + TRANSFER_US / 1e3))
    return out


def report(rank: int, launch_delay: dict[str, Any]) -> dict[str, Any]:
    return {
        "rank": rank, "host": f"node{rank}", "device": "NVIDIA H100 80GB HBM3", "env": {},
        "steps": [{"step": s, "calibration_block": 0, "iter_ms": 36.0} for s in
                  range(1, STEPS + 1)],
        "calibration_compute": [],
        "calibration_comm": [{"step": s, "calibration_block": 0} for s in (1, 2)],
        "collectives": pack(records(rank)),
        # JSON-shaped, as it crosses the network: string keys, lists
        "step_intervals": {str(s): [s * STEP_MS, REAL["gemm_ms"]] for s in range(1, STEPS + 1)},
        "launch_delay": launch_delay,
        "telemetry": {"source": "nvml"},
        "status": "completed",
    }


def gpu_reports() -> list[dict[str, Any]]:
    return [report(rank, {"samples": [sample_of(*train_step(rank)) for _ in range(3)],
                          "comm_samples": [comm_sample_of(*comm_step()) for _ in range(3)],
                          "reason": None})
            for rank in range(2)]


def test_kernel_active_busbw_leaves_the_queueing_out() -> None:
    summary = aggregate(gpu_reports(), world_size=2)
    factor = 2 * (2 - 1) / 2
    # Stream events: 8 collectives x 900 us per step; the kernels ran 8 x 300 us.
    assert summary["stream_collective_ms"]["median"] == pytest.approx(8 * 0.9)
    assert summary["kernel_collective_ms"]["median"] == pytest.approx(8 * 0.3, abs=0.01)
    assert summary["stream_busbw_gbps"]["median"] == pytest.approx(
        8 * BUCKET_BYTES * factor / 7.2e-3 / 1e9)
    assert summary["kernel_busbw_gbps"]["median"] == pytest.approx(
        8 * BUCKET_BYTES * factor / 2.4e-3 / 1e9, rel=0.01)
    assert summary["kernel_algbw_gbps"]["median"] == pytest.approx(
        8 * BUCKET_BYTES / 2.4e-3 / 1e9, rel=0.01)
    # Alone the collectives ran 300 us too: the stream figure calls the queueing a slowdown.
    assert summary["stream_comm_slowdown"]["median"] == pytest.approx(2.0)
    assert summary["kernel_comm_slowdown"]["median"] == pytest.approx(0.0, abs=0.01)
    assert summary["solo"]["kernel_collective_ms"]["median"] == pytest.approx(8 * 0.3, abs=0.01)
    step = summary["per_step"][0]
    assert step["stream_collective_ms"] == pytest.approx(7.2)
    assert step["kernel_collective_ms"] == pytest.approx(2.4, abs=0.01)
    section = summary["kernel_active"]
    assert section["reason"] is None
    assert (section["sampled_train_steps"], section["sampled_comm_steps"]) == (3, 3)
    # The profiled steps' own kernels: exact, and the same here.
    assert section["sampled"]["collective_ms"]["median"] == pytest.approx(2.4, abs=0.01)
    assert section["sampled"]["stream_collective_ms"]["median"] == pytest.approx(7.2)
    assert section["queued_ms"]["train"]["min"] == pytest.approx(0.2, abs=0.002)
    assert section["queued_ms"]["train"]["max"] == pytest.approx(0.6, abs=0.002)
    for key in KERNEL_FIELDS:
        assert key not in summary["null_reasons"], key


def test_a_sample_lost_on_one_rank_leaves_the_others_paired_by_step() -> None:
    reports = gpu_reports()
    lost = {"delays": [], "reason": "trace unreadable: truncated", "kernel_active": []}
    reports[1]["launch_delay"]["samples"][0] = lost
    section = aggregate(reports, world_size=2)["kernel_active"]
    assert section["sampled_train_steps"] == 2  # steps 1 and 2 on both ranks
    assert section["sampled"]["collective_ms"]["n"] == 2


def test_kernel_active_overlap_counts_only_where_the_kernel_ran() -> None:
    summary = aggregate(gpu_reports(), world_size=2)
    # Every bucket's interval lies under the next dX/dW GEMMs but the last one's, which the
    # final GEMM does not cover; queued time is no overlap any more.
    assert summary["kernel_comm_ms"]["min"] == pytest.approx(8 * 0.3, abs=0.01)  # rank 0
    assert summary["kernel_comm_ms"]["max"] == pytest.approx(8 * 0.7, abs=0.01)  # rank 1
    stream_overlap = 7 * 0.9  # what the stream intervals overlap (the last bucket: nothing)
    kernel_overlap = summary["kernel_overlap_ms"]
    assert kernel_overlap["min"] == pytest.approx(7 * 0.3, abs=0.02)
    assert kernel_overlap["max"] == pytest.approx(7 * 0.7, abs=0.02)
    assert kernel_overlap["max"] < stream_overlap


def test_cpu_runs_have_no_kernel_figures_and_say_why() -> None:
    cpu = {"samples": [], "reason": "CPU run: no kernels to profile"}
    summary = aggregate([report(r, cpu) for r in range(2)], world_size=2)
    assert summary["stream_busbw_gbps"]["median"] > 0  # the stream figure is still there
    for key in KERNEL_FIELDS:
        assert summary[key] is None, key
        assert summary["null_reasons"][key] == "CPU run: no kernels to profile"
    assert summary["kernel_active"]["reason"] == "CPU run: no kernels to profile"
    assert summary["per_step"][0]["kernel_collective_ms"] is None


def test_world_size_one_gives_the_samples_reason() -> None:
    ops = [(n, b, s, e) for n, b, s, e in REAL["ops"]]
    alone = {"samples": [sample_of(REAL_KERNELS, ops)], "comm_samples": [], "reason": None}
    summary = aggregate([report(0, alone)], world_size=1)
    assert summary["kernel_busbw_gbps"] is None
    assert "world size 1" in summary["null_reasons"]["kernel_busbw_gbps"]


def test_direct_call_without_comm_samples_keeps_the_train_figures() -> None:
    reports = gpu_reports()
    for r in reports:
        r["launch_delay"]["comm_samples"] = []
    from train.summary import cross_rank_analysis

    found = kernel_active(reports, cross_rank_analysis(reports, 2), 2,
                          step_block={s: 0 for s in range(1, STEPS + 1)}, cal_block={1: 0, 2: 0})
    assert found["fields"]["kernel_busbw_gbps"] is not None
    assert found["fields"]["kernel_comm_slowdown"] is None
    assert found["null_reasons"]["kernel_comm_slowdown"]
