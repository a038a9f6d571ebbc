"""A sweep ends in a decision a user can defend, end to end with real torchrun ranks:

- on the embedded default (this machine, CPU ranks with gloo, where channels and threads change
  nothing) a 2 x 2 sweep with --repeat 3 crowns no single winner, and a second identical sweep
  reaches the same conclusion;
- on 2 nodes of the simulated cluster, with one knob made to matter (the points of one
  NCCL_PROTO value get a 200 ms delay per step (far beyond a loaded 2-core machine's noise) through the train package's debug.delay_ms), the
  report names the other value's point, the axis is a results.csv column and forced a restart;
- an interrupted --no-pool sweep with repeats resumes in its recorded order.
"""
from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.test_sweep import sweep_env  # noqa: F401 - the fixture, shared
from tests.simcluster import SimCluster

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FAB = str(Path(sys.executable).parent / "fab")
STEPS = "training.max_steps=8"


def fab(config: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FAB, "-f", str(config), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})


def local_config(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"cluster": {"hosts_file": str(tmp_path / "no_hosts.txt"),
                                                "experiments_dir": str(tmp_path / name)}}))
    return path


def only_sweep(experiments: Path) -> Path:
    sweeps = list(experiments.glob("sweep_*"))
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def decisions(sweep_dir: Path) -> dict[str, str]:
    with (sweep_dir / "results.csv").open() as handle:
        return {f"{r['channels']}x{r['threads']}": r["decision"] for r in csv.DictReader(handle)}


def test_embedded_default_with_repeats_crowns_no_winner_twice(tmp_path: Path) -> None:
    conclusions = []
    for name in ("first", "second"):
        config = local_config(tmp_path, name)
        result = fab(config, "sweep", "-c", "4,32", "-t", "256,512", "--repeat", "3", "--override", STEPS)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        sweep_dir = only_sweep(tmp_path / name)
        document = json.loads((sweep_dir / "sweep.json").read_text())
        # 4 points x 3 runs, each run its own directory (a pool launch runs 2 channel values).
        assert len(document["points"]) == 12 and document["grid"]["repeat"] == 3
        assert len({(p["run_dir"], p.get("output_dir")) for p in document["points"]}) == 12
        order = [document["points"][i]["config"] for i in document["order"]]
        assert all(a != b for a, b in zip(order, order[1:]))
        report = (sweep_dir / "report.md").read_text()
        assert "**Best point" not in report, report[:3000]
        assert "**No single best point**: " in report and "Pick by secondary criterion" in report
        verdicts = decisions(sweep_dir)
        assert "best" not in verdicts.values() and len(verdicts) == 4
        assert "no single best point" in result.stdout
        conclusions.append(document["status"] == "completed" and "best" not in verdicts.values())
    assert conclusions == [True, True]


def test_interrupted_no_pool_sweep_with_repeats_resumes_in_order(tmp_path: Path) -> None:
    config = local_config(tmp_path, "resume")
    process = subprocess.Popen(
        [FAB, "-f", str(config), "sweep", "--no-pool", "-c", "4", "-t", "256,512", "--repeat", "2",
         "--seed", "3", "--override", "training.max_steps=60", "--override", "training.log_interval=5"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "COLUMNS": "200"})
    lines: list[str] = []
    try:
        assert process.stdout is not None
        second = False
        for line in process.stdout:
            lines.append(line)
            second = second or " (2 of 4 to run)" in line
            if second and line.startswith("[node ") and " step " in line:
                os.killpg(process.pid, signal.SIGINT)
                break
        lines += process.stdout.readlines()
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert code == 130, "".join(lines)[-4000:]
    sweep_dir = only_sweep(tmp_path / "resume")
    document = json.loads((sweep_dir / "sweep.json").read_text())
    order = document["order"]
    assert [document["points"][i]["status"] for i in order] == ["completed", "interrupted", "pending", "pending"]

    resumed = fab(config, "sweep", "--resume", str(sweep_dir), "--override", "training.max_steps=60",
                  "--override", "training.log_interval=5")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
    assert "(2 points × 2 runs, 3 of 4 runs to run, rounds shuffled with seed 3)" in resumed.stdout
    assert "one launch per point (the resumed sweep began with one launch per point)" in resumed.stdout
    document = json.loads((sweep_dir / "sweep.json").read_text())
    assert document["sessions"][1]["ran"] == order[1:]
    assert all(p["status"] == "completed" for p in document["points"])
    assert len(list((tmp_path / "resume").glob("multinode_*"))) == 5   # the interrupted run too


