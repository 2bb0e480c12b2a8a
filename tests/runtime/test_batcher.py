"""Dynamic batcher: real torch models on a real single-thread executor.

Scheduling is made deterministic with a gated forward (it blocks on an Event), so tests
wait on states, never on sleeps, and assert no timings.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.execution.batcher import (ROW_MULTIPLES, Batcher, BatchResult, _padded, calibrate,
                             calibrate_loaded, make_batcher)
from runtime.errors import Code, ServingError
from runtime.lifecycle.loader import load_version
from runtime.repository.modelspec import parse_spec

pytestmark = pytest.mark.unit  # starts no server process, binds no socket

ROOT = Path(__file__).resolve().parents[2]
BUNDLED = ROOT / "model_repository" / "mlp"
SPEC = parse_spec((BUNDLED / "model.yaml").read_text())


@pytest.fixture
def executor():
    ex = ThreadPoolExecutor(1, thread_name_prefix="fwd-test")
    yield ex
    ex.shutdown(wait=True)


class Gated:
    """forward() that records each batch and blocks while the gate is closed."""

    def __init__(self, fn=lambda x: x * 2.0):
        self.fn = fn
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batches: list[int] = []

    def __call__(self, inputs):
        self.batches.append(int(inputs[0].shape[0]))
        self.entered.set()
        self.gate.wait(30)
        return [self.fn(inputs[0])]


async def until(pred, timeout=10.0):
    """Wait on a state (polling the loop), never a fixed sleep."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def entered(ev: threading.Event):
    await asyncio.to_thread(ev.wait, 10)
    assert ev.is_set()


