"""Scenario 2: faults during load.

Truncated or garbage weights, weights that do not fit the architecture, a model.py that
raises at import or in its build function, a load that hangs past `load_timeout_s`, a
version removed while it loads: each ends FAILED with a readable reason (or is dropped),
the version already serving keeps answering throughout (a client hits it the whole
time), and a fixed folder dropped afterwards loads.
"""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import numpy as np
import pytest

from reliability_helpers import (BODY, MLP_ALL, ROOT, LogCapture, answer_of, outputs_of,
                                 wait_until)
from runtime.types import VersionState as S

ARCH = (ROOT / "model_repository" / "mlp" / "model.py").read_text()
RAISES_AT_IMPORT = "raise RuntimeError('boom at import')\n"
SYNTAX_ERROR = "def build_model(:\n"
RAISES_IN_BUILD = "def build_model(**kwargs):\n    raise ValueError('bad build')\n"
HANGS_IN_BUILD = ARCH + "\n\nimport time as _t\n_real_build = build_model\n\n" \
    "def build_model(**kwargs):\n    _t.sleep({seconds})\n    return _real_build(**kwargs)\n"


class ServingWatch:
    """A client thread that keeps asking version 1 (pinned) and the default route while
    faults happen around it; every answer must be a 200 with the right numbers."""

    def __init__(self, srv):
        self.srv = srv
        self.sent = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._v1 = answer_of(1)

    def _run(self):
        with httpx.Client(base_url=self.srv.http, timeout=30) as c:
            while not self._stop.is_set():
                for path in ("/v2/models/mlp/versions/1/infer", "/v2/models/mlp/infer"):
                    self.sent += 1
                    try:
                        r = c.post(path, json=BODY)
                    except httpx.HTTPError as e:
                        self.failures.append(f"{path}: {e!r}")
                        continue
                    if r.status_code != 200:
                        self.failures.append(f"{path}: {r.status_code} {r.text}")
                    elif path.endswith("1/infer") and not np.allclose(outputs_of(r.json()), self._v1, atol=1e-5):
                        self.failures.append(f"{path}: wrong numbers")
                time.sleep(0.02)

    def __enter__(self):
        self._t.start()
        assert wait_until(lambda: self.sent >= 4, 10), "the serving watch never got going"
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(30)
        print(f"\n  serving watch: {self.sent} requests to the serving versions, "
              f"{len(self.failures)} failed")
        if exc[0] is None:
            assert self.sent >= 6
            assert not self.failures, self.failures[:5]
            assert self.srv.core.manager.state_of("mlp", 1) is S.AVAILABLE


def status_of(srv, version: int):
    e = srv.core.manager.models["mlp"]
    return next((s for s in e.statuses() if s.version == version), None)


def index_entry(srv, version: int) -> dict | None:
    r = httpx.post(srv.http + "/v2/repository/index", json={}, timeout=10)
    assert r.status_code == 200
    return next((m for m in r.json() if m["name"] == "mlp" and m["version"] == str(version)), None)


def assert_failed(srv, version: int, *needles: str, timeout: float = 30) -> str:
    assert srv.wait_state("mlp", version, S.FAILED, timeout=timeout), \
        f"version {version} is {srv.core.manager.state_of('mlp', version)}, not FAILED"
    reason = status_of(srv, version).error
    assert reason and all(n in reason for n in needles), reason
    listed = index_entry(srv, version)  # the reason is visible through the API too
    assert listed and listed["state"] == "UNAVAILABLE" and listed["reason"] == reason
    r = httpx.post(f"{srv.http}/v2/models/mlp/versions/{version}/infer", json=BODY, timeout=10)
    assert r.status_code == 503 and reason in r.json()["error"]
    return reason


def assert_serves(srv, version: int, seed: int, timeout: float = 30) -> None:
    assert srv.wait_state("mlp", version, S.AVAILABLE, timeout=timeout), \
        f"version {version} is {srv.core.manager.state_of('mlp', version)}: {status_of(srv, version)}"
    r = httpx.post(f"{srv.http}/v2/models/mlp/versions/{version}/infer", json=BODY, timeout=10)
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(outputs_of(r.json()), answer_of(seed), rtol=1e-5, atol=1e-5)


