"""train.launchdelay on a real H100 profiler trace and on crafted ones (pure, no GPU).

tests/unit/data/h100_train_step_trace.json is one default-config train step profiled on the
lent H100 (kernels and their launch calls, with the step's own GEMM and collective event
times). At world size 1 NCCL launches no kernel, so collective kernels are added to it where
a test needs them, at known distances from their events. h100_world1_step_kernels.json holds
the GPU kernel events of the bench's profiled steps on the same H100, with the grid and
block the profiler records per kernel (the kernel-launch evidence of issue 16).
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


# -- launch configuration of the collective kernels (issue 16: evidence per point) -----------

# Kernel events of one default-config train step profiled on the lent H100 with the profiler's
# own args kept (grid, block, registers, ...): what torch.profiler really records per kernel.
REAL_KERNELS = json.loads(
    (Path(__file__).parent / "data" / "h100_world1_step_kernels.json").read_text())


def test_the_profiler_records_grid_and_block_per_kernel() -> None:
    from train.launchdelay import launch_config

    gemm = next(e for e in REAL_KERNELS["traceEvents"] if e["name"].startswith("nvjet_sm90"))
    assert launch_config(gemm) == {"kernel": "nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT",
                                   "grid": [2, 66, 1], "block": [384, 1, 1]}
    assert launch_config({"name": "k(int)", "args": {}}) == {"kernel": "k", "grid": None,
                                                            "block": None}


def launched_with(grid_x: int, block_x: int) -> dict[str, Any]:
    """with_collectives' kernels given a launch configuration (synthetic: at world size 1 NCCL
    launches none), the control all-reduce's kernel a small grid of its own."""
    trace = with_collectives(300.0)
    for event in trace["traceEvents"]:
        if event["name"].startswith("ncclDevKernel"):
            small = "(control)" in event["name"]
            event["args"].update(grid=[1 if small else grid_x, 1, 1], block=[block_x, 1, 1])
    return trace


def sample_of(trace: dict[str, Any]) -> dict[str, Any]:
    found = launch_delays(trace, REAL["gemm_ms"], real_ops())
    return {"collective_launches": found.collective_launches}


def expectation(threads: int) -> dict[str, Any]:
    """The launch expectation of a point of NCCL 2.28 (rank 0, 8 channels, RING/SIMPLE) with
    NCCL_NTHREADS=threads, from its debug output rebuilt from NCCL's format strings."""
    from tests.unit import nccl_source_logs as src
    from train.nccl_debug import asked_from_env, effective_settings, parse_nccl_log

    text = src.nccl_2_2x("2.28", nthreads=threads)
    start = text.rfind("\n", 0, text.index("Comm config Min CTAs")) + 1
    env = {"NCCL_NTHREADS": str(threads)}
    point = effective_settings(parse_nccl_log(text[start:]), asked_from_env(env, 8, 8), env,
                               process=parse_nccl_log(text))
    return point["launch_expectation"]


def test_kernels_matching_the_settings_raise_no_flag() -> None:
    from train.launchdelay import launch_check

    # NCCL_NTHREADS=512 under RING/SIMPLE: NCCL launches 512 + one sync warp.
    sample = sample_of(launched_with(8, 544))
    launches = sample["collective_launches"]
    assert [launch.get("op") for launch in launches] == ["control"] + ["all_reduce"] * 8
    checked = launch_check([sample, sample], channels=8, threads=512, control_op="control",
                           expected=expectation(512))
    # 2 samples x 8 gradient kernels; the control kernel's grid of 1 is not counted
    assert checked == {"kernels": 16, "grid_x": [8], "block_x": [544], "flags": [],
                       "reason": None, "block_check": "compared with the library's launch rule"}
    # block.x equal to the threads asked is not what NCCL launches: issue 23's false flag is
    # gone, and the opposite (512 where NCCL adds a warp) is now the finding.
    assert launch_check([sample_of(launched_with(8, 512))], 8, 512, "control",
                        expectation(512))["flags"]


def test_kernels_that_ignored_the_settings_are_flagged() -> None:
    from train.launchdelay import launch_check

    checked = launch_check([sample_of(launched_with(32, 256))], channels=8, threads=512,
                           control_op="control", expected=expectation(512))
    assert checked["flags"][0] == (
        "kernels: NCCL built 8 channels but its collective kernels ran with grid.x [32]")
    assert checked["flags"][1].startswith(
        "kernels: asked 512 threads; collective kernels ran with block.x [256], which is not "
        "what the library launches here (544: RING/SIMPLE: NCCL 2.28.9 RING/SIMPLE: Max "
        "NThreads 512, +1 warp (sync warp))")
    # Without an expectation the blocks are shown, not judged.
    shown = launch_check([sample_of(launched_with(8, 256))], 8, 512, "control")
    assert shown["flags"] == [] and shown["block_x"] == [256]
    assert shown["block_check"].startswith("not compared")


def test_no_kernels_or_no_launch_args_say_why() -> None:
    from train.launchdelay import launch_check

    assert launch_check([], 8, 512, "control")["reason"] == (
        "no collective kernel in the sampled steps")
    bare = launch_check([sample_of(with_collectives(300.0))], 8, 512, "control")
    assert bare["kernels"] == 8 and bare["flags"] == []
    assert bare["reason"] == "the trace carries no grid/block"


def test_the_summary_merges_every_ranks_kernel_launch_check() -> None:
    from train.nccl_debug import merge_kernel_launches, summarize_ranks

    ran = {"kernels": 8, "grid_x": [8], "block_x": [512], "flags": [], "reason": None}
    other = {"kernels": 8, "grid_x": [16], "block_x": [512], "flags": [], "reason": None}
    assert merge_kernel_launches([ran, other]) == {"kernels": 16, "grid_x": [8, 16],
                                                   "block_x": [512], "block_check": None,
                                                   "reason": None}
    none = {"kernels": 0, "grid_x": None, "block_x": None, "flags": [],
            "reason": "no collective kernel in the sampled steps"}
    assert merge_kernel_launches([none])["reason"] == "no collective kernel in the sampled steps"
    summary = summarize_ranks([{"channels": 8, "kernel_launch": ran}, {"channels": 8}])
    assert summary["kernel_launch"]["kernels"] == 8
    assert summarize_ranks([{"channels": 8}])["kernel_launch"] is None
