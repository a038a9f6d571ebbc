"""`fab tune`: the best point of a grid (the same axes as `fab sweep`) in far fewer runs than the
grid: coordinate descent over the ordered axes with successive halving of repeats on the
survivors (tasks/sweeping/search.py), iteration time under real overlap as the objective. Each
round is printed; a budget (`--budget RUNS`, or minutes: `--budget 30m`) stops it early; it
ends with the same report, decision and export as a sweep.

The runs it asks for are ordinary sweep runs (sweep.json, kind "tune": the grid's points as
configs, one entry per run appended as the search asks), so pools, the leftover checks, the
report and `fab report --export` work as for a sweep. The search is deterministic given what the
runs measured: `fab tune --resume DIR` replays the recorded runs and runs only what is missing.

Exit status: 0 the search ended (or the budget stopped it); 1 a run did not complete; 2 bad
flags; 3 another run is active on a host; 130 interrupted.
"""
from __future__ import annotations

import math
import re
import time
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from invoke import Collection, task
from invoke.exceptions import Exit

from tasks.cluster.session import EXIT_USAGE, ClusterSession, cli_path, load_settings, project_path
from tasks.launch import SHORT_FLAGS, LaunchTask
from tasks.lib import design
from tasks.lib import report as rep
from tasks.lib import sweep as sw
from tasks.lib.console import make_console
from tasks.lib.report.stats import run_sample
from tasks.sweep import SWEEP_HELP, new_document, parse_point_timeout
from tasks.sweeping.execute import mode_line, raise_for_status, resolve_config_specs, run_runs, sweep_mode
from tasks.sweeping.plan import SweepPlan, plan_sweep
from tasks.sweeping.runner import create_sweep_dir, launch_flags_record, print_dead_time, write_sweep
from tasks.sweeping.search import Point, Search

TUNE_HELP = {
    **{k: v for k, v in SWEEP_HELP.items() if k not in ("repeat", "seed", "no_report", "resume")},
    "channels": "channel values to search, comma-separated or repeated (ordered: the search walks them)",
    "threads": "thread values to search, comma-separated or repeated",
    "budget": "stop after this many runs (--budget 40) or this long (--budget 30m, 90s, 1.5h); "
              "default: until the search ends",
    "max_runs": "runs a surviving point gets at most (successive halving: 1, then 2, ... up to this; default 3)",
    "resume": "tune directory to finish: its recorded runs are replayed, only the missing ones run",
    "export": "as fab report: write the best point's settings to FILE (a sourceable `export` file)",
    "export_preset": "as fab report: write the best point's settings as config/nccl/NAME.yaml",
    "pick": "as fab report: the point to export where no single one is best (CxT[,NAME=VALUE])",
}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smh])$")


def parse_budget(value: Any) -> tuple[int | None, float | None]:
    """--budget as (runs, None) or (None, seconds); (None, None) when not given."""
    if value in (None, ""):
        return None, None
    text = str(value).strip().lower()
    if text.isdigit() and int(text) > 0:
        return int(text), None
    match = _DURATION.match(text)
    if match and float(match.group(1)) > 0:
        return None, float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2)]
    raise Exit(f"tune: --budget {value!r}: give a number of runs (--budget 40) or a time (--budget 30m)",
               code=EXIT_USAGE)


def grid_index(plan: SweepPlan) -> tuple[list[int], dict[Point, int], list[list[str]], list[str]]:
    """The search's axes over the sweep's grid: sizes, the config index of each point, labels.
    A resumed tune's grid is its sweep.json's (the flags may leave it out)."""
    grid = (plan.document or {}).get("grid") or {}
    channels = list(grid.get("channels") or plan.channels)
    threads = list(grid.get("threads") or plan.threads)
    values: list[list[Any]] = [channels, threads, *[list(a.values) for a in plan.axes]]
    sizes = [len(v) for v in values]
    # By value, not by position: a config's index is where sweep.json lists it.
    config_of = {(channels.index(p.channels), threads.index(p.threads),
                  *[list(a.values).index(dict(p.settings)[a.name]) for a in plan.axes]): index
                 for index, p in enumerate(plan.points)}
    if len(config_of) != len(plan.points) or len(config_of) != math.prod(sizes):
        raise Exit(f"tune: the grid's {len(config_of)} points do not match the plan's {len(plan.points)}",
                   code=EXIT_USAGE)
    labels = [[f"{c}ch" for c in channels], [f"{t}th" for t in threads],
              *[[f"{a.name}={v}" for v in a.values] for a in plan.axes]]
    names = ["channels", "threads", *[a.name for a in plan.axes]]
    return sizes, config_of, labels, names


