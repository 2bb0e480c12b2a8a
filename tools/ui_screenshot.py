"""Regenerate docs/ui.png: serve a copy of the bundled repository on loopback, run a short
canary session (traffic, a weight change, a version published and loaded), and screenshot
/ui in headless Chromium.

    .venv/bin/python tools/ui_screenshot.py [--out docs/ui.png] [--seconds 45]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

CONFIG = """models:
  mlp:
    labels: {stable: 1, canary: 2}
    weights: {stable: 90, canary: 10}
    sticky: {header: x-user-id}
    shadow: {target: canary, percent: 20}
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "ui.png")
    ap.add_argument("--seconds", type=float, default=45)
    args = ap.parse_args()

    import httpx
    from selenium import webdriver

    import make_example_models as mk
    from runtime.server.app import Server
    from runtime.config.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="splitserve-ui-"))
    repo = work / "repo"
    shutil.copytree(ROOT / "model_repository", repo)
    (work / "splitserve.yaml").write_text(CONFIG)
    s = Settings()
    s.server.http_port = s.server.grpc_port = 0
    s.repository.path = repo
    s.repository.quiet_s = 0.3
    s.config_path = work / "splitserve.yaml"
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    srv = Server(s)
    asyncio.run_coroutine_threadsafe(srv.start(), loop).result(120)
    base = f"http://127.0.0.1:{srv.http_port}"
    stop = threading.Event()

    def traffic():
        body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [0.5] * 64}]}
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                http.post("/v2/models/mlp/infer", json=body, headers={"x-user-id": f"u{random.randrange(10**6)}"})
                time.sleep(0.01)

    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or shutil.which("google-chrome") or ""
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1250"):
        opts.add_argument(a)
    # Explicit paths: Selenium Manager (which downloads drivers) is never started.
    drv = webdriver.Chrome(options=opts, service=Service(executable_path=shutil.which("chromedriver")))
    t = threading.Thread(target=traffic, daemon=True)
    try:
        t.start()
        drv.get(base + "/ui")
        time.sleep(args.seconds / 3)
        httpx.put(base + "/v1/models/mlp/routing", timeout=30, json={
            "labels": {"stable": 1, "canary": 2}, "weights": {"stable": 70, "canary": 30},
            "sticky": {"header": "x-user-id"}, "shadow": {"target": "canary", "percent": 20}})
        time.sleep(args.seconds / 3)
        mk.write_safetensors(repo / "mlp" / ".3.tmp", seed=3)
        (repo / "mlp" / ".3.tmp").rename(repo / "mlp" / "3")
        time.sleep(args.seconds / 3)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(args.out))
        print(f"wrote {args.out}")
    finally:
        stop.set()
        t.join(5)
        drv.quit()
        asyncio.run_coroutine_threadsafe(srv.stop(), loop).result(60)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
