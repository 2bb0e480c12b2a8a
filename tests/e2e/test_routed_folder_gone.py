"""A routed version whose folder is gone (issue 11, items 1 and 9).

A server must always be able to start from the state it was running in: deleting the
folder of a version the routes name makes that version unavailable (its share fails over,
one WARNING naming the label, the version and the split left), the routing answer says the
folder is gone, and a restart from the same persisted config starts and serves the same
way. TF Serving status forgets the deleted version; the repository index lists versions on
disk that are not loaded, with why.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from conftest import wait_until
from runtime.types import VersionState
from serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                    "data": np.linspace(-1, 1, 64, dtype=np.float32).tolist()}]}
MISSING = (r"level=WARNING .*event=routed_version_missing model=mlp versions=1 "
           r"routed_by=\"label 'stable'\" reason='{}' effective_split=2:100%")


def versions_served(url: str, n: int = 40) -> set[str]:
    with httpx.Client(base_url=url, timeout=30) as c:
        out = set()
        for _ in range(n):
            r = c.post("/v2/models/mlp/infer", json=BODY)
            assert r.status_code == 200, r.text
            out.add(r.headers["x-model-version"])
        return out


def routing(url: str) -> dict:
    r = httpx.get(f"{url}/v1/models/mlp/routing", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def tf_versions(url: str) -> list[tuple[str, str]]:
    r = httpx.get(f"{url}/v1/models/mlp", timeout=10)
    assert r.status_code == 200, r.text
    return [(s["version"], s["state"]) for s in r.json()["model_version_status"]]


def folder_gone_answer(url: str) -> None:
    """What GET routing says once version 1's folder is gone and it no longer serves."""
    eff = routing(url)["effective"]
    assert eff["missing"] == [1] and eff["weights"] == {"2": 1.0}, eff
    assert "label 'stable' points at version 1, whose folder is gone from the repository" in eff["note"]
    assert "not AVAILABLE yet" not in eff["note"]


@pytest.mark.slow
def test_bundled_example_survives_deleting_a_routed_folder_and_restarting(tmp_path):
    repo = tmp_path / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo, ignore=shutil.ignore_patterns("__pycache__"))
    cfg = tmp_path / "splitserve.yaml"
    shutil.copy(ROOT / "configs" / "splitserve.example.yaml", cfg)
    persisted = yaml.safe_load(cfg.read_text())["models"]["mlp"]
    assert persisted["labels"] == {"stable": 1, "canary": 2}

    with ServerProcess(repo, config=cfg).wait_ready() as srv:
        assert routing(srv.url)["effective"]["weights"] == {"1": 0.9, "2": 0.1}
        shutil.rmtree(repo / "mlp" / "1")
        srv.wait_line(MISSING.format("folder deleted"), timeout=60)
        srv.wait_line(r"event=unloaded servable=mlp:1 reason='folder deleted'", timeout=60)
        # TF Serving forgets a version whose folder is gone: no END entry left behind
        assert wait_until(lambda: tf_versions(srv.url) == [("2", "AVAILABLE")], 30), tf_versions(srv.url)
        folder_gone_answer(srv.url)
        assert versions_served(srv.url) == {"2"}
        r = httpx.post(f"{srv.url}/v1/models/mlp/labels/stable:predict", timeout=10,
                       json={"instances": [[0.1] * 64]})  # a label that cannot serve says why
        assert r.status_code == 503 and "whose folder is gone" in r.text, r.text
        # A new entry naming the deleted version is new intent: a 400 that changes nothing
        r = httpx.put(f"{srv.url}/v1/models/mlp/routing", timeout=10,
                      json={**persisted, "labels": {**persisted["labels"], "old": 1}})
        assert r.status_code == 400 and "label 'old' points at version 1, which has no folder" in r.json()["error"], r.text
        first_log = srv.log_text()
    assert yaml.safe_load(cfg.read_text())["models"]["mlp"] == persisted  # the state it ran in

    # The same persisted config, the same repository: it starts, warns, serves.
    with ServerProcess(repo, config=cfg).wait_ready() as srv:
        line = srv.wait_line(MISSING.format("no folder in the repository"), timeout=30)
        assert line in srv.log_text()
        folder_gone_answer(srv.url)
        assert versions_served(srv.url) == {"2"}
        assert tf_versions(srv.url) == [("2", "AVAILABLE")]
        # the folder back (published by rename): it loads, the configured split returns
        shutil.copytree(ROOT / "model_repository" / "mlp" / "1", repo / "mlp" / ".1.tmp")
        (repo / "mlp" / ".1.tmp").rename(repo / "mlp" / "1")
        srv.wait_line(r"level=INFO .*event=routed_version_restored model=mlp version=1", timeout=60)
        assert wait_until(lambda: routing(srv.url)["effective"]["weights"] == {"1": 0.9, "2": 0.1}, 60)
        assert routing(srv.url)["effective"]["missing"] == []
    assert len(re.findall("event=routed_version_missing", first_log)) == 1  # one line, not one per view


