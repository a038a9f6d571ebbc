"""Before a run starts: probe every host, judge the facts (as `fab check` does), refuse a busy
cluster, push the bundle, and start the node launchers through the session's transport
(tasks/cluster/transport.py: this machine, SSH or one srun job step).
"""

import random
from collections.abc import Sequence
from typing import Any

from invoke.exceptions import Exit
from rich.console import Console

from tasks.cluster.preflight import probe_all, require_matching_checkout
from tasks.cluster.rendezvous import check_rendezvous
from tasks.lib.ports import held_by
from tasks.lib.probe import CheckoutState, HostFacts, judge_cluster, judge_host
from tasks.lib.profiling import (
    missing_tools_message,
    parse_tool_check,
    profiler_output_dirs,
    required_tools,
    tool_check_command,
)
from tasks.lib.rendezvous import AUTO_PORT_RANGE, master_address
from tasks.lib.runrecord import now_iso
from tasks.lib.runspec import RunSpec, RunSpecError, resolve_nproc
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, NodeResults, on_each
from tasks.run.plan import Plan, bundle_for, launcher_path, launcher_start
from tasks.runs import active_runs, stop_run
from tasks.cluster.session import EXIT_USAGE, ClusterSession
from tasks.run.watch import FAIL_FAST_GRACE_S

EXIT_FAILED = 1
EXIT_BUSY = 3
EXIT_HUNG = 4
EXIT_DETACHED = 130

AUTO_PORT_TRIES = 5


# -- probe, checks, start --------------------------------------------------------------------------

def probe_cluster(session: ClusterSession, spec: RunSpec) -> tuple[list[HostFacts], int]:
    """Facts of every host (one round trip each, in parallel) and a master port free on node 0."""
    tries = 1 if spec.master_port else AUTO_PORT_TRIES
    port = spec.master_port or random.randint(*AUTO_PORT_RANGE)
    for _ in range(tries):
        results: NodeResults[HostFacts] = probe_all(session, master_port=port, docker=spec.docker)
        results.raise_if_failed("probe", code=EXIT_FAILED)
        facts = [results.ok[node] for node in session.nodes]
        if facts[0].port_free is not False:
            break
        if spec.master_port:
            raise Exit(f"launch: master port {port} is in use on {session.master.label}"
                       f"{held_by(facts[0].port_holders)}: pick another with --master-port "
                       "(or auto)", code=EXIT_USAGE)
        port = random.randint(*AUTO_PORT_RANGE)
    else:
        raise Exit(f"launch: no free master port found on {session.master.label} after "
                   f"{tries} tries in {AUTO_PORT_RANGE}; pass --master-port", code=EXIT_USAGE)
    require_matching_checkout(session, results)
    return facts, port


def launch_refusals(facts: Sequence[HostFacts], *, workdir: str, socket_ifname: str | None,
                    docker: bool, container: str) -> list[str]:
    """What `fab check` calls an error (probe.judge_host per host, judge_cluster across hosts),
    plus launch's own rule that a dockerized run needs its container running (check only warns).

    The checkout is not judged here: require_matching_checkout did that with the same facts (and
    on this machine alone there is nothing to compare). nproc is resolve_nproc's to judge.
    """
    problems: list[str] = []
    for f in facts:
        own_checkout = CheckoutState(f.branch, f.commit, f.dirty, f.tree_hash, f.diff_hash)
        problems += [finding.line().removeprefix("error: ")
                     for finding in judge_host(f, local=own_checkout, workdir=workdir, nproc="auto",
                                               docker_enabled=docker, socket_ifname=socket_ifname,
                                               compare_checkout=False)
                     if finding.is_error]
        if docker and f.docker_engine is not None and f.container_state != "running":
            problems.append(f"node {f.node_index} ({f.label}): container {container} is "
                            f"{f.container_state or 'unknown'}; run `fab docker-up`")
    problems += [finding.line().removeprefix("error: ")
                 for finding in judge_cluster(facts) if finding.is_error]
    return problems


def check_facts(session: ClusterSession, spec: RunSpec,
                facts: Sequence[HostFacts]) -> tuple[int, list[str], str]:
    """(ranks per node, interface per host, master address), or Exit 2 naming what is wrong."""
    socket_ifname = session.settings.cluster.socket_ifname
    problems = launch_refusals(facts, workdir=session.workdir, socket_ifname=socket_ifname,
                               docker=spec.docker,
                               container=session.settings.docker.container)
    ifnames = [socket_ifname or f.ifname or "" for f in facts]
    try:
        nproc = resolve_nproc(spec.nproc, {f"node {f.node_index} ({f.label})": f.gpu_count
                                           for f in facts}, spec.accelerator)
    except RunSpecError as err:
        problems.append(str(err))
        nproc = 0
    master = facts[0]
    master_addr = master_address(facts, socket_ifname)
    if session.inventory.is_local:
        master_addr = "127.0.0.1"  # one node: rendezvous never leaves this machine
    if not master_addr:
        problems.append(f"node 0 ({master.label}): no address found for the master")
    if problems:
        raise Exit("launch: refused before starting anything:\n  " + "\n  ".join(problems),
                   code=EXIT_USAGE)
    return nproc, ifnames, str(master_addr)


