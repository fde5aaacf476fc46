"""The operational endpoints: health, readiness, metrics, the OpenAPI document, /debug.

None of them takes events. /healthz says the process answers; /readyz that
Redis answers with our scripts and layout; /debug needs GATEWAY_ADMIN_TOKEN.
"""

from __future__ import annotations

import functools
import hmac
import importlib.resources
import logging

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from .answers import envelope
from .appkeys import SCRAPE, SETTINGS, STORE
from .errors import AuthError, LayoutMismatch, NotFound, StoreUnavailable

# Named as before the handlers left app.py: log filters select these lines by it.
log = logging.getLogger("gateway.app")


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[SCRAPE]()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@functools.cache
def openapi_document() -> bytes:
    """The OpenAPI document shipped with the package (gateway/static/openapi.json)."""
    return (importlib.resources.files("gateway") / "static" / "openapi.json").read_bytes()


async def openapi_handler(request: web.Request) -> web.Response:
    """GET /openapi.json — the API contract: every path, its bodies, answers and errors."""
    return web.Response(body=openapi_document(), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=lambda o: orjson.dumps(o).decode())


async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis answers and our scripts are loaded (reloading them if flushed)."""
    store = request.app[STORE]
    try:
        await store.load_scripts()
        await store.check_layout()  # once; Redis may have been away at start-up
    except StoreUnavailable as exc:
        return web.json_response(
            {"status": "unavailable", "redis": str(exc)}, status=503,
            dumps=lambda o: orjson.dumps(o).decode(),
        )
    except LayoutMismatch as exc:
        log.error("not ready: %s", exc)
        return web.json_response(
            {"status": "misconfigured", "redis": str(exc)}, status=503,
            dumps=lambda o: orjson.dumps(o).decode(),
        )
    return web.json_response({"status": "ready"}, dumps=lambda o: orjson.dumps(o).decode())


async def debug_event(request: web.Request) -> web.Response:
    """GET /debug/events/{pixel}/{event_id}/{event} — a key's state and timeline."""
    admin = request.app[SETTINGS].admin_token
    if admin is None:
        raise NotFound("debug endpoints are off: set GATEWAY_ADMIN_TOKEN")
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    if not hmac.compare_digest(given.strip().encode(), admin.encode()):
        raise AuthError(40105, "admin token missing or wrong (Authorization: Bearer ...)")
    info = request.match_info
    state = await request.app[STORE].inspect(info["pixel"], info["event_id"], info["event"])
    if state is None:
        raise NotFound("no such key: never seen, or forgotten after the dedup window")
    return envelope(request, data=state)
