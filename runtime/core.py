"""The one runtime every server shares: router, manager, inference service, metrics,
control, and the watchers that feed them. Protocol-free; `server/app.py` puts servers
in front of it.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from router import Router, parse_config_text, validate_against
from runtime.batcher import make_batcher
from runtime.configsource import make_source
from runtime.control import Control
from runtime.inference import InferenceService
from runtime.manager import Manager
from runtime.metrics import Metrics
from runtime.repository import scan_model
from runtime.settings import Settings
from runtime.watch import Watcher

log = logging.getLogger("splitserve.core")


class Core:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.root = Path(settings.repository.path).resolve()
        self.router = Router()
        self.metrics = Metrics(self.router)
        self.manager = Manager(self.root, settings.repository,
                               referenced=self.router.referenced_versions,
                               on_change=self._on_available,
                               make_batcher=lambda h: make_batcher(h, self.metrics),
                               on_event=self.metrics.lifecycle_event)
        self.metrics.manager = self.manager
        self.inference = InferenceService(self.manager, self.router, settings.limits,
                                          self.metrics, settings.shadow_max_inflight)
        self.control = Control(self.manager, self.router, settings.config_path)
        self.watcher: Watcher | None = None
        self.source = None  # runtime.configsource: where routing lives (file, ConfigMap)
        self.started = False
        self.stopping = False

    def _on_available(self, model: str, versions: list[int]) -> None:
        before = self.router.referenced_versions(model)
        self.router.set_available(model, versions)
        if self.router.referenced_versions(model) != before:
            self.manager.request_reconcile(model)  # a pending label moved: re-aspire
        self.control.retry_rejected()  # a document naming this version may apply now

    async def start(self, wait_s: float | None = None) -> None:
        """Read the routing config, start watching, load what the repository aspires.
        One deadline (`server.start_timeout_s`) covers every model; past it, TimeoutError."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"model repository {self.root} is not a directory")
        loop = asyncio.get_running_loop()
        source = self.source = make_source(self.settings)
        if source is not None:
            # A bad document at start is fatal (like TF Serving's model config): nothing half-applied.
            text = await asyncio.to_thread(source.read)
            if text is not None:
                for model, rc in parse_config_text(text, source.name).items():
                    validate_against(rc, scan_model(self.root / model).versions, model=model)
                    self.router.set_config(model, rc)
            self.control.source = source
        rs = self.settings.repository
        self.watcher = Watcher(polling=rs.polling, poll_interval_s=rs.poll_interval_s)
        self.watcher.watch(loop, self.root, self.manager.on_path_changed)
        self.watcher.start()
        if source is not None:
            source.start(loop, self.control.reload_config_file)
        await self.manager.start()
        wait_s = self.settings.server.start_timeout_s if wait_s is None else wait_s
        if not await self.settle(wait_s):
            busy = [m for m, e in self.manager.models.items() if not e.serving]
            raise TimeoutError(f"start deadline of {wait_s:g}s (server.start_timeout_s) passed "
                               f"with models still loading: {', '.join(busy) or '-'}")
        self.started = True

    async def settle(self, timeout: float) -> bool:
        """Wait, under one deadline for all models, until nothing loads; False past it."""
        deadline = asyncio.get_running_loop().time() + timeout
        for name in list(self.manager.models):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not await self.manager.settle(name, left):
                return False
        return True

    def ready(self) -> bool:
        return self.started and not self.stopping

    async def stop(self) -> None:
        self.stopping = True
        if self.watcher is not None:
            self.watcher.stop()
        if self.source is not None:
            self.source.stop()
        await self.manager.close()
