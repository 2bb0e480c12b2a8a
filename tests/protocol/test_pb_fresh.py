"""The generated protocol code: fresh, importable, and wire-compatible with Triton.

Wire compatibility is proven against the copy of Triton's protos that
tritonclient ships (tritonclient.grpc.service_pb2 / model_config_pb2):
descriptors compared field by field, messages serialized on one side and
parsed on the other, and a live gRPC call from tritonclient's own client to a
servicer built from our generated code.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# A plain import, never importorskip: a broken generated package (or a protobuf
# runtime that refuses it) must fail the run, not skip it.
import runtime.protocol.pb as pb  # noqa: E402
from runtime.protocol.pb import (  # noqa: E402
    grpc_service_pb2,
    grpc_service_pb2_grpc,
    model_config_pb2,
    splitserve_management_pb2,
    splitserve_management_pb2_grpc,
)

# Fields and messages of Triton newer than the tritonclient release the tests
# compare against (2.41); everything else must match it exactly.
NEWER_THAN_TRITONCLIENT = {
    "inference.InferResponseStatistics",
    "inference.ModelStatistics.response_stats",
    "inference.ModelStatistics.ResponseStatsEntry",
}


def _triton():
    svc = pytest.importorskip("tritonclient.grpc.service_pb2")
    mc = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    return svc, mc


def _to_dict(msg) -> dict:
    from google.protobuf import json_format

    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _crossover(src, dst_cls):
    """Serialize src, parse it as dst_cls; check nothing was lost or renamed."""
    data = src.SerializeToString(deterministic=True)
    dst = dst_cls.FromString(data)
    # MessageToDict skips unknown fields: equal dicts mean every field that was
    # set is declared on the other side with the same name, number and type.
    assert _to_dict(dst) == _to_dict(src)
    assert dst.SerializeToString(deterministic=True) == data
    return dst


# ------------------------------------------------------------------ freshness


def test_generated_code_is_fresh():
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) is needed")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, (
        "runtime/protocol/pb is stale; run: python tools/gen_proto.py\n"
        + proc.stdout + proc.stderr
    )


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _floor(requirements: list[str], name: str) -> tuple[int, ...]:
    for req in requirements:
        m = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([\d.]+)", req.strip())
        if m:
            return tuple(int(x) for x in m.group(1).split("."))
    pytest.fail(f"pyproject.toml: no '{name}>=X' in {requirements}")


def _gencode_versions() -> set[tuple[int, ...]]:
    """The protobuf version each generated _pb2 module demands at import."""
    found = set()
    for path in (ROOT / "runtime" / "protocol" / "pb").glob("*_pb2.py"):
        m = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
                      r"\s*(\d+),\s*(\d+),\s*(\d+),", path.read_text())
        assert m, f"{path.name}: no runtime version check found"
        found.add(tuple(int(x) for x in m.groups()))
    return found


def test_pyproject_states_the_oldest_protobuf_the_generated_code_runs_on():
    """`protobuf>=X` in pyproject is exactly the gencode version: never a runtime that
    refuses our code (VersionError at import), and not needlessly new (tritonclient and
    other packages pin protobuf<7, so the floor must stay a 6.x)."""
    deps = _pyproject()["project"]["dependencies"]
    assert _gencode_versions() == {_floor(deps, "protobuf")}
    assert _floor(deps, "protobuf") < (7,), "tritonclient pins protobuf<7"


def test_grpc_stubs_need_no_newer_grpcio_than_pyproject_states():
    deps = _pyproject()["project"]["dependencies"]
    for path in (ROOT / "runtime" / "protocol" / "pb").glob("*_pb2_grpc.py"):
        m = re.search(r"^GRPC_GENERATED_VERSION = '([\d.]+)'$", path.read_text(), re.M)
        assert m, path.name
        assert tuple(int(x) for x in m.group(1).split(".")) <= _floor(deps, "grpcio"), path.name


def test_the_generator_pin_is_one_version():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gen_proto
    finally:
        sys.path.remove(str(ROOT / "tools"))
    dev = _pyproject()["project"]["optional-dependencies"]["dev"]
    assert f"grpcio-tools=={gen_proto.GENERATOR}" in dev
    assert pb.GENERATED_WITH == {"grpcio-tools": gen_proto.GENERATOR}


def test_proto_sources_are_not_a_package():
    assert not (ROOT / "proto" / "__init__.py").exists()
    assert sorted(p.name for p in (ROOT / "proto").glob("*.proto")) == [
        "grpc_service.proto",
        "model_config.proto",
        "splitserve_management.proto",
    ]
    spec = importlib.util.find_spec("proto")
    # Another distribution may own a top-level `proto`; ours never does.
    assert spec is None or not str(spec.origin or "").startswith(str(ROOT / "proto"))


def test_generated_imports_are_package_relative():
    pb_dir = ROOT / "runtime" / "protocol" / "pb"
    for path in sorted(pb_dir.glob("*_pb2*.py*")):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            if stripped.startswith("import ") and "_pb2" in stripped:
                pytest.fail(f"{path.name}: top-level import of a generated module: {line}")


# ------------------------------------------------------------------- identity


def test_descriptor_full_names():
    assert grpc_service_pb2.DESCRIPTOR.package == "inference"
    svc = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert svc.full_name == "inference.GRPCInferenceService"
    assert grpc_service_pb2.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert grpc_service_pb2.ModelInferResponse.DESCRIPTOR.full_name == "inference.ModelInferResponse"
    assert model_config_pb2.ModelConfig.DESCRIPTOR.full_name == "inference.ModelConfig"
    mgmt = splitserve_management_pb2.DESCRIPTOR.services_by_name["RoutingService"]
    assert mgmt.full_name == "splitserve.management.v1.RoutingService"
    assert sorted(m.name for m in mgmt.methods) == ["GetRouting", "SetRouting"]


def test_descriptors_live_in_our_own_pool():
    for mod in (grpc_service_pb2, model_config_pb2, splitserve_management_pb2):
        assert mod.DESCRIPTOR.pool is pb.POOL
    assert pb.POOL.FindMessageTypeByName("inference.ModelInferRequest") is (
        grpc_service_pb2.ModelInferRequest.DESCRIPTOR
    )


@pytest.mark.parametrize(
    ("message", "field", "number"),
    [
        (grpc_service_pb2.ModelInferRequest, "model_name", 1),
        (grpc_service_pb2.ModelInferRequest, "model_version", 2),
        (grpc_service_pb2.ModelInferRequest, "id", 3),
        (grpc_service_pb2.ModelInferRequest, "parameters", 4),
        (grpc_service_pb2.ModelInferRequest, "inputs", 5),
        (grpc_service_pb2.ModelInferRequest, "outputs", 6),
        (grpc_service_pb2.ModelInferRequest, "raw_input_contents", 7),
        (grpc_service_pb2.ModelInferRequest.InferInputTensor, "contents", 5),
        (grpc_service_pb2.ModelInferResponse, "outputs", 5),
        (grpc_service_pb2.ModelInferResponse, "raw_output_contents", 6),
        (grpc_service_pb2.ModelStreamInferResponse, "infer_response", 2),
        (grpc_service_pb2.InferParameter, "uint64_param", 5),
        (grpc_service_pb2.InferTensorContents, "bytes_contents", 8),
        (grpc_service_pb2.ModelStatistics, "inference_stats", 6),
        (grpc_service_pb2.ModelStatistics, "batch_stats", 7),
        (grpc_service_pb2.InferStatistics, "compute_output", 6),
        (grpc_service_pb2.RepositoryIndexResponse.ModelIndex, "reason", 4),
        (model_config_pb2.ModelConfig, "backend", 17),
        (model_config_pb2.ModelConfig, "dynamic_batching", 11),
        (model_config_pb2.ModelConfig, "instance_group", 7),
        (model_config_pb2.ModelConfig, "response_cache", 24),
        (model_config_pb2.ModelDynamicBatching, "max_queue_delay_microseconds", 2),
        (model_config_pb2.ModelInput, "optional", 8),
        (model_config_pb2.ModelOutput, "label_filename", 4),
        (model_config_pb2.ModelInstanceGroup, "kind", 4),
    ],
)
def test_field_numbers_match_triton(message, field, number):
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def _compare_message(ours, theirs, problems: list[str]) -> None:
    for f in ours.fields:
        if f.full_name in NEWER_THAN_TRITONCLIENT:
            continue
        t = theirs.fields_by_name.get(f.name)
        if t is None:
            problems.append(f"{f.full_name}: not in Triton's {theirs.full_name}")
            continue
        ours_sig = (f.number, f.type, f.is_repeated)
        theirs_sig = (t.number, t.type, t.is_repeated)
        if ours_sig != theirs_sig:
            problems.append(f"{f.full_name}: (number, type, repeated) {ours_sig} != {theirs_sig}")
        for ref_o, ref_t in ((f.message_type, t.message_type), (f.enum_type, t.enum_type)):
            if ref_o is not None and (ref_t is None or ref_o.full_name != ref_t.full_name):
                problems.append(f"{f.full_name}: refers to {ref_o.full_name}")
        if f.enum_type is not None and t.enum_type is not None:
            _compare_enum(f.enum_type, t.enum_type, problems)
        if (f.containing_oneof is None) != (t.containing_oneof is None):
            problems.append(f"{f.full_name}: oneof membership differs")
    for nested in ours.nested_types:
        if nested.full_name in NEWER_THAN_TRITONCLIENT:
            continue
        t_nested = theirs.nested_types_by_name.get(nested.name)
        if t_nested is None:
            problems.append(f"{nested.full_name}: not in Triton")
        else:
            _compare_message(nested, t_nested, problems)
    for enum in ours.enum_types:
        _compare_enum(enum, theirs.enum_types_by_name[enum.name], problems)


def _compare_enum(ours, theirs, problems: list[str]) -> None:
    for v in ours.values:
        t = theirs.values_by_name.get(v.name)
        if t is None or t.number != v.number:
            problems.append(f"{ours.full_name}.{v.name} = {v.number} differs from Triton")


@pytest.mark.parametrize("which", ["grpc_service", "model_config"])
def test_every_declared_field_matches_triton(which):
    svc, mc = _triton()
    ours, theirs = {
        "grpc_service": (grpc_service_pb2.DESCRIPTOR, svc.DESCRIPTOR),
        "model_config": (model_config_pb2.DESCRIPTOR, mc.DESCRIPTOR),
    }[which]
    problems: list[str] = []
    for name, msg in ours.message_types_by_name.items():
        if msg.full_name in NEWER_THAN_TRITONCLIENT:
            continue
        t = theirs.message_types_by_name.get(name)
        if t is None:
            problems.append(f"{msg.full_name}: not in Triton")
        else:
            _compare_message(msg, t, problems)
    for name, enum in ours.enum_types_by_name.items():
        _compare_enum(enum, theirs.enum_types_by_name[name], problems)
    assert problems == []


def test_service_methods_match_tritonclient():
    svc, _ = _triton()
    from tritonclient.grpc import service_pb2_grpc as triton_grpc

    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = svc.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert sorted(m.name for m in ours.methods) == sorted(m.name for m in theirs.methods)
    for m in ours.methods:
        t = theirs.methods_by_name[m.name]
        assert (m.input_type.full_name, m.output_type.full_name) == (
            t.input_type.full_name, t.output_type.full_name
        ), m.name
        assert (m.client_streaming, m.server_streaming) == (t.client_streaming, t.server_streaming)

    def public(cls):
        return sorted(n for n in vars(cls) if not n.startswith("_"))

    assert public(grpc_service_pb2_grpc.GRPCInferenceServiceServicer) == public(
        triton_grpc.GRPCInferenceServiceServicer
    )


# ------------------------------------------------------- messages across sides


def test_infer_request_from_tritonclient_parses_with_ours():
    svc, _ = _triton()
    req = svc.ModelInferRequest(model_name="resnet", model_version="3", id="req-1")
    req.parameters["sequence_id"].int64_param = 42
    req.parameters["priority"].uint64_param = 2
    req.parameters["binary_data_output"].bool_param = True
    x = req.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 3])
    x.parameters["note"].string_param = "raw"
    y = req.inputs.add(name="TEXT", datatype="BYTES", shape=[1])
    y.contents.bytes_contents.append(b"hello")
    req.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 3
    req.raw_input_contents.append(bytes(range(24)))

    ours = _crossover(req, grpc_service_pb2.ModelInferRequest)
    assert ours.model_name == "resnet" and ours.model_version == "3" and ours.id == "req-1"
    assert ours.parameters["sequence_id"].int64_param == 42
    assert ours.parameters["priority"].WhichOneof("parameter_choice") == "uint64_param"
    assert [i.name for i in ours.inputs] == ["INPUT0", "TEXT"]
    assert list(ours.inputs[0].shape) == [2, 3] and ours.inputs[0].datatype == "FP32"
    assert list(ours.inputs[1].contents.bytes_contents) == [b"hello"]
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    assert list(ours.raw_input_contents) == [bytes(range(24))]


def test_infer_response_from_ours_parses_with_tritonclient():
    svc, _ = _triton()
    resp = grpc_service_pb2.ModelInferResponse(model_name="resnet", model_version="2", id="r")
    resp.parameters["triton_final_response"].bool_param = True
    out = resp.outputs.add(name="OUTPUT0", datatype="INT64", shape=[1, 2])
    out.parameters["binary_data_size"].int64_param = 16
    resp.raw_output_contents.append((7).to_bytes(8, "little") * 2)
    theirs = _crossover(resp, svc.ModelInferResponse)
    assert theirs.model_version == "2"
    assert list(theirs.raw_output_contents) == [(7).to_bytes(8, "little") * 2]

    stream = grpc_service_pb2.ModelStreamInferResponse(error_message="", infer_response=resp)
    _crossover(stream, svc.ModelStreamInferResponse)
    _crossover(
        grpc_service_pb2.ModelStreamInferResponse(error_message="model 'x' not found"),
        svc.ModelStreamInferResponse,
    )


def test_metadata_from_ours_parses_with_tritonclient():
    svc, _ = _triton()
    server = grpc_service_pb2.ServerMetadataResponse(
        name="splitserve", version="0.1.0", extensions=["model_repository", "statistics"]
    )
    _crossover(server, svc.ServerMetadataResponse)
    model = grpc_service_pb2.ModelMetadataResponse(
        name="resnet", versions=["1", "2"], platform="pytorch_libtorch"
    )
    model.inputs.add(name="INPUT0", datatype="FP32", shape=[-1, 3, 224, 224])
    model.outputs.add(name="OUTPUT0", datatype="FP32", shape=[-1, 1000])
    _crossover(model, svc.ModelMetadataResponse)


def test_model_config_from_ours_parses_with_tritonclient():
    svc, mc = _triton()
    cfg = model_config_pb2.ModelConfig(
        name="resnet", platform="pytorch_libtorch", backend="pytorch", max_batch_size=32,
        default_model_filename="model.pt2",
    )
    cfg.version_policy.latest.num_versions = 2
    cfg.input.add(
        name="INPUT0", data_type=model_config_pb2.TYPE_FP32, dims=[3, 224, 224],
        format=model_config_pb2.ModelInput.FORMAT_NCHW, optional=False,
    )
    cfg.output.add(name="OUTPUT0", data_type=model_config_pb2.TYPE_FP32, dims=[1000])
    cfg.output[0].reshape.shape.extend([1000])
    cfg.instance_group.add(name="resnet_0", kind=model_config_pb2.ModelInstanceGroup.KIND_GPU,
                           count=1, gpus=[0])
    cfg.dynamic_batching.preferred_batch_size.extend([8, 16])
    cfg.dynamic_batching.max_queue_delay_microseconds = 500
    cfg.dynamic_batching.default_queue_policy.max_queue_size = 1024
    cfg.parameters["split"].string_value = "canary"
    cfg.metric_tags["team"] = "vision"
    cfg.model_transaction_policy.decoupled = False
    cfg.response_cache.enable = False

    resp = grpc_service_pb2.ModelConfigResponse(config=cfg)
    theirs = _crossover(resp, svc.ModelConfigResponse)
    assert theirs.config.input[0].data_type == mc.TYPE_FP32
    assert theirs.config.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert theirs.config.version_policy.WhichOneof("policy_choice") == "latest"
    assert theirs.config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU


def test_statistics_from_ours_parse_with_tritonclient():
    svc, _ = _triton()

    def dur(count, ns):
        return grpc_service_pb2.StatisticDuration(count=count, ns=ns)

    stats = grpc_service_pb2.ModelStatistics(
        name="resnet", version="2", last_inference=1_700_000_000_000,
        inference_count=96, execution_count=12,
    )
    s = stats.inference_stats
    for name, d in [("success", dur(96, 9_000_000)), ("fail", dur(1, 5_000)),
                    ("queue", dur(96, 1_000_000)), ("compute_input", dur(12, 100_000)),
                    ("compute_infer", dur(12, 7_000_000)), ("compute_output", dur(12, 90_000)),
                    ("cache_hit", dur(0, 0)), ("cache_miss", dur(0, 0))]:
        getattr(s, name).CopyFrom(d)
    stats.batch_stats.add(batch_size=8, compute_input=dur(12, 100_000),
                          compute_infer=dur(12, 7_000_000), compute_output=dur(12, 90_000))
    stats.memory_usage.add(type="GPU", id=0, byte_size=104_857_600)
    resp = grpc_service_pb2.ModelStatisticsResponse(model_stats=[stats])
    theirs = _crossover(resp, svc.ModelStatisticsResponse)
    assert theirs.model_stats[0].inference_stats.compute_infer.ns == 7_000_000
    assert theirs.model_stats[0].batch_stats[0].batch_size == 8


def test_repository_messages_cross():
    svc, _ = _triton()
    index = grpc_service_pb2.RepositoryIndexResponse()
    index.models.add(name="resnet", version="1", state="UNAVAILABLE", reason="unloaded")
    index.models.add(name="resnet", version="2", state="READY")
    index.models.add(name="resnet", version="3", state="UNAVAILABLE",
                     reason="load failed: missing model.pt2")
    theirs = _crossover(index, svc.RepositoryIndexResponse)
    assert [m.state for m in theirs.models] == ["UNAVAILABLE", "READY", "UNAVAILABLE"]

    load = svc.RepositoryModelLoadRequest(model_name="resnet")
    load.parameters["config"].string_param = '{"max_batch_size": 8}'
    load.parameters["file:1/model.pt2"].bytes_param = b"\x00\x01"
    _crossover(load, grpc_service_pb2.RepositoryModelLoadRequest)
    unload = svc.RepositoryModelUnloadRequest(model_name="resnet")
    unload.parameters["unload_dependents"].bool_param = True
    _crossover(unload, grpc_service_pb2.RepositoryModelUnloadRequest)
    _crossover(svc.RepositoryIndexRequest(ready=True), grpc_service_pb2.RepositoryIndexRequest)


def test_shared_memory_and_settings_messages_cross():
    svc, _ = _triton()
    status = grpc_service_pb2.SystemSharedMemoryStatusResponse()
    status.regions["r0"].CopyFrom(
        grpc_service_pb2.SystemSharedMemoryStatusResponse.RegionStatus(
            name="r0", key="/shm0", offset=0, byte_size=64)
    )
    _crossover(status, svc.SystemSharedMemoryStatusResponse)
    _crossover(grpc_service_pb2.CudaSharedMemoryStatusResponse(),
               svc.CudaSharedMemoryStatusResponse)
    trace = svc.TraceSettingRequest(model_name="resnet")
    trace.settings["trace_level"].value.extend(["TIMESTAMPS"])
    _crossover(trace, grpc_service_pb2.TraceSettingRequest)
    log = svc.LogSettingsRequest()
    log.settings["log_verbose_level"].uint32_param = 1
    _crossover(log, grpc_service_pb2.LogSettingsRequest)


def test_management_messages():
    req = splitserve_management_pb2.SetRoutingRequest(
        model="resnet", config_json='{"labels": {"stable": 2}}')
    again = splitserve_management_pb2.SetRoutingRequest.FromString(req.SerializeToString())
    assert again.config_json == '{"labels": {"stable": 2}}'
    fields = {f.name: f.number for f in splitserve_management_pb2.RoutingState.DESCRIPTOR.fields}
    assert fields == {"model": 1, "state_json": 2}
    assert hasattr(splitserve_management_pb2_grpc, "add_RoutingServiceServicer_to_server")


# ------------------------------------------------------------ live over gRPC


class _EchoServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """Just enough of the service for tritonclient's own client to talk to."""

    def ServerLive(self, request, context):
        return grpc_service_pb2.ServerLiveResponse(live=True)

    def ModelInfer(self, request, context):
        resp = grpc_service_pb2.ModelInferResponse(
            model_name=request.model_name, model_version="7", id=request.id)
        for tensor, raw in zip(request.inputs, request.raw_input_contents):
            resp.outputs.add(name=tensor.name + "_ECHO", datatype=tensor.datatype,
                             shape=tensor.shape)
            resp.raw_output_contents.append(raw)
        return resp

    def ModelConfig(self, request, context):
        cfg = model_config_pb2.ModelConfig(name=request.name, max_batch_size=4)
        cfg.input.add(name="X", data_type=model_config_pb2.TYPE_FP32, dims=[-1])
        return grpc_service_pb2.ModelConfigResponse(config=cfg)


