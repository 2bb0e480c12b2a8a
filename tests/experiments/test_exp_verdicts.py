"""Issue 29: seeded simulations of the whole engine (judge every 30 s) in the situations the
issue lists. Each test is seeded and sized to run in well under a minute on a busy core;
figures print with -s and are the ones in docs/experiments.md.

A/A bounds are alpha + 3 standard errors of the simulated rate, per test: alpha is shared
(Bonferroni) by the outcome and the two guardrails, so each is held to alpha / 3 and any
of the three to alpha; SRM to its own 0.001.
"""

from __future__ import annotations

import statistics

import pytest
from exp_worlds import World, after, bound, const, ramp, rate, run

pytestmark = pytest.mark.slow  # ~2.5 min of simulated experiments: outside `pytest -m unit`

ALPHA = 0.05
BLOCK = {"control": "stable", "candidate": "canary", "steps": [10, 25, 50], "interval_s": 30, "min_requests": 100,
         "min_duration_s": 600, "promote": "manual", "alpha": ALPHA,
         "guardrails": {"errors": {"max_ratio": 1.5}, "latency": {"quantile": 0.99, "max_ratio": 1.2}},
         "outcomes": [{"metric": "conv", "kind": "binary", "goal": "increase"}]}
EACH = ALPHA / 3


def _aa(name: str, world: World, runs: int, seed: int) -> None:
    rs = [run(world, seed * 100_000 + i) for i in range(runs)]
    got = {k: rate(rs, k) for k in ("outcome", "errors", "latency", "srm")}
    anyone = sum(any(getattr(r, k) is not None for k in ("outcome", "errors", "latency")) for r in rs) / runs
    print(f"\nA/A {name}: {runs} runs: outcome {got['outcome']:.3f}, errors {got['errors']:.3f}, latency "
          f"{got['latency']:.3f} (each bound {bound(EACH, runs):.3f}); any of them {anyone:.3f} (bound "
          f"{bound(ALPHA, runs):.3f}); SRM {got['srm']:.3f} (bound {bound(0.001, runs):.3f})")
    for k in ("outcome", "errors", "latency"):
        assert got[k] <= bound(EACH, runs), (k, got[k])
    assert anyone <= bound(ALPHA, runs)
    assert got["srm"] <= bound(0.001, runs)


def test_aa_ramp_10_to_50_with_base_drift():
    # conversion 0.25 -> 0.30, errors 1% -> 1.5%, latency x1.3 over the run, while the split ramps
    drift = World(BLOCK, rate=100, minutes=40, conv=(ramp(0.25, 0.30, 40),) * 2, err=(ramp(0.01, 0.015, 40),) * 2,
                  lat=(ramp(1.0, 1.3, 40),) * 2)
    _aa("ramp 10->25->50% with drift", drift, runs=150, seed=1)


def test_aa_sticky_skewed_keys():
    # 3,000 keys, lognormal(0, 1.5) activity, per-key error (gamma 0.5) and conversion multipliers
    sticky = World(BLOCK, rate=50, minutes=40, sticky_keys=3000, conv=(ramp(0.25, 0.30, 40),) * 2)
    _aa("sticky skewed keys", sticky, runs=60, seed=2)


def test_aa_routing_lag_after_each_advance():
    # 500 req/s judged every 10 s, steps 5 -> 25 -> 50, the router applies each new split 3 s
    # late (untagged, the same world flags SRM in 0.43 of runs: see docs/experiments.md)
    lag = World({**BLOCK, "steps": [5, 25, 50], "interval_s": 10, "min_duration_s": 300}, rate=500, minutes=20,
                lag_s=3.0)
    _aa("routing lag 3 s at 500 req/s, 10 s intervals", lag, runs=80, seed=3)


def test_aa_incident_hitting_both_arms():
    # errors x2 and latency x1.6 on both arms from minute 12 to 22; the last step holds back 5%
    incident = World({**BLOCK, "steps": [25, 50, 100], "min_duration_s": 300}, rate=100, minutes=40,
                     incident=(12.0, 22.0))
    _aa("incident on both arms, holdback step", incident, runs=150, seed=4)


def _detect(world: World, start: float, runs: int, seed: int, attr: str) -> tuple[float, float, float]:
    rs = [run(world, seed * 100_000 + i) for i in range(runs)]
    delays = [getattr(r, attr) - start for r in rs if getattr(r, attr) is not None and getattr(r, attr) >= start]
    early = sum(getattr(r, attr) is not None and getattr(r, attr) < start for r in rs) / runs
    within = sum(d <= 10.0 for d in delays) / runs
    return within, statistics.median(delays) if delays else float("inf"), early


