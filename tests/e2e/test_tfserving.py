"""TF Serving REST API on a live server: predict (row, columnar; latest, versions, labels),
model status (including a failed load), metadata, and the error statuses."""

import httpx
import numpy as np
import pytest
import torch

from conftest import MLP_YAML, expected_output
from runtime.types import VersionState

ALL = {"mlp": MLP_YAML.replace("{latest: 1}", "all")}


@pytest.fixture
def x():
    return np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)


def expect(version: int, x: np.ndarray) -> np.ndarray:
    return expected_output(version, torch.from_numpy(x)).numpy()


@pytest.fixture
def two(make_repo, serve, tmp_path):
    """mlp versions 1 and 2 both loaded, labels stable -> 1 and canary -> 2."""
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("models:\n  mlp:\n    labels: {stable: 1, canary: 2}\n")
    srv = serve(make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml=ALL), config=cfg)
    assert srv.available("mlp") == [1, 2]
    return srv


def test_predict_row_and_columnar_match_the_served_version(two, x):
    for body, key in (({"instances": x.tolist()}, "predictions"),
                      ({"inputs": {"input": x.tolist()}}, "outputs"),
                      ({"signature_name": "serving_default", "inputs": x.tolist()}, "outputs")):
        r = httpx.post(f"{two.http}/v1/models/mlp:predict", json=body)
        assert r.status_code == 200, r.text
        v = int(r.headers["x-model-version"])
        assert v in (1, 2) and r.headers["x-route"] and r.headers["x-request-id"]
        assert list(r.json()) == [key]
        out = np.array(r.json()[key], dtype=np.float32)
        assert out.shape == (3, 8)
        np.testing.assert_allclose(out, expect(v, x), rtol=1e-5, atol=1e-6)


def test_versions_path_pins(two, x):
    for v in (1, 2):
        r = httpx.post(f"{two.http}/v1/models/mlp/versions/{v}:predict", json={"instances": x.tolist()})
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == str(v) and r.headers["x-route"] == "pinned"
        np.testing.assert_allclose(np.array(r.json()["predictions"], np.float32), expect(v, x),
                                   rtol=1e-5, atol=1e-6)


def test_labels_path(two, x):
    for label, v in (("stable", 1), ("canary", 2)):
        r = httpx.post(f"{two.http}/v1/models/mlp/labels/{label}:predict", json={"inputs": x.tolist()})
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == str(v) and r.headers["x-route"] == "label"
        np.testing.assert_allclose(np.array(r.json()["outputs"], np.float32), expect(v, x),
                                   rtol=1e-5, atol=1e-6)
        st = httpx.get(f"{two.http}/v1/models/mlp/labels/{label}").json()
        assert [s["version"] for s in st["model_version_status"]] == [str(v)]
        md = httpx.get(f"{two.http}/v1/models/mlp/labels/{label}/metadata").json()
        assert md["model_spec"]["version"] == str(v)
    r = httpx.post(f"{two.http}/v1/models/mlp/labels/nope:predict", json={"instances": x.tolist()})
    assert r.status_code == 400 and "Unrecognized servable version label: nope" in r.json()["error"]
    assert httpx.get(f"{two.http}/v1/models/mlp/labels/nope").status_code == 400


