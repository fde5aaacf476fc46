"""Pass other `/open_api/` paths through to TikTok, for our callers only, streamed both ways.

A client whose base URL now points at the gateway may still call TikTok's
other endpoints. The gateway faces the internet, so it must not be a relay
to TikTok's whole Business API: `check_passthrough` lets through only a
caller holding a configured pixel's token, by a canonical path, under the
prefixes of GATEWAY_PASSTHROUGH_PATHS; the upstream URL is built from that
canonical path, and only the headers TikTok needs go with it.

Bodies are relayed chunk by chunk, never held whole, and
the response is relayed as TikTok sent it: still compressed if it was
(aiohttp must not decompress it behind our back, or the client would get a
`Content-Encoding` that no longer matches the bytes). When TikTok cannot be
reached, the client gets TikTok's own envelope with code 50002, which its
error handling already knows.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import Counter
from yarl import URL

from .appkeys import METRICS, SESSION, SETTINGS
from .errors import NotFound, NotOurCaller, PathNotCanonical, PathNotRelayed
from .ingest import INGEST_PATHS
from .setting_types import CANONICAL_SEGMENT
from .settings import UpstreamSettings

log = logging.getLogger(__name__)

ROOT = "/open_api/"
# What TikTok's API needs of a request. Nothing else the client sent is relayed: not the
# browser's Cookie, not X-Forwarded-* / Forwarded / X-Real-IP (whatever they claim, TikTok
# sees the gateway's address), not Authorization or any other credential, not our Host.
RELAYED_REQUEST_HEADERS = (
    "Access-Token",
    "Accept",
    "Accept-Encoding",
    "Content-Encoding",
    "Content-Length",
    "Content-Type",
    "User-Agent",
)
# A request target is visible ASCII (RFC 9112 3.2); a fragment is never sent.
_TARGET = re.compile(r"[!-~]*")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Decoded, these would change what the path means to whoever decodes it next: a
# separator, a dot segment, or (a % for) a second round of decoding.
_NEVER_ENCODED = frozenset("/\\.%")

# RFC 9110 section 7.6.1: these describe one connection, not the message.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# A cookie TikTok sets would land on the gateway's own (often the shop's first-party)
# domain, where browsers post beacons: API clients have no use for it.
NOT_RELAYED_RESPONSE_HEADERS = frozenset({"set-cookie", "set-cookie2"})
# aiohttp adds these when absent; a relayed request must carry only what the
# client sent (a default Accept-Encoding would get a compressed answer the
# client never asked for).
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# No total: a large download may take long. Stalls and dead hosts are caught by
# the connect and per-read limits.
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=60.0)
CHUNK_SIZE = 64 * 1024
UPSTREAM_ERROR_CODE = 50002


@dataclass(frozen=True, slots=True)
class Target:
    """Where a pass-through request goes: a canonical path, and the query as the client sent it."""

    path: str
    query: str = ""

    @property
    def path_qs(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


async def handler(request: web.Request) -> web.StreamResponse:
    """Other /open_api/ paths go to TikTok, for our callers and allowed paths only: a
    client's whole base URL can point here (`check_passthrough` says what passes)."""
    settings = request.app[SETTINGS]
    if request.path in INGEST_PATHS:
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])
    if not settings.passthrough:
        raise NotFound(f"{request.path} is not served here (GATEWAY_PASSTHROUGH=0)")
    # The raw target: aiohttp's request.path is already decoded (%2e%2e is ..).
    target = check_passthrough(
        request.raw_path, request.headers.getall("Access-Token", []), settings
    )
    return await proxy(
        request, request.app[SESSION], settings.upstream_url, target,
        outcomes=request.app[METRICS].passthrough_requests,
    )


def check_passthrough(
    raw_target: str, tokens: Sequence[str], settings: UpstreamSettings
) -> Target:
    """The canonical target of a pass-through request, or the RelayRefused saying why not.

    `raw_target` is the request target as received (aiohttp's `request.raw_path`, before
    any decoding); `tokens` the values of its Access-Token headers. Checked in this order:
    a canonical path (else 400), a configured pixel's token (401), an allowed prefix (404).
    """
    target = canonical_target(raw_target)
    check_token(tokens, settings)
    if not is_allowed(target.path, settings.passthrough_paths):
        raise PathNotRelayed(
            f"{target.path} is not relayed to TikTok: only paths under "
            f"{', '.join(settings.passthrough_paths)} are (GATEWAY_PASSTHROUGH_PATHS)"
        )
    return target


