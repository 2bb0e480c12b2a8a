"""ExperimentRunner: experiments/ inside the server, one per Core, on the event loop.

Owns what the pure engine cannot: the per-model counters of the interval in progress
(fed by `on_finished`, called once per finished primary request; shadow copies never
come here), the decision log that joins feedback to the version that served, the engine
state of every model (persisted as strict JSON beside the routing config, so latches and
steps survive a restart), and the loop that judges each experiment every `interval_s`.
A routing change goes through `Control.put_routing`: validated, persisted atomically and
applied in one write. One process decides: this server has one event loop per process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import ArmObservation, ExperimentError, ExperimentState, Observation, act, judge
from experiments.feedback import DecisionLog, FeedbackError, parse_feedback
from experiments.report import report
from router import RouteConfig, Router
from router.configfile import atomic_write
from runtime import errors
from runtime.errors import Code, ServingError
from runtime.metrics import EDGES, NB
from runtime.views import ExperimentsView

log = logging.getLogger("splitserve.experiments")

ROUTED = ("split", "sticky")  # only requests the split placed are evidence
_CODES = {"not_found": Code.NOT_FOUND, "conflict": Code.CONFLICT}
_EDGES = tuple(EDGES)


class _Arms:
    """One model's counters since the last judgment: [control, candidate]."""

    __slots__ = ("versions", "requests", "errors", "units", "lat")

    def __init__(self, versions: tuple[int, int]):
        self.versions = versions
        self.requests, self.errors, self.units = [0, 0], [0, 0], [0, 0]
        self.lat = [[0] * NB, [0] * NB]

    def observation(self, outcomes: dict[str, dict]) -> Observation:
        arms = [ArmObservation(self.requests[i], self.errors[i], self.units[i], tuple(self.lat[i]),
                               outcomes.get(("control", "candidate")[i], {})) for i in (0, 1)]
        return Observation(arms[0], arms[1], _EDGES)


