"""The runtime's side of issue 29 without servers: tallies (runtime/decider/tally.py) read
back by another process, whole, after the writer is killed; per-key cohort sums equal
the sums over keys computed directly; and the runner counts a request under the split
that placed it, not the one in force when it finished."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest

from experiments.stats import UnitSums
from router import RouteConfig, Router, parse_config_text
from runtime.decider import tally
from runtime.decider.counts import ARM_WIDTH, Cohorts, arms_of, generation_of, keys_of
from runtime.decider.runner import ExperimentRunner


def test_a_tally_reads_back_whole_from_another_process_after_kill_9(tmp_path):
    """A writer that counts then reports each count (an 'answer') and is killed with -9:
    its file holds every count it reported, and the file grew past its first mapping."""
    path = tmp_path / "a0-1.tally"
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from runtime.decider.tally import Tally
        t = Tally(Path({str(path)!r}), initial=256)
        for i in range(5000):
            at = t.slot(f"a\\tm\\t{{i % 50}}\\t0.5", 3)
            t.add(at, 0)
            t.add(at, 2, 0.5)
            print(i, flush=True)  # the answer leaves after the count is stored
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        for line in proc.stdout:
            if line.strip() == "4999":
                break
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    got = tally.read(path)
    assert len(got) == 50 and all(v == [100.0, 0.0, 50.0] for v in got.values())
    assert path.stat().st_size > 256


def test_a_torn_tally_parses_what_is_whole_and_a_foreign_file_is_empty(tmp_path):
    t = tally.Tally()
    t.add(t.slot("x", 2), 1, 7)
    t.add(t.slot("y" * 13, 1), 0, 2)
    data = bytes(t._buf[:t._used])
    assert tally.parse(data) == {"x": [0.0, 7.0], "y" * 13: [2.0]}
    assert tally.parse(data[:-8]) == {"x": [0.0, 7.0]}  # (`used` says more than is there)
    assert tally.parse(b"{}" * 20) == {}


def test_cohort_increments_sum_to_the_per_key_sums_and_a_key_stays_in_its_first_cohort():
    rng = random.Random(7)
    c = Cohorts()
    totals: dict[str, list] = {}
    got: dict[tuple[int, int], list] = {}
    shares = {0: 0.1, 1: 0.5}
    for gen in (0, 1):
        for _ in range(40):  # a judgment: some keys arrive, some come back
            for _ in range(rng.randint(1, 30)):
                k = f"u{rng.randint(0, 200)}"
                arm = int(rng.random() < shares[gen])
                v = totals.setdefault(k, [0, 0, shares[gen], arm, gen])
                v[0] += rng.randint(1, 3)
                v[1] = min(v[0], v[1] + rng.randint(0, 1))
            out = c.judge("m", "f1", {k: list(v) for k, v in totals.items()},
                          lambda s: 0 if s == 0.1 else 1)
            for key, (new, s) in out.items():
                acc = got.setdefault(key, [0, UnitSums()])
                acc[0] += new
                acc[1] = acc[1].merge(s)
    for (gen, arm), (new, sums) in got.items():
        mine = [v for v in totals.values() if v[4] == gen and v[3] == arm]
        want = UnitSums(len(mine), sum(x for x, *_ in mine), sum(x * x for x, *_ in mine),
                        sum(y for _, y, *_ in mine), sum(y * y for _, y, *_ in mine),
                        sum(x * y for x, y, *_ in mine))
        assert new == len(mine) and sums == pytest.approx(want), (gen, arm)
    assert c.judge("m", "f2", {"u1": [1, 0, 0.5, 1, 9]}, lambda s: 3) == {(3, 1): (1, UnitSums(1, 1, 1, 0, 0, 0))}


def test_a_share_maps_to_the_newest_generation_routed_at_it():
    history = [(0, 0.0), (1, 0.1), (2, 0.5), (3, 0.0), (4, 0.1)]
    assert [generation_of(history, s, 4) for s in (0.1, 0.5, 0.0, 0.3, None)] == [4, 2, 3, 4, 4]


DOC = {"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 90, "canary": 10},
       "sticky": {"header": "x-user-id"},
       "experiment": {"control": "stable", "candidate": "canary", "steps": [10, 50], "interval_s": 1,
                      "min_requests": 3, "min_duration_s": 0, "guardrails": {}}}


class Control:
    """Applies the decider's routing writes to the router, as runtime/service/control.py does."""

    def __init__(self, router: Router):
        self.router = router

    async def put_routing(self, model: str, doc: dict) -> None:
        self.router.set_config(model, RouteConfig.from_json(doc, model=model))


