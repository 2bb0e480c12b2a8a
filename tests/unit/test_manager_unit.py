"""Manager with a fake loader: load, fail, retry, both swap orders, drain, unload,
without a server, a socket or a model file (TF Serving tests its managers this way)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from runtime.config.settings import RepositorySettings
from runtime.errors import Code, ServingError
from runtime.lifecycle.manager import Manager
from runtime.types import VersionState as S
from unit_fakes import FakeLoader, write_version

pytestmark = pytest.mark.unit


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def started(root, loader, **settings) -> Manager:
    rs = RepositorySettings(quiet_s=0, intra_op_threads=1, **settings)
    m = Manager(root, rs, load=loader,
                on_event=lambda ev: loader.timeline.append((ev.kind, ev.version)))
    await m.start()
    assert await m.settle_all(10)
    return m


async def state(m: Manager, version: int, want: S, model: str = "m") -> None:
    assert await m.wait_until(lambda: m.state_of(model, version) is want, 10), \
        f"{model}:{version} is {m.state_of(model, version)}, not {want}"


def test_a_version_loads_through_the_loader_serves_and_is_released_at_close(tmp_path):
    write_version(tmp_path, "m", 1)
    loader = FakeLoader()

    async def body():
        m = await started(tmp_path, loader)
        mv = m.view().model("m")
        assert list(mv.available) == [1] and mv.version(1).memory_bytes == 1000
        with m.acquire("m", 1) as h:
            assert m.view().inflight("m", 1) == 1
            res = await h.run([torch.tensor([1.0, 2.0])])
        assert res.outputs[0].tolist() == [2.0, 3.0]  # the fake's x + version, run by the Runner
        assert m.view().inflight("m", 1) == 0
        await m.close()
        assert m.state_of("m", 1) is S.END

    run(body())
    assert loader.calls == [1]
    assert loader.timeline == [("load", 1, 0), ("loaded", 1), ("unloaded", 1)]
    assert loader.models[0].released


def test_a_failed_load_is_failed_with_its_reason_and_not_served(tmp_path):
    write_version(tmp_path, "m", 1)
    loader = FakeLoader()
    loader.fail[1] = "weights do not fit the architecture"

    async def body():
        m = await started(tmp_path, loader)
        assert m.state_of("m", 1) is S.FAILED
        assert m.view().model("m").version(1).error == "weights do not fit the architecture"
        with pytest.raises(ServingError) as ei:
            m.acquire("m", 1)
        assert ei.value.code is Code.UNAVAILABLE and "weights do not fit" in str(ei.value)
        await m.close()

    run(body())
    assert loader.timeline == [("load", 1, 0), ("failed", 1)]


def test_a_failed_version_is_retried_when_its_files_change_and_not_before(tmp_path):
    write_version(tmp_path, "m", 1)
    loader = FakeLoader()
    loader.fail[1] = "truncated"

    async def body():
        m = await started(tmp_path, loader)
        assert m.state_of("m", 1) is S.FAILED
        passes = m.reconciles["m"]
        m.request_reconcile("m")  # the same files: looked at, not loaded again
        assert await m.wait_until(lambda: m.reconciles["m"] > passes, 10)
        assert await m.settle("m", 10)
        assert loader.calls == [1] and m.state_of("m", 1) is S.FAILED
        del loader.fail[1]
        write_version(tmp_path, "m", 1, payload=b"the complete weights")
        m.request_reconcile("m")
        await state(m, 1, S.AVAILABLE)
        assert m.view().model("m").version(1).error is None
        await m.close()

    run(body())
    assert loader.calls == [1, 1]
    assert loader.timeline[:4] == [("load", 1, 0), ("failed", 1), ("load", 1, 0), ("loaded", 1)]


def test_availability_preserving_swap_serves_the_old_version_until_the_new_one_is_up(tmp_path):
    write_version(tmp_path, "m", 1)
    loader = FakeLoader()
    gate = loader.gates[2] = threading.Event()

    async def body():
        m = await started(tmp_path, loader)
        write_version(tmp_path, "m", 2)
        m.request_reconcile("m")
        await state(m, 2, S.LOADING)
        assert m.state_of("m", 1) is S.AVAILABLE  # still serving while 2 loads
        with m.acquire("m", 1) as h:
            assert h.version == 1
        gate.set()
        await state(m, 1, S.END)
        assert list(m.view().model("m").available) == [2]
        await m.close()

    run(body())
    # 2 loaded while 1 was held (two models in memory), and 1 left only after 2 was up
    assert loader.timeline[:5] == [("load", 1, 0), ("loaded", 1), ("load", 2, 1), ("loaded", 2),
                                   ("unloaded", 1)]


def test_resource_preserving_swap_unloads_the_old_version_before_loading_the_new(tmp_path):
    write_version(tmp_path, "m", 1)
    (tmp_path / "m" / "model.yaml").write_text("version_swap: resource_preserving\n")
    loader = FakeLoader()

    async def body():
        m = await started(tmp_path, loader)
        write_version(tmp_path, "m", 2)
        m.request_reconcile("m")
        await state(m, 2, S.AVAILABLE)
        assert m.state_of("m", 1) is S.END
        await m.close()

    run(body())
    # 1 was released before 2's load began: never two models in memory
    assert loader.timeline[:5] == [("load", 1, 0), ("loaded", 1), ("unloaded", 1), ("load", 2, 0),
                                   ("loaded", 2)]


def test_an_unloading_version_drains_its_requests_before_release(tmp_path):
    write_version(tmp_path, "m", 1)
    loader = FakeLoader()

    async def body():
        m = await started(tmp_path, loader, unload_drain_timeout_s=30)
        held = m.acquire("m", 1)  # a request in flight on version 1
        write_version(tmp_path, "m", 2)
        m.request_reconcile("m")
        await state(m, 1, S.UNLOADING)
        for _ in range(50):  # let the unload run as far as it can without the handle
            await asyncio.sleep(0)
        assert m.state_of("m", 1) is S.UNLOADING and not loader.models[0].released
        with pytest.raises(ServingError) as ei:
            m.acquire("m", 1)  # no new request reaches it
        assert ei.value.code is Code.UNAVAILABLE
        held.release()
        await state(m, 1, S.END)
        assert loader.models[0].released
        await m.close()

    run(body())


def test_a_drain_is_bounded_by_unload_drain_timeout_s(tmp_path):
    write_version(tmp_path, "m", 1)
    loader = FakeLoader()

    async def body():
        m = await started(tmp_path, loader, unload_drain_timeout_s=0.2)
        held = m.acquire("m", 1)  # never released before the bound
        write_version(tmp_path, "m", 2)
        m.request_reconcile("m")
        await state(m, 1, S.END)
        assert loader.models[0].released and m.view().inflight("m", 1) == 0
        held.release()  # late: harmless
        await m.close()

    run(body())


def test_unload_through_the_api_then_load_again(tmp_path):
    write_version(tmp_path, "m", 1)
    loader = FakeLoader()

    async def body():
        m = await started(tmp_path, loader)
        await m.unload_model("m", 10)
        assert m.state_of("m", 1) is S.END and m.view().model("m").disabled
        assert loader.models[0].released
        with pytest.raises(ServingError) as ei:
            m.acquire("m", 1)
        assert ei.value.code is Code.NOT_FOUND
        await m.load_model("m", 10)
        assert m.state_of("m", 1) is S.AVAILABLE and not m.view().model("m").disabled
        await m.close()

    run(body())
    assert loader.calls == [1, 1]
    assert [e for e in loader.timeline if len(e) == 2] == [("loaded", 1), ("unloaded", 1),
                                                           ("loaded", 1), ("unloaded", 1)]