def test_index_lists_versions_on_disk_that_are_not_loaded(make_repo, serve):
    """After a (re)start nothing ever loaded version 1 (latest:1 picks 2): the index still
    lists it, and says why it is not loaded."""
    srv = serve(make_repo({"mlp": {1: "st1", 2: "st2"}}))
    assert srv.available("mlp") == [2]
    r = httpx.post(f"{srv.http}/v2/repository/index", json={}, timeout=10)
    assert r.status_code == 200, r.text
    assert [(m["version"], m["state"], m["reason"]) for m in r.json() if m["name"] == "mlp"] == [
        ("1", "UNAVAILABLE", "not loaded: not chosen by version policy latest:1"), ("2", "READY", "")]
    ready = httpx.post(f"{srv.http}/v2/repository/index", json={"ready": True}, timeout=10).json()
    assert [(m["name"], m["version"]) for m in ready] == [("mlp", "2")]


def test_index_says_a_version_the_policy_skips_has_no_loadable_file(make_repo, serve):
    """latest:1 serves 3; folder 1 holds only model.pth. The index says so now, with what it
    found and expects, so a policy changed to want it is known to fail before it does."""
    repo = make_repo({"mlp": {2: "st1", 3: "st2"}})
    (repo / "mlp" / "1").mkdir()
    (repo / "mlp" / "1" / "model.pth").write_bytes(b"not a format the loader reads")
    srv = serve(repo, incomplete_grace_s=0.5)
    assert srv.available("mlp") == [3]
    no_file = ("no loadable file in mlp/1/: found model.pth; expected one of model.pt2, "
               "model.safetensors (+ model.py), model.pt")
    rows = httpx.post(f"{srv.http}/v2/repository/index", json={}, timeout=10).json()
    assert [(m["version"], m["state"], m["reason"]) for m in rows] == [
        ("1", "UNAVAILABLE", f"not loaded: not chosen by version policy latest:1; {no_file}"),
        ("2", "UNAVAILABLE", "not loaded: not chosen by version policy latest:1"),
        ("3", "READY", "")]
    yaml_path = repo / "mlp" / "model.yaml"  # the policy changed: it fails as the index said
    yaml_path.write_text(yaml_path.read_text().replace("version_policy: {latest: 1}", "version_policy: all"))
    assert srv.wait_state("mlp", 1, VersionState.FAILED)
    assert srv.core.manager.view().model("mlp").version(1).error == no_file


