"""KServe v2 REST codec: JSON tensors and Triton's binary tensor data extension.

Wire -> `InferRequest` and `InferResponse` -> wire; no I/O, no routing, no model
knowledge. Tensors are built with numpy (no per-element Python loops on the binary
path), and responses are encoded with orjson straight from numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from runtime import dtypes, errors
from runtime.protocol.tensors import bf16_bits, bf16_values, decode_bytes_elems, element_count
from runtime.types import InferRequest, InferResponse, Tensor

HEADER_LEN = "inference-header-content-length"
_ALL_TYPES = (*dtypes.SUPPORTED, "BYTES")


def _shape(name: str, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0 for d in shape):
        raise errors.invalid(f"input '{name}': 'shape' must be a list of non-negative integers, "
                             f"got {shape!r}")
    return tuple(shape)


def _decode_json_data(name: str, dt: str, shape: tuple[int, ...], data: Any) -> np.ndarray:
    if not isinstance(data, list):
        data = [data]
    try:
        if dt == "BYTES":
            arr = np.array([d.encode() if isinstance(d, str) else d for d in _flatten(data)], dtype=object)
        elif dt == "BF16":
            arr = bf16_bits(np.asarray(data, dtype=np.float32))
        elif dt == "BOOL":
            arr = np.asarray(data)
            if arr.size and arr.dtype != np.bool_:
                raise ValueError("BOOL data must be true/false")
        else:
            arr = np.asarray(data, dtype=dtypes.numpy_dtype(dt))
    except (ValueError, TypeError, OverflowError) as e:
        raise errors.invalid(f"input '{name}': data does not fit datatype {dt}: {e}") from None
    if arr.dtype == object and dt != "BYTES":
        raise errors.invalid(f"input '{name}': ragged or non-numeric data for datatype {dt}")
    if arr.size != element_count(name, shape):
        raise errors.invalid(f"input '{name}': shape {list(shape)} needs {element_count(name, shape)} "
                             f"elements, data has {arr.size}")
    return arr.reshape(shape)


def _flatten(x):
    for v in x:
        if isinstance(v, list):
            yield from _flatten(v)
        else:
            yield v


@dataclass(frozen=True, slots=True)
class BinaryOutputs:
    """Which outputs the client wants as binary data: a wire choice, kept off the request."""

    default: bool  # the request's `binary_data_output` parameter
    per_output: dict[str, bool]  # each requested output's `binary_data` parameter

    def wants(self, name: str) -> bool:
        return self.per_output.get(name, self.default)


def decode_infer(body: bytes, header_length: int | None, model: str, version: int | None,
                 max_elements: int) -> tuple[InferRequest, BinaryOutputs]:
    """Request body -> (InferRequest, how its outputs are to be encoded)."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise errors.invalid(f"Inference-Header-Content-Length is {header_length} but the "
                                 f"body has only {len(body)} bytes")
        json_part, binary = body[:header_length], memoryview(body)[header_length:]
    else:
        json_part, binary = body, memoryview(b"")
    try:
        doc = orjson.loads(json_part)
    except orjson.JSONDecodeError as e:
        raise errors.invalid(f"malformed JSON request body: {e}") from None
    if not isinstance(doc, dict):
        raise errors.invalid("request body must be a JSON object with an 'inputs' list")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise errors.invalid("request body needs a non-empty 'inputs' list")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise errors.invalid("'parameters' must be an object")
    label = params.get("label")  # splitserve's: route to a label's version (TF Serving has a URL)
    if label is not None and (not isinstance(label, str) or not label):
        raise errors.invalid(f"parameters.label must be a label name (a non-empty string), got {label!r}")
    tensors, offset, total = [], 0, 0
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise errors.invalid(f"inputs[{i}] must be an object with name, shape, datatype")
        name = t.get("name")
        if not isinstance(name, str) or not name:
            raise errors.invalid(f"inputs[{i}]: 'name' must be a non-empty string")
        dt = t.get("datatype")
        if dt not in _ALL_TYPES:
            raise errors.invalid(f"input '{name}': unknown datatype {dt!r}; expected one of "
                                 f"{', '.join(_ALL_TYPES)}")
        shape = _shape(name, t.get("shape"))
        count = element_count(name, shape)
        total += count
        if total > max_elements:
            raise errors.ServingError(errors.Code.TOO_LARGE, f"request has more than "
                                      f"{max_elements} tensor elements (the configured limit)")
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise errors.invalid(f"input '{name}': 'parameters' must be an object")
        size = tparams.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise errors.invalid(f"input '{name}': binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise errors.invalid(f"input '{name}': binary_data_size {size} runs past the "
                                     f"{len(binary) - offset} binary bytes left in the body")
            raw = binary[offset:offset + size]
            offset += size
            if dt == "BYTES":
                arr = decode_bytes_elems(name, raw, count).reshape(shape)
            else:
                need = count * dtypes.ITEMSIZE[dt]
                if size != need:
                    raise errors.invalid(f"input '{name}': binary_data_size {size} but shape "
                                         f"{list(shape)} of {dt} needs {need} bytes")
                arr = np.frombuffer(raw, dtype=dtypes.numpy_dtype(dt)).reshape(shape)
        else:
            if "data" not in t:
                raise errors.invalid(f"input '{name}': needs 'data' (or binary_data_size)")
            arr = _decode_json_data(name, dt, shape, t["data"])
        tensors.append(Tensor(name, dt, shape, arr))
    if offset != len(binary):
        raise errors.invalid(f"{len(binary) - offset} bytes of binary data after the last input "
                             f"(Inference-Header-Content-Length or binary_data_size is wrong)")
    outputs, binary_out = None, bool(params.get("binary_data_output", False))
    req_outputs = doc.get("outputs")
    per_output_binary: dict[str, bool] = {}
    if req_outputs is not None:
        if not isinstance(req_outputs, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                        for o in req_outputs):
            raise errors.invalid("'outputs' must be a list of objects with a 'name'")
        outputs = [o["name"] for o in req_outputs]
        for o in req_outputs:
            p = o.get("parameters") or {}
            if isinstance(p, dict) and "binary_data" in p:
                per_output_binary[o["name"]] = bool(p["binary_data"])
    rid = doc.get("id")
    req = InferRequest(model=model, inputs=tensors, version=version, label=label,
                       outputs=outputs, id=str(rid) if rid is not None else None,
                       parameters=params, protocol="rest_v2")
    return req, BinaryOutputs(binary_out, per_output_binary)


