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

Issue 29 (see docs/experiments.md): counts arrive per routing generation (the weights they
were routed under, `GenerationObservation`); SRM is tested per generation against its own
share and outcomes are estimated per generation and combined by precision; guardrail
evidence restarts at each step and every `window_intervals` intervals (a restart mixture);
with sticky routing the unit is the key (delta-method variances, overdispersion-scaled
error evidence); a last step of 100 keeps `holdback` percent on the control; one alpha is
shared (Bonferroni) by the outcomes and guardrails; outcome verdicts latch.
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
from experiments.stats import Moments, UnitSums
from router.config import ExperimentConfig, RouteConfig

PHASES = ("running", "holding", "paused", "rolled_back", "promoted")
ACTIONS = ("promote", "rollback", "pause", "resume", "retry")
MAX_DECISIONS = 100
MAX_GENERATIONS = 64
GUARD_SHIFTS = stats.RATIO_SHIFTS


class ExperimentError(Exception):
    """An action that does not apply: kind "not_found" (no experiment) or "conflict" (wrong phase)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message


@dataclass(frozen=True, slots=True)
class ArmObservation:
    """One arm's increments since the last judgment.

    units: assignment units the split routed there (requests when unkeyed; None: use
    requests; sticky: keys first seen in this generation). latency: histogram counts of
    successful requests over Observation.edges. outcomes: metric -> moments of the feedback
    values joined to this arm (the request as the unit).
    unit_errors (sticky only): increments of the per-key sums with x = requests and
    y = errors of each key (see stats.UnitSums). unit_outcomes (sticky only): metric ->
    increments of the per-key sums with x = feedback items and y = the sum of their values.
    late: feedback items for this arm that came after feedback_window_s (not in outcomes).
    """

    requests: int = 0
    errors: int = 0
    units: int | None = None
    latency: tuple[int, ...] = ()
    outcomes: Mapping[str, Moments] = field(default_factory=dict)
    unit_errors: UnitSums | None = None
    unit_outcomes: Mapping[str, UnitSums] = field(default_factory=dict)
    late: int = 0


@dataclass(frozen=True, slots=True)
class GenerationObservation:
    """The increments of one routing generation: what was routed under one set of weights.

    generation: ExperimentState.generation when the routing in force was written (feedback
    carries the generation of the request it joins). share: the candidate's share of the
    split those requests were routed under (0..1), as the router used it.
    """

    generation: int
    share: float
    control: ArmObservation = ArmObservation()
    candidate: ArmObservation = ArmObservation()


@dataclass(frozen=True, slots=True)
class Observation:
    """What happened since the last judgment. With `generations` the top-level arms must be
    empty; without, they are one generation: the current one at the configured share."""

    control: ArmObservation = ArmObservation()
    candidate: ArmObservation = ArmObservation()
    edges: tuple[float, ...] = ()  # bucket i holds (edges[i-1], edges[i]]; one overflow bucket
    generations: tuple[GenerationObservation, ...] = ()


_EMPTY_UNITS = UnitSums()


@dataclass(frozen=True, slots=True)
class GenStats:
    """Cumulative counts of one routing generation; pairs are (control, candidate)."""

    generation: int
    share: float
    units: tuple[int, int] = (0, 0)
    requests: tuple[int, int] = (0, 0)
    errors: tuple[int, int] = (0, 0)
    unit_errors: tuple[UnitSums, UnitSums] = (_EMPTY_UNITS, _EMPTY_UNITS)
    outcomes: tuple[tuple[str, Moments, Moments, UnitSums, UnitSums], ...] = ()

    def to_json(self) -> list[Any]:
        return [self.generation, self.share, list(self.units), list(self.requests), list(self.errors),
                [list(dataclasses.astuple(u)) for u in self.unit_errors],
                [[m, list(dataclasses.astuple(a)), list(dataclasses.astuple(b)), list(dataclasses.astuple(ua)),
                  list(dataclasses.astuple(ub))] for m, a, b, ua, ub in self.outcomes]]

    @classmethod
    def from_json(cls, v: Any) -> GenStats:
        g, share, units, requests, errors, ue, outs = v
        return cls(int(g), float(share), (units[0], units[1]), (requests[0], requests[1]), (errors[0], errors[1]),
                   (UnitSums(*ue[0]), UnitSums(*ue[1])),
                   tuple((str(m), Moments(*a), Moments(*b), UnitSums(*ua), UnitSums(*ub)) for m, a, b, ua, ub in outs))

    def outcome(self, metric: str) -> tuple[Moments, Moments, UnitSums, UnitSums]:
        for m, a, b, ua, ub in self.outcomes:
            if m == metric:
                return a, b, ua, ub
        return Moments(), Moments(), _EMPTY_UNITS, _EMPTY_UNITS


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
    """Everything the experiment needs across intervals and restarts; pairs are (control, candidate).

    error_ev / latency_ev: log A per shift of the restart mixtures (stats.restarted), with
    `restarts` = (J errors, J latency) components started; `window`: intervals judged since
    the last restart. gens: per routing generation (GenStats). verdicts: per outcome, the
    latched verdict and the running intersection of its always-valid intervals.
    """

    spec: str  # fingerprint of the experiment block and its arms' versions
    phase: str
    step: int
    started: float
    step_started: float
    judged: float
    requests: tuple[int, int] = (0, 0)
    errors: tuple[int, int] = (0, 0)
    units: tuple[int, int] = (0, 0)
    expected_units: float = 0.0  # candidate units the routed shares predict
    step_requests: tuple[int, int] = (0, 0)
    step_errors: tuple[int, int] = (0, 0)
    srm: tuple[float, ...] = stats.fresh(stats.SRM_SHIFTS)
    error_ev: tuple[float, ...] = stats.fresh(GUARD_SHIFTS)
    latency_ev: tuple[float, ...] = stats.fresh(GUARD_SHIFTS)
    slow: tuple[float, float] = (0, 0)  # this step: (candidate requests above r x c, candidate requests judged)
    threshold: float | None = None  # c: the control's quantile (s), estimated from earlier intervals
    outcomes: tuple[tuple[str, Moments, Moments], ...] = ()  # pooled over generations, for display
    paused_by: str | None = None  # srm | manual
    latch: str | None = None  # the rollback reason, until retry
    decisions: tuple[Decision, ...] = ()
    generation: int = 0  # the routing generation now written; +1 at every routing change
    gens: tuple[GenStats, ...] = ()
    restarts: tuple[int, int] = (0, 0)
    window: int = 0
    slow_control: tuple[float, float] = (0, 0)  # this step: (control requests above c, control requests judged)
    lat_control: tuple[int, ...] = ()  # this step's control latency histogram (c comes from it)
    step_intervals: int = 0  # intervals at this step with traffic on both arms
    verdicts: tuple[tuple[str, str, float | None, float | None], ...] = ()
    late: tuple[int, int] = (0, 0)  # feedback items after feedback_window_s, per arm
    dispersion: float = 1.0  # key unit: variance inflation of the error counts (>= 1)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["outcomes"] = [[m, list(dataclasses.astuple(a)), list(dataclasses.astuple(b))] for m, a, b in self.outcomes]
        out["decisions"] = [d.to_json() for d in self.decisions]
        out["gens"] = [g.to_json() for g in self.gens]
        out["verdicts"] = [list(v) for v in self.verdicts]
        for k in _PAIRS:
            out[k] = list(out[k])
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ExperimentState:
        """Rebuild a persisted state; a malformed one raises ValueError (the caller starts afresh)."""
        try:
            kw = dict(obj)
            for k in _PAIRS:
                if k in kw:
                    kw[k] = tuple(kw[k])
            kw["outcomes"] = tuple((str(m), Moments(*a), Moments(*b)) for m, a, b in kw["outcomes"])
            kw["decisions"] = tuple(Decision(**d) for d in kw["decisions"])
            kw["gens"] = tuple(GenStats.from_json(g) for g in kw.get("gens", ()))
            kw["verdicts"] = tuple((str(m), str(v), lo, hi) for m, v, lo, hi in kw.get("verdicts", ()))
            if "restarts" not in kw:  # persisted before issue 29: guardrail evidence starts afresh
                kw["error_ev"], _ = stats.restarted(stats.fresh(GUARD_SHIFTS), 0)
                kw["latency_ev"], _ = stats.restarted(stats.fresh(GUARD_SHIFTS), 0)
                kw["restarts"] = (1, 1)
                kw["slow"] = (0, 0)
            state = cls(**kw)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not an experiment state: {e}") from None
        if state.phase not in PHASES:
            raise ValueError(f"not an experiment state: unknown phase {state.phase!r}")
        return state


_PAIRS = ("requests", "errors", "units", "step_requests", "step_errors", "srm", "error_ev", "latency_ev", "slow",
          "restarts", "slow_control", "lat_control", "late")


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


def steps_of(exp: ExperimentConfig) -> tuple[float, ...]:
    """The weights the experiment routes: a last step of 100 becomes 100 - holdback (a
    concurrent control to the end); dropped when the step before is already above that."""
    steps = list(exp.steps)
    if steps[-1] >= 100:
        hb = 100 - exp.holdback
        if len(steps) > 1 and steps[-2] >= hb:
            steps.pop()
        else:
            steps[-1] = hb
    return tuple(steps)


def is_holdback(exp: ExperimentConfig, step: int) -> bool:
    eff = steps_of(exp)
    return exp.steps[-1] >= 100 and len(eff) == len(exp.steps) and step == len(eff) - 1


def tests_sharing_alpha(exp: ExperimentConfig) -> int:
    """Outcomes and guardrails share exp.alpha (Bonferroni): each is judged at alpha / this."""
    return max(1, len(exp.outcomes) + (exp.errors is not None) + (exp.latency is not None))


def routing_history(state: ExperimentState) -> tuple[int, tuple[tuple[int, float], ...]]:
    """(the routing generation now written, (generation, share) of each one with counts):
    what a runtime maps the share a request was routed at onto."""
    return state.generation, tuple((g.generation, g.share) for g in state.gens)


def unit_of(route: RouteConfig) -> str:
    return "key" if route.sticky is not None else "request"


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
    steps = steps_of(exp)
    weight = steps[state.step]
    share = candidate_share(route)
    if share >= 1.0 and is_holdback(exp, state.step) and state.phase in ("running", "holding"):
        # a state from before issue 29 at its 100% step: keep a concurrent control from now on
        new = dataclasses.replace(state, judged=now, generation=state.generation + 1, step_started=now,
                                  step_requests=(0, 0), step_errors=(0, 0), step_intervals=0)
        return _decide(exp, new, _with_weight(route, weight), "run",
                       f"holding back {_pct(100 - weight)} on {_name(exp.control)} at the last step (was 100%): "
                       "no judgment against history", now)
    slices = _slices(state, obs, share)
    state = _fold(route, exp, state, obs.edges, slices, now)
    state = _latch(route, exp, state)
    ctrl_name, cand_name = _name(exp.control), _name(exp.candidate)

    if state.phase != "paused" and stats.log_evidence(state.srm) >= math.log(1 / stats.SRM_ALPHA):
        return _decide(exp, dataclasses.replace(state, phase="paused", paused_by="srm"), None, "pause",
                       _srm_reason(exp, state, share), now)
    alarm = _alarm(exp, state, route)
    if alarm is not None:
        new = dataclasses.replace(state, phase="rolled_back", latch=alarm)
        return _decide(exp, new, _with_weight(route, 0), "rollback", alarm, now)
    if state.phase == "paused":
        return Judgment(state)

    c = sum(g.control.requests for g in slices)
    k = sum(g.candidate.requests for g in slices)
    if k == 0 or c == 0:
        quiet = " and ".join(n for n, v in ((ctrl_name, c), (cand_name, k)) if v == 0)
        reason = f"holding at step {state.step + 1} ({_pct(weight)}): no requests on {quiet} in the last interval"
        return _transition(exp, state, "holding", "hold", reason, now)

    elapsed = now - state.step_started
    holdback = is_holdback(exp, state.step)
    need = (0 if holdback else exp.min_requests, exp.min_requests)
    if (elapsed < exp.min_duration_s or any(n < m for n, m in zip(state.step_requests, need, strict=True))
            or (holdback and state.step_intervals < exp.holdback_intervals)):
        return _transition(exp, state, "running", "run", f"running at step {state.step + 1} ({_pct(weight)}): traffic is back",
                           now)
    met = (f"{elapsed:.0f} s (min {exp.min_duration_s:g}) with {state.step_requests[0]} {ctrl_name} and "
           f"{state.step_requests[1]} {cand_name} requests (min {exp.min_requests} per arm) and no alarm")
    if holdback:
        met = (f"{elapsed:.0f} s and {state.step_intervals} intervals (min {exp.holdback_intervals}) holding back "
               f"{_pct(100 - weight)} on {ctrl_name}, with {state.step_requests[0]} {ctrl_name} and "
               f"{state.step_requests[1]} {cand_name} requests and no alarm")
    if state.step + 1 < len(steps):
        nxt = steps[state.step + 1]
        new = _restart(dataclasses.replace(state, phase="running", step=state.step + 1, step_started=now,
                                           step_requests=(0, 0), step_errors=(0, 0), step_intervals=0,
                                           slow=(0, 0), slow_control=(0, 0), lat_control=(),
                                           generation=state.generation + 1))
        reason = f"step {state.step + 2} of {len(steps)}: {cand_name} {_pct(weight)} -> {_pct(nxt)} after {met}"
        return _decide(exp, new, _with_weight(route, nxt), "advance", reason, now)
    views = outcome_views(exp, state, route)
    worse = [o for o in views if o["verdict"] == "worse"]
    if worse:
        names = ", ".join(f"{o['metric']} ({o['difference']:+.4g})" for o in worse)
        return _transition(exp, state, "holding", "hold", f"last step done after {met}, but {cand_name} is significantly worse on "
                           f"{names}: not promoting (keep)", now)
    waiting = [o for o in views if not o["promotable"]]
    if exp.promote != "auto":
        note = f" (not yet shown non-inferior: {', '.join(o['metric'] for o in waiting)})" if waiting else ""
        return _transition(exp, state, "holding", "hold", f"last step done after {met}; promote: manual, waiting for a "
                           f"person{note}", now)
    if waiting:
        names = ", ".join(f"{o['metric']} (n {min(o['control']['n'], o['candidate']['n'])} of {exp.planned_n} per arm)"
                          for o in waiting)
        return _transition(exp, state, "holding", "hold", f"last step done after {met}; waiting for evidence on {names}: "
                           "promotion needs each outcome's lower bound above -margin, or planned_n per arm with "
                           "no harm", now)
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
    steps = steps_of(exp)
    phase, weight = state.phase, steps[state.step]
    if phase == "promoted" or (phase == "rolled_back" and action != "retry"):
        raise ExperimentError("conflict", f"the experiment is {phase.replace('_', ' ')}; {action} does not apply"
                              + (" (retry first)" if phase == "rolled_back" else ""))
    if action == "retry":
        if phase != "rolled_back":
            raise ExperimentError("conflict", f"retry applies to a rolled back experiment; this one is {phase}")
        fresh = start(route, now).state
        assert fresh is not None
        new = dataclasses.replace(fresh, started=state.started, decisions=state.decisions,
                                  generation=state.generation + 1)
        return _decide(exp, new, _with_weight(route, steps[0]), "retry",
                       f"retry: latch cleared ({state.latch}); fresh evidence from step 1 ({_pct(steps[0])})", now,
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
        return _decide(exp, dataclasses.replace(state, phase="rolled_back", latch=reason,
                                                generation=state.generation + 1), _with_weight(route, 0),
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
    steps = steps_of(exp)
    state = _restart(ExperimentState(spec=fingerprint(route), phase="running", step=0, started=now, step_started=now,
                                     judged=now))
    reason = (f"started: {_name(exp.candidate)} (version {route.target_of(exp.candidate)}) against "
              f"{_name(exp.control)} (version {route.target_of(exp.control)}), steps "
              f"{', '.join(_pct(s) for s in steps)}")
    if steps != exp.steps:
        reason += f" (the last holds back {_pct(100 - steps[-1])} on {_name(exp.control)} before promotion)"
    change = None if candidate_share(route) == steps[0] / 100 else _with_weight(route, steps[0])
    if change is not None:
        state = dataclasses.replace(state, generation=1)
    new = dataclasses.replace(state, decisions=(Decision(now, "start", reason, "auto", 1, steps[0]),))
    return Judgment(new, change, new.decisions[0])


def _restart(s: ExperimentState) -> ExperimentState:
    """Start the next component of both guardrails' restart mixtures."""
    ev, je = stats.restarted(s.error_ev, s.restarts[0])
    lv, jl = stats.restarted(s.latency_ev, s.restarts[1])
    return dataclasses.replace(s, error_ev=ev, latency_ev=lv, restarts=(je, jl), window=0)


