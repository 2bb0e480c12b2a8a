"""OpenAPI schemas of the REST bodies the handlers read and write by hand.

The handlers take raw requests (the hot path skips FastAPI's body parsing and the
decoders say what is wrong in our words), so FastAPI cannot infer these: they are written
here once, added to /openapi.json as components, and referenced per route. A test
validates real answers against them (tests/ship/test_openapi.py); they describe, the
codecs decide.
"""

from __future__ import annotations

from typing import Any

from runtime import dtypes

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NUM = {"type": "number"}
_OBJ = {"type": "object"}


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


_TENSOR = {"name": {**_STR, "minLength": 1}, "datatype": {"enum": [*dtypes.SUPPORTED, "BYTES"]},
           "shape": {"type": "array", "items": {**_INT, "minimum": 0}},
           "parameters": {**_OBJ, "properties": {"binary_data_size": {**_INT, "minimum": 0}}},
           "data": {"type": "array", "description": "row-major values (flat or nested); absent "
                    "when the tensor travels as binary (parameters.binary_data_size)"}}
_STICKY = {"oneOf": [{**_OBJ, "required": ["header"], "properties": {"header": _STR}},
                     {**_OBJ, "required": ["parameter"], "properties": {"parameter": _STR}}]}
_SHADOW = {**_OBJ, "required": ["target", "percent"],
           "properties": {"target": {"type": ["string", "integer"]},
                          "percent": {**_NUM, "minimum": 0, "maximum": 100}}}
_ROUTING = {
    "labels": {**_OBJ, "additionalProperties": {**_INT, "minimum": 1},
               "description": "label -> version"},
    "weights": {**_OBJ, "additionalProperties": {**_NUM, "minimum": 0},
                "description": "label or version -> weight (relative)"},
    "sticky": _STICKY, "shadow": _SHADOW,
    "experiment": {**_OBJ, "description": "the experiment block (README, Run an experiment)",
                   "properties": {"control": {"type": ["string", "integer"]},
                                  "candidate": {"type": ["string", "integer"]},
                                  "steps": {"type": "array", "items": _NUM},
                                  "interval_s": _NUM, "min_requests": _INT, "min_duration_s": _NUM,
                                  "guardrails": _OBJ, "outcomes": {"type": "array", "items": _OBJ},
                                  "alpha": _NUM, "promote": {"enum": ["auto", "manual"]}}},
}
_ARM = {**_OBJ, "properties": {"ref": {"type": ["string", "integer"]}, "version": _nullable(_INT),
                               "requests": _INT, "errors": _INT, "units": _INT}}

COMPONENTS: dict[str, Any] = {
    "Error": {**_OBJ, "required": ["error"], "properties": {"error": {
        **_STR, "description": "one line saying what was wrong"}}},
    "InferRequest": {**_OBJ, "required": ["inputs"], "properties": {
        "id": _STR,
        "parameters": {**_OBJ, "properties": {
            "binary_data_output": {"type": "boolean"},
            "label": {**_STR, "minLength": 1, "description": "route to this label's version "
                      "(splitserve's; a sticky parameter may also be named here)"}}},
        "inputs": {"type": "array", "minItems": 1,
                   "items": {**_OBJ, "required": ["name", "datatype", "shape"], "properties": _TENSOR}},
        "outputs": {"type": "array", "items": {**_OBJ, "required": ["name"], "properties": {
            "name": _STR, "parameters": {**_OBJ, "properties": {"binary_data": {"type": "boolean"}}}}}},
    }},
    "InferResponse": {**_OBJ, "required": ["model_name", "model_version", "outputs"], "properties": {
        "model_name": _STR, "model_version": _STR, "id": _STR, "parameters": _OBJ,
        "outputs": {"type": "array", "items": {**_OBJ, "required": ["name", "datatype", "shape"],
                                               "properties": _TENSOR}}}},
    "TFServingPredictRequest": {**_OBJ, "properties": {
        "signature_name": _STR,
        "instances": {"type": "array", "description": "row format"},
        "inputs": {"description": "columnar format: a tensor or name -> tensor"}}},
    "TFServingPredictResponse": {**_OBJ, "properties": {"predictions": {}, "outputs": {}},
                                 "minProperties": 1},
    "Routing": {**_OBJ, "properties": _ROUTING},
    "RoutingState": {**_OBJ, "required": ["model", "effective"], "properties": {
        "model": _STR, **{k: _nullable(v) for k, v in _ROUTING.items()},
        "effective": {**_OBJ, "required": ["available", "weights", "labels"], "properties": {
            "available": {"type": "array", "items": _INT},
            "weights": {**_OBJ, "additionalProperties": _NUM, "description": "version -> share"},
            "labels": {**_OBJ, "additionalProperties": _INT},
            "pending_labels": {**_OBJ, "additionalProperties": _INT},
            "unavailable": {"type": "array", "items": _INT},
            "missing": {"type": "array", "items": _INT},
            "shadow": _nullable(_OBJ), "note": _STR}},
        "note": _STR}},
    "Experiment": {**_OBJ, "required": ["state"], "properties": {
        "state": {"enum": ["running", "holding", "paused", "rolled_back", "promoted", "none"]},
        "step": _nullable(_INT), "steps": {"type": "array", "items": _NUM},
        "candidate_weight": _nullable(_NUM), "control": _nullable(_ARM), "candidate": _nullable(_ARM),
        "guardrails": _nullable(_OBJ), "outcomes": {"type": "array", "items": _OBJ},
        "srm": _nullable(_OBJ),
        "decisions": {"type": "array", "items": {**_OBJ, "required": ["action", "reason"],
                                                 "properties": {"action": _STR, "reason": _STR,
                                                                "time": _NUM, "by": _STR}}}}},
    "Feedback": {**_OBJ, "required": ["items"], "properties": {"items": {"type": "array", "items": {
        **_OBJ, "required": ["request_id", "metric", "value"],
        "properties": {"request_id": {**_STR, "description": "the answer's x-request-id"},
                       "metric": _STR, "value": {"type": ["number", "boolean"]}}}}}},
    "FeedbackResult": {**_OBJ, "required": ["matched", "unknown", "duplicate"],
                       "properties": {"matched": _INT, "unknown": _INT, "duplicate": _INT}},
}

_WHY = {400: "the request is wrong (the message says how)", 401: "a token is required",
        404: "no such model, version or label", 409: "routing is managed elsewhere (read-only)",
        413: "the body is over the configured limit", 429: "at the in-flight limit; retry",
        503: "not available (loading, or nothing AVAILABLE to route to)"}


def body(name: str) -> dict:
    """openapi_extra for a route whose JSON body is the component `name`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref(name)}}}}


def answers(name: str, *errors: int) -> dict:
    """`responses=` for a route answering the component `name`, or an Error."""
    out: dict[int | str, dict] = {200: {"description": "OK", "content": {"application/json": {"schema": ref(name)}}}}
    for code in errors:
        out[code] = {"description": _WHY[code], "content": {"application/json": {"schema": ref("Error")}}}
    return out


def install(app) -> None:
    """Add COMPONENTS to the app's /openapi.json (built once, on first request)."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            doc = base()
            # FastAPI lists a 422 for path parameters; app.py answers those as a 400 Error
            for ops in doc.get("paths", {}).values():
                for op in ops.values():
                    if op.get("responses", {}).pop("422", None) is not None:
                        op["responses"].setdefault("400", {"description": _WHY[400], "content": {
                            "application/json": {"schema": ref("Error")}}})
            schemas = doc.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            schemas.update(COMPONENTS)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi
