"""The demo shop: click a button, watch one merged event leave for TikTok.

Served in sandbox mode (or with `GATEWAY_DEMO=1`, which outside sandbox mode
needs `GATEWAY_TEST_EVENT_CODE`); nothing here is on the path of real traffic.

    GET  /demo/                           the shop: TikTok's base code, loading a stand-in
                                          for its pixel, and the gateway's pixel.js
    GET  /demo/tiktok-pixel-standin.js    the stand-in (the real events.js cannot be fetched)
    POST /demo/order                      plays the shop's server: posts the server copy,
                                          with the event_id pixel.js exposed, to this
                                          gateway's /open_api/v1.3/event/track/ over HTTP,
                                          exactly as an advertiser's server would
    GET  /demo/status                     a key's state, its line in the sandbox log, counters
"""

from __future__ import annotations

import asyncio
import importlib.resources
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry

from .appkeys import METRICS, SETTINGS, STORE
from .errors import InvalidRequest
from .ingest import read_body
from .normalise import validate_event_id
from .settings import Settings

DEMO_PIXEL_CODE = "CDEMOPIXEL"  # the demo's pixel in sandbox mode, where none is configured
DEMO_EMAIL = "jane.doe@example.com"  # what only the shop's server knows
DEMO_EVENTS = ("AddToCart", "CompletePayment")
TRACK_PATH = "/open_api/v1.3/event/track/"
LOG_TAIL_BYTES = 256 * 1024  # how much of the sandbox log /demo/status reads back
COUNTERS = (
    "gateway_events_received_total",
    "gateway_events_merged_total",
    "gateway_events_duplicates_dropped_total",
    "gateway_events_forwarded_total",
)


@dataclass(slots=True)
class Demo:
    """The demo's pixel and token, its pages, and (once started) its HTTP client."""

    pixel: str
    token: str
    sandbox_log: Path | None
    page: bytes
    standin: bytes
    session: aiohttp.ClientSession | None = field(default=None)


DEMO: web.AppKey[Demo] = web.AppKey("demo", Demo)


def add_routes(app: web.Application, settings: Settings, sandbox_log: Path | None) -> None:
    """Serve the demo on `app`; the caller decides whether it should (settings.demo_enabled)."""
    if settings.sandbox:
        pixel, token = DEMO_PIXEL_CODE, "sandbox"
    else:
        pixel, token = next(iter(settings.pixels.items()))
    static = importlib.resources.files("gateway") / "static"
    mode = "sandbox" if settings.sandbox else f"test events ({settings.test_event_code})"
    page = (
        (static / "demo.html")
        .read_text("utf-8")
        .replace("%PIXEL%", pixel)
        .replace("%EMAIL%", DEMO_EMAIL)
        .replace("%MODE%", mode)
    )
    app[DEMO] = Demo(
        pixel, token, sandbox_log, page.encode(), (static / "tiktok-pixel-standin.js").read_bytes()
    )
    app.cleanup_ctx.append(_session_ctx)
    r = app.router
    r.add_get("/demo", to_shop)
    r.add_get("/demo/", shop)
    r.add_get("/demo/tiktok-pixel-standin.js", standin)
    r.add_post("/demo/order", order)
    r.add_get("/demo/status", status)


async def _session_ctx(app: web.Application) -> AsyncIterator[None]:
    demo = app[DEMO]
    demo.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
    try:
        yield
    finally:
        await demo.session.close()


NO_STORE = {"Cache-Control": "no-store"}


async def to_shop(request: web.Request) -> web.Response:
    raise web.HTTPFound(request.rel_url.with_path("/demo/"))


async def shop(request: web.Request) -> web.Response:
    """GET /demo/ — the shop page."""
    return web.Response(
        body=request.app[DEMO].page, content_type="text/html", charset="utf-8", headers=NO_STORE
    )


async def standin(request: web.Request) -> web.Response:
    """GET /demo/tiktok-pixel-standin.js — stands in for TikTok's events.js."""
    return web.Response(
        body=request.app[DEMO].standin,
        content_type="application/javascript",
        charset="utf-8",
        headers=NO_STORE,
    )


