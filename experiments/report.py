"""The experiment as people and dashboards read it (GET .../experiment, the A/B summary).

A plain JSON-safe dict built from the routing config and the engine state: no NaN or
infinity (evidence is capped at 1e300), arms named by their label or version.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from experiments import stats
from experiments.engine import ExperimentState, fingerprint, outcome_views, start
from router.config import RouteConfig

_CAP = 1e300


def _ev(log_lrs: tuple[float, ...]) -> float:
    return min(math.exp(min(stats.log_evidence(log_lrs), 700.0)), _CAP)


def report(route: RouteConfig | None, state: ExperimentState | None, now: float) -> dict[str, Any]:
    """The whole picture; `state: none` when the model has no experiment (and none ended in promotion)."""
    exp = route.experiment if route is not None else None
    if exp is None:
        if state is None or state.phase != "promoted":
            return {"state": "none", "decisions": [] if state is None else [d.to_json() for d in state.decisions]}
        return {"state": "promoted", "step": state.step + 1, "candidate_weight": 100.0,
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
    weight = {"rolled_back": 0.0, "promoted": 100.0}.get(state.phase, float(exp.steps[state.step]))

    def arm(i: int, ref: str | int) -> dict[str, Any]:
        n, e = state.requests[i], state.errors[i]
        return {"ref": ref, "version": route.target_of(ref), "units": state.units[i], "requests": n, "errors": e,
                "error_rate": e / n if n else None, "step_requests": state.step_requests[i]}

    bar = 1.0 / exp.alpha
    guardrails: dict[str, Any] = {}
    if exp.errors is not None:
        ev = _ev(state.error_ev)
        guardrails["errors"] = {"max_ratio": exp.errors.max_ratio, "evidence": ev, "threshold": bar,
                                "alarm": ev >= bar}
    if exp.latency is not None:
        ev = _ev(state.latency_ev)
        guardrails["latency"] = {"quantile": exp.latency.quantile, "max_ratio": exp.latency.max_ratio,
                                 "slow": state.slow[0], "judged": state.slow[1], "latency_threshold_s": state.threshold,
                                 "evidence": ev, "threshold": bar, "alarm": ev >= bar}
    total = state.units[0] + state.units[1]
    chi2, p = stats.srm_chi2([state.units[0], state.units[1]], [total - state.expected_units, state.expected_units])
    srm_ev = _ev(state.srm)
    return {
        "state": state.phase,
        "step": state.step + 1,
        "steps": list(exp.steps),
        "candidate_weight": weight,
        "started": state.started,
        "step_started": state.step_started,
        "judged": state.judged,
        "paused_by": state.paused_by,
        "latch": state.latch,
        "control": arm(0, exp.control),
        "candidate": arm(1, exp.candidate),
        "guardrails": guardrails,
        "outcomes": outcome_views(exp, state),
        "srm": {"expected_candidate_units": state.expected_units, "chi2": chi2, "p_value": p,
                "evidence": srm_ev, "threshold": 1.0 / stats.SRM_ALPHA, "flagged": srm_ev >= 1.0 / stats.SRM_ALPHA},
        "decisions": [d.to_json() for d in state.decisions],
    }