def _slices(state: ExperimentState, obs: Observation, share: float) -> tuple[GenerationObservation, ...]:
    if obs.generations:
        return tuple(obs.generations)
    return (GenerationObservation(state.generation, share, obs.control, obs.candidate),)


def _units(a: ArmObservation) -> int:
    return a.requests if a.units is None else a.units


def _pair(p: tuple, a: Any, b: Any) -> tuple:
    return (p[0] + a, p[1] + b)


def _fold(route: RouteConfig, exp: ExperimentConfig, s: ExperimentState, edges: tuple[float, ...],
          slices: tuple[GenerationObservation, ...], now: float) -> ExperimentState:
    if s.window >= exp.window_intervals:
        s = _restart(s)
    gens = {g.generation: g for g in s.gens}
    kw: dict[str, Any] = {"judged": now}
    requests, errors, units, exp_units = s.requests, s.errors, s.units, s.expected_units
    step_requests, step_errors, late = s.step_requests, s.step_errors, s.late
    srm, error_ev, latency_ev = s.srm, s.error_ev, s.latency_ev
    slow, slow_control = s.slow, s.slow_control
    lat_control = list(s.lat_control)
    both = [0, 0]
    for sl in slices:  # counts, SRM and outcome sums per generation (cohort, for per-key sums)
        a, b = sl.control, sl.candidate
        g = gens.get(sl.generation) or GenStats(sl.generation, float(sl.share))
        outs = []
        for o in exp.outcomes:
            ma, mb, ua, ub = g.outcome(o.metric)
            outs.append((o.metric, ma.merge(a.outcomes.get(o.metric, Moments())),
                         mb.merge(b.outcomes.get(o.metric, Moments())),
                         ua.merge(a.unit_outcomes.get(o.metric, _EMPTY_UNITS)),
                         ub.merge(b.unit_outcomes.get(o.metric, _EMPTY_UNITS))))
        gens[sl.generation] = dataclasses.replace(
            g, units=_pair(g.units, _units(a), _units(b)), requests=_pair(g.requests, a.requests, b.requests),
            errors=_pair(g.errors, a.errors, b.errors),
            unit_errors=(g.unit_errors[0].merge(a.unit_errors or _EMPTY_UNITS),
                         g.unit_errors[1].merge(b.unit_errors or _EMPTY_UNITS)),
            outcomes=tuple(outs))
        requests = _pair(requests, a.requests, b.requests)
        errors = _pair(errors, a.errors, b.errors)
        units = _pair(units, _units(a), _units(b))
        exp_units += (_units(a) + _units(b)) * sl.share
        step_requests = _pair(step_requests, a.requests, b.requests)
        step_errors = _pair(step_errors, a.errors, b.errors)
        late = _pair(late, a.late, b.late)
        both[0] += a.requests
        both[1] += b.requests
        srm = stats.srm_update(srm, _units(a), _units(b), sl.share)
    phi = 1.0  # the key unit: errors come in clusters per key; their evidence is scaled down
    if unit_of(route) == "key":
        phi = stats.dispersion(*(u for g in gens.values() for u in g.unit_errors))
    for sl in slices:  # guardrails per generation
        a, b = sl.control, sl.candidate
        if exp.errors is not None:
            error_ev = stats.ratio_update(error_ev, GUARD_SHIFTS, exp.errors.max_ratio, (a.errors, a.requests),
                                          (b.errors, b.requests), scale=phi)
        if exp.latency is not None and edges and s.threshold is not None and a.latency and b.latency:
            c = s.threshold
            xa, na = stats.above(edges, a.latency, c), float(sum(a.latency))
            xb, nb = stats.above(edges, b.latency, exp.latency.max_ratio * c), float(sum(b.latency))
            if na > 0 and nb > 0:
                latency_ev = stats.ratio_update(latency_ev, GUARD_SHIFTS, 1.0, (xa, na), (xb, nb))
                slow = _pair(slow, xb, nb)
                slow_control = _pair(slow_control, xa, na)
    if exp.latency is not None and edges:
        for sl in slices:
            h = sl.control.latency
            if h:
                lat_control = [x + y for x, y in zip(lat_control, h)] if lat_control else list(h)
        n = sum(lat_control)
        enough = min(100.0, 1.0 / (1.0 - exp.latency.quantile))
        if lat_control and (n >= enough or s.threshold is None):
            kw["threshold"] = stats.quantile_edge(edges, lat_control, exp.latency.quantile) or s.threshold
    if len(gens) > MAX_GENERATIONS:  # the oldest go (their counts stay in the totals)
        gens = dict(sorted(gens.items())[-MAX_GENERATIONS:])
    pooled = []
    for o in exp.outcomes:
        x, y = Moments(), Moments()
        for g in gens.values():
            ma, mb, _, _ = g.outcome(o.metric)
            x, y = x.merge(ma), y.merge(mb)
        pooled.append((o.metric, x, y))
    judged = both[0] > 0 and both[1] > 0
    kw.update(requests=requests, errors=errors, units=units, expected_units=exp_units, step_requests=step_requests,
              step_errors=step_errors, late=late, srm=srm, error_ev=error_ev, latency_ev=latency_ev, slow=slow,
              slow_control=slow_control, lat_control=tuple(lat_control), gens=tuple(sorted(gens.values(),
                                                                                          key=lambda g: g.generation)),
              outcomes=tuple(pooled), step_intervals=s.step_intervals + judged, window=s.window + judged,
              dispersion=phi)
    return dataclasses.replace(s, **kw)


