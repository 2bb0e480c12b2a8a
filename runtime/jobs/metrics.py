"""The jobs' Prometheus families, as a Collector registered beside the core's metrics:
reads the JobService's figures (the backend's snapshot is refreshed by its housekeeping
task, never queried from a scrape)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.jobs.record import STATES


class JobsCollector(Collector):
    def __init__(self, jobs):
        self.jobs = jobs

    def collect(self):
        j = self.jobs
        g = GaugeMetricFamily("splitserve_jobs", "Jobs in the queue's store by model and state",
                              labels=["model", "state"])
        models = sorted({m for m, _ in j.counts})
        for m in models:
            for s in STATES:
                g.add_metric([m, s], j.counts.get((m, s), 0))
        yield g
        age = GaugeMetricFamily("splitserve_jobs_oldest_queued_age_seconds",
                                "Age of the oldest queued job by model (absent: none queued)",
                                labels=["model"])
        for m, a in sorted(j.oldest.items()):
            age.add_metric([m], max(0.0, a))
        yield age
        yield GaugeMetricFamily("splitserve_jobs_running", "Jobs this process runs now",
                                value=j.running)
        att = CounterMetricFamily("splitserve_job_attempts", "Job attempts this process "
                                  "finished, by outcome (ok, retry, failed, lost: the lease was "
                                  "taken over and the result not stored)",
                                  labels=["model", "outcome"])
        for (m, o), n in sorted(j.attempts.items()):
            att.add_metric([m, o], n)
        yield att
        sub = CounterMetricFamily("splitserve_job_submits", "Job submits by result (accepted, "
                                  "duplicate idempotency key, full, invalid)",
                                  labels=["model", "result"])
        for (m, r), n in sorted(j.submitted.items()):
            sub.add_metric([m, r], n)
        yield sub
        cb = CounterMetricFamily("splitserve_job_callbacks", "Callback POSTs by result (ok, "
                                 "retry: failed and will be tried again, failed: out of attempts)",
                                 labels=["result"])
        for r in ("ok", "retry", "failed"):
            cb.add_metric([r], j.callback_results.get(r, 0))
        yield cb
