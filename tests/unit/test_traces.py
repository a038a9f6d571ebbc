"""tasks/lib/traces.py on real PyTorch profiler traces (pure, no GPU).

Data:
- data/h100_train_step_trace.json: one default-config train step of our loop profiled on the
  lent H100 (torch 2.11.0+cu130; kernels and their launch calls), with the loop's own CUDA-event
  GEMM intervals (`gemm_ms`): the agreement of the trace's compute time with the events'.
- data/h100_world1_step_kernels.json: the kernels of the same H100's profiled steps with the
  grid and block the profiler records (kernel identities).
- data/traces/<name>.trace.json + <name>.expected.json: recorded by scripts/record_trace.py
  with the workload's own measurements beside the trace (gemm_copy_cpu: torch 2.13.0+cpu on
  this 2-core box, ProfilerStep#N annotations and the wall time of every step). Every pair
  found there is checked, so GPU recordings added by `record_trace.py` on the device are
  checked as well.

At world size 1 no collective kernel runs, so where a test needs communication overlapping
compute it is derived from the real trace (a real kernel moved onto a side stream, named as
communication by the configurable pattern); each such test says how.
"""
from __future__ import annotations

import copy
import gzip
import json
import re
import statistics
from pathlib import Path
from typing import Any

import pytest

from tasks.lib import traces
from tasks.lib.traces import TraceError, analyse_trace, load_trace, parse_trace

DATA = Path(__file__).parent / "data"
TRAIN_STEP = json.loads((DATA / "h100_train_step_trace.json").read_text())
KERNELS = json.loads((DATA / "h100_world1_step_kernels.json").read_text())
GEMM = "nvjet"          # cuBLAS's Hopper GEMM kernels in these traces
ADD = "CUDAFunctor_add"  # the step's elementwise add kernel: the stand-in for a collective


def kernels_named(trace: dict[str, Any], text: str) -> list[dict[str, Any]]:
    return [e for e in trace["traceEvents"] if e.get("cat") == "kernel" and text in e["name"]]


# -- agreement with the loop's own event-based figures (real H100 data) --------------------------

def test_compute_time_of_the_real_h100_step_agrees_with_the_loops_gemm_events():
    """The loop times every GEMM with CUDA events (gemm_ms); the trace's GEMM kernels, unioned,
    come to 31.878 ms against the events' 32.208 ms: -1.0 % (events include launch gaps)."""
    analysis = analyse_trace(TRAIN_STEP, comm_pattern="(?!)", compute_pattern=GEMM)
    (step,) = analysis.steps
    events_ms = traces.length(traces.union(tuple(i) for i in TRAIN_STEP["gemm_ms"]))
    assert step.compute_ms == pytest.approx(31.878, abs=0.001)
    assert abs(step.compute_ms / events_ms - 1) < 0.02
    assert step.comm_ms == 0 and step.hidden_share is None
    assert "no ProfilerStep#N annotations" in analysis.problems[0]


def test_every_kernel_not_named_communication_is_compute_by_default():
    analysis = analyse_trace(TRAIN_STEP)  # NCCL's and RCCL's names: none at world size 1
    (step,) = analysis.steps
    assert analysis.comm_kernels == [] and step.comm_ms == 0
    gemm_only = analyse_trace(TRAIN_STEP, compute_pattern=GEMM).steps[0].compute_ms
    assert step.compute_ms > gemm_only  # the fill and add kernels count as compute too
    assert step.kernels == 25


# -- communication overlapping compute (derived from the real trace) ----------------------------