def rows(n, d=64, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---- correctness: concatenation, split, bit-identity ------------------------------------

@pytest.mark.parametrize("version,fmt", [(1, "model.safetensors"), (2, "model.pt2")])
def test_bundled_models_batched_bit_identical_to_alone(executor, version, fmt):
    lm = load_version(BUNDLED / str(version), fmt, SPEC)
    sizes = [1, 2, 3, 1, 5, 4, 1, 7, 2, 1, 8, 3]
    xs = [rows(n, seed=i) for i, n in enumerate(sizes)]

    async def main():
        b = Batcher("mlp", executor, lm.forward, 64, max_queue_delay_s=0.05)
        # concurrently: the batcher concatenates what arrives together
        together = await asyncio.gather(*(b.submit([x]) for x in xs))
        assert max(b.stats.sizes) > 1, b.stats
        assert b.stats.sizes.total() < len(xs)
        # one by one: each request alone in its batch
        alone = [await b.submit([x]) for x in xs]
        assert b.stats.sizes[1] >= 4
        await b.drain()
        return b, together, alone

    b, together, alone = asyncio.run(main())
    assert b.row_multiple, "calibrated on first use"
    assert all(g in ROW_MULTIPLES for g in b.row_multiple.values())
    with torch.inference_mode():
        direct = [lm.forward([x])[0] for x in xs]
    for x, t, a, d in zip(xs, together, alone, direct):
        assert isinstance(t, BatchResult) and t[0].shape == (x.shape[0], 8)
        assert torch.equal(t[0], a[0]), "batched answer differs from the same request alone"
        torch.testing.assert_close(t[0], d, rtol=1e-5, atol=1e-6)  # same math as in-process


def test_padding_keeps_rows_batch_invariant_for_sizes_up_to_max(executor):
    """Every request size, at every offset in a batch, gives the bits it gives alone."""
    lm = load_version(BUNDLED / "1", "model.safetensors", SPEC)
    g = calibrate(lm.forward, ((torch.float32, (64,), torch.device("cpu")),), 64)
    assert g in ROW_MULTIPLES  # 0 would mean no multiple makes this model exact

    async def main():
        b = Batcher("mlp", executor, lm.forward, 64, max_queue_delay_s=0.02)
        x = rows(64, seed=7)
        full = (await b.submit([x]))[0]
        parts = [x[i:i + 1] for i in range(64)]
        split = await asyncio.gather(*(b.submit([p]) for p in parts))
        for n in (1, 2, 3, 5, 9, 13):
            assert torch.equal((await b.submit([x[:n]]))[0], full[:n])
        return full, split

    full, split = asyncio.run(main())
    assert torch.equal(torch.cat([s[0] for s in split]), full)


def test_calibrated_padding_makes_raw_blas_rows_batch_invariant():
    """Why the batcher pads: without it a row's bits can depend on its batch's size (a
    property of the BLAS and CPU, so whether raw rows differ is this machine's business).
    Whatever it is, padding to the multiple calibrate() picks gives every row, at every
    batch size, exactly the bits it has in the full batch; and when raw rows do differ,
    that multiple cannot be 1."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 256)
    top = 16
    x = torch.randn(top, 64)
    with torch.inference_mode():
        full = lin(x)
        differs = [m for m in range(1, top) if not torch.equal(lin(x[:m]), full[:m])]
        g = calibrate(lambda xs: [lin(xs[0])], ((torch.float32, (64,), torch.device("cpu")),), top)
        assert g in ROW_MULTIPLES, f"no row multiple makes this Linear exact (got {g})"
        for m in range(1, top + 1):
            n = _padded(m, g, top)
            padded = torch.cat([x[:m], torch.zeros(n - m, 64)])
            assert torch.equal(lin(padded)[:m], full[:m]), f"rows of a batch of {m} padded to {n}"
    if differs:
        assert g > 1, f"raw rows differ at batch sizes {differs}, yet calibrate picked 1"


def test_calibrate_row_wise_model_needs_no_padding():
    assert calibrate(lambda xs: [xs[0] * 3.0 + 1.0],
                     ((torch.float32, (4,), torch.device("cpu")),), 32) == 1


def test_multiple_inputs_and_outputs_split_back(executor):
    def fwd(inputs):
        a, b = inputs
        return [a + b.float().unsqueeze(1), a.sum(dim=1)]

    async def main():
        bt = Batcher("two", executor, fwd, 16, max_queue_delay_s=0.05)
        reqs = [[torch.full((n, 3), float(i)), torch.arange(n, dtype=torch.int64)]
                for i, n in enumerate([1, 2, 3])]
        outs = await asyncio.gather(*(bt.submit(r) for r in reqs))
        return reqs, outs, bt

    reqs, outs, bt = asyncio.run(main())
    for r, o in zip(reqs, outs):
        want = fwd(r)
        assert len(o) == 2 and all(torch.equal(u, v) for u, v in zip(o, want))
    assert bt.stats.sizes == {6: 1}


def test_incompatible_shapes_and_dtypes_are_not_mixed(executor):
    seen = []

    def fwd(inputs):
        seen.append((inputs[0].dtype, tuple(inputs[0].shape)))
        return [inputs[0] * 2]

    async def main():
        b = Batcher("mix", executor, fwd, 16, max_queue_delay_s=0.05, exact=False)
        reqs = [torch.ones(1, 4), torch.ones(2, 5), torch.ones(1, 4, dtype=torch.float64),
                torch.ones(3, 4)]
        outs = await asyncio.gather(*(b.submit([r]) for r in reqs))
        return reqs, outs

    reqs, outs = asyncio.run(main())
    for r, o in zip(reqs, outs):
        assert torch.equal(o[0], r * 2) and o[0].dtype == r.dtype
    assert sorted(seen, key=str) == sorted([(torch.float32, (4, 4)), (torch.float32, (2, 5)),
                                            (torch.float64, (1, 4))], key=str)


# ---- scheduling -------------------------------------------------------------------------

def test_max_batch_size_respected_and_oversized_rejected(executor):
    f = Gated()

    async def main():
        b = Batcher("m", executor, f, 4, max_queue_delay_s=0.0, exact=False)
        first = asyncio.ensure_future(b.submit([torch.ones(1, 2)]))
        await entered(f.entered)
        rest = [asyncio.ensure_future(b.submit([torch.ones(n, 2)])) for n in (1, 2, 1, 3, 1)]
        await until(lambda: b.queued == 5)
        with pytest.raises(ServingError) as e:
            await b.submit([torch.ones(5, 2)])
        assert e.value.code is Code.INVALID_ARGUMENT and "max_batch_size 4" in e.value.message
        f.gate.set()
        await asyncio.gather(first, *rest)
        return b

    b = asyncio.run(main())
    assert f.batches == [1, 4, 4]  # [1] then FIFO: 1+2+1 = 4, then 3+1 = 4
    assert all(n <= 4 for n in b.stats.sizes)


def test_full_batch_runs_without_waiting_for_the_delay_and_cancel_drops_slot(executor):
    f = Gated()

    async def main():
        b = Batcher("m", executor, f, 2, max_queue_delay_s=600.0, exact=False)
        first = asyncio.ensure_future(b.submit([torch.ones(1, 2)]))
        await until(lambda: b.queued == 1)
        assert not f.entered.is_set()  # alone, it waits (up to 600 s) for company
        # a second request fills the batch (max 2): it runs at once
        second = asyncio.ensure_future(b.submit([torch.ones(1, 2)]))
        await entered(f.entered)
        f.gate.set()
        await asyncio.gather(first, second)
        r = [asyncio.ensure_future(b.submit([torch.full((1, 2), float(i))])) for i in range(3)]
        await asyncio.gather(r[0], r[1])  # full batch of 2: no delay
        assert not r[2].done() and b.queued == 1  # alone: waits for company
        r[2].cancel()
        with pytest.raises(asyncio.CancelledError):
            await r[2]
        assert b.queued == 0
        await b.drain()
        return b

    b = asyncio.run(main())
    assert f.batches == [2, 2]
    assert b.stats.cancelled == 1 and b.stats.requests == 5


def test_preferred_batch_size_runs_at_once(executor):
    f = Gated()

    async def main():
        b = Batcher("m", executor, f, 8, max_queue_delay_s=600.0, preferred_batch_sizes=[2],
                    exact=False)
        f.gate.set()
        pair = [asyncio.ensure_future(b.submit([torch.ones(1, 2)])) for _ in range(2)]
        await asyncio.gather(*pair)  # a preferred size formed: no 600 s wait
        f.gate.clear()
        f.entered.clear()
        blocker = asyncio.ensure_future(b.submit([torch.ones(2, 2)]))
        await entered(f.entered)
        more = [asyncio.ensure_future(b.submit([torch.ones(1, 2)])) for _ in range(3)]
        await until(lambda: b.queued == 3)
        f.gate.set()
        await asyncio.gather(blocker, more[0], more[1])  # largest preferred (2) of 3 queued
        assert not more[2].done()
        more[2].cancel()
        await asyncio.gather(more[2], return_exceptions=True)
        await b.drain()

    asyncio.run(main())
    assert f.batches == [2, 2, 2]


def test_one_batch_in_flight_next_accumulates(executor):
    f = Gated()

    async def main():
        b = Batcher("m", executor, f, 64, max_queue_delay_s=0.0, exact=False)
        first = asyncio.ensure_future(b.submit([torch.ones(1, 2)]))
        await entered(f.entered)
        rest = [asyncio.ensure_future(b.submit([torch.ones(1, 2)])) for _ in range(10)]
        await until(lambda: b.queued == 10)
        assert f.batches == [1]  # nothing else reached the executor meanwhile
        f.gate.set()
        outs = await asyncio.gather(first, *rest)
        return outs

    outs = asyncio.run(main())
    assert f.batches == [1, 10]
    assert outs[0].batch_size == 1 and all(o.batch_size == 10 for o in outs[1:])
    assert all(o.queue_s >= 0 for o in outs)


# ---- bounds, drain, close, errors -------------------------------------------------------

def test_queue_full_is_resource_exhausted(executor):
    f = Gated()

    async def main():
        b = Batcher("model 'm' version 1", executor, f, 4, max_queue_size=2, exact=False)
        running = asyncio.ensure_future(b.submit([torch.ones(1, 2)]))
        await entered(f.entered)
        queued = [asyncio.ensure_future(b.submit([torch.ones(1, 2)])) for _ in range(2)]
        await until(lambda: b.queued == 2)
        with pytest.raises(ServingError) as e:
            await b.submit([torch.ones(1, 2)])
        f.gate.set()
        await asyncio.gather(running, *queued)
        assert (await b.submit([torch.ones(1, 2)]))[0].shape == (1, 2)  # room again
        return b, e.value

    b, err = asyncio.run(main())
    assert err.code is Code.RESOURCE_EXHAUSTED
    assert "full" in err.message and "max_queue_size" in err.message and "version 1" in err.message
    assert b.stats.rejected == 1


def test_drain_waits_for_queue_and_running_batch_then_close_rejects(executor):
    f = Gated()

    async def main():
        b = Batcher("m", executor, f, 4, exact=False)
        reqs = [asyncio.ensure_future(b.submit([torch.ones(1, 2)])) for _ in range(6)]
        await entered(f.entered)
        b.close()
        with pytest.raises(ServingError) as e:
            await b.submit([torch.ones(1, 2)])
        assert e.value.code is Code.UNAVAILABLE
        drain = asyncio.ensure_future(b.drain())
        await asyncio.sleep(0)
        assert not drain.done()
        f.gate.set()
        await drain
        assert all(r.done() and not r.cancelled() for r in reqs)
        assert b.queued == 0 and b._task.done() and b.forward is None

    asyncio.run(main())


def test_cancel_while_running_drops_result_without_leak(executor):
    f = Gated()

    async def main():
        b = Batcher("m", executor, f, 4, exact=False)
        r0 = asyncio.ensure_future(b.submit([torch.ones(1, 2)]))
        await entered(f.entered)
        r1 = asyncio.ensure_future(b.submit([torch.ones(1, 2)]))
        await until(lambda: b.queued == 1)
        r0.cancel()  # its batch is on the executor: the result will be dropped
        r1.cancel()  # still queued: its slot leaves the queue now
        await asyncio.gather(r0, r1, return_exceptions=True)
        assert b.queued == 0
        f.gate.set()
        out = await b.submit([torch.full((1, 2), 3.0)])
        await b.drain()
        return b, out

    b, out = asyncio.run(main())
    assert torch.equal(out[0], torch.full((1, 2), 6.0))
    assert b.stats.cancelled == 2 and b._queue == type(b._queue)()


def test_timeout_around_submit_cancels_cleanly(executor):
    f = Gated()

    async def main():
        b = Batcher("m", executor, f, 4, exact=False)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await b.submit([torch.ones(1, 2)])
        f.gate.set()
        await b.drain()
        return b

    b = asyncio.run(main())
    assert b.stats.cancelled == 1 and b.queued == 0


def test_one_bad_request_does_not_fail_its_batch(executor):
    def fwd(inputs):
        x = inputs[0]
        if bool((x < 0).any()):
            raise ValueError("negative input")
        return [x + 1]

    async def main():
        b = Batcher("m", executor, fwd, 8, max_queue_delay_s=0.05, exact=False)
        reqs = [torch.ones(1, 2), -torch.ones(1, 2), torch.ones(2, 2)]
        return await asyncio.gather(*(b.submit([r]) for r in reqs), return_exceptions=True)

    good, bad, good2 = asyncio.run(main())
    assert isinstance(bad, ValueError)
    assert torch.equal(good[0], torch.full((1, 2), 2.0)) and good2[0].shape == (2, 2)


def test_outputs_without_batch_dim_fall_back_to_one_by_one(executor):
    def fwd(inputs):
        return [inputs[0].sum()]  # a reduction over the batch: cannot be split

    async def main():
        b = Batcher("m", executor, fwd, 8, max_queue_delay_s=0.05, exact=False)
        reqs = [torch.ones(1, 2), torch.ones(2, 2) * 2]
        return await asyncio.gather(*(b.submit([r]) for r in reqs))

    a, c = asyncio.run(main())
    assert a[0].item() == 2.0 and c[0].item() == 8.0


# ---- make_batcher -----------------------------------------------------------------------

@pytest.mark.parametrize("yaml_extra", ["max_batch_size: 0\nbatching: {enabled: true}",
                                        "max_batch_size: 8\nbatching: {enabled: false}"])
def test_make_batcher_off(yaml_extra):
    spec = parse_spec(yaml_extra)
    assert make_batcher("m", None, spec, None) is None


def test_make_batcher_on_calibrates_the_signature_shape(executor):
    text = (BUNDLED / "model.yaml").read_text().replace("enabled: false", "enabled: true\n  exact: true")
    spec = parse_spec(text + "\n")
    lm = load_version(BUNDLED / "1", "model.safetensors", spec)

    async def main():
        b = make_batcher("model 'mlp' version 1", lm, spec, executor)
        assert b is not None and b.max_batch_size == 64 and b.delay == pytest.approx(0.0005)
        out = await b.submit([rows(3)])
        b.close()
        await b.drain()
        return b, out

    b, out = asyncio.run(main())
    assert out[0].shape == (3, 8)
    assert ((torch.float32, (64,), torch.device("cpu")),) in b.row_multiple


def test_precalibrated_harness_and_batches_reported_to_metrics(executor):
    text = (BUNDLED / "model.yaml").read_text().replace("enabled: false", "enabled: true\n  exact: true")
    spec = parse_spec(text + "\n")
    lm = load_version(BUNDLED / "2", "model.pt2", spec)
    pre = calibrate_loaded(lm, spec)  # what the load thread does before AVAILABLE
    assert list(pre.values())[0] in ROW_MULTIPLES
    assert calibrate_loaded(lm, parse_spec("max_batch_size: 0")) == {}

    class M:
        calls = []

        def record_batch(self, model, version, size, secs):
            self.calls.append((model, version, size))

    m = M()

    async def main():
        b = make_batcher("model 'mlp' version 1", lm, spec, executor, pre,
                         lambda rows, secs: m.record_batch("mlp", 1, rows, secs))
        assert b.row_multiple == pre  # nothing left to calibrate on the executor
        await asyncio.gather(*(b.submit([rows(1, seed=i)]) for i in range(3)))
        b.close()
        await b.drain()
        return b

    b = asyncio.run(main())
    assert sum(size for _, _, size in m.calls) == 3
    assert all(mv[:2] == ("mlp", 1) for mv in m.calls)
    assert len(m.calls) == b.stats.batches


def test_scheduler_failure_fails_waiters_and_recovers(executor):
    async def main():
        b = Batcher("m", executor, lambda xs: [xs[0] + 1], 4, exact=False)
        plan = b._plan
        b._plan = lambda: (_ for _ in ()).throw(RuntimeError("bug"))
        with pytest.raises(ServingError) as e:
            await b.submit([torch.ones(1, 2)])
        assert e.value.code is Code.INTERNAL and "bug" in e.value.message
        b._plan = plan
        out = await b.submit([torch.ones(1, 2)])  # a fresh scheduler serves again
        b.close()
        await b.drain()
        return out

    assert torch.equal(asyncio.run(main())[0], torch.full((1, 2), 2.0))


# ---- properties (hypothesis): FIFO per shape, bounded batches, exactly-once answers ------

class ManualExecutor(Executor):
    """An executor whose calls run only when the test says so (on the loop thread), so a
    generated schedule of submits, cancels and batch completions replays exactly."""

    def __init__(self):
        self.pending: deque = deque()

    def submit(self, fn, /, *args, **kwargs):
        f = Future()
        self.pending.append((f, fn, args, kwargs))
        return f

    def run_one(self) -> bool:
        if not self.pending:
            return False
        f, fn, args, kwargs = self.pending.popleft()
        if f.set_running_or_notify_cancel():
            try:
                f.set_result(fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting batcher
                f.set_exception(e)
        return True


# Three shape keys: (dtype, row width). Each request's rows all hold its id, so a batch's
# rows tell which requests ran in it and in what order; ids < 0 make the forward raise.
KEYS = [(torch.float32, 2), (torch.float32, 3), (torch.float64, 2)]

_submit = st.tuples(st.just("submit"), st.integers(0, len(KEYS) - 1), st.integers(1, 4),
                    st.booleans(), st.booleans())  # key, rows, bad, settle after
_cancel = st.tuples(st.just("cancel"), st.integers(0, 63))
_run = st.tuples(st.just("run"))


async def _settle():
    for _ in range(8):
        await asyncio.sleep(0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(max_batch=st.integers(1, 6), queue_size=st.integers(1, 12),
       preferred=st.lists(st.integers(1, 6), max_size=2),
       steps=st.lists(st.one_of(_submit, _cancel, _run, _run), max_size=40))
def test_property_fifo_bounded_batches_every_request_answered_once(max_batch, queue_size,
                                                                   preferred, steps):
    ex = ManualExecutor()
    ran: list[tuple[int, list[int]]] = []  # (key index, request ids in row order) per forward
    entered: set[int] = set()  # requests whose submit() ran (a task cancelled first never does)

    def fwd(inputs):
        x = inputs[0]
        ids = [int(v) for v in x[:, 0].tolist()]
        order = [i for n, i in enumerate(ids) if n == 0 or ids[n - 1] != i]
        if any(i < 0 for i in order):
            raise ValueError(f"bad request in {order}")
        key = next(k for k, (dt, d) in enumerate(KEYS) if x.dtype == dt and x.shape[1] == d)
        ran.append((key, order))
        return [x * 2 + 1]

    async def main():
        b = Batcher("m", ex, fwd, max_batch, max_queue_delay_s=0.0,
                    preferred_batch_sizes=preferred, max_queue_size=queue_size, exact=False)
        reqs = []  # (id, key, rows, task)

        async def call(rid, x):
            entered.add(rid)  # b.submit runs up to its queueing in this same step
            return await b.submit([x])

        for step in steps:
            if step[0] == "submit":
                _, key, rows, bad, settle = step
                rows = min(rows, max_batch)
                rid = -(len(reqs) + 1) if bad else len(reqs) + 1
                dt, d = KEYS[key]
                task = asyncio.ensure_future(call(rid, torch.full((rows, d), float(rid), dtype=dt)))
                reqs.append((rid, key, rows, task))
                if settle:
                    await _settle()
            elif step[0] == "cancel" and reqs:
                reqs[step[1] % len(reqs)][3].cancel()
                await _settle()
            elif step[0] == "run":
                ex.run_one()
                await _settle()
        await _settle()
        for _ in range(10 * len(reqs) + 10):  # then run everything that is left
            if all(r[3].done() for r in reqs):
                break
            if not ex.run_one():
                await _settle()
            await _settle()
        b.close()
        drain = asyncio.ensure_future(b.drain())
        for _ in range(100):
            if drain.done():
                break
            ex.run_one()
            await _settle()
        assert drain.done(), "drain() did not finish once every request was answered"
        return b, reqs

    b, reqs = asyncio.run(main())
    assert all(task.done() for *_, task in reqs), "a request was never answered"
    answered, rejected = [], 0
    for rid, key, rows, task in reqs:
        if task.cancelled():
            continue
        err = task.exception()
        if err is None:
            out = task.result()[0]
            dt, d = KEYS[key]
            # its own rows, its own answer: never a neighbour's, never a share of padding
            assert out.shape == (rows, d) and out.dtype == dt
            assert torch.equal(out, torch.full((rows, d), rid * 2.0 + 1, dtype=dt))
            assert 1 <= task.result().batch_size <= max_batch
            answered.append(rid)
        elif isinstance(err, ServingError) and err.code is Code.RESOURCE_EXHAUSTED:
            rejected += 1
        else:
            assert isinstance(err, ValueError) and rid < 0, (rid, err)
    # no batch over the max, each batch one shape key
    for key, order in ran:
        rows_of = {r[0]: r[2] for r in reqs}
        assert sum(rows_of[i] for i in order) <= max_batch, (order, max_batch)
        assert all(reqs[abs(i) - 1][1] == key for i in order)
    # every good answer came from exactly one successful forward
    executed = [i for _, order in ran for i in order]
    for rid in answered:
        assert executed.count(rid) == 1, (rid, ran)
    # FIFO per shape key: within a key, requests ran in the order they were submitted
    for k in range(len(KEYS)):
        seq = [abs(i) for key, order in ran if key == k for i in order]
        assert seq == sorted(seq), (k, ran)
    assert b.stats.rejected == rejected
    assert b.stats.requests == len(entered) - rejected
    assert b.queued == 0
