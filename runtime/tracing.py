"""OpenTelemetry tracing of the data path: off unless configured, as a cluster configures it.

Configured by the standard variables, read once by the composition root (`from_env`):
`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` turns it on (OTLP
over HTTP/protobuf; `OTEL_EXPORTER_OTLP_PROTOCOL=grpc` needs the gRPC exporter installed),
`OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` name the service (default `splitserve`),
`OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` sample, `OTEL_BSP_*` batch the export,
`OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` turn it off. The SDK is the
optional extra `splitserve[otel]`, imported only here and only when configured: without it
one WARNING line says so and nothing is traced.

Off, the whole cost is `tracing is None` in `InferenceService.infer`: no object is made per
request. On, a request that the sampler drops costs the W3C `traceparent` extraction and
the sampler's draw; a sampled one gets a SERVER span (the caller's trace continued) and
INTERNAL children `route`, `queue`, `batch` (batched versions only) and `forward`, built
after the fact from the timings the runner already takes (perf_counter, shifted onto the
wall clock by one offset per request, so its spans nest exactly), so nothing is added to
the forward path itself.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("splitserve.tracing")

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SERVICE_NAME = "splitserve"

# Request span names: low cardinality (the route template, the gRPC method), as the
# HTTP and RPC semantic conventions name server spans.
_NAMES = {
    "rest_v2": ("POST /v2/models/{model}/infer",
                {"http.request.method": "POST", "http.route": "/v2/models/{model}/infer"}),
    "rest_tfs": ("POST /v1/models/{model}:predict",
                 {"http.request.method": "POST", "http.route": "/v1/models/{model}:predict"}),
    "grpc_v2": ("inference.GRPCInferenceService/ModelInfer",
                {"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                 "rpc.method": "ModelInfer"}),
}
_FAULTS = frozenset({"INTERNAL", "DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED"})


def from_env(env=None) -> "Tracing | None":
    """The tracer the OTEL_* variables ask for, or None (the usual case: not configured)."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    endpoint = next((env[v] for v in ENDPOINT_VARS if env.get(v, "").strip()), None)
    if endpoint is None:
        return None
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "http/protobuf").strip().lower()
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        if protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        elif protocol == "http/protobuf":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            log.warning("event=tracing_off reason=%r", f"OTLP protocol {protocol!r} is not supported; "
                        f"use http/protobuf or grpc")
            return None
    except ImportError as e:
        log.warning("event=tracing_off endpoint=%s reason=%r", endpoint,
                    f"the OpenTelemetry SDK is not installed ({e.name or e}): pip install 'splitserve[otel]'")
        return None
    attrs = {}
    if not env.get("OTEL_SERVICE_NAME") and "service.name=" not in env.get("OTEL_RESOURCE_ATTRIBUTES", ""):
        attrs["service.name"] = SERVICE_NAME
    # The provider reads OTEL_TRACES_SAMPLER(_ARG), the processor OTEL_BSP_*, the exporter
    # the endpoint, headers, timeout and TLS variables: the SDK's own rules, not ours.
    provider = TracerProvider(resource=Resource.create(attrs))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("event=tracing_on endpoint=%s protocol=%s sampler=%s", endpoint, protocol,
             env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on"))
    return Tracing(provider, trace, TraceContextTextMapPropagator())


class Tracing:
    """The configured tracer. Made once (`from_env`), shared by every request; loop only."""

    def __init__(self, provider, api, propagator):
        self.provider = provider
        self.tracer = provider.get_tracer("splitserve")
        self._api = api
        self._propagator = propagator
        self._server = api.SpanKind.SERVER
        self._error = api.Status(api.StatusCode.ERROR)

    def begin(self, protocol: str, model: str, headers) -> "RequestTrace | None":
        """A request's trace, continuing the caller's `traceparent`; None when not sampled."""
        now = time.perf_counter()
        off = time.time_ns() - int(now * 1e9)  # perf_counter -> wall clock, once per request
        ctx = self._propagator.extract(headers) if headers is not None else None
        name, attrs = _NAMES.get(protocol, ("infer", {}))
        span = self.tracer.start_span(name, ctx, kind=self._server, attributes=attrs,
                                      start_time=int(now * 1e9) + off)
        if not span.is_recording():
            return None
        span.set_attribute("splitserve.model", model)
        return RequestTrace(self, span, now, model, off)

    def shutdown(self) -> None:
        """Export what is buffered, then stop (blocking: call from a thread)."""
        self.provider.shutdown()


class RequestTrace:
    """One sampled request: its span, the children made from the path's own timings."""

    __slots__ = ("_t", "span", "t0", "submitted", "model", "_off")

    def __init__(self, tracing: Tracing, span, t0: float, model: str, off: int):
        self._t = tracing
        self.span = span
        self.model = model
        self._off = off  # one offset for every time of the request: its spans nest exactly
        self.t0 = t0  # perf_counter at the start
        self.submitted = 0.0  # perf_counter when handed to the runner

    def _ns(self, perf: float) -> int:
        """A perf_counter instant on the wall clock, in ns (the SDK's span times)."""
        return int(perf * 1e9) + self._off

    def _child(self, name: str, start: float, end: float, attrs=None, parent=None) -> object:
        ctx = self._t._api.set_span_in_context(parent if parent is not None else self.span)
        s = self._t.tracer.start_span(name, ctx, attributes=attrs, start_time=self._ns(start))
        s.end(end_time=self._ns(end))
        return s

    def routed(self, how: str, version: int, arm: str | None, now: float) -> None:
        attrs = {"splitserve.route": how, "splitserve.version": version}
        if arm is not None:
            attrs["splitserve.arm"] = arm
        self.span.set_attributes(attrs)
        self._child("route", self.t0, now, attrs)

    def ran(self, queue_s: float, compute_s: float, batch_size: int, batched: bool, now: float) -> None:
        """queue -> (batch ->) forward, from the runner's timings; `now`: back on the loop."""
        start = self.submitted + queue_s
        self.span.set_attribute("splitserve.batch_size", batch_size)
        self._child("queue", self.submitted, start)
        parent = None
        if batched:
            parent = self._child("batch", start, now, {"splitserve.batch_size": batch_size})
        self._child("forward", start, min(now, start + compute_s), parent=parent)

    def shadow_sent(self, version: int) -> None:
        self.span.add_event("shadow_copy", {"splitserve.shadow_version": version})

    def shadow_done(self, version: int, code: str, start: float, end: float, batch_size: int) -> None:
        """A shadow copy's own span (it ends after the answer left), with the version that
        served it as an event."""
        ctx = self._t._api.set_span_in_context(self.span)
        s = self._t.tracer.start_span("shadow", ctx, start_time=self._ns(start), attributes={
            "splitserve.model": self.model,
            "splitserve.version": version, "splitserve.route": "shadow",
            "splitserve.code": code, "splitserve.batch_size": batch_size})
        s.add_event("served", {"splitserve.version": version}, timestamp=self._ns(end))
        if code in _FAULTS:
            s.set_status(self._t._error)
        s.end(end_time=self._ns(end))

    def end(self, code: str, version: int | None, request_id: str | None) -> None:
        attrs = {"splitserve.code": code}
        if version is not None:
            attrs["splitserve.version"] = version
        if request_id is not None:
            attrs["splitserve.request_id"] = request_id
        self.span.set_attributes(attrs)
        if code in _FAULTS:
            self.span.set_status(self._t._error)
        self.span.end(end_time=self._ns(time.perf_counter()))
