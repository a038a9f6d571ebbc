"""The machinery under `fab sweep`: the launch flags of each point, sweep.json on disk, the
wait for a point's processes to go, and SweepRunner, which runs the points one launch each
(tasks/sweeping/pool.py subclasses it for rank pools, the default). tasks/sweep.py is the task over it."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any

from invoke.exceptions import Exit
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tasks.lib import report as rep
from tasks.lib import sweep as sw
from tasks.lib.masking import mask_assignments
from tasks.lib.runrecord import now_iso, write_json_atomic
from tasks.lib.runspec import LaunchFlags
from tasks.run.lifecycle import RunOutcome, run_launch
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import on_each
from tasks.cluster.session import EXIT_USAGE, ClusterSession, project_path


EXIT_FAILED = 1
EXIT_BUSY = 3            # tasks.launch: another run is active on a host
EXIT_INTERRUPTED = 130   # tasks.launch returns it when Ctrl-C detached it from the run
PROCESS_POLL_S = 0.2
PROCESS_GONE_TIMEOUT_S = 60.0
KILL_CONFIRM_S = 15.0    # after the SIGKILL, how long leftovers may take to go
PROCESS_CHECK_TIMEOUT_S = 10.0

# Launch flags a resumed sweep may be given anew: they change how the remaining points are
# started or when a hang is called, not what a completed point measures.
OPERATIONAL_FLAGS = ("force", "hosts", "master_port", "hang_timeout")
# fab launch flags the sweep does not take: every point is watched to its end (no --detach), and
# a dry run is of one launch. Every other launch flag is a sweep flag too (a unit test holds it).
# --slurm and its options: `fab launch` submits one batch job; a sweep runs inside one.
LAUNCH_ONLY_FLAGS = frozenset({"detach", "dry_run", "slurm", "partition", "time", "account",
                               "nodes"})
# The grid gives these per point.
GRID_FLAGS = frozenset({"channels", "threads"})
# The sweep's record names of LaunchFlags fields whose flag is spelled otherwise.
RECORD_NAMES = {"overrides": "override"}


# -- flags --------------------------------------------------------------------------------------

def launch_flags_record(**flags: Any) -> dict[str, Any]:
    """The launch flags as recorded in sweep.json (JSON-ready; None/False/[] mean not given)."""
    record = dict(flags)
    for key in ("override", "env", "hosts", "point_override"):
        record[key] = list(record.get(key) or [])
    return record


def masked_launch_flags(record: Mapping[str, Any], secret_patterns: Sequence[str]) -> dict[str, Any]:
    """The record as sweep.json keeps it: --env values of secret-looking variables as ***
    (a resume asks for them again)."""
    return {**record, "env": mask_assignments(record.get("env") or [], secret_patterns)}


def _flag_defaults() -> dict[str, Any]:
    """Every recorded launch flag at its LaunchFlags default ("not given"), plus the sweep's
    --point-override; what a sweep.json written before a flag existed implicitly holds."""
    defaults = {RECORD_NAMES.get(f.name, f.name): f.default for f in fields(LaunchFlags)
                if f.name not in GRID_FLAGS | LAUNCH_ONLY_FLAGS}
    return launch_flags_record(**defaults, hosts=None, point_override=None)


FLAG_DEFAULTS = _flag_defaults()


def launch_flags_for(record: Mapping[str, Any], point: sw.GridPoint, extra_overrides: Sequence[str]) -> LaunchFlags:
    """One point's launch: every LaunchFlags field from the record (a flag the record lacks, in a
    sweep.json older than the flag, keeps its default), the grid's channels and threads, its
    --axis values as --env items (after the sweep's own --env, which never names an axis)."""
    values: dict[str, Any] = {}
    for field in fields(LaunchFlags):
        if field.name in GRID_FLAGS | LAUNCH_ONLY_FLAGS:
            continue
        value = record.get(RECORD_NAMES.get(field.name, field.name))
        if isinstance(field.default, bool):
            value = field.default if value is None else bool(value)
        values[field.name] = value if value is not None else field.default
    values["overrides"] = tuple(values["overrides"] or ()) + tuple(extra_overrides)
    values["env"] = tuple(values["env"] or ()) + tuple(point.env)
    return LaunchFlags(channels=point.channels, threads=point.threads, **values)


# -- files --------------------------------------------------------------------------------------

def write_sweep(sweep_dir: Path, document: dict[str, Any]) -> None:
    """Atomically (a reader or a Ctrl-C never leaves half a sweep.json)."""
    document["updated_at"] = now_iso()
    document["dead_time"] = sw.dead_time_summary(document["points"])
    document["wall_account"] = sw.wall_account(document)
    write_json_atomic(sweep_dir / sw.SWEEP_JSON, document)


def load_sweep(sweep_dir: Path) -> dict[str, Any]:
    document, problem = rep.read_json_file(sweep_dir / sw.SWEEP_JSON)
    if problem:
        raise sw.SweepError(f"{sweep_dir}: {problem}; is this a sweep directory (experiments/sweep_...)?")
    return sw.validate_sweep(document, str(sweep_dir / sw.SWEEP_JSON))


def create_sweep_dir(experiments_dir: Path, when: datetime) -> Path:
    base = f"{sw.SWEEP_PREFIX}{when:%Y%m%d_%H%M%S}"
    experiments_dir.mkdir(parents=True, exist_ok=True)
    while True:
        name = sw.unique_name(base, lambda n: (experiments_dir / n).exists())
        try:
            (experiments_dir / name).mkdir(mode=0o700)  # sweep.json is the user's alone
            return experiments_dir / name
        except FileExistsError:
            continue  # another sweep took it between the check and the mkdir


def run_status_of(sweep_dir: Path, point: Mapping[str, Any]) -> tuple[str, Path | None]:
    """The report's status of a point's run directory (what --resume trusts)."""
    run_dir = rep.resolve_run_dir(sweep_dir, point.get("run_dir"), point.get("run_id"))
    if run_dir is None or not run_dir.is_dir():
        return rep.MISSING, run_dir
    # A pooled point lives in its own directory of the pool's shared run directory.
    return rep.summarize_run(rep.read_run(run_dir, point.get("output_dir"))).status, run_dir


def rank0_wall_times(data: rep.RunData) -> tuple[float, float] | None:
    """First and last measured step's wall time on rank 0 (the idle-time clock) of a point."""
    lines = data.steps_by_rank.get(0) or []
    times = [line["wall_time"] for line in lines if isinstance(line.get("wall_time"), (int, float))
             and not isinstance(line.get("wall_time"), bool)]
    return (min(times), max(times)) if times else None


@dataclass
class LaunchWindow:
    """What one launch measured, on rank 0's clock: its first and last measured step (over
    every point a pool ran), the summary.json of its first point and of the point that ended
    last, its run.json."""

    first_step: float
    last_step: float
    first_summary: dict[str, Any] | None
    last_summary: dict[str, Any] | None
    run_json: dict[str, Any] | None


def launch_window(runs: Sequence[rep.RunData]) -> LaunchWindow | None:
    """A launch's window over every point it ran, the first as run first (None: no measured
    step)."""
    spans = [(times, data) for data in runs if (times := rank0_wall_times(data))]
    if not spans:
        return None
    (_, last), last_data = max(spans, key=lambda span: span[0][1])
    return LaunchWindow(min(times[0] for times, _ in spans), last, runs[0].summary,
                        last_data.summary, runs[0].run_json)


# -- the nodes ------------------------------------------------------------------------------------

def stop_point(session: ClusterSession, run_id: str, console: Console) -> None:
    from tasks.runs import stop_run

    results = stop_run(session, run_id, session.settings.launch.stop_grace)
    for node, error in results.failed.items():
        console.out(f"sweep: stopping {run_id} on node {node.index} ({node.label}) failed: "
                    f"{describe_error(error)}", highlight=False)


def wait_processes_gone(session: ClusterSession, run_id: str, console: Console,
                        container: str | None = None,
                        timeout: float = PROCESS_GONE_TIMEOUT_S) -> float:
    """Seconds until no process with the run's marker is left on any host (inside `container`
    too, for a --docker run). Past the timeout the leftovers are killed (the next point must not
    share the GPUs with them)."""
    started = time.monotonic()
    deadline = started + timeout
    killed = False
    reported_unreachable: set[int] = set()
    while True:
        results = on_each(session.nodes, lambda node: sw.parse_leftovers(node.run(
            sw.run_processes_command(run_id, container, node.index), warn=True,
            timeout=PROCESS_CHECK_TIMEOUT_S).stdout))
        for node, error in results.failed.items():
            if node.index not in reported_unreachable:
                reported_unreachable.add(node.index)
                console.out(f"sweep: cannot check node {node.index} ({node.label}) for leftovers "
                            f"of {run_id}: {describe_error(error)}", highlight=False)
        alive = {node.index: left for node, left in results.ok.items() if left}
        now = time.monotonic()
        if not alive:
            return now - started
        if now > deadline:
            listing = ", ".join(f"node {i}: {left}" for i, left in sorted(alive.items()))
            if killed:
                console.out(f"sweep: processes of {run_id} still alive after SIGKILL: {listing}",
                            highlight=False)
                return now - started
            from tasks.runs import stop_run

            console.out(f"sweep: {run_id} left processes after {now - started:.0f} s ({listing}); "
                        "killing them", highlight=False)
            stop_run(session, run_id, 0.0, kill=True)
            killed, deadline = True, time.monotonic() + KILL_CONFIRM_S
        time.sleep(PROCESS_POLL_S)


class PointWatchdog:
    """Stops a point's run when it exceeds --point-timeout (a hang the launch did not catch)."""

    def __init__(self, session: ClusterSession, console: Console, limit: float | None,
                 outcome: RunOutcome):
        self.session, self.console, self.limit, self.outcome = session, console, limit, outcome
        self.fired = False
        self._timer: threading.Timer | None = None

    def __enter__(self) -> PointWatchdog:
        if self.limit:
            self._timer = threading.Timer(self.limit, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _fire(self) -> None:
        run_id = self.outcome.run_id  # None: the launch has not chosen one; nothing runs yet
        if not run_id:
            return
        self.fired = True
        self.console.out(f"sweep: {run_id} exceeded --point-timeout {self.limit:.0f} s: "
                         "stopping it as hung", highlight=False)
        try:
            stop_point(self.session, run_id, self.console)
        except Exception as err:  # noqa: BLE001 - the sweep goes on; the wait reports leftovers
            self.console.out(f"sweep: stopping {run_id} failed: {describe_error(err)}", highlight=False)


# -- the sweep --------------------------------------------------------------------------------------

class SweepRunner:
    """Runs the pending points of one sweep document, keeping sweep.json current."""

    def __init__(self, session: ClusterSession, sweep_dir: Path, document: dict[str, Any],
                 specs: dict[int, Any], console: Console, *, fail_fast: bool,
                 point_timeout: float | None):
        self.session, self.sweep_dir, self.document, self.specs = session, sweep_dir, document, specs
        self.console, self.fail_fast, self.point_timeout = console, fail_fast, point_timeout
        self.experiments_dir = project_path(session.settings.cluster.experiments_dir)
        # Monotonic time the previous point's launch call returned: the gap to the next point's
        # start is everything the sweep adds (leftover check, stop on failure, sweep.json).
        self.previous_end: float | None = None
        self.previous_last_step: float | None = None  # the previous launch's, rank 0's clock
        self.launch_runs: dict[str | None, rep.RunData] = {}  # the last launch's points, read
        self.durations: list[float] = []
        self.aborted_reason: str | None = None
        self.aborted_code = EXIT_FAILED
        self.launch_window = (0.0, 0.0)  # wall clock: this point's launch call began, returned

    def run(self, indexes: Sequence[int]) -> str:
        """Runs the points; the sweep's final status (interrupted on Ctrl-C, which is re-raised
        as Exit 130 by the caller after the report)."""
        session_entry = {"started_at": now_iso(), "ended_at": None, "resumed": bool(self.document["sessions"]),
                         "ran": [], "wall_s": None}
        session_started = time.monotonic()
        self.document["sessions"].append(session_entry)
        self.document["status"] = sw.SWEEP_RUNNING
        write_sweep(self.sweep_dir, self.document)
        total = len(self.document["points"])
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("elapsed"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            console=self.console, transient=False)
        interrupted = False
        with progress:
            bar = progress.add_task("sweep", total=len(indexes), eta="?")
            for position, index in enumerate(indexes):
                point = self.document["points"][index]
                label = f"point {index + 1}/{total}: {sw.run_label(point, self.document)}"
                progress.update(bar, description=label)
                self.console.out(f"sweep: {label} ({position + 1} of {len(indexes)} to run)", highlight=False)
                session_entry["ran"].append(index)
                try:
                    self.run_point(point)
                except KeyboardInterrupt:
                    interrupted = True
                    break
                progress.advance(bar)
                eta = sw.eta_seconds(self.durations, len(indexes) - position - 1)
                progress.update(bar, eta="?" if eta is None else _duration(eta))
                if self.aborted_reason:
                    break
                if self.fail_fast and point["status"] != sw.COMPLETED:
                    self.aborted_reason = f"--fail-fast: point {index + 1} {point['status']}"
                    break
        session_entry["ended_at"] = now_iso()
        session_entry["wall_s"] = round(time.monotonic() - session_started, 3)
        status = sw.sweep_status(self.document, interrupted=interrupted,
                                 aborted=self.aborted_reason is not None)
        self.document["status"] = status
        self.document["ended_at"] = now_iso() if status in (sw.SWEEP_COMPLETED, sw.SWEEP_PARTIAL) else None
        write_sweep(self.sweep_dir, self.document)
        return status

    def run_point(self, point: dict[str, Any]) -> None:
        spec = self.specs[point["index"]]
        outcome = RunOutcome()  # run_launch fills it as it goes: still there after Ctrl-C
        started = time.monotonic()
        started_unix = time.time()
        point.update(status=sw.RUNNING, started_at=now_iso(), ended_at=None, error=None,
                     attempts=point.get("attempts", 0) + 1, run_id=None, run_dir=None,
                     gap_before_s=None if self.previous_end is None else round(started - self.previous_end, 3),
                     idle_before_s=None, exit_status=None, launch_s=None, cleanup_wait_s=None,
                     startup_s=None, teardown_s=None)
        write_sweep(self.sweep_dir, self.document)
        interrupted = False
        watchdog = PointWatchdog(self.session, self.console, self.point_timeout, outcome)
        try:
            with watchdog:
                code = run_launch(self.session, spec, self.console, outcome=outcome)
            interrupted = code == EXIT_INTERRUPTED
        except KeyboardInterrupt:
            interrupted = True
        except Exit as err:
            code = err.code
            point["error"] = _one_line(err.message) or f"launch exited {code}"
            if code in (EXIT_USAGE, EXIT_BUSY) and not outcome.started:
                # Every later point would meet the same refusal: stop here, resumable.
                self.aborted_reason, self.aborted_code = point["error"], code
        except Exception as err:  # noqa: BLE001 - one point's crash must not end the sweep
            code = EXIT_FAILED
            point["error"] = f"{type(err).__name__}: {err}"
        ended = time.monotonic()
        self.previous_end = ended
        self.launch_window = (started_unix, time.time())
        point["launch_s"] = round(ended - started, 3)
        point["exit_status"] = None if interrupted else code
        if outcome.run_id:
            point["run_id"] = outcome.run_id
            point["run_dir"] = os.path.relpath(outcome.run_dir or self.experiments_dir / outcome.run_id,
                                               self.sweep_dir)
        container = self.session.settings.docker.container if spec.docker else None
        try:
            if outcome.run_id:
                if interrupted:
                    self.console.out(f"sweep: interrupted; stopping {outcome.run_id} on every host",
                                     highlight=False)
                    stop_point(self.session, outcome.run_id, self.console)
                point["cleanup_wait_s"] = round(
                    wait_processes_gone(self.session, outcome.run_id, self.console, container), 3)
        except KeyboardInterrupt:
            interrupted = True
        self.finish_point(point, interrupted, watchdog.fired)
        self.durations.append(time.monotonic() - started)
        if interrupted:
            raise KeyboardInterrupt

    def finish_point(self, point: dict[str, Any], interrupted: bool, hung: bool) -> None:
        point["ended_at"] = now_iso()
        run_dir = (self.sweep_dir / point["run_dir"]).resolve() if point.get("run_dir") else None
        # Every point the launch ran, read once (a pool's members are recorded from these).
        self.launch_runs = ({name: rep.read_run(run_dir, name) for name in self.point_names(point)}
                            if run_dir is not None and run_dir.is_dir() else {})
        if interrupted:
            point["status"] = sw.INTERRUPTED
        elif hung:
            point["status"] = "hung"
            point["error"] = point.get("error") or f"exceeded --point-timeout {self.point_timeout:.0f} s"
        elif not self.launch_runs:
            point["status"] = "error"
            point["error"] = point.get("error") or "the launch created no run directory"
        else:
            row = rep.summarize_run(next(iter(self.launch_runs.values())))
            point["status"] = sw.point_status(row.status)
            if point["status"] != sw.COMPLETED and not point.get("error"):
                point["error"] = "; ".join(row.problems[:2]) or f"run {row.status}"
        window = launch_window(list(self.launch_runs.values()))
        if window:
            point.update(sw.work_record(window.first_summary))
        if window and self.previous_last_step is not None:
            point["idle_before_s"] = round(window.first_step - self.previous_last_step, 3)
        if window:
            # Node clock against the controller's: exact on one host, NTP-close on a cluster.
            point["startup_s"] = round(window.first_step - self.launch_window[0], 3)
            point["teardown_s"] = round(self.launch_window[1] - window.last_step, 3)
            point["teardown_parts"] = sw.teardown_parts(
                window.last_step, (window.last_summary or {}).get("finished_unix"),
                self.launch_window[1], (window.run_json or {}).get("timings"))
        # Idle time is only defined between two consecutive launches that both measured steps.
        self.previous_last_step = window.last_step if window else None
        write_sweep(self.sweep_dir, self.document)
        self.console.out(f"sweep: point {point['index'] + 1} {sw.run_label(point, self.document)}: "
                         f"{point['status']}" + (f" ({point['error']})" if point.get("error") else "")
                         + f", {point['launch_s']:.1f} s", highlight=False)

    def point_names(self, point: Mapping[str, Any]) -> list[str | None]:
        """The output directories a point's launch ran, in order (None: the run's only one)."""
        return [None]



def _one_line(text: str | None) -> str:
    """A launch's Exit message (a headline and one line per failing host) as one line."""
    return "; ".join(line.strip() for line in (text or "").splitlines() if line.strip())


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_dead_time(console: Console, document: Mapping[str, Any]) -> None:
    dead = sw.dead_time_summary(document["points"])
    parts = []
    if "gap_s" in dead:
        parts.append(f"controller gap median {dead['gap_s']['median']:.2f} s (max {dead['gap_s']['max']:.2f})")
    if "cleanup_wait_s" in dead:
        parts.append(f"leftover-process wait median {dead['cleanup_wait_s']['median']:.2f} s")
    if "idle_s" in dead:
        parts.append(f"idle between measured steps median {dead['idle_s']['median']:.1f} s "
                     f"(max {dead['idle_s']['max']:.1f})")
    if "startup_s" in dead and "teardown_s" in dead:
        parts.append(f"of which launch start-up median {dead['startup_s']['median']:.1f} s, "
                     f"teardown median {dead['teardown_s']['median']:.1f} s")
    if parts:
        console.out("dead time between points: " + "; ".join(parts), highlight=False)
    teardown = [f"{label} {dead[key]['median']:.2f} s" for key, label in TEARDOWN_LABELS
                if key in dead]
    if teardown:
        console.out("teardown, median per launch: " + ", ".join(teardown), highlight=False)
    account = document.get("wall_account")
    if isinstance(account, Mapping) and account.get("ratio"):
        console.out(f"sweep wall time {account['wall_s']:.1f} s for {account['work_s']:.1f} s of "
                    f"start-up, warm-up, calibration and measured steps ({account['ratio']:.2f}×)",
                    highlight=False)


TEARDOWN_LABELS = (("teardown.train_end_s", "train's end (launch-delay sampling, gather, summary)"),
                   ("teardown.exit_s", "ranks' exit until the watch saw it"),
                   ("teardown.collect_s", "collect"), ("teardown.finish_s", "run.json"),
                   ("teardown.report_s", "run report"))


