"""What the report concludes from the rows: a best point only where it is ahead beyond the noise,
else the set of points that cannot be told apart; the busbw/contention trade-off and its Pareto front.

The rule (docs/METRICS.md, "The decision"): the objective is the iteration time (the end-to-end
step: GEMM slowdown plus exposed communication). Every eligible point (all its runs completed,
its effective settings not flagged) gets a 95 % bootstrap interval over its runs and steps
(tasks/lib/report/stats.py). The leader is the point with the lowest median; it is named the
best point only when its interval lies wholly below every other eligible point's interval AND
the runner-up is slower by at least `min_margin` (1 % by default: what repeats taken minutes
apart cannot see, clocks and temperature, moves a GPU's step time by about that much). Two 95 %
intervals that do not overlap mean a difference well beyond a 5 % test (about 0.6 % for equal
widths), which leaves room for the several comparisons a grid makes; the rule errs towards "no
winner", which is what a user can defend.

A point measured once has no run-to-run noise of its own: its interval is widened by the
run-to-run spread pooled over the points that were repeated (the same sweep, the same nodes);
where no point was repeated, single runs decide nothing: the report says so.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tasks.lib.report.stats import LEVEL, Interval

from tasks.lib.report.read import COMPLETED
from tasks.lib.report.rows import PointRow


def best_point(rows: Sequence[PointRow]) -> PointRow | None:
    """The completed point with the lowest median iteration time (ties: lower p90); the highest
    where the rows hold an objective named higher-is-better (max:)."""
    candidates = [r for r in rows if r.status == COMPLETED and r.iter_ms_median is not None]
    if not candidates:
        return None
    if all(r.objective_goal == "max" for r in candidates):
        return max(candidates, key=lambda r: r.iter_ms_median)
    return min(candidates, key=lambda r: (r.iter_ms_median, r.iter_ms_p90 if r.iter_ms_p90 is not None else math.inf))


@dataclass
class TradeOff:
    highest_busbw: PointRow
    lowest_contention: PointRow

    @property
    def same_point(self) -> bool:
        return self.highest_busbw is self.lowest_contention

    @property
    def busbw_gain_pct(self) -> float | None:
        """How much more bus bandwidth the highest-busbw point gets than the lowest-contention one."""
        low, high = self.lowest_contention.busbw_gbps_median, self.highest_busbw.busbw_gbps_median
        return None if not low or high is None else (high / low - 1.0) * 100.0

    @property
    def contention_delta_pp(self) -> float | None:
        """Extra GEMM slowdown of the highest-busbw point, in percentage points."""
        high, low = self.highest_busbw.contention_slowdown_median, self.lowest_contention.contention_slowdown_median
        return None if high is None or low is None else (high - low) * 100.0

    @property
    def iter_ms_delta_pct(self) -> float | None:
        base, other = self.lowest_contention.iter_ms_median, self.highest_busbw.iter_ms_median
        return None if not base or other is None else (other / base - 1.0) * 100.0


def trade_off(rows: Sequence[PointRow]) -> TradeOff | None:
    completed = [r for r in rows if r.status == COMPLETED]
    # busbw is 0 where no data crosses ranks (world size 1): no bandwidth to trade.
    with_busbw = [r for r in completed if r.busbw_gbps_median]
    with_contention = [r for r in completed if r.contention_slowdown_median is not None]
    if not with_busbw or not with_contention:
        return None
    return TradeOff(
        highest_busbw=max(with_busbw, key=lambda r: r.busbw_gbps_median),
        lowest_contention=min(with_contention, key=lambda r: r.contention_slowdown_median),
    )


# -- the decision ---------------------------------------------------------------------------------

MIN_MARGIN = 0.01
MIN_RUNS = 2
Z_95 = 1.959964

WINNER = "winner"          # one point ahead of every other beyond the noise
WITHIN_NOISE = "within_noise"   # several points cannot be told apart
UNDECIDED = "undecided"    # not enough runs to know the noise
ONLY_POINT = "only_point"  # one eligible point: nothing to compare
NO_POINT = "no_point"      # no eligible point


@dataclass
class Candidate:
    """One point as the decision sees it: its interval, whether it may be chosen, and its key
    for the secondary criterion (lower is preferred) among points that cannot be told apart."""

    key: str
    interval: Interval | None
    why_not: str | None = None          # set: never chosen (flagged, a run failed, no metrics)
    secondary: tuple[float, ...] = ()

    @property
    def eligible(self) -> bool:
        return self.why_not is None and self.interval is not None


@dataclass
class Decision:
    status: str
    leader: str | None = None                 # lowest median among the eligible points
    winner: str | None = None                 # set only when status is WINNER
    runner_up: str | None = None
    margin: float | None = None               # runner-up's median / leader's - 1
    gap_ms: float | None = None               # runner-up's low - leader's high (>0: separate)
    within_noise: list[str] = field(default_factory=list)   # leader first, then by median
    secondary_pick: str | None = None
    secondary_rule: str = ""
    excluded: dict[str, str] = field(default_factory=dict)  # key -> why it is never chosen
    compared: dict[str, Interval] = field(default_factory=dict)   # intervals used (widened)
    run_noise: float | None = None            # pooled run-to-run spread (relative sd)
    reason: str = ""
    level: float = LEVEL
    min_margin: float = MIN_MARGIN

    @property
    def decided(self) -> bool:
        return self.status == WINNER


def pooled_run_noise(intervals: Sequence[Interval]) -> float | None:
    """The run-to-run standard deviation relative to the median, pooled (root mean square) over
    the points that have at least MIN_RUNS runs; None when none has."""
    variances = []
    for interval in intervals:
        medians = interval.run_medians
        if len(medians) >= MIN_RUNS and interval.estimate:
            mean = sum(medians) / len(medians)
            variance = sum((m - mean) ** 2 for m in medians) / (len(medians) - 1)
            variances.append(variance / interval.estimate ** 2)
    return math.sqrt(sum(variances) / len(variances)) if variances else None


def widened(interval: Interval, run_noise: float) -> Interval:
    """A single run's interval with the pooled run-to-run noise added (half-widths in quadrature)."""
    extra = Z_95 * run_noise * interval.estimate
    below = math.hypot(interval.estimate - interval.low, extra)
    above = math.hypot(interval.high - interval.estimate, extra)
    return Interval(interval.estimate, interval.estimate - below, interval.estimate + above,
                    interval.runs, interval.steps, interval.run_medians, interval.level)


