"""Writing what the report read and decided: results.csv and report.md."""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from tasks.lib import untrusted

from tasks.lib.report.conclusion import decision_lines, interval_table, trade_off_lines, verdict
from tasks.lib.report.decide import Decision, decide_rows, trade_off
from tasks.lib.report.read import COMPLETED, NOT_RUN, ReportInput, RunData
from tasks.lib.report.rows import CSV_COMPUTED, CSV_FIELDS, PointRow, _summary_aggregates
from tasks.lib.report.values import _fmt, _fmt_int, _get, _integer, _number, _pct, _signed, quantile


def results_csv(rows: Iterable[PointRow], base: Path | None = None,
                decision: Decision | None = None) -> str:
    """One CSV line per point (or per run, for runs.csv); run_dir relative to `base` (where the
    CSV goes) so a copied experiments tree keeps working. A sweep's --axis variables are columns
    of their own, after threads."""
    rows = list(rows)
    axes = list(dict.fromkeys(name for row in rows for name in row.settings))
    fieldnames = list(CSV_FIELDS)
    fieldnames[fieldnames.index("threads") + 1:fieldnames.index("threads") + 1] = axes
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fieldnames, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        record = {name: getattr(row, name) for name in CSV_FIELDS
                  if name not in ("problems", "notes", "settings_flags", *CSV_COMPUTED)}
        record.update({name: row.settings.get(name) for name in axes})
        record.update(_repeat_columns(row, decision))
        for key in ("run_dir", "output_dir"):
            if record.get(key) and base is not None:
                record[key] = os.path.relpath(record[key], base)
        record["notes"] = "; ".join(row.notes)
        record["settings_flags"] = "; ".join(row.settings_flags)
        record["problems"] = "; ".join(row.problems)
        writer.writerow({k: untrusted.csv_cell(_csv_value(v)) for k, v in record.items()})
    return buffer.getvalue()


def _repeat_columns(row: PointRow, decision: Decision | None) -> dict[str, Any]:
    interval = row.interval
    runs = row.runs or [row]
    return {
        "runs": sum(r.status == COMPLETED for r in runs),
        "runs_planned": row.runs_planned if row.runs else None,
        "iter_ms_ci_low": interval.low if interval else None,
        "iter_ms_ci_high": interval.high if interval else None,
        "run_spread": interval.run_spread if interval else None,
        "decision": verdict(decision, row) if decision is not None else None,
    }


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def markdown_row(row: PointRow) -> PointRow:
    """The row as report.md shows it: every text field a node may have written (status, host,
    notes, flags, problems, NCCL's names) escaped for Markdown/HTML on one line (a node's status
    must not forge a "Best point" line or inject HTML). run_dir and output_dir stay (paths are
    read from them; shown as code spans); the label (grid values, the sweep's own) is unchanged,
    so the decision's keys still name the rows. A point's runs are escaped alike."""
    escaped: dict[str, Any] = {}
    for item in fields(row):
        value = getattr(row, item.name)
        if item.name in ("run_id", "run_dir", "output_dir"):
            continue
        if isinstance(value, str):
            escaped[item.name] = untrusted.md_text(value)
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            escaped[item.name] = [untrusted.md_text(v) for v in value]
    if row.runs:
        escaped["runs"] = [markdown_row(run) for run in row.runs]
    return replace(row, **escaped)


