"""The manager: keeps exactly the aspired versions loaded, without dropping a request.

Owns one `Harness` per loaded (or loading) version and reconciles them against the
repository. Runs on the event loop, which alone changes lifecycle state, so no locks:
loads run on their own threads (bounded by a semaphore), forward passes on one executor
thread per version. Availability-preserving: a version leaving the aspired set keeps
serving until an aspired version of the model is AVAILABLE, then drains and unloads.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from runtime import errors
from runtime.batcher import calibrate_loaded
from runtime.loader import LoadedModel, LoadError, load_version, warmup
from runtime.modelspec import ModelSpec
from runtime.policy import select_versions
from runtime.repository import (ModelFolder, VersionFolder, is_model_name, list_models,
                                quiet_for, scan_model, scan_version)
from runtime.settings import RepositorySettings
from runtime.types import ServableId, VersionState

log = logging.getLogger("splitserve.manager")
S = VersionState
_generation = itertools.count(1)


def _in_thread(fn, *args) -> asyncio.Future:
    """Run fn on a fresh daemon thread: a hung load must not hold a pool worker forever."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def body():
        try:
            res, exc = fn(*args), None
        except BaseException as e:  # noqa: BLE001 - handed to the loop
            res, exc = None, e

        def settle():
            if fut.cancelled():
                if res is not None and hasattr(res, "release"):
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
    """One version generation: lifecycle state, in-flight count, loaded model, executor.

    A version overwritten in place gets a second harness (new fingerprint); the old one
    keeps serving until the new one is AVAILABLE.
    """

    def __init__(self, sid: ServableId, folder: VersionFolder, spec: ModelSpec):
        self.sid = sid
        self.folder = folder
        self.spec = spec
        self.generation = next(_generation)
        self.state = S.START
        self.error: str | None = None
        self.loaded: LoadedModel | None = None
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.executor: ThreadPoolExecutor | None = None
        self.batcher = None  # runtime.batcher.Batcher when batching is on
        self.batch_calibration: dict = {}  # measured on the load thread, used by the batcher
        self.cancelled = False  # removed while loading: drop it when the load ends
        self.inline_numel = 0  # requests up to this many input elements run on the loop
        self.state_since = time.time()

    @property
    def version(self) -> int:
        return self.sid.version

    def _set(self, state: VersionState, error: str | None = None) -> None:
        self.state, self.error, self.state_since = state, error, time.time()

    async def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """One forward pass off the loop (batched when this version batches)."""
        if self.batcher is not None:
            return await self.batcher.submit(inputs)
        if self.inline_numel and sum(x.numel() for x in inputs) <= self.inline_numel:
            return self.loaded.forward(inputs)  # tiny forward: cheaper than a thread hop
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self.loaded.forward, inputs)

    def release_handle(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()


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
        self.folder: ModelFolder | None = None
        self.harnesses: list[Harness] = []
        self.serving: dict[int, Harness] = {}  # AVAILABLE harness per version
        self.ended: dict[int, VersionStatus] = {}  # last END/FAILED record per version
        self.disabled = False  # unloaded through the repository API
        self.dirty = True
        self.task: asyncio.Task | None = None
        self.timer: asyncio.TimerHandle | None = None

    def available_versions(self) -> list[int]:
        return sorted(self.serving)

    def statuses(self) -> list[VersionStatus]:
        live: dict[int, VersionStatus] = {}
        for h in sorted(self.harnesses, key=lambda h: h.generation):
            if h.state is S.AVAILABLE or h.version not in live or live[h.version].state is not S.AVAILABLE:
                live[h.version] = VersionStatus(h.version, h.state, h.error, h.state_since)
        merged = {**self.ended, **live}
        return [merged[v] for v in sorted(merged)]


class Manager:
    """Reconciles the repository against loaded harnesses; hands out handles."""

    def __init__(self, root: Path, settings: RepositorySettings,
                 referenced: Callable[[str], frozenset[int]] = lambda m: frozenset(),
                 on_change: Callable[[str, list[int]], None] = lambda m, v: None,
                 make_batcher: Callable[[Harness], object] | None = None,
                 on_event: Callable[[str, Harness], None] = lambda kind, h: None):
        self.root = root
        self.settings = settings
        self.referenced = referenced
        self.on_change = on_change  # (model, AVAILABLE versions): the router rebuilds its table
        self.on_event = on_event  # lifecycle events for metrics: "loaded", "failed", "unloaded"
        self.make_batcher = make_batcher
        self.models: dict[str, ModelEntry] = {}
        self._load_sem: asyncio.Semaphore | None = None
        self._changed = asyncio.Event()
        self._closing = False
        self._tasks: set[asyncio.Task] = set()
        # Completed reconcile passes per model name (read-only): tests wait on it for
        # "the manager has looked", instead of sleeping and asserting nothing happened.
        self.reconciles: Counter[str] = Counter()

    # ---- lifecycle of the manager itself -------------------------------------------
    async def start(self) -> None:
        self._load_sem = asyncio.Semaphore(self.settings.load_workers)
        self.rescan_all()

    def rescan_all(self) -> None:
        names = {p.name for p in list_models(self.root)} | set(self.models)
        for name in names:
            self.request_reconcile(name, delay=0)

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
        entry.dirty = True
        if entry.timer is not None:
            entry.timer.cancel()
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(delay, self._kick, entry)

    def _kick(self, entry: ModelEntry) -> None:
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
        if serving.keys() != entry.serving.keys() or any(
                serving[v] is not entry.serving[v] for v in serving):
            entry.serving = serving
            self.on_change(entry.name, entry.available_versions())
        self._wake()

    # ---- reconcile -----------------------------------------------------------------
    async def _reconcile(self, entry: ModelEntry) -> None:
        try:
            while entry.dirty and not self._closing:
                entry.dirty = False
                try:
                    folder = await asyncio.to_thread(scan_model, entry.path, entry.spec)
                    self._apply(entry, folder)
                except Exception:  # never let one bad folder stop the loop
                    log.exception("event=reconcile_error model=%s", entry.name)
                self.reconciles[entry.name] += 1
        finally:
            self._wake()  # settle() waits for this task to end

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _apply(self, entry: ModelEntry, folder: ModelFolder) -> None:
        if folder.spec_error and folder.spec_error != entry.spec_error:
            log.error("event=bad_model_yaml model=%s keeping=last_good reason=%r",
                      entry.name, folder.spec_error)
        entry.spec_error = folder.spec_error
        if folder.spec is None:  # invalid model.yaml and nothing good seen before
            entry.folder = folder
            return
        entry.spec, entry.folder = folder.spec, folder
        present = folder.versions
        aspired = set() if entry.disabled or entry.path.is_symlink() or not entry.path.is_dir() else (
            select_versions(folder.spec, present) | (set(self.referenced(entry.name)) & set(present)))
        recheck = None
        for v in sorted(aspired):
            vf = present[v]
            wait = self._not_ready_for(vf)
            if wait is not None:
                if wait >= 0:
                    recheck = wait if recheck is None else min(recheck, wait)
                continue
            if any(h.version == v and h.folder.fingerprint == vf.fingerprint
                   and h.state is not S.UNLOADING for h in entry.harnesses):
                continue  # loading, loaded or failed with these very files
            h = Harness(ServableId(entry.name, v), vf, folder.spec)
            entry.harnesses.append(h)
            self._spawn(self._load(entry, h))
        self._plan_unloads(entry, aspired, present)
        self._notify(entry)
        if recheck is not None:
            self.request_reconcile(entry.name, delay=recheck)
        if not entry.harnesses and not entry.path.is_dir():
            self.models.pop(entry.name, None)

    def _not_ready_for(self, vf: VersionFolder) -> float | None:
        """Seconds to wait before this folder may be loaded, or None when it may be now."""
        if vf.format is None:
            return -1.0  # nothing to load yet (empty or still arriving): the next event rescans
        quiet = quiet_for(vf)
        if quiet < self.settings.quiet_s:
            return self.settings.quiet_s - quiet + 0.05
        if vf.incomplete and quiet < self.settings.incomplete_grace_s:
            return self.settings.incomplete_grace_s - quiet + 0.05
        return None

    def _plan_unloads(self, entry: ModelEntry, aspired: set[int],
                      present: dict[int, VersionFolder]) -> None:
        current = {v: present[v].fingerprint for v in aspired}
        # An aspired version is "settled" when its current files are AVAILABLE.
        settled = {h.version for h in entry.harnesses
                   if h.state is S.AVAILABLE and current.get(h.version) == h.folder.fingerprint}
        newest_gen = {}
        for h in entry.harnesses:
            if h.state is S.AVAILABLE:
                newest_gen[h.version] = max(newest_gen.get(h.version, 0), h.generation)
        for h in list(entry.harnesses):
            if h.state is S.LOADING or h.state is S.START:
                if h.version not in aspired or current.get(h.version) != h.folder.fingerprint:
                    h.cancelled = True
                continue
            if h.state is S.FAILED:
                if current.get(h.version) != h.folder.fingerprint:
                    entry.harnesses.remove(h)  # folder changed or gone: forget the failure
                    entry.ended.pop(h.version, None)
                continue
            if h.state is not S.AVAILABLE:
                continue
            if h.version in aspired:
                stale = current[h.version] != h.folder.fingerprint or h.generation < newest_gen[h.version]
                if stale and h.version in settled:
                    self._spawn(self._unload(entry, h, "replaced by new files"))
            elif not aspired or settled:
                self._spawn(self._unload(entry, h, "no longer aspired"))

    # ---- load / unload -------------------------------------------------------------
    def _load_and_warm(self, h: Harness) -> LoadedModel:
        lm = load_version(h.folder.path, h.folder.format or "model.pt2", h.spec)
        if h.spec.warmup:
            warmup(lm, h.folder.path)
        h.batch_calibration = calibrate_loaded(lm, h.spec)  # before AVAILABLE, not after
        return lm

    async def _load(self, entry: ModelEntry, h: Harness) -> None:
        async with self._load_sem:
            if h.cancelled or self._closing:
                entry.harnesses.remove(h)
                self._notify(entry)
                return
            h._set(S.LOADING)
            self._notify(entry)
            t0 = time.perf_counter()
            if h.folder.format is None:
                return self._fail(entry, h, h.folder.incomplete or "no model file")
            fut = _in_thread(self._load_and_warm, h)
            try:
                lm = await asyncio.wait_for(asyncio.shield(fut), timeout=h.spec.load_timeout_s)
            except TimeoutError:
                fut.cancel()  # the thread releases the model if it ever finishes
                return self._fail(entry, h, f"load did not finish within load_timeout_s="
                                            f"{h.spec.load_timeout_s:g}s")
            except LoadError as e:
                reason = str(e)
                if h.folder.incomplete and h.folder.incomplete not in reason:
                    reason = f"{reason} (folder incomplete: {h.folder.incomplete})"
                return self._fail(entry, h, reason)
            except Exception as e:  # noqa: BLE001
                return self._fail(entry, h, f"{type(e).__name__}: {e}")
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
        # One forward thread per version with its own intra-op thread count: by default all
        # cores but one, which stays with the event loop (torch's setting is per thread).
        threads = self.settings.intra_op_threads or max(1, (os.cpu_count() or 2) - 1)
        h.executor = ThreadPoolExecutor(1, thread_name_prefix=f"fwd-{h.sid}",
                                        initializer=torch.set_num_threads, initargs=(threads,))
        if self.make_batcher is not None:
            h.batcher = self.make_batcher(h)
        if (h.batcher is None and lm.device.type == "cpu" and lm.forward_s is not None
                and lm.forward_s * 1e6 <= self.settings.inline_forward_us):
            h.inline_numel = 4 * lm.sample_numel
        h._set(S.AVAILABLE)
        log.info("event=loaded servable=%s format=%s device=%s load_ms=%.1f warmup_ms=%.1f "
                 "total_ms=%.1f memory_bytes=%d", h.sid, lm.format, lm.device, lm.load_s * 1e3,
                 lm.warmup_s * 1e3, (time.perf_counter() - t0) * 1e3, lm.memory_bytes)
        self.on_event("loaded", h)
        entry.ended.pop(h.version, None)
        entry.dirty = True
        self._kick(entry)  # re-plan: what this version replaces can now unload
        self._notify(entry)

    def _fail(self, entry: ModelEntry, h: Harness, reason: str) -> None:
        h._set(S.FAILED, reason)
        log.error("event=load_failed servable=%s reason=%r", h.sid, reason)
        self.on_event("failed", h)
        self._notify(entry)
        if h.cancelled:
            self.request_reconcile(entry.name)

    async def _unload(self, entry: ModelEntry, h: Harness, why: str) -> None:
        if h.state is not S.AVAILABLE:
            return
        h._set(S.UNLOADING)
        self._notify(entry)  # out of the routing table: no new requests reach it
        t0 = time.perf_counter()
        try:
            await asyncio.wait_for(h.idle.wait(), timeout=self.settings.unload_drain_timeout_s)
        except TimeoutError:
            log.warning("event=drain_timeout servable=%s inflight=%d", h.sid, h.inflight)
        if h.batcher is not None:
            h.batcher.close()  # stragglers that raced the table swap get UNAVAILABLE
            await h.batcher.drain()  # queued requests finish; the scheduler task ends
        lm, h.loaded = h.loaded, None
        if lm is not None:
            # On the version's own executor: after every forward pass that was queued there.
            await asyncio.get_running_loop().run_in_executor(h.executor, lm.release)
        h.executor.shutdown(wait=False)
        h._set(S.END)
        entry.harnesses.remove(h)
        if not any(x.version == h.version for x in entry.harnesses):
            entry.ended[h.version] = VersionStatus(h.version, S.END, None, h.state_since)
        log.info("event=unloaded servable=%s reason=%r drain_unload_ms=%.1f", h.sid, why,
                 (time.perf_counter() - t0) * 1e3)
        self.on_event("unloaded", h)
        self._notify(entry)
        if not entry.harnesses and not entry.path.is_dir():
            self.models.pop(entry.name, None)
        elif not self._closing:
            self.request_reconcile(entry.name)  # the folder may have come back meanwhile

    # ---- the data path -------------------------------------------------------------
    def acquire(self, model: str, version: int) -> Harness:
        """Pin an AVAILABLE version for one request (loop only; pair with release_handle)."""
        entry = self.models.get(model)
        if entry is None or (entry.spec is None and not entry.harnesses):
            raise errors.not_found(f"unknown model '{model}'")
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
        h.inflight += 1
        h.idle.clear()
        return h

    # ---- queries and control -------------------------------------------------------
    def entry(self, model: str) -> ModelEntry:
        e = self.models.get(model)
        if e is None or e.spec is None and not e.harnesses and not e.disabled:
            raise errors.not_found(f"unknown model '{model}'")
        return e

    def model_names(self) -> list[str]:
        return sorted(n for n, e in self.models.items() if e.spec is not None or e.harnesses)

    def present_versions(self, model: str) -> set[int]:
        e = self.models.get(model)
        return set(e.folder.versions) if e and e.folder else set()

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
        e = self.models.get(model)
        if e is None:
            return None
        for st in e.statuses():
            if st.version == version:
                return st.state
        return None

    async def settle(self, model: str, timeout: float) -> bool:
        """Wait until nothing of `model` is loading or unloading and no rescan is due."""
        def quiet():
            e = self.models.get(model)
            return e is None or (e.timer is None and (e.task is None or e.task.done()) and
                                 all(h.state in (S.AVAILABLE, S.FAILED) for h in e.harnesses)
                                 and not e.dirty)
        return await self.wait_until(quiet, timeout)

    async def load_model(self, model: str, timeout: float = 120.0) -> ModelEntry:
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
        return entry

    async def unload_model(self, model: str, timeout: float = 120.0) -> None:
        entry = self.entry(model)
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
