"""The report at the command line, as `fab report`, `fab sweep` and `fab tune` show it: the results
table and the decision in the terminal (node values escaped for rich), --min-margin, and the
--export / --export-preset files."""
from __future__ import annotations

import os
import re
from pathlib import Path

from invoke.exceptions import Exit
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.lib import report as rep
from tasks.lib.report.outputs import ReportResult
from tasks.lib.untrusted import terminal_text
from tasks.lib.exits import EXIT_USAGE


# Terminal headers are shorter than report.md's: the table must fit an 80-column terminal.
# The interval's half-width stands where report.md has p90: the noise is what the decision reads.
TERMINAL_COLUMNS = ("ch", "th", "nodes\nranks", "status", "steps", "iter ms\np50", "95 %\nCI ±",
                    "GEMM\nTFLOP/s", "GEMM\nslow", "exposed\ncomm", "busbw\nGB/s")


def results_table(result: ReportResult) -> Table:
    table = Table(title=f"{result.input.kind}: {result.input.root.name}", box=box.SIMPLE_HEAD,
                  padding=(0, 0), pad_edge=False, header_style="bold")
    # The other axes (fab sweep --axis) as one column of their values, "/"-joined.
    axes = list(dict.fromkeys(name for row in result.rows for name in row.settings))
    if axes:
        table.add_column("/".join(axes), justify="left", no_wrap=True)
    for header in TERMINAL_COLUMNS:
        table.add_column(header, justify="left" if header == "status" else "right", no_wrap=True)
    for row in result.rows:
        style = "bold green" if row is result.best else ("red" if row.status != rep.COMPLETED else None)
        # Cells are markup to rich: a node's status ("[/]") would raise, or restyle the table.
        ch, th, nodes, ranks, status, steps, p50, _, *rest = (
            _plain(cell) for cell in rep.table_cells(row, rep.TERMINAL_MD_COLUMNS))
        spread = f"±{row.interval.half_width:.2f}" if row.interval is not None else "-"
        cells = [ch, th, f"{nodes}/{ranks}", status, steps, p50, spread, *rest]
        if axes:
            cells.insert(0, _plain("/".join(row.settings.get(name, "-") for name in axes)))
        table.add_row(*cells, style=style)
    return table


def _plain(value: object) -> str:
    """A value read from the run's files (the nodes' word) inside rich markup: shown as it is."""
    return escape(terminal_text(str(value)))


def print_report(console: Console, result: ReportResult) -> None:
    console.print(results_table(result))
    for row in result.rows:
        if row.problems:
            console.print(f"[yellow]{row.label}[/]: " + _plain("; ".join(row.problems)),
                          highlight=False)
        if row.slowest_by == "caused_wait" and (row.world_size or 0) > 1:
            console.print(f"{row.label}: slowest rank {row.slowest_rank} ({_plain(row.slowest_host)}): the "
                          f"others waited {row.caused_wait_ms_median or 0:.3g} ms per step for it",
                          highlight=False)
        if row.clock_flag:
            console.print(f"[yellow]{row.label}[/]: clocks differed from the calibration "
                          f"({(row.clock_drift or 0) * 100:+.1f} % SM clock)", highlight=False)
    console.print(decision_line(result), highlight=False)
    console.print("wrote " + ", ".join(str(f) for f in result.files), highlight=False)


def decision_line(result: ReportResult) -> str:
    """The decision in one terminal line (names and reasons escaped: markup to rich)."""
    decision = result.decision
    rows = {row.label: row for row in result.rows}
    if decision.status == rep.WINNER:
        best = rows[decision.winner]  # type: ignore[index]
        interval = best.interval
        return (f"best point: [bold]{_plain(best.label)}[/] (median iteration "
                + (f"{interval.estimate:.2f} ms, {interval.level * 100:g} % CI {interval.low:.2f}–{interval.high:.2f}"
                   if interval else f"{best.iter_ms_median:.2f} ms")
                + f"), {decision.margin * 100:.1f} % ahead of {_plain(decision.runner_up)} beyond the noise")
    if decision.status == rep.NO_POINT:
        return "[red]no completed point with unflagged settings: no best point[/]"
    if decision.status == rep.ONLY_POINT:
        return f"one point ({_plain(decision.leader)}): nothing to compare, no best point named"
    text = (f"[yellow]no single best point[/]: {len(decision.within_noise)} points within noise "
            f"({_plain(', '.join(decision.within_noise))})" if decision.status == rep.WITHIN_NOISE
            else f"[yellow]no decision[/]: {_plain(decision.reason)}")
    if decision.secondary_pick:
        text += f"; by the secondary criterion: {_plain(decision.secondary_pick)}"
    return text


def write_exports(console: Console, result: ReportResult, export: Path | None, preset: str | None,
                  pick: str | None) -> None:
    """--export FILE (resolved by the caller: tasks.cluster.session.cli_path) and --export-preset
    NAME; Exit 1 without a point to export, 2 for a bad name."""
    from tasks.lib.report import export as exporting
    from tasks.lib.render import NCCL_PRESETS_DIR

    if not (export or preset):
        raise Exit("report: --pick chooses the point to export: give --export FILE or --export-preset NAME",
                   code=EXIT_USAGE)
    if preset and not PRESET_NAME.match(preset):
        raise Exit(f"report: --export-preset {preset!r}: use lower-case letters, digits, - and _ "
                   "(it names config/nccl/NAME.yaml)", code=EXIT_USAGE)
    preset_path = NCCL_PRESETS_DIR / f"{preset}.yaml" if preset else None
    if preset_path is not None and preset_path.exists():
        raise Exit(f"report: {preset_path} exists; choose another preset name or remove it first",
                   code=EXIT_USAGE)
    try:
        chosen = exporting.build_export(result.rows, result.decision, result.runs, result.input.sweep,
                                        str(result.input.root), pick)
    except exporting.ExportError as err:
        raise Exit(f"report: {err}", code=EXIT_USAGE if pick else 1) from None
    targets = []
    if export:
        targets.append((export, exporting.export_script(chosen)))
    if preset_path is not None:
        targets.append((preset_path, exporting.export_preset(chosen, preset)))
    for path, text in targets:
        try:
            write_text_atomic(path, text)
        except OSError as err:
            raise Exit(f"report: cannot write {path}: {err.strerror or err}", code=1) from None
        console.print(f"exported {chosen.point.label} to {path}", highlight=False)


PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def parse_margin(value: object) -> float:
    """--min-margin PCT as a fraction (default rep.MIN_MARGIN); Exit 2 if not a number >= 0."""
    if value in (None, ""):
        return rep.MIN_MARGIN
    try:
        margin = float(str(value).rstrip("%")) / 100.0
        if not margin >= 0:
            raise ValueError
    except ValueError:
        raise Exit(f"report: --min-margin {value!r} is not a percentage >= 0 (e.g. --min-margin 1)",
                   code=EXIT_USAGE) from None
    return margin
