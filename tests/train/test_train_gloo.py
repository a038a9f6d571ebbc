"""Real 2-rank gloo runs of the train package through torchrun (CPU).

Each run costs a few seconds (torch import in three processes, process-group setup); the
file stays around half a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import torch

from train.config import ModelConfig
from train.metrics import STEP_FIELDS
from train.model import GemmStack

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "config" / "multi_node" / "cpu_tiny.yaml"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env() -> dict[str, str]:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "NCCL_MAX_NCHANNELS": "42",  # recorded in summary.json's env
    }


def train_cmd(out: Path, *overrides: str) -> list[str]:
    """`-m train` on the tiny config writing into `out` (what follows the interpreter)."""
    return ["-m", "train", "--config", str(TINY), "--override", f"training.output_dir={out}",
            *overrides]


def torchrun_cmd(out: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        *train_cmd(out, "debug.param_checksum=true", *overrides),
    ]


def run_torchrun(
    out: Path, *overrides: str, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        torchrun_cmd(out, *overrides),
        cwd=REPO,
        env={**env(), **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def documented_names() -> set[str]:
    """Every identifier inside a `code span` of docs/METRICS.md (`telemetry.source` gives
    telemetry and source; `<name>_median` entries are documented by their name)."""
    spans = re.findall(r"`([^`]+)`", (REPO / "docs" / "METRICS.md").read_text())
    return {word for span in spans for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", span)}


def checksums(out: Path, rank: int) -> list[float]:
    return [r["param_checksum"] for r in lines(out / f"rank_{rank:02d}_metrics.jsonl")]


@pytest.fixture(scope="module")
def all_reduce_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    # The wall time of this run is a speed goal: scripts/bench_* measure it, no test bounds it.
    out = tmp_path_factory.mktemp("ar") / "out"
    return out, run_torchrun(out, "training.max_steps=8")


def test_two_ranks_complete_with_every_field(all_reduce_run: tuple[Path, Any]) -> None:
    out, proc = all_reduce_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        records = lines(out / f"rank_{rank:02d}_metrics.jsonl")
        assert [r["step"] for r in records] == list(range(1, 9))
        for record in records:
            missing = [f for f in STEP_FIELDS if f not in record]
            assert not missing, missing
            assert record["rank"] == rank and record["world_size"] == 2
            assert record["iter_ms"] > 0 and record["compute_ms"] > 0 and record["comm_ms"] > 0
            assert record["compute_ms"] <= record["iter_ms"]
            assert record["exposed_comm_ms"] == pytest.approx(
                record["comm_ms"] - record["overlap_ms"], abs=2e-4
            )
            assert record["comm_bytes"] == 4 * 128 * 128 * 4  # 4 fp32 layers of 128x128
            assert record["contention_slowdown"] is not None
    # progress lines the controller parses, and calibration results
    assert "step 8/8" in proc.stdout
    assert "calibration gemm-only" in proc.stdout and "calibration comm-only" in proc.stdout


def test_parameters_identical_on_both_ranks(all_reduce_run: tuple[Path, Any]) -> None:
    out, _ = all_reduce_run
    rank0, rank1 = checksums(out, 0), checksums(out, 1)
    assert rank0 == rank1
    # the update really changes the parameters at every step
    assert all(a != b for a, b in zip(rank0, rank0[1:], strict=False))


def reference_checksums(
    config: dict[str, Any], *, world_size: int, measured_steps: int
) -> list[float]:
    """param_checksum after each measured step, from autograd in float64: every rank's gradient
    of its loss sum(Y * +-G), averaged over ranks, one SGD step of training.lr each.

    Only the data (inputs, upstream gradients, initial weights) comes from GemmStack; the
    trainer's train steps are its warmup steps then the measured ones, alternating the sign of
    G (the first positive), and calibration steps leave the parameters alone.
    """
    model = ModelConfig(**config["model"])
    training = config["training"]
    stacks = [
        GemmStack(
            model,
            device=torch.device("cpu"),
            dtype=torch.float32,
            seed=training["seed"],
            rank=rank,
            world_size=world_size,
            bucket_mb=config["comm"]["bucket_mb"],
        )
        for rank in range(world_size)
    ]
    weights = [stacks[0].weight(layer).double() for layer in range(model.layers)]
    sums = []
    warmup = training["warmup_steps"]
    for step in range(1, warmup + measured_steps + 1):
        sign = 1.0 if step % 2 else -1.0
        grad_sum = [torch.zeros_like(w) for w in weights]
        for stack in stacks:
            leaves = [w.clone().requires_grad_(True) for w in weights]
            y = stack.inputs.double()
            for w in leaves:
                y = y @ w
            (y * stack.upstream_grad.double() * sign).sum().backward()
            for total, leaf in zip(grad_sum, leaves, strict=True):
                total += leaf.grad
        lr = training["lr"]
        weights = [w - lr * g / world_size for w, g in zip(weights, grad_sum, strict=True)]
        if step > warmup:
            sums.append(sum(float(w.sum()) for w in weights))
    return sums


def test_update_applies_the_rank_averaged_gradient(
    all_reduce_run: tuple[Path, Any],
) -> None:
    out, proc = all_reduce_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "summary.json").read_text())["config"]
    expected = reference_checksums(config, world_size=2, measured_steps=8)
    # Summing instead of averaging moves the checksum by ~0.38 at every second step here.
    assert checksums(out, 0) == pytest.approx(expected, abs=2e-3)


def test_summary(all_reduce_run: tuple[Path, Any]) -> None:
    out, _ = all_reduce_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["partial"] is False
    assert summary["world_size"] == 2 and summary["steps_completed"] == 8
    for key in (
        "iter_ms",
        "gemm_tflops",
        "local_busbw_gbps",
        "exposed_comm_fraction",
        "contention_slowdown",
        "overlapped_gemm_fraction",
        "control_ms",
    ):
        assert summary[key]["n"] == 16, key  # every step of every rank
        assert summary[key]["p10"] <= summary[key]["median"] <= summary[key]["p95"], key
    for key in ("stream_busbw_gbps", "stream_algbw_gbps", "stream_collective_ms",
                "stream_comm_slowdown"):
        assert summary[key]["n"] == 8, key  # one figure per step, from every rank's records
    # CPU: no kernels, so no kernel-active figure, and the summary says why.
    for key in ("kernel_collective_ms", "kernel_busbw_gbps", "kernel_algbw_gbps",
                "kernel_comm_slowdown", "kernel_comm_ms", "kernel_overlap_ms",
                "kernel_overlap_fraction"):
        assert summary[key] is None, key
        assert summary["null_reasons"][key] == "CPU run: no kernels to profile", key
    assert summary["kernel_active"]["reason"] == "CPU run: no kernels to profile"
    assert summary["wait_ms"]["n"] == 16
    # Calibration: the first block's 2 GEMM-only steps, then 1 more after measured step 4.
    assert summary["solo"]["compute_ms"]["n"] == 6  # 3 steps x 2 ranks
    assert [b["after_step"] for b in summary["calibration_blocks"]["blocks"]] == [0, 4]
    assert summary["solo"]["stream_busbw_gbps"]["median"] > 0
    assert summary["solo"]["kernel_busbw_gbps"] is None
    # CPU: no clock, power or temperature to read, and none invented.
    assert summary["telemetry"]["source"] is None
    assert summary["telemetry"]["train"]["sm_clock_mhz"] is None
    assert summary["launch_delay_ms"]["first_collective"] is None
    assert summary["launch_delay_ms"]["reason"].startswith("CPU run")
    assert summary["comm_stream"]["setting"] == "high"
    assert summary["comm_stream"]["priority"] is None
    assert summary["slowest_rank"]["rank"] in (0, 1) and summary["slowest_rank"]["host"]
    assert [s["step"] for s in summary["per_step"]] == list(range(1, 9))
    # Every field is documented: a user can trust a number without reading the code.
    doc = documented_names()
    names = [*summary, *summary["per_step"][0], *summary["telemetry"], *summary["solo"],
             *summary["collective_analysis"], *summary["launch_delay_ms"], *summary["model"],
             *summary["comm_stream"], *summary["kernel_active"],
             *summary["calibration_blocks"]["blocks"][0],
             *lines(out / "rank_00_metrics.jsonl")[0]]
    names += list(summary["per_rank"][0])  # <name>_median: documented by <name>
    assert not [n for n in names if n not in doc and n.removesuffix("_median") not in doc]
    # collectives.jsonl: 8 steps x (control + 4 buckets) + 3 comm-only steps x 4 buckets
    timeline = lines(out / "collectives.jsonl")
    assert len(timeline) == 8 * 5 + 3 * 4
    assert all(len(t["start_ms"]) == 2 and min(t["wait_ms"]) == 0.0 for t in timeline)
    assert not [k for k in timeline[0] if k not in doc]
    assert [r["rank"] for r in summary["per_rank"]] == [0, 1]
    assert summary["env"]["NCCL_MAX_NCHANNELS"] == "42"
    assert summary["env_differences"] == {}
    assert summary["versions"]["torch"]
    assert summary["devices"] and all(name.startswith("cpu") for name in summary["devices"])
    assert summary["config"]["model"]["layers"] == 4
    assert summary["backend"] == "gloo"


def test_second_run_into_same_dir_is_refused(all_reduce_run: tuple[Path, Any]) -> None:
    out, _ = all_reduce_run
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc = run_torchrun(out, "training.max_steps=2")
    assert proc.returncode != 0
    assert "earlier run" in proc.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize(
    "overrides",
    [
        ("comm.collective=reduce_scatter", "profiling.enabled=true", "timing.granularity=phase"),
        ("comm.collective=all_gather", "comm.overlap=false"),
    ],
    ids=["reduce_scatter-phase-timing-profiler", "all_gather-no-overlap"],
)
def test_other_collectives_keep_data_parallel_semantics(
    tmp_path: Path, all_reduce_run: tuple[Path, Any], overrides: tuple[str, ...]
) -> None:
    out = tmp_path / "out"
    no_overlap = "comm.overlap=false" in overrides
    # Harmless on gloo; the trainer must still say (once, from rank 0) that it kills overlap.
    extra_env = {"TORCH_NCCL_BLOCKING_WAIT": "1"} if no_overlap else {}
    proc = run_torchrun(out, "training.max_steps=8", *overrides, extra_env=extra_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("TORCH_NCCL_BLOCKING_WAIT=1 blocks the CPU") == int(no_overlap)
    assert checksums(out, 0) == checksums(out, 1)
    # Same data, same summed gradients: the all_reduce run's trajectory.
    reference = checksums(all_reduce_run[0], 0)
    assert checksums(out, 0) == pytest.approx(reference, rel=1e-6)
    record = lines(out / "rank_00_metrics.jsonl")[0]
    records = lines(out / "rank_00_metrics.jsonl")
    # reduce_scatter and all_gather: busbw = algbw * (n-1)/n
    assert [r["local_busbw_gbps"] for r in records] == pytest.approx(
        [r["local_algbw_gbps"] / 2 for r in records], rel=0.01, abs=1e-3  # rounded to 3 digits
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stream_busbw_gbps"]["median"] == pytest.approx(
        summary["stream_algbw_gbps"]["median"] / 2, rel=1e-3)
    if no_overlap:
        # collectives only start after the last GEMM: nothing can overlap
        assert record["overlap_ms"] == 0.0
        # Compute and comm are disjoint here, so their sum must fill much of the step; a comm
        # interval that ended at the start of its collective would leave most of it unexplained.
        explained = sorted((r["compute_ms"] + r["comm_ms"]) / r["iter_ms"] for r in records)
        assert explained[len(explained) // 2] >= 0.3, explained
        assert record["comm_bytes"] == 2 * 4 * 128 * 128 * 4  # all_gather size = n x bucket
        # The local sum of the gathered buckets is timed, apart from the communication.
        assert all(r["reduce_local_ms"] > 0 for r in records)
    else:
        assert record["comm_bytes"] == 2 * 4 * 128 * 128 * 4  # reduce_scatter + all_gather
        traces = sorted(p.name for p in (out / "torch_profiler").iterdir())
        assert traces == [
            "rank_00_step_4.json",
            "rank_01_step_4.json",
        ]  # wait 1 + warmup 1 + active 2


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_signal_stops_after_current_step(tmp_path: Path, stop_signal: signal.Signals) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        torchrun_cmd(out, "training.max_steps=1000000", "training.log_interval=1000"),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        metrics = out / "rank_00_metrics.jsonl"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        proc.send_signal(stop_signal)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped", stderr[-3000:]
    steps0, steps1 = checksums(out, 0), checksums(out, 1)
    # Both ranks agreed on the same last step, and their parameters are still identical.
    assert len(steps0) == len(steps1) == summary["steps_completed"] >= 3
    assert steps0 == steps1


def start_ranks_without_torchrun(out: Path, timeout_s: float) -> list[subprocess.Popen[str]]:
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        rank_env = {
            **env(),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        cmd = [sys.executable, *train_cmd(out, "training.max_steps=1000000",
                                          f"distributed.timeout_s={timeout_s}")]
        procs.append(
            subprocess.Popen(
                cmd,
                cwd=REPO,
                env=rank_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return procs


def wait_for_measured_steps(out: Path, procs: list[subprocess.Popen[str]], rank: int) -> None:
    metrics = out / f"rank_{rank:02d}_metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, "no measured steps within 60 s"
        for p in procs:
            assert p.poll() is None, p.communicate()[1][-3000:]
        time.sleep(0.1)


def test_killed_peer_fails_the_run(tmp_path: Path) -> None:
    """Without torchrun: kill rank 1 mid-run (its sockets close); rank 0 fails, not hangs."""
    out = tmp_path / "out"
    procs = start_ranks_without_torchrun(out, timeout_s=10)
    try:
        wait_for_measured_steps(out, procs, rank=1)
        procs[1].kill()
        started = time.monotonic()
        _, stderr = procs[0].communicate(timeout=45)
        seconds = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    assert procs[0].returncode == 1, stderr[-3000:]
    assert seconds < 40
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]


def test_stuck_peer_fails_the_run_after_the_timeout(tmp_path: Path) -> None:
    """SIGSTOP rank 1: its connections stay open and silent, so only distributed.timeout_s
    can end rank 0's wait. Rank 0 must fail once that has passed, and not much later."""
    timeout_s = 5.0
    out = tmp_path / "out"
    procs = start_ranks_without_torchrun(out, timeout_s=timeout_s)
    try:
        wait_for_measured_steps(out, procs, rank=1)
        os.kill(procs[1].pid, signal.SIGSTOP)
        started = time.monotonic()
        _, stderr = procs[0].communicate(timeout=timeout_s + 30)
        seconds = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait()
    assert procs[0].returncode == 1, stderr[-3000:]
    # The collective rank 0 waits in began at most a step (milliseconds) before the stop.
    assert timeout_s - 0.25 <= seconds <= timeout_s + 15, (seconds, stderr[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]
