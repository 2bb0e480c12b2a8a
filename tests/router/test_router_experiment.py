"""The routing document's `experiment:` block: validated whole, round trips through JSON and YAML."""

import copy
import dataclasses
import pickle

import pytest

from router import RouteConfig, RoutingError, load_config_file, persist_config_file, validate_against
from router.config import ErrorGuardrail, ExperimentConfig, LatencyGuardrail, OutcomeSpec, config_versions

BLOCK = {
    "control": "stable",
    "candidate": "canary",
    "steps": [5, 25, 50, 100],
    "interval_s": 30,
    "min_requests": 500,
    "min_duration_s": 300,
    "guardrails": {"errors": {"max_ratio": 1.5}, "latency": {"quantile": 0.99, "max_ratio": 2.0}},
    "outcomes": [{"metric": "click", "kind": "binary", "goal": "increase"}],
    "alpha": 0.05,
    "promote": "auto",
}
DOC = {
    "labels": {"stable": 1, "canary": 2},
    "weights": {"stable": 95, "canary": 5},
    "sticky": {"header": "x-user-id"},
    "experiment": BLOCK,
}


def test_the_issue_example_round_trips():
    config = RouteConfig.from_json(DOC, model="mlp")
    exp = config.experiment
    assert exp == ExperimentConfig(
        control="stable", candidate="canary", steps=(5, 25, 50, 100), interval_s=30, min_requests=500,
        min_duration_s=300, errors=ErrorGuardrail(1.5), latency=LatencyGuardrail(0.99, 2.0),
        outcomes=(OutcomeSpec("click", "binary", "increase"),), alpha=0.05, promote="auto",
    )
    assert config.to_json() == DOC
    assert RouteConfig.from_json(config.to_json()) == config
    assert pickle.loads(pickle.dumps(config)) == config
    assert copy.deepcopy(config) == config


def test_defaults_are_written_out():
    config = RouteConfig.from_json({"labels": {"a": 1}, "experiment": {"control": "a", "candidate": 2, "steps": [10]}})
    out = config.to_json()["experiment"]
    assert out == {
        "control": "a", "candidate": 2, "steps": [10], "interval_s": 30, "min_requests": 500, "min_duration_s": 300,
        "guardrails": {"errors": {"max_ratio": 1.5}}, "outcomes": [], "alpha": 0.05, "promote": "auto",
    }
    assert RouteConfig.from_json(config.to_json()) == config


def test_empty_guardrails_mean_none_and_versions_work_as_arms():
    config = RouteConfig.from_json(
        {"weights": {"1": 90, "2": 10}, "experiment": {"control": 1, "candidate": "2", "steps": [10, 100],
                                                       "guardrails": {}}}
    )
    assert config.experiment.errors is None and config.experiment.latency is None
    assert config.experiment.candidate == 2
    assert config_versions(config) == {"weight key 1": 1, "weight key 2": 2, "experiment control 1": 1,
                                       "experiment candidate 2": 2}
    with pytest.raises(RoutingError, match="experiment candidate 2 points at version 2, which has no folder"):
        validate_against(config, {1})


def test_direct_construction_validates():
    config = RouteConfig.from_json(DOC)
    assert dataclasses.replace(config, experiment=None).experiment is None
    with pytest.raises(RoutingError, match="experiment.candidate: candidate 'nope' is not a defined label"):
        dataclasses.replace(config, experiment={**BLOCK, "candidate": "nope"})


def _e(**kw):
    return {"labels": {"stable": 1, "canary": 2}, "experiment": {**{"control": "stable", "candidate": "canary",
                                                                   "steps": [5, 100]}, **kw}}


