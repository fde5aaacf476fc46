"""Where events enter: HTTP handlers, bytes in -> events -> store -> TikTok-style answer.

Server sources post TikTok's own bodies with `Access-Token`; the browser
posts to `/pixel/events` with no secret, so there the request itself
vouches for ip, user agent and cookies, and only configured pixels and
origins are accepted. "Accepted" (code 0) means stored in Redis.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import hmac
import ipaddress
import logging
import time
import urllib.parse
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from . import formats
from .errors import (
    AuthError,
    BodyTimeout,
    InvalidEvent,
    InvalidJSON,
    InvalidRequest,
    NotFound,
    OriginNotAllowed,
    PayloadTooLarge,
    RateLimited,
    UnknownPixel,
)
from .events import Event, Source
from .field_warnings import WarningLog
from .forwarder import Forwarder
from .metrics import Metrics
from .normalise import ttclid_from_url
from .pii import is_plain_ipv4
from .settings import Settings
from .store import Store

log = logging.getLogger("gateway.ingest")

Parser = Callable[[Any, formats.ParseOptions], formats.ParsedBody]
PARTIAL_SUCCESS = 20001


@dataclass(frozen=True, slots=True)
class IngestContext:
    """What the handlers need, built once by `create_app`."""

    settings: Settings
    store: Store
    metrics: Metrics
    forwarder: Forwarder | None
    clock: Callable[[], float] = time.time
    warning_log: WarningLog = dataclasses.field(default_factory=WarningLog)


CONTEXT: web.AppKey[IngestContext] = web.AppKey("ingest_context", IngestContext)
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id", str)


def envelope(
    request: web.Request,
    code: int = 0,
    message: str = "OK",
    data: dict[str, Any] | None = None,
    status: int = 200,
) -> web.Response:
    """TikTok's response envelope, so clients' existing error handling works."""
    request_id = request.get(REQUEST_ID) or uuid.uuid4().hex
    body = {"code": code, "message": message, "request_id": request_id, "data": data or {}}
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers={"X-Request-Id": request_id},
    )


# -- server sources ------------------------------------------------------------


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
    ctx = request.app[CONTEXT]
    started = time.perf_counter()
    now = ctx.clock()
    doc = _decode(await read_body(request, ctx.settings))
    token = request.headers.get("Access-Token")
    claimed = doc.get("event_source_id", doc.get("pixel_code")) if isinstance(doc, dict) else None
    if isinstance(claimed, str):
        # Token errors come before field errors, as TikTok answers them.
        authenticate(ctx.settings, claimed, token)
    try:
        parsed = parse(doc, _options(ctx, now))
    except InvalidEvent:
        # pixel/track's one bad event is raised here, before _store_and_answer counts refusals.
        ctx.metrics.rejected.labels("invalid_event").inc()
        raise
    authenticate(ctx.settings, parsed.pixel_code, token)
    response = await _store_and_answer(request, ctx, parsed, now)
    ctx.metrics.ingest_duration.labels(endpoint).observe(time.perf_counter() - started)
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


# -- the browser -----------------------------------------------------------------


async def browser_events(request: web.Request) -> web.Response:
    """POST /pixel/events — one event or a list, JSON or a text/plain beacon."""
    ctx = request.app[CONTEXT]
    started = time.perf_counter()
    now = ctx.clock()
    settings = ctx.settings
    check_origin(settings, request.headers.get("Origin"), own_origin(request))
    client_ip = client_address(request, settings)
    # Before the body is read: a flood is turned away for one Redis round trip. A rate of
    # 0 turns the limit off (and saves that round trip) where a CDN limits rates already.
    if settings.pixel_rate_limit > 0:
        subject = rate_limit_subject(client_ip)
        wait = await ctx.store.rate_limit(
            subject, now, settings.pixel_rate_limit, settings.pixel_rate_burst
        )
        if wait > 0:
            raise RateLimited(
                f"Too many requests from this client: at most {settings.pixel_rate_limit:g} a "
                f"second (bursts of {settings.pixel_rate_burst}); retry in {wait:.1f} s",
                retry_after=wait,
            )
    browser = formats.BrowserContext(
        ip=client_ip,
        user_agent=request.headers.get("User-Agent"),
        ttp=request.cookies.get("_ttp"),
        ttclid_cookie=_cookie_ttclid(request),
    )
    doc = _decode(await _read_beacon(request, settings))
    options = _options(ctx, now, settings.pixel_max_events)
    parsed = _only_configured_pixels(
        ctx, formats.parse_browser(doc, options, browser), isinstance(doc, list)
    )
    response = await _store_and_answer(request, ctx, parsed, now)
    remember_click(request, settings, parsed.events, response)
    ctx.metrics.ingest_duration.labels("browser").observe(time.perf_counter() - started)
    return response


async def _read_beacon(request: web.Request, settings: Settings) -> bytes:
    """The body, within the browser endpoint's own (smaller) size limit."""
    limit = min(settings.max_body_bytes, settings.pixel_max_body_bytes)
    if (request.content_length or 0) > limit:
        raise PayloadTooLarge(f"body: larger than {limit} bytes")
    raw = await read_body(request, settings)
    if len(raw) > limit:
        raise PayloadTooLarge(f"body: larger than {limit} bytes")
    return raw


