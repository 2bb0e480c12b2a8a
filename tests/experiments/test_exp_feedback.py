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


# --- issue 29: kept by age, late per arm, per generation and per key ---------------------


def test_ids_are_kept_by_age_and_late_feedback_is_counted_per_arm_not_joined():
    log = DecisionLog(window_s=100)  # grace: 25 s
    log.record("old", "mlp", 2, "candidate", 0.0, generation=1)
    log.record("ctl", "mlp", 1, "control", 0.0, generation=1)
    for i in range(1000):  # many ids do not push the old ones out: only age does
        log.record(f"r{i}", "mlp", 1, "control", 50.0 + i * 0.01, generation=2)
    assert log.served("old") is not None
    r = log.join("mlp", items(("old", "click", 1), ("r1", "click", 1)), now=110.0)
    assert r.to_json() == {"matched": 1, "unknown": 0, "duplicate": 0, "late": 1}
    drained = log.drain_generations("mlp")
    assert drained[1]["candidate"].late == 1 and drained[1]["candidate"].outcomes == {}
    assert drained[2]["control"].outcomes["click"].n == 1
    assert log.late_by_arm == {("mlp", "candidate"): 1}
    log.record("new", "mlp", 1, "control", 126.0)  # 126 - 100 - 25 > 0: the first two are gone
    assert log.served("old") is None and log.served("ctl") is None and log.served("r0") is not None
    assert log.join("mlp", items(("ctl", "click", 1))).to_json() == {"matched": 0, "unknown": 1, "duplicate": 0}


def test_capacity_still_bounds_memory_and_counts_early_evictions():
    log = DecisionLog(capacity=2, window_s=100)
    for i in range(4):
        log.record(f"r{i}", "mlp", 1, "control", float(i))
    assert len(log) == 2 and log.totals["evicted_early"] == 2


def test_per_key_sums_are_the_increments_of_each_keys_totals():
    log = DecisionLog()
    values = {"u1": [1, 0, 1], "u2": [0], "u3": [1, 1]}
    n = 0
    for key, vs in values.items():
        for v in vs:
            log.record(f"q{n}", "mlp", 2, "candidate", 1.0, generation=3, unit=key)
            log.join("mlp", items((f"q{n}", "click", v)))
            n += 1
    got = log.drain_generations("mlp")[3]["candidate"].unit_outcomes["click"]
    xs = [len(v) for v in values.values()]
    ys = [sum(v) for v in values.values()]
    from experiments.stats import UnitSums
    assert got == UnitSums.of(xs, ys)
    assert log.drain("mlp") == {}  # drained once, whichever drain


def test_an_entry_costs_about_250_bytes():
    import sys
    import tracemalloc

    tracemalloc.start()
    log = DecisionLog()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20_000):
        log.record(f"{i:08x}-0000-4000-8000-000000000000", "mlp", 1, "control", i * 0.01, generation=1)
    per = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    tracemalloc.stop()
    print(f"decision log: {per:.0f} bytes per entry (python {sys.version_info[:2]})")
    assert 100 < per < 400


def test_an_id_served_twice_is_counted_not_merged():
    log = DecisionLog(window_s=100)
    assert log.record("r1", "m", 1, "control", 0.0, served_here=True)
    assert not log.record("r1", "m", 2, "candidate", 1.0, served_here=True)  # a second request
    assert log.served("r1").version == 1  # the first record stands
    assert not log.record("r1", "m", 1, "control", 2.0)  # a peer's push of the same request
    assert log.duplicate_ids == {"m": 1}
