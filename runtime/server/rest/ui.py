"""The operator page at `/ui`: static files shipped inside the package (runtime/server/ui/),
read once at startup and served from memory.

Request paths are looked up in that fixed table, never joined into a file path, so nothing
outside the folder can be reached. The page is a client of the public JSON API only; the
Content-Security-Policy forbids any script, style or connection that is not this server's.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from runtime.service.core import Core
from runtime.server.http import json_response

TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".png": "image/png"}

HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


def load_assets() -> dict[str, tuple[bytes, str]]:
    """Every servable file under ui/, keyed by its path relative to that folder."""
    out: dict[str, tuple[bytes, str]] = {}
    stack = [("", resources.files("runtime.server").joinpath("ui"))]
    while stack:
        prefix, folder = stack.pop()
        for item in folder.iterdir():
            rel = prefix + item.name
            if item.is_dir():
                stack.append((rel + "/", item))
                continue
            suffix = item.name[item.name.rfind("."):] if "." in item.name else ""
            out[rel] = (item.read_bytes(), TYPES.get(suffix, "text/plain; charset=utf-8"))
    if "index.html" not in out:
        raise RuntimeError("runtime/server/ui/index.html is missing from the package")
    return out


def build(core: Core) -> APIRouter:
    r = APIRouter()
    assets = load_assets()

    @r.get("/ui", include_in_schema=False)
    async def ui_root():
        # The page's links are relative (so a path prefix in front of the server works):
        # they need the trailing slash.
        return RedirectResponse("ui/", status_code=307)

    @r.get("/ui/", include_in_schema=False)
    async def ui_index():
        body, media = assets["index.html"]
        return Response(body, media_type=media, headers=HEADERS)

    @r.get("/ui/server.json", include_in_schema=False)
    async def ui_server():
        # Whether writes need a token: a server without one asks for none (a 401 says as much).
        return json_response({"token_required": bool(core.settings.server.token)}, headers=HEADERS)

    @r.get("/ui/{path:path}", include_in_schema=False)
    async def ui_asset(path: str):
        found = assets.get(path)
        if found is None:
            return json_response({"error": f"no such file in the page's assets: {path!r}"}, 404)
        return Response(found[0], media_type=found[1], headers=HEADERS)

    return r
