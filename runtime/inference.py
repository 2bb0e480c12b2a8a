"""InferenceService: THE data path behind every protocol.

Protocol adapters decode their wire format into an `InferRequest` and call `infer`;
everything else happens here, once: route, pin the version (no await between pick and
acquire, so the picked version cannot unload in between), validate against the served
version's signature, run, record metrics by the version that served, shadow a copy.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

import numpy as np

from router import Router, RoutingError
from runtime import dtypes, errors
from runtime.errors import Code, ServingError
from runtime.manager import Harness, Manager
from runtime.settings import LimitSettings
from runtime.types import InferRequest, InferResponse, Signature, Tensor

log = logging.getLogger("splitserve.inference")

_ROUTE_ERR = {"not_found": Code.NOT_FOUND, "unavailable": Code.UNAVAILABLE,
              "invalid": Code.INVALID_ARGUMENT}


_ids = random.Random()  # request ids need uniqueness, not secrecy: no syscall per request


def new_request_id() -> str:
    return f"{_ids.getrandbits(64):016x}"


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


class InferenceService:
    """Route -> acquire -> validate -> run -> record -> shadow. Runs on the event loop."""

    def __init__(self, manager: Manager, router: Router, limits: LimitSettings,
                 metrics=None, shadow_max_inflight: int = 64):
        self.manager = manager
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

    async def infer(self, req: InferRequest) -> InferResponse:
        t0 = time.perf_counter()
        if req.id is None:
            req.id = new_request_id()
        if self.inflight >= self.limits.max_inflight:
            self._record_error(req, None, "rejected", Code.RESOURCE_EXHAUSTED, t0)
            raise ServingError(Code.RESOURCE_EXHAUSTED,
                               f"server is at its limit of {self.limits.max_inflight} requests in flight")
        try:
            decision = self.router.pick(req.model, version=req.version, label=req.label,
                                        key=req.routing_key)
        except RoutingError as e:
            code = _ROUTE_ERR.get(e.kind, Code.INVALID_ARGUMENT)
            if req.model not in self.manager.models:  # the router knows routes, not models
                code, e = Code.NOT_FOUND, RoutingError("not_found", f"unknown model '{req.model}'")
            self._record_error(req, None, "unrouted", code, t0)
            raise ServingError(code, e.message) from None
        try:
            h = self.manager.acquire(req.model, decision.version)
        except ServingError as e:
            self._record_error(req, None, decision.how, e.code, t0)
            raise
        self.inflight += 1
        task = asyncio.current_task()
        self._running.add(task)
        try:
            resp, timing = await self._run(h, req, decision.how)
        except asyncio.CancelledError:
            if not self.aborting:
                raise
            task.uncancel()
            self._record_error(req, h.version, decision.how, Code.UNAVAILABLE, t0)
            raise ServingError(Code.UNAVAILABLE, "server is shutting down: the request did not "
                               "finish within the drain timeout") from None
        except ServingError as e:
            self._record_error(req, h.version, decision.how, e.code, t0)
            raise
        finally:
            self.inflight -= 1
            self._running.discard(task)
            h.release_handle()
        if self.metrics is not None:
            self.metrics.record_request(req.model, h.version, decision.how, req.protocol, "OK",
                                        time.perf_counter() - t0, *timing)
        if decision.shadow is not None and decision.shadow != h.version:
            self._shadow(req, decision.shadow, resp)
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

    async def _run(self, h: Harness, req: InferRequest, how: str):
        sig = h.loaded.signature
        arrays, batch = validate(req.model, h.version, sig, req, self.limits.max_elements)
        inputs = [dtypes.to_torch(t.data, t.datatype) for t in arrays]
        t_run = time.perf_counter()
        try:
            async with asyncio.timeout(self.limits.request_timeout_s):
                outs = await h.run(inputs)
        except TimeoutError:
            raise ServingError(Code.DEADLINE_EXCEEDED, f"inference did not finish within "
                               f"{self.limits.request_timeout_s:g}s") from None
        except ServingError:
            raise
        except Exception as e:  # the model raised: the request fails, the server does not
            log.error("event=forward_error servable=%s request_id=%s error=%r", h.sid, req.id, e)
            raise ServingError(Code.INTERNAL, f"model '{req.model}' version {h.version} "
                               f"raised {type(e).__name__}: {e}") from None
        compute = time.perf_counter() - t_run
        tensors = []
        for i, o in enumerate(outs):
            name = sig.outputs[i].name if i < len(sig.outputs) else f"output{i}"
            if req.outputs is not None and name not in req.outputs:
                continue
            arr, dt = dtypes.to_numpy(o)
            tensors.append(Tensor(name, dt, tuple(arr.shape), arr))
        queue = getattr(outs, "queue_s", 0.0)
        return (InferResponse(req.model, h.version, tensors, req.id, how),
                (queue, compute - queue, batch))

    def _record_error(self, req: InferRequest, version, how: str, code: Code, t0: float) -> None:
        if code in (Code.INTERNAL, Code.DEADLINE_EXCEEDED):
            log.warning("event=request_failed model=%s version=%s request_id=%s code=%s",
                        req.model, version, req.id, code.value)
        if self.metrics is not None:
            self.metrics.record_request(req.model, version, how, req.protocol, code.value,
                                        time.perf_counter() - t0, 0.0, 0.0, 0)

    # ---- shadow traffic: bounded, never awaited by the caller ------------------------
    def _shadow(self, req: InferRequest, version: int, primary: InferResponse) -> None:
        if self.shadow_inflight >= self.shadow_max_inflight:
            self.shadow_dropped += 1
            return
        self.shadow_inflight += 1
        t = asyncio.get_running_loop().create_task(self._run_shadow(req, version, primary))
        self._shadow_tasks.add(t)
        t.add_done_callback(self._shadow_tasks.discard)

    async def _run_shadow(self, req: InferRequest, version: int, primary: InferResponse) -> None:
        t0 = time.perf_counter()
        try:
            h = self.manager.acquire(req.model, version)
        except ServingError:
            self.shadow_inflight -= 1
            return
        ok, diff, agree = True, None, None
        try:
            resp, timing = await self._run(h, req, "shadow")
            diff, agree = compare_outputs(primary, resp)
        except ServingError as e:
            ok = False
            log.info("event=shadow_error servable=%s request_id=%s error=%r", h.sid, req.id, e.message)
        finally:
            h.release_handle()
            self.shadow_inflight -= 1
        if self.metrics is not None:
            self.metrics.record_request(req.model, version, "shadow", req.protocol,
                                        "OK" if ok else "INTERNAL", time.perf_counter() - t0,
                                        *(timing if ok else (0.0, 0.0, 0)))
            self.metrics.record_shadow(req.model, primary.version, version, ok, diff, agree)


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
