"""What the repository tells a user (issue 11, items 4 and 5), through a real
`python -m runtime serve` child (tools/serverproc.py) on a copy of the bundled example:

- folders and files the runtime ignores are logged once each, with the reason; a numbered
  version folder with no loadable file is FAILED (after the grace) on every surface that
  shows states, and loads once fixed;
- a bad model.yaml shows on the API in one line of our words (field, closest valid name,
  path relative to the repository): a model without a valid one is FAILED (a settled
  state, so start finishes), one with a last good one keeps serving it; a fixed file is
  confirmed in the log and the error clears.

Every wait is on a state read through the API, never a sleep.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from conftest import wait_until
from serverproc import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
EXPECTED = "model.pt2, model.safetensors (+ model.py), model.pt"
TYPO = "unknown field 'max_batchsize' in mlp/model.yaml; did you mean 'max_batch_size'?"
LAST_GOOD = "serving the last good model.yaml; the file now has an error: " + TYPO


def example_repository(tmp_path: Path) -> Path:
    """The bundled example as a fresh clone has it (tracked files only: no leftovers)."""
    repo = tmp_path / "model_repository"
    src, dst = ROOT / "model_repository" / "mlp", repo / "mlp"
    dst.mkdir(parents=True)
    for name in ("model.yaml", "model.py"):
        shutil.copy(src / name, dst / name)
    for v in ("1", "2"):
        shutil.copytree(src / v, dst / v)
    return repo


def config(tmp_path: Path, grace_s: float = 10.0) -> Path:
    """The bundled routing config, with a short incomplete grace for the test."""
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text((ROOT / "configs" / "splitserve.example.yaml").read_text()
                   + f"\nrepository:\n  quiet_s: 0.2\n  incomplete_grace_s: {grace_s}\n")
    return cfg


def tf_status(url: str, model: str = "mlp") -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/models/{model}", timeout=10)
    assert r.status_code == 200, r.text
    return {s["version"]: s for s in r.json()["model_version_status"]}


def index(url: str) -> dict[tuple[str, str], dict]:
    rows = httpx.post(f"{url}/v2/repository/index", json={}, timeout=10).json()
    return {(r["name"], r["version"]): r for r in rows}


def summary_rows(url: str, model: str = "mlp") -> dict[str, dict]:
    r = httpx.get(f"{url}/v1/models/{model}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    return {row["version"]: row for row in r.json()["versions"]}


def gauge(url: str, name: str, **labels: str) -> float | None:
    """The value of one Prometheus sample from a scrape (None: not exported)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    want = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return None


def state_gauge(url: str, version: str, state: str, model: str = "mlp") -> float | None:
    return gauge(url, "splitserve_version_state", model=model, state=state, version=version)


def config_error_gauge(url: str, model: str = "mlp") -> float | None:
    return gauge(url, "splitserve_model_config_error", model=model)


def assert_failed_everywhere(url: str, version: str, reason: str) -> None:
    """FAILED with `reason` on every surface that shows states."""
    st = tf_status(url)[version]
    assert st["state"] == "END" and st["status"] == {"error_code": "UNKNOWN", "error_message": reason}
    row = index(url)[("mlp", version)]
    assert row["state"] == "UNAVAILABLE" and row["reason"] == reason, row
    r = httpx.get(f"{url}/v2/models/mlp/versions/{version}/ready", timeout=10)
    assert r.status_code == 503 and r.json()["ready"] is False
    srow = summary_rows(url)[version]
    assert srow["state"] == "FAILED" and srow["reason"] == reason, srow
    assert state_gauge(url, version, "FAILED") == 1.0
    assert state_gauge(url, version, "AVAILABLE") == 0.0


def log_lines(proc: ServerProcess, event: str) -> list[str]:
    return [line for line in proc.lines() if f"event={event} " in line]