async def order(request: web.Request) -> web.Response:
    """POST /demo/order — the shop's server: the order, with the event_id from pixel.js."""
    demo = request.app[DEMO]
    try:
        # Within the body deadline, like every other body: no slow-loris door on a demo.
        body = orjson.loads(await read_body(request, request.app[SETTINGS]))
    except orjson.JSONDecodeError:
        raise InvalidRequest("", "body must be JSON") from None
    if not isinstance(body, dict):
        raise InvalidRequest("", "body must be an object")
    event = body.get("event")
    if event not in DEMO_EVENTS:
        raise InvalidRequest("event", f"must be one of {', '.join(DEMO_EVENTS)}")
    event_id = validate_event_id(body.get("event_id"))
    if event_id is None:
        raise InvalidRequest("event_id", "required: the page sends tkgw.lastEventId")
    value = body.get("value", 29.99)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest("value", "must be a number")
    track = server_copy(demo.pixel, event, event_id, value, request.headers.get("Referer"))
    assert demo.session is not None
    async with demo.session.post(
        own_url(request) + TRACK_PATH,
        data=orjson.dumps(track),
        headers={"Access-Token": demo.token, "Content-Type": "application/json"},
    ) as resp:
        answer = orjson.loads(await resp.read())
    return web.json_response(
        {"sent": track, "answer": answer}, dumps=lambda o: orjson.dumps(o).decode()
    )


def server_copy(
    pixel: str, event: str, event_id: str, value: float, page_url: str | None
) -> dict[str, Any]:
    """The Events API body the shop's server sends: what only it knows (email, order)."""
    item: dict[str, Any] = {
        "event": event,
        "event_id": event_id,
        "event_time": int(time.time()),
        "user": {"email": DEMO_EMAIL, "external_id": "demo-customer-0001"},
        "properties": {
            "currency": "USD",
            "value": value,
            "contents": [
                {"content_id": "tote-001", "content_type": "product", "quantity": 1,
                 "price": value}
            ],
        },
    }
    if page_url:
        item["page"] = {"url": page_url}
    return {"event_source": "web", "event_source_id": pixel, "data": [item]}


def own_url(request: web.Request) -> str:
    """This gateway, as reachable from itself: the address the request arrived on."""
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sockname, tuple) or len(sockname) < 2:
        return f"{request.scheme}://{request.host}"
    host, port = sockname[0], sockname[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def status(request: web.Request) -> web.Response:
    """GET /demo/status?pixel=&event=&event_id= — what became of one event, and counters."""
    demo = request.app[DEMO]
    q = request.query
    key = forwarded = None
    if q.get("pixel") and q.get("event") and q.get("event_id"):
        key = await request.app[STORE].inspect(q["pixel"], q["event_id"], q["event"])
        if key is not None and key.get("state") == "sent" and demo.sandbox_log is not None:
            forwarded = await asyncio.to_thread(_forwarded, demo.sandbox_log, q["event_id"])
    body = {"key": key, "forwarded": forwarded, "metrics": counters(request.app[METRICS].registry)}
    return web.json_response(body, dumps=lambda o: orjson.dumps(o).decode(), headers=NO_STORE)


def counters(registry: CollectorRegistry) -> dict[str, float]:
    """The event counters summed over pixels (received also by source), for the page."""
    out: dict[str, float] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name not in COUNTERS:
                continue
            name = sample.name
            if "source" in sample.labels:
                name = f"{name}{{source={sample.labels['source']}}}"
            out[name] = out.get(name, 0.0) + sample.value
    return out


def _forwarded(path: Path, event_id: str) -> dict[str, Any] | None:
    """The last event with `event_id` in the sandbox log's tail, as TikTok would get it."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - LOG_TAIL_BYTES))
            lines = fh.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue  # the first line of the tail may be cut
        for event in record.get("data", []):
            if event.get("event_id") == event_id:
                return {"event_source_id": record.get("event_source_id"), **event}
    return None
