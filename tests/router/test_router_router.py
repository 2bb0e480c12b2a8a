"""Router: pick semantics, failover, labels that wait for their version, shadow, state."""

import json
from collections import Counter

import pytest

from router import RouteConfig, RouteDecision, Router, RoutingError

CANARY = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 90, "canary": 10}}


def make(config=CANARY, available=(1, 2), seed=1):
    r = Router({"m": RouteConfig.from_json(config, model="m")}, seed=seed)
    r.set_available("m", available)
    return r


def test_pick_kinds():
    r = make()
    assert r.pick("m", version=7) == RouteDecision(7, "pinned", None)  # as-is, even if absent
    assert r.pick("m", version=1) == RouteDecision(1, "pinned", None)
    assert r.pick("m", label="canary") == RouteDecision(2, "label", None)
    assert r.pick("m", key="u").how == "sticky"
    assert r.pick("m").how == "split"
    assert r.pick("m", version=1, label="canary").how == "pinned"  # version beats label
    assert r.pick("m", label="stable", key="u").how == "label"  # label beats key


def test_pinned_for_a_model_never_heard_of():
    assert Router().pick("x", version=3) == RouteDecision(3, "pinned", None)


@pytest.mark.parametrize("bad", [0, -1, True, "2", 2.0])
def test_pinned_must_be_a_positive_int(bad):
    with pytest.raises(RoutingError) as info:
        make().pick("m", version=bad)
    assert info.value.kind == "invalid"


def test_decision_is_frozen():
    d = make().pick("m")
    with pytest.raises(AttributeError):
        d.version = 3  # type: ignore[misc]
    assert not hasattr(d, "__dict__")


def test_unknown_label():
    with pytest.raises(RoutingError) as info:
        make().pick("m", label="beta")
    assert info.value.kind == "not_found"
    assert info.value.message == "model 'm' has no label 'beta' (labels: stable, canary)"


def test_no_available_version():
    r = make(available=())
    for kw in ({}, {"key": "u"}):
        with pytest.raises(RoutingError) as info:
            r.pick("m", **kw)
        assert info.value.kind == "unavailable" and "model 'm' has no AVAILABLE version" in info.value.message
    with pytest.raises(RoutingError, match="model 'x' has no AVAILABLE version"):
        Router().pick("x")
    assert r.pick("m", version=2).version == 2


def test_no_weights_goes_to_newest_available():
    r = Router()
    r.set_available("m", [1, 3, 2])
    assert {r.pick("m").version for _ in range(100)} == {3}
    assert {r.pick("m", key=str(i)).version for i in range(100)} == {3}
    state = r.routing_state("m")["effective"]
    assert state["weights"] == {"3": 1.0} and "newest AVAILABLE version 3" in state["note"]


def test_failover_redistributes_in_proportion_and_keeps_other_keys():
    config = {"weights": {"1": 60, "2": 30, "3": 10}}
    r = make(config, available=(1, 2, 3))
    keys = [f"user-{i}" for i in range(10_000)]
    before = {k: r.pick("m", key=k).version for k in keys}
    r.set_available("m", [1, 3])  # version 2 fails
    after = {k: r.pick("m", key=k).version for k in keys}

    state = r.routing_state("m")["effective"]
    assert state["weights"] == pytest.approx({"1": 60 / 70, "3": 10 / 70})
    assert state["unavailable"] == [2]
    assert "version 2 is not AVAILABLE" in state["note"] and "in proportion" in state["note"]
    # Keys of versions still AVAILABLE stay put; only version 2's keys move ...
    assert all(after[k] == v for k, v in before.items() if v != 2)
    moved = Counter(after[k] for k, v in before.items() if v == 2)
    # ... spread 6:1 over 1 and 3 (chi-square, 1 dof, p = 0.001).
    n = sum(moved.values())
    chi2 = (moved[1] - n * 6 / 7) ** 2 / (n * 6 / 7) + (moved[3] - n / 7) ** 2 / (n / 7)
    assert set(moved) == {1, 3} and chi2 < 10.828
    # Unkeyed traffic follows the same shares.
    counts = Counter(r.pick("m").version for _ in range(10_000))
    assert set(counts) == {1, 3} and abs(counts[3] - 10_000 / 7) < 150

    r.set_available("m", [1, 2, 3])  # back: every key returns to where it was
    assert {k: r.pick("m", key=k).version for k in keys} == before


