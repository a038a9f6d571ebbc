"""The cross-rank analysis and summary on crafted collective records (pure, no torch).

The records are built the way the ranks' clocks would see them: every collective ends at one
moment on every rank (the last arrival plus the transfer time), each rank's clock has its own
offset, and one rank reaches its first bucket late.
"""

from __future__ import annotations

from typing import Any

import pytest

from train.collectives import COMM_PHASE, TRAIN_PHASE, OpRecord, analyze, pack, timeline_lines
from train.metrics import WORLD_SIZE_ONE
from train.clockdrift import CLOCK_DRIFT_TOLERANCE
from train.summary import OUTLIER_FACTOR, aggregate

SIZE = 8_000_000  # bytes per bucket
TRANSFER = 2.0  # ms each all_reduce takes once every rank is there


def crafted(world: int, steps: int, *, late: int | None = None, delay: float = 0.0,
            offsets: list[float] | None = None, phase: str = TRAIN_PHASE,
            delayed_steps: set[int] | None = None) -> list[list[OpRecord]]:
    """Two buckets per step. Bucket 0 is ready 10 ms into the step (plus `delay` on the late
    rank); bucket 1 one ms later, before bucket 0 can end: it starts when bucket 0 ends."""
    offsets = offsets or [0.0] * world
    per_rank: list[list[OpRecord]] = [[] for _ in range(world)]
    for step in range(1, steps + 1):
        t = step * 100.0
        late_now = late is not None and (delayed_steps is None or step in delayed_steps)
        previous_end = [t] * world
        for bucket in range(2):
            ready = [t + 10 + bucket + (delay if late_now and r == late else 0.0)
                     for r in range(world)]
            start = [max(ready[r], previous_end[r]) for r in range(world)]
            end = max(start) + TRANSFER
            for r in range(world):
                o = offsets[r]
                per_rank[r].append(OpRecord(phase, step, bucket, "all_reduce", bucket, SIZE,
                                            start[r] - 0.5 + o, start[r] + o, end + o))
            previous_end = [end] * world
    return per_rank


def test_collective_time_is_the_last_arrivals_duration_and_the_others_wait() -> None:
    records = crafted(3, 4, late=2, delay=30.0, offsets=[0.0, 1234.5, -77.0])
    analysis = analyze(records, 3)
    assert analysis.ok
    for op in analysis.ops:
        assert op.collective_ms == pytest.approx(TRANSFER)
        if op.bucket == 0:
            assert op.last_rank == 2
            assert op.wait_ms == pytest.approx([30.0, 30.0, 0.0])
        else:
            assert op.wait_ms == pytest.approx([0.0, 0.0, 0.0])
    step = analysis.step(TRAIN_PHASE, 1)
    assert step is not None
    assert step.collective_ms == pytest.approx(2 * TRANSFER)
    # busbw from the collective time: 2 x 8 MB x 2(n-1)/n over 4 ms
    assert step.busbw_gbps() == pytest.approx(2 * SIZE * (4 / 3) / 4e-3 / 1e9)
    assert step.wait_ms == pytest.approx([30.0, 30.0, 0.0])
    assert step.caused_wait_ms == pytest.approx([0.0, 0.0, 60.0])
    assert step.waited_for_rank == 2
    # The clocks are recovered from the collectives' ends, whatever each rank's offset.
    assert analysis.offsets_ms == pytest.approx([0.0, 1234.5, -77.0])
    assert max(analysis.end_residual_ms) == pytest.approx(0.0, abs=1e-9)
    line = next(iter(timeline_lines(analysis)))
    assert line["start_ms"] == pytest.approx([110.0, 110.0, 140.0])  # on rank 0's clock
    assert line["enqueue_ms"] == pytest.approx([109.5, 109.5, 139.5])
    assert line["wait_ms"] == pytest.approx([30.0, 30.0, 0.0]) and line["last_rank"] == 2


def test_ranks_that_ran_different_collectives_are_not_paired() -> None:
    records = crafted(2, 3)
    records[1] = records[1][:-1]
    analysis = analyze(records, 2)
    assert not analysis.ok and "different steps" in (analysis.reason or "")
    assert not analyze(records[:1], 2).ok


