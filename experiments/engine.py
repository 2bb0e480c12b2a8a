"""The experiment's decisions: a pure function of (routing config, state, observation, now).

`judge` runs once per interval. It folds what happened since the last judgment into the
state (counts, outcome moments, the guardrail and SRM e-processes) and applies the rules
in order: SRM -> pause; a guardrail alarm -> rollback (candidate weight 0, latched until
`retry`); the step has its minimum requests and duration -> next step, and after the last
one promote (`promote: auto`); too little data -> hold. `act` applies a person's action.
Both return a `Judgment`: the new state, the routing config to write (one atomic write,
or None) and the decision to record (or None). Nothing here reads a clock or a file: the
caller passes `now` (wall-clock seconds, since state outlives the process) and persists
`state.to_json()` beside the routing document.

Sticky users stay put across steps: with two weighted versions the bands are [0, w) and
[w, 1) in version order, so raising the candidate's weight only moves keys onto it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from experiments import stats
from experiments.stats import Moments
from router.config import ExperimentConfig, RouteConfig

PHASES = ("running", "holding", "paused", "rolled_back", "promoted")
ACTIONS = ("promote", "rollback", "pause", "resume", "retry")
MAX_DECISIONS = 100


class ExperimentError(Exception):
    """An action that does not apply: kind "not_found" (no experiment) or "conflict" (wrong phase)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass(frozen=True, slots=True)
class ArmObservation:
    """One arm's increments since the last judgment.

    units: assignment units the split routed there (requests when unkeyed; None: use
    requests). latency: histogram counts of successful requests over Observation.edges.
    outcomes: metric -> moments of the feedback values joined to this arm.
    """

    requests: int = 0
    errors: int = 0
    units: int | None = None
    latency: tuple[int, ...] = ()
    outcomes: Mapping[str, Moments] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Observation:
    control: ArmObservation = ArmObservation()
    candidate: ArmObservation = ArmObservation()
    edges: tuple[float, ...] = ()  # bucket i holds (edges[i-1], edges[i]]; one overflow bucket


@dataclass(frozen=True, slots=True)
class Decision:
    """One automatic or manual move, with a reason a person can read."""

    time: float
    action: str  # start | advance | promote | rollback | pause | resume | retry | hold | run
    reason: str
    by: str  # auto | manual
    step: int
    candidate_weight: float

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class ExperimentState:
    """Everything the experiment needs across intervals and restarts; pairs are (control, candidate)."""

    spec: str  # fingerprint of the experiment block and its arms' versions
    phase: str
    step: int
    started: float
    step_started: float
    judged: float
    requests: tuple[int, int] = (0, 0)
    errors: tuple[int, int] = (0, 0)
    units: tuple[int, int] = (0, 0)
    expected_units: float = 0.0  # candidate units the configured shares predict
    step_requests: tuple[int, int] = (0, 0)
    step_errors: tuple[int, int] = (0, 0)
    srm: tuple[float, ...] = stats.fresh(stats.SRM_SHIFTS)
    error_ev: tuple[float, ...] = stats.fresh(stats.ERROR_SHIFTS)
    latency_ev: tuple[float, ...] = stats.fresh(stats.LATENCY_SHIFTS)
    slow: tuple[int, int] = (0, 0)  # (candidate requests above the threshold, candidate requests judged)
    threshold: float | None = None  # the latest latency threshold (used while control has no traffic)
    outcomes: tuple[tuple[str, Moments, Moments], ...] = ()
    paused_by: str | None = None  # srm | manual
    latch: str | None = None  # the rollback reason, until retry
    decisions: tuple[Decision, ...] = ()

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["outcomes"] = [[m, list(dataclasses.astuple(a)), list(dataclasses.astuple(b))] for m, a, b in self.outcomes]
        out["decisions"] = [d.to_json() for d in self.decisions]
        for k in _PAIRS:
            out[k] = list(out[k])
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ExperimentState:
        """Rebuild a persisted state; a malformed one raises ValueError (the caller starts afresh)."""
        try:
            kw = dict(obj)
            for k in _PAIRS:
                kw[k] = tuple(kw[k])
            kw["outcomes"] = tuple((str(m), Moments(*a), Moments(*b)) for m, a, b in kw["outcomes"])
            kw["decisions"] = tuple(Decision(**d) for d in kw["decisions"])
            state = cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not an experiment state: {e}") from None
        if state.phase not in PHASES:
            raise ValueError(f"not an experiment state: unknown phase {state.phase!r}")
        return state