def selector(point: design.GridPoint) -> str:
    """The point as the report seeds its interval (PointRow.selector): CxT[,NAME=VALUE...]."""
    return ",".join([f"{point.channels}x{point.threads}", *(f"{k}={v}" for k, v in point.settings)])


def find_or_add_run(document: dict[str, Any], config: int, repeat: int) -> int:
    """The run index of (config, repeat), added to the document (and its order) if new."""
    for point in document["points"]:
        if point["config"] == config and point["repeat"] == repeat:
            return point["index"]
    index = len(document["points"])
    entry = sw.new_point(index, sw.point_of(document["configs"][config]), config, repeat)
    entry["overrides"] = document["configs"][config].get("overrides") or []
    document["points"].append(entry)
    document["order"].append(index)
    return index


def measured(sweep_dir: Path, point: dict[str, Any]) -> list[tuple[int, float]] | None:
    """A completed run's (step, iteration time) pairs; None when it did not complete."""
    run_dir = rep.resolve_run_dir(sweep_dir, point.get("run_dir"), point.get("run_id"))
    if point.get("status") != sw.COMPLETED or run_dir is None or not run_dir.is_dir():
        return None
    data = rep.read_run(run_dir, point.get("output_dir"))
    if rep.summarize_run(data).status != rep.COMPLETED:
        return None
    return run_sample(data.steps_by_rank)


