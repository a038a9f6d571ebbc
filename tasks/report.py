"""`fab report PATH`: results.csv, report.md and figures for a run or a sweep directory."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from invoke import Collection, task
from invoke.exceptions import Exit
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tasks.lib import report as rep
from tasks.lib import traces
from tasks.lib.console import make_console
from tasks.lib.untrusted import terminal_text
from tasks.cluster.session import EXIT_USAGE, cli_path


@dataclass
class ReportResult:
    """What one report wrote and decided."""

    input: rep.ReportInput
    rows: list[rep.PointRow]          # one per point (a point's repeats are its .runs)
    decision: rep.Decision
    out_dir: Path
    files: list[Path]
    run_rows: list[rep.PointRow] = field(default_factory=list)
    runs: dict[str, rep.RunData] = field(default_factory=dict)   # by run row's run_dir

    @property
    def best(self) -> rep.PointRow | None:
        """The point ahead of every other beyond the noise; None where there is none."""
        return next((r for r in self.rows if r.label == self.decision.winner), None)


def write_report(path: Path, out_dir: Path | None = None, plots: bool = True,
                 min_margin: float = rep.MIN_MARGIN, comm_pattern: str | None = None,
                 compute_pattern: str | None = None) -> ReportResult:
    """Read `path` (run, sweep or directory of runs) and write results.csv, report.md and PNGs
    into `out_dir` (default: `path`). Raises rep.ReportError only when nothing can be read;
    per-point problems end up in the rows. Used by the report task, sweeps and launches.
    comm_pattern / compute_pattern: the kernels the trace analysis counts as communication /
    compute (tasks/lib/traces.py; defaults: NCCL's and RCCL's / every other kernel)."""
    report_input = rep.discover(path)
    rows, run_rows, runs = rep.collect_points(report_input)
    decision = rep.decide_rows(rows, min_margin=min_margin)
    out_dir = out_dir or path
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    single_run = runs.get(rows[0].run_dir or "") if report_input.kind == "run" and rows else None
    if plots:
        from tasks.lib import plots as figures_lib  # matplotlib only when a report is drawn

        figures += figures_lib.write_sweep_figures(rows, out_dir, decision)
        panels, notes = [], {}
        repeated = len(run_rows) > len(rows)
        for row in run_rows:
            if row.run_dir not in runs:
                continue
            name = (row.label + (f" run {(row.repeat or 0) + 1}" if repeated else "")
                    + ("" if row.status == rep.COMPLETED else f" ({figures_lib.status_label(row.status)})"))
            panels.append((name, rep.per_rank_step_times(runs[row.run_dir])))
            if row.slowest_by == "caused_wait":
                notes[name] = (f"slowest: rank {row.slowest_rank} (others waited "
                               f"{row.caused_wait_ms_median or 0:.3g} ms/step for it)")
        title = (f"Per-rank iteration time: {single_run.run_dir.name}" if single_run is not None
                 else "Per-rank iteration time per point (stragglers)")
        figure = figures_lib.plot_per_rank_step_time(panels, title, out_dir / figures_lib.PER_RANK_STEPS,
                                                     notes)
        if figure is not None:
            figures.append(figure)
    csv_path = out_dir / rep.RESULTS_CSV
    csv_path.write_text(rep.results_csv(rows, out_dir, decision))
    written = [csv_path]
    if len(run_rows) > len(rows):
        runs_path = out_dir / rep.RUNS_CSV
        runs_path.write_text(rep.results_csv(run_rows, out_dir))
        written.append(runs_path)
    md_path = out_dir / rep.REPORT_MD
    text = rep.report_markdown(report_input, rows, [f.name for f in figures], single_run, decision)
    output_dirs = [runs[r.run_dir].output_dir for r in run_rows if r.run_dir in runs]
    text += "\n".join(traces.report_lines(
        [d for d in output_dirs if d is not None],
        comm_pattern=comm_pattern or traces.DEFAULT_COMM_PATTERN, compute_pattern=compute_pattern))
    md_path.write_text(text)
    return ReportResult(report_input, rows, decision, out_dir, [*written, md_path, *figures], run_rows, runs)


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


@task(help={
    "path": "run directory (experiments/multinode_...), sweep directory (experiments/sweep_...) "
            "or a directory of run directories",
    "out": "write results.csv, report.md and the PNGs here instead of into PATH",
    "no_plots": "skip the PNG figures",
    "min_margin": "percent the runner-up must be slower, beyond the noise, for a point to be named "
                  "best (default 1)",
    "export": "write the best point's settings to FILE as `export NAME=value` lines a job can source "
              "(refused without a single best point unless --pick names one)",
    "export_preset": "write the best point's settings as config/nccl/NAME.yaml, for fab launch "
                     "--nccl-preset NAME (its channels and threads included)",
    "pick": "the point to export where no single one is best: CxT[,NAME=VALUE...], e.g. --pick 4x256",
    "comm_kernels": "trace analysis: regex of the kernels that are communication (default: "
                    "NCCL's and RCCL's, (?i)nccl|rccl), e.g. a copy kernel at world size 1",
    "compute_kernels": "trace analysis: regex of the kernels that are compute (default: every "
                       "kernel that is not communication)",
})
def report(c, path, out=None, no_plots=False, min_margin=None, export=None, export_preset=None, pick=None,
           comm_kernels=None, compute_kernels=None):
    """Summarise a run or a sweep: results.csv, report.md (the decision, trade-off, the trace
    analysis of any PyTorch profiler traces), PNG figures; --export the chosen point."""
    target = cli_path(path)
    for flag, pattern in (("--comm-kernels", comm_kernels), ("--compute-kernels", compute_kernels)):
        if pattern:
            try:
                re.compile(pattern)
            except re.error as err:
                raise Exit(f"report: {flag} {pattern!r}: not a regular expression ({err})",
                           code=EXIT_USAGE) from None
    try:
        result = write_report(target, cli_path(out) if out else None, plots=not no_plots,
                              min_margin=parse_margin(min_margin), comm_pattern=comm_kernels,
                              compute_pattern=compute_kernels)
    except rep.ReportError as err:
        raise Exit(f"report: {err}", code=EXIT_USAGE) from None
    except OSError as err:
        raise Exit(f"report: cannot write into {out or target}: {err.strerror or err}; "
                   "choose another directory with --out", code=1) from None
    console = make_console()
    print_report(console, result)
    if export or export_preset or pick:
        write_exports(console, result, export, export_preset, pick)


def write_exports(console: Console, result: ReportResult, export: str | None, preset: str | None,
                  pick: str | None) -> None:
    """--export FILE and --export-preset NAME; Exit 1 without a point to export, 2 for a bad name."""
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
        targets.append((cli_path(export), exporting.export_script(chosen)))
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


ns = Collection(report)