_NUMPY_OK = frozenset({"FP32", "FP64", "FP16", "INT8", "INT16", "INT32", "INT64", "UINT8",
                       "UINT16", "UINT32", "UINT64", "BOOL"})


def _json_data(t: Tensor):
    arr = t.data.reshape(-1)
    if t.datatype == "BF16":
        arr = bf16_values(arr)
    if t.datatype == "BYTES":
        return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr]
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        # JSON has no NaN/Infinity; orjson would write null. Say so explicitly instead.
        return [None if not math.isfinite(x) else x for x in arr.tolist()]
    return arr if t.datatype in _NUMPY_OK and arr.dtype != np.float16 else arr.tolist()


def _binary_bytes(t: Tensor) -> bytes:
    if t.datatype == "BYTES":
        parts = []
        for x in t.data.reshape(-1):
            b = x if isinstance(x, bytes) else str(x).encode()
            parts += [len(b).to_bytes(4, "little"), b]
        return b"".join(parts)
    return np.ascontiguousarray(t.data).tobytes()


def encode_infer(resp: InferResponse, binary: BinaryOutputs) -> tuple[bytes, int | None]:
    """InferResponse -> (body, Inference-Header-Content-Length or None when all JSON)."""
    outs, chunks = [], []
    for t in resp.outputs:
        o = {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
        if binary.wants(t.name):
            raw = _binary_bytes(t)
            o["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            o["data"] = _json_data(t)
        outs.append(o)
    doc = {"model_name": resp.model, "model_version": str(resp.version), "outputs": outs}
    if resp.id is not None:
        doc["id"] = resp.id
    head = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)
