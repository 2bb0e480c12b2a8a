"""KServe v2 REST codec (runtime/protocol/kserve_rest.py): golden bytes, round trips for
every datatype over JSON and the binary tensor extension, BYTES framing, and one clear
error per malformed body.

Golden bodies are written out by hand from the protocol documents (KServe v2 REST, Triton's
binary data extension) and cross-checked against tritonclient's own request builder and
response parser, so a change in the wire format fails here, not in a user's client.
"""

from __future__ import annotations

import json

import numpy as np
import orjson
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from runtime import dtypes
from runtime.errors import Code, ServingError
from runtime.protocol import kserve_rest as codec
from runtime.types import InferResponse, Tensor

LIMIT = 1 << 20
ALL = (*dtypes.SUPPORTED, "BYTES")
NUMERIC = tuple(dt for dt in dtypes.SUPPORTED if dt not in ("BF16", "BOOL"))


def decode(body: bytes, header_length: int | None = None, version: int | None = None,
           limit: int = LIMIT):
    return codec.decode_infer(body, header_length, "m", version, limit)


def binary_body(header: dict, *chunks: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + b"".join(chunks), len(head)


def sample(dt: str, shape=(2, 3)) -> np.ndarray:
    """Values of `dt` as the codec holds them (BF16 as uint16 bits, BYTES as objects)."""
    rng = np.random.default_rng(11)
    if dt == "BOOL":
        return rng.integers(0, 2, shape).astype(bool)
    if dt == "BF16":
        f = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(torch.bfloat16)
        return f.view(torch.int16).numpy().view(np.uint16)
    if dt == "BYTES":
        arr = np.empty(int(np.prod(shape)), dtype=object)
        arr[:] = [("é" * i).encode() for i in range(arr.size)]  # includes b"" and multibyte
        return arr.reshape(shape)
    npdt = dtypes.numpy_dtype(dt)
    if npdt.kind == "f":
        return rng.standard_normal(shape).astype(npdt)
    info = np.iinfo(npdt)
    return rng.integers(info.min, info.max, shape, dtype=npdt, endpoint=True)


def bytes_elems(arr: np.ndarray) -> bytes:
    return b"".join(len(x).to_bytes(4, "little") + x for x in arr.reshape(-1))


def json_values(dt: str, arr: np.ndarray) -> list:
    if dt == "BF16":
        return torch.from_numpy(arr).view(torch.bfloat16).float().reshape(-1).tolist()
    if dt == "BYTES":
        return [x.decode() for x in arr.reshape(-1)]
    return arr.reshape(-1).tolist()


# ---- golden bytes ----------------------------------------------------------------------

def test_golden_json_response():
    out = np.array([[0.5, -1.25, 3.0]], dtype=np.float32)
    body, hlen = codec.encode_infer(
        InferResponse("mlp", 2, [Tensor("output", "FP32", (1, 3), out)], id="r1"),
        codec.BinaryOutputs(False, {}))
    assert hlen is None
    assert body == (b'{"model_name":"mlp","model_version":"2","outputs":[{"name":"output",'
                    b'"datatype":"FP32","shape":[1,3],"data":[0.5,-1.25,3.0]}],"id":"r1"}')


def test_golden_binary_response_mixed_outputs():
    """Per-output binary_data overrides the request default; binary chunks follow the JSON
    header in output order and Inference-Header-Content-Length is the header's size."""
    a = np.array([1.0, 2.0], dtype=np.float32)
    b = np.array([7, -1], dtype=np.int64)
    c = np.array([b"ab", b""], dtype=object)
    body, hlen = codec.encode_infer(
        InferResponse("m", 1, [Tensor("a", "FP32", (2,), a), Tensor("b", "INT64", (2,), b),
                               Tensor("c", "BYTES", (2,), c)]),
        codec.BinaryOutputs(True, {"b": False}))
    head = (b'{"model_name":"m","model_version":"1","outputs":['
            b'{"name":"a","datatype":"FP32","shape":[2],"parameters":{"binary_data_size":8}},'
            b'{"name":"b","datatype":"INT64","shape":[2],"data":[7,-1]},'
            b'{"name":"c","datatype":"BYTES","shape":[2],"parameters":{"binary_data_size":10}}]}')
    assert hlen == len(head)
    assert body == head + b"\x00\x00\x80?\x00\x00\x00@" + b"\x02\x00\x00\x00ab\x00\x00\x00\x00"


def test_golden_binary_request_decodes():
    """A body laid out by hand per the binary extension: JSON header, then the raw tensors
    back to back in input order (little-endian), BYTES as 4-byte length + bytes."""
    body, hlen = binary_body(
        {"id": "42", "inputs": [
            {"name": "x", "shape": [2], "datatype": "INT32", "parameters": {"binary_data_size": 8}},
            {"name": "s", "shape": [1, 2], "datatype": "BYTES", "parameters": {"binary_data_size": 9}},
            {"name": "j", "shape": [1], "datatype": "FP64", "data": [0.25]}],
         "outputs": [{"name": "y", "parameters": {"binary_data": True}}, {"name": "z"}],
         "parameters": {"binary_data_output": False}},
        b"\x01\x00\x00\x00\xff\xff\xff\xff", b"\x01\x00\x00\x00a\x00\x00\x00\x00")
    req, binary = decode(body, hlen, version=3)
    assert (req.model, req.version, req.id, req.protocol, req.outputs) == ("m", 3, "42", "rest_v2", ["y", "z"])
    x, s, j = req.inputs
    assert (x.name, x.datatype, x.shape) == ("x", "INT32", (2,))
    np.testing.assert_array_equal(x.data, np.array([1, -1], dtype=np.int32))
    assert x.data.dtype == np.int32
    assert s.shape == (1, 2) and s.data.tolist() == [[b"a", b""]]
    assert j.data.dtype == np.float64 and j.data.tolist() == [0.25]
    assert binary.wants("y") and not binary.wants("z") and not binary.wants("other")


def test_tritonclient_request_bodies_decode_and_our_responses_parse():
    """The real client library builds the request (binary and JSON inputs) and parses our
    response (binary and JSON outputs); the numbers survive both ways."""
    httpclient = pytest.importorskip("tritonclient.http")
    x = np.arange(6, dtype=np.float32).reshape(2, 3) / 4
    words = np.array([b"hi", b"\xff\x00", b""], dtype=object)
    i1 = httpclient.InferInput("x", [2, 3], "FP32")
    i1.set_data_from_numpy(x, binary_data=True)
    i2 = httpclient.InferInput("w", [3], "BYTES")
    i2.set_data_from_numpy(words, binary_data=True)
    i3 = httpclient.InferInput("k", [2], "INT64")
    i3.set_data_from_numpy(np.array([5, -5], dtype=np.int64), binary_data=False)
    outs = [httpclient.InferRequestedOutput("y", binary_data=True),
            httpclient.InferRequestedOutput("n", binary_data=False)]
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [i1, i2, i3], outputs=outs, request_id="c1")
    req, binary = decode(body, json_size)
    got = {t.name: t.data for t in req.inputs}
    np.testing.assert_array_equal(got["x"], x)
    assert got["w"].tolist() == words.tolist()
    assert got["k"].tolist() == [5, -5] and req.id == "c1"
    assert binary.wants("y") and not binary.wants("n")

    y = (x * 2).astype(np.float32)
    n = np.array([[True, False]])
    resp_body, hlen = codec.encode_infer(
        InferResponse("m", 4, [Tensor("y", "FP32", (2, 3), y), Tensor("n", "BOOL", (1, 2), n)],
                      id="c1"), binary)
    result = httpclient.InferenceServerClient.parse_response_body(resp_body, header_length=hlen)
    np.testing.assert_array_equal(result.as_numpy("y"), y)
    np.testing.assert_array_equal(result.as_numpy("n"), n)
    assert result.get_response()["model_version"] == "4"


