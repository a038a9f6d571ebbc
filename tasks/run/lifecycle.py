"""One attached run's life at the controller, from the probe to the report: probe every host,
prove the rendezvous, refuse a busy cluster, render and push the bundle, start the node
launchers, watch them (tasks/run/watch.py), then collect, blame, record run.json and write the
run's report. `fab launch` runs one; `fab sweep` and `fab tune` run one per point or pool.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tasks.lib.blame import pin_on_flight_recorder
from tasks.lib.diagnostics import flight_recorder_findings, read_flight_dumps
from tasks.lib.probe import gpu_busy_message
from tasks.lib.report.outputs import write_report
from tasks.lib.runrecord import HEADLINE_METRICS, headline_metrics, now_iso
from tasks.lib.runspec import RunSpec
from tasks.lib import untrusted
from tasks.cluster.node_errors import describe_error
from tasks.cluster.session import ClusterSession, project_path
from tasks.run.collecting import collect_outputs, record_collection, refusal_lines
from tasks.run.plan import COMPOSE_FILE, ENV_SCRIPT, Plan, build_plan, pick_run_id, write_record
from tasks.run.startup import (
    EXIT_DETACHED,
    EXIT_FAILED,
    EXIT_HUNG,
    check_facts,
    check_profiler,
    probe_cluster,
    prove_rendezvous,
    push_bundle,
    refuse_if_busy,
    start_launchers,
)
from tasks.run.watch import Watcher


def entry_line(spec: RunSpec) -> str:
    """The launch's first line: what every rank runs (after torchrun's own options)."""
    if spec.entry is None:
        return f"entry: {spec.entry_display}"
    return f"entry: {spec.entry.describe()}"


def print_summary(console: Console, plan: Plan, watcher: Watcher | None) -> None:
    table = Table(title=f"run {plan.run_id}", title_justify="left")
    for column in ("node", "host", "status", "exit", "steps", "duration"):
        table.add_column(column)
    for node in plan.record.nodes:
        duration = "-"
        if watcher is not None:
            watch = watcher.watches[node.node_rank]
            if watch.ended_at is not None:
                duration = f"{watch.ended_at - watch.started:.1f} s"
        steps = "-" if node.steps_done is None else f"{node.steps_done}" + (
            f"/{node.steps_total}" if node.steps_total else "")
        table.add_row(str(node.node_rank), node.host, node.state,
                      "-" if node.exit_code is None else str(node.exit_code), steps, duration)
    console.print(table)
    headline = plan.record.headline
    if headline:
        metrics = Table(title="headline (median over measured steps and ranks)",
                        title_justify="left")
        metrics.add_column("metric")
        metrics.add_column("value", justify="right")
        for key, label in HEADLINE_METRICS:
            value = headline.get(key)
            metrics.add_row(label, "-" if value is None else f"{value:.4g}")
        steps_per_s = headline.get("steps_per_s")
        metrics.add_row("steps/s", "-" if steps_per_s is None else f"{steps_per_s:.4g}")
        console.print(metrics)
    failure = plan.record.first_failure
    if failure is not None:
        console.out(f"first failure: node {failure.node_rank} ({failure.host}), ranks "
                    f"{failure.ranks}: {failure.reason}", highlight=False)
        if failure.basis and failure.basis not in ("own failure", "first sign"):
            console.out(f"  blamed by {failure.basis}: {'; '.join(failure.evidence[:4])}",
                        highlight=False)
        for line in failure.consequences[:6]:
            console.out(f"  consequence: {line}", highlight=False)
        if len(failure.consequences) > 6:
            console.out(f"  ... and {len(failure.consequences) - 6} more consequence(s) in "
                        "run.json", highlight=False)
        for line in failure.last_lines[-10:]:
            console.out(f"  | {untrusted.terminal_text(line)}", highlight=False)
    console.out(f"run dir: {plan.run_dir}", highlight=False)


def finish(session: ClusterSession, plan: Plan, watcher: Watcher, status: str,
           console: Console, clock: PhaseClock) -> int:
    record = plan.record
    for watch in watcher.watches:
        node = record.node(watch.rank)
        node.steps_done, node.steps_total = watch.steps_done, watch.steps_total
        record.mark_node_ended(watch.rank, state=watch.state or "lost", exit_code=watch.exit_code,
                               at=now_iso())
    # A lost node does not answer: asking it again would only add a timeout per node.
    lost = [node for node in session.nodes if record.node(node.index).state == "lost"]
    collected = collect_outputs(session, plan.output_dir, plan.run_dir / plan.spec.output_dir_name,
                                nodes=[node for node in session.nodes if node not in lost])
    # A node that failed early may never have made its output directory: run.json says so, and
    # the launch ends as the run did.
    record_collection(record, collected)
    for node, error in sorted(collected.failed.items(), key=lambda item: item[0].index):
        console.out(f"launch: collecting outputs of node {node.index} ({node.label}) failed: "
                    f"{describe_error(error, node)}", highlight=False)
    for line in refusal_lines(collected):
        console.out(f"launch: collecting outputs of {line}", highlight=False)
    for node in lost:
        record.node(node.index).collect_error = "not collected: the node was lost"
        console.out(f"launch: node {node.index} ({node.label}) was lost: its outputs stay there; "
                    f"once it answers: fab collect --run {plan.run_id}", highlight=False)
    clock.mark("collect")
    dumps = read_flight_dumps(plan.run_dir)
    pin_on_flight_recorder(record, flight_recorder_findings(dumps) if dumps else None, status,
                           now_iso())
    summary_path = plan.run_dir / plan.spec.output_dir_name / "summary.json"
    if summary_path.is_file():
        # The nodes wrote it: bounded and checked (tasks/lib/untrusted.py); a summary that
        # cannot be read costs the headline, never run.json's end.
        try:
            summary = untrusted.read_json(summary_path)
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
            record.headline = headline_metrics(summary)
        except (OSError, ValueError) as err:
            console.out(f"launch: {summary_path.name} from the nodes is unreadable "
                        f"({str(err)[:200]}); no headline", highlight=False)
    code = {"succeeded": 0, "hung": EXIT_HUNG}.get(status, EXIT_FAILED)
    record.finish(status=status, exit_status=code, at=now_iso())
    clock.mark("finish")
    write_record(plan)
    print_summary(console, plan, watcher)
    if status == "hung" and record.hang and record.hang.get("startup"):
        console.out(f"run stuck in start-up: {record.hang['startup'].get('headline')}; "
                    f"diagnostics in {plan.run_dir / 'hang'}/", highlight=False)
    elif status == "hung" and record.hang:
        console.out(f"run hung: rank(s) {record.hang.get('first_stalled_ranks')} stopped advancing "
                    f"first; diagnostics in {plan.run_dir / 'hang'}/", highlight=False)
    write_run_report(plan, console)
    # run.json is final before the report reads it; the report's own time is added after.
    clock.mark("report")
    write_record(plan)
    return code


def write_run_report(plan: Plan, console: Console) -> None:
    """results.csv, report.md and plots next to run.json (tasks/lib/report/outputs.py). A report problem is
    reported, never the launch's failure: the run itself is over and recorded."""
    try:
        result = write_report(plan.run_dir)
        console.out(f"report: {plan.run_dir / 'report.md'} ({len(result.files)} file(s))",
                    highlight=False)
    except Exception as err:  # noqa: BLE001 - see the docstring
        console.out(f"launch: no report written ({type(err).__name__}: {err}); "
                    f"`fab report {plan.run_dir}` retries", highlight=False)


