"""`fab launch`: validate, probe, render, push, start, watch, fail fast, collect, summarise.

The task is a thin sequence over pure helpers (tasks/lib/runspec.py decides every value,
tasks/lib/runrecord.py keeps run.json); what is left here is talking to the nodes. Order matters:
every flag and file is checked before any host is contacted, and every host is probed (one round
trip each, in parallel) before anything is written to one.

Exit status: 0 the run succeeded; 1 it failed or was stopped (run.json says which node failed
first) or a host could not be reached; 2 bad flags, config or cluster state (nothing started);
3 refused: a run is already active on one of the hosts (--force launches anyway); 4 the run hung
(no rank advanced for --hang-timeout seconds: diagnostics in <run dir>/hang/, then stopped);
130 Ctrl-C detached the controller (the run goes on: `fab logs --follow`, `fab stop`).
"""
from __future__ import annotations

import os
import posixpath
import time
from time import monotonic  # launch() has a --time flag
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from invoke import Collection, Task, task
from invoke.exceptions import Exit
from rich.console import Console
from rich.table import Table

from tasks.collect import collect_outputs, record_collection, refusal_lines
from tasks.lib.blame import pin_on_flight_recorder
from tasks.lib.console import make_console
from tasks.lib.diagnostics import flight_recorder_findings, read_flight_dumps
from tasks.lib.probe import gpu_busy_message
from tasks.lib.profiling import profiler_wrapper_argv
from tasks.lib.quoting import sh_join
from tasks.lib.runrecord import HEADLINE_METRICS, headline_metrics, now_iso
from tasks.lib.runspec import LaunchFlags, RunSpec
from tasks.lib import untrusted
from tasks.cluster.node_errors import describe_error
from tasks.run.plan import (
    COMPOSE_FILE,
    ENV_SCRIPT,
    NODE_LAUNCHER,
    Plan,
    abbreviate_script,
    build_plan,
    bundle_for,
    launcher_start,
    pick_run_id,
    resolve_spec,
    write_record,
)
from tasks.report import write_report
from tasks.cluster.session import EXIT_USAGE, ClusterSession, project_path
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
from tasks.run.submit import submit_and_follow
from tasks.run.watch import Watcher, node_log_path, tail_command

SHORT_FLAGS = {"channels": "c", "threads": "t", "nproc": "p", "config": "C", "rocprof": "r",
               "stats": "m"}


class LaunchTask(Task):
    """A Task whose short flags are chosen, not derived: -c/-t/-p/-r/-m as in the scripts we
    replace, -C for --config (-f is fab's own --config, so the original's -f would confuse)."""

    def __init__(self, *args: Any, short_flags: Mapping[str, str] | None = None, **kwargs: Any):
        self.short_flags = dict(short_flags or {})
        kwargs["auto_shortflags"] = False
        super().__init__(*args, **kwargs)

    def arg_opts(self, name: str, default: str, taken_names: set[str]) -> dict[str, Any]:
        opts = super().arg_opts(name, default, taken_names)
        short = self.short_flags.get(name)
        if short and short not in taken_names:
            opts["names"] = [*opts["names"], short]
        return opts


# -- dry run ---------------------------------------------------------------------------------------

