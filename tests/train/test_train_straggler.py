"""A deliberately late rank on real gloo ranks: the delay shows as wait, not as a slow link.

Rank 1 sleeps DELAY_MS before the backward pass of every even measured step
(debug.delay_every=2); the odd steps of the same run are the undelayed reference. Two separate
runs on a shared 2-core machine differ by more than 10 % in busbw from the load alone (measured
here: 0.68 and 1.31 GB/s for two identical undelayed runs), while neighbouring steps of one run
see the same load. Collectives run after the backward (comm.overlap=false), so on both kinds
of step they compete with nothing on their rank.

Eight 8 MiB buckets per step, not four: the first collective after a 30 ms wait really runs
about 1 ms (10-15 %) longer than the same collective without one, on the rank that arrived
last too (measured on this VM; it grows with the wait, not seen at 10 ms, and stays when the
late rank spins instead of sleeping and when low-priority spinners keep both vCPUs busy, so
it is not only an idle vCPU waking up). By the issue's definition that is collective time,
not wait, and it stays in busbw; with four collectives per step it moved the busbw ratio to
0.92-0.97 (100 steps), with eight it is a few per cent of the step's collective time, so the
test sees what it is about (the wait itself left out of busbw) instead of that second effect.

Under load the ranks' own scheduling adds skew both ways (undelayed steps then wait 2-30 ms
too, and a rank descheduled for longer than the delay now and then arrives last on a delayed
step), so the wait the delay causes is read as a difference on the collective it lands on
(the step's first gradient collective): rank 0's wait minus rank 1's (signed, so centred on 0
without a delay), delayed steps against undelayed ones.

160 steps (80 of each kind): a smaller sample is the noise floor under load. At load average
5-6 two interleaved halves of the *undelayed* steps of one run differed by up to 12 % in busbw
over 60 steps, 3-8 % over 160. At that load (two spinning processes on top of other jobs) 2
of 3 runs still failed (busbw ratio 1.116 with the undelayed-vs-undelayed control at 1.081);
with other jobs alone (load average 2.4-3.9) every run passed.

Measured (docs/PERFORMANCE.md; scripts/bench_straggler.py runs the same): busbw ratio
0.969-1.005 and the wait the delay added 30.0-30.4 ms for 30 ms injected, at load average
3.9-6.2 from other processes on this VM.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.train.test_train_gloo import REPO, TINY, env, free_port, lines

pytestmark = pytest.mark.slow

DELAY_MS = 30.0
STEPS = 160


@pytest.fixture(scope="module")
def delayed_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("straggler") / "multinode_8ch_256th_20250101_120000"
    out = run_dir / "256thread_8channels"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "-m", "train", "--config", str(TINY), "--override", f"training.output_dir={out}",
        f"training.max_steps={STEPS}", "training.log_interval=1000",
        # 8 MiB buckets: each collective takes milliseconds, well above scheduling noise;
        # eight of them per step (see the module's docstring)
        "model.layers=4", "model.tokens=16", "model.hidden=2048", "comm.bucket_mb=8",
        "comm.overlap=false", "calibration.interval_steps=16",
        "debug.delay_rank=1", f"debug.delay_ms={DELAY_MS}", "debug.delay_every=2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 1 sleeps 30 ms before the backward pass of train steps 2, 4, 6, ..." in proc.stdout
    assert "slowest rank 1" in proc.stdout
    return run_dir


def summary_of(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "256thread_8channels" / "summary.json").read_text())


def split(per_step: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    delayed = [s for s in per_step if s["step"] % 2 == 0]
    return delayed, [s for s in per_step if s["step"] % 2]


def test_busbw_does_not_drop_with_the_delay(delayed_run: Path) -> None:
    delayed, undelayed = split(summary_of(delayed_run)["per_step"])
    assert len(delayed) == len(undelayed) == STEPS // 2
    late = statistics.median(s["stream_busbw_gbps"] for s in delayed)
    reference = statistics.median(s["stream_busbw_gbps"] for s in undelayed)
    assert 0.9 <= late / reference <= 1.1, (late, reference)
    # The rank's own view, which counts the wait as communication, does drop: that figure
    # is what the cross-rank analysis corrects. Its comm_ms holds the delay (its busbw ratio:
    # 0.67-0.78 at load average 3.9-6.2, 0.78-0.89 in 60-step runs; undelayed steps wait
    # under load too).
    records = lines(delayed_run / "256thread_8channels" / "rank_00_metrics.jsonl")
    local_late = statistics.median(r["local_busbw_gbps"] for r in records if r["step"] % 2 == 0)
    local_ref = statistics.median(r["local_busbw_gbps"] for r in records if r["step"] % 2)
    assert local_late < local_ref, (local_late, local_ref)
    comm_late = statistics.median(r["comm_ms"] for r in records if r["step"] % 2 == 0)
    comm_ref = statistics.median(r["comm_ms"] for r in records if r["step"] % 2)
    # ~+30 ms idle; +12 ms once at load average 6, where undelayed steps waited too
    assert comm_late > comm_ref, (comm_late, comm_ref)


def first_collective_skew(run_dir: Path) -> dict[int, float]:
    """Per train step, rank 0's wait minus rank 1's on the step's first gradient collective
    (collectives.jsonl): the one the delayed rank arrives late at. Signed, so it is centred
    on 0 when nobody is delayed (a wait alone is never below 0)."""
    skew: dict[int, tuple[int, float]] = {}
    for op in lines(run_dir / "256thread_8channels" / "collectives.jsonl"):
        if op["phase"] == "train" and op["op"] != "control":
            first = skew.get(op["step"])
            if first is None or op["seq"] < first[0]:
                skew[op["step"]] = (op["seq"], op["wait_ms"][0] - op["wait_ms"][1])
    return {step: value for step, (_, value) in skew.items()}


def test_wait_shows_the_injected_delay_on_the_rank_that_waited(delayed_run: Path) -> None:
    summary = summary_of(delayed_run)
    delayed, _ = split(summary["per_step"])
    wait = statistics.median(s["wait_ms_max"] for s in delayed)
    # ~1.05 x the delay on an idle machine; with the cores oversubscribed the ranks' own
    # scheduling adds real skew both ways (30 ms gave 31-63 ms under two spinning processes).
    assert 0.6 * DELAY_MS <= wait <= 2.5 * DELAY_MS, wait
    # What the delay added, on the collective it lands on, delayed steps against undelayed
    # ones of the same run: the skew the load itself causes cancels (30.0-30.4 ms for 30).
    # Summed over the whole step the control all-reduce and the later buckets add the load's
    # skew: 19-40 ms for 30 under two spinning processes, against 27-31 ms on the first
    # collective.
    skew = first_collective_skew(delayed_run)
    added = (statistics.median(v for step, v in skew.items() if step % 2 == 0)
             - statistics.median(v for step, v in skew.items() if step % 2))
    assert 0.75 * DELAY_MS <= added <= 1.5 * DELAY_MS, added
    # rank 0 waited, for rank 1, on most delayed steps: every one on an idle machine, 22 of
    # 30 at load average 5 (a rank descheduled for longer than the delay arrives last)
    assert sum(s["wait_ms_max_rank"] == 0 for s in delayed) >= 0.6 * len(delayed)
    assert sum(s["waited_for_rank"] == 1 for s in delayed) >= 0.6 * len(delayed)
    per_rank = {r["rank"]: r for r in summary["per_rank"]}
    assert per_rank[0]["wait_ms_p95"] >= 0.6 * DELAY_MS
    # rank 1 caused ~30 ms x 30 delayed steps, rank 0 what the load skewed it by: ~0 idle,
    # but 940 ms against 1300 under two spinning processes on top of other jobs (a total, so
    # the load's long stalls weigh in; the medians above are what stays exact)
    assert per_rank[1]["caused_wait_ms_total"] > per_rank[0]["caused_wait_ms_total"]


def test_summary_and_report_name_the_delayed_rank(delayed_run: Path, tmp_path: Path) -> None:
    from tasks.lib.report.outputs import write_report

    slowest = summary_of(delayed_run)["slowest_rank"]
    assert (slowest["rank"], slowest["by"]) == (1, "caused_wait")
    assert slowest["host"]

    write_report(delayed_run, tmp_path, plots=False)
    row = next(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert row["slowest_rank"] == "1" and row["slowest_host"] == slowest["host"]
    markdown = (tmp_path / "report.md").read_text()
    assert f"rank 1 ({slowest['host']})" in markdown
    assert "the others waited" in markdown


def test_the_debug_delay_is_refused_for_a_rank_outside_the_run(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(TINY), "--override",
         f"training.output_dir={tmp_path / 'out'}", "debug.delay_rank=1", "debug.delay_ms=5"],
        cwd=REPO, env={**env(), "WORLD_SIZE": "1", "RANK": "0"}, capture_output=True,
        text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "debug.delay_rank 1 is not a rank of this run" in proc.stderr
    assert not os.path.exists(tmp_path / "out" / "summary.json")