def canonical_target(raw_target: str) -> Target:
    """The path decoded once and checked segment by segment; the query kept as sent.

    A canonical path starts with /open_api/ and each segment is letters, digits and
    `- . _ ~` (RFC 3986's unreserved characters), not dots alone; only its last segment
    may be empty (the trailing slash). Every TikTok API path is such a path. Refused: an
    absolute URI or a fragment, a backslash, an empty segment (`//`), a `.` or `..`
    segment, an encoded `/`, `\\`, `.` or `%` (a double encoding), a malformed escape, and
    any other character, raw or encoded (controls, `;` which Tomcat strips with what
    follows so that `..;` is `..`, `:`, `@`, non-ASCII, ...).
    """
    if not _TARGET.fullmatch(raw_target) or "#" in raw_target:
        raise PathNotCanonical("path: only visible ASCII characters and no fragment (#)")
    raw_path, _, query = raw_target.partition("?")
    if not raw_path.startswith(ROOT):
        raise PathNotCanonical(f"path: must start with {ROOT} (and not be an absolute URI)")
    if "\\" in raw_path:
        raise PathNotCanonical("path: a backslash is not a path separator here")
    raw_segments = raw_path[1:].split("/")
    segments = [_decode_segment(segment) for segment in raw_segments[:-1]]
    if raw_segments[-1]:  # else the trailing slash, as TikTok's paths have
        segments.append(_decode_segment(raw_segments[-1]))
    return Target("/" + "/".join(segments) + ("/" if not raw_segments[-1] else ""), query)


def _decode_segment(raw: str) -> str:
    if not raw:
        raise PathNotCanonical("path: an empty segment (//)")
    if "%" in _ESCAPE.sub("", raw):
        raise PathNotCanonical("path: a % not followed by two hex digits")
    segment = _ESCAPE.sub(_decode_escape, raw)
    if segment.strip(".") == "":
        raise PathNotCanonical("path: a . or .. segment")
    if not CANONICAL_SEGMENT.fullmatch(segment):
        raise PathNotCanonical("path: only letters, digits and - . _ ~ in a segment")
    return segment


def _decode_escape(escape: re.Match[str]) -> str:
    char = chr(int(escape[1], 16))
    if char in _NEVER_ENCODED:
        raise PathNotCanonical(f"path: an encoded {char!r} ({escape[0]})")
    return char


def check_token(tokens: Sequence[str], settings: UpstreamSettings) -> None:
    """Refuse unless the one Access-Token is a configured pixel's token (constant time)."""
    if settings.sandbox:
        raise NotOurCaller(
            40105,
            "Sandbox mode (no GATEWAY_PIXELS): the pass-through relays only for configured "
            "pixels' tokens, so nothing is relayed to TikTok",
        )
    if not tokens or not tokens[0]:
        raise NotOurCaller(40104, "Access token is null, please check the Access-Token header")
    if len(tokens) > 1:
        raise NotOurCaller(40105, "Access-Token: one header expected, got several")
    given = tokens[0].encode("utf-8", "surrogateescape")
    ours = False
    for expected in settings.pixels.values():
        # Every token compared, no early exit: the time taken says nothing of which matched.
        ours |= hmac.compare_digest(given, expected.encode())
    if not ours:
        raise NotOurCaller(
            40105, "Access token is not one of this gateway's pixels' tokens: not relayed"
        )


def is_allowed(path: str, prefixes: Iterable[str]) -> bool:
    """Whether `path` is a prefix or below one, segment-wise (`/pixel/` is not `/pixelfoo`)."""
    for prefix in prefixes:
        base = prefix.rstrip("/")
        if path == base or path.startswith(base + "/"):
            return True
    return False


