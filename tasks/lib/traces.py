"""Communication and computation from PyTorch profiler traces, without the job's cooperation.

Any job profiled with torch.profiler (our train package with --torch-profile, or a training of
the user's own) writes Chrome trace JSON per rank: every GPU kernel with its stream, start,
duration and launch configuration (grid, block), and the profiler's ``ProfilerStep#N``
annotations. From those alone, per rank and per step:

- communication time: the union of the intervals of communication kernels (names matching
  ``comm_pattern``: NCCL's and RCCL's kernels by default; configurable, e.g. a copy kernel on a
  side stream standing in for communication at world size 1);
- compute time: the union of every other kernel's intervals (memcpy/memset activity is
  neither);
- hidden communication: the time both run at once (the intersection of the two unions);
  exposed communication: communication minus hidden; the hidden share: hidden / communication;
- the slowdown of compute kernels while a collective runs, per kernel identity (name + grid +
  block): Σ durations of the kernels of that identity that overlapped a communication kernel
  over (their count × the median duration of the same identity running with no communication
  kernel at all, in the same trace) − 1. The same definitions as our loop's event-based
  figures (train/metrics.py: compute_ms, comm_ms, overlap_ms, exposed_comm_ms,
  gemm_contention_slowdown), so the two can be compared on our own runs (docs/METRICS.md).

Steps come from ``ProfilerStep#N``: the GPU-side annotation when the trace has one, else the
CPU annotation that contains the kernel's launch call (matched by correlation id).

Traces are node output: read with a size cap, and a malformed or hostile file (deep nesting,
wrong types) is a problem reported for that file, never an exception out of here. Pure: no
torch; stdlib JSON.
"""
from __future__ import annotations

import gzip
import json
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MAX_TRACE_BYTES = 256 << 20
DEFAULT_COMM_PATTERN = r"(?i)nccl|rccl"
KERNEL_CATS = frozenset({"kernel"})
MEMORY_CATS = frozenset({"gpu_memcpy", "gpu_memset"})
LAUNCH_CATS = frozenset({"cuda_runtime", "cuda_driver", "hip_runtime", "hip_driver"})
STEP_NAME = re.compile(r"^ProfilerStep#(\d+)$")
RANK_IN_NAME = re.compile(r"rank[_-]?(\d+)")

Interval = tuple[float, float]


class TraceError(ValueError):
    """A trace file that cannot be read; one line."""


# -- reading -------------------------------------------------------------------------------------