@task(
    klass=LaunchTask,
    short_flags=SHORT_FLAGS,
    iterable=["channels", "threads", "axis", "override", "env", "hosts", "point_override"],
    help=TUNE_HELP,
)
def tune(c, channels=None, threads=None, axis=None, budget=None, max_runs=3, resume=None, fail_fast=False,
         point_timeout=None, point_override=None, pool=True, nproc=None, config=None, rocprof=False,
         stats=False, rocprof_input=None, nsys=False, torch_profile=False, master_port=None, nccl_preset=None,
         override=None, env=None, docker=False, no_docker=False, force=False, pin_channels=True,
         hang_timeout=None, hosts=None, entry=None, metric=None, export=None, export_preset=None, pick=None):
    """Search the grid for its best point in far fewer runs than a sweep; report, decide, export.

    fab tune -c 2,4,8,16,32,64 -t 64,128,256,512 --axis NCCL_PROTO=Simple,LL128 [--budget 40]
    fab tune --resume experiments/sweep_<ts>
    """
    console = make_console(soft_wrap=True)
    if docker and no_docker:
        raise Exit("tune: --docker and --no-docker contradict each other; give one", code=EXIT_USAGE)
    budget_runs, budget_s = parse_budget(budget)
    try:
        runs_cap = int(max_runs)
        if not 1 <= runs_cap <= 20:
            raise ValueError
    except ValueError:
        raise Exit(f"tune: --max-runs {max_runs!r}: give 1 to 20", code=EXIT_USAGE) from None
    limit = parse_point_timeout(point_timeout)
    given = launch_flags_record(
        nproc=nproc, config=config, rocprof=rocprof, stats=stats, rocprof_input=rocprof_input,
        nsys=nsys, torch_profile=torch_profile, master_port=master_port, nccl_preset=nccl_preset,
        override=override, env=env, docker=True if docker else (False if no_docker else None),
        force=force, pin_channels=pin_channels, hang_timeout=hang_timeout, hosts=hosts,
        point_override=point_override, entry=entry, metric=metric)
    secrets = load_settings(c).launch.secret_env_patterns
    try:
        plan = plan_sweep(given, channels, threads, resume, secrets, axis=axis, seed=0 if not resume else None)
    except sw.SweepError as err:
        raise Exit(f"tune: {err}", code=EXIT_USAGE) from None
    if plan.document is not None and plan.document.get("kind") != "tune":
        raise Exit(f"tune: {plan.sweep_dir} is a sweep, not a tune; finish it with fab sweep --resume",
                   code=EXIT_USAGE)
    for warning in plan.warnings:
        console.out(f"tune: warning: {warning}", highlight=False)
    sizes, config_of, labels, names = grid_index(plan)
    if plan.document is not None:
        runs_cap = int(plan.document["grid"].get("max_runs") or runs_cap)   # the resumed search's own
    grid_runs = len(config_of) * runs_cap
    use_pool, why_not = sweep_mode(pool, plan.flags_record, plan.document)
    document, sweep_dir = plan.document, plan.sweep_dir
    grid_point = {point: plan.points[index] for point, index in config_of.items()}
    search = Search(sizes, max_runs=runs_cap, labels=labels, names=names,
                    point_name=lambda p: grid_point[p].label, seed_name=lambda p: selector(grid_point[p]))
    started = time.monotonic()
    status, runner, ran, shown, stopped = sw.SWEEP_COMPLETED, None, 0, 0, None
    with ClusterSession(c, plan.flags_record.get("hosts") or None) as session:
        config_specs = resolve_config_specs(session, plan, c.config)
        if document is None:
            sweep_dir = create_sweep_dir(project_path(session.settings.cluster.experiments_dir), datetime.now())
            document = new_document(plan, sweep_dir.name, session, secrets, fail_fast, use_pool, kind="tune")
            document.update(points=[], order=[], point_timeout=limit)
            document["grid"].update(repeat=1, order="search", max_runs=runs_cap)
            write_sweep(sweep_dir, document)
        assert sweep_dir is not None
        console.out(f"tune: {sweep_dir} ({len(config_of)} points; the full grid at {runs_cap} runs each "
                    f"would be {grid_runs} runs" + (f"; budget {budget}" if budget else "") + ")", highlight=False)
        console.out(mode_line(use_pool, why_not, document, "tune"), highlight=False)
        options = dict(fail_fast=fail_fast or bool(document.get("fail_fast")),
                       point_timeout=limit if limit is not None else document.get("point_timeout"))
        while batch := search.next_batch():
            shown = print_messages(console, search, shown)
            requests = requests_of(search, batch)
            indexes = [find_or_add_run(document, config_of[p], k) for p, k in requests]
            pending = [i for i, (p, _) in zip(indexes, requests)
                       if measured(sweep_dir, document["points"][i]) is None]
            stopped = budget_stop(budget_runs, budget_s, ran, len(pending), started)
            if stopped:
                break
            if pending:
                write_sweep(sweep_dir, document)
                status, runner = run_runs(session, sweep_dir, document, config_specs, console,
                                          pool_order(document, pending), options, use_pool)
                ran += len(pending)
                if status == sw.SWEEP_INTERRUPTED or runner.aborted_reason:
                    break
            for (point, _), index in zip(requests, indexes):
                sample = measured(sweep_dir, document["points"][index])
                if sample is None:
                    search.fail(point)
                else:
                    search.observe(point, sample)
        print_messages(console, search, shown)
        document["status"] = status if status != sw.SWEEP_COMPLETED else sw.sweep_status(document)
        document["tune"] = {"runs": search.runs_done, "ran_now": ran, "grid_runs": grid_runs,
                            "stopped": stopped, "messages": search.messages}
        write_sweep(sweep_dir, document)
    console.out(f"tune: {search.runs_done} runs ({search.runs_done / grid_runs:.0%} of the full grid's "
                f"{grid_runs})" + (f"; stopped: {stopped}" if stopped else ""), highlight=False)
    print_dead_time(console, document)
    from tasks.lib.report.cli import print_report, write_exports
    from tasks.lib.report.outputs import write_report

    result = write_report(sweep_dir)
    print_report(console, result)
    if status != sw.SWEEP_INTERRUPTED and (export or export_preset or pick):
        write_exports(console, result, cli_path(export) if export else None, export_preset, pick)
    raise_for_status(document["status"], runner, document, sweep_dir, command="tune")


def requests_of(search: Search, batch: Sequence[Point]) -> list[tuple[Point, int]]:
    """The batch as (point, repeat) pairs: a point listed twice needs its next two repeats."""
    seen: Counter[Point] = Counter()
    requests = []
    for point in batch:
        requests.append((point, len(search.runs.get(point, [])) + seen[point]))
        seen[point] += 1
    return requests


def pool_order(document: dict[str, Any], indexes: list[int]) -> list[int]:
    """The batch's runs with each pool's together (threads and axis values), channels in order."""
    points = document["points"]
    return sorted(indexes, key=lambda i: (design._sortable(design.restart_key(sw.point_of(points[i]))),
                                          points[i]["repeat"], points[i]["channels"]))


def budget_stop(budget_runs: int | None, budget_s: float | None, ran: int, wanted: int,
                started: float) -> str | None:
    if budget_runs is not None and ran + wanted > budget_runs:
        return f"--budget {budget_runs} runs reached ({ran} run, the next round needs {wanted})"
    if budget_s is not None and time.monotonic() - started > budget_s:
        return f"--budget {budget_s / 60:.3g} min reached"
    return None


def print_messages(console: Any, search: Search, shown: int) -> int:
    for message in search.messages[shown:]:
        console.out(f"tune: {message}", highlight=False)
    return len(search.messages)


ns = Collection(tune)