# ---- round trips: every datatype, JSON and binary ---------------------------------------

@pytest.mark.parametrize("dt", ALL)
def test_json_request_round_trip_every_datatype(dt):
    arr = sample(dt)
    body = orjson.dumps({"inputs": [{"name": "x", "datatype": dt, "shape": [2, 3],
                                     "data": json_values(dt, arr)}]})
    req, _ = decode(body)
    t = req.inputs[0]
    assert (t.name, t.datatype, t.shape, t.data.shape) == ("x", dt, (2, 3), (2, 3))
    if dt == "BYTES":
        assert t.data.tolist() == arr.tolist()
    else:
        assert t.data.dtype == arr.dtype, (t.data.dtype, arr.dtype)
        np.testing.assert_array_equal(t.data, arr)


@pytest.mark.parametrize("dt", ALL)
def test_binary_request_round_trip_every_datatype(dt):
    arr = sample(dt)
    raw = bytes_elems(arr) if dt == "BYTES" else arr.astype(arr.dtype.newbyteorder("<")).tobytes()
    body, hlen = binary_body({"inputs": [{"name": "x", "datatype": dt, "shape": [2, 3],
                                          "parameters": {"binary_data_size": len(raw)}}]}, raw)
    t = decode(body, hlen)[0].inputs[0]
    if dt == "BYTES":
        assert t.data.tolist() == arr.tolist()
    else:
        assert t.data.dtype == arr.dtype
        np.testing.assert_array_equal(t.data, arr)


