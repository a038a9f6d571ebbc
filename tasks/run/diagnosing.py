"""A run's diagnostics from every node at once: py-spy stacks of each process of the run (inside
containers too), GPU tools, the last log lines and the ranks' NCCL environment, written under a
directory of the controller's run directory. `fab diagnose` asks for them; the launch's hang
watchdog (tasks/run/hangwatch.py) collects them into <run dir>/hang/ before it stops a hung run.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from tasks.lib import diagnostics as diag
from tasks.lib.untrusted import terminal_text
from tasks.cluster.node_errors import describe_error
from tasks.cluster.nodes import Node, on_each
from tasks.cluster.session import ClusterSession

# Per py-spy call; the node command as a whole gets room for a few dumps per rank plus GPU tools.
DUMP_TIMEOUT_S = 20.0
NODE_TIMEOUT_S = 240.0


def collect_diagnostics(
    session: ClusterSession,
    run_id: str,
    dest_dir: Path,
    *,
    kind: str = "diagnose",
    hang: Mapping[str, Any] | None = None,
    expected_ranks: Iterable[int] = (),
    container: str | None = None,
    nodes: Iterable[Node] | None = None,
    native: bool = True,
) -> diag.DiagnosticsSummary:
    """Collect from every node at once, write `dest_dir/node_<rank>/...`, `summary.json` and
    `summary.md`, and return the summary. A node that cannot be reached is named in the summary,
    never fatal: diagnostics must come back from the hosts that answer."""
    settings = session.settings

    def collect_one(node: Node) -> diag.NodeReport:
        command = diag.node_diagnostics_command(
            run_id, node.index, settings.cluster.registry_dir, workdir=session.workdir,
            venv=settings.cluster.venv, container=container, native=native, timeout=DUMP_TIMEOUT_S)
        result = node.run_fed(command, warn=True, timeout=NODE_TIMEOUT_S)
        return diag.parse_node_report(result.stdout, node.index, node.label)

    results = on_each(list(nodes) if nodes is not None else session.nodes, collect_one)
    reports = [results.ok[node] for node in sorted(results.ok, key=lambda n: n.index)]
    errors = {f"node {node.index} ({node.label})": describe_error(error)
              for node, error in sorted(results.failed.items(), key=lambda item: item[0].index)}
    summary = diag.build_summary(run_id, kind, reports, time.time(), hang=hang,
                                 expected_ranks=expected_ranks, node_errors=errors)
    write_diagnostics(dest_dir, reports, summary)
    return summary


def write_diagnostics(dest_dir: Path, reports: Iterable[diag.NodeReport],
                      summary: diag.DiagnosticsSummary) -> None:
    dest_dir.mkdir(parents=True, exist_ok=True)
    for report in reports:
        node_dir = dest_dir / f"node_{report.node_rank}"
        node_dir.mkdir(exist_ok=True)
        for name, content in diag.node_report_files(report).items():
            (node_dir / name).write_text(content)
    (dest_dir / diag.SUMMARY_FILE).write_text(json.dumps(summary.as_dict(), indent=1) + "\n")
    (dest_dir / diag.SUMMARY_MD).write_text(diag.summary_markdown(summary, dest_dir.name))


def print_summary(console: Console, summary: diag.DiagnosticsSummary, dest_dir: Path) -> None:
    for index, line in enumerate(diag.summary_lines(summary)):
        style = "bold red" if index == 0 and summary.kind in ("hang", "startup") else None
        console.print(escape(terminal_text(line)), style=style, highlight=False)
    console.print(f"diagnostics: {escape(str(dest_dir))}/", highlight=False)
