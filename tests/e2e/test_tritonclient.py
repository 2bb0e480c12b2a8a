"""Triton's own Python clients (tritonclient.http and tritonclient.grpc) against a live
splitserve: metadata, readiness, inference (binary and JSON tensors over HTTP, raw over
gRPC), a pinned version, model config, repository index, load and unload."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from conftest import MLP_YAML, expected_output
from runtime.types import VersionState

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

MLP_ALL = MLP_YAML.replace("version_policy: {latest: 1}", "version_policy: all")


def _x(n=4, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def _expect(seed, x):
    return expected_output(seed, torch.from_numpy(x)).numpy()


TRANSPORTS = {"h2": {"grpc_transport": "h2"}, "grpc.aio": {"grpc_transport": "grpcio"}}


@pytest.fixture(params=list(TRANSPORTS))
def serve(request, serve):
    """Every test here runs against both gRPC transports (server.grpc_transport h2 and
    grpcio)."""
    return functools.partial(serve, **TRANSPORTS[request.param])


@pytest.fixture
def srv(make_repo, serve):
    s = serve(make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml={"mlp": MLP_ALL}))
    assert s.available("mlp") == [1, 2]
    return s


@pytest.fixture
def clients(srv):
    h = httpclient.InferenceServerClient(srv.http.removeprefix("http://"))
    g = grpcclient.InferenceServerClient(srv.grpc)
    yield h, g
    h.close()
    g.close()


def test_server_and_model_metadata(srv, clients):
    h, g = clients
    for c in (h, g):
        assert c.is_server_live() and c.is_server_ready()
        assert c.is_model_ready("mlp") and c.is_model_ready("mlp", "1")
        assert not c.is_model_ready("mlp", "9")
    sm = h.get_server_metadata()
    assert sm["name"] == "splitserve" and "model_repository" in sm["extensions"]
    smg = g.get_server_metadata(as_json=True)
    assert smg["name"] == "splitserve" and smg["extensions"] == sm["extensions"]
    mh = h.get_model_metadata("mlp")
    mg = g.get_model_metadata("mlp", as_json=True)
    assert mh["versions"] == mg["versions"] == ["1", "2"]
    assert mh["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    # protobuf JSON prints int64 as strings
    assert mg["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "64"]}]
    assert mh["outputs"][0]["name"] == mg["outputs"][0]["name"] == "output"
    mv = g.get_model_metadata("mlp", "1")
    assert mv.name == "mlp" and list(mv.inputs[0].shape) == [-1, 64]


def test_model_config_and_index(srv, clients):
    h, g = clients
    ch = h.get_model_config("mlp")
    cg = g.get_model_config("mlp", as_json=True)["config"]
    assert ch["max_batch_size"] == 64 and int(cg["max_batch_size"]) == 64
    assert ch["input"][0]["name"] == cg["input"][0]["name"] == "input"
    assert ch["input"][0]["data_type"] == cg["input"][0]["data_type"] == "TYPE_FP32"
    assert [int(d) for d in cg["input"][0]["dims"]] == ch["input"][0]["dims"] == [64]
    ih = h.get_model_repository_index()
    ig = g.get_model_repository_index(as_json=True)["models"]
    assert [(m["name"], m["version"], m["state"]) for m in ih] == \
        [(m["name"], m["version"], m["state"]) for m in ig] == [("mlp", "1", "READY"), ("mlp", "2", "READY")]


def test_infer_http_binary_and_json(srv, clients):
    h, _ = clients
    x = _x()
    for binary_in in (True, False):
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary_in)
        for binary_out in (True, False):
            out = httpclient.InferRequestedOutput("output", binary_data=binary_out)
            r = h.infer("mlp", [inp], outputs=[out], request_id="abc")
            np.testing.assert_allclose(r.as_numpy("output"), _expect(2, x), rtol=1e-5, atol=1e-6)
            resp = r.get_response()
            assert resp["model_version"] == "2" and resp["id"] == "abc"
            assert ("data" in resp["outputs"][0]) == (not binary_out)
    # default (binary) outputs, no outputs named, pinned version
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = h.infer("mlp", [inp], model_version="1")
    assert r.get_response()["model_version"] == "1"
    np.testing.assert_allclose(r.as_numpy("output"), _expect(1, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException, match="version 9"):
        h.infer("mlp", [inp], model_version="9")


def test_infer_grpc(srv, clients):
    _, g = clients
    x = _x(5, seed=3)
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    r = g.infer("mlp", [inp], outputs=[grpcclient.InferRequestedOutput("output")], request_id="g1")
    resp = r.get_response()
    assert resp.model_version == "2" and resp.id == "g1"
    np.testing.assert_allclose(r.as_numpy("output"), _expect(2, x), rtol=1e-5, atol=1e-6)
    r = g.infer("mlp", [inp], model_version="1")
    assert r.get_response().model_version == "1"
    np.testing.assert_allclose(r.as_numpy("output"), _expect(1, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException) as ei:
        g.infer("mlp", [inp], model_version="9")
    assert "version 9" in ei.value.message() and ei.value.status() == "StatusCode.NOT_FOUND"
    bad = grpcclient.InferInput("input", [5, 32], "FP32")
    bad.set_data_from_numpy(x[:, :32].copy())
    with pytest.raises(InferenceServerException) as ei:
        g.infer("mlp", [bad])
    assert ei.value.status() == "StatusCode.INVALID_ARGUMENT" and "shape" in ei.value.message()


def test_infer_grpc_stream(srv, clients):
    import queue

    _, g = clients
    results: queue.Queue = queue.Queue()
    g.start_stream(callback=lambda result, error: results.put((result, error)))
    xs = [_x(2, seed=i) for i in range(4)]
    for i, x in enumerate(xs):
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        g.async_stream_infer("mlp", [inp], request_id=str(i), model_version="9" if i == 2 else "")
    got = [results.get(timeout=30) for _ in xs]
    g.stop_stream()
    for i, (result, error) in enumerate(got):
        if i == 2:
            assert result is None and "version 9" in error.message()
            continue
        assert error is None and result.get_response().id == str(i)
        np.testing.assert_allclose(result.as_numpy("output"), _expect(2, xs[i]), rtol=1e-5, atol=1e-6)


def test_load_unload_through_repository_api(srv, clients):
    h, g = clients
    x = _x()
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    g.unload_model("mlp")
    assert srv.wait_state("mlp", 2, VersionState.END)
    assert not g.is_model_ready("mlp") and not h.is_model_ready("mlp")
    with pytest.raises(InferenceServerException):
        g.infer("mlp", [inp])
    states = {(m["name"], m["version"]): m["state"] for m in h.get_model_repository_index()}
    assert states.get(("mlp", "2")) != "READY"
    h.load_model("mlp")
    assert srv.wait_state("mlp", 2, VersionState.AVAILABLE)
    assert g.is_model_ready("mlp") and h.is_model_ready("mlp", "1")
    np.testing.assert_allclose(g.infer("mlp", [inp]).as_numpy("output"), _expect(2, x), rtol=1e-5, atol=1e-6)
    h.unload_model("mlp")
    assert srv.wait_state("mlp", 2, VersionState.END)
    assert not h.is_model_ready("mlp")
    g.load_model("mlp")
    assert srv.wait_state("mlp", 1, VersionState.AVAILABLE)
    hi = httpclient.InferInput("input", list(x.shape), "FP32")
    hi.set_data_from_numpy(x)
    np.testing.assert_allclose(h.infer("mlp", [hi], model_version="1").as_numpy("output"),
                               _expect(1, x), rtol=1e-5, atol=1e-6)
    for c in (h, g):
        with pytest.raises(InferenceServerException):
            c.load_model("no_such_model")


def test_statistics(srv, clients):
    h, g = clients
    x = _x()
    inp = grpcclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    for _ in range(3):
        g.infer("mlp", [inp], model_version="1")
    sg = g.get_inference_statistics("mlp", as_json=True)["model_stats"]
    s1 = next(s for s in sg if s["version"] == "1")
    assert int(s1["inference_stats"]["success"]["count"]) >= 3
    sh = h.get_inference_statistics("mlp")["model_stats"]
    assert {s["version"] for s in sh} == {s["version"] for s in sg}
