"""Router: per-model configs and compiled routing tables; `pick` is the hot path.

Runs on the event loop for every change (set_config, set_available), which compiles a new
table and swaps the model -> table map whole; `pick` may run on any thread and only
reads. The router treats a model it has never heard of as one with an empty config and
no AVAILABLE version: whether a model exists is the runtime's business, not the router's.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from router.config import EMPTY_CONFIG, RouteConfig, config_versions
from router.errors import RoutingError
from router.table import RouteDecision, RoutingTable

__all__ = ["Router", "RouteDecision"]


class Router:
    """Owns every model's RouteConfig and RoutingTable (both replaced whole, never mutated).

    `seed` seeds the unkeyed-draw RNG (None: seeded from the OS).
    """

    def __init__(self, configs: Mapping[str, RouteConfig] | None = None, seed: int | None = None) -> None:
        self._rng = random.Random(seed)
        self._configs: dict[str, RouteConfig] = {}
        self._available: dict[str, frozenset[int]] = {}
        self._present: dict[str, frozenset[int]] = {}  # version folders, where the runtime said
        self._tables: dict[str, RoutingTable] = {}
        self._listeners: list[Callable[[str], None]] = []
        for model, config in (configs or {}).items():
            self.set_config(model, config)

    # -- changes (event loop) ---------------------------------------------------------

    def subscribe(self, fn: Callable[[str], None]) -> None:
        """Call `fn(model)` after each set_config that changed the model's config (metrics
        keep a baseline there: the A/B summary's `since=routing` window)."""
        self._listeners.append(fn)

    def set_config(self, model: str, config: RouteConfig | None) -> None:
        """Replace the model's config (None removes it) and recompile its table."""
        if config is not None and not isinstance(config, RouteConfig):
            raise TypeError(f"expected a RouteConfig, got {type(config).__name__}")
        configs = dict(self._configs)
        changed = configs.get(model) != config
        if config is None:
            configs.pop(model, None)
        else:
            configs[model] = config
        self._configs = configs
        self._rebuild(model)
        if changed:
            for fn in self._listeners:
                fn(model)

    def set_available(self, model: str, versions: Iterable[int], present: Iterable[int] | None = None) -> None:
        """Record the model's AVAILABLE versions (and, when given, the version folders in the
        repository, so routes naming a deleted folder say so) and recompile its table."""
        self._available = {**self._available, model: frozenset(versions)}
        if present is not None:
            self._present = {**self._present, model: frozenset(present)}
        self._rebuild(model)

    def available(self, model: str) -> frozenset[int] | None:
        """The model's AVAILABLE versions as the runtime last said, or None if it never did."""
        return self._available.get(model)

    def remove_model(self, model: str) -> None:
        """Forget the model entirely (its folder is gone)."""
        self._configs = {m: c for m, c in self._configs.items() if m != model}
        self._available = {m: a for m, a in self._available.items() if m != model}
        self._present = {m: a for m, a in self._present.items() if m != model}
        self._tables = {m: t for m, t in self._tables.items() if m != model}

    def _rebuild(self, model: str) -> None:
        old = self._tables.get(model)
        table = RoutingTable.compile(
            model,
            self._configs.get(model, EMPTY_CONFIG),
            self._available.get(model, ()),
            previous_labels=old.labels if old is not None else None,
            present=self._present.get(model),
        )
        self._tables = {**self._tables, model: table}

    # -- reads (any thread) -----------------------------------------------------------

    def pick(
        self, model: str, *, version: int | None = None, label: str | None = None, key: str | None = None
    ) -> RouteDecision:
        """Route one request: an explicit version, else an explicit label, else the split.

        A pinned version is returned as-is (the runtime checks it is AVAILABLE) and is never
        shadowed. A label or split pick gets `shadow` when drawn (by `key` when given).
        Raises RoutingError: "not_found" (unknown label), "unavailable" (nothing AVAILABLE),
        "invalid" (a version that is not a positive int).
        """
        table = self._tables.get(model)
        if version is not None:
            if version.__class__ is not int or version < 1:
                raise RoutingError("invalid", f"version must be a positive integer, got {version!r}")
            if table is None:
                return RouteDecision(version, "pinned", None)
            return table.pick_pinned(version)
        if table is None:
            table = self._empty(model)
        if label is not None:
            return table.pick_label(label, key, self._rng)
        if key is None:
            return table.pick_split(self._rng)
        return table.pick_sticky(key)

    def sticky_key(self, model: str, headers: Mapping[str, str], parameters: Mapping[str, Any]) -> str | None:
        """The request's sticky key per the model's sticky config, or None (unkeyed).

        Header names match case-insensitively; an empty value counts as no key.
        """
        sticky = self.get_config(model).sticky
        if sticky is None:
            return None
        if sticky.header is not None:
            value = _header(headers, sticky.header)
        else:
            value = parameters.get(sticky.parameter) if parameters else None  # type: ignore[arg-type]
        if value is None or isinstance(value, (dict, list, tuple)):
            return None
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        value = str(value)
        return value or None

    def get_config(self, model: str) -> RouteConfig:
        return self._configs.get(model, EMPTY_CONFIG)

    def configs(self) -> dict[str, RouteConfig]:
        """A copy of every model's config."""
        return dict(self._configs)

    def table(self, model: str) -> RoutingTable:
        """The model's current table (an empty one for a model never heard of)."""
        return self._tables.get(model) or self._empty(model)

    def referenced_versions(self, model: str) -> frozenset[int]:
        """Versions the routes name: label targets, weight versions, the shadow target, and
        the versions pending labels still resolve to. The runtime adds these to the
        aspired set so they stay loaded; recompute it after each set_available, since a
        label that moves releases its old version."""
        refs = set(config_versions(self.get_config(model)).values())
        table = self._tables.get(model)
        if table is not None:
            refs.update(table.labels.values())
        return frozenset(refs)

    def missing_routes(self, model: str) -> tuple[dict[str, int], dict[int, float]]:
        """What the routes name that has no folder ("label 'stable'" -> 1), and the split
        traffic takes without those versions once the versions present are AVAILABLE
        (version -> fraction; what a WARNING about the missing folders reports)."""
        table = self.table(model)
        if not table.missing:
            return {}, dict(table.weights)
        names = {what: v for what, v in config_versions(table.config).items() if v in table.missing}
        without = (table.available | self._present.get(model, frozenset())) - set(table.missing)
        split = RoutingTable.compile(model, table.config, without, table.labels, self._present.get(model))
        return names, dict(split.weights)

    def routing_state(self, model: str) -> dict[str, Any]:
        return self.table(model).state()

    def models(self) -> list[str]:
        """Every model with a config or a recorded AVAILABLE set, sorted."""
        return sorted(self._tables)

    def _empty(self, model: str) -> RoutingTable:
        return RoutingTable.compile(model, EMPTY_CONFIG, ())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        value = headers.get(lower)
        if value is None:
            for k, v in headers.items():
                if k.lower() == lower:
                    return v
    return value
