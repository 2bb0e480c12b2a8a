"""Feedback: outcomes joined by request id to the version that *served* the request.

`DecisionLog` remembers, for `window_s` seconds (the experiment's `feedback_window_s`,
default 3600) and at most `capacity` requests, which model, version, arm, routing
generation and sticky key served each request id (the `x-request-id` every response
carries). Feedback for a request older than the window but still within a grace period
(a quarter of the window) is *late*: counted per arm, never joined, so both arms' outcomes
mature over the same window and a loss that differs by arm shows. Only the primary
answer is recorded (never a shadow copy), and the first record of an id wins, so nothing
can move an outcome onto another version after the fact; ids come from callers
(`x-request-id`), so a second request with a remembered id is counted per model
(`duplicate_ids`), not silently merged. `join` matches a validated batch
of feedback items: an id not in the log (too old, never seen, another model's) is
unknown; a (request id, metric) pair seen before is a duplicate and changes nothing, so
clients may retry freely. Matched values accumulate per (model, arm, metric) until the
experiment's next judgment `drain`s them (`drain_generations`: per generation, with the
per-key sums the key unit needs and the late counts). Runs on the event loop: no locks.

Memory: an entry costs about 250 bytes in CPython (a 36-character id, the dict slot and a
slotted record; measured in tests/experiments/test_exp_feedback.py), so 1,000 req/s kept
for an hour plus grace (4.5 million ids) is about 1.1 GB: `capacity` (default 2,000,000,
~0.5 GB) bounds it, and ids pushed out before their window ends are counted
(`totals["evicted_early"]`) so the shortfall is visible.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from experiments.stats import Moments, UnitSums
from router.config import OutcomeSpec

MAX_ITEMS = 1000
MAX_ID_LEN = 128


class FeedbackError(ValueError):
    """A feedback body that is wrong; the message names the item and field at fault."""


@dataclass(frozen=True, slots=True)
class Served:
    model: str
    version: int
    arm: str | None  # "control" | "candidate" | None: not routed by the experiment's split
    time: float
    generation: int | None = None  # the routing generation the request was routed under
    unit: str | None = None  # the sticky key, when routing is sticky


@dataclass(frozen=True, slots=True)
class ArmFeedback:
    """One arm's feedback of one generation since the last drain."""

    outcomes: dict[str, Moments]
    unit_outcomes: dict[str, UnitSums]
    late: int


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    request_id: str
    metric: str
    value: float


@dataclass(frozen=True, slots=True)
class FeedbackResult:
    matched: int
    unknown: int
    duplicate: int
    late: int = 0  # known requests older than the feedback window: counted per arm, not joined

    def to_json(self) -> dict[str, int]:
        out = {"matched": self.matched, "unknown": self.unknown, "duplicate": self.duplicate}
        if self.late:
            out["late"] = self.late
        return out