BAD = [
    ({"labels": {"a": 1}, "experiment": [1]}, "experiment: expected a mapping with control, candidate and steps, got list"),
    ({"experiment": {"steps": [5]}}, "experiment.control: required (a label or a version)"),
    ({"experiment": {"control": 1, "steps": [5]}}, "experiment.candidate: required"),
    (_e(candidate="beta"), "experiment.candidate: candidate 'beta' is not a defined label (labels: stable, canary)"),
    (_e(control=0), "experiment.control: expected a defined label or a positive integer version, got 0"),
    (_e(candidate=1), "experiment: control and candidate are both version 1; they must differ"),
    ({**_e(), "weights": {"stable": 90, "canary": 5, "3": 5}},
     "the experiment owns the split, so weights may name only the control and the candidate (also found: 3)"),
    ({"labels": {"stable": 1, "canary": 2}, "experiment": {"control": "stable", "candidate": "canary"}},
     "experiment.steps: required"),
    (_e(steps=[]), "experiment.steps: expected 1 to 20 steps, got 0"),
    (_e(steps=5), "experiment.steps: expected a list of candidate weights in percent"),
    (_e(steps=[5, 0]), "experiment.steps[1]: expected a percentage in (0, 100], got 0"),
    (_e(steps=[5, 101]), "experiment.steps[1]: expected a percentage in (0, 100], got 101"),
    (_e(steps=[25, 5]), "experiment.steps[1]: steps must strictly increase, got 5 after 25"),
    (_e(steps=["5"]), "experiment.steps[0]: expected a percentage in (0, 100], got '5'"),
    (_e(interval_s=0), "experiment.interval_s: expected a number of seconds in (0, 86400], got 0"),
    (_e(min_requests=-1), "experiment.min_requests: expected an integer >= 0, got -1"),
    (_e(min_requests=2.5), "experiment.min_requests: expected an integer >= 0, got 2.5"),
    (_e(min_duration_s=float("nan")), "experiment.min_duration_s: expected a number of seconds >= 0, got nan"),
    (_e(guardrails=[]), "experiment.guardrails: expected a mapping with errors and/or latency, got list"),
    (_e(guardrails={"cpu": {}}), "experiment.guardrails: unknown key 'cpu' (expected: errors, latency, window_intervals)"),
    (_e(guardrails={"errors": {}}), "experiment.guardrails.errors.max_ratio: required (a number >= 1)"),
    (_e(guardrails={"errors": {"max_ratio": 0.5}}), "experiment.guardrails.errors.max_ratio: expected a number >= 1, got 0.5"),
    (_e(guardrails={"latency": {"quantile": 1, "max_ratio": 2}}),
     "experiment.guardrails.latency.quantile: expected a number in (0, 1), got 1"),
    (_e(guardrails={"latency": {"quantile": 0.9, "max_ratio": 2, "window": 3}}),
     "experiment.guardrails.latency: unknown key 'window' (expected: quantile, max_ratio)"),
    (_e(outcomes={"metric": "x"}), "experiment.outcomes: expected a list of {metric, kind, goal}, got dict"),
    (_e(outcomes=[{"metric": "a b", "kind": "binary"}]), "experiment.outcomes[0].metric: expected a name matching"),
    (_e(outcomes=[{"metric": "x", "kind": "count"}]), "experiment.outcomes[0].kind: expected 'binary' or 'continuous', got 'count'"),
    (_e(outcomes=[{"metric": "x", "kind": "binary", "goal": "up"}]),
     "experiment.outcomes[0].goal: expected 'increase' or 'decrease', got 'up'"),
    (_e(outcomes=[{"metric": "x", "kind": "binary"}, {"metric": "x", "kind": "continuous"}]),
     "experiment.outcomes[1].metric: 'x' is given twice"),
    (_e(alpha=0), "experiment.alpha: expected a number in (0, 0.5], got 0"),
    (_e(alpha=True), "experiment.alpha: expected a number in (0, 0.5], got True"),
    (_e(promote="yes"), "experiment.promote: expected 'auto' or 'manual', got 'yes'"),
    (_e(canary=1), "experiment: unknown key 'canary' (expected: control, candidate, steps"),
]


@pytest.mark.parametrize(("obj", "message"), BAD)
def test_invalid_blocks_name_the_field(obj, message):
    with pytest.raises(RoutingError) as info:
        RouteConfig.from_json(obj, model="mlp")
    assert info.value.kind == "invalid"
    assert info.value.message.startswith("routing config for model 'mlp': ")
    assert message in info.value.message


def test_every_fault_in_the_block_is_reported_at_once():
    with pytest.raises(RoutingError) as info:
        RouteConfig.from_json(_e(steps=[5, 5], alpha=2, promote="x", guardrails={"errors": {"max_ratio": 0}}))
    assert len(info.value.problems) == 4
    for part in ("steps[1]", "alpha", "promote", "guardrails.errors.max_ratio"):
        assert f"experiment.{part}" in info.value.message