@pytest.mark.parametrize("start", [0.0, 35.0])
def test_errors_1_to_2_5_percent_caught_within_10_minutes_early_and_late(start):
    block = {**BLOCK, "steps": [25], "min_duration_s": 86400}
    world = World(block, rate=100, minutes=start + 15, err=(const(0.01), after(start, 0.01, 0.025)),
                  stop_at_first_alarm=True)
    within, median, early = _detect(world, start, runs=100, seed=5 + int(start), attr="errors")
    print(f"\nerrors 1% -> 2.5% from minute {start:g} at 25% and 100 req/s: caught within 10 min in {within:.2f} "
          f"of runs, median {median:.1f} min after the start (alarms before it: {early:.2f})")
    assert within >= 0.9
    assert early <= bound(EACH, 100)


def test_latency_p99_plus_30_percent_at_max_ratio_1_2():
    block = {**BLOCK, "steps": [25], "min_duration_s": 86400}
    world = World(block, rate=200, minutes=30, lat=(const(1.0), const(1.3)), stop_at_first_alarm=True)
    within, median, _ = _detect(world, 0.0, runs=60, seed=7, attr="latency")
    rs30 = within  # within 10 min
    print(f"\nlatency p99 +30% (max_ratio 1.2) at 25% and 200 req/s: caught within 10 min in {rs30:.2f} of runs, "
          f"median {median:.1f} min")
    assert rs30 >= 0.8


def test_a_100x_slower_canary_at_30_requests_per_second_is_rolled_back_within_a_minute():
    block = {**BLOCK, "steps": [50], "interval_s": 1, "min_duration_s": 86400,
             "guardrails": {"latency": {"quantile": 0.99, "max_ratio": 1.2}}}
    world = World(block, rate=60, minutes=1.5, lat=(const(1.0), const(100.0)), outcomes=False)
    rs = [run(world, 8_000 + i) for i in range(30)]
    times = [r.rolled_back for r in rs]
    print(f"\n100x slower canary, 30 req/s per arm, interval 1 s: rolled back in {sum(t is not None for t in times)} "
          f"of 30 runs, at most {max(t or 99 for t in times) * 60:.0f} s")
    assert all(t is not None and t <= 1.0 for t in times)


def test_conversion_0_25_to_0_27_power_and_time_to_detect():
    block = {**BLOCK, "steps": [50], "min_duration_s": 86400}
    world = World(block, rate=100, minutes=40, conv=(const(0.25), const(0.27)))
    rs = [run(world, 9_000 + i) for i in range(60)]
    better = [r.outcome for r in rs if r.verdict == "better"]
    worse = sum(r.verdict == "worse" for r in rs)
    power = len(better) / len(rs)
    print(f"\nconversion 0.25 -> 0.27 at 50% and 100 req/s (1,500 per arm per minute): better in {power:.2f} of runs "
          f"within 40 min, median {statistics.median(better):.1f} min; worse in {worse}")
    assert power >= 0.8 and worse == 0


def test_promote_auto_on_a_minus_8_percent_candidate_rarely_promotes():
    block = {**BLOCK, "steps": [10, 50, 100], "min_duration_s": 300, "promote": "auto"}
    worse = World(block, rate=100, minutes=60, conv=(const(0.25), const(0.23)))
    rs = [run(worse, 10_000 + i) for i in range(80)]
    promoted = rate(rs, "promoted")
    kept = sum(r.verdict == "worse" for r in rs) / len(rs)
    better = World(block, rate=100, minutes=60, conv=(const(0.25), const(0.27)))
    good = [run(better, 11_000 + i) for i in range(20)]
    print(f"\npromote: auto, conversion 0.25 -> 0.23 (-8%): promoted in {promoted:.2f} of {len(rs)} runs (marked worse "
          f"in {kept:.2f}); a +8% candidate is promoted in {rate(good, 'promoted'):.2f} of {len(good)}, median at "
          f"{statistics.median([r.promoted for r in good if r.promoted is not None] or [float('nan')]):.0f} min")
    assert promoted <= 0.05


def test_negative_controls_the_harness_sees_what_the_runtime_must_prevent():
    # The same worlds with the runtime's part undone: sticky traffic analysed per request, and
    # counts not tagged by generation under a lagging router. The A/A tests above pass because
    # the engine is fed right, not because the harness cannot see a failure.
    per_request = World(BLOCK, rate=50, minutes=40, sticky_keys=3000, conv=(ramp(0.25, 0.30, 40),) * 2,
                        request_unit=True)
    untagged = World({**BLOCK, "steps": [5, 25, 50], "interval_s": 10, "min_duration_s": 300}, rate=500, minutes=20,
                     lag_s=3.0, untagged=True)
    a = rate([run(per_request, 50_000 + i) for i in range(20)], "outcome")
    b = rate([run(untagged, 60_000 + i) for i in range(20)], "srm")
    print(f"\nnegative controls: sticky keys analysed per request: outcome fires in {a:.2f} of 20 runs; untagged counts "
          f"under a 3 s routing lag: SRM fires in {b:.2f} of 20")
    assert a >= 0.4 and b >= 0.2
