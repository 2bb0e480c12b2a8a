"""The manager: keeps exactly the aspired versions loaded, without dropping a request.

Owns one `Harness` per loaded (or loading) version and reconciles them against the
repository. Runs on the event loop, which alone changes lifecycle state, so no locks:
loads run on their own threads (bounded by a semaphore), forward passes in each version's
`Runner`. What to do next is decided by the pure `policy.plan` (availability-preserving by
default: a version leaving the aspired set keeps serving until an aspired version of the
model is AVAILABLE, then drains and unloads); this module only carries the actions out.
Readers get `Snapshot` views (`view()`, `subscribe()`), requests get `Handle`s.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime import errors
from runtime.execution.batcher import batching_on, calibrate_loaded, make_batcher
from runtime.lifecycle.loader import LoadedModel, LoadError, load_version, warmup
from runtime.logs import value
from runtime.repository.modelspec import ModelSpec
from runtime.lifecycle.policy import HarnessInfo, plan, select_versions
from runtime.execution.runner import Runner
from runtime.repository.scan import (ModelFolder, VersionFolder, is_model_name, list_models,
                                quiet_for, root_ignored, scan_model, scan_version)
from runtime.config.settings import RepositorySettings
from runtime.types import ServableId, VersionState
from runtime.views import LifecycleEvent, ModelView, Snapshot, VersionView

log = logging.getLogger("splitserve.manager")
S = VersionState
_generation = itertools.count(1)


def _in_thread(fn, *args, on_abandoned: Callable[[object], None] | None = None) -> asyncio.Future:
    """Run fn on a fresh daemon thread: a hung load must not hold a pool worker forever.
    If the future was cancelled (the load timed out), `on_abandoned(result)` runs on the
    loop when the thread ends, so the memory it held is released and accounted."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def body():
        try:
            res, exc = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the loop
            res, exc = None, e

        def settle():
            if fut.cancelled():
                if on_abandoned is not None:
                    on_abandoned(res)
                elif res is not None and hasattr(res, "release"):
                    res.release()
                return
            fut.set_exception(exc) if exc else fut.set_result(res)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass
    threading.Thread(target=body, name=f"load-{getattr(fn, '__name__', 'fn')}", daemon=True).start()
    return fut


class Harness:
    """One version generation: lifecycle state, loaded model, runner, in-flight count.

    A version overwritten in place gets a second harness (new fingerprint); the old one
    keeps serving until the new one is AVAILABLE. Only the manager and `Handle` touch it.
    """

    def __init__(self, sid: ServableId, folder: VersionFolder, spec: ModelSpec):
        self.sid = sid
        self.folder = folder
        self.spec = spec
        self.generation = next(_generation)
        self.state = S.START
        self.error: str | None = None
        self.loaded: LoadedModel | None = None
        self.runner: Runner | None = None
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.batch_calibration: dict = {}  # measured on the load thread (batching.exact)
        self.cancelled = False  # removed while loading: drop it when the load ends
        self.state_since = time.time()

    @property
    def version(self) -> int:
        return self.sid.version

    def _set(self, state: VersionState, error: str | None = None) -> None:
        self.state, self.error, self.state_since = state, error, time.time()


class Handle:
    """A request's pin on one AVAILABLE version: the one place in-flight is counted.

    Made by `Manager.acquire` (counted from then on), released by leaving the `with`
    block (or `release()`), exactly once. While any handle is out, the version does not
    unload.
    """

    __slots__ = ("_h", "_open")

    def __init__(self, h: Harness):
        self._h = h
        self._open = True
        h.inflight += 1
        h.idle.clear()

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        if self._open:
            self._open = False
            h = self._h
            h.inflight -= 1
            if h.inflight == 0:
                h.idle.set()

    @property
    def sid(self) -> ServableId:
        return self._h.sid

    @property
    def version(self) -> int:
        return self._h.sid.version

    @property
    def signature(self):
        return self._h.loaded.signature

    @property
    def batched(self) -> bool:
        """Its runner batches (a traced request then gets a `batch` span)."""
        return self._h.runner.batcher is not None

    def run(self, inputs):
        return self._h.runner.run(inputs)

    def run_shadow(self, inputs):
        return self._h.runner.run_shadow(inputs)


