"""The gRPC front end against a live server, with raw grpc stubs from our generated code:
routing and pinning, the error table, streaming, health, reflection, management, tokens."""

from __future__ import annotations

import functools
import json

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import MLP_YAML, expected_output
from runtime.protocol import kserve_grpc as codec
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.pb import grpc_service_pb2_grpc as pb_grpc
from runtime.protocol.pb import splitserve_management_pb2 as mpb
from runtime.protocol.pb import splitserve_management_pb2_grpc as mpb_grpc
from runtime.types import VersionState

TRANSPORTS = {"h2": {"grpc_transport": "h2"}, "grpc.aio": {"grpc_transport": "grpcio"}}


@pytest.fixture(params=list(TRANSPORTS))
def serve(request, serve):
    """Every test here runs against both gRPC transports (server.grpc_transport h2 and
    grpcio)."""
    return functools.partial(serve, **TRANSPORTS[request.param])


MLP_ALL = MLP_YAML.replace("version_policy: {latest: 1}", "version_policy: all")
assert MLP_ALL != MLP_YAML


def _x(n=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 64)).astype(np.float32)


def _req(x, version="", model="mlp", **kw):
    return pb.ModelInferRequest(
        model_name=model, model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                      shape=list(x.shape))],
        raw_input_contents=[x.tobytes()], **kw)


def _out(resp):
    return codec.decode_output(resp.outputs[0], resp.raw_output_contents[0])


def _expect(seed, x):
    return expected_output(seed, torch.from_numpy(x)).numpy()


@pytest.fixture
def two_versions(make_repo, serve):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml={"mlp": MLP_ALL})
    srv = serve(repo)
    assert srv.available("mlp") == [1, 2]
    return srv


def _stub(srv):
    ch = grpc.insecure_channel(srv.grpc)
    return ch, pb_grpc.GRPCInferenceServiceStub(ch)


def test_infer_pinned_and_routed(two_versions):
    srv = two_versions
    ch, stub = _stub(srv)
    x = _x()
    for v, seed in (("1", 1), ("2", 2)):
        resp, call = stub.ModelInfer.with_call(_req(x, v, id=f"req-{v}"))
        assert resp.model_name == "mlp" and resp.model_version == v and resp.id == f"req-{v}"
        assert resp.outputs[0].datatype == "FP32" and list(resp.outputs[0].shape) == [3, 8]
        np.testing.assert_allclose(_out(resp), _expect(seed, x), rtol=1e-5, atol=1e-6)
        md = dict(call.trailing_metadata())
        assert md["x-model-version"] == v and md["x-route"] == "pinned" and md["x-request-id"] == f"req-{v}"
    # routed (no config: the newest AVAILABLE version), id generated when absent
    resp, call = stub.ModelInfer.with_call(_req(x))
    assert resp.model_version == "2" and resp.id
    np.testing.assert_allclose(_out(resp), _expect(2, x), rtol=1e-5, atol=1e-6)
    assert dict(call.trailing_metadata())["x-request-id"] == resp.id
    # unknown request parameters (perf_analyzer sends this one) are ignored
    req = _req(x)
    req.parameters["triton_enable_empty_final_response"].bool_param = True
    assert stub.ModelInfer(req).model_version == "2"
    # typed contents instead of raw
    req = pb.ModelInferRequest(model_name="mlp", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=[3, 64],
        contents=pb.InferTensorContents(fp32_contents=x.ravel().tolist()))])
    np.testing.assert_allclose(_out(stub.ModelInfer(req)), _expect(2, x), rtol=1e-5, atol=1e-6)
    ch.close()


def _code(fn, req, metadata=None):
    with pytest.raises(grpc.RpcError) as ei:
        fn(req, metadata=metadata)
    return ei.value.code(), ei.value.details()