@pytest.mark.parametrize("dt", ALL)
@pytest.mark.parametrize("as_binary", [False, True], ids=["json", "binary"])
def test_response_round_trip_every_datatype(dt, as_binary):
    """encode_infer, then decoding its output as if it were a request body, gives back the
    very tensor: both directions agree on the layout of every datatype."""
    arr = sample(dt)
    body, hlen = codec.encode_infer(InferResponse("m", 1, [Tensor("y", dt, (2, 3), arr)]),
                                    codec.BinaryOutputs(as_binary, {}))
    assert (hlen is not None) == as_binary
    doc = orjson.loads(body[:hlen] if as_binary else body)
    (out,) = doc["outputs"]
    as_request = {"inputs": [{**out, "name": "y"}]}
    back = orjson.dumps(as_request) + (body[hlen:] if as_binary else b"")
    t = decode(back, len(orjson.dumps(as_request)) if as_binary else None)[0].inputs[0]
    if dt == "BYTES":
        assert t.data.tolist() == arr.tolist()
    else:
        assert t.data.dtype == arr.dtype
        np.testing.assert_array_equal(t.data, arr)


def test_bf16_json_values_are_the_floats_the_bits_stand_for():
    bits = np.array([0x3F80, 0xC040, 0x3EAB], dtype=np.uint16)  # 1.0, -3.0, 0.333984375
    body, _ = codec.encode_infer(InferResponse("m", 1, [Tensor("y", "BF16", (3,), bits)]),
                                 codec.BinaryOutputs(False, {}))
    assert orjson.loads(body)["outputs"][0]["data"] == [1.0, -3.0, 0.333984375]


def test_non_finite_floats_are_null_in_json_and_exact_in_binary():
    arr = np.array([np.nan, np.inf, -np.inf, 1.5], dtype=np.float32)
    body, _ = codec.encode_infer(InferResponse("m", 1, [Tensor("y", "FP32", (4,), arr)]),
                                 codec.BinaryOutputs(False, {}))
    assert orjson.loads(body)["outputs"][0]["data"] == [None, None, None, 1.5]
    body, hlen = codec.encode_infer(InferResponse("m", 1, [Tensor("y", "FP32", (4,), arr)]),
                                    codec.BinaryOutputs(True, {}))
    np.testing.assert_array_equal(np.frombuffer(body[hlen:], np.float32), arr)


