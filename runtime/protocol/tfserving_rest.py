"""TF Serving REST codec (api_rest.md): predict in row ("instances") and columnar
("inputs") format, model status and model metadata, as TF Serving spells them.

Wire-free like kserve_rest: JSON in, `InferRequest` out, `InferResponse` in, JSON out.
TF Serving types JSON values by the signature, so decoding takes the input specs of the
version expected to serve. Values are checked the way TF Serving checks them (numbers for
floats, whole numbers for ints, true/false for bools, no lossy floats) with numpy, not
per element in Python.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import orjson

from runtime import errors
from runtime.types import InferRequest, InferResponse, Signature, TensorSpec, Tensor, VersionState

SIGNATURE = "serving_default"
METHOD = "tensorflow/serving/predict"
ROW, COLUMNAR = "row", "columnar"

DT = {"BOOL": "DT_BOOL", "UINT8": "DT_UINT8", "INT8": "DT_INT8", "INT16": "DT_INT16",
      "INT32": "DT_INT32", "INT64": "DT_INT64", "UINT16": "DT_UINT16", "UINT32": "DT_UINT32",
      "UINT64": "DT_UINT64", "FP16": "DT_HALF", "FP32": "DT_FLOAT", "FP64": "DT_DOUBLE",
      "BF16": "DT_BFLOAT16", "BYTES": "DT_STRING"}

# Our lifecycle states as GetModelStatus names them. A failed load is END with an error,
# which is how TF Serving's ServableStateMonitor reports one; UNKNOWN is TF's generic code.
_STATE = {VersionState.START: "START", VersionState.LOADING: "LOADING",
          VersionState.AVAILABLE: "AVAILABLE", VersionState.UNLOADING: "UNLOADING",
          VersionState.END: "END", VersionState.FAILED: "END"}

_FLOAT = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BF16": np.float32}
_MANTISSA = {"FP32": 24, "FP64": 53}  # ints beyond 2**digits - 1 are lossy (TF's rule)
_INT = {"INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
        "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}


def tf_dtype(datatype: str) -> str:
    return DT.get(datatype, "DT_INVALID")


# ---- request -----------------------------------------------------------------------

def parse_request(body: bytes) -> dict:
    """Body -> JSON object, accepting NaN/Infinity tokens as TF Serving does."""
    if not body.strip():
        raise errors.invalid("JSON Parse error: The document is empty")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        try:  # the stdlib parser takes NaN, Infinity and -Infinity; orjson does not
            doc = json.loads(body)
        except (ValueError, RecursionError):
            raise errors.invalid(f"JSON Parse error: {e}") from None
    if not isinstance(doc, dict):
        raise errors.invalid("JSON Parse error: the request body must be a JSON object "
                             "with 'instances' or 'inputs'")
    sig = doc.get("signature_name")
    if sig is not None and not isinstance(sig, str):
        raise errors.invalid("'signature_name' key must be a string value.")
    if sig not in (None, "", SIGNATURE):
        raise errors.invalid(f'Serving signature name: "{sig}" not found in signature def '
                             f'(splitserve models have one signature, "{SIGNATURE}")')
    return doc


def _is_b64(v: Any) -> bool:
    return isinstance(v, dict) and len(v) == 1 and isinstance(v.get("b64"), str)


def _bytes_array(name: str, value: Any) -> np.ndarray:
    """Strings (UTF-8) and {"b64": ...} objects -> object array of bytes (BYTES inputs)."""
    shape: list[int] = []
    v = value
    while isinstance(v, list):
        shape.append(len(v))
        v = v[0] if v else None
    flat: list[bytes] = []

    def walk(v: Any, level: int) -> None:
        if level < len(shape):
            if not isinstance(v, list) or len(v) != shape[level]:
                raise errors.invalid(f"input '{name}': ragged nested lists; every list at one "
                                     f"level must have the same length")
            for x in v:
                walk(x, level + 1)
        elif _is_b64(v):
            try:
                flat.append(base64.b64decode(v["b64"], validate=True))
            except (binascii.Error, ValueError):
                raise errors.invalid(f"input '{name}': Unable to base64 decode {_show(v)}") from None
        elif isinstance(v, str):
            flat.append(v.encode())
        else:
            raise errors.invalid(f"input '{name}': JSON value {_show(v)} is not of expected "
                                 f"type: DT_STRING (BYTES)")

    walk(value, 0)
    arr = np.empty(len(flat), dtype=object)
    arr[:] = flat
    return arr.reshape(shape)


def _show(v: Any) -> str:
    s = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _first_odd(arr: np.ndarray) -> Any:
    for v in arr.reshape(-1):
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            return v
    return arr.reshape(-1)[0]


def _to_array(name: str, spec: TensorSpec, value: Any) -> np.ndarray:
    """A nested JSON value -> numpy array of the spec's datatype, or a 400 naming the fault."""
    dt = spec.datatype
    if dt == "BYTES":
        return _bytes_array(name, value)
    want = f"{tf_dtype(dt)} ({dt})"
    try:
        raw = np.asarray(value)
    except ValueError:
        raise errors.invalid(f"input '{name}': ragged nested lists; every list at one level "
                             f"must have the same length (a tensor is rectangular)") from None
    kind = raw.dtype.kind
    if raw.size == 0:
        kind = "empty"
    elif kind == "O":
        odd = _first_odd(raw)
        if _is_b64(odd):
            raise errors.invalid(f"input '{name}': binary {{\"b64\": ...}} values need a string "
                                 f"(DT_STRING/BYTES) input, but the model declares {want}")
        if isinstance(odd, (list, dict)):
            raise errors.invalid(f"input '{name}': JSON value {_show(odd)} is not of expected "
                                 f"type: {want} (a list or object where a number belongs?)")
        if isinstance(odd, int):
            raise errors.invalid(f"input '{name}': integer {odd} is out of range for {want}")
        raise errors.invalid(f"input '{name}': JSON value {_show(odd)} is not of expected type: {want}")
    elif kind in "USV":
        raise errors.invalid(f"input '{name}': JSON string {_show(raw.reshape(-1)[0].item())} is "
                             f"not of expected type: {want}")
    if dt == "BOOL":
        if kind not in ("b", "empty"):
            raise errors.invalid(f"input '{name}': JSON numbers are not of expected type: {want}; "
                                 f"use true/false")
        return raw.astype(np.bool_, copy=False)
    if kind == "b":
        raise errors.invalid(f"input '{name}': JSON true/false is not of expected type: {want}")
    if dt in _INT:
        if kind == "f":
            raise errors.invalid(f"input '{name}': JSON decimal numbers are not of expected type: "
                                 f"{want}; send whole numbers")
        info = np.iinfo(_INT[dt])
        if kind != "empty" and (raw.min() < info.min or raw.max() > info.max):
            raise errors.invalid(f"input '{name}': a value is out of range for {want} "
                                 f"[{info.min}, {info.max}]")
        return raw.astype(_INT[dt])
    if dt in _FLOAT:
        if kind in "iu" and dt in _MANTISSA and np.abs(raw).max() > 2 ** _MANTISSA[dt] - 1:
            raise errors.invalid(f"input '{name}': Cannot convert an integer over "
                                 f"{2 ** _MANTISSA[dt] - 1} to {want} without loss of precision.")
        with np.errstate(over="ignore"):
            arr = raw.astype(_FLOAT[dt])
        if arr.size and not np.array_equal(np.isinf(arr), np.isinf(raw)):
            raise errors.invalid(f"input '{name}': Cannot convert a value outside the range of "
                                 f"{want} without loss of precision.")
        if dt == "BF16":
            from runtime.protocol.kserve_rest import _bf16_bits
            arr = _bf16_bits(arr)
        return arr
    raise errors.invalid(f"input '{name}': datatype {dt} cannot be sent over the TF Serving API")


