"""The objective of a run of the user's own training: the number a sweep compares points by.

Our GEMM loop reports its iteration time itself (summary.json). Another workload does not, so
the user names where its step metric is (`--metric`, `launch.metric`):

- ``trace``: the step time from the PyTorch profiler traces the job wrote under its output
  directory (``ProfilerStep#N`` spans, tasks/lib/traces.py), in ms per step;
- ``json:FIELD`` (``json:timing.step_ms`` for a nested one): that number in the JSON lines
  the ranks print;
- any other text: a regular expression with one group (or a group named ``value``) that
  captures the number in the ranks' output lines, e.g. ``step_time=([0-9.]+)``.

The ranks' output lines are their stdout and stderr as the node logs hold them, each marked
``[rankN]:`` by torchrun (tasks/lib/entry.py), so every value belongs to a rank. Lower is
better unless the metric starts with ``max:`` (a throughput). Without a metric, the traces are
used when there are some.

Pure: reads files of a run's output directory on the controller, bounded (they came from the
nodes): at most MAX_LOG_BYTES of each log, lines of at most MAX_LINE_CHARS.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from tasks.lib.entry import NCCL_DEBUG_GLOB, split_rank_line

MAX_LOG_BYTES = 64 << 20
MAX_LINE_CHARS = 8192
NODE_LOG = re.compile(r"^node_(\d+)_output\.log$")


class MetricError(ValueError):
    """A --metric that cannot be used; one line saying why."""


@dataclass(frozen=True)
class Metric:
    kind: Literal["trace", "json", "regex"]
    pattern: str                     # the field path (json) or the regular expression (regex)
    goal: Literal["min", "max"] = "min"
    text: str = ""                   # as the user gave it

    def describe(self) -> str:
        what = {"trace": "step time from the PyTorch profiler traces (ProfilerStep#N), ms",
                "json": f"JSON field {self.pattern!r} of the ranks' output lines",
                "regex": f"regex {self.pattern!r} in the ranks' output lines"}[self.kind]
        return f"{what} ({'higher' if self.goal == 'max' else 'lower'} is better)"


def parse_metric(text: object, what: str = "--metric") -> Metric:
    if not isinstance(text, str) or not text.strip():
        raise MetricError(f"{what}: give trace, json:FIELD or a regex with one group")
    spec = text.strip()
    goal: Literal["min", "max"] = "min"
    for prefix, chosen in (("max:", "max"), ("min:", "min")):
        if spec.startswith(prefix):
            spec, goal = spec[len(prefix):], chosen  # type: ignore[assignment]
    if spec == "trace":
        return Metric("trace", "", goal, text)
    if spec.startswith("json:"):
        path = spec[len("json:"):]
        if not re.fullmatch(r"[^.\s]+(?:\.[^.\s]+)*", path):
            raise MetricError(f"{what} {text!r}: json:FIELD names a field of the ranks' JSON "
                              "lines, dotted for a nested one (json:timing.step_ms)")
        return Metric("json", path, goal, text)
    try:
        compiled = re.compile(spec)
    except re.error as err:
        raise MetricError(f"{what} {text!r}: not a regular expression ({err})") from None
    if "value" not in compiled.groupindex and compiled.groups != 1:
        raise MetricError(f"{what} {text!r}: the regex needs exactly one group (or one named "
                          f"'value') around the number; it has {compiled.groups}")
    return Metric("regex", spec, goal, text)


@dataclass
class Objective:
    """The objective of one run: per-rank values, their median and p90 over every rank's."""

    metric: Metric
    per_rank: dict[int, list[float]] = field(default_factory=dict)
    median: float | None = None
    p90: float | None = None
    source: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(len(values) for values in self.per_rank.values())


def value_of_line(text: str, metric: Metric, compiled: re.Pattern[str] | None = None) -> float | None:
    """The metric's number in one rank's line, or None."""
    if len(text) > MAX_LINE_CHARS:
        return None
    if metric.kind == "json":
        start = text.find("{")
        if start < 0:
            return None
        try:
            document: Any = json.loads(text[start:])
        except (ValueError, RecursionError):
            return None
        for key in metric.pattern.split("."):
            if not isinstance(document, Mapping) or key not in document:
                return None
            document = document[key]
        return _finite(document)
    compiled = compiled or re.compile(metric.pattern)
    match = compiled.search(text)
    if match is None:
        return None
    return _finite(match.group("value") if "value" in compiled.groupindex else match.group(1))


