"""Bringing a run's outputs home: every node's output directory copied into the controller's run
directory (`fab launch` at the end of an attached run; `fab collect` for a detached one).

A node is not trusted with paths on the controller: only regular files with plain relative names
are copied (tasks/lib/localfs.py); the rest is refused and named.
"""
from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tasks.lib.localfs import RefusedName, regular_file_size, write_beneath
from tasks.lib.runrecord import RunRecord, list_files_command, parse_file_list, refusal_line
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, NodeResults, on_each
from tasks.cluster.session import ClusterSession

# -- collection ------------------------------------------------------------------------------------

@dataclass
class NodeCollection:
    """What one node's collection did; `refused`: (name as shown, why) of every entry of its
    output directory that was not copied."""

    files: int = 0
    bytes: int = 0
    skipped: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {"files": self.files, "bytes": self.bytes, "skipped": self.skipped,
                "refused": len(self.refused)}


# run.json keeps this many refused names per node (a hostile node may list millions).
RECORDED_REFUSALS = 50


def collect_outputs(session: ClusterSession, remote_output_dir: str, target: Path,
                    nodes: Sequence[Node] | None = None) -> NodeResults[NodeCollection]:
    """Copy every node's <T>thread_<C>channels/ into the controller's run dir, unless the same file
    (same size at the same place) is already there: local runs and shared filesystems copy nothing.
    A name several nodes list goes to the lowest node rank (node 0's summary.json is the run's,
    whichever node answers first); the others' copies go under node_<rank>/.
    A host without the output directory, or whose files cannot be listed or copied, fails.

    A node is not trusted: only regular files with plain relative names are copied, each written
    beneath `target` without following a symlink (tasks.lib.localfs); the rest is refused and
    the node's other files still arrive."""
    chosen = list(session.nodes if nodes is None else nodes)
    # One listing round first: nodes sharing one output directory (a shared filesystem, the
    # usual Slurm site) are copied once, from the lowest node rank, not once per node.
    listings = on_each(chosen, lambda node: parse_file_list(
        node.run(list_files_command(remote_output_dir), timeout=60).stdout))
    leaders = shared_output_leaders({node.index: [name for _, name in listing.files]
                                     for node, listing in listings.ok.items()})
    # Who gets each plain name, decided before any copy starts (not by who copies first).
    owner: dict[str, int] = {}
    for node, listing in listings.ok.items():
        if leaders.get(node.index, node.index) == node.index:
            for _, relative in listing.files:
                owner[relative] = min(owner.get(relative, node.index), node.index)

    def collect(node: Node) -> NodeCollection:
        listing = listings.ok[node]
        done = NodeCollection(refused=listing.refused)
        if node.is_local and os.path.realpath(remote_output_dir) == os.path.realpath(target):
            done.skipped = len(listing.files)  # the outputs were written where they belong
            return done
        if leaders.get(node.index, node.index) != node.index:
            done.skipped = len(listing.files)  # node `leader` copies the shared directory
            return done
        for size, relative in listing.files:
            local = relative if owner[relative] == node.index else f"node_{node.index}/{relative}"
            if regular_file_size(target, local) == size:
                done.skipped += 1
                continue
            try:
                with write_beneath(target, local) as handle:
                    node.get_file(posixpath.join(remote_output_dir, relative), handle)
            except RefusedName as refused:  # on this side: a file or symlink where a dir goes
                done.refused.append((refused.shown, refused.why))
                continue
            done.files += 1
            done.bytes += size
        return done

    results = on_each(list(listings.ok), collect)
    results.failed.update(listings.failed)
    return results


_NODE_OUTPUT_LOG = re.compile(r"^node_(\d+)_output\.log$")


def shared_output_leaders(listed: Mapping[int, Sequence[str]]) -> dict[int, int]:
    """node rank -> the lowest rank whose output directory it shares (itself when none).

    Every node's launcher writes node_<rank>_output.log into the output directory: a node that
    lists another collected node's log sees that node's directory. Pure."""
    leaders: dict[int, int] = {}
    for rank, names in listed.items():
        seen = {int(m.group(1)) for name in names if (m := _NODE_OUTPUT_LOG.match(name))}
        leaders[rank] = min({rank} | (seen & set(listed)))
    return leaders


def record_collection(record: RunRecord, results: NodeResults[NodeCollection]) -> None:
    for node, done in results.ok.items():
        entry = record.node(node.index)
        entry.collected = done.counts()
        entry.collect_refused = [f"{name} ({why})" for name, why in done.refused[:RECORDED_REFUSALS]]
    for node, error in results.failed.items():
        record.node(node.index).collect_error = describe_error(error, node)


def refusal_lines(results: NodeResults[NodeCollection]) -> list[str]:
    """One line per node whose listing had entries that were not copied."""
    return [f"node {node.index} ({node.label}): {refusal_line(done.refused)}"
            for node, done in sorted(results.ok.items(), key=lambda item: item[0].index)
            if done.refused]
