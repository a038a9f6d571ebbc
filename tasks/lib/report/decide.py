"""What the report concludes from the rows: the best point and the busbw/contention trade-off."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tasks.lib.report.read import COMPLETED
from tasks.lib.report.rows import PointRow


def best_point(rows: Sequence[PointRow]) -> PointRow | None:
    """The completed point with the lowest median iteration time (ties: lower p90)."""
    candidates = [r for r in rows if r.status == COMPLETED and r.iter_ms_median is not None]
    if not candidates:
        return None
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
