"""The browser path: POST /pixel/events and its preflight.

The browser posts with no secret, so the request itself vouches for ip, user
agent and cookies, and only configured pixels and origins are accepted. Here:
the client's address (X-Forwarded-For from trusted proxies only) and whom the
rate limit counts, the ttclid cookie, and CORS. Storing and answering are
ingest.py's, as for the server paths.
"""

from __future__ import annotations

import functools
import ipaddress
import time
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from aiohttp import web

from . import formats
from .appkeys import METRICS, SETTINGS, STORE
from .errors import OriginNotAllowed, PayloadTooLarge, RateLimited
from .events import Event
from .ingest import INGEST, decode_body, parse_options, read_body, store_and_answer
from .metrics import Metrics
from .normalise import ttclid_from_url
from .pii import is_plain_ipv4
from .settings import Settings


async def browser_events(request: web.Request) -> web.Response:
    """POST /pixel/events — one event or a list, JSON or a text/plain beacon."""
    app = request.app
    settings, metrics = app[SETTINGS], app[METRICS]
    started = time.perf_counter()
    now = app[INGEST].clock()
    check_origin(settings, request.headers.get("Origin"), own_origin(request))
    client_ip = client_address(request, settings)
    # Before the body is read: a flood is turned away for one Redis round trip. A rate of
    # 0 turns the limit off (and saves that round trip) where a CDN limits rates already.
    if settings.pixel_rate_limit > 0:
        wait = await app[STORE].rate_limit(
            rate_limit_subject(client_ip), now, settings.pixel_rate_limit, settings.pixel_rate_burst
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
    doc = decode_body(await _read_beacon(request, settings))
    options = parse_options(settings, now, settings.pixel_max_events)
    parsed = _only_configured_pixels(
        settings, metrics, formats.parse_browser(doc, options, browser), isinstance(doc, list)
    )
    response = await store_and_answer(request, parsed, now)
    remember_click(request, settings, parsed.events, response)
    metrics.ingest_duration.labels("browser").observe(time.perf_counter() - started)
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


def _only_configured_pixels(
    settings: Settings, metrics: Metrics, parsed: formats.ParsedBody, listed: bool
) -> formats.ParsedBody:
    """Refuse events for pixels we do not serve: bots must not reach unconfigured pixels."""
    if settings.sandbox:
        return parsed
    refused_at = {r.index for r in parsed.refused}
    total = len(parsed.events) + len(parsed.refused)
    positions = [i for i in range(total) if i not in refused_at]  # request index of each event
    events, refused = [], list(parsed.refused)
    for position, event in zip(positions, parsed.events, strict=True):
        if event.pixel_code in settings.pixels:
            events.append(event)
        else:
            field = f"events.{position}.pixel_code" if listed else "pixel_code"
            refused.append(formats.Refusal(position, field, "unknown pixel code"))
            metrics.rejected.labels("unknown_pixel").inc()
    refused.sort(key=lambda r: r.index)
    return formats.ParsedBody(None, events, refused)


# -- the client's address: trusted proxies ------------------------------------------


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


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@functools.lru_cache(maxsize=4096)  # the same proxies ask again and again
def is_trusted_proxy(address: str, proxies: Networks) -> bool:
    """Whether `address` is one of our proxies; False for a hop that is no address."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def reached_over_https(request: web.Request, settings: Settings) -> bool:
    """Whether the browser reached us over HTTPS: directly, or as a trusted proxy says."""
    if request.secure:
        return True
    peer = request.remote
    trusted = peer is not None and is_trusted_proxy(peer, settings.trusted_proxies)
    proto = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip().lower()
    return trusted and proto == "https"


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
                secure=reached_over_https(request, settings) if secure is None else secure,
                samesite=settings.cookie_samesite,
            )
            return


def _cookie_ttclid(request: web.Request) -> str | None:
    raw = request.cookies.get(TTCLID_COOKIE)
    return urllib.parse.unquote(raw) if raw else None


# -- CORS ------------------------------------------------------------------------


async def browser_preflight(request: web.Request) -> web.Response:
    """OPTIONS /pixel/events — CORS preflight for configured origins only."""
    check_origin(request.app[SETTINGS], request.headers.get("Origin"))
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
        and origin_allowed(request.app[SETTINGS], origin)
    ):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
        if request.method == "OPTIONS":  # browsers read these on a preflight only
            response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
    return response