def rate_limit_subject(address: str | None) -> str:
    """Whom the rate limit counts: an IPv4 address, or an IPv6 /64 (one subscriber's
    network: a client holding a /64 must not get 2**64 separate budgets)."""
    if not address:
        return "unknown"
    if is_plain_ipv4(address):
        return address
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:  # a proxy's odd hop: counted as itself, made safe for a key
        return "".join(c if c.isalnum() or c in ".:_-" else "_" for c in address[:64])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


# -- the ttclid cookie -------------------------------------------------------------

TTCLID_COOKIE = "ttclid"
TTCLID_COOKIE_MAX_AGE = 30 * 24 * 3600  # as TikTok's own server-side tag sets it
_MAX_TTCLID = 1000


def remember_click(
    request: web.Request, settings: Settings, events: Sequence[Event], response: web.Response
) -> None:
    """Keep a page URL's ttclid in a first-party cookie, so a purchase days later carries it."""
    for event in events:
        page = event.body.get("page")
        url = page.get("url") if isinstance(page, dict) else None
        ttclid = ttclid_from_url(url) if isinstance(url, str) else None
        if ttclid and len(ttclid) <= _MAX_TTCLID:
            secure = settings.cookie_secure
            response.set_cookie(
                TTCLID_COOKIE,
                # Percent-encoded: a cookie value cannot hold every character a URL can.
                urllib.parse.quote(ttclid, safe="-._~+"),
                max_age=TTCLID_COOKIE_MAX_AGE,
                path="/",
                domain=settings.cookie_domain,
                secure=_https(request, settings) if secure is None else secure,
                samesite=settings.cookie_samesite,
            )
            return


def _cookie_ttclid(request: web.Request) -> str | None:
    raw = request.cookies.get(TTCLID_COOKIE)
    return urllib.parse.unquote(raw) if raw else None


def _https(request: web.Request, settings: Settings) -> bool:
    """Whether the browser reached us over HTTPS: directly, or as a trusted proxy says."""
    if request.secure:
        return True
    peer = request.remote
    trusted = peer is not None and is_trusted_proxy(peer, settings.trusted_proxies)
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return trusted and proto == "https"


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@functools.lru_cache(maxsize=4096)  # the same proxies ask again and again
def is_trusted_proxy(address: str, proxies: Networks) -> bool:
    """Whether `address` is one of our proxies; False for a hop that is no address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


async def browser_preflight(request: web.Request) -> web.Response:
    """OPTIONS /pixel/events — CORS preflight for configured origins only."""
    ctx = request.app[CONTEXT]
    check_origin(ctx.settings, request.headers.get("Origin"))
    return web.Response(status=204)


def own_origin(request: web.Request) -> str:
    """This gateway's origin as the browser sees it: pages it serves itself (the demo)."""
    return f"{request.scheme}://{request.host}"


def origin_allowed(settings: Settings, origin: str) -> bool:
    allowed = settings.allowed_origins
    if not allowed:
        return settings.sandbox  # sandbox mode is for trying things out from any page
    return "*" in allowed or origin.rstrip("/") in allowed


def check_origin(settings: Settings, origin: str | None, own: str | None = None) -> None:
    # Requests without Origin are not from a browser page (curl, a server): CORS
    # cannot protect anything there, and the pixel allow-list still applies. A
    # same-origin request comes from a page this gateway served (the demo).
    if origin is None or (own is not None and origin.rstrip("/") == own):
        return
    if not origin_allowed(settings, origin):
        raise OriginNotAllowed(f"Origin {origin} is not allowed (GATEWAY_ALLOWED_ORIGINS)")


