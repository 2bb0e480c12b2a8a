"""The `event=serving` line: where it listens, what it serves, and what to try next.

Kept in the `event=serving http=HOST:PORT ...` shape that scripts (and tests) read.
"""

from __future__ import annotations

from runtime.service.core import Core
from runtime.logs import value


def served_models(core: Core) -> str:
    """`mlp:1,2 other:none`: each model and its AVAILABLE versions."""
    parts = []
    snap = core.manager.view()
    for name in snap.names():
        versions = snap.model(name).available
        parts.append(f"{name}:{','.join(map(str, versions)) or 'none'}")
    return " ".join(parts) or "none"


def serving_line(core: Core, host: str, http_port: int, grpc_port: int | None) -> str:
    local = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    url_host = f"[{local}]" if ":" in local else local
    models = served_models(core)
    if models == "none":
        nxt = f"add a version folder: {core.root}/<model>/1/model.pt2"
    else:
        nxt = f"curl -s http://{url_host}:{http_port}/v2/health/ready"
    return (f"event=serving http={host}:{http_port} grpc={host}:{grpc_port} "
            f"repository={value(str(core.root))} models={value(models)} next={value(nxt)}")