def load_trace(path: Path, max_bytes: int = MAX_TRACE_BYTES) -> dict[str, Any]:
    """A Chrome trace as {"traceEvents": [...], ...}, at most `max_bytes` of JSON text (after
    decompression for .gz)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                data = handle.read(max_bytes + 1)
        else:
            if path.stat().st_size > max_bytes:
                raise TraceError(f"{path.name}: larger than {max_bytes >> 20} MiB: not read")
            data = path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise TraceError(f"{path.name}: cannot read: {getattr(err, 'strerror', None) or err}") from None
    if len(data) > max_bytes:
        raise TraceError(f"{path.name}: larger than {max_bytes >> 20} MiB: not read")
    return parse_trace(data, path.name)


def parse_trace(data: bytes | str, name: str = "trace") -> dict[str, Any]:
    try:
        document = json.loads(data)
    except RecursionError:
        raise TraceError(f"{name}: nested too deeply to be a trace") from None
    except ValueError as err:
        raise TraceError(f"{name}: not JSON ({str(err)[:120]})") from None
    if isinstance(document, list):
        document = {"traceEvents": document}
    if not isinstance(document, dict) or not isinstance(document.get("traceEvents"), list):
        raise TraceError(f"{name}: no traceEvents list: not a Chrome trace")
    return document


def trace_rank(trace: Mapping[str, Any], name: str = "") -> int | None:
    """The rank that wrote the trace: torch records distributedInfo.rank; else `rank_XX` in the
    file name (our train package's naming); else unknown."""
    info = trace.get("distributedInfo")
    rank = info.get("rank") if isinstance(info, Mapping) else None
    if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0:
        return rank
    match = RANK_IN_NAME.search(name)
    return int(match.group(1)) if match else None


# -- events --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuEvent:
    name: str
    start: float          # µs, the trace's clock
    end: float
    stream: int | None
    kind: str             # compute | comm | memory | other (a kernel outside compute_pattern)
    grid: tuple[int, ...] | None
    block: tuple[int, ...] | None
    correlation: int | None

    @property
    def identity(self) -> tuple[str, tuple[int, ...] | None, tuple[int, ...] | None]:
        return (self.name, self.grid, self.block)

    @property
    def dur(self) -> float:
        return self.end - self.start


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if number == number and abs(number) != float("inf") else None


def _dims(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, list) and 0 < len(value) <= 3 and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return tuple(value)
    return None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def gpu_events(trace: Mapping[str, Any], comm: re.Pattern[str],
               compute: re.Pattern[str] | None = None) -> list[GpuEvent]:
    """Kernels (comm by name; compute: every other kernel, or those matching `compute`; the
    rest "other") and memory operations, sorted by start."""
    found = []
    for event in trace.get("traceEvents") or []:
        if not isinstance(event, Mapping) or event.get("ph") != "X":
            continue
        cat = event.get("cat")
        if cat not in KERNEL_CATS and cat not in MEMORY_CATS:
            continue
        name, ts, dur = event.get("name"), _number(event.get("ts")), _number(event.get("dur"))
        if not isinstance(name, str) or ts is None or dur is None or dur < 0:
            continue
        args = event.get("args") if isinstance(event.get("args"), Mapping) else {}
        if comm.search(name):
            kind = "comm"
        elif cat not in KERNEL_CATS:
            kind = "memory"
        else:
            kind = "compute" if compute is None or compute.search(name) else "other"
        found.append(GpuEvent(name=name[:500], start=ts, end=ts + dur,
                              stream=_int(args.get("stream")), kind=kind,
                              grid=_dims(args.get("grid")), block=_dims(args.get("block")),
                              correlation=_int(args.get("correlation"))))
    return sorted(found, key=lambda e: (e.start, e.end))


@dataclass(frozen=True)
class StepSpan:
    step: int
    start: float
    end: float


def step_spans(trace: Mapping[str, Any]) -> tuple[list[StepSpan], list[StepSpan]]:
    """(CPU, GPU) ProfilerStep#N spans: the CPU annotation ("user_annotation") and, in newer
    torch, its copy on the GPU timeline ("gpu_user_annotation")."""
    cpu: list[StepSpan] = []
    gpu: list[StepSpan] = []
    for event in trace.get("traceEvents") or []:
        if not isinstance(event, Mapping) or event.get("ph") != "X":
            continue
        name = event.get("name")
        match = STEP_NAME.match(name) if isinstance(name, str) else None
        ts, dur = _number(event.get("ts")), _number(event.get("dur"))
        if match is None or ts is None or dur is None:
            continue
        span = StepSpan(int(match.group(1)), ts, ts + dur)
        (gpu if event.get("cat") == "gpu_user_annotation" else cpu).append(span)
    return sorted(cpu, key=lambda s: s.start), sorted(gpu, key=lambda s: s.start)


def launch_times(trace: Mapping[str, Any]) -> dict[int, float]:
    """correlation id -> start of the CPU call that launched the kernel (cudaLaunchKernel ...)."""
    found: dict[int, float] = {}
    for event in trace.get("traceEvents") or []:
        if not isinstance(event, Mapping) or event.get("cat") not in LAUNCH_CATS:
            continue
        args = event.get("args") if isinstance(event.get("args"), Mapping) else {}
        correlation, ts = _int(args.get("correlation")), _number(event.get("ts"))
        if correlation is not None and ts is not None:
            found.setdefault(correlation, ts)
    return found


def _span_of(time: float, spans: Sequence[StepSpan]) -> int | None:
    for span in spans:
        if span.start <= time < span.end:
            return span.step
    return None


def assign_steps(events: Sequence[GpuEvent], trace: Mapping[str, Any]) -> dict[int | None, list[GpuEvent]]:
    """The events of each step (None: outside every step, or no step annotations)."""
    cpu, gpu = step_spans(trace)
    launches = launch_times(trace) if not gpu and cpu else {}
    by_step: dict[int | None, list[GpuEvent]] = {}
    for event in events:
        if gpu:
            step = _span_of(event.start, gpu)
        elif cpu:
            launched = launches.get(event.correlation) if event.correlation is not None else None
            step = _span_of(launched, cpu) if launched is not None else None
        else:
            step = None
        by_step.setdefault(step, []).append(event)
    return by_step


# -- interval arithmetic ---------------------------------------------------------------------------

def union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[list[float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(a, b) for a, b in merged]


def length(intervals: Iterable[Interval]) -> float:
    return sum(end - start for start, end in intervals)


def intersection_length(a: Sequence[Interval], b: Sequence[Interval]) -> float:
    """Length of the intersection of two unions (each sorted, non-overlapping)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if high > low:
            total += high - low
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# -- analysis --------------------------------------------------------------------------------------

@dataclass
class StepFigures:
    """One profiler step of one rank, in ms."""

    step: int | None
    step_ms: float | None          # the ProfilerStep#N annotation (CPU side; GPU when only that)
    compute_ms: float
    comm_ms: float
    hidden_comm_ms: float
    exposed_comm_ms: float
    hidden_share: float | None     # hidden / comm; None without communication
    kernels: int


@dataclass
class KernelSlowdown:
    """One compute kernel identity: alone against while a communication kernel ran."""

    name: str
    grid: tuple[int, ...] | None
    block: tuple[int, ...] | None
    alone: int
    overlapped: int
    alone_median_us: float | None
    overlapped_median_us: float | None
    overlap_fraction_median: float | None  # share of an overlapped kernel's time under comm
    slowdown: float | None                 # None without both kinds of sample


@dataclass
class TraceAnalysis:
    file: str
    rank: int | None
    comm_pattern: str
    steps: list[StepFigures] = field(default_factory=list)
    slowdowns: list[KernelSlowdown] = field(default_factory=list)
    comm_kernels: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def median(self, attribute: str) -> float | None:
        values = [getattr(s, attribute) for s in self.steps if getattr(s, attribute) is not None]
        return statistics.median(values) if values else None

    @property
    def slowdown_overall(self) -> float | None:
        """Σ overlapped durations / Σ (count × alone median) − 1 over every identity with both."""
        paired = [s for s in self.slowdowns if s.slowdown is not None]
        if not paired:
            return None
        actual = sum(s.overlapped * (s.overlapped_median_us or 0) for s in paired)
        expected = sum(s.overlapped * (s.alone_median_us or 0) for s in paired)
        return actual / expected - 1 if expected else None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("compute_ms", "comm_ms", "hidden_comm_ms", "exposed_comm_ms", "hidden_share",
                    "step_ms"):
            data[f"{key}_median"] = self.median(key)
        data["slowdown_overall"] = self.slowdown_overall
        return data


def step_figures(step: int | None, step_ms: float | None, events: Sequence[GpuEvent]) -> StepFigures:
    compute = union((e.start, e.end) for e in events if e.kind == "compute")
    comm = union((e.start, e.end) for e in events if e.kind == "comm")
    comm_us, hidden_us = length(comm), intersection_length(comm, compute)
    return StepFigures(step=step, step_ms=step_ms, compute_ms=length(compute) / 1000,
                       comm_ms=comm_us / 1000, hidden_comm_ms=hidden_us / 1000,
                       exposed_comm_ms=(comm_us - hidden_us) / 1000,
                       hidden_share=hidden_us / comm_us if comm_us > 0 else None,
                       kernels=sum(e.kind in ("compute", "comm") for e in events))


def kernel_slowdowns(events: Sequence[GpuEvent], min_overlap: float = 0.0) -> list[KernelSlowdown]:
    """Per compute kernel identity: instances with no communication kernel running at any
    moment of theirs ("alone") against instances whose overlap with communication is more than
    `min_overlap` of their duration (0: any part, as train/metrics.py's gemm_contention_slowdown)."""
    comm = union((e.start, e.end) for e in events if e.kind == "comm")
    alone: dict[tuple[Any, ...], list[float]] = {}
    under: dict[tuple[Any, ...], list[tuple[float, float]]] = {}
    for event in events:
        if event.kind != "compute" or event.dur <= 0:
            continue
        shared = intersection_length([(event.start, event.end)], comm) if comm else 0.0
        if shared <= 0:
            alone.setdefault(event.identity, []).append(event.dur)
        elif shared / event.dur > min_overlap:
            under.setdefault(event.identity, []).append((event.dur, shared / event.dur))
    found = []
    for identity in sorted(set(alone) | set(under), key=lambda k: (k[0], str(k[1]), str(k[2]))):
        solo, hit = alone.get(identity, []), under.get(identity, [])
        solo_median = statistics.median(solo) if solo else None
        hit_median = statistics.median(d for d, _ in hit) if hit else None
        slowdown = None
        if solo_median and hit:
            slowdown = sum(d for d, _ in hit) / (len(hit) * solo_median) - 1
        found.append(KernelSlowdown(
            name=identity[0], grid=identity[1], block=identity[2], alone=len(solo),
            overlapped=len(hit), alone_median_us=solo_median, overlapped_median_us=hit_median,
            overlap_fraction_median=statistics.median(f for _, f in hit) if hit else None,
            slowdown=slowdown))
    return found


def analyse_trace(trace: Mapping[str, Any], *, comm_pattern: str = DEFAULT_COMM_PATTERN,
                  compute_pattern: str | None = None, name: str = "trace",
                  rank: int | None = None, min_overlap: float = 0.0) -> TraceAnalysis:
    """Every figure of the module docstring for one rank's trace. compute_pattern: only the
    kernels it matches count as compute (default: every kernel that is not communication)."""
    comm = re.compile(comm_pattern)
    result = TraceAnalysis(file=name, rank=rank if rank is not None else trace_rank(trace, name),
                           comm_pattern=comm_pattern)
    events = gpu_events(trace, comm, re.compile(compute_pattern) if compute_pattern else None)
    if not any(e.kind in ("compute", "comm", "other") for e in events):
        result.problems.append(f"{name}: no GPU kernels in the trace (CPU-only profile, or "
                               "CUDA/ROCm activity not recorded)")
    result.comm_kernels = sorted({e.name for e in events if e.kind == "comm"})
    cpu, gpu = step_spans(trace)
    durations = {s.step: (s.end - s.start) / 1000 for s in (cpu or gpu)}
    by_step = assign_steps(events, trace)
    steps = sorted(k for k in by_step if k is not None)
    if not cpu and not gpu:
        result.steps.append(step_figures(None, None, events))
        if events:
            result.problems.append(f"{name}: no ProfilerStep#N annotations: the whole trace "
                                   "counts as one step (call prof.step() every step)")
    else:
        known = sorted(set(steps) | set(durations))
        result.steps = [step_figures(s, durations.get(s), by_step.get(s, [])) for s in known]
    result.slowdowns = kernel_slowdowns(events, min_overlap)
    return result


def analyse_files(paths: Iterable[Path], *, comm_pattern: str = DEFAULT_COMM_PATTERN,
                  compute_pattern: str | None = None, max_bytes: int = MAX_TRACE_BYTES,
                  min_overlap: float = 0.0) -> list[TraceAnalysis]:
    """One analysis per readable trace file; an unreadable one is an analysis with a problem."""
    found = []
    for path in paths:
        try:
            trace = load_trace(path, max_bytes)
        except TraceError as err:
            found.append(TraceAnalysis(file=path.name, rank=None, comm_pattern=comm_pattern,
                                       problems=[str(err)]))
            continue
        found.append(analyse_trace(trace, comm_pattern=comm_pattern,
                                   compute_pattern=compute_pattern, name=path.name,
                                   min_overlap=min_overlap))
    return found


def step_times_by_rank(paths: Iterable[Path],
                       max_bytes: int = MAX_TRACE_BYTES) -> tuple[dict[int, list[float]], list[str]]:
    """{rank: ProfilerStep#N durations in ms, in step order} over every trace file (a rank with
    several files, one per profiling cycle, gets them all), and the problems met."""
    by_rank: dict[int, list[tuple[int, float]]] = {}
    problems: list[str] = []
    for index, path in enumerate(paths):
        try:
            trace = load_trace(path, max_bytes)
        except TraceError as err:
            problems.append(str(err))
            continue
        cpu, gpu = step_spans(trace)
        spans = cpu or gpu
        if not spans:
            problems.append(f"{path.name}: no ProfilerStep#N annotations")
            continue
        rank = trace_rank(trace, path.name)
        rank = rank if rank is not None else 100_000 + index
        by_rank.setdefault(rank, []).extend((s.step, (s.end - s.start) / 1000) for s in spans)
    return {rank: [ms for _, ms in sorted(values)] for rank, values in by_rank.items()}, problems


def find_traces(output_dir: Path, limit: int = 256) -> list[Path]:
    """Chrome traces a job wrote under its output directory: torch.profiler's
    tensorboard_trace_handler names them `<worker>.<ts>.pt.trace.json`, ours are in
    torch_profiler/, others have "trace" in the name (`.json` or `.json.gz`); regular files only,
    at most `limit` of them."""
    found = []
    for path in sorted(output_dir.rglob("*.json*")):
        name = path.name
        if not (name.endswith(".json") or name.endswith(".json.gz")):
            continue
        if path.is_symlink() or not path.is_file():
            continue
        if name.endswith((".pt.trace.json", ".pt.trace.json.gz")) or "trace" in name \
                or path.parent.name == "torch_profiler":
            found.append(path)
            if len(found) >= limit:
                break
    return found


def report_lines(output_dirs: Iterable[Path], *, comm_pattern: str = DEFAULT_COMM_PATTERN,
                 compute_pattern: str | None = None) -> list[str]:
    """report.md's trace analysis of every output directory that holds traces."""
    lines: list[str] = []
    for output_dir in output_dirs:
        paths = find_traces(output_dir)
        if paths:
            analyses = analyse_files(paths, comm_pattern=comm_pattern,
                                     compute_pattern=compute_pattern)
            section = summary_lines(analyses)
            section[1] += f": {_md(output_dir.name)}"
            lines += section
    return lines


# -- presentation ------------------------------------------------------------------------------------

def summary_lines(analyses: Sequence[TraceAnalysis], top: int = 5) -> list[str]:
    """Markdown lines for report.md: per rank the step medians and the slowest kernel identities."""
    if not analyses:
        return []
    lines = ["", "## Trace analysis (PyTorch profiler)", "",
             f"Communication kernels: names matching `{analyses[0].comm_pattern}`. Per rank, "
             "medians over the profiled steps (docs/METRICS.md).", "",
             "| rank | file | steps | step ms | compute ms | comm ms | hidden ms | exposed ms | "
             "hidden share | compute slowdown under comm |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fmt(value: float | None, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    for a in sorted(analyses, key=lambda a: (a.rank is None, a.rank or 0, a.file)):
        share = a.median("hidden_share")
        overall = a.slowdown_overall
        lines.append(
            f"| {'-' if a.rank is None else a.rank} | {_md(a.file)} | {len(a.steps)} | "
            f"{fmt(a.median('step_ms'))} | {fmt(a.median('compute_ms'))} | {fmt(a.median('comm_ms'))} | "
            f"{fmt(a.median('hidden_comm_ms'))} | {fmt(a.median('exposed_comm_ms'))} | "
            f"{'-' if share is None else f'{share * 100:.1f} %'} | "
            f"{'-' if overall is None else f'{overall * 100:+.1f} %'} |")
    worst = sorted((s for a in analyses for s in a.slowdowns if s.slowdown is not None),
                   key=lambda s: -(s.slowdown or 0))[:top]
    if worst:
        lines += ["", "Compute kernels slowed most while communication ran (same name, grid and "
                  "block, alone vs overlapped, same trace):", ""]
        for s in worst:
            lines.append(f"- {_md(s.name[:80])} grid {list(s.grid) if s.grid else '?'} block "
                         f"{list(s.block) if s.block else '?'}: {s.slowdown * 100:+.1f} % "
                         f"({s.overlapped} overlapped, median {s.overlapped_median_us:.1f} µs, "
                         f"{(s.overlap_fraction_median or 0) * 100:.0f} % under comm; {s.alone} "
                         f"alone, median {s.alone_median_us:.1f} µs)")
    for a in analyses:
        lines += [f"- {_md(p)}" for p in a.problems[:3]]
    return lines


def _md(text: str) -> str:
    """A node-sent name shown in markdown: no table breaks, no markup, no control characters."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    return re.sub(r"([|`*_\[\]<>])", r"\\\1", cleaned)


__all__ = ["TraceError", "load_trace", "parse_trace", "analyse_trace", "analyse_files",
           "step_times_by_rank", "trace_rank", "TraceAnalysis", "StepFigures", "KernelSlowdown",
           "GpuEvent", "union", "intersection_length", "summary_lines", "DEFAULT_COMM_PATTERN",
           "MAX_TRACE_BYTES", "find_traces", "report_lines"]