def prove_rendezvous(session: ClusterSession, spec: RunSpec, facts: Sequence[HostFacts],
                     port: int, console: Console) -> int:
    """Node 0 listens on the run's master port, every other node connects to it over the
    interfaces its ranks will use (tasks/cluster/rendezvous.py), before anything is pushed: a
    node cut off from the port is named with the address, port, interface and likely cause
    (Exit 2) instead of torchrun's agents waiting minutes for it. Returns the port proven (an
    auto port taken since the probe is replaced by another free one)."""
    container = session.settings.docker.container if spec.docker else None
    for _ in range(1 if spec.master_port else AUTO_PORT_TRIES):
        checked = check_rendezvous(session, facts, port, container=container)
        if checked is None:
            return port
        if not checked.busy or spec.master_port:
            break
        port = random.randint(*AUTO_PORT_RANGE)
    errors = [finding.line().removeprefix("error: ") for finding in checked.findings
              if finding.is_error]
    for finding in checked.findings:
        if not finding.is_error:
            console.out(finding.line(), highlight=False)
    if errors:
        raise Exit("launch: refused before starting anything: the rendezvous path is broken:\n  "
                   + "\n  ".join(errors), code=EXIT_USAGE)
    return port


def check_profiler(session: ClusterSession, spec: RunSpec) -> None:
    """Every profiler the flags ask for must exist where torchrun runs (in the container when
    dockerized), or nothing starts: one line per host that lacks one."""
    tools = required_tools(spec.profilers)
    if not tools:
        return
    container = session.settings.docker.container if spec.docker else None
    command = tool_check_command(tools, container=container)
    results = on_each(session.nodes, lambda node: node.run(command, timeout=30).stdout)
    results.raise_if_failed("profiler check", code=EXIT_FAILED)
    missing = {node.label: parse_tool_check(text, tools)
               for node, text in sorted(results.ok.items(), key=lambda item: item[0].index)}
    missing = {host: names for host, names in missing.items() if names}
    if missing:
        raise Exit(missing_tools_message(missing, container), code=EXIT_USAGE)


def refuse_if_busy(session: ClusterSession, force: bool, console: Console) -> None:
    active = {node: runs for node, runs in active_runs(session).items() if runs}
    if not active:
        return
    lines = [f"node {node.index} ({node.label}): run {', '.join(sorted({r.run_id for r in runs}))}"
             for node, runs in sorted(active.items(), key=lambda item: item[0].index)]
    if force:
        console.out("warning: --force: launching beside active run(s):\n  " + "\n  ".join(lines))
        return
    run_ids = sorted({r.run_id for runs in active.values() for r in runs})
    raise Exit("launch: a run is active on the cluster (two runs would share the GPUs and "
               "ports):\n  " + "\n  ".join(lines)
               + f"\nwait for it, stop it (fab stop --run {run_ids[0]}), or launch anyway with "
               "--force",
               code=EXIT_BUSY)


def push_bundle(session: ClusterSession, plan: Plan) -> None:
    """Every file to every node at once (one mkdir round trip and one SFTP session per node).
    The launcher needs no execute bit: it is started as `bash node_launcher.sh RANK`."""
    files = {**bundle_for(plan), launcher_path(plan): plan.launcher}
    # Profilers write where the ranks cannot create the directory first (nsys' report parent).
    dirs = [*profiler_output_dirs(plan.profilers, plan.output_dir), *plan.dirs]

    def push(node: Node) -> None:
        node.put_files(files, mode=0o600, dirs=dirs)

    results = on_each(session.nodes, push)
    record_host_failures(plan, "push", results)
    results.raise_if_failed("pushing the run bundle", code=EXIT_FAILED)


def record_host_failures(plan: Plan, phase: str, results: NodeResults[Any]) -> None:
    """run.json's first_failure for a phase that failed on some hosts (one line per host)."""
    if results.failed:
        plan.record.record_phase_failure(
            phase, {node.index: describe_error(error, node) for node, error in results.failed.items()},
            at=now_iso())


def start_launchers(session: ClusterSession, plan: Plan) -> dict[int, int]:
    """Start every node's launcher through the session's transport; node rank -> launcher pid."""
    results = session.transport.start_launchers(session.nodes, launcher_start(session, plan))
    if results.failed:
        record_host_failures(plan, "start", results)
        hint = ""
        if results.ok:  # never leave half a run waiting for peers that will not come
            hint = stop_after_failed_start(session, plan)
        results.raise_if_failed("starting the node launchers", code=EXIT_FAILED, hint=hint)
    return {node.index: pid for node, pid in results.ok.items()}


def stop_after_failed_start(session: ClusterSession, plan: Plan) -> str:
    """Stop the launchers that did start; what happened, for the error message (and run.json)."""
    try:
        stopped = stop_run(session, plan.run_id, FAIL_FAST_GRACE_S)
    except Exception as err:  # noqa: BLE001 - the start's failure is the error to report
        failed_lines = [f"stopping the started nodes failed: {err}"]
    else:
        failed_lines = [f"stopping node {node.index} ({node.label}) failed: "
                        f"{describe_error(error, node)}"
                        for node, error in sorted(stopped.failed.items(), key=lambda i: i[0].index)]
    if plan.record.first_failure is not None:
        plan.record.first_failure.last_lines.extend(failed_lines)
    if not failed_lines:
        return "the nodes that had started were stopped"
    return ("\n".join(failed_lines)
            + f"\nprocesses of the run may be left there: fab stop --run {plan.run_id}")


