"""`fab sweep`: every channels × threads point as a launch, back to back, then the report.

The next point starts as soon as no process of the previous run is left on any host (checked by
the run's GEMM_RUN_ID marker, not a fixed sleep); the gap is measured and kept in sweep.json.
A failed or hung point is recorded and the sweep goes on (unless --fail-fast). By default the
points of one thread value share one launch, a rank pool (tasks/sweeping/pool.py, train/pool.py);
--no-pool restarts every rank per point. Ctrl-C stops the current point's run on every host,
records the sweep as interrupted and exits 130: `fab sweep --resume DIR` runs what is left.

Exit status: 0 every point completed; 1 some point did not; 2 bad flags or sweep.json; 3 another
run is active on a host (the launch's refusal); 130 interrupted.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.console import Console

from tasks.lib import report as rep
from tasks.lib import sweep as sw
from tasks.lib.console import make_console
from tasks.lib.masking import DEFAULT_SECRET_ENV_PATTERNS
from tasks.lib.runrecord import now_iso
from tasks.launch import SHORT_FLAGS, LaunchTask
from tasks.launch import launch as launch_task
from tasks.run.plan import controller_info, resolve_spec
from tasks.cluster.session import EXIT_USAGE, ClusterSession, cli_path, load_settings, project_path
from tasks.sweeping.pool import PoolSweepRunner, order_and_group
from tasks.sweeping.runner import (
    EXIT_FAILED, EXIT_INTERRUPTED, FLAG_DEFAULTS, GRID_FLAGS, LAUNCH_ONLY_FLAGS, OPERATIONAL_FLAGS,
    SweepRunner, create_sweep_dir, launch_flags_for, launch_flags_record, load_sweep,
    masked_launch_flags, print_dead_time, run_status_of, write_sweep,
)


# -- the task -------------------------------------------------------------------------------------

SWEEP_ONLY_HELP = {
    "channels": "channel values, comma-separated or repeated: --channels 28,42,56,70",
    "threads": "thread values, comma-separated or repeated: --threads 256,512",
    "resume": "sweep directory to finish: skips points whose run completed (grid and launch flags "
              "come from its sweep.json; --env values it records as *** must be given again)",
    "fail_fast": "stop the sweep at the first point that does not complete (resumable)",
    "point_timeout": "seconds one point may take before it is stopped and recorded as hung "
                     "(default: no limit beyond the launch's own watchdog)",
    "point_override": "train override for some points only: CxT:section.key=value, * for any "
                      "(repeatable), e.g. 56x256:profiling.enabled=true",
    "no_report": "do not write results.csv, report.md and the PNGs at the end",
    "pool": "on by default: keep the ranks up between points of the same thread value, one "
            "launch per thread value and a new communicator per channel value (train.pool; NCCL "
            "reads threads once per process). --no-pool restarts every rank per point (for "
            "comparison, or an RCCL that ignores per-communicator CTAs); --nsys, --rocprof and "
            "--stats profile whole processes, so with them every point restarts",
    "master_port": "as fab launch: rendezvous port on node 0 (default: a free one per point)",
    "override": "as fab launch: train override section.key=value for every point (repeatable)",
    "hosts": "as fab launch: hosts for the sweep, master first",
}
# Every other flag's help is fab launch's own, so the two cannot drift apart. Taken when this
# module is imported: invoke empties a task's help dict as it builds its parser (the fabfile
# imports every task module before that).
SWEEP_HELP = {**{name: f"as fab launch: {text}" for name, text in launch_task.help.items()
                 if name not in LAUNCH_ONLY_FLAGS | GRID_FLAGS},
              **SWEEP_ONLY_HELP}


@dataclass
class SweepPlan:
    """What a new or resumed sweep runs: its launch flags, grid and (resumed) document."""

    flags_record: dict[str, Any]
    channels: list[int]
    threads: list[int]
    points: list[sw.GridPoint]
    extra_overrides: dict[sw.GridPoint, list[str]]
    document: dict[str, Any] | None = None   # None: a new sweep (created once the hosts are known)
    sweep_dir: Path | None = None


def plan_sweep(given: dict[str, Any], channels: Any, threads: Any, resume: str | None,
               secret_patterns: Sequence[str] = DEFAULT_SECRET_ENV_PATTERNS) -> SweepPlan:
    """The grid and flags of a new sweep, or those recorded in the resumed one's sweep.json (with
    the operational flags given now, and the secret --env values it masked given again);
    SweepError for anything that does not fit."""
    channel_values = sw.parse_grid_values(channels, "--channels")
    thread_values = sw.parse_grid_values(threads, "--threads")
    if not resume:
        points = sw.grid_points(channel_values, thread_values)  # both axes present
        return SweepPlan(given, channel_values, thread_values, points,
                         sw.parse_point_overrides(given["point_override"], points))
    sweep_dir = cli_path(resume)
    document = load_sweep(sweep_dir)
    sw.check_resume_grid(document, channel_values, thread_values)
    recorded = document["launch_flags"]
    env = sw.restore_masked_env(recorded.get("env") or [], given.get("env") or [], secret_patterns)
    sw.check_resume_flags(recorded, {k: v for k, v in given.items()
                                     if k != "env" and v != FLAG_DEFAULTS.get(k)},
                          may_change=OPERATIONAL_FLAGS)
    flags_record = {**recorded, **{k: given[k] for k in OPERATIONAL_FLAGS if given.get(k)},
                    "env": env}
    if not given.get("force"):
        flags_record["force"] = False  # --force is for this invocation, not remembered
    points = [sw.GridPoint(p["channels"], p["threads"]) for p in document["points"]]
    extra = sw.parse_point_overrides(flags_record.get("point_override") or [], points)
    return SweepPlan(flags_record, channel_values, thread_values, points, extra, document, sweep_dir)


def parse_point_timeout(point_timeout: Any) -> float | None:
    try:
        limit = float(point_timeout) if point_timeout not in (None, "") else None
        if limit is not None and not limit > 0:
            raise ValueError
    except ValueError:
        raise Exit(f"sweep: --point-timeout {point_timeout!r} is not a positive number of seconds",
                   code=EXIT_USAGE) from None
    return limit


@task(
    klass=LaunchTask,
    short_flags=SHORT_FLAGS,  # -c -t -p -C -r -m, as fab launch
    iterable=["channels", "threads", "override", "env", "hosts", "point_override"],
    help=SWEEP_HELP,
)
def sweep(c, channels=None, threads=None, resume=None, fail_fast=False, point_timeout=None,
          point_override=None, no_report=False, pool=True, nproc=None, config=None, rocprof=False, stats=False,
          rocprof_input=None, nsys=False, torch_profile=False, master_port=None, nccl_preset=None,
          override=None, env=None, docker=False, no_docker=False, force=False, pin_channels=True,
          hang_timeout=None, hosts=None, entry=None, metric=None):
    """Run every channels × threads point as a launch, back to back; write the report at the end.

    fab sweep --channels 28,42,56,70 --threads 256,512 [launch flags]
    fab sweep --resume experiments/sweep_<ts>
    """
    console = make_console(soft_wrap=True)
    if docker and no_docker:
        raise Exit("sweep: --docker and --no-docker contradict each other; give one", code=EXIT_USAGE)
    limit = parse_point_timeout(point_timeout)
    given = launch_flags_record(
        nproc=nproc, config=config, rocprof=rocprof, stats=stats, rocprof_input=rocprof_input,
        nsys=nsys, torch_profile=torch_profile, master_port=master_port, nccl_preset=nccl_preset,
        override=override, env=env, docker=True if docker else (False if no_docker else None),
        force=force, pin_channels=pin_channels, hang_timeout=hang_timeout, hosts=hosts,
        point_override=point_override, entry=entry, metric=metric)
    secrets = load_settings(c).launch.secret_env_patterns
    try:
        plan = plan_sweep(given, channels, threads, resume, secrets)
    except sw.SweepError as err:
        raise Exit(f"sweep: {err}", code=EXIT_USAGE) from None
    flags_record, points, extra = plan.flags_record, plan.points, plan.extra_overrides
    document, sweep_dir = plan.document, plan.sweep_dir

    with ClusterSession(c, flags_record.get("hosts") or None) as session:
        # Every point's flags and config are checked before the first point starts.
        specs = {index: resolve_spec(session, launch_flags_for(flags_record, point, extra[point]),
                                     c.config, os.environ)
                 for index, point in enumerate(points)}
        if document is None:
            sweep_dir = create_sweep_dir(project_path(session.settings.cluster.experiments_dir), datetime.now())
            document = sw.new_sweep(
                sweep_id=sweep_dir.name, channels=plan.channels, threads=plan.threads,
                launch_flags=masked_launch_flags(flags_record, secrets),
                hosts=[n.label for n in session.nodes], fail_fast=fail_fast,
                controller=controller_info(secrets), created_at=now_iso())
            document["point_timeout"] = limit
            for point in document["points"]:
                point["overrides"] = extra[points[point["index"]]]
        assert sweep_dir is not None
        pending = sw.points_to_run(document, lambda p: run_status_of(sweep_dir, p)[0] == rep.COMPLETED)
        console.out(f"sweep: {sweep_dir} ({len(document['points'])} points, {len(pending)} to run)",
                    highlight=False)
        status = document.get("status", sw.SWEEP_COMPLETED)
        runner = None
        if pending:
            # A resumed sweep keeps its --fail-fast and --point-timeout unless given again.
            if limit is not None:
                document["point_timeout"] = limit
            options = dict(fail_fast=fail_fast or bool(document.get("fail_fast")),
                           point_timeout=document.get("point_timeout"))
            use_pool, why_not = sweep_mode(pool, flags_record, plan.document)
            document["pool"] = use_pool
            console.out("sweep: " + ("rank pools: one launch per thread value" if use_pool else
                                     f"one launch per point ({why_not})"), highlight=False)
            if use_pool:
                runner, pending = pool_runner(session, sweep_dir, document, specs, console,
                                              pending, options)
            else:
                runner = SweepRunner(session, sweep_dir, document, specs, console, **options)
            status = runner.run(pending)
        else:
            console.out("sweep: every point has completed; nothing to run", highlight=False)
            document["status"] = status = sw.sweep_status(document)
            write_sweep(sweep_dir, document)
    print_dead_time(console, document)
    if not no_report:
        from tasks.report import print_report, write_report

        print_report(console, write_report(sweep_dir))
    raise_for_status(status, runner, document, sweep_dir)


# Profilers that wrap a whole rank process: in a pool their one profile would span every point.
PROCESS_PROFILERS = ("nsys", "rocprof", "stats", "rocprof_input")


def sweep_mode(pool: bool, flags_record: Mapping[str, Any],
               resumed: Mapping[str, Any] | None) -> tuple[bool, str | None]:
    """Whether the points run in rank pools, and why not where they do not. A resumed sweep
    keeps the mode it began with (a sweep recorded before pools were the default restarts),
    unless --no-pool is given now."""
    if not pool:
        return False, "--no-pool"
    if flags_record.get("entry"):
        return False, "--entry runs your own program, which has no rank pool"
    if resumed is not None and not resumed.get("pool"):
        return False, "the resumed sweep began with one launch per point"
    profilers = [name for name in PROCESS_PROFILERS if flags_record.get(name)]
    if profilers:
        flag = "--" + profilers[0].replace("_", "-")
        return False, f"{flag} profiles whole rank processes"
    return True, None


def pool_runner(session: ClusterSession, sweep_dir: Path, document: dict[str, Any],
                specs: dict[int, Any], console: Console, pending: list[int],
                options: dict[str, Any]) -> tuple[SweepRunner, list[int]]:
    """The rank-pool runner (tasks/sweeping/pool.py) and the pending points in threads-major order;
    Exit 2 when a pool's train overrides do not validate."""
    from tasks.lib.runspec import RunSpecError

    document["pool"] = True
    pending, groups = order_and_group(document, pending)
    runner = PoolSweepRunner(session, sweep_dir, document, specs, console, groups=groups, **options)
    try:
        runner.prepare()
    except (RunSpecError, sw.SweepError) as err:
        raise Exit(f"sweep: rank pool: {err}", code=EXIT_USAGE) from None
    if any(spec.accelerator == "rocm" for spec in specs.values()):
        console.out("sweep: rank pools on ROCm: RCCL may not honour per-communicator CTAs; each "
                    "point's effective_settings says whether it did", highlight=False)
    return runner, pending


def raise_for_status(status: str, runner: SweepRunner | None, document: Mapping[str, Any],
                     sweep_dir: Path) -> None:
    """The sweep's exit status (see the module docstring) as an Exit; nothing when all completed."""
    if status == sw.SWEEP_INTERRUPTED:
        raise Exit(f"sweep: interrupted; finish it with: fab sweep --resume {sweep_dir}", code=EXIT_INTERRUPTED)
    if runner is not None and runner.aborted_reason:
        raise Exit(f"sweep: stopped: {runner.aborted_reason}; after fixing it: fab sweep --resume {sweep_dir}",
                   code=runner.aborted_code)
    if status != sw.SWEEP_COMPLETED:
        failed = [f"{p['channels']}x{p['threads']} {p['status']}" for p in document["points"]
                  if p["status"] != sw.COMPLETED]
        raise Exit(f"sweep: {len(failed)} of {len(document['points'])} point(s) did not complete "
                   f"({', '.join(failed)}); "
                   f"re-run them with: fab sweep --resume {sweep_dir}", code=EXIT_FAILED)


ns = Collection(sweep)
