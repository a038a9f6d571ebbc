"""The report of a run or a sweep, by what each part does: reading run directories (read), one
row per point (rows), deciding (decide), writing results.csv and report.md (write); the figures
are plots.py, and outputs.py writes a report's files. Pure: no network, no torch, no matplotlib
(plots imports it itself, and only outputs imports plots, when a report is drawn).

The names other modules use are re-exported here, so `from tasks.lib import report as rep` and
`rep.read_run(...)` keep working whatever module a function lives in.
"""
from __future__ import annotations

from tasks.lib.report.decide import (
    MIN_MARGIN, NO_POINT, ONLY_POINT, UNDECIDED, WINNER, WITHIN_NOISE, Candidate, Decision, TradeOff, best_point,
    decide, decide_rows, pareto_front, trade_off,
)
from tasks.lib.report.repeats import PARTIAL, collect_points, group_points, point_row
from tasks.lib.report.stats import Interval, bootstrap_interval
from tasks.lib.report.read import (
    COMPLETED, METRICS_RE, MISSING, NON_MEASURED_PHASES, NOT_RUN, OUTPUT_DIR_RE, REPORT_MD, RESULTS_CSV,
    RUN_ID_RE, RUNS_CSV, SUMMARY_JSON, PointSource, ReportError, ReportInput, RunData, discover, error_line_in_logs,
    find_output_dirs, is_measured, read_json_file, read_jsonl_file, read_run, resolve_run_dir,
    sweep_point_source,
)
from tasks.lib.report.rows import (
    AGGREGATE_COLUMNS, CSV_FIELDS, RENAMED_SUMMARY_KEYS, PointRow, PointSpec, collect_rows, flag_shared_settings,
    missing_row, per_rank_step_times, summarize_run,
)
from tasks.lib.report.values import quantile
from tasks.lib.report.write import (
    MD_COLUMNS, TERMINAL_MD_COLUMNS, markdown_row, report_markdown, results_csv, table_cells, table_headers,
)

__all__ = [
    "MIN_MARGIN", "NO_POINT", "ONLY_POINT", "PARTIAL", "UNDECIDED", "WINNER", "WITHIN_NOISE", "Candidate", "Decision",
    "Interval", "bootstrap_interval", "collect_points", "decide", "decide_rows", "group_points",
    "pareto_front", "point_row", "RUNS_CSV",
    "AGGREGATE_COLUMNS", "RENAMED_SUMMARY_KEYS", "markdown_row", "COMPLETED", "CSV_FIELDS", "MD_COLUMNS", "METRICS_RE", "MISSING",
    "NON_MEASURED_PHASES", "NOT_RUN", "OUTPUT_DIR_RE", "REPORT_MD", "RESULTS_CSV", "RUN_ID_RE",
    "SUMMARY_JSON", "TERMINAL_MD_COLUMNS", "PointRow", "PointSource", "PointSpec", "ReportError",
    "ReportInput", "RunData", "TradeOff", "best_point", "collect_rows", "discover",
    "error_line_in_logs", "find_output_dirs", "flag_shared_settings", "is_measured", "missing_row",
    "per_rank_step_times", "quantile", "read_json_file", "read_jsonl_file", "read_run",
    "report_markdown", "resolve_run_dir", "results_csv", "summarize_run", "sweep_point_source",
    "table_cells", "table_headers", "trade_off",
]
