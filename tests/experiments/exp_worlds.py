"""Seeded worlds that drive experiments.engine.judge the way the runtime will (issue 29).

A `World` routes traffic interval by interval under the weights the engine wrote, tags
every request with the routing generation and share it was routed under (a lagging
router keeps the old ones for `lag_s` after each change), and feeds per-generation
`GenerationObservation`s: counts, latency histograms, conversion outcomes (immediate
feedback) and, when keys are sticky, the per-key sums of stats.UnitSums. Base rates may
drift, an incident may hit both arms, and the candidate may differ from the control
from a given time on. `run` returns what happened: when each test first crossed, the
final phase and the time of promotion.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from experiments import ArmObservation, GenerationObservation, Moments, Observation, UnitSums, judge
from experiments import stats
from experiments.engine import candidate_share, tests_sharing_alpha
from router import RouteConfig

EDGES = tuple(10.0 ** (-6 + k / 48) for k in range(8 * 48 + 1))  # like runtime/metrics.py
_E = np.asarray(EDGES)

Rate = Callable[[float], float]  # minutes since start -> value


def const(v: float) -> Rate:
    return lambda t: v


def ramp(a: float, b: float, minutes: float) -> Rate:
    return lambda t: a + (b - a) * min(t / minutes, 1.0)


def after(t0: float, before: float, then: float) -> Rate:
    return lambda t: then if t >= t0 else before


@dataclass
class World:
    block: dict
    rate: float = 100.0  # requests per second, both arms together
    minutes: float = 45.0
    sticky_keys: int = 0  # 0: the request is the unit; else this many keys with skewed activity
    lag_s: float = 0.0  # the router applies a new split this long after the engine writes it
    err: tuple[Rate, Rate] = (const(0.01), const(0.01))
    conv: tuple[Rate, Rate] = (const(0.25), const(0.25))
    lat: tuple[Rate, Rate] = (const(1.0), const(1.0))  # latency multipliers of a lognormal (5 ms, sigma 0.5)
    incident: tuple[float, float] | None = None  # minutes: errors x2, latency x1.6 on both arms
    stop_at_first_alarm: bool = False
    outcomes: bool = True
    # negative controls: what the engine sees when the runtime does not do its part
    untagged: bool = False  # every request reported under the current generation and share
    request_unit: bool = False  # sticky traffic analysed as if the request were the unit
    extras: dict = field(default_factory=dict)

    def route(self) -> RouteConfig:
        doc = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 100}, "experiment": self.block}
        if self.sticky_keys and not self.request_unit:
            doc["sticky"] = {"header": "x-user-id"}
        return RouteConfig.from_json(doc)


@dataclass
class Result:
    outcome: float | None = None  # minute a verdict (better or worse) latched
    verdict: str = "inconclusive"
    errors: float | None = None  # minute the errors evidence crossed m / alpha
    latency: float | None = None
    srm: float | None = None
    phase: str = "running"
    promoted: float | None = None
    rolled_back: float | None = None


def run(world: World, seed: int) -> Result:
    rng = np.random.default_rng(seed)
    route = world.route()
    exp = route.experiment
    assert exp is not None
    dt = float(exp.interval_s)
    bar = math.log(tests_sharing_alpha(exp) / exp.alpha)
    j = judge(route, None, None, 0.0)
    state = j.state
    route = j.route or route
    cur = (state.generation, candidate_share(route))
    prev = cur
    changed_at = 0.0
    res = Result()
    k_n = world.sticky_keys
    if k_n:
        activity = rng.lognormal(0.0, 1.5, k_n)
        activity /= activity.sum()
        err_mult = rng.gamma(0.5, 2.0, k_n)  # mean 1: some users' requests fail far more often
        conv_mult = np.clip(rng.gamma(2.0, 0.5, k_n), 0.0, 3.5)  # mean ~1
        band = rng.random(k_n)  # the key's place in [0, 1): candidate when below the share
        first_gen = np.full(k_n, -1)  # the key's cohort: the generation it was first placed in
        first_arm = np.zeros(k_n, dtype=bool)  # ... and the arm (True: candidate), kept for life
        cum = {n: np.zeros(k_n) for n in ("req", "err", "conv")}
    shares = {cur[0]: cur[1]}
    t = 0.0
    steps = int(world.minutes * 60 / dt)
    for _ in range(steps):
        minute = t / 60.0
        inc = world.incident is not None and world.incident[0] <= minute < world.incident[1]
        segs = []  # (generation, share, fraction of the interval)
        lag_left = max(0.0, changed_at + world.lag_s - t)
        if lag_left > 0 and prev != cur:
            f = min(lag_left / dt, 1.0)
            segs.append((prev, f))
            if f < 1.0:
                segs.append((cur, 1.0 - f))
        else:
            segs.append((cur, 1.0))
        slices = []
        cohort_sums: dict[int, list] = {}
        for (gen, share), frac in segs:
            arms = []
            lam = world.rate * dt * frac
            if k_n:
                counts = rng.poisson(lam * activity)
                on_cand = band < share
                new = (counts > 0) & (first_gen < 0)
                first_gen[new] = gen
                first_arm[new] = on_cand[new]
                old = {n: a.copy() for n, a in cum.items()}
                draws = {}
            else:
                n = rng.poisson(lam)
                nb = rng.binomial(n, share)
            for i in (0, 1):
                p_err = min(world.err[i](minute) * (2.0 if inc else 1.0), 1.0)
                p_conv = world.conv[i](minute)
                scale = world.lat[i](minute) * (1.6 if inc else 1.0)
                if k_n:
                    mask = on_cand if i else ~on_cand
                    c = np.where(mask, counts, 0)
                    e = rng.binomial(c, np.clip(p_err * err_mult, 0, 1))
                    v = rng.binomial(c, np.clip(p_conv * conv_mult, 0, 1))
                    m, errs, conv = int(c.sum()), int(e.sum()), int(v.sum())
                    units = int((new & mask).sum())  # keys first placed now (SRM counts each once)
                    cum["req"] += c
                    cum["err"] += e
                    cum["conv"] += v
                    ue, uo = None, {}
                else:
                    m = nb if i else n - nb
                    errs = int(rng.binomial(m, p_err))
                    conv = int(rng.binomial(m, p_conv))
                    units, ue, uo = m, None, {}
                ok = m - errs
                hist: tuple[int, ...] = ()
                if exp.latency is not None and ok > 0:
                    lat = rng.lognormal(math.log(0.005 * scale), 0.5, ok)
                    hist = tuple(np.bincount(np.searchsorted(_E, lat), minlength=len(EDGES) + 1).tolist())
                outs = {}
                if world.outcomes and exp.outcomes and m > 0:
                    mean = conv / m
                    outs = {"conv": Moments(m, mean, m * mean * (1.0 - mean))}
                arms.append(ArmObservation(m, errs, units, hist, outs, ue, uo))
            slices.append(GenerationObservation(gen, share, arms[0], arms[1]))
            if k_n:  # per-key sums by cohort and first arm (intention to treat)
                active = counts > 0
                for c_gen in np.unique(first_gen[active]):
                    row = cohort_sums.setdefault(int(c_gen), [UnitSums(), UnitSums(), UnitSums(), UnitSums()])
                    for arm in (0, 1):
                        sel = active & (first_gen == c_gen) & (first_arm == bool(arm))
                        if not sel.any():
                            continue
                        units = int((sel & new).sum())
                        row[arm] = row[arm].merge(_inc(old["req"][sel], old["err"][sel], cum["req"][sel],
                                                       cum["err"][sel], units))
                        row[2 + arm] = row[2 + arm].merge(_inc(old["req"][sel], old["conv"][sel], cum["req"][sel],
                                                               cum["conv"][sel], units))
        if world.request_unit:
            cohort_sums = {}
        if world.untagged:
            slices = [GenerationObservation(cur[0], cur[1], _sum(sl.control for sl in slices),
                                            _sum(sl.candidate for sl in slices))]
        for c_gen, row in cohort_sums.items():
            at = next((i for i, sl in enumerate(slices) if sl.generation == c_gen), None)
            if at is None:
                slices.append(GenerationObservation(c_gen, shares[c_gen]))
                at = len(slices) - 1
            sl = slices[at]
            a = dataclasses.replace(sl.control, unit_errors=row[0], unit_outcomes={"conv": row[2]} if world.outcomes else {})
            b = dataclasses.replace(sl.candidate, unit_errors=row[1],
                                    unit_outcomes={"conv": row[3]} if world.outcomes else {})
            slices[at] = dataclasses.replace(sl, control=a, candidate=b)
        t += dt
        j = judge(route, state, Observation(edges=EDGES, generations=tuple(slices)), t)
        state = j.state
        if j.route is not None:
            route = j.route
            if route.experiment is not None:
                prev, cur = cur, (state.generation, candidate_share(route))
                shares[cur[0]] = cur[1]
                changed_at = t
        minute = t / 60.0
        if res.errors is None and stats.restart_evidence(state.error_ev, state.restarts[0]) >= bar \
                and exp.errors is not None:
            res.errors = minute
        if res.latency is None and stats.restart_evidence(state.latency_ev, state.restarts[1]) >= bar \
                and exp.latency is not None:
            res.latency = minute
        if res.srm is None and stats.log_evidence(state.srm) >= math.log(1 / stats.SRM_ALPHA):
            res.srm = minute
        for _, v, _, _ in state.verdicts:
            if v != "inconclusive" and res.outcome is None:
                res.outcome, res.verdict = minute, v
        if state.phase == "promoted" and res.promoted is None:
            res.promoted = minute
        if state.phase == "rolled_back" and res.rolled_back is None:
            res.rolled_back = minute
        if state.phase in ("promoted", "rolled_back"):
            break
        if world.stop_at_first_alarm and (res.errors is not None or res.latency is not None):
            break
    res.phase = state.phase
    return res


def _sum(arms) -> ArmObservation:
    arms = list(arms)
    hist = [sum(col) for col in zip(*[a.latency for a in arms if a.latency])] if any(a.latency for a in arms) else []
    outs: dict = {}
    for a in arms:
        for k, m in a.outcomes.items():
            outs[k] = outs.get(k, Moments()).merge(m)
    return ArmObservation(sum(a.requests for a in arms), sum(a.errors for a in arms),
                          sum(a.units or 0 for a in arms), tuple(hist), outs)


def _inc(old_x: np.ndarray, old_y: np.ndarray, x: np.ndarray, y: np.ndarray, units: int) -> UnitSums:
    """The increments of the per-key sums when the keys' (x, y) went from old to new."""
    return UnitSums(units, float((x - old_x).sum()), float((x * x - old_x * old_x).sum()),
                    float((y - old_y).sum()), float((y * y - old_y * old_y).sum()),
                    float((x * y - old_x * old_y).sum()))


