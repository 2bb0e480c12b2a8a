"""Tracing is off unless the OTEL_* variables configure it; configured without the SDK it
says so in one WARNING line and traces nothing. Request ids: a caller's safe id is kept,
anything else is replaced by a made one."""

from __future__ import annotations

import logging
import sys

import pytest

from runtime import tracing
from runtime.service.inference import request_id

EP = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}


@pytest.mark.parametrize("env", [
    {},
    {"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"},  # no endpoint: off
    {**EP, "OTEL_SDK_DISABLED": "true"},
    {**EP, "OTEL_TRACES_EXPORTER": "none"},
    {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "  "},
])
def test_off_unless_an_endpoint_is_configured(env, caplog):
    with caplog.at_level(logging.DEBUG, "splitserve.tracing"):
        assert tracing.from_env(env) is None
    assert caplog.records == []


def test_without_the_sdk_one_warning_and_no_tracing(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # import fails
    with caplog.at_level(logging.INFO, "splitserve.tracing"):
        assert tracing.from_env(EP) is None
    assert [(r.levelname, "\n" in r.getMessage()) for r in caplog.records] == [("WARNING", False)]
    assert "event=tracing_off" in caplog.text and "splitserve[otel]" in caplog.text


def test_an_unknown_protocol_is_one_warning(caplog):
    pytest.importorskip("opentelemetry.sdk.trace")
    with caplog.at_level(logging.INFO, "splitserve.tracing"):
        assert tracing.from_env({**EP, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}) is None
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "http/json" in caplog.text


def test_configured_with_the_sdk(monkeypatch):
    pytest.importorskip("opentelemetry.sdk.trace")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    t = tracing.from_env(EP)
    try:
        assert t is not None
        assert t.provider.resource.attributes["service.name"] == "splitserve"
    finally:
        t.shutdown()


@pytest.mark.parametrize("given, header, want", [
    ("abc", "hdr", "abc"),  # the request's own id first
    (None, "0f8fad5b-d9cb-469f-a165-70867728950e", "0f8fad5b-d9cb-469f-a165-70867728950e"),
    (None, "a.b:c-D_9", "a.b:c-D_9"),
    (None, "a/b", None),  # '/' is outside the alphabet
    ("bad id", "good:1", "good:1"),
    (None, "x" * 128, "x" * 128),
    (None, "x" * 129, None),
    (None, "", None),
    ("", None, None),
    (None, "new\nline", None),
])
def test_request_ids(given, header, want):
    headers = {"x-request-id": header} if header is not None else {}
    got = request_id(given, headers)
    if want is None:
        assert len(got) == 16 and int(got, 16) >= 0
    else:
        assert got == want


def test_off_adds_no_coroutine_or_object_per_request():
    """With tracing None, `infer` hands back the data path's own coroutine: nothing wraps it."""
    from runtime.service.inference import InferenceService
    from runtime.types import InferRequest

    svc = InferenceService.__new__(InferenceService)
    svc.tracing = None
    coro = svc.infer(InferRequest("m", []))
    try:
        assert coro.cr_code is InferenceService._infer.__code__
        assert coro.cr_frame.f_locals["tr"] is None
    finally:
        coro.close()


def test_serving_untraced_loads_no_sdk():
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    code = ("import sys, runtime.cli.main, runtime.server.app, runtime.service.core; "
            "from runtime import tracing; assert tracing.from_env({}) is None; "
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk', "
            "'opentelemetry.exporter'))))")  # (FastAPI itself imports the API when it is there)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]", f"serving untraced loads {out}"
