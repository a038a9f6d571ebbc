"""The report's conclusion in words: the decision (a best point, or the set that cannot be told
apart), every point's interval, and the busbw/contention trade-off with its Pareto front."""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from tasks.lib.report.decide import (
    NO_POINT, ONLY_POINT, UNDECIDED, WINNER, Decision, TradeOff, pareto_front, reciprocal,
)
from tasks.lib.report.read import COMPLETED
from tasks.lib.untrusted import md_code, md_text
from tasks.lib.report.rows import PointRow
from tasks.lib.report.values import _fmt, _fmt_int, _pct, _signed


def by_label(rows: Sequence[PointRow]) -> dict[str, PointRow]:
    return {row.label: row for row in rows}


def interval_text(row: PointRow, decision: Decision | None = None) -> str:
    """'3.78 ms (95 % CI 3.70–3.85, 3 runs, run-to-run spread 1.2 %)'."""
    interval = (decision.compared.get(row.label) if decision else None) or row.interval
    if interval is not None and interval is not row.interval and row.objective_goal == "max":
        interval = reciprocal(interval)   # compared as 1/x (decide.reciprocal); shown as measured
    if interval is None:
        return f"{_fmt(row.iter_ms_median, '.2f')} ms (no interval)"
    runs = f"{interval.runs} run" + ("s" if interval.runs != 1 else "")
    spread = interval.run_spread
    widened = decision is not None and row.interval is not None and interval is not row.interval
    return (f"{interval.estimate:.2f} ms ({interval.level * 100:g} % CI {interval.low:.2f}–{interval.high:.2f}"
            + (" with the pooled run-to-run noise" if widened else "")
            + f", {runs}" + (f", run-to-run spread {spread * 100:.1f} %" if spread is not None else "") + ")")


def where_text(row: PointRow, root: Path) -> str:
    """The point's own output directories (one per run), relative to the report's source; a
    rank-pool run says so (its run directory is the pool launch's, shared with other points)."""
    places = []
    for run in row.runs or [row]:
        path = run.output_dir or run.run_dir
        if not path:
            continue
        shown = os.path.relpath(path, root) if os.path.isabs(path) else path
        text = md_code(shown)
        if run.pooled:
            text += f" (one point of the rank-pool launch {md_code(run.run_id)})"
        places.append(text)
    if not places:
        return "no output directory"
    return ("output: " if len(places) == 1 else f"outputs of its {len(places)} runs: ") + "; ".join(places)


def decision_lines(decision: Decision, rows: Sequence[PointRow], root: Path) -> list[str]:
    """The "## Decision" section."""
    named = by_label(rows)
    lines = ["## Decision", ""]
    if decision.status == NO_POINT:
        lines.append("No completed point with unflagged settings and metrics: **no best point**.")
    elif decision.status == WINNER:
        best = named[decision.winner]  # type: ignore[index]
        runner = named.get(decision.runner_up or "")
        lines.append(
            f"**Best point: {best.label}** ({_settings_text(best)}): median iteration "
            f"{interval_text(best, decision)}, ahead of the runner-up "
            + (f"{runner.label} ({interval_text(runner, decision)})" if runner else "-")
            + f" by {_fmt(None if decision.margin is None else decision.margin * 100, '.1f')} %: the "
            f"intervals are {_fmt(decision.gap_ms, '.2f')} ms apart. GEMM "
            f"{_fmt(best.gemm_tflops_median, '.3g')} TFLOP/s, contention slowdown "
            f"{_pct(best.contention_slowdown_median)} (overlapped GEMMs "
            f"{_pct(best.gemm_contention_slowdown_median)}), exposed communication "
            f"{_pct(best.exposed_comm_fraction_median)}, busbw {_fmt(best.busbw_gbps_median, '.3g')} GB/s, "
            f"wait p95 {_fmt(best.wait_ms_p95, '.3g')} ms; {where_text(best, root)}.")
    elif decision.status == ONLY_POINT:
        only = named[decision.leader]  # type: ignore[index]
        lines.append(f"One point: {only.label} at {interval_text(only, decision)}; nothing to compare "
                     f"it with, so no best point is named; {where_text(only, root)}.")
    else:
        leader = named[decision.leader]  # type: ignore[index]
        head = ("**No decision**: " + decision.reason if decision.status == UNDECIDED
                else f"**No single best point**: {len(decision.within_noise)} points within noise")
        lines.append(head + ": " + "; ".join(
            f"{key} {interval_text(named[key], decision)}" for key in decision.within_noise) + ".")
        lines.append("")
        lines.append(f"Leader by median: {leader.label} ({where_text(leader, root)}), but it is not "
                     "ahead of the others beyond the noise"
                     + (f" (runner-up {decision.runner_up}, {decision.margin * 100:+.1f} %)"
                        if decision.margin is not None else "") + ".")
        if decision.secondary_pick:
            pick = named[decision.secondary_pick]
            lines.append("")
            lines.append(f"Pick by secondary criterion ({decision.secondary_rule}): **{pick.label}**; "
                         f"`fab report {root} --export FILE --pick {pick.selector}` carries it out.")
    if decision.excluded:
        lines.append("")
        # A reason quotes the point's status or flags: a node's words, escaped like the rows'.
        lines.append("Never chosen: " + "; ".join(f"{key} ({md_text(why)})" for key, why in decision.excluded.items())
                     + ".")
    lines.append("")
    lines.append(f"Rule: the objective is the iteration time; a point is named best only when its "
                 f"{decision.level * 100:g} % bootstrap interval (runs and steps resampled) lies below every "
                 f"other eligible point's and the runner-up is at least {decision.min_margin * 100:g} % slower "
                 "(docs/METRICS.md, The decision).")
    return lines


