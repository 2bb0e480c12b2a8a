"""Filesystem events -> the event loop.

A watchdog observer (inotify where available; a polling observer on request, for
network file systems) runs on its own thread and hands each changed path to a
callback on the loop. Debouncing is the receiver's job (the manager's quiet timer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

log = logging.getLogger("splitserve.watch")


class _Forward(FileSystemEventHandler):
    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[Path], None]):
        self._loop, self._callback = loop, callback

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads change nothing
        paths = [event.src_path] + ([event.dest_path] if getattr(event, "dest_path", "") else [])
        for p in paths:
            p = p.decode() if isinstance(p, bytes) else p
            try:
                self._loop.call_soon_threadsafe(self._callback, Path(p))
            except RuntimeError:
                return  # loop closed during shutdown


class Watcher:
    """Watches directories recursively; each change calls `callback(path)` on the loop."""

    def __init__(self, polling: bool = False, poll_interval_s: float = 1.0) -> None:
        self._observer = PollingObserver(timeout=poll_interval_s) if polling else Observer()
        self._observer.daemon = True

    def watch(self, loop: asyncio.AbstractEventLoop, directory: Path,
              callback: Callable[[Path], None], recursive: bool = True) -> None:
        self._observer.schedule(_Forward(loop, callback), str(directory), recursive=recursive)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)