def _outcome_difference(exp: ExperimentConfig, s: ExperimentState, metric: str, binary: bool, unit: str
                        ) -> tuple[stats.Difference | None, str, float, float]:
    """The stratified comparison of one outcome: (difference, unit used, n control, n candidate)."""
    strata = []
    na = nb = 0.0
    used = "request"
    for g in s.gens:
        ma, mb, ua, ub = g.outcome(metric)
        st_ = None
        if unit == "key" and (ua.units or ub.units):
            st_ = stats.stratum_from_units(ua, ub, binary)
            used = "key"
            na, nb = na + ua.units, nb + ub.units
        else:
            st_ = stats.stratum_from_moments(ma, mb, binary)
            na, nb = na + ma.n, nb + mb.n
        if st_ is not None:
            strata.append(st_)
    alpha = exp.alpha / tests_sharing_alpha(exp)
    return stats.stratified_difference(strata, alpha, exp.planned_n), used, na, nb


def _latch(route: RouteConfig, exp: ExperimentConfig, s: ExperimentState) -> ExperimentState:
    """Latch each outcome's verdict at its first crossing; intersect its intervals over looks."""
    old = {m: (v, lo, hi) for m, v, lo, hi in s.verdicts}
    rows = []
    for o in exp.outcomes:
        verdict, lo, hi = old.get(o.metric, ("inconclusive", None, None))
        d, _, _, _ = _outcome_difference(exp, s, o.metric, o.kind == "binary", unit_of(route))
        if d is not None:
            nlo, nhi = max(d.low, lo) if lo is not None else d.low, min(d.high, hi) if hi is not None else d.high
            if nlo <= nhi:
                lo, hi = nlo, nhi
            if verdict == "inconclusive" and d.significant:
                verdict = "better" if (d.estimate > 0) == (o.goal == "increase") else "worse"
        rows.append((o.metric, verdict, lo, hi))
    return dataclasses.replace(s, verdicts=tuple(rows))


