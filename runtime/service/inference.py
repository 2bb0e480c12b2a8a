"""InferenceService: THE data path behind every protocol.

Protocol adapters decode their wire format into an `InferRequest` and call `infer`;
everything else happens here, once: the sticky key, route, pin the version (no await
between pick and acquire, so the picked version cannot unload in between), decode when
the wire format is typed by the signature, validate against the served version's
signature, run through the version's runner, record metrics by the version that served,
shadow a copy. Left to right: codec -> here -> router -> handle -> runner -> metrics.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time

import numpy as np

from router import Router, RoutingError
from runtime import dtypes, errors
from runtime.errors import Code, ServingError
from runtime.lifecycle.manager import Handle, Manager
from runtime.execution.runner import ShadowDropped
from runtime.config.settings import LimitSettings
from runtime.tracing import RequestTrace, Tracing
from runtime.types import InferRequest, InferResponse, Signature, Tensor

log = logging.getLogger("splitserve.inference")

_ROUTE_ERR = {"not_found": Code.NOT_FOUND, "unavailable": Code.UNAVAILABLE,
              "invalid": Code.INVALID_ARGUMENT}


_ids = random.Random()  # request ids need uniqueness, not secrecy: no syscall per request


def new_request_id() -> str:
    return f"{_ids.getrandbits(64):016x}"


MAX_REQUEST_ID = 128
# A caller's id is echoed in a header, written in log lines and joined on by feedback:
# bounded, and of characters that need no quoting anywhere (a mesh's UUIDs, Envoy's ids).
_safe_id = re.compile(r"[A-Za-z0-9._:-]{1,%d}" % MAX_REQUEST_ID).fullmatch


def request_id(given, headers) -> str:
    """The caller's id (the request's own `id`, else an `x-request-id` header or metadata)
    when it is safe, else a new one: an unsafe id is replaced, never refused."""
    if isinstance(given, str) and _safe_id(given):
        return given
    if headers is not None:
        h = headers.get("x-request-id")
        if isinstance(h, str) and _safe_id(h):
            return h
    return new_request_id()


def _shape_ok(spec_shape: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(spec_shape) == len(shape) and all(s == -1 or s == d for s, d in zip(spec_shape, shape))


def validate(model: str, version: int, sig: Signature, req: InferRequest, max_elements: int):
    """Inputs in signature order as numpy arrays, or INVALID_ARGUMENT naming the fault."""
    by_name = {}
    for t in req.inputs:
        if t.name in by_name:
            raise errors.invalid(f"input '{t.name}' given twice")
        by_name[t.name] = t
    expected = {s.name for s in sig.inputs}
    unknown = set(by_name) - expected
    if unknown:
        raise errors.invalid(f"unexpected input(s) {', '.join(sorted(unknown))} for model "
                             f"'{model}' version {version}; expected: {', '.join(sorted(expected))}")
    arrays = []
    batch = None
    for s in sig.inputs:
        t = by_name.get(s.name)
        if t is None:
            raise errors.invalid(f"missing input '{s.name}' for model '{model}' version "
                                 f"{version} (expects {s.datatype} {list(s.shape)})")
        if t.datatype != s.datatype:
            raise errors.invalid(f"input '{s.name}': datatype {t.datatype} does not match the "
                                 f"model's {s.datatype}")
        if not dtypes.is_supported(t.datatype):
            raise errors.invalid(f"input '{s.name}': datatype {t.datatype} cannot be fed to a "
                                 f"torch model")
        if t.data.size > max_elements:
            raise ServingError(Code.TOO_LARGE, f"input '{s.name}' has {t.data.size} "
                               f"elements, over the limit of {max_elements}")
        if not (sig.derived and s.shape == (-1,)) and not _shape_ok(s.shape, t.shape):
            raise errors.invalid(f"input '{s.name}': shape {list(t.shape)} does not match the "
                                 f"model's {list(s.shape)} (-1 = any size)")
        if sig.max_batch_size > 0 and t.shape:
            if batch is None:
                batch = t.shape[0]
            elif t.shape[0] != batch:
                raise errors.invalid(f"input '{s.name}': batch size {t.shape[0]} differs from "
                                     f"the other inputs' {batch}")
        arrays.append(t)
    if batch is not None and batch > sig.max_batch_size:
        raise errors.invalid(f"batch size {batch} exceeds max_batch_size {sig.max_batch_size} "
                             f"of model '{model}' version {version}")
    if batch == 0:
        raise errors.invalid("empty batch: the first dimension of the inputs is 0")
    if req.outputs is not None:
        names = {o.name for o in sig.outputs}
        bad = [o for o in req.outputs if o not in names]
        if bad and not sig.derived:
            raise errors.invalid(f"unknown requested output(s) {', '.join(bad)}; the model has "
                                 f"{', '.join(sorted(names))}")
    return arrays, (batch or 1)


CLIENT_CODES = frozenset({Code.INVALID_ARGUMENT, Code.TOO_LARGE, Code.NOT_FOUND,
                          Code.CLIENT_TIMEOUT})


class InferenceService:
    """Route -> acquire -> decode/validate -> run -> record -> shadow. Runs on the event loop.

    Owns the request's routing inputs: the sticky key (from headers or parameters) and
    label resolution happen here, so every protocol routes the same way. A request that
    fails before its version ran it for a client's reason (bad shape, unknown output) is
    recorded with no version: client mistakes are never charged to a version.
    """

    def __init__(self, manager: Manager, router: Router, limits: LimitSettings,
                 metrics=None, shadow_max_inflight: int = 64, on_finished=None, arm_of=None,
                 tracing: Tracing | None = None):
        self.manager = manager
        self.tracing = tracing
        self.router = router
        self.limits = limits
        self.metrics = metrics
        self.inflight = 0
        self.shadow_inflight = 0
        self.shadow_max_inflight = shadow_max_inflight
        self.shadow_dropped = 0
        self._shadow_tasks: set[asyncio.Task] = set()
        self._running: set[asyncio.Task] = set()  # requests in flight, for abort at stop
        self.aborting = False
        # (model, version, how, ok, latency_s, request_id, routing_key, route) per finished primary
        # request; route: the RouteConfig the router placed it by (a split that changes while the
        # request runs does not move it: experiments count it under the split that placed it)
        self.on_finished = on_finished
        # (model, version, how) -> "control" | "candidate" | None: a traced request's arm
        self.arm_of = arm_of

    def infer(self, req: InferRequest):
        """Serve one request (await the result). Tracing off costs this one check."""
        if self.tracing is None:
            return self._infer(req, None)
        return self._infer_traced(req)

    async def _infer_traced(self, req: InferRequest) -> InferResponse:
        tr = self.tracing.begin(req.protocol, req.model, req.headers)
        if tr is None:  # not sampled
            return await self._infer(req, None)
        try:
            resp = await self._infer(req, tr)
        except ServingError as e:
            tr.end(e.code.value, e.version, req.id)
            raise
        except BaseException as e:
            tr.end("CANCELLED" if isinstance(e, asyncio.CancelledError) else Code.INTERNAL.value,
                   None, req.id)
            raise
        tr.end("OK", resp.version, resp.id)
        return resp

    async def _infer(self, req: InferRequest, tr: RequestTrace | None) -> InferResponse:
        t0 = time.perf_counter()
        req.id = request_id(req.id, req.headers)
        if self.inflight >= self.limits.max_inflight:
            self._record(req, None, "rejected", Code.RESOURCE_EXHAUSTED.value, t0)
            raise ServingError(Code.RESOURCE_EXHAUSTED, f"server is at its limit of "
                               f"{self.limits.max_inflight} requests in flight",
                               request_id=req.id)
        if req.routing_key is None and (req.headers is not None or req.parameters):
            req.routing_key = self.router.sticky_key(req.model, req.headers or {},
                                                     req.parameters)
        try:
            decision = self.router.pick(req.model, version=req.version, label=req.label,
                                        key=req.routing_key)
        except RoutingError as e:
            code = _ROUTE_ERR.get(e.kind, Code.INVALID_ARGUMENT)
            msg = e.message
            if self.manager.view().model(req.model) is None:  # the router knows routes, not models
                unknown = self.manager.unknown(req.model)
                code, msg = unknown.code, unknown.message
            self._record(req, None, "unrouted", code.value, t0)
            raise ServingError(code, msg, request_id=req.id) from None
        route = self.router.get_config(req.model)  # the config of the table pick used (no await between)
        if tr is not None:
            tr.routed(decision.how, decision.version, self.arm_of(req.model, decision.version, decision.how)
                      if self.arm_of is not None else None, time.perf_counter())
        try:
            handle = self.manager.acquire(req.model, decision.version)
        except ServingError as e:
            self._record(req, None, decision.how, e.code.value, t0, route)
            e.request_id = req.id
            raise
        self.inflight += 1
        task = asyncio.current_task()
        self._running.add(task)
        version = handle.version
        try:
            with handle:
                inputs, batch = self._prepare(handle, req)
                if tr is not None:
                    tr.submitted = time.perf_counter()
                result = await self._run(handle, req, inputs)
                if tr is not None:
                    tr.ran(result.queue_s, result.compute_s, result.batch_size, handle.batched,
                           time.perf_counter())
        except asyncio.CancelledError:
            if not self.aborting:
                raise
            task.uncancel()
            self._record(req, version, decision.how, Code.UNAVAILABLE.value, t0, route)
            raise ServingError(Code.UNAVAILABLE, "server is shutting down: the request did not "
                               "finish within the drain timeout", version, req.id) from None
        except _ClientError as c:
            self._record(req, None, decision.how, c.error.code.value, t0, route)
            c.error.version, c.error.request_id = version, req.id
            raise c.error from None
        except ServingError as e:
            self._record(req, version, decision.how, e.code.value, t0, route)
            e.version, e.request_id = version, req.id
            raise
        finally:
            self.inflight -= 1
            self._running.discard(task)
        resp = self._response(handle, req, result, decision.how)
        latency = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.record_request(req.model, version, decision.how, req.protocol, "OK",
                                        latency, result.queue_s, result.compute_s, batch)
        if self.on_finished is not None:
            self.on_finished(req.model, version, decision.how, True, latency, req.id, req.routing_key, route)
        if decision.shadow is not None and decision.shadow != version:
            self._shadow(req, decision.shadow, resp, tr)
        return resp

    async def drain(self, timeout_s: float) -> int:
        """Wait for in-flight requests; past the timeout, fail the rest with UNAVAILABLE.
        Returns how many were cut off."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self.inflight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        left = list(self._running)
        if left:
            self.aborting = True
            for t in left:
                t.cancel()
            log.warning("event=drain_timeout cut_off=%d", len(left))
        return len(left)

    def _prepare(self, handle: Handle, req: InferRequest) -> tuple[list, int]:
        """Decode (when the protocol needs the signature) and validate against the version
        that will run it; torch tensors in signature order. Raises _ClientError."""
        sig = handle.signature
        try:
            tensors, outputs = (req.decode(sig) if req.decode is not None
                                else (req.inputs, req.outputs))
            view = InferRequest(req.model, tensors, outputs=outputs)
            arrays, batch = validate(req.model, handle.version, sig, view,
                                     self.limits.max_elements)
        except ServingError as e:
            if e.code in CLIENT_CODES:
                raise _ClientError(e) from None
            raise
        req.outputs = outputs
        return [dtypes.to_torch(t.data, t.datatype) for t in arrays], batch

    async def _run(self, handle: Handle, req: InferRequest, inputs, shadow: bool = False):
        limit = req.timeout_s or self.limits.request_timeout_s  # a job's is jobs.timeout_s
        try:
            async with asyncio.timeout(limit):
                return await (handle.run_shadow(inputs) if shadow else handle.run(inputs))
        except TimeoutError:
            raise ServingError(Code.DEADLINE_EXCEEDED, f"inference did not finish within "
                               f"{limit:g}s") from None
        except ServingError:
            raise
        except Exception as e:  # the model raised: the request fails, the server does not
            log.error("event=forward_error servable=%s request_id=%s error=%r", handle.sid,
                      req.id, e)
            raise ServingError(Code.INTERNAL, f"model '{req.model}' version {handle.version} "
                               f"raised {type(e).__name__}: {e}") from None

    @staticmethod
    def _response(handle: Handle, req: InferRequest, result, how: str) -> InferResponse:
        sig = handle.signature
        tensors = []
        for i, o in enumerate(result.outputs):
            name = sig.outputs[i].name if i < len(sig.outputs) else f"output{i}"
            if req.outputs is not None and name not in req.outputs:
                continue
            arr, dt = dtypes.to_numpy(o)
            tensors.append(Tensor(name, dt, tuple(arr.shape), arr))
        return InferResponse(req.model, handle.version, tensors, req.id, how)

    def _record(self, req: InferRequest, version, how: str, code: str, t0: float, route=None) -> None:
        if code in (Code.INTERNAL.value, Code.DEADLINE_EXCEEDED.value):
            log.warning("event=request_failed model=%s version=%s request_id=%s code=%s",
                        req.model, version, req.id, code)
        if self.metrics is not None:
            self.metrics.record_request(req.model, version, how, req.protocol, code,
                                        time.perf_counter() - t0, 0.0, 0.0, 0)
        if self.on_finished is not None and version is not None:
            self.on_finished(req.model, version, how, False, time.perf_counter() - t0, req.id, req.routing_key,
                             route)

    # ---- shadow traffic: bounded, lower priority, never awaited by the caller --------
    def _shadow(self, req: InferRequest, version: int, primary: InferResponse,
                tr: RequestTrace | None) -> None:
        if self.shadow_inflight >= self.shadow_max_inflight:
            self._shadow_drop(req.model, version)
            return
        self.shadow_inflight += 1
        if tr is not None:
            tr.shadow_sent(version)
        t = asyncio.get_running_loop().create_task(self._run_shadow(req, version, primary, tr))
        self._shadow_tasks.add(t)
        t.add_done_callback(self._shadow_tasks.discard)

    def _shadow_drop(self, model: str, version: int) -> None:
        self.shadow_dropped += 1
        if self.metrics is not None:
            self.metrics.record_shadow_dropped(model, version)

    async def _run_shadow(self, req: InferRequest, version: int, primary: InferResponse,
                          tr: RequestTrace | None = None) -> None:
        t0 = time.perf_counter()
        try:
            handle = self.manager.acquire(req.model, version)
        except ServingError:
            self.shadow_inflight -= 1
            self._shadow_drop(req.model, version)
            return
        code, diff, agree, result, batch = "OK", None, None, None, 0
        try:
            with handle:
                inputs, batch = self._prepare(handle, req)
                result = await self._run(handle, req, inputs, shadow=True)
                resp = self._response(handle, req, result, "shadow")
            diff, agree = compare_outputs(primary, resp)
        except ShadowDropped:
            self._shadow_drop(req.model, version)
            return
        except _ClientError as c:
            code = c.error.code.value
        except ServingError as e:
            code = e.code.value
            log.info("event=shadow_error servable=%s request_id=%s code=%s error=%r",
                     handle.sid, req.id, code, e.message)
        finally:
            self.shadow_inflight -= 1
        if tr is not None:
            tr.shadow_done(version, code, t0, time.perf_counter(), batch if code == "OK" else 0)
        if self.metrics is not None:
            ok = code == "OK"
            self.metrics.record_request(req.model, version, "shadow", req.protocol, code,
                                        time.perf_counter() - t0,
                                        result.queue_s if ok else 0.0,
                                        result.compute_s if ok else 0.0, batch if ok else 0)
            self.metrics.record_shadow(req.model, primary.version, version, ok, diff, agree)


class _ClientError(Exception):
    """A request refused for the client's reason before its version ran it."""

    def __init__(self, error: ServingError):
        self.error = error


def compare_outputs(a: InferResponse, b: InferResponse) -> tuple[float | None, bool | None]:
    """Max abs difference over matching outputs, and argmax agreement of the first one."""
    bm = {t.name: t for t in b.outputs}
    diff, agree = None, None
    for t in a.outputs:
        u = bm.get(t.name)
        if u is None or u.data.shape != t.data.shape or t.datatype == "BF16":
            continue
        x, y = t.data.astype(np.float64), u.data.astype(np.float64)
        d = float(np.max(np.abs(x - y))) if x.size else 0.0
        diff = d if diff is None else max(diff, d)
        if agree is None and x.ndim >= 1 and x.size:
            agree = bool(np.array_equal(np.argmax(x, axis=-1), np.argmax(y, axis=-1)))
    return diff, agree