def test_scalar_and_empty_shapes():
    req, _ = decode(b'{"inputs": [{"name": "s", "datatype": "INT64", "shape": [], "data": 7}]}')
    assert req.inputs[0].shape == () and req.inputs[0].data.tolist() == 7
    req, _ = decode(b'{"inputs": [{"name": "e", "datatype": "FP32", "shape": [0, 4], "data": []}]}')
    assert req.inputs[0].data.shape == (0, 4)
    body, hlen = binary_body({"inputs": [{"name": "e", "datatype": "BYTES", "shape": [0],
                                          "parameters": {"binary_data_size": 0}}]})
    assert decode(body, hlen)[0].inputs[0].data.shape == (0,)


def test_nested_json_data_is_accepted_as_row_major():
    req, _ = decode(b'{"inputs": [{"name": "x", "datatype": "INT32", "shape": [2, 2], '
                    b'"data": [[1, 2], [3, 4]]}]}')
    assert req.inputs[0].data.tolist() == [[1, 2], [3, 4]]


_finite = {"allow_nan": False, "allow_infinity": False}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(NUMERIC + ("BOOL",)).flatmap(lambda dt: st.tuples(
    st.just(dt), hnp.arrays(dtypes.numpy_dtype(dt), hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
                            elements={"allow_subnormal": False, **_finite}
                            if dtypes.numpy_dtype(dt).kind == "f" else None))))
def test_property_json_and_binary_round_trip(dt_arr):
    dt, arr = dt_arr
    arr = np.ascontiguousarray(arr)
    js = orjson.dumps({"inputs": [{"name": "x", "datatype": dt, "shape": list(arr.shape),
                                   "data": arr.reshape(-1).tolist()}]})
    t = decode(js)[0].inputs[0]
    assert t.data.dtype == arr.dtype and t.data.shape == arr.shape
    np.testing.assert_array_equal(t.data, arr)
    raw = arr.tobytes()
    body, hlen = binary_body({"inputs": [{"name": "x", "datatype": dt, "shape": list(arr.shape),
                                          "parameters": {"binary_data_size": len(raw)}}]}, raw)
    t = decode(body, hlen)[0].inputs[0]
    np.testing.assert_array_equal(t.data, arr)
    out, h = codec.encode_infer(InferResponse("m", 1, [Tensor("y", dt, arr.shape, arr)]),
                                codec.BinaryOutputs(True, {}))
    assert out[h:] == raw


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=8))
def test_property_bytes_binary_framing_round_trips(items):
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    out, h = codec.encode_infer(InferResponse("m", 1, [Tensor("y", "BYTES", (len(items),), arr)]),
                                codec.BinaryOutputs(True, {}))
    raw = out[h:]
    assert raw == bytes_elems(arr) and orjson.loads(out[:h])["outputs"][0]["parameters"] == {
        "binary_data_size": len(raw)}
    body, hlen = binary_body({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [len(items)],
                                          "parameters": {"binary_data_size": len(raw)}}]}, raw)
    assert decode(body, hlen)[0].inputs[0].data.tolist() == items


# ---- errors: one clear line, the right code -------------------------------------------

def _x(**over):
    t = {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0]}
    t.update(over)
    return t