def bound(alpha: float, runs: int) -> float:
    return alpha + 3.0 * math.sqrt(alpha * (1.0 - alpha) / runs)


def rate(results: list[Result], attr: str) -> float:
    return sum(getattr(r, attr) is not None for r in results) / len(results)


def replace_block(block: dict, **kw) -> dict:
    return {**block, **kw}


__all__ = ["EDGES", "World", "Result", "run", "bound", "rate", "const", "ramp", "after", "replace_block",
           "dataclasses"]


if __name__ == "__main__":  # the negative controls quoted in docs/experiments.md
    from test_exp_verdicts import BLOCK

    for name, w, runs, seed in (
        ("sticky keys analysed per request", World(BLOCK, rate=50, minutes=40, sticky_keys=3000,
                                                   conv=(ramp(0.25, 0.30, 40),) * 2, request_unit=True), 60, 50_000),
        ("routing lag 3 s at 10 s intervals, counts not tagged by generation",
         World({**BLOCK, "steps": [5, 25, 50], "interval_s": 10, "min_duration_s": 300}, rate=500, minutes=20,
               lag_s=3.0, untagged=True), 40, 60_000),
    ):
        rs = [run(w, seed + i) for i in range(runs)]
        print(name, runs, {k: rate(rs, k) for k in ("outcome", "errors", "latency", "srm")})
