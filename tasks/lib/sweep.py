"""A sweep: its grid (channels × threads × --axis variables), sweep.json, and which runs still
need to go. The design (repeats, run order, pools) is tasks/lib/design.py.

Pure: the document is a plain dict (JSON-ready); reading and writing files is the task's job.

sweep.json (schema 2; schema 1, written before repeats and axes, is read as one run per point):
  schema, sweep_id, kind (sweep|tune), status (running|completed|partial|interrupted|aborted),
  created_at, updated_at, ended_at, controller {host, user, cwd}, hosts [labels], fail_fast,
  point_timeout,
  grid {channels [..], threads [..], axes [{name, values [..]}], repeat, seed,
        order "grid" | "rounds" (repeats: shuffled rounds), pools_by [restart axes]},
  configs [{index, channels, threads, settings {NAME: value}, overrides [..]}] (the points),
  order [run indexes in the order they run],
  launch_flags {the launch flags the sweep was given, channels/threads excluded; --env values
    of secret-looking variables as ***},
  sessions [{started_at, ended_at, resumed, ran [run indexes], wall_s (the session's points,
    monotonic)}],
  points [{index, config, repeat, channels, threads, settings, status (pending|running|
           completed|failed|stopped|hung|interrupted|error), run_id, run_dir (relative to the
           sweep directory), output_dir (a pool's point: its directory inside run_dir),
           attempts, started_at, ended_at, launch_s, cleanup_wait_s, gap_before_s,
           idle_before_s, startup_s, teardown_s, teardown_parts {TEARDOWN_PARTS}, exit_status,
           error, warmup_wall_s, measured_wall_s, calibration_wall_s (its summary's),
           overrides [point-only train overrides]}]  (one entry per run: config-major, repeat
           inner; `order` says when each runs),
  dead_time {gap_s, idle_s, cleanup_wait_s, startup_s, teardown_s, teardown.<part>: {median,
    max, n}},
  wall_account {wall_s, work_s, points, complete, ratio} | null (see wall_account)
Point timing: launch_s is the launch call (probe to collection); cleanup_wait_s the wait after it
until no process of the run is left on any host; gap_before_s the controller time between the
previous point's launch returning and this one's starting (the sweep's own overhead);
idle_before_s the time between the previous point's last measured step and this one's first
(rank 0's clock): what the cluster spends not measuring, start-up and calibration included.
It splits into the previous point's teardown_s (last measured step to its launch call returning:
rank exit, collection, run.json; itemised in teardown_parts), gap_before_s, and this point's
startup_s (launch call to first measured step: probe, push, torchrun start, rendezvous, warm-up
and calibration). A pool's launch spans its points: its first point's first measured step to its
last point's last.
"""
from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.lib import design
from tasks.lib.design import GridPoint
from tasks.lib.knobs import Axis
from tasks.lib.masking import MASK, assignment_name, is_masked_assignment, mask_assignments
from tasks.lib.quoting import sh_quote
from tasks.lib.registry import SCAN_KILL_SH
from tasks.lib.untrusted import finite_number

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
SWEEP_JSON = "sweep.json"
SWEEP_PREFIX = "sweep_"

PENDING = "pending"
RUNNING = "running"
COMPLETED = "completed"
INTERRUPTED = "interrupted"
POINT_STATES = (PENDING, RUNNING, COMPLETED, "failed", "stopped", "hung", INTERRUPTED, "error")

# Sweep-level states.
SWEEP_RUNNING = "running"
SWEEP_COMPLETED = "completed"      # every point completed
SWEEP_PARTIAL = "partial"          # every point ran, some did not complete
SWEEP_INTERRUPTED = "interrupted"  # Ctrl-C: resumable
SWEEP_ABORTED = "aborted"          # --fail-fast stopped it after a failed point: resumable


class SweepError(ValueError):
    """A sweep input that cannot be used; one line saying what and how to fix."""


# -- the grid -------------------------------------------------------------------------------------

