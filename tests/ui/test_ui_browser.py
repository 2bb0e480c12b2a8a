"""The /ui page in a real headless Chromium against a live server: it shows the versions,
their state (with the reason when FAILED), labels, weights and observed shares; it is
read-only until a token is typed; a weight changed through its controls reaches the
routing API; a wrong token changes nothing. A screenshot is saved under the test's tmp dir.

Skipped when chromium or chromedriver is missing, unless SPLITSERVE_REQUIRE_BROWSER=1
(.ci/run sets it, so CI fails instead of skipping)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from runtime.types import VersionState

pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

TOKEN = "ui-test-token"
CONFIG = """models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 90, canary: 10}
    sticky: {header: x-user-id}
"""
BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.25] * 64}]}


def _browser_paths() -> tuple[str, str] | None:
    binary = next((p for n in ("chromium", "chromium-browser", "google-chrome")
                   if (p := shutil.which(n))), None)
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture
def browser(tmp_path, monkeypatch):
    monkeypatch.setenv("SE_AVOID_STATS", "true")  # selenium: no telemetry, even if its manager runs
    found = _browser_paths()
    if found is None:
        if os.environ.get("SPLITSERVE_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromedriver are required here (SPLITSERVE_REQUIRE_BROWSER=1)")
        pytest.skip("chromium / chromedriver not installed")
    binary, driver_path = found
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1500,1300", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=driver_path))
    try:
        yield drv
    finally:
        drv.quit()


def _broken_version(path: Path) -> None:
    """A complete safetensors file whose tensors do not fit model.py: loads, then FAILS."""
    import torch
    from safetensors.torch import save_file

    path.mkdir()
    save_file({"not_a_layer.weight": torch.zeros(3)}, str(path / "model.safetensors"))


def _wait(drv, predicate, timeout: float = 30, what: str = "condition"):
    return WebDriverWait(drv, timeout, poll_frequency=0.1,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda d: predicate(d), message=f"timed out waiting for {what}")


TABLE_JS = """
const out = {};
for (const tr of document.querySelectorAll('#model-mlp table.versions-table tbody tr')) {
  const cell = (f) => { const td = tr.querySelector('td[data-field="' + f + '"]'); return td ? td.textContent : null; };
  const reason = tr.querySelector('.reason');
  out[tr.dataset.version] = {text: tr.innerText, weight: cell('weight'), effective: cell('effective'),
                             observed: cell('observed'), reason: reason ? reason.textContent : null};
}
return out;
"""


def _table(drv) -> dict:
    """version -> {text, weight, effective, observed, reason} of the versions table, as shown."""
    return drv.execute_script(TABLE_JS)


def test_page_shows_split_and_changes_a_weight(make_repo, serve, tmp_path, browser):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    _broken_version(repo / "mlp" / "3")
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(CONFIG)
    srv = serve(repo, config=cfg, token=TOKEN)
    assert srv.wait_state("mlp", 3, VersionState.FAILED)
    assert srv.wait_state("mlp", 1, VersionState.AVAILABLE) and srv.wait_state("mlp", 2, VersionState.AVAILABLE)
    with httpx.Client(base_url=srv.http, timeout=30) as http:
        for i in range(60):  # sticky users: both versions see traffic, shares become observed
            r = http.post("/v2/models/mlp/infer", json=BODY, headers={"x-user-id": f"user-{i}"})
            assert r.status_code == 200, r.text

        drv = browser
        drv.get(srv.http + "/ui")
        assert drv.current_url.endswith("/ui/")
        # The table is rebuilt on every poll: read it in one script call (atomic in the page).
        rows = _wait(drv, lambda d: (t := _table(d)) and len(t) == 3 and t, what="the versions table")
        assert set(rows) == {"1", "2", "3"}
        assert "AVAILABLE" in rows["1"]["text"] and "stable" in rows["1"]["text"]
        assert "AVAILABLE" in rows["2"]["text"] and "canary" in rows["2"]["text"]
        assert "FAILED" in rows["3"]["text"]
        assert "weights do not fit the architecture" in rows["3"]["reason"], rows["3"]
        assert rows["1"]["weight"] == "90.0%" and rows["2"]["weight"] == "10.0%"
        assert all(rows[v]["observed"].endswith("%") for v in ("1", "2")), rows
        # The charts appear once a couple of polls have been recorded.
        _wait(drv, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model-mlp .chart canvas")) == 3,
              what="three charts")

        # The experiment block follows the API: hidden while it answers 404.
        exp = http.get("/v1/models/mlp/experiment")
        block = drv.find_element(By.CSS_SELECTOR, "#model-mlp .experiment")
        assert block.is_displayed() == (exp.status_code == 200 and exp.json().get("state") != "none")

        # Read-only without a token.
        canary = drv.find_element(By.CSS_SELECTOR, '#model-mlp input[data-weight="canary"]')
        assert not canary.is_enabled()

        # A wrong token: the server refuses, the page says so, nothing changes.
        _unlock(drv, "wrong-token")
        _set_weight(drv, "canary", "50")
        drv.find_element(By.CSS_SELECTOR, "#model-mlp button.apply").click()
        _wait(drv, lambda d: "not applied (401)" in _result(d), what="the 401 message")
        assert http.get("/v1/models/mlp/routing").json()["weights"] == {"stable": 90, "canary": 10}

        # The right token: the weights reach the routing API and the page shows the result.
        _unlock(drv, TOKEN)
        _set_weight(drv, "stable", "70")
        _set_weight(drv, "canary", "30")
        drv.find_element(By.CSS_SELECTOR, "#model-mlp button.apply").click()
        _wait(drv, lambda d: _result(d).startswith("applied"), what="the applied message")
        routing = http.get("/v1/models/mlp/routing").json()
        assert routing["weights"] == {"stable": 70, "canary": 30}
        assert routing["labels"] == {"stable": 1, "canary": 2} and routing["sticky"] == {"header": "x-user-id"}
        _wait(drv, lambda d: _table(d).get("2", {}).get("weight") == "30.0%", what="the new weight in the table")
        _wait(drv, lambda d: "routing changed" in d.find_element(By.CSS_SELECTOR, "#model-mlp .events").text,
              what="the routing event")

        shot = tmp_path / "ui.png"
        assert drv.save_screenshot(str(shot)) and shot.stat().st_size > 20_000
        print(f"screenshot: {shot}")
        # Script errors and CSP violations fail the test; Chromium also logs the expected
        # answers (401 for the wrong token, 404 while the server has no experiments).
        expected = ("/v1/models/mlp/routing", "/v1/models/mlp/experiment")
        errors = [e for e in drv.get_log("browser") if e["level"] == "SEVERE"
                  and not (e["source"] == "network" and any(p in e["message"] for p in expected))]
        assert not errors, errors


def test_label_move_through_the_page(make_repo, serve, tmp_path, browser):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(CONFIG)
    srv = serve(repo, config=cfg)  # no token configured: the page asks for none
    assert srv.wait_state("mlp", 2, VersionState.AVAILABLE)
    browser.get(srv.http + "/ui/")
    _wait(browser, lambda d: d.find_element(By.CSS_SELECTOR, '#model-mlp button.apply').is_enabled(),
          what="the controls, on without a token")
    assert not browser.find_element(By.ID, "auth").is_displayed()
    assert browser.find_element(By.ID, "no-token").text == "No token on this server: controls are on."
    from selenium.webdriver.support.ui import Select
    Select(browser.find_element(By.CSS_SELECTOR, '#model-mlp select[data-label="stable"]')).select_by_value("2")
    browser.find_element(By.CSS_SELECTOR, "#model-mlp button.apply").click()
    _wait(browser, lambda d: _result(d).startswith("applied"), what="the applied message")
    with httpx.Client(base_url=srv.http, timeout=30) as http:
        assert http.get("/v1/models/mlp/routing").json()["labels"] == {"stable": 2, "canary": 2}


EXPERIMENT = """models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 50, canary: 50}
    sticky: {header: x-user-id}
    experiment:
      control: stable
      candidate: canary
      steps: [50, 100]
      interval_s: 0.3
      min_requests: 100000
      min_duration_s: 0
      guardrails: {errors: {max_ratio: 1.5}, latency: {quantile: 0.99, max_ratio: 1.2}}
      outcomes: [{metric: click, kind: binary, goal: increase}]