def _alarm(exp: ExperimentConfig, s: ExperimentState, route: RouteConfig) -> str | None:
    m = tests_sharing_alpha(exp)
    bar = math.log(m / exp.alpha)
    ctrl, cand = _name(exp.control), _name(exp.candidate)
    w = _pct(steps_of(exp)[s.step])
    share = f" (alpha {exp.alpha:g} shared by {m} tests)" if m > 1 else ""
    if exp.errors is not None and stats.restart_evidence(s.error_ev, s.restarts[0]) >= bar:
        (ea, eb), (na, nb) = s.step_errors, s.step_requests
        ra, rb = ea / max(na, 1), eb / max(nb, 1)
        ratio = f"ratio {rb / ra:.3g}" if ra > 0 else f"{ctrl} had none"
        unit = f"; unit key, dispersion {s.dispersion:.3g}" if unit_of(route) == "key" else ""
        return (f"errors: {cand} had {eb} errors in {nb} requests ({_rate(rb)}) at weight {w} against {ea} in {na} "
                f"({_rate(ra)}) on {ctrl}, {ratio} (max {exp.errors.max_ratio:g}); evidence "
                f"{_ev_log(stats.restart_evidence(s.error_ev, s.restarts[0]))} >= {m / exp.alpha:g}{share}{unit}")
    if exp.latency is not None and stats.restart_evidence(s.latency_ev, s.restarts[1]) >= bar:
        q = exp.latency.quantile
        c = s.threshold or 0.0
        return (f"latency p{q * 100:g}: {s.slow[0]:.0f} of {s.slow[1]:.0f} {cand} requests slower than "
                f"{exp.latency.max_ratio:g} x {ctrl}'s p{q * 100:g} ({exp.latency.max_ratio * c * 1e3:.3g} ms) at weight "
                f"{w} against {s.slow_control[0]:.0f} of {s.slow_control[1]:.0f} {ctrl} requests slower than "
                f"{c * 1e3:.3g} ms (expected at most {_rate(1 - q)}); evidence "
                f"{_ev_log(stats.restart_evidence(s.latency_ev, s.restarts[1]))} >= {m / exp.alpha:g}{share}")
    return None


