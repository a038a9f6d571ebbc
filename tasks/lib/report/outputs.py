"""A report's files: results.csv (and runs.csv), report.md and the PNG figures of a run, a sweep
or a directory of runs, written into a directory. Used by `fab report`, `fab launch` (each run's
own report), `fab sweep` and `fab tune`."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tasks.lib import report as rep
from tasks.lib import traces


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
        from tasks.lib.report import plots as figures_lib  # matplotlib only when a report is drawn

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