def parse_grid_values(values: str | Sequence[str] | None, flag: str) -> list[int]:
    """'28,42,56' or repeated flags (['28,42', '56']) as distinct positive ints, in order given."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else list(values)
    parsed: list[int] = []
    for item in items:
        for part in str(item).split(","):
            text = part.strip()
            if not text:
                continue
            try:
                number = int(text)
            except ValueError:
                raise SweepError(f"{flag}: {text!r} is not an integer; give a list like {flag} 28,42,56") from None
            if number <= 0:
                raise SweepError(f"{flag}: {number} must be positive")
            if number not in parsed:
                parsed.append(number)
    return parsed


def grid_points(channels: Sequence[int], threads: Sequence[int], axes: Sequence[Axis] = ()) -> list[GridPoint]:
    """Channels-major, like the original shell loop (for c in channels; for t in threads), then
    each --axis in the order given."""
    if not channels or not threads:
        raise SweepError("a sweep needs at least one value for --channels and one for --threads "
                         "(e.g. --channels 28,42,56,70 --threads 256,512)")
    return design.grid_points(channels, threads, axes)


_POINT_OVERRIDE = re.compile(r"^(\d+|\*)x(\d+|\*)((?:,[A-Za-z_]\w*=[^,:=]+)*):(.+)$")


def parse_point_overrides(items: Iterable[str], points: Sequence[GridPoint]) -> dict[GridPoint, list[str]]:
    """`CxT[,NAME=VALUE...]:section.key=value` (C or T may be `*`; NAME=VALUE narrows to the points
    with that --axis value) as the extra train overrides of each point.

    For what one point needs and the others must not get: profiling at the interesting point,
    more steps where the noise is. A selector that matches no grid point is an error (a typo
    would otherwise run the sweep without the override)."""
    extra: dict[GridPoint, list[str]] = {point: [] for point in points}
    for item in items:
        match = _POINT_OVERRIDE.match(item.strip())
        if not match or "=" not in match.group(4):
            raise SweepError(f"--point-override {item!r}: expected CHANNELSxTHREADS:section.key=value, "
                             "e.g. 56x256:profiling.enabled=true (* for any; ,NAME=VALUE for an --axis)")
        channels, threads, filters, override = match.groups()
        wanted = {tuple(pair.split("=", 1)) for pair in filters.split(",") if pair}
        chosen = [p for p in points if channels in ("*", str(p.channels)) and threads in ("*", str(p.threads))
                  and wanted <= set(p.settings)]
        if not chosen:
            raise SweepError(f"--point-override {item!r}: no grid point {channels}x{threads}{filters}")
        for point in chosen:
            extra[point].append(override)
    return extra


# -- the document ---------------------------------------------------------------------------------

def new_sweep(*, sweep_id: str, channels: Sequence[int], threads: Sequence[int],
              launch_flags: Mapping[str, Any], hosts: Sequence[str], fail_fast: bool,
              controller: Mapping[str, Any], created_at: str, axes: Sequence[Axis] = (),
              repeat: int = 1, seed: int = 0, pools: bool = True, kind: str = "sweep") -> dict[str, Any]:
    """A new sweep document: its points (`configs`), one entry per run in `points`, and the
    order they run in (tasks/lib/design.py; `pools`: keep each pool's runs together)."""
    grid = grid_points(channels, threads, axes)
    runs = design.run_order(grid, repeat, seed, design.restart_key if pools else None)
    document = {
        "schema": SCHEMA_VERSION,
        "sweep_id": sweep_id,
        "kind": kind,
        "status": SWEEP_RUNNING,
        "created_at": created_at,
        "updated_at": created_at,
        "ended_at": None,
        "controller": dict(controller),
        "hosts": list(hosts),
        "fail_fast": fail_fast,
        "grid": {"channels": list(channels), "threads": list(threads),
                 "axes": [{"name": a.name, "values": list(a.values)} for a in axes],
                 "repeat": repeat, "seed": seed, "order": "rounds" if repeat > 1 else "grid"},
        "configs": [config_entry(index, point) for index, point in enumerate(grid)],
        "launch_flags": dict(launch_flags),
        "sessions": [],
        "points": [new_point(config * repeat + r, point, config, r)
                   for config, point in enumerate(grid) for r in range(repeat)],
        "order": [run.config * repeat + run.repeat for run in runs],
        "dead_time": {},
    }
    return document


def config_entry(index: int, point: GridPoint) -> dict[str, Any]:
    return {"index": index, "channels": point.channels, "threads": point.threads,
            "settings": dict(point.settings)}


def new_point(index: int, point: GridPoint, config: int | None = None, repeat: int = 0) -> dict[str, Any]:
    return {
        "index": index, "config": index if config is None else config, "repeat": repeat,
        "channels": point.channels, "threads": point.threads, "settings": dict(point.settings),
        "status": PENDING,
        "run_id": None, "run_dir": None, "attempts": 0, "started_at": None, "ended_at": None,
        "launch_s": None, "cleanup_wait_s": None, "gap_before_s": None, "idle_before_s": None,
        "startup_s": None, "teardown_s": None, "exit_status": None, "error": None,
    }


def point_of(entry: Mapping[str, Any]) -> GridPoint:
    """The grid point of a sweep.json point (run) or configs entry."""
    settings = entry.get("settings") or {}
    return GridPoint(int(entry["channels"]), int(entry["threads"]),
                     tuple((str(k), str(v)) for k, v in settings.items()))


def run_label(point: Mapping[str, Any], document: Mapping[str, Any] | None = None) -> str:
    """'4ch × 256th NCCL_PROTO=Simple' and, with repeats, ' (run 2/3)'."""
    label = point_of(point).label
    repeat = ((document or {}).get("grid") or {}).get("repeat") or 1
    return label + (f" (run {int(point.get('repeat') or 0) + 1}/{repeat})" if repeat > 1 else "")


def run_selector(point: Mapping[str, Any], document: Mapping[str, Any] | None = None) -> str:
    """'42x512', '42x512,NCCL_PROTO=Simple', with repeats ' run 2' (how messages name a run)."""
    text = ",".join([f"{point['channels']}x{point['threads']}",
                     *(f"{k}={v}" for k, v in (point.get("settings") or {}).items())])
    repeat = ((document or {}).get("grid") or {}).get("repeat") or 1
    return text + (f" run {int(point.get('repeat') or 0) + 1}" if repeat > 1 else "")


def axes_of(document: Mapping[str, Any]) -> list[Axis]:
    return [Axis(str(a["name"]), tuple(str(v) for v in a["values"]))
            for a in (document.get("grid") or {}).get("axes") or []]


def run_order_of(document: Mapping[str, Any]) -> list[int]:
    """The run indexes in the order they go (schema 1: grid order)."""
    return list(document.get("order") or range(len(document["points"])))


def validate_sweep(document: Any, source: str) -> dict[str, Any]:
    """The document if it is a sweep.json this code can resume (schema 1 upgraded in place to
    schema 2: one run per point, grid order); SweepError otherwise."""
    if not isinstance(document, dict):
        raise SweepError(f"{source}: not a JSON object")
    if document.get("schema") not in READABLE_SCHEMAS:
        raise SweepError(f"{source}: schema {document.get('schema')!r} is not one of "
                         f"{', '.join(map(str, READABLE_SCHEMAS))}")
    points = document.get("points")
    if not isinstance(points, list) or not points:
        raise SweepError(f"{source}: no points")
    for position, point in enumerate(points):
        if not isinstance(point, dict) or point.get("index") != position or \
                not isinstance(point.get("channels"), int) or not isinstance(point.get("threads"), int):
            raise SweepError(f"{source}: point {position} is malformed (needs index, channels, threads)")
        if point.get("status") not in POINT_STATES:
            raise SweepError(f"{source}: point {position} has unknown status {point.get('status')!r}")
        settings = point.get("settings", {})
        if not isinstance(settings, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in settings.items()):
            raise SweepError(f"{source}: point {position} has malformed settings")
    if not isinstance(document.get("launch_flags"), dict):
        raise SweepError(f"{source}: launch_flags missing")
    if document["schema"] == 1:
        _upgrade_schema_1(document)
    order = document.get("order")
    if not isinstance(order, list) or sorted(order) != list(range(len(points))):
        raise SweepError(f"{source}: order is not a permutation of the points")
    configs = document.get("configs")
    if not isinstance(configs, list) or any(not isinstance(p.get("config"), int)
                                            or not 0 <= p["config"] < len(configs) for p in points):
        raise SweepError(f"{source}: configs missing, or a point names no config")
    return document


def _upgrade_schema_1(document: dict[str, Any]) -> None:
    """A sweep.json of schema 1 (one run per point, no axes) as schema 2."""
    for point in document["points"]:
        point.setdefault("config", point["index"])
        point.setdefault("repeat", 0)
        point.setdefault("settings", {})
    document["configs"] = [config_entry(p["index"], point_of(p)) for p in document["points"]]
    document["order"] = list(range(len(document["points"])))
    grid = document.setdefault("grid", {})
    grid.update(axes=grid.get("axes") or [], repeat=1, seed=grid.get("seed", 0), order="grid")
    document["schema"] = SCHEMA_VERSION


def check_resume_grid(document: Mapping[str, Any], channels: Sequence[int], threads: Sequence[int],
                      axes: Sequence[Axis] = (), repeat: int | None = None) -> None:
    """A resumed sweep keeps its grid: flags naming another grid are a mistake, not a request."""
    grid = document.get("grid", {})
    for flag, given, recorded in (("--channels", channels, grid.get("channels")),
                                  ("--threads", threads, grid.get("threads"))):
        if given and list(given) != list(recorded or []):
            raise SweepError(f"{flag} {','.join(map(str, given))} differs from the resumed sweep's "
                             f"{','.join(map(str, recorded or []))}; drop the flag or start a new sweep")
    if axes and list(axes) != axes_of(document):
        shown = " ".join(f"--axis {a.name}={','.join(a.values)}" for a in axes_of(document)) or "no --axis"
        raise SweepError(f"--axis differs from the resumed sweep's ({shown}); drop it or start a new sweep")
    if repeat not in (None, 1) and repeat != grid.get("repeat", 1):
        raise SweepError(f"--repeat {repeat} differs from the resumed sweep's {grid.get('repeat', 1)}; "
                         "drop it or start a new sweep")


def check_resume_flags(recorded: Mapping[str, Any], given: Mapping[str, Any],
                       may_change: Iterable[str] = ()) -> None:
    """A resumed sweep runs its remaining points under the recorded launch flags; a flag given
    with --resume (`given`: only those that differ from the task's defaults) must agree with
    them, except the operational ones in `may_change`."""
    allowed = set(may_change)
    for name, value in given.items():
        if name in allowed:
            continue
        if _normalise(recorded.get(name)) != _normalise(value):
            raise SweepError(f"--{name.replace('_', '-')} {value!r} differs from the resumed sweep's "
                             f"{recorded.get(name)!r}; drop it or start a new sweep")


def restore_masked_env(recorded: Sequence[str], given: Sequence[str],
                       secret_patterns: Iterable[str]) -> list[str]:
    """The --env list a resumed sweep runs with.

    sweep.json records *** for the values of secret-looking variables (tasks.lib.masking), so
    those must come again with --resume: `--env NAME=VALUE` for just them, or the whole --env
    list as first given (it must then mask to what was recorded). SweepError otherwise; no
    message names a secret value."""
    recorded, given = list(recorded), list(given)
    masked = [assignment_name(item) for item in recorded if is_masked_assignment(item)]
    if not given:
        if masked:
            raise SweepError(f"sweep.json records the value of {', '.join(masked)} as {MASK}: give "
                             "it again with --resume, e.g. --env " + f"{masked[0]}=VALUE")
        return recorded
    values = {assignment_name(item): item for item in given}
    if set(values) <= set(masked):
        missing = [name for name in masked if name not in values]
        if missing:
            raise SweepError(f"sweep.json records the value of {', '.join(missing)} as {MASK}: "
                             "give it again with --resume too (--env NAME=VALUE)")
        return [values[assignment_name(item)] if is_masked_assignment(item) else item
                for item in recorded]
    shown = mask_assignments(given, secret_patterns)
    if shown != recorded:
        raise SweepError(f"--env {shown!r} differs from the resumed sweep's {recorded!r}; give "
                         f"only the values recorded as {MASK}, or drop --env, or start a new sweep")
    return given


def _normalise(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, list)) else value