def _settings_text(row: PointRow) -> str:
    parts = [f"channels={_fmt_int(row.channels)}", f"threads={_fmt_int(row.threads)}"]
    return ", ".join(parts + [f"{k}={v}" for k, v in row.settings.items()])


def interval_table(decision: Decision, rows: Sequence[PointRow]) -> list[str]:
    """Every point's median, interval and spread, leader first."""
    shown = [r for r in rows if r.interval is not None or r.runs]
    if not shown:
        return []
    leader = decision.compared.get(decision.leader or "")
    order = {key: i for i, key in enumerate(decision.within_noise)}

    def sort_key(row: PointRow) -> tuple[int, float]:
        estimate = row.interval.estimate if row.interval else float("inf")
        return (order.get(row.label, len(order)), estimate)

    lines = ["", "## Iteration time per point", "",
             "| point | runs | median ms | 95 % CI ms | run-to-run spread | vs leader | verdict |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for row in sorted(shown, key=sort_key):
        interval = decision.compared.get(row.label) or row.interval
        done = sum(r.status == COMPLETED for r in row.runs) if row.runs else int(row.status == COMPLETED)
        planned = row.runs_planned or max(len(row.runs), 1)
        spread = interval.run_spread if interval else None
        versus = (interval.estimate / leader.estimate - 1) * 100 if interval and leader and leader.estimate else None
        lines.append(f"| {row.label} | {done}/{planned} | {_fmt(interval.estimate if interval else None, '.2f')} | "
                     + (f"{interval.low:.2f}–{interval.high:.2f}" if interval else "-")
                     + f" | {_pct(spread)} | {_signed(versus, ' %') if versus is not None else '-'} | "
                     f"{md_text(verdict(decision, row))} |")  # its reason may quote a node's status
    return lines


def verdict(decision: Decision, row: PointRow) -> str:
    """One word for the point's place in the decision (results.csv's `decision` column too)."""
    if row.label in decision.excluded:
        return "not chosen: " + decision.excluded[row.label]
    if decision.winner == row.label:
        return "best"
    if row.label in decision.within_noise:
        if decision.status == ONLY_POINT:
            return "only point"
        return "leader, within noise" if row.label == decision.leader else "within noise"
    if row.label in decision.compared:
        return "slower beyond noise"
    return ""


def trade_off_lines(result: TradeOff | None, rows: Sequence[PointRow]) -> list[str]:
    """The trade-off view: busbw against contention, and the Pareto front of (contention
    slowdown, exposed communication), both lower-is-better."""
    if result is None:
        lines = ["Not enough completed points with busbw and contention figures for a busbw trade-off "
                 "(busbw is null at world size 1: no data crosses ranks)."]
    else:
        high, low = result.highest_busbw, result.lowest_contention
        lines = [
            f"- Highest busbw: **{high.label}**: {_fmt(high.busbw_gbps_median, '.3g')} GB/s, "
            f"contention slowdown {_pct(high.contention_slowdown_median)}, iteration {_fmt(high.iter_ms_median, '.2f')} ms.",
            f"- Lowest contention: **{low.label}**: contention slowdown {_pct(low.contention_slowdown_median)}, "
            f"busbw {_fmt(low.busbw_gbps_median, '.3g')} GB/s, iteration {_fmt(low.iter_ms_median, '.2f')} ms.",
        ]
        if result.same_point:
            lines.append("- The same point gives both: no trade-off in this grid.")
        else:
            lines.append(
                f"- How far apart: the highest-busbw point moves {_signed(result.busbw_gain_pct, ' %')} busbw "
                f"for {_signed(result.contention_delta_pp, ' pp')} GEMM slowdown and "
                f"{_signed(result.iter_ms_delta_pct, ' %')} iteration time against the lowest-contention point "
                f"(channels {_fmt_int(low.channels)} → {_fmt_int(high.channels)}, "
                f"threads {_fmt_int(low.threads)} → {_fmt_int(high.threads)}).")
    front = pareto_front(rows)
    if len(front) >= 1 and sum(r.status == COMPLETED for r in rows) > 1:
        lines.append("- Pareto front of (contention slowdown, exposed communication), no point better on "
                     "both: " + "; ".join(f"{r.label} ({_pct(r.contention_slowdown_median)}, "
                                          f"{_pct(r.exposed_comm_fraction_median)})" for r in front)
                     + ". The objective stays the iteration time: the front shows what each point trades.")
    return lines