YAML = """\
models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 95, canary: 5}
    sticky: {header: x-user-id}
    experiment:
      control: stable              # the baseline
      candidate: canary            # under test
      steps: [5, 25, 50, 100]
      interval_s: 30
      min_requests: 500
      min_duration_s: 300
      guardrails:
        errors:  {max_ratio: 1.5}
        latency: {quantile: 0.99, max_ratio: 2.0}
      outcomes:
        - {metric: click, kind: binary, goal: increase}
      alpha: 0.05
      promote: auto                # after the last step
"""


def test_yaml_load_persist_keeps_the_block_and_its_comments(tmp_path):
    path = tmp_path / "splitserve.yaml"
    path.write_text(YAML)
    config = load_config_file(path)["mlp"]
    assert config == RouteConfig.from_json(DOC)
    moved = dataclasses.replace(config, weights={"stable": 75, "canary": 25})
    persist_config_file(path, "mlp", moved)
    text = path.read_text()
    assert "# the baseline" in text and "# after the last step" in text
    assert load_config_file(path)["mlp"] == moved
    ended = dataclasses.replace(moved, experiment=None)
    persist_config_file(path, "mlp", ended)
    assert "experiment" not in path.read_text()
    assert load_config_file(path)["mlp"] == ended


def test_an_invalid_block_in_the_file_names_model_and_field(tmp_path):
    path = tmp_path / "splitserve.yaml"
    path.write_text(YAML.replace("steps: [5, 25, 50, 100]", "steps: [5, 25, 50, 200]"))
    with pytest.raises(RoutingError, match=r"models\.mlp: experiment\.steps\[3\]: expected a percentage in \(0, 100\], got 200"):
        load_config_file(path)


def test_quoted_yaml_names_come_back_as_plain_strings(tmp_path):
    path = tmp_path / "splitserve.yaml"
    path.write_text('models:\n  mlp: {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 9, "canary": 1},'
                    ' "experiment": {"control": "stable", "candidate": "canary", "steps": [10],'
                    ' "outcomes": [{"metric": "click", "kind": "binary"}]}}\n')
    config = load_config_file(path)["mlp"]
    exp = config.experiment
    assert all(type(k) is str for k in config.labels) and all(type(k) is str for k in config.weights)
    assert type(exp.control) is str and type(exp.candidate) is str and type(exp.outcomes[0].metric) is str


def test_issue_29_optional_fields_default_validate_and_round_trip():
    plain = RouteConfig.from_json(DOC).experiment
    assert (plain.planned_n, plain.holdback, plain.holdback_intervals, plain.feedback_window_s,
            plain.window_intervals) == (5000, 5, 10, 3600, 10)
    assert plain.outcomes[0].margin == 0
    block = {**BLOCK, "planned_n": 20000, "holdback": 10, "holdback_intervals": 4, "feedback_window_s": 600,
             "guardrails": {**BLOCK["guardrails"], "window_intervals": 6},
             "outcomes": [{"metric": "click", "kind": "binary", "goal": "increase", "margin": 0.01}]}
    config = RouteConfig.from_json({**DOC, "experiment": block})
    exp = config.experiment
    assert (exp.planned_n, exp.holdback, exp.holdback_intervals, exp.feedback_window_s, exp.window_intervals) == (
        20000, 10, 4, 600, 6)
    assert exp.outcomes[0] == OutcomeSpec("click", "binary", "increase", 0.01)
    assert config.to_json()["experiment"] == block
    assert RouteConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(("extra", "message"), [
    ({"planned_n": 1}, "experiment.planned_n: expected an integer >= 2, got 1"),
    ({"planned_n": 2.5}, "experiment.planned_n: expected an integer >= 2, got 2.5"),
    ({"holdback": 0}, "experiment.holdback: expected a percentage in (0, 50), got 0"),
    ({"holdback": 60}, "experiment.holdback: expected a percentage in (0, 50), got 60"),
    ({"holdback_intervals": 0}, "experiment.holdback_intervals: expected an integer >= 1, got 0"),
    ({"feedback_window_s": -1}, "experiment.feedback_window_s: expected a number of seconds in (0, 604800]"),
    ({"guardrails": {"window_intervals": True}}, "experiment.guardrails.window_intervals: expected an integer >= 1"),
    ({"outcomes": [{"metric": "m", "kind": "binary", "margin": -0.1}]},
     "experiment.outcomes[0].margin: expected a number >= 0 (in the metric's units), got -0.1"),
])
def test_issue_29_fields_name_the_fault(extra, message):
    with pytest.raises(RoutingError) as info:
        RouteConfig.from_json({**DOC, "experiment": {**BLOCK, **extra}})
    assert message in info.value.message