def points_to_run(document: Mapping[str, Any], run_completed: Callable[[Mapping[str, Any]], bool]) -> list[int]:
    """Indexes of the runs a (resumed) sweep still has to run, in the order they go.

    A point is done when sweep.json says completed AND its run directory agrees
    (`run_completed(point)` reads it): a deleted or broken run directory is run again.
    """
    points = document["points"]
    return [index for index in run_order_of(document)
            if not (points[index].get("status") == COMPLETED and run_completed(points[index]))]


def sweep_status(document: Mapping[str, Any], *, interrupted: bool = False, aborted: bool = False) -> str:
    if interrupted:
        return SWEEP_INTERRUPTED
    if aborted:
        return SWEEP_ABORTED
    states = [p.get("status") for p in document["points"]]
    if all(s == COMPLETED for s in states):
        return SWEEP_COMPLETED
    if any(s in (PENDING, RUNNING, INTERRUPTED) for s in states):
        return SWEEP_INTERRUPTED
    return SWEEP_PARTIAL


def point_status(run_status: str) -> str:
    """The sweep's word for a finished point, from the report's status of its run directory
    (completed, stopped, failed, incomplete, no_output, ...): anything unfinished failed."""
    return run_status if run_status in POINT_STATES and run_status not in (PENDING, RUNNING) else "failed"


