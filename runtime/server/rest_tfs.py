"""TF Serving REST API (/v1/models/...): predict, model status, model metadata.
Thin: decode, call the core, encode.

Routes are specific on purpose: the predict verbs sit behind a literal ':' in the path,
so nothing here shadows other /v1/models/{m}/... endpoints (routing, metrics).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from runtime import errors
from runtime.core import Core
from runtime.errors import ServingError
from runtime.inference import new_request_id
from runtime.manager import ModelEntry
from runtime.protocol import tfserving_rest as tfs
from runtime.server.http import error_response, json_response, parse_version, read_body
from runtime.types import Signature

_OTHER_VERBS = ("classify", "regress")


def build(core: Core) -> APIRouter:
    r = APIRouter()
    limits = core.settings.limits

    def check_label(model: str, label: str) -> None:
        if label not in core.router.get_config(model).labels:
            names = ", ".join(core.router.get_config(model).labels) or "none defined"
            raise errors.invalid(f"Unrecognized servable version label: {label} "
                                 f"(model '{model}' has labels: {names})")

    def label_version(model: str, label: str) -> int:
        """The version a label serves now (or, while it moves, the one it points at)."""
        check_label(model, label)
        v = core.router.table(model).labels.get(label)
        return v if v is not None else core.router.get_config(model).labels[label]

    def pick_version(entry: ModelEntry, version: str | None, label: str | None) -> int | None:
        if version is not None:
            return parse_version(version)
        if label is not None:
            return label_version(entry.name, label)
        return None

    def signature_for(entry: ModelEntry, v: int | None) -> Signature | None:
        """The signature that types the JSON: that version's, else the newest serving one's,
        else the declared one (the core then reports why the version cannot serve)."""
        if v in entry.serving:
            return entry.serving[v].loaded.signature
        if entry.serving:
            return entry.serving[max(entry.serving)].loaded.signature
        return entry.spec.declared_signature() if entry.spec else None

    def malformed(request: Request) -> ServingError:
        return errors.invalid(f"Malformed request: {request.method} {request.url.path}")

    # ---- predict -------------------------------------------------------------------
    async def predict(request: Request, model: str, method: str, version: str | None = None,
                      label: str | None = None) -> Response:
        rid = None
        try:
            method = method.lower()
            if method in _OTHER_VERBS:
                raise errors.invalid(f":{method} is not supported: splitserve serves predict only "
                                     f"(POST .../{model}:predict)")
            if method != "predict":
                raise malformed(request)
            v = parse_version(version) if version is not None else None
            body = await read_body(request, limits.max_body_bytes, limits.request_timeout_s)
            doc = tfs.parse_request(body)  # malformed JSON is a 400 before any lookup
            entry = core.manager.entry(model)
            if label is not None:
                check_label(model, label)
                sig = signature_for(entry, core.router.table(model).labels.get(label))
            else:
                sig = signature_for(entry, v)
            req, fmt = tfs.decode_predict(doc, model, sig.inputs if sig else (),
                                          limits.max_elements, version=v, label=label)
            rid = req.id = new_request_id()
            # TF Serving bodies have no 'parameters': top-level keys stand in for them.
            req.routing_key = core.router.sticky_key(model, request.headers, doc)
            resp = await core.inference.infer(req)
            out = tfs.encode_predict(resp, fmt)
        except ServingError as e:
            return error_response(e, {"x-request-id": rid} if rid else None)
        return Response(out, media_type="application/json",
                        headers={"x-model-version": str(resp.version), "x-route": resp.route,
                                 "x-request-id": resp.id})

    @r.post("/v1/models/{model}:{method}")
    async def predict_latest(request: Request, model: str, method: str):
        return await predict(request, model, method)

    @r.post("/v1/models/{model}/versions/{version}:{method}")
    async def predict_version(request: Request, model: str, version: str, method: str):
        return await predict(request, model, method, version=version)

    @r.post("/v1/models/{model}/labels/{label}:{method}")
    async def predict_label(request: Request, model: str, label: str, method: str):
        return await predict(request, model, method, label=label)

    # ---- model status --------------------------------------------------------------
    async def status(request: Request, model: str, version: str | None = None,
                     label: str | None = None) -> Response:
        try:
            if ":" in model:
                raise errors.invalid(f"Malformed request: GET {request.url.path} "
                                     f"(:predict takes POST)")
            entry = core.manager.entry(model)
            v = pick_version(entry, version, label)
            statuses = entry.statuses()
            if v is not None:
                statuses = [s for s in statuses if s.version == v]
                if not statuses:
                    raise errors.not_found(f"Could not find version {v} of model {model}")
            elif not statuses:
                raise errors.not_found(f"Could not find any versions of model {model}")
            return json_response(tfs.model_status(statuses))
        except ServingError as e:
            return error_response(e)

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
        try:
            entry = core.manager.entry(model)
            v = pick_version(entry, version, label)
            if v is None:
                if not entry.serving:
                    raise errors.not_found(f"Servable not found for request: Latest({model}): "
                                           f"no version is AVAILABLE")
                v = max(entry.serving)
            h = entry.serving.get(v)
            if h is None:
                st = {s.version: s for s in entry.statuses()}.get(v)
                why = f"; it is {st.state.value}" + (f": {st.error}" if st.error else "") if st else ""
                raise errors.not_found(f"Servable not found for request: Specific({model}, {v}){why}")
            return json_response(tfs.model_metadata(model, v, h.loaded.signature))
        except ServingError as e:
            return error_response(e)

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
