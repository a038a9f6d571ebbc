"""`fab sweep`: every point of a grid (channels × threads × any --axis environment variable) as a
launch, each --repeat times in shuffled rounds, then the report and its decision.

The next run starts as soon as no process of the previous one is left on any host (checked by
the run's GEMM_RUN_ID marker, not a fixed sleep); the gap is measured and kept in sweep.json.
A failed or hung point is recorded and the sweep goes on (unless --fail-fast). By default the
points that differ only in channels share one launch, a rank pool (tasks/sweeping/pool.py,
train/pool.py); --no-pool restarts every rank per run. The design (points, repeats, run order,
pools) is tasks/lib/design.py. Ctrl-C stops the current run on every host, records the sweep as
interrupted and exits 130: `fab sweep --resume DIR` runs what is left.

Exit status: 0 every point completed; 1 some point did not; 2 bad flags or sweep.json; 3 another
run is active on a host (the launch's refusal); 130 interrupted.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any

from invoke import Collection, task
from invoke.exceptions import Exit

from tasks.lib import report as rep
from tasks.lib import sweep as sw
from tasks.lib.console import make_console
from tasks.lib.runrecord import now_iso
from tasks.launch import SHORT_FLAGS, LaunchTask
from tasks.launch import launch as launch_task
from tasks.run.plan import controller_info
from tasks.cluster.session import EXIT_USAGE, ClusterSession, load_settings, project_path
from tasks.sweeping.execute import (
    mode_line, raise_for_status, resolve_config_specs, run_runs, sweep_mode,
)
from tasks.sweeping.plan import SweepPlan, plan_sweep
from tasks.sweeping.runner import (
    GRID_FLAGS, LAUNCH_ONLY_FLAGS, create_sweep_dir, launch_flags_record, masked_launch_flags,
    print_dead_time, run_status_of, write_sweep,
)


# -- the task -------------------------------------------------------------------------------------

SWEEP_ONLY_HELP = {
    "channels": "channel values, comma-separated or repeated: --channels 28,42,56,70",
    "threads": "thread values, comma-separated or repeated: --threads 256,512",
    "axis": "another environment variable to sweep, NAME=V1,V2 (repeatable): --axis NCCL_PROTO=Simple,LL128 "
            "--axis NCCL_ALGO=Ring,Tree; NCCL_ALGO/NCCL_PROTO values are checked, an unknown name is "
            "warned about; each axis is a column of results.csv",
    "repeat": "runs per point (default 1), in rounds (every point once per round, each round shuffled, "
              "never the same point twice in a row); the report needs >= 2 to name a best point",
    "seed": "seed of the rounds' shuffle (default: a fresh one, recorded in sweep.json)",
    "resume": "sweep directory to finish: skips points whose run completed (grid and launch flags "
              "come from its sweep.json; --env values it records as *** must be given again)",
    "fail_fast": "stop the sweep at the first point that does not complete (resumable)",
    "point_timeout": "seconds one point may take before it is stopped and recorded as hung "
                     "(default: no limit beyond the launch's own watchdog)",
    "point_override": "train override for some points only: CxT[,NAME=VALUE]:section.key=value, * "
                      "for any (repeatable), e.g. 56x256:profiling.enabled=true",
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
    iterable=["channels", "threads", "axis", "override", "env", "hosts", "point_override"],
    help=SWEEP_HELP,
)
def sweep(c, channels=None, threads=None, axis=None, repeat=None, seed=None, resume=None, fail_fast=False,
          point_timeout=None, point_override=None, no_report=False, pool=True, nproc=None, config=None,
          rocprof=False, stats=False, rocprof_input=None, nsys=False, torch_profile=False, master_port=None,
          nccl_preset=None, override=None, env=None, docker=False, no_docker=False, force=False,
          pin_channels=True, hang_timeout=None, hosts=None, entry=None, metric=None):
    """Run every point of the grid as a launch, --repeat times in shuffled rounds; report and decide.

    fab sweep --channels 28,42,56,70 --threads 256,512 [--axis NCCL_PROTO=Simple,LL128] [--repeat 3]
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
        plan = plan_sweep(given, channels, threads, resume, secrets, axis=axis, repeat=repeat, seed=seed)
    except sw.SweepError as err:
        raise Exit(f"sweep: {err}", code=EXIT_USAGE) from None
    for warning in plan.warnings:
        console.out(f"sweep: warning: {warning}", highlight=False)
    use_pool, why_not = sweep_mode(pool, plan.flags_record, plan.document)
    document, sweep_dir = plan.document, plan.sweep_dir

    with ClusterSession(c, plan.flags_record.get("hosts") or None) as session:
        # Every point's flags and config are checked before the first run starts.
        config_specs = resolve_config_specs(session, plan, c.config)
        if document is None:
            sweep_dir = create_sweep_dir(project_path(session.settings.cluster.experiments_dir), datetime.now())
            document = new_document(plan, sweep_dir.name, session, secrets, fail_fast, use_pool)
            document["point_timeout"] = limit
        assert sweep_dir is not None
        pending = sw.points_to_run(document, lambda p: run_status_of(sweep_dir, p)[0] == rep.COMPLETED)
        runs = len(document["points"])
        console.out(f"sweep: {sweep_dir} ({len(document['configs'])} points"
                    + (f" × {plan.repeat} runs" if plan.repeat > 1 else "")
                    + f", {len(pending)}" + (f" of {runs} runs" if plan.repeat > 1 else "") + " to run"
                    + (f", rounds shuffled with seed {plan.seed}" if plan.repeat > 1 else "") + ")",
                    highlight=False)
        status = document.get("status", sw.SWEEP_COMPLETED)
        runner = None
        if pending:
            # A resumed sweep keeps its --fail-fast and --point-timeout unless given again.
            if limit is not None:
                document["point_timeout"] = limit
            options = dict(fail_fast=fail_fast or bool(document.get("fail_fast")),
                           point_timeout=document.get("point_timeout"))
            console.out(mode_line(use_pool, why_not, document, "sweep"), highlight=False)
            status, runner = run_runs(session, sweep_dir, document, config_specs, console, pending,
                                      options, use_pool)
        else:
            console.out("sweep: every point has completed; nothing to run", highlight=False)
            document["status"] = status = sw.sweep_status(document)
            write_sweep(sweep_dir, document)
    print_dead_time(console, document)
    if not no_report:
        from tasks.lib.report.cli import print_report
        from tasks.lib.report.outputs import write_report

        print_report(console, write_report(sweep_dir))
    raise_for_status(status, runner, document, sweep_dir)


def new_document(plan: SweepPlan, sweep_id: str, session: ClusterSession, secrets: Any, fail_fast: bool,
                 use_pool: bool, kind: str = "sweep") -> dict[str, Any]:
    """sweep.json of a new sweep: the design (points, runs, order) and what it was given."""
    document = sw.new_sweep(
        sweep_id=sweep_id, channels=plan.channels, threads=plan.threads, axes=plan.axes,
        repeat=plan.repeat, seed=plan.seed, pools=use_pool, kind=kind,
        launch_flags=masked_launch_flags(plan.flags_record, secrets),
        hosts=[n.label for n in session.nodes], fail_fast=fail_fast,
        controller=controller_info(secrets), created_at=now_iso())
    for config in document["configs"]:
        config["overrides"] = plan.extra_overrides[plan.points[config["index"]]]
    for point in document["points"]:
        point["overrides"] = plan.extra_overrides[plan.points[point["config"]]]
    return document


ns = Collection(sweep)
