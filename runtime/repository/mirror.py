"""The local mirror of an object-storage repository (`repository.url`).

Owns a cache folder that holds, as plain `<model>/<version>/` folders, the store's
versions that are quiet and complete; the unchanged local lifecycle (watcher, scan,
manager) serves that folder, so nothing downstream knows about object storage.

One pass, on the mirror's own thread: list the prefix (rate-limited) -> group the
objects into units (a model's own files, and each version) -> a unit whose listing
differs from what is mirrored waits until the same listing has been seen in two
listings at least `quiet_s` apart, and (for a version) names a complete model -> its
changed objects are fetched under `.mirror-tmp/` (unchanged files are hard-linked from
the mirrored copy), checked like a local folder (safetensors header, zip directory) and
the folder is renamed into place. A unit gone from the store is removed, after the
same quiet rule; the manager then drains and unloads it. A failed listing changes
nothing that is serving. The cache folder belongs to the mirror (`.mirror.json` records
for which URL); the mirror refuses a non-empty folder it did not create.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from runtime.repository.objectstore import ObjectInfo, RateLimit, Store, StoreError, check_url
from runtime.repository.scan import (FORMATS, is_model_name, is_version_name, safetensors_problem,
                                zip_problem)
from runtime.config.settings import StoreSettings

log = logging.getLogger("splitserve.mirror")

MANIFEST = ".mirror.json"
TMP = ".mirror-tmp"
Sig = tuple  # sorted ((relative path, size, etag), ...): what a unit's listing says


def default_cache_dir(url: str) -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in url.split("://", 1)[1])[:60]
    digest = hashlib.blake2b(url.encode(), digest_size=6).hexdigest()
    return base / "splitserve" / "mirror" / f"{slug.strip('-')}-{digest}"


def group(objects: list[ObjectInfo]) -> tuple[dict[str, dict[str, ObjectInfo]], list[str]]:
    """Objects -> units: "m" (the model's own files: model.yaml, model.py) and "m/1" (a
    version's files, by path inside the version). Returns (units, skipped keys): hidden
    parts, `..`, names the local repository would ignore, and nesting under model files."""
    units: dict[str, dict[str, ObjectInfo]] = {}
    skipped = []
    for o in objects:
        parts = o.key.split("/")
        if (len(parts) < 2 or not is_model_name(parts[0])
                or any(p in ("", ".", "..") or p.startswith(".") or p == "__pycache__"
                       or "\x00" in p or "\\" in p for p in parts)):
            skipped.append(o.key)
        elif len(parts) == 2:
            units.setdefault(parts[0], {})[parts[1]] = o
        elif is_version_name(parts[1]):
            units.setdefault(f"{parts[0]}/{parts[1]}", {})["/".join(parts[2:])] = o
        else:
            skipped.append(o.key)
    return units, skipped


def signature(files: dict[str, ObjectInfo]) -> Sig:
    return tuple(sorted((rel, o.size, o.etag or repr(o.mtime)) for rel, o in files.items()))


def listed_problem(files: dict[str, ObjectInfo], model_files: dict[str, ObjectInfo]) -> str | None:
    """Why a version's listing cannot be a complete model yet (None when it can)."""
    fmt = next((f for f in FORMATS if f in files), None)
    if fmt is None:
        return f"no model file yet (expected one of {', '.join(FORMATS)})"
    if fmt == "model.safetensors" and "model.py" not in files and "model.py" not in model_files:
        return "model.safetensors needs a model.py in the version or model folder"
    return None


def staged_problem(folder: Path) -> str | None:
    """The local repository's completeness checks, on a fetched version folder."""
    for fmt in FORMATS:
        if (folder / fmt).is_file():
            return safetensors_problem(folder / fmt) if fmt == "model.safetensors" else zip_problem(folder / fmt)
    return "no model file"


@dataclass
class _Seen:
    sig: Sig
    since: float  # monotonic time the listing first showed this signature
    listings: int = 1


@dataclass
class Figures:
    """Counters the collector exports; written by the mirror thread, read at scrape."""
    syncs_ok: int = 0
    syncs_failed: int = 0
    list_requests: int = 0
    objects_fetched: int = 0
    bytes_fetched: int = 0
    errors: dict[str, int] = field(default_factory=lambda: {"list": 0, "fetch": 0, "verify": 0, "local": 0})
    last_duration_s: float = 0.0
    last_success: float = 0.0  # epoch seconds
    up: int = 0
    versions: dict[str, int] = field(default_factory=lambda: {"mirrored": 0, "pending": 0, "incomplete": 0})


class Mirror:
    """Mirrors one store URL into one cache folder. `start()` (on the loop) does the first
    sync, raising StoreError with one line when the store cannot be listed, then polls
    on a daemon thread until `stop()`."""

    def __init__(self, url: str, settings: StoreSettings, store: Store | None = None):
        self.url = check_url(url)
        self.settings = settings
        self.cache_dir = Path(settings.cache_dir or default_cache_dir(url)).expanduser().resolve()
        self.tmp = self.cache_dir / TMP
        self._store = store
        self.limit = RateLimit(settings.max_lists_per_minute)
        self.figures = Figures()
        self._manifest: dict[str, dict[str, list]] = {}  # unit -> {rel: [size, etag-or-mtime]}
        self._seen: dict[str, _Seen] = {}
        self._noted: dict[str, Sig] = {}  # units whose skip reason was logged for this signature
        self._bad: dict[str, Sig] = {}  # units whose fetched files failed the checks
        self._pages = 1
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.first_sync)
        self._thread = threading.Thread(target=self._run, name="mirror", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)

    def first_sync(self) -> None:
        """Open the cache and the store, then list until what is quiet is mirrored: two
        listings `quiet_s` apart (a version still changing is left to the poller)."""
        self._open_cache()
        if self._store is None:
            self._store = Store(self.url, self.settings.list_timeout_s, self.settings.fetch_timeout_s)
        for i in range(2):
            pending = self.sync_once(raise_errors=True)
            if not pending:
                break
            if i == 0 and self._stop.wait(self.settings.quiet_s):
                return
            if self.limit.wait_s(self._pages) > 0:
                break  # the rate limit comes first; the poller picks it up
        log.info("event=store_mirrored url=%s cache=%s versions=%d pending=%d", self.url,
                 self.cache_dir, self.figures.versions["mirrored"], self.figures.versions["pending"])

    def _run(self) -> None:
        delay = self.settings.poll_interval_s
        while not self._stop.wait(delay):
            wait = self.limit.wait_s(self._pages)
            if wait > 0:
                delay = wait + 0.01
                continue
            try:
                pending = self.sync_once()
            except Exception:  # noqa: BLE001 - the poller must outlive any one pass
                log.warning("event=store_sync_crashed url=%s", self.url)
                log.debug("store sync traceback", exc_info=True)
                pending = False
            delay = min(self.settings.poll_interval_s, max(self.settings.quiet_s, 0.05)) \
                if pending else self.settings.poll_interval_s

    # ---- the cache folder --------------------------------------------------------
    def _open_cache(self) -> None:
        c = self.cache_dir
        c.mkdir(parents=True, exist_ok=True, mode=0o700)
        mpath = c / MANIFEST
        if mpath.exists():
            try:
                doc = json.loads(mpath.read_text())
            except (OSError, ValueError) as e:
                raise StoreError(f"cache {c}: unreadable {MANIFEST} ({e})") from None
            if doc.get("url") != self.url:
                raise StoreError(f"cache {c} mirrors {doc.get('url')!r}, not {self.url!r}: "
                                 "set repository.store.cache_dir to another folder")
            self._manifest = {k: v for k, v in doc.get("units", {}).items() if isinstance(v, dict)}
        elif any(p.name != TMP for p in c.iterdir()):
            raise StoreError(f"cache {c} is not empty and was not made by the mirror: refusing to "
                             "mirror into it (set repository.store.cache_dir to an empty folder)")
        shutil.rmtree(self.tmp, ignore_errors=True)  # leftovers of an interrupted fetch
        self.tmp.mkdir(mode=0o700)
        # The folder is the mirror's: a unit whose local copy is gone is fetched again,
        # and a folder the manifest does not know is removed.
        for unit, files in list(self._manifest.items()):
            if not all((c / unit / rel).is_file() for rel in files):
                del self._manifest[unit]
        for model in [p for p in c.iterdir() if p.name not in (MANIFEST, TMP)]:
            if model.name not in self._manifest and not any(u.startswith(model.name + "/") for u in self._manifest):
                self._discard(model)
                continue
            for v in model.iterdir():
                if v.is_dir() and f"{model.name}/{v.name}" not in self._manifest:
                    self._discard(v)
        self._save()

    def _save(self) -> None:
        tmp = self.tmp / MANIFEST
        tmp.write_text(json.dumps({"url": self.url, "units": self._manifest}, indent=1, sort_keys=True))
        os.replace(tmp, self.cache_dir / MANIFEST)

    def _discard(self, path: Path) -> None:
        """Remove a local folder or file in one rename (one event for the watcher)."""
        if path.is_dir() and not path.is_symlink():
            gone = self.tmp / f"gone.{path.name}.{os.urandom(4).hex()}"
            os.rename(path, gone)
            shutil.rmtree(gone, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)

    # ---- one pass ----------------------------------------------------------------
    def sync_once(self, raise_errors: bool = False) -> bool:
        """List and apply what is ready. Returns True when some unit is waiting for its
        listing to be quiet (the poller then lists again sooner)."""
        t0 = time.monotonic()
        f = self.figures
        try:
            objects, pages = self._store.list(self.limit, self.settings.max_objects)
        except StoreError as e:
            f.errors["list"] += 1
            f.syncs_failed += 1
            f.up = 0
            f.list_requests += 1
            f.last_duration_s = time.monotonic() - t0
            log.warning("event=store_list_failed url=%s reason=%r", self.url, str(e))
            if raise_errors:
                raise
            return False
        f.list_requests += pages
        self._pages = pages
        if f.up == 0 and f.syncs_failed:
            log.info("event=store_list_recovered url=%s objects=%d", self.url, len(objects))
        units, skipped = group(objects)
        if skipped and self._noted.get("") != tuple(skipped[:20]):
            self._noted[""] = tuple(skipped[:20])
            log.info("event=store_objects_ignored count=%d first=%r", len(skipped), skipped[0])
        now = time.monotonic()
        keys = set(units) | set(self._manifest)
        for k in keys:
            sig = signature(units.get(k, {}))
            s = self._seen.get(k)
            if s is None or s.sig != sig:
                self._seen[k] = _Seen(sig, now)
            else:
                s.listings += 1
        for k in set(self._seen) - keys:
            del self._seen[k]
        # Model files before versions (a version may need the model's model.py); a model's
        # files are removed only after its versions.
        order = sorted(keys, key=lambda k: (1 if "/" in k else 0 if k in units else 2, k))
        waiting = pending = incomplete = 0  # units / versions waiting for a quiet listing
        for k in order:
            target = units.get(k, {})
            sig = self._seen[k].sig
            if sig == self._mirrored_sig(k):
                continue
            seen = self._seen[k]
            if seen.listings < 2 or now - seen.since < self.settings.quiet_s:
                waiting += 1
                pending += "/" in k
                continue
            if not target:
                self._remove(k)
                continue
            why = self._too_big(target)
            if "/" in k:
                why = listed_problem(target, units.get(k.split("/")[0], {})) or why
                if why is None and self._bad.get(k) == sig:
                    why = "its fetched files failed the completeness checks (waiting for a new upload)"
            if why is not None:
                incomplete += "/" in k
                self._note(k, sig, why)
                continue
            try:
                self._apply(k, target, sig)
            except StoreError as e:
                f.errors["fetch"] += 1
                log.warning("event=store_fetch_failed unit=%s reason=%r", k, str(e))
            except _Incomplete as e:
                f.errors["verify"] += 1
                incomplete += 1
                self._bad[k] = sig
                log.warning("event=store_version_incomplete unit=%s reason=%r", k, str(e))
            except OSError as e:
                f.errors["local"] += 1
                log.warning("event=store_apply_failed unit=%s reason=%r", k, f"{type(e).__name__}: {e}")
                log.debug("apply traceback", exc_info=True)
        f.versions = {"mirrored": sum("/" in k for k in self._manifest), "pending": pending,
                      "incomplete": incomplete}
        f.syncs_ok += 1
        f.up = 1
        f.last_success = time.time()
        f.last_duration_s = time.monotonic() - t0
        return waiting > 0

    def _mirrored_sig(self, unit: str) -> Sig:
        return tuple(sorted((rel, v[0], v[1]) for rel, v in self._manifest.get(unit, {}).items()))

    def _too_big(self, files: dict[str, ObjectInfo]) -> str | None:
        big = [rel for rel, o in files.items() if o.size > self.settings.max_object_bytes]
        if big:
            return f"{big[0]} is larger than repository.store.max_object_bytes"
        need = sum(o.size for o in files.values())
        if need > shutil.disk_usage(self.cache_dir).free:
            return f"needs {need} bytes, more than the cache folder has free"
        return None

    def _note(self, unit: str, sig: Sig, why: str) -> None:
        if self._noted.get(unit) != sig:
            self._noted[unit] = sig
            log.info("event=store_version_waiting unit=%s reason=%r", unit, why)

    def _fetch_into(self, unit: str, files: dict[str, ObjectInfo], stage: Path, local: Path) -> int:
        old = self._manifest.get(unit, {})
        fetched = 0
        for rel, o in sorted(files.items()):
            dest = stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            mine = local / rel
            if old.get(rel) == [o.size, o.etag or repr(o.mtime)] and mine.is_file() \
                    and mine.stat().st_size == o.size:
                try:
                    os.link(mine, dest)  # unchanged: never fetched twice
                except OSError:
                    shutil.copy2(mine, dest)
                continue
            part = dest.with_name(f".{dest.name}.part")
            n = self._store.fetch(o, part, self._stop)
            os.rename(part, dest)
            self.figures.objects_fetched += 1
            self.figures.bytes_fetched += n
            fetched += n
        return fetched

    def _apply(self, unit: str, files: dict[str, ObjectInfo], sig: Sig) -> None:
        t0 = time.monotonic()
        stage = self.tmp / f"{unit.replace('/', '.')}.{os.urandom(4).hex()}"
        local = self.cache_dir / unit
        stage.mkdir()
        try:
            n = self._fetch_into(unit, files, stage, local)
            if "/" in unit:
                problem = staged_problem(stage)
                if problem is not None:
                    raise _Incomplete(problem)
                local.parent.mkdir(exist_ok=True)
                if local.exists():
                    old = self.tmp / f"old.{unit.replace('/', '.')}.{os.urandom(4).hex()}"
                    os.rename(local, old)
                    os.rename(stage, local)  # microseconds apart: inside one quiet window
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(stage, local)
            else:
                local.mkdir(exist_ok=True)
                for rel in files:  # one file at a time, each replaced atomically
                    os.replace(stage / rel, local / rel)
                for rel in set(self._manifest.get(unit, {})) - set(files):
                    (local / rel).unlink(missing_ok=True)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        self._manifest[unit] = {rel: [o.size, o.etag or repr(o.mtime)] for rel, o in files.items()}
        self._save()
        self._bad.pop(unit, None)
        log.info("event=store_unit_mirrored unit=%s files=%d bytes_fetched=%d seconds=%.3f",
                 unit, len(files), n, time.monotonic() - t0)

    def _remove(self, unit: str) -> None:
        local = self.cache_dir / unit
        try:
            if "/" in unit:
                if local.exists():
                    self._discard(local)
            else:
                for rel in self._manifest.get(unit, {}):
                    (local / rel).unlink(missing_ok=True)
            model = self.cache_dir / unit.split("/")[0]
            if model.is_dir() and all(p.name == "__pycache__" for p in model.iterdir()):
                self._discard(model)  # nothing of the store's left (bytecode of model.py aside)
        except OSError as e:
            self.figures.errors["local"] += 1
            log.warning("event=store_apply_failed unit=%s reason=%r", unit, f"{type(e).__name__}: {e}")
            return
        self._manifest.pop(unit, None)
        self._save()
        log.info("event=store_unit_removed unit=%s", unit)

    # ---- metrics -----------------------------------------------------------------
    def collector(self) -> Collector:
        return _Collector(self)

    def families(self):
        f = self.figures
        c = CounterMetricFamily
        g = GaugeMetricFamily
        yield g("splitserve_store_up", "1 when the last listing of the store succeeded", value=f.up)
        syncs = c("splitserve_store_syncs", "Mirror passes (list + apply) by result", labels=["result"])
        syncs.add_metric(["ok"], f.syncs_ok)
        syncs.add_metric(["error"], f.syncs_failed)
        yield syncs
        yield g("splitserve_store_sync_duration_seconds", "Duration of the last mirror pass",
                value=f.last_duration_s)
        yield g("splitserve_store_last_success_timestamp_seconds",
                "Wall-clock time of the last successful listing (0: never)", value=f.last_success)
        yield c("splitserve_store_list_requests", "LIST requests sent to the store", value=f.list_requests)
        yield c("splitserve_store_objects_fetched", "Objects downloaded into the cache",
                value=f.objects_fetched)
        yield c("splitserve_store_bytes_fetched", "Bytes downloaded into the cache", value=f.bytes_fetched)
        errs = c("splitserve_store_errors", "Mirror errors by operation", labels=["op"])
        for op, n in f.errors.items():
            errs.add_metric([op], n)
        yield errs
        vs = g("splitserve_store_versions", "Store versions: mirrored, waiting to be quiet, or "
               "incomplete", labels=["state"])
        for st, n in f.versions.items():
            vs.add_metric([st], n)
        yield vs


class _Incomplete(Exception):
    """Fetched files that fail the local completeness checks."""


class _Collector(Collector):
    def __init__(self, mirror: Mirror):
        self.mirror = mirror

    def collect(self):
        return self.mirror.families()
