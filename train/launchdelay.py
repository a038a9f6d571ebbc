"""How long each collective kernel waited to start once it could run (no torch).

Input: a torch.profiler chrome trace of one train step and that step's own CUDA-event times
(ms from the step start). A collective can run once two things have happened:

- its stream reached it: the "start" event recorded on the comm stream right before the
  collective fires then (its bucket's dW GEMM done, the previous collective done);
- the host launched its kernel: the launch call (cudaLaunchKernel / cuLaunchKernelEx) that
  the trace pairs with the kernel by correlation id.

launch_delay_ms = kernel start - the later of the two (never below 0: a kernel that began
before its launch call returned started at once). What is left is time the kernel sat queued
on the device, typically because GEMM blocks held every SM: "NCCL waited for SMs", which
comm_ms would otherwise hide.

The trace's clock and the events' clock are put together on the compute stream: first
coarsely (the first GEMM's start event and the stream's first kernel), then on the GEMMs' end
events, each matched to the compute-stream kernel that ends nearest it. A GEMM's end event
fires the moment its kernel ends, while its start can trail the event by the host's launch
latency (0.2 ms was seen under the profiler on an H100), so the ends give the tight fit.

Kernel-active time (kernel_activity, no clock alignment needed): each timed collective's kernel
duration in the trace, beside its stream-event duration (end event - start event). The end
event fires as the collective's kernel ends, so on the trace's clock the stream reached the
collective at kernel end - stream duration, and the time the kernel sat queued is
min(stream duration - kernel duration, kernel start - its launch call's end), never below 0:
the same quantity as the launch delay, read per collective without fitting the clocks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from train.intervals import percentile

COLLECTIVE_KERNEL_WORDS = ("nccl", "rccl")
LAUNCH_CATEGORIES = ("cuda_runtime", "cuda_driver")
# The refined fit is kept when the matched GEMM ends agree this well (else the coarse one).
MAX_FIT_SPREAD_US = 20.0


@dataclass
class LaunchDelays:
    """Per timed collective of one step: (op name, bucket, delay ms); or a reason for none."""

    delays: list[tuple[str, int, float]] = field(default_factory=list)
    reason: str | None = None
    kernels_seen: int = 0
    collective_kernels_seen: int = 0
    alignment: str | None = None  # "gemm ends" | "first kernel"
    alignment_residual_ms: float | None = None  # p90 of |kernel end - GEMM end event|
    # Each collective kernel's launch configuration, in issue order: what the GPU really ran
    # (an NCCL kernel is launched with one CTA per channel and NCCL's thread count per CTA).
    collective_launches: list[dict[str, Any]] = field(default_factory=list)
    # Per timed collective whose end event is known: (op name, bucket, stream_ms, kernel_ms,
    # queued_ms); see kernel_activity.
    kernel_active: list[tuple[str, int, float, float, float]] = field(default_factory=list)


@dataclass
class KernelActivity:
    """Per timed collective of one step: (op name, bucket, stream-event ms, kernel ms, queued
    ms), in issue order; or a reason for none."""

    active: list[tuple[str, int, float, float, float]] = field(default_factory=list)
    reason: str | None = None
    kernels_seen: int = 0
    collective_kernels_seen: int = 0


def _events(trace: Mapping[str, Any]) -> list[dict[str, Any]]:
    events = trace.get("traceEvents", []) if isinstance(trace, Mapping) else []
    return [e for e in events if isinstance(e, dict) and isinstance(e.get("ts"), (int, float))]


def is_collective_kernel(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in COLLECTIVE_KERNEL_WORDS)


def _args(event: Mapping[str, Any]) -> Mapping[str, Any]:
    args = event.get("args")
    return args if isinstance(args, Mapping) else {}


def launch_config(event: Mapping[str, Any]) -> dict[str, Any]:
    """A kernel event's grid and block (the profiler's "grid"/"block" args, [x, y, z]); None
    where the trace does not carry them."""
    args = _args(event)

    def dims(key: str) -> list[int] | None:
        value = args.get(key)
        if isinstance(value, Sequence) and value and all(isinstance(v, int) for v in value):
            return [int(v) for v in value]
        return None

    return {"kernel": str(event.get("name", "")).split("(", 1)[0][:120],
            "grid": dims("grid"), "block": dims("block")}


def _end(event: Mapping[str, Any]) -> float:
    return float(event["ts"]) + float(event.get("dur", 0.0))


def _fit(compute: Sequence[Mapping[str, Any]], gemm: Sequence[tuple[float, float]],
         result: LaunchDelays) -> float:
    """Offset (us) such that trace time = event ms * 1e3 + offset."""
    coarse = float(compute[0]["ts"]) - gemm[0][0] * 1e3
    ends = [_end(k) for k in compute]
    diffs = []
    for _, event_end in gemm:
        aligned = event_end * 1e3 + coarse
        diffs.append(min(ends, key=lambda e: abs(e - aligned)) - aligned)
    middle = percentile(diffs, 50) or 0.0
    spread = percentile([abs(d - middle) for d in diffs], 90) or 0.0
    if spread <= MAX_FIT_SPREAD_US:
        result.alignment, result.alignment_residual_ms = "gemm ends", round(spread / 1e3, 4)
        return coarse + middle
    result.alignment, result.alignment_residual_ms = "first kernel", round(spread / 1e3, 4)
    return coarse


def _kernels(events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted((e for e in events if e.get("cat") == "kernel" and e.get("ph", "X") == "X"),
                  key=lambda e: float(e["ts"]))


def _launch_ends(events: Sequence[Mapping[str, Any]]) -> dict[Any, float]:
    """Correlation id -> end of the host's launch call (trace clock, us)."""
    return {
        _args(e).get("correlation"): _end(e) for e in events
        if e.get("cat") in LAUNCH_CATEGORIES and _args(e).get("correlation") is not None
    }


