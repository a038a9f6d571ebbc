"""Sweep helpers: grid parsing, sweep.json, resume decisions, timing, the leftover-process check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.lib import sweep as sw
from tasks.sweep import (
    FLAG_DEFAULTS,
    create_sweep_dir,
    launch_flags_for,
    launch_flags_record,
    load_sweep,
    rank0_wall_times,
    run_status_of,
    write_sweep,
)
from tests.unit.report_fixtures import make_run

ROOT = Path(__file__).resolve().parents[2]


def new_doc(channels=(28, 42), threads=(256, 512), **flags) -> dict:
    return sw.new_sweep(sweep_id="sweep_x", channels=list(channels), threads=list(threads),
                        launch_flags=launch_flags_record(**{**FLAG_DEFAULTS, **flags}), hosts=["a", "b"],
                        fail_fast=False, controller={"host": "c"}, created_at="2025-01-01T00:00:00Z")


# -- grid -------------------------------------------------------------------------------------

@pytest.mark.parametrize("given, expected", [
    ("28,42,56,70", [28, 42, 56, 70]),
    (["28,42", "56"], [28, 42, 56]),
    ([" 28 , 28,42,"], [28, 42]),
    (None, []),
])
def test_parse_grid_values(given, expected) -> None:
    assert sw.parse_grid_values(given, "--channels") == expected


@pytest.mark.parametrize("given, message", [
    ("28,x", "--channels: 'x' is not an integer"),
    ("0", "--channels: 0 must be positive"),
])
def test_parse_grid_values_rejects(given, message) -> None:
    with pytest.raises(sw.SweepError, match=message):
        sw.parse_grid_values(given, "--channels")


def test_grid_is_channels_major_like_the_shell_loop() -> None:
    points = sw.grid_points([28, 42], [256, 512])
    assert [(p.channels, p.threads) for p in points] == [(28, 256), (28, 512), (42, 256), (42, 512)]
    with pytest.raises(sw.SweepError, match="at least one value for --channels"):
        sw.grid_points([28], [])


def test_point_overrides_select_points() -> None:
    points = sw.grid_points([28, 42], [256, 512])
    extra = sw.parse_point_overrides(["42x512:distributed.backend=nccl", "*x256:training.max_steps=9"], points)
    assert extra[sw.GridPoint(42, 512)] == ["distributed.backend=nccl"]
    assert extra[sw.GridPoint(28, 256)] == ["training.max_steps=9"]
    assert extra[sw.GridPoint(28, 512)] == []
    with pytest.raises(sw.SweepError, match="no grid point 56x512"):
        sw.parse_point_overrides(["56x512:training.max_steps=1"], points)
    with pytest.raises(sw.SweepError, match="expected CHANNELSxTHREADS:section.key=value"):
        sw.parse_point_overrides(["42:training.max_steps=1"], points)


def test_launch_flags_for_a_point_add_its_overrides() -> None:
    record = launch_flags_record(**{**FLAG_DEFAULTS, "override": ["training.max_steps=4"], "nproc": "2",
                                    "docker": False})
    flags = launch_flags_for(record, sw.GridPoint(42, 512), ["distributed.backend=nccl"])
    assert (flags.channels, flags.threads, flags.nproc, flags.docker) == (42, 512, "2", False)
    assert flags.overrides == ("training.max_steps=4", "distributed.backend=nccl")
    assert flags.pin_channels is True and flags.detach is False and flags.dry_run is False


# -- the document and resume ------------------------------------------------------------------

def test_new_sweep_round_trips_through_the_file(tmp_path: Path) -> None:
    document = new_doc()
    write_sweep(tmp_path, document)
    loaded = load_sweep(tmp_path)
    assert loaded["grid"] == {"channels": [28, 42], "threads": [256, 512], "order": "channels-major"}
    assert [p["status"] for p in loaded["points"]] == ["pending"] * 4
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema=7), "schema 7 is not 1"),
    (lambda d: d["points"][1].update(index=5), "point 1 is malformed"),
    (lambda d: d["points"][0].update(status="bogus"), "unknown status 'bogus'"),
    (lambda d: d.pop("launch_flags"), "launch_flags missing"),
])
def test_validate_sweep_rejects(mutate, message) -> None:
    document = new_doc()
    mutate(document)
    with pytest.raises(sw.SweepError, match=message):
        sw.validate_sweep(document, "sweep.json")


def test_load_sweep_of_a_non_sweep_directory(tmp_path: Path) -> None:
    with pytest.raises(sw.SweepError, match="sweep.json missing; is this a sweep directory"):
        load_sweep(tmp_path)


def test_resume_runs_what_did_not_complete_and_what_lost_its_run(tmp_path: Path) -> None:
    """Resume trusts a 'completed' point only when its run directory says so too."""
    sweep_dir = tmp_path / "sweep_x"
    sweep_dir.mkdir()
    document = new_doc()
    states = ["completed", "failed", "completed", "interrupted"]
    for point, state in zip(document["points"], states):
        run = make_run(tmp_path, point["channels"], point["threads"], world_size=2, nodes=1,
                       status="completed" if state == "completed" else "failed")
        point.update(status=state, run_id=run.name, run_dir=f"../{run.name}")
    # Point 2's run directory was lost; point 0's is intact.
    lost = tmp_path / document["points"][2]["run_id"]
    subprocess.run(["rm", "-rf", str(lost)], check=True)

    todo = sw.points_to_run(document, lambda p: run_status_of(sweep_dir, p)[0] == "completed")

    assert todo == [1, 2, 3]
    assert run_status_of(sweep_dir, document["points"][0])[0] == "completed"
    assert run_status_of(sweep_dir, document["points"][2])[0] == "missing"


def test_finished_sweep_has_nothing_to_run() -> None:
    document = new_doc()
    for point in document["points"]:
        point["status"] = "completed"
    assert sw.points_to_run(document, lambda p: True) == []
    assert sw.sweep_status(document) == "completed"


def test_sweep_status() -> None:
    document = new_doc()
    assert sw.sweep_status(document) == "interrupted"   # pending points left
    for point, state in zip(document["points"], ["completed", "failed", "completed", "hung"]):
        point["status"] = state
    assert sw.sweep_status(document) == "partial"
    assert sw.sweep_status(document, aborted=True) == "aborted"
    assert sw.sweep_status(document, interrupted=True) == "interrupted"


def test_resume_keeps_grid_and_measuring_flags() -> None:
    document = new_doc(override=["training.max_steps=4"])
    sw.check_resume_grid(document, [], [])
    sw.check_resume_grid(document, [28, 42], [256, 512])
    with pytest.raises(sw.SweepError, match="--threads 256 differs from the resumed sweep's 256,512"):
        sw.check_resume_grid(document, [], [256])
    recorded = document["launch_flags"]
    sw.check_resume_flags(recorded, {"override": ["training.max_steps=4"], "force": True},
                          may_change=["force"])
    with pytest.raises(sw.SweepError, match="--override .* differs"):
        sw.check_resume_flags(recorded, {"override": ["training.max_steps=8"]})
    with pytest.raises(sw.SweepError, match="--pin-channels False differs"):
        sw.check_resume_flags(recorded, {"pin_channels": False})


def test_point_status() -> None:
    assert sw.point_status("completed") == "completed"
    assert sw.point_status("stopped") == "stopped"
    for unfinished in ("incomplete", "no_output", "running", "missing", "unknown"):
        assert sw.point_status(unfinished) == "failed"


# -- timing -----------------------------------------------------------------------------------

def test_eta_and_dead_time() -> None:
    assert sw.eta_seconds([], 3) is None
    assert sw.eta_seconds([10.0, 30.0, 20.0], 2) == 40.0
    assert sw.eta_seconds([10.0], 0) == 0.0
    points = [{"gap_before_s": None, "idle_before_s": None, "cleanup_wait_s": 0.05},
              {"gap_before_s": 0.2, "idle_before_s": 6.0, "cleanup_wait_s": 0.07},
              {"gap_before_s": 0.4, "idle_before_s": 8.0, "cleanup_wait_s": 0.06}]
    summary = sw.dead_time_summary(points)
    assert summary["gap_s"] == {"median": 0.3, "max": 0.4, "n": 2}
    assert summary["idle_s"] == {"median": 7.0, "max": 8.0, "n": 2}
    assert summary["cleanup_wait_s"]["n"] == 3


def test_rank0_wall_times(tmp_path: Path) -> None:
    run = make_run(tmp_path, 28, 256, world_size=2, nodes=1, steps=4)
    assert rank0_wall_times(run) == (1_700_000_000.0, 1_700_000_003.0)
    assert rank0_wall_times(None) is None


def test_sweep_dirs_are_unique_within_a_second(tmp_path: Path) -> None:
    from datetime import datetime

    when = datetime(2025, 1, 2, 3, 4, 5)
    first = create_sweep_dir(tmp_path, when)
    second = create_sweep_dir(tmp_path, when)
    assert (first.name, second.name) == ("sweep_20250102_030405", "sweep_20250102_030405_2")


# -- the leftover-process check ---------------------------------------------------------------

def test_run_processes_command_finds_only_the_runs_processes() -> None:
    """Real processes: one carrying the run's marker, one of another run, one with the id in argv."""
    run_id = f"multinode_28ch_256th_test{os.getpid()}"
    ours = subprocess.Popen(["sleep", "30"], env={**os.environ, "GEMM_RUN_ID": run_id})
    other = subprocess.Popen(["sleep", "30"], env={**os.environ, "GEMM_RUN_ID": run_id + "_1"})
    named = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", f"GEMM_RUN_ID={run_id}"])
    try:
        time.sleep(0.2)
        found = sw.parse_pids(subprocess.run(["bash", "-c", sw.run_processes_command(run_id)],
                                             capture_output=True, text=True, check=True).stdout)
        assert found == [ours.pid]
    finally:
        for process in (ours, other, named):
            process.kill()
            process.wait()
    after = subprocess.run(["bash", "-c", sw.run_processes_command(run_id)], capture_output=True, text=True)
    assert after.returncode == 0 and sw.parse_pids(after.stdout) == []


def test_run_processes_command_quotes_the_run_id() -> None:
    command = sw.run_processes_command("x'; touch /tmp/pwned; '")
    assert "'\"'\"'" in command
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
    assert result.returncode == 0 and not Path("/tmp/pwned").exists()


def test_sweep_json_written_by_write_sweep_carries_dead_time(tmp_path: Path) -> None:
    document = new_doc()
    document["points"][1]["gap_before_s"] = 0.25
    write_sweep(tmp_path, document)
    assert json.loads((tmp_path / "sweep.json").read_text())["dead_time"]["gap_s"]["median"] == 0.25
