"""One training step of each kind, with its timestamps (imports torch).

GPU: GEMMs run on the compute stream; each gradient bucket's collectives run on a dedicated
communication stream that waits on an event recorded right after the bucket's last dW GEMM,
so they overlap the remaining backward GEMMs. CUDA events are recorded around every GEMM and
every collective (the end event after the collective completes on the comm stream), and the
step is read back with a single synchronize on its end event. The trainer reads step N after
it has queued step N+1, so reading the events and writing metrics never leaves the GPU idle.

CPU (gloo): a worker thread plays the communication stream: it runs each bucket's collectives
in order, stamping perf_counter before and after each (completion, not enqueue).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from train.metrics import CollectiveTiming, StepTimes
from train.model import Bucket, GemmStack

# Kinds of step: "train" (forward, backward with bucketed collectives, update), "compute"
# (GEMM-only calibration), "comm" (communication-only calibration).
TRAIN, COMPUTE, COMM = "train", "compute", "comm"

_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CudaClock:
    """Timing events on the current stream; a pool reused step after step."""

    def __init__(self) -> None:
        self._pool: list[torch.cuda.Event] = []
        self._used = 0
        self.start: Any = None
        self.end: Any = None

    def mark(self) -> torch.cuda.Event:
        if self._used == len(self._pool):
            self._pool.append(torch.cuda.Event(enable_timing=True))
        event = self._pool[self._used]
        self._used += 1
        event.record()
        return event

    def begin(self) -> None:
        self._used = 0
        self.start = self.mark()

    def finish(self) -> None:
        self.end = self.mark()

    def synchronize(self) -> None:
        self.end.synchronize()

    def ms(self, marker: torch.cuda.Event) -> float:
        return self.start.elapsed_time(marker)


class CpuClock:
    def __init__(self) -> None:
        self.start = 0.0
        self.end = 0.0

    def mark(self) -> float:
        return time.perf_counter()

    def begin(self) -> None:
        self.start = time.perf_counter()

    def finish(self) -> None:
        self.end = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def ms(self, marker: float) -> float:
        return (marker - self.start) * 1e3


class CommWorker:
    """A thread that runs submitted collectives in order: the CPU's communication stream."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="comm-worker", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            task = self._queue.get()
            try:
                if task is None:
                    return
                if self._error is None:  # after a failure the group is unusable: skip the rest
                    task()
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread in join()
                self._error = exc
            finally:
                self._queue.task_done()

    def submit(self, task: Callable[[], None]) -> None:
        self._queue.put(task)

    def join(self) -> None:
        self._queue.join()
        if self._error is not None:
            raise RuntimeError(f"collective failed: {self._error}") from self._error

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)


@dataclass
class PendingStep:
    """A step queued on the device whose timestamps are not read yet."""

    kind: str
    index: int
    clock: Any
    gemm_marks: list[tuple[Any, Any]] | None = None
    comm_marks: list[tuple[Any, Any, str, int]] = field(default_factory=list)
    stop_flag: torch.Tensor | None = None
    checksum: torch.Tensor | None = None


@dataclass
class StepResult:
    kind: str
    index: int
    times: StepTimes
    stop_requested: bool
    checksum: float | None


@dataclass(frozen=True)
class CollectiveOp:
    name: str
    size_bytes: int  # nccl-tests "size" of the call
    run: Callable[[], Any]


