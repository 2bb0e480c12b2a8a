"""Which event loop and which HTTP parser a server process runs: `server.loop` and
`server.http` (flags `--loop`, `--http`). "auto" picks the fastest one installed:
uvloop and httptools (both in `uvicorn[standard]`, a dependency) when importable, else
asyncio and h11. Measured on the 2-core VM: bench/RESULTS_HOTPATH.md.

grpc.aio runs on whichever loop this gives (it polls through the running loop).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Callable, Coroutine
from typing import Any


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def loop_name(setting: str) -> str:
    if setting == "auto":
        return "uvloop" if _installed("uvloop") else "asyncio"
    return setting


def http_name(setting: str) -> str:
    if setting == "auto":
        return "httptools" if _installed("httptools") else "h11"
    return setting


class NotInstalled(Exception):
    """A loop or parser asked for by name is not importable."""


def check(loop: str, http: str) -> None:
    """A loop or parser asked for by name must be installed: say so at start, in one line."""
    for name, setting in (("uvloop", loop), ("httptools", http)):
        if setting == name and not _installed(name):
            raise NotInstalled(f"{name} is not installed (asked for by server settings); "
                               f"install uvicorn[standard] or use 'auto'")


def run(main: Coroutine[Any, Any, Any], loop: str) -> Any:
    """asyncio.run on the chosen loop."""
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if loop_name(loop) == "uvloop":
        import uvloop
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