def parse_feedback(body: object, outcomes: Sequence[OutcomeSpec]) -> list[FeedbackItem]:
    """Validate `{"items": [{"request_id", "metric", "value"}, ...]}` whole; FeedbackError otherwise."""
    if not isinstance(body, Mapping) or set(body) != {"items"}:
        raise FeedbackError('expected {"items": [{"request_id": ..., "metric": ..., "value": ...}, ...]}')
    items = body["items"]
    if not isinstance(items, list):
        raise FeedbackError(f"items: expected a list, got {type(items).__name__}")
    if not 0 < len(items) <= MAX_ITEMS:
        raise FeedbackError(f"items: expected 1 to {MAX_ITEMS} items, got {len(items)}")
    kinds = {o.metric: o.kind for o in outcomes}
    out: list[FeedbackItem] = []
    for i, it in enumerate(items):
        at = f"items[{i}]"
        if not isinstance(it, Mapping):
            raise FeedbackError(f"{at}: expected an object, got {type(it).__name__}")
        extra = sorted(str(k) for k in it if k not in ("request_id", "metric", "value"))
        if extra:
            raise FeedbackError(f"{at}: unknown key '{extra[0]}' (expected: request_id, metric, value)")
        rid, metric, value = it.get("request_id"), it.get("metric"), it.get("value")
        if not (isinstance(rid, str) and 0 < len(rid) <= MAX_ID_LEN and rid.isprintable()):
            raise FeedbackError(f"{at}.request_id: expected a request id of 1 to {MAX_ID_LEN} printable characters")
        if metric not in kinds:
            raise FeedbackError(f"{at}.metric: {metric!r} is not an outcome of this experiment "
                                f"(outcomes: {', '.join(kinds) or 'none'})")
        if kinds[metric] == "binary":
            if value not in (0, 1) or (isinstance(value, float) and not value.is_integer()):
                raise FeedbackError(f"{at}.value: expected 0 or 1 for binary metric '{metric}', got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FeedbackError(f"{at}.value: expected a finite number for metric '{metric}', got {value!r}")
        out.append(FeedbackItem(rid, metric, float(value)))
    return out


class DecisionLog:
    """Map request id -> Served, kept by age (window_s + grace) and bounded by capacity."""

    def __init__(self, capacity: int = 2_000_000, *, window_s: float = 3600.0, grace_s: float | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if not window_s > 0:
            raise ValueError("window_s must be > 0")
        self.capacity = capacity
        self.window_s = float(window_s)
        self.grace_s = self.window_s / 4 if grace_s is None else float(grace_s)
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._got: dict[str, set[str]] = {}  # request id -> metrics already joined
        self._pending: dict[tuple[str, int | None, str, str], Moments] = {}
        self._pending_units: dict[tuple[str, int | None, str, str], UnitSums] = {}
        self._late: dict[tuple[str, int | None, str], int] = {}
        self._per_key: dict[tuple[str, int | None, str, str, str], tuple[float, float, float]] = {}
        self._clock = -math.inf  # the latest time recorded (the join's "now" when none is given)
        self.totals = {"matched": 0, "unknown": 0, "duplicate": 0, "late": 0, "evicted_early": 0}
        self.late_by_arm: dict[tuple[str, str], int] = {}  # since start, (model, arm) -> late items
        self.duplicate_ids: dict[str, int] = {}  # since start, model -> ids served twice (here)

    def __len__(self) -> int:
        return len(self._served)

    def record(self, request_id: str, model: str, version: int, arm: str | None, now: float,
               generation: int | None = None, unit: str | None = None, served_here: bool = False) -> bool:
        """Remember who served `request_id`; False: the id is already remembered, and the
        first record stands. A repeat from the serving path (`served_here`) is a second
        request with that id (callers choose ids): counted in `duplicate_ids`. A repeat
        pushed by a peer may be one request delivered twice, so it is not counted."""
        self._clock = max(self._clock, now)
        self._expire(now)
        if request_id in self._served:
            if served_here:
                self.duplicate_ids[model] = self.duplicate_ids.get(model, 0) + 1
            return False
        self._served[request_id] = Served(model, version, arm, now, generation, unit)
        while len(self._served) > self.capacity:
            old, s = self._served.popitem(last=False)
            self._got.pop(old, None)
            if s.time > now - self.window_s:
                self.totals["evicted_early"] += 1
        return True

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s - self.grace_s
        while self._served:
            rid, s = next(iter(self._served.items()))
            if s.time >= horizon:
                break
            self._served.popitem(last=False)
            self._got.pop(rid, None)
        if len(self._per_key) > 2 * self.capacity or (self._per_key and len(self._per_key) % 4096 == 0):
            self._per_key = {k: v for k, v in self._per_key.items() if v[2] >= horizon}

    def served(self, request_id: str) -> Served | None:
        return self._served.get(request_id)

    def entries(self) -> list[tuple[str, str, int, str | None]]:
        """Every remembered (request id, model, version, arm), oldest first (for a new joiner)."""
        return [(rid, s.model, s.version, s.arm) for rid, s in self._served.items()]

    def join(self, model: str, items: Sequence[FeedbackItem], now: float | None = None) -> FeedbackResult:
        """Match validated items (see parse_feedback) to what served them; `now` defaults to the
        latest recorded time."""
        now = self._clock if now is None else now
        if math.isfinite(now):
            self._expire(now)
        matched = unknown = duplicate = late = 0
        for it in items:
            s = self._served.get(it.request_id)
            if s is None or s.model != model:
                unknown += 1
                continue
            got = self._got.setdefault(it.request_id, set())
            if it.metric in got:
                duplicate += 1
                continue
            got.add(it.metric)
            if math.isfinite(now) and now - s.time > self.window_s:
                late += 1
                if s.arm is not None:
                    k = (model, s.generation, s.arm)
                    self._late[k] = self._late.get(k, 0) + 1
                    self.late_by_arm[(model, s.arm)] = self.late_by_arm.get((model, s.arm), 0) + 1
                continue
            matched += 1
            if s.arm is not None:
                key = (model, s.generation, s.arm, it.metric)
                self._pending[key] = self._pending.get(key, Moments()).add(it.value)
                if s.unit is not None:
                    self._unit_add(key, s.unit, it.value, now)
        for k, v in (("matched", matched), ("unknown", unknown), ("duplicate", duplicate), ("late", late)):
            self.totals[k] += v
        return FeedbackResult(matched, unknown, duplicate, late)

    def _unit_add(self, key: tuple[str, int | None, str, str], unit: str, value: float, now: float) -> None:
        """One more item for a key: the increments of the per-key sums (see stats.UnitSums)."""
        a, b, _ = self._per_key.get((*key, unit), (0.0, 0.0, now))
        inc = UnitSums(1 if a == 0 else 0, 1.0, 2 * a + 1, value, 2 * b * value + value * value, b + value * (a + 1))
        self._per_key[(*key, unit)] = (a + 1, b + value, now)
        self._pending_units[key] = self._pending_units.get(key, UnitSums()).merge(inc)

    def drain(self, model: str) -> dict[str, dict[str, Moments]]:
        """arm -> metric -> moments joined since the last drain of `model` (then forgotten),
        every generation together (the runtime's first API; see drain_generations)."""
        out: dict[str, dict[str, Moments]] = {}
        for gen in self.drain_generations(model).values():
            for arm, fb in gen.items():
                for metric, m in fb.outcomes.items():
                    have = out.setdefault(arm, {})
                    have[metric] = have.get(metric, Moments()).merge(m)
        return out

    def drain_generations(self, model: str) -> dict[int | None, dict[str, ArmFeedback]]:
        """generation -> arm -> what was joined since the last drain of `model` (then forgotten)."""
        out: dict[int | None, dict[str, ArmFeedback]] = {}

        def arm_of(gen: int | None, arm: str) -> ArmFeedback:
            return out.setdefault(gen, {}).setdefault(arm, ArmFeedback({}, {}, 0))

        for key in [k for k in self._pending if k[0] == model]:
            _, gen, arm, metric = key
            arm_of(gen, arm).outcomes[metric] = self._pending.pop(key)
        for key in [k for k in self._pending_units if k[0] == model]:
            _, gen, arm, metric = key
            arm_of(gen, arm).unit_outcomes[metric] = self._pending_units.pop(key)
        for key in [k for k in self._late if k[0] == model]:
            _, gen, arm = key
            fb = arm_of(gen, arm)
            out[gen][arm] = ArmFeedback(fb.outcomes, fb.unit_outcomes, fb.late + self._late.pop(key))
        return out
