"""B0: what a user would write instead of the gateway. Plain aiohttp, no Redis, no dedup.

It takes the same two endpoints, checks that the body is JSON with the fields
TikTok requires (and the access token), answers TikTok's envelope, and
forwards from memory: every 100 ms, or at once when 1,000 events wait, one
Events API 2.0 request to the upstream. It is not durable (a crash loses what
waits in memory) and forwards every copy, duplicates included.

    python -m bench.baseline --port 8091 --upstream http://127.0.0.1:8090
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from bench.common import BROWSER_PATH, PIXEL, TOKEN, TRACK_PATH
from gateway import formats
from gateway.errors import RequestError

FLUSH_SECONDS = 0.1
FLUSH_EVENTS = 1000


class Buffer:
    """Events waiting to leave, and the task that sends them."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream + TRACK_PATH
        self.events: list[dict[str, Any]] = []
        self.full = asyncio.Event()
        self.session: aiohttp.ClientSession | None = None
        self.sending: set[asyncio.Task[None]] = set()

    def add(self, events: list[dict[str, Any]]) -> None:
        self.events.extend(events)
        if len(self.events) >= FLUSH_EVENTS:
            self.full.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.full.wait(), FLUSH_SECONDS)
            self.full.clear()
            while self.events:
                batch, self.events = self.events[:FLUSH_EVENTS], self.events[FLUSH_EVENTS:]
                task = asyncio.create_task(self.send(batch))
                self.sending.add(task)
                task.add_done_callback(self.sending.discard)

    async def send(self, batch: list[dict[str, Any]]) -> None:
        assert self.session is not None
        body = {"event_source": "web", "event_source_id": PIXEL, "data": batch}
        try:
            async with self.session.post(
                self.upstream,
                data=orjson.dumps(body),
                headers={"Access-Token": TOKEN, "Content-Type": "application/json"},
            ) as response:
                await response.read()
        except (aiohttp.ClientError, OSError):
            pass  # not durable: what fails is lost, as in the code this stands for


BUFFER: web.AppKey[Buffer] = web.AppKey("buffer", Buffer)


def envelope(code: int = 0, message: str = "OK", status: int = 200) -> web.Response:
    body = {"code": code, "message": message, "request_id": uuid.uuid4().hex, "data": {}}
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _valid(item: Any) -> bool:
    return isinstance(item, dict) and isinstance(item.get("event"), str)


async def event_track(request: web.Request) -> web.Response:
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return envelope(40000, "invalid JSON", 400)
    if not isinstance(doc, dict) or doc.get("event_source_id") != PIXEL:
        return envelope(40001, "unknown event_source_id")
    if not hmac.compare_digest(request.headers.get("Access-Token", "").encode(), TOKEN.encode()):
        return envelope(40105, "Access token is incorrect")
    data = doc.get("data")
    if not isinstance(data, list) or not data or not all(_valid(e) for e in data):
        return envelope(40002, "data: invalid")
    request.app[BUFFER].add(data)
    return envelope()


async def browser_event(request: web.Request) -> web.Response:
    try:
        doc = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return envelope(40000, "invalid JSON", 400)
    if not _valid(doc) or doc.get("pixel_code") != PIXEL:
        return envelope(40002, "invalid event")
    forwarded = request.headers.get("X-Forwarded-For", "")
    user = dict(doc.get("user") or {})
    user["ip"] = forwarded.split(",")[0].strip() or request.remote
    user["user_agent"] = request.headers.get("User-Agent")
    user["ttp"] = request.cookies.get("_ttp")
    event = {
        "event": doc["event"],
        "event_id": doc.get("event_id"),
        "event_time": int(doc.get("timestamp") or time.time() * 1000) // 1000,
        "user": user,
        "page": doc.get("page"),
        "properties": doc.get("properties"),
    }
    request.app[BUFFER].add([event])
    return envelope()


def _options() -> formats.ParseOptions:
    return formats.ParseOptions(now=time.time(), phone_region=None, max_events=1000)


def _validated(request: web.Request, parse: Callable[[], formats.ParsedBody]) -> web.Response:
    """Parse as the gateway does; buffer the normalised events, or answer the refusal."""
    try:
        parsed = parse()
    except RequestError as exc:
        return envelope(exc.code, str(exc), 400)
    events = [e.body for e in parsed.events if e.pixel_code == PIXEL]
    if not events:
        return envelope(40002, "no valid events", 400)
    request.app[BUFFER].add(events)
    return envelope()


async def validated_event_track(request: web.Request) -> web.Response:
    """B1: event/track through the gateway's own decoding and validation."""
    if not hmac.compare_digest(request.headers.get("Access-Token", "").encode(), TOKEN.encode()):
        return envelope(40105, "Access token is incorrect")
    raw = await request.read()
    return _validated(
        request, lambda: formats.parse_event_track(formats.decode_json(raw), _options()))


async def validated_browser_event(request: web.Request) -> web.Response:
    """B1: a beacon through the gateway's own decoding, validation and browser fields."""
    forwarded = request.headers.get("X-Forwarded-For", "")
    ttclid = request.cookies.get("ttclid")
    browser = formats.BrowserContext(
        ip=forwarded.split(",")[0].strip() or request.remote,
        user_agent=request.headers.get("User-Agent"),
        ttp=request.cookies.get("_ttp"),
        ttclid_cookie=urllib.parse.unquote(ttclid) if ttclid else None,
    )
    raw = await request.read()
    return _validated(
        request, lambda: formats.parse_browser(formats.decode_json(raw), _options(), browser))


async def healthz(request: web.Request) -> web.Response:
    return envelope()


async def _buffer_ctx(app: web.Application) -> AsyncIterator[None]:
    buffer = app[BUFFER]
    buffer.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16))
    task = asyncio.create_task(buffer.run())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if buffer.sending:
        await asyncio.wait(buffer.sending, timeout=5)
    await buffer.session.close()


def create_app(upstream: str, validate: bool = False) -> web.Application:
    """B0, or B1 with `validate`."""
    app = web.Application(client_max_size=2 * 1024 * 1024)
    app[BUFFER] = Buffer(upstream)
    app.cleanup_ctx.append(_buffer_ctx)
    app.router.add_post(TRACK_PATH, validated_event_track if validate else event_track)
    app.router.add_post(BROWSER_PATH, validated_browser_event if validate else browser_event)
    app.router.add_get("/healthz", healthz)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--validate", action="store_true",
                        help="B1: parse and validate with the gateway's own code")
    args = parser.parse_args()
    web.run_app(create_app(args.upstream, args.validate), host="127.0.0.1", port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
