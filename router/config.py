"""Routing config per model: labels, weights, sticky key, shadow.

Owns the value types and their whole-object validation. A `RouteConfig` that exists is
valid: construction checks every field, collects every fault and raises one
`RoutingError("invalid")` whose message names each field at fault and what was expected.
Values are frozen; the mappings are read-only views over private copies.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from router.errors import RoutingError

LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*")
_HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP token (RFC 9110)
_TOP_KEYS = ("labels", "weights", "sticky", "shadow")
_EMPTY: Mapping[Any, Any] = MappingProxyType({})


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _version(v: object) -> int | None:
    """A positive int version from an int or a string of digits ("2" from YAML/JSON keys)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return int(v) if v > 0 else None
    if isinstance(v, str) and v.isascii() and v.isdigit():
        n = int(v)
        return n if n > 0 else None
    return None


def _show(v: object) -> str:
    return repr(v) if isinstance(v, str) else str(v)


def _names(labels: Iterable[str]) -> str:
    return ", ".join(labels) or "none defined"


@dataclass(frozen=True, slots=True)
class StickyConfig:
    """Where the sticky key comes from: one request header or one request parameter."""

    header: str | None = None
    parameter: str | None = None

    def __post_init__(self) -> None:
        problems = _sticky_problems(self.header, self.parameter)
        if problems:
            raise RoutingError("invalid", "; ".join(problems), tuple(problems))

    def to_json(self) -> dict[str, str]:
        return {"header": self.header} if self.header is not None else {"parameter": str(self.parameter)}


def _sticky_problems(header: object, parameter: object) -> list[str]:
    if (header is None) == (parameter is None):
        return ["sticky: expected exactly one of 'header' or 'parameter'"]
    if header is not None and not (isinstance(header, str) and _HEADER_RE.fullmatch(header)):
        return [f"sticky.header: expected an HTTP header name, got {_show(header)}"]
    if parameter is not None and not (isinstance(parameter, str) and parameter):
        return [f"sticky.parameter: expected a non-empty parameter name, got {_show(parameter)}"]
    return []


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    """Mirror `percent` of the model's routed traffic to `target` (a label or a version)."""

    target: str | int
    percent: float

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "percent": self.percent}


@dataclass(frozen=True, slots=True, eq=True)
class RouteConfig:
    """One model's routing config. Weight keys are labels (str) or versions (int)."""

    labels: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    weights: Mapping[str | int, float] = field(default_factory=lambda: _EMPTY)
    sticky: StickyConfig | None = None
    shadow: ShadowConfig | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        labels = _parse_labels(self.labels, problems)
        weights = _parse_weights(self.weights, labels, problems)
        sticky = _parse_sticky(self.sticky, problems)
        shadow = _parse_shadow(self.shadow, labels, problems)
        if problems:
            raise RoutingError("invalid", "; ".join(problems), tuple(problems))
        object.__setattr__(self, "labels", MappingProxyType(labels))
        object.__setattr__(self, "weights", MappingProxyType(weights))
        object.__setattr__(self, "sticky", sticky)
        object.__setattr__(self, "shadow", shadow)

    @classmethod
    def from_json(cls, obj: object, *, model: str | None = None) -> RouteConfig:
        """Validate a JSON/YAML object whole; the error names every field at fault."""
        where = f"routing config for model '{model}'" if model is not None else "routing config"
        if obj is None:
            obj = {}
        if not isinstance(obj, Mapping):
            raise RoutingError("invalid", f"{where}: expected a mapping, got {type(obj).__name__}")
        problems = [f"unknown key {_show(k)} (expected: {', '.join(_TOP_KEYS)})" for k in obj if k not in _TOP_KEYS]
        try:
            config = cls(
                labels=_or_empty(obj.get("labels")),
                weights=_or_empty(obj.get("weights")),
                sticky=obj.get("sticky"),  # type: ignore[arg-type]  # parsed in __post_init__
                shadow=obj.get("shadow"),  # type: ignore[arg-type]
            )
        except RoutingError as e:
            problems.extend(e.problems)
        if problems:
            raise RoutingError("invalid", f"{where}: " + "; ".join(problems), tuple(problems))
        return config

    def to_json(self) -> dict[str, Any]:
        """The JSON object back (round trip with from_json); empty parts are left out."""
        out: dict[str, Any] = {}
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.weights:
            out["weights"] = {str(k): w for k, w in self.weights.items()}
        if self.sticky is not None:
            out["sticky"] = self.sticky.to_json()
        if self.shadow is not None:
            out["shadow"] = self.shadow.to_json()
        return out

    def target_of(self, ref: str | int) -> int:
        """The configured version a label or version reference names."""
        return ref if isinstance(ref, int) else self.labels[ref]

    def __reduce__(self) -> tuple[Any, ...]:  # read-only views do not pickle; rebuild instead
        return (_from_json, (self.to_json(),))


def _or_empty(v: object) -> object:
    return {} if v is None else v  # `labels:` with nothing under it in YAML


def _from_json(obj: object) -> RouteConfig:
    return RouteConfig.from_json(obj)


