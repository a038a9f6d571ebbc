"""`fab check`: preflight every node at once and say what would block a launch (the probe,
its judgement and its table are tasks/cluster/preflight.py's)."""

from __future__ import annotations

import time

from invoke import Collection, task
from invoke.exceptions import Exit

from tasks.lib.console import make_console
from tasks.cluster.preflight import describe_checkout, run_preflight
from tasks.cluster.session import HOSTS_HELP, ClusterSession


@task(help={"hosts": HOSTS_HELP})
def check(c, hosts=None):
    """Preflight every node at once: reachability, GPUs, route to the master, checkout, Docker.

    Exits non-zero when anything would block a launch (unreachable host, host key, checkout
    different from this one, too few GPUs for the launch's nproc, busy master port, a node that
    cannot connect to node 0's master port from the interface its ranks use, no Docker engine
    where launch would use it); warnings do not. nproc, the master port and Docker are
    what `fab launch` would use: launch.* config, else $NPROC_PER_NODE / $MASTER_PORT, else
    built-ins; Docker per docker.enabled, except on this machine alone, which runs bare.
    """
    started = time.monotonic()
    with ClusterSession(c, hosts=hosts) as session:
        console = make_console()
        findings = run_preflight(session, c.config, console, lambda local: (
            f"{len(session.nodes)} node(s) from {session.inventory.source}; "
            f"this checkout: {describe_checkout(local)}; workdir {session.workdir}")).findings
    errors = [f for f in findings if f.is_error]
    elapsed = time.monotonic() - started
    if errors:
        raise Exit(
            f"check failed: {len(errors)} problem(s) block a launch ({elapsed:.1f}s)", code=1
        )
    warnings = len(findings) - len(errors)
    console.print(
        f"[green]check passed[/] on {len(session.nodes)} node(s) in {elapsed:.1f}s"
        + (f" with {warnings} warning(s)" if warnings else "")
    )


ns = Collection(check)