"""

OUTCOME_JS = """
const row = document.querySelector('#model-mlp table.outcomes tr[data-outcome="click"]');
const g = document.querySelector('#model-mlp table.guardrails tr[data-guardrail="latency"] td[data-field="compared"]');
const e = document.querySelector('#model-mlp table.guardrails tr[data-guardrail="errors"] td[data-field="compared"]');
if (!row || !g || !e) return null;
const cell = (f) => row.querySelector('td[data-field="' + f + '"]').textContent;
return {control: cell('control'), candidate: cell('candidate'), difference: cell('difference'),
        verdict: cell('verdict'), latency: g.textContent, errors: e.textContent};
"""


def test_the_experiment_result_and_guardrails_in_words_on_the_page(make_repo, serve, tmp_path, browser):
    repo = make_repo({"mlp": {1: "st1", 2: "st2"}})
    cfg = tmp_path / "splitserve.yaml"
    cfg.write_text(EXPERIMENT)
    srv = serve(repo, config=cfg)
    assert srv.wait_state("mlp", 2, VersionState.AVAILABLE)
    with httpx.Client(base_url=srv.http, timeout=30) as http:
        assert _until(lambda: http.get("/v1/models/mlp/experiment").json()["decisions"], "the start")
        items = []
        for i in range(80):
            r = http.post("/v2/models/mlp/infer", json=BODY, headers={"x-user-id": f"user-{i}"})
            assert r.status_code == 200, r.text
            v = r.headers["x-model-version"]
            items.append({"request_id": r.headers["x-request-id"], "metric": "click",
                          "value": 1 if (v == "2" or i % 3 == 0) else 0})
        r = http.post("/v1/models/mlp/feedback", json={"items": items})
        assert r.status_code == 200 and r.json()["matched"] == 80, r.text

        def folded():  # feedback is folded in at the next interval
            o = http.get("/v1/models/mlp/experiment").json()["outcomes"]
            return o if o and o[0]["control"]["n"] + o[0]["candidate"]["n"] == 80 else None
        outcome = _until(folded, "the feedback folded into the outcome")[0]
        exp = http.get("/v1/models/mlp/experiment").json()

    num = lambda v: f"{v:.4g}"  # noqa: E731  (the page: +v.toPrecision(4))
    browser.get(srv.http + "/ui/")
    shown = _wait(browser, lambda d: d.execute_script(OUTCOME_JS), what="the outcome and guardrail rows")
    assert shown["control"] == f"{num(outcome['control']['mean'])} (n={outcome['control']['n']})", shown
    assert shown["candidate"] == f"{num(outcome['candidate']['mean'])} (n={outcome['candidate']['n']})", shown
    assert shown["verdict"] == outcome["verdict"]
    if outcome["difference"] is None:
        assert shown["difference"] == "not enough data yet"
    else:
        low, high = outcome["interval"]
        sign = "+" if outcome["difference"] > 0 else ""
        assert shown["difference"] == f"{sign}{num(outcome['difference'])} [{num(low)}, {num(high)}]", shown
    assert shown["latency"].startswith("canary p99 vs 1.2 x stable's p99"), shown
    assert shown["errors"].startswith("canary error rate vs 1.5 x stable's error rate; evidence "), shown
    assert exp["guardrails"]["latency"]["max_ratio"] == 1.2
    # No token on this server: the experiment's buttons are on without typing one.
    assert browser.find_element(By.CSS_SELECTOR, "#model-mlp button.exp-pause").is_enabled()


def _until(fn, what: str, timeout: float = 30):
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.1)  # polling a state over HTTP, not waiting for time to pass
    raise AssertionError(f"timed out waiting for {what}")


def _unlock(drv, token: str) -> None:
    box = drv.find_element(By.ID, "token")
    box.clear()
    box.send_keys(token)
    drv.find_element(By.ID, "unlock").click()
    _wait(drv, lambda d: d.find_element(By.CSS_SELECTOR, '#model-mlp button.apply').is_enabled(),
          what="the controls to unlock")


def _set_weight(drv, key: str, value: str) -> None:
    box = drv.find_element(By.CSS_SELECTOR, f'#model-mlp input[data-weight="{key}"]')
    box.clear()
    box.send_keys(value)


def _result(drv) -> str:
    return drv.find_element(By.CSS_SELECTOR, '#model-mlp [data-result="routing"]').text