def detach_message(run_id: str) -> str:
    return (f"run {run_id} goes on without this controller.\n"
            f"  follow: fab logs --follow --run {run_id}\n"
            f"  status: fab status\n"
            f"  stop:   fab stop --run {run_id}\n"
            f"  outputs (separate filesystems): fab collect --run {run_id}")


@dataclass
class RunOutcome:
    """What run_launch got to, filled in as it goes: the caller (fab sweep) still knows which run
    it started when Ctrl-C or an Exit ends the call half-way."""

    run_id: str | None = None     # set as soon as the run id is chosen (before any push)
    run_dir: Path | None = None   # the controller's run directory
    started: bool = False         # at least one node launcher was started
    status: str | None = None     # run.json's final status: succeeded|failed|stopped|hung|detached
    exit_code: int | None = None  # what run_launch returned


class PhaseClock:
    """Seconds spent in each launch phase, for run.json (and docs/PERFORMANCE.md)."""

    def __init__(self, started: float):
        self.last = started
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.monotonic()
        self.phases[phase] = round(now - self.last, 3)
        self.last = now


def run_launch(session: ClusterSession, spec: RunSpec, console: Console,
               outcome: RunOutcome | None = None, started: float | None = None) -> int:
    """Probe, start and (unless detached) watch one run; the launch's exit status."""
    outcome = outcome if outcome is not None else RunOutcome()
    code = _run_launch(session, spec, console, outcome, started or time.monotonic())
    outcome.exit_code = code
    return code