def _check_size(tensors: list[Tensor], max_elements: int) -> None:
    total = sum(int(t.data.size) for t in tensors)
    if total > max_elements:
        raise errors.ServingError(errors.Code.TOO_LARGE, f"request has {total} tensor "
                                  f"elements, over the configured limit of {max_elements}")


def _row(instances: Any, specs: Sequence[TensorSpec]) -> list[Tensor]:
    if not isinstance(instances, list):
        raise errors.invalid("Expecting 'instances' to be a list/array")
    if not instances:
        raise errors.invalid("No values in 'instances' array")
    names = [s.name for s in specs]
    objects = isinstance(instances[0], dict) and not _is_b64(instances[0])
    if not objects:
        if len(specs) > 1:
            raise errors.invalid(f"instances is a plain list, but expecting list of objects as "
                                 f"the model has {len(specs)} inputs: {', '.join(names)}")
        for i, v in enumerate(instances):
            if isinstance(v, dict) and not _is_b64(v):
                raise errors.invalid(f"Expecting value/list but got object at item {i} of 'instances'")
        s = specs[0]
        arr = _to_array(s.name, s, instances)
        return [Tensor(s.name, s.datatype, tuple(arr.shape), arr)]
    columns: dict[str, list] = {n: [] for n in names}
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict) or _is_b64(inst):
            raise errors.invalid(f"Expecting object but got value/list at item {i} of 'instances'")
        if inst.keys() != columns.keys():
            raise errors.invalid(f"item {i} of 'instances' has keys {', '.join(sorted(inst)) or 'none'};"
                                 f" keys must be equal to: {', '.join(sorted(names))}")
        for n in names:
            columns[n].append(inst[n])
    out = []
    for s in specs:
        arr = _to_array(s.name, s, columns[s.name])
        out.append(Tensor(s.name, s.datatype, tuple(arr.shape), arr))
    return out


