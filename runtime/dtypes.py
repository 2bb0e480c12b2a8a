"""The one table of datatypes: KServe v2 name <-> numpy dtype <-> torch dtype.

BF16 has no numpy dtype: it travels as uint16 bits and is reinterpreted by torch.
BYTES has no torch dtype: it is only accepted where a model declares it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# Request inputs reach torch as views of the request's own bytes (raw_input_contents,
# binary REST parts). torch warns once per process that such a buffer is not writable;
# the first read-only conversion consumes that warning quietly. A model must not modify
# its inputs in place (they are the request's bytes).
_readonly_seen = False
# Below this many bytes a read-only buffer is copied: the copy costs nothing there, and
# CPython shares its one-byte bytes objects, which a view must never alias.
COPY_BELOW_BYTES = 64

# v2 name -> (numpy dtype used on the wire, torch dtype)
_TABLE: dict[str, tuple[np.dtype, torch.dtype]] = {
    "BOOL": (np.dtype(np.bool_), torch.bool),
    "UINT8": (np.dtype(np.uint8), torch.uint8),
    "INT8": (np.dtype(np.int8), torch.int8),
    "INT16": (np.dtype(np.int16), torch.int16),
    "INT32": (np.dtype(np.int32), torch.int32),
    "INT64": (np.dtype(np.int64), torch.int64),
    "FP16": (np.dtype(np.float16), torch.float16),
    "FP32": (np.dtype(np.float32), torch.float32),
    "FP64": (np.dtype(np.float64), torch.float64),
    "BF16": (np.dtype(np.uint16), torch.bfloat16),
}
# Unsigned 16/32/64 exist in the protocol; torch has them only partially, so we map the
# ones torch can hold and reject the rest with a clear message.
for _name, _np, _t in (("UINT16", np.uint16, "uint16"), ("UINT32", np.uint32, "uint32"),
                       ("UINT64", np.uint64, "uint64")):
    if hasattr(torch, _t):
        _TABLE[_name] = (np.dtype(_np), getattr(torch, _t))

_BY_TORCH = {t: name for name, (_n, t) in _TABLE.items()}

SUPPORTED = tuple(_TABLE)
ITEMSIZE = {name: np_dt.itemsize for name, (np_dt, _t) in _TABLE.items()}


def is_supported(name: str) -> bool:
    return name in _TABLE


def numpy_dtype(name: str) -> np.dtype:
    return _TABLE[name][0]


def torch_dtype(name: str) -> torch.dtype:
    return _TABLE[name][1]


def from_torch(dtype: torch.dtype) -> str:
    try:
        return _BY_TORCH[dtype]
    except KeyError:
        raise ValueError(f"torch dtype {dtype} has no KServe v2 datatype") from None


def to_torch(array: np.ndarray, name: str) -> torch.Tensor:
    """numpy -> torch without a copy (BF16 bits reinterpreted), also over read-only
    request bytes (the tensor keeps them alive). Copied only where a view cannot be
    right: misaligned or byte-swapped data, and tiny read-only buffers."""
    if not (array.flags.aligned and array.dtype.isnative) or (
            not array.flags.writeable and array.nbytes < COPY_BELOW_BYTES):
        array = np.array(array, dtype=array.dtype.newbyteorder("="), order="C")
    if array.flags.writeable or _readonly_seen:
        t = torch.from_numpy(array)
    else:
        t = _first_readonly(array)
    if name == "BF16":
        t = t.view(torch.bfloat16)
    return t


def _first_readonly(array: np.ndarray) -> torch.Tensor:
    global _readonly_seen
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(array)
    _readonly_seen = True
    return t


def to_numpy(t: torch.Tensor) -> tuple[np.ndarray, str]:
    """torch -> (numpy on CPU, v2 name); BF16 comes back as uint16 bits."""
    name = from_torch(t.dtype)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if name == "BF16":
        t = t.view(torch.int16)
        return t.numpy().view(np.uint16), name
    return t.contiguous().numpy(), name