def report_markdown(report_input: ReportInput, rows: Sequence[PointRow], figures: Sequence[str],
                    single_run: RunData | None = None, decision: Decision | None = None) -> str:
    """report.md: what was measured, the decision, the trade-off, the problems, the figures."""
    decision = decision if decision is not None else decide_rows(rows)
    rows = [markdown_row(row) for row in rows]
    lines = [f"# Report: {untrusted.md_text(report_input.root.name)}", ""]
    if (objectives := sorted({r.objective for r in rows if r.objective})):
        lines.append(f"Objective (your own training; in the iter ms columns): {'; '.join(objectives)}.")
        lines.append("")
    completed = sum(r.status == COMPLETED for r in rows)
    lines.append(f"{len(rows)} point(s), {completed} completed. Source: `{report_input.root}`"
                 + (f" ({_sweep_text(report_input.sweep)})" if report_input.sweep else "") + ".")
    lines.append("")
    lines.extend(decision_lines(decision, rows, report_input.root))
    lines.extend(interval_table(decision, rows))
    lines.append("")
    lines.append("## Trade-off")
    lines.append("")
    lines.extend(trade_off_lines(trade_off(rows), rows))
    lines.append("")
    lines.append("## Points")
    lines.append("")
    lines.extend(_markdown_table(rows, decision.winner))
    problem_rows = [r for r in rows if r.problems or r.status != COMPLETED]
    if problem_rows:
        lines.append("")
        lines.append("## Problems")
        lines.append("")
        for row in problem_rows:
            detail = "; ".join(row.problems) or (
                "not run yet (fab sweep --resume finishes it)" if row.status == NOT_RUN else "no detail recorded")
            lines.append(f"- {row.label} ({untrusted.md_code(row.run_id or '-')}): status {row.status}; {detail}")
    lines.extend(_effective_lines(rows))
    lines.extend(_straggler_lines(rows))
    lines.extend(_clock_lines(rows))
    lines.extend(_communication_lines(rows))
    for row in rows:
        if row.run_dir and (section := _hang_section(Path(row.run_dir))):
            lines.extend(["", section.rstrip("\n")])
    if report_input.sweep is not None:
        lines.extend(_sweep_timing_lines(report_input.sweep))
    if single_run is not None and len(single_run.steps_by_rank) > 1:
        lines.append("")
        lines.extend(_per_rank_lines(single_run))
    if figures:
        lines.append("")
        lines.append("## Figures")
        lines.append("")
        for name in figures:
            lines.append(f"![{name}]({name})")
    lines.append("")
    return "\n".join(lines)


def _effective_lines(rows: Sequence[PointRow]) -> list[str]:
    """Did each point run with what it names? Read back from NCCL, not assumed."""
    read = [r for r in rows if r.settings_flag is not None]
    if not read:
        return []
    lines = ["", "## Effective settings", ""]
    for row in read:
        built = (f"NCCL built {_fmt_int(row.effective_channels)} channels, threads "
                 f"{row.effective_threads or 'not reported'}"
                 + (f", {row.effective_algorithms}" if row.effective_algorithms else "")
                 + (f", via {row.effective_transports}" if row.effective_transports else "")
                 + "".join(f", {name} read as {value}" for name, value in row.effective_env.items()))
        if row.settings_flag:
            lines.append(f"- **{row.label}: FLAGGED**: {built}; " + "; ".join(row.settings_flags) + ".")
        else:
            lines.append(f"- {row.label}: as asked ({built}).")
    return lines


def _straggler_lines(rows: Sequence[PointRow]) -> list[str]:
    """Who held each point back: the rank the others waited for, not an average."""
    named = [r for r in rows if r.slowest_rank is not None and (r.world_size or 0) > 1]
    if not named:
        return []
    lines = ["", "## Stragglers", ""]
    for row in named:
        who = f"rank {row.slowest_rank}" + (f" ({row.slowest_host})" if row.slowest_host else "")
        if row.slowest_by == "caused_wait":
            text = (f"- {row.label}: slowest {who}: the others waited "
                    f"{_fmt(row.caused_wait_ms_median, '.3g')} ms per step for it (median); "
                    f"wait per rank and step p50 {_fmt(row.wait_ms_median, '.3g')} ms, "
                    f"p95 {_fmt(row.wait_ms_p95, '.3g')} ms")
        else:
            text = (f"- {row.label}: slowest {who} by median iteration time "
                    f"({_fmt(None if row.rank_spread is None else (row.rank_spread - 1) * 100, '.1f')} % "
                    f"above the fastest rank)")
        text += (f"; iteration p50 {_fmt(row.iter_ms_median, '.2f')} ms, p95 "
                 f"{_fmt(row.iter_ms_p95, '.2f')} ms, slowest rank per step p95 "
                 f"{_fmt(row.slowest_step_ms_p95, '.2f')} ms")
        if row.outlier_steps:
            text += f"; outlier steps {row.outlier_steps}"
        lines.append(text + ".")
    return lines


def _clock_lines(rows: Sequence[PointRow]) -> list[str]:
    """Points whose measured steps ran at another SM clock than their GEMM-only calibration."""
    read = [r for r in rows if r.clock_drift is not None]
    if not read:
        return []
    lines = ["", "## Clocks", ""]
    flagged = [r for r in read if r.clock_flag]
    for row in flagged:
        lines.append(f"- **{row.label}: clocks differed from the calibration**: measured steps ran "
                     f"at {_signed(row.clock_drift * 100 if row.clock_drift is not None else None, ' %')} "
                     f"SM clock against the GEMM-only steps (median "
                     f"{_fmt(row.sm_clock_mhz_median, '.0f')} MHz): its contention figures compare two "
                     "power states.")
    if not flagged:
        lines.append(f"Every point's measured steps ran within tolerance of their calibration's SM "
                     f"clock ({len(read)} point(s) read).")
    return lines