def test_reload_keeps_routes_it_runs_and_applies_the_rest(make_repo, serve, tmp_path):
    """A routing file whose entry for mlp is what serves now (stable: 1, folder since
    deleted) is not refused on reload: the other model's new routes apply."""
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}, "other": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    mlp = "  mlp:\n    labels: {stable: 1, canary: 2}\n    weights: {stable: 90, canary: 10}\n"
    cfg.write_text("models:\n" + mlp)
    srv = serve(repo, config=cfg)
    shutil.rmtree(repo / "mlp" / "1")
    assert srv.wait_for(lambda: srv.available("mlp") == [2])
    cfg.write_text("models:\n" + mlp + "  other:\n    weights: {1: 100}\n")

    def other_weights() -> dict:
        return httpx.get(f"{srv.http}/v1/models/other/routing", timeout=10).json()["effective"]["weights"]

    assert wait_until(lambda: other_weights() == {"1": 1.0}, 30), other_weights()  # the watcher reloaded it
    assert routing(srv.http)["effective"]["missing"] == [1]


def test_tf_status_forgets_a_version_whose_folder_is_gone(make_repo, serve, version_cache):
    """END stays listed while its folder is there (the policy dropped it); once the folder
    is deleted the version is forgotten, as in TF Serving."""
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    srv = serve(repo)
    assert srv.available("mlp") == [2]
    shutil.copytree(version_cache / "st3", repo / "mlp" / ".3.tmp")
    (repo / "mlp" / ".3.tmp").rename(repo / "mlp" / "3")
    assert srv.wait_state("mlp", 2, VersionState.END)
    assert tf_versions(srv.http) == [("2", "END"), ("3", "AVAILABLE")]
    shutil.rmtree(repo / "mlp" / "2")
    assert srv.wait_for(lambda: srv.core.manager.state_of("mlp", 2) is None)
    assert tf_versions(srv.http) == [("3", "AVAILABLE")]


def test_writes_that_keep_a_routed_version_whose_folder_is_gone_are_accepted(make_repo, serve, tmp_path):
    """The canary's folder is deleted mid-experiment: a rollback (the write a guardrail
    makes too) and a PUT that only changes weights keep `canary: 2` as it runs, so they
    apply; an entry that is new or names another version still refuses a missing folder."""
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    experiment = {"control": "stable", "candidate": "canary", "steps": [50, 100], "interval_s": 0.3,
                  "min_requests": 10_000, "min_duration_s": 0}
    labels = {"stable": 1, "canary": 2}
    cfg.write_text(json.dumps({"models": {"mlp": {"labels": labels, "weights": {"stable": 100},
                                                  "experiment": experiment}}}))
    srv = serve(repo, config=cfg, token="t")
    auth = {"authorization": "Bearer t"}
    assert wait_until(lambda: routing(srv.http)["weights"] == {"stable": 50, "canary": 50}, 30)  # step 1
    shutil.rmtree(repo / "mlp" / "2")
    assert srv.wait_for(lambda: 2 not in srv.core.manager.view().model("mlp").present)

    r = httpx.post(f"{srv.http}/v1/models/mlp/experiment/rollback", headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    assert routing(srv.http)["weights"] == {"stable": 100, "canary": 0}
    weights_only = {"labels": labels, "weights": {"stable": 70, "canary": 30}, "experiment": experiment}
    r = httpx.put(f"{srv.http}/v1/models/mlp/routing", json=weights_only, headers=auth, timeout=10)
    assert r.status_code == 200, r.text
    assert "being loaded" not in r.json().get("note", "")  # its folder is gone: nothing loads it
    assert yaml.safe_load(cfg.read_text())["models"]["mlp"]["weights"] == {"stable": 70, "canary": 30}

    for new_intent, what in [({"stable": 1, "canary": 2, "next": 2}, "label 'next' points at version 2"),
                             ({"stable": 1, "canary": 3}, "label 'canary' points at version 3")]:
        r = httpx.put(f"{srv.http}/v1/models/mlp/routing", headers=auth, timeout=10,
                      json={**weights_only, "labels": new_intent})
        assert r.status_code == 400, r.text
        assert r.json()["error"] == f"model 'mlp': {what}, which has no folder in the repository (present: 1)"
    assert routing(srv.http)["labels"] == labels
    assert yaml.safe_load(cfg.read_text())["models"]["mlp"]["weights"] == {"stable": 70, "canary": 30}
