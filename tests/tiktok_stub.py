"""A real HTTP server on 127.0.0.1 that plays TikTok's API for tests.

It records every request, answers `/open_api/v1.3/event/track/` with queued
`Answer`s (code 0 once the queue is empty), and echoes every other
`/open_api/` path so pass-through can be checked. Tests wait on it with
`wait_for_events` / `wait_for_requests`, which wake on a condition, not a poll.
An event/track request carrying an event_id in `reject_event_ids` is answered
40002 naming that event's index (`data.<i>.event_id: Invalid value`) without
taking a queued answer, and none of its events count as received.
`answer_for`, when set, picks each event/track answer before the queue does;
`add_listener()` opens one more port, and each request records the port it came in
on, so a test can answer each client its own way.

    stub = TikTokStub()
    await stub.start()
    stub.queue(Answer(code=40100), Answer(http_status=500, raw_body=b"<html>"))
    ...  # point the code under test at stub.url
    events = await stub.wait_for_events(3)
    await stub.stop()

Special paths besides the echo:

- `GET /open_api/v1.3/big/?size=N` streams `big_payload(N)` with a Content-Length
  (`&chunked=1`: without one; `&cut=M`: the connection drops after M bytes).
- `GET /open_api/v1.3/gzip/` answers a gzip-encoded JSON envelope with
  `Content-Encoding: gzip`, to prove a proxy relays it undecoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

TRACK_PATH = "/open_api/v1.3/event/track/"
BIG_PATH = "/open_api/v1.3/big/"
GZIP_PATH = "/open_api/v1.3/gzip/"
SUCCESS_CODES = frozenset({0, 20001})
_CHUNK = 64 * 1024
# A prime period, so a shifted or repeated chunk shows up as a mismatch.
_PATTERN = bytes(i % 251 for i in range(251 * 64))


def big_payload(size: int) -> bytes:
    """The bytes `GET /open_api/v1.3/big/?size=N` answers with."""
    repeats = size // len(_PATTERN) + 1
    return (_PATTERN * repeats)[:size]


UPSTREAM_COOKIE = "tt_upstream=1; Path=/; HttpOnly"


@dataclass
class RecordedRequest:
    """One request as the stub received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw bytes when the body is not JSON
    received_at: float  # time.monotonic()
    query: dict[str, str] = field(default_factory=dict)
    port: int = 0  # the stub's port it came in on (see `TikTokStub.add_listener`)


@dataclass
class Answer:
    """How to answer one event/track request."""

    code: int = 0
    http_status: int = 200
    message: str = "OK"
    delay: float = 0.0  # seconds before answering
    retry_after: str | None = None  # Retry-After header value
    raw_body: bytes | None = None  # sent as is instead of the JSON envelope
    drop_connection: bool = False  # close the socket without answering

    @property
    def accepts(self) -> bool:
        """Whether TikTok would have taken the events of a request answered so."""
        return (
            self.code in SUCCESS_CODES
            and self.http_status == 200
            and self.raw_body is None
            and not self.drop_connection
        )