Op = tuple[str, int, float] | tuple[str, int, float, float]


def kernel_activity(trace: Mapping[str, Any], ops: Sequence[Op]) -> KernelActivity:
    """ops: the step's timed collectives in issue order, (name, bucket, start-event ms,
    end-event ms). Pairs them with the collective kernels in order; no clock fit, so it works
    for steps without GEMMs (the comm-only calibration steps) as well."""
    events = _events(trace)
    kernels = _kernels(events)
    collective = [k for k in kernels if is_collective_kernel(str(k.get("name", "")))]
    found = KernelActivity(kernels_seen=len(kernels), collective_kernels_seen=len(collective))
    if not collective:
        found.reason = ("no collective kernel in the profiled steps (at world size 1 NCCL "
                        "moves nothing and launches none)")
        return found
    if len(collective) != len(ops):
        found.reason = (f"{len(collective)} collective kernels for {len(ops)} timed collectives: "
                        "cannot pair them")
        return found
    if any(len(op) < 4 for op in ops):
        found.reason = "the collectives' end events are not known"
        return found
    launched = _launch_ends(events)
    for kernel, op in zip(collective, ops, strict=True):
        name, bucket, start_ms, end_ms = op[0], op[1], op[2], op[3]  # type: ignore[misc]
        stream_us = max(0.0, (float(end_ms) - float(start_ms)) * 1e3)
        kernel_us = float(kernel.get("dur", 0.0))
        queued_us = stream_us - kernel_us
        call_end = launched.get(_args(kernel).get("correlation"))
        if call_end is not None:
            queued_us = min(queued_us, float(kernel["ts"]) - call_end)
        found.active.append((name, bucket, round(stream_us / 1e3, 4), round(kernel_us / 1e3, 4),
                             round(max(0.0, queued_us) / 1e3, 4)))
    return found


def kernel_activity_by_step(trace: Mapping[str, Any],
                            steps: Sequence[Sequence[Op]]) -> list[KernelActivity]:
    """kernel_activity of several steps profiled in one session, one entry per step: their
    collective kernels pair with the steps' collectives in issue order, then split by step."""
    found = kernel_activity(trace, [op for ops in steps for op in ops])
    if found.reason is not None:
        return [KernelActivity(reason=found.reason, kernels_seen=found.kernels_seen,
                               collective_kernels_seen=found.collective_kernels_seen)
                for _ in steps]
    out, done = [], 0
    for ops in steps:
        out.append(KernelActivity(found.active[done:done + len(ops)], None, found.kernels_seen,
                                  found.collective_kernels_seen))
        done += len(ops)
    return out