# -- timing ---------------------------------------------------------------------------------------

def eta_seconds(durations: Sequence[float], remaining: int) -> float | None:
    """Remaining points × the median duration of the points run so far (None before the first)."""
    if not durations or remaining <= 0:
        return None if remaining > 0 else 0.0
    return statistics.median(durations) * remaining


# The teardown of a launch (its last measured step → the launch call returned), in the order
# it happens: the train package's end (launch-delay sampling, the cross-rank gather, summary.json;
# node clock), the ranks' and torchrun's exit until the controller's watch saw every node end and
# its log stream drained (summary written → watch ended: node clock against the controller's,
# NTP-close on a cluster), then the controller's own phases of run.json's timings.
TEARDOWN_PARTS = ("train_end_s", "exit_s", "collect_s", "finish_s", "report_s")
_CONTROLLER_PHASES = (("collect_s", "collect"), ("finish_s", "finish"), ("report_s", "report"))
# What a point's own work is made of (its summary.json): warm-up with the first calibration, the
# measured steps, the calibration blocks between them.
WORK_FIELDS = ("warmup_wall_s", "measured_wall_s", "calibration_wall_s")


def work_record(summary: Mapping[str, Any] | None) -> dict[str, float | None]:
    """A point's work figures from its summary.json (a node's word: numbers only)."""
    summary = summary if isinstance(summary, Mapping) else {}
    return {key: finite_number(summary.get(key)) for key in WORK_FIELDS}


