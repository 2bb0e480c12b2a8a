"""Assignment of requests to versions: a stable hash for keyed requests, weight bands.

Keyed requests. `blake2b(model + NUL + key)` (never `hash()`, which is salted per
process) gives 16 bytes: the first 8 place the key on the split, the last 8 decide
shadowing, so the two draws are independent yet both stable for a key. A unit is the
top 53 bits / 2**53, so it lies in [0, 1) exactly (a 64-bit value / 2**64 can round to 1.0).

Band layout. The weighted versions are laid out as contiguous bands on [0, 1) in a fixed
order, ascending version number (never dict order), so the layout is a pure function of
the weights: every process, and every restart, assigns a key the same way. A key moves
only when a band boundary passes over it, so a change of weights moves at most
sum(|shift of each inner boundary|) of the keys. That is exactly the minimum (the weight
moved) when weight moves between two versions adjacent in version order: stable 1 and
canary 2 going 90/10 -> 80/20 moves only the keys in [0.8, 0.9), all from 1 to 2; scaling
every weight by a constant moves nothing. With three or more versions, a move between
non-adjacent versions also shifts the bands in between, which then pass keys along. No
layout that is a function of the weights alone can do better for every pair (the minimum
for all pairwise moves forces two disjoint regions of equal positive size to coincide),
so we take the simple, stateless layout and say so.

Failover. A version that is not AVAILABLE keeps its band; a key that lands in it is
rescaled within the band, (u - low) / width, which is again uniform on [0, 1), and placed
on the bands of the AVAILABLE versions. So the dead version's keys are spread in
proportion to the remaining weights, and no key of an AVAILABLE version moves.

Unkeyed requests draw from a seedable `random.Random`, not smooth weighted round robin.
SWRR has zero variance in one process, but it is a shared mutable counter (a write per
request under concurrent readers), every worker process starts it in the same phase (the
first requests of all workers go to the same version), and its fixed period can lock onto
a periodic client pattern (a client alternating two request kinds under 50/50 sends each
kind to one version only). Independent draws have none of these faults; the cost is
binomial noise: with 10,000 requests a 10% share is 10% +/- 0.3% (one sd). Pass a seed
for reproducible runs.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from hashlib import blake2b

_UNPACK = struct.Struct(">QQ").unpack
_INV53 = 1.0 / (1 << 53)


def key_prefix(model: str) -> bytes:
    """The per-model hash prefix; model names are folder names and hold no NUL."""
    return model.encode("utf-8", "surrogatepass") + b"\x00"


def unit_pair(prefix: bytes, key: str) -> tuple[float, float]:
    """(split unit, shadow unit), both in [0, 1), from one blake2b digest of the key."""
    hi, lo = _UNPACK(blake2b(prefix + key.encode("utf-8", "surrogatepass"), digest_size=16).digest())
    return (hi >> 11) * _INV53, (lo >> 11) * _INV53


def stable_unit(model: str, key: str) -> float:
    """Where `key` falls on `model`'s split: a float in [0, 1), the same in every process."""
    return unit_pair(key_prefix(model), key)[0]


@dataclass(frozen=True, slots=True)
class Bands:
    """Contiguous bands on [0, 1): band i is [lows[i], edges[i]) and maps to versions[i].

    `edges` holds the n-1 inner upper edges, so `bisect_right(edges, u)` is the band of u
    and the last band ends at 1 whatever the rounding.
    """

    versions: tuple[int, ...]
    edges: tuple[float, ...]
    lows: tuple[float, ...]
    inv_widths: tuple[float, ...]

    def index(self, u: float) -> int:
        return bisect_right(self.edges, u)

    def rescale(self, i: int, u: float) -> float:
        """u, known to lie in band i, as a fresh uniform unit on [0, 1)."""
        return (u - self.lows[i]) * self.inv_widths[i]


def layout(weights: Mapping[int, float]) -> Bands:
    """Bands in ascending version order for positive weights (zero weights get no band)."""
    items = sorted((v, w) for v, w in weights.items() if w > 0)
    total = sum(w for _, w in items)
    if not items or not total > 0:
        return Bands((), (), (), ())
    bounds, acc = [], 0.0
    for _, w in items:
        acc += w
        bounds.append(acc / total)
    bounds[-1] = 1.0
    lows = [0.0, *bounds[:-1]]
    inv = tuple(1.0 / (hi - lo) if hi > lo else 0.0 for lo, hi in zip(lows, bounds, strict=True))
    return Bands(tuple(v for v, _ in items), tuple(bounds[:-1]), tuple(lows), inv)


def fractions(weights: Mapping[int, float]) -> dict[int, float]:
    """Each version's share of the positive total, in ascending version order."""
    total = sum(w for w in weights.values() if w > 0)
    return {v: w / total for v, w in sorted(weights.items()) if w > 0} if total > 0 else {}
