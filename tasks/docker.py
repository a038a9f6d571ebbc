"""The experiment container on every node: docker-up, docker-down, docker-status.

The compose file is rendered on the controller (tasks.lib.render), pushed to each node at
<registry>/docker/docker-compose.yaml (node-local; the registry is cluster.registry_dir or our
per-user /tmp/gemm-runs-<uid>, ours alone), checked again right before `docker compose -f` reads
it (tasks/lib/nodefs.py: compose runs what the file says, as root) and driven with `docker compose`
or, where the v2 plugin is missing, `docker-compose` v1, detected per host. The compose project
is named after the container, so up, down and launch agree on it from any controller.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.table import Table

from tasks.cluster.preflight import probe_all, require_matching_checkout
from tasks.lib.console import make_console
from tasks.lib.containers import (
    TERMINAL_STATES,
    ContainerState,
    DockerProbe,
    compose_file_path,
    compose_up_failure,
    docker_message,
    down_script,
    format_uptime,
    inspect_script,
    parse_inspect,
    parse_probe,
    probe_script,
    up_outcome,
)
from tasks.lib.nodefs import checked_file_command, registry_for_uid, with_safe_fs
from tasks.lib.probe import HostFacts
from tasks.lib.quoting import sh_command, sh_quote
from tasks.lib.render import compose_command, compose_project_name, render_compose
from tasks.cluster.node_errors import NodeError
from tasks.cluster.nodes import Node, NodeResults, on_each
from tasks.cluster.session import EXIT_USAGE, HOSTS_HELP, ClusterSession

POLL_INTERVAL_S = 0.5


class DockerError(NodeError):
    """Docker on one host said no; the message is docker's own, shortened to its point."""


@dataclass(frozen=True)
class UpResult:
    compose: str
    outcome: str             # created | started | recreated | already running
    state: ContainerState


@dataclass(frozen=True)
class DownResult:
    outcome: str             # removed | not present


def _probe(node: Node, container: str, compose_file: str) -> DockerProbe:
    output = node.run(sh_command(probe_script(container, compose_file))).stdout
    probe = parse_probe(output)
    if probe.engine is None:
        raise DockerError(f"Docker engine not usable: {probe.engine_error}")
    return probe


def _compose_argv(variant: str) -> list[str]:
    try:
        return compose_command(variant)
    except ValueError as err:
        raise DockerError(str(err)) from None


def _inspect(node: Node, container: str) -> ContainerState:
    return parse_inspect(node.run(sh_command(inspect_script(container))).stdout)


def _wait_running(node: Node, container: str, wait_s: float) -> ContainerState:
    """Poll until the container runs; fail early once it has stopped for good."""
    deadline = time.monotonic() + wait_s
    while True:
        state = _inspect(node, container)
        if state.running:
            return state
        if state.status in TERMINAL_STATES or state.status == "absent":
            logs = node.run(f"docker logs --tail 5 {sh_quote(container)} 2>&1", warn=True).stdout
            detail = state.error or docker_message(logs)
            raise DockerError(f"container {container} is {state.status} (exit code "
                              f"{state.exit_code}) right after start: {detail}")
        if time.monotonic() >= deadline:
            raise DockerError(f"container {container} still {state.status} after {wait_s:g}s "
                              "(raise --wait, or see `docker logs` on that host)")
        time.sleep(POLL_INTERVAL_S)


def _facts_of(results: NodeResults[HostFacts], node: Node) -> HostFacts:
    """This node's preflight facts; its probe's failure is the node's failure."""
    if node in results.failed:
        raise results.failed[node]
    return results.ok[node]


