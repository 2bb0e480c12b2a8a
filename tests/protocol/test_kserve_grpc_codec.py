"""KServe v2 gRPC codec: round trips for every datatype (raw and typed contents), clear
errors for bad shapes and truncated contents, and the dict -> message views."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime import dtypes
from runtime.errors import Code, ServingError
from runtime.protocol import kserve_grpc as codec
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.types import InferResponse, Tensor

IT = pb.ModelInferRequest.InferInputTensor
LIMIT = 1 << 20


def _sample(dt: str, shape=(2, 3)) -> np.ndarray:
    rng = np.random.default_rng(7)
    if dt == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if dt == "BF16":
        f = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch.bfloat16)
        return f.view(torch.int16).numpy().view(np.uint16)
    if dt == "BYTES":
        arr = np.empty(int(np.prod(shape)), dtype=object)
        arr[:] = [f"s{i}".encode() * i for i in range(arr.size)]
        return arr.reshape(shape)
    npdt = dtypes.numpy_dtype(dt)
    if npdt.kind == "f":
        return rng.standard_normal(shape).astype(npdt)
    info = np.iinfo(npdt)
    return rng.integers(info.min, info.max, shape, dtype=npdt, endpoint=True)


ALL = (*dtypes.SUPPORTED, "BYTES")


def _raw(dt, arr):
    return codec.encode_bytes_elems(arr) if dt == "BYTES" else arr.tobytes()


@pytest.mark.parametrize("dt", ALL)
def test_raw_round_trip_every_datatype(dt):
    arr = _sample(dt)
    msg = pb.ModelInferRequest(model_name="m", model_version="3", id="r1",
                               inputs=[IT(name="x", datatype=dt, shape=[2, 3])],
                               raw_input_contents=[_raw(dt, arr)])
    msg = pb.ModelInferRequest.FromString(msg.SerializeToString())
    req = codec.decode_infer(msg, LIMIT)
    assert (req.model, req.version, req.id, req.protocol) == ("m", 3, "r1", "grpc_v2")
    t = req.inputs[0]
    assert (t.name, t.datatype, t.shape) == ("x", dt, (2, 3))
    assert t.data.shape == (2, 3) and t.data.dtype == arr.dtype
    np.testing.assert_array_equal(t.data, arr)
    # and back out as a response, always raw
    out = codec.encode_infer(InferResponse("m", 3, [Tensor("y", dt, (2, 3), arr)], "r1", "pinned"))
    out = pb.ModelInferResponse.FromString(out.SerializeToString())
    assert (out.model_name, out.model_version, out.id) == ("m", "3", "r1")
    assert out.outputs[0].datatype == dt and list(out.outputs[0].shape) == [2, 3]
    assert not out.outputs[0].HasField("contents")
    back = codec.decode_output(out.outputs[0], out.raw_output_contents[0])
    np.testing.assert_array_equal(back, arr)


def test_raw_input_is_not_copied():
    arr = _sample("FP32", (4, 64))
    msg = pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="FP32", shape=[4, 64])],
                               raw_input_contents=[arr.tobytes()])
    t = codec.decode_infer(msg, LIMIT).inputs[0]
    assert t.data.base is not None and not t.data.flags.owndata  # a view over the wire bytes


def test_bf16_bits_reach_torch_unchanged():
    arr = _sample("BF16")
    msg = pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="BF16", shape=[2, 3])],
                               raw_input_contents=[arr.tobytes()])
    t = codec.decode_infer(msg, LIMIT).inputs[0]
    tt = dtypes.to_torch(t.data, "BF16")
    assert tt.dtype == torch.bfloat16
    np.testing.assert_array_equal(tt.view(torch.int16).numpy().view(np.uint16), arr)


TYPED = [dt for dt in ALL if dt in codec.CONTENTS_FIELD]


@pytest.mark.parametrize("dt", TYPED)
def test_typed_contents_every_datatype(dt):
    arr = _sample(dt)
    field = codec.CONTENTS_FIELD[dt]
    contents = pb.InferTensorContents(**{field: arr.ravel().tolist()})
    msg = pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype=dt, shape=[2, 3],
                                                          contents=contents)])
    t = codec.decode_infer(pb.ModelInferRequest.FromString(msg.SerializeToString()), LIMIT).inputs[0]
    assert t.data.shape == (2, 3)
    if dt != "BYTES":
        assert t.data.dtype == dtypes.numpy_dtype(dt)
    np.testing.assert_array_equal(t.data, arr)


@pytest.mark.parametrize("dt", ["FP16", "BF16"])
def test_half_types_need_raw(dt):
    msg = pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype=dt, shape=[1],
                               contents=pb.InferTensorContents(fp32_contents=[1.0]))])
    with pytest.raises(ServingError, match=f"input 'x': datatype {dt} has no typed contents"):
        codec.decode_infer(msg, LIMIT)


def _err(msg, limit=LIMIT) -> ServingError:
    with pytest.raises(ServingError) as ei:
        codec.decode_infer(msg, limit)
    return ei.value


def test_bad_requests_say_what_is_wrong():
    x = np.zeros((2, 3), np.float32)
    ok = dict(model_name="m", inputs=[IT(name="x", datatype="FP32", shape=[2, 3])],
              raw_input_contents=[x.tobytes()])
    # truncated raw contents
    e = _err(pb.ModelInferRequest(**{**ok, "raw_input_contents": [x.tobytes()[:-1]]}))
    assert e.code is Code.INVALID_ARGUMENT and "input 'x'" in e.message and "23 bytes" in e.message \
        and "needs 24" in e.message
    # shape disagreeing with the data
    e = _err(pb.ModelInferRequest(**{**ok, "inputs": [IT(name="x", datatype="FP32", shape=[3, 3])]}))
    assert "input 'x'" in e.message and "[3, 3]" in e.message
    e = _err(pb.ModelInferRequest(**{**ok, "inputs": [IT(name="x", datatype="FP32", shape=[-2, 3])]}))
    assert "negative" in e.message
    # raw count vs inputs
    e = _err(pb.ModelInferRequest(**{**ok, "raw_input_contents": [x.tobytes(), b""]}))
    assert "2 entries for 1 inputs" in e.message
    # unknown datatype, empty name, no inputs, no model, no data
    e = _err(pb.ModelInferRequest(**{**ok, "inputs": [IT(name="x", datatype="FLOAT", shape=[2, 3])]}))
    assert "unknown datatype 'FLOAT'" in e.message
    e = _err(pb.ModelInferRequest(**{**ok, "inputs": [IT(name="", datatype="FP32", shape=[2, 3])]}))
    assert "inputs[0]" in e.message
    assert "no inputs" in _err(pb.ModelInferRequest(model_name="m")).message
    assert "model_name" in _err(pb.ModelInferRequest(**{**ok, "model_name": ""})).message
    e = _err(pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="FP32", shape=[2])]))
    assert "input 'x': no data" in e.message
    # typed contents: wrong count, wrong field, out of range
    e = _err(pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="FP32", shape=[3],
             contents=pb.InferTensorContents(fp32_contents=[1, 2]))]))
    assert "input 'x'" in e.message and "3 elements" in e.message and "has 2" in e.message
    e = _err(pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="FP32", shape=[1],
             contents=pb.InferTensorContents(int64_contents=[1]))]))
    assert "contents.fp32_contents" in e.message and "int64_contents" in e.message
    e = _err(pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="INT8", shape=[1],
             contents=pb.InferTensorContents(int_contents=[300]))]))
    assert "outside the range of INT8" in e.message
    # both raw and contents
    e = _err(pb.ModelInferRequest(**{**ok, "inputs": [IT(name="x", datatype="FP32", shape=[2, 3],
             contents=pb.InferTensorContents(fp32_contents=[0] * 6))]}))
    assert "both contents and raw_input_contents" in e.message
    # BYTES raw framing
    e = _err(pb.ModelInferRequest(model_name="m", inputs=[IT(name="s", datatype="BYTES", shape=[2])],
                                  raw_input_contents=[b"\x03\x00\x00\x00abc\x05\x00\x00\x00ab"]))
    assert "input 's'" in e.message and "runs past" in e.message
    e = _err(pb.ModelInferRequest(model_name="m", inputs=[IT(name="s", datatype="BYTES", shape=[1])],
                                  raw_input_contents=[b"\x01\x00\x00\x00aXX"]))
    assert "2 bytes left over" in e.message


def test_element_limit_is_too_large():
    msg = pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="FP32", shape=[1000, 1000])],
                               raw_input_contents=[b""])
    e = _err(msg, limit=1000)
    assert e.code is Code.TOO_LARGE and "1000" in e.message


@pytest.mark.parametrize("v,expected", [("", None), ("1", 1), ("12", 12)])
def test_model_version(v, expected):
    assert codec.parse_version(v) == expected


@pytest.mark.parametrize("v", ["0", "01", "-1", "v1", "latest", "1.0", "١"])
def test_model_version_invalid(v):
    with pytest.raises(ServingError) as ei:
        codec.parse_version(v)
    assert ei.value.code is Code.INVALID_ARGUMENT and "model_version" in ei.value.message


def test_parameters_and_requested_outputs():
    msg = pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="INT32", shape=[1])],
                               raw_input_contents=[np.int32(5).tobytes()],
                               outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="y")])
    msg.parameters["user"].string_param = "alice"
    msg.parameters["triton_enable_empty_final_response"].bool_param = True
    msg.parameters["n"].int64_param = -3
    msg.parameters["f"].double_param = 0.5
    msg.parameters["u"].uint64_param = 1 << 63
    msg.parameters["unset"].CopyFrom(pb.InferParameter())
    req = codec.decode_infer(msg, LIMIT)
    assert req.parameters == {"user": "alice", "triton_enable_empty_final_response": True,
                              "n": -3, "f": 0.5, "u": 1 << 63, "unset": None}
    assert req.outputs == ["y"] and req.version is None and req.id is None
    assert codec.decode_infer(pb.ModelInferRequest(model_name="m", inputs=msg.inputs,
                                                   raw_input_contents=msg.raw_input_contents),
                              LIMIT).outputs is None
    # response parameters go back typed
    out = codec.encode_infer(InferResponse("m", 1, [], parameters={"a": True, "b": 2, "c": "x", "_private": 1}))
    assert {k: codec.param_value(v) for k, v in out.parameters.items()} == {"a": True, "b": 2, "c": "x"}


def test_scalar_and_empty_shapes():
    msg = pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="FP64", shape=[])],
                               raw_input_contents=[np.float64(2.5).tobytes()])
    t = codec.decode_infer(msg, LIMIT).inputs[0]
    assert t.shape == () and t.data.shape == () and float(t.data) == 2.5
    msg = pb.ModelInferRequest(model_name="m", inputs=[IT(name="x", datatype="FP32", shape=[0, 4])],
                               raw_input_contents=[b""])
    assert codec.decode_infer(msg, LIMIT).inputs[0].data.shape == (0, 4)


def test_views_from_dicts():
    meta = {"name": "mlp", "versions": ["1", "2"], "platform": "pytorch",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, 8]}],
            "parameters": {"signature": "derived"}}
    m = codec.model_metadata(meta)
    assert m.name == "mlp" and list(m.versions) == ["1", "2"] and list(m.inputs[0].shape) == [-1, 64]
    cfg = {"name": "mlp", "platform": "pytorch_libtorch", "backend": "pytorch", "max_batch_size": 64,
           "input": [{"name": "input", "data_type": "TYPE_FP32", "dims": [64]}],
           "output": [{"name": "output", "data_type": "TYPE_BF16", "dims": [8]},
                      {"name": "s", "data_type": "TYPE_STRING", "dims": [1]}],
           "version_policy": {"latest": {"num_versions": 1}},
           "dynamic_batching": {"preferred_batch_size": [8, 16], "max_queue_delay_microseconds": 500},
           "something_new": 1}
    c = codec.model_config(cfg).config
    assert c.max_batch_size == 64 and c.input[0].data_type == 11 and list(c.input[0].dims) == [64]
    assert c.version_policy.latest.num_versions == 1
    assert list(c.dynamic_batching.preferred_batch_size) == [8, 16]
    assert c.output[1].data_type == 13  # TYPE_STRING
    idx = codec.repository_index([{"name": "a", "version": "1", "state": "READY", "reason": ""},
                                  {"name": "b", "version": "", "state": "UNAVAILABLE", "reason": None}])
    assert [(x.name, x.version, x.state) for x in idx.models] == [("a", "1", "READY"), ("b", "", "UNAVAILABLE")]
    stats = {"model_stats": [{"name": "mlp", "version": "2", "last_inference": 17, "inference_count": 5,
                              "execution_count": 4,
                              "inference_stats": {"success": {"count": 5, "ns": 1000},
                                                  "queue": {"count": 5, "ns": 10},
                                                  "compute_input": {"count": 5, "ns": 1},
                                                  "compute_infer": {"count": 5, "ns": 900},
                                                  "compute_output": {"count": 5, "ns": 2}},
                              "batch_stats": [{"batch_size": 1, "compute_infer": {"count": 5, "ns": 900}}]}]}
    s = codec.model_statistics(stats).model_stats[0]
    assert s.version == "2" and s.inference_stats.queue.count == 5 and s.batch_stats[0].batch_size == 1
    with pytest.raises(ServingError) as ei:
        codec.model_statistics({"model_stats": [{"inference_count": "many"}]})
    assert ei.value.code is Code.INTERNAL
