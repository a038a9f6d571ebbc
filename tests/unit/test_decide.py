"""The report's decision: bootstrap intervals over runs and steps, a best point only beyond the
noise, the within-noise set and its secondary pick, flagged points never chosen, the Pareto front."""
from __future__ import annotations

import csv
import io
import json
import random
from pathlib import Path

import pytest

from tasks.lib import report as rep
from tasks.lib.report.outputs import write_report
from tests.unit.report_fixtures import make_repeated_sweep


def runs_of(medians: list[float], *, steps: int = 20, ranks: int = 2, noise: float = 0.5,
            seed: int = 0) -> list[list[tuple[int, float]]]:
    """Synthetic runs: each run's steps around its median, ranks of a step moving together."""
    rng = random.Random(seed)
    runs = []
    for median in medians:
        run = []
        for step in range(steps):
            value = median + rng.gauss(0.0, noise)
            run += [(step, value + rng.gauss(0.0, noise / 10)) for _ in range(ranks)]
        runs.append(run)
    return runs


def interval(medians: list[float], label: str, **kwargs) -> rep.Interval:
    result = rep.bootstrap_interval(runs_of(medians, **kwargs), label=label)
    assert result is not None
    return result


# -- intervals ------------------------------------------------------------------------------------

def test_one_run_interval_is_the_median_of_its_values_and_is_deterministic() -> None:
    run = [(step, float(v)) for step, v in enumerate([10, 12, 11, 13, 9, 10, 11, 12, 10, 11])]
    first = rep.bootstrap_interval([run], label="a")
    assert first == rep.bootstrap_interval([run], label="a")
    assert first.estimate == pytest.approx(rep.quantile([v for _, v in run], 50))
    assert first.low <= first.estimate <= first.high and first.runs == 1 and first.run_spread is None
    assert 9.0 <= first.low and first.high <= 13.0
    assert rep.bootstrap_interval([[], []], label="a") is None


def test_the_interval_covers_the_run_to_run_spread_not_only_the_steps() -> None:
    """Three runs whose medians differ by 10 %: steps alone would give a narrow interval around
    each run; over the runs it spans most of the spread."""
    tight_steps = interval([100.0, 105.0, 110.0], "x", noise=0.2)
    assert tight_steps.run_spread == pytest.approx(0.10, abs=0.01)
    assert tight_steps.high - tight_steps.low > 5.0
    one_run = interval([105.0], "y", noise=0.2)
    assert one_run.high - one_run.low < 1.0


# -- the decision on intervals ------------------------------------------------------------------

def candidates(groups: dict[str, list[float]], **kwargs) -> list[rep.Candidate]:
    return [rep.Candidate(key, interval(medians, key, seed=i, **kwargs), secondary=(float(i),))
            for i, (key, medians) in enumerate(groups.items())]


def test_a_point_ahead_beyond_the_noise_is_the_winner() -> None:
    decision = rep.decide(candidates({"fast": [90.0, 90.5, 89.8], "slow": [100.0, 100.4, 99.7],
                                      "slower": [110.0, 110.2, 109.5]}))
    assert decision.status == rep.WINNER and decision.winner == "fast"
    assert decision.runner_up == "slow" and decision.margin == pytest.approx(0.11, abs=0.01)
    assert decision.gap_ms > 0 and decision.within_noise == ["fast"]


def test_points_within_noise_are_listed_with_a_secondary_pick() -> None:
    decision = rep.decide(candidates({"a": [100.0, 103.0, 98.0], "b": [101.0, 99.0, 104.0],
                                      "c": [99.5, 102.0, 100.5], "d": [130.0, 131.0, 129.0]}),
                          secondary_rule="first listed")
    assert decision.status == rep.WITHIN_NOISE and decision.winner is None
    assert set(decision.within_noise) == {"a", "b", "c"} and "d" not in decision.within_noise
    assert decision.secondary_pick == "a"   # secondary key 0
    assert decision.leader == decision.within_noise[0]


def test_separate_intervals_closer_than_the_margin_are_not_a_decision() -> None:
    tight = candidates({"a": [100.0, 100.02, 99.98], "b": [100.6, 100.62, 100.58]}, noise=0.01)
    assert rep.decide(tight, min_margin=0.0).status == rep.WINNER
    assert rep.decide(tight).status == rep.WITHIN_NOISE   # 0.6 % < the default 1 %


