"""GET /pixel.js: the script pages include after TikTok's pixel (gateway/static/pixel.js).

It mirrors the page's `ttq.track(...)` and `ttq.page()` calls to `/pixel/events`
with the event_id the pixel got. Versioned by a hash of its content, written
into the script: `/pixel.js?v=<hash>` is cached for a year (immutable), plain
`/pixel.js` for five minutes and then revalidated by ETag, so an upgraded
gateway reaches every page within minutes and costs a 304 otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from dataclasses import dataclass

from aiohttp import web

from . import __version__

SHORT_MAX_AGE = 300  # plain /pixel.js: how stale a page's copy may be after an upgrade
LONG_MAX_AGE = 365 * 24 * 3600  # /pixel.js?v=<hash>: that URL's content never changes


@dataclass(frozen=True, slots=True)
class PixelScript:
    body: bytes
    digest: str  # the first 16 hex digits of the script's SHA-256

    @property
    def etag(self) -> str:
        return f'"{self.digest}"'


def load_script() -> PixelScript:
    """pixel.js as served: its version (the gateway's, plus the content hash) written in."""
    template = (importlib.resources.files("gateway") / "static" / "pixel.js").read_bytes()
    digest = hashlib.sha256(template).hexdigest()[:16]
    body = template.replace(b"%VERSION%", f"{__version__}+{digest}".encode())
    return PixelScript(body, digest)


PIXEL_SCRIPT: web.AppKey[PixelScript] = web.AppKey("pixel_script", PixelScript)


def add_routes(app: web.Application) -> None:
    app[PIXEL_SCRIPT] = load_script()
    app.router.add_get("/pixel.js", pixel_js)


async def pixel_js(request: web.Request) -> web.Response:
    """GET /pixel.js — cacheable; `?v=` naming the current hash makes it immutable."""
    script = request.app[PIXEL_SCRIPT]
    versioned = request.query.get("v") == script.digest
    headers = {
        "Cache-Control": (
            f"public, max-age={LONG_MAX_AGE}, immutable"
            if versioned
            else f"public, max-age={SHORT_MAX_AGE}"
        ),
        "ETag": script.etag,
        "X-Content-Type-Options": "nosniff",
        # Any site may load it, also with integrity= and crossorigin= (or under COEP).
        "Access-Control-Allow-Origin": "*",
        "Cross-Origin-Resource-Policy": "cross-origin",
    }
    if any(tag.value in (script.digest, "*") for tag in request.if_none_match or ()):
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=script.body,
        content_type="application/javascript",
        charset="utf-8",
        headers=headers,
    )