class Stepper:
    """Runs steps on one rank's GemmStack and turns their marks into StepTimes."""

    def __init__(
        self,
        stack: GemmStack,
        *,
        collective: str,
        overlap: bool,
        lr: float,
        world_size: int,
        granularity: str,
        checksum: bool,
    ) -> None:
        self.stack = stack
        self.collective = collective
        self.overlap = overlap
        self.world_size = world_size
        self.alpha = -lr / world_size  # collectives sum gradients; the update averages them
        self.time_gemms = granularity == "gemm"
        self.time_phases = granularity == "phase"
        self.time_comm = granularity in ("gemm", "phase")
        self.want_checksum = checksum
        self.train_steps = 0  # every train step, warmup included: sets the upstream sign
        self.is_cuda = stack.device.type == "cuda"
        device = stack.device

        self._ready_at: dict[int, list[Bucket]] = {}
        for bucket in stack.buckets:
            self._ready_at.setdefault(bucket.ready_after, []).append(bucket)
        self._ops, self._post = self._build_ops()

        # Two of everything the host reads back: step N is read while step N+1 is queued.
        self._clocks = [CudaClock(), CudaClock()] if self.is_cuda else [CpuClock(), CpuClock()]
        self._flags = [torch.zeros(1, dtype=torch.float32, device=device) for _ in range(2)]
        pin = self.is_cuda
        self._flags_host = [torch.zeros(1, dtype=torch.float32, pin_memory=pin) for _ in range(2)]
        self._checksums_host = [
            torch.zeros(1, dtype=torch.float64, pin_memory=pin) for _ in range(2)
        ]
        if self.is_cuda:
            self.compute_stream = torch.cuda.current_stream(device)
            self.comm_stream = torch.cuda.Stream(device=device)
            self._ready_events = [torch.cuda.Event() for _ in stack.buckets]
            self.worker: CommWorker | None = None
        else:
            self.worker = CommWorker()

    # ---- collectives -------------------------------------------------------------------
    def _build_ops(self) -> tuple[list[list[CollectiveOp]], list[Callable[[], Any] | None]]:
        """Each bucket's collective calls, closures over persistent buffers.

        all_reduce: one all_reduce of the bucket. reduce_scatter: reduce_scatter of the bucket
        into a shard, then all_gather of the reduced shards back into the bucket (the
        decomposed all-reduce that ZeRO/FSDP issue), both timed. all_gather: all_gather of
        every rank's bucket (world_size times the bytes) then a local sum on the comm stream,
        not timed as communication.
        """
        stack, n = self.stack, self.world_size
        largest = max(b.numel for b in stack.buckets)
        if self.collective == "reduce_scatter":
            shard_buf = torch.empty(largest // n, dtype=stack.dtype, device=stack.device)
        elif self.collective == "all_gather":
            gather_buf = torch.empty(largest * n, dtype=stack.dtype, device=stack.device)
        ops: list[list[CollectiveOp]] = []
        posts: list[Callable[[], Any] | None] = []
        for bucket in stack.buckets:
            view = stack.bucket_view(bucket)
            size = stack.bucket_bytes(bucket)
            post: Callable[[], Any] | None = None
            if self.collective == "all_reduce":
                bucket_ops = [CollectiveOp("all_reduce", size, lambda v=view: dist.all_reduce(v))]
            elif self.collective == "reduce_scatter":
                shard = shard_buf[: bucket.numel // n]
                bucket_ops = [
                    CollectiveOp(
                        "reduce_scatter", size, lambda s=shard, v=view: _reduce_scatter(s, v)
                    ),
                    CollectiveOp("all_gather", size, lambda s=shard, v=view: _all_gather(v, s)),
                ]
            else:
                gathered = gather_buf[: bucket.numel * n]
                bucket_ops = [
                    CollectiveOp(
                        "all_gather", size * n, lambda g=gathered, v=view: _all_gather(g, v)
                    )
                ]

                def post(g: torch.Tensor = gathered, v: torch.Tensor = view) -> None:
                    torch.sum(g.view(n, -1), dim=0, out=v)

            ops.append(bucket_ops)
            posts.append(post)
        return ops, posts

    def _run_bucket(self, bucket: Bucket, pending: PendingStep) -> None:
        """Runs a bucket's collectives in the current (comm) context, marking each."""
        clock = pending.clock
        for op in self._ops[bucket.index]:
            if self.time_comm:
                start = clock.mark()
                op.run()
                pending.comm_marks.append((start, clock.mark(), op.name, op.size_bytes))
            else:
                op.run()
        post = self._post[bucket.index]
        if post is not None:
            post()

    def _submit_bucket(self, bucket: Bucket, pending: PendingStep) -> None:
        if self.is_cuda:
            if self.time_gemms and pending.gemm_marks:
                # The last GEMM's end event already marks this point of the compute stream;
                # one event fewer between GEMMs.
                ready = pending.gemm_marks[-1][1]
            else:
                ready = self._ready_events[bucket.index]
                ready.record(self.compute_stream)
            self.comm_stream.wait_event(ready)
            with torch.cuda.stream(self.comm_stream):
                self._run_bucket(bucket, pending)
        else:
            assert self.worker is not None
            self.worker.submit(lambda: self._run_bucket(bucket, pending))

    def _join_comm(self) -> None:
        if self.is_cuda:
            self.compute_stream.wait_stream(self.comm_stream)
        else:
            assert self.worker is not None
            self.worker.join()

    def _submit_stop_flag(self, pending: PendingStep, slot: int, stop: bool) -> None:
        """Queues a one-element MAX all-reduce of the local stop request on the comm stream,
        before this step's buckets: every rank then reads the same decision for this step.
        On GPU it runs alongside the forward GEMMs and is not timed."""
        flag, host = self._flags[slot], self._flags_host[slot]

        def agree() -> None:
            flag.fill_(1.0 if stop else 0.0)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            host.copy_(flag, non_blocking=self.is_cuda)

        if self.is_cuda:
            with torch.cuda.stream(self.comm_stream):
                agree()
        else:
            assert self.worker is not None
            self.worker.submit(agree)
        pending.stop_flag = host

    # ---- GEMMs -------------------------------------------------------------------------
    def _gemm(
        self, out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, pending: PendingStep
    ) -> None:
        if self.time_gemms:
            start = pending.clock.mark()
            torch.mm(a, b, out=out)
            assert pending.gemm_marks is not None
            pending.gemm_marks.append((start, pending.clock.mark()))
        else:
            torch.mm(a, b, out=out)

    def _forward(self, pending: PendingStep) -> None:
        stack = self.stack
        start = pending.clock.mark() if self.time_phases else None
        for layer in range(stack.layers):
            out = stack.activations[layer + 1] if layer + 1 < stack.layers else stack.output
            self._gemm(out, stack.activations[layer], stack.weight(layer), pending)
        if start is not None and pending.gemm_marks is not None:
            pending.gemm_marks.append((start, pending.clock.mark()))

    def _backward(
        self,
        pending: PendingStep,
        on_ready: Callable[[Bucket], None] | None,
        negate: bool = False,
    ) -> None:
        stack = self.stack
        start = pending.clock.mark() if self.time_phases else None
        upstream = stack.upstream_grad_negated if negate else stack.upstream_grad
        for position, layer in enumerate(reversed(range(stack.layers))):
            # dW first, so its bucket can start communicating while dX is computed.
            self._gemm(stack.grad(layer), stack.activations[layer].t(), upstream, pending)
            if on_ready is not None:
                for bucket in self._ready_at.get(position, ()):
                    on_ready(bucket)
            if layer > 0:
                downstream = stack.grad_buffers[position % 2]
                self._gemm(downstream, upstream, stack.weight(layer).t(), pending)
                upstream = downstream
        if start is not None and pending.gemm_marks is not None:
            pending.gemm_marks.append((start, pending.clock.mark()))

    # ---- steps ---------------------------------------------------------------------------
    def run(self, kind: str, index: int, *, stop_requested: bool | None = None) -> PendingStep:
        """Queues one step. stop_requested (train steps) rides along as the agreed stop flag."""
        slot = index % 2
        clock = self._clocks[slot]
        pending = PendingStep(
            kind,
            index,
            clock,
            gemm_marks=[] if (self.time_gemms or self.time_phases) and kind != COMM else None,
        )
        clock.begin()
        if kind == TRAIN:
            if stop_requested is not None:
                self._submit_stop_flag(pending, slot, stop_requested)
            self._forward(pending)
            on_ready = (lambda b: self._submit_bucket(b, pending)) if self.overlap else None
            self.train_steps += 1
            self._backward(pending, on_ready, negate=self.train_steps % 2 == 0)
            if not self.overlap:
                for bucket in self.stack.buckets:
                    self._submit_bucket(bucket, pending)
            self._join_comm()
            self.stack.params.add_(self.stack.grads, alpha=self.alpha)
            if self.want_checksum:
                total = self.stack.params.sum(dtype=torch.float64)
                self._checksums_host[slot].copy_(total.reshape(1), non_blocking=self.is_cuda)
                pending.checksum = self._checksums_host[slot]
        elif kind == COMPUTE:
            self._forward(pending)
            self._backward(pending, None)
        elif kind == COMM:
            if self.is_cuda:
                self.comm_stream.wait_stream(self.compute_stream)
            for bucket in self.stack.buckets:
                if self.is_cuda:
                    with torch.cuda.stream(self.comm_stream):
                        self._run_bucket(bucket, pending)
                else:
                    assert self.worker is not None
                    self.worker.submit(lambda b=bucket: self._run_bucket(b, pending))
            self._join_comm()
        else:
            raise ValueError(f"unknown step kind {kind!r}")
        clock.finish()
        return pending

    def resolve(self, pending: PendingStep) -> StepResult:
        """Waits for the step (the one synchronize) and converts its marks to milliseconds."""
        clock = pending.clock
        clock.synchronize()
        gemm = None
        if pending.gemm_marks is not None:
            gemm = [(clock.ms(s), clock.ms(e)) for s, e in pending.gemm_marks]
        comm: list[CollectiveTiming] | None = [
            CollectiveTiming(clock.ms(s), clock.ms(e), name, size)
            for s, e, name, size in pending.comm_marks
        ]
        if not self.time_comm and pending.kind != COMPUTE:
            comm = None  # collectives ran untimed: unknown, not zero
        if pending.kind == COMM and pending.gemm_marks is None and self.time_comm:
            gemm = []  # communication-only: no GEMMs by construction, comm_ms still wanted
        times = StepTimes(iter_ms=clock.ms(clock.end), gemm=gemm, comm=comm)
        stop = bool(pending.stop_flag[0].item() > 0) if pending.stop_flag is not None else False
        checksum = float(pending.checksum[0].item()) if pending.checksum is not None else None
        return StepResult(pending.kind, pending.index, times, stop, checksum)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