def decide(candidates: Sequence[Candidate], *, min_margin: float = MIN_MARGIN,
           secondary_rule: str = "") -> Decision:
    """The decision over the candidates (see the module docstring)."""
    excluded = {c.key: (c.why_not or "no iteration times") for c in candidates if not c.eligible}
    eligible = sorted((c for c in candidates if c.eligible),
                      key=lambda c: (c.interval.estimate, c.key))  # type: ignore[union-attr]
    decision = Decision(NO_POINT, excluded=excluded, secondary_rule=secondary_rule, min_margin=min_margin)
    if not eligible:
        decision.reason = "no point completed all its runs with unflagged settings: no best point"
        return decision
    noise = pooled_run_noise([c.interval for c in eligible])  # type: ignore[misc]
    decision.run_noise = noise
    compared: dict[str, Interval] = {}
    unresolved = []
    for c in eligible:
        interval: Interval = c.interval  # type: ignore[assignment]
        if interval.runs < MIN_RUNS:
            if noise is None:
                unresolved.append(c.key)
            else:
                interval = widened(interval, noise)
        compared[c.key] = interval
    decision.compared = compared
    leader = eligible[0]
    decision.leader = leader.key
    best = compared[leader.key]
    if len(eligible) == 1:
        decision.status = ONLY_POINT
        decision.within_noise = [leader.key]
        decision.reason = "one eligible point: nothing to compare it with"
        return decision
    runner = eligible[1]
    decision.runner_up = runner.key
    decision.margin = compared[runner.key].estimate / best.estimate - 1.0 if best.estimate else None
    decision.gap_ms = compared[runner.key].low - best.high
    if leader.key in unresolved:
        decision.status = UNDECIDED
        decision.within_noise = [c.key for c in eligible]
        decision.reason = ("one run per point: the run-to-run noise is unknown, so no point can be "
                           "told ahead of another (run the sweep with --repeat 3)")
        _secondary(decision, eligible)
        return decision

    def close(c: Candidate) -> bool:
        interval = compared[c.key]
        return (c.key in unresolved or interval.low <= best.high
                or interval.estimate < best.estimate * (1.0 + min_margin))

    decision.within_noise = [leader.key] + [c.key for c in eligible[1:] if close(c)]
    if len(decision.within_noise) == 1:
        decision.status = WINNER
        decision.winner = leader.key
        decision.reason = (f"ahead of the runner-up {runner.key} by {decision.margin * 100:.1f} %"
                           if decision.margin is not None else "ahead of every other point")
        return decision
    decision.status = WITHIN_NOISE
    decision.reason = (f"{len(decision.within_noise)} points within noise (their {LEVEL * 100:g} % intervals "
                       f"overlap the leader's, or they are less than {min_margin * 100:g} % slower)")
    _secondary(decision, [c for c in eligible if c.key in decision.within_noise])
    return decision