@pytest.mark.slow
def test_ignored_entries_logged_once_and_an_unloadable_version_is_failed_then_recovers(tmp_path):
    repo = example_repository(tmp_path)
    m = repo / "mlp"
    (repo / "config.yaml").write_text("models: {}\n")  # at the root: not a model folder
    with ServerProcess(repo, config=config(tmp_path, grace_s=1.0)) as proc:
        proc.wait_ready()
        url = proc.url
        proc.wait_line(r"event=ignored path=config\.yaml reason='not a model folder: models are "
                       r"folders <root>/<model>/<version>/'", 30)
        (repo / "model.pt.part").write_bytes(b"on the way")  # temporary: never reported
        shutil.copy(m / "2" / "model.pt2", repo / "model.pt2")
        proc.wait_line(r"event=ignored path=model\.pt2 reason='a model file at the repository "
                       r"root: models are folders <root>/<model>/<version>/ \(e\.g\. mymodel/1/model\.pt2\)'", 30)
        (m / "v7").mkdir()
        shutil.copy(m / "2" / "model.pt2", m / "v7" / "model.pt2")
        (m / "notes.txt").write_text("try v7 later\n")
        (m / ".tmp-9").mkdir()  # publishing by rename: never reported
        (m / ".tmp-9" / "model.pt2").write_bytes(b"half")
        (m / "8").mkdir()
        (m / "8" / "model.pth").write_bytes(b"not a format the loader reads")
        reason = f"no loadable file in mlp/8/: found model.pth; expected one of {EXPECTED}"

        assert wait_until(lambda: "8" in tf_status(url) and tf_status(url)["8"]["state"] == "END",
                          60), tf_status(url)
        assert_failed_everywhere(url, "8", reason)
        # what served keeps serving: the routed versions 1 and 2
        r = httpx.post(f"{url}/v2/models/mlp/infer", json=BODY, timeout=30)
        assert r.status_code == 200 and r.headers["x-model-version"] in ("1", "2")

        # more rescans (each write is a watcher event): still one line per ignored entry.
        # A new stray file after each write is the barrier: its line proves a later pass ran.
        for i in range(3):
            (m / "notes.txt").write_text(f"edit {i}\n")
            (repo / "config.yaml").write_text(f"# edit {i}\n")  # a root event: the root is listed again
            (m / f"barrier-{i}.txt").write_text("x")
            proc.wait_line(rf"event=ignored model=mlp path=barrier-{i}\.txt ", 30)
        ignored = log_lines(proc, "ignored")
        assert len([x for x in ignored if "path=v7 " in x]) == 1, ignored
        assert len([x for x in ignored if "path=notes.txt " in x]) == 1, ignored
        assert len([x for x in ignored if "path=config.yaml " in x]) == 1, ignored
        assert len([x for x in ignored if "path=model.pt2 " in x]) == 1, ignored
        assert not any("model.pt.part" in x for x in proc.lines()), "a temporary name was reported"
        assert any("model=mlp path=v7 reason='not a version number: version folders are "
                   "named 1, 2, ...'" in x for x in ignored), ignored
        assert not any("tmp-9" in x for x in proc.lines()), "a hidden publish folder was reported"
        assert len(log_lines(proc, "load_failed")) == 1, log_lines(proc, "load_failed")

        # fixed: the version loads, the recovery is logged, the failure is gone everywhere
        shutil.copy(m / "2" / "model.pt2", m / "8" / "model.pt2")
        assert wait_until(lambda: tf_status(url)["8"]["state"] == "AVAILABLE", 60), tf_status(url)
        assert tf_status(url)["8"]["status"] == {"error_code": "OK", "error_message": ""}
        assert index(url)[("mlp", "8")]["state"] == "READY"
        assert state_gauge(url, "8", "AVAILABLE") == 1.0
        assert httpx.get(f"{url}/v2/models/mlp/versions/8/ready", timeout=10).status_code == 200
        line = proc.wait_line(r"event=version_recovered servable=mlp:8 ", 30)
        assert f"was={reason!r}" in line, line
        # the stray file beside the model file that now loads is reported, once
        proc.wait_line(r"event=ignored model=mlp path=8/model\.pth reason='not read", 30)