def test_requests_count_under_the_split_that_placed_them_and_keys_once_in_their_first_cohort():
    router = Router(parse_config_text(json.dumps({"models": {"mlp": DOC}}), "x.yaml"))
    clock = [1000.0]
    runner = ExperimentRunner(router, Control(router), None, clock=lambda: clock[0], tick_s=3600)

    async def main() -> None:
        await runner.tick()  # the start: 10 % already routed, generation 0
        old = router.get_config("mlp")
        for i in range(4):
            for v in (1, 2):
                runner.on_finished("mlp", v, "sticky", True, 0.001, f"a{i}-{v}", f"u{i}-{v}", old)
        clock[0] += 1
        await runner.tick()  # enough on both arms: advance to 50 %, generation 1
        assert runner.states["mlp"].step == 1 and router.get_config("mlp") is not old
        # a request placed under the old split finishes after the advance; a key comes back
        runner.on_finished("mlp", 2, "sticky", False, 0.001, "late-1", "u9", old)
        runner.on_finished("mlp", 2, "sticky", True, 0.001, "b1", "u0-2", router.get_config("mlp"))
        runner.on_finished("mlp", 1, "sticky", True, 0.001, "b2", "u7", None)  # the current split
        clock[0] += 1
        await runner.tick()

    asyncio.run(main())
    state = runner.states["mlp"]
    gens = {g.generation: g for g in state.gens}
    assert {g: (s.share, s.requests, s.units) for g, s in gens.items()} == {
        0: (0.1, (4, 5), (4, 5)),  # the late request counts at 10 %; u0-2 is not a new unit
        1: (0.5, (1, 1), (1, 0)),
    }
    # u0-2 came back at 50 %: its second request joins its cohort (generation 0, candidate)
    assert gens[0].unit_errors[1].units == 5 and gens[0].unit_errors[1].x == 6
    assert gens[0].unit_errors[1].xx == 4 + 1 + 1 + 1 + 1 and gens[0].unit_errors[1].y == 1
    assert runner.logs["mlp"].served("late-1") is None  # a failed answer is never joined
    # decision records of a key go under its cohort (feedback: one unit, one stratum)
    b1, b2 = runner.logs["mlp"].served("b1"), runner.logs["mlp"].served("b2")
    assert (b1.generation, b1.arm, b2.generation, b2.arm) == (0, "candidate", 1, "control")
    assert runner.logs["mlp"].window_s == 3600
    arms = arms_of(runner.tally.entries())["mlp"]  # cumulative, per version and the share placed at
    assert {t: c[:3] for t, c in arms.items()} == {"1@0.1": [4, 0, 0], "2@0.1": [5, 1, 0], "2@0.5": [1, 0, 0],
                                                   "1@0.5": [1, 0, 0]}  # (keyed: units come from keys)
    assert all(len(c[3]) == ARM_WIDTH - 3 for c in arms.values())
    (spec, keys), = keys_of(runner.key_tally.entries())["mlp"].items()
    assert spec == runner.states["mlp"].spec and keys["u0-2"][:4] == [2, 0, 0.1, 1] and keys["u7"][:4] == [1, 0, 0.5, 0]


def test_feedback_after_feedback_window_s_is_late_per_arm_and_shown():
    doc = {**DOC, "experiment": {**DOC["experiment"], "feedback_window_s": 10,
                                 "outcomes": [{"metric": "click", "kind": "binary", "goal": "increase"}]}}
    router = Router(parse_config_text(json.dumps({"models": {"mlp": doc}}), "x.yaml"))
    clock = [1000.0]
    runner = ExperimentRunner(router, Control(router), None, clock=lambda: clock[0], tick_s=3600)

    async def main() -> dict:
        await runner.tick()  # the start
        runner.on_finished("mlp", 2, "sticky", True, 0.001, "old", "u1")
        clock[0] += 9
        runner.on_finished("mlp", 1, "sticky", True, 0.001, "new", "u2")
        clock[0] += 2  # "old" is 11 s old: past the window; "new" 2 s
        got = await runner.feedback("mlp", {"items": [{"request_id": r, "metric": "click", "value": 1}
                                                      for r in ("old", "new")]})
        await runner.tick()
        return got

    got = asyncio.run(main())
    assert got == {"matched": 1, "unknown": 0, "duplicate": 0, "late": 1}
    view = runner.view("mlp")
    assert (view["control"]["late"], view["candidate"]["late"]) == (0, 1)
    assert view["outcomes"][0]["control"]["n"] == 1 and view["outcomes"][0]["candidate"]["n"] == 0
    assert view["unit"] == "key" and view["feedback_window_s"] == 10
