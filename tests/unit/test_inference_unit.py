"""InferenceService with a fake manager and runner (the router is the real, pure one):
who is charged for what, the limits, shadow copies and the drain, without a server."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest

from router import RouteConfig, Router
from runtime import errors
from runtime.config.settings import LimitSettings
from runtime.errors import Code, ServingError
from runtime.execution.runner import RunResult
from runtime.service.inference import InferenceService
from runtime.types import InferRequest, ServableId, Tensor
from runtime.views import ModelView, Snapshot
from unit_fakes import SIG

pytestmark = pytest.mark.unit

X = np.array([0.5, 2.0, 1.0], dtype=np.float32)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def request(version=None, data=X, datatype="FP32", name="x", model="m") -> InferRequest:
    return InferRequest(model, [Tensor(name, datatype, tuple(data.shape), data)], version=version,
                        protocol="rest_v2")


class FakeHandle:
    def __init__(self, manager: "FakeManager", version: int):
        self.manager, self.version = manager, version
        self.sid = ServableId("m", version)
        self.signature = SIG
        manager.pinned[version] += 1
        self._open = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()

    def release(self):
        if self._open:
            self._open = False
            self.manager.pinned[self.version] -= 1

    async def run(self, inputs):
        return await self.manager.forward(self.version, inputs)

    run_shadow = run


class FakeManager:
    """AVAILABLE `versions` of model "m"; version v answers x * v, or what `faults[v]`
    says: an exception to raise, or an asyncio.Event to wait for first."""

    def __init__(self, versions=(1, 2)):
        self.versions = set(versions)
        self.pinned: Counter[int] = Counter()  # handles out per version
        self.faults: dict[int, object] = {}
        self.started = asyncio.Event()  # a forward pass began

    def view(self) -> Snapshot:
        return Snapshot(1, {"m": ModelView("m")})

    def unknown(self, model):
        return errors.not_found(f"unknown model '{model}'")  # no folder on disk here

    def acquire(self, model, version):
        if model != "m":
            raise errors.not_found(f"unknown model '{model}'")
        if version not in self.versions:
            raise errors.unavailable(f"version {version} of model 'm' is LOADING")
        return FakeHandle(self, version)

    async def forward(self, version, inputs):
        self.started.set()
        fault = self.faults.get(version)
        if isinstance(fault, asyncio.Event):
            await fault.wait()
        elif fault is not None:
            raise fault
        return RunResult([inputs[0] * version], 0.001, 0.002, 1)


class Recorder:
    """The metrics and on_finished collaborators: what was charged to whom."""

    def __init__(self):
        self.requests, self.shadows, self.dropped, self.finished = [], [], [], []
        self.shadow_seen = asyncio.Event()

    def record_request(self, model, version, route, protocol, code, *_):
        self.requests.append((version, route, code))

    def record_shadow(self, model, primary, shadow, ok, diff, agree):
        self.shadows.append((primary, shadow, ok, diff, agree))
        self.shadow_seen.set()

    def record_shadow_dropped(self, model, version):
        self.dropped.append(version)

    def on_finished(self, model, version, how, ok, *_):
        self.finished.append((version, how, ok))


def service(manager=None, config=None, limits=None, shadow_max_inflight=64):
    router = Router({"m": RouteConfig.from_json(config or {"weights": {1: 100}})}, seed=0)
    router.set_available("m", [1, 2])
    rec = Recorder()
    svc = InferenceService(manager or FakeManager(), router, limits or LimitSettings(), rec,
                           shadow_max_inflight, on_finished=rec.on_finished)
    return svc, rec


def test_the_version_that_served_is_answered_recorded_and_reported():
    svc, rec = service()

    async def body():
        split = await svc.infer(request())
        pinned = await svc.infer(request(version=2))
        return split, pinned

    split, pinned = run(body())
    assert (split.version, split.route) == (1, "split")
    np.testing.assert_allclose(pinned.outputs[0].data, X * 2)
    assert (pinned.version, pinned.route, pinned.outputs[0].name) == (2, "pinned", "y")
    assert rec.requests == [(1, "split", "OK"), (2, "pinned", "OK")]
    assert rec.finished == [(1, "split", True), (2, "pinned", True)]
    assert svc.manager.pinned == Counter({1: 0, 2: 0}) and svc.inflight == 0


def test_a_client_mistake_is_never_charged_to_a_version():
    svc, rec = service()
    with pytest.raises(ServingError) as ei:
        run(svc.infer(request(data=X.astype(np.int64), datatype="INT64")))
    assert ei.value.code is Code.INVALID_ARGUMENT and "datatype INT64" in ei.value.message
    assert ei.value.version == 1  # the answer says who would have served it
    assert rec.requests == [(None, "split", "INVALID_ARGUMENT")]
    assert rec.finished == []  # the decider never sees it
    assert svc.manager.pinned[1] == 0  # the handle went back


def test_a_model_fault_is_charged_to_the_version_that_ran_it():
    manager = FakeManager()
    manager.faults[2] = RuntimeError("CUDA error: device-side assert")
    svc, rec = service(manager)
    with pytest.raises(ServingError) as ei:
        run(svc.infer(request(version=2)))
    assert ei.value.code is Code.INTERNAL and "RuntimeError" in ei.value.message
    assert ei.value.version == 2
    assert rec.requests == [(2, "pinned", "INTERNAL")]
    assert rec.finished == [(2, "pinned", False)]
    assert manager.pinned[2] == 0


def test_unknown_model_and_unavailable_version_are_told_apart():
    manager = FakeManager(versions=(1,))
    svc, rec = service(manager)
    with pytest.raises(ServingError) as ei:
        run(svc.infer(request(model="nope")))
    assert ei.value.code is Code.NOT_FOUND and "unknown model 'nope'" in ei.value.message
    with pytest.raises(ServingError) as ei:
        run(svc.infer(request(version=2)))
    assert ei.value.code is Code.UNAVAILABLE
    assert rec.requests == [(None, "unrouted", "NOT_FOUND"), (None, "pinned", "UNAVAILABLE")]


def test_past_max_inflight_a_request_is_refused_and_the_first_still_answers():
    manager = FakeManager()
    gate = manager.faults[1] = asyncio.Event()
    svc, rec = service(manager, limits=LimitSettings(max_inflight=1))

    async def body():
        first = asyncio.create_task(svc.infer(request()))
        await manager.started.wait()
        with pytest.raises(ServingError) as ei:
            await svc.infer(request())
        assert ei.value.code is Code.RESOURCE_EXHAUSTED
        gate.set()
        return await first

    assert run(body()).version == 1
    assert rec.requests == [(None, "rejected", "RESOURCE_EXHAUSTED"), (1, "split", "OK")]


def test_a_forward_past_request_timeout_s_is_deadline_exceeded():
    manager = FakeManager()
    manager.faults[1] = asyncio.Event()  # never set
    svc, rec = service(manager, limits=LimitSettings(request_timeout_s=0.05))
    with pytest.raises(ServingError) as ei:
        run(svc.infer(request()))
    assert ei.value.code is Code.DEADLINE_EXCEEDED
    assert rec.requests == [(1, "split", "DEADLINE_EXCEEDED")] and manager.pinned[1] == 0


SHADOWED = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 100},
            "shadow": {"target": "canary", "percent": 100}}


def test_a_shadow_copy_runs_on_its_version_after_the_answer_and_is_compared():
    svc, rec = service(config=SHADOWED)

    async def body():
        resp = await svc.infer(request())
        await asyncio.wait_for(rec.shadow_seen.wait(), 10)
        return resp

    resp = run(body())
    assert resp.version == 1  # the caller gets the primary's answer
    (primary, shadow, ok, diff, agree), = rec.shadows
    assert (primary, shadow, ok, agree) == (1, 2, True, True)  # x*2 keeps x's argmax
    assert diff == pytest.approx(float(np.max(np.abs(X))))  # |2x - x|
    assert rec.requests == [(1, "split", "OK"), (2, "shadow", "OK")]
    assert rec.finished == [(1, "split", True)]  # shadows never reach the decider


def test_shadow_copies_past_their_bound_are_dropped_not_run():
    svc, rec = service(config=SHADOWED, shadow_max_inflight=0)
    assert run(svc.infer(request())).version == 1
    assert rec.dropped == [2] and rec.shadows == [] and svc.shadow_dropped == 1
    assert svc.manager.pinned[2] == 0  # never acquired


def test_drain_cuts_off_what_outlives_its_timeout_with_unavailable():
    manager = FakeManager()
    manager.faults[1] = asyncio.Event()  # never set
    svc, rec = service(manager)

    async def body():
        stuck = asyncio.create_task(svc.infer(request()))
        await manager.started.wait()
        assert await svc.drain(0.05) == 1
        with pytest.raises(ServingError) as ei:
            await stuck
        return ei.value

    err = run(body())
    assert err.code is Code.UNAVAILABLE and "shutting down" in err.message
    assert rec.requests == [(1, "split", "UNAVAILABLE")] and svc.inflight == 0
