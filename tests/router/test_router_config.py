"""RouteConfig: whole-object validation with messages that name the field; round trip."""

import copy
import pickle

import pytest

from router import RouteConfig, RoutingError, ShadowConfig, StickyConfig, validate_against

GOOD = {
    "labels": {"stable": 1, "canary": 2},
    "weights": {"stable": 90, "canary": 10},
    "sticky": {"header": "X-User-Id"},
    "shadow": {"target": "canary", "percent": 5},
}


def test_round_trip():
    config = RouteConfig.from_json(GOOD, model="m")
    assert config.to_json() == GOOD
    assert RouteConfig.from_json(config.to_json()) == config
    assert config.sticky == StickyConfig(header="X-User-Id")
    assert config.shadow == ShadowConfig(target="canary", percent=5)


def test_version_strings_and_version_weight_keys():
    config = RouteConfig.from_json(
        {"labels": {"a": "3"}, "weights": {"2": 1, 3: 2.5}, "shadow": {"target": "2", "percent": 0}}
    )
    assert dict(config.labels) == {"a": 3}
    assert dict(config.weights) == {2: 1, 3: 2.5}
    assert config.shadow.target == 2
    assert config.to_json()["weights"] == {"2": 1, "3": 2.5}
    assert RouteConfig.from_json(config.to_json()) == config


def test_empty_and_null_parts():
    assert RouteConfig.from_json({}) == RouteConfig()
    assert RouteConfig.from_json(None) == RouteConfig()
    assert RouteConfig.from_json({"labels": None, "weights": None}).to_json() == {}


def test_frozen_and_copyable():
    config = RouteConfig.from_json(GOOD)
    with pytest.raises(TypeError):
        config.labels["x"] = 3  # type: ignore[index]
    with pytest.raises(AttributeError):
        config.sticky = None  # type: ignore[misc]
    assert copy.deepcopy(config) == config
    assert pickle.loads(pickle.dumps(config)) == config


def test_direct_construction_validates():
    with pytest.raises(RoutingError, match=r"labels\.x: expected a positive integer version"):
        RouteConfig(labels={"x": 0})
    with pytest.raises(RoutingError, match="exactly one of 'header' or 'parameter'"):
        StickyConfig(header="a", parameter="b")


BAD = [
    ({"label": {}}, "unknown key 'label' (expected: labels, weights, sticky, shadow, experiment)"),
    ({"labels": []}, "labels: expected a mapping"),
    ({"labels": {"9lives": 1}}, "label name '9lives' must match [A-Za-z][A-Za-z0-9_.-]*"),
    ({"labels": {"has space": 1}}, "label name 'has space' must match"),
    ({"labels": {"canary": 0}}, "labels.canary: expected a positive integer version, got 0"),
    ({"labels": {"canary": -2}}, "labels.canary: expected a positive integer version, got -2"),
    ({"labels": {"canary": 2.0}}, "labels.canary: expected a positive integer version, got 2.0"),
    ({"labels": {"canary": True}}, "labels.canary: expected a positive integer version, got True"),
    ({"labels": {"canary": "two"}}, "labels.canary: expected a positive integer version, got 'two'"),
    ({"weights": [1, 2]}, "weights: expected a mapping"),
    ({"weights": {"canary": 1}}, "weights.canary: weight key 'canary' is not a defined label (labels: none defined)"),
    ({"labels": {"a": 1}, "weights": {"b": 1}}, "weight key 'b' is not a defined label (labels: a)"),
    ({"weights": {"0": 1}}, "weights.0: expected a defined label or a positive integer version, got '0'"),
    ({"weights": {"1": -1}}, "weights.1: expected a finite number >= 0, got -1"),
    ({"weights": {"1": float("nan")}}, "weights.1: expected a finite number >= 0, got nan"),
    ({"weights": {"1": float("inf")}}, "weights.1: expected a finite number >= 0, got inf"),
    ({"weights": {"1": "90"}}, "weights.1: expected a finite number >= 0, got '90'"),
    ({"weights": {"1": True}}, "weights.1: expected a finite number >= 0, got True"),
    ({"weights": {"1": 0, "2": 0}}, "weights: the total must be positive"),
    ({"weights": {"2": 1, 2: 1}}, "weights.2: version 2 is given twice"),
    ({"sticky": "x-user-id"}, "sticky: expected {header: NAME} or {parameter: NAME}"),
    ({"sticky": {}}, "sticky: expected exactly one of 'header' or 'parameter'"),
    ({"sticky": {"header": "a", "parameter": "b"}}, "sticky: expected exactly one of 'header' or 'parameter'"),
    ({"sticky": {"cookie": "a"}}, "sticky: unknown key 'cookie' (expected: header or parameter)"),
    ({"sticky": {"header": "bad header"}}, "sticky.header: expected an HTTP header name, got 'bad header'"),
    ({"sticky": {"parameter": ""}}, "sticky.parameter: expected a non-empty parameter name"),
    ({"shadow": 5}, "shadow: expected {target: LABEL_OR_VERSION, percent: 0..100}"),
    ({"shadow": {"percent": 5}}, "shadow.target: required"),
    ({"shadow": {"target": 2}}, "shadow.percent: required"),
    ({"shadow": {"target": 2, "percent": 101}}, "shadow.percent: expected a number from 0 to 100, got 101"),
    ({"shadow": {"target": 2, "percent": -1}}, "shadow.percent: expected a number from 0 to 100, got -1"),
    ({"shadow": {"target": 2, "percent": "5"}}, "shadow.percent: expected a number from 0 to 100, got '5'"),
    ({"shadow": {"target": "nope", "percent": 5}}, "shadow.target: shadow target 'nope' is not a defined label"),
    ({"shadow": {"target": 2, "percent": 5, "mode": "x"}}, "shadow: unknown key 'mode' (expected: target, percent)"),
]


