"""A model whose folder is in the repository but not loaded yet answers 503 (retry), not
404 "unknown model": the window after the port opens and before the first scan, or after
a folder is published and before it is read. Clients give up on 404 and retry 503."""

from __future__ import annotations

import shutil

import httpx

from conftest import MLP_YAML
import make_example_models as mk

BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.0] * 64}]}


def test_a_published_model_not_read_yet_is_503_and_an_absent_one_404(make_repo, serve, version_cache):
    repo = make_repo({"other": {1: "st1"}})
    srv = serve(repo, quiet_s=5.0)  # the new folder stays unread for 5 s: we ask at once
    assert srv.wait_for(lambda: srv.available("other") == [1], 60)
    mk.write_model_folder(repo / "mlp", MLP_YAML)
    shutil.copytree(version_cache / "st1", repo / "mlp" / "1")
    r = httpx.post(f"{srv.http}/v2/models/mlp/infer", json=BODY, timeout=10)
    assert r.status_code == 503, r.text  # unread: "not loaded yet"; read, loading: "no AVAILABLE version"
    r = httpx.post(f"{srv.http}/v2/models/nope/infer", json=BODY, timeout=10)
    assert r.status_code == 404 and r.json()["error"] == "unknown model 'nope'"


def test_the_manager_says_unavailable_before_its_first_scan(make_repo):
    from runtime.config.settings import RepositorySettings
    from runtime.errors import Code
    from runtime.lifecycle.manager import Manager

    repo = make_repo({"mlp": {1: "st1"}})
    m = Manager(repo, RepositorySettings())  # not started: nothing scanned yet
    try:
        m.acquire("mlp", 1)
        raise AssertionError("acquired a model never loaded")
    except Exception as e:  # noqa: BLE001
        assert getattr(e, "code", None) is Code.UNAVAILABLE, e
    assert m.unknown("nope").code is Code.NOT_FOUND
