"""The routing document in a Kubernetes ConfigMap: one routing truth for N replicas.

`--config kubernetes://NAMESPACE/CONFIGMAP` (key `splitserve.yaml`; `?key=NAME` for
another). Every replica reads the ConfigMap and watches it through the API server; a
routing PUT to any replica is a compare-and-swap on the ConfigMap's `resourceVersion`
(re-read and retried on 409 Conflict), so every replica's watch applies it within about a
second. No leader, no new datastore.

Watch loop (one thread): GET (the list: the current text and resourceVersion), then watch
from that resourceVersion until the stream ends: a dropped connection, the server's
timeout, or 410 Gone (history compacted). Then again from the GET, so nothing missed
while disconnected is lost. Only a change of content hash reaches `on_change`.

In a pod it uses the service account (token and CA under /var/run/secrets); the
environment can point it elsewhere: SPLITSERVE_KUBE_API (base URL), SPLITSERVE_KUBE_TOKEN_FILE.
Needs RBAC get, list, watch and update on that one ConfigMap (deploy/kubernetes/base/role.yaml).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import ssl
import threading
import urllib.parse
from collections.abc import Callable

from router import RouteConfig, RoutingError
from router.configfile import update_config_text
from runtime import errors
from runtime.configsource import MAX_CONFIG_BYTES, digest

log = logging.getLogger("splitserve.config")

SA = "/var/run/secrets/kubernetes.io/serviceaccount"
WATCH_TIMEOUT_S = 60  # the server ends each watch; we relist and watch again
CAS_ATTEMPTS = 8


class KubeError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class KubernetesSource:
    """A ConfigMap key as the routing config source; see the module docstring."""

    kind = "kubernetes"
    writable = True

    def __init__(self, namespace: str, configmap: str, key: str = "splitserve.yaml",
                 api: str | None = None, token_file: str | None = None) -> None:
        self.namespace, self.configmap, self.key = namespace, configmap, key
        if api is None:
            api = os.environ.get("SPLITSERVE_KUBE_API")
        if api is None:
            host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise RoutingError("invalid", "kubernetes:// config needs to run in a pod "
                                   "(KUBERNETES_SERVICE_HOST unset) or SPLITSERVE_KUBE_API")
            api = f"https://{host}:{port}" if ":" not in host else f"https://[{host}]:{port}"
        u = urllib.parse.urlsplit(api)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise RoutingError("invalid", f"API server URL {api!r} must be http(s)://host[:port]")
        self._scheme, self._host = u.scheme, u.hostname
        self._port = u.port or (443 if u.scheme == "https" else 80)
        self._token_file = token_file or os.environ.get("SPLITSERVE_KUBE_TOKEN_FILE") or f"{SA}/token"
        self._ssl = None
        if u.scheme == "https":
            ca = f"{SA}/ca.crt"
            self._ssl = ssl.create_default_context(cafile=ca if os.path.exists(ca) else None)
        base = f"/api/v1/namespaces/{urllib.parse.quote(namespace)}/configmaps"
        self._item = f"{base}/{urllib.parse.quote(configmap)}"
        self._watch = (f"{base}?watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_TIMEOUT_S}"
                       f"&fieldSelector={urllib.parse.quote('metadata.name=' + configmap)}")
        self._rv: str | None = None
        self._hash: str | None = None
        self._lock = threading.Lock()  # guards _hash/_rv between the watch thread and writers
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: http.client.HTTPConnection | None = None

    @classmethod
    def from_url(cls, url: str) -> KubernetesSource:
        u = urllib.parse.urlsplit(url)
        parts = [p for p in (u.netloc + u.path).split("/") if p]
        if u.scheme != "kubernetes" or len(parts) != 2:
            raise RoutingError("invalid", f"config {url!r}: expected kubernetes://NAMESPACE/CONFIGMAP")
        key = urllib.parse.parse_qs(u.query).get("key", ["splitserve.yaml"])[0]
        return cls(parts[0], parts[1], key)

    @property
    def name(self) -> str:
        return f"the ConfigMap {self.namespace}/{self.configmap} (key {self.key})"

    def managed_by(self) -> str | None:
        return None

    # ---- API calls (blocking; called from threads) -----------------------------------
    def _connection(self, timeout: float | None) -> http.client.HTTPConnection:
        if self._scheme == "https":
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._ssl)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _headers(self) -> dict:
        h = {"Accept": "application/json", "Content-Type": "application/json"}
        try:
            with open(self._token_file) as f:
                h["Authorization"] = f"Bearer {f.read().strip()}"
        except OSError:
            pass
        return h

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        conn = self._connection(10)
        try:
            conn.request(method, path, body=json.dumps(body) if body is not None else None,
                         headers=self._headers())
            r = conn.getresponse()
            data = r.read(MAX_CONFIG_BYTES * 2)
        except OSError as e:
            raise KubeError(0, f"API server unreachable: {e}") from None
        finally:
            conn.close()
        try:
            obj = json.loads(data) if data else {}
        except ValueError:
            obj = {}
        if r.status >= 300:
            raise KubeError(r.status, obj.get("message") or r.reason)
        return obj

    def _get(self) -> tuple[str | None, str]:
        obj = self._call("GET", self._item)
        return (obj.get("data") or {}).get(self.key), obj["metadata"]["resourceVersion"]

    def read(self) -> str | None:
        """The document's text now (None when the key is absent); fatal when unreachable."""
        try:
            text, rv = self._get()
        except KubeError as e:
            raise RoutingError("invalid", f"{self.name}: {e.message}") from None
        with self._lock:
            self._rv, self._hash = rv, digest(text.encode()) if text is not None else None
        return text

    # ---- watching -------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, on_change: Callable[[str | None], object]) -> None:
        def deliver(text: str | None, rv: str, how: str) -> None:
            h = digest(text.encode()) if text is not None else None
            with self._lock:
                self._rv = rv
                if h == self._hash:
                    return
                self._hash = h
            log.info("event=config_changed source=configmap/%s/%s resource_version=%s via=%s",
                     self.namespace, self.configmap, rv, how)
            if text is not None:
                try:
                    loop.call_soon_threadsafe(on_change, text)
                except RuntimeError:
                    pass  # the loop closed during shutdown

        def run() -> None:
            backoff = 0.2
            while not self._stop.is_set():
                try:
                    text, rv = self._get()
                    deliver(text, rv, "list")
                    self._watch_from(rv, deliver)
                    backoff = 0.2
                except (KubeError, OSError, ValueError, KeyError) as e:
                    if self._stop.is_set():
                        return
                    log.warning("event=config_watch_retry source=configmap/%s/%s in_s=%.1f reason=%r",
                                self.namespace, self.configmap, backoff, str(e))
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, 5.0)

        self._thread = threading.Thread(target=run, name="configmap-watch", daemon=True)
        self._thread.start()

    def _watch_from(self, rv: str, deliver) -> None:
        conn = self._conn = self._connection(WATCH_TIMEOUT_S + 10)
        try:
            conn.request("GET", f"{self._watch}&resourceVersion={urllib.parse.quote(rv)}",
                         headers=self._headers())
            r = conn.getresponse()
            if r.status != 200:
                raise KubeError(r.status, r.read(4096).decode(errors="replace"))
            while not self._stop.is_set():
                line = r.readline(MAX_CONFIG_BYTES * 2)
                if not line:
                    return  # dropped or timed out: relist
                if not line.strip():
                    continue
                ev = json.loads(line)
                obj = ev.get("object") or {}
                if ev.get("type") == "ERROR":
                    log.info("event=config_watch_expired source=configmap/%s/%s code=%s",
                             self.namespace, self.configmap, obj.get("code"))
                    return  # 410 Gone: our resourceVersion is too old; relist
                rv = obj.get("metadata", {}).get("resourceVersion", rv)
                if ev.get("type") in ("ADDED", "MODIFIED"):
                    deliver((obj.get("data") or {}).get(self.key), rv, "watch")
                elif ev.get("type") == "DELETED":
                    log.warning("event=config_deleted source=configmap/%s/%s keeping=last_good",
                                self.namespace, self.configmap)
        finally:
            self._conn = None
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(2)  # unblocks the watch thread's read
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    # ---- writing --------------------------------------------------------------------
    async def write(self, model: str, config: RouteConfig) -> None:
        await asyncio.to_thread(self._cas, model, config)

    def _cas(self, model: str, config: RouteConfig) -> None:
        """Read, change one model, PUT with the resourceVersion read; on 409 again."""
        for attempt in range(1, CAS_ATTEMPTS + 1):
            try:
                obj = self._call("GET", self._item)
                data = obj.setdefault("data", {}) or {}
                obj["data"] = data
                new = update_config_text(data.get(self.key, ""), model, config, self.name)
                data[self.key] = new
                stored = self._call("PUT", self._item, obj)  # metadata.resourceVersion: the CAS
            except KubeError as e:
                if e.status == 409 and attempt < CAS_ATTEMPTS:
                    log.info("event=config_conflict source=configmap/%s/%s attempt=%d",
                             self.namespace, self.configmap, attempt)
                    continue
                raise errors.ServingError(errors.Code.INTERNAL if e.status != 403 else errors.Code.CONFLICT,
                                          f"routing not changed: could not write {self.name}: {e.message}") from None
            except RoutingError as e:
                raise errors.ServingError(errors.Code.INTERNAL, f"routing not changed: {e.message}") from None
            with self._lock:
                self._rv = stored["metadata"]["resourceVersion"]
                self._hash = digest(new.encode())  # our own write is not news
            return