def _finite(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def values_by_rank(lines: Iterable[str], metric: Metric) -> dict[int, list[float]]:
    """{rank: values in order} from node log lines marked ``[rankN]:``; unmarked lines (the
    launcher's, torchrun's) are not the job's."""
    compiled = re.compile(metric.pattern) if metric.kind == "regex" else None
    found: dict[int, list[float]] = {}
    for line in lines:
        marked = split_rank_line(line)
        if marked is None:
            continue
        value = value_of_line(marked[1], metric, compiled)
        if value is not None:
            found.setdefault(marked[0], []).append(value)
    return found


def read_bounded_lines(path: Path, limit: int = MAX_LOG_BYTES) -> tuple[list[str], bool]:
    """The file's lines (undecodable bytes replaced), at most `limit` bytes; True when cut."""
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    cut = len(data) > limit
    return data[:limit].decode(errors="replace").splitlines(), cut


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def extract_objective(output_dir: Path, metric: Metric | None) -> Objective | None:
    """The run's objective from its collected output directory; None when there is nothing to
    measure by (no metric named and no trace)."""
    from tasks.lib.traces import find_traces, step_times_by_rank

    if metric is None:
        metric = Metric("trace", "", "min", "trace")
        if not find_traces(output_dir):
            return None
    objective = Objective(metric)
    if metric.kind == "trace":
        traces = find_traces(output_dir)
        if not traces:
            objective.problems.append(f"no PyTorch profiler trace (*.json) under {output_dir.name}")
        objective.per_rank, problems = step_times_by_rank(traces)
        objective.problems += problems
        objective.source = f"{len(traces)} trace file(s)"
    else:
        logs = sorted(p for p in output_dir.glob("node_*_output.log") if NODE_LOG.match(p.name))
        lines: list[str] = []
        for path in logs:
            try:
                read, cut = read_bounded_lines(path)
            except OSError as err:
                objective.problems.append(f"{path.name}: {err.strerror or err}")
                continue
            lines += read
            if cut:
                objective.problems.append(f"{path.name}: only its first {MAX_LOG_BYTES >> 20} "
                                          "MiB read")
        objective.per_rank = values_by_rank(lines, metric)
        objective.source = f"{len(logs)} node log(s)"
        if not objective.per_rank:
            objective.problems.append(f"--metric {metric.text!r}: no value in the ranks' output "
                                      f"lines ({objective.source})")
    values = [v for rank in sorted(objective.per_rank) for v in objective.per_rank[rank]]
    objective.median, objective.p90 = quantile(values, 0.5), quantile(values, 0.9)
    objective.source += f", {len(objective.per_rank)} rank(s), {len(values)} value(s)"
    return objective


PYTHON_ERROR = re.compile(r"^\s*(?:[\w.]+\.)?\w*(?:Error|Exception): \S.*")
ERROR_LINE_CHARS = 240


def rank_error_line(output_dir: Path, rank: int) -> str | None:
    """The first Python exception line a rank printed (the one it raised), from the node logs:
    a failed run of your own training says why in the rank's own words."""
    for path in sorted(output_dir.glob("node_*_output.log")):
        try:
            lines, _ = read_bounded_lines(path)
        except OSError:
            continue
        for line in lines:
            marked = split_rank_line(line)
            # torch itself marks an uncaught exception's lines with the rank again.
            while marked is not None and marked[0] == rank and split_rank_line(marked[1]):
                marked = split_rank_line(marked[1])
            if marked is not None and marked[0] == rank and PYTHON_ERROR.match(marked[1]):
                return f"rank {rank}: {marked[1].strip()}"[:ERROR_LINE_CHARS]
    return None


MAX_DEBUG_LOG_BYTES = 16 << 20


def effective_from_debug_logs(output_dir: Path, common_env: Mapping[str, Any],
                              accelerator: str = "cuda") -> dict[str, Any] | None:
    """What NCCL really built for an entry run, from the per-process debug files the launch
    asked NCCL to write (NCCL_DEBUG_FILE=nccl_debug_%h_%p.log), in summary.json's shape
    (train.nccl_debug: the same parser and checks as our loop's); None without such files."""
    from train.nccl_debug import asked_from_env, effective_settings, parse_nccl_log, summarize_ranks

    paths = sorted(output_dir.glob(NCCL_DEBUG_GLOB))
    if not paths:
        return None
    env = {str(k): str(v) for k, v in common_env.items()}
    asked = asked_from_env(env)
    found: list[tuple[int, dict[str, Any]]] = []
    for index, path in enumerate(paths):
        try:
            lines, _ = read_bounded_lines(path, MAX_DEBUG_LOG_BYTES)
        except OSError:
            continue
        log = parse_nccl_log("\n".join(lines))
        result = effective_settings(log, asked, env, accelerator)
        result["file"] = path.name
        rank = log.communicators[0].rank if log.communicators else 1_000_000 + index
        found.append((rank, result))
    return {"capture": "on", **summarize_ranks([r for _, r in sorted(found, key=lambda x: x[0])])}


__all__ = ["Metric", "MetricError", "Objective", "parse_metric", "extract_objective",
           "values_by_rank", "value_of_line", "quantile", "effective_from_debug_logs"]
