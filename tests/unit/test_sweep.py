"""Sweep helpers: grid parsing, sweep.json, resume decisions, timing, the leftover-process check."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from tasks.launch import launch
from tasks.lib import report as rep
from tasks.lib import sweep as sw
from tasks.lib.registry import SCAN_KILL_SH
from tasks.lib.runspec import LaunchFlags
from tasks.sweep import SWEEP_HELP, sweep
from tasks.sweeping.execute import sweep_mode
from tasks.sweeping.plan import SweepPlan, plan_sweep
from tasks.sweeping.runner import (
    FLAG_DEFAULTS,
    GRID_FLAGS,
    LAUNCH_ONLY_FLAGS,
    RECORD_NAMES,
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


# -- the sweep takes fab launch's flags ---------------------------------------------------------

SWEEP_ONLY_FLAGS = {"resume", "fail_fast", "point_timeout", "point_override", "no_report", "pool",
                    "axis", "repeat", "seed"}


def flag_names(task) -> set[str]:
    # The signature, not get_arguments(): that one empties the task's help dict.
    return set(task.argspec(task.body).parameters)


def test_sweep_takes_every_per_point_launch_flag() -> None:
    """A flag added to fab launch fails here until the sweep takes it (or names it launch-only)."""
    assert flag_names(sweep) - SWEEP_ONLY_FLAGS == flag_names(launch) - LAUNCH_ONLY_FLAGS
    assert {"nsys", "torch_profile", "hang_timeout"} <= flag_names(sweep)
    assert set(SWEEP_HELP) == flag_names(sweep)   # every flag has help, and no help is stray
    assert SWEEP_HELP["nsys"].startswith("as fab launch: wrap torchrun in Nsight Systems")


def test_fab_help_sweep_lists_launch_flags() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "fab"), "--help", "sweep"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for flag in ("--nsys", "--torch-profile", "--hang-timeout", "--point-timeout"):
        line = next(line for line in result.stdout.splitlines() if line.strip().startswith(flag))
        assert len(line.split(None, 1)) == 2, f"{flag} has no help"
    # Rank pools are the default; the restart-per-point mode is the inverse flag.
    pool = next(line for line in result.stdout.splitlines() if "--[no-]pool" in line)
    assert "on by default" in pool


def test_every_launch_flag_field_is_recorded_and_reaches_the_point() -> None:
    """FLAG_DEFAULTS (the sweep.json record) covers every LaunchFlags field the sweep passes on,
    and launch_flags_for hands each recorded value over, not its default."""
    passed = [f for f in fields(LaunchFlags) if f.name not in GRID_FLAGS | LAUNCH_ONLY_FLAGS]
    assert set(FLAG_DEFAULTS) == {RECORD_NAMES.get(f.name, f.name) for f in passed} | {"hosts", "point_override"}
    given = {"nproc": "2", "config": "c.yaml", "master_port": "29511", "nccl_preset": "debug",
             "override": ["a.b=1"], "env": ["K=V"], "docker": True, "rocprof": True, "stats": True,
             "rocprof_input": "in.yaml", "nsys": True, "torch_profile": True, "hang_timeout": "30",
             "pin_channels": False, "force": True, "entry": "train.py --config 'a b.yaml'",
             "metric": "json:step_ms"}
    assert set(given) == {RECORD_NAMES.get(f.name, f.name) for f in passed}
    flags = launch_flags_for(launch_flags_record(**{**FLAG_DEFAULTS, **given}), sw.GridPoint(28, 256), [])
    for field in passed:
        value = given[RECORD_NAMES.get(field.name, field.name)]
        assert getattr(flags, field.name) == (tuple(value) if isinstance(value, list) else value), field.name
    # A sweep.json written before a flag existed: the flag keeps its launch default.
    old = launch_flags_for({"override": ["a.b=1"]}, sw.GridPoint(28, 256), [])
    assert (old.nsys, old.torch_profile, old.hang_timeout, old.pin_channels) == (False, False, None, True)


# -- planning a new or resumed sweep ------------------------------------------------------------

def test_plan_of_a_new_sweep() -> None:
    given = launch_flags_record(**{**FLAG_DEFAULTS, "point_override": ["28x512:training.max_steps=9"]})
    plan = plan_sweep(given, "28,42", ["256", "512"], None)
    assert (plan.channels, plan.threads, plan.document, plan.sweep_dir) == ([28, 42], [256, 512], None, None)
    assert plan.points == sw.grid_points([28, 42], [256, 512])
    assert plan.extra_overrides[sw.GridPoint(28, 512)] == ["training.max_steps=9"]
    with pytest.raises(sw.SweepError, match="at least one value for --channels"):
        plan_sweep(given, "28", None, None)


def test_plan_of_a_resumed_sweep_keeps_recorded_flags(tmp_path: Path) -> None:
    write_sweep(tmp_path, new_doc(override=["training.max_steps=4"], force=True, hang_timeout="60",
                                  point_override=["42x512:training.max_steps=8"]))
    given = launch_flags_record(**{**FLAG_DEFAULTS, "hang_timeout": "120"})
    plan = plan_sweep(given, None, None, str(tmp_path))
    assert isinstance(plan, SweepPlan) and plan.sweep_dir == tmp_path and plan.document is not None
    assert plan.flags_record["override"] == ["training.max_steps=4"]
    assert plan.flags_record["hang_timeout"] == "120"   # operational: may change on resume
    assert plan.flags_record["force"] is False          # --force is not remembered
    assert plan.extra_overrides[sw.GridPoint(42, 512)] == ["training.max_steps=8"]
    with pytest.raises(sw.SweepError, match="--nsys True differs"):
        plan_sweep(launch_flags_record(**{**FLAG_DEFAULTS, "nsys": True}), None, None, str(tmp_path))


# -- the document and resume ------------------------------------------------------------------

def test_new_sweep_round_trips_through_the_file(tmp_path: Path) -> None:
    document = new_doc()
    write_sweep(tmp_path, document)
    loaded = load_sweep(tmp_path)
    assert loaded["grid"] == {"channels": [28, 42], "threads": [256, 512], "axes": [], "repeat": 1,
                              "seed": 0, "order": "grid"}
    # One run per point, pools threads-major: 28x256, 42x256, then 28x512, 42x512.
    assert loaded["order"] == [0, 2, 1, 3]
    assert [p["status"] for p in loaded["points"]] == ["pending"] * 4
    assert not list(tmp_path.glob(".*tmp"))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema=7), "schema 7 is not one of 1, 2"),
    (lambda d: d.update(order=[0, 0, 1, 2]), "order is not a permutation"),
    (lambda d: d["points"][3].update(config=9), "a point names no config"),
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

    assert todo == [i for i in document["order"] if i in (1, 2, 3)]   # in the order they run
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
    assert sw.eta_seconds([10.0, 40.0, 20.0, 30.0], 2) == 50.0
    assert sw.eta_seconds([10.0], 0) == 0.0
    points = [{"gap_before_s": None, "idle_before_s": None, "cleanup_wait_s": 0.05},
              {"gap_before_s": 0.2, "idle_before_s": 6.0, "cleanup_wait_s": 0.07},
              {"gap_before_s": 0.4, "idle_before_s": 8.0, "cleanup_wait_s": 0.06}]
    summary = sw.dead_time_summary(points)
    assert summary["gap_s"] == {"median": 0.3, "max": 0.4, "n": 2}
    assert summary["idle_s"] == {"median": 7.0, "max": 8.0, "n": 2}
    assert summary["cleanup_wait_s"]["n"] == 3


def test_teardown_parts_add_up_to_the_teardown() -> None:
    """Last step at 100.0 (rank 0), summary written at 100.4, launch returned at 104.0 after
    collect 0.2 + finish 0.1 + report 0.7: the ranks' exit and the watch took 2.6 s."""
    parts = sw.teardown_parts(100.0, 100.4, 104.0, {"watch": 9.0, "collect": 0.2, "finish": 0.1,
                                                     "report": 0.7})
    assert parts == {"train_end_s": 0.4, "exit_s": 2.6, "collect_s": 0.2, "finish_s": 0.1,
                     "report_s": 0.7}
    assert sum(parts.values()) == pytest.approx(104.0 - 100.0)
    # A summary without the stamp (an older train package, a node's garbage): those two unknown.
    unknown = sw.teardown_parts(100.0, "soon", 104.0, {"collect": 0.2})
    assert unknown["train_end_s"] is None and unknown["exit_s"] is None
    assert unknown["collect_s"] == 0.2 and unknown["report_s"] is None
    summary = sw.dead_time_summary([{"teardown_parts": parts}, {"teardown_parts": unknown},
                                    {"teardown_parts": "x"}])
    assert summary["teardown.collect_s"] == {"median": 0.2, "max": 0.2, "n": 2}
    assert summary["teardown.exit_s"]["n"] == 1