BAD_JSON = [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b"{}", "non-empty 'inputs' list"),
    (b'{"inputs": []}', "non-empty 'inputs' list"),
    (b'{"inputs": [1]}', "inputs[0] must be an object"),
    (orjson.dumps({"inputs": [_x(name="")]}), "'name' must be a non-empty string"),
    (orjson.dumps({"inputs": [_x(datatype="FP128")]}), "unknown datatype 'FP128'"),
    (orjson.dumps({"inputs": [_x(shape=[-1])]}), "non-negative integers"),
    (orjson.dumps({"inputs": [_x(shape=[True])]}), "non-negative integers"),
    (orjson.dumps({"inputs": [_x(shape="2")]}), "non-negative integers"),
    (orjson.dumps({"inputs": [_x(shape=[3])]}), "needs 3 elements, data has 2"),
    (orjson.dumps({"inputs": [_x(shape=[0, 1 << 40, 1 << 40])]}), "too large"),
    (orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2]}]}), "needs 'data'"),
    (orjson.dumps({"inputs": [_x(data=["a", "b"])]}), "does not fit datatype FP32"),
    (orjson.dumps({"inputs": [_x(data=[[1.0], [2.0, 3.0]])]}), "FP32"),
    (orjson.dumps({"inputs": [_x(datatype="INT8", data=[1, 300])]}), "does not fit datatype INT8"),
    (orjson.dumps({"inputs": [_x(datatype="BOOL", data=[1, 0])]}), "BOOL data must be true/false"),
    (orjson.dumps({"inputs": [_x(parameters=[1])]}), "'parameters' must be an object"),
    (orjson.dumps({"inputs": [_x()], "parameters": 3}), "'parameters' must be an object"),
    (orjson.dumps({"inputs": [_x()], "outputs": [{"nom": "y"}]}), "'outputs' must be a list"),
    (orjson.dumps({"inputs": [_x(parameters={"binary_data_size": -1})]}), "non-negative integer"),
    (orjson.dumps({"inputs": [_x(parameters={"binary_data_size": 8})]}), "runs past"),
]


@pytest.mark.parametrize("body,fragment", BAD_JSON, ids=[f[1][:30] for f in BAD_JSON])
def test_bad_json_bodies_are_invalid_argument_with_a_reason(body, fragment):
    with pytest.raises(ServingError) as e:
        decode(body)
    assert e.value.code is Code.INVALID_ARGUMENT
    assert fragment in e.value.message, e.value.message
    assert "\n" not in e.value.message


def _bin(size: int, dt: str = "FP32", shape=(2,)):
    return {"inputs": [{"name": "x", "datatype": dt, "shape": list(shape),
                        "parameters": {"binary_data_size": size}}]}


BAD_BINARY = [
    (_bin(8), b"\x00" * 4, "runs past"),
    (_bin(4), b"\x00" * 4, "needs 8 bytes"),
    (_bin(8), b"\x00" * 12, "4 bytes of binary data after the last input"),
    (_bin(3, "BYTES", (1,)), b"\x05\x00\x00", "ends inside an element length"),
    (_bin(6, "BYTES", (1,)), b"\x05\x00\x00\x00ab", "runs past the end of the data"),
    (_bin(7, "BYTES", (1,)), b"\x01\x00\x00\x00abc", "2 bytes left over after 1 BYTES elements"),
]


@pytest.mark.parametrize("header,raw,fragment", BAD_BINARY, ids=[f[2][:30] for f in BAD_BINARY])
def test_bad_binary_bodies_are_invalid_argument_with_a_reason(header, raw, fragment):
    body, hlen = binary_body(header, raw)
    with pytest.raises(ServingError) as e:
        decode(body, hlen)
    assert e.value.code is Code.INVALID_ARGUMENT
    assert fragment in e.value.message, e.value.message


@pytest.mark.parametrize("hlen", [-1, 10_000])
def test_header_length_outside_the_body_is_refused(hlen):
    with pytest.raises(ServingError) as e:
        decode(orjson.dumps({"inputs": [_x()]}), hlen)
    assert e.value.code is Code.INVALID_ARGUMENT and "Inference-Header-Content-Length" in e.value.message


def test_element_limit_is_too_large_and_counts_every_input():
    body = orjson.dumps({"inputs": [_x(), _x(name="y")]})
    assert len(decode(body, limit=4)[0].inputs) == 2
    with pytest.raises(ServingError) as e:
        decode(body, limit=3)
    assert e.value.code is Code.TOO_LARGE and "3 tensor elements" in e.value.message