def _columnar(inputs: Any, specs: Sequence[TensorSpec]) -> list[Tensor]:
    if not isinstance(inputs, dict) or _is_b64(inputs):
        if len(specs) > 1:
            raise errors.invalid(f"inputs is a plain value/list, but expecting an object as the "
                                 f"model has {len(specs)} inputs: {', '.join(s.name for s in specs)}")
        inputs = {specs[0].name: inputs}
    out = []
    for s in specs:  # like TF Serving, keys that name no input are ignored
        if s.name not in inputs:
            raise errors.invalid(f"Missing named input: {s.name} in 'inputs' object.")
        arr = _to_array(s.name, s, inputs[s.name])
        out.append(Tensor(s.name, s.datatype, tuple(arr.shape), arr))
    return out


def decode_predict(doc: dict, model: str, specs: Sequence[TensorSpec], max_elements: int, *,
                   version: int | None = None, label: str | None = None) -> tuple[InferRequest, str]:
    """Parsed predict body -> (InferRequest, ROW or COLUMNAR); `specs` type the JSON."""
    fmt = predict_format(doc)
    req = InferRequest(model=model, inputs=decode_inputs(doc, model, specs, max_elements),
                       version=version, label=label, protocol="rest_tfs")
    return req, fmt


def predict_format(doc: dict) -> str:
    """ROW ("instances") or COLUMNAR ("inputs"): known before any signature is."""
    has_rows, has_cols = "instances" in doc, "inputs" in doc
    if has_rows and has_cols:
        raise errors.invalid("expecting only one of 'inputs' or 'instances' keys to exist")
    if not (has_rows or has_cols):
        raise errors.invalid("Missing 'inputs' or 'instances' key")
    return ROW if has_rows else COLUMNAR


def decode_inputs(doc: dict, model: str, specs: Sequence[TensorSpec],
                  max_elements: int) -> list[Tensor]:
    """The body's tensors, typed by the signature of the version that will run them."""
    if not specs:
        raise errors.invalid(f"Failed to get input map for signature: DEFAULT (model '{model}' "
                             f"declares no inputs)")
    tensors = _row(doc["instances"], specs) if predict_format(doc) == ROW else _columnar(doc["inputs"], specs)
    _check_size(tensors, max_elements)
    return tensors


