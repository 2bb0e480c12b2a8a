"""The operator command line against a live server: `splitserve status`, `route`,
`publish`, `experiment`. Each runs through runtime.cli.main.main (the real entry point); one
test also runs it as a separate process. Failures are one line and a non-zero status."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from runtime.cli.main import main
from runtime.types import VersionState

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "ops-token"
CONFIG = """models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 90, canary: 10}
    sticky: {header: x-user-id}
"""
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}


@pytest.fixture
def live(make_repo, serve, tmp_path):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(CONFIG)
    srv = serve(repo, config=cfg, token=TOKEN)
    assert srv.wait_state("mlp", 1, VersionState.AVAILABLE) and srv.wait_state("mlp", 2, VersionState.AVAILABLE)
    return srv


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def routing(srv) -> dict:
    return httpx.get(srv.http + "/v1/models/mlp/routing", timeout=10).json()


def test_status_table(live, capsys):
    with httpx.Client(base_url=live.http, timeout=30) as http:
        for i in range(40):
            assert http.post("/v2/models/mlp/infer", json=BODY, headers={"x-user-id": f"u{i}"}).status_code == 200
        bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [0.5] * 3}]}
        assert http.post("/v2/models/mlp/versions/2/infer", json=bad).status_code == 400
    rc, out, err = run(capsys, "status", "--url", live.http)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["MODEL", "VERSION", "STATE", "LABELS", "WEIGHT", "EFFECTIVE", "SHARE",
                                "REQUESTS", "ERRORS", "ERROR_RATE", "P50_MS", "P99_MS"]
    rows = {cols[1]: cols for cols in (line.split() for line in lines[1:-1])}
    assert lines[-1] == "(SHARE to P99_MS: the last 60 s, per model)"
    assert rows["1"][:6] == ["mlp", "1", "AVAILABLE", "stable", "90.0%", "90.0%"]
    assert rows["2"][:6] == ["mlp", "2", "AVAILABLE", "canary", "10.0%", "10.0%"]
    # Counts as the server reports them (whether a client error counts against the version
    # it was pinned to is the server's policy, not the CLI's).
    summary = {v["version"]: v for v in httpx.get(live.http + "/v1/models/mlp/metrics", timeout=10).json()["versions"]}
    for v in ("1", "2"):
        recent = summary[v]["recent"]
        assert rows[v][7] == str(recent["requests"]) and rows[v][8] == str(recent["errors"])
    assert int(rows["1"][7]) + int(rows["2"][7]) in (40, 41)
    if summary["2"]["errors"]:
        assert rows["2"][9] == f"{100 * summary['2']['error_rate']:.1f}%"
    assert float(rows["1"][6].rstrip("%")) + float(rows["2"][6].rstrip("%")) == pytest.approx(100, abs=0.2)
    assert rows["1"][8:10] == ["0", "0.0%"]
    assert float(rows["1"][11]) >= float(rows["1"][10]) > 0  # p99 >= p50, in ms
    # A routing change starts the summary's window afresh; the row still counts the recent
    # requests its SHARE is computed from (it showed REQUESTS 0 beside SHARE 90%).
    r = httpx.put(live.http + "/v1/models/mlp/routing", headers={"authorization": f"Bearer {TOKEN}"},
                  json={"labels": {"stable": 1, "canary": 2}, "weights": {"stable": 80, "canary": 20},
                        "sticky": {"header": "x-user-id"}}, timeout=10)
    assert r.status_code == 200, r.text
    rc, out, err = run(capsys, "status", "--url", live.http)
    after = {cols[1]: cols for cols in (line.split() for line in out.splitlines()[1:-1])}
    assert after["1"][6] == rows["1"][6] and after["1"][7] == rows["1"][7] != "0", (rows, after)
    rc, out, err = run(capsys, "status", "--url", live.http, "--model", "nosuch")
    assert rc == 1 and err.count("\n") == 1 and "no model named 'nosuch'" in err


def test_status_shows_failed_reason(make_repo, serve, capsys):
    import torch
    from safetensors.torch import save_file

    repo = make_repo({"mlp": {1: "st1"}})
    (repo / "mlp" / "2").mkdir()
    save_file({"bogus": torch.zeros(2)}, str(repo / "mlp" / "2" / "model.safetensors"))
    srv = serve(repo)
    assert srv.wait_state("mlp", 2, VersionState.FAILED)
    rc, out, err = run(capsys, "status", "--url", srv.http)
    assert rc == 0, err
    assert any(line.split()[:3] == ["mlp", "2", "FAILED"] for line in out.splitlines())
    assert "mlp v2 FAILED: weights do not fit the architecture" in out
    # An invalid model.yaml shows too (the versions keep serving on the last good one).
    (repo / "mlp" / "model.yaml").write_text("max_batchsize: 3\n")
    assert srv.wait_for(lambda: srv.core.manager.view().model("mlp").spec_error is not None, 30)
    rc, out, err = run(capsys, "status", "--url", srv.http)
    assert ("  mlp model.yaml: serving the last good model.yaml; the file now has an error: unknown field "
            "'max_batchsize' in mlp/model.yaml; did you mean 'max_batch_size'?") in out.splitlines(), out


def test_route_changes_what_is_named_and_keeps_the_rest(live, capsys):
    rc, out, err = run(capsys, "route", "mlp", "stable=70", "canary=30", "--url", live.http, "--token", TOKEN)
    assert rc == 0, err
    assert "effective: v1=70.0% v2=30.0%" in out
    r = routing(live)
    assert r["weights"] == {"stable": 70, "canary": 30}
    assert r["labels"] == {"stable": 1, "canary": 2} and r["sticky"] == {"header": "x-user-id"}

    rc, out, err = run(capsys, "route", "mlp", "--label", "canary=1", "--url", live.http, "--token", TOKEN)
    assert rc == 0, err
    assert routing(live)["labels"] == {"stable": 1, "canary": 1}
    assert "effective: v1=100.0%" in out

    rc, out, err = run(capsys, "route", "mlp", "--drop", "canary", "--url", live.http, "--token", TOKEN)
    assert rc == 0, err
    assert routing(live)["weights"] == {"stable": 70}


def test_route_refusals_are_one_line_and_change_nothing(live, capsys, monkeypatch):
    before = routing(live)
    cases = [
        (("route", "mlp", "canary=50"), 1, "401"),                                   # no token
        (("route", "mlp", "canary=50", "--token", "wrong"), 1, "401"),
        (("route", "mlp", "nosuch=5", "--token", TOKEN), 1, "400"),                 # server validation
        (("route", "mlp", "canary=-1", "--token", TOKEN), 2, "finite number >= 0"),
        (("route", "mlp", "canary=abc", "--token", TOKEN), 2, "expected a number"),
        (("route", "mlp", "--label", "canary=two", "--token", TOKEN), 2, "expected a version number"),
        (("route", "mlp", "--drop", "nosuch", "--token", TOKEN), 2, "no weight named 'nosuch'"),
        (("route", "mlp", "--token", TOKEN), 2, "nothing to change"),
        (("route", "nosuch", "a=1", "--token", TOKEN), 1, "404"),
    ]
    monkeypatch.delenv("SPLITSERVE_TOKEN", raising=False)
    for argv, code, needle in cases:
        rc, out, err = run(capsys, *argv, "--url", live.http)
        assert rc == code, (argv, rc, err)
        assert err.count("\n") == 1 and err.startswith("splitserve route: ") and needle in err, (argv, err)
    assert routing(live) == before


def test_publish_next_free_version_is_loaded_and_never_overwritten(live, capsys, version_cache):
    repo = live.settings.repository.path
    rc, out, err = run(capsys, "publish", str(version_cache / "st3"), "--repository", str(repo), "--model", "mlp")
    assert rc == 0, err
    assert out.strip() == f"published mlp version 3 at {repo / 'mlp' / '3'}"
    assert live.wait_state("mlp", 3, VersionState.AVAILABLE)
    assert not [p for p in (repo / "mlp").iterdir() if p.name.startswith(".")]  # no temp left behind

    before = (repo / "mlp" / "3" / "model.safetensors").read_bytes()
    rc, out, err = run(capsys, "publish", str(version_cache / "st1"), "--repository", str(repo),
                       "--model", "mlp", "--version", "3")
    assert rc == 1 and "already exists" in err and err.count("\n") == 1
    assert (repo / "mlp" / "3" / "model.safetensors").read_bytes() == before
    assert not [p for p in (repo / "mlp").iterdir() if p.name.startswith(".")]

    rc, out, err = run(capsys, "publish", str(version_cache / "st1"), "--repository", str(repo),
                       "--model", "mlp", "--version", "7")
    assert rc == 0 and (repo / "mlp" / "7" / "model.safetensors").is_file()


def test_publish_wait_reports_available_or_failed(live, capsys, version_cache, tmp_path):
    import torch
    from safetensors.torch import save_file

    repo = live.settings.repository.path
    rc, out, err = run(capsys, "publish", str(version_cache / "st3"), "--repository", str(repo),
                       "--model", "mlp", "--wait", "--url", live.http, "--timeout", "60")
    assert rc == 0, err
    published, result = out.splitlines()
    assert published == f"published mlp version 3 at {repo / 'mlp' / '3'}"
    assert result.startswith("mlp version 3 AVAILABLE after ") and result.endswith("s"), result
    assert live.available("mlp") and 3 in live.available("mlp")  # the server agrees

    bogus = tmp_path / "bogus"
    bogus.mkdir()
    save_file({"bogus": torch.zeros(2)}, str(bogus / "model.safetensors"))
    rc, out, err = run(capsys, "publish", str(bogus), "--repository", str(repo), "--model", "mlp",
                       "--wait", "--url", live.http, "--timeout", "60")
    assert rc == 1 and out.strip() == f"published mlp version 4 at {repo / 'mlp' / '4'}"
    assert err.startswith("splitserve publish: mlp version 4 FAILED after ") and err.count("\n") == 1, err
    assert "weights do not fit the architecture" in err
    assert live.wait_state("mlp", 4, VersionState.FAILED, timeout=1)


def test_publish_wait_times_out_and_bad_url_copies_nothing(live, capsys, version_cache, tmp_path):
    # A repository this server does not watch: it never sees the version, so the wait ends
    # at its deadline with the last state it knew.
    other = tmp_path / "other"
    other.mkdir()
    rc, out, err = run(capsys, "publish", str(version_cache / "st1"), "--repository", str(other),
                       "--model", "elsewhere", "--wait", "--url", live.http, "--timeout", "1")
    assert rc == 1 and out.startswith("published elsewhere version 1")
    assert err == ("splitserve publish: elsewhere version 1 not AVAILABLE within 1s "
                   "(last state: not seen by the server yet)\n")

    rc, out, err = run(capsys, "publish", str(version_cache / "st1"), "--repository", str(other),
                       "--model", "m2", "--wait", "--url", "ftp://x")
    assert rc == 2 and "--url must start with http://" in err and not (other / "m2").exists()
    with pytest.raises(SystemExit) as e:
        main(["publish", str(version_cache / "st1"), "--repository", str(other), "--model", "m3",
              "--wait", "--timeout", "0"])
    assert e.value.code == 2 and "positive number of seconds" in capsys.readouterr().err


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_publish_refusals(tmp_path, capsys, version_cache):
    repo = tmp_path / "repo"
    repo.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (("publish", str(tmp_path / "missing"), "--repository", str(repo), "--model", "m"), 1, "is not a directory"),
        (("publish", str(empty), "--repository", str(repo), "--model", "m"), 1, "not a version folder"),
        (("publish", str(version_cache / "st1"), "--repository", str(tmp_path / "norepo"), "--model", "m"), 1,
         "repository"),
        (("publish", str(version_cache / "st1"), "--repository", str(repo), "--model", "../evil"), 2,
         "plain folder name"),
        (("publish", str(version_cache / "st1"), "--repository", str(repo), "--model", "m", "--version", "007"), 2,
         "positive integer"),
    ]
    for argv, code, needle in cases:
        rc, out, err = run(capsys, *argv)
        assert rc == code and needle in err and err.count("\n") == 1, (argv, rc, err)
    assert list(repo.iterdir()) == []


def test_experiment_without_experiments_support(live, capsys):
    answer = httpx.get(live.http + "/v1/models/mlp/experiment", timeout=10)
    rc, out, err = run(capsys, "experiment", "mlp", "status", "--url", live.http)
    if answer.status_code == 404 and "no such endpoint" in answer.text:
        assert rc == 1 and "no experiments endpoint" in err and err.count("\n") == 1
    else:  # a server with experiments: the status line is printed
        assert rc == 0 and out.startswith("experiment mlp: state "), (out, err)


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_unreachable_server_and_bad_url(capsys):
    rc, out, err = run(capsys, "status", "--url", "http://127.0.0.1:1")
    assert rc == 1 and "cannot reach http://127.0.0.1:1" in err and err.count("\n") == 1
    rc, out, err = run(capsys, "status", "--url", "ftp://example")
    assert rc == 2 and "--url must start with http://" in err


def test_real_process_entry_point(live):
    env = {**os.environ, "SPLITSERVE_URL": live.http, "SPLITSERVE_TOKEN": TOKEN}
    p = subprocess.run([sys.executable, "-m", "runtime", "route", "mlp", "canary=20"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert routing(live)["weights"]["canary"] == 20
    for sub in ("status", "route", "publish", "experiment"):
        h = subprocess.run([sys.executable, "-m", "runtime", sub, "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert h.returncode == 0 and h.stdout.startswith(f"usage: splitserve {sub}"), h.stderr


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_experiment_report_lines():
    """The shape GET /v1/models/{m}/experiment answers (experiments/report.py on its branch)."""
    from runtime.cli.ops import format_experiment

    doc = {"state": "rolled_back", "step": 1, "steps": [5, 25, 50, 100], "candidate_weight": 0.0,
           "control": {"ref": "stable", "version": 1, "requests": 950, "errors": 1, "error_rate": 0.001},
           "candidate": {"ref": "canary", "version": 2, "requests": 40, "errors": 31, "error_rate": 0.775},
           "guardrails": {"errors": {"max_ratio": 1.5, "evidence": 1432.7, "threshold": 20.0, "alarm": True},
                          "latency": {"quantile": 0.99, "max_ratio": 1.2, "slow": 4, "judged": 900,
                                      "latency_threshold_s": 0.0031, "evidence": 0.8, "threshold": 20.0,
                                      "alarm": False}},
           "outcomes": [{"metric": "click", "kind": "binary", "goal": "increase",
                         "control": {"n": 950, "mean": 0.1}, "candidate": {"n": 40, "mean": 0.125},
                         "difference": 0.025, "interval": [-0.08, 0.13], "verdict": "inconclusive"},
                        {"metric": "spend", "control": {"n": 0, "mean": 0.0}}],
           "srm": {"p_value": 0.42, "flagged": False},
           "decisions": [{"time": 1_700_000_000.0, "action": "rollback", "by": "auto", "step": 0,
                          "candidate_weight": 0.0, "reason": "errors: canary 31 of 40 errors at weight 5%"}]}
    lines = format_experiment("mlp", doc)
    assert lines[0] == "experiment mlp: state rolled_back, step 1, candidate weight 0.0"
    assert "  control stable (v1): 950 requests, 1 errors" in lines
    assert "  candidate canary (v2): 40 requests, 31 errors" in lines
    assert ("  guardrail errors: ALARM: canary error rate vs 1.5 x stable's error rate; "
            "evidence 1.43e+03 (alarm at 20)") in lines
    assert ("  guardrail latency: ok: canary p99 vs 1.2 x stable's p99 = 3.1 ms: 4 of 900 canary "
            "requests slower; evidence 0.8 (alarm at 20)") in lines
    assert ("  outcome click (increase): stable 0.1 (n=950), canary 0.125 (n=40); difference "
            "+0.025 [-0.08, 0.13]; verdict inconclusive") in lines
    assert "  outcome spend: stable 0 (n=0), canary -; difference not enough data yet; verdict -" in lines
    assert "  sample ratio: p=0.42" in lines
    assert lines[-1].endswith(" rollback (auto): errors: canary 31 of 40 errors at weight 5%")
    assert format_experiment("mlp", {"state": "none", "decisions": []}) == [
        "experiment mlp: state none, step -, candidate weight -"]
