"""RoutingTable: one model's routes, compiled from its config and its AVAILABLE versions.

A table is frozen and answers picks with no allocation on the hot path: bands and every
possible RouteDecision are built at compile time. The event loop compiles a new table
whenever the config or the AVAILABLE set changes; readers on any thread keep using the
table they fetched.

Effective routes:
- weights resolve to versions (a label key through its effective label); versions not
  AVAILABLE get no share, theirs goes to the rest in proportion; with no weights, or none
  of the weighted versions AVAILABLE, everything goes to the newest AVAILABLE version;
- a label whose configured target is not AVAILABLE keeps resolving to its previous
  effective target (when that is still AVAILABLE) and is listed as pending: the target is
  loaded first and the label moves once it is AVAILABLE;
- the shadow target resolves the same way and is used only while AVAILABLE;
- a routed version whose folder is gone from the repository (`present` given and not
  naming it) is unavailable like any other, and the notes say its folder is gone, so
  the operator knows to restore the folder or change the routes rather than to wait.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from router.assign import Bands, fractions, key_prefix, layout, unit_pair
from router.config import RouteConfig, config_versions
from router.errors import RoutingError


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where one request goes: `version`, `how` it was chosen, and a `shadow` copy target.

    how: "pinned" (explicit version), "label" (explicit label), "sticky" (keyed split),
    "split" (unkeyed split). shadow: an AVAILABLE version other than `version`, or None.
    """

    version: int
    how: str
    shadow: int | None = None


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Compiled routes of one model; build with `RoutingTable.compile`."""

    model: str
    config: RouteConfig
    available: frozenset[int]
    labels: Mapping[str, int]  # effective label -> version (always AVAILABLE)
    pending_labels: Mapping[str, int]  # label -> configured target not AVAILABLE yet
    weights: Mapping[int, float]  # effective fractions over AVAILABLE versions
    unavailable: tuple[int, ...]  # configured versions that are not AVAILABLE
    missing: tuple[int, ...]  # configured versions with no folder in the repository
    shadow_target: int | None  # resolved and AVAILABLE, else None
    shadow_p: float  # shadow fraction in [0, 1]; 0 when no usable target
    note: str
    # Hot path, all precomputed.
    prefix: bytes
    bands: Bands  # configured layout, AVAILABLE or not (keys keep their place)
    band_live: tuple[int, ...]  # band -> index into `live`, or -1 when not AVAILABLE
    live: Bands  # layout of the effective weights
    split: tuple[tuple[RouteDecision, RouteDecision], ...]  # live index -> (plain, shadowed)
    sticky: tuple[tuple[RouteDecision, RouteDecision], ...]
    by_label: Mapping[str, tuple[RouteDecision, RouteDecision]]
    pinned: Mapping[int, RouteDecision]

    @classmethod
    def compile(
        cls,
        model: str,
        config: RouteConfig,
        available: Iterable[int],
        previous_labels: Mapping[str, int] | None = None,
        present: Iterable[int] | None = None,
    ) -> RoutingTable:
        """`present`: the version folders in the repository (None: not known, none missing)."""
        avail = frozenset(available)
        newest = max(avail, default=None)
        prev = previous_labels or {}
        notes: list[str] = []
        referenced = set(config_versions(config).values())
        missing = frozenset() if present is None else frozenset(referenced - set(present))

        def why(v: int) -> str:
            return "whose folder is gone from the repository" if v in missing else "which is not AVAILABLE yet"

        labels: dict[str, int] = {}
        pending: dict[str, int] = {}
        for name, target in config.labels.items():
            if target in avail:
                labels[name] = target
                continue
            pending[name] = target
            was = prev.get(name)
            if was is not None and was in avail:
                labels[name] = was
                notes.append(
                    f"label '{name}' moves to version {target} once it is AVAILABLE; until then it resolves to {was}"
                )
            else:
                notes.append(f"label '{name}' points at version {target}, {why(target)}")

        def resolve(ref: str | int) -> int:
            return ref if isinstance(ref, int) else labels.get(ref, config.labels[ref])

        configured: dict[int, float] = {}
        for ref, w in config.weights.items():
            v = resolve(ref)
            configured[v] = configured.get(v, 0) + w
        live_w = {v: w for v, w in configured.items() if v in avail and w > 0}
        dead = sorted(v for v, w in configured.items() if v not in avail and w > 0)
        if live_w and dead:
            gone = [v for v in dead if v in missing]
            notes.append(
                f"{_plural(dead)} not AVAILABLE"
                + (f" ({_plural(gone, 'folder')} gone from the repository)" if gone else "")
                + ": the share goes to "
                f"{', '.join(map(str, sorted(live_w)))} in proportion to their weights"
            )
        if not live_w and newest is not None:
            live_w = {newest: 1.0}
            if configured:
                notes.append(
                    f"none of the weighted versions ({', '.join(map(str, dead))}) is AVAILABLE: "
                    f"all traffic falls back to the newest AVAILABLE version {newest}"
                )
            else:
                notes.append(f"no weights configured: all traffic goes to the newest AVAILABLE version {newest}")
        if newest is None:
            notes.append("no AVAILABLE version: only requests that pin a version are routed")

        shadow_target, shadow_p = None, 0.0
        if config.shadow is not None:
            t = resolve(config.shadow.target)
            if t in avail:
                shadow_target, shadow_p = t, config.shadow.percent / 100.0
            else:
                gone = " (its folder is gone from the repository)" if t in missing else ""
                notes.append(f"shadow target version {t} is not AVAILABLE{gone}: shadowing is paused")

        live = layout(live_w)
        bands = layout(configured) if configured else live
        index = {v: i for i, v in enumerate(live.versions)}
        band_live = tuple(index.get(v, -1) for v in bands.versions)

        def pair(v: int, how: str) -> tuple[RouteDecision, RouteDecision]:
            plain = RouteDecision(v, how, None)
            shadowed = RouteDecision(v, how, shadow_target) if shadow_target not in (None, v) else plain
            return plain, shadowed

        return cls(
            model=model,
            config=config,
            available=avail,
            labels=MappingProxyType(labels),
            pending_labels=MappingProxyType(pending),
            weights=MappingProxyType(fractions(live_w)),
            unavailable=tuple(sorted(referenced - avail)),
            missing=tuple(sorted(missing)),
            shadow_target=shadow_target,
            shadow_p=shadow_p,
            note="; ".join(notes),
            prefix=key_prefix(model),
            bands=bands,
            band_live=band_live,
            live=live,
            split=tuple(pair(v, "split") for v in live.versions),
            sticky=tuple(pair(v, "sticky") for v in live.versions),
            by_label=MappingProxyType({n: pair(v, "label") for n, v in labels.items()}),
            pinned=MappingProxyType({v: RouteDecision(v, "pinned", None) for v in avail}),
        )

    # -- hot path ---------------------------------------------------------------------

    def pick_split(self, rng: random.Random) -> RouteDecision:
        if not self.split:
            raise self._unavailable()
        plain, shadowed = self.split[bisect_right(self.live.edges, rng.random())]
        if self.shadow_p and rng.random() < self.shadow_p:
            return shadowed
        return plain

    def pick_sticky(self, key: str) -> RouteDecision:
        if not self.sticky:
            raise self._unavailable()
        u, s = unit_pair(self.prefix, key)
        i = bisect_right(self.bands.edges, u)
        j = self.band_live[i]
        if j < 0:  # the key's version is not AVAILABLE: spread over the live bands
            j = bisect_right(self.live.edges, self.bands.rescale(i, u))
        plain, shadowed = self.sticky[j]
        return shadowed if s < self.shadow_p else plain

    def pick_label(self, label: str, key: str | None, rng: random.Random) -> RouteDecision:
        found = self.by_label.get(label)
        if found is None:
            raise self._no_label(label)
        if self.shadow_p:
            s = unit_pair(self.prefix, key)[1] if key is not None else rng.random()
            if s < self.shadow_p:
                return found[1]
        return found[0]

    def pick_pinned(self, version: int) -> RouteDecision:
        found = self.pinned.get(version)
        return found if found is not None else RouteDecision(version, "pinned", None)

    # -- errors and state -------------------------------------------------------------

    def _unavailable(self) -> RoutingError:
        return RoutingError("unavailable", f"model '{self.model}' has no AVAILABLE version")

    def _no_label(self, label: str) -> RoutingError:
        target = self.config.labels.get(label)
        if target is not None:
            why = "whose folder is gone from the repository" if target in self.missing else "which is not AVAILABLE yet"
            return RoutingError("unavailable", f"label '{label}' of model '{self.model}' points at version {target}, {why}")
        names = ", ".join(self.config.labels) or "none defined"
        return RoutingError("not_found", f"model '{self.model}' has no label '{label}' (labels: {names})")

    def state(self) -> dict[str, Any]:
        """JSON-able routing state: the config as given and the effective routes."""
        cfg = self.config.to_json()
        return {
            "model": self.model,
            "labels": cfg.get("labels", {}),
            "weights": cfg.get("weights", {}),
            "sticky": cfg.get("sticky"),
            "shadow": cfg.get("shadow"),
            "experiment": cfg.get("experiment"),
            "effective": {
                "available": sorted(self.available),
                "weights": {str(v): f for v, f in self.weights.items()},
                "labels": dict(self.labels),
                "pending_labels": dict(self.pending_labels),
                "unavailable": list(self.unavailable),
                "missing": list(self.missing),
                "shadow": (
                    {"target": self.shadow_target, "percent": self.config.shadow.percent}  # type: ignore[union-attr]
                    if self.shadow_target is not None
                    else None
                ),
                "note": self.note,
            },
        }


def _plural(versions: list[int], what: str = "") -> str:
    """'version 1 is' / 'versions 1, 2 are'; with `what`: "version 1's folder is" / "... folders are"."""
    if len(versions) == 1:
        return f"version {versions[0]}'s {what} is" if what else f"version {versions[0]} is"
    listed = ", ".join(map(str, versions))
    return f"versions {listed}' {what}s are" if what else f"versions {listed} are"
