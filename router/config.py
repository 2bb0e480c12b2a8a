"""Routing config per model: labels, weights, sticky key, shadow, experiment.

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
_TOP_KEYS = ("labels", "weights", "sticky", "shadow", "experiment")
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
    experiment: ExperimentConfig | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        labels = _parse_labels(self.labels, problems)
        weights = _parse_weights(self.weights, labels, problems)
        sticky = _parse_sticky(self.sticky, problems)
        shadow = _parse_shadow(self.shadow, labels, problems)
        experiment = parse_experiment(self.experiment, labels, weights, problems)
        if problems:
            raise RoutingError("invalid", "; ".join(problems), tuple(problems))
        object.__setattr__(self, "labels", MappingProxyType(labels))
        object.__setattr__(self, "weights", MappingProxyType(weights))
        object.__setattr__(self, "sticky", sticky)
        object.__setattr__(self, "shadow", shadow)
        object.__setattr__(self, "experiment", experiment)

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
                experiment=obj.get("experiment"),  # type: ignore[arg-type]
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
        if self.experiment is not None:
            out["experiment"] = self.experiment.to_json()
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
        out[str(name)] = v  # plain str: a quoted YAML key is a str subclass that JSON encoders refuse as a key
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
        return str(raw)
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


# --- experiment: progressive steps with guardrails, judged by experiments/ -----------------

_EXP_KEYS = ("control", "candidate", "steps", "interval_s", "min_requests", "min_duration_s", "guardrails",
             "outcomes", "alpha", "promote", "planned_n", "holdback", "holdback_intervals", "feedback_window_s")
# Optional fields of issue 29, written out only when they differ from these defaults (so a
# block that does not use them round-trips unchanged and keeps its fingerprint).
DEFAULT_PLANNED_N = 5000
DEFAULT_HOLDBACK = 5
DEFAULT_HOLDBACK_INTERVALS = 10
DEFAULT_FEEDBACK_WINDOW_S = 3600
DEFAULT_WINDOW_INTERVALS = 10
_METRIC_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")
MAX_STEPS = 20
MAX_OUTCOMES = 16


@dataclass(frozen=True, slots=True)
class ErrorGuardrail:
    """Alarm when the candidate's error rate exceeds `max_ratio` x the control's."""

    max_ratio: float

    def to_json(self) -> dict[str, Any]:
        return {"max_ratio": self.max_ratio}


@dataclass(frozen=True, slots=True)
class LatencyGuardrail:
    """Alarm when the candidate's `quantile` latency exceeds `max_ratio` x the control's."""

    quantile: float
    max_ratio: float

    def to_json(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "max_ratio": self.max_ratio}


@dataclass(frozen=True, slots=True)
class OutcomeSpec:
    """A metric reported through feedback: binary (0/1) or continuous, and which way is better."""

    metric: str
    kind: str  # "binary" | "continuous"
    goal: str  # "increase" | "decrease"
    margin: float = 0  # non-inferiority margin in the metric's units (promotion needs lower bound > -margin)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"metric": self.metric, "kind": self.kind, "goal": self.goal}
        if self.margin:
            out["margin"] = self.margin
        return out


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    """A progressive experiment of `candidate` against `control` (labels or versions).

    Built only by `parse_experiment` (inside RouteConfig), so one that exists is valid:
    steps strictly increase within (0, 100], the two arms are different versions, and the
    model's weights name no version but these two (the experiment owns the split).
    """

    control: str | int
    candidate: str | int
    steps: tuple[float, ...]
    interval_s: float = 30
    min_requests: int = 500
    min_duration_s: float = 300
    errors: ErrorGuardrail | None = ErrorGuardrail(1.5)
    latency: LatencyGuardrail | None = None
    outcomes: tuple[OutcomeSpec, ...] = ()
    alpha: float = 0.05
    promote: str = "auto"  # "auto" | "manual"
    planned_n: int = DEFAULT_PLANNED_N  # per arm: the mixture is tuned to be tightest there
    holdback: float = DEFAULT_HOLDBACK  # percent kept on the control at a last step of 100
    holdback_intervals: int = DEFAULT_HOLDBACK_INTERVALS  # judged intervals at the holdback step
    feedback_window_s: float = DEFAULT_FEEDBACK_WINDOW_S  # feedback later than this is late
    window_intervals: int = DEFAULT_WINDOW_INTERVALS  # guardrail evidence restarts this often

    def to_json(self) -> dict[str, Any]:
        """Every original field, defaults included, so the persisted document shows what runs;
        the optional fields of issue 29 only when they differ from their defaults."""
        guardrails: dict[str, Any] = {}
        if self.errors is not None:
            guardrails["errors"] = self.errors.to_json()
        if self.latency is not None:
            guardrails["latency"] = self.latency.to_json()
        if self.window_intervals != DEFAULT_WINDOW_INTERVALS:
            guardrails["window_intervals"] = self.window_intervals
        out = {
            "control": self.control,
            "candidate": self.candidate,
            "steps": list(self.steps),
            "interval_s": self.interval_s,
            "min_requests": self.min_requests,
            "min_duration_s": self.min_duration_s,
            "guardrails": guardrails,
            "outcomes": [o.to_json() for o in self.outcomes],
            "alpha": self.alpha,
            "promote": self.promote,
        }
        for key, default in (("planned_n", DEFAULT_PLANNED_N), ("holdback", DEFAULT_HOLDBACK),
                             ("holdback_intervals", DEFAULT_HOLDBACK_INTERVALS),
                             ("feedback_window_s", DEFAULT_FEEDBACK_WINDOW_S)):
            if getattr(self, key) != default:
                out[key] = getattr(self, key)
        return out

    def outcome(self, metric: str) -> OutcomeSpec | None:
        return next((o for o in self.outcomes if o.metric == metric), None)


def _num(v: object) -> int | float:
    return int(v) if isinstance(v, int) else float(v)  # type: ignore[arg-type]


def _number(raw: Mapping[Any, Any], key: str, path: str, default: Any, ok: Any, expected: str,
            problems: list[str]) -> Any:
    """raw[key] when it is a finite number that satisfies `ok`; else record a problem."""
    if key not in raw or raw[key] is None:
        if default is _REQUIRED:
            problems.append(f"{path}.{key}: required ({expected})")
        return default
    v = raw[key]
    if not _is_number(v) or not math.isfinite(v) or not ok(v):
        problems.append(f"{path}.{key}: expected {expected}, got {_show(v)}")
        return default
    return _num(v)


_REQUIRED = object()


def _unknown(raw: Mapping[Any, Any], allowed: tuple[str, ...], path: str, problems: list[str]) -> None:
    for k in raw:
        if k not in allowed:
            problems.append(f"{path}: unknown key {_show(k)} (expected: {', '.join(allowed)})")


def parse_experiment(raw: object, labels: Mapping[str, int], weights: Mapping[str | int, float],
                     problems: list[str]) -> ExperimentConfig | None:
    """The `experiment:` block validated whole; every fault goes to `problems`."""
    if raw is None:
        return None
    if isinstance(raw, ExperimentConfig):
        raw = raw.to_json()
    p = "experiment"
    if not isinstance(raw, Mapping):
        problems.append(f"{p}: expected a mapping with control, candidate and steps, got {type(raw).__name__}")
        return None
    before = len(problems)
    _unknown(raw, _EXP_KEYS, p, problems)
    arms: dict[str, str | int | None] = {}
    for role in ("control", "candidate"):
        if raw.get(role) is None:
            problems.append(f"{p}.{role}: required (a label or a version)")
            arms[role] = None
        else:
            arms[role] = _parse_ref(raw[role], labels, f"{p}.{role}", f"{role}", problems)
    control, candidate = arms["control"], arms["candidate"]
    resolved = {r: (ref if isinstance(ref, int) else labels[ref]) for r, ref in arms.items() if ref is not None}
    if len(resolved) == 2 and resolved["control"] == resolved["candidate"]:
        problems.append(f"{p}: control and candidate are both version {resolved['control']}; they must differ")
    elif len(resolved) == 2:
        def version_of(ref: str | int) -> int:
            return ref if isinstance(ref, int) else labels.get(ref, -1)

        others = sorted({str(k) for k in weights if version_of(k) not in resolved.values()})
        if others:
            problems.append(f"{p}: the experiment owns the split, so weights may name only the control and the "
                            f"candidate (also found: {', '.join(others)})")
    steps = _parse_steps(raw.get("steps"), "steps" in raw, p, problems)
    interval_s = _number(raw, "interval_s", p, 30, lambda v: 0 < v <= 86400, "a number of seconds in (0, 86400]",
                         problems)
    min_requests = raw.get("min_requests", 500)
    if min_requests is None:
        min_requests = 500
    if not (isinstance(min_requests, int) and not isinstance(min_requests, bool) and min_requests >= 0):
        problems.append(f"{p}.min_requests: expected an integer >= 0, got {_show(min_requests)}")
        min_requests = 500
    min_duration_s = _number(raw, "min_duration_s", p, 300, lambda v: v >= 0, "a number of seconds >= 0", problems)
    guardrails = raw.get("guardrails")  # absent or empty: the default errors guardrail; {}: none
    errors, latency = _parse_guardrails(_DEFAULT_GUARDRAILS if guardrails is None else guardrails, p, problems)
    outcomes = _parse_outcomes(raw.get("outcomes"), p, problems)
    alpha = _number(raw, "alpha", p, 0.05, lambda v: 0 < v <= 0.5, "a number in (0, 0.5]", problems)
    promote = raw.get("promote", "auto")
    if promote not in ("auto", "manual"):
        problems.append(f"{p}.promote: expected 'auto' or 'manual', got {_show(promote)}")
    promote = str(promote)
    planned_n = _integer(raw, "planned_n", p, DEFAULT_PLANNED_N, 2, problems)
    holdback = _number(raw, "holdback", p, DEFAULT_HOLDBACK, lambda v: 0 < v < 50, "a percentage in (0, 50)",
                       problems)
    holdback_intervals = _integer(raw, "holdback_intervals", p, DEFAULT_HOLDBACK_INTERVALS, 1, problems)
    feedback_window_s = _number(raw, "feedback_window_s", p, DEFAULT_FEEDBACK_WINDOW_S, lambda v: 0 < v <= 7 * 86400,
                                "a number of seconds in (0, 604800]", problems)
    window_intervals = DEFAULT_WINDOW_INTERVALS
    if isinstance(guardrails, Mapping):
        window_intervals = _integer(guardrails, "window_intervals", f"{p}.guardrails", DEFAULT_WINDOW_INTERVALS, 1,
                                    problems)
    if len(problems) > before or control is None or candidate is None or steps is None:
        return None
    return ExperimentConfig(control=control, candidate=candidate, steps=steps, interval_s=interval_s,
                            min_requests=min_requests, min_duration_s=min_duration_s, errors=errors,
                            latency=latency, outcomes=outcomes, alpha=alpha, promote=promote, planned_n=planned_n,
                            holdback=holdback, holdback_intervals=holdback_intervals,
                            feedback_window_s=feedback_window_s, window_intervals=window_intervals)


def _integer(raw: Mapping[Any, Any], key: str, path: str, default: int, minimum: int, problems: list[str]) -> int:
    v = raw.get(key)
    if v is None:
        return default
    if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
        problems.append(f"{path}.{key}: expected an integer >= {minimum}, got {_show(v)}")
        return default
    return int(v)


_DEFAULT_GUARDRAILS = {"errors": {"max_ratio": 1.5}}


def _parse_steps(raw: object, given: bool, p: str, problems: list[str]) -> tuple[float, ...] | None:
    expected = "a list of candidate weights in percent, strictly increasing within (0, 100]"
    if not given or raw is None:
        problems.append(f"{p}.steps: required ({expected})")
        return None
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Iterable) or isinstance(raw, Mapping):
        problems.append(f"{p}.steps: expected {expected}, got {type(raw).__name__}")
        return None
    items = list(raw)
    if not items or len(items) > MAX_STEPS:
        problems.append(f"{p}.steps: expected 1 to {MAX_STEPS} steps, got {len(items)}")
        return None
    out: list[float] = []
    for i, v in enumerate(items):
        if not _is_number(v) or not math.isfinite(v) or not 0 < v <= 100:
            problems.append(f"{p}.steps[{i}]: expected a percentage in (0, 100], got {_show(v)}")
            return None
        if out and v <= out[-1]:
            problems.append(f"{p}.steps[{i}]: steps must strictly increase, got {_show(v)} after {_show(out[-1])}")
            return None
        out.append(_num(v))
    return tuple(out)


def _parse_guardrails(raw: object, p: str, problems: list[str]) -> tuple[ErrorGuardrail | None,
                                                                          LatencyGuardrail | None]:
    p = f"{p}.guardrails"
    if not isinstance(raw, Mapping):
        problems.append(f"{p}: expected a mapping with errors and/or latency, got {type(raw).__name__}")
        return None, None
    _unknown(raw, ("errors", "latency", "window_intervals"), p, problems)
    errors = latency = None
    ratio_ok, ratio_text = (lambda v: v >= 1), "a number >= 1"
    e = raw.get("errors")
    if e is not None:
        if not isinstance(e, Mapping):
            problems.append(f"{p}.errors: expected {{max_ratio: NUMBER}}, got {type(e).__name__}")
        else:
            _unknown(e, ("max_ratio",), f"{p}.errors", problems)
            r = _number(e, "max_ratio", f"{p}.errors", _REQUIRED, ratio_ok, ratio_text, problems)
            errors = None if r is _REQUIRED else ErrorGuardrail(r)
    lat = raw.get("latency")
    if lat is not None:
        if not isinstance(lat, Mapping):
            problems.append(f"{p}.latency: expected {{quantile: 0..1, max_ratio: NUMBER}}, got {type(lat).__name__}")
        else:
            _unknown(lat, ("quantile", "max_ratio"), f"{p}.latency", problems)
            q = _number(lat, "quantile", f"{p}.latency", _REQUIRED, lambda v: 0 < v < 1, "a number in (0, 1)",
                        problems)
            r = _number(lat, "max_ratio", f"{p}.latency", _REQUIRED, ratio_ok, ratio_text, problems)
            latency = None if _REQUIRED in (q, r) else LatencyGuardrail(q, r)
    return errors, latency


def _parse_outcomes(raw: object, p: str, problems: list[str]) -> tuple[OutcomeSpec, ...]:
    p = f"{p}.outcomes"
    if raw is None:
        return ()
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Iterable):
        problems.append(f"{p}: expected a list of {{metric, kind, goal}}, got {type(raw).__name__}")
        return ()
    items = list(raw)
    if len(items) > MAX_OUTCOMES:
        problems.append(f"{p}: at most {MAX_OUTCOMES} outcomes, got {len(items)}")
        return ()
    out: list[OutcomeSpec] = []
    for i, o in enumerate(items):
        at = f"{p}[{i}]"
        if not isinstance(o, Mapping):
            problems.append(f"{at}: expected {{metric: NAME, kind: binary|continuous, goal: increase|decrease}}, "
                            f"got {type(o).__name__}")
            continue
        before = len(problems)
        _unknown(o, ("metric", "kind", "goal", "margin"), at, problems)
        metric, kind, goal = o.get("metric"), o.get("kind"), o.get("goal", "increase")
        if not (isinstance(metric, str) and _METRIC_RE.fullmatch(metric)):
            problems.append(f"{at}.metric: expected a name matching [A-Za-z_][A-Za-z0-9_.-]*, got {_show(metric)}")
        elif any(x.metric == metric for x in out):
            problems.append(f"{at}.metric: '{metric}' is given twice")
        if kind not in ("binary", "continuous"):
            problems.append(f"{at}.kind: expected 'binary' or 'continuous', got {_show(kind)}")
        if goal not in ("increase", "decrease"):
            problems.append(f"{at}.goal: expected 'increase' or 'decrease', got {_show(goal)}")
        margin = _number(o, "margin", at, 0, lambda v: v >= 0, "a number >= 0 (in the metric's units)", problems)
        if len(problems) == before:
            out.append(OutcomeSpec(str(metric), str(kind), str(goal), margin))
    return tuple(out)


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
    if config.experiment is not None:
        for role in ("control", "candidate"):
            ref = getattr(config.experiment, role)
            if isinstance(ref, int):
                refs[f"experiment {role} {ref}"] = ref
    return refs


def validate_against(config: RouteConfig, present_versions: Iterable[int], *, model: str | None = None,
                     running: RouteConfig | None = None) -> None:
    """Reject a config that newly names a version with no folder in the repository.

    Raises RoutingError("invalid") naming every such label, weight key and shadow target.
    `running`: the config that serves now. An entry it already has, naming the same version
    ("label 'canary'" -> 2), is kept as it runs even when that folder is gone (a rollback or a
    weights-only change must not trip over it); only new or changed entries are checked.
    """
    present = set(present_versions)
    kept = config_versions(running).items() if running is not None else ()
    shown = ", ".join(map(str, sorted(present))) or "none"
    problems = [
        f"{what} points at version {v}, which has no folder in the repository (present: {shown})"
        for what, v in config_versions(config).items()
        if v not in present and (what, v) not in kept
    ]
    if problems:
        where = f"model '{model}': " if model is not None else ""
        raise RoutingError("invalid", where + "; ".join(problems), tuple(problems))


EMPTY_CONFIG = RouteConfig()
