"""Which node's file becomes the run's own when several nodes deliver the same name (issue 26,
finding 7): node 0's summary.json is the run's summary, whichever node answers first.

Two nodes of this machine (tasks.cluster.nodes.LocalNode: real shell listings, real copies),
each with an output directory of its own, listed by name (rank_00_metrics.jsonl before
summary.json). Node 0's copies wait until node 1 has delivered everything: the order in which a
slow master and a quick (or hostile) worker answer.
"""
from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import BinaryIO

from invoke import Config

from tasks.cluster.nodes import LocalNode
from tasks.run.collecting import collect_outputs
from tasks.lib.inventory import HostSpec

REMOTE = "/nonexistent/gemm-run/256thread_28channels"  # the same path on every node


class DirNode(LocalNode):
    """A node whose REMOTE output directory is `root` here."""

    def __init__(self, index: int, root: Path, before_copy: threading.Event | None = None,
                 after_copies: threading.Event | None = None, expected: int = 0):
        super().__init__(index, HostSpec(f"node{index}"), Config())
        self.root, self.before_copy, self.after_copies = root, before_copy, after_copies
        self.expected, self.copied = expected, 0

    def run(self, command: str, **kwargs):
        result = super().run(command.replace(REMOTE, str(self.root)), **kwargs)
        if command.startswith("if [ -d "):  # the listing: by name, whatever the filesystem's order
            entries = [e for e in result.stdout.split("\0") if e]
            result.stdout = "".join(e + "\0" for e in sorted(entries, key=lambda e: e.split(" ", 2)[2]))
        return result

    def get_file(self, remote_path: str, into: BinaryIO) -> None:
        if self.before_copy is not None:
            assert self.before_copy.wait(30), "node 1 never finished"
        super().get_file(remote_path.replace(REMOTE, str(self.root)), into)
        self.copied += 1
        if self.after_copies is not None and self.copied == self.expected:
            self.after_copies.set()


def write_outputs(root: Path, rank: int, summary: dict) -> None:
    root.mkdir(parents=True)
    (root / f"rank_{rank:02d}_metrics.jsonl").write_text('{"step": 1}\n')
    (root / "summary.json").write_text(json.dumps(summary))


def test_node_0s_summary_is_the_runs_whichever_node_delivers_first(tmp_path: Path) -> None:
    write_outputs(tmp_path / "n0", 0, {"from": "node 0", "tflops": 10.0})
    write_outputs(tmp_path / "n1", 1, {"from": "node 1", "tflops": 9999.0})
    node1_done = threading.Event()
    nodes = [DirNode(0, tmp_path / "n0", before_copy=node1_done),
             DirNode(1, tmp_path / "n1", after_copies=node1_done, expected=2)]
    target = tmp_path / "controller" / "run" / "256thread_28channels"
    target.mkdir(parents=True, mode=0o700)

    results = collect_outputs(SimpleNamespace(nodes=nodes), REMOTE, target)

    assert not results.failed, results.failed
    assert json.loads((target / "summary.json").read_text())["from"] == "node 0"
    assert json.loads((target / "node_1" / "summary.json").read_text())["from"] == "node 1"
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == [
        "node_1/summary.json", "rank_00_metrics.jsonl", "rank_01_metrics.jsonl", "summary.json"]
    assert [results.ok[node].files for node in nodes] == [2, 2]


def test_a_second_collection_copies_nothing_again(tmp_path: Path) -> None:
    write_outputs(tmp_path / "n0", 0, {"from": "node 0"})
    write_outputs(tmp_path / "n1", 1, {"from": "node 1"})
    nodes = [DirNode(0, tmp_path / "n0"), DirNode(1, tmp_path / "n1")]
    target = tmp_path / "run"
    target.mkdir(mode=0o700)
    collect_outputs(SimpleNamespace(nodes=nodes), REMOTE, target)
    again = collect_outputs(SimpleNamespace(nodes=nodes), REMOTE, target)
    assert [(again.ok[n].files, again.ok[n].skipped) for n in nodes] == [(0, 2), (0, 2)]
    assert json.loads((target / "summary.json").read_text())["from"] == "node 0"