def test_flagged_and_failed_points_are_never_chosen() -> None:
    given = candidates({"flagged": [50.0, 50.1, 50.2], "ok": [100.0, 100.1, 99.9], "other": [120.0, 121.0, 119.0]})
    given[0].why_not = "effective settings flagged: channels: asked 32, NCCL built 16"
    decision = rep.decide(given)
    assert decision.winner == "ok" and "flagged" in decision.excluded
    assert "flagged" not in decision.within_noise


def test_single_runs_decide_nothing_without_repeats_elsewhere() -> None:
    decision = rep.decide(candidates({"a": [90.0], "b": [100.0], "c": [101.0]}))
    assert decision.status == rep.UNDECIDED and decision.leader == "a"
    assert "one run per point" in decision.reason


def test_single_runs_are_widened_by_the_pooled_run_to_run_noise() -> None:
    """A point measured once, next to repeated points whose runs move by ~5 %: its step-only
    interval would separate it from the leader; widened, it cannot be told apart."""
    given = candidates({"repeated": [100.0, 95.0, 105.0], "again": [140.0, 135.0, 145.0],
                        "once": [103.0]}, noise=0.1)
    once = next(c for c in given if c.key == "once")
    assert once.interval.low > 101.0   # step noise only: clear of most of the leader's spread
    decision = rep.decide(given)
    assert decision.run_noise == pytest.approx(0.044, abs=0.01)
    assert "once" in decision.within_noise and decision.status == rep.WITHIN_NOISE
    assert decision.compared["once"].low < once.interval.low


def test_false_winners_on_identical_points_are_rare() -> None:
    """Four points drawn from one distribution (run-to-run drift 2 %, step noise 3 %), three runs
    each: the rule must crown a winner in at most 5 % of 60 sweeps; a real 10 % lead is found in
    nearly all."""
    rng = random.Random(11)

    def sweep(leads: float) -> rep.Decision:
        groups = {}
        for point in range(4):
            base = 100.0 * (1.0 - leads if point == 0 else 1.0)
            groups[f"p{point}"] = [base * (1.0 + rng.gauss(0.0, 0.02)) for _ in range(3)]
        return rep.decide([rep.Candidate(k, rep.bootstrap_interval(
            runs_of(v, noise=3.0, seed=rng.randrange(10 ** 6)), label=k, resamples=500))
            for k, v in groups.items()])

    false_winners = sum(sweep(0.0).status == rep.WINNER for _ in range(60))
    assert false_winners <= 3, false_winners
    found = sum(sweep(0.10).winner == "p0" for _ in range(20))
    assert found >= 18, found


# -- the report ------------------------------------------------------------------------------------

def flag_run(run_dir: Path, flag: str) -> None:
    summary_path = next(run_dir.glob("*/summary.json"))
    summary = json.loads(summary_path.read_text())
    summary["effective_settings"] = {"capture": "on", "channels": 4, "flags": [flag]}
    summary_path.write_text(json.dumps(summary))


def test_a_repeated_sweep_names_the_point_ahead_beyond_the_noise(tmp_path: Path) -> None:
    sweep_dir = make_repeated_sweep(tmp_path, [
        (4, 256, {}, [100.0, 101.0, 99.5], {}),
        (32, 256, {}, [80.0, 80.8, 79.6], {}),
        (4, 512, {}, [99.0, 100.5, 101.0], {}),
        (32, 512, {}, [100.5, 99.0, 100.0], {}),
    ], repeat=3)
    result = write_report(sweep_dir, plots=False)

    assert result.decision.status == rep.WINNER and result.best.label == "32ch × 256th"
    assert [len(row.runs) for row in result.rows] == [3, 3, 3, 3]
    markdown = (sweep_dir / "report.md").read_text()
    assert "**Best point: 32ch × 256th** (channels=32, threads=256): median iteration 80." in markdown
    assert "3 runs, run-to-run spread" in markdown and "ahead of the runner-up" in markdown
    # The point's own directories, one per run, are named (not a pool launch's).
    assert "outputs of its 3 runs: `../multinode_32ch_256th_20250102_000001/256thread_32channels`" in markdown
    rows = list(csv.DictReader(io.StringIO((sweep_dir / "results.csv").read_text())))
    assert [r["decision"] for r in rows] == ["slower beyond noise", "best", "slower beyond noise",
                                             "slower beyond noise"]
    assert rows[1]["runs"] == "3" and float(rows[1]["iter_ms_ci_low"]) < 80.3 < float(rows[1]["iter_ms_ci_high"])
    runs = list(csv.DictReader(io.StringIO((sweep_dir / "runs.csv").read_text())))
    assert len(runs) == 12 and {r["repeat"] for r in runs} == {"0", "1", "2"}