# ---- response ----------------------------------------------------------------------

def _values(t: Tensor) -> np.ndarray:
    if t.datatype == "BF16":
        from runtime.protocol.tensors import bf16_values as _bf16_values
        return _bf16_values(t.data).reshape(t.data.shape)
    if t.datatype == "FP16":
        return t.data.astype(np.float32)
    if t.datatype == "BYTES":
        return np.array([x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)
                         for x in t.data.reshape(-1)], dtype=object).reshape(t.data.shape)
    return t.data if t.data.flags.c_contiguous else np.ascontiguousarray(t.data)


def encode_predict(resp: InferResponse, fmt: str) -> bytes:
    """InferResponse -> {"predictions": ...} (row) or {"outputs": ...} (columnar)."""
    if not resp.outputs:
        raise errors.ServingError(errors.Code.INTERNAL, "Cannot convert empty tensor map to JSON")
    arrays = {t.name: _values(t) for t in resp.outputs}
    vals = {n: a.tolist() if a.dtype == object or a.ndim == 0 else a for n, a in arrays.items()}
    if fmt == ROW:
        batch = None
        for name, a in arrays.items():
            if a.ndim == 0:
                raise errors.invalid(f"Tensor name: {name} has no shape information (a row-format "
                                     f"answer needs a batch dimension; use 'inputs')")
            if batch is not None and a.shape[0] != batch:
                raise errors.invalid(f"Tensor name: {name} has inconsistent batch size: "
                                     f"{a.shape[0]} expecting: {batch} (use 'inputs')")
            batch = a.shape[0]
        if len(vals) == 1:
            body: Any = {"predictions": next(iter(vals.values()))}
        else:
            body = {"predictions": [{n: v[i] for n, v in vals.items()} for i in range(batch)]}
    else:
        body = {"outputs": next(iter(vals.values())) if len(vals) == 1 else vals}
    finite = all(a.dtype.kind != "f" or np.isfinite(a).all() for a in arrays.values())
    if finite:
        return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    # JSON has no NaN/Infinity; TF Serving writes them as bare tokens (api_rest.md, "JSON
    # conformance") and so do we, rather than orjson's silent null.
    return json.dumps(body, default=lambda o: o.tolist()).encode()


# ---- status and metadata -----------------------------------------------------------

def version_status(version: int, state: VersionState, error: str | None) -> dict:
    failed = state is VersionState.FAILED
    return {"version": str(version), "state": _STATE[state],
            "status": {"error_code": "UNKNOWN" if failed else "OK",
                       "error_message": (error or "load failed") if failed else ""}}


def model_status(statuses: Iterable, config_error: str | None = None) -> dict:
    """VersionStatus records -> GetModelStatusResponse JSON. A model.yaml error is the
    message of every version it did not already fail (their code stays OK: they serve)."""
    out = []
    for s in statuses:
        st = version_status(s.version, s.state, s.error)
        if config_error and not st["status"]["error_message"]:
            st["status"]["error_message"] = config_error
        out.append(st)
    return {"model_version_status": out}


def _tensor_info(spec: TensorSpec, derived: bool) -> dict:
    if derived and spec.shape == (-1,):  # shape not known: TF's unknown rank
        shape = {"dim": [], "unknown_rank": True}
    else:
        shape = {"dim": [{"size": str(d), "name": ""} for d in spec.shape], "unknown_rank": False}
    return {"dtype": tf_dtype(spec.datatype), "tensor_shape": shape, "name": spec.name}


def model_metadata(model: str, version: int, sig: Signature) -> dict:
    """GetModelMetadataResponse JSON with the one signature, "serving_default"."""
    sdef = {"inputs": {s.name: _tensor_info(s, sig.derived) for s in sig.inputs},
            "outputs": {s.name: _tensor_info(s, sig.derived) for s in sig.outputs},
            "method_name": METHOD, "defaults": {}}
    return {"model_spec": {"name": model, "signature_name": "", "version": str(version)},
            "metadata": {"signature_def": {"signature_def": {SIGNATURE: sdef}}}}
