"""`fab report PATH`: results.csv, report.md and figures for a run or a sweep directory."""
from __future__ import annotations

import re
from dataclasses import dataclass
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
    rows: list[rep.PointRow]
    best: rep.PointRow | None
    out_dir: Path
    files: list[Path]


def write_report(path: Path, out_dir: Path | None = None, plots: bool = True,
                 comm_pattern: str | None = None, compute_pattern: str | None = None) -> ReportResult:
    """Read `path` (run, sweep or directory of runs) and write results.csv, report.md and PNGs
    into `out_dir` (default: `path`). Raises rep.ReportError only when nothing can be read;
    per-point problems end up in the rows. Used by the report task, sweeps and launches.
    comm_pattern / compute_pattern: the kernels the trace analysis counts as communication /
    compute (tasks/lib/traces.py; defaults: NCCL's and RCCL's / every other kernel)."""
    report_input = rep.discover(path)
    rows, runs = rep.collect_rows(report_input)
    out_dir = out_dir or path
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    single_run = runs.get(rows[0].run_dir or "") if report_input.kind == "run" and rows else None
    if plots:
        from tasks.lib import plots as figures_lib  # matplotlib only when a report is drawn

        figures += figures_lib.write_sweep_figures(rows, out_dir)
        panels, notes = [], {}
        for row in rows:
            if row.run_dir not in runs:
                continue
            name = row.label + ("" if row.status == rep.COMPLETED
                                else f" ({figures_lib.status_label(row.status)})")
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
    csv_path.write_text(rep.results_csv(rows, out_dir))
    md_path = out_dir / rep.REPORT_MD
    text = rep.report_markdown(report_input, rows, [f.name for f in figures], single_run)
    output_dirs = [runs[r.run_dir].output_dir for r in rows if r.run_dir in runs]
    text += "\n".join(traces.report_lines(
        [d for d in output_dirs if d is not None],
        comm_pattern=comm_pattern or traces.DEFAULT_COMM_PATTERN, compute_pattern=compute_pattern))
    md_path.write_text(text)
    return ReportResult(report_input, rows, rep.best_point(rows), out_dir, [csv_path, md_path, *figures])


# Terminal headers are shorter than report.md's: the table must fit an 80-column terminal.
TERMINAL_COLUMNS = ("ch", "th", "nodes\nranks", "status", "steps", "iter ms\np50", "iter ms\np90",
                    "GEMM\nTFLOP/s", "GEMM\nslow", "exposed\ncomm", "busbw\nGB/s")


def results_table(result: ReportResult) -> Table:
    table = Table(title=f"{result.input.kind}: {result.input.root.name}", box=box.SIMPLE_HEAD,
                  padding=(0, 0), pad_edge=False, header_style="bold")
    for header in TERMINAL_COLUMNS:
        table.add_column(header, justify="left" if header == "status" else "right", no_wrap=True)
    for row in result.rows:
        style = "bold green" if row is result.best else ("red" if row.status != rep.COMPLETED else None)
        # Cells are markup to rich: a node's status ("[/]") would raise, or restyle the table.
        ch, th, nodes, ranks, *rest = (_plain(cell) for cell in
                                       rep.table_cells(row, rep.TERMINAL_MD_COLUMNS))
        table.add_row(ch, th, f"{nodes}/{ranks}", *rest, style=style)
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
    if result.best is not None:
        console.print(f"best point: [bold]{result.best.label}[/] "
                      f"(median iteration {result.best.iter_ms_median:.2f} ms, run "
                      f"{_plain(result.best.run_id)})")
    else:
        console.print("[red]no completed point: no best point[/]")
    console.print("wrote " + ", ".join(str(f) for f in result.files), highlight=False)


@task(help={
    "path": "run directory (experiments/multinode_...), sweep directory (experiments/sweep_...) "
            "or a directory of run directories",
    "out": "write results.csv, report.md and the PNGs here instead of into PATH",
    "no_plots": "skip the PNG figures",
    "comm_kernels": "trace analysis: regex of the kernels that are communication (default: "
                    "NCCL's and RCCL's, (?i)nccl|rccl), e.g. a copy kernel at world size 1",
    "compute_kernels": "trace analysis: regex of the kernels that are compute (default: every "
                       "kernel that is not communication)",
})
def report(c, path, out=None, no_plots=False, comm_kernels=None, compute_kernels=None):
    """Summarise a run or a sweep: results.csv, report.md (best point, trade-off, the trace
    analysis of any PyTorch profiler traces), PNG figures."""
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
                              comm_pattern=comm_kernels, compute_pattern=compute_kernels)
    except rep.ReportError as err:
        raise Exit(f"report: {err}", code=EXIT_USAGE) from None
    except OSError as err:
        raise Exit(f"report: cannot write into {out or target}: {err.strerror or err}; "
                   "choose another directory with --out", code=1) from None
    print_report(make_console(), result)


ns = Collection(report)