def with_side_stream_comm(stretch: float = 1.10, over_gemm: int = 12) -> tuple[dict, dict]:
    """h100_world1_step_kernels with its add kernel moved onto a side stream (stream 99) to
    start with GEMM #`over_gemm` and last 3 GEMMs, and the GEMMs it overlaps stretched by
    `stretch` (the later ones shifted): what a collective slowing its neighbours looks like.
    Returns the trace and the hand-computed expectations."""
    trace = copy.deepcopy(KERNELS)
    gemms = sorted(kernels_named(trace, GEMM), key=lambda e: e["ts"])
    (add,) = kernels_named(trace, ADD)
    start = gemms[over_gemm]["ts"]
    add.update(ts=start, dur=3 * gemms[over_gemm]["dur"])
    add["args"]["stream"] = 99
    comm_end = add["ts"] + add["dur"]
    shift = 0.0
    overlapped = []
    for gemm in gemms[over_gemm:]:
        gemm["ts"] += shift
        if gemm["ts"] < comm_end:
            extra = gemm["dur"] * (stretch - 1)
            gemm["dur"] += extra
            shift += extra
            overlapped.append(gemm)
    compute = traces.union((e["ts"], e["ts"] + e["dur"]) for e in trace["traceEvents"]
                           if e is not add)
    hidden = traces.intersection_length([(add["ts"], comm_end)], compute)
    return trace, {"overlapped": overlapped, "comm_us": add["dur"], "hidden_us": hidden}


def test_hidden_and_exposed_communication_from_a_side_stream_kernel():
    trace, expect = with_side_stream_comm()
    analysis = analyse_trace(trace, comm_pattern=ADD)
    (step,) = analysis.steps
    assert analysis.comm_kernels == [kernels_named(KERNELS, ADD)[0]["name"]]
    assert step.comm_ms == pytest.approx(expect["comm_us"] / 1000)
    assert step.hidden_comm_ms == pytest.approx(expect["hidden_us"] / 1000, rel=1e-4)
    assert step.exposed_comm_ms == pytest.approx((expect["comm_us"] - expect["hidden_us"]) / 1000, abs=1e-6)
    assert step.hidden_share == pytest.approx(expect["hidden_us"] / expect["comm_us"], rel=1e-4)
    assert 0.99 < step.hidden_share <= 1.0  # GEMMs run throughout: almost all of it hidden


def test_compute_slowdown_is_measured_per_kernel_identity_against_the_same_kernel_alone():
    trace, expect = with_side_stream_comm(stretch=1.10)
    analysis = analyse_trace(trace, comm_pattern=ADD)
    by_identity = {(s.name, s.grid, s.block): s for s in analysis.slowdowns}
    hit = expect["overlapped"]
    assert len(hit) >= 3
    for identity in {(g["name"], tuple(g["args"]["grid"]), tuple(g["args"]["block"])) for g in hit}:
        found = by_identity[identity]
        same = [g for g in hit if g["name"] == identity[0]]
        alone = [g["dur"] for g in kernels_named(trace, identity[0]) if g not in hit]
        assert (found.overlapped, found.alone) == (len(same), len(alone))
        expected = sum(g["dur"] for g in same) / (len(same) * statistics.median(alone)) - 1
        assert found.slowdown == pytest.approx(expected, rel=1e-5)
        assert 0.08 < found.slowdown < 0.12   # the 10 % stretch, give or take the real spread
        assert found.grid == (2, 66, 1) and found.block == (384, 1, 1)
    assert 0.08 < analysis.slowdown_overall < 0.12
    # The elementwise kernel never ran beside communication: no overlapped sample, no figure.
    assert all(s.slowdown is None for s in analysis.slowdowns if ADD in s.name)


def test_kernels_of_another_shape_are_another_identity():
    trace, _ = with_side_stream_comm()
    for gemm in kernels_named(trace, GEMM)[:4]:
        gemm["args"]["grid"] = [4, 66, 1]
    identities = {(s.name, s.grid) for s in analyse_trace(trace, comm_pattern=ADD).slowdowns}
    assert (kernels_named(KERNELS, GEMM)[0]["name"], (4, 66, 1)) in identities


# -- steps ---------------------------------------------------------------------------------------

