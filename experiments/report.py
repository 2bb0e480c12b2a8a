"""The experiment as people and dashboards read it (GET .../experiment, the A/B summary).

A plain JSON-safe dict built from the routing config and the engine state: no NaN or
infinity (evidence is capped at 1e300), arms named by their label or version.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from experiments import stats
from experiments.engine import (
    ExperimentState,
    fingerprint,
    is_holdback,
    outcome_views,
    srm_by_generation,
    start,
    steps_of,
    tests_sharing_alpha,
    unit_of,
)
from router.config import RouteConfig

_CAP = 1e300


def _ev(log_lrs: tuple[float, ...]) -> float:
    return _ev_log(stats.log_evidence(log_lrs))


def _ev_log(log_e: float) -> float:
    return min(math.exp(min(log_e, 700.0)), _CAP)


# Every key of the report, in every state (docs/experiment.schema.json): what does not
# apply is null (or empty), so a script reading one key never meets a missing one.
EMPTY: dict[str, Any] = {
    "state": "none", "step": None, "steps": [], "effective_steps": [], "holdback": None, "unit": None,
    "planned_n": None, "alpha": None, "generation": None, "window_intervals": None,
    "feedback_window_s": None, "candidate_weight": None, "started": None, "step_started": None,
    "judged": None, "paused_by": None, "latch": None, "control": None, "candidate": None,
    "requests": None, "errors": None, "guardrails": {}, "outcomes": [], "srm": None, "decisions": [],
    "duplicate_request_ids": None,  # set by the runtime's decider (it holds the decision log)
}


def _arm(state: ExperimentState, i: int, ref: str | int | None, version: int | None) -> dict[str, Any]:
    n, e = state.requests[i], state.errors[i]
    return {"ref": ref, "version": version, "units": state.units[i], "requests": n, "errors": e,
            "error_rate": e / n if n else None, "step_requests": state.step_requests[i], "late": state.late[i]}


def empty() -> dict[str, Any]:
    """A fresh EMPTY (its lists and dicts are new: a reader may change what it gets)."""
    return {k: (v.copy() if isinstance(v, (list, dict)) else v) for k, v in EMPTY.items()}


def report(route: RouteConfig | None, state: ExperimentState | None, now: float) -> dict[str, Any]:
    """The whole picture, with the same keys in every state (EMPTY); `state: none` when the
    model has no experiment (and none ended in promotion)."""
    exp = route.experiment if route is not None else None
    if exp is None:
        if state is None or state.phase != "promoted":
            return {**empty(), "decisions": [] if state is None else [d.to_json() for d in state.decisions]}

        return {**empty(), "state": "promoted", "step": state.step + 1, "candidate_weight": 100.0,
                "generation": state.generation, "started": state.started, "step_started": state.step_started,
                "judged": state.judged, "latch": state.latch, "control": _arm(state, 0, None, None),
                "candidate": _arm(state, 1, None, None),  # the routes no longer name the arms
                "requests": list(state.requests), "errors": list(state.errors),
                "decisions": [d.to_json() for d in state.decisions]}
    assert route is not None
    if state is None or state.spec != fingerprint(route):
        # What the decider's first judgment starts from, with no decision until it is made:
        # counting begins there (requests served before it are not the experiment's
        # evidence), so a reader can tell a started experiment by its first decision.
        fresh = start(route, now).state
        assert fresh is not None
        state = dataclasses.replace(fresh, decisions=())
    steps = steps_of(exp)
    weight = {"rolled_back": 0.0, "promoted": 100.0}.get(state.phase, float(steps[state.step]))

    m = tests_sharing_alpha(exp)
    bar = m / exp.alpha
    guardrails: dict[str, Any] = {}
    if exp.errors is not None:
        ev = _ev_log(stats.restart_evidence(state.error_ev, state.restarts[0]))
        guardrails["errors"] = {"max_ratio": exp.errors.max_ratio, "evidence": ev, "threshold": bar,
                                "alarm": ev >= bar, "restarts": state.restarts[0], "dispersion": state.dispersion}
    if exp.latency is not None:
        ev = _ev_log(stats.restart_evidence(state.latency_ev, state.restarts[1]))
        c = state.threshold
        guardrails["latency"] = {"quantile": exp.latency.quantile, "max_ratio": exp.latency.max_ratio,
                                 "slow": state.slow[0], "judged": state.slow[1],
                                 "control_slow": state.slow_control[0], "control_judged": state.slow_control[1],
                                 "control_quantile_s": c,
                                 "latency_threshold_s": None if c is None else c * exp.latency.max_ratio,
                                 "evidence": ev, "threshold": bar, "alarm": ev >= bar, "restarts": state.restarts[1]}
    total = state.units[0] + state.units[1]
    chi2, p = stats.srm_chi2([state.units[0], state.units[1]], [total - state.expected_units, state.expected_units])
    srm_ev = _ev(state.srm)
    return {
        "state": state.phase,
        "step": state.step + 1,
        "steps": list(exp.steps),
        "effective_steps": list(steps),
        "holdback": {"percent": exp.holdback, "intervals": exp.holdback_intervals,
                     "active": is_holdback(exp, state.step) and state.phase not in ("rolled_back", "promoted"),
                     "judged_intervals": state.step_intervals},
        "unit": unit_of(route),
        "planned_n": exp.planned_n,
        "alpha": {"total": exp.alpha, "tests": m, "each": exp.alpha / m},
        "generation": state.generation,
        "window_intervals": exp.window_intervals,
        "feedback_window_s": exp.feedback_window_s,
        "candidate_weight": weight,
        "started": state.started,
        "step_started": state.step_started,
        "judged": state.judged,
        "paused_by": state.paused_by,
        "latch": state.latch,
        "control": _arm(state, 0, exp.control, route.target_of(exp.control)),
        "candidate": _arm(state, 1, exp.candidate, route.target_of(exp.candidate)),
        "requests": list(state.requests),
        "errors": list(state.errors),
        "guardrails": guardrails,
        "outcomes": outcome_views(exp, state, route),
        "srm": {"expected_candidate_units": state.expected_units, "chi2": chi2, "p_value": p,
                "evidence": srm_ev, "threshold": 1.0 / stats.SRM_ALPHA, "flagged": srm_ev >= 1.0 / stats.SRM_ALPHA,
                "generations": srm_by_generation(state)},
        "decisions": [d.to_json() for d in state.decisions],
        "duplicate_request_ids": None,  # the runtime's decider fills it in
    }
