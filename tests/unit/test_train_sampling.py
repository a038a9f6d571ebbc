"""When the trainer reads the device counters (issue 23, finding 6), on a real one-rank gloo
group in process.

The counters are read through train.telemetry's Telemetry with a reader that logs when it is
called (this machine has no GPU to read); the steps are the real Stepper's. Every kind of step
must be read at the same phase: right after its own synchronize, i.e. at its end. Before the
fix the reading came before the synchronize: a calibration step (the host waits for each one,
so it starts after an idle gap) was read as it began, a train step (queued one step ahead on
GPU) under continuous load.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from train.config import load_config
from train.runtime import RuntimePlan
from train.signals import StopSignals
from train.stepper import COMM, COMPUTE, TRAIN, Stepper
from train.telemetry import Telemetry
from train.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "config" / "multi_node" / "cpu_tiny.yaml"


@pytest.fixture
def one_rank_group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spied_trainer(tmp_path: Path, log: list[tuple[Any, ...]]) -> Trainer:
    config = load_config(TINY, [f"training.output_dir={tmp_path}", "model.tokens=16",
                                "model.hidden=16"])
    plan = RuntimePlan("gloo", torch.device("cpu"), torch.float32, 0, 1, 0, 1)
    trainer = Trainer(config, plan, StopSignals())
    from train.model import GemmStack

    stack = GemmStack(config.model, device=plan.device, dtype=plan.dtype, seed=1, rank=0,
                      world_size=1, bucket_mb=config.comm.bucket_mb)
    stepper = Stepper(stack, collective="all_reduce", overlap=True, lr=0.1, world_size=1,
                      granularity="gemm", checksum=False)
    real_resolve = stepper.resolve

    def resolve(pending: Any) -> Any:
        result = real_resolve(pending)
        log.append(("synchronized", pending.kind, pending.index))
        return result

    stepper.resolve = resolve  # type: ignore[method-assign]
    trainer.stepper = stepper

    def clock() -> float:
        log.append(("read",))
        return 1500.0

    trainer.telemetry = Telemetry("spy", readers={"sm_clock_mhz": clock})
    return trainer


@pytest.mark.usefixtures("one_rank_group")
@pytest.mark.parametrize("kind", [TRAIN, COMPUTE, COMM])
def test_every_kind_of_step_is_read_right_after_its_synchronize(
        tmp_path: Path, kind: str) -> None:
    log: list[tuple[Any, ...]] = []
    trainer = spied_trainer(tmp_path, log)
    results: list[Any] = []
    try:
        assert trainer.run_phase(kind, 3, results.append) is False
    finally:
        assert trainer.stepper is not None
        trainer.stepper.close()
    assert log == [entry for index in (1, 2, 3)
                   for entry in (("synchronized", kind, index), ("read",))]
    assert [r.telemetry["sm_clock_mhz"] for r in results] == [1500.0] * 3
