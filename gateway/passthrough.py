"""Pass other `/open_api/` paths through to TikTok, streamed both ways.

A client whose base URL now points at the gateway may still call TikTok's
other endpoints. Bodies are relayed chunk by chunk, never held whole, and
the response is relayed as TikTok sent it: still compressed if it was
(aiohttp must not decompress it behind our back, or the client would get a
`Content-Encoding` that no longer matches the bytes). When TikTok cannot be
reached, the client gets TikTok's own envelope with code 50002, which its
error handling already knows.
"""

from __future__ import annotations

import logging
import time

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

log = logging.getLogger(__name__)

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
# Host names the gateway, not TikTok; Expect is answered by our own server already.
_REQUEST_ONLY = frozenset({"host", "expect"})
# aiohttp adds these when absent; a relayed request must carry only what the
# client sent (a default Accept-Encoding would get a compressed answer the
# client never asked for).
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")

# No total: a large download may take long. Stalls and dead hosts are caught by
# the connect and per-read limits.
DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10.0, sock_read=60.0)
CHUNK_SIZE = 64 * 1024
UPSTREAM_ERROR_CODE = 50002


def _connection_tokens(headers: CIMultiDictProxy[str]) -> set[str]:
    """Header names a Connection header declares hop-by-hop."""
    return {
        token.strip().lower()
        for value in headers.getall("Connection", [])
        for token in value.split(",")
        if token.strip()
    }


def filter_headers(
    headers: CIMultiDictProxy[str], extra: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    """A copy of `headers` without hop-by-hop headers and without `extra`."""
    drop = HOP_BY_HOP | extra | _connection_tokens(headers)
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
    *,
    client_timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
) -> web.StreamResponse:
    """Relay `request` to base_url + its path and query; stream the answer back."""
    started = time.monotonic()
    target = URL(base_url.rstrip("/") + request.rel_url.raw_path_qs, encoded=True)
    response: web.StreamResponse | None = None
    try:
        response = await _forward(request, session, target, client_timeout)
        return response
    finally:
        # Path only: query strings of TikTok's other APIs can carry ids worth keeping out of logs.
        log.info(
            "passthrough %s %s -> %s in %.3fs",
            request.method,
            request.path,
            response.status if response is not None else "aborted",
            time.monotonic() - started,
        )


async def _forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    target: URL,
    client_timeout: aiohttp.ClientTimeout,
) -> web.StreamResponse:
    try:
        upstream = await session.request(
            request.method,
            target,
            headers=filter_headers(request.headers, _REQUEST_ONLY),
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
        log.warning("passthrough %s %s: upstream timed out", request.method, request.path)
        return error_envelope(504, "Upstream timed out")
    except (aiohttp.ClientError, OSError) as exc:
        log.warning(
            "passthrough %s %s: upstream unreachable: %s",
            request.method,
            request.path,
            type(exc).__name__,
        )
        return error_envelope(502, "Upstream unreachable")
    async with upstream:
        return await _relay(request, upstream)


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
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
        log.info("passthrough %s %s: client disconnected", request.method, request.path)
        _cut(request)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.warning(
            "passthrough %s %s: upstream failed mid-body: %s",
            request.method,
            request.path,
            type(exc).__name__,
        )
        _cut(request)
    return response


def _cut(request: web.Request) -> None:
    """End the client's connection without ending the body.

    Headers are sent, so no error answer is possible. Closing before the last
    chunk (or short of Content-Length) shows the client the body is incomplete;
    the clean end aiohttp would write next would pass a truncated body off as whole.
    """
    if request.transport is not None:
        request.transport.close()