def with_cpu_steps(trace: dict[str, Any]) -> dict[str, Any]:
    """The H100 train step's trace with two ProfilerStep#N CPU annotations (the format of the
    real recording in data/traces/) splitting its launch calls in half: kernels go to the step
    whose span holds their launch call (same correlation id)."""
    trace = copy.deepcopy(trace)
    launches = sorted(e["ts"] for e in trace["traceEvents"] if e.get("cat") in ("cuda_runtime", "cuda_driver"))
    middle = launches[len(launches) // 2]
    first, last = launches[0] - 1, launches[-1] + 1
    trace["traceEvents"] += [
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#7", "ts": first, "dur": middle - first},
        {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#8", "ts": middle, "dur": last - middle}]
    return trace


def test_kernels_belong_to_the_step_that_launched_them():
    trace = with_cpu_steps(TRAIN_STEP)
    analysis = analyse_trace(trace)
    assert [s.step for s in analysis.steps] == [7, 8]
    assert sum(s.kernels for s in analysis.steps) == 25
    launched = {e["args"]["correlation"]: e["ts"] for e in trace["traceEvents"]
                if e.get("cat") in ("cuda_runtime", "cuda_driver")}
    middle = next(e["ts"] for e in trace["traceEvents"] if e["name"] == "ProfilerStep#8")
    expected_first = sum(1 for k in trace["traceEvents"] if k.get("cat") == "kernel"
                         and launched[k["args"]["correlation"]] < middle)
    assert analysis.steps[0].kernels == expected_first
    assert analysis.problems == []


def test_a_gpu_step_annotation_wins_over_the_cpu_one():
    trace = with_cpu_steps(TRAIN_STEP)
    kernels = sorted(kernels_named(trace, ""), key=lambda e: e["ts"])
    trace["traceEvents"].append({"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#8",
                                 "ts": kernels[0]["ts"], "dur": 1e9})
    analysis = analyse_trace(trace)
    assert [(s.step, s.kernels) for s in analysis.steps if s.kernels] == [(8, 25)]


@pytest.mark.parametrize("name", sorted(p.name.removesuffix(".expected.json")
                                        for p in (DATA / "traces").glob("*.expected.json")))
def test_recorded_traces_agree_with_their_workloads_own_figures(name):
    """Every recording of scripts/record_trace.py: step times against the workload's own wall
    clock; on a GPU recording also compute/communication against its CUDA events."""
    expected = json.loads((DATA / "traces" / f"{name}.expected.json").read_text())
    path = DATA / "traces" / f"{name}.trace.json"
    analysis = traces.analyse_files([path], comm_pattern=expected["comm_pattern"],
                                    compute_pattern=expected.get("compute_pattern"))[0]
    steps, _ = traces.step_times_by_rank([path])
    if expected.get("wall_ms"):
        (times,) = steps.values()
        assert len(times) == len(expected["wall_ms"])
        for trace_ms, wall_ms in zip(times, expected["wall_ms"]):
            assert abs(trace_ms / wall_ms - 1) < 0.05, (trace_ms, wall_ms)
    for ours, theirs in zip([s for s in analysis.steps if s.step is not None], expected.get("steps") or []):
        assert ours.comm_ms == pytest.approx(theirs["comm_ms"], rel=0.05, abs=0.02)
        assert ours.compute_ms == pytest.approx(theirs["compute_ms"], rel=0.05)
    if expected["device"] == "cpu":
        assert "no GPU kernels" in analysis.problems[0]


def test_the_cpu_recording_holds_real_profiler_step_annotations():
    trace = load_trace(DATA / "traces" / "gemm_copy_cpu.trace.json")
    cpu, gpu = traces.step_spans(trace)
    assert [s.step for s in cpu] == [1, 2, 3, 4, 5, 6] and gpu == []


# -- reading node output safely ------------------------------------------------------------------

def test_a_trace_over_the_size_cap_is_not_read(tmp_path):
    path = tmp_path / "rank_00.json"
    path.write_text(json.dumps(TRAIN_STEP))
    with pytest.raises(TraceError, match="larger than"):
        load_trace(path, max_bytes=1000)
    assert load_trace(path)["traceEvents"]


def test_a_compressed_trace_is_capped_after_decompression(tmp_path):
    path = tmp_path / "bomb.json.gz"
    path.write_bytes(gzip.compress(b"[" + b" " * (4 << 20) + b"]"))
    with pytest.raises(TraceError, match="larger than"):
        load_trace(path, max_bytes=1 << 20)
    small = tmp_path / "ok.json.gz"
    small.write_bytes(gzip.compress(json.dumps(TRAIN_STEP).encode()))
    assert len(load_trace(small)["traceEvents"]) == 50


@pytest.mark.parametrize("text, message", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("{not json", "not JSON"),
    ('{"traceEvents": 3}', "no traceEvents list"),
    ("42", "no traceEvents list"),
])
def test_hostile_or_broken_traces_are_one_line_errors(text, message):
    with pytest.raises(TraceError, match=message):
        parse_trace(text, "rank_01.json")


def test_events_of_the_wrong_shape_are_skipped_not_fatal():
    trace = parse_trace(json.dumps([
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllReduce", "ts": "0", "dur": 5},
        {"ph": "X", "cat": "kernel", "name": ["x"], "ts": 0, "dur": 5},
        {"ph": "X", "cat": "kernel", "name": "k", "ts": 0, "dur": -1},
        {"ph": "X", "cat": "kernel", "name": "k", "ts": 1e400, "dur": 1},
        "string", 7, None,
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 10, "dur": 5,
         "args": {"grid": "huge", "block": [1, 2, 3, 4], "stream": True}},
    ]))
    analysis = analyse_trace(trace)
    (kernel,) = traces.gpu_events(trace, re.compile("nccl"))
    assert (kernel.grid, kernel.block, kernel.stream) == (None, None, None)
    assert analysis.steps[0].compute_ms == pytest.approx(0.005)


def test_the_rank_comes_from_the_trace_or_its_file_name():
    assert traces.trace_rank({"distributedInfo": {"rank": 3}}, "x.json") == 3
    assert traces.trace_rank({}, "rank_05_step_7.json") == 5
    assert traces.trace_rank({"distributedInfo": {"rank": "3"}}, "worker.json") is None


def test_the_report_section_escapes_node_sent_names():
    trace, _ = with_side_stream_comm()
    for event in kernels_named(trace, GEMM):
        event["name"] = "evil|name`<script>"
    lines = traces.summary_lines([analyse_trace(trace, comm_pattern=ADD, name="rank_00|x.json")])
    text = "\n".join(lines)
    assert "rank\\_00\\|x.json" in text and "evil\\|name\\`\\<script\\>" in text
    assert "<script>" not in text


def test_fab_reports_the_trace_analysis_of_a_runs_traces(tmp_path):
    from tasks.lib.report.outputs import write_report

    run = tmp_path / "multinode_28ch_256th_20260101_000000_aaaaaa"
    profiler = run / "256thread_28channels" / "torch_profiler"
    profiler.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"status": "succeeded", "flags": {
        "channels": 28, "threads": 256, "entry": {"argv": ["train.py"]}, "metric": "trace"}}))
    trace, _ = with_side_stream_comm()
    kernels = sorted(kernels_named(trace, ""), key=lambda e: e["ts"])
    middle, end = kernels[12]["ts"], kernels[-1]["ts"] + kernels[-1]["dur"] + 1
    trace["traceEvents"] += [  # two steps on the GPU timeline, the second from GEMM #12 on
        {"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#3",
         "ts": kernels[0]["ts"], "dur": middle - kernels[0]["ts"]},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "ProfilerStep#4", "ts": middle,
         "dur": end - middle}]
    (profiler / "rank_00_step_3.json").write_text(json.dumps(trace))
    write_report(run, plots=False, comm_pattern=ADD)
    text = (run / "report.md").read_text()
    assert "## Trace analysis (PyTorch profiler): 256thread\\_28channels" in text
    row = next(line for line in text.splitlines() if line.startswith("| 0 | rank\\_00\\_step\\_3.json"))
    assert "| 2 |" in row  # two steps
    assert "Compute kernels slowed most" in text and "grid [2, 66, 1]" in text
    default = write_report(run, plots=False)  # NCCL/RCCL names: no communication in this trace
    assert "| 0.000 | 0.000 | 0.000 | - | - |" in (run / "report.md").read_text()
    assert default.rows[0].objective.startswith("step time from the PyTorch profiler traces")
