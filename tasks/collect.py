"""Bringing a run's outputs home: every node's output directory copied into the controller's run
directory (`fab launch` at the end of an attached run; `fab collect` for a detached one).

A node is not trusted with paths on the controller: only regular files with plain relative names
are copied (tasks/lib/localfs.py); the rest is refused and named.
"""

import os
import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit

from tasks.lib.localfs import RefusedName, regular_file_size, write_beneath
from tasks.lib.runrecord import (
    RUN_JSON,
    RunRecord,
    list_files_command,
    parse_file_list,
    refusal_line,
    write_json_atomic,
)
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, NodeResults, on_each
from tasks.cluster.session import EXIT_USAGE, ClusterSession, load_settings, project_path

EXIT_FAILED = 1


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



def latest_run_dir(experiments_dir: Path) -> Path | None:
    runs = [p for p in experiments_dir.glob("multinode_*") if (p / RUN_JSON).is_file()]
    return max(runs, key=lambda p: (p / RUN_JSON).stat().st_mtime) if runs else None


@task(iterable=["hosts"], help={
    "run": "run id (a directory under experiments/); default: the latest run",
    "hosts": "hosts of that run, master first; default: the inventory (as for the launch)",
})
def collect(c, run=None, hosts=None):
    """Copy a run's outputs from every node into its run directory on this controller.

    For runs started with --detach or left by Ctrl-C: `fab launch` does this itself when it
    watches a run to its end. Files already here with the same size are skipped.
    """
    experiments_dir = project_path(load_settings(c).cluster.experiments_dir)
    run_dir = experiments_dir / run if run else latest_run_dir(experiments_dir)
    if run_dir is None or not (run_dir / RUN_JSON).is_file():
        raise Exit(f"collect: no run.json for {run or 'any run'} under {experiments_dir} "
                   "(give --run with a directory name from there)", code=EXIT_USAGE)
    try:
        record = RunRecord.from_json((run_dir / RUN_JSON).read_text())
    except ValueError as err:
        raise Exit(f"collect: {run_dir / RUN_JSON}: {err}", code=EXIT_USAGE) from None
    with ClusterSession(c, hosts) as session:
        labels = [node.label for node in session.nodes]
        recorded = [node.host for node in record.nodes]
        if recorded and labels != recorded:
            raise Exit(f"collect: run {record.run_id} ran on {', '.join(recorded)} but the "
                       f"inventory is {', '.join(labels)}; pass --hosts {','.join(recorded)}",
                       code=EXIT_USAGE)
        collected = collect_outputs(session, posixpath.join(record.node_run_dir, record.output_dir),
                                    run_dir / record.output_dir)
    record_collection(record, collected)
    for node, done in sorted(collected.ok.items(), key=lambda item: item[0].index):
        print(f"node {node.index}: {done.files} file(s), {done.bytes} bytes copied, "
              f"{done.skipped} already there")
    write_json_atomic(run_dir / RUN_JSON, record.to_dict())
    refused = refusal_lines(collected)
    not_copied = "\n  ".join(["some outputs were not copied:", *refused]) if refused else ""
    collected.raise_if_failed("collecting outputs", code=EXIT_FAILED,
                              hint="\n".join(filter(None, [
                                  f"the files stay on those hosts; `fab collect --run "
                                  f"{record.run_id}` retries", not_copied])))
    if refused:
        # Everything else was collected: the exit status says the outputs are not all here.
        raise Exit(f"collect: {not_copied}", code=EXIT_FAILED)


ns = Collection(collect)
