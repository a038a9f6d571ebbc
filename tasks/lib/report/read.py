"""Reading run and sweep directories: run.json, the train package's rank_XX_metrics.jsonl and
summary.json, the node logs, and what a directory is (a run, a sweep, a directory of runs).

Tolerant: a missing, truncated or corrupt file becomes a problem listed for its point, never an
exception: one broken point must not hide the others."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.lib import untrusted
from tasks.lib.report.values import _get, _integer, _string
from tasks.lib.runrecord import RUN_JSON
from tasks.lib.sweep import SWEEP_JSON

SUMMARY_JSON = "summary.json"
RESULTS_CSV = "results.csv"
RUNS_CSV = "runs.csv"   # one line per run where points were repeated
REPORT_MD = "report.md"
METRICS_RE = re.compile(r"^rank_(\d+)_metrics\.jsonl$")
OUTPUT_DIR_RE = re.compile(r"^(\d+)thread_(\d+)channels$")
RUN_ID_RE = re.compile(r"^multinode_(\d+)ch_(\d+)th_")

COMPLETED = "completed"
# Statuses of points that produced no run to read.
NOT_RUN = "not_run"
MISSING = "missing"

# Lines of a metrics file whose phase names one of these are not measured steps.
NON_MEASURED_PHASES = ("warmup", "calibration", "calibration_compute", "calibration_comm")


class ReportError(Exception):
    """The report cannot start at all (no such directory, unreadable sweep.json)."""


# -- reading files --------------------------------------------------------------------------------

def read_json_file(path: Path) -> tuple[Any, str | None]:
    """(document, None) or (None, one-line problem). The file is a node's word: bounded in
    size, depth and number length (tasks/lib/untrusted.py)."""
    try:
        return untrusted.read_json(path), None
    except FileNotFoundError:
        return None, f"{path.name} missing"
    except OSError as err:
        return None, f"{path.name} unreadable: {err.strerror or err}"
    except json.JSONDecodeError as err:
        return None, f"{path.name} is not valid JSON (line {err.lineno}: {err.msg})"
    except ValueError as err:
        return None, f"{path.name} unreadable: {str(err)[:200]}"


def read_jsonl_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON object lines of a metrics file; bad lines are skipped and reported.

    A last line without its newline is what a killed rank leaves behind: it is reported as
    truncated rather than corrupt, since nothing is wrong with the run's earlier steps.
    """
    lines: list[dict[str, Any]] = []
    bad: list[int] = []
    truncated = False
    try:
        # Line by line, each bounded: a line too long, too deep or with a 5000-digit number is
        # one corrupt line, never the report's end.
        for number, raw, complete in untrusted.read_lines(path):
            if raw is None:
                bad.append(number)
                continue
            if not raw.strip():
                continue
            try:
                value = untrusted.loads(raw, max_bytes=untrusted.MAX_JSON_LINE_BYTES)
            except ValueError:
                if not complete:  # no newline after it: the writer died mid-line
                    truncated = True
                else:
                    bad.append(number)
                continue
            if isinstance(value, dict):
                lines.append(value)
            else:
                bad.append(number)
    except OSError as err:
        return [], [f"{path.name} unreadable: {err.strerror or err}"]
    problems = []
    if bad:
        shown = ", ".join(str(n) for n in bad[:5]) + (" ..." if len(bad) > 5 else "")
        problems.append(f"{path.name}: {len(bad)} corrupt line(s) skipped (line {shown})")
    if truncated:
        problems.append(f"{path.name}: last line truncated (skipped)")
    return lines, problems


def find_output_dirs(run_dir: Path) -> list[Path]:
    """Directories holding the train outputs: the run dir itself or its <T>thread_<C>channels/."""
    if _holds_outputs(run_dir):
        return [run_dir]
    try:
        children = sorted(p for p in run_dir.iterdir() if p.is_dir())
    except OSError:
        return []
    named = [p for p in children if OUTPUT_DIR_RE.match(p.name)]
    if len(named) == 1 and not _holds_outputs(named[0]):
        # A rank pool's launch directory: its points are <T>thread_<C>channels/ inside it.
        inner = find_output_dirs(named[0])
        if inner and inner != [named[0]]:
            return inner
    return named or [p for p in children if _holds_outputs(p)]