@pytest.mark.cluster
def test_a_knob_made_to_matter_is_named_on_the_cluster(cluster3: SimCluster, sweep_env) -> None:
    config, experiments = sweep_env
    result = fab(config, "sweep", "-c", "8", "-t", "256", "--axis", "NCCL_PROTO=Simple,LL128",
                 "--repeat", "2", "--override", STEPS,
                 "--point-override", "*x*,NCCL_PROTO=LL128:debug.delay_rank=0",
                 "--point-override", "*x*,NCCL_PROTO=LL128:debug.delay_ms=200")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "a new launch for each value of NCCL_PROTO" in result.stdout
    sweep_dir = only_sweep(experiments)
    document = json.loads((sweep_dir / "sweep.json").read_text())
    assert len(list(experiments.glob("multinode_*"))) == 4   # every run its own launch
    report = (sweep_dir / "report.md").read_text()
    decision = report.split("## Iteration time per point")[0]
    assert "**Best point: 8ch × 256th NCCL_PROTO=Simple** (channels=8, threads=256, NCCL_PROTO=Simple)" in report, \
        decision
    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["NCCL_PROTO"], r["decision"], r["runs"]) for r in rows] == [
        ("Simple", "best", "2"), ("LL128", "slower beyond noise", "2")]
    # Every run ran with its axis value in its environment (the ranks record what env.sh set).
    for point in document["points"]:
        out = (sweep_dir / point["run_dir"]).resolve() / point["output_dir"]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["env"]["NCCL_PROTO"] == point["settings"]["NCCL_PROTO"]

    # The answer carried out: sourced by a plain shell, the export sets exactly what the best
    # point's launches exported (their env.sh, recorded in run.json).
    exported = experiments / "best.env"
    result = fab(config, "report", str(sweep_dir), "--no-plots", "--export", str(exported))
    assert result.returncode == 0, result.stderr
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    shell = subprocess.run(["bash", "-c", f". {exported}; env -0"], capture_output=True, env=clean, check=True)
    got = dict(item.split("=", 1) for item in shell.stdout.decode().split("\0") if item.startswith(("NCCL_", "RCCL_")))
    assert got["NCCL_PROTO"] == "Simple" and got["NCCL_MAX_NCHANNELS"] == "8" and got["NCCL_NTHREADS"] == "256"
    for point in (p for p in document["points"] if p["settings"]["NCCL_PROTO"] == "Simple"):
        recorded = json.loads(((sweep_dir / point["run_dir"]).resolve() / "run.json").read_text())["env"]["common"]
        assert got == {k: v for k, v in recorded.items() if k.startswith(("NCCL_", "RCCL_"))
                       and k != "NCCL_SOCKET_IFNAME"}


@pytest.mark.cluster
def test_fab_tune_finds_the_point_made_to_matter_in_40_percent_of_the_grids_runs(cluster3: SimCluster,
                                                                                 sweep_env) -> None:
    """A 6 x 4 x 2 space (channels x threads x NCCL_PROTO) on 2 nodes, each point slowed on
    purpose by its distance from 16ch x 256th Simple (rank 0 sleeps 20 ms there, 15 ms more per
    channel step, 20 ms per thread step, 30 ms for LL128): the full grid at 3 runs each would be
    144 runs; the tune names that point best in at most 40 % of them and exports it."""
    config, experiments = sweep_env
    channels, threads = [2, 4, 8, 16, 32, 64], [64, 128, 256, 512]
    overrides = ["--point-override", "*x*:debug.delay_rank=0"]
    for (i, c), (j, t), (k, proto) in itertools.product(enumerate(channels), enumerate(threads),
                                                        enumerate(["Simple", "LL128"])):
        delay = 20 + 15 * abs(i - 3) + 20 * abs(j - 2) + 30 * k
        overrides += ["--point-override", f"{c}x{t},NCCL_PROTO={proto}:debug.delay_ms={delay}"]
    exported = experiments / "tuned.env"
    result = fab(config, "tune", "-c", ",".join(map(str, channels)), "-t", ",".join(map(str, threads)),
                 "--axis", "NCCL_PROTO=Simple,LL128", "--override", STEPS, *overrides,
                 "--export", str(exported), timeout=1800)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "(48 points; the full grid at 3 runs each would be 144 runs)" in result.stdout
    # Each round is printed: the first line starts from the middle of every axis.
    assert "tune: pass 1, channels line at 128th NCCL_PROTO=Simple: 6 point(s) with 1 run(s) each" in result.stdout
    assert "tune: pass 1: channels moves to 16ch" in result.stdout
    sweep_dir = only_sweep(experiments)
    document = json.loads((sweep_dir / "sweep.json").read_text())
    assert document["kind"] == "tune" and document["status"] == "completed"
    runs = len(document["points"])
    print(f"fab tune on 2 sim nodes: {runs} of the grid's 144 runs; "
          + "; ".join(m for m in document["tune"]["messages"] if m.startswith(("final", "pass"))))
    assert runs <= 0.40 * 144 and document["tune"]["runs"] == runs, (runs, document["tune"]["messages"])
    assert f"tune: {runs} runs ({runs / 144:.0%} of the full grid's 144)" in result.stdout
    # Every run its own directory, none run twice.
    assert len({(p["run_dir"], p.get("output_dir")) for p in document["points"]}) == runs
    report = (sweep_dir / "report.md").read_text()
    assert "**Best point: 16ch × 256th NCCL_PROTO=Simple**" in report, report.split("## Iteration")[0]
    sourced = subprocess.run(["sh", "-c", f". {exported} && env"], capture_output=True, text=True, check=True)
    assert "NCCL_PROTO=Simple" in sourced.stdout.splitlines()