def test_truncated_garbage_and_misfit_weights(make_repo, serve, version_cache):
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": MLP_ALL})
    srv = serve(repo, quiet_s=0.2, incomplete_grace_s=1.0)
    good = (version_cache / "st2" / "model.safetensors").read_bytes()
    m = repo / "mlp"
    with ServingWatch(srv):
        (m / "2").mkdir()
        (m / "2" / "model.safetensors").write_bytes(good[: len(good) // 3])
        print("  truncated:", assert_failed(srv, 2, "truncated"))
        (m / "3").mkdir()
        (m / "3" / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(len(good)))
        print("  garbage:", assert_failed(srv, 3, "model.safetensors"))
        # complete and well-formed, but for another architecture
        from safetensors.torch import save_file
        import torch
        (m / "4").mkdir()
        save_file({"fc.weight": torch.zeros(8, 64)}, str(m / "4" / "model.safetensors"))
        print("  misfit:", assert_failed(srv, 4, "weights do not fit"))
        # fixed folders (new fingerprints) are retried and load
        shutil.copy(version_cache / "st2" / "model.safetensors", m / "2" / "model.safetensors")
        assert_serves(srv, 2, seed=2)
        shutil.rmtree(m / "3")
        shutil.copytree(version_cache / "st3", m / "3")
        assert_serves(srv, 3, seed=3)
        assert srv.core.manager.state_of("mlp", 4) is S.FAILED


@pytest.mark.parametrize("source,needles", [
    (RAISES_AT_IMPORT, ("raised while importing", "RuntimeError", "boom at import")),
    (SYNTAX_ERROR, ("raised while importing", "SyntaxError")),
    (RAISES_IN_BUILD, ("build_model(**kwargs) raised", "ValueError", "bad build")),
], ids=["import", "syntax", "build"])
def test_model_py_that_raises(make_repo, serve, version_cache, source, needles):
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": MLP_ALL})
    srv = serve(repo, quiet_s=0.2)
    v2 = repo / "mlp" / "2"
    tmp = repo / "mlp" / ".2.tmp"
    shutil.copytree(version_cache / "st2", tmp)
    (tmp / "model.py").write_text(source)  # a version's own model.py wins over the model's
    with ServingWatch(srv):
        tmp.rename(v2)
        print(f"  {needles[0]}:", assert_failed(srv, 2, *needles))
        (v2 / "model.py").write_text(ARCH)  # the fix
        assert_serves(srv, 2, seed=2)


def test_load_that_hangs_past_load_timeout(make_repo, serve, version_cache):
    yaml = MLP_ALL + "\nload_timeout_s: 1\n"
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": yaml})
    srv = serve(repo, quiet_s=0.2)
    m = repo / "mlp"
    with ServingWatch(srv), LogCapture("splitserve.manager") as logs:
        shutil.copytree(version_cache / "st2", m / ".2.tmp")
        (m / ".2.tmp" / "model.py").write_text(HANGS_IN_BUILD.format(seconds=8))
        t0 = time.monotonic()
        (m / ".2.tmp").rename(m / "2")
        reason = assert_failed(srv, 2, "load_timeout_s=1", timeout=15)
        took = time.monotonic() - t0
        print(f"  hang: FAILED after {took:.2f}s: {reason}")
        assert took < 4, "the load timeout did not cut the load short"
        # the hung load still sleeps on its thread; it must not hold the load pool
        shutil.copytree(version_cache / "st3", m / ".3.tmp")
        (m / ".3.tmp").rename(m / "3")
        assert_serves(srv, 3, seed=3, timeout=10)
        assert time.monotonic() - t0 < 6, "version 3 waited for the hung load to end"
        assert any("load_failed" in msg and "mlp:2" in msg for msg in logs.messages())
        # the fix
        (m / "2" / "model.py").write_text(ARCH)
        assert_serves(srv, 2, seed=2)


def test_version_removed_while_loading(make_repo, serve, version_cache):
    repo = make_repo({"mlp": {1: "st1"}}, yaml={"mlp": MLP_ALL})
    srv = serve(repo, quiet_s=0.2)
    m = repo / "mlp"
    with ServingWatch(srv), LogCapture("splitserve.manager") as logs:
        shutil.copytree(version_cache / "st2", m / ".2.tmp")
        (m / ".2.tmp" / "model.py").write_text(HANGS_IN_BUILD.format(seconds=1.5))
        (m / ".2.tmp").rename(m / "2")
        assert srv.wait_state("mlp", 2, S.LOADING, timeout=10)
        shutil.rmtree(m / "2")
        # dropped: no harness, no record, nothing served as version 2
        assert wait_until(lambda: srv.core.manager.state_of("mlp", 2) is None, 15), \
            status_of(srv, 2)
        assert srv.available("mlp") == [1]
        msgs = logs.messages()
        assert any("load_discarded" in x and "removed while loading" in x for x in msgs) or \
            any("load_failed" in x and "mlp:2" in x for x in msgs), msgs
        r = httpx.post(f"{srv.http}/v2/models/mlp/versions/2/infer", json=BODY, timeout=10)
        assert r.status_code == 404, r.text
        assert "no version 2" in r.json()["error"]
        # a fixed folder dropped afterwards, same version number, loads
        shutil.copytree(version_cache / "st2", m / ".2.tmp")
        (m / ".2.tmp").rename(m / "2")
        assert_serves(srv, 2, seed=2)