def _holds_outputs(directory: Path) -> bool:
    try:
        return any(METRICS_RE.match(p.name) or p.name == SUMMARY_JSON for p in directory.iterdir())
    except OSError:
        return False


def is_measured(line: Mapping[str, Any]) -> bool:
    phase = line.get("phase")
    return not (isinstance(phase, str) and phase in NON_MEASURED_PHASES) and "iter_ms" in line


@dataclass
class RunData:
    """Everything read from one run directory, with what could not be read."""

    run_dir: Path
    output_dir: Path | None = None
    run_json: dict[str, Any] | None = None
    summary: dict[str, Any] | None = None
    steps_by_rank: dict[int, list[dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def steps(self) -> list[dict[str, Any]]:
        return [line for rank in sorted(self.steps_by_rank) for line in self.steps_by_rank[rank]]


def _json_object(path: Path, problems: list[str]) -> dict | None:
    """A JSON object file, or None with the reason appended to `problems`."""
    document, problem = read_json_file(path)
    if problem:
        problems.append(problem)
    elif isinstance(document, dict):
        return document
    else:
        problems.append(f"{path.name} is not a JSON object")
    return None


def read_run(run_dir: Path, output_name: str | None = None) -> RunData:
    """output_name: the point's <T>thread_<C>channels/ inside run_dir (a rank pool runs several
    points in one run directory); None: the one run.json names, else the only one."""
    data = RunData(run_dir=run_dir)
    if not run_dir.is_dir():
        data.problems.append(f"run directory {run_dir} not found")
        return data
    run_json_path = run_dir / RUN_JSON
    if run_json_path.exists():
        data.run_json = _json_object(run_json_path, data.problems)

    output_dirs = find_output_dirs(run_dir)
    if output_name:
        named = run_dir / output_name
        output_dirs = [named] if named.is_dir() else []
        if not output_dirs:
            data.problems.append(f"point directory {output_name} not found in the run")
            return data
    if len(output_dirs) > 1:
        wanted = _output_dir_name(data.run_json)
        chosen = [d for d in output_dirs if d.name == wanted] or output_dirs[-1:]
        data.problems.append(f"several output directories; reading {chosen[0].name}")
        output_dirs = chosen
    if not output_dirs:
        data.problems.append("no train outputs (no rank_XX_metrics.jsonl, no summary.json)")
        return data
    data.output_dir = output_dirs[0]
    if _get(data.run_json, "flags", "entry"):
        return data  # your own training: no summary.json, no metrics files (see report/entry.py)

    data.summary = _json_object(data.output_dir / SUMMARY_JSON, data.problems)

    metrics_files = sorted(
        (int(m.group(1)), p) for p in data.output_dir.iterdir() if (m := METRICS_RE.match(p.name))
    )
    if not metrics_files:
        data.problems.append("no rank_XX_metrics.jsonl")
    for rank, path in metrics_files:
        lines, problems = read_jsonl_file(path)
        data.problems.extend(problems)
        data.steps_by_rank[rank] = [line for line in lines if is_measured(line)]
    return data


def _output_dir_name(run_json: Mapping[str, Any] | None) -> str | None:
    if not run_json:
        return None
    value = run_json.get("output_dir") or _get(run_json, "paths", "output_dir")
    return Path(str(value)).name if value else None


TRAIN_ERROR_RE = re.compile(r"train: error: .*")
# An entry's rank lines carry torchrun's `[rankN]:` (tasks/lib/entry.py).
PYTHON_ERROR_RE = re.compile(r"^(?:\[rank\d+\]:\s*)*(?:[\w.]+\.)?\w*(?:Error|Exception): .+")
LOG_TAIL_BYTES = 256 * 1024
ERROR_LINE_CHARS = 240


def error_line_in_logs(data: RunData) -> str | None:
    """Why a run failed, in the ranks' own words: the first `train: error:` line of the node logs
    (the train package's one-line reasons), else the last Python exception line. The launcher
    only knows that a rank exited non-zero; the logs say why."""
    logs = sorted((data.run_dir / "logs").glob("node_*.txt")) if (data.run_dir / "logs").is_dir() else []
    if data.output_dir is not None:
        logs += sorted(data.output_dir.glob("node_*_output.log"))
    python_error = None
    for path in logs:
        try:
            with path.open("rb") as handle:
                handle.seek(0, 2)
                handle.seek(max(0, handle.tell() - LOG_TAIL_BYTES))
                text = handle.read().decode(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if (match := TRAIN_ERROR_RE.search(line)):
                return match.group(0)[:ERROR_LINE_CHARS]
            if PYTHON_ERROR_RE.match(line):
                python_error = line.strip()[:ERROR_LINE_CHARS]
    return python_error



@dataclass(frozen=True)
class PointSpec:
    """What a sweep meant to run at one grid point: its channels, threads and the values of its
    other axes (environment variables, in axis order); `config` and `repeat` place one run of it
    in a sweep with repeats."""

    channels: int
    threads: int
    settings: tuple[tuple[str, str], ...] = ()
    config: int | None = None
    repeat: int | None = None


# -- what a directory is --------------------------------------------------------------------------

@dataclass
class PointSource:
    """One point to report: its grid position (sweeps) and where its run is, if anywhere."""

    spec: PointSpec | None
    run_dir: Path | None
    sweep_status: str | None = None
    run_id: str | None = None
    error: str | None = None
    output_dir: str | None = None   # a pool point's directory inside its (shared) run


@dataclass
class ReportInput:
    kind: str                            # "run" | "sweep" | "runs"
    root: Path
    points: list[PointSource]
    sweep: dict[str, Any] | None = None


def discover(path: Path) -> ReportInput:
    """A sweep directory (sweep.json), one run directory, or a directory of run directories."""
    if not path.is_dir():
        raise ReportError(f"{path} is not a directory; give a run or sweep directory (experiments/...)")
    sweep_path = path / SWEEP_JSON
    if sweep_path.exists():
        document, problem = read_json_file(sweep_path)
        if problem or not isinstance(document, dict) or not isinstance(document.get("points"), list):
            reason = problem or "has no 'points' list"
            raise ReportError(f"{sweep_path}: {reason}; restore it or report the run directories one by one")
        return ReportInput("sweep", path, [sweep_point_source(path, p) for p in document["points"]], document)
    if (path / RUN_JSON).exists() or find_output_dirs(path):
        return ReportInput("run", path, [PointSource(None, path.resolve())])
    runs = sorted(p for p in path.iterdir() if p.is_dir() and ((p / RUN_JSON).exists() or RUN_ID_RE.match(p.name)))
    if runs:
        return ReportInput("runs", path, [PointSource(None, run.resolve()) for run in runs])
    raise ReportError(f"{path} holds no run.json, sweep.json, train outputs or run directories")


def sweep_point_source(sweep_dir: Path, entry: Mapping[str, Any]) -> PointSource:
    spec = None
    channels, threads = _integer(entry.get("channels")), _integer(entry.get("threads"))
    if channels is not None and threads is not None:
        settings = entry.get("settings")
        pairs = tuple((str(k), str(v)) for k, v in settings.items()) if isinstance(settings, Mapping) else ()
        spec = PointSpec(channels, threads, pairs, _integer(entry.get("config")), _integer(entry.get("repeat")))
    run_id = _string(entry.get("run_id"))
    run_dir = resolve_run_dir(sweep_dir, _string(entry.get("run_dir")), run_id)
    output_dir = _string(entry.get("output_dir"))
    parts = Path(output_dir).parts if output_dir else ()
    if output_dir is not None and (Path(output_dir).is_absolute() or not parts
                                   or any(part in (".", "..") for part in parts)):
        output_dir = None  # inside the run only: sweep.json must not point the report elsewhere
    return PointSource(spec, run_dir, _string(entry.get("status")), run_id, _string(entry.get("error")),
                       output_dir)


def resolve_run_dir(sweep_dir: Path, recorded: str | None, run_id: str | None) -> Path | None:
    """Where a sweep point's run lives: as recorded (relative to the sweep directory), else a
    directory of the run id next to the sweep or inside it (a sweep copied with its runs)."""
    candidates = []
    if recorded:
        candidates.append(sweep_dir / recorded)
    if run_id:
        candidates += [sweep_dir.parent / run_id, sweep_dir / run_id]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0].resolve() if candidates else None