def srm_by_generation(s: ExperimentState) -> list[dict[str, Any]]:
    out = []
    for g in s.gens:
        total = g.units[0] + g.units[1]
        expected = total * g.share
        chi2, p = stats.srm_chi2([g.units[0], g.units[1]], [total - expected, expected])
        out.append({"generation": g.generation, "share": g.share, "units": list(g.units),
                    "expected_candidate_units": expected, "chi2": chi2, "p_value": p})
    return out


def _srm_reason(exp: ExperimentConfig, s: ExperimentState, share: float) -> str:
    total = s.units[0] + s.units[1]
    chi2, p = stats.srm_chi2([s.units[0], s.units[1]], [total - s.expected_units, s.expected_units])
    worst = min(srm_by_generation(s), key=lambda g: g["p_value"], default=None)
    where = ""
    if worst is not None and len(s.gens) > 1:
        where = (f"; worst generation {worst['generation']} (routed at {_pct(worst['share'] * 100)}): "
                 f"{worst['units'][1]} of {sum(worst['units'])}, p {worst['p_value']:.2g}")
    return (f"sample ratio mismatch: {_name(exp.candidate)} got {s.units[1]} of {total} units, expected "
            f"{s.expected_units:.0f} (now {_pct(share * 100)}); chi-square {chi2:.1f}, p {p:.2g}{where}; "
            f"evidence {_ev(s.srm)} >= {1 / stats.SRM_ALPHA:g}: paused, fix the routing and resume")


