"""`fab sync`: make every node's workdir match this checkout (tracked and non-ignored files)."""

from __future__ import annotations

import secrets
import socket
import time
from dataclasses import dataclass

from invoke import Collection, task
from invoke.exceptions import Exit
from rich.table import Table

from tasks.lib import sync as syncing
from tasks.lib.console import make_console
from tasks.lib.probe import format_bytes
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, NodeResults, on_each
from tasks.cluster.preflight import checkout_files, local_checkout_state, sync_excludes
from tasks.cluster.session import EXIT_USAGE, HOSTS_HELP, PROJECT_ROOT, ClusterSession


@task(help={"hosts": HOSTS_HELP})
def sync(c, hosts=None):
    """Make every node's workdir match this checkout (tracked and non-ignored files).

    Skips nodes whose workdir is this checkout (shared filesystem) and writes once per group of
    nodes that share one. Files an earlier sync wrote and this checkout no longer has are
    deleted; anything else on the node (experiments, logs, venvs) is left alone.
    """
    started = time.monotonic()
    with ClusterSession(c, hosts=hosts) as session:
        if session.inventory.is_local:
            print("nothing to sync: the only node is this machine")
            return
        outcome = sync_nodes(session)
        console = make_console()
        table = Table(
            title=f"sync of {outcome.files} file(s), tree {outcome.tree_hash[:12]}, "
            f"to {session.workdir}",
            title_justify="left",
        )
        for column in ("node", "host", "result"):
            table.add_column(column)
        for node in session.nodes:
            if node in outcome.results.failed:
                text = f"[red]failed: {describe_error(outcome.results.failed[node], node)}[/]"
            else:
                text = outcome.results.ok[node]
            table.add_row(str(node.index), node.label, text)
        console.print(table)
    outcome.results.raise_if_failed("sync")
    console.print(f"[green]synced[/] in {time.monotonic() - started:.1f}s")


@dataclass
class SyncOutcome:
    results: NodeResults[str]  # per node: what was done, or why it failed
    files: int
    tree_hash: str


def sync_nodes(session: ClusterSession) -> SyncOutcome:
    """Three parallel rounds: mark, look for markers (find shared filesystems), send to leaders."""
    excluded = sync_excludes(session.settings)
    local = local_checkout_state(excluded_dirs=excluded)
    if local.commit is None:
        raise Exit(
            f"{PROJECT_ROOT} is not a git checkout: sync sends `git ls-files` files",
            code=EXIT_USAGE,
        )
    files = checkout_files(PROJECT_ROOT, excluded)
    workdir = session.workdir
    token = secrets.token_hex(8)
    controller_marker = PROJECT_ROOT / syncing.marker_name(token, syncing.CONTROLLER_MARK)
    controller_marker.touch()
    try:
        marked = on_each(
            session.nodes, lambda node: node.run(syncing.mark_script(workdir, token, node.index))
        )
        seen_results = on_each(
            list(marked.ok),
            lambda node: syncing.parse_seen(
                node.run(syncing.seen_script(workdir, token, len(session.nodes))).stdout
            ),
        )
        with_controller, groups = syncing.filesystem_groups(
            {node.index: seen for node, (seen, _) in seen_results.ok.items()}
        )
        by_index = {node.index: node for node in session.nodes}
        previous = {node.index: old for node, (_, old) in seen_results.ok.items()}
        record = syncing.sync_record(
            tree=local.tree_hash,
            branch=local.branch,
            commit=local.commit,
            dirty=local.dirty,
            files=len(files),
            source=f"{socket.gethostname()}:{PROJECT_ROOT}",
        )
        try:
            tarball = syncing.build_tarball(
                PROJECT_ROOT,
                files,
                {
                    syncing.SYNC_FILES: syncing.files_list_bytes(files),
                    syncing.SYNC_RECORD: record,
                },
            )
        except FileNotFoundError as err:  # deleted (or renamed by an editor) since the listing
            raise Exit(f"sync: {err.filename} vanished while it was being packed (an editor "
                       "saving?): no file of the checkout was written on the nodes; run "
                       "`fab sync` again", code=1) from None

        def send(node: Node) -> str:
            stale = syncing.stale_files(previous.get(node.index, []), files)
            node.run_with_input(syncing.extract_script(workdir, token, stale), tarball)
            return f"wrote {len(files)} file(s) ({format_bytes(len(tarball))} compressed)" + (
                f", deleted {len(stale)} stale" if stale else ""
            )

        sent = on_each([by_index[leader] for leader in groups], send)
    finally:
        for marker in PROJECT_ROOT.glob(syncing.MARKER_PREFIX + token + "-*"):
            marker.unlink(missing_ok=True)
    results: NodeResults[str] = NodeResults()
    for node in session.nodes:
        error = marked.failed.get(node) or seen_results.failed.get(node) or sent.failed.get(node)
        if error is not None:
            results.failed[node] = error
        elif node.index in with_controller:
            results.ok[node] = "skipped: its workdir is this checkout (shared filesystem)"
        elif node in sent.ok:
            results.ok[node] = sent.ok[node]
        else:
            leader = next(lead for lead, members in groups.items() if node.index in members)
            results.ok[node] = f"skipped: shares its workdir with node {leader}" + (
                "" if by_index[leader] in sent.ok else " (which failed)"
            )
    return SyncOutcome(results, len(files), local.tree_hash)


ns = Collection(sync)