@pytest.mark.parametrize(("obj", "message"), BAD)
def test_invalid_configs_name_the_field(obj, message):
    with pytest.raises(RoutingError) as info:
        RouteConfig.from_json(obj, model="resnet")
    assert info.value.kind == "invalid"
    assert info.value.message.startswith("routing config for model 'resnet': ")
    assert message in info.value.message


def test_every_fault_is_reported_at_once():
    with pytest.raises(RoutingError) as info:
        RouteConfig.from_json(
            {"extra": 1, "labels": {"a": 0}, "weights": {"1": -1}, "shadow": {"target": 1, "percent": 200}}
        )
    assert len(info.value.problems) == 4
    for field in ("unknown key 'extra'", "labels.a", "weights.1", "shadow.percent"):
        assert field in info.value.message


def test_not_a_mapping():
    with pytest.raises(RoutingError, match="routing config for model 'm': expected a mapping, got list"):
        RouteConfig.from_json([], model="m")


def test_validate_against_present_versions():
    config = RouteConfig.from_json(
        {"labels": {"stable": 1, "canary": 7}, "weights": {"stable": 9, "3": 1}, "shadow": {"target": 8, "percent": 1}}
    )
    with pytest.raises(RoutingError) as info:
        validate_against(config, {1, 2}, model="m")
    e = info.value
    assert e.kind == "invalid"
    assert "label 'canary' points at version 7, which has no folder in the repository (present: 1, 2)" in e.message
    assert "weight key 3 points at version 3" in e.message
    assert "shadow target 8 points at version 8" in e.message
    assert "stable" not in e.message
    validate_against(config, {1, 3, 7, 8})  # all present: no error


def test_validate_against_keeps_entries_as_they_run():
    """Only new or changed entries must name a folder: `canary: 2` kept as it runs passes
    (weights changed, folder 2 gone); a new label on 2 or canary moved to 3 do not."""
    running = RouteConfig.from_json({"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 90, "canary": 10}})
    weights_only = RouteConfig.from_json({"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 100, "canary": 0}})
    validate_against(weights_only, {1}, running=running)
    with pytest.raises(RoutingError) as info:
        validate_against(weights_only, {1})  # nothing runs: all of it is new intent
    assert "label 'canary' points at version 2" in info.value.message
    for labels, problem in [({"stable": 1, "canary": 2, "next": 2}, "label 'next' points at version 2"),
                            ({"stable": 1, "canary": 3}, "label 'canary' points at version 3")]:
        with pytest.raises(RoutingError) as info:
            validate_against(RouteConfig.from_json({"labels": labels}), {1}, model="m", running=running)
        assert info.value.problems == (f"{problem}, which has no folder in the repository (present: 1)",)
