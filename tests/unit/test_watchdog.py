"""HangWatchdog with an injected clock, and the progress readers (poll command in a real shell)."""
from __future__ import annotations

import json
import subprocess

import pytest

from tasks.lib.watchdog import (
    HangWatchdog,
    RankProgress,
    first_stalled_ranks,
    parse_progress_line,
    parse_progress_poll,
    progress_poll_command,
)


def advance_all(dog: HangWatchdog, ranks, progress: int, now: float) -> None:
    for rank in ranks:
        dog.observe(rank, progress, now, step=progress)


def test_fires_only_after_timeout_without_any_advance():
    dog = HangWatchdog(timeout_s=30, started_at=0.0, expected_ranks=range(4))
    for t in range(1, 11):
        advance_all(dog, range(4), t, float(t))
    assert dog.check(39.9) is None
    report = dog.check(40.0)
    assert report is not None
    assert report.stalled_for_s == pytest.approx(30.0)
    assert report.steps() == {0: 10, 1: 10, 2: 10, 3: 10}


def test_a_single_advancing_rank_keeps_the_run_alive():
    dog = HangWatchdog(timeout_s=10, started_at=0.0, expected_ranks=range(2))
    advance_all(dog, range(2), 1, 1.0)
    for t in range(2, 30):
        dog.observe(0, t, float(t))
        assert dog.check(float(t)) is None


def test_no_hang_while_processes_are_gone():
    dog = HangWatchdog(timeout_s=5, started_at=0.0)
    assert dog.check(100.0, alive=False) is None
    assert dog.check(100.0, alive=True) is not None


def test_startup_counts_from_the_watch_start():
    dog = HangWatchdog(timeout_s=60, started_at=1000.0, expected_ranks=range(2))
    assert dog.check(1059.0) is None
    report = dog.check(1060.0)
    assert report.first_stalled == (0, 1) and report.missing == (0, 1)


def test_startup_gets_its_own_allowance_then_the_timeout_applies():
    dog = HangWatchdog(timeout_s=10, started_at=0.0, expected_ranks=range(2), startup_timeout_s=100)
    assert dog.check(99.0) is None
    advance_all(dog, range(2), 1, 99.0)
    assert dog.check(108.0) is None
    report = dog.check(109.0)
    assert report is not None and report.timeout_s == 10


def test_a_startup_that_never_ends_is_a_hang_too():
    dog = HangWatchdog(timeout_s=10, started_at=0.0, startup_timeout_s=100)
    report = dog.check(100.0)
    assert report is not None and report.timeout_s == 100 and report.first_stalled == ()


def test_the_laggard_rank_is_reported_first():
    dog = HangWatchdog(timeout_s=20, started_at=0.0, expected_ranks=range(4))
    for t in range(1, 6):
        advance_all(dog, range(4), t, float(t))
    # rank 2 freezes at 5; the others finish step 6 and then block in its collective.
    advance_all(dog, (0, 1, 3), 6, 6.0)
    report = dog.check(26.0)
    assert report.first_stalled == (2,)
    assert report.steps()[2] == 5 and report.steps()[0] == 6


def test_ties_on_progress_are_broken_by_the_earliest_last_advance():
    dog = HangWatchdog(timeout_s=20, started_at=0.0, expected_ranks=range(3))
    dog.observe(0, 7, 10.0)
    dog.observe(1, 7, 12.0)
    dog.observe(2, 7, 12.0)
    assert dog.check(32.0).first_stalled == (0,)


def test_ranks_that_stopped_in_the_same_poll_all_count():
    ranks = [RankProgress(0, 4, 4, 8.0), RankProgress(1, 4, 4, 8.0), RankProgress(2, 5, 5, 9.0)]
    assert first_stalled_ranks(ranks) == (0, 1)


def test_a_rank_never_seen_stopped_first():
    dog = HangWatchdog(timeout_s=5, started_at=0.0, expected_ranks=range(3))
    advance_all(dog, (0, 1), 3, 1.0)
    report = dog.check(6.0)
    assert report.first_stalled == (2,) and report.missing == (2,)


def test_old_or_repeated_progress_is_not_an_advance():
    dog = HangWatchdog(timeout_s=5, started_at=0.0)
    assert dog.observe(0, 3, 1.0)
    assert not dog.observe(0, 3, 4.0)
    assert not dog.observe(0, 2, 4.5)
    assert dog.check(6.0) is not None


def test_an_empty_metrics_file_is_not_progress():
    dog = HangWatchdog(timeout_s=5, started_at=0.0)
    assert not dog.observe(0, 0, 4.0)
    assert dog.check(5.0) is not None


def test_fires_once_and_keeps_its_report():
    dog = HangWatchdog(timeout_s=1, started_at=0.0)
    first = dog.check(2.0)
    dog.observe(0, 1, 3.0)
    assert dog.check(10.0) is first


