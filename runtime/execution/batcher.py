"""Per-version dynamic batching: requests that arrive together run as one forward pass.

A `Batcher` owns one bounded FIFO queue and one scheduler task per version, both on the
event loop; only the forward pass (with its concatenation and split) runs on the
version's single executor thread, one batch at a time. While a batch runs, the next one
accumulates. Scheduling follows Triton's dynamic batcher: when the executor is free, take
queued requests in arrival order whose non-batch shapes and dtypes match the oldest one,
up to `max_batch_size` rows; run at once when the largest possible preferred size (or a
full batch) can be formed, else wait up to `max_queue_delay` after the oldest request
arrived for more to join.

Bit-identity: CPU BLAS picks its sgemm kernel by the number of rows (MKL on this kind of
machine: one kernel for 1 row, one for 2-3, one for 4+, and with 2 intra-op threads the
split of rows over threads adds more classes), so a row's result depends in its last
bits on how many rows were computed with it. Each batcher therefore calibrates once per
input shape, on its own executor thread: it finds the smallest row multiple (1, 2, 4,
8 or 16) at which every batch size computes each row bit-identically, and pads every
batch (a lone request too) with zero rows up to that multiple. Answers then never depend
on which other requests shared the batch (findings: bench/RESULTS.md, Analysis).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from runtime.errors import Code, ServingError, invalid
from runtime.execution.transfer import pinned_cat

log = logging.getLogger("splitserve.batcher")

Forward = Callable[[list[torch.Tensor]], list[torch.Tensor]]
# Per input: (dtype, non-batch shape, device). None = cannot be batched (run alone).
Key = tuple[tuple[torch.dtype, tuple[int, ...], torch.device], ...] | None

ROW_MULTIPLES = (1, 2, 4, 8, 16)
CALIBRATION_ROWS = 64  # calibrate batch sizes up to this many rows (cost: a few forwards)


class BatchResult(list):
    """One request's outputs, plus how it was served (read by the inference core)."""

    __slots__ = ("queue_s", "batch_size", "compute_s")

    def __init__(self, outputs, queue_s: float = 0.0, batch_size: int = 1,
                 compute_s: float = 0.0):
        super().__init__(outputs)
        self.queue_s = queue_s  # enqueued -> its batch started
        self.batch_size = batch_size  # rows in the batch that ran (padding excluded)
        self.compute_s = compute_s  # the batch's forward pass


@dataclass(eq=False, slots=True)
class _Slot:
    inputs: list[torch.Tensor]
    rows: int
    key: Key
    fut: asyncio.Future
    t_enq: float  # loop.time()


@dataclass(slots=True)
class BatcherStats:
    """Counters since the batcher started (read on the loop)."""

    requests: int = 0  # submitted and accepted into the queue
    rejected: int = 0  # refused: queue full
    cancelled: int = 0  # the caller went away before its result
    batches: int = 0  # forward passes run
    rows: int = 0  # request rows run
    padded_rows: int = 0  # zero rows added for bit-identity
    sizes: Counter = field(default_factory=Counter)  # executed rows (no padding) -> batches

    def as_dict(self) -> dict:
        return {"requests": self.requests, "rejected": self.rejected,
                "cancelled": self.cancelled, "batches": self.batches, "rows": self.rows,
                "padded_rows": self.padded_rows, "sizes": dict(sorted(self.sizes.items()))}


class _Unsplittable(Exception):
    """The model's outputs do not have the batch as their first dimension."""


def _shape_key(inputs: Sequence[torch.Tensor]) -> tuple[int, Key]:
    if not inputs or inputs[0].dim() == 0:
        return 1, None
    rows = int(inputs[0].shape[0])
    parts = []
    for t in inputs:
        if t.dim() == 0 or t.shape[0] != rows:
            return rows, None
        parts.append((t.dtype, tuple(t.shape[1:]), t.device))
    return rows, tuple(parts)