@pytest.mark.slow
def test_bad_model_yaml_is_on_the_api_start_finishes_and_fixes_are_confirmed(tmp_path):
    repo = example_repository(tmp_path)
    yaml_path = repo / "mlp" / "model.yaml"
    good = yaml_path.read_text()
    yaml_path.write_text(good + "max_batchsize: 8\n")  # never had a valid one
    t0 = time.monotonic()
    with ServerProcess(repo, config=config(tmp_path)) as proc:
        proc.wait_ready(timeout=120)  # FAILED is settled: readiness does not wait on it
        start_s = time.monotonic() - t0
        url = proc.url
        for v in ("1", "2"):
            assert_failed_everywhere(url, v, TYPO)
        assert httpx.get(f"{url}/v2/models/mlp/ready", timeout=10).status_code == 503
        meta = httpx.get(f"{url}/v2/models/mlp", timeout=10).json()
        assert meta["versions"] == [] and meta["parameters"]["model_config_error"] == TYPO
        r = httpx.get(f"{url}/v1/models/mlp/metrics", timeout=10)
        assert r.json()["model_config_error"] == TYPO
        assert config_error_gauge(url) == 1.0
        r = httpx.post(f"{url}/v2/models/mlp/infer", json=BODY, timeout=30)
        assert r.status_code == 503, r.text
        bad = log_lines(proc, "bad_model_yaml")
        assert len(bad) == 1 and "keeping=nothing" in bad[0] and TYPO in bad[0], bad
        assert str(tmp_path) not in bad[0], "a server path in the message"

        # fixed: the model loads and the fix is confirmed
        yaml_path.write_text(good)
        assert wait_until(lambda: {s["state"] for s in tf_status(url).values()} == {"AVAILABLE"},
                          60), tf_status(url)
        proc.wait_line(r"event=model_config_recovered model=mlp path=mlp/model\.yaml ", 30)
        assert config_error_gauge(url) == 0.0

        # broken again while serving: the last good settings serve on, the API says so
        yaml_path.write_text(good + "max_batchsize: 8\n")
        assert wait_until(lambda: tf_status(url)["1"]["status"]["error_message"] == LAST_GOOD, 30)
        assert {s["state"] for s in tf_status(url).values()} == {"AVAILABLE"}
        assert {s["status"]["error_code"] for s in tf_status(url).values()} == {"OK"}
        assert index(url)[("mlp", "1")] == {"name": "mlp", "version": "1", "state": "READY",
                                            "reason": LAST_GOOD}
        assert httpx.get(f"{url}/v2/models/mlp", timeout=10).json()["parameters"][
            "model_config_error"] == LAST_GOOD
        r = httpx.get(f"{url}/v1/models/mlp/metrics", timeout=10)
        assert r.json()["model_config_error"] == LAST_GOOD
        assert config_error_gauge(url) == 1.0  # serving the last good one: still an error to fix
        r = httpx.post(f"{url}/v2/models/mlp/infer", json=BODY, timeout=30)
        assert r.status_code == 200, r.text
        assert "keeping=last_good" in log_lines(proc, "bad_model_yaml")[-1]

        # fixed again: confirmed, and the error is gone from the API
        yaml_path.write_text(good)
        assert wait_until(lambda: tf_status(url)["1"]["status"]["error_message"] == "", 30)
        assert "error" not in index(url)[("mlp", "1")]["reason"]
        assert "parameters" not in httpx.get(f"{url}/v2/models/mlp", timeout=10).json()
        r = httpx.get(f"{url}/v1/models/mlp/metrics", timeout=10)
        assert r.json()["model_config_error"] is None
        assert config_error_gauge(url) == 0.0
        assert len(log_lines(proc, "model_config_recovered")) == 2
        assert len(log_lines(proc, "loaded")) == 2, "the bad file or its fix reloaded a version"
    assert start_s < 90, f"start with a bad model.yaml took {start_s:.1f}s"