@web.middleware
async def cors_middleware(
    request: web.Request, handler: Callable[[web.Request], Any]
) -> web.StreamResponse:
    """Add CORS headers to /pixel/ answers (errors included) for allowed origins."""
    response: web.StreamResponse = await handler(request)
    origin = request.headers.get("Origin")
    if (
        origin
        and request.path.startswith("/pixel/")
        and origin_allowed(request.app[CONTEXT].settings, origin)
    ):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
        if request.method == "OPTIONS":  # browsers read these on a preflight only
            response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
    return response


def client_address(request: web.Request, settings: Settings) -> str | None:
    """The browser's address: the peer, or X-Forwarded-For when the peer is a trusted proxy."""
    peer = request.remote
    if not peer or not settings.trusted_proxies:
        return peer
    hops = [peer]
    for header in request.headers.getall("X-Forwarded-For", []):
        hops[:0] = [h.strip() for h in header.split(",") if h.strip()]
    # Walk from the nearest hop back while it is one of our proxies.
    for hop in reversed(hops):
        if not is_trusted_proxy(hop, settings.trusted_proxies):
            return hop
    return hops[0]


def _only_configured_pixels(
    ctx: IngestContext, parsed: formats.ParsedBody, listed: bool
) -> formats.ParsedBody:
    """Refuse events for pixels we do not serve: bots must not reach unconfigured pixels."""
    if ctx.settings.sandbox:
        return parsed
    refused_at = {r.index for r in parsed.refused}
    total = len(parsed.events) + len(parsed.refused)
    positions = [i for i in range(total) if i not in refused_at]  # request index of each event
    events, refused = [], list(parsed.refused)
    for position, event in zip(positions, parsed.events, strict=True):
        if event.pixel_code in ctx.settings.pixels:
            events.append(event)
        else:
            field = f"events.{position}.pixel_code" if listed else "pixel_code"
            refused.append(formats.Refusal(position, field, "unknown pixel code"))
            ctx.metrics.rejected.labels("unknown_pixel").inc()
    refused.sort(key=lambda r: r.index)
    return formats.ParsedBody(None, events, refused)


# -- shared by both sources ----------------------------------------------------


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


def _decode(raw: bytes) -> Any:
    """The body as JSON; a body that is not JSON at all is counted apart (`invalid_json`)."""
    try:
        return formats.decode_json(raw)
    except InvalidRequest as exc:
        raise InvalidJSON(exc.field, exc.detail) from None


def _options(ctx: IngestContext, now: float, max_events: int | None = None) -> formats.ParseOptions:
    """How to read a body received at `now`, with at most `max_events` if that is lower
    than the deployment's limit."""
    limit = ctx.settings.max_events_per_request
    return formats.ParseOptions(
        now=now,
        phone_region=ctx.settings.phone_region,
        max_events=limit if max_events is None else min(limit, max_events),
    )


async def _store_and_answer(
    request: web.Request, ctx: IngestContext, parsed: formats.ParsedBody, now: float
) -> web.Response:
    if parsed.refused:
        ctx.metrics.rejected.labels("invalid_event").inc(len(parsed.refused))
    if not parsed.events:
        first = parsed.refused[0] if parsed.refused else None
        if first is None:
            raise InvalidRequest("", "no events in the request")
        raise InvalidEvent(first.field, first.message)
    await ctx.store.ingest(parsed.events, now)
    _count_accepted(ctx, parsed.events)
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


def _count_accepted(ctx: IngestContext, events: Sequence[Event]) -> None:
    """Count what was stored (what each copy turns out to be, the shard's owner counts)
    and wake this instance's forwarder: it may own the shards just written to."""
    metrics, configured = ctx.metrics, ctx.settings.pixels
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
            ctx.warning_log.note(pixel, event.pixel_code, warning)
    for (source, pixel), count in received.items():
        metrics.received.labels(source, pixel).inc(count)
    if ctx.forwarder is not None:
        ctx.forwarder.wake()


# -- operations ------------------------------------------------------------------


async def debug_event(request: web.Request) -> web.Response:
    """GET /debug/events/{pixel}/{event_id}/{event} — a key's state and timeline."""
    ctx = request.app[CONTEXT]
    admin = ctx.settings.admin_token
    if admin is None:
        raise NotFound("debug endpoints are off: set GATEWAY_ADMIN_TOKEN")
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer":
        given = ""
    if not hmac.compare_digest(given.strip().encode(), admin.encode()):
        raise AuthError(40105, "admin token missing or wrong (Authorization: Bearer ...)")
    info = request.match_info
    state = await ctx.store.inspect(info["pixel"], info["event_id"], info["event"])
    if state is None:
        raise NotFound("no such key: never seen, or forgotten after the dedup window")
    return envelope(request, data=state)