def _weight_of(exp: ExperimentConfig, s: ExperimentState) -> float:
    return {"rolled_back": 0.0, "promoted": 100.0}.get(s.phase, float(steps_of(exp)[s.step]))


def _decide(exp: ExperimentConfig, new: ExperimentState, route: RouteConfig | None, action: str, reason: str,
            now: float, by: str = "auto") -> Judgment:
    d = Decision(now, action, reason, by, new.step + 1, _weight_of(exp, new))
    return Judgment(dataclasses.replace(new, decisions=(*new.decisions, d)[-MAX_DECISIONS:]), route, d)


def _transition(exp: ExperimentConfig, state: ExperimentState, phase: str, action: str, reason: str,
                now: float) -> Judgment:
    """Move between running and holding, recording the change only (not every quiet interval)."""
    if state.phase == phase:
        return Judgment(state)
    new = dataclasses.replace(state, phase=phase)
    d = Decision(now, action, reason, "auto", new.step + 1, float(steps_of(exp)[new.step]))
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
    c = 100 - w
    c = int(c) if float(c).is_integer() else c
    return dataclasses.replace(route, weights={exp.control: c, exp.candidate: w})


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


def outcome_views(exp: ExperimentConfig, s: ExperimentState, route: RouteConfig | None = None) -> list[dict[str, Any]]:
    """Per outcome: arm means, the always-valid interval of the difference (stratified by
    generation, intersected over looks), the latched verdict and whether it allows promotion."""
    unit = unit_of(route) if route is not None else "request"
    latched = {m: (v, lo, hi) for m, v, lo, hi in s.verdicts}
    pooled = {m: (a, b) for m, a, b in s.outcomes}
    out = []
    for spec in exp.outcomes:
        a, b = pooled.get(spec.metric, (Moments(), Moments()))
        d, used, na, nb = _outcome_difference(exp, s, spec.metric, spec.kind == "binary", unit)
        verdict, lo, hi = latched.get(spec.metric, ("inconclusive", None, None))
        if d is not None and lo is None:
            lo, hi = d.low, d.high
            if verdict == "inconclusive" and d.significant:
                verdict = "better" if (d.estimate > 0) == (spec.goal == "increase") else "worse"
        sign = 1.0 if spec.goal == "increase" else -1.0
        promotable = False
        if d is not None and lo is not None and hi is not None and verdict != "worse":
            bound = lo if sign > 0 else -hi  # the lower bound of the improvement
            planned = min(na, nb) >= exp.planned_n and sign * d.estimate >= -spec.margin
            promotable = bound > -spec.margin or planned
        out.append({
            "metric": spec.metric, "kind": spec.kind, "goal": spec.goal, "margin": spec.margin, "unit": used,
            "control": {"n": a.n, "mean": a.mean, "units": na}, "candidate": {"n": b.n, "mean": b.mean, "units": nb},
            "difference": None if d is None else d.estimate,
            "interval": None if lo is None else [lo, hi],
            "evidence": None if d is None else _ev_value(d.log_lambda),
            "significant": bool(d is not None and d.significant), "verdict": verdict,
            "planned_n": exp.planned_n, "promotable": promotable,
            "detectable_effect": _detectable(exp, spec.kind == "binary", a.merge(b)),
        })
    return out


def _detectable(exp: ExperimentConfig, binary: bool, both: Moments) -> float | None:
    """The difference the test finds with 80% power at planned_n per arm (request unit, from
    the pooled standard deviation so far); None before two values."""
    if both.n < 2:
        return None
    sd = math.sqrt(stats._unit_var(both, binary))
    return stats.detectable_effect(sd, exp.alpha / tests_sharing_alpha(exp), exp.planned_n)


def _name(ref: str | int) -> str:
    return ref if isinstance(ref, str) else f"version {ref}"


def _pct(w: float) -> str:
    return f"{w:g}%"


def _rate(r: float) -> str:
    return f"{r * 100:.3g}%"


def _ev_value(log_e: float) -> float:
    return math.exp(min(log_e, 700.0))


def _ev_log(log_e: float) -> str:
    """An e-value as people write it: 14, 1.4e3, 2e51 (from its log, so never inf)."""
    log10 = log_e / math.log(10)
    if log10 < 3:
        return f"{10 ** log10:.2g}"
    exp10 = math.floor(log10)
    return f"{10 ** (log10 - exp10):.2g}e{exp10}"


def _ev(log_lrs: tuple[float, ...]) -> str:
    return _ev_log(stats.log_evidence(log_lrs))