def report(rank: int, world: int, *, late: int | None = None, delay: float = 0.0,
           steps: int = 6, host: str | None = None, sm_clock: float | None = None,
           cal_clock: float | None = None, slow_step: int | None = None,
           gemm_cover: float = 0.0) -> dict[str, Any]:
    """One rank's end-of-run report as the trainer builds it."""
    train = crafted(world, steps, late=late, delay=delay)[rank]
    comm = crafted(world, 2, phase=COMM_PHASE)[rank]
    step_lines = []
    intervals = {}
    for step in range(1, steps + 1):
        iter_ms = 50.0 + (40.0 if step == slow_step and rank == 1 else 0.0)
        step_lines.append({"step": step, "calibration_block": 0, "iter_ms": iter_ms,
                           "compute_ms": 40.0, "comm_ms": 4.0 + (delay if rank != late else 0.0),
                           "gemm_tflops": 100.0, "local_busbw_gbps": 1.0,
                           "sm_clock_mhz": sm_clock})
        # GEMMs cover the first `gemm_cover` ms of the wait (which starts 10 ms into the step).
        intervals[step] = (step * 100.0, [(10.0, 10.0 + gemm_cover)] if gemm_cover else [])
    return {
        "rank": rank,
        "host": host or f"node{rank}",
        "device": "gpu",
        "env": {},
        "steps": step_lines,
        "calibration_compute": [{"compute_ms": 38.0, "gemm_tflops": 105.0,
                                 "calibration_block": 0, "sm_clock_mhz": cal_clock}],
        "calibration_comm": [{"step": s, "calibration_block": 0, "comm_ms": 4.0}
                             for s in (1, 2)],
        "collectives": pack(train + comm),
        "step_intervals": intervals,
        "launch_delay": {"samples": [], "reason": "CPU run: no kernels to profile"},
        "telemetry": {"source": "nvml" if sm_clock else None},
        "status": "completed",
    }


def test_summary_names_the_late_rank_and_keeps_busbw_from_the_wait() -> None:
    delayed = aggregate([report(r, 3, late=2, delay=30.0, host=f"h{r}") for r in range(3)],
                        world_size=3)
    undelayed = aggregate([report(r, 3) for r in range(3)], world_size=3)

    assert delayed["stream_busbw_gbps"]["median"] == pytest.approx(
        undelayed["stream_busbw_gbps"]["median"])
    assert delayed["stream_collective_ms"]["median"] == pytest.approx(2 * TRANSFER)
    assert delayed["stream_comm_slowdown"]["median"] == pytest.approx(0.0)
    slowest = delayed["slowest_rank"]
    assert (slowest["rank"], slowest["host"], slowest["by"]) == (2, "h2", "caused_wait")
    assert slowest["caused_wait_ms_median"] == pytest.approx(60.0)
    per_rank = {e["rank"]: e for e in delayed["per_rank"]}
    assert per_rank[0]["wait_ms_median"] == pytest.approx(30.0)
    assert per_rank[0]["wait_ms_p95"] == pytest.approx(30.0)
    assert per_rank[2]["wait_ms_median"] == pytest.approx(0.0)
    assert per_rank[2]["last_arrival_fraction"] == pytest.approx(0.5)  # bucket 0 of 2
    assert delayed["wait_ms"]["p95"] == pytest.approx(30.0)
    step = delayed["per_step"][0]
    assert step["waited_for_rank"] == 2 and step["wait_ms_max"] == pytest.approx(30.0)
    assert delayed["collective_analysis"]["ok"] is True
    assert undelayed["wait_ms"]["max"] == pytest.approx(0.0)


def test_exposed_wait_is_the_wait_no_gemm_covered() -> None:
    summary = aggregate([report(r, 2, late=1, delay=30.0, gemm_cover=12.0) for r in range(2)],
                        world_size=2)
    # rank 0 waits 30 ms from 10 ms into the step; its GEMMs cover the first 12 ms of it.
    exposed = summary["exposed_wait_ms"]
    assert exposed["max"] == pytest.approx(18.0)
    assert exposed["min"] == pytest.approx(0.0)  # rank 1 did not wait


def test_slowest_step_and_its_rank_are_kept_and_outliers_listed() -> None:
    summary = aggregate([report(r, 2, slow_step=4) for r in range(2)], world_size=2)
    step4 = next(e for e in summary["per_step"] if e["step"] == 4)
    assert step4["iter_ms_max"] == pytest.approx(90.0) and step4["iter_ms_max_rank"] == 1
    outliers = summary["outlier_steps"]
    assert outliers["count"] == 1 and outliers["steps"] == [{"step": 4, "iter_ms": 90.0, "rank": 1}]
    assert outliers["threshold_ms"] == pytest.approx(50.0 * OUTLIER_FACTOR)
    assert summary["step_max"]["iter_ms"]["max"] == pytest.approx(90.0)
    # The pooled median hides it; the slowest rank's p95 does not.
    assert summary["iter_ms"]["median"] == pytest.approx(50.0)
    per_rank = {e["rank"]: e for e in summary["per_rank"]}
    assert per_rank[1]["iter_ms_p95"] > 70.0 > per_rank[0]["iter_ms_p95"]


