"""Every answer in TikTok's envelope, and the one middleware that turns errors into it.

The middleware gives each request its id (logged with every line the request
causes, and answered as `request_id` and X-Request-Id), counts refusals by
reason, and maps each error of errors.py to its status and TikTok code.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import RedisClusterException, RedisError

from .appkeys import METRICS, SETTINGS
from .errors import (
    BodyTimeout,
    GatewayError,
    NotFound,
    RateLimited,
    RelayRefused,
    RequestError,
    StoreUnavailable,
)
from .logs import request_context

# Named as before the handlers left app.py: log filters select refusals by it.
log = logging.getLogger("gateway.app")

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


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """The one place errors become answers, in TikTok's envelope; sets the request id."""
    request[REQUEST_ID] = uuid.uuid4().hex
    with request_context(request[REQUEST_ID]):
        return await _answer(request, handler)


async def _answer(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    tiktok_path = request.path.startswith("/open_api/")
    try:
        return await handler(request)
    except RequestError as exc:
        _count_rejection(request, exc)
        status = exc.tiktok_status if tiktok_path else exc.http_status
        # A client's mistake, not ours: INFO (a flood of rate-limited beacons: DEBUG).
        log.log(
            logging.DEBUG if isinstance(exc, RateLimited) else logging.INFO,
            "refused %s %s: %s", request.method, logged_path(request), exc.message,
            extra={"outcome": "refused", "code": exc.code, "status": status},
        )
        response = envelope(request, exc.code, exc.message, status=status)
        if isinstance(exc, RateLimited):
            response.headers["Retry-After"] = str(max(1, round(exc.retry_after)))
        if isinstance(exc, BodyTimeout):
            response.force_close()  # the rest of the body may still be trickling in
        return response
    except (StoreUnavailable, RedisError, RedisClusterException) as exc:
        # RedisError: the store translates every one; this is the net under a path it missed.
        request.app[METRICS].redis_errors.inc()
        request.app[METRICS].rejected.labels("store_unavailable").inc()
        log.warning("refused %s %s: %s", request.method, request.path, exc)
        return envelope(
            request,
            StoreUnavailable.code,
            "Temporarily unavailable: the event was not acknowledged, please retry "
            "(retrying is safe: a copy that did get stored is merged or dropped)",
            status=StoreUnavailable.http_status,
        )
    except web.HTTPRequestEntityTooLarge:
        request.app[METRICS].rejected.labels("too_large").inc()
        limit = request.app[SETTINGS].max_body_bytes
        return envelope(request, 40002, f"body: larger than {limit} bytes", status=413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = NotFound.code if exc.status == 404 else 40000
        message = f"{exc.reason}: {request.method} {request.path}"
        return envelope(request, code, message, status=exc.status)
    except GatewayError as exc:
        log.error("unexpected gateway error on %s: %s", request.path, exc)
        return envelope(request, 50000, "internal error", status=500)
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return envelope(request, 50000, "internal error", status=500)


def logged_path(request: web.Request) -> str:
    """The path as received, without its query (it may carry ids); shortened if long.

    Raw, so a refused `%2e%2e` shows as sent, and a decoded `%0a` cannot start a log line.
    """
    path = request.raw_path.partition("?")[0]
    return path if len(path) <= 200 else path[:200] + "..."


def _count_rejection(request: web.Request, exc: RequestError) -> None:
    metrics = request.app[METRICS]
    if isinstance(exc, RelayRefused):
        metrics.passthrough_requests.labels(exc.outcome).inc()
    elif exc.reason is not None:
        metrics.rejected.labels(exc.reason).inc()