def _communication_lines(rows: Sequence[PointRow]) -> list[str]:
    """Collective time against what the ranks saw, the launch delay, and why figures are null."""
    shown = [r for r in rows if r.collective_ms_median is not None or r.notes
             or r.launch_delay_ms_median is not None]
    if not shown:
        return []
    lines = ["", "## Communication", ""]
    for row in shown:
        parts = [f"collective {_fmt(row.collective_ms_median, '.3g')} ms per step from stream "
                 f"events, {_fmt(row.kernel_collective_ms_median, '.3g')} ms kernel-active (p50, "
                 f"rank skew left out; kernel-active busbw "
                 f"{_fmt(row.kernel_busbw_gbps_median, '.3g')} GB/s; local busbw with waits "
                 f"{_fmt(row.local_busbw_gbps_median, '.3g')} GB/s)",
                 (f"launch delay of the first collective {_fmt(row.launch_delay_ms_median, '.3g')} ms"
                  if row.launch_delay_ms_median is not None or not row.launch_delay_reason
                  else f"launch delay not measured ({row.launch_delay_reason})"),
                 f"control all-reduce {_fmt(row.control_ms_median, '.3g')} ms"]
        if row.reduce_local_ms_median is not None:
            parts.append(f"local sum {_fmt(row.reduce_local_ms_median, '.3g')} ms")
        if row.comm_stream_priority:
            parts.append(f"comm stream priority {row.comm_stream_priority}")
        parts += row.notes
        lines.append(f"- {row.label}: " + "; ".join(parts) + ".")
    return lines


MD_COLUMNS = (
    ("channels", "channels", None), ("threads", "threads", None), ("nodes", "nodes", None),
    ("world", "world_size", None), ("status", "status", None), ("steps", "steps", None),
    ("iter ms p50", "iter_ms_median", ".2f"), ("iter ms p90", "iter_ms_p90", ".2f"),
    ("GEMM TFLOP/s", "gemm_tflops_median", ".3g"), ("contention", "contention_slowdown_median", "pct"),
    ("exposed comm", "exposed_comm_fraction_median", "pct"), ("busbw GB/s", "busbw_gbps_median", ".3g"),
    ("wait ms p95", "wait_ms_p95", ".3g"), ("slowest rank", "slowest_rank", None),
)
# The terminal table's share of them: it must fit an 80-column terminal (the stragglers are
# printed below it).
TERMINAL_MD_COLUMNS = MD_COLUMNS[:12]


def table_cells(row: PointRow, columns: Sequence[tuple[str, str, str | None]] = MD_COLUMNS) -> list[str]:
    """The row formatted for people (shared by report.md and the terminal table)."""
    cells = []
    for _, attribute, spec in columns:
        value = getattr(row, attribute)
        if spec == "pct":
            cells.append(_pct(value))
        elif spec:
            cells.append(_fmt(value, spec))
        else:
            cells.append("-" if value is None else str(value))
    return cells


def table_headers() -> list[str]:
    return [header for header, _, _ in MD_COLUMNS]


def _markdown_table(rows: Sequence[PointRow], best: str | None = None) -> list[str]:
    lines = ["| " + " | ".join(table_headers()) + " |",
             "|" + "|".join("---" if attribute == "status" else "---:" for _, attribute, _ in MD_COLUMNS) + "|"]
    for row in rows:
        cells = table_cells(row)
        if row.label == best:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


PER_RANK_SUMMARY = (
    ("wait ms p50", "wait_ms_median", ".3g"), ("wait ms p95", "wait_ms_p95", ".3g"),
    ("others waited ms/step", "caused_wait_ms_median", ".3g"),
    ("arrived last", "last_arrival_fraction", "pct"), ("compute ms", "compute_ms_median", ".3g"),
    ("exposed comm ms", "exposed_comm_ms_median", ".3g"),
    ("contention", "contention_slowdown_median", "pct"),
)


