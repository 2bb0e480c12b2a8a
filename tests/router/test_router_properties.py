"""Property tests (hypothesis) for sticky assignment, the two promises of router/assign.py:

- a re-weight moves a key only when a band boundary passes over it, so the keys moved
  are at most the sum of the inner boundaries' shifts (checked per key through the
  router's own pick, and exactly over the unit interval);
- a failover (some versions not AVAILABLE) moves no key of a live version; the keys of
  the dead ones land on live versions only.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from router import RouteConfig, Router, stable_unit
from router.assign import layout

KEYS = [f"user-{i}" for i in range(600)]
UNITS = [stable_unit("m", k) for k in KEYS]
VERSIONS = st.integers(1, 6)
weight_maps = st.dictionaries(VERSIONS, st.integers(0, 100), min_size=1, max_size=5).filter(
    lambda w: sum(w.values()) > 0)
float_weight_maps = st.dictionaries(
    VERSIONS, st.floats(0, 1e3, allow_nan=False, allow_infinity=False), min_size=1,
    max_size=5).filter(lambda w: sum(w.values()) > 1e-6)


def router_for(weights: dict[int, float], available) -> Router:
    r = Router({"m": RouteConfig.from_json({"weights": {str(v): w for v, w in weights.items()}})})
    r.set_available("m", available)
    return r


def boundaries(weights: dict[int, float], versions: list[int]) -> list[float]:
    """Cumulative upper edge of each version's band, in ascending version order, over a
    common version list (a version without weight has an empty band at its place)."""
    total = sum(w for w in weights.values() if w > 0)
    acc, out = 0.0, []
    for v in versions:
        acc += max(weights.get(v, 0), 0)
        out.append(acc / total)
    return out


def assignment(weights: dict[int, float], u: float) -> int:
    bands = layout(weights)
    return bands.versions[bands.index(u)]


@settings(max_examples=80, deadline=None)
@given(before=weight_maps, after=weight_maps)
def test_reweight_moves_only_keys_a_boundary_passed(before, after):
    versions = sorted(set(before) | set(after))
    avail = versions
    b1, b2 = boundaries(before, versions), boundaries(after, versions)
    swept = [(min(x, y), max(x, y)) for x, y in zip(b1[:-1], b2[:-1]) if x != y]
    r1, r2 = router_for(before, avail), router_for(after, avail)
    moved = 0
    for key, u in zip(KEYS, UNITS):
        v1, v2 = r1.pick("m", key=key).version, r2.pick("m", key=key).version
        assert v1 == assignment(before, u) and v2 == assignment(after, u)
        if v1 != v2:
            moved += 1
            # the key sits where some boundary passed over it
            assert any(lo - 1e-12 <= u <= hi + 1e-12 for lo, hi in swept), (key, u, b1, b2)
    if not swept:
        assert moved == 0  # no boundary moved (e.g. weights scaled): no key moves


@settings(max_examples=150, deadline=None)
@given(before=float_weight_maps, after=float_weight_maps)
def test_reweight_moved_measure_is_at_most_the_sum_of_boundary_shifts(before, after):
    """Exactly, over [0, 1): split at every edge of both layouts, compare the two
    assignments on each piece; the measure of the pieces that change versions is at most
    sum |shift| of the inner boundaries."""
    versions = sorted(v for v in set(before) | set(after)
                      if before.get(v, 0) > 0 or after.get(v, 0) > 0)
    b1, b2 = boundaries(before, versions), boundaries(after, versions)
    bound = sum(abs(x - y) for x, y in zip(b1[:-1], b2[:-1]))
    cuts = sorted({0.0, 1.0, *layout(before).edges, *layout(after).edges})
    moved = sum(hi - lo for lo, hi in zip(cuts, cuts[1:])
                if hi > lo and assignment(before, (lo + hi) / 2) != assignment(after, (lo + hi) / 2))
    assert moved <= bound + 1e-9, (moved, bound, before, after)
    if all(abs(before.get(v, 0) * sum(after.values()) - after.get(v, 0) * sum(before.values()))
           < 1e-12 for v in versions):
        assert moved < 1e-9  # proportional weights: the same bands, nothing moves


@settings(max_examples=150, deadline=None)
@given(weights=weight_maps.filter(lambda w: sum(1 for x in w.values() if x > 0) >= 2),
       data=st.data())
def test_failover_moves_no_key_of_a_live_version(weights, data):
    weighted = sorted(v for v, w in weights.items() if w > 0)
    live = data.draw(st.sets(st.sampled_from(weighted), min_size=1, max_size=len(weighted) - 1))
    healthy, degraded = router_for(weights, weighted), router_for(weights, sorted(live))
    spread = {v: 0 for v in live}
    for key in KEYS:
        home = healthy.pick("m", key=key).version
        now = degraded.pick("m", key=key).version
        assert now in live
        if home in live:
            assert now == home, (key, home, now, live)
        else:
            spread[now] += 1
    # and back: when the dead versions return, every key goes home again
    degraded.set_available("m", weighted)
    assert all(degraded.pick("m", key=k).version == healthy.pick("m", key=k).version
               for k in KEYS)
    dead_keys = sum(spread.values())
    if dead_keys >= 200:  # the dead versions' keys spread over all live ones
        assert all(n > 0 for v, n in spread.items() if weights[v] / sum(weights[x] for x in live) > 0.1)


@settings(max_examples=100, deadline=None)
@given(weights=weight_maps.filter(lambda w: sum(1 for x in w.values() if x > 0) >= 2),
       data=st.data())
def test_failover_then_reweight_of_the_live_versions_keeps_the_promises(weights, data):
    """Failover composes with a re-weight: a key of a version that is live in both states
    and whose band no boundary swept keeps its version."""
    weighted = sorted(v for v, w in weights.items() if w > 0)
    live = sorted(data.draw(st.sets(st.sampled_from(weighted), min_size=1, max_size=len(weighted))))
    after = {v: data.draw(st.integers(0, 100)) if v in live else w for v, w in weights.items()}
    if sum(after.get(v, 0) for v in live) <= 0:
        return
    versions = sorted(set(weights) | set(after))
    b1, b2 = boundaries(weights, versions), boundaries(after, versions)
    swept = [(min(x, y), max(x, y)) for x, y in zip(b1[:-1], b2[:-1]) if x != y]
    r1, r2 = router_for(weights, live), router_for(after, live)
    full = router_for(weights, weighted)
    for key, u in zip(KEYS, UNITS):
        home = full.pick("m", key=key).version
        if home not in live or any(lo - 1e-12 <= u <= hi + 1e-12 for lo, hi in swept):
            continue
        assert r1.pick("m", key=key).version == home == r2.pick("m", key=key).version