SECONDARY_RULE = ("fewest channels × threads (the least of the GPU given to communication), "
                  "then the smallest run-to-run spread")


def decide_rows(rows: Sequence[PointRow], *, min_margin: float = MIN_MARGIN) -> Decision:
    """The decision over the report's point rows (one per configuration)."""
    return decide([row_candidate(row) for row in rows], min_margin=min_margin,
                  secondary_rule=SECONDARY_RULE)


def reciprocal(interval: Interval) -> Interval:
    """A higher-is-better objective (a throughput, `--metric max:...`) as the time it stands for:
    1/x keeps the order reversed and the median (a monotone map), so the rule, margins included
    (leader's throughput over the runner-up's), reads the same. Its own inverse."""
    return Interval(1.0 / interval.estimate, 1.0 / interval.high, 1.0 / interval.low, interval.runs,
                    interval.steps, tuple(1.0 / m for m in interval.run_medians), interval.level)


def row_candidate(row: PointRow) -> Candidate:
    why_not = None
    interval = row.interval
    if row.objective_goal == "max" and interval is not None:
        if interval.low > 0 and all(m > 0 for m in interval.run_medians):
            interval = reciprocal(interval)
        else:
            why_not = "a higher-is-better objective with values <= 0: not comparable"
    if row.status != COMPLETED:
        why_not = (f"only {sum(r.status == COMPLETED for r in row.runs)} of {row.runs_planned} runs "
                   "completed" if row.status == "partial" else f"status {row.status}")
    elif why_not is None and row.settings_flag:
        why_not = "effective settings flagged: " + ("; ".join(row.settings_flags[:2]) or "see Effective settings")
    resources = (row.channels or 0) * (row.threads or 0) or math.inf
    spread = row.interval.run_spread if row.interval is not None else None
    return Candidate(row.label, interval, why_not,
                     (float(resources), spread if spread is not None else math.inf))


def _secondary(decision: Decision, tied: Sequence[Candidate]) -> None:
    if tied and any(c.secondary for c in tied):
        decision.secondary_pick = min(tied, key=lambda c: (c.secondary, c.key)).key


# -- the trade-off view: contention against exposed communication -----------------------------

def pareto_front(rows: Sequence[PointRow],
                 objectives: Callable[[PointRow], tuple[float | None, float | None]] = (
                     lambda r: (r.contention_slowdown_median, r.exposed_comm_fraction_median)),
                 ) -> list[PointRow]:
    """The completed rows no other completed row beats on both objectives (lower is better on
    each, ties kept), ordered by the first objective."""
    scored = [(row, objectives(row)) for row in rows if row.status == COMPLETED]
    scored = [(row, (a, b)) for row, (a, b) in scored if a is not None and b is not None]
    front = []
    for row, (a, b) in scored:
        dominated = any((x <= a and y <= b) and (x < a or y < b) for other, (x, y) in scored
                        if other is not row)
        if not dominated:
            front.append((a, b, row))
    return [row for _, _, row in sorted(front, key=lambda item: (item[0], item[1]))]
