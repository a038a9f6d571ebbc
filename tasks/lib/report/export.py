"""Carrying the report's answer out: the chosen point's settings as a file a training job sources
(`fab report --export FILE`) or as an NCCL preset (`--export-preset NAME`, config/nccl/NAME.yaml,
read by `fab launch --nccl-preset NAME`).

The variables are exactly the point's: its channels and threads as the launch sets them
(tasks/lib/runspec.py nccl_env, with the run's accelerator and --[no-]pin-channels) and its --axis
values. The header names the sweep, its date, a fingerprint of the nodes (hosts, GPU models and
counts, NCCL version: a file measured on other hardware says so) and the margin over the
runner-up. Without a single best point the export is refused unless --pick names the point.

Every header value is reduced to printable characters: the file is sourced by a shell, and a
newline in a host name would otherwise end the comment. Values are shell-quoted.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tasks.lib.quoting import sh_quote
from tasks.lib.report.decide import WINNER, Decision
from tasks.lib.report.read import RunData
from tasks.lib.report.rows import PointRow
from tasks.lib.report.values import _get, _string
from tasks.lib.runspec import nccl_env

HEADER_CHARS = 300


class ExportError(ValueError):
    """No point to export (no single best point and no --pick, an unknown --pick)."""


@dataclass
class Export:
    point: PointRow
    variables: dict[str, str]
    header: list[str]


def choose(rows: Sequence[PointRow], decision: Decision, pick: str | None) -> tuple[PointRow, str]:
    """The point to export and why: the decision's best point, or the one --pick names."""
    if pick:
        wanted = pick.replace(" ", "")
        named = [row for row in rows if row.selector == wanted]
        if not named:
            raise ExportError(f"--pick {pick}: no such point; the points are "
                              + ", ".join(row.selector for row in rows))
        row = named[0]
        if decision.status == WINNER and decision.winner != row.label:
            why = f"picked with --pick over the best point {decision.winner}"
        elif decision.status == WINNER:
            why = "the best point (also named by --pick)"
        else:
            why = (f"picked with --pick: no single best point ({decision.reason})")
        return row, why
    if decision.status != WINNER:
        candidates = ", ".join(decision.within_noise) or "none"
        hint = f" (by the secondary criterion: --pick {_selector(rows, decision.secondary_pick)})" \
            if decision.secondary_pick else ""
        raise ExportError(f"no single best point to export: {decision.reason or decision.status}; "
                          f"candidates: {candidates}. Name one with --pick POINT{hint}")
    row = next(r for r in rows if r.label == decision.winner)
    margin = f"{decision.margin * 100:.1f} %" if decision.margin is not None else "?"
    return row, (f"the best point: {margin} ahead of the runner-up {decision.runner_up} beyond the noise "
                 f"(intervals {decision.gap_ms:.3g} ms apart)")


def _selector(rows: Sequence[PointRow], label: str | None) -> str:
    return next((r.selector for r in rows if r.label == label), label or "?")


def point_variables(row: PointRow, run: RunData | None, sweep: Mapping[str, Any] | None) -> dict[str, str]:
    """The point's variables as its launch set them (see the module docstring)."""
    if row.channels is None or row.threads is None:
        raise ExportError(f"{row.label}: its channels and threads are unknown: nothing to export")
    flags = _get(run.run_json if run else None, "flags") or {}
    accelerator = _string(flags.get("accelerator")) or "cuda"
    pin = flags.get("pin_channels")
    if not isinstance(pin, bool):
        recorded = _get(sweep, "launch_flags", "pin_channels")
        pin = recorded if isinstance(recorded, bool) else True
    variables = nccl_env(row.channels, row.threads, pin_channels=pin, accelerator=accelerator)
    variables.update(row.settings)
    return variables


def fingerprint(runs: Sequence[RunData]) -> str:
    """12 hex digits over what identifies the nodes: hosts, hostnames, GPU models and counts, and
    the NCCL version the ranks reported (the same hardware and library give the same value)."""
    facts = set()
    for run in runs:
        for node in _get(run.run_json, "nodes") or []:
            if isinstance(node, Mapping):
                facts.add(json.dumps({k: node.get(k) for k in ("host", "hostname", "gpus", "gpu_names")},
                                     sort_keys=True, default=str))
        version = _get(run.summary, "effective_settings", "nccl_version")
        if version:
            facts.add(f"nccl {version}")
    return hashlib.sha256("\n".join(sorted(facts)).encode()).hexdigest()[:12]


def build_export(rows: Sequence[PointRow], decision: Decision, runs: Mapping[str, RunData],
                 sweep: Mapping[str, Any] | None, source: str, pick: str | None) -> Export:
    """What --export and --export-preset write."""
    row, why = choose(rows, decision, pick)
    point_runs = [runs[r.run_dir] for r in (row.runs or [row]) if r.run_dir in runs]
    variables = point_variables(row, point_runs[0] if point_runs else None, sweep)
    hosts = sorted({str(n.get("host")) for run in point_runs for n in _get(run.run_json, "nodes") or []
                    if isinstance(n, Mapping)})
    interval = row.interval
    measured = (f"median iteration {interval.estimate:.3f} ms ({interval.level * 100:g} % CI "
                f"{interval.low:.3f}-{interval.high:.3f}, {interval.runs} run(s))" if interval
                else f"median iteration {row.iter_ms_median} ms")
    preset = _get(sweep, "launch_flags", "nccl_preset") or _get(point_runs[0].run_json if point_runs else None,
                                                                "flags", "nccl_preset")
    fixed_env = _get(sweep, "launch_flags", "env") or []
    header = [
        f"NCCL/RCCL settings chosen by `fab report` from {source}",
        f"sweep {(sweep or {}).get('sweep_id') or '-'} of {(sweep or {}).get('created_at') or _get(point_runs[0].run_json if point_runs else None, 'created_at') or '?'}",
        f"nodes: {', '.join(hosts) or '?'}; fingerprint {fingerprint(point_runs)} (hosts, GPUs, NCCL version)",
        f"point {row.label}: {measured}",
        f"why this point: {why}",
    ]
    if preset:
        header.append(f"measured with --nccl-preset {preset} (its variables are not repeated here)")
    if fixed_env:
        names = sorted({str(item).split("=", 1)[0] for item in fixed_env})
        header.append(f"measured with --env {', '.join(names)} (not exported)")
    return Export(row, variables, [_printable(line) for line in header])


def _printable(text: str) -> str:
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in str(text))
    return cleaned[:HEADER_CHARS]


def export_script(export: Export) -> str:
    """The sourceable file: a comment header, then one `export NAME=value` line per variable."""
    lines = [f"# {line}" for line in export.header]
    lines.append("# Source it before starting the job: . THIS_FILE")
    lines += [f"export {name}={sh_quote(value)}" for name, value in export.variables.items()]
    return "\n".join(lines) + "\n"


def export_preset(export: Export, name: str) -> str:
    """config/nccl/NAME.yaml: the same variables (strings), the same header as comments."""
    lines = [f"# {line}" for line in export.header]
    lines.append(f"# fab launch --nccl-preset {name}: its channels and threads come from the "
                 "variables below unless --channels/--threads are given")
    # JSON strings are YAML double-quoted scalars: every value stays a string, exactly.
    lines += [f"{key}: {json.dumps(value)}" for key, value in export.variables.items()]
    return "\n".join(lines) + "\n"