def test_wall_account_counts_one_start_up_per_launch() -> None:
    """A pool of two points (the leader's start-up holds its warm-up) and a second launch:
    work = (5 + 1 + 0.5) + (0.3 + 1 + 0.5) + (4 + 2 + 0) = 14.3 s; 18.59 s of wall is 1.3×."""
    done = {"status": "completed"}
    document = {"sessions": [{"wall_s": 10.0}, {"wall_s": 8.59}], "points": [
        {**done, "startup_s": 5.0, "warmup_wall_s": 0.3, "measured_wall_s": 1.0,
         "calibration_wall_s": 0.5},
        {**done, "startup_s": None, "warmup_wall_s": 0.3, "measured_wall_s": 1.0,
         "calibration_wall_s": 0.5},
        {**done, "startup_s": 4.0, "warmup_wall_s": 0.2, "measured_wall_s": 2.0,
         "calibration_wall_s": 0.0},
        {"status": "pending"}]}
    account = sw.wall_account(document)
    assert account == {"wall_s": 18.59, "work_s": 14.3, "points": 3, "complete": True,
                       "ratio": 1.3}
    # A point that ran without figures (it failed; an older sweep.json): no ratio, not a guess.
    document["points"][3] = {"status": "failed", "startup_s": 3.0}
    partial = sw.wall_account(document)
    assert partial["complete"] is False and partial["ratio"] is None and partial["points"] == 3
    # No session has its wall time yet (a sweep.json from before the account): nothing.
    assert sw.wall_account({"sessions": [{"wall_s": None}], "points": []}) is None


