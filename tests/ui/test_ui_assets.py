"""The page's static files: every one ships in the wheel (pyproject package-data), each is
served with its type and the page's security headers, nothing outside the folder is
reachable, and the vendored chart library is the pinned version with its license."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import httpx
import pytest

from runtime.types import VersionState

ROOT = Path(__file__).resolve().parents[2]
UI = ROOT / "runtime" / "server" / "ui"


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_every_ui_file_is_package_data():
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["runtime.server"]
    files = [p.relative_to(UI.parent).as_posix() for p in UI.rglob("*") if p.is_file()]
    assert "ui/index.html" in files
    missing = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)]
    assert not missing, f"not shipped by [tool.setuptools.package-data]: {missing}"


@pytest.mark.unit  # no server, no socket: the rest of this module serves
def test_vendored_uplot_is_pinned_and_licensed():
    index = (UI / "index.html").read_text()
    refs = set(re.findall(r'(?:src|href)="(vendor/[^"]+)"', index))
    assert refs, "index.html loads nothing from vendor/"
    for ref in refs:
        assert (UI / ref).is_file(), ref
    (folder,) = {ref.split("/")[1] for ref in refs}
    version = folder.removeprefix("uplot-")
    assert "MIT License" in (UI / "vendor" / folder / "LICENSE").read_text()
    assert f"uPlot {version}" in (UI / "vendor" / folder / "SOURCE").read_text()
    assert not re.search(r'(?:src|href)="(?:https?:)?//', index), "no CDN: every asset is local"


def test_served_with_types_and_headers_and_nothing_else(make_repo, serve):
    srv = serve(make_repo({"mlp": {1: "st1"}}))
    assert srv.wait_state("mlp", 1, VersionState.AVAILABLE)
    with httpx.Client(base_url=srv.http, timeout=10) as http:
        r = http.get("/ui")
        assert r.status_code == 307 and r.headers["location"] == "ui/"
        page = http.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "connect-src 'self'" in csp
        assert page.headers["x-content-type-options"] == "nosniff"
        for path, kind in (("app.js", "text/javascript"), ("style.css", "text/css"),
                           ("vendor/uplot-1.6.32/uPlot.iife.min.js", "text/javascript")):
            a = http.get("/ui/" + path)
            assert a.status_code == 200 and a.headers["content-type"].startswith(kind), path
            assert a.content == (UI / path).read_bytes()
        for bad in ("/ui/nosuch.js", "/ui/%2e%2e/rest_ui.py", "/ui/..%2frest_ui.py", "/ui/../app.py",
                    "/ui/%2e%2e/%2e%2e/%2e%2e/pyproject.toml"):
            r = http.get(bad)
            assert r.status_code == 404, (bad, r.status_code)
            assert "rest_ui" not in r.text or "no such file" in r.json()["error"]