def _up_on(node: Node, facts: HostFacts, *, registry: str, compose_text: str, project: str,
           container: str, image: str, workdir: str, wait_s: float) -> UpResult:
    if facts.docker_engine is None:
        raise DockerError("Docker engine not usable: "
                          f"{facts.docker_error or 'no answer from the Docker engine'}")
    if not facts.workdir_exists:
        # Docker would mount a fresh empty directory instead: the run would find no code.
        raise DockerError(f"workdir {workdir} does not exist on this host: run `fab sync` "
                          "or set cluster.workdir")
    compose_variant = facts.docker_compose or "none"
    compose = _compose_argv(compose_variant)
    before = ContainerState(facts.container_state or "unknown", id=facts.container_id or "")
    compose_file = compose_file_path(registry)
    # The registry and its docker/ made (0700) and checked ours alone before the file goes in.
    node.put_files({compose_file: compose_text}, dirs=[registry])
    argv = [*compose, "-p", project, "-f", compose_file, "up", "-d"]
    result = node.run(checked_file_command(compose_file, "the compose file", argv) + " 2>&1",
                      warn=True)
    if result.failed:
        message = compose_up_failure(result.stdout, image)
        if "already in use" in message:
            # A container of that name from elsewhere (another compose project, the old scripts).
            message += f" (remove it with `fab docker-down` or `docker rm -f {container}`)"
        raise DockerError(f"{' '.join(compose)} up -d: {message}")
    after = _wait_running(node, container, wait_s)
    return UpResult(compose_variant, up_outcome(before, after), after)


def _down_on(node: Node, *, compose_file: str, project: str, container: str) -> DownResult:
    probe = _probe(node, container, compose_file)
    # Without compose (uninstalled since docker-up) the container still goes, by name.
    compose = compose_command(probe.compose) if probe.compose in ("v1", "v2") else None
    result = node.run(with_safe_fs(down_script(compose, compose_file, project, container)),
                      warn=True)
    if result.failed:
        raise DockerError(f"compose down: {docker_message(result.stdout + result.stderr)}")
    after = _inspect(node, container)
    if after.status != "absent":
        raise DockerError(f"container {container} is still {after.status} after down")
    outcome = "removed" if probe.container.status != "absent" else "not present"
    notes = [line.removeprefix("note: ") for line in result.stdout.splitlines()
             if line.startswith("note: ")]
    return DownResult(outcome + (f" ({'; '.join(notes)})" if notes else ""))


# The reason follows the table, one line per host (NodeResults.raise_if_failed).
FAILED_CELL = "[red]FAILED[/red] (see below)"


def _status_table(columns: list[str]) -> Table:
    table = Table()
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _print(title: str, table: Table) -> None:
    console = make_console()
    console.print(title, highlight=False, markup=False)
    console.print(table)


@task(help={
    "hosts": HOSTS_HELP,
    "wait": "seconds to wait for the container to run on every host after `up -d` (default 60)",
})
def docker_up(c, hosts=None, wait=60):
    """Start the experiment container on every node (idempotent: a running one is left as is).

    Checks that every node's checkout matches this one, renders the compose file from the
    docker.* config, pushes it to <cluster.registry_dir>/docker/docker-compose.yaml on each node,
    runs `docker compose up -d` (or docker-compose v1) there and waits until the container runs.
    """
    with ClusterSession(c, hosts) as session:
        docker = session.settings.docker
        if not docker.enabled:
            raise Exit("docker.enabled is false: launches run bare, so there is no container to "
                       "start; set docker.enabled: true to use one", code=EXIT_USAGE)
        if wait <= 0:
            raise Exit(f"--wait must be positive seconds, got {wait}", code=EXIT_USAGE)
        project = compose_project_name(docker.container)
        registry_dir = session.settings.cluster.registry_dir

        def compose_for(registry: str) -> str:
            return render_compose(docker=docker, workdir=session.workdir, registry_dir=registry,
                                  project_name=project)

        try:
            compose_for(registry_for_uid(registry_dir, os.getuid()))  # bad config: no host touched
        except ValueError as err:
            raise Exit(f"config error: {err}", code=EXIT_USAGE) from None
        # One probe per host answers both: does its checkout match, and what does its Docker run.
        facts = probe_all(session, docker=True)
        require_matching_checkout(session, facts)
        registries: dict[int, str] = {}

        def up(node: Node) -> UpResult:
            host = _facts_of(facts, node)
            # Our uid there names our registry (the container mounts it at the same path).
            registry = registries[node.index] = (
                registry_for_uid(registry_dir, host.uid) if host.uid is not None
                else node.registry(registry_dir))
            return _up_on(node, host, registry=registry, compose_text=compose_for(registry),
                          project=project, container=docker.container, image=docker.image,
                          workdir=session.workdir, wait_s=float(wait))

        results: NodeResults[UpResult] = on_each(session.nodes, up)
        title = f"docker-up: container {docker.container} ({docker.image})"
        table = _status_table(["node", "host", "compose", "container", "result"])
        for node in session.nodes:
            if node in results.ok:
                up = results.ok[node]
                table.add_row(str(node.index), node.label, up.compose, up.state.short_id,
                              "[green]" + up.outcome + "[/green]")
            else:
                table.add_row(str(node.index), node.label, "", "", FAILED_CELL)
        _print(title, table)
        results.raise_if_failed("docker-up", hint="fix the host(s) above and run `fab docker-up` "
                                "again: hosts already up are left as they are")
        files = sorted({compose_file_path(registries[node.index]) for node in results.ok})
        print(f"container {docker.container} running on {len(results.ok)} of "
              f"{len(session.nodes)} host(s); compose file: {', '.join(files)}")


