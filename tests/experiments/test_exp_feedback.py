"""The decision log: bounded, joined by request id to the version that served, idempotent."""

import pytest

from experiments.feedback import MAX_ITEMS, DecisionLog, FeedbackError, FeedbackItem, parse_feedback
from router.config import OutcomeSpec

OUTCOMES = (OutcomeSpec("click", "binary", "increase"), OutcomeSpec("revenue", "continuous", "increase"))


def items(*triples):
    return [FeedbackItem(r, m, float(v)) for r, m, v in triples]


def test_outcomes_land_on_the_version_that_served():
    log = DecisionLog()
    log.record("a", "mlp", 1, "control", 1.0)
    log.record("b", "mlp", 2, "candidate", 1.0)
    log.record("c", "mlp", 2, "candidate", 1.0)
    result = log.join("mlp", items(("a", "click", 0), ("b", "click", 1), ("c", "click", 1), ("c", "revenue", 2.5)))
    assert result.to_json() == {"matched": 4, "unknown": 0, "duplicate": 0}
    drained = log.drain("mlp")
    assert drained["control"]["click"].n == 1 and drained["control"]["click"].mean == 0
    assert drained["candidate"]["click"].n == 2 and drained["candidate"]["click"].mean == 1
    assert drained["candidate"]["revenue"].mean == 2.5
    assert log.drain("mlp") == {}  # drained once


def test_duplicates_are_idempotent_and_unknown_ids_change_nothing():
    log = DecisionLog()
    log.record("a", "mlp", 2, "candidate", 1.0)
    assert log.join("mlp", items(("a", "click", 1))).matched == 1
    again = log.join("mlp", items(("a", "click", 0), ("a", "click", 1), ("zzz", "click", 1)))
    assert again.to_json() == {"matched": 0, "unknown": 1, "duplicate": 2}
    assert log.join("bert", items(("a", "click", 1))).unknown == 1  # another model's request
    assert log.drain("mlp")["candidate"]["click"].n == 1
    assert log.totals == {"matched": 1, "unknown": 2, "duplicate": 2, "late": 0, "evicted_early": 0}


def test_first_record_wins_and_unrouted_requests_are_matched_but_not_counted():
    log = DecisionLog()
    log.record("a", "mlp", 1, None, 1.0)  # a pinned request: outside the split
    log.record("a", "mlp", 2, "candidate", 2.0)  # a second record of the id never moves it
    assert log.served("a").version == 1
    assert log.join("mlp", items(("a", "click", 1))).matched == 1
    assert log.drain("mlp") == {}


def test_the_log_is_bounded_oldest_first():
    log = DecisionLog(capacity=3)
    for i in range(5):
        log.record(f"r{i}", "mlp", 1, "control", float(i))
    assert len(log) == 3 and log.served("r0") is None and log.served("r4") is not None
    assert log.join("mlp", items(("r0", "click", 1), ("r2", "click", 1))).to_json() == {
        "matched": 1, "unknown": 1, "duplicate": 0}
    with pytest.raises(ValueError):
        DecisionLog(capacity=0)


def test_parse_feedback():
    got = parse_feedback({"items": [{"request_id": "x", "metric": "click", "value": True},
                                    {"request_id": "y", "metric": "revenue", "value": 3}]}, OUTCOMES)
    assert got == [FeedbackItem("x", "click", 1.0), FeedbackItem("y", "revenue", 3.0)]


BAD = [
    ([], 'expected {"items": [{"request_id"'),
    ({"items": [], "extra": 1}, 'expected {"items"'),
    ({"items": {}}, "items: expected a list, got dict"),
    ({"items": []}, f"items: expected 1 to {MAX_ITEMS} items, got 0"),
    ({"items": [{"request_id": "x", "metric": "click", "value": 1}] * (MAX_ITEMS + 1)}, "items: expected 1 to"),
    ({"items": ["x"]}, "items[0]: expected an object, got str"),
    ({"items": [{"request_id": "x", "metric": "click", "value": 1, "ts": 3}]}, "items[0]: unknown key 'ts'"),
    ({"items": [{"request_id": "", "metric": "click", "value": 1}]}, "items[0].request_id: expected a request id"),
    ({"items": [{"request_id": "x" * 129, "metric": "click", "value": 1}]}, "items[0].request_id"),
    ({"items": [{"request_id": "x", "metric": "buy", "value": 1}]},
     "items[0].metric: 'buy' is not an outcome of this experiment (outcomes: click, revenue)"),
    ({"items": [{"request_id": "x", "metric": "click", "value": 2}]},
     "items[0].value: expected 0 or 1 for binary metric 'click', got 2"),
    ({"items": [{"request_id": "x", "metric": "click", "value": 0.5}]}, "expected 0 or 1"),
    ({"items": [{"request_id": "x", "metric": "revenue", "value": "3"}]},
     "items[0].value: expected a finite number for metric 'revenue', got '3'"),
    ({"items": [{"request_id": "x", "metric": "revenue", "value": float("inf")}]}, "expected a finite number"),
    ({"items": [{"request_id": "x", "metric": "revenue", "value": False}]}, "expected a finite number"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_feedback_names_the_item_and_field(body, message):
    with pytest.raises(FeedbackError) as info:
        parse_feedback(body, OUTCOMES)
    assert message in str(info.value)
