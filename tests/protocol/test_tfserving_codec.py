"""TF Serving REST codec: row and columnar decode/encode, status and metadata shapes,
golden payloads from TF Serving's api_rest.md and its REST handler tests."""

import json

import numpy as np
import orjson
import pytest

from runtime.errors import Code, ServingError
from runtime.protocol import tfserving_rest as tfs
from runtime.types import InferResponse, Signature, Tensor, TensorSpec, VersionState

X = [TensorSpec("x", "FP32", (-1,))]
X2 = [TensorSpec("x", "FP32", (-1, 2))]
MULTI = [TensorSpec("tag", "BYTES", (-1,)), TensorSpec("signal", "INT64", (-1, 5)),
         TensorSpec("sensor", "INT32", (-1, 2, 2))]


def decode(body, specs=X, max_elements=1 << 20, **kw):
    return tfs.decode_predict(tfs.parse_request(body if isinstance(body, bytes) else
                                                orjson.dumps(body)), "m", specs, max_elements, **kw)


def fails(body, specs=X, code=Code.INVALID_ARGUMENT, **kw) -> str:
    with pytest.raises(ServingError) as ei:
        decode(body, specs, **kw)
    assert ei.value.code is code, ei.value
    return ei.value.message


def resp(*outs: tuple[str, np.ndarray]) -> InferResponse:
    return InferResponse("m", 1, [Tensor(n, "FP32" if a.dtype == np.float32 else "INT64",
                                         a.shape, a) for n, a in outs])


# ---- golden payloads ---------------------------------------------------------------

def test_half_plus_three_doc_example_row():
    # api_rest.md: curl -d '{"instances": [1.0,2.0,5.0]}' ...:predict -> {"predictions": [3.5, 4.0, 5.5]}
    req, fmt = decode(b'{"instances": [1.0,2.0,5.0]}')
    assert fmt == tfs.ROW and req.protocol == "rest_tfs" and req.model == "m"
    (t,) = req.inputs
    assert (t.name, t.datatype, t.shape) == ("x", "FP32", (3,))
    assert t.data.dtype == np.float32 and t.data.tolist() == [1.0, 2.0, 5.0]
    y = t.data * 0.5 + 3
    assert json.loads(tfs.encode_predict(resp(("y", y)), fmt)) == {"predictions": [3.5, 4.0, 5.5]}


def test_handler_test_examples_row_and_columnar():
    # http_rest_api_handler_test.cc: half_plus_two
    req, fmt = decode({"instances": [[1.0, 2.0], [3.0, 4.0]]}, X2)
    assert req.inputs[0].shape == (2, 2)
    out = tfs.encode_predict(resp(("y", req.inputs[0].data * 0.5 + 2)), fmt)
    assert json.loads(out) == {"predictions": [[2.5, 3.0], [3.5, 4.0]]}
    req, fmt = decode({"signature_name": "serving_default", "inputs": [3.0, 4.0]})
    assert fmt == tfs.COLUMNAR and req.inputs[0].shape == (2,)
    out = tfs.encode_predict(resp(("y", req.inputs[0].data * 0.5 + 2)), fmt)
    assert json.loads(out) == {"outputs": [3.5, 4.0]}


def test_doc_multi_input_row_equals_columnar():
    # api_rest.md: three named inputs, two instances; the columnar form is the same request
    rows = {"instances": [{"tag": "foo", "signal": [1, 2, 3, 4, 5], "sensor": [[1, 2], [3, 4]]},
                          {"tag": "bar", "signal": [3, 4, 1, 2, 5], "sensor": [[4, 5], [6, 8]]}]}
    cols = {"inputs": {"tag": ["foo", "bar"], "signal": [[1, 2, 3, 4, 5], [3, 4, 1, 2, 5]],
                       "sensor": [[[1, 2], [3, 4]], [[4, 5], [6, 8]]]}}
    a, fa = decode(rows, MULTI)
    b, fb = decode(cols, MULTI)
    assert (fa, fb) == (tfs.ROW, tfs.COLUMNAR)
    for s, ta, tb in zip(MULTI, a.inputs, b.inputs):
        assert ta.name == tb.name == s.name and ta.datatype == s.datatype
        assert ta.shape == tb.shape and np.array_equal(ta.data, tb.data)
    assert a.inputs[0].data.tolist() == [b"foo", b"bar"]
    assert a.inputs[1].data.dtype == np.int64 and a.inputs[2].data.dtype == np.int32
    assert a.inputs[2].shape == (2, 2, 2)


