"""The file-backed decider lease (runtime/decider/lease_file.py): taken by the first
process, refused to another process and to a second descriptor in the same one while
held; the holder's annotations reach readers through the record, its states through
`<stem>.experiments.json` in the format a lone server always wrote (an existing file is
read as is); released at a graceful close, and freed by the kernel at kill -9, so the
next sync takes it at once. make_fleet gives a writable config file this lease, a
ConfigMap volume none. A decider in such a fleet counts from its first judgment (the
start): what was served before is judged away, and the view lists no decision until then."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from router import Router, parse_config_text
from runtime.routing.file_source import FileSource
from runtime.decider.lease_file import FileLease
from runtime.decider.fleet import Fleet, make_fleet
from runtime.decider.runner import ExperimentRunner

STATES = "splitserve.io/experiments"
URL = "splitserve.io/decider-url"

HOLD = """
import sys
from runtime.decider.lease_file import FileLease
lease = FileLease(sys.argv[1], "proc-b", "splitserve.io/experiments")
print(lease.sync({"splitserve.io/decider-url": "http://127.0.0.1:2"}), flush=True)
sys.stdin.read()
"""


def test_taken_refused_to_another_descriptor_and_process_then_released(tmp_path):
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text("models: {}\n")
    (tmp_path / "splitserve.experiments.json").write_text(json.dumps({"models": {"mlp": {"state": "running"}}}))
    a = FileLease(cfg, "proc-a", STATES)
    b = FileLease(cfg, "proc-a2", STATES)
    assert a.sync({URL: "http://127.0.0.1:1"}) and a.leading and a.holder == "proc-a"
    assert json.loads(a.annotations()[STATES]) == {"mlp": {"state": "running"}}  # an upgrade keeps them
    assert not b.sync({URL: "http://127.0.0.1:9"}) and not b.leading  # another fd, same process
    assert b.holder == "proc-a" and b.annotations()[URL] == "http://127.0.0.1:1"
    version = b.version

    a.sync({STATES: json.dumps({"mlp": {"state": "rolled_back"}}, separators=(",", ":"))})
    assert json.loads((tmp_path / "splitserve.experiments.json").read_text()) == \
        {"models": {"mlp": {"state": "rolled_back"}}}
    assert not b.sync() and b.version > version and json.loads(b.annotations()[STATES])["mlp"]["state"] == "rolled_back"
    assert not b.sync({STATES: "{}"}) and json.loads(a.annotations()[STATES])  # a reader writes nothing
    assert (tmp_path / ".splitserve.yaml.decider.json").exists()

    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "False"  # another process: refused
        a.release({URL: "http://127.0.0.1:1"})
        assert not a.leading and b.sync() and b.holder == "proc-a2"  # released: taken at once
        b.close()
    finally:
        proc.kill()
        proc.wait()


def test_kill_9_of_the_holder_frees_the_lock_at_once(tmp_path):
    cfg = tmp_path / "routing.yaml"
    cfg.write_text("models: {}\n")
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(cfg)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "True"
        a = FileLease(cfg, "proc-a", STATES)
        assert not a.sync() and a.holder == "proc-b" and a.annotations()[URL] == "http://127.0.0.1:2"
    finally:
        proc.kill()
        proc.wait()
    assert a.sync() and a.holder == "proc-a"  # no duration to wait out
    a.close()


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_a_writable_config_file_gets_a_file_fleet_a_configmap_volume_none(tmp_path):
    settings = SimpleNamespace(server=SimpleNamespace(token=None, advertise_url=None, experiment_lease_s=15))
    cfg = tmp_path / "rw" / "splitserve.yaml"
    cfg.parent.mkdir()
    cfg.write_text("models: {}\n")
    fleet = make_fleet(settings, FileSource(cfg))
    assert isinstance(fleet.lease, FileLease) and fleet.lease.state_file == cfg.with_name("splitserve.experiments.json")
    vol = tmp_path / "vol"  # kubelet's layout: the file is a link through `..data`
    (vol / "..2026_12_02").mkdir(parents=True)
    (vol / "..2026_12_02" / "splitserve.yaml").write_text("models: {}\n")
    (vol / "..data").symlink_to("..2026_12_02")
    (vol / "splitserve.yaml").symlink_to("..data/splitserve.yaml")
    assert make_fleet(settings, FileSource(vol / "splitserve.yaml")) is None
    assert make_fleet(settings, None) is None


# Weights already at the first step: the start changes no routing (no Control needed).
RUNNING = json.dumps({"models": {"mlp": {
    "labels": {"stable": 1, "canary": 2}, "weights": {"stable": 50, "canary": 50},
    "experiment": {"control": "stable", "candidate": "canary", "steps": [50, 100], "interval_s": 1,
                   "min_requests": 10_000, "min_duration_s": 0}}}})


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_requests_before_the_first_judgment_are_not_counted_and_the_view_lists_no_decision_until_it(tmp_path):
    """Traffic that reaches a server after it is ready but before its decider's first
    judgment (with workers in a file fleet: a tick to take the workers' flock, a sync to
    take the lease, then a tick) is judged away by that judgment, which starts the
    experiment: the baseline moves on, the state counts from zero. A view that listed the
    start decision before it was made let a client send such traffic believing it counted
    (tests/workers/test_experiment_workers.py's first test, about 1 run in 6)."""
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(RUNNING)
    clock = [1000.0]
    runner = ExperimentRunner(Router(parse_config_text(RUNNING, str(cfg))), None,
                              cfg.with_name("splitserve.experiments.json"), clock=lambda: clock[0], tick_s=3600)
    runner.fleet = Fleet(FileLease(cfg, "srv-a", STATES), token=None, advertise_url="http://127.0.0.1:9")
    record = tmp_path / ".splitserve.yaml.decider.json"

    def serve(version: int, n: int) -> None:
        for _ in range(n):
            runner.on_finished("mlp", version, "split", True, 0.001, f"r{clock[0]}-{version}-{_}", None)

    def judged() -> dict[str, int]:  # the baseline the holder wrote: requests per version
        base = json.loads(json.loads(record.read_text())["annotations"]["splitserve.io/baseline"])
        return {v: c[0] for v, c in base["srv-a"]["mlp"].items()}

    async def main() -> None:
        runner.start()  # (its own tick is an hour away: this test ticks)
        try:
            serve(1, 2)  # before any judgment
            view = runner.view("mlp")
            assert view["decisions"] == [] and view["state"] == "running" and view["candidate_weight"] == 50
            deadline = time.monotonic() + 10
            while not runner.fleet.leading:  # the lease loop's first sync, from a thread
                assert time.monotonic() < deadline, "the file lease was never taken"
                await asyncio.sleep(0.01)
            await runner.tick()  # the first judgment: the start
            view = runner.view("mlp")
            assert [d["action"] for d in view["decisions"]] == ["start"]
            assert (view["control"]["requests"], view["candidate"]["requests"]) == (0, 0)
            assert judged() == {"1": 2}  # judged away, not evidence
            shown = json.loads(cfg.with_name("splitserve.experiments.json").read_text())["models"]["mlp"]
            assert shown["decisions"][0]["action"] == "start" and shown["requests"] == [0, 0]

            serve(1, 3)
            serve(2, 4)
            clock[0] += 1  # an interval on
            await runner.tick()
            view = runner.view("mlp")
            assert (view["control"]["requests"], view["candidate"]["requests"]) == (3, 4)  # every one since
            assert judged() == {"1": 5, "2": 4}
        finally:
            await runner.stop()

    asyncio.run(main())
