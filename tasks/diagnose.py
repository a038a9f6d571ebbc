"""`fab diagnose`: what every process of a run is doing, from every host, without stopping it.

The collection is tasks/run/diagnosing.py's, which the launch's hang watchdog also runs before it
stops a hung run (into `<run dir>/hang/`, tasks/run/hangwatch.py).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from invoke import Collection, task
from invoke.exceptions import Exit

from tasks.lib.console import make_console
from tasks.lib.registry import RegistryError, validate_run_id
from tasks.lib.runrecord import RUN_JSON
from tasks.lib.settings import Settings
from tasks.cluster.session import EXIT_USAGE, ClusterSession, project_path
from tasks.run.diagnosing import collect_diagnostics, print_summary

ACTIVE_STATUSES = ("running", "detached", "starting")


# -- finding the run ------------------------------------------------------------------------------

def read_run_json(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / RUN_JSON).read_text())
    except (OSError, ValueError):
        return None


def latest_active_run(experiments: Path) -> str | None:
    """The newest run this controller knows as still running (by run.json)."""
    candidates = []
    for run_json in experiments.glob(f"*/{RUN_JSON}"):
        data = read_run_json(run_json.parent)
        if data and data.get("status") in ACTIVE_STATUSES:
            candidates.append((str(data.get("started_at") or data.get("created_at") or ""),
                               run_json.parent.name))
    return max(candidates)[1] if candidates else None


def active_run_from_registries(session: ClusterSession) -> str | None:
    """The newest active run in the nodes' registries (any controller's), when tasks.runs is here."""
    try:
        from tasks.runs import active_runs
    except ImportError:
        return None
    newest: tuple[str, str] | None = None
    for records in active_runs(session).values():
        for record in records:
            key = (str(record.started_at or ""), record.run_id)
            newest = key if newest is None or key > newest else newest
    return newest[1] if newest else None


def run_container(record: Mapping[str, Any] | None, settings: Settings) -> str | None:
    docker = (record or {}).get("flags", {}).get("docker")
    if docker is None:
        docker = settings.docker.enabled
    return settings.docker.container if docker else None


def checked_run_id(run_id: str, source: str = "--run") -> str:
    """The run id, or Exit(2): it names a directory here and is globbed on the nodes."""
    try:
        return validate_run_id(run_id)
    except RegistryError as err:
        raise Exit(f"{source}: {err}; give the run id (the run directory's name)",
                   code=EXIT_USAGE) from None


def expected_ranks(record: Mapping[str, Any] | None) -> list[int]:
    return list(range(int((record or {}).get("world_size") or 0)))


@task(help={
    "run": "run id (the run directory's name); default: the newest active run",
    "native": "include native (C/C++) frames in the py-spy dumps (default on; --no-native is faster)",
    "hosts": "comma-separated hosts instead of the configured inventory",
})
def diagnose(c, run=None, native=True, hosts=None):
    """Snapshot a run's processes on every host (stacks, GPU, logs, NCCL env); stops nothing.

    py-spy dumps of every process of the run (inside containers too), nvidia-smi/rocm-smi, the last
    lines of each node's log and the ranks' NCCL/TORCH_NCCL environment, written to
    <run dir>/diagnose_<timestamp>/, with a per-rank summary (step, innermost frames) printed.
    """
    console = make_console()
    if run is not None:
        checked_run_id(run)  # before any connection: a bad flag touches nothing
    with ClusterSession(c, hosts) as session:
        experiments = project_path(session.settings.cluster.experiments_dir)
        run_id = run or latest_active_run(experiments) or active_run_from_registries(session)
        if not run_id:
            raise Exit("no active run found (in run.json files or the nodes' registries); "
                       "name one with --run RUN_ID", code=EXIT_USAGE)
        checked_run_id(run_id, "the active run's id")
        run_dir = experiments / run_id
        record = read_run_json(run_dir)
        nodes = session.nodes
        if record and len(record.get("nodes") or []) not in (0, len(nodes)):
            console.print(f"[yellow]run.json lists {len(record['nodes'])} hosts, the inventory "
                          f"{len(nodes)}: diagnosing the inventory's[/yellow]")
        dest = run_dir / f"diagnose_{datetime.now():%Y%m%d_%H%M%S}"
        console.print(f"collecting diagnostics of {run_id} from {len(nodes)} host(s)...")
        summary = collect_diagnostics(session, run_id, dest, kind="diagnose",
                                      expected_ranks=expected_ranks(record),
                                      container=run_container(record, session.settings),
                                      native=native)
        print_summary(console, summary, dest)
        if not summary.ranks and not summary.node_errors:
            raise Exit(f"no process of run {run_id} found on any host (finished or not started?)",
                       code=1)
        if summary.node_errors and len(summary.node_errors) == len(nodes):
            raise Exit("diagnostics failed on every host", code=1)


ns = Collection(diagnose)