def test_all_weighted_versions_unavailable_falls_back_to_newest():
    r = make({"weights": {"2": 1, "3": 1}}, available=(1,))
    assert r.pick("m").version == 1 and r.pick("m", key="u").version == 1
    state = r.routing_state("m")["effective"]
    assert state["weights"] == {"1": 1.0}
    assert state["unavailable"] == [2, 3]
    assert "none of the weighted versions (2, 3) is AVAILABLE" in state["note"]


def test_label_waits_for_its_version_then_moves():
    r = make()
    r.set_config(
        "m", RouteConfig.from_json({"labels": {"stable": 1, "canary": 3}, "weights": {"stable": 90, "canary": 10}})
    )
    # 3 is not AVAILABLE yet: canary keeps resolving to 2, and so does its weight.
    assert r.pick("m", label="canary").version == 2
    eff = r.routing_state("m")["effective"]
    assert eff["labels"] == {"stable": 1, "canary": 2}
    assert eff["pending_labels"] == {"canary": 3}
    assert eff["weights"] == {"1": 0.9, "2": 0.1}
    assert "label 'canary' moves to version 3 once it is AVAILABLE; until then it resolves to 2" in eff["note"]
    assert r.referenced_versions("m") == {1, 2, 3}  # keep 2 loaded while 3 loads

    r.set_available("m", [1, 2, 3])
    assert r.pick("m", label="canary").version == 3
    eff = r.routing_state("m")["effective"]
    assert eff["labels"] == {"stable": 1, "canary": 3} and eff["pending_labels"] == {}
    assert eff["weights"] == {"1": 0.9, "3": 0.1}
    assert r.referenced_versions("m") == {1, 3}  # 2 may go now


def test_new_label_without_a_previous_target_is_unavailable_until_loaded():
    r = make({"labels": {"beta": 5}}, available=(1,))
    with pytest.raises(RoutingError) as info:
        r.pick("m", label="beta")
    assert info.value.kind == "unavailable"
    assert info.value.message == "label 'beta' of model 'm' points at version 5, which is not AVAILABLE yet"
    assert r.routing_state("m")["effective"]["pending_labels"] == {"beta": 5}
    r.set_available("m", [1, 5])
    assert r.pick("m", label="beta").version == 5


def test_label_to_a_version_that_went_away_does_not_fall_back():
    r = make()
    r.set_available("m", [1])
    with pytest.raises(RoutingError) as info:
        r.pick("m", label="canary")
    assert info.value.kind == "unavailable"


def test_shadow_percent_and_target():
    r = make({**CANARY, "shadow": {"target": "canary", "percent": 20}}, seed=3)
    picks = [r.pick("m") for _ in range(10_000)]
    assert all(p.shadow is None for p in picks if p.version == 2)  # never shadow onto itself
    on_1 = [p for p in picks if p.version == 1]
    share = sum(p.shadow == 2 for p in on_1) / len(on_1)
    assert 0.18 < share < 0.22
    keyed = [r.pick("m", key=f"u{i}") for i in range(2000)]
    assert keyed == [r.pick("m", key=f"u{i}") for i in range(2000)]  # deterministic per key
    assert r.pick("m", label="stable", key="u1") == r.pick("m", label="stable", key="u1")
    assert r.pick("m", version=1).shadow is None  # pinned requests are never shadowed


def test_shadow_extremes_and_unavailable_target():
    r = make({**CANARY, "shadow": {"target": 2, "percent": 100}})
    assert all(r.pick("m", label="stable", key=str(i)).shadow == 2 for i in range(200))
    r.set_config("m", RouteConfig.from_json({**CANARY, "shadow": {"target": 2, "percent": 0}}))
    assert all(r.pick("m", label="stable").shadow is None for _ in range(200))
    r.set_config("m", RouteConfig.from_json({**CANARY, "shadow": {"target": 2, "percent": 100}}))
    r.set_available("m", [1])
    assert r.pick("m").shadow is None
    eff = r.routing_state("m")["effective"]
    assert eff["shadow"] is None and "shadow target version 2 is not AVAILABLE" in eff["note"]


