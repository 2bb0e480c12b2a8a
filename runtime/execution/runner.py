"""Running forward passes of one version: its executor thread, its one bounded queue,
its dynamic batcher when batching is on, and a lower-priority lane for shadow copies.

A request's path visits the manager once (to pin a version, see `Handle`); everything
after that happens here. Three ways to run (`execution`):
- batched: `Batcher.submit` (the batcher owns the queue and the executor hand-off);
- executor: one thread per version with its own intra-op thread count;
- inline on the event loop, for tiny CPU models whose forward costs less than the hop.
Inline or executor is the manager's choice per model, never per version (`set_inline`):
two arms on different paths measure the path, not the model. An inline forward runs
with one intra-op thread (set around the call, the loop thread's own count restored), so
it never competes with the executor threads for the cores.
Every way has the same bound (`max_queue_size` requests waiting, as in Triton) and
reports the same timings: queue time from submit to start, compute time.

Shadows never delay or starve primary traffic: they have their own bound, wait until no
primary request of the version is waiting or running, and run one at a time. When a
version starts unloading, waiting shadows are dropped at once so they cannot hold its drain.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from runtime.errors import Code, ServingError


@dataclass(frozen=True, slots=True)
class RunResult:
    outputs: list
    queue_s: float  # submitted -> its forward pass started
    compute_s: float  # its forward pass (the whole batch's, when batched)
    batch_size: int  # rows in the pass that ran it (padding excluded)


class ShadowDropped(ServingError):
    """A shadow copy refused (its lane is full, or the version is unloading)."""

    def __init__(self, message: str):
        super().__init__(Code.RESOURCE_EXHAUSTED, message)


class Runner:
    """Forward passes of one loaded version. All methods run on the event loop."""

    def __init__(self, name: str, forward, executor: ThreadPoolExecutor, *,
                 max_queue_size: int = 1024, batcher=None, sample_numel: int = 0,
                 forward_s: float | None = None, shadow_max_waiting: int = 16):
        self.name = name  # "model 'm' version N", for messages
        self.forward = forward
        self.executor = executor
        self.batcher = batcher
        self.sample_numel = sample_numel  # input elements of the warmup sample (0: unknown)
        self.forward_s = forward_s  # its warm forward time with one thread (None: not measured)
        self.inline_numel = 0  # inputs up to this many elements run inline (0: never)
        self.max_queue_size = max_queue_size
        self.shadow_max_waiting = shadow_max_waiting
        self.pending = 0  # primary requests waiting or running (shadows wait until 0)
        self.shadow_waiting = 0
        self.shadow_dropped = 0
        self._primary_idle = asyncio.Event()
        self._primary_idle.set()
        self._shadow_turn = asyncio.Lock()
        self._shadows_closed = False

    @classmethod
    def create(cls, name: str, loaded, *, threads: int, max_queue_size: int,
               make_batcher=None, shadow_max_waiting: int = 16) -> "Runner":
        """Starts on the executor (or batched); the manager may `set_inline` it."""
        executor = ThreadPoolExecutor(1, thread_name_prefix=f"fwd-{name}",
                                      initializer=torch.set_num_threads, initargs=(threads,))
        batcher = make_batcher(executor) if make_batcher is not None else None
        cpu = loaded.device.type == "cpu"
        return cls(name, loaded.forward, executor, max_queue_size=max_queue_size,
                   batcher=batcher, sample_numel=loaded.sample_numel if cpu else 0,
                   forward_s=loaded.forward_s if cpu else None,
                   shadow_max_waiting=shadow_max_waiting)

    @property
    def can_inline(self) -> bool:
        """Unbatched, on the CPU, with a warmup sample to size requests against."""
        return self.batcher is None and self.sample_numel > 0

    @property
    def execution(self) -> str:
        """`batched`, `inline` or `executor`: what GET /v2/models/{m} and the A/B summary show."""
        return "batched" if self.batcher is not None else "inline" if self.inline_numel else "executor"

    def set_inline(self, on: bool) -> None:
        """Requests up to 4x the warmup sample's size run inline (larger ones never do)."""
        self.inline_numel = 4 * self.sample_numel if on and self.can_inline else 0

    # ---- primary traffic -------------------------------------------------------------
    async def run(self, inputs: list[torch.Tensor]) -> RunResult:
        # As in Triton, the bound counts requests waiting, not the one running; batched,
        # the batcher's own queue holds that bound.
        if self.batcher is None and self.pending > self.max_queue_size:
            raise ServingError(Code.RESOURCE_EXHAUSTED, f"queue of {self.name} is full "
                               f"({self.max_queue_size} requests waiting, max_queue_size); "
                               f"retry later")
        self.pending += 1
        self._primary_idle.clear()
        try:
            return await self._execute(inputs)
        finally:
            self.pending -= 1
            if self.pending == 0:
                self._primary_idle.set()

    async def _execute(self, inputs: list[torch.Tensor]) -> RunResult:
        if self.batcher is not None:
            r = await self.batcher.submit(inputs)
            return RunResult(list(r), r.queue_s, r.compute_s, r.batch_size)
        rows = int(inputs[0].shape[0]) if inputs and inputs[0].dim() else 1
        if self.inline_numel and sum(x.numel() for x in inputs) <= self.inline_numel:
            t0 = time.perf_counter()
            outs = inline_forward(self.forward, inputs)  # tiny forward: cheaper than a thread hop
            return RunResult(outs, 0.0, time.perf_counter() - t0, rows)
        t_submit = time.perf_counter()
        outs, t_start, t_end = await asyncio.get_running_loop().run_in_executor(
            self.executor, _timed, self.forward, inputs)
        return RunResult(outs, max(0.0, t_start - t_submit), t_end - t_start, rows)

    # ---- shadow copies ---------------------------------------------------------------
    async def run_shadow(self, inputs: list[torch.Tensor]) -> RunResult:
        """Run a shadow copy when no primary request waits; ShadowDropped when it cannot."""
        if self._shadows_closed:
            self.shadow_dropped += 1
            raise ShadowDropped(f"{self.name} is unloading: shadow copy dropped")
        if self.shadow_waiting >= self.shadow_max_waiting:
            self.shadow_dropped += 1
            raise ShadowDropped(f"shadow lane of {self.name} is full "
                                f"({self.shadow_max_waiting} waiting): shadow copy dropped")
        self.shadow_waiting += 1
        try:
            async with self._shadow_turn:
                while self.pending and not self._shadows_closed:
                    await self._primary_idle.wait()
                if self._shadows_closed:
                    self.shadow_dropped += 1
                    raise ShadowDropped(f"{self.name} is unloading: shadow copy dropped")
                return await self._execute(inputs)
        finally:
            self.shadow_waiting -= 1

    def stop_shadows(self) -> None:
        """Unloading: drop waiting shadows now, refuse new ones."""
        self._shadows_closed = True
        self._primary_idle.set()  # wake waiters so they see the flag

    # ---- settings and shutdown -------------------------------------------------------
    def update(self, *, max_queue_size: int, max_queue_delay_s: float,
               preferred_batch_sizes) -> None:
        """Settings that do not touch the weights apply in place (model.yaml edits)."""
        self.max_queue_size = max_queue_size
        if self.batcher is not None:
            self.batcher.max_queue_size = max_queue_size
            self.batcher.delay = max(0.0, max_queue_delay_s)
            self.batcher.preferred = sorted({p for p in preferred_batch_sizes
                                             if 1 <= p <= self.batcher.max_batch_size})

    async def close(self, release) -> None:
        """After the version's handles are gone: finish queued work, then `release` the
        model on the executor thread (after every forward queued there), then stop it."""
        self.stop_shadows()
        if self.batcher is not None:
            self.batcher.close()  # stragglers that raced the table swap get UNAVAILABLE
            await self.batcher.drain()
        await asyncio.get_running_loop().run_in_executor(self.executor, release)
        self.forward = None
        self.executor.shutdown(wait=False)


def inline_forward(forward, inputs):
    """The forward on this (the loop's) thread with one intra-op thread, its count restored:
    more would compete with the executor threads for the same cores."""
    prev = torch.get_num_threads()
    if prev == 1:
        return forward(inputs)
    torch.set_num_threads(1)
    try:
        return forward(inputs)
    finally:
        torch.set_num_threads(prev)


def _timed(forward, inputs):
    """Executor thread: the forward pass with its start and end times."""
    t0 = time.perf_counter()
    outs = forward(inputs)
    return outs, t0, time.perf_counter()