def test_world_size_one_has_null_bandwidth_with_a_reason() -> None:
    summary = aggregate([report(0, 1)], world_size=1)
    for key in ("stream_busbw_gbps", "stream_algbw_gbps", "stream_comm_slowdown"):
        assert summary[key] is None, key
        assert summary["null_reasons"][key] == WORLD_SIZE_ONE
    assert summary["solo"]["stream_busbw_gbps"] is None
    # The collective itself still ran and was timed.
    assert summary["stream_collective_ms"]["median"] == pytest.approx(2 * TRANSFER)
    assert summary["slowest_rank"]["by"] == "iter_ms"


def test_clocks_that_differ_from_the_calibration_are_flagged() -> None:
    drifted = aggregate([report(r, 2, sm_clock=1700.0, cal_clock=1980.0) for r in range(2)],
                        world_size=2)
    telemetry = drifted["telemetry"]
    assert telemetry["clock_drift"] == pytest.approx(1700 / 1980 - 1, abs=1e-6)
    assert telemetry["clock_drift_flag"] is True
    steady = aggregate([report(r, 2, sm_clock=1975.0, cal_clock=1980.0) for r in range(2)],
                       world_size=2)
    assert abs(steady["telemetry"]["clock_drift"]) < CLOCK_DRIFT_TOLERANCE
    assert steady["telemetry"]["clock_drift_flag"] is False
    # CPU: nothing read, nothing flagged, nothing invented.
    cpu = aggregate([report(r, 2) for r in range(2)], world_size=2)["telemetry"]
    assert cpu["train"]["sm_clock_mhz"] is None and cpu["clock_drift"] is None
    assert cpu["clock_drift_flag"] is None


def test_untimed_collectives_leave_the_cross_rank_fields_null() -> None:
    reports = [report(r, 2) for r in range(2)]
    for r in reports:
        r["collectives"] = None
    summary = aggregate(reports, world_size=2)
    assert summary["stream_busbw_gbps"] is None and summary["wait_ms"] is None
    assert "timing.granularity=step" in summary["null_reasons"]["stream_busbw_gbps"]


def with_calibration_clocks(reports: list[dict[str, Any]], clocks: list[float]) -> None:
    for r in reports:
        r["calibration_compute"] = [{"compute_ms": 38.0, "gemm_tflops": 105.0,
                                     "calibration_block": b, "sm_clock_mhz": c}
                                    for b, c in enumerate(clocks)]


def test_drift_within_the_calibrations_own_variation_is_not_flagged() -> None:
    # A power-capped GPU: calibration readings move by up to ~5 % among themselves (median
    # 1900); the measured steps 3 % below that are within it, 10 % below are not.
    calibration = [1980.0, 1900.0, 1810.0, 1900.0, 1960.0, 1850.0, 1900.0]
    within = [report(r, 2, sm_clock=1843.0) for r in range(2)]
    with_calibration_clocks(within, calibration)
    telemetry = aggregate(within, world_size=2)["telemetry"]
    assert telemetry["clock_drift"] == pytest.approx(1843 / 1900 - 1, abs=1e-6)
    assert telemetry["calibration_variation"] == pytest.approx(0.0458, abs=0.001)  # p90
    assert telemetry["tolerance"] == pytest.approx(telemetry["calibration_variation"])
    assert telemetry["clock_drift_flag"] is False
    beyond = [report(r, 2, sm_clock=1710.0) for r in range(2)]
    with_calibration_clocks(beyond, calibration)
    assert aggregate(beyond, world_size=2)["telemetry"]["clock_drift_flag"] is True
    # Steady calibration clocks: the floor holds.
    steady = [report(r, 2, sm_clock=1843.0) for r in range(2)]
    with_calibration_clocks(steady, [1900.0] * 5)
    telemetry = aggregate(steady, world_size=2)["telemetry"]
    assert telemetry["calibration_variation"] == 0.0
    assert telemetry["tolerance"] == CLOCK_DRIFT_TOLERANCE
    assert telemetry["clock_drift_flag"] is True
