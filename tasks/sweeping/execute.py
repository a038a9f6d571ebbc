"""Running a sweep document's pending runs, shared by `fab sweep` and `fab tune`: each point's
launch spec, rank pools or one launch per run, and the exit status at the end."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from invoke.exceptions import Exit
from rich.console import Console

from tasks.cluster.session import EXIT_USAGE, ClusterSession
from tasks.lib import design
from tasks.lib import sweep as sw
from tasks.run.plan import resolve_spec
from tasks.sweeping.plan import SweepPlan
from tasks.sweeping.pool import PoolSweepRunner, order_and_group
from tasks.sweeping.runner import EXIT_FAILED, EXIT_INTERRUPTED, SweepRunner, launch_flags_for

# Profilers that wrap a whole rank process: in a pool their one profile would span every point.
PROCESS_PROFILERS = ("nsys", "rocprof", "stats", "rocprof_input")


def resolve_config_specs(session: ClusterSession, plan: SweepPlan, c_config: Any) -> dict[int, Any]:
    """Every point's launch spec (by config index), checked before the first run starts."""
    return {index: resolve_spec(session, launch_flags_for(plan.flags_record, point, plan.extra_overrides[point]),
                                c_config, os.environ)
            for index, point in enumerate(plan.points)}


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


def mode_line(use_pool: bool, why_not: str | None, document: Mapping[str, Any], command: str) -> str:
    """What the console says about pools: which axes force a restart, or why there are none."""
    if not use_pool:
        return f"{command}: one launch per point ({why_not})"
    grid = document.get("grid") or {}
    return (f"{command}: rank pools: channels change inside a launch (per communicator); a new "
            f"launch for each value of {design.restart_reason(sw.axes_of(document), grid.get('threads') or [])}")


def run_runs(session: ClusterSession, sweep_dir: Path, document: dict[str, Any],
             config_specs: Mapping[int, Any], console: Console, indexes: list[int],
             options: dict[str, Any], use_pool: bool) -> tuple[str, SweepRunner]:
    """Runs `indexes` (in that order) as pools or one launch each; the sweep's status."""
    specs = {p["index"]: config_specs[p["config"]] for p in document["points"]}
    document["pool"] = use_pool
    if use_pool:
        runner, indexes = pool_runner(session, sweep_dir, document, specs, console, indexes, options)
    else:
        runner = SweepRunner(session, sweep_dir, document, specs, console, **options)
    return runner.run(indexes), runner


def pool_runner(session: ClusterSession, sweep_dir: Path, document: dict[str, Any],
                specs: dict[int, Any], console: Console, pending: list[int],
                options: dict[str, Any]) -> tuple[SweepRunner, list[int]]:
    """The rank-pool runner (tasks/sweeping/pool.py) and the pending runs cut into pools;
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
                     sweep_dir: Path, command: str = "sweep") -> None:
    """The sweep's exit status (see tasks/sweep.py) as an Exit; nothing when all completed."""
    resume = f"fab {command} --resume {sweep_dir}"
    if status == sw.SWEEP_INTERRUPTED:
        raise Exit(f"{command}: interrupted; finish it with: {resume}", code=EXIT_INTERRUPTED)
    if runner is not None and runner.aborted_reason:
        raise Exit(f"{command}: stopped: {runner.aborted_reason}; after fixing it: {resume}",
                   code=runner.aborted_code)
    if status != sw.SWEEP_COMPLETED:
        failed = [f"{sw.run_selector(p, document)} {p['status']}" for p in document["points"]
                  if p["status"] != sw.COMPLETED]
        raise Exit(f"{command}: {len(failed)} of {len(document['points'])} point(s) did not complete "
                   f"({', '.join(failed)}); re-run them with: {resume}", code=EXIT_FAILED)
