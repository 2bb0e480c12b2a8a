"""README, "A complete A/B session", run as written against a scratch checkout.

The scratch folder is a git repository holding the checkout's tracked example files
(`.gitignore`, configs/, model_repository/, tools/make_example_models.py) as they are
in this working tree. The server runs there with its defaults (no --config, no
--repository), as `splitserve serve` does in a fresh clone. After the walkthrough's
state-changing steps (publish version 3, two routing PUTs), `git status` there must
be clean and every tracked file unchanged; the state lives in ignored files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = [".gitignore", "configs", "model_repository", "tools/make_example_models.py"]
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                    "data": np.linspace(-1, 1, 64, dtype=np.float32).tolist()}]}


def _git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _wait(what: str, cond, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def scratch(tmp_path) -> tuple[Path, list[str]]:
    if shutil.which("git") is None:
        pytest.skip("git is needed")
    probe = subprocess.run(["git", "ls-files", "--", *EXAMPLE], cwd=ROOT,
                           capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        pytest.skip("not a git checkout")
    tracked = sorted(probe.stdout.split())
    work = tmp_path / "checkout"
    for rel in tracked:
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, work / rel)
    _git(work, "init", "-q")
    _git(work, "add", "-A")
    _git(work, "commit", "-q", "-m", "example")
    # the .gitignore hides none of the bundled example
    assert sorted(_git(work, "ls-files").split()) == tracked
    return work, tracked


def _routed(http: str, user: str) -> str:
    r = httpx.post(f"{http}/v2/models/mlp/infer", json=BODY, headers={"x-user-id": user},
                   timeout=30)
    assert r.status_code == 200, r.text
    return r.headers["x-model-version"]


@pytest.mark.slow
def test_walkthrough_leaves_the_checkout_clean(scratch, tmp_path):
    work, tracked = scratch
    before = {rel: (work / rel).read_bytes() for rel in tracked}
    assert not (work / "configs" / "splitserve.yaml").exists()
    assert not (work / "model_repository" / "mlp" / "3").exists()  # published below

    srv = ServerProcess(None, cwd=work).wait_serving()
    try:
        assert "event=config_created" in srv.log_text()
        # the state the README describes: 1 stable, 2 canary, 90/10, sticky x-user-id
        state = httpx.get(f"{srv.url}/v1/models/mlp/routing", timeout=30).json()
        assert state["labels"] == {"stable": 1, "canary": 2}
        assert state["weights"] == {"stable": 90, "canary": 10}
        assert state["sticky"] == {"header": "x-user-id"}

        # 1. build version 3 and publish it atomically, as the README says
        build = tmp_path / "mlp-v3"
        subprocess.run([sys.executable, "tools/make_example_models.py", "--version-dir",
                        str(build), "--seed", "3"], cwd=work, check=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        shutil.copytree(build, work / "model_repository" / "mlp" / ".3.tmp")
        os.rename(work / "model_repository" / "mlp" / ".3.tmp",
                  work / "model_repository" / "mlp" / "3")

        _wait("version 3 to be ready", lambda: httpx.get(
            f"{srv.url}/v2/models/mlp/versions/3/ready", timeout=30).status_code == 200)
        assert {_routed(srv.url, f"user-{i}") for i in range(20)} <= {"1", "2"}  # no traffic yet

        # 2. label it canary at 10%
        canary = {"labels": {"stable": 2, "canary": 3}, "weights": {"stable": 90, "canary": 10},
                  "sticky": {"header": "x-user-id"}}
        r = httpx.put(f"{srv.url}/v1/models/mlp/routing", json=canary, timeout=60)
        assert r.status_code == 200, r.text
        _wait("the canary label to move to 3", lambda: httpx.get(
            f"{srv.url}/v1/models/mlp/routing", timeout=30).json()["labels"]["canary"] == 3)
        served = {_routed(srv.url, f"user-{i}") for i in range(60)}
        assert served <= {"2", "3"} and "2" in served, served

        # 3. the comparison answers
        r = httpx.get(f"{srv.url}/v1/models/mlp/metrics", timeout=30)
        assert r.status_code == 200 and "3" in r.text, r.text

        # 4. promote it
        r = httpx.put(f"{srv.url}/v1/models/mlp/routing",
                      json={"labels": {"stable": 3}, "weights": {"stable": 100}}, timeout=60)
        assert r.status_code == 200, r.text
        _wait("all traffic on 3", lambda: all(
            _routed(srv.url, f"user-{i}") == "3" for i in range(20)))
    finally:
        assert srv.stop() == 0, srv.log_text()[-3000:]

    # the state is kept, in the ignored files ...
    persisted = yaml.safe_load((work / "configs" / "splitserve.yaml").read_text())
    assert persisted["models"]["mlp"]["labels"] == {"stable": 3}
    assert (work / "model_repository" / "mlp" / "3" / "model.pt2").is_file()
    ignored = _git(work, "status", "--porcelain", "--ignored")
    assert "!! configs/splitserve.yaml" in ignored and "!! model_repository/mlp/3/" in ignored
    # ... and the checkout is clean: nothing untracked, no tracked file changed
    assert _git(work, "status", "--porcelain") == ""
    assert {rel: (work / rel).read_bytes() for rel in tracked} == before
