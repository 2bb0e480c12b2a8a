import httpx
import numpy as np
import torch

from conftest import expected_output


def test_v2_infer_routes_and_pins(make_repo, serve):
    repo = make_repo({"mlp": {1: "st1", 2: "pt2_2"}})
    srv = serve(repo)
    assert srv.available("mlp") == [2]  # latest: 1
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [3, 64], "data": x.ravel().tolist()}]}
    r = httpx.post(f"{srv.http}/v2/models/mlp/infer", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "2"
    out = np.array(r.json()["outputs"][0]["data"], dtype=np.float32).reshape(3, 8)
    np.testing.assert_allclose(out, expected_output(2, torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-6)
    r = httpx.post(f"{srv.http}/v2/models/mlp/versions/1/infer", json=body)
    assert r.status_code == 404 and "version 1" in r.json()["error"]