def _parse_labels(raw: object, problems: list[str]) -> dict[str, int]:
    if not isinstance(raw, Mapping):
        problems.append(f"labels: expected a mapping of label -> version, got {type(raw).__name__}")
        return {}
    out: dict[str, int] = {}
    for name, target in raw.items():
        if not (isinstance(name, str) and LABEL_RE.fullmatch(name)):
            problems.append(f"labels: label name {_show(name)} must match [A-Za-z][A-Za-z0-9_.-]*")
            continue
        v = _version(target)
        if v is None:
            problems.append(f"labels.{name}: expected a positive integer version, got {_show(target)}")
            continue
        out[name] = v
    return out


def _parse_weights(raw: object, labels: Mapping[str, int], problems: list[str]) -> dict[str | int, float]:
    if not isinstance(raw, Mapping):
        problems.append(f"weights: expected a mapping of label or version -> weight, got {type(raw).__name__}")
        return {}
    out: dict[str | int, float] = {}
    for key, w in raw.items():
        ref = _parse_ref(key, labels, f"weights.{key}", "weight key", problems)
        if not _is_number(w) or not math.isfinite(w) or w < 0:
            problems.append(f"weights.{key}: expected a finite number >= 0, got {_show(w)}")
            continue
        if ref is None:
            continue
        if ref in out:
            problems.append(f"weights.{key}: version {ref} is given twice")
            continue
        out[ref] = int(w) if isinstance(w, int) else float(w)
    if out and not sum(out.values()) > 0:
        problems.append("weights: the total must be positive (every weight is 0)")
    return out


def _parse_ref(raw: object, labels: Mapping[str, int], path: str, what: str, problems: list[str]) -> str | int | None:
    """A label (must be defined) or a version number; None after recording a problem."""
    v = _version(raw)
    if v is not None:
        return v
    if isinstance(raw, str) and raw in labels:
        return raw
    if isinstance(raw, str) and LABEL_RE.fullmatch(raw):
        problems.append(f"{path}: {what} '{raw}' is not a defined label (labels: {_names(labels)})")
    else:
        problems.append(f"{path}: expected a defined label or a positive integer version, got {_show(raw)}")
    return None


def _parse_sticky(raw: object, problems: list[str]) -> StickyConfig | None:
    if raw is None or isinstance(raw, StickyConfig):
        return raw
    if not isinstance(raw, Mapping):
        problems.append(f"sticky: expected {{header: NAME}} or {{parameter: NAME}}, got {type(raw).__name__}")
        return None
    unknown = [k for k in raw if k not in ("header", "parameter")]
    if unknown:
        problems.append(f"sticky: unknown key {_show(unknown[0])} (expected: header or parameter)")
        return None
    found = _sticky_problems(raw.get("header"), raw.get("parameter"))
    if found:
        problems.extend(found)
        return None
    return StickyConfig(header=raw.get("header"), parameter=raw.get("parameter"))


def _parse_shadow(raw: object, labels: Mapping[str, int], problems: list[str]) -> ShadowConfig | None:
    if raw is None:
        return None
    if isinstance(raw, ShadowConfig):
        raw = raw.to_json()
    if not isinstance(raw, Mapping):
        problems.append(f"shadow: expected {{target: LABEL_OR_VERSION, percent: 0..100}}, got {type(raw).__name__}")
        return None
    before = len(problems)
    for k in raw:
        if k not in ("target", "percent"):
            problems.append(f"shadow: unknown key {_show(k)} (expected: target, percent)")
    target: str | int | None = None
    if "target" not in raw:
        problems.append("shadow.target: required (a label or a version)")
    else:
        target = _parse_ref(raw["target"], labels, "shadow.target", "shadow target", problems)
    percent = raw.get("percent")
    if "percent" not in raw:
        problems.append("shadow.percent: required (a number from 0 to 100)")
    elif not _is_number(percent) or not math.isfinite(percent) or not 0 <= percent <= 100:
        problems.append(f"shadow.percent: expected a number from 0 to 100, got {_show(percent)}")
    if len(problems) > before or target is None:
        return None
    return ShadowConfig(target=target, percent=int(percent) if isinstance(percent, int) else float(percent))


def config_versions(config: RouteConfig) -> dict[str, int]:
    """Every version the config names directly, as 'what names it' -> version.

    Label weight keys and a label shadow target are covered by their label.
    """
    refs: dict[str, int] = {f"label '{n}'": v for n, v in config.labels.items()}
    for key in config.weights:
        if isinstance(key, int):
            refs[f"weight key {key}"] = key
    if config.shadow is not None and isinstance(config.shadow.target, int):
        refs[f"shadow target {config.shadow.target}"] = config.shadow.target
    return refs


def validate_against(config: RouteConfig, present_versions: Iterable[int], *, model: str | None = None) -> None:
    """Reject a config that names a version with no folder in the repository.

    Raises RoutingError("invalid") naming every such label, weight key and shadow target.
    """
    present = set(present_versions)
    shown = ", ".join(map(str, sorted(present))) or "none"
    problems = [
        f"{what} points at version {v}, which has no folder in the repository (present: {shown})"
        for what, v in config_versions(config).items()
        if v not in present
    ]
    if problems:
        where = f"model '{model}': " if model is not None else ""
        raise RoutingError("invalid", where + "; ".join(problems), tuple(problems))


EMPTY_CONFIG = RouteConfig()
