"""`Metrics`: one process's metrics behind one object, so Core, the servers and the
workers hold one collaborator. Each reader's code lives in its own module; this class
only builds them over one `Store` and forwards:

    recording         store.py       (record_* are the store's own bound methods)
    A/B summary       summary.py     (summary, routing_changed, checkpoint)
    Prometheus        prometheus.py  (registry)
    Triton statistics statistics.py  (statistics)
    shared state      merge.py       (export_state, import_state)
"""

from __future__ import annotations

import time
from collections.abc import Callable

from runtime.metrics import merge, prometheus, statistics
from runtime.metrics.store import RETIRE_AFTER_S, WINDOW_S, Store
from runtime.metrics.summary import Summary
from runtime.views import ExperimentsView, Snapshot


class Metrics:
    """See `Store` for the arguments: `views` (the manager's published Snapshot),
    `experiments` (the runner's published view), `peers` (other workers' snapshots)."""

    def __init__(self, router=None, views: Callable[[], Snapshot] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time, window_s: int = WINDOW_S,
                 retire_after_s: float = RETIRE_AFTER_S,
                 experiments: Callable[[], ExperimentsView] | None = None,
                 peers: Callable[[], list[dict]] | None = None):
        store = self.store = Store(router, views, clock, wall, window_s, retire_after_s,
                                   experiments, peers)
        # the hot path: no forwarding call
        self.record_request = store.record_request
        self.record_batch = store.record_batch
        self.record_shadow = store.record_shadow
        self.record_shadow_dropped = store.record_shadow_dropped
        self.lifecycle_event = store.lifecycle_event
        self.change_mark = store.change_mark
        self._summary = Summary(store)
        self.routing_changed = self._summary.routing_changed
        self.checkpoint = self._summary.checkpoint
        self.registry = prometheus.registry(store)

    @property
    def router(self):
        return self.store.router

    def summary(self, model: str, since: str | None = None) -> dict:
        return self._summary.summary(model, since)

    def statistics(self, model: str | None = None, version: int | str | None = None) -> dict:
        return statistics.statistics(self.store, model, version)

    def export_state(self, model: str | None = None) -> dict:
        return merge.export_state(self.store, model)

    def import_state(self, state: dict) -> None:
        merge.import_state(self.store, state)