def test_report_serialises_for_run_json():
    dog = HangWatchdog(timeout_s=2, started_at=0.0, expected_ranks=range(2))
    dog.observe(0, 3, 1.0, step=103)
    dog.observe(1, 2, 1.0, step=102)
    data = json.loads(json.dumps(dog.check(3.5).as_dict()))
    assert data["first_stalled_ranks"] == [1]
    assert data["rank_steps"] == {"0": 103, "1": 102}
    assert data["stalled_for_s"] == 2.5
    assert data["ranks"][0] == {"rank": 0, "progress": 3, "step": 103, "idle_s": 2.5}


def test_nonpositive_timeout_refused():
    with pytest.raises(ValueError):
        HangWatchdog(timeout_s=0, started_at=0.0)


@pytest.mark.parametrize("line, expected", [
    ('{"rank": 3, "local_rank": 1, "step": 12, "iter_ms": 1.0}', (3, 12)),
    ("step 40/100 | iter 12.000 ms | compute 3.000 ms", (0, 40)),
    ("[rank 2] step 7/10 | iter 1 ms", (2, 7)),
    ("[1]:step 7/10 | iter 1 ms", (1, 7)),
    ("calibration gemm-only: compute 1.0 ms", None),
    ('{"rank": 1, "st', None),
    ("", None),
])
def test_parse_progress_line(line, expected):
    assert parse_progress_line(line) == expected


def test_poll_command_on_real_files(tmp_path):
    (tmp_path / "rank_00_metrics.jsonl").write_text(
        '{"rank": 0, "step": 1}\n{"rank": 0, "step": 2}\n')
    # Rank 1's second line is half written: it is neither counted nor read.
    (tmp_path / "rank_01_metrics.jsonl").write_text('{"rank": 1, "step": 1}\n{"rank": 1, "st')
    (tmp_path / "rank_12_metrics.jsonl").write_text("")
    (tmp_path / "summary.json").write_text("{}")
    out = subprocess.run(["bash", "-c", progress_poll_command(str(tmp_path))],
                         capture_output=True, text=True, check=True).stdout
    assert parse_progress_poll(out) == {0: (2, 2), 1: (1, 1), 12: (0, None)}


def test_poll_of_a_missing_dir_is_empty(tmp_path):
    out = subprocess.run(["bash", "-c", progress_poll_command(str(tmp_path / "not yet"))],
                         capture_output=True, text=True, check=True).stdout
    assert parse_progress_poll(out) == {}


def test_poll_feeds_the_watchdog():
    dog = HangWatchdog(timeout_s=10, started_at=0.0, expected_ranks=range(2))
    assert dog.observe_poll({0: (3, 3), 1: (3, 3)}, 1.0) == [0, 1]
    assert dog.observe_poll({0: (4, 4), 1: (3, 3)}, 2.0) == [0]
    report = dog.check(12.0)
    assert report.first_stalled == (1,)


def test_derived_limit_follows_the_slowest_step() -> None:
    """The launch's default: a multiple of the slowest step seen, floored, capped by timeout_s."""
    from tasks.lib.watchdog import HangWatchdog

    dog = HangWatchdog(timeout_s=240.0, started_at=0.0, expected_ranks=[0, 1],
                       step_multiple=10.0, floor_s=5.0, startup_timeout_s=300.0)
    assert dog.limit_s == 300.0  # nothing seen yet: the start-up allowance
    for t, lines in ((10.0, 1), (11.0, 2), (12.0, 3)):
        dog.observe(0, lines, t)
        dog.observe(1, lines, t)
    assert dog.slowest_step_s == 1.0 and dog.limit_s == 10.0
    dog.observe(0, 5, 16.0)          # two steps in 4 s: 2 s per step
    assert dog.limit_s == 20.0
    assert dog.check(30.0) is None   # rank 0 advanced at 16 s: idle 14 s < 20 s
    report = dog.check(36.5)
    assert report is not None and report.timeout_s == 20.0
    # Without step_multiple (a limit the user chose) the same run waits the full timeout.
    fixed = HangWatchdog(timeout_s=240.0, started_at=0.0, expected_ranks=[0])
    for t, lines in ((10.0, 1), (11.0, 2)):
        fixed.observe(0, lines, t)
    assert fixed.limit_s == 240.0 and fixed.check(200.0) is None


def test_default_hang_timeout_and_warning() -> None:
    from tasks.lib.watchdog import default_hang_timeout, hang_timeout_warning

    assert default_hang_timeout(600.0, 300.0) == 240.0
    assert default_hang_timeout(600.0, None) == 600.0
    assert default_hang_timeout(100.0, 3000.0) == 100.0
    assert hang_timeout_warning(240.0, 300.0) is None
    assert hang_timeout_warning(0.0, 300.0) is None
    assert "lower --hang-timeout below 300" in hang_timeout_warning(300.0, 300.0)