@task(help={"hosts": HOSTS_HELP})
def docker_down(c, hosts=None):
    """Stop and remove the experiment container on every node (`docker compose down`).

    Uses the compose file docker-up left on each node; a container of the configured name that
    compose does not know about (file gone with /tmp, started by hand) is removed too.
    """
    with ClusterSession(c, hosts) as session:
        docker = session.settings.docker
        project = compose_project_name(docker.container)
        registry_dir = session.settings.cluster.registry_dir
        results: NodeResults[DownResult] = on_each(session.nodes, lambda node: _down_on(
            node, compose_file=compose_file_path(node.registry(registry_dir)), project=project,
            container=docker.container))
        title = f"docker-down: container {docker.container}"
        table = _status_table(["node", "host", "result"])
        for node in session.nodes:
            if node in results.ok:
                table.add_row(str(node.index), node.label, results.ok[node].outcome)
            else:
                table.add_row(str(node.index), node.label, FAILED_CELL)
        _print(title, table)
        results.raise_if_failed("docker-down")


@task(help={"hosts": HOSTS_HELP})
def docker_status(c, hosts=None):
    """Show per node: Docker engine version, compose variant, container state, image, uptime.

    Exits non-zero only when a host does not answer (or its engine does not); a stopped or
    missing container is a state to show, not an error.
    """
    with ClusterSession(c, hosts) as session:
        docker = session.settings.docker
        registry_dir = session.settings.cluster.registry_dir
        results: NodeResults[DockerProbe] = on_each(session.nodes, lambda node: _probe(
            node, docker.container, compose_file_path(node.registry(registry_dir))))
        title = f"docker-status: container {docker.container}"
        table = _status_table(["node", "host", "engine", "compose", "container", "state", "image",
                               "uptime"])
        for node in session.nodes:
            if node not in results.ok:
                table.add_row(str(node.index), node.label, FAILED_CELL,
                              "", "", "", "", "")
                continue
            probe = results.ok[node]
            state = probe.container
            colour = "green" if state.running else "yellow"
            uptime = format_uptime(state.started_at) if state.running else "-"
            table.add_row(str(node.index), node.label, probe.engine or "-", probe.compose,
                          state.short_id or "-", f"[{colour}]{state.status}[/{colour}]",
                          state.image or "-", uptime)
        _print(title, table)
        running = sum(1 for probe in results.ok.values() if probe.container.running)
        print(f"container {docker.container} running on {running} of {len(session.nodes)} host(s)")
        results.raise_if_failed("docker-status")


__all__ = ["docker_up", "docker_down", "docker_status", "DockerError"]
ns = Collection(docker_up, docker_down, docker_status)
