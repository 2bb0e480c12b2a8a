"""Experiment counters that survive kill -9: a memory-mapped file per worker, read by the decider.

Each worker counts the requests the split routed (per model, version and the candidate
share the router used) and, with sticky routing, per key (requests, errors, where the key
was first placed) into a `Tally`. With `--workers N` the tally is a file in the run folder
mapped into the worker's memory: a count is stored in the page cache before the answer
leaves, so a worker killed with -9 loses none it acknowledged, and the decider reads every
worker's files, dead incarnations' included (the idea of prometheus_client's
multiprocess mode). Alone, the same layout lives in a bytearray.

File layout (native byte order): a 16-byte header, b"SSTALLY1" then u64 `used` (bytes up to
the end of the last entry); then entries, each 8-byte aligned: u32 key length L, u32 width W,
the UTF-8 key padded so the values start 8-aligned, then W float64 values. A new entry is
written whole (values zero) before `used` moves past it (one aligned 8-byte store), so a
reader never sees half an entry; values change in place by aligned 8-byte stores, which
are whole on x86-64 and arm64. One writer per file (its worker); float64 counts are exact
to 2**53. Cost: 8 + key + values bytes (padded) per entry, plus a dict slot in the writer.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

MAGIC = b"SSTALLY1"
HEADER = 16
_USED = struct.Struct("=Q")
_HEAD = struct.Struct("=II")
_D = struct.Struct("=d")
INITIAL = 1 << 16


def _entry_size(key_len: int, width: int) -> tuple[int, int]:
    """(offset of the values from the entry's start, whole entry size)."""
    values_at = (8 + key_len + 7) & ~7
    return values_at, values_at + 8 * width


class Tally:
    """Cumulative float64 counters under string keys, each a fixed-width vector (see the module
    docstring). `path` None: in memory. Loop-only: one writer."""

    def __init__(self, path: Path | None = None, initial: int = INITIAL):
        self.path = path
        self._fd = -1
        size = max(initial, HEADER + 64)
        if path is not None:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(self._fd, size)
            self._buf: mmap.mmap | bytearray = mmap.mmap(self._fd, size)
        else:
            self._buf = bytearray(size)
        self._buf[0:8] = MAGIC
        self._used = HEADER
        _USED.pack_into(self._buf, 8, self._used)
        self._index: dict[str, int] = {}  # key -> offset of its values

    def __len__(self) -> int:
        return len(self._index)

    def slot(self, key: str, width: int) -> int:
        """The offset of `key`'s values (a new entry of `width` zeros the first time)."""
        at = self._index.get(key)
        if at is None:
            at = self._append(key, width)
        return at

    def find(self, key: str) -> int | None:
        return self._index.get(key)

    def _append(self, key: str, width: int) -> int:
        raw = key.encode("utf-8", "surrogateescape")
        values_at, size = _entry_size(len(raw), width)
        need = self._used + size
        if need > len(self._buf):
            self._grow(need)
        start = self._used
        _HEAD.pack_into(self._buf, start, len(raw), width)
        self._buf[start + 8:start + 8 + len(raw)] = raw
        self._buf[start + 8 + len(raw):start + size] = bytes(size - 8 - len(raw))
        self._used = need
        _USED.pack_into(self._buf, 8, need)  # the entry is whole before readers see it
        self._index[key] = start + values_at
        return start + values_at

    def _grow(self, need: int) -> None:
        size = len(self._buf)
        while size < need:
            size *= 2
        if isinstance(self._buf, bytearray):
            self._buf.extend(bytes(size - len(self._buf)))
        else:
            self._buf.resize(size)  # the file grows with it

    def add(self, at: int, i: int, n: float = 1.0) -> None:
        p = at + 8 * i
        _D.pack_into(self._buf, p, _D.unpack_from(self._buf, p)[0] + n)

    def set(self, at: int, i: int, v: float) -> None:
        _D.pack_into(self._buf, at + 8 * i, v)

    def get(self, at: int, i: int) -> float:
        return _D.unpack_from(self._buf, at + 8 * i)[0]

    def entries(self) -> dict[str, list[float]]:
        return parse(bytes(self._buf[:self._used]))

    def close(self) -> None:
        if isinstance(self._buf, mmap.mmap):
            self._buf.close()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def parse(data: bytes) -> dict[str, list[float]]:
    """Every whole entry of a tally's bytes (a torn or foreign file: what parses, up to `used`)."""
    if len(data) < HEADER or data[:8] != MAGIC:
        return {}
    used = min(_USED.unpack_from(data, 8)[0], len(data))
    out: dict[str, list[float]] = {}
    at = HEADER
    head = _HEAD.unpack_from
    shapes: dict[int, struct.Struct] = {}
    while at + 8 <= used:
        n, width = head(data, at)
        values_at = (8 + n + 7) & ~7
        size = values_at + 8 * width
        if at + size > used:
            break
        shape = shapes.get(width)
        if shape is None:
            shape = shapes[width] = struct.Struct(f"={width}d")
        out[data[at + 8:at + 8 + n].decode("utf-8", "surrogateescape")] = list(shape.unpack_from(data, at + values_at))
        at += size
    return out


def read(path: Path) -> dict[str, list[float]]:
    """A tally file's entries ({} when unreadable)."""
    try:
        return parse(path.read_bytes())
    except OSError:
        return {}