def test_status_and_metadata(two):
    r = httpx.get(f"{two.http}/v1/models/mlp")
    assert r.status_code == 200
    ok = {"error_code": "OK", "error_message": ""}
    assert r.json() == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": ok},
        {"version": "2", "state": "AVAILABLE", "status": ok}]}
    r = httpx.get(f"{two.http}/v1/models/mlp/versions/2")
    assert r.json() == {"model_version_status": [{"version": "2", "state": "AVAILABLE", "status": ok}]}
    r = httpx.get(f"{two.http}/v1/models/mlp/versions/7")
    assert r.status_code == 404 and "Could not find version 7 of model mlp" in r.json()["error"]

    md = httpx.get(f"{two.http}/v1/models/mlp/metadata").json()
    assert md["model_spec"] == {"name": "mlp", "signature_name": "", "version": "2"}
    sd = md["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sd["method_name"] == "tensorflow/serving/predict"
    assert sd["inputs"] == {"input": {"dtype": "DT_FLOAT", "name": "input", "tensor_shape": {
        "dim": [{"size": "-1", "name": ""}, {"size": "64", "name": ""}], "unknown_rank": False}}}
    assert sd["outputs"]["output"]["tensor_shape"]["dim"][1] == {"size": "8", "name": ""}
    md1 = httpx.get(f"{two.http}/v1/models/mlp/versions/1/metadata").json()
    assert md1["model_spec"]["version"] == "1"


def test_failed_load_shows_in_status_with_its_reason(make_repo, serve, tmp_path, x):
    repo = make_repo({"mlp": {1: "st1"}}, yaml=ALL)
    srv = serve(repo)
    # A whole file (its header length fits) whose header is garbage, published by rename.
    junk = b"{not json, not a tensor header}"
    staged = tmp_path / "v3"
    staged.mkdir()
    (staged / "model.safetensors").write_bytes(len(junk).to_bytes(8, "little") + junk)
    staged.rename(repo / "mlp" / "3")
    assert srv.wait_state("mlp", 3, VersionState.FAILED)
    r = httpx.get(f"{srv.http}/v1/models/mlp/versions/3")
    assert r.status_code == 200
    (st,) = r.json()["model_version_status"]
    assert st["version"] == "3" and st["state"] == "END"
    assert st["status"]["error_code"] == "UNKNOWN" and st["status"]["error_message"]
    reason = srv.core.manager.models["mlp"].statuses()[-1].error
    assert st["status"]["error_message"] == reason
    r = httpx.get(f"{srv.http}/v1/models/mlp")
    assert [(s["version"], s["state"]) for s in r.json()["model_version_status"]] == [("1", "AVAILABLE"), ("3", "END")]
    r = httpx.get(f"{srv.http}/v1/models/mlp/versions/3/metadata")
    assert r.status_code == 404 and "FAILED" in r.json()["error"]
    # what was serving keeps serving
    r = httpx.post(f"{srv.http}/v1/models/mlp:predict", json={"instances": x.tolist()})
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    r = httpx.post(f"{srv.http}/v1/models/mlp/versions/3:predict", json={"instances": x.tolist()})
    assert r.status_code == 503 and "FAILED" in r.json()["error"]


def test_errors(make_repo, serve, x):
    srv = serve(make_repo({"mlp": {1: "st1"}}), max_body_bytes=1024)
    h = srv.http
    small = {"instances": [[0.5] * 64]}
    assert httpx.post(f"{h}/v1/models/mlp:predict", json=small).status_code == 200
    cases = [
        (httpx.post(f"{h}/v1/models/nope:predict", json=small), 404, "unknown model 'nope'"),
        (httpx.get(f"{h}/v1/models/nope"), 404, "nope"),
        (httpx.get(f"{h}/v1/models/nope/metadata"), 404, "nope"),
        (httpx.post(f"{h}/v1/models/mlp/versions/abc:predict", json=small), 400, "version must be"),
        (httpx.get(f"{h}/v1/models/mlp/versions/x1"), 400, "version must be"),
        (httpx.post(f"{h}/v1/models/mlp:predict", content=b"instances = [1, 2]"), 400, "JSON Parse error"),
        (httpx.post(f"{h}/v1/models/mlp:predict", content=b"{}"), 400, "Missing 'inputs' or 'instances'"),
        (httpx.post(f"{h}/v1/models/mlp:predict", json={"instances": x.tolist()}), 413, "limit of 1024"),
        (httpx.post(f"{h}/v1/models/mlp:classify", json={"examples": [{"x": 1}]}), 400, "predict only"),
        (httpx.post(f"{h}/v1/models/mlp:regress", json={"examples": [{"x": 1}]}), 400, "predict only"),
        (httpx.post(f"{h}/v1/models/mlp:explain", json=small), 400, "Malformed request"),
        (httpx.get(f"{h}/v1/models/mlp:predict"), 400, "Malformed request"),
        (httpx.post(f"{h}/v1/models/mlp:predict", json={"instances": [[0.5] * 63]}), 400, "shape"),
        (httpx.post(f"{h}/v1/models/mlp:predict", json={"instances": [["a"] * 64]}), 400, "DT_FLOAT"),
        (httpx.post(f"{h}/v1/models/mlp:predict", json={"instances": [{"b64": "aGk="}]}), 400, "b64"),
    ]
    for r, code, words in cases:
        assert r.status_code == code, (r.request.url, r.text)
        assert words in r.json()["error"], (r.request.url, r.text)
    r = httpx.post(f"{h}/v1/models/mlp/versions/2:predict", json=small)  # not in the repo
    assert r.status_code == 404 and "x-request-id" in r.headers


def test_routes_leave_other_v1_endpoints_alone():
    """Other /v1/models/{m}/... routes (routing, metrics) are not shadowed by ours."""
    import asyncio
    from types import SimpleNamespace

    from fastapi import FastAPI

    from runtime.server.rest import tfs as rest_tfs
    from runtime.config.settings import Settings

    app = FastAPI()
    app.include_router(rest_tfs.build(SimpleNamespace(settings=Settings())))
    app.add_api_route("/v1/models/{m}/routing", lambda m: {"routing": m}, methods=["GET", "PUT"])
    app.add_api_route("/v1/models/{m}/metrics", lambda m: {"metrics": m}, methods=["GET"])
    app.add_api_route("/v1/models/{m}/load", lambda m: {"load": m}, methods=["POST"])

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return [(await c.request(method, f"/v1/models/mlp/{what}")).json()
                    for method, what in (("GET", "routing"), ("PUT", "routing"), ("GET", "metrics"),
                                         ("POST", "load"))]

    assert asyncio.run(calls()) == [{"routing": "mlp"}, {"routing": "mlp"}, {"metrics": "mlp"},
                                    {"load": "mlp"}]