def test_tritonclient_talks_to_a_servicer_built_from_our_code():
    grpc = pytest.importorskip("grpc")
    np = pytest.importorskip("numpy")
    tgrpc = pytest.importorskip("tritonclient.grpc")

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        client = tgrpc.InferenceServerClient(url=f"127.0.0.1:{port}")
        assert client.is_server_live(client_timeout=10)
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        inp = tgrpc.InferInput("X", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("echo", [inp], request_id="abc", client_timeout=10)
        resp = result.get_response()
        assert (resp.model_name, resp.model_version, resp.id) == ("echo", "7", "abc")
        np.testing.assert_array_equal(result.as_numpy("X_ECHO"), x)
        cfg = client.get_model_config("echo", as_json=True, client_timeout=10)
        assert cfg["config"]["max_batch_size"] == 4
        assert cfg["config"]["input"][0]["data_type"] == "TYPE_FP32"
        with pytest.raises(Exception, match="(?i)unimplemented"):
            client.get_server_metadata(client_timeout=10)
        client.close()
    finally:
        server.stop(grace=None)


def test_our_stub_talks_to_a_servicer_built_from_our_code():
    """A live gRPC call with nothing but our generated code: .ci/run also runs this on the
    oldest protobuf pyproject states, where tritonclient's own gencode cannot load."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_EchoServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerLive(grpc_service_pb2.ServerLiveRequest(), timeout=10).live
            req = grpc_service_pb2.ModelInferRequest(model_name="echo", id="x1")
            req.inputs.add(name="X", datatype="FP32", shape=[2])
            req.raw_input_contents.append(b"\x00\x00\x80?\x00\x00\x00@")
            resp = stub.ModelInfer(req, timeout=10)
            assert (resp.model_name, resp.id, resp.outputs[0].name) == ("echo", "x1", "X_ECHO")
            assert list(resp.raw_output_contents) == [b"\x00\x00\x80?\x00\x00\x00@"]
            cfg = stub.ModelConfig(grpc_service_pb2.ModelConfigRequest(name="echo"), timeout=10)
            assert cfg.config.input[0].data_type == model_config_pb2.TYPE_FP32
    finally:
        server.stop(grace=None)
