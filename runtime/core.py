"""The one runtime every server shares: router, manager, inference service, metrics,
control, and the watchers that feed them. Protocol-free; `server/app.py` puts servers
in front of it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from router import Router, load_config_file, validate_against
from runtime.control import Control
from runtime.experiment_runner import ExperimentRunner
from runtime.inference import InferenceService
from runtime.manager import Manager
from runtime.metrics import Metrics
from runtime.mirror import Mirror
from runtime.repository import scan_model
from runtime.settings import Settings
from runtime.watch import Watcher

log = logging.getLogger("splitserve.core")


class Core:
    """Wiring, one way: the manager publishes views; the router and metrics read them.

    The manager pulls the versions the routes name (`referenced`) when it plans; when a
    published view changes what is AVAILABLE, the router's table is rebuilt at once (so
    an UNLOADING version is never picked) and, if that moved a pending label, a new plan
    is scheduled on the loop, never run from inside the manager's publication.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        # An object-storage repository is mirrored into a local folder, served from there.
        self.mirror = Mirror(settings.repository.url, settings.repository.store) \
            if settings.repository.url else None
        self.root = self.mirror.cache_dir if self.mirror else Path(settings.repository.path).resolve()
        self.router = Router()
        self.metrics = Metrics(self.router, views=lambda: self.manager.view())
        self.manager = Manager(self.root, settings.repository,
                               referenced=self.router.referenced_versions,
                               on_event=self.metrics.lifecycle_event,
                               on_batch=self.metrics.record_batch,
                               shadow_max_waiting=settings.shadow_max_inflight)
        self.manager.subscribe(self._on_view)
        self._available: dict[str, tuple[int, ...]] = {}
        if self.mirror is not None:
            self.metrics.registry.register(self.mirror.collector())
        self.inference = InferenceService(self.manager, self.router, settings.limits,
                                          self.metrics, settings.shadow_max_inflight)
        self.control = Control(self.manager, self.router, settings.config_path, settings)
        cfg = settings.config_path  # experiment state lives beside the routing document
        self.experiments = ExperimentRunner(
            self.router, self.control, cfg.with_name(cfg.stem + ".experiments.json") if cfg is not None else None)
        self.inference.on_finished = self.experiments.on_finished
        self.watcher: Watcher | None = None
        self._cfg_timer: asyncio.TimerHandle | None = None  # debounces config-file events
        self.started = False
        self.stopping = False

    def _on_view(self, snapshot, changed: str | None) -> None:
        names = [changed] if changed is not None else sorted(set(snapshot.models) | set(self._available))
        for model in names:
            mv = snapshot.model(model)
            versions = mv.available if mv is not None else ()
            if self._available.get(model) == versions:
                continue
            before = self.router.referenced_versions(model)
            if mv is None and model not in self.router.configs():
                self._available.pop(model, None)
                self.router.remove_model(model)  # deleted and unrouted: forget its table
                continue
            self._available[model] = versions
            self.router.set_available(model, versions)
            if self.router.referenced_versions(model) != before:  # a pending label moved
                asyncio.get_running_loop().call_soon(self.manager.request_reconcile, model)

    async def start(self, wait_s: float = 300.0) -> None:
        """Read the routing config, start watching, load what the repository aspires."""
        if self.mirror is not None:
            await self.mirror.start()  # first sync; StoreError when the store can't be listed
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        loop = asyncio.get_running_loop()
        cfg = self.settings.config_path
        if cfg is not None and cfg.exists():
            # A bad file at start is fatal (like TF Serving's model config): nothing half-applied.
            for model, rc in load_config_file(cfg).items():
                validate_against(rc, scan_model(self.root / model).versions, model=model)
                self.router.set_config(model, rc)
        rs = self.settings.repository
        self.watcher = Watcher(polling=rs.polling, poll_interval_s=rs.poll_interval_s)
        self.watcher.watch(loop, self.root, self.manager.on_path_changed)
        if cfg is not None:
            cfg_abs = cfg.resolve()
            self.watcher.watch(loop, cfg_abs.parent,
                               lambda p: p.name == cfg_abs.name and self._config_touched(),
                               recursive=False)
        self.watcher.start()
        await self.manager.start()
        await self.settle(wait_s)
        self.experiments.start()
        self.started = True

    def _config_touched(self) -> None:
        loop = asyncio.get_running_loop()
        if self._cfg_timer is not None:
            self._cfg_timer.cancel()
        self._cfg_timer = loop.call_later(self.settings.repository.quiet_s / 2 + 0.05,
                                          self.control.reload_config_file)

    async def settle(self, timeout: float) -> None:
        await self.manager.settle_all(timeout)

    def ready(self) -> bool:
        return self.started and not self.stopping

    async def stop(self) -> None:
        self.stopping = True
        await self.experiments.stop()
        if self.mirror is not None:
            await self.mirror.stop()
        if self.watcher is not None:
            self.watcher.stop()
        await self.manager.close()