def test_sticky_key():
    r = make({**CANARY, "sticky": {"header": "X-User-Id"}})
    assert r.sticky_key("m", {"x-user-id": "alice"}, {}) == "alice"
    assert r.sticky_key("m", {"X-USER-ID": "bob"}, {}) == "bob"
    assert r.sticky_key("m", {"other": "x"}, {"x-user-id": "p"}) is None
    assert r.sticky_key("m", {"x-user-id": ""}, {}) is None
    r.set_config("m", RouteConfig.from_json({"sticky": {"parameter": "user_id"}}))
    assert r.sticky_key("m", {"user_id": "h"}, {"user_id": 42}) == "42"
    assert r.sticky_key("m", {}, {}) is None
    assert r.sticky_key("unknown", {"x-user-id": "a"}, {"user_id": 1}) is None


def test_sticky_keys_are_sticky():
    r = make()
    first = [r.pick("m", key=f"k{i}").version for i in range(1000)]
    r.set_available("m", [2, 1])  # a rebuild with the same inputs changes nothing
    assert first == [r.pick("m", key=f"k{i}").version for i in range(1000)]


def test_referenced_versions():
    r = make(
        {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 1, "4": 1}, "shadow": {"target": 6, "percent": 1}},
        available=(),
    )
    assert r.referenced_versions("m") == frozenset({1, 2, 4, 6})
    assert r.referenced_versions("none") == frozenset()


def test_set_config_none_and_models():
    r = make()
    r.set_available("other", [1])
    assert r.models() == ["m", "other"]
    r.set_config("m", None)
    assert r.get_config("m") == RouteConfig()
    assert r.routing_state("m")["effective"]["weights"] == {"2": 1.0}
    r.remove_model("m")
    assert r.models() == ["other"]
    with pytest.raises(TypeError):
        r.set_config("m", {"weights": {}})  # type: ignore[arg-type]


def test_routing_state_shape_and_json():
    r = make(
        {**CANARY, "sticky": {"header": "x-user-id"}, "shadow": {"target": "canary", "percent": 5}}, available=(1, 2)
    )
    state = r.routing_state("m")
    assert json.loads(json.dumps(state)) == state
    assert state == {
        "model": "m",
        "labels": {"stable": 1, "canary": 2},
        "weights": {"stable": 90, "canary": 10},
        "sticky": {"header": "x-user-id"},
        "shadow": {"target": "canary", "percent": 5},
        "experiment": None,
        "effective": {
            "available": [1, 2],
            "weights": {"1": 0.9, "2": 0.1},
            "labels": {"stable": 1, "canary": 2},
            "pending_labels": {},
            "unavailable": [],
            "missing": [],
            "shadow": {"target": 2, "percent": 5},
            "note": "",
        },
    }
    assert Router().routing_state("x")["effective"]["note"].startswith("no AVAILABLE version")


def test_tables_are_swapped_not_mutated():
    r = make()
    before = r.table("m")
    r.set_available("m", [1])
    assert r.table("m") is not before
    assert before.available == {1, 2}  # a reader holding the old table still sees it whole


def test_routed_version_whose_folder_is_gone_says_so_and_fails_over():
    """Folder 1 deleted under stable: 1 at 90: its share goes to 2, and every answer
    says the folder is gone (not "not AVAILABLE yet", which reads as "wait")."""
    r = make(available=(2,))
    r.set_available("m", [2], present=[2])
    assert r.pick("m").version == 2 and r.pick("m", key="u").version == 2
    eff = r.routing_state("m")["effective"]
    assert eff["missing"] == [1] and eff["unavailable"] == [1]
    assert eff["weights"] == {"2": 1.0}
    assert "label 'stable' points at version 1, whose folder is gone from the repository" in eff["note"]
    assert "version 1's folder is gone from the repository" in eff["note"]
    with pytest.raises(RoutingError) as info:
        r.pick("m", label="stable")
    assert info.value.message == "label 'stable' of model 'm' points at version 1, whose folder is gone from the repository"
    # what a WARNING reports: who routes the missing version, the split left (even while 1 drains)
    r.set_available("m", [1, 2], present=[2])
    assert r.missing_routes("m") == ({"label 'stable'": 1}, {2: 1.0})
    r.set_available("m", [1, 2], present=[1, 2])  # the folder is back
    assert r.missing_routes("m") == ({}, {1: 0.9, 2: 0.1})
    assert r.routing_state("m")["effective"]["missing"] == []