def test_a_repeated_sweep_of_equal_points_crowns_no_one(tmp_path: Path) -> None:
    """What a CPU/gloo sweep looks like: channels and threads change nothing."""
    sweep_dir = make_repeated_sweep(tmp_path, [
        (4, 256, {}, [100.0, 103.0, 98.0], {}),
        (32, 256, {}, [99.0, 101.5, 102.0], {}),
        (4, 512, {}, [101.0, 98.5, 100.0], {}),
        (32, 512, {}, [102.0, 99.5, 98.8], {}),
    ], repeat=3, noise=2.0)
    result = write_report(sweep_dir, plots=False)

    assert result.best is None and result.decision.status == rep.WITHIN_NOISE
    assert len(result.decision.within_noise) == 4
    markdown = (sweep_dir / "report.md").read_text()
    assert "**No single best point**: 4 points within noise: " in markdown
    assert ("Pick by secondary criterion (fewest channels × threads (the least of the GPU given to "
            "communication), then the smallest run-to-run spread): **4ch × 256th**") in markdown
    assert "--pick 4x256" in markdown


def test_a_flagged_point_is_never_the_best_however_fast(tmp_path: Path) -> None:
    sweep_dir = make_repeated_sweep(tmp_path, [
        (4, 256, {}, [50.0, 50.5, 49.8], {}),
        (32, 256, {}, [80.0, 80.8, 79.6], {}),
        (64, 256, {}, [100.0, 99.0, 101.0], {}),
    ], repeat=3)
    for run_dir in tmp_path.glob("multinode_4ch_256th_*"):
        flag_run(run_dir, "channels: asked 4, NCCL built 2 (clamped)")
    result = write_report(sweep_dir, plots=False)

    assert result.best.label == "32ch × 256th"
    assert result.decision.excluded["4ch × 256th"].startswith("effective settings flagged: ")
    assert "Never chosen: 4ch × 256th (effective settings flagged: " in (sweep_dir / "report.md").read_text()


def test_a_point_with_a_failed_run_is_partial_and_not_chosen(tmp_path: Path) -> None:
    sweep_dir = make_repeated_sweep(tmp_path, [
        (4, 256, {}, [70.0, 70.5], {}),    # its third run never ran
        (32, 256, {}, [80.0, 80.8, 79.6], {}),
        (64, 256, {}, [100.0, 99.0, 101.0], {}),
    ], repeat=3)
    result = write_report(sweep_dir, plots=False)

    partial = result.rows[0]
    assert partial.status == rep.PARTIAL and "2 of 3 runs completed" in partial.problems
    assert result.decision.excluded["4ch × 256th"] == "only 2 of 3 runs completed"
    assert result.best.label == "32ch × 256th"


def test_a_pool_point_names_its_own_directory_and_the_pool(tmp_path: Path) -> None:
    sweep_dir = make_repeated_sweep(tmp_path, [
        (4, 256, {}, [70.0, 70.5, 70.2], {"pooled": True}),
        (32, 256, {}, [80.0, 80.8, 79.6], {"pooled": True}),
    ], repeat=3)
    markdown = (write_report(sweep_dir, plots=False).out_dir / "report.md").read_text()
    best = markdown.split("**Best point: 4ch × 256th**", 1)[1].split("\n")[0]
    assert "`../multinode_4ch_256th_20250102_000000/256thread_4channels` (one point of the rank-pool " \
           "launch `multinode_4ch_256th_20250102_000000`)" in best


def test_pareto_front_of_contention_and_exposed_communication() -> None:
    def row(label: int, contention: float, exposed: float) -> rep.PointRow:
        return rep.PointRow(run_id=None, run_dir=None, channels=label, threads=256, nodes=1, world_size=2,
                            status="completed", steps=5, contention_slowdown_median=contention,
                            exposed_comm_fraction_median=exposed)

    rows = [row(1, 0.02, 0.40), row(2, 0.05, 0.20), row(3, 0.06, 0.30), row(4, 0.10, 0.10), row(5, 0.03, 0.45)]
    assert [r.channels for r in rep.pareto_front(rows)] == [1, 2, 4]
