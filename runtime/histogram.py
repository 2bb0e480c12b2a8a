"""The one latency histogram layout every reader shares: fixed log-spaced bucket edges
(48 per decade, about 4.9 % wide, 1 us .. 100 s) plus the exported Prometheus bounds as
exact edges, and the quantile read from such counts. Metrics record into it; the
experiment decider judges on it; neither needs the other for that.
"""

from __future__ import annotations

PER_DECADE = 48
EXPORT_BOUNDS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _make_edges() -> list[float]:
    logs = [10.0 ** (-6 + k / PER_DECADE) for k in range(8 * PER_DECADE + 1)]  # 1 us .. 100 s
    keep = [e for e in logs if all(abs(e / b - 1.0) > 0.01 for b in EXPORT_BOUNDS)]
    return sorted(keep + list(EXPORT_BOUNDS))


EDGES = _make_edges()  # fine bucket i holds values in (EDGES[i-1], EDGES[i]]; i = len: overflow
NB = len(EDGES) + 1


def quantile(counts: list[int], q: float) -> float | None:
    """The q-quantile (0..1) of a fine-bucket histogram, interpolated inside its bucket."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    cum = 0
    last = len(EDGES)
    for i, c in enumerate(counts):
        if c and cum + c >= rank:
            lo = EDGES[i - 1] if i > 0 else 0.0
            if i >= last:  # overflow bucket: the best we can say is "above the last edge"
                return EDGES[-1]
            return lo + (EDGES[i] - lo) * ((rank - cum) / c)
        cum += c
    return EDGES[-1]