_PAIRS = ("requests", "errors", "units", "step_requests", "step_errors", "srm", "error_ev", "latency_ev", "slow")


@dataclass(frozen=True, slots=True)
class Judgment:
    state: ExperimentState | None
    route: RouteConfig | None = None  # the routing config to write, or None: no change
    decision: Decision | None = None


def fingerprint(route: RouteConfig) -> str:
    """Identity of the experiment: its block and the versions its arms resolve to."""
    exp = _exp(route)
    doc = {"block": exp.to_json(), "versions": [route.target_of(exp.control), route.target_of(exp.candidate)]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def judge(route: RouteConfig, state: ExperimentState | None, obs: Observation | None, now: float) -> Judgment:
    """One interval's judgment; see the module docstring for the rules and their order."""
    exp = route.experiment
    if exp is None:
        return Judgment(state)
    if state is None or state.spec != fingerprint(route):
        return start(route, now)
    if state.phase in ("rolled_back", "promoted"):
        return Judgment(dataclasses.replace(state, judged=now))
    obs = obs or Observation()
    weight = exp.steps[state.step]
    share = candidate_share(route)
    state = _fold(exp, state, obs, share, now)
    ctrl_name, cand_name = _name(exp.control), _name(exp.candidate)

    if state.phase != "paused" and stats.log_evidence(state.srm) >= math.log(1 / stats.SRM_ALPHA):
        return _decide(exp, dataclasses.replace(state, phase="paused", paused_by="srm"), None, "pause",
                       _srm_reason(exp, state, share), now)
    alarm = _alarm(exp, state)
    if alarm is not None:
        new = dataclasses.replace(state, phase="rolled_back", latch=alarm)
        return _decide(exp, new, _with_weight(route, 0), "rollback", alarm, now)
    if state.phase == "paused":
        return Judgment(state)

    c, k = obs.control.requests, obs.candidate.requests
    if k == 0 or (c == 0 and weight < 100):
        quiet = " and ".join(n for n, v in ((ctrl_name, c), (cand_name, k)) if v == 0 and (n != ctrl_name or weight < 100))
        reason = f"holding at step {state.step + 1} ({_pct(weight)}): no requests on {quiet} in the last interval"
        return _transition(exp, state, "holding", "hold", reason, now)

    elapsed = now - state.step_started
    need = (0 if weight >= 100 else exp.min_requests, exp.min_requests)
    if elapsed < exp.min_duration_s or any(n < m for n, m in zip(state.step_requests, need, strict=True)):
        return _transition(exp, state, "running", "run", f"running at step {state.step + 1} ({_pct(weight)}): traffic is back",
                           now)
    met = (f"{elapsed:.0f} s (min {exp.min_duration_s:g}) with {state.step_requests[0]} {ctrl_name} and "
           f"{state.step_requests[1]} {cand_name} requests (min {exp.min_requests} per arm) and no alarm")
    if state.step + 1 < len(exp.steps):
        nxt = exp.steps[state.step + 1]
        new = dataclasses.replace(state, phase="running", step=state.step + 1, step_started=now, step_requests=(0, 0),
                                  step_errors=(0, 0))
        reason = f"step {state.step + 2} of {len(exp.steps)}: {cand_name} {_pct(weight)} -> {_pct(nxt)} after {met}"
        return _decide(exp, new, _with_weight(route, nxt), "advance", reason, now)
    worse = [o for o in outcome_views(exp, state) if o["verdict"] == "worse"]
    if worse:
        names = ", ".join(f"{o['metric']} ({o['difference']:+.4g})" for o in worse)
        return _transition(exp, state, "holding", "hold", f"last step done after {met}, but {cand_name} is significantly worse on "
                           f"{names}: not promoting", now)
    if exp.promote != "auto":
        return _transition(exp, state, "holding", "hold", f"last step done after {met}; promote: manual, waiting for a person", now)
    new_route, how = _promoted(route)
    return _decide(exp, dataclasses.replace(state, phase="promoted"), new_route, "promote",
                   f"promoted: {how}; the last step ran {met}", now)


def act(route: RouteConfig, state: ExperimentState | None, action: str, now: float) -> Judgment:
    """A person's action; raises ExperimentError when it does not apply to the current phase."""
    if action not in ACTIONS:
        raise ExperimentError("not_found", f"unknown experiment action {action!r} (expected: {', '.join(ACTIONS)})")
    exp = route.experiment
    if exp is None and state is not None and state.phase == "promoted":
        raise ExperimentError("conflict", f"the experiment is promoted; {action} does not apply")
    if exp is None:
        raise ExperimentError("not_found", "this model's routing has no experiment block")
    if state is None or state.spec != fingerprint(route):
        state = start(route, now).state
        assert state is not None
    phase, weight = state.phase, exp.steps[state.step]
    if phase == "promoted" or (phase == "rolled_back" and action != "retry"):
        raise ExperimentError("conflict", f"the experiment is {phase.replace('_', ' ')}; {action} does not apply"
                              + (" (retry first)" if phase == "rolled_back" else ""))
    if action == "retry":
        if phase != "rolled_back":
            raise ExperimentError("conflict", f"retry applies to a rolled back experiment; this one is {phase}")
        fresh = start(route, now).state
        assert fresh is not None
        new = dataclasses.replace(fresh, started=state.started, decisions=state.decisions)
        return _decide(exp, new, _with_weight(route, exp.steps[0]), "retry",
                       f"retry: latch cleared ({state.latch}); fresh evidence from step 1 ({_pct(exp.steps[0])})", now,
                       by="manual")
    if action == "pause":
        if phase == "paused":
            return Judgment(state)
        return _decide(exp, dataclasses.replace(state, phase="paused", paused_by="manual"), None, "pause",
                       f"paused by hand at step {state.step + 1} ({_pct(weight)})", now, by="manual")
    if action == "resume":
        if phase != "paused":
            return Judgment(state)
        new = dataclasses.replace(state, phase="running", paused_by=None,
                                  srm=stats.fresh(stats.SRM_SHIFTS) if state.paused_by == "srm" else state.srm)
        note = "; SRM evidence starts afresh" if state.paused_by == "srm" else ""
        return _decide(exp, new, None, "resume", f"resumed by hand at step {state.step + 1}{note}", now, by="manual")
    if action == "rollback":
        reason = f"rolled back by hand at step {state.step + 1} ({_pct(weight)})"
        return _decide(exp, dataclasses.replace(state, phase="rolled_back", latch=reason), _with_weight(route, 0),
                       "rollback", reason, now, by="manual")
    new_route, how = _promoted(route)
    return _decide(exp, dataclasses.replace(state, phase="promoted"), new_route, "promote",
                   f"promoted by hand at step {state.step + 1}: {how}", now, by="manual")


# --- helpers ------------------------------------------------------------------------------


def _exp(route: RouteConfig) -> ExperimentConfig:
    assert route.experiment is not None
    return route.experiment


def start(route: RouteConfig, now: float) -> Judgment:
    """A fresh experiment at its first step (the routing change, when the weights differ)."""
    exp = _exp(route)
    state = ExperimentState(spec=fingerprint(route), phase="running", step=0, started=now, step_started=now, judged=now)
    reason = (f"started: {_name(exp.candidate)} (version {route.target_of(exp.candidate)}) against "
              f"{_name(exp.control)} (version {route.target_of(exp.control)}), steps "
              f"{', '.join(_pct(s) for s in exp.steps)}")
    change = None if candidate_share(route) == exp.steps[0] / 100 else _with_weight(route, exp.steps[0])
    new = dataclasses.replace(state, decisions=(Decision(now, "start", reason, "auto", 1, exp.steps[0]),))
    return Judgment(new, change, new.decisions[0])


def _fold(exp: ExperimentConfig, s: ExperimentState, obs: Observation, share: float, now: float) -> ExperimentState:
    a, b = obs.control, obs.candidate
    ua = a.requests if a.units is None else a.units
    ub = b.requests if b.units is None else b.units
    kw: dict[str, Any] = {
        "judged": now,
        "requests": (s.requests[0] + a.requests, s.requests[1] + b.requests),
        "errors": (s.errors[0] + a.errors, s.errors[1] + b.errors),
        "units": (s.units[0] + ua, s.units[1] + ub),
        "expected_units": s.expected_units + (ua + ub) * share,
        "step_requests": (s.step_requests[0] + a.requests, s.step_requests[1] + b.requests),
        "step_errors": (s.step_errors[0] + a.errors, s.step_errors[1] + b.errors),
        "srm": stats.srm_update(s.srm, ua, ub, share),
    }
    if exp.errors is not None and a.requests > 0:
        kw["error_ev"] = stats.error_update(s.error_ev, exp.errors.max_ratio, (a.errors, a.requests),
                                            (b.errors, b.requests))
    elif exp.errors is not None:  # no control traffic now: against the control's past rate
        kw["error_ev"] = stats.error_update_vs_history(s.error_ev, exp.errors.max_ratio, (s.errors[0], s.requests[0]),
                                                       (b.errors, b.requests))
    if exp.latency is not None and b.latency and obs.edges:
        t = s.threshold
        if a.latency and sum(a.latency) > 0:
            t = stats.latency_threshold(obs.edges, a.latency, exp.latency.quantile, exp.latency.max_ratio) or t
        if t is not None:
            slow, n = stats.exceedances(obs.edges, b.latency, t)
            kw["latency_ev"] = stats.latency_update(s.latency_ev, exp.latency.quantile, slow, n)
            kw["slow"] = (s.slow[0] + slow, s.slow[1] + n)
            kw["threshold"] = t
    if exp.outcomes:
        old = {m: (x, y) for m, x, y in s.outcomes}
        rows = []
        for o in exp.outcomes:
            x, y = old.get(o.metric, (Moments(), Moments()))
            rows.append((o.metric, x.merge(a.outcomes.get(o.metric, Moments())),
                         y.merge(b.outcomes.get(o.metric, Moments()))))
        kw["outcomes"] = tuple(rows)
    return dataclasses.replace(s, **kw)


def _alarm(exp: ExperimentConfig, s: ExperimentState) -> str | None:
    bar = math.log(1 / exp.alpha)
    ctrl, cand = _name(exp.control), _name(exp.candidate)
    w = _pct(exp.steps[s.step])
    if exp.errors is not None and stats.log_evidence(s.error_ev) >= bar:
        (ea, eb), (na, nb) = s.step_errors, s.step_requests
        if na == 0:  # a 100% step: the control's figures are from the steps before
            (ea, _), (na, _) = s.errors, s.requests
        ra, rb = ea / max(na, 1), eb / max(nb, 1)
        ratio = f"ratio {rb / ra:.3g}" if ra > 0 else f"{ctrl} had none"
        return (f"errors: {cand} had {eb} errors in {nb} requests ({_rate(rb)}) at weight {w} against {ea} in {na} "
                f"({_rate(ra)}) on {ctrl}, {ratio} (max {exp.errors.max_ratio:g}); evidence {_ev(s.error_ev)} "
                f">= {1 / exp.alpha:g}")
    if exp.latency is not None and stats.log_evidence(s.latency_ev) >= bar:
        q = exp.latency.quantile
        return (f"latency p{q * 100:g}: {s.slow[0]} of {s.slow[1]} {cand} requests slower than "
                f"{exp.latency.max_ratio:g} x {ctrl}'s p{q * 100:g} at weight {w} (expected at most {_rate(1 - q)}), "
                f"evidence {_ev(s.latency_ev)} >= {1 / exp.alpha:g}")
    return None


def _srm_reason(exp: ExperimentConfig, s: ExperimentState, share: float) -> str:
    total = s.units[0] + s.units[1]
    chi2, p = stats.srm_chi2([s.units[0], s.units[1]], [total - s.expected_units, s.expected_units])
    return (f"sample ratio mismatch: {_name(exp.candidate)} got {s.units[1]} of {total} units, expected "
            f"{s.expected_units:.0f} (now {_pct(share * 100)}); chi-square {chi2:.1f}, p {p:.2g}; "
            f"evidence {_ev(s.srm)} >= {1 / stats.SRM_ALPHA:g}: paused, fix the routing and resume")


def _decide(exp: ExperimentConfig, new: ExperimentState, route: RouteConfig | None, action: str, reason: str,
            now: float, by: str = "auto") -> Judgment:
    weight = {"rolled_back": 0.0, "promoted": 100.0}.get(new.phase, float(exp.steps[new.step]))
    d = Decision(now, action, reason, by, new.step + 1, weight)
    return Judgment(dataclasses.replace(new, decisions=(*new.decisions, d)[-MAX_DECISIONS:]), route, d)


def _transition(exp: ExperimentConfig, state: ExperimentState, phase: str, action: str, reason: str,
                now: float) -> Judgment:
    """Move between running and holding, recording the change only (not every quiet interval)."""
    if state.phase == phase:
        return Judgment(state)
    new = dataclasses.replace(state, phase=phase)
    d = Decision(now, action, reason, "auto", new.step + 1, float(exp.steps[new.step]))
    return Judgment(dataclasses.replace(new, decisions=(*new.decisions, d)[-MAX_DECISIONS:]), None, d)


def candidate_share(route: RouteConfig) -> float:
    """The candidate's share of the configured weights (0 with none)."""
    exp = _exp(route)
    cand = route.target_of(exp.candidate)
    total = sum(route.weights.values())
    mine = sum(w for k, w in route.weights.items() if route.target_of(k) == cand)
    return mine / total if total > 0 else 0.0


def _with_weight(route: RouteConfig, weight: float) -> RouteConfig:
    exp = _exp(route)
    w = int(weight) if float(weight).is_integer() else weight
    return dataclasses.replace(route, weights={exp.control: 100 - w, exp.candidate: w})


def _promoted(route: RouteConfig) -> tuple[RouteConfig, str]:
    """The candidate takes all traffic; a control label moves to it; the experiment block ends."""
    exp = _exp(route)
    v = route.target_of(exp.candidate)
    if isinstance(exp.control, str):
        labels = {**route.labels, exp.control: v}
        weights: dict[str | int, float] = {exp.control: 100}
        how = f"label '{exp.control}' now points at version {v}"
    else:
        labels, weights = dict(route.labels), {exp.candidate: 100}
        how = f"version {v} takes all traffic"
    return dataclasses.replace(route, labels=labels, weights=weights, experiment=None), how


def outcome_views(exp: ExperimentConfig, s: ExperimentState) -> list[dict[str, Any]]:
    """Per outcome: arm means, the always-valid interval of the difference, and a verdict."""
    n0 = max(exp.min_requests, 100)
    out = []
    for metric, a, b in s.outcomes:
        spec = exp.outcome(metric)
        if spec is None:
            continue
        d = stats.difference(a, b, exp.alpha, n0, binary=spec.kind == "binary")
        verdict = "inconclusive"
        if d is not None and d.significant:
            better = (d.estimate > 0) == (spec.goal == "increase")
            verdict = "better" if better else "worse"
        out.append({
            "metric": metric, "kind": spec.kind, "goal": spec.goal,
            "control": {"n": a.n, "mean": a.mean}, "candidate": {"n": b.n, "mean": b.mean},
            "difference": None if d is None else d.estimate,
            "interval": None if d is None else [d.low, d.high],
            "evidence": None if d is None else _ev_value(d.log_lambda),
            "significant": bool(d is not None and d.significant), "verdict": verdict,
        })
    return out


def _name(ref: str | int) -> str:
    return ref if isinstance(ref, str) else f"version {ref}"


def _pct(w: float) -> str:
    return f"{w:g}%"


def _rate(r: float) -> str:
    return f"{r * 100:.3g}%"


def _ev_value(log_e: float) -> float:
    return math.exp(min(log_e, 700.0))


def _ev(log_lrs: tuple[float, ...]) -> str:
    """An e-value as people write it: 14, 1.4e3, 2e51 (from its log, so never inf)."""
    log10 = stats.log_evidence(log_lrs) / math.log(10)
    if log10 < 3:
        return f"{10 ** log10:.2g}"
    exp10 = math.floor(log10)
    return f"{10 ** (log10 - exp10):.2g}e{exp10}"
