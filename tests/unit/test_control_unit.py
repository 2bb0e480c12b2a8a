"""Control with an in-memory ConfigSource and a fake manager: a routing change is
validated whole, persisted, then applied, or changes nothing; a reload reads the document
once; tokens guard every change. No server, no file, no socket."""

from __future__ import annotations

import asyncio

import pytest

from router import Router
from runtime.config.settings import Settings
from runtime.errors import Code, ServingError, unavailable
from runtime.routing.sources import ConfigSource
from runtime.service.control import Control
from runtime.views import ModelView, Snapshot

pytestmark = pytest.mark.unit


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


class MemorySource:
    """A ConfigSource whose document is a string; counts reads, keeps writes."""

    kind = "memory"
    name = "the test's memory"

    def __init__(self, text: str | None = None, managed_by: str | None = None):
        self.text = text
        self.reads = 0
        self.writes: list[tuple[str, dict]] = []
        self.fail: Exception | None = None  # the next write raises it
        self._managed_by = managed_by

    def read(self) -> str | None:
        self.reads += 1
        if isinstance(self.text, Exception):
            raise self.text
        return self.text

    def managed_by(self) -> str | None:
        return self._managed_by

    @property
    def writable(self) -> bool:
        return self._managed_by is None

    def start(self, loop, on_change) -> None:
        self.on_change = on_change

    def stop(self) -> None:
        pass

    async def write(self, model, config) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes.append((model, config.to_json()))


class FakeManager:
    """Model "m" with version folders `present`; remembers the reconciles asked for."""

    def __init__(self, present=(1, 2)):
        self.present = frozenset(present)
        self.reconciled: list[str] = []

    def view(self) -> Snapshot:
        return Snapshot(1, {"m": ModelView("m", (), self.present)})

    def require(self, model: str) -> ModelView:
        mv = self.view().model(model)
        if mv is None:
            raise ServingError(Code.NOT_FOUND, f"unknown model '{model}'")
        return mv

    def request_reconcile(self, model: str, delay: float = 0.0) -> None:
        self.reconciled.append(model)


def control(source=None, present=(1, 2), token=None):
    settings = Settings()
    settings.server.token = token
    manager, router = FakeManager(present), Router()
    return Control(manager, router, source, settings), manager, router, settings


SPLIT = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 90, "canary": 10}}


def test_the_in_memory_source_keeps_the_protocol():
    """Every member the Protocol declares (what Control may call) exists on the fake."""
    declared = {n for n in vars(ConfigSource) if not n.startswith("_")} | \
        set(ConfigSource.__annotations__)
    assert {"read", "write", "writable", "managed_by", "kind"} <= declared
    missing = {n for n in declared if not hasattr(MemorySource(), n)}
    assert not missing, f"MemorySource lacks {missing}"


def test_a_routing_put_is_persisted_then_applied_and_its_versions_aspired():
    src = MemorySource()
    ctl, manager, router, _ = control(src)
    state = run(ctl.put_routing("m", SPLIT))
    assert src.writes == [("m", router.get_config("m").to_json())]
    assert router.get_config("m").weights == {"stable": 90, "canary": 10}
    assert manager.reconciled == ["m"]
    # nothing is AVAILABLE in the fake: the answer says the labels move once it is
    assert state["note"] == ("label(s) stable -> 1, canary -> 2 move once that version is "
                             "AVAILABLE; it is being loaded")


def test_a_put_naming_a_version_without_a_folder_changes_nothing():
    src = MemorySource()
    ctl, manager, router, _ = control(src, present=(1,))
    before = router.get_config("m")
    with pytest.raises(ServingError) as ei:
        run(ctl.put_routing("m", SPLIT))  # canary -> 2: no folder
    assert ei.value.code is Code.INVALID_ARGUMENT
    assert src.writes == [] and router.get_config("m") == before and manager.reconciled == []


def test_a_read_only_source_refuses_with_conflict_before_any_change():
    src = MemorySource(managed_by="the ConfigMap default/splitserve (Helm)")
    ctl, manager, router, _ = control(src)
    before = router.get_config("m")
    with pytest.raises(ServingError) as ei:
        run(ctl.put_routing("m", SPLIT))
    assert ei.value.code is Code.CONFLICT and "Helm" in ei.value.message
    assert src.writes == [] and router.get_config("m") == before


def test_a_failed_write_leaves_the_router_as_it_was():
    src = MemorySource()
    src.fail = unavailable("the API server did not answer")
    ctl, manager, router, _ = control(src)
    before = router.get_config("m")
    with pytest.raises(ServingError) as ei:
        run(ctl.put_routing("m", SPLIT))
    assert ei.value.code is Code.UNAVAILABLE
    assert router.get_config("m") == before and manager.reconciled == []


def test_without_a_source_routing_lives_in_memory():
    ctl, _, router, _ = control(None)
    run(ctl.put_routing("m", SPLIT))
    assert router.get_config("m").weights == {"stable": 90, "canary": 10}
    assert ctl.reload_config_file() is False  # nothing to reload from


DOC = """
limits: {request_timeout_s: 30}
models:
  m:
    labels: {stable: 1, canary: 2}
    weights: {stable: 50, canary: 50}
"""


def test_a_reload_reads_the_document_once_for_routes_and_settings():
    src = MemorySource(DOC)
    ctl, manager, router, settings = control(src)
    assert ctl.reload_config_file() is True
    assert src.reads == 1
    assert router.get_config("m").weights == {"stable": 50, "canary": 50}
    assert manager.reconciled == ["m"]
    assert ctl.reload_config_file() is False  # the same document: no change
    src.text = DOC.replace("request_timeout_s: 30", "request_timeout_s: 5")
    ctl.reload_config_file()
    assert src.reads == 3
    assert settings.limits.request_timeout_s == 5  # a live key, from that one read


def test_an_invalid_document_keeps_the_last_good_until_its_version_arrives():
    src = MemorySource(DOC)
    ctl, manager, router, _ = control(src, present=(1,))
    assert ctl.reload_config_file() is False  # canary -> 2: no folder yet
    assert router.configs() == {}
    manager.present = frozenset({1, 2})  # the version's folder was scanned
    assert ctl.retry_rejected() is True
    assert router.get_config("m").weights == {"stable": 50, "canary": 50}
    assert ctl.retry_rejected() is False  # nothing left to retry


def test_an_unreadable_source_is_logged_and_changes_nothing():
    src = MemorySource(OSError("permission denied"))
    ctl, _, router, _ = control(src)
    assert ctl.reload_config_file() is False
    assert router.configs() == {}


def test_a_token_guards_every_change():
    ctl, _, _, _ = control(MemorySource(), token="s3cret")
    for bad in (None, "Bearer nope", "Basic s3cret", b"Bearer s3cre"):
        with pytest.raises(ServingError) as ei:
            ctl.authorize(bad, "put_routing")
        assert ei.value.code is Code.UNAUTHENTICATED
    ctl.authorize("Bearer s3cret", "put_routing")
    ctl.authorize(b"bearer s3cret", "put_routing")  # gRPC metadata arrives as bytes
