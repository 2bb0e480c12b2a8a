"""The Kubernetes API server, as the routing ConfigMap (runtime/routing/k8s_source.py) and the
experiment decider's Lease (runtime/decider/lease_k8s.py) reach it: one small blocking
JSON client (called from threads, never from the event loop).

In a pod it uses the service account (token and CA under /var/run/secrets); the
environment can point it elsewhere: SPLITSERVE_KUBE_API (base URL), SPLITSERVE_KUBE_TOKEN_FILE.
The token is re-read on every call: a projected service-account token rotates.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.parse

SA = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_RESPONSE_BYTES = 8 << 20


class KubeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class KubeClient:
    """Connection, token and one `call` (status >= 300 raises KubeError; 0: unreachable).
    ValueError for an unusable API server address (the caller words it)."""

    def __init__(self, api: str | None = None, token_file: str | None = None) -> None:
        if api is None:
            api = os.environ.get("SPLITSERVE_KUBE_API")
        if api is None:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise ValueError("kubernetes:// config needs to run in a pod "
                                 "(KUBERNETES_SERVICE_HOST unset) or SPLITSERVE_KUBE_API")
            api = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        u = urllib.parse.urlsplit(api)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"API server URL {api!r} must be http(s)://host[:port]")
        self._scheme, self._host = u.scheme, u.hostname
        self._port = u.port or (443 if u.scheme == "https" else 80)
        self._token_file = token_file or os.environ.get("SPLITSERVE_KUBE_TOKEN_FILE") or f"{SA}/token"
        self._ssl = None
        if u.scheme == "https":
            ca = f"{SA}/ca.crt"
            self._ssl = ssl.create_default_context(cafile=ca if os.path.exists(ca) else None)

    def connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def headers(self) -> dict:
        h = {"Accept": "application/json", "Content-Type": "application/json"}
        try:
            with open(self._token_file) as f:
                h["Authorization"] = f"Bearer {f.read().strip()}"
        except OSError:
            pass
        return h

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 10) -> dict:
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers=self.headers())
            r = conn.getresponse()
            data = r.read(MAX_RESPONSE_BYTES)
        except OSError as e:
            raise KubeError(0, f"API server unreachable: {e}") from None
        finally:
            conn.close()
        try:
            obj = json.loads(data) if data else {}
        except ValueError:
            obj = {}
        if r.status >= 300:
            raise KubeError(r.status, (obj.get("message") if isinstance(obj, dict) else None) or r.reason)
        return obj
