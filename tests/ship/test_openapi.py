"""/openapi.json describes the API: request and response schemas for the v2, TF Serving,
routing, experiment and feedback endpoints, real answers of a live server validate
against them, internal endpoints are hidden, and nothing loads from a CDN."""

from __future__ import annotations

import json

import httpx
import jsonschema
import numpy as np
import pytest

from conftest import wait_until
from ship_helpers import serve_routed

TOKEN = "openapi-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
X = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
INFER = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": X.ravel().tolist()}]}
ROUTING = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 100},
           "sticky": {"header": "x-user-id"},
           "experiment": {"control": "stable", "candidate": "canary", "steps": [50, 100],
                          "interval_s": 0.3, "min_requests": 10_000, "min_duration_s": 0,
                          "outcomes": [{"metric": "click", "kind": "binary", "goal": "increase"}]}}
DESCRIBED = {  # path -> method -> (request component or None, 200 component)
    "/v2/models/{model}/infer": {"post": ("InferRequest", "InferResponse")},
    "/v2/models/{model}/versions/{version}/infer": {"post": ("InferRequest", "InferResponse")},
    "/v1/models/{model}:{method}": {"post": ("TFServingPredictRequest", "TFServingPredictResponse")},
    "/v1/models/{model}/labels/{label}:{method}": {"post": ("TFServingPredictRequest", "TFServingPredictResponse")},
    "/v1/models/{model}/routing": {"get": (None, "RoutingState"), "put": ("Routing", "RoutingState")},
    "/v1/models/{model}/experiment": {"get": (None, "Experiment")},
    "/v1/models/{model}/experiment/{action}": {"post": (None, "Experiment")},
    "/v1/models/{model}/feedback": {"post": ("Feedback", "FeedbackResult")},
}


@pytest.fixture
def srv(make_repo, serve, tmp_path):
    return serve_routed(make_repo, serve, tmp_path, ROUTING, TOKEN)


def checker(doc: dict):
    def check(component: str, instance) -> None:
        schema = {"components": doc["components"], "$ref": f"#/components/schemas/{component}"}
        jsonschema.Draft202012Validator(schema).validate(instance)
    return check


def test_the_schema_describes_bodies_and_hides_internals(srv):
    doc = httpx.get(f"{srv.http}/openapi.json", timeout=30).json()
    for name, schema in doc["components"]["schemas"].items():
        jsonschema.Draft202012Validator.check_schema(schema)
    assert "/v1/experiments/peers" not in doc["paths"]
    assert not [p for p in doc["paths"] if p.startswith("/ui")]
    for path, methods in DESCRIBED.items():
        for method, (request, answer) in methods.items():
            op = doc["paths"][path][method]
            got = op["responses"]["200"]["content"]["application/json"]["schema"]
            assert got == {"$ref": f"#/components/schemas/{answer}"}, (path, method)
            if request:
                body = op["requestBody"]["content"]["application/json"]["schema"]
                assert body == {"$ref": f"#/components/schemas/{request}"}, (path, method)
            errors = [c for c in op["responses"] if c != "200"]
            assert errors and all(op["responses"][c]["content"]["application/json"]["schema"]
                                  == {"$ref": "#/components/schemas/Error"} for c in errors)
    # Swagger UI and ReDoc would load from a CDN: off, and the 404 is our one-line error
    for page in ("/docs", "/redoc"):
        r = httpx.get(f"{srv.http}{page}", timeout=30)
        assert r.status_code == 404 and r.json() == {"error": f"no such endpoint: GET {page}"}


def test_live_answers_validate_against_the_schema(srv):
    doc = httpx.get(f"{srv.http}/openapi.json", timeout=30).json()
    check = checker(doc)
    http = httpx.Client(base_url=srv.http, timeout=30)
    check("InferRequest", INFER)
    r = http.post("/v2/models/mlp/infer", json=INFER, headers={"x-user-id": "u1"})
    assert r.status_code == 200 and check("InferResponse", r.json()) is None
    r = http.post("/v2/models/mlp/versions/2/infer", json={**INFER, "id": "q1"})
    assert r.status_code == 200 and check("InferResponse", r.json()) is None
    r = http.post("/v1/models/mlp:predict", json={"instances": X.tolist()})
    assert r.status_code == 200 and check("TFServingPredictResponse", r.json()) is None
    r = http.post("/v1/models/mlp/labels/canary:predict", json={"inputs": {"input": X.tolist()}})
    assert r.status_code == 200 and check("TFServingPredictResponse", r.json()) is None

    check("Routing", ROUTING)
    r = http.get("/v1/models/mlp/routing")
    assert r.status_code == 200 and check("RoutingState", r.json()) is None
    r = http.put("/v1/models/mlp/routing", json=ROUTING, headers=AUTH)
    assert r.status_code == 200 and check("RoutingState", r.json()) is None

    assert wait_until(lambda: http.get("/v1/models/mlp/experiment").json()["decisions"], 30)
    r = http.get("/v1/models/mlp/experiment")
    assert r.status_code == 200 and check("Experiment", r.json()) is None
    rid = http.post("/v2/models/mlp/infer", json=INFER).headers["x-request-id"]
    fb = {"items": [{"request_id": rid, "metric": "click", "value": 1}]}
    check("Feedback", fb)
    r = http.post("/v1/models/mlp/feedback", json=fb, headers=AUTH)
    assert r.status_code == 200 and check("FeedbackResult", r.json()) is None
    r = http.post("/v1/models/mlp/experiment/pause", headers=AUTH)
    assert r.status_code == 200 and check("Experiment", r.json()) is None

    for bad in (http.post("/v2/models/nope/infer", json=INFER),
                http.post("/v2/models/mlp/infer", json={"inputs": []}),
                http.put("/v1/models/mlp/routing", json=ROUTING)):  # no token
        assert bad.status_code in (400, 401, 404) and check("Error", bad.json()) is None
    # the schema would catch a wrong answer
    with pytest.raises(jsonschema.ValidationError):
        check("InferResponse", {"model_name": "mlp", "outputs": []})