def launch_delays(
    trace: Mapping[str, Any],
    gemm: Sequence[tuple[float, float]],
    ops: Sequence[Op],
) -> LaunchDelays:
    """gemm: the step's GEMM (or phase) event intervals in ms; ops: the step's timed
    collectives in issue order, (name, bucket, start-event ms[, end-event ms]); with the end
    events the kernel-active times come along (kernel_activity)."""
    events = _events(trace)
    kernels = _kernels(events)
    collective = [k for k in kernels if is_collective_kernel(str(k.get("name", "")))]
    result = LaunchDelays(kernels_seen=len(kernels), collective_kernels_seen=len(collective))
    result.collective_launches = [launch_config(k) for k in collective]
    if len(collective) == len(ops):
        for launch, op in zip(result.collective_launches, ops, strict=True):
            launch.update(op=op[0], bucket=op[1])
    result.kernel_active = kernel_activity(trace, ops).active
    if not kernels:
        result.reason = "the profiler recorded no GPU kernels"
        return result
    if not gemm:
        result.reason = "no GEMM events to align the clocks with"
        return result
    # The compute stream is the one that ran the most kernel time outside the collectives:
    # the GEMMs dominate every step.
    busy: dict[Any, float] = {}
    for k in kernels:
        if not is_collective_kernel(str(k.get("name", ""))):
            stream = _args(k).get("stream")
            busy[stream] = busy.get(stream, 0.0) + float(k.get("dur", 0.0))
    if not busy:
        result.reason = "no compute kernel to align the clocks with"
        return result
    compute_stream = max(busy, key=lambda s: busy[s])
    compute = [k for k in kernels if _args(k).get("stream") == compute_stream
               and not is_collective_kernel(str(k.get("name", "")))]
    offset_us = _fit(compute, gemm, result)
    if not collective:
        result.reason = ("no collective kernel in the profiled steps (at world size 1 NCCL "
                         "moves nothing and launches none)")
        return result
    if len(collective) != len(ops):
        result.reason = (f"{len(collective)} collective kernels for {len(ops)} timed collectives: "
                         "cannot pair them")
        return result
    launched = _launch_ends(events)
    for kernel, (name, bucket, start_ms, *_) in zip(collective, ops, strict=True):
        ready = start_ms * 1e3 + offset_us
        call_end = launched.get(_args(kernel).get("correlation"))
        if call_end is not None:
            ready = max(ready, call_end)
        delay = max(0.0, float(kernel["ts"]) - ready) / 1e3
        result.delays.append((name, bucket, round(delay, 4)))
    return result


def launch_check(samples: Sequence[Mapping[str, Any]], channels: int | None,
                 threads: int | None, control_op: str,
                 expected: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The collective kernels' launch configurations over a point's sampled steps, against the
    channels NCCL said it built and the block NCCL launches for the point's collectives.

    grid.x is the channels a collective uses; block.x is not the thread count asked: NCCL adds
    warps per algorithm and protocol and fixes some algorithms' blocks (train.nccl_launch), so
    ``expected`` (the effective settings' launch_expectation: {"allowed": {block: why}, "reason"})
    says which block.x values NCCL launches here; a block outside them is measured evidence
    that the setting did not reach the kernels. Without an expectation the blocks are shown,
    not judged (``threads`` stays for the record). The stop-flag all-reduce (one element, its
    own small grid) is left out where kernels could be paired with their collectives."""
    launches = [launch for sample in samples for launch in sample.get("collective_launches", [])
                if launch.get("op") != control_op]
    grids = sorted({launch["grid"][0] for launch in launches if launch.get("grid")})
    blocks = sorted({launch["block"][0] for launch in launches if launch.get("block")})
    flags: list[str] = []
    if not launches:
        reason = "no collective kernel in the sampled steps"
        return {"kernels": 0, "grid_x": None, "block_x": None, "flags": flags, "reason": reason,
                "block_check": None}
    if channels is not None and grids and max(grids) != channels:
        flags.append(f"kernels: NCCL built {channels} channels but its collective kernels ran "
                     f"with grid.x {grids}")
    allowed = (expected or {}).get("allowed")
    if blocks and isinstance(allowed, Mapping) and allowed:
        # A kernel paired with its collective is a gradient bucket's; an unpaired one may be
        # the small stop-flag all-reduce, whose block NCCL sizes for 4 bytes.
        unpaired = (expected or {}).get("allowed_unpaired") or allowed
        wrong = sorted({launch["block"][0] for launch in launches if launch.get("block")
                        and int(launch["block"][0]) not in
                        {int(k) for k in (allowed if launch.get("op") else unpaired)}})
        if wrong:
            told = "; ".join(f"{k}: {v}" for k, v in
                             sorted(allowed.items(), key=lambda kv: int(kv[0])))
            flags.append(f"kernels: asked {threads} threads; collective kernels ran with block.x "
                         f"{wrong}, which is not what the library launches here ({told})")
        block_check = "compared with the library's launch rule"
    else:
        block_check = ("not compared: " + str((expected or {}).get("reason")
                                               or "no launch expectation for this rank"))
    return {"kernels": len(launches), "grid_x": grids or None, "block_x": blocks or None,
            "flags": flags, "reason": None if grids else "the trace carries no grid/block",
            "block_check": block_check if blocks else None}
