"""State-changing operations shared by every protocol: routing get/put (validated whole,
persisted atomically), config-file hot reload, and model load/unload.

Runs on the event loop. A rejected change raises `ServingError(INVALID_ARGUMENT)` and
changes nothing: not the router, not the file. A version with no folder is refused only
in new intent (an entry of a PUT or of the file that is new or names another version):
entries as the server already runs them stay, even in a changed document (a rollback, a
weights-only PUT), their missing versions unavailable (core.py warns), so a restart never
refuses them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from router import Router, RouteConfig, RoutingError, parse_config_text, validate_against
from runtime import errors
from runtime.routing.document import conflict
from runtime.routing.sources import ConfigSource
from runtime.lifecycle.manager import Manager
from runtime.config.settings import FileSettings, Settings
from runtime.types import VersionState

log = logging.getLogger("splitserve.control")


class Control:
    """Every state change, whatever the protocol: one token check, one audit line each."""

    def __init__(self, manager: Manager, router: Router, source: ConfigSource | None,
                 settings: Settings | None = None):
        self.manager = manager
        self.router = router
        self.source = source  # where routing lives (file, ConfigMap), or None: memory only
        self.settings = settings
        self.file_settings = FileSettings(settings) if settings is not None else None
        self._rejected_text: str | None = None  # the last document rejected, for retry_rejected
        self._write_lock = asyncio.Lock()

    # ---- authorization ------------------------------------------------------------
    def authorize(self, authorization: str | bytes | None, action: str) -> None:
        """UNAUTHENTICATED unless `authorization` is `Bearer <token>` (when a token is set).
        `authorization` is the HTTP header or gRPC metadata value as received."""
        token = self.settings.server.token if self.settings is not None else None
        if not token:
            return
        if isinstance(authorization, bytes):
            authorization = authorization.decode("latin-1")
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(),
                                                                 token.encode()):
            self.refused(action, "missing or wrong bearer token")
            raise errors.ServingError(errors.Code.UNAUTHENTICATED, "this call changes serving "
                                      "state and needs 'Authorization: Bearer <token>' with "
                                      "the server's token")

    @staticmethod
    def refused(action: str, reason: str) -> None:
        """The audit line of a refused state change (WARNING, one line)."""
        log.warning("event=state_change_refused action=%s reason=%r", action, reason)

    # ---- routing ------------------------------------------------------------------
    def routing(self, model: str) -> dict:
        self.manager.require(model)
        return self.router.routing_state(model)

    async def put_routing(self, model: str, obj: object) -> dict:
        async with self._write_lock:  # validated against the routes it replaces, none between
            view = self.manager.require(model)
            try:
                config = RouteConfig.from_json(obj, model=model)
                validate_against(config, set(view.present), model=model,
                                 running=self.router.get_config(model))
            except RoutingError as e:
                self.refused(f"put_routing model={model}", e.message)
                raise errors.invalid(e.message) from None
            if self.source is not None and not self.source.writable:
                self.refused(f"put_routing model={model}", "the config source is read-only")
                raise conflict(self.source.managed_by())  # before any change: nothing moves
            if self.source is not None:
                await self.source.write(model, config)  # CAS / atomic persist, or raises
            self.router.set_config(model, config)
        self.manager.request_reconcile(model)  # versions the new routes name become aspired
        state = self.router.routing_state(model)
        effective = state.get("effective", {})
        pending = {k: v for k, v in (effective.get("pending_labels") or {}).items()
                   if v not in effective.get("missing", ())}  # kept without a folder: the note says so
        if pending:
            state["note"] = ("label(s) " + ", ".join(f"{k} -> {v}" for k, v in pending.items()) +
                             " move once that version is AVAILABLE; it is being loaded")
        log.info("event=routing_changed model=%s config=%s", model,
                 json.dumps(config.to_json(), sort_keys=True, separators=(",", ":")))
        return state

    def retry_rejected(self) -> bool:
        """Apply a rejected document again, quietly: across replicas, one may name a version
        this replica had not scanned yet; it applies once that version is here."""
        text = self._rejected_text
        return text is not None and self.reload_config_file(text, quiet=True)

    def reload_config_file(self, text: str | None = None, quiet: bool = False) -> bool:
        """Apply the config file (hot reload), or `text` as the config source read it.
        An invalid document is logged and ignored."""
        if self.source is None:
            return False
        where = self.source.name
        if text is None:  # the source says the document became unreadable: read it to say why
            try:
                text = self.source.read()
                if text is None:
                    raise RoutingError("missing", f"{where}: no such routing config file")
            except (OSError, UnicodeDecodeError, RoutingError) as e:
                if not quiet:
                    log.error("event=config_rejected source=%r keeping=last_good reason=%r",
                              str(where), getattr(e, "message", None) or str(e))
                return False
        if self.file_settings is not None:  # server:/limits:/...: live keys applied, others WARNING
            self.file_settings.reload(text)
        try:
            configs = parse_config_text(text, str(where))
            snap, running = self.manager.view(), self.router.configs()
            for model, cfg in configs.items():  # entries as they serve now are not new intent
                mv = snap.model(model)
                validate_against(cfg, set(mv.present) if mv else set(), model=model,
                                 running=running.get(model))
        except RoutingError as e:
            self._rejected_text = text
            if quiet:
                return False
            log.error("event=config_rejected source=%r keeping=last_good reason=%r",
                      str(where), e.message)
            return False
        self._rejected_text = None
        current = self.router.configs()
        changed = False
        for model in set(current) | set(configs):
            new = configs.get(model)
            if current.get(model) != new:
                self.router.set_config(model, new)
                self.manager.request_reconcile(model)
                changed = True
        if changed:
            log.info("event=config_applied source=%r models=%s", str(where), sorted(configs))
        return changed

    # ---- repository ---------------------------------------------------------------
    async def load(self, model: str) -> None:
        await self.manager.load_model(model)

    async def unload(self, model: str) -> None:
        await self.manager.unload_model(model)

    def ready(self, model: str, version: int | None) -> bool:
        mv = self.manager.require(model)
        if version is None:
            return bool(mv.available)
        v = mv.version(version)
        return v is not None and v.state is VersionState.AVAILABLE