def _padded(rows: int, multiple: int, max_rows: int) -> int:
    if multiple <= 1:
        return rows
    return max(rows, min(-(-rows // multiple) * multiple, max_rows))


def _concat(parts: list[list[torch.Tensor]], key: Key, padded: int,
            pin: bool = False) -> list[torch.Tensor]:
    total = sum(p[0].shape[0] for p in parts)
    if len(parts) == 1 and padded == total:
        return parts[0]  # zero-copy
    out = []
    for i, (dtype, shape, device) in enumerate(key):
        ts = [p[i] for p in parts]
        if padded > total:
            ts.append(torch.zeros((padded - total, *shape), dtype=dtype, device=device))
        out.append(pinned_cat(ts) if pin else torch.cat(ts))
    return out


def run_batch(forward: Forward, parts: list[list[torch.Tensor]], key: Key,
              padded: int, pin: bool = False) -> list[list[torch.Tensor]]:
    """Executor thread: concatenate (into pinned memory when `pin`: the batch goes to a
    CUDA device), one forward pass, split back (views, no copies)."""
    rows = [int(p[0].shape[0]) for p in parts]
    outs = forward(_concat(parts, key, padded, pin))
    total = sum(rows)
    if len(parts) == 1 and padded == total:
        return [list(outs)]
    for o in outs:
        if o.dim() == 0 or o.shape[0] != padded:
            raise _Unsplittable(f"output of shape {list(o.shape)} for a batch of {padded} rows")
    res, start = [], 0
    with torch.inference_mode():
        for n in rows:
            res.append([o[start:start + n] for o in outs])
            start += n
    return res


def _synthetic(key: Key, rows: int, gen: torch.Generator) -> list[torch.Tensor]:
    xs = []
    for dtype, shape, device in key:
        if dtype.is_floating_point:
            x = torch.randn((rows, *shape), generator=gen).to(dtype)
        else:
            x = torch.zeros((rows, *shape), dtype=dtype)  # valid as an index or a flag
        xs.append(x.to(device))
    return xs


def calibrate(forward: Forward, key: Key, max_batch_size: int) -> int:
    """Executor thread: the smallest row multiple at which rows are batch-invariant.

    Runs the model on random rows at every padded batch size up to CALIBRATION_ROWS (and
    at a couple of row offsets) and compares each row with the same row computed in the
    largest batch. Returns 0 when no multiple in ROW_MULTIPLES makes it exact.
    """
    top = min(max_batch_size, CALIBRATION_ROWS)
    gen = torch.Generator().manual_seed(20240611)
    xs = _synthetic(key, top, gen)
    ref = run_batch(forward, [xs], key, top)[0]

    def same(m: int, shift: int = 0) -> bool:
        part = [x[:m].roll(shift, 0) for x in xs]
        got = run_batch(forward, [part], key, m)[0]
        want = [r[:m].roll(shift, 0) for r in ref]
        return all(torch.equal(a, b) for a, b in zip(got, want))

    for g in ROW_MULTIPLES:
        if g > top:
            break
        sizes = sorted({_padded(n, g, top) for n in range(1, top + 1)})
        if all(same(m) for m in sizes) and same(top, 1) and same(top, g + 1):
            return g
    return 0


class Batcher:
    """Dynamic batcher of one version. All methods run on the event loop."""

    def __init__(self, name: str, executor, forward: Forward, max_batch_size: int, *,
                 max_queue_delay_s: float = 0.0, preferred_batch_sizes: Sequence[int] = (),
                 max_queue_size: int = 1024, exact: bool = True,
                 on_batch: Callable[[int, float], None] | None = None):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1 for a batcher")
        self.name = name  # "model version N", for messages
        self.executor = executor
        self.forward: Forward | None = forward
        self.max_batch_size = max_batch_size
        self.delay = max(0.0, max_queue_delay_s)
        self.preferred = sorted({p for p in preferred_batch_sizes if 1 <= p <= max_batch_size})
        self.max_queue_size = max_queue_size
        self.exact = exact
        self.on_batch = on_batch  # (executed rows, forward seconds) per batch: metrics
        self.pin = False  # concatenate into pinned memory (the version runs on CUDA)
        self.stats = BatcherStats()
        self.row_multiple: dict[Key, int] = {}  # per input shape, after calibration
        self._unsplittable: set[Key] = set()
        self._queue: deque[_Slot] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._running = False  # a batch is on the executor
        self._closed = False
        self._task: asyncio.Task | None = None
        self._warm_keys: list[Key] = []

    # ---- the caller's side ----------------------------------------------------------
    async def submit(self, inputs: list[torch.Tensor]) -> BatchResult:
        """Queue one request (batch-first inputs) and wait for its own outputs."""
        if self._closed:
            raise ServingError(Code.UNAVAILABLE, f"{self.name} is unloading; its batch "
                               f"queue takes no new requests")
        rows, key = _shape_key(inputs)
        if rows < 1:
            raise invalid("empty batch: the first dimension of the inputs is 0")
        if rows > self.max_batch_size:
            raise invalid(f"batch size {rows} exceeds max_batch_size {self.max_batch_size} "
                          f"of {self.name}")
        if len(self._queue) >= self.max_queue_size:
            self.stats.rejected += 1
            raise ServingError(Code.RESOURCE_EXHAUSTED, f"batch queue of {self.name} is full "
                               f"({self.max_queue_size} requests waiting, max_queue_size); "
                               f"retry later")
        loop = asyncio.get_running_loop()
        slot = _Slot(inputs, rows, key, loop.create_future(), loop.time())
        self._queue.append(slot)
        self.stats.requests += 1
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self.start()
        try:
            return await slot.fut
        except asyncio.CancelledError:
            # The caller gave up (timeout, disconnect): drop its slot, or its result later.
            self.stats.cancelled += 1
            try:
                self._queue.remove(slot)
            except ValueError:
                pass  # already in a running batch; the result is dropped when it lands
            if not self._queue and not self._running:
                self._idle.set()
            raise

    def start(self, calibrate_keys: Sequence[Key] = ()) -> None:
        """Start the scheduler task; calibrate `calibrate_keys` first (off the loop)."""
        if self._task is None:
            self._warm_keys = [k for k in calibrate_keys if k is not None]
            self._task = asyncio.get_running_loop().create_task(
                self._schedule(), name=f"batcher {self.name}")

    async def drain(self) -> None:
        """Wait until the queue is empty and no batch runs (the scheduler ends if closed)."""
        while self._queue or self._running:
            await self._idle.wait()
            if self._task is not None and self._task.done():
                break
        if self._closed and self._task is not None and not self._task.done():
            self._wake.set()
            await asyncio.shield(self._task)

    def close(self) -> None:
        """Refuse new requests (UNAVAILABLE); queued ones still run. Pair with drain()."""
        self._closed = True
        self._wake.set()

    @property
    def queued(self) -> int:
        return len(self._queue)

    # ---- the scheduler (a task on the loop) -----------------------------------------
    def _plan(self) -> tuple[list[_Slot], bool]:
        """The next batch in arrival order, and whether it should run now (before delay)."""
        head = self._queue[0]
        if head.key is None or head.key in self._unsplittable:
            return [head], True
        take, rows, cut, full = [], 0, 0, False
        for s in self._queue:
            if s.key != head.key:
                continue
            if rows + s.rows > self.max_batch_size:
                full = True
                break
            take.append(s)
            rows += s.rows
            if rows in self.preferred:
                cut = len(take)
            if rows == self.max_batch_size:
                full = True
                break
        if cut:  # Triton: the largest preferred size that can be formed runs at once
            return take[:cut], True
        return take, full

    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            for key in self._warm_keys:
                await self._multiple(key)
            while True:
                if not self._queue:
                    self._idle.set()
                    if self._closed:
                        return
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch, ready = self._plan()
                if not ready and self.delay > 0:
                    left = self._queue[0].t_enq + self.delay - loop.time()
                    if left > 0:
                        self._wake.clear()
                        try:
                            async with asyncio.timeout(left):
                                await self._wake.wait()
                        except TimeoutError:
                            pass
                        continue  # re-plan: more arrived, or the delay is up
                self._take(batch)
                await self._execute(batch)
        except asyncio.CancelledError:
            self._fail_all(ServingError(Code.UNAVAILABLE, f"{self.name} stopped batching"))
            raise
        except Exception as e:  # a bug here must not leave callers waiting for ever
            log.exception("event=batcher_error model=%r", self.name)
            self._fail_all(ServingError(Code.INTERNAL, f"batcher of {self.name} failed: {e!r}"))
            self._task = None  # the next submit starts a fresh scheduler
        finally:
            self._running = False
            self._idle.set()
            if self._closed and not self._queue:
                self.forward = None  # let the released model go

    def _take(self, batch: list[_Slot]) -> None:
        q = self._queue
        if all(q[i] is s for i, s in enumerate(batch)):  # the usual case: a prefix
            for _ in batch:
                q.popleft()
        else:
            taken = set(map(id, batch))
            self._queue = deque(s for s in q if id(s) not in taken)

    def _fail_all(self, exc: BaseException) -> None:
        while self._queue:
            s = self._queue.popleft()
            if not s.fut.done():
                s.fut.set_exception(exc)

    async def _multiple(self, key: Key) -> int:
        if key is None or not self.exact:
            return 1
        g = self.row_multiple.get(key)
        if g is not None:
            return g
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            g = await loop.run_in_executor(self.executor, calibrate, self.forward, key,
                                           self.max_batch_size)
        except _Unsplittable as e:
            log.warning("event=batching_disabled model=%r reason=%r", self.name, str(e))
            self._unsplittable.add(key)
            g = 1
        except Exception as e:  # noqa: BLE001 - the model rejected synthetic rows
            log.warning("event=batch_calibration_failed model=%r error=%r: batched answers "
                        "may differ in the last bits from unbatched ones", self.name, e)
            g = 1
        else:
            if g == 0:
                log.warning("event=batch_not_exact model=%r: no row multiple in %s makes "
                            "rows batch-invariant; batched answers may differ in the last "
                            "bits", self.name, ROW_MULTIPLES)
                g = 1
            else:
                log.info("event=batch_calibrated model=%r row_multiple=%d ms=%.1f", self.name,
                         g, (time.perf_counter() - t0) * 1e3)
        self.row_multiple[key] = g
        return g

    async def _execute(self, batch: list[_Slot]) -> None:
        batch = [s for s in batch if not s.fut.done()]  # cancelled while queued
        if not batch:
            return
        loop = asyncio.get_running_loop()
        self._running = True
        try:
            key = batch[0].key
            multiple = await self._multiple(key)
            rows = sum(s.rows for s in batch)
            padded = rows if key in self._unsplittable else _padded(
                rows, multiple, max(self.max_batch_size, rows))
            t_start = loop.time()
            parts = [s.inputs for s in batch]
            try:
                outs = await loop.run_in_executor(self.executor, run_batch, self.forward,
                                                  parts, key, padded, self.pin)
            except _Unsplittable as e:
                log.warning("event=batching_disabled model=%r reason=%r", self.name, str(e))
                self._unsplittable.add(key)
                return await self._one_by_one(batch)
            except Exception:  # noqa: BLE001
                if len(batch) > 1:  # one bad request must not fail its neighbours
                    return await self._one_by_one(batch)
                raise
            took = loop.time() - t_start
            self._account(rows, padded, took)
            for s, o in zip(batch, outs):
                if not s.fut.done():
                    s.fut.set_result(BatchResult(o, t_start - s.t_enq, rows, took))
        except Exception as e:  # noqa: BLE001 - handed to the waiting callers
            for s in batch:
                if not s.fut.done():
                    s.fut.set_exception(e)
        finally:
            self._running = False

    async def _one_by_one(self, batch: list[_Slot]) -> None:
        loop = asyncio.get_running_loop()
        for s in batch:
            if s.fut.done():
                continue
            t_start = loop.time()
            key = s.key
            padded = s.rows if key in self._unsplittable else _padded(
                s.rows, self.row_multiple.get(key, 1), max(self.max_batch_size, s.rows))
            try:
                out = await loop.run_in_executor(self.executor, run_batch, self.forward,
                                                 [s.inputs], key, padded, self.pin)
            except Exception as e:  # noqa: BLE001
                if not s.fut.done():
                    s.fut.set_exception(e)
                continue
            took = loop.time() - t_start
            self._account(s.rows, padded, took)
            if not s.fut.done():
                s.fut.set_result(BatchResult(out[0], t_start - s.t_enq, s.rows, took))

    def _account(self, rows: int, padded: int, seconds: float) -> None:
        st = self.stats
        st.batches += 1
        st.rows += rows
        st.padded_rows += padded - rows
        st.sizes[rows] += 1
        if self.on_batch is not None:
            try:
                self.on_batch(rows, seconds)
            except Exception:  # noqa: BLE001 - metrics must never fail a batch
                log.exception("event=on_batch_error model=%r", self.name)


def batching_on(spec) -> bool:
    """Opt-in, as in Triton: `max_batch_size` alone only marks the batch dimension."""
    return spec.max_batch_size > 0 and spec.batching.enabled


def calibrate_loaded(loaded, spec) -> dict[Key, int]:
    """Load thread: calibrate the declared input shape before the version serves.

    The manager may call this after warmup and keep the result on the harness as
    `batch_calibration`; make_batcher then starts calibrated instead of calibrating on the
    version's executor while its first requests wait (a visible p-max during a release).
    """
    key = _signature_key(loaded)
    if not batching_on(spec) or not spec.batching.exact or key is None:
        return {}
    try:
        g = calibrate(loaded.forward, key, spec.max_batch_size)
    except Exception as e:  # noqa: BLE001 - the batcher retries on its executor and logs
        log.debug("precalibration failed: %r", e)
        return {}
    if g == 0:
        log.warning("event=batch_not_exact: no row multiple in %s makes rows batch-invariant; "
                    "batched answers may differ in the last bits", ROW_MULTIPLES)
    return {key: g or 1}


def make_batcher(name: str, loaded, spec, executor, calibration: dict | None = None,
                 on_batch: Callable[[int, float], None] | None = None) -> Batcher | None:
    """The batcher for a version that just loaded, or None when its batching is off.

    `on_batch(rows, seconds)` hears every executed batch (metrics). `calibration` is what
    `calibrate_loaded` measured on the load thread (exact mode only).
    """
    b = spec.batching
    if not batching_on(spec):
        return None
    batcher = Batcher(name, executor, loaded.forward, spec.max_batch_size,
                      max_queue_delay_s=b.max_queue_delay_us / 1e6,
                      preferred_batch_sizes=b.preferred_batch_sizes,
                      max_queue_size=spec.queue_size(), exact=b.exact, on_batch=on_batch)
    batcher.row_multiple.update(calibration or {})
    batcher.pin = loaded.device.type == "cuda"
    batcher.start(calibrate_keys=[_signature_key(loaded)] if b.exact else ())
    return batcher


def _signature_key(loaded) -> Key:
    """The shape key of the declared signature when every non-batch dim is fixed."""
    from runtime import dtypes

    parts = []
    try:
        for s in loaded.signature.inputs:
            if len(s.shape) < 1 or any(d < 0 for d in s.shape[1:]) or not dtypes.is_supported(s.datatype):
                return None
            parts.append((dtypes.torch_dtype(s.datatype), tuple(s.shape[1:]), torch.device("cpu")))
    except (AttributeError, TypeError, KeyError):
        return None
    return tuple(parts) or None
