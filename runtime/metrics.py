"""Per-version metrics (issue 5 fills this in)."""

from collections import Counter


class Metrics:
    def __init__(self, router):
        self.router = router
        self.manager = None
        self.requests = Counter()

    def record_request(self, model, version, route, protocol, code, latency_s, queue_s, compute_s, batch):
        self.requests[(model, version, route, protocol, code)] += 1

    def record_shadow(self, model, primary, shadow, ok, max_abs_diff, argmax_agree):
        pass

    def lifecycle_event(self, kind, harness):
        pass
