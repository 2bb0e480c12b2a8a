"""Feedback: outcomes joined by request id to the version that *served* the request.

`DecisionLog` remembers, for the latest `capacity` requests, which model, version and arm
served each request id (the `x-request-id` every response carries). Only the primary
answer is recorded (never a shadow copy), and the first record of an id wins, so nothing
can move an outcome onto another version after the fact. `join` matches a validated batch
of feedback items: an id not in the log (too old, never seen, another model's) is
unknown; a (request id, metric) pair seen before is a duplicate and changes nothing, so
clients may retry freely. Matched values accumulate per (model, arm, metric) until the
experiment's next judgment `drain`s them. Runs on the event loop: no locks.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from experiments.stats import Moments
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

    def to_json(self) -> dict[str, int]:
        return {"matched": self.matched, "unknown": self.unknown, "duplicate": self.duplicate}


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
    """Bounded map request id -> Served (oldest forgotten first), and the joined outcomes."""

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._served: OrderedDict[str, Served] = OrderedDict()
        self._got: dict[str, set[str]] = {}  # request id -> metrics already joined
        self._pending: dict[tuple[str, str, str], Moments] = {}
        self.totals = {"matched": 0, "unknown": 0, "duplicate": 0}  # since start, for counters

    def __len__(self) -> int:
        return len(self._served)

    def record(self, request_id: str, model: str, version: int, arm: str | None, now: float) -> None:
        """Remember who served `request_id`; a second record of the same id is ignored."""
        if request_id in self._served:
            return
        self._served[request_id] = Served(model, version, arm, now)
        while len(self._served) > self.capacity:
            old, _ = self._served.popitem(last=False)
            self._got.pop(old, None)

    def served(self, request_id: str) -> Served | None:
        return self._served.get(request_id)

    def entries(self) -> list[tuple[str, str, int, str | None]]:
        """Every remembered (request id, model, version, arm), oldest first (for a new joiner)."""
        return [(rid, s.model, s.version, s.arm) for rid, s in self._served.items()]

    def join(self, model: str, items: Sequence[FeedbackItem]) -> FeedbackResult:
        """Match validated items (see parse_feedback) to what served them."""
        matched = unknown = duplicate = 0
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
            matched += 1
            if s.arm is not None:
                key = (model, s.arm, it.metric)
                self._pending[key] = self._pending.get(key, Moments()).add(it.value)
        for k, v in (("matched", matched), ("unknown", unknown), ("duplicate", duplicate)):
            self.totals[k] += v
        return FeedbackResult(matched, unknown, duplicate)

    def drain(self, model: str) -> dict[str, dict[str, Moments]]:
        """arm -> metric -> moments joined since the last drain of `model` (then forgotten)."""
        out: dict[str, dict[str, Moments]] = {}
        for key in [k for k in self._pending if k[0] == model]:
            _, arm, metric = key
            out.setdefault(arm, {})[metric] = self._pending.pop(key)
        return out
