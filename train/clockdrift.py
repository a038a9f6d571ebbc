"""The clocks part of summary.json: telemetry distributions and the clock-drift flag (pure).

Every kind of step is read at the same phase, right after its synchronize (train.trainer), so
measured and GEMM-only calibration steps are compared at the end of a step under load. The
measured steps' median SM clock is compared with the calibration's; a difference is flagged
only when it exceeds both a floor and the calibration readings' own variation: a GPU whose
clock moves by 3 % between calibration steps says nothing by moving 3 % under contention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from train.intervals import percentile
from train.metrics import TELEMETRY_FIELDS, distribution, median

# Measured steps whose SM clock median differs from the GEMM-only calibration's by more than
# this, and by more than the calibration readings differ among themselves, are flagged: their
# contention figures compare two power states.
CLOCK_DRIFT_TOLERANCE = 0.02
# The calibration's own variation: this percentile of |reading / the rank's calibration median
# - 1| over every GEMM-only calibration reading of every block.
CALIBRATION_VARIATION_PERCENTILE = 90


def _rounded(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def telemetry_summary(reports: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]],
                      compute_cal: Sequence[Mapping[str, Any]],
                      comm_cal: Sequence[Mapping[str, Any]], sample_every: int) -> dict[str, Any]:
    """summary.json's telemetry section (docs/METRICS.md)."""
    described = reports[0].get("telemetry") if reports else None
    described = described if isinstance(described, Mapping) else {}

    def fields(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        return {f: distribution(s.get(f) for s in records) for f in TELEMETRY_FIELDS}

    train, calibration = fields(steps), fields(compute_cal)
    train_clock = (train["sm_clock_mhz"] or {}).get("median")
    cal_clock = (calibration["sm_clock_mhz"] or {}).get("median")
    drift = train_clock / cal_clock - 1.0 if train_clock and cal_clock else None
    variation = calibration_variation(reports)
    tolerance = max(CLOCK_DRIFT_TOLERANCE, variation or 0.0)
    return {
        "source": described.get("source"),
        "reason": described.get("reason"),
        "sources": sorted({str((r.get("telemetry") or {}).get("source")) for r in reports}),
        "sample_every": sample_every,
        "train": train,
        "calibration_compute": calibration,
        "calibration_comm": fields(comm_cal),
        "clock_drift": _rounded(drift),
        "clock_drift_flag": None if drift is None else abs(drift) > tolerance,
        "tolerance": _rounded(tolerance),
        "tolerance_floor": CLOCK_DRIFT_TOLERANCE,
        "calibration_variation": _rounded(variation),
        "phase": "end of step (read right after the step's synchronize), every kind of step",
    }


def calibration_variation(reports: Sequence[Mapping[str, Any]]) -> float | None:
    """How far GEMM-only calibration readings of the SM clock stray from their own rank's
    median (CALIBRATION_VARIATION_PERCENTILE of |reading / median - 1|, every block): a
    drift of the measured steps within this is no more than the calibration's own noise."""
    deviations = []
    for report in reports:
        clocks = [float(s["sm_clock_mhz"]) for s in report.get("calibration_compute", [])
                  if isinstance(s, Mapping) and isinstance(s.get("sm_clock_mhz"), (int, float))]
        centre = median(clocks)
        if centre:
            deviations += [abs(c / centre - 1.0) for c in clocks]
    return percentile(deviations, CALIBRATION_VARIATION_PERCENTILE)
