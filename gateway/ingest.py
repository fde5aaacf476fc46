"""Where events enter: the TikTok-compatible paths, and the steps every source shares.

Server sources post TikTok's own bodies with `Access-Token` (the handlers
here); the browser posts to `/pixel/events` (browser.py), which reads its
body, stores and answers through the same steps: bytes in -> events ->
store -> TikTok-style answer. "Accepted" (code 0) means stored in Redis.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from . import formats
from .answers import envelope
from .appkeys import METRICS, SETTINGS, STORE
from .errors import (
    AuthError,
    BodyTimeout,
    InvalidEvent,
    InvalidJSON,
    InvalidRequest,
    UnknownPixel,
)
from .events import Event, Source
from .field_warnings import WarningLog
from .settings import Settings

log = logging.getLogger("gateway.ingest")

Parser = Callable[[Any, formats.ParseOptions], formats.ParsedBody]
PARTIAL_SUCCESS = 20001


@dataclass(frozen=True, slots=True)
class IngestContext:
    """What ingest needs besides the app's resources; published with the forwarder."""

    # Called once events are stored: this instance's forwarder may own their shards.
    wake: Callable[[], None]
    clock: Callable[[], float] = time.time
    warning_log: WarningLog = field(default_factory=WarningLog)


INGEST: web.AppKey[IngestContext] = web.AppKey("ingest", IngestContext)


# -- the TikTok-compatible paths ---------------------------------------------------


async def event_track(request: web.Request) -> web.Response:
    """POST /open_api/v1.3/event/track/ — an Events API 2.0 body."""
    return await _server_ingest(request, formats.parse_event_track, "event_track")


async def pixel_track(request: web.Request) -> web.Response:
    """POST /open_api/v1.2|v1.3/pixel/track/ — one Events 1.0 event."""
    return await _server_ingest(request, formats.parse_pixel_track, "pixel_track")


async def pixel_batch(request: web.Request) -> web.Response:
    """POST /open_api/v1.2|v1.3/pixel/batch/ — `pixel_code` and `batch[]`."""
    return await _server_ingest(request, formats.parse_pixel_batch, "pixel_batch")


async def _server_ingest(request: web.Request, parse: Parser, endpoint: str) -> web.Response:
    settings, metrics = request.app[SETTINGS], request.app[METRICS]
    started = time.perf_counter()
    now = request.app[INGEST].clock()
    doc = decode_body(await read_body(request, settings))
    token = request.headers.get("Access-Token")
    claimed = doc.get("event_source_id", doc.get("pixel_code")) if isinstance(doc, dict) else None
    if isinstance(claimed, str):
        # Token errors come before field errors, as TikTok answers them.
        authenticate(settings, claimed, token)
    try:
        parsed = parse(doc, parse_options(settings, now))
    except InvalidEvent:
        # pixel/track's one bad event is raised here, before store_and_answer counts refusals.
        metrics.rejected.labels("invalid_event").inc()
        raise
    authenticate(settings, parsed.pixel_code, token)
    response = await store_and_answer(request, parsed, now)
    metrics.ingest_duration.labels(endpoint).observe(time.perf_counter() - started)
    return response


def authenticate(settings: Settings, pixel_code: str | None, token: str | None) -> None:
    """Check the Access-Token against the pixel's configured one, in constant time."""
    if settings.sandbox:
        return
    expected = settings.pixels.get(pixel_code or "")
    if expected is None:
        raise UnknownPixel(f"No permission to operate pixel code: {pixel_code}")
    if not token:
        raise AuthError(40104, "Access token is null, please check the Access-Token header")
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise AuthError(40105, "Access token is incorrect or has been revoked")


# The paths TikTok's clients post events to, and their handlers.
INGEST_PATHS = {
    "/open_api/v1.3/event/track/": event_track,
    "/open_api/v1.2/pixel/track/": pixel_track,
    "/open_api/v1.3/pixel/track/": pixel_track,
    "/open_api/v1.2/pixel/batch/": pixel_batch,
    "/open_api/v1.3/pixel/batch/": pixel_batch,
}


# -- shared by every source ----------------------------------------------------------


async def read_body(request: web.Request, settings: Settings) -> bytes:
    """The whole body, within `body_timeout` in total: a slow-loris trickle is cut off.

    aiohttp has no deadline for a body of its own; without one a client sending a
    byte a second holds a connection (and the memory read so far) for as long as it likes.
    """
    if request.content.is_eof():  # all of it arrived with the headers (most beacons)
        return await request.read()
    try:
        async with asyncio.timeout(settings.body_timeout):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(
            f"body: not received within {settings.body_timeout:g} seconds"
        ) from None


def decode_body(raw: bytes) -> Any:
    """The body as JSON; a body that is not JSON at all is counted apart (`invalid_json`)."""
    try:
        return formats.decode_json(raw)
    except InvalidRequest as exc:
        raise InvalidJSON(exc.field, exc.detail) from None


def parse_options(
    settings: Settings, now: float, max_events: int | None = None
) -> formats.ParseOptions:
    """How to read a body received at `now`, with at most `max_events` if that is lower
    than the deployment's limit."""
    limit = settings.max_events_per_request
    return formats.ParseOptions(
        now=now,
        phone_region=settings.phone_region,
        max_events=limit if max_events is None else min(limit, max_events),
    )


async def store_and_answer(
    request: web.Request, parsed: formats.ParsedBody, now: float
) -> web.Response:
    """Store the accepted events, then answer: OK, or partial success naming each refusal."""
    app = request.app
    if parsed.refused:
        app[METRICS].rejected.labels("invalid_event").inc(len(parsed.refused))
    if not parsed.events:
        first = parsed.refused[0] if parsed.refused else None
        if first is None:
            raise InvalidRequest("", "no events in the request")
        raise InvalidEvent(first.field, first.message)
    await app[STORE].ingest(parsed.events, now)
    _count_accepted(app, parsed.events)
    if not parsed.refused:
        return envelope(request)
    failed = [{"index": r.index, "field": r.field, "message": r.message} for r in parsed.refused]
    return envelope(
        request,
        PARTIAL_SUCCESS,
        f"Partially successful: {len(failed)} event(s) refused; first: "
        f"{failed[0]['field']}: {failed[0]['message']}",
        {"accepted": len(parsed.events), "failed_events": failed},
    )


def _count_accepted(app: web.Application, events: Sequence[Event]) -> None:
    """Count what was stored (what each copy turns out to be, the shard's owner counts)
    and wake this instance's forwarder: it may own the shards just written to."""
    metrics, configured, ingest = app[METRICS], app[SETTINGS].pixels, app[INGEST]
    # Tallied first: a batch of 100 events updates a few counters, not 100.
    received: collections.Counter[tuple[Source, str]] = collections.Counter()
    debug = log.isEnabledFor(logging.DEBUG)
    for event in events:
        pixel = metrics.pixel_label(event.pixel_code, configured)
        received[event.source, pixel] += 1
        if debug:  # with the request's id; the owner's line says what the copy was
            log.debug(
                "%s %s event %s for pixel %s: accepted",
                event.source, event.name, event.event_id, event.pixel_code,
                extra={"pixel": event.pixel_code, "event": event.name,
                       "event_id": event.event_id, "source": event.source,
                       "outcome": "accepted"},
            )  # fmt: skip
        for warning in event.warnings:  # counted once stored: a refused request counts none
            metrics.field_warnings.labels(pixel, warning.field, warning.reason).inc()
            ingest.warning_log.note(pixel, event.pixel_code, warning)
    for (source, pixel), count in received.items():
        metrics.received.labels(source, pixel).inc(count)
    ingest.wake()
