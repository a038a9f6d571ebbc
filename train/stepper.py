"""One training step of each kind, with its timestamps (imports torch).

GPU: GEMMs run on the compute stream; each gradient bucket's collectives run on a dedicated
communication stream that waits on an event recorded right after the bucket's last dW GEMM,
so they overlap the remaining backward GEMMs. CUDA events are recorded around every GEMM and
every collective (the end event after the collective completes on the comm stream), and the
step is read back with a single synchronize on its end event. The trainer reads step N after
it has queued step N+1, so reading the events and writing metrics never leaves the GPU idle.

Each collective also carries the host time it was issued (enqueue), and every step its start
on the rank's run timeline (ms since the anchor the trainer sets after a start-of-run barrier),
so the trainer can line up every rank's collectives at the end of the run (train.collectives).
The per-step stop-flag all-reduce (control) and the all_gather mode's local sum are timed too.

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


def _host_ms(seconds: float) -> float:
    return seconds * 1e3


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
class CommMark:
    """One collective as issued: its start/end marks, what it moved, when the host issued it."""

    start: Any
    end: Any
    name: str
    size_bytes: int
    bucket: int
    enqueue_s: float  # host perf_counter when issued (submitted to the worker, on CPU)


@dataclass
class PendingStep:
    """A step queued on the device whose timestamps are not read yet."""

    kind: str
    index: int
    clock: Any
    gemm_marks: list[tuple[Any, Any]] | None = None
    comm_marks: list[CommMark] = field(default_factory=list)
    control_mark: CommMark | None = None
    reduce_marks: list[tuple[Any, Any]] | None = None
    stop_flag: torch.Tensor | None = None
    checksum: torch.Tensor | None = None


@dataclass
class StepResult:
    kind: str
    index: int
    times: StepTimes
    stop_requested: bool
    checksum: float | None
    telemetry: dict[str, float | None] | None = None  # filled by the trainer


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
        stream_priority: str = "high",
        delay_ms: float = 0.0,
        delay_every: int = 1,
        group: Any = None,
    ) -> None:
        # The process group every collective of a step runs on: None, the default group; a
        # sweep point of a rank pool passes its own (a new communicator per point).
        self.group = group
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
        self.stream_priority = stream_priority
        self.priority: int | None = None
        self.priority_range: tuple[int, int] | None = None
        self._anchor_event: Any = None
        self._anchor_host: float | None = None
        if self.is_cuda:
            self.compute_stream = torch.cuda.current_stream(device)
            try:
                least, greatest = torch.cuda.Stream.priority_range()
            except TypeError:  # bound to an instance in some torch builds
                least, greatest = self.compute_stream.priority_range()
            self.priority_range = (int(least), int(greatest))
            # Lower numbers run first; "high" takes the highest the device offers.
            wanted = int(greatest) if stream_priority == "high" else 0
            self.comm_stream = torch.cuda.Stream(device=device, priority=wanted)
            self.priority = int(self.comm_stream.priority)
            self._ready_events = [torch.cuda.Event() for _ in stack.buckets]
            self.worker: CommWorker | None = None
        else:
            self.worker = CommWorker()
        self.delay_ms = delay_ms
        self.delay_every = delay_every
        self._sleep_cycles_per_ms: float | None = None
        if delay_ms > 0 and self.is_cuda:
            self._sleep_cycles_per_ms = self._measure_sleep_rate()

    # ---- run timeline --------------------------------------------------------------------
    def set_anchor(self) -> None:
        """Starts the run timeline (call right after a barrier): every later step's start and
        every collective's enqueue are read as ms since this point, on each rank."""
        if self.is_cuda:
            torch.cuda.synchronize(self.stack.device)
            self._anchor_event = torch.cuda.Event(enable_timing=True)
            self._anchor_event.record(self.compute_stream)
            self._anchor_event.synchronize()
        # Taken once the anchor event has completed: host and device anchors agree within
        # the synchronize's latency (microseconds).
        self._anchor_host = time.perf_counter()

    def _start_run_ms(self, clock: Any) -> float | None:
        if self._anchor_host is None:
            return None
        if self.is_cuda:
            return float(self._anchor_event.elapsed_time(clock.start))
        return _host_ms(clock.start - self._anchor_host)

    def _enqueue_ms(self, enqueue_s: float, start_run_ms: float | None) -> float | None:
        if self._anchor_host is None or start_run_ms is None:
            return None
        return _host_ms(enqueue_s - self._anchor_host) - start_run_ms

    # ---- the debug delay -----------------------------------------------------------------
    def _measure_sleep_rate(self) -> float:
        """Cycles of torch.cuda._sleep per millisecond on this GPU (its clock under a spin)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        torch.cuda._sleep(cycles // 10)  # wake the clocks
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / max(start.elapsed_time(end), 1e-3)

    def _delay(self, index: int) -> None:
        if self.delay_ms <= 0 or index % self.delay_every:
            return
        if self.is_cuda:
            assert self._sleep_cycles_per_ms is not None
            torch.cuda._sleep(int(self.delay_ms * self._sleep_cycles_per_ms))
        else:
            time.sleep(self.delay_ms / 1e3)

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
                bucket_ops = [CollectiveOp("all_reduce", size, lambda v=view: dist.all_reduce(v, group=self.group))]
            elif self.collective == "reduce_scatter":
                shard = shard_buf[: bucket.numel // n]
                bucket_ops = [
                    CollectiveOp(
                        "reduce_scatter", size, lambda s=shard, v=view: _reduce_scatter(s, v, group=self.group)
                    ),
                    CollectiveOp("all_gather", size, lambda s=shard, v=view: _all_gather(v, s, group=self.group)),
                ]
            else:
                gathered = gather_buf[: bucket.numel * n]
                bucket_ops = [
                    CollectiveOp(
                        "all_gather", size * n, lambda g=gathered, v=view: _all_gather(g, v, group=self.group)
                    )
                ]

                def post(g: torch.Tensor = gathered, v: torch.Tensor = view) -> None:
                    torch.sum(g.view(n, -1), dim=0, out=v)

            ops.append(bucket_ops)
            posts.append(post)
        return ops, posts

    def _run_bucket(
        self, bucket: Bucket, pending: PendingStep, enqueue_s: float | None = None
    ) -> None:
        """Runs a bucket's collectives in the current (comm) context, marking each.

        enqueue_s: when the main thread submitted the bucket (CPU worker); on GPU each
        collective's own issue time.
        """
        clock = pending.clock
        for op in self._ops[bucket.index]:
            if self.time_comm:
                issued = enqueue_s if enqueue_s is not None else time.perf_counter()
                start = clock.mark()
                op.run()
                pending.comm_marks.append(
                    CommMark(start, clock.mark(), op.name, op.size_bytes, bucket.index, issued)
                )
            else:
                op.run()
        post = self._post[bucket.index]
        if post is not None:
            if self.time_comm:
                start = clock.mark()
                post()
                if pending.reduce_marks is None:
                    pending.reduce_marks = []
                pending.reduce_marks.append((start, clock.mark()))
            else:
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
            submitted = time.perf_counter()
            self.worker.submit(lambda: self._run_bucket(bucket, pending, submitted))

    def _join_comm(self) -> None:
        if self.is_cuda:
            self.compute_stream.wait_stream(self.comm_stream)
        else:
            assert self.worker is not None
            self.worker.join()

    def _submit_stop_flag(self, pending: PendingStep, slot: int, stop: bool) -> None:
        """Queues a one-element MAX all-reduce of the local stop request on the comm stream,
        before this step's buckets: every rank then reads the same decision for this step.
        It runs beside the forward GEMMs, from the step's start: on GPU the comm stream first
        waits for the step's start event, since nothing else holds it back and it would run
        the flag right after the previous step's last bucket, beside that step's update, before
        this step has begun (on CPU the worker is idle until the step submits the flag). It is
        timed as the step's control_ms (and recorded as a collective, so a rank late at the
        step's start shows as wait)."""
        flag, host = self._flags[slot], self._flags_host[slot]
        clock = pending.clock
        issued = time.perf_counter()

        def agree() -> None:
            start = clock.mark() if self.time_comm else None
            flag.fill_(1.0 if stop else 0.0)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            host.copy_(flag, non_blocking=self.is_cuda)
            if start is not None:
                pending.control_mark = CommMark(
                    start, clock.mark(), "control", flag.numel() * flag.element_size(), -1, issued
                )

        if self.is_cuda:
            self.comm_stream.wait_event(clock.start)
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
            self._delay(index)
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
                    submitted = time.perf_counter()
                    self.worker.submit(
                        lambda b=bucket, t=submitted: self._run_bucket(b, pending, t)
                    )
            self._join_comm()
        else:
            raise ValueError(f"unknown step kind {kind!r}")
        clock.finish()
        return pending

    def resolve(self, pending: PendingStep) -> StepResult:
        """Waits for the step (the one synchronize) and converts its marks to milliseconds."""
        clock = pending.clock
        clock.synchronize()
        start_run = self._start_run_ms(clock)
        gemm = None
        if pending.gemm_marks is not None:
            gemm = [(clock.ms(s), clock.ms(e)) for s, e in pending.gemm_marks]

        def timing(mark: CommMark) -> CollectiveTiming:
            return CollectiveTiming(clock.ms(mark.start), clock.ms(mark.end), mark.name,
                                    mark.size_bytes, mark.bucket,
                                    self._enqueue_ms(mark.enqueue_s, start_run))

        comm: list[CollectiveTiming] | None = [timing(m) for m in pending.comm_marks]
        if not self.time_comm and pending.kind != COMPUTE:
            comm = None  # collectives ran untimed: unknown, not zero
        if pending.kind == COMM and pending.gemm_marks is None and self.time_comm:
            gemm = []  # communication-only: no GEMMs by construction, comm_ms still wanted
        reduce_local = None
        if pending.reduce_marks is not None:
            reduce_local = [(clock.ms(s), clock.ms(e)) for s, e in pending.reduce_marks]
        times = StepTimes(
            iter_ms=clock.ms(clock.end),
            gemm=gemm,
            comm=comm,
            control=timing(pending.control_mark) if pending.control_mark else None,
            reduce_local=reduce_local,
            per_gemm=self.time_gemms,
            start_run_ms=start_run,
        )
        stop = bool(pending.stop_flag[0].item() > 0) if pending.stop_flag is not None else False
        checksum = float(pending.checksum[0].item()) if pending.checksum is not None else None
        return StepResult(pending.kind, pending.index, times, stop, checksum)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()
