"""The file-backed decider lease (runtime/experiment_filelease.py): taken by the first
process, refused to another process and to a second descriptor in the same one while
held; the holder's annotations reach readers through the record, its states through
`<stem>.experiments.json` in the format a lone server always wrote (an existing file is
read as is); released at a graceful close, and freed by the kernel at kill -9, so the
next sync takes it at once. make_fleet gives a writable config file this lease, a
ConfigMap volume none."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

from runtime.configsource import FileSource
from runtime.experiment_filelease import FileLease
from runtime.experiment_fleet import make_fleet

STATES = "splitserve.io/experiments"
URL = "splitserve.io/decider-url"

HOLD = """
import sys
from runtime.experiment_filelease import FileLease
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