def test_errors_map_to_status_codes(two_versions):
    srv = two_versions
    ch, stub = _stub(srv)
    x = _x()
    code, msg = _code(stub.ModelInfer, _req(x, model="nope"))
    assert code == grpc.StatusCode.NOT_FOUND and "nope" in msg
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(_req(x, "7", id="e1"))
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND and "7" in ei.value.details()
    assert dict(ei.value.trailing_metadata())["x-request-id"] == "e1"
    code, msg = _code(stub.ModelInfer, _req(x, "v1"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "model_version" in msg
    # wrong datatype
    req = _req(x.astype(np.float64))
    req.inputs[0].datatype = "FP64"
    code, msg = _code(stub.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "FP64" in msg and "input" in msg
    # missing input (an unexpected one instead)
    req = _req(x)
    req.inputs[0].name = "wrong"
    code, msg = _code(stub.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "wrong" in msg
    req = pb.ModelInferRequest(model_name="mlp")
    code, msg = _code(stub.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no inputs" in msg
    # batch larger than max_batch_size (64)
    code, msg = _code(stub.ModelInfer, _req(_x(65)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "max_batch_size" in msg
    # truncated raw contents
    req = _req(x)
    req.raw_input_contents[0] = x.tobytes()[:-4]
    code, msg = _code(stub.ModelInfer, req)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'input'" in msg and "bytes" in msg
    # metadata / config for unknown things
    code, _ = _code(stub.ModelMetadata, pb.ModelMetadataRequest(name="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = _code(stub.ModelConfig, pb.ModelConfigRequest(name="mlp", version="9"))
    assert code == grpc.StatusCode.NOT_FOUND
    # ModelReady, like Triton: unknown is not ready, not an error
    assert stub.ModelReady(pb.ModelReadyRequest(name="nope")).ready is False
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="9")).ready is False
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp", version="1")).ready is True
    # shared memory is refused clearly
    code, msg = _code(stub.SystemSharedMemoryRegister,
                      pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", byte_size=16))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "raw_input_contents" in msg
    assert not stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest()).regions
    assert not stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()).regions
    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
    # trace and log settings: readable (empty), not changeable
    assert not stub.TraceSetting(pb.TraceSettingRequest()).settings
    assert not stub.LogSettings(pb.LogSettingsRequest()).settings
    req = pb.LogSettingsRequest()
    req.settings["log_verbose_level"].uint32_param = 1
    code, _ = _code(stub.LogSettings, req)
    assert code == grpc.StatusCode.UNIMPLEMENTED
    ch.close()


def test_too_large_and_element_limit(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1"}}), max_body_bytes=64 * 1024, max_elements=64 * 64)
    ch, stub = _stub(srv)
    code, _ = _code(stub.ModelInfer, _req(_x(300)))  # ~77 KB message
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, msg = _code(stub.ModelInfer, _req(_x(65)))  # under the byte limit, over elements
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "elements" in msg
    assert stub.ModelInfer(_req(_x(8))).model_version == "1"
    ch.close()


def test_stream_infer_in_order_with_errors(two_versions):
    ch, stub = _stub(two_versions)
    xs = [_x(2, seed=i) for i in range(6)]
    reqs = []
    for i, x in enumerate(xs):
        r = _req(x, "1" if i % 2 else "", id=f"s{i}")
        r.parameters["triton_enable_empty_final_response"].bool_param = True
        if i == 3:
            r.model_name = "nope"
        reqs.append(r)
    got = list(stub.ModelStreamInfer(iter(reqs)))
    assert len(got) == len(reqs)
    for i, (r, x) in enumerate(zip(got, xs)):
        if i == 3:
            assert "nope" in r.error_message and r.infer_response.id == "s3"
            continue
        assert r.error_message == "" and r.infer_response.id == f"s{i}"
        assert r.infer_response.parameters["triton_final_response"].bool_param is True
        seed = 1 if i % 2 else 2
        assert r.infer_response.model_version == str(seed)
        np.testing.assert_allclose(_out(r.infer_response), _expect(seed, x), rtol=1e-5, atol=1e-6)
    ch.close()


def test_metadata_config_index_statistics(two_versions):
    srv = two_versions
    ch, stub = _stub(srv)
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    sm = stub.ServerMetadata(pb.ServerMetadataRequest())
    assert sm.name == "splitserve" and "model_repository" in sm.extensions
    md = stub.ModelMetadata(pb.ModelMetadataRequest(name="mlp"))
    assert md.name == "mlp" and list(md.versions) == ["1", "2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("input", "FP32", [-1, 64])]
    assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [("output", "FP32", [-1, 8])]
    cfg = stub.ModelConfig(pb.ModelConfigRequest(name="mlp")).config
    assert cfg.name == "mlp" and cfg.max_batch_size == 64
    assert cfg.input[0].name == "input" and list(cfg.input[0].dims) == [64]
    assert cfg.input[0].data_type == 11  # TYPE_FP32
    idx = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [(m.name, m.version, m.state) for m in idx.models] == [("mlp", "1", "READY"), ("mlp", "2", "READY")]
    stub.ModelInfer(_req(_x(), "1"))
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))
    by_version = {s.version: s for s in stats.model_stats}
    s1 = by_version["1"]
    assert s1.inference_stats.success.count >= 1
    assert s1.inference_stats.compute_input.count == s1.inference_stats.compute_infer.count \
        == s1.inference_stats.compute_output.count
    code, _ = _code(stub.ModelStatistics, pb.ModelStatisticsRequest(name="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    ch.close()


def test_health_and_reflection(two_versions):
    ch = grpc.insecure_channel(two_versions.grpc)
    h = health_pb2_grpc.HealthStub(ch)
    for service in ("", "inference.GRPCInferenceService"):
        assert h.Check(health_pb2.HealthCheckRequest(service=service)).status == \
            health_pb2.HealthCheckResponse.SERVING
    r = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"inference.GRPCInferenceService", "splitserve.management.v1.RoutingService",
            "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    # the descriptors resolve, from our pool and from the default pool
    for sym in ("inference.GRPCInferenceService", "splitserve.management.v1.RoutingService",
                "grpc.health.v1.Health"):
        resp = next(r.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=sym)])))
        assert resp.file_descriptor_response.file_descriptor_proto, sym
    ch.close()


def test_health_not_serving_when_stopping(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1"}}))
    ch = grpc.insecure_channel(srv.grpc)
    h = health_pb2_grpc.HealthStub(ch)
    assert h.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    srv.core.stopping = True  # what Server.stop() does first
    try:
        # one rule on both transports: every registered service is NOT_SERVING, a service
        # never registered stays unknown (NOT_FOUND), as before stopping
        for service in ("", "inference.GRPCInferenceService", "splitserve.management.v1.RoutingService"):
            assert h.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING, service
        with pytest.raises(grpc.RpcError) as e:
            h.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        assert pb_grpc.GRPCInferenceServiceStub(ch).ServerReady(pb.ServerReadyRequest()).ready is False
    finally:
        srv.core.stopping = False
    ch.close()


def test_management_routing(two_versions):
    srv = two_versions
    ch, stub = _stub(srv)
    m = mpb_grpc.RoutingServiceStub(ch)
    state = json.loads(m.GetRouting(mpb.GetRoutingRequest(model="mlp")).state_json)
    assert state["model"] == "mlp" and state["effective"]["available"] == [1, 2]
    before = state
    new = m.SetRouting(mpb.SetRoutingRequest(model="mlp", config_json=json.dumps(
        {"labels": {"stable": 1}, "weights": {"stable": 100}})))
    state = json.loads(new.state_json)
    assert state["labels"] == {"stable": 1}
    for _ in range(5):
        assert stub.ModelInfer(_req(_x())).model_version == "1"
    # an invalid config is INVALID_ARGUMENT and changes nothing
    for bad in ('{"weights": {"9": 100}}', '{"wieghts": {}}', "not json", "[1]"):
        code, msg = _code(m.SetRouting, mpb.SetRoutingRequest(model="mlp", config_json=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, msg)
    assert json.loads(m.GetRouting(mpb.GetRoutingRequest(model="mlp")).state_json) == state
    assert stub.ModelInfer(_req(_x())).model_version == "1"
    code, _ = _code(m.GetRouting, mpb.GetRoutingRequest(model="nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    # sticky by a metadata key: one key, one version, across many calls
    m.SetRouting(mpb.SetRoutingRequest(model="mlp", config_json=json.dumps(
        {"weights": {"1": 50, "2": 50}, "sticky": {"header": "x-user"}})))
    seen = {}
    for user in range(20):
        versions = {stub.ModelInfer(_req(_x()), metadata=(("x-user", f"u{user}"),)).model_version
                    for _ in range(3)}
        assert len(versions) == 1
        seen[user] = versions.pop()
    assert set(seen.values()) == {"1", "2"}
    assert before["labels"] == {}
    ch.close()


def test_token_required_for_state_changes(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1", 2: "st2"}}, yaml={"mlp": MLP_ALL}), token="s3cret")
    ch, stub = _stub(srv)
    m = mpb_grpc.RoutingServiceStub(ch)
    good = (("authorization", "Bearer s3cret"),)
    bad = (("authorization", "Bearer nope"),)
    for md in (None, bad):
        code, _ = _code(stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="mlp"), md)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = _code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="mlp"), md)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, _ = _code(m.SetRouting, mpb.SetRoutingRequest(model="mlp", config_json="{}"), md)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    assert srv.available("mlp") == [1, 2]
    # reads need no token
    m.GetRouting(mpb.GetRoutingRequest(model="mlp"))
    assert stub.ModelInfer(_req(_x())).model_version == "2"
    # with the token
    m.SetRouting(mpb.SetRoutingRequest(model="mlp", config_json='{"weights": {"1": 100}}'), metadata=good)
    assert stub.ModelInfer(_req(_x())).model_version == "1"
    m.SetRouting(mpb.SetRoutingRequest(model="mlp", config_json="{}"), metadata=good)
    stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="mlp"), metadata=good)
    assert srv.wait_state("mlp", 1, VersionState.END) and srv.available("mlp") == []
    assert stub.ModelReady(pb.ModelReadyRequest(name="mlp")).ready is False
    code, _ = _code(stub.ModelInfer, _req(_x()))
    assert code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="mlp"), metadata=good)
    assert srv.wait_state("mlp", 2, VersionState.AVAILABLE)
    assert stub.ModelInfer(_req(_x())).model_version == "2"
    code, _ = _code(stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="zzz"), good)
    assert code == grpc.StatusCode.NOT_FOUND
    ch.close()


def test_taken_port_is_an_error(make_repo, serve):
    from runtime.server.grpc import servicers as rpc

    srv = serve(make_repo({"mlp": {1: "st1"}}))
    port = int(srv.grpc.rsplit(":", 1)[1])
    with pytest.raises(OSError, match=str(port)):
        srv.call(rpc.start(srv.core, "127.0.0.1", port))
