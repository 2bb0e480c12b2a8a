"""Where the routing document lives: the one interface every source keeps, and the
choice of source from the settings.

A source reads the document's text, watches it (calling `on_change` on the event loop
with the new text, or None when it became unreadable), and writes one model's routes
atomically. Our own write is not news (runtime/routing/document.py: `own_write`).
Sources: `FileSource` (a watched file, runtime/routing/file_source.py) and
`KubernetesSource` (a ConfigMap through the API server, runtime/routing/k8s_source.py:
N replicas share one routing truth).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from router import RouteConfig
from runtime.routing.document import OnChange


class ConfigSource(Protocol):
    kind: str  # "file" | "configmap"

    @property
    def name(self) -> str:
        """What holds the document, in words ("the file ...", "the ConfigMap ...")."""

    def read(self) -> str | None:
        """The document's text now (None when absent); remembers its hash."""

    def managed_by(self) -> str | None:
        """Why the document cannot be written here (answered with CONFLICT), or None."""

    @property
    def writable(self) -> bool:
        """Whether `write` may succeed here; Control refuses a change before it when not."""

    def start(self, loop: asyncio.AbstractEventLoop, on_change: OnChange) -> None:
        """Watch: `on_change` runs on `loop` when the content hash changes."""

    def stop(self) -> None: ...

    async def write(self, model: str, config: RouteConfig) -> None:
        """Persist one model's routes atomically; a ServingError when it cannot."""


def make_source(settings) -> ConfigSource | None:
    """The config source the settings name: a ConfigMap URL, a file, or none."""
    from runtime.routing.file_source import POLL_S, FileSource
    from runtime.routing.k8s_source import KubernetesSource

    url = getattr(settings, "config_source", None)
    if url:
        return KubernetesSource.from_url(url)
    if settings.config_path is None:
        return None
    rs = settings.repository
    return FileSource(settings.config_path, poll_s=POLL_S, quiet_s=rs.quiet_s / 2 + 0.05,
                      polling=rs.polling)