def print_dry_run(session: ClusterSession, spec: RunSpec, console: Console) -> None:
    """Print what would be pushed and run on each host, contacting none of them."""
    settings = session.settings
    experiments_dir = project_path(settings.cluster.experiments_dir)
    run_id = pick_run_id(spec, experiments_dir, datetime.now(), create=False)
    master = session.inventory.master
    master_addr = "127.0.0.1" if master.local else master.host
    socket_ifname = settings.cluster.socket_ifname
    ifnames = [socket_ifname or ("lo" if node.is_local else "<route to master>")
               for node in session.nodes]
    nproc = spec.nproc if spec.nproc != "auto" else "<GPUs per node>"
    port = spec.master_port or "<free port>"
    plan = build_plan(session, spec, run_id=run_id, run_dir=experiments_dir / run_id, nproc=nproc,
                      master_addr=master_addr, master_port=port, ifnames=ifnames, facts=None)
    out = console.out
    out(entry_line(spec))
    out(f"dry run of {run_id}: no host contacted, nothing written.")
    out("assumed (the probe decides at launch time):")
    out(f"  master address: {master_addr} (node 0's address on its interface toward the workers)")
    out(f"  socket interface per host: {socket_ifname or 'the one routing to the master'}")
    out(f"  ranks per node: {nproc}; master port: {port}; accelerator: {spec.accelerator}; "
        f"docker: {'on' if spec.docker else 'off'}")
    registry = settings.cluster.registry_dir or "/tmp/gemm-runs-<uid> of the user on each host"
    out(f"  run registry: {registry}")
    out(f"transport: {session.transport.describe()}")
    for warning in spec.warnings:
        out(f"warning: {warning}")
    out(f"controller run dir: {plan.run_dir}")
    for node in session.nodes:
        where = ", this machine, no SSH" if node.is_local else ""
        out(f"\nnode {node.index} ({node.label}{where}):")
        out(f"  push to {plan.node_run_dir}/:")
        for path, content in sorted(bundle_for(plan).items()):
            out(f"    {posixpath.relpath(path, plan.node_run_dir)} ({len(content)} bytes)")
        out(f"    {NODE_LAUNCHER} ({len(plan.launcher)} bytes)")
        out("  run:")
        out("    probe: sh -c <tasks/lib/probe.py probe_script> (GPUs, interface, checkout)")
        start = session.transport.start_command(launcher_start(session, plan), node)
        out(f"    start: {abbreviate_script(start)}")
        out(f"    watch: {tail_command(node_log_path(plan, node.index), '<launcher pid>')}")
        wrapper = profiler_wrapper_argv(plan.profilers, plan.output_dir, node_rank=node.index)
        argv = [*(wrapper or []), plan.torchrun[0], f"--node-rank={node.index}", *plan.torchrun[1:]]
        out(f"    ranks: {sh_join(argv)}")
    out(f"\n{ENV_SCRIPT}:")  # secret-looking values as *** (GEMM_MASKED_VARS names them)
    out(plan.shown(ENV_SCRIPT).rstrip("\n"))


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
    """results.csv, report.md and plots next to run.json (tasks/report.py). A report problem is
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


# -- the task --------------------------------------------------------------------------------------

@task(
    klass=LaunchTask,
    short_flags=SHORT_FLAGS,
    iterable=["override", "env", "hosts"],
    help={
        "channels": "NCCL channels, 1-64: NCCL_MIN/MAX_NCHANNELS (and NCCL_MIN/MAX_CTAS on CUDA). "
                    "Default: launch.channels, $CHANNELS, 28",
        "threads": "threads per block, 64/128/256/512: RCCL_THREADS_PER_BLOCK and NCCL_NTHREADS. "
                   "Default: launch.threads, $THREADS, 256",
        "nproc": "ranks per node, or 'auto' = the GPUs of each node. Default: launch.nproc, "
                 "$NPROC_PER_NODE, 8 (2 on CPU nodes)",
        "config": "train config YAML, validated before any host is contacted. Default: "
                  "launch.config, $CONFIG_FILE, config/multi_node/distributed_multinode.yaml "
                  "(cpu_tiny.yaml on CPU nodes)",
        "rocprof": "wrap torchrun in rocprofv3 (kernel trace into rocprof_traces/node_<rank>/)",
        "stats": "rocprofv3 kernel statistics (implies --rocprof)",
        "rocprof_input": "rocprofv3 input file (yaml/json; implies --rocprof), pushed with the run",
        "nsys": "wrap torchrun in Nsight Systems (CUDA nodes; reports into nsys/node_<rank>)",
        "torch_profile": "turn on the train package's torch profiler (traces in torch_profiler/)",
        "hang_timeout": "seconds without progress of any rank before diagnostics and a stop "
                        "(default: launch.hang_timeout if set, else 0.8 x distributed.timeout_s, "
                        "at most 600, tightened to 10 x the slowest step once steps arrive; 0: off)",
        "master_port": "rendezvous port on node 0, checked free there; 'auto' (default) picks one",
        "nccl_preset": "NCCL settings from config/nccl/<name>.yaml: ib, ethernet, debug",
        "override": "train config override section.key=value (repeatable), "
                    "e.g. training.max_steps=50",
        "env": "extra variable KEY=VALUE for every rank (repeatable); the value arrives "
               "literally. KEY alone takes KEY's value from this environment (keeps a secret "
               "out of the command line, which ps shows to every user)",
        "docker": "run the ranks in the experiment container (fab docker-up) on every node",
        "no_docker": "run the ranks bare on every node (activating cluster.venv)",
        "detach": "return right after the start, printing the run id (fab logs/status/stop)",
        "dry_run": "print, per host, the files it would push and the commands; contact no host",
        "force": "launch even while another run is active on one of the hosts",
        "pin_channels": "pin channels (min = max); --no-pin-channels sets only the maxima",
        "hosts": "hosts for this run, master first (comma-separated or repeated); "
                 "default: the inventory",
        "slurm": "outside an allocation: submit this launch as a Slurm batch job (sbatch), print "
                 "its id and follow it (Ctrl-C stops following); inside, it runs as an srun step",
        "partition": "with --slurm: the partition (sbatch --partition)",
        "time": "with --slurm: the time limit (sbatch --time, e.g. 30 or 1:00:00)",
        "account": "with --slurm: the account to charge (sbatch --account)",
        "nodes": "with --slurm: nodes to allocate (default: the inventory's host count)",
        "entry": "run your own training instead of the GEMM experiment: what you would type "
                 "after torchrun, quoted as one value: --entry \"train.py --config my.yaml\" "
                 "or --entry \"-m pkg.train --lr 3e-4\" (default: launch.entry). A script "
                 "outside this checkout is pushed with its directory; the ranks start there",
        "metric": "the objective of an --entry run for reports and sweeps: trace (step time of "
                  "its PyTorch profiler traces), json:FIELD or a regex with one group in its "
                  "ranks' output lines; max: first when higher is better (default: launch.metric)",
    },
)
def launch(c, channels=None, threads=None, nproc=None, config=None, rocprof=False, stats=False,
           rocprof_input=None, nsys=False, torch_profile=False, master_port=None,
           nccl_preset=None, override=None, env=None, docker=False, no_docker=False,
           detach=False, dry_run=False, force=False, pin_channels=True, hang_timeout=None,
           hosts=None, slurm=False, partition=None, time=None, account=None, nodes=None,
           entry=None, metric=None):
    """Run the GEMM training on every node: validate, probe, push, start, watch, collect.

    With no inventory this machine alone runs it, without SSH (GPU if present, else 2 CPU ranks
    with gloo and config/multi_node/cpu_tiny.yaml). Ctrl-C detaches; the run goes on.
    """
    if docker and no_docker:
        raise Exit("launch: --docker and --no-docker contradict each other; give one",
                   code=EXIT_USAGE)
    console = make_console(soft_wrap=True)
    flags = LaunchFlags(
        channels=channels, threads=threads, nproc=nproc, config=config, master_port=master_port,
        nccl_preset=nccl_preset, overrides=tuple(override or ()), env=tuple(env or ()),
        docker=True if docker else (False if no_docker else None), rocprof=rocprof, stats=stats,
        rocprof_input=rocprof_input, nsys=nsys, torch_profile=torch_profile,
        hang_timeout=hang_timeout, pin_channels=pin_channels, detach=detach, dry_run=dry_run,
        force=force, entry=entry, metric=metric)
    started = monotonic()
    if not slurm and any(v is not None for v in (partition, time, account, nodes)):
        raise Exit("launch: --partition, --time, --account and --nodes go with --slurm",
                   code=EXIT_USAGE)
    with ClusterSession(c, hosts) as session:  # no host is contacted until the probe
        spec = resolve_spec(session, flags, c.config, os.environ)
        if slurm:  # validated above, like any launch; the batch job runs it
            code = submit_and_follow(
                nodes=nodes, partition=partition, time_limit=time, account=account,
                default_nodes=0 if session.inventory.is_local else len(session.nodes),
                experiments_dir=project_path(session.settings.cluster.experiments_dir),
                dry_run=spec.dry_run, console=console,
                secret_patterns=session.settings.launch.secret_env_patterns)
            if code:
                raise Exit(code=code)
            return
        if spec.dry_run:
            print_dry_run(session, spec, console)
            return
        code = run_launch(session, spec, console, started=started)
    if code:
        raise Exit(code=code)


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


ns = Collection(launch)
