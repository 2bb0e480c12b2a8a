"""The one runtime every server shares: router, manager, inference service, metrics,
control, and the watchers that feed them. Protocol-free; `server/app.py` puts servers
in front of it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from router import Router, parse_config_text
from runtime.routing.sources import make_source
from runtime.service.control import Control
from runtime.decider.fleet import make_fleet
from runtime.decider.runner import ExperimentRunner
from runtime.service.inference import InferenceService
from runtime.lifecycle.manager import Manager
from runtime.metrics.facade import Metrics
from runtime.metrics.summary import CHECKPOINT_S
from runtime.repository.mirror import Mirror
from runtime.config.settings import Settings
from runtime.tracing import Tracing
from runtime.repository.watch import Watcher

log = logging.getLogger("splitserve.core")


class Core:
    """Wiring, one way: the manager publishes views; the router and metrics read them.

    The manager pulls the versions the routes name (`referenced`) when it plans; when a
    published view changes what is AVAILABLE, the router's table is rebuilt at once (so
    an UNLOADING version is never picked) and, if that moved a pending label, a new plan
    is scheduled on the loop, never run from inside the manager's publication.
    """

    def __init__(self, settings: Settings, metrics_peers: Callable[[], list[dict]] | None = None,
                 tracing: Tracing | None = None):
        """`metrics_peers`: the other worker processes' metric snapshots (a worker's run
        folder), so every read answers the workers' totals; None: this process alone.
        `tracing`: OpenTelemetry (runtime/tracing.py), None when not configured."""
        self.settings = settings
        self.tracing = tracing
        # An object-storage repository is mirrored into a local folder, served from there.
        self.mirror = Mirror(settings.repository.url, settings.repository.store) \
            if settings.repository.url else None
        self.root = self.mirror.cache_dir if self.mirror else Path(settings.repository.path).resolve()
        self.router = Router()
        # Metrics read what the manager and the runner publish, both built below: the
        # manager records into metrics, and the runner needs control, which needs the manager.
        self.metrics = Metrics(self.router, views=lambda: self.manager.view(),
                               experiments=lambda: self.experiments.published(),
                               peers=metrics_peers)
        self.manager = Manager(self.root, settings.repository,
                               referenced=self.router.referenced_versions,
                               on_event=self.metrics.lifecycle_event,
                               on_batch=self.metrics.record_batch,
                               shadow_max_waiting=settings.shadow_max_inflight)
        self.manager.subscribe(self._on_view)
        self._available: dict[str, tuple[tuple[int, ...], frozenset[int] | None]] = {}  # (AVAILABLE, folders)
        self._missing: dict[str, frozenset[int]] = {}  # routed versions reported without a folder
        if self.mirror is not None:
            self.metrics.registry.register(self.mirror.collector())
        # where routing lives (file, ConfigMap) or None; read and watched from start()
        self.source = make_source(settings)
        self.control = Control(self.manager, self.router, self.source, settings)
        cfg = settings.config_path  # experiment state lives beside the routing document
        self.experiments = ExperimentRunner(
            self.router, self.control, cfg.with_name(cfg.stem + ".experiments.json") if cfg is not None else None)
        self.inference = InferenceService(self.manager, self.router, settings.limits,
                                          self.metrics, settings.shadow_max_inflight,
                                          on_finished=self.experiments.on_finished,
                                          arm_of=self.experiments.arm_of, tracing=tracing)
        self._checkpoints: asyncio.Task | None = None
        self.jobs = None  # the JobService (runtime/jobs), set by the server that wires it
        self.watcher: Watcher | None = None
        self._http_bound: tuple[str, int] | None = None
        self.started = False
        self.stopping = False
        # Readiness beyond this process (a worker: every worker of the server is ready)
        self.ready_gate: Callable[[], bool] | None = None

    def _on_view(self, snapshot, changed: str | None) -> None:
        names = [changed] if changed is not None else sorted(set(snapshot.models) | set(self._available))
        for model in names:
            mv = snapshot.model(model)
            now = (mv.available, mv.present) if mv is not None else ((), self._folders_unknown(model))
            was = self._available.get(model)
            if was == now:
                continue
            before = self.router.referenced_versions(model)
            if mv is None and model not in self.router.configs():
                self._available.pop(model, None)
                self._missing.pop(model, None)
                self.router.remove_model(model)  # deleted and unrouted: forget its table
                continue
            self._available[model] = now
            self.router.set_available(model, *now)
            if now[1] is not None:
                self._report_missing(model, (was[1] if was is not None else None) or frozenset(), now[1])
            if self.router.referenced_versions(model) != before:  # a pending label moved
                asyncio.get_running_loop().call_soon(self.manager.request_reconcile, model)
            # a routing document naming this version may apply now (scheduled, not re-entered)
            asyncio.get_running_loop().call_soon(self.control.retry_rejected)

    def _folders_unknown(self, model: str) -> frozenset[int] | None:
        """The version folders of a model with no view: none when its folder is gone; not
        known (None) when it is there but unreadable (a bad model.yaml says so itself)."""
        return None if (self.root / model).is_dir() else frozenset()

    def _report_missing(self, model: str, had: frozenset[int], present: frozenset[int]) -> None:
        """A routed version without a folder is unavailable (its share fails over), never
        fatal: one WARNING when that starts, naming what routes it and the split it leaves;
        one INFO when its folder is back."""
        names, split = self.router.missing_routes(model)
        missing = frozenset(names.values())
        seen = self._missing.get(model, frozenset())
        for v in sorted((seen - missing) & present & self.router.referenced_versions(model)):
            log.info("event=routed_version_restored model=%s version=%d", model, v)
        self._missing[model] = missing
        new = missing - seen
        if not new:
            return
        # `had`: the folders of the last view; none before the model's first (at start)
        reason = ("folder deleted" if new <= had else
                  "folder deleted or never added" if new & had else "no folder in the repository")
        log.warning("event=routed_version_missing model=%s versions=%s routed_by=%r reason=%r "
                    "effective_split=%s", model, ",".join(map(str, sorted(new))),
                    ", ".join(w for w, v in names.items() if v in new), reason,
                    ",".join(f"{v}:{f * 100:.4g}%" for v, f in sorted(split.items())) or "none")

    async def start(self, wait_s: float | None = None) -> None:
        """Read the routing config, start watching, load what the repository aspires.
        One deadline (`server.start_timeout_s`) covers every model; past it, TimeoutError."""
        if self.mirror is not None:
            await self.mirror.start()  # first sync; StoreError when the store can't be listed
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        loop = asyncio.get_running_loop()
        source = self.source
        if source is not None:
            # A bad document at start is fatal (like TF Serving's model config): nothing half-applied.
            text = await asyncio.to_thread(source.read)
            if text is not None:
                # A version the routes name without a folder is not an error here: this may be
                # the state the server was running in. It is unavailable (WARNING, failover).
                for model, rc in parse_config_text(text, source.name).items():
                    self.router.set_config(model, rc)
        # Baselines of the A/B summary's since=routing; the document read at start is not a
        # change (until one, the window is since start: every worker's counts).
        self.router.subscribe(self.metrics.routing_changed)
        rs = self.settings.repository
        self.watcher = Watcher(polling=rs.polling, poll_interval_s=rs.poll_interval_s)
        self.watcher.watch(loop, self.root, self.manager.on_path_changed)
        self.watcher.start()
        if source is not None:
            # looked up per call, so a wrapper installed later (tests count reloads) is used
            source.start(loop, lambda *a, **k: self.control.reload_config_file(*a, **k))
        await self.manager.start()
        wait_s = self.settings.server.start_timeout_s if wait_s is None else wait_s
        if not await self.settle(wait_s):
            snap = self.manager.view()
            busy = [m for m in snap.names() if not snap.model(m).available]
            raise TimeoutError(f"start deadline of {wait_s:g}s (server.start_timeout_s) passed "
                               f"with models still loading: {', '.join(busy) or '-'}")
        for model in sorted(set(self.router.configs()) - set(self._available)):
            self._on_view(self.manager.view(), model)  # routed, but no model folder at all
        fleet = self.experiments.fleet = make_fleet(self.settings, source)  # replicas: one decider
        if fleet is not None and self._http_bound is not None:
            fleet.bound(*self._http_bound)
        self.experiments.start()
        self._checkpoints = loop.create_task(self._checkpoint_loop(), name="metrics-checkpoints")
        self.started = True

    def http_bound(self, host: str, port: int) -> None:
        """The REST listener's address (a fleet's decider is reached there)."""
        self._http_bound = (host, port)
        if self.experiments.fleet is not None:
            self.experiments.fleet.bound(host, port)

    async def _checkpoint_loop(self) -> None:
        """Baselines for the A/B summary's `since=<epoch>` (runtime/metrics/summary.py)."""
        while True:
            await asyncio.sleep(CHECKPOINT_S)
            try:
                self.metrics.checkpoint()
            except Exception as e:  # a failed checkpoint costs one baseline, never serving
                log.error("event=metrics_checkpoint_failed error=%r", e)

    async def settle(self, timeout: float) -> bool:
        """Wait, under one deadline for all models, until nothing loads; False past it."""
        return await self.manager.settle_all(timeout)

    def ready(self) -> bool:
        return self.started and not self.stopping and (self.ready_gate is None or self.ready_gate())

    async def stop(self) -> None:
        self.stopping = True
        if self._checkpoints is not None:
            self._checkpoints.cancel()
        await self.experiments.stop()
        if self.mirror is not None:
            await self.mirror.stop()
        if self.watcher is not None:
            self.watcher.stop()
        if self.source is not None:
            self.source.stop()
        await self.manager.close()
        if self.tracing is not None:  # export the spans still buffered (blocking: a thread)
            await asyncio.to_thread(self.tracing.shutdown)