def _per_rank_lines(data: RunData) -> list[str]:
    """Every rank's own figures: the summary's per-rank entries where it has them."""
    per_rank = {}
    for entry in _get(_summary_aggregates(data.summary), "per_rank") or []:
        if isinstance(entry, Mapping) and _integer(entry.get("rank")) is not None:
            per_rank[_integer(entry.get("rank"))] = entry
    extra = PER_RANK_SUMMARY if per_rank else ()
    headers = ["rank", "host", "steps", "iter ms p50", "iter ms p95", "iter ms max",
               *(h for h, _, _ in extra)]
    lines = ["## Per rank", "", "| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if h == "host" else "---:" for h in headers) + "|"]
    for rank, steps in sorted(data.steps_by_rank.items()):
        values = [line.get("iter_ms") for line in steps]
        numbers = [v for v in (_number(x) for x in values) if v is not None]
        entry = per_rank.get(rank, {})
        cells = [str(rank), untrusted.md_text(entry.get("host") or "-"), str(len(steps)),
                 _fmt(quantile(values, 50), ".2f"), _fmt(quantile(values, 95), ".2f"),
                 _fmt(max(numbers) if numbers else None, ".2f")]
        for _, key, spec in extra:
            value = _number(entry.get(key))
            cells.append(_pct(value) if spec == "pct" else _fmt(value, spec))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _hang_section(run_dir: Path) -> str:
    """The hang diagnostics of a run (fab launch's watchdog writes <run dir>/hang/), or ""."""
    if not (run_dir / "hang").is_dir():
        return ""
    try:
        from tasks.lib.diagnostics import hang_summary_markdown

        return hang_summary_markdown(run_dir)
    except Exception as err:  # noqa: BLE001 - a broken diagnostics file must not stop the report
        return f"## Hang: {run_dir.name}\n\nhang/ diagnostics unreadable: {type(err).__name__}: {err}\n"


DEAD_TIME_LABELS = (
    ("gap_s", "sweep's own gap (previous launch returned → next launch called)"),
    ("cleanup_wait_s", "wait until no process of the run was left on any host"),
    ("idle_s", "idle between points (last measured step → next point's first)"),
    ("startup_s", "launch start-up (launch called → first measured step)"),
    ("teardown_s", "teardown (last measured step → launch returned)"),
    ("teardown.train_end_s", "… train's end: launch-delay sampling, gather, summary.json"),
    ("teardown.exit_s", "… ranks' and torchrun's exit until the launch's watch saw every node end"),
    ("teardown.collect_s", "… collecting the nodes' outputs"),
    ("teardown.finish_s", "… flight-recorder dumps, headline, run.json"),
    ("teardown.report_s", "… the run's report (results.csv, report.md, plots)"),
)


def _sweep_timing_lines(sweep: Mapping[str, Any]) -> list[str]:
    dead = sweep.get("dead_time")
    if not isinstance(dead, Mapping) or not dead:
        return []
    lines = ["", "## Sweep timing", "", "| between points | median s | max s | n |", "|---|---:|---:|---:|"]
    for key, label in DEAD_TIME_LABELS:
        figures = dead.get(key)
        if isinstance(figures, Mapping):
            lines.append(f"| {label} | {_fmt(_number(figures.get('median')), '.2f')} | "
                         f"{_fmt(_number(figures.get('max')), '.2f')} | {figures.get('n', '-')} |")
    account = sweep.get("wall_account")
    if isinstance(account, Mapping) and _number(account.get("ratio")) is not None:
        lines += ["", f"Wall time of the points {_fmt(_number(account.get('wall_s')), '.1f')} s for "
                      f"{_fmt(_number(account.get('work_s')), '.1f')} s of work (one start-up per "
                      "launch, each point's warm-up, calibration and measured steps): "
                      f"{_fmt(_number(account.get('ratio')), '.2f')}×."]
    return lines


def _grid_text(sweep: Mapping[str, Any] | None, key: str) -> str:
    values = _get(sweep, "grid", key)
    return ",".join(str(v) for v in values) if isinstance(values, list) else "?"


def _sweep_text(sweep: Mapping[str, Any]) -> str:
    """'sweep of channels 4,32 × threads 256,512 × NCCL_PROTO Simple,LL128, 3 runs per point'."""
    axes = [f"channels {_grid_text(sweep, 'channels')}", f"threads {_grid_text(sweep, 'threads')}"]
    for axis in _get(sweep, "grid", "axes") or []:
        if isinstance(axis, Mapping) and isinstance(axis.get("values"), list):
            axes.append(f"{axis.get('name')} {','.join(str(v) for v in axis['values'])}")
    text = f"{sweep.get('kind') or 'sweep'} of " + " × ".join(axes)
    repeat = _integer(_get(sweep, "grid", "repeat"))
    if repeat and repeat > 1:
        seed = _get(sweep, "grid", "seed")
        text += f", {repeat} runs per point in shuffled rounds (seed {seed})"
    return text
