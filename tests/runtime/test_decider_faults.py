"""The in-server decider (runtime/decider/runner.py), judged by hand on a fake clock: a
latency rollback is counted as reason `latency`; a sticky user counts as a unit in each
new experiment, not only the first one that saw it; the first judgment after the start
is not a spurious "hold: no requests" while traffic flows."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from router import RouteConfig, Router, parse_config_text
from runtime.decider.runner import ExperimentRunner, rollback_reason


def doc(**exp) -> str:
    block = {"control": "stable", "candidate": "canary", "steps": [50, 100], "interval_s": 1,
             "min_requests": 10_000, "min_duration_s": 0}
    block.update(exp)
    return json.dumps({"models": {"mlp": {"labels": {"stable": 1, "canary": 2},
                                          "weights": {"stable": 50, "canary": 50}, "experiment": block}}})


def make(text: str):
    router = Router(parse_config_text(text, "splitserve.yaml"))
    clock = [1000.0]

    async def put_routing(model, obj):
        router.set_config(model, RouteConfig.from_json(obj, model=model))

    runner = ExperimentRunner(router, SimpleNamespace(put_routing=put_routing), None,
                              clock=lambda: clock[0], tick_s=3600)
    return runner, router, clock


def test_rollback_reasons_are_the_guardrail_that_alarmed():
    auto = lambda reason: SimpleNamespace(by="auto", reason=reason)  # noqa: E731
    assert rollback_reason(auto("latency p99: 40 of 200 canary requests slower than 1.2 x stable's p99")) == "latency"
    assert rollback_reason(auto("errors: canary had 9 errors in 20 requests")) == "errors"
    assert rollback_reason(SimpleNamespace(by="manual", reason="rolled back by hand")) == "manual"
    assert rollback_reason(auto("something else")) == "other"


def test_a_latency_rollback_is_counted_as_latency():
    runner, router, clock = make(doc(guardrails={"latency": {"quantile": 0.99, "max_ratio": 1.2}}))

    async def main():
        await runner.tick()  # start
        for _ in range(30):
            clock[0] += 1
            for i in range(1000):  # (the control's p99 needs a few hundred per interval)
                runner.on_finished("mlp", 1, "split", True, 0.001, None, None)
                runner.on_finished("mlp", 2, "split", True, 0.5, None, None)  # 500x slower
            await runner.tick()
            if runner.view("mlp")["state"] == "rolled_back":
                break

    asyncio.run(main())
    assert runner.view("mlp")["latch"].startswith("latency p99:")
    assert runner.published().counts == {("rollbacks", "mlp", "latency"): 1}


def test_sticky_users_count_as_units_in_every_new_experiment():
    runner, router, clock = make(doc())

    def users():
        for i in range(50):
            runner.on_finished("mlp", 1 + i % 2, "sticky", True, 0.001, None, f"user-{i}")

    async def main():
        await runner.tick()  # start
        clock[0] += 1
        users()
        await runner.tick()
        first = runner.view("mlp")
        assert first["control"]["units"] + first["candidate"]["units"] == 50
        router.set_config("mlp", parse_config_text(doc(min_requests=20_000), "x")["mlp"])  # a new experiment
        clock[0] += 1
        await runner.tick()  # its start
        assert [d["action"] for d in runner.view("mlp")["decisions"]] == ["start"]
        clock[0] += 1
        users()  # the same users come back
        await runner.tick()
        again = runner.view("mlp")
        assert (again["control"]["units"], again["candidate"]["units"]) == (25, 25), again

    asyncio.run(main())


def test_no_spurious_hold_when_the_canary_becomes_available_after_the_config():
    """The experiment is in the config at start; the canary loads a little later. The
    start waits for it, so the first interval has traffic on both arms, not a hold."""
    runner, router, clock = make(doc())
    router.set_available("mlp", [1])  # the canary still loads

    def traffic(versions, n=10):
        for v in versions:
            for _ in range(n):
                runner.on_finished("mlp", v, "split", True, 0.001, None, None)

    async def main():
        await runner.tick()
        clock[0] += 0.95
        traffic([1])  # only stable can serve
        router.set_available("mlp", [1, 2])
        await runner.tick()
        assert [d["action"] for d in runner.view("mlp")["decisions"]] == ["start"]
        clock[0] += 0.05  # a whole interval after the config was read, none since the canary serves
        await runner.tick()
        for _ in range(4):
            clock[0] += 0.3
            traffic([1, 2])
            await runner.tick()

    asyncio.run(main())
    actions = [d["action"] for d in runner.view("mlp")["decisions"]]
    assert "hold" not in actions, runner.view("mlp")["decisions"]
