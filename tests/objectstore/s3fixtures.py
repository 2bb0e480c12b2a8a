"""Fixtures for tests/objectstore (imported by the test modules: a conftest here would shadow
the top-level one). A real S3-compatible server (moto's, in this process) on loopback port 0,
behind a WSGI wrapper that records every LIST request, and a fresh bucket per test."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from pathlib import Path

import pytest

boto3 = pytest.importorskip("boto3")
from moto.moto_server.werkzeug_app import (DomainDispatcherApplication,  # noqa: E402
                                           MotoRequestHandler, create_backend_app)
from werkzeug.serving import make_server  # noqa: E402


class S3Server:
    def __init__(self):
        self.lists: list[float] = []  # monotonic times of ListObjects requests
        self._lock = threading.Lock()
        app = DomainDispatcherApplication(create_backend_app)

        def counting(environ, start_response):
            path = environ.get("PATH_INFO", "")
            if (environ["REQUEST_METHOD"] == "GET" and path.strip("/") and "/" not in path.strip("/")
                    and not path.startswith("/moto-api")
                    and "botocore" not in environ.get("HTTP_USER_AGENT", "")):  # the tests' own calls
                with self._lock:
                    self.lists.append(time.monotonic())  # GET /bucket?...: a listing
            return app(environ, start_response)

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._srv = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=MotoRequestHandler)
        self.endpoint = f"http://127.0.0.1:{self._srv.server_address[1]}"
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()

    def lists_since(self, t: float) -> int:
        with self._lock:
            return sum(1 for x in self.lists if x >= t)

    def enforce_auth(self, on: bool) -> None:
        """On: only IAM-known keys pass (moto's auth check); off: any key passes."""
        import urllib.request
        urllib.request.urlopen(urllib.request.Request(
            self.endpoint + "/moto-api/reset-auth", data=b"0" if on else b"inf", method="POST",
            headers={"Content-Type": "text/plain"})).read()

    def stop(self):
        self._srv.shutdown()
        self._thread.join(5)


class Bucket:
    def __init__(self, client, name: str, server: S3Server):
        self.client, self.name, self.server = client, name, server

    def url(self, prefix: str = "models") -> str:
        return f"s3://{self.name}/{prefix}"

    def put(self, key: str, body: bytes | Path) -> None:
        data = body.read_bytes() if isinstance(body, Path) else body
        self.client.put_object(Bucket=self.name, Key=key, Body=data)

    def put_dir(self, folder: Path, prefix: str) -> None:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                self.put(f"{prefix}/{p.relative_to(folder).as_posix()}", p)

    def keys(self, prefix: str = "") -> list[str]:
        out = self.client.list_objects_v2(Bucket=self.name, Prefix=prefix)
        return [o["Key"] for o in out.get("Contents", [])]

    def delete_prefix(self, prefix: str) -> None:
        for k in self.keys(prefix):
            self.client.delete_object(Bucket=self.name, Key=k)


@pytest.fixture(scope="session")
def s3_server():
    srv = S3Server()
    yield srv
    srv.stop()


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A fresh bucket; the process environment points obstore and boto3 at the server."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
              "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    name = f"models-{uuid.uuid4().hex[:10]}"
    client.create_bucket(Bucket=name)
    yield Bucket(client, name, s3_server)
    s3_server.enforce_auth(False)


@pytest.fixture
def publish(bucket, version_cache):
    """publish("mlp", 1, "st1", prefix="models"): the model's files (once) and a version."""
    import make_example_models as mk

    def put(model: str, version: int, src: str, prefix: str = "models", yaml: str | None = None) -> None:
        if not bucket.keys(f"{prefix}/{model}/model.py"):
            tmp = version_cache.parent / f"modelfiles-{uuid.uuid4().hex[:6]}"
            mk.write_model_folder(tmp, yaml)
            bucket.put_dir(tmp, f"{prefix}/{model}")
        bucket.put_dir(version_cache / src, f"{prefix}/{model}/{version}")
    return put
