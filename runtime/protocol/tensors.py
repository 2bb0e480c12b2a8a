"""Tensor helpers every codec shares: the element-count guard, Triton's BYTES element
serialization, and BF16 bit conversion. Wire-format specific parsing stays in each codec."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime import errors

MAX_NONZERO_ELEMENTS = 1 << 40  # a shape whose nonzero dims multiply past this fits no array


def element_count(name: str, shape: Sequence[int]) -> int:
    """Elements a shape holds; INVALID_ARGUMENT for negative or impossibly large dims."""
    n = nonzero = 1
    for d in shape:
        if d < 0:
            raise errors.invalid(f"input '{name}': shape {list(shape)} has a negative dimension")
        n *= d
        nonzero *= d or 1
    if nonzero > MAX_NONZERO_ELEMENTS:  # e.g. [0, 2**40, 2**40]: empty, yet no array fits
        raise errors.invalid(f"input '{name}': shape {list(shape)} has dimensions too large")
    return n


def decode_bytes_elems(name: str, raw, count: int) -> np.ndarray:
    """Triton's BYTES serialization: each element a 4-byte little-endian length + bytes."""
    out = []
    pos, size = 0, len(raw)
    for _ in range(count):
        if pos + 4 > size:
            raise errors.invalid(f"input '{name}': BYTES data ends inside an element length "
                                 f"({len(out)} of {count} elements read)")
        n = int.from_bytes(raw[pos:pos + 4], "little")
        pos += 4
        if pos + n > size:
            raise errors.invalid(f"input '{name}': BYTES element {len(out)} of length {n} "
                                 f"runs past the end of the data")
        out.append(bytes(raw[pos:pos + n]))
        pos += n
    if pos != size:
        raise errors.invalid(f"input '{name}': {size - pos} bytes left over after {count} "
                             f"BYTES elements")
    arr = np.empty(count, dtype=object)
    arr[:] = out
    return arr


def encode_bytes_elems(data: np.ndarray) -> bytes:
    parts = []
    for x in data.reshape(-1):
        b = x if isinstance(x, bytes) else str(x).encode()
        parts.append(len(b).to_bytes(4, "little"))
        parts.append(b)
    return b"".join(parts)


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float values -> BF16 bit patterns as uint16 (how BF16 travels inside the runtime)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(torch.bfloat16)
    return t.view(torch.int16).numpy().view(np.uint16)


def bf16_values(bits: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(np.ascontiguousarray(bits)).view(torch.bfloat16).float().numpy()