def test_status_golden():
    class S:
        version, state, error = 123, VersionState.AVAILABLE, None
    assert tfs.model_status([S()]) == {"model_version_status": [
        {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}


def test_status_states_and_failure():
    names = {st: tfs.version_status(1, st, None)["state"] for st in VersionState}
    assert names == {VersionState.START: "START", VersionState.LOADING: "LOADING",
                     VersionState.AVAILABLE: "AVAILABLE", VersionState.UNLOADING: "UNLOADING",
                     VersionState.END: "END", VersionState.FAILED: "END"}
    # a failed load: END with an error, as TF Serving's state monitor reports it
    assert tfs.version_status(3, VersionState.FAILED, "bad header") == {
        "version": "3", "state": "END", "status": {"error_code": "UNKNOWN", "error_message": "bad header"}}
    assert tfs.version_status(2, VersionState.END, None)["status"] == {"error_code": "OK", "error_message": ""}


def test_metadata_golden_serving_default():
    # saved_model_half_plus_two_2_versions_metadata.json, serving_default entry (our tensors
    # are named by their input names, not graph names like "x:0")
    sig = Signature((TensorSpec("x", "FP32", (-1, 1)),), (TensorSpec("y", "FP32", (-1, 1)),))
    dims = {"dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}], "unknown_rank": False}
    assert tfs.model_metadata("saved_model_half_plus_two_2_versions", 123, sig) == {
        "model_spec": {"name": "saved_model_half_plus_two_2_versions", "signature_name": "",
                       "version": "123"},
        "metadata": {"signature_def": {"signature_def": {"serving_default": {
            "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": dims, "name": "x"}},
            "outputs": {"y": {"dtype": "DT_FLOAT", "tensor_shape": dims, "name": "y"}},
            "method_name": "tensorflow/serving/predict", "defaults": {}}}}}}


def test_metadata_unknown_rank_and_dtypes():
    sig = Signature((TensorSpec("a", "INT64", (-1,)),), (TensorSpec("b", "BF16", (-1,)),), derived=True)
    sd = tfs.model_metadata("m", 1, sig)["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert sd["inputs"]["a"] == {"dtype": "DT_INT64", "tensor_shape": {"dim": [], "unknown_rank": True}, "name": "a"}
    assert sd["outputs"]["b"]["dtype"] == "DT_BFLOAT16"
    assert [tfs.tf_dtype(d) for d in ("FP16", "FP64", "BOOL", "UINT8", "BYTES")] == [
        "DT_HALF", "DT_DOUBLE", "DT_BOOL", "DT_UINT8", "DT_STRING"]


# ---- decode ------------------------------------------------------------------------

def test_row_single_input_objects_and_scalars():
    req, _ = decode({"instances": [{"x": [1, 2]}, {"x": [3, 4]}]}, X2)
    assert req.inputs[0].data.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    req, _ = decode({"inputs": 7})  # a bare scalar is a rank-0 tensor
    assert req.inputs[0].shape == () and req.inputs[0].data.item() == 7.0


def test_version_and_label_carried():
    req, _ = decode({"instances": [1.0]}, version=2)
    assert req.version == 2 and req.label is None
    req, _ = decode({"instances": [1.0]}, label="canary")
    assert req.label == "canary" and req.version is None


def test_nan_and_infinity_tokens_accepted():
    req, _ = decode(b'{"instances": [NaN, Infinity, -Infinity, 1]}')
    d = req.inputs[0].data
    assert np.isnan(d[0]) and d[1] == np.inf and d[2] == -np.inf and d[3] == 1


def test_b64_decoded_for_bytes_input():
    req, _ = decode({"instances": [{"b64": "aW1hZ2UgYnl0ZXM="}, "plain"]}, [TensorSpec("img", "BYTES", (-1,))])
    assert req.inputs[0].data.tolist() == [b"image bytes", b"plain"]
    assert "base64" in fails({"instances": [{"b64": "!!"}]}, [TensorSpec("img", "BYTES", (-1,))])


@pytest.mark.parametrize("body, specs, words", [
    (b"", X, "document is empty"),
    (b"instances = [1, 2]", X, "JSON Parse error"),
    (b"[1, 2]", X, "JSON object"),
    ({"signature_name": 100, "instances": [1]}, X, "'signature_name' key must be a string"),
    ({"signature_name": "classify_x", "instances": [1]}, X, '"classify_x" not found'),
    ({"instances": [1], "inputs": [1]}, X, "only one of 'inputs' or 'instances'"),
    ({"examples": [1]}, X, "Missing 'inputs' or 'instances' key"),
    ({"instances": []}, X, "No values in 'instances'"),
    ({"instances": {"x": 1}}, X, "'instances' to be a list"),
    ({"instances": [[1, 2], [3]]}, X2, "ragged"),
    ({"instances": [[1, 2], {"x": [1, 2]}]}, X2, "got object at item 1"),
    ({"instances": [{"x": [1, 2]}, [3, 4]]}, X2, "got value/list at item 1"),
    ({"instances": [{"x": [1, 2], "z": 1}]}, X2, "keys must be equal to: x"),
    ({"instances": ["1.5"]}, X, 'JSON string "1.5" is not of expected type: DT_FLOAT'),
    ({"instances": [True]}, X, "true/false is not of expected type: DT_FLOAT"),
    ({"instances": [None]}, X, "null is not of expected type"),
    ({"instances": [{"b64": "aGk="}]}, X, 'binary {"b64": ...} values need a string'),
    ({"instances": [1e39]}, X, "without loss of precision"),
    ({"instances": [16777217]}, X, "without loss of precision"),
    ({"instances": [1.5]}, [TensorSpec("n", "INT32", (-1,))], "decimal numbers are not of expected type: DT_INT32"),
    ({"instances": [2 ** 31]}, [TensorSpec("n", "INT32", (-1,))], "out of range for DT_INT32"),
    ({"instances": [1]}, [TensorSpec("f", "BOOL", (-1,))], "use true/false"),
    ({"instances": [[1, 2]]}, MULTI, "expecting list of objects"),
    ({"inputs": [1, 2]}, MULTI, "expecting an object"),
    ({"inputs": {"tag": ["a"], "signal": [[1, 2, 3, 4, 5]]}}, MULTI, "Missing named input: sensor"),
])
def test_errors_name_the_fault(body, specs, words):
    assert words in fails(body if isinstance(body, bytes) else orjson.dumps(body), specs)


def test_element_limit():
    msg = fails({"instances": [[1.0, 2.0]] * 5}, X2, Code.TOO_LARGE, max_elements=8)
    assert "10" in msg and "limit of 8" in msg


def test_no_inputs_declared():
    assert "declares no inputs" in fails({"instances": [1]}, [])


# ---- encode ------------------------------------------------------------------------

def test_encode_multi_output_row_and_columnar():
    r = resp(("scores", np.array([[0.5, 0.25], [1.0, 2.0]], dtype=np.float32)),
             ("label", np.array([1, 0], dtype=np.int64)))
    assert json.loads(tfs.encode_predict(r, tfs.ROW)) == {"predictions": [
        {"scores": [0.5, 0.25], "label": 1}, {"scores": [1.0, 2.0], "label": 0}]}
    assert json.loads(tfs.encode_predict(r, tfs.COLUMNAR)) == {"outputs": {
        "scores": [[0.5, 0.25], [1.0, 2.0]], "label": [1, 0]}}


def test_encode_float32_shortest_and_nonfinite_tokens():
    out = tfs.encode_predict(resp(("y", np.array([0.1, 1.0], dtype=np.float32))), tfs.COLUMNAR)
    assert out == b'{"outputs":[0.1,1.0]}'  # no float32 -> double noise digits
    out = tfs.encode_predict(resp(("y", np.array([np.nan, np.inf, -np.inf, 1.0], dtype=np.float32))), tfs.ROW)
    assert b"NaN" in out and b"-Infinity" in out
    v = json.loads(out)["predictions"]
    assert np.isnan(v[0]) and v[1:] == [np.inf, -np.inf, 1.0]


def test_encode_row_needs_consistent_batch():
    r = resp(("a", np.zeros((2, 3), np.float32)), ("b", np.zeros((3,), np.float32)))
    with pytest.raises(ServingError, match="inconsistent batch size"):
        tfs.encode_predict(r, tfs.ROW)
    with pytest.raises(ServingError, match="no shape information"):
        tfs.encode_predict(resp(("a", np.float32(1.0).reshape(()))), tfs.ROW)
    assert json.loads(tfs.encode_predict(r, tfs.COLUMNAR))["outputs"]["b"] == [0.0, 0.0, 0.0]