def _run_launch(session: ClusterSession, spec: RunSpec, console: Console, outcome: RunOutcome,
                started: float) -> int:
    clock = PhaseClock(started)
    clock.mark("validate")
    console.out(entry_line(spec), highlight=False)
    for warning in spec.warnings:
        console.out(f"warning: {warning}", highlight=False)
    facts, port = probe_cluster(session, spec)
    check_profiler(session, spec)  # before the GPU checks: a missing profiler is named per host
    nproc, ifnames, master_addr = check_facts(session, spec, facts)
    for f in facts:  # another user's job on our GPUs is theirs: named, never counted as ours
        busy = gpu_busy_message(f)
        if busy:
            console.out(f"warning: node {f.node_index} ({f.label}): {busy}", highlight=False)
    clock.mark("probe")
    port = prove_rendezvous(session, spec, facts, port, console)
    clock.mark("rendezvous")
    refuse_if_busy(session, spec.force, console)
    clock.mark("busy_check")

    experiments_dir = project_path(session.settings.cluster.experiments_dir)
    started_wall = datetime.now()
    run_id = pick_run_id(spec, experiments_dir, started_wall, create=True)
    run_dir = experiments_dir / run_id
    outcome.run_id, outcome.run_dir = run_id, run_dir
    plan = build_plan(session, spec, run_id=run_id, run_dir=run_dir, nproc=nproc,
                      master_addr=master_addr, master_port=port, ifnames=ifnames, facts=facts)
    plan.started_wall = started_wall
    plan.record.timings = clock.phases
    for name in (ENV_SCRIPT, COMPOSE_FILE):
        if name in plan.files:
            (run_dir / name).write_text(plan.shown(name))
    write_record(plan)
    clock.mark("render")
    phase = "push"
    try:
        push_bundle(session, plan)
        clock.mark("push")
        phase = "start"
        pids = start_launchers(session, plan)
    except BaseException as err:
        # run.json exists: it must not stay "rendered" (the report would show it running).
        fail_record(plan, phase, err)
        outcome.status = plan.record.status
        raise
    outcome.started = True
    clock.mark("start")
    at = now_iso()
    for rank, pid in pids.items():
        plan.record.mark_started(rank, pid, at)
    if spec.detach:
        plan.record.status = "detached"
    write_record(plan)
    console.out(f"launch: {run_id}: {len(session.nodes)} node(s) x {nproc} rank(s), master "
                f"{master_addr}:{port}, {'docker' if spec.docker else 'bare'}, via "
                f"{session.transport.describe()}", highlight=False)
    if spec.detach:
        outcome.status = "detached"
        console.out(detach_message(run_id), highlight=False)
        return 0

    watcher = Watcher(session, plan, pids, console)
    try:
        watcher.start_tails()
        status = watcher.wait()
    except KeyboardInterrupt:
        plan.record.status = outcome.status = "detached"
        write_record(plan)
        console.out(f"\nlaunch: detached (Ctrl-C). {detach_message(run_id)}", highlight=False)
        return EXIT_DETACHED
    finally:
        watcher.close()
    clock.mark("watch")
    code = finish(session, plan, watcher, status, console, clock)
    outcome.status = plan.record.status
    return code


def fail_record(plan: Plan, phase: str, error: BaseException) -> None:
    """Finish run.json as failed in `phase` (the per-host lines when the phase recorded them)."""
    record = plan.record
    if record.first_failure is None:
        detail = "interrupted (Ctrl-C)" if isinstance(error, KeyboardInterrupt) else (
            str(getattr(error, "message", "") or error) or type(error).__name__)
        record.record_phase_failure(phase, {}, at=now_iso(), detail=detail)
    record.finish(status="failed", exit_status=EXIT_FAILED, at=now_iso())
    write_record(plan)