class ExperimentRunner:
    def __init__(self, router: Router, control: Any, state_path: Path | None, *,
                 clock: Callable[[], float] = time.time, tick_s: float = 0.05,
                 log_capacity: int = 100_000, seen_capacity: int = 200_000):
        self.router = router
        self.control = control
        self.state_path = state_path
        self.clock = clock
        self.tick_s = tick_s
        self.log = DecisionLog(log_capacity)
        self.states: dict[str, ExperimentState] = {}
        self._arms: dict[str, _Arms] = {}  # models with a running experiment
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()  # sticky keys already counted
        self._seen_capacity = seen_capacity
        self._due: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._counts: dict[tuple[str, str, str], int] = {}  # (kind, model, key): published counters

    # ---- hot path ---------------------------------------------------------------------
    def on_finished(self, model: str, version: int | None, how: str, ok: bool, latency_s: float,
                    request_id: str | None, key: str | None) -> None:
        arms = self._arms.get(model)
        if arms is None or version is None:
            return
        i = 0 if version == arms.versions[0] else 1 if version == arms.versions[1] else -1
        routed = how in ROUTED and i >= 0
        if request_id is not None and ok:
            self.log.record(request_id, model, version, ("control", "candidate")[i] if routed else None, self.clock())
        if not routed:
            return
        arms.requests[i] += 1
        if ok:
            arms.lat[i][bisect_left(EDGES, latency_s)] += 1
        else:
            arms.errors[i] += 1
        if key is None:
            arms.units[i] += 1
        elif (model, key) not in self._seen:  # a sticky unit counts once, where it was first placed
            self._seen[(model, key)] = None
            if len(self._seen) > self._seen_capacity:
                self._seen.popitem(last=False)
            arms.units[i] += 1

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._load_states()
        self._refresh_all()
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="experiments")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except Exception as e:  # one bad judgment must not stop every experiment
                log.error("event=experiment_tick_failed error=%r", e)
                log.debug("event=experiment_tick_failed", exc_info=True)

    async def tick(self) -> None:
        """Judge every experiment whose interval has passed."""
        now = self.clock()
        for model, route in self.router.configs().items():
            if route.experiment is None:
                self._arms.pop(model, None)
                continue
            self._refresh(model, route)
            due = self._due.get(model)
            if due is None:
                self._due[model] = due = now if model not in self.states else now + route.experiment.interval_s
            if now >= due:
                self._due[model] = now + route.experiment.interval_s
                await self._judge(model, route, now)

    def _refresh_all(self) -> None:
        for model, route in self.router.configs().items():
            self._refresh(model, route)

    def _refresh(self, model: str, route: RouteConfig) -> None:
        """Keep the counters' arm versions in step with the routing (labels may move)."""
        exp = route.experiment
        if exp is None:
            self._arms.pop(model, None)
            return
        versions = (route.target_of(exp.control), route.target_of(exp.candidate))
        if model not in self._arms or self._arms[model].versions != versions:
            self._arms[model] = _Arms(versions)

    async def _judge(self, model: str, route: RouteConfig, now: float) -> None:
        arms = self._arms[model]
        obs = arms.observation(self.log.drain(model))
        self._arms[model] = _Arms(arms.versions)
        await self._apply(model, judge(route, self.states.get(model), obs, now))

    async def _apply(self, model: str, j) -> None:
        if j.route is not None:
            await self.control.put_routing(model, j.route.to_json())
        if j.state is not None:
            self.states[model] = j.state
        if j.decision is not None:
            d = j.decision
            log.info("event=experiment_decision model=%s action=%s by=%s step=%d candidate_weight=%g reason=%r",
                     model, d.action, d.by, d.step, d.candidate_weight, d.reason)
            if d.action == "rollback":
                self._count("rollbacks", model, rollback_reason(d))
        if j.route is not None or j.decision is not None:
            await asyncio.to_thread(self._save_states)
            self._refresh(model, self.router.get_config(model))

    # ---- state file -----------------------------------------------------------------------
    def _load_states(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            doc = json.loads(self.state_path.read_text(encoding="utf-8"))
            for model, obj in doc.get("models", {}).items():
                self.states[model] = ExperimentState.from_json(obj)
        except (OSError, ValueError, AttributeError) as e:
            log.error("event=experiment_state_unreadable path=%s reason=%r", self.state_path, str(e))

    def _save_states(self) -> None:
        if self.state_path is None:
            return
        doc = {"models": {m: s.to_json() for m, s in self.states.items()}}
        atomic_write(str(self.state_path), json.dumps(doc, allow_nan=False, indent=1).encode())

    # ---- API ----------------------------------------------------------------------------
    def view(self, model: str) -> dict:
        return report(self.router.get_config(model), self.states.get(model), self.clock())

    async def action(self, model: str, action: str) -> dict:
        now = self.clock()
        try:
            j = act(self.router.get_config(model), self.states.get(model), action, now)
        except ExperimentError as e:
            raise ServingError(_CODES.get(e.kind, Code.INVALID_ARGUMENT), e.message) from None
        await self._apply(model, j)
        exp = self.router.get_config(model).experiment
        if exp is not None:  # the next judgment is a whole interval after a person's move
            self._due[model] = now + exp.interval_s
        return self.view(model)

    def feedback(self, model: str, body: object) -> dict:
        exp = self.router.get_config(model).experiment
        if exp is None:
            raise errors.not_found(f"model '{model}' has no experiment to take feedback")
        try:
            items = parse_feedback(body, exp.outcomes)
        except FeedbackError as e:
            raise errors.invalid(str(e)) from None
        result = self.log.join(model, items).to_json()
        for k, n in result.items():
            self._count("feedback", model, k, n)
        return result

    # ---- published view (read-only; metrics reads it) ------------------------------------
    def _count(self, kind: str, model: str, key: str, n: int = 1) -> None:
        k = (kind, model, key)
        self._counts[k] = self._counts.get(k, 0) + n

    def published(self) -> ExperimentsView:
        """Every model's report (as GET .../experiment answers it) and this process's counters."""
        models = {m for m, r in self.router.configs().items() if r.experiment is not None} | set(self.states)
        return ExperimentsView({m: self.view(m) for m in sorted(models)}, dict(self._counts))


def rollback_reason(d) -> str:
    """`manual` for a person's rollback, else the guardrail that alarmed (`errors`, `latency`)."""
    if d.by != "auto":
        return "manual"
    head = d.reason.split(":", 1)[0].strip()
    return head if head.isidentifier() else "other"

