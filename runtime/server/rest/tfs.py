"""TF Serving REST API (/v1/models/...): predict, model status, model metadata.
Thin: decode, call the core, encode. TF Serving's JSON is typed by the model's signature,
so predict hands the core a `decode` step: the core routes and pins a version first, then
decodes against that version's signature (a canary that renamed an input still works).

Routes are specific on purpose: the predict verbs sit behind a literal ':' in the path,
so nothing here shadows other /v1/models/{m}/... endpoints (routing, metrics).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from runtime import errors
from runtime.service.core import Core
from runtime.errors import ServingError
from runtime.protocol import tfserving_rest as tfs
from runtime.server.http import json_response, parse_version, read_body
from runtime.server.rest.schemas import answers, body
from runtime.types import InferRequest

_OTHER_VERBS = ("classify", "regress")


def build(core: Core) -> APIRouter:
    r = APIRouter()
    limits = core.settings.limits

    def check_label(model: str, label: str) -> None:
        """TF Serving's own wording for a label the model does not define (400)."""
        if label not in core.router.get_config(model).labels:
            names = ", ".join(core.router.get_config(model).labels) or "none defined"
            raise errors.invalid(f"Unrecognized servable version label: {label} "
                                 f"(model '{model}' has labels: {names})")

    def pick_version(model: str, version: str | None, label: str | None) -> int | None:
        """For status and metadata reads: the version named, or the one a label serves."""
        if version is not None:
            return parse_version(version)
        if label is not None:
            check_label(model, label)
            v = core.router.table(model).labels.get(label)
            return v if v is not None else core.router.get_config(model).labels[label]
        return None

    def malformed(request: Request) -> ServingError:
        return errors.invalid(f"Malformed request: {request.method} {request.url.path}")

    # ---- predict -------------------------------------------------------------------
    async def predict(request: Request, model: str, method: str, version: str | None = None,
                      label: str | None = None) -> Response:
        method = method.lower()
        if method in _OTHER_VERBS:
            raise errors.invalid(f":{method} is not supported: splitserve serves predict only "
                                 f"(POST .../{model}:predict)")
        if method != "predict":
            raise malformed(request)
        v = parse_version(version) if version is not None else None
        body = await read_body(request, limits.max_body_bytes, limits.request_timeout_s)
        doc = tfs.parse_request(body)  # malformed JSON is a 400 before any lookup
        fmt = tfs.predict_format(doc)
        core.manager.require(model)
        if label is not None:
            check_label(model, label)
        # Route and pin first; the JSON is typed by the signature of the version that runs it.
        req = InferRequest(model=model, inputs=[], version=v, label=label, protocol="rest_tfs",
                           headers=request.headers, parameters=doc,  # top-level keys stand in
                           decode=lambda sig: (tfs.decode_inputs(doc, model, sig.inputs,
                                                                 limits.max_elements), None))
        resp = await core.inference.infer(req)
        return Response(tfs.encode_predict(resp, fmt), media_type="application/json",
                        headers={"x-model-version": str(resp.version), "x-route": resp.route,
                                 "x-request-id": resp.id})

    PREDICT = {"openapi_extra": body("TFServingPredictRequest"),
               "responses": answers("TFServingPredictResponse", 400, 404, 503)}

    @r.post("/v1/models/{model}:{method}", **PREDICT)
    async def predict_latest(request: Request, model: str, method: str):
        return await predict(request, model, method)

    @r.post("/v1/models/{model}/versions/{version}:{method}", **PREDICT)
    async def predict_version(request: Request, model: str, version: str, method: str):
        return await predict(request, model, method, version=version)

    @r.post("/v1/models/{model}/labels/{label}:{method}", **PREDICT)
    async def predict_label(request: Request, model: str, label: str, method: str):
        return await predict(request, model, method, label=label)

    # ---- model status --------------------------------------------------------------
    async def status(request: Request, model: str, version: str | None = None,
                     label: str | None = None) -> Response:
        if ":" in model:
            raise errors.invalid(f"Malformed request: GET {request.url.path} "
                                 f"(:predict takes POST)")
        mv = core.manager.require(model)
        v = pick_version(model, version, label)
        statuses = list(mv.versions)
        if v is not None:
            statuses = [s for s in statuses if s.version == v]
            if not statuses:
                raise errors.not_found(f"Could not find version {v} of model {model}")
        elif not statuses:
            raise errors.not_found(f"Could not find any versions of model {model}"
                                   + (f" ({mv.spec_error})" if mv.spec_error else ""))
        return json_response(tfs.model_status(statuses, mv.config_error()))

    @r.get("/v1/models/{model}")
    async def status_model(request: Request, model: str):
        return await status(request, model)

    @r.get("/v1/models/{model}/versions/{version}")
    async def status_version(request: Request, model: str, version: str):
        return await status(request, model, version=version)

    @r.get("/v1/models/{model}/labels/{label}")
    async def status_label(request: Request, model: str, label: str):
        return await status(request, model, label=label)

    # ---- model metadata ------------------------------------------------------------
    async def metadata(model: str, version: str | None = None, label: str | None = None) -> Response:
        mv = core.manager.require(model)
        v = pick_version(model, version, label)
        if v is None:
            if not mv.available:
                raise errors.not_found(f"Servable not found for request: Latest({model}): "
                                       f"no version is AVAILABLE")
            v = mv.available[-1]
        sig, _ = mv.signature(v)
        if sig is None:
            st = mv.version(v)
            why = f"; it is {st.state.value}" + (f": {st.error}" if st.error else "") if st else ""
            raise errors.not_found(f"Servable not found for request: Specific({model}, {v}){why}")
        return json_response(tfs.model_metadata(model, v, sig))

    @r.get("/v1/models/{model}/metadata")
    async def metadata_model(model: str):
        return await metadata(model)

    @r.get("/v1/models/{model}/versions/{version}/metadata")
    async def metadata_version(model: str, version: str):
        return await metadata(model, version=version)

    @r.get("/v1/models/{model}/labels/{label}/metadata")
    async def metadata_label(model: str, label: str):
        return await metadata(model, label=label)

    return r
