"""One shape (issue 24): GET .../experiment has the same keys in every state, nulls where a
value does not apply, and docs/experiment.schema.json describes it. Every state is reached
through the engine as the server reaches it (start, judge, a person's actions, promotion
with the experiment block then removed) and validated against the schema."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from experiments import ArmObservation, Observation, act, judge
from experiments.report import EMPTY, report
from router import RouteConfig

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs" / "experiment.schema.json").read_text())


def route(exp: bool = True, weights=None) -> RouteConfig:
    doc = {"labels": {"stable": 1, "canary": 2}, "weights": weights or {"stable": 100}}
    if exp:
        doc["experiment"] = {"control": "stable", "candidate": "canary", "steps": [10, 100],
                             "interval_s": 1, "min_requests": 10, "min_duration_s": 0,
                             "guardrails": {"errors": {"max_ratio": 1.5}, "latency": {"quantile": 0.99, "max_ratio": 2.0}},
                             "outcomes": [{"metric": "click", "kind": "binary", "goal": "increase"}]}
    return RouteConfig.from_json(doc)


def states():
    """(name, report) for every state the report can be in."""
    out = [("none", report(None, None, 0.0)), ("none-with-routes", report(route(False), None, 0.0))]
    r, now = route(), 1000.0
    j = judge(r, None, None, now)
    r, s = j.route or r, j.state
    out.append(("running-fresh", report(r, s, now)))
    now += 1
    quiet = Observation(ArmObservation(), ArmObservation(), ())
    s = judge(r, s, quiet, now).state
    out.append((s.phase + "-after-a-quiet-interval", report(r, s, now)))
    for action in ("pause", "resume", "rollback", "retry"):
        now += 1
        j = act(r, s, action, now)
        r, s = j.route or r, j.state
        out.append((f"after-{action}:{s.phase}", report(r, s, now)))
    now += 1
    j = act(r, s, "promote", now)
    r, s = j.route or r, j.state
    out.append(("promoted", report(r, s, now)))
    out.append(("promoted-block-removed", report(route(False, {"canary": 100}), s, now + 1)))
    return out


STATES = states()


def test_every_state_is_reached():
    assert {rep["state"] for _, rep in STATES} >= {"none", "running", "paused", "rolled_back", "promoted"}


@pytest.mark.parametrize("name,rep", STATES, ids=[n for n, _ in STATES])
def test_every_state_has_every_key_and_validates(name, rep):
    assert set(rep) == set(EMPTY), sorted(set(rep) ^ set(EMPTY))
    json.dumps(rep, allow_nan=False)  # strict JSON
    jsonschema.validate(rep, SCHEMA)


def test_the_schema_refuses_a_missing_or_extra_key():
    rep = dict(STATES[2][1])
    rep.pop("outcomes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(rep, SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**STATES[2][1], "surprise": 1}, SCHEMA)


def test_outcomes_are_listed_after_retry_and_arms_after_promotion():
    by = dict(STATES)
    retried = next(rep for n, rep in STATES if n.startswith("after-retry"))
    assert [o["metric"] for o in retried["outcomes"]] == ["click"]
    done = by["promoted-block-removed"]
    assert done["control"]["requests"] == done["requests"][0] and done["candidate"] is not None