def test_rank0_wall_times(tmp_path: Path) -> None:
    run = make_run(tmp_path, 28, 256, world_size=2, nodes=1, steps=4)
    assert rank0_wall_times(rep.read_run(run)) == (1_700_000_000.0, 1_700_000_003.0)
    assert rank0_wall_times(rep.read_run(tmp_path / "none")) is None


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
    for container in (None, "c'; touch /tmp/pwned; '"):
        command = sw.run_processes_command("x'; touch /tmp/pwned; '", container)
        assert "'\"'\"'" in command
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0 and not Path("/tmp/pwned").exists()


def test_in_container_scan_counts_the_nodes_processes_of_the_run() -> None:
    """The scan the leftover check runs inside the container (registry's, signal 0), run here in
    this pid namespace: only processes with both the run's and the node's markers count, and
    none of them is signalled."""
    run_id = f"multinode_28ch_256th_scan{os.getpid()}"
    processes = [subprocess.Popen(["sleep", "30"], env={**os.environ, "GEMM_RUN_ID": run, "GEMM_NODE_RANK": rank})
                 for run, rank in ((run_id, "1"), (run_id, "1"), (run_id, "0"), (run_id + "_1", "1"))]
    try:
        time.sleep(0.2)
        count = subprocess.run(["sh", "-c", SCAN_KILL_SH, "gemm-count", "0", run_id, "1"],
                               capture_output=True, text=True, check=True).stdout
        assert count.strip() == "2"
        assert all(process.poll() is None for process in processes)
    finally:
        for process in processes:
            process.kill()
            process.wait()


@pytest.mark.skipif(shutil.which("docker") is None, reason="needs the docker client")
def test_an_unreachable_container_leaves_the_host_scan_standing() -> None:
    """No container to exec into (or no dockerd): its processes are gone with it; the host's are
    still listed, and no `container` line is invented."""
    run_id = f"multinode_28ch_256th_gone{os.getpid()}"
    ours = subprocess.Popen(["sleep", "30"], env={**os.environ, "GEMM_RUN_ID": run_id})
    try:
        time.sleep(0.2)
        command = sw.run_processes_command(run_id, f"no-such-container-{os.getpid()}", 0)
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0
        assert sw.parse_leftovers(result.stdout) == sw.Leftovers((ours.pid,), 0)
    finally:
        ours.kill()
        ours.wait()


def test_parse_leftovers() -> None:
    left = sw.parse_leftovers("12\n345\ncontainer 3\n")
    assert left == sw.Leftovers((12, 345), 3) and left and str(left) == "pid(s) 12, 345 + 3 in the container"
    assert sw.parse_pids("12\ncontainer 3\n") == [12]   # the count is no pid
    assert sw.parse_leftovers("container 2\n") and str(sw.parse_leftovers("container 2")) == "2 in the container"
    assert not sw.parse_leftovers("container 0\n") and not sw.parse_leftovers("")


def test_sweep_json_written_by_write_sweep_carries_dead_time(tmp_path: Path) -> None:
    document = new_doc()
    document["points"][1]["gap_before_s"] = 0.25
    write_sweep(tmp_path, document)
    assert json.loads((tmp_path / "sweep.json").read_text())["dead_time"]["gap_s"]["median"] == 0.25


def test_sweeps_run_in_rank_pools_unless_a_flag_or_the_resumed_sweep_says_otherwise() -> None:
    assert sweep_mode(True, dict(FLAG_DEFAULTS), None) == (True, None)
    assert sweep_mode(False, dict(FLAG_DEFAULTS), None) == (False, "--no-pool")
    # Process-wide profilers would give one profile spanning every point of a pool.
    assert sweep_mode(True, {**FLAG_DEFAULTS, "nsys": True}, None) == (
        False, "--nsys profiles whole rank processes")
    assert sweep_mode(True, {**FLAG_DEFAULTS, "rocprof_input": "in.txt"}, None)[1] == (
        "--rocprof-input profiles whole rank processes")
    # A resumed sweep keeps its mode: one begun per point (or recorded before pools were the
    # default, without the key) goes on per point; a pool sweep stays pooled unless --no-pool.
    assert sweep_mode(True, dict(FLAG_DEFAULTS), {"pool": False}) == (
        False, "the resumed sweep began with one launch per point")
    assert sweep_mode(True, dict(FLAG_DEFAULTS), {})[0] is False
    assert sweep_mode(True, dict(FLAG_DEFAULTS), {"pool": True}) == (True, None)
    assert sweep_mode(False, dict(FLAG_DEFAULTS), {"pool": True}) == (False, "--no-pool")
