"""The real `splitserve serve` process starts and serves gRPC in this environment,
whatever protobuf the packages installed beside it made pip choose (issue 11).

.ci/run runs this file twice: in the dev venv, where the newest tritonclient pins
protobuf 6.x (and its own gRPC client talks to the server), and with the newest protobuf
(7.x) put ahead of it on PYTHONPATH, as a user who adds protobuf 7 beside it has.
"""

from __future__ import annotations

import importlib.metadata as md

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc
from serverproc import ServerProcess


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "-"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import make_example_models as mk  # tools/ is on sys.path (tests/conftest.py)

    root = tmp_path_factory.mktemp("beside")
    mk.write_model_folder(root / "repo" / "mlp")
    mk.write_safetensors(root / "repo" / "mlp" / "1", seed=1)
    srv = ServerProcess(root / "repo").wait_serving()
    print("\n  beside: " + " ".join(f"{d}={_version(d)}" for d in (
        "protobuf", "grpcio", "grpcio-health-checking", "grpcio-reflection", "tritonclient")))
    yield srv
    assert srv.stop() == 0, srv.log_text()[-3000:]


def test_grpc_health_and_infer_with_our_stubs(server):
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 64)
    with grpc.insecure_channel(server.grpc_target) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = pb_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
        req = pb.ModelInferRequest(model_name="mlp", inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 64])])
        req.raw_input_contents.append(x.tobytes())
        resp = stub.ModelInfer(req, timeout=30)
    assert resp.model_version == "1"
    assert list(resp.outputs[0].shape) == [1, 8]
    out = np.frombuffer(resp.raw_output_contents[0], np.float32)
    assert out.shape == (8,) and np.isfinite(out).all()


def test_tritonclient_grpc_and_http_talk_to_it(server):
    tgrpc = pytest.importorskip("tritonclient.grpc")
    thttp = pytest.importorskip("tritonclient.http")
    x = np.linspace(-1, 1, 128, dtype=np.float32).reshape(2, 64)
    g = tgrpc.InferenceServerClient(url=server.grpc_target)
    try:
        assert g.is_server_ready(client_timeout=30)
        assert g.get_model_metadata("mlp", as_json=True, client_timeout=30)["name"] == "mlp"
        inp = tgrpc.InferInput("input", [2, 64], "FP32")
        inp.set_data_from_numpy(x)
        via_grpc = g.infer("mlp", [inp], client_timeout=30).as_numpy("output")
    finally:
        g.close()
    h = thttp.InferenceServerClient(url=server.http_hostport)
    try:
        inp = thttp.InferInput("input", [2, 64], "FP32")
        inp.set_data_from_numpy(x)
        via_http = h.infer("mlp", [inp]).as_numpy("output")
    finally:
        h.close()
    assert via_grpc.shape == (2, 8)
    np.testing.assert_array_equal(via_grpc, via_http)
