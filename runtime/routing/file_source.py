"""Where the routing document lives, and how changes to it reach the runtime.

`FileSource` watches the path the user gave (never the path it resolves to): a Kubernetes
ConfigMap volume swaps a `..data` symlink to a fresh timestamped folder and deletes the
old one, so a watch on the resolved folder goes deaf after the first update. Any event in
the user's folder, plus a hash poll every `poll_s` as a safety net, re-reads the file;
only a change of content hash calls `on_change(text)`. Events are debounced (`quiet_s`
after the last one), but never past MAX_QUIET_S after the first: a folder that is never
still (logs or lease files written beside the config) must not hold a change back.
A file on a read-only mount (or in a ConfigMap layout, where a write would be lost at
the next sync) is not writable: the routing API then refuses with CONFLICT and changes
nothing.

Runs on the event loop; only the watchdog thread (events) and `asyncio.to_thread`
(writes) leave it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from pathlib import Path

from router import RouteConfig, RoutingError, persist_config_file
from runtime import errors
from runtime.repository.watch import Watcher
from runtime.routing.document import OnChange, conflict, digest, own_write, read_limited

log = logging.getLogger("splitserve.config")

POLL_S = 2.0  # the hash poll: heals a missed event within a few seconds
MAX_QUIET_S = 0.75  # events that never stop (a log file beside the config) delay a re-read at most this long


class FileSource:
    """A routing config file; see the module docstring for what it guarantees."""

    kind = "file"

    def __init__(self, path: Path, poll_s: float = 2.0, quiet_s: float = 0.1,
                 polling: bool = False) -> None:
        self.path = Path(os.path.abspath(path))  # absolute, but NOT resolved: see above
        self.poll_s = poll_s
        self.quiet_s = quiet_s
        self._polling = polling
        self._hash: str | None = None
        self._on_change: OnChange | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: Watcher | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._first_event = 0.0  # loop time of the first event the pending re-read waits out
        self._poll: asyncio.TimerHandle | None = None
        self._unreadable = False

    @property
    def name(self) -> str:
        return f"the file {self.path}"

    # ---- reading ------------------------------------------------------------------
    def read(self) -> str | None:
        """The current text (None when the file does not exist); remembers its hash."""
        try:
            data = read_limited(self.path)
        except FileNotFoundError:
            return None
        self._hash = digest(data)
        return data.decode("utf-8")

    def managed_by(self) -> str | None:
        """Why this file cannot be written, or None when it can."""
        folder = self.path.parent
        if (folder / "..data").is_symlink():
            return f"a ConfigMap volume ({self.path})"
        real = os.path.realpath(self.path)
        target = real if os.path.exists(real) else os.path.dirname(real)
        # The atomic write needs a temp file beside the target, so the folder must be writable.
        if not (os.access(target, os.W_OK) and os.access(os.path.dirname(real), os.W_OK)):
            return f"the read-only file {self.path}"
        return None

    @property
    def writable(self) -> bool:
        return self.managed_by() is None

    # ---- watching -----------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop, on_change: OnChange) -> None:
        self._loop, self._on_change = loop, on_change
        if self._hash is None:
            self.read()
        self._watcher = Watcher(polling=self._polling, poll_interval_s=min(1.0, self.poll_s))
        # Every event in the folder counts (`..data` renames, atomic replaces, in-place
        # writes): the hash decides whether anything changed.
        self._watcher.watch(loop, self.path.parent, lambda p: self._touched(), recursive=False)
        self._watcher.start()
        self._poll = loop.call_later(self.poll_s, self._poll_tick)

    def _touched(self) -> None:
        if self._loop is None:
            return
        now = self._loop.time()
        if self._timer is None:
            self._first_event = now
        else:
            self._timer.cancel()
        at = min(now + self.quiet_s, self._first_event + max(self.quiet_s, MAX_QUIET_S))
        self._timer = self._loop.call_at(at, self._quiet)

    def _quiet(self) -> None:
        self._timer = None
        self.check()

    def _poll_tick(self) -> None:
        self.check(polled=True)
        if self._loop is not None:
            self._poll = self._loop.call_later(self.poll_s, self._poll_tick)

    def check(self, polled: bool = False) -> bool:
        """Re-read the file; call on_change when its content hash changed."""
        try:
            data = read_limited(self.path)
        except (OSError, RoutingError) as e:
            if not self._unreadable:  # say it once, not every poll
                log.debug("event=config_unreadable path=%s reason=%r", self.path, str(e))
                self._unreadable = True
                self._hash = None  # whatever comes back is news
                if self._on_change is not None:
                    self._on_change(None)  # the receiver reads it, fails, and says why
            return False
        self._unreadable = False
        h = digest(data)
        if h == self._hash:
            return False
        self._hash = h
        log.info("event=config_changed path=%s sha256=%s via=%s", self.path, h[:12],
                 "poll" if polled else "event")
        if self._on_change is not None:
            self._on_change(data.decode("utf-8", errors="replace"))
        return True

    def stop(self) -> None:
        for t in (self._timer, self._poll):
            if t is not None:
                t.cancel()
        self._loop = None
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    # ---- writing ------------------------------------------------------------------
    async def write(self, model: str, config: RouteConfig) -> None:
        """Persist one model's routes atomically; CONFLICT when the file is not ours to write."""
        why = self.managed_by()
        if why is not None:
            raise conflict(why)
        try:
            before, written = await asyncio.to_thread(persist_config_file, self.path, model, config)
        except OSError as e:
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise conflict(f"the read-only file {self.path}") from None
            raise errors.ServingError(errors.Code.INTERNAL, f"routing not changed: could not "
                                      f"persist {self.path}: {e}") from None
        except RoutingError as e:
            raise errors.ServingError(errors.Code.INTERNAL, f"routing not changed: could not "
                                      f"persist {self.path}: {e.message}") from None
        self._hash = own_write(self._hash, before, written)