@dataclass(frozen=True, slots=True)
class VersionStatus:
    version: int
    state: VersionState
    error: str | None
    since: float


class ModelEntry:
    """What the manager knows of one model folder. Maps are replaced whole."""

    def __init__(self, name: str, path: Path):
        self.name = name
        self.path = path
        self.spec: ModelSpec | None = None
        self.spec_error: str | None = None
        self.spec_error_since = 0.0
        self.ignored: dict[str, str] = {}  # path -> reason, as last logged (logged once)
        self.failures: dict[int, str] = {}  # last load failure per version, until it loads
        self.folder: ModelFolder | None = None
        self.harnesses: list[Harness] = []
        self.serving: dict[int, Harness] = {}  # AVAILABLE harness per version
        self.ended: dict[int, VersionStatus] = {}  # last END record per version with a folder
        self.disabled = False  # unloaded through the repository API
        self.dirty = True  # a rescan is due
        self.in_grace = False  # the one timer left waits out incomplete_grace_s: settled
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.execution: tuple[bool, str] | None = None  # (inline, the rule's words), as last logged

    def available_versions(self) -> list[int]:
        return sorted(self.serving)

    def visible(self) -> bool:
        return (self.spec is not None or bool(self.harnesses) or self.disabled
                or self.spec_error is not None)

    def view(self) -> ModelView:
        mem: dict[int, int] = {}
        for h in self.harnesses:
            if h.loaded is not None:
                mem[h.version] = mem.get(h.version, 0) + h.loaded.memory_bytes
        present = frozenset(self.folder.versions) if self.folder else frozenset()
        versions = []
        for st in self.statuses():
            h = self.serving.get(st.version)
            if h is None:
                h = next((x for x in self.harnesses if x.version == st.version
                          and x.loaded is not None), None)
            lm = h.loaded if h is not None else None
            versions.append(VersionView(
                st.version, st.state, st.error, st.since,
                lm.signature if lm is not None else None,
                lm.format if lm is not None else None,
                str(lm.device) if lm is not None else None,
                mem.get(st.version, 0), st.version in present,
                h.runner.execution if h is not None and h.runner is not None else None))
        spec = self.spec
        return ModelView(
            self.name, tuple(versions), present,
            spec.declared_signature() if spec else None, self.spec_error, self.disabled,
            spec is not None, None,
            ({"preferred_batch_size": spec.batching.preferred_batch_sizes,
              "max_queue_delay_microseconds": spec.batching.max_queue_delay_us}
             if spec is not None and batching_on(spec) else None),
            spec.max_batch_size if spec else 0,
            spec.version_policy if spec else None,
            {v: f.incomplete for v, f in self.folder.versions.items() if f.format is None}
            if self.folder else {})

    def statuses(self) -> list[VersionStatus]:
        live: dict[int, VersionStatus] = {}
        for h in sorted(self.harnesses, key=lambda h: h.generation):
            if h.state is S.AVAILABLE or h.version not in live or live[h.version].state is not S.AVAILABLE:
                live[h.version] = VersionStatus(h.version, h.state, h.error, h.state_since)
        merged = {**self.ended, **live}
        if self.spec is None and self.spec_error is not None and self.folder is not None:
            # never a valid model.yaml: its versions cannot load, FAILED for that reason
            for v in self.folder.versions:
                merged.setdefault(v, VersionStatus(v, S.FAILED, self.spec_error,
                                                   self.spec_error_since))
        return [merged[v] for v in sorted(merged)]