def teardown_parts(last_step: float, finished_unix: Any, launch_end: float,
                   timings: Any) -> dict[str, float | None]:
    """TEARDOWN_PARTS of one launch; a part that cannot be told is None. last_step: the
    launch's last measured step (rank 0's wall clock); finished_unix: its summary's; launch_end:
    the controller's wall clock when the launch call returned; timings: run.json's."""
    timings = timings if isinstance(timings, Mapping) else {}
    parts: dict[str, float | None] = {key: finite_number(timings.get(phase))
                                      for key, phase in _CONTROLLER_PHASES}
    finished = finite_number(finished_unix)
    watch_end = launch_end - sum(v for v in parts.values() if v is not None)
    parts["train_end_s"] = None if finished is None else finished - last_step
    parts["exit_s"] = None if finished is None else watch_end - finished
    return {key: None if parts[key] is None else round(parts[key], 3)  # type: ignore[arg-type]
            for key in TEARDOWN_PARTS}


def dead_time_summary(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """median/max/n of the gaps and idle times between consecutive points, and of the parts of
    each launch's teardown."""
    summary: dict[str, Any] = {}
    for key, name in (("gap_before_s", "gap_s"), ("idle_before_s", "idle_s"), ("cleanup_wait_s", "cleanup_wait_s"),
                      ("startup_s", "startup_s"), ("teardown_s", "teardown_s")):
        _add_figures(summary, name, [p.get(key) for p in points])
    for part in TEARDOWN_PARTS:
        _add_figures(summary, f"teardown.{part}", [_get_part(p, part) for p in points])
    return summary


def _get_part(point: Mapping[str, Any], part: str) -> Any:
    parts = point.get("teardown_parts")
    return parts.get(part) if isinstance(parts, Mapping) else None


def _add_figures(summary: dict[str, Any], name: str, values: Iterable[Any]) -> None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers:
        summary[name] = {"median": round(statistics.median(numbers), 3),
                         "max": round(max(numbers), 3), "n": len(numbers)}


def wall_account(document: Mapping[str, Any]) -> dict[str, Any] | None:
    """The sweep's wall time against the work it could not do without (issue 24's goal: wall ≤
    1.3 × work): every point's warm-up and calibration and measured steps, plus one start-up per
    launch (launch called → its first point's warm-up: startup_s less that warm-up). None until
    a session recorded its wall time; `complete` is False when a point that ran lacks a figure
    (a failed point, an older sweep.json): the ratio is then left out."""
    walls = [finite_number(s.get("wall_s")) for s in document.get("sessions") or []
             if isinstance(s, Mapping)]
    if not walls or any(w is None for w in walls):
        return None
    wall = sum(walls)  # type: ignore[arg-type]
    work, counted, missing = 0.0, 0, 0
    for point in document.get("points") or []:
        if point.get("status") in (None, PENDING, RUNNING):
            continue
        figures = [finite_number(point.get(key)) for key in WORK_FIELDS]
        startup = finite_number(point.get("startup_s"))  # the controller's: a number or None
        if any(f is None for f in figures):
            missing += 1
            continue
        warmup, measured, calibration = figures
        # A launch's point: start-up (its warm-up included) replaces the warm-up.
        work += (startup if startup is not None else warmup) + measured + calibration  # type: ignore[operator]
        counted += 1
    account: dict[str, Any] = {"wall_s": round(wall, 3), "work_s": round(work, 3),
                               "points": counted, "complete": missing == 0 and counted > 0}
    account["ratio"] = round(wall / work, 3) if account["complete"] and work > 0 else None
    return account


def unique_name(base: str, taken: Callable[[str], bool]) -> str:
    """base, else base_2, base_3... (two sweeps started in the same second)."""
    if not taken(base):
        return base
    suffix = 2
    while taken(f"{base}_{suffix}"):
        suffix += 1
    return f"{base}_{suffix}"


# -- the nodes ------------------------------------------------------------------------------------

CONTAINER_COUNT = "container"


def run_processes_command(run_id: str, container: str | None = None, node_rank: int = 0) -> str:
    """Prints the pids of every process on a node whose environment carries the run's marker
    (GEMM_RUN_ID=<run id>, set by the node launcher and inherited by torchrun and the ranks);
    one grep, no per-pid forks. That sees only what this user may read: in-container processes
    of a root container are invisible to a non-root SSH user. So with `container` (a --docker
    run) it also prints `container N`: the processes inside the container carrying the run's
    and the node's markers, counted by the registry's in-container scan (signal 0 signals
    nothing). A container that is gone holds no process: no line, which reads as 0.
    Exit status 0 whether or not any is found."""
    marker = f"GEMM_RUN_ID={run_id}"
    host = (f"grep -lzxF -- {sh_quote(marker)} /proc/[0-9]*/environ 2>/dev/null "
            "| sed -n 's|^/proc/\\([0-9]*\\)/environ$|\\1|p'")
    if container is None:
        return f"{host}; true"
    scan = (f"docker exec {sh_quote(container)} sh -c {sh_quote(SCAN_KILL_SH)} gemm-count 0 "
            f"{sh_quote(run_id)} {int(node_rank)} 2>/dev/null")
    return f"{host}; n=$({scan}) && echo {CONTAINER_COUNT} \"$n\"; true"


@dataclass(frozen=True)
class Leftovers:
    """A run's processes still on one node (what run_processes_command printed)."""

    pids: tuple[int, ...] = ()   # host pids this user can see
    in_container: int = 0       # counted inside the container (root's too)

    def __bool__(self) -> bool:
        return bool(self.pids) or self.in_container > 0

    def __str__(self) -> str:
        parts = [f"pid(s) {', '.join(map(str, self.pids))}"] if self.pids else []
        if self.in_container:
            parts.append(f"{self.in_container} in the container")
        return " + ".join(parts) or "none"


def parse_leftovers(text: str) -> Leftovers:
    pids: list[int] = []
    in_container = 0
    for line in text.splitlines():
        words = line.split()
        if len(words) == 1 and words[0].isdigit():
            pids.append(int(words[0]))
        elif len(words) == 2 and words[0] == CONTAINER_COUNT and words[1].isdigit():
            in_container = int(words[1])
    return Leftovers(tuple(pids), in_container)


def parse_pids(text: str) -> list[int]:
    return list(parse_leftovers(text).pids)
