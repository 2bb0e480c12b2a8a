"""ExperimentRunner: experiments/ inside the server, one per Core, on the event loop.

Owns what the pure engine cannot: the counters (fed by `on_finished`, called once per
finished primary request with the routing config that placed it; shadow copies never come
here), kept per version and candidate share, and per sticky key, in tallies
(runtime/decider/counts.py, tally.py) and judged per routing generation; a decision log
per model, kept by its `feedback_window_s`, that joins feedback to the version, arm and
generation that served; the engine state of every model (persisted as strict JSON
beside the routing config, so latches and steps survive a restart), and the loop that
judges each experiment every `interval_s`.
A routing change goes through `Control.put_routing`: validated, persisted atomically and
applied in one write. One process decides: alone, this one; with `--workers N`
(`share()`), the worker holding the decider lock judges everyone's counts and joins
everyone's feedback, and the others forward actions and feedback to it and show the
state it persists (runtime/decider/workers.py). Across the replicas of a `kubernetes://`
routing source, or the servers sharing one writable config file (`fleet`), each pod's
local decider takes part in a lease (a Lease; a flock beside the file): its holder
judges every pod's counts and joins every pod's feedback, the others push their counts
and records to it, forward feedback and actions, and show the state it writes into the
lease (runtime/decider/fleet.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from bisect import bisect_left
from collections.abc import Callable
from pathlib import Path
from typing import Any

from experiments import ArmObservation, ExperimentError, ExperimentState, Observation, act, judge
from experiments.engine import GenerationObservation, candidate_share, fingerprint, routing_history
from experiments.feedback import ArmFeedback, DecisionLog, FeedbackError, parse_feedback
from experiments.stats import UnitSums
from experiments.report import report
from router import RouteConfig, Router
from router.configfile import atomic_write
from runtime import errors
from runtime.errors import Code, ServingError
from runtime.decider.fleet import KEYS_PUSH_S, NOT_DECIDER, PUSH_S, Fleet, parse_push
from runtime.decider.counts import (ARM_WIDTH, KEY_WIDTH, Cohorts, add_counts, arms_of, generation_of,
                                    keys_of, merge_keys, parse_tag, zero_counts)
from runtime.decider.tally import Tally
from runtime.decider.workers import Peers, Unanswered
from runtime.histogram import EDGES, NB
from runtime.views import ExperimentsView

log = logging.getLogger("splitserve.experiments")

ROUTED = ("split", "sticky")  # only requests the split placed are evidence
MAX_KEYS = 1_000_000  # sticky keys per process's key tally (~100 bytes each in the file, ~150 in memory)
_CODES = {"not_found": Code.NOT_FOUND, "conflict": Code.CONFLICT}
_EDGES = tuple(EDGES)


class ExperimentRunner:
    def __init__(self, router: Router, control: Any, state_path: Path | None, *,
                 clock: Callable[[], float] = time.time, tick_s: float = 0.05,
                 log_capacity: int = 2_000_000, seen_capacity: int = 1_000_000):
        self.router = router
        self.control = control
        self.state_path = state_path
        self.clock = clock
        self.tick_s = tick_s
        self._log_capacity = log_capacity
        self.logs: dict[str, DecisionLog] = {}  # per model: kept by its experiment's feedback_window_s
        self.states: dict[str, ExperimentState] = {}
        self._arms: dict[str, tuple[int, int]] = {}  # models with an experiment: arm versions
        # cumulative counts since this process started (runtime/decider/counts.py): arms, keys
        self.tally, self.key_tally = Tally(), Tally()
        self._slots: dict[tuple, int] = {}  # (model, version, share) -> the arms tally's slot
        self._tags: dict[str, tuple[RouteConfig, tuple | None]] = {}  # model -> (route, its tag)
        self._written: dict[str, list[tuple[int, float]]] = {}  # model -> (generation, share) we wrote
        self._gen_memo: dict[str, tuple] = {}  # model -> (state, route, writes, {share: generation})
        self.cohorts = Cohorts(seen_capacity)
        self._keys_full = False
        self._primed: set[str] = set()  # models whose cohorts this decider took over
        self._base: dict[str, dict] = {}  # the totals (all workers) at each model's last judgment
        self.peers: Peers | None = None  # set by share(): several workers
        self.fleet: Fleet | None = None  # set by Core (a ConfigMap, a writable file): several replicas
        self._fleet_leading = False
        self._fleet_mark: str | None = None  # the Lease's states text we show (a follower)
        self._pushed_at = 0.0
        self._keys_pushed_at = 0.0
        self._keys_every = PUSH_S  # sticky keys go with every push while reading them is cheap
        self._pushed_holder: str | None = None  # the Lease holder our outbox went to
        self._push_failing = False
        self._lease_task: asyncio.Task | None = None
        self._state_mark = None
        self._leading = False
        self._due: dict[str, float] = {}
        self._task: asyncio.Task | None = None
        self._counts: dict[tuple[str, str, str], int] = {}  # (kind, model, key): published counters

    def _log(self, model: str) -> DecisionLog:
        """The model's decision log, kept by its experiment's feedback_window_s."""
        route = self.router.get_config(model)
        window = route.experiment.feedback_window_s if route.experiment is not None else None
        log_ = self.logs.get(model)
        if log_ is None:
            log_ = self.logs[model] = DecisionLog(self._log_capacity, window_s=window or 3600.0)
        elif window is not None and log_.window_s != window:  # the block was edited: ids age by the new window
            log_.window_s, log_.grace_s = float(window), window / 4
        return log_

    # ---- hot path ---------------------------------------------------------------------
    def _tag(self, model: str, route: RouteConfig | None) -> tuple | None:
        """(arm versions, experiment fingerprint, candidate share) of the routing config a
        request was placed under (None: no experiment then); cached per config object."""
        if route is None:
            route = self.router.get_config(model)
        have = self._tags.get(model)
        if have is not None and have[0] is route:
            return have[1]
        exp = route.experiment
        tag = None
        if exp is not None:
            tag = ((route.target_of(exp.control), route.target_of(exp.candidate)), fingerprint(route),
                   candidate_share(route))
        self._tags[model] = (route, tag)
        return tag

    def on_finished(self, model: str, version: int | None, how: str, ok: bool, latency_s: float,
                    request_id: str | None, key: str | None, route: RouteConfig | None = None) -> None:
        """Count one finished primary request under the routing config it was placed by
        (`route`, the router's config at pick time; None: the current one). Everything is
        stored before the answer leaves (with workers: in this worker's tally files)."""
        tag = self._tag(model, route)
        if tag is None or version is None:
            return
        arms, spec, share = tag
        i = 0 if version == arms[0] else 1 if version == arms[1] else -1
        routed = how in ROUTED and i >= 0
        if request_id is not None and ok:
            arm = ("control", "candidate")[i] if routed else None
            unit = key if routed else None
            if not self._record(request_id, model, version, arm, share, unit, self.clock(), spec,
                                served_here=True):
                self._duplicate_id(model, request_id)
            if self.peers is not None:  # on disk before the answer leaves: any worker can join it
                self.peers.append_record(request_id, model, version, arm, share, unit)
            if self.fleet is not None and self._local:  # for the Lease holder, at the next push
                self.fleet.outbox.append((request_id, model, version, arm, share, unit))
        if not routed:
            return
        slot = self._slots.get((model, version, share))
        if slot is None:
            slot = self._slots[(model, version, share)] = self.tally.slot(f"a\t{model}\t{version}\t{share!r}",
                                                                        ARM_WIDTH)
        t = self.tally
        t.add(slot, 0)
        if ok:
            t.add(slot, 3 + bisect_left(EDGES, latency_s))
        else:
            t.add(slot, 1)
        if key is None:
            t.add(slot, 2)
            return
        name = f"k\t{model}\t{spec}\t{key}"
        k = self.key_tally.find(name)
        if k is None:  # where this worker first placed the key (the decider keeps the earliest)
            if len(self.key_tally) >= MAX_KEYS:  # bounded: a key beyond is in the arm counts only
                if not self._keys_full:
                    self._keys_full = True
                    log.warning("event=experiment_keys_full model=%s keys=%d reason='sticky keys beyond this are "
                                "counted as requests, not as units'", model, MAX_KEYS)
                return
            k = self.key_tally.slot(name, KEY_WIDTH)
            self.key_tally.set(k, 2, share)
            self.key_tally.set(k, 3, i)
            self.key_tally.set(k, 4, self.clock())
        self.key_tally.add(k, 0)
        if not ok:
            self.key_tally.add(k, 1)

    def _generation(self, model: str, share: float | None) -> int:
        """The routing generation of a request placed at candidate `share`: the newest one
        this experiment routed at that share (see counts.generation_of); memoized until the
        state, the routing or our writes change."""
        state = self.states.get(model)
        if state is None:
            return 0
        route = self.router.get_config(model)
        written = self._written.get(model, [])
        memo = self._gen_memo.get(model)
        if memo is None or memo[0] is not state or memo[1] is not route or memo[2] != len(written):
            memo = self._gen_memo[model] = (state, route, len(written), {})
        got = memo[3].get(share)
        if got is None:
            current, had = routing_history(state)
            history = [*had, *written]
            if route.experiment is not None:
                history.append((current, candidate_share(route)))
            got = memo[3][share] = generation_of(history, share, current)
        return got

    def _duplicate_id(self, model: str, request_id: str) -> None:
        """A caller reused a request id within the feedback window: its feedback joins the
        first request only. Counted (the experiment report), logged at 1, 2, 4, 8, ..."""
        n = self._log(model).duplicate_ids.get(model, 0)
        if n & (n - 1) == 0:
            log.warning("event=duplicate_request_id model=%s request_id=%s count=%d note=%r", model,
                        request_id, n, "feedback joins the first request with this id")

    def arm_of(self, model: str, version: int, how: str) -> str | None:
        """The experiment arm a request routed `how` to `version` counts for (tracing)."""
        arms = self._arms.get(model)
        if arms is None or how not in ROUTED:
            return None
        return "control" if version == arms[0] else "candidate" if version == arms[1] else None

    # ---- several workers ------------------------------------------------------------------
    def share(self, run_dir: Path, worker: int) -> None:
        """Before start(): decide together with the other workers of this run folder
        (without a config file, the state lives there: the workers show it)."""
        self.peers = Peers(run_dir, worker)
        self.tally, self.key_tally = Tally(self.peers.tally_path("a")), Tally(self.peers.tally_path("k"))
        self._slots = {}
        if self.state_path is None:
            self.state_path = Path(run_dir) / "experiments.json"

    @property
    def _local(self) -> bool:
        """This process decides for its pod (alone, or the workers' flock holder)."""
        return self.peers is None or self._leading

    @property
    def leader(self) -> bool:
        """This process decides: for its pod, and (in a fleet) holds the Lease."""
        return self._local and (self.fleet is None or (self._fleet_leading and self.fleet.leading))

    def _all_totals(self, model: str) -> dict[str, list]:
        """This pod's cumulative arm counts of `model` (every worker's tally, the dead's too):
        tag (version@share) -> [requests, errors, units, histogram]."""
        acc: dict[str, list] = {}
        add_counts(acc, arms_of(self.tally.entries()).get(model, {}))
        for entries in self.peers.peer_tallies("a") if self.peers is not None else ():
            add_counts(acc, arms_of(entries).get(model, {}))
        return acc

    def _pod_keys(self) -> dict:
        """This pod's per-key totals: model -> fingerprint -> key -> [requests, errors, share, arm, time]."""
        acc = keys_of(self.key_tally.entries())
        for entries in self.peers.peer_tallies("k") if self.peers is not None else ():
            keys_of(entries, acc)
        return acc

    async def _take_lead(self) -> None:
        """The decider lock is ours: carry on from what the last decider persisted."""
        self._leading = True
        self._primed.clear()  # per-key sums: carry on from the totals found (counts.Cohorts.prime)
        self._load_states()
        self._base = self.peers.read_baseline()
        self._ingest()
        await self.peers.serve(self._serve_call)
        log.info("event=experiment_decider worker=%d pid=%d", self.peers.worker, self.peers.pid)

    def _ingest(self) -> None:
        if self.peers is not None:
            for rid, model, version, arm, share, unit in self.peers.new_records():
                self._record(rid, model, version, arm, share, unit, self.clock())
                if self.fleet is not None:
                    self.fleet.outbox.append((rid, model, version, arm, share, unit))

    def _record(self, rid: str, model: str, version: int, arm: str | None, share: float | None,
                unit: str | None, now: float, spec: str | None = None, served_here: bool = False) -> bool:
        """A decision record, in the model's log under the generation of its share; a sticky
        key's under its cohort (generation and arm where it was first placed: intention to
        treat), so its feedback is one unit in one stratum whichever worker served it."""
        gen = None if arm is None else self._generation(model, share)
        if arm is not None and unit is not None:
            if spec is None:
                spec = (self._tag(model, None) or (None, None, None))[1]
            if spec is not None:
                g, i = self.cohorts.home(model, spec, unit, gen, ("control", "candidate").index(arm))
                gen, arm = g, ("control", "candidate")[i]
        return self._log(model).record(rid, model, version, arm, now, generation=gen,
                                       unit=unit if arm else None, served_here=served_here)

    def _follow(self) -> None:
        """Not the decider: show the state the decider persists, reloaded when it changes."""
        try:
            st = self.state_path.stat() if self.state_path is not None else None
        except OSError:
            st = None
        mark = None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)
        if mark != self._state_mark:
            self._state_mark = mark
            self.states = {}
            self._load_states()

    async def _serve_call(self, call: dict) -> dict:
        """A call another worker or replica forwarded; errors travel as their code and message.
        A call from another replica (`fleet`) is never sent on to a third."""
        fleet = call.get("fleet") is True
        try:
            if call.get("op") == "push":
                return {"ok": self._received(call)}
            model = str(call["model"])
            if call.get("op") == "action":
                return {"ok": await self.action(model, str(call["action"]), fleet=fleet)}
            if call.get("op") == "feedback":
                return {"ok": await self.feedback(model, call["body"], fleet=fleet, sender=call.get("from"))}
            raise errors.invalid(f"unknown forwarded call {call.get('op')!r}")
        except ServingError as e:
            return {"code": e.code.value, "message": e.message}
        except (KeyError, TypeError) as e:
            return {"code": Code.INVALID_ARGUMENT.value, "message": f"malformed forwarded call: {e}"}

    async def peer_call(self, call: object) -> dict:
        """A call another replica sent (POST /v1/experiments/peers): applied by this pod's
        decider, answered as {"ok": ...} or {"code", "message"}; never forwarded to a replica."""
        if not isinstance(call, dict):
            return {"code": Code.INVALID_ARGUMENT.value, "message": "expected a JSON object (a peer call)"}
        call = {**call, "fleet": True}
        if self._local:
            return await self._serve_call(call)
        try:
            return await self.peers.forward(call)
        except Unanswered as e:
            return {"code": Code.UNAVAILABLE.value, "message": f"{e}; it may have been applied"}
        except (OSError, asyncio.TimeoutError):
            return {"code": Code.UNAVAILABLE.value, "message": NOT_DECIDER}

    def _received(self, call: dict) -> dict:
        """A follower's push: its pod's totals and new decision records (the holder only)."""
        try:
            ident, models, records, keys = parse_push(call)
        except ValueError as e:
            raise errors.invalid(f"push: {e}") from None
        if self.fleet is None or not self.leader:
            raise errors.unavailable(NOT_DECIDER)
        now = self.clock()
        for rid, model, version, arm, share, unit in records:
            self._record(rid, model, version, arm, share, unit, now)
        self.fleet.received(ident, models, keys)
        return {"records": len(records), "lease_version": self.fleet.lease.version}

    async def _to_decider(self, call: dict) -> dict:
        """Apply `call` at the decider: forwarded, or here once the lock is free."""
        deadline = time.monotonic() + 5.0
        while True:
            if self._local and (self.fleet is None or self.leader):
                answer = await self._serve_call(call)
                break
            if self._local:  # in a fleet, not holding the Lease
                if call.get("fleet"):
                    raise errors.unavailable(NOT_DECIDER)
                await self._push()  # our records first: the feedback may name them
                answer = await self.fleet.forward({**call, "from": self.fleet.identity})
                if answer is not None:
                    return answer
                await self._fleet_tick()  # we took the lease meanwhile: apply it here
                continue
            try:
                answer = await self.peers.forward(call)
                break
            except Unanswered as e:
                raise errors.unavailable(f"{e}; it may have been applied: read the experiment before retrying") from None
            except (OSError, asyncio.TimeoutError) as e:  # nothing sent yet: safe to try again
                if time.monotonic() > deadline:
                    raise errors.unavailable(f"no experiment decider answers right now ({e}); retry") from None
                if self.peers.try_lead():  # the decider is gone: this worker decides now
                    await self._take_lead()
                else:
                    await asyncio.sleep(self.tick_s)
        if "ok" in answer:
            return answer["ok"]
        raise ServingError(Code(answer["code"]), answer["message"])

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._load_states()
        self._refresh_all()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._loop(), name="experiments")
        if self.fleet is not None:
            if self.peers is not None:
                self.fleet.use_run_folder(self.peers.dir)
            self._lease_task = loop.create_task(self._lease_loop(), name="experiment-lease")

    async def stop(self) -> None:
        for task in (self._task, self._lease_task):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._task = self._lease_task = None
        if self.fleet is not None and self.leader and self.peers is None:
            await asyncio.to_thread(self.fleet.release)  # the next holder need not wait it out
        if self.peers is not None:
            await self.peers.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except Exception as e:  # one bad judgment must not stop every experiment
                log.error("event=experiment_tick_failed error=%r", e)
                log.debug("event=experiment_tick_failed", exc_info=True)

    async def tick(self) -> None:
        """Judge every experiment whose interval has passed (the decider only)."""
        self._refresh_all()
        if self.peers is not None:
            if not self._leading:
                if not self.peers.try_lead():
                    self._follow()
                    return
                await self._take_lead()
            self._ingest()
        if self.fleet is not None and not await self._fleet_tick():
            return
        now = self.clock()
        judged = False
        for model, route in self.router.configs().items():
            if route.experiment is None:
                continue
            if self._waits_for_arms(model, route):
                continue
            due = self._due.get(model)
            if due is None:
                self._due[model] = due = now if model not in self.states else now + route.experiment.interval_s
            if now >= due:
                self._due[model] = now + route.experiment.interval_s
                await self._judge(model, route, now)
                judged = True
        if judged and self.fleet is not None:  # the judged baseline, exact for the next holder
            await self._save_states()

    def _waits_for_arms(self, model: str, route: RouteConfig) -> bool:
        """An experiment starts once both arms serve: started while the canary still
        loads, its first interval had no canary requests and held ("no requests on
        canary") with traffic flowing. Only the start waits; a running one judges on."""
        state = self.states.get(model)
        if state is not None and state.spec == fingerprint(route):
            return False
        avail = self.router.available(model)  # None: not told (no manager behind this router)
        arms = (route.target_of(route.experiment.control), route.target_of(route.experiment.candidate))
        return avail is not None and not all(v in avail for v in arms)

    # ---- several replicas ------------------------------------------------------------------
    async def _lease_loop(self) -> None:
        """Renew (or try to take) the Lease every third of its duration, from a thread;
        only this pod's decider (a worker that becomes it starts within a tick)."""
        while True:
            if self._local:
                await asyncio.to_thread(self.fleet.sync)
                await asyncio.sleep(self.fleet.lease.renew_s)
            else:
                await asyncio.sleep(self.tick_s)

    async def _fleet_tick(self) -> bool:
        """The pod decider's part in the fleet; True while it holds the Lease (judge now)."""
        f = self.fleet
        if f.leading:
            if not self._fleet_leading:  # carry on from what the last holder wrote
                self._fleet_leading = True
                self.states = self._parse_states(f.taken())
                self._due = {}
                self._primed.clear()
                log.info("event=experiment_decider lease=%s identity=%s url=%s",
                         f.lease.where, f.identity, f.advertise_url)
            return True
        if self._fleet_leading:
            self._fleet_leading = False
            log.info("event=experiment_follower lease=%s holder=%s", f.lease.where, f.lease.holder)
        mark = f.states_mark()
        if mark != self._fleet_mark:  # show what the holder wrote (and to this pod's workers)
            self._fleet_mark = mark
            self.states = self._parse_states(f.states())
            if self.peers is not None and not self._lease_keeps_file:
                await self._save_states()
        if f.lease.version is not None and time.monotonic() - self._pushed_at >= PUSH_S:
            # (once the Lease was read: before, no holder is known)
            await self._push(keys=time.monotonic() - self._keys_pushed_at >= self._keys_every)
        return False

    async def _push(self, keys: bool = False) -> None:
        """This pod's cumulative counts and new decision records, to the Lease holder; with
        `keys`, also the sticky keys whose totals changed since the holder last acknowledged
        them (read from every worker's tally in a thread, O(keys): at most 5 % of the time, so
        with every push while that is cheap, at least every KEYS_PUSH_S)."""
        self._pushed_at = time.monotonic()
        holder = self.fleet.lease.holder
        if holder != self._pushed_holder:  # a new holder has none of our records yet: all of them
            self._pushed_holder = holder
            self.fleet.outbox.clear()
            for log_ in self.logs.values():  # (their shares are not kept: the holder's current generation)
                self.fleet.outbox.extend((rid, m, v, a, None, getattr(log_.served(rid), "unit", None))
                                         for rid, m, v, a in log_.entries())
            self.fleet.keys_acked.clear()
        models = {m: self._all_totals(m) for m in self._arms}
        changed = None
        if keys:
            self._keys_pushed_at, t0 = self._pushed_at, time.monotonic()  # (due with the next push)
            changed = self.fleet.changed_keys(await asyncio.to_thread(self._pod_keys))
            self._keys_every = min(KEYS_PUSH_S, max(PUSH_S, 20 * (time.monotonic() - t0)))
        call, n = self.fleet.push_call(models, changed)
        try:
            answer = await self.fleet.forward(call, wait_s=0)  # the next push is PUSH_S away anyway
            if answer is None:  # we hold the lease now: nothing to push
                return
        except ServingError as e:
            if not self._push_failing:
                log.warning("event=experiment_push_failed reason=%r", e.message)
            self._push_failing = True
            return
        if self._push_failing:
            log.info("event=experiment_push_resumed")
        self._push_failing = False
        self.fleet.acked(n, changed)
        if isinstance(answer, dict) and answer.get("lease_version") != self.fleet.lease.version:
            await asyncio.to_thread(self.fleet.sync)  # the holder wrote: show it now, not at our next renewal

    def _refresh_all(self) -> None:
        for model, route in self.router.configs().items():
            self._refresh(model, route)

    def _refresh(self, model: str, route: RouteConfig) -> None:
        """Keep the counters' arm versions in step with the routing (labels may move)."""
        exp = route.experiment
        if exp is None:
            self._arms.pop(model, None)
            return
        self._arms[model] = (route.target_of(exp.control), route.target_of(exp.candidate))

    async def _judge(self, model: str, route: RouteConfig, now: float) -> None:
        self._refresh(model, route)
        totals = self._all_totals(model)
        if self.fleet is not None:  # every pod's totals, less what was judged of each
            totals, base = self.fleet.judged_totals(model, totals)
        else:
            base = self._base.get(model, {})
            self._base[model] = {t: c for t, c in totals.items()}
        keys = None
        state = self.states.get(model)
        if state is not None:  # (keys arrive only with sticky routing; their file is empty otherwise)
            pods = [await asyncio.to_thread(self._pod_keys)]
            if self.fleet is not None:
                pods.extend(self.fleet.pushed_keys())
            spec = fingerprint(route)
            mine = merge_keys({}, pods).get(model, {}).get(spec, {})
            gen_of = lambda share: self._generation(model, share)  # noqa: E731
            if model not in self._primed:  # a new decider: carry on from the totals found
                self._primed.add(model)
                if state.spec == spec and state.gens:
                    self.cohorts.prime(model, spec, mine, gen_of)
            keys = self.cohorts.judge(model, spec, mine, gen_of)
        obs = self._observation(model, route, totals, base, keys, self._log(model).drain_generations(model))
        await self._apply(model, judge(route, state, obs, now))
        if self.peers is not None and self.fleet is None:
            await asyncio.to_thread(self.peers.write_baseline, self._base)

    def _observation(self, model: str, route: RouteConfig, totals: dict[str, list], base: dict,
                     keys: dict | None, feedback: dict) -> Observation:
        """The increments since the last judgment, per routing generation: counts (totals
        minus the totals judged then), sticky cohorts' new keys and per-key sums, and the
        feedback joined meanwhile (ArmObservation, GenerationObservation)."""
        arms = self._arms[model]
        state = self.states.get(model)
        current, had = routing_history(state) if state is not None else (0, ())
        now_share = candidate_share(route)
        shares: dict[int, float] = dict(had)
        shares.update(self._written.get(model, []))
        shares[current] = now_share
        # one slice per (generation, share): a share no generation had (a hand-edited split)
        # is judged at its own share, in the current generation
        gens: dict[tuple[int, float], dict] = {}

        def slot(gen: int, arm: int, share: float | None = None) -> dict:
            at = (gen, shares.get(gen, now_share) if share is None else share)
            return gens.setdefault(at, {}).setdefault(arm, {"requests": 0, "errors": 0, "units": 0,
                                                            "latency": [0] * NB})
        for tag, t in totals.items():
            version, share = parse_tag(tag)
            i = 0 if version == arms[0] else 1 if version == arms[1] else -1
            b = base.get(tag, zero_counts())
            if i < 0 or t[0] == b[0]:
                continue
            gen = self._generation(model, share)
            a = slot(gen, i, share)
            a["requests"] += t[0] - b[0]
            a["errors"] += t[1] - b[1]
            a["units"] += t[2] - b[2]
            a["latency"] = [x + y - z for x, y, z in zip(a["latency"], t[3], b[3])]
        unit_errors: dict[tuple[int, int], UnitSums] = {}
        for (gen, i), (new, sums) in (keys or {}).items():
            slot(gen, i)["units"] += new
            unit_errors[(gen, i)] = sums
        for gen, by_arm in feedback.items():
            for arm_name, fb in by_arm.items():
                slot(current if gen is None else gen, ("control", "candidate").index(arm_name))["feedback"] = fb
        out = []
        for gen, share in sorted(gens):
            pair = []
            for i in (0, 1):
                a = gens[(gen, share)].get(i) or slot(gen, i, share)
                fb: ArmFeedback = a.get("feedback") or ArmFeedback({}, {}, 0)
                home = abs(share - shares.get(gen, now_share)) < 1e-9  # per-key sums go once, with its share
                pair.append(ArmObservation(a["requests"], a["errors"], a["units"], tuple(a["latency"]), fb.outcomes,
                                           unit_errors.get((gen, i)) if route.sticky is not None and home else None,
                                           fb.unit_outcomes, fb.late))
            out.append(GenerationObservation(gen, share, pair[0], pair[1]))
        return Observation(edges=_EDGES, generations=tuple(out))

    async def _apply(self, model: str, j) -> None:
        if self.fleet is not None and not self.leader:
            log.warning("event=experiment_decision_dropped model=%s reason='the Lease was lost meanwhile'", model)
            return  # judged while a renewal failed for a whole duration: the next holder decides
        if j.route is not None:
            if j.route.experiment is not None and j.state is not None:  # the share of each generation we wrote
                gen, was = routing_history(j.state)[0], self.router.get_config(model)
                written = self._written.setdefault(model, [])
                if was.experiment is not None and all(g != gen - 1 for g, _ in written):
                    written.append((gen - 1, candidate_share(was)))  # the routing it replaces
                written.append((gen, candidate_share(j.route)))
                del written[:-64]
            await self.control.put_routing(model, j.route.to_json())
        changed = j.state is not None and j.state != self.states.get(model)
        if j.state is not None:
            self.states[model] = j.state
        if j.decision is not None:
            d = j.decision
            log.info("event=experiment_decision model=%s action=%s by=%s step=%d candidate_weight=%g reason=%r",
                     model, d.action, d.by, d.step, d.candidate_weight, d.reason)
            if d.action == "rollback":
                self._count("rollbacks", model, rollback_reason(d))
        if j.route is not None or j.decision is not None or changed:  # the others show what is saved
            await self._save_states()
            self._refresh(model, self.router.get_config(model))

    # ---- state file -----------------------------------------------------------------------
    def _load_states(self) -> None:
        if self.state_path is None or not self.state_path.exists():
            return
        try:
            doc = json.loads(self.state_path.read_text(encoding="utf-8"))
            self.states.update(self._parse_states(doc.get("models", {}), strict=True))
        except (OSError, ValueError, AttributeError) as e:
            log.error("event=experiment_state_unreadable path=%s reason=%r", self.state_path, str(e))

    @staticmethod
    def _parse_states(doc: dict, strict: bool = False) -> dict[str, ExperimentState]:
        out = {}
        for model, obj in doc.items():
            try:
                out[model] = ExperimentState.from_json(obj)
            except (ValueError, AttributeError, TypeError, KeyError) as e:
                if strict:
                    raise ValueError(str(e)) from None
                log.error("event=experiment_state_unreadable model=%s reason=%r", model, str(e))
        return out

    async def _save_states(self) -> None:
        """The file (beside the config, or this pod's run folder) and, holding it, the
        Lease: serialized here on the loop, written from a thread."""
        states = {m: s.to_json() for m, s in self.states.items()}
        lease = self.fleet is not None and self.leader
        if lease:
            self.fleet.stage(states)
        text = None  # our own file, unless the lease keeps the states there
        if self.state_path is not None and not self._lease_keeps_file:
            text = json.dumps({"models": states}, allow_nan=False, indent=1).encode()
        await asyncio.to_thread(self._write_states, text, lease)

    @property
    def _lease_keeps_file(self) -> bool:
        """The lease keeps the states in our state file (a file fleet): its holder alone writes it."""
        kept = self.fleet.lease.state_file if self.fleet is not None else None
        return kept is not None and self.state_path is not None and kept.absolute() == self.state_path.absolute()

    def _write_states(self, text: bytes | None, lease: bool) -> None:
        if text is not None:
            atomic_write(str(self.state_path), text)
        if lease:
            self.fleet.sync()

    # ---- API ----------------------------------------------------------------------------
    def view(self, model: str) -> dict:
        route = self.router.get_config(model)
        r = report(route, self.states.get(model), self.clock())
        if route.experiment is not None:  # ids served twice by this process, feedback window
            r["duplicate_request_ids"] = self._log(model).duplicate_ids.get(model, 0)
        return r

    async def action(self, model: str, action: str, fleet: bool = False) -> dict:
        if not self.leader:
            return await self._to_decider({"op": "action", "model": model, "action": action, "fleet": fleet})
        now = self.clock()
        try:
            j = act(self.router.get_config(model), self.states.get(model), action, now)
        except ExperimentError as e:
            raise ServingError(_CODES.get(e.kind, Code.INVALID_ARGUMENT), e.message) from None
        exp = self.router.get_config(model).experiment
        if exp is not None:  # the next judgment is a whole interval after a person's move
            self._due[model] = now + exp.interval_s  # (set first: a tick may run while we write)
        await self._apply(model, j)
        return self.view(model)

    async def feedback(self, model: str, body: object, fleet: bool = False, sender: str | None = None) -> dict:
        """Joined by the decider alone (it reads every worker's and replica's decision records)."""
        arrived = time.monotonic()
        if not self.leader:
            return await self._to_decider({"op": "feedback", "model": model, "body": body, "fleet": fleet})
        exp = self.router.get_config(model).experiment
        if exp is None:
            raise errors.not_found(f"model '{model}' has no experiment to take feedback")
        try:
            items = parse_feedback(body, exp.outcomes)
        except FeedbackError as e:
            raise errors.invalid(str(e)) from None
        self._ingest()  # records other workers appended since the last tick
        log_ = self._log(model)
        if self.fleet is not None and any((s := log_.served(it.request_id)) is None or s.model != model
                                          for it in items):
            await self.fleet.wait_pushes(arrived, skip=sender)  # a pod's records may be on their way
        result = log_.join(model, items, now=self.clock()).to_json()
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


ROLLBACK_REASONS = ("errors", "latency", "srm", "manual")


def rollback_reason(d) -> str:
    """`manual` for a person's rollback, else the guardrail that alarmed: the first word
    of the engine's reason (`errors: ...`, `latency p99: ...`), `other` if none of ours."""
    if d.by != "auto":
        return "manual"
    words = d.reason.split(":", 1)[0].split()
    return words[0] if words and words[0] in ROLLBACK_REASONS else "other"