class TikTokStub:
    """TikTok's Events API on a free loopback port, scripted by the test."""

    def __init__(self) -> None:
        self.url = ""
        self.requests: list[RecordedRequest] = []
        self.reject_event_ids: set[str] = set()
        # Seconds before answering any path other than event/track (proxy timeouts).
        self.echo_delay = 0.0
        # Consulted first for each event/track answer; None from it: the queue's answer.
        self.answer_for: Callable[[RecordedRequest], Answer | None] | None = None
        self._events: list[dict[str, Any]] = []
        self._answers: deque[Answer] = deque()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Condition | None = None
        self._closing: asyncio.Event | None = None

    async def start(self) -> None:
        """Listen on 127.0.0.1 on a free port; sets `url`."""
        self._changed = asyncio.Condition()
        self._closing = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Short: a delayed answer ends early on stop(), so nothing should linger.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def add_listener(self) -> str:
        """One more loopback port serving the same stand-in; returns its URL."""
        if self._runner is None:
            raise RuntimeError("TikTokStub.start() was not awaited")
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[-1][:2]
        return f"http://{host}:{port}"

    async def stop(self) -> None:
        """Stop listening; answers still waiting out a delay are cut short."""
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> TikTokStub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def reset(self) -> None:
        """Forget requests, events, queued answers, rejections, delays and `answer_for`."""
        self.requests.clear()
        self._events.clear()
        self._answers.clear()
        self.reject_event_ids.clear()
        self.echo_delay = 0.0
        self.answer_for = None

    def queue(self, *answers: Answer) -> None:
        """Answer the next event/track requests so, in order; then code 0 again."""
        self._answers.extend(answers)

    def events(self) -> list[dict[str, Any]]:
        """Every data[] item of an event/track request answered with success, in order."""
        return list(self._events)

    def track_requests(self) -> list[RecordedRequest]:
        """The recorded event/track requests, in order."""
        return [r for r in self.requests if r.path == TRACK_PATH]

    # `timeout=` is the name every test passes; asyncio.timeout would not read better there.
    async def wait_for_events(
        self,
        n: int,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[dict[str, Any]]:
        """Wait until at least `n` events were accepted; returns them all."""
        await self._wait(lambda: len(self._events) >= n, timeout, f"{n} events")
        return self.events()

    async def wait_for_requests(
        self,
        n: int,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[RecordedRequest]:
        """Wait until at least `n` requests (any path) arrived; returns them all."""
        await self._wait(lambda: len(self.requests) >= n, timeout, f"{n} requests")
        return list(self.requests)

    async def _wait(self, predicate: Callable[[], bool], seconds: float, what: str) -> None:
        changed = self._require_started()
        async with changed:
            try:
                await asyncio.wait_for(changed.wait_for(predicate), seconds)
            except TimeoutError:
                raise AssertionError(
                    f"stub: waited {seconds}s for {what}; have {len(self.requests)} requests, "
                    f"{len(self._events)} events"
                ) from None

    def _require_started(self) -> asyncio.Condition:
        if self._changed is None:
            raise RuntimeError("TikTokStub.start() was not awaited")
        return self._changed

    async def _notify(self) -> None:
        changed = self._require_started()
        async with changed:
            changed.notify_all()

    async def _pause(self, seconds: float) -> None:
        """Play slowness: wait `seconds`, or less if the stub is stopping."""
        if seconds <= 0 or self._closing is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _request_id(self) -> str:
        # TikTok's look like a timestamp plus hex; unique is what matters here.
        return f"stub{next(self._ids):08d}{uuid.uuid4().hex[:12].upper()}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            headers=dict(request.headers),
            body=_parse(raw),
            received_at=time.monotonic(),
            query=dict(request.query),
            port=_local_port(request),
        )
        self.requests.append(recorded)
        await self._notify()
        if request.path == TRACK_PATH and request.method == "POST":
            return await self._track(request, recorded)
        if request.path.startswith("/open_api/"):
            await self._pause(self.echo_delay)
            return await self._other(request, raw)
        return self._envelope(40400, "Not found", status=404)

    async def _track(self, request: web.Request, recorded: RecordedRequest) -> web.StreamResponse:
        body = recorded.body
        data = body.get("data") if isinstance(body, dict) else None
        items: list[dict[str, Any]] = data if isinstance(data, list) else []
        rejected = self._first_rejected(items)
        if rejected is not None:
            return self._envelope(40002, f"data.{rejected}.event_id: Invalid value")
        answer = self.answer_for(recorded) if self.answer_for is not None else None
        if answer is None:
            answer = self._answers.popleft() if self._answers else Answer()
        await self._pause(answer.delay)
        if answer.drop_connection:
            _drop(request)
            # Unreachable for the client: the socket is gone before this is written.
            return web.Response(status=500)
        if answer.accepts:
            self._events.extend(items)
            await self._notify()
        if answer.raw_body is not None:
            return web.Response(
                status=answer.http_status, body=answer.raw_body, headers=_retry(answer)
            )
        return self._envelope(
            answer.code, answer.message, status=answer.http_status, headers=_retry(answer)
        )

    def _first_rejected(self, items: list[dict[str, Any]]) -> int | None:
        if not self.reject_event_ids:
            return None
        for index, item in enumerate(items):
            if isinstance(item, dict) and item.get("event_id") in self.reject_event_ids:
                return index
        return None

    async def _other(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        if request.path == BIG_PATH:
            return await _stream_big(request, int(request.query.get("size", "0")))
        if request.path == GZIP_PATH:
            envelope = {"code": 0, "message": "OK", "request_id": self._request_id(), "data": {}}
            return web.Response(
                body=gzip.compress(orjson.dumps(envelope)),
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        echo = {
            "method": request.method,
            "path": request.path,
            "query": request.rel_url.raw_query_string,  # as sent, still percent-encoded
            "body_length": len(raw),
        }
        # TikTok's hosts may set cookies of their own; the gateway must not pass them on.
        return self._envelope(0, "OK", data=echo, headers={"Set-Cookie": UPSTREAM_COOKIE})

    def _envelope(
        self,
        code: int,
        message: str,
        *,
        status: int = 200,
        data: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        body = {
            "code": code,
            "message": message,
            "request_id": self._request_id(),
            "data": data if data is not None else {},
        }
        response = web.Response(
            status=status,
            body=orjson.dumps(body),
            content_type="application/json",
            headers=headers,
        )
        # Compressed when the client accepts it, as a real server would: a client that
        # turned off decompression and still advertises gzip must notice.
        response.enable_compression()
        return response


def _parse(raw: bytes) -> Any:
    if not raw:
        return b""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw


def _local_port(request: web.Request) -> int:
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    return int(sockname[1]) if sockname else 0


def _retry(answer: Answer) -> dict[str, str] | None:
    return {"Retry-After": answer.retry_after} if answer.retry_after is not None else None


def _drop(request: web.Request) -> None:
    """Close the socket with nothing sent, as a crashed load balancer would."""
    if request.transport is not None:
        request.transport.abort()


async def _stream_big(request: web.Request, size: int) -> web.StreamResponse:
    """Send `big_payload(size)` chunk by chunk, with its Content-Length unless `chunked=1`.

    `cut=M` drops the connection after M bytes, as an upstream dying mid-body.
    """
    cut = int(request.query.get("cut", str(size)))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") != "1":
        response.content_length = size
    await response.prepare(request)
    for start in range(0, min(size, cut), _CHUNK):
        end = min(start + _CHUNK, size, cut)
        # The pattern has period 251: a chunk is the start of the payload, shifted.
        shift = start % 251
        await response.write(big_payload(end - start + shift)[shift:])
    if cut < size:
        if request.transport is not None:
            request.transport.close()
        return response
    await response.write_eof()
    return response