def execution_rule(spec: ModelSpec | None, runners: list[Runner], inline_forward_us: float) -> tuple[bool, str]:
    """(inline or not, why in words) for every unbatched CPU version of one model alike:
    two arms on different paths would compare the paths, not the models. `execution`
    in model.yaml decides outright; `auto` runs inline only while every such version's
    warm forward (median of its warmup timing, one thread) is at most inline_forward_us."""
    mode = spec.execution if spec is not None else "auto"
    if mode != "auto":
        return mode == "inline", f"execution: {mode} in model.yaml"
    if not runners:
        return False, "no unbatched CPU version"
    if inline_forward_us <= 0:
        return False, "auto: repository.inline_forward_us is 0"
    slow = [r for r in runners if not r.can_inline or r.forward_s is None
            or r.forward_s * 1e6 > inline_forward_us]
    if slow:
        r = slow[0]
        took = "not measured" if r.forward_s is None or not r.can_inline else f"{r.forward_s * 1e6:.0f} us"
        return False, f"auto: {r.name} forward {took} > inline_forward_us={inline_forward_us:g}"
    worst = max(r.forward_s for r in runners) * 1e6
    return True, f"auto: every version's forward <= inline_forward_us={inline_forward_us:g} (slowest {worst:.0f} us)"


class Manager:
    """Reconciles the repository against loaded harnesses; hands out handles; publishes
    a `Snapshot` to its subscribers on every change.

    Subscribers are called synchronously at publication (the router must drop an
    UNLOADING version before the next request is picked) and must not call back into the
    manager synchronously: anything they want from it they schedule on the loop.
    """

    def __init__(self, root: Path, settings: RepositorySettings,
                 referenced: Callable[[str], frozenset[int]] = lambda m: frozenset(),
                 on_event: Callable[[LifecycleEvent], None] = lambda e: None,
                 on_batch: Callable[[str, int, int, float], None] | None = None,
                 shadow_max_waiting: int = 16,
                 load: Callable[[VersionFolder, ModelSpec], LoadedModel] | None = None):
        self.root = root
        self.settings = settings
        # folder -> loaded and warm model, on a load thread (LoadError: the reason it FAILED)
        self.load = load if load is not None else load_and_warm
        self.referenced = referenced  # versions the routes name: they stay aspired
        self.on_event = on_event  # lifecycle events (metrics)
        self.on_batch = on_batch  # (model, version, rows, seconds) per executed batch
        self.shadow_max_waiting = shadow_max_waiting
        self.models: dict[str, ModelEntry] = {}
        self.abandoned_loads = 0  # timed-out load threads still running (memory held)
        self._root_ignored: dict[str, str] = {}  # root entries that are not models, as logged
        self._subscribers: list[Callable[[Snapshot, str | None], None]] = []
        self._snapshot = Snapshot(0, {}, self._inflight)
        self._load_sem: asyncio.Semaphore | None = None
        self._changed = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        # Completed reconcile passes per model name (read-only): tests wait on it for
        # "the manager has looked", instead of sleeping and asserting nothing happened.
        self.reconciles: Counter[str] = Counter()

    # ---- published views -------------------------------------------------------------
    def view(self) -> Snapshot:
        return self._snapshot

    def subscribe(self, fn: Callable[[Snapshot, str | None], None]) -> None:
        self._subscribers.append(fn)

    def _inflight(self, model: str, version: int) -> int:
        e = self.models.get(model)
        return 0 if e is None else sum(h.inflight for h in e.harnesses if h.version == version)

    def _publish(self, changed: str | None) -> None:
        models = dict(self._snapshot.models)
        names = [changed] if changed is not None else list(set(models) | set(self.models))
        for name in names:
            e = self.models.get(name)
            if e is None or not e.visible():
                models.pop(name, None)
            else:
                models[name] = e.view()
        self._snapshot = Snapshot(self._snapshot.seq + 1, models, self._inflight,
                                  self.abandoned_loads)
        for fn in self._subscribers:
            fn(self._snapshot, changed)

    def unknown(self, model: str) -> errors.ServingError:
        """The error for a model the manager does not serve: UNAVAILABLE (retry) when its
        folder is in the repository but not read yet (the first scan after the port
        opened, a folder just published), else NOT_FOUND. Clients retry 503, not 404."""
        entry = self.models.get(model)
        folder = self.root / model  # as list_models sees it: a symlinked folder is never served
        if (entry is None or not entry.disabled) and is_model_name(model) and folder.is_dir() \
                and not folder.is_symlink():
            return errors.unavailable(f"model '{model}' is in the repository but not loaded yet; retry")
        return errors.not_found(f"unknown model '{model}'")

    def require(self, model: str) -> ModelView:
        """The model's view, or NOT_FOUND."""
        v = self._snapshot.models.get(model)
        if v is None:
            raise errors.not_found(f"unknown model '{model}'")
        return v

    # ---- lifecycle of the manager itself -------------------------------------------
    async def start(self) -> None:
        self._load_sem = asyncio.Semaphore(self.settings.load_workers)
        self.rescan_all()

    def rescan_all(self) -> None:
        self._report_root()
        names = {p.name for p in list_models(self.root)} | set(self.models)
        for name in names:
            self.request_reconcile(name, delay=0)

    def _report_root(self) -> None:
        """Log, once per path and reason, what the root holds that is not a model folder."""
        now = dict(root_ignored(self.root))
        for path, why in now.items():
            if self._root_ignored.get(path) != why:
                log.info("event=ignored path=%s reason=%r", value(path), why)
        self._root_ignored = now

    def on_path_changed(self, path: Path) -> None:
        """A filesystem event (on the loop): debounce by model, then reconcile."""
        try:
            rel = path.resolve().relative_to(self.root.resolve())
        except (ValueError, OSError):
            return
        if not rel.parts:
            self.rescan_all()
            return
        name = rel.parts[0]
        if len(rel.parts) == 1 and not (self.root / name).is_dir():
            self._report_root()  # a file at the root (or a folder gone): say what is not a model
        if is_model_name(name):
            self.request_reconcile(name, delay=self.settings.quiet_s)

    def request_reconcile(self, name: str, delay: float = 0.0) -> None:
        if self._closing:
            return
        entry = self.models.get(name)
        if entry is None:
            if not is_model_name(name):
                return
            entry = self.models[name] = ModelEntry(name, self.root / name)
        if entry.timer is not None:
            entry.timer.cancel()
        entry.in_grace = False
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(delay, self._kick, entry)

    def _kick(self, entry: ModelEntry) -> None:
        # dirty when the timer fires, not when it is set: a recheck asked for from inside
        # a pass must not make that pass loop at once (it rescanned ~300 times a second)
        entry.dirty = True
        entry.timer = None
        if entry.task is None or entry.task.done():
            entry.task = self._spawn(self._reconcile(entry))

    def _spawn(self, coro) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def _notify(self, entry: ModelEntry) -> None:
        serving = {}
        for h in entry.harnesses:
            if h.state is S.AVAILABLE and (h.version not in serving or
                                           h.generation > serving[h.version].generation):
                serving[h.version] = h
        entry.serving = serving
        self._publish(entry.name)
        self._wake()

    # ---- reconcile -----------------------------------------------------------------
    async def _reconcile(self, entry: ModelEntry) -> None:
        try:
            while entry.dirty and not self._closing:
                entry.dirty = False
                try:
                    folder = await asyncio.to_thread(scan_model, entry.path, entry.spec)
                    self._apply(entry, folder)
                except Exception as e:  # never let one bad folder stop the loop
                    log.error("event=reconcile_error model=%s error=%r", entry.name, e)
                    log.debug("reconcile traceback", exc_info=True)
                self.reconciles[entry.name] += 1
        finally:
            self._wake()  # settle() waits for this task to end

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _apply(self, entry: ModelEntry, folder: ModelFolder) -> None:
        self._report(entry, folder)
        entry.spec_error = folder.spec_error
        if folder.spec is None:  # invalid model.yaml and nothing good seen before
            entry.folder = folder
            self._publish(entry.name)
            return
        changed = entry.spec is not None and folder.spec != entry.spec
        if changed:
            self._apply_in_place(entry, folder.spec)
        entry.spec, entry.folder = folder.spec, folder
        if changed:
            self._choose_execution(entry)  # `execution:` may have changed
        present = folder.versions
        # TF Serving forgets a version whose folder is gone: so does the status (END records)
        entry.ended = {v: st for v, st in entry.ended.items() if v in present}
        entry.failures = {v: r for v, r in entry.failures.items() if v in present}
        gone = entry.disabled or entry.path.is_symlink() or not entry.path.is_dir()
        aspired = set() if gone else (select_versions(folder.spec, present) |
                                      (set(self.referenced(entry.name)) & set(present)))
        loadable, recheck, grace_only = set(), None, True
        for v in aspired:
            wait = self._not_ready_for(present[v])
            if wait is None:
                loadable.add(v)
            else:
                recheck = wait[0] if recheck is None else min(recheck, wait[0])
                grace_only &= wait[1]
        infos = [HarnessInfo(h.generation, h.version, h.folder.fingerprint, h.state)
                 for h in entry.harnesses]
        actions = plan(infos, {v: present[v].fingerprint for v in aspired}, loadable,
                       set(present), entry.disabled,
                       folder.spec.version_swap == "resource_preserving")
        by_gen = {h.generation: h for h in entry.harnesses}
        for a in actions:
            h = by_gen.get(a.gen)
            if a.kind == "load":
                h = Harness(ServableId(entry.name, a.version), present[a.version], folder.spec)
                entry.harnesses.append(h)
                self._spawn(self._load(entry, h))
            elif a.kind == "cancel":
                h.cancelled = True
            elif a.kind == "forget":
                entry.harnesses.remove(h)
                entry.ended.pop(h.version, None)
            elif a.kind == "unload":
                self._spawn(self._unload(entry, h, a.reason))
        self._notify(entry)
        if recheck is not None:
            self.request_reconcile(entry.name, delay=recheck)
            entry.in_grace = grace_only
        if not entry.harnesses and not entry.path.is_dir():
            self.models.pop(entry.name, None)
            self._publish(entry.name)

    @staticmethod
    def _report(entry: ModelEntry, folder: ModelFolder) -> None:
        """Log, once per change (the watcher rescans often): what the scan ignored, a
        model.yaml that turned bad, and one that is good again."""
        for path, why in folder.ignored:
            if entry.ignored.get(path) != why:
                log.info("event=ignored model=%s path=%s reason=%r", entry.name, value(path), why)
        entry.ignored = dict(folder.ignored)
        if folder.spec_error == entry.spec_error:
            return
        entry.spec_error_since = time.time()
        if folder.spec_error is not None:
            log.error("event=bad_model_yaml model=%s keeping=%s reason=%r", entry.name,
                      "last_good" if entry.spec is not None else "nothing", folder.spec_error)
        else:
            log.info("event=model_config_recovered model=%s path=%s/model.yaml was=%r",
                     entry.name, entry.name, entry.spec_error)

    def _apply_in_place(self, entry: ModelEntry, spec: ModelSpec) -> None:
        """model.yaml changed: settings that leave the weights valid apply to what serves."""
        for h in entry.harnesses:
            if h.spec.load_key() == spec.load_key():
                h.spec = spec
                if h.runner is not None:
                    h.runner.update(max_queue_size=spec.queue_size(),
                                    max_queue_delay_s=spec.batching.max_queue_delay_us / 1e6,
                                    preferred_batch_sizes=spec.batching.preferred_batch_sizes)
        log.info("event=model_yaml_changed model=%s", entry.name)

    def _not_ready_for(self, vf: VersionFolder) -> tuple[float, bool] | None:
        """(seconds to wait, whether only incomplete_grace_s is left) before this folder
        may be loaded, or None when it may be now. A folder with no model file (yet) or an
        incomplete one is "loaded" once quiet for incomplete_grace_s, and so FAILS with
        its reason. Waiting out the grace counts as settled: a copy that has not started
        (or stalled) holds neither start nor readiness."""
        quiet = quiet_for(vf)
        if quiet < self.settings.quiet_s:
            return self.settings.quiet_s - quiet + 0.05, False
        if vf.incomplete and quiet < self.settings.incomplete_grace_s:
            return self.settings.incomplete_grace_s - quiet + 0.05, True
        return None

    # ---- load / unload -------------------------------------------------------------
    def _load_and_warm(self, h: Harness) -> LoadedModel:
        lm = self.load(h.folder, h.spec)
        h.batch_calibration = calibrate_loaded(lm, h.spec)  # before AVAILABLE, not after
        return lm

    def _abandoned(self, h: Harness, lm) -> None:
        """A timed-out load's thread finished at last: give its memory back, say so."""
        self.abandoned_loads -= 1
        if lm is not None:
            lm.release()
        log.warning("event=abandoned_load_finished servable=%s released=%s", h.sid, lm is not None)
        self._publish(None)

    async def _load(self, entry: ModelEntry, h: Harness) -> None:
        if h.folder.format is None and not (h.cancelled or self._closing):
            return self._fail(entry, h, h.folder.incomplete or "no model file")  # no slot needed
        async with self._load_sem:
            if h.cancelled or self._closing:
                entry.harnesses.remove(h)
                self._notify(entry)
                return
            h._set(S.LOADING)
            self._notify(entry)
            t0 = time.perf_counter()
            fut = _in_thread(self._load_and_warm, h, on_abandoned=lambda lm: self._abandoned(h, lm))
            try:
                lm = await asyncio.wait_for(asyncio.shield(fut), timeout=h.spec.load_timeout_s)
            except TimeoutError:
                fut.cancel()  # the thread releases the model if it ever finishes
                self.abandoned_loads += 1
                return self._fail(entry, h, f"load did not finish within load_timeout_s="
                                            f"{h.spec.load_timeout_s:g}s (its thread still runs "
                                            f"and holds memory until it ends)")
            except LoadError as e:
                log.debug("load traceback servable=%s", h.sid, exc_info=e)
                reason = one_line(str(e))
                if h.folder.incomplete and h.folder.incomplete not in reason:
                    reason = f"{reason} (folder incomplete: {h.folder.incomplete})"
                return self._fail(entry, h, reason)
            except Exception as e:  # noqa: BLE001
                log.debug("load traceback servable=%s", h.sid, exc_info=e)
                return self._fail(entry, h, one_line(f"{type(e).__name__}: {e}"))
        now = await asyncio.to_thread(scan_version, entry.path, h.version, h.spec)
        if now.fingerprint != h.folder.fingerprint or h.cancelled or self._closing:
            why = "removed while loading" if h.cancelled else "files changed during load"
            await asyncio.to_thread(lm.release)
            entry.harnesses.remove(h)
            log.info("event=load_discarded servable=%s reason=%r", h.sid, why)
            self.request_reconcile(entry.name, delay=self.settings.quiet_s)
            self._notify(entry)
            return
        h.loaded = lm
        h.runner = self._make_runner(h, lm)
        self._choose_execution(entry, also=h)
        h._set(S.AVAILABLE)
        log.info("event=loaded servable=%s format=%s device=%s load_ms=%.1f warmup_ms=%.1f "
                 "total_ms=%.1f memory_bytes=%d", h.sid, lm.format, lm.device, lm.load_s * 1e3,
                 lm.warmup_s * 1e3, (time.perf_counter() - t0) * 1e3, lm.memory_bytes)
        self.on_event(LifecycleEvent("loaded", h.sid.model, h.version, None, lm.load_s,
                                     lm.warmup_s, str(lm.device), lm.memory_bytes,
                                     time.monotonic()))
        entry.ended.pop(h.version, None)
        failed = entry.failures.pop(h.version, None)
        if failed is not None:
            log.info("event=version_recovered servable=%s was=%r", h.sid, failed)
        entry.dirty = True
        self._kick(entry)  # re-plan: what this version replaces can now unload
        self._notify(entry)

    def _make_runner(self, h: Harness, lm: LoadedModel) -> Runner:
        # One forward thread per version with its own intra-op thread count: by default all
        # cores but one, which stays with the event loop (torch's setting is per thread).
        threads = self.settings.intra_op_threads or max(1, (os.cpu_count() or 2) - 1)
        sid, spec = h.sid, h.spec
        name = f"model '{sid.model}' version {sid.version}"
        on_batch = None if self.on_batch is None else (
            lambda rows, secs: self.on_batch(sid.model, sid.version, rows, secs))
        return Runner.create(
            name, lm, threads=threads, max_queue_size=spec.queue_size(),
            make_batcher=lambda ex: make_batcher(name, lm, spec, ex, h.batch_calibration, on_batch),
            shadow_max_waiting=self.shadow_max_waiting)

    def _choose_execution(self, entry: ModelEntry, also: Harness | None = None) -> None:
        """One path for every unbatched CPU version of the model (`execution_rule`), set on
        their runners; logged when it changes. `also`: a version about to become AVAILABLE."""
        hs = [h for h in entry.harnesses if h.runner is not None
              and (h.state is S.AVAILABLE or h is also) and h.runner.batcher is None
              and h.loaded is not None and h.loaded.device.type == "cpu"]
        inline, why = execution_rule(entry.spec, [h.runner for h in hs], self.settings.inline_forward_us)
        for h in hs:
            h.runner.set_inline(inline)
        if hs and entry.execution != (inline, why):
            entry.execution = (inline, why)
            log.info("event=execution model=%s path=%s versions=%s rule=%r", entry.name,
                     "inline" if inline else "executor", ",".join(str(h.version) for h in hs), why)

    def _fail(self, entry: ModelEntry, h: Harness, reason: str) -> None:
        h._set(S.FAILED, reason)
        entry.failures[h.version] = reason
        log.error("event=load_failed servable=%s reason=%r", h.sid, reason)
        self.on_event(LifecycleEvent("failed", h.sid.model, h.version, reason, at=time.monotonic()))
        self._notify(entry)
        if h.cancelled:
            self.request_reconcile(entry.name)

    async def _unload(self, entry: ModelEntry, h: Harness, why: str) -> None:
        if h.state is not S.AVAILABLE:
            return
        h._set(S.UNLOADING)
        self._notify(entry)  # out of the routing table: no new requests reach it
        t0 = time.perf_counter()
        h.runner.stop_shadows()  # waiting shadows must not hold the drain
        try:
            await asyncio.wait_for(h.idle.wait(), timeout=self.settings.unload_drain_timeout_s)
        except TimeoutError:
            log.warning("event=drain_timeout servable=%s inflight=%d", h.sid, h.inflight)
        lm, h.loaded = h.loaded, None
        await h.runner.close(lm.release if lm is not None else (lambda: None))
        h._set(S.END)
        entry.harnesses.remove(h)
        self._choose_execution(entry)  # the version that kept the model off the loop may be gone
        if not any(x.version == h.version for x in entry.harnesses) and \
                entry.folder is not None and h.version in entry.folder.versions:
            entry.ended = {**entry.ended, h.version: VersionStatus(h.version, S.END, None, h.state_since)}
        log.info("event=unloaded servable=%s reason=%r drain_unload_ms=%.1f", h.sid, why,
                 (time.perf_counter() - t0) * 1e3)
        self.on_event(LifecycleEvent("unloaded", h.sid.model, h.version, at=time.monotonic()))
        self._notify(entry)
        if not entry.harnesses and not entry.path.is_dir():
            self.models.pop(entry.name, None)
            self._publish(entry.name)
        elif not self._closing:
            self.request_reconcile(entry.name)  # the folder may have come back meanwhile

    # ---- the data path -------------------------------------------------------------
    def acquire(self, model: str, version: int) -> Handle:
        """Pin an AVAILABLE version for one request (loop only): `with acquire(...) as h`."""
        entry = self.models.get(model)
        if entry is None or not entry.visible():
            raise self.unknown(model)
        h = entry.serving.get(version)
        if h is None or h.state is not S.AVAILABLE:
            known = {s.version: s for s in entry.statuses()}
            if version not in known and (entry.folder is None or version not in entry.folder.versions):
                avail = ", ".join(map(str, entry.available_versions())) or "none"
                raise errors.not_found(
                    f"model '{model}' has no version {version} (available: {avail})")
            st = known.get(version)
            if st is None or st.state is S.END:
                raise errors.not_found(f"version {version} of model '{model}' is not loaded "
                                       f"(not in its version policy or routes)")
            raise errors.unavailable(f"version {version} of model '{model}' is {st.state.value}"
                                     + (f": {st.error}" if st.error else ""))
        return Handle(h)

    # ---- queries and control -------------------------------------------------------
    async def wait_until(self, predicate: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=left)
            except TimeoutError:
                return predicate()
        return True

    def state_of(self, model: str, version: int) -> VersionState | None:
        m = self._snapshot.models.get(model)
        v = m.version(version) if m is not None else None
        return None if v is None else v.state

    def _quiet(self, model: str) -> bool:
        e = self.models.get(model)
        return e is None or ((e.timer is None or e.in_grace) and not e.dirty and
                             (e.task is None or e.task.done()) and
                             all(h.state in (S.AVAILABLE, S.FAILED) for h in e.harnesses))

    async def settle(self, model: str, timeout: float) -> bool:
        """Wait until nothing of `model` is loading or unloading and no rescan is due."""
        return await self.wait_until(lambda: self._quiet(model), timeout)

    async def settle_all(self, timeout: float) -> bool:
        return await self.wait_until(lambda: all(self._quiet(m) for m in list(self.models)),
                                     timeout)

    async def load_model(self, model: str, timeout: float = 120.0) -> None:
        """Repository API load: (re-)enable and wait until settled."""
        path = self.root / model
        if not is_model_name(model) or path.is_symlink() or not path.is_dir():
            raise errors.not_found(f"no model folder '{model}' in the repository")
        entry = self.models.get(model) or self.models.setdefault(model, ModelEntry(model, self.root / model))
        entry.disabled = False
        self.request_reconcile(model)
        await self.wait_until(lambda: entry.timer is None and (entry.task is None or entry.task.done()), timeout)
        await self.settle(model, timeout)
        if entry.spec is None:
            raise errors.invalid(entry.spec_error or f"model '{model}' has no valid model.yaml")
        failed = [s for s in entry.statuses() if s.state is S.FAILED]
        if not entry.serving and failed:
            raise errors.ServingError(errors.Code.INTERNAL, f"failed to load '{model}': " +
                                      "; ".join(f"version {s.version}: {s.error}" for s in failed))

    async def unload_model(self, model: str, timeout: float = 120.0) -> None:
        self.require(model)
        entry = self.models[model]
        entry.disabled = True
        self.request_reconcile(model)
        await self.wait_until(lambda: not entry.harnesses or all(h.state in (S.FAILED,) for h in entry.harnesses), timeout)

    async def close(self) -> None:
        """Drain and release everything (graceful shutdown)."""
        self._closing = True
        for e in self.models.values():
            if e.timer:
                e.timer.cancel()
        for e in list(self.models.values()):
            for h in list(e.harnesses):
                if h.state is S.AVAILABLE:
                    await self._unload(e, h, "shutdown")


def load_and_warm(folder: VersionFolder, spec: ModelSpec) -> LoadedModel:
    """The real loader (the manager's default): the version's model file, then warmup."""
    lm = load_version(folder.path, folder.format or "model.pt2", spec)
    if spec.warmup:
        warmup(lm, folder.path)
    return lm


def one_line(text: str, limit: int = 300) -> str:
    """A reason fit for one log line and one API field: first line, bounded."""
    first = text.strip().splitlines()[0] if text.strip() else text
    return first if len(first) <= limit else first[:limit - 3] + "..."