def relayed_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The request headers TikTok gets: RELAYED_REQUEST_HEADERS, as the client sent them."""
    kept: CIMultiDict[str] = CIMultiDict()
    for name in RELAYED_REQUEST_HEADERS:
        for value in headers.getall(name, ()):
            kept.add(name, value)
    return kept


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names a Connection header declares hop-by-hop."""
    return {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }


def filter_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """A copy of `headers` (TikTok's answer) without hop-by-hop headers and cookies."""
    drop = HOP_BY_HOP | NOT_RELAYED_RESPONSE_HEADERS | _connection_tokens(headers)
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in drop:
            kept.add(name, value)
    return kept


def error_envelope(status: int, message: str) -> web.Response:
    """TikTok's envelope for an upstream failure."""
    body = {"code": UPSTREAM_ERROR_CODE, "message": message, "request_id": "", "data": {}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def proxy(
    request: web.Request,
    session: aiohttp.ClientSession,
    base_url: str,
    target: Target,
    *,
    client_timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
    outcomes: Counter | None = None,
) -> web.StreamResponse:
    """Relay `request` to base_url + `target`; stream the answer back.

    `target` comes from check_passthrough: the raw path is never relayed. Each request
    is counted in `outcomes` as relayed, or upstream_error when TikTok could not be
    reached or broke off its answer.
    """
    started = time.monotonic()
    url = URL(base_url.rstrip("/") + target.path_qs, encoded=True)
    response: web.StreamResponse | None = None
    outcome = "upstream_error"
    try:
        response, outcome = await _forward(request, session, url, target.path, client_timeout)
        return response
    finally:
        if outcomes is not None:
            outcomes.labels(outcome).inc()
        # Path only: query strings of TikTok's other APIs can carry ids worth keeping out of logs.
        log.info(
            "passthrough %s %s -> %s in %.3fs",
            request.method,
            target.path,
            response.status if response is not None else "aborted",
            time.monotonic() - started,
        )


async def _forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    url: URL,
    path: str,
    client_timeout: aiohttp.ClientTimeout,
) -> tuple[web.StreamResponse, str]:
    try:
        upstream = await session.request(
            request.method,
            url,
            headers=relayed_headers(request.headers),
            skip_auto_headers=_NO_AUTO_HEADERS,
            # Streamed as it arrives: never read whole into memory.
            data=request.content if request.body_exists else None,
            allow_redirects=False,
            auto_decompress=False,
            raise_for_status=False,
            timeout=client_timeout,
        )
    except TimeoutError:
        # Before ClientError: aiohttp's timeout errors are both.
        log.warning("passthrough %s %s: upstream timed out", request.method, path)
        return error_envelope(504, "Upstream timed out"), "upstream_error"
    except (aiohttp.ClientError, OSError) as exc:
        log.warning(
            "passthrough %s %s: upstream unreachable: %s", request.method, path, type(exc).__name__
        )
        return error_envelope(502, "Upstream unreachable"), "upstream_error"
    async with upstream:
        return await _relay(request, upstream, path)


async def _relay(
    request: web.Request, upstream: aiohttp.ClientResponse, path: str
) -> tuple[web.StreamResponse, str]:
    """Send upstream's status, headers and body to the client as they come."""
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    # Content-Length and Content-Encoding stay: the body is relayed byte for byte.
    response.headers.extend(filter_headers(upstream.headers))
    try:
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(CHUNK_SIZE):
            await response.write(chunk)
    except ConnectionResetError:
        # The client went away; nothing left to tell it.
        log.info("passthrough %s %s: client disconnected", request.method, path)
        _cut(request)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.warning(
            "passthrough %s %s: upstream failed mid-body: %s",
            request.method,
            path,
            type(exc).__name__,
        )
        _cut(request)
        return response, "upstream_error"
    return response, "relayed"


def _cut(request: web.Request) -> None:
    """End the client's connection without ending the body.

    Headers are sent, so no error answer is possible. Closing before the last
    chunk (or short of Content-Length) shows the client the body is incomplete;
    the clean end aiohttp would write next would pass a truncated body off as whole.
    """
    if request.transport is not None:
        request.transport.close()
