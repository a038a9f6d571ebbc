"""The hardware refusals of train.runtime: exit 2 naming the key, before any process group starts.

This machine has no GPU, so the GPU branches are driven by patching torch's device queries; the
CPU-only refusal (nccl without a GPU) also runs for real through the command line.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train import runtime
from train.config import ConfigError, build_config

REPO = Path(__file__).resolve().parents[2]
SOURCE = "configs/x.yaml"


def config(**sections: dict) -> object:
    return build_config(sections, source=SOURCE)


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def one_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)


def test_bf16_on_a_cpu_without_it_is_refused_naming_the_key(
        no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime, "_cpu_supports", lambda dtype: dtype == "fp32")
    with pytest.raises(ConfigError) as raised:
        runtime.plan_runtime(config(training={"dtype": "bf16"}))
    message = str(raised.value)
    assert message.startswith(SOURCE) and "training.dtype bf16" in message and "fp32" in message
    plan = runtime.plan_runtime(config(training={"dtype": "fp32"}))
    assert plan.backend == "gloo" and plan.device.type == "cpu" and plan.dtype == torch.float32


def test_a_delayed_rank_outside_the_run_is_refused(
        no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"debug.delay_rank 2 is not a rank of this run "
                                          r"\(world size 2\); use 0..1"):
        runtime.plan_runtime(config(training={"dtype": "fp32"},
                                    debug={"delay_rank": 2, "delay_ms": 5.0}))
    plan = runtime.plan_runtime(config(training={"dtype": "fp32"},
                                       debug={"delay_rank": 1, "delay_ms": 5.0}))
    assert plan.world_size == 2


def test_nccl_without_a_gpu_is_refused(no_gpu: None) -> None:
    with pytest.raises(ConfigError, match=r"distributed.backend nccl needs a GPU"):
        runtime.plan_runtime(config(distributed={"backend": "nccl"}))


def test_auto_takes_nccl_on_a_gpu_and_a_local_rank_beyond_the_gpus_is_refused(
        one_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "0")
    plan = runtime.plan_runtime(config(training={"dtype": "fp32"}))
    assert plan.backend == "nccl" and plan.device == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK 1 has no GPU: 1 visible.*at most 1"):
        runtime.plan_runtime(config(training={"dtype": "fp32"}))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_exits_2_with_one_line_when_nccl_has_no_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--config", str(REPO / "config/multi_node/cpu_tiny.yaml"),
         "--override", "distributed.backend=nccl", f"training.output_dir={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cpu_tiny.yaml" in lines[0] and "needs a GPU" in lines[0], lines
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
