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

The API server is reached through runtime/routing/k8s_api.py (service account, or
SPLITSERVE_KUBE_API and SPLITSERVE_KUBE_TOKEN_FILE).
Needs RBAC get, list, watch and update on that one ConfigMap (deploy/kubernetes/base/role.yaml).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
import urllib.parse
from collections.abc import Callable

from router import RouteConfig, RoutingError
from router.configfile import update_config_text
from runtime import errors
from runtime.routing.document import MAX_CONFIG_BYTES, digest, own_write
from runtime.routing.k8s_api import KubeClient, KubeError

log = logging.getLogger("splitserve.config")

WATCH_TIMEOUT_S = 60  # the server ends each watch; we relist and watch again
CAS_ATTEMPTS = 8


class KubernetesSource:
    """A ConfigMap key as the routing config source; see the module docstring."""

    kind = "kubernetes"
    writable = True

    def __init__(self, namespace: str, configmap: str, key: str = "splitserve.yaml",
                 api: str | None = None, token_file: str | None = None) -> None:
        self.namespace, self.configmap, self.key = namespace, configmap, key
        try:
            self.client = KubeClient(api, token_file)
        except ValueError as e:
            raise RoutingError("invalid", str(e)) from None
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
    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        return self.client.call(method, path, body)

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
        conn = self._conn = self.client.connection(WATCH_TIMEOUT_S + 10)
        try:
            conn.request("GET", f"{self._watch}&resourceVersion={urllib.parse.quote(rv)}",
                         headers=self.client.headers())
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
                before = data.get(self.key, "")
                new = update_config_text(before, model, config, self.name)
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
                self._hash = own_write(self._hash, before.encode(), new.encode())
            return
