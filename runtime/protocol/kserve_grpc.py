"""KServe v2 gRPC codec (Triton's `inference.GRPCInferenceService` messages).

Wire -> `InferRequest` and `InferResponse` -> wire, plus dict -> message helpers for the
read-only views (`runtime.service.metadata`, `Metrics.statistics`). No I/O, no routing.

Inputs in `raw_input_contents` become numpy arrays over the bytes protobuf hands us
(`np.frombuffer`), and reach the model as torch views of those bytes (`dtypes.to_torch`,
no further copy); typed `contents` (fp32_contents, ...) are converted
in C by numpy. Outputs always go back in `raw_output_contents`, as Triton does.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf import json_format

from runtime.repository.scan import is_version_name
from runtime import dtypes, errors
from runtime.errors import Code, ServingError
from runtime.protocol.pb import grpc_service_pb2 as pb
from runtime.protocol.tensors import decode_bytes_elems, element_count, encode_bytes_elems
from runtime.protocol.pb import model_config_pb2 as mc
from runtime.types import InferRequest, InferResponse, Tensor

_ALL_TYPES = frozenset((*dtypes.SUPPORTED, "BYTES"))
_ITEMSIZE = dict(dtypes.ITEMSIZE)
_NP = {name: dtypes.numpy_dtype(name) for name in dtypes.SUPPORTED}

# datatype -> the InferTensorContents field that carries it (FP16/BF16 have none: raw only)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# numpy dtype each contents field decodes to before the (range-checked) cast
_FIELD_NP = {
    "bool_contents": np.dtype(np.bool_), "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64), "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64), "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


def parse_version(v: str) -> int | None:
    """model_version: "" routes, "N" pins version N; anything else is INVALID_ARGUMENT."""
    if not v:
        return None
    if not is_version_name(v):
        raise errors.invalid(f"model_version must be empty (route) or a positive integer "
                             f"without leading zeros, got {v!r}")
    return int(v)


def param_value(p) -> Any:
    """InferParameter / ModelRepositoryParameter oneof -> python value (None when unset)."""
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def params_dict(m) -> dict[str, Any]:
    return {k: param_value(v) for k, v in m.items()} if m else {}


def set_param(target, key: str, value: Any) -> None:
    """python value -> InferParameter in a parameters map."""
    p = target[key]
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if value >= 1 << 63:
            p.uint64_param = value
        else:
            p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def _from_contents(name: str, dt: str, contents, count: int) -> np.ndarray:
    field = CONTENTS_FIELD.get(dt)
    if field is None:
        raise errors.invalid(f"input '{name}': datatype {dt} has no typed contents field; send "
                             f"it in raw_input_contents")
    # every field other than the one for this datatype must be empty
    for other in contents.ListFields():
        if other[0].name != field:
            raise errors.invalid(f"input '{name}': datatype {dt} goes in contents.{field}, "
                                 f"not contents.{other[0].name}")
    values = getattr(contents, field)
    if len(values) != count:
        raise errors.invalid(f"input '{name}': shape needs {count} elements, contents.{field} "
                             f"has {len(values)}")
    if dt == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr
    arr = np.array(values, dtype=_FIELD_NP[field])
    target = _NP[dt]
    if arr.dtype != target:
        info = np.iinfo(target)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise errors.invalid(f"input '{name}': contents.{field} holds values outside the "
                                 f"range of {dt} [{info.min}, {info.max}]")
        arr = arr.astype(target)
    return arr


def decode_infer(msg: pb.ModelInferRequest, max_elements: int) -> InferRequest:
    """ModelInferRequest -> InferRequest; INVALID_ARGUMENT naming the input at fault."""
    model = msg.model_name
    if not model:
        raise errors.invalid("model_name is empty")
    version = parse_version(msg.model_version)
    inputs = msg.inputs
    if not inputs:
        raise errors.invalid(f"request for model '{model}' has no inputs")
    raw = msg.raw_input_contents
    n_raw = len(raw)
    if n_raw and n_raw != len(inputs):
        raise errors.invalid(f"raw_input_contents has {n_raw} entries for {len(inputs)} inputs; "
                             f"when used, it needs one entry per input, in input order")
    tensors = []
    total = 0
    for i, t in enumerate(inputs):
        name = t.name
        if not name:
            raise errors.invalid(f"inputs[{i}]: name is empty")
        dt = t.datatype
        if dt not in _ALL_TYPES:
            raise errors.invalid(f"input '{name}': unknown datatype {dt!r}; expected one of "
                                 f"{', '.join(sorted(_ALL_TYPES))}")
        shape = tuple(t.shape)
        count = element_count(name, shape)
        total += count
        if total > max_elements:
            raise ServingError(Code.TOO_LARGE, f"request has more than {max_elements} "
                               f"tensor elements (the configured limit)")
        if n_raw:
            if t.HasField("contents"):
                raise errors.invalid(f"input '{name}': both contents and raw_input_contents given; "
                                     f"use one")
            buf = raw[i]
            if dt == "BYTES":
                arr = decode_bytes_elems(name, buf, count)
            else:
                need = count * _ITEMSIZE[dt]
                if len(buf) != need:
                    raise errors.invalid(f"input '{name}': raw_input_contents[{i}] has {len(buf)} "
                                         f"bytes but shape {list(shape)} of {dt} needs {need}")
                arr = np.frombuffer(buf, dtype=_NP[dt])
        elif t.HasField("contents"):
            arr = _from_contents(name, dt, t.contents, count)
        else:
            raise errors.invalid(f"input '{name}': no data; put it in raw_input_contents or in "
                                 f"contents.{CONTENTS_FIELD.get(dt, '<raw only>')}")
        tensors.append(Tensor(name, dt, shape, arr.reshape(shape),
                              params_dict(t.parameters) if t.parameters else {}))
    outs = msg.outputs
    return InferRequest(model=model, inputs=tensors, version=version,
                        outputs=[o.name for o in outs] if outs else None,
                        id=msg.id or None,
                        parameters=params_dict(msg.parameters) if msg.parameters else {},
                        protocol="grpc_v2")


def encode_infer(resp: InferResponse) -> pb.ModelInferResponse:
    """InferResponse -> ModelInferResponse, every output in raw_output_contents."""
    outputs, raws = [], []
    OutT = pb.ModelInferResponse.InferOutputTensor
    for t in resp.outputs:
        outputs.append(OutT(name=t.name, datatype=t.datatype, shape=t.shape))
        raws.append(encode_bytes_elems(t.data) if t.datatype == "BYTES" else t.data.tobytes())
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=str(resp.version),
                                id=resp.id or "", outputs=outputs, raw_output_contents=raws)
    if resp.parameters:
        for k, v in resp.parameters.items():
            if not k.startswith("_"):
                set_param(msg.parameters, k, v)
    return msg


def decode_output(t: pb.ModelInferResponse.InferOutputTensor, raw: bytes) -> np.ndarray:
    """One raw output -> numpy (clients and tests; BF16 stays uint16 bits)."""
    if t.datatype == "BYTES":
        return decode_bytes_elems(t.name, raw, math.prod(t.shape)).reshape(tuple(t.shape))
    return np.frombuffer(raw, dtype=_NP[t.datatype]).reshape(tuple(t.shape))


# ---- read-only views: protocol-neutral dicts -> messages ---------------------------------
def model_metadata(meta: dict) -> pb.ModelMetadataResponse:
    TM = pb.ModelMetadataResponse.TensorMetadata
    tensors = lambda specs: [TM(name=s["name"], datatype=s["datatype"], shape=s["shape"])
                             for s in specs]
    return pb.ModelMetadataResponse(name=meta["name"], versions=meta.get("versions", []),
                                    platform=meta.get("platform", ""),
                                    inputs=tensors(meta.get("inputs", [])),
                                    outputs=tensors(meta.get("outputs", [])))


def model_config(cfg: dict) -> pb.ModelConfigResponse:
    """metadata.model_config's Triton-JSON dict -> ModelConfigResponse."""
    try:
        config = json_format.ParseDict(cfg, mc.ModelConfig(), ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise ServingError(Code.INTERNAL, f"model config does not fit inference.ModelConfig: {e}") from None
    return pb.ModelConfigResponse(config=config)


def repository_index(models: list[dict]) -> pb.RepositoryIndexResponse:
    MI = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(models=[
        MI(name=m["name"], version=m.get("version", ""), state=m.get("state", ""),
           reason=m.get("reason") or "") for m in models])


def model_statistics(stats: dict) -> pb.ModelStatisticsResponse:
    """Triton's JSON statistics shape ({"model_stats": [...]}) -> ModelStatisticsResponse."""
    try:
        return json_format.ParseDict(stats, pb.ModelStatisticsResponse(), ignore_unknown_fields=True)
    except json_format.ParseError as e:
        raise ServingError(Code.INTERNAL, f"statistics do not fit inference.ModelStatistics: {e}") from None
