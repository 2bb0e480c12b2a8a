"""Shared fixtures: fresh model repositories built from real torch models, and live
servers (uvicorn + grpc.aio on loopback, port 0) running in a background thread."""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import make_example_models as mk  # noqa: E402

from runtime.config.settings import Settings  # noqa: E402
from runtime.types import VersionState  # noqa: E402

MLP_YAML = (ROOT / "model_repository" / "mlp" / "model.yaml").read_text()

# ---- the unit tier (`pytest -m unit`): no server process, no socket, not slow -----------
# Folders that test a pure library (router/ and experiments/ import nothing of runtime,
# protocol/ holds the codecs: wire <-> types) cannot start a server: their tests are unit
# unless marked slow (minutes of simulation); elsewhere a module (`pytestmark`) or a test
# says `unit` itself.
UNIT_FOLDERS = {"router", "experiments", "protocol"}


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        folder = item.path.parent
        if folder.parent == here and folder.name in UNIT_FOLDERS \
                and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tests_bind_no_socket(request, monkeypatch):
    """The unit tier's promise, kept: a test marked unit that binds an IP socket fails."""
    if request.node.get_closest_marker("unit") is None:
        return
    real = socket.socket.bind

    def bind(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"a test marked unit bound {address}: it belongs to another tier")
        return real(self, address)

    monkeypatch.setattr(socket.socket, "bind", bind)


@pytest.fixture(scope="session")
def version_cache(tmp_path_factory) -> Path:
    """Version folders built once per session (pt2 export takes a second or two)."""
    base = tmp_path_factory.mktemp("versions")
    mk.write_safetensors(base / "st1", seed=1)
    mk.write_safetensors(base / "st2", seed=2)
    mk.write_safetensors(base / "st3", seed=3)
    mk.write_pt2(base / "pt2_2", seed=2)
    mk.write_torchscript(base / "ts4", seed=4)
    return base


def expected_output(seed: int, x):
    """What a version built with `seed` answers for input x (a torch tensor)."""
    import torch
    with torch.inference_mode():
        return mk.make_mlp(seed)(x)


@pytest.fixture
def make_repo(tmp_path, version_cache):
    """make_repo({"mlp": {1: "st1", 2: "pt2_2"}}, yaml={"mlp": "..."}) -> repository path."""

    def make(models: dict[str, dict[int, str]], yaml: dict[str, str] | None = None) -> Path:
        root = tmp_path / "repo"
        root.mkdir(exist_ok=True)
        for name, versions in models.items():
            mk.write_model_folder(root / name, (yaml or {}).get(name, MLP_YAML))
            for v, src in versions.items():
                shutil.copytree(version_cache / src, root / name / str(v))
        return root

    return make


class LiveServer:
    """A real splitserve Server on its own event loop thread."""

    def __init__(self, settings: Settings):
        from runtime.server.app import Server

        self.settings = settings
        self.loop = asyncio.new_event_loop()
        self.server = Server(settings)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.call(self.server.start(), timeout=120)
        self.core = self.server.core
        self.http = f"http://127.0.0.1:{self.server.http_port}"
        self.grpc = f"127.0.0.1:{self.server.grpc_port}" if self.server.grpc_port else None

    def call(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def on_loop(self, fn, *args, timeout: float = 30):
        async def run():
            return fn(*args)
        return self.call(run(), timeout)

    def wait_state(self, model: str, version: int, state: VersionState | None, timeout: float = 60) -> bool:
        m = self.core.manager
        return self.call(m.wait_until(lambda: m.state_of(model, version) == state, timeout), timeout + 5)

    def wait_for(self, predicate, timeout: float = 60) -> bool:
        """Wait for a predicate on server state; it runs ON the loop, so it must not block."""
        return self.call(self.core.manager.wait_until(predicate, timeout), timeout + 5)

    def available(self, model: str) -> list[int]:
        mv = self.core.manager.view().model(model)
        return list(mv.available) if mv else []

    def stop(self):
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.stop(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


@pytest.fixture
def serve():
    """serve(repo, config=None, **overrides) -> LiveServer; stopped after the test."""
    servers = []

    def start(repo: Path, config: Path | None = None, token: str | None = None,
              quiet_s: float = 0.3, **repo_overrides) -> LiveServer:
        s = Settings()
        s.server.http_port = 0
        s.server.grpc_port = 0
        s.server.token = token
        s.server.drain_timeout_s = 5
        s.repository.path = repo
        s.repository.quiet_s = quiet_s
        for k, v in repo_overrides.items():
            if hasattr(s.repository, k):
                setattr(s.repository, k, v)
            elif hasattr(s.limits, k):
                setattr(s.limits, k, v)
            elif hasattr(s.server, k):  # e.g. grpc_threads
                setattr(s.server, k, v)
            else:
                raise AttributeError(k)
        s.config_path = config
        srv = LiveServer(s)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.stop()


def loaded_packages(modules: str) -> set[str]:
    """The top-level packages a fresh interpreter holds after `import <modules>` (from the
    checkout): what an import really drags in, which an AST walk of one file cannot see."""
    import subprocess
    code = f"import sys, {modules}; print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll a condition on a live system (a state, not a sleep) until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
