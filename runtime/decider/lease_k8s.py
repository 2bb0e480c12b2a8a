"""The experiment decider of a fleet of replicas: a `coordination.k8s.io/v1` Lease, the
standard leader-election object, named `<configmap>-decider` beside the routing ConfigMap.

One `sync()` is one round trip pair: GET the Lease, then, as its holder (or taking it:
absent, or unchanged for a whole lease duration by our own clock), PUT it with the
resourceVersion read (409: another process wrote first, we do not lead), or POST it
when absent (409: another created it). The holder's state travels in the Lease's
annotations in that same compare-and-swap write, so a deposed holder (its resourceVersion
is stale) can never overwrite what its successor wrote.

Expiry is judged by our monotonic clock from when we first saw the current
resourceVersion, never by comparing renewTime with our wall clock (clocks of pods
differ). A holder stops leading one duration after the start of its last successful
renewal, before any other process may take over (they wait a duration from a later
observation). Blocking: called from a thread.
"""

from __future__ import annotations

import datetime
import threading
import time
import urllib.parse
from collections.abc import Callable

from runtime.routing.k8s_api import KubeClient, KubeError

GROUP = "/apis/coordination.k8s.io/v1"
ANNOTATIONS_BUDGET = 200 * 1024  # Kubernetes caps a Lease's annotations at 256 KiB in all


def micro_time(t: float) -> str:
    """A Kubernetes MicroTime (RFC 3339, microseconds, UTC)."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Lease:
    budget = ANNOTATIONS_BUDGET  # the states are trimmed to fit beside the other annotations
    state_file = None  # the states travel in the annotations only

    def __init__(self, client: KubeClient, namespace: str, name: str, identity: str,
                 duration_s: float, *, mono: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self.client, self.namespace, self.name = client, namespace, name
        self.identity = identity
        self.duration_s = float(duration_s)
        self.renew_s = self.duration_s / 3
        self.where = f"{namespace}/{name}"
        self.title = f"the Lease {namespace}/{name}"
        self._mono, self._wall = mono, wall
        base = f"{GROUP}/namespaces/{urllib.parse.quote(namespace)}/leases"
        self._list, self._item = base, f"{base}/{urllib.parse.quote(name)}"
        self._obj: dict | None = None  # the Lease as last read or written
        self._seen: tuple[str | None, float] = (None, 0.0)  # (resourceVersion, first seen at)
        self._renewed: float | None = None  # monotonic start of our last successful write
        self._lock = threading.Lock()  # one sync at a time: our own writes never race

    @property
    def leading(self) -> bool:
        r = self._renewed
        return r is not None and self._mono() - r < self.duration_s

    @property
    def holder(self) -> str | None:
        return ((self._obj or {}).get("spec") or {}).get("holderIdentity") or None

    @property
    def version(self) -> str | None:
        """The resourceVersion last read or written."""
        return ((self._obj or {}).get("metadata") or {}).get("resourceVersion")

    def annotations(self) -> dict[str, str]:
        return dict(((self._obj or {}).get("metadata") or {}).get("annotations") or {})

    def sync(self, annotations: dict[str, str] | None = None) -> bool:
        """Read; renew or take when we may, merging `annotations` into the write. True
        while we hold it. KubeError for anything but the expected 404 and 409."""
        with self._lock:
            return self._sync(annotations or {})

    def _sync(self, annotations: dict[str, str]) -> bool:
        start = self._mono()
        try:
            obj = self.client.call("GET", self._item)
        except KubeError as e:
            if e.status != 404:
                raise
            return self._create(annotations, start)
        self._obj = obj
        meta, spec = obj.setdefault("metadata", {}), obj.setdefault("spec", {}) or {}
        rv = meta.get("resourceVersion")
        if rv != self._seen[0]:
            self._seen = (rv, start)
        holder = spec.get("holderIdentity")
        ours = holder == self.identity
        duration = float(spec.get("leaseDurationSeconds") or self.duration_s)
        if not ours and holder and start - self._seen[1] < duration:
            self._renewed = None
            return False  # held, and renewed within a duration of our first sight of it
        now = micro_time(self._wall())
        if not ours:
            spec["acquireTime"] = now
            spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (1 if holder else 0)
        spec.update(holderIdentity=self.identity, renewTime=now,
                    leaseDurationSeconds=max(1, round(self.duration_s)))
        obj["spec"] = spec
        if annotations:
            meta["annotations"] = {**(meta.get("annotations") or {}), **annotations}
        if not self._write("PUT", self._item, obj, start):  # metadata.resourceVersion: the CAS
            return False
        self._seen = (self._obj.get("metadata", {}).get("resourceVersion"), start)
        return True

    def _write(self, method: str, path: str, body: dict, start: float) -> bool:
        """One CAS write; on 409 (another process wrote or created it first) we do not lead."""
        try:
            self._obj = self.client.call(method, path, body)
        except KubeError as e:
            if e.status != 409:
                raise
            self._renewed = None
            return False
        self._renewed = start
        return True

    def release(self, annotations: dict[str, str]) -> None:
        """Give the Lease up (holder emptied: others take it at once), if still ours."""
        with self._lock:
            if not self.leading or self._obj is None:
                return
            obj = self._obj
            obj["spec"]["holderIdentity"] = None
            obj.setdefault("metadata", {})["annotations"] = {**(obj["metadata"].get("annotations") or {}),
                                                              **annotations}
            self._renewed = None  # from now on we do not decide, whatever the answer
            try:
                self._obj = self.client.call("PUT", self._item, obj)
            except KubeError as e:
                if e.status != 409:
                    raise

    def _create(self, annotations: dict[str, str], start: float) -> bool:
        now = micro_time(self._wall())
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace, "annotations": annotations},
                "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": max(1, round(self.duration_s)),
                         "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}
        return self._write("POST", self._list, body, start)
