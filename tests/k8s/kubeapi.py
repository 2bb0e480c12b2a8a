"""A loopback stand-in for the Kubernetes API server, with the semantics splitserve relies
on. ConfigMaps (KubernetesSource): GET, PUT with resourceVersion compare-and-swap (409
Conflict), watch from a resourceVersion (newline-delimited JSON events, ends at
timeoutSeconds), 410 Gone for a resourceVersion older than the kept history, dropped
watches. Leases (coordination.k8s.io/v1, the experiment decider): GET (404 when absent),
POST create (409 AlreadyExists), PUT with resourceVersion compare-and-swap (409 Conflict).
Every call needs the bearer token."""

from __future__ import annotations

import copy
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ITEM = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps/([^/?]+)$")
LIST = re.compile(r"^/api/v1/namespaces/([^/]+)/configmaps$")
LEASE = re.compile(r"^/apis/coordination.k8s.io/v1/namespaces/([^/]+)/leases/([^/?]+)$")
LEASES = re.compile(r"^/apis/coordination.k8s.io/v1/namespaces/([^/]+)/leases$")


def status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
            "reason": reason, "message": message}


class KubeAPI:
    def __init__(self, token: str = "test-token"):
        self.token = token
        self.rv = 100
        self.objects: dict[tuple[str, str], dict] = {}
        self.events: list[tuple[int, str, dict]] = []  # (rv, type, object)
        self.oldest = 0  # watches from below this rv get 410 Gone
        self.cond = threading.Condition()
        self.epoch = 0  # bumped to drop every open watch
        self.conflicts = 0
        self.puts = 0
        self.before_put = None  # hook: called (under no lock) before a PUT is judged
        self.leases: dict[tuple[str, str], dict] = {}
        self.lease_writes = 0
        self.lease_conflicts = 0
        self.down = False  # every call answers 503 (the API server unreachable, for a holder)
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def _send(self, code: int, obj: dict) -> None:
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _authorized(self) -> bool:
                if api.down:
                    self._send(503, status(503, "ServiceUnavailable", "the API server is down"))
                    return False
                if self.headers.get("Authorization") != f"Bearer {api.token}":
                    self._send(401, status(401, "Unauthorized", "Unauthorized"))
                    return False
                return True

            def do_GET(self):
                if not self._authorized():
                    return
                u = urllib.parse.urlsplit(self.path)
                q = urllib.parse.parse_qs(u.query)
                m = LEASE.match(u.path)
                if m:
                    with api.cond:
                        obj = copy.deepcopy(api.leases.get((m.group(1), m.group(2))))
                    if obj is None:
                        return self._send(404, status(404, "NotFound", f'leases.coordination.k8s.io "{m.group(2)}" not found'))
                    return self._send(200, obj)
                m = ITEM.match(u.path)
                if m:
                    with api.cond:
                        obj = api.objects.get((m.group(1), m.group(2)))
                    if obj is None:
                        return self._send(404, status(404, "NotFound", f'configmaps "{m.group(2)}" not found'))
                    return self._send(200, obj)
                m = LIST.match(u.path)
                if m and q.get("watch") == ["1"]:
                    return self._watch(m.group(1), q)
                self._send(404, status(404, "NotFound", "not found"))

            def _watch(self, ns: str, q: dict) -> None:
                name = q.get("fieldSelector", [""])[0].removeprefix("metadata.name=")
                since = int(q.get("resourceVersion", ["0"])[0])
                timeout = float(q.get("timeoutSeconds", ["30"])[0])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                with api.cond:
                    epoch = api.epoch
                    if since < api.oldest:
                        ev = {"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {since}")}
                        self.wfile.write(json.dumps(ev).encode() + b"\n")
                        return
                    sent = since
                    while True:
                        for rv, typ, obj in api.events:
                            if rv > sent and obj["metadata"]["namespace"] == ns and obj["metadata"]["name"] == name:
                                self.wfile.write(json.dumps({"type": typ, "object": obj}).encode() + b"\n")
                                self.wfile.flush()
                                sent = rv
                        if not api.cond.wait_for(lambda: api.epoch != epoch or api.events[-1][0] > sent
                                                 if api.events else api.epoch != epoch, timeout):
                            return  # the server's watch timeout
                        if api.epoch != epoch:
                            return  # dropped

            def do_POST(self):
                if not self._authorized():
                    return
                m = LEASES.match(urllib.parse.urlsplit(self.path).path)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if m is None or body.get("kind") != "Lease":
                    return self._send(404, status(404, "NotFound", "not found"))
                key = (m.group(1), body["metadata"]["name"])
                with api.cond:
                    if key in api.leases:
                        api.lease_conflicts += 1
                        return self._send(409, status(409, "AlreadyExists",
                                          f'leases.coordination.k8s.io "{key[1]}" already exists'))
                    self._send(201, api._store_lease(key, body))

            def _put_lease(self, key, body: dict) -> None:
                with api.cond:
                    cur = api.leases.get(key)
                    if cur is None:
                        return self._send(404, status(404, "NotFound", "not found"))
                    if body.get("metadata", {}).get("resourceVersion") != cur["metadata"]["resourceVersion"]:
                        api.lease_conflicts += 1
                        return self._send(409, status(409, "Conflict", 'Operation cannot be fulfilled on '
                                          f'leases.coordination.k8s.io "{key[1]}": the object has been modified; '
                                          'please apply your changes to the latest version and try again'))
                    size = sum(len(k) + len(v) for k, v in (body["metadata"].get("annotations") or {}).items())
                    if size > 256 * 1024:
                        return self._send(422, status(422, "Invalid", f"metadata.annotations: Too long: must "
                                          f"have at most 262144 bytes (got {size})"))
                    self._send(200, api._store_lease(key, body))

            def do_PUT(self):
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                lm = LEASE.match(urllib.parse.urlsplit(self.path).path)
                if lm:
                    return self._put_lease((lm.group(1), lm.group(2)), body)
                m = ITEM.match(urllib.parse.urlsplit(self.path).path)
                if api.before_put is not None:
                    hook, api.before_put = api.before_put, None
                    hook()
                with api.cond:
                    key = (m.group(1), m.group(2))
                    cur = api.objects.get(key)
                    if cur is None:
                        return self._send(404, status(404, "NotFound", "not found"))
                    if body.get("metadata", {}).get("resourceVersion") != cur["metadata"]["resourceVersion"]:
                        api.conflicts += 1
                        return self._send(409, status(409, "Conflict", 'Operation cannot be fulfilled on '
                                          f'configmaps "{key[1]}": the object has been modified; '
                                          'please apply your changes to the latest version and try again'))
                    api.puts += 1
                    obj = api._store(key, body.get("data") or {})
                self._send(200, obj)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _store(self, key, data: dict, typ: str = "MODIFIED") -> dict:
        self.rv += 1
        obj = {"apiVersion": "v1", "kind": "ConfigMap", "data": copy.deepcopy(data),
               "metadata": {"namespace": key[0], "name": key[1], "resourceVersion": str(self.rv)}}
        self.objects[key] = obj
        self.events.append((self.rv, typ, copy.deepcopy(obj)))
        self.cond.notify_all()
        return copy.deepcopy(obj)

    def _store_lease(self, key, body: dict) -> dict:
        self.rv += 1
        self.lease_writes += 1
        meta = {"namespace": key[0], "name": key[1], "resourceVersion": str(self.rv),
                "annotations": copy.deepcopy(body.get("metadata", {}).get("annotations") or {})}
        obj = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
               "spec": copy.deepcopy(body.get("spec") or {})}
        self.leases[key] = obj
        return copy.deepcopy(obj)

    def lease(self, ns: str, name: str) -> dict | None:
        with self.cond:
            return copy.deepcopy(self.leases.get((ns, name)))

    # ---- what an operator (kubectl) or the cluster does --------------------------------
    def put(self, ns: str, name: str, data: dict) -> str:
        with self.cond:
            typ = "MODIFIED" if (ns, name) in self.objects else "ADDED"
            return self._store((ns, name), data, typ)["metadata"]["resourceVersion"]

    def data(self, ns: str, name: str) -> dict:
        with self.cond:
            return copy.deepcopy(self.objects[(ns, name)]["data"])

    def drop_watches(self) -> None:
        with self.cond:
            self.epoch += 1
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget the history: a watch from any resourceVersion seen so far gets 410 Gone."""
        with self.cond:
            self.oldest = self.rv  # a relist (GET) gives a resourceVersion that can be watched
            self.events.clear()
            self.epoch += 1
            self.cond.notify_all()

    def close(self) -> None:
        self.drop_watches()
        self.server.shutdown()
        self.server.server_close()
