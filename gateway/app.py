"""`create_app(settings)`: routes, the error middleware, and resources in cleanup contexts.

Start-up order (torn down in reverse): Redis (embedded when no URL is
given) -> the store and its scripts -> the HTTP client for TikTok (or the
sandbox file) -> the forwarder and the gauge refresher.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from redis.exceptions import RedisClusterException, RedisError

from . import demo, ingest, passthrough, pixeljs
from .embedded import EmbeddedRedis
from .errors import (
    BodyTimeout,
    GatewayError,
    LayoutMismatch,
    NotFound,
    RateLimited,
    RelayRefused,
    RequestError,
    StoreUnavailable,
)
from .forwarder import Forwarder
from .ingest import CONTEXT, REQUEST_ID, IngestContext, envelope
from .logs import request_context
from .metrics import Metrics, exposition, make_metrics
from .settings import Settings
from .store import RedisClient, Store, connect
from .upstream import EventSender, SandboxSink, TikTokClient

log = logging.getLogger("gateway.app")

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
# What GET /metrics answers: this process's metrics, or all workers' (`serve --workers N`).
SCRAPE: web.AppKey[Callable[[], bytes]] = web.AppKey("scrape")
WORKER_HEADER = "X-Gateway-Worker"
SWEEP_SECONDS = 300.0
GAUGE_REFRESH_SECONDS = 5.0
# Request line and header limits, for every connection (aiohttp's parser answers 400
# beyond them, before any handler runs): a line or one header up to 8 KiB, as nginx's
# default buffers; at most 64 header lines. A request's head is bounded to ~512 KiB.
MAX_REQUEST_LINE_BYTES = 8190
MAX_HEADER_FIELD_BYTES = 8190
MAX_HEADERS = 64
HTTP_LIMITS = {
    "max_line_size": MAX_REQUEST_LINE_BYTES,
    "max_field_size": MAX_HEADER_FIELD_BYTES,
    "max_headers": MAX_HEADERS,
}


@dataclass(slots=True)
class Resources:
    """What the cleanup contexts build; filled in as each one starts."""

    redis_url: str = ""
    embedded: EmbeddedRedis | None = None
    redis: RedisClient | None = None
    store: Store | None = None
    session: aiohttp.ClientSession | None = None
    forwarder: Forwarder | None = None
    sandbox_log: Path | None = None


RESOURCES: web.AppKey[Resources] = web.AppKey("resources", Resources)


def make_store(client: RedisClient, settings: Settings) -> Store:
    """The store as configured; every instance and admin command must agree on it."""
    return Store(
        client,
        shards=settings.shards,
        merge_window=settings.merge_window,
        dedup_window=settings.dedup_window,
        early_flush=settings.early_flush,
        legacy_aliases=settings.legacy_aliases,
        history=settings.debug_history,
        dedup_buckets=settings.dedup_buckets,
        wait_replicas=settings.redis_wait_replicas,
        wait_timeout=settings.redis_wait_timeout,
        lease=settings.forward_lease,
    )


def sandbox_log_path(settings: Settings) -> Path:
    return settings.data_dir / "sandbox-forwarded.jsonl"


def create_app(
    settings: Settings,
    *,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
    forward: bool = True,
    multiprocess_dir: Path | None = None,
) -> web.Application:
    """The whole gateway as an aiohttp application; `forward=False` leaves the loop off.

    `multiprocess_dir` makes this app one worker of `serve --workers N`: /metrics
    answers for all workers (their values are in that directory), and every answer
    names the worker's pid in an X-Gateway-Worker header.
    """
    app = web.Application(
        # CORS outermost, so error answers carry its headers too and the page can read them.
        middlewares=[ingest.cors_middleware, error_middleware],
        client_max_size=settings.max_body_bytes,
        handler_args=HTTP_LIMITS,
    )
    metrics = make_metrics(registry or CollectorRegistry(), settings.pixels)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    scrape: Callable[[], bytes] = functools.partial(exposition, metrics, multiprocess_dir)
    app[SCRAPE] = scrape
    app[RESOURCES] = Resources()
    if multiprocess_dir is not None:
        app.on_response_prepare.append(_name_worker)
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_make_forwarder_ctx(clock, forward))
    _add_routes(app, settings)
    return app


INGEST_PATHS = {
    "/open_api/v1.3/event/track/": ingest.event_track,
    "/open_api/v1.2/pixel/track/": ingest.pixel_track,
    "/open_api/v1.3/pixel/track/": ingest.pixel_track,
    "/open_api/v1.2/pixel/batch/": ingest.pixel_batch,
    "/open_api/v1.3/pixel/batch/": ingest.pixel_batch,
}


def _add_routes(app: web.Application, settings: Settings) -> None:
    r = app.router
    for path, handler in INGEST_PATHS.items():
        r.add_post(path, handler)
    r.add_post("/pixel/events", ingest.browser_events)
    r.add_route("OPTIONS", "/pixel/events", ingest.browser_preflight)
    pixeljs.add_routes(app)  # GET /pixel.js
    if settings.demo_enabled:  # /demo/: sandbox mode, or GATEWAY_DEMO=1
        demo.add_routes(app, settings, sandbox_log_path(settings) if settings.sandbox else None)
    r.add_get("/metrics", metrics_handler)
    r.add_get("/healthz", healthz)
    r.add_get("/readyz", readyz)
    r.add_get("/debug/events/{pixel}/{event_id}/{event}", ingest.debug_event)
    r.add_get("/openapi.json", openapi_handler)
    # Any tail, even one a decoded %0a ends (`.` alone stops there): the check answers it.
    r.add_route("*", "/open_api/{tail:(?s:.*)}", passthrough_handler)


# -- resources -----------------------------------------------------------------


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, res = app[SETTINGS], app[RESOURCES]
    embedded: EmbeddedRedis | None = None
    if settings.redis_url is None:
        embedded = res.embedded = EmbeddedRedis(settings.data_dir)
        res.redis_url = await embedded.start()
    else:
        res.redis_url = settings.redis_url
    res.redis = connect(
        res.redis_url, cluster=settings.redis_cluster, timeout=settings.redis_timeout
    )
    res.store = make_store(res.redis, settings)
    try:
        await res.store.load_scripts()
        await res.store.check_layout()
    except StoreUnavailable as exc:
        # Start anyway: /readyz says 503 until Redis answers, and nothing is acknowledged.
        log.warning("Redis not reachable at start-up (%s); will keep trying", exc)
    except LayoutMismatch:
        await _close_redis(res.redis, embedded)
        raise
    try:
        yield
    finally:
        await _close_redis(res.redis, embedded)


async def _close_redis(client: RedisClient, embedded: EmbeddedRedis | None) -> None:
    await client.aclose()
    if embedded is not None:
        await embedded.stop()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings, res = app[SETTINGS], app[RESOURCES]
    res.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=50),
        timeout=aiohttp.ClientTimeout(total=settings.upstream_timeout * 3),
        auto_decompress=False,
    )
    if settings.sandbox:
        res.sandbox_log = sandbox_log_path(settings)
    try:
        yield
    finally:
        await res.session.close()


def _make_forwarder_ctx(
    clock: Callable[[], float], forward: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
        settings, res, metrics = app[SETTINGS], app[RESOURCES], app[METRICS]
        assert res.store is not None and res.session is not None
        senders = _senders(settings, res.session, res.sandbox_log)
        res.forwarder = Forwarder(res.store, senders, settings, metrics, clock=clock)
        app[CONTEXT] = IngestContext(settings, res.store, metrics, res.forwarder, clock)
        background = [
            asyncio.create_task(_refresh_gauges(res.store, metrics, clock), name="gauges"),
            asyncio.create_task(_sweep_remembered(res.store, clock), name="sweeper"),
        ]
        forwarding = [asyncio.create_task(res.forwarder.run(), name="forwarder")] if forward else []
        try:
            yield
        finally:
            res.forwarder.stop()
            # Let an in-flight batch finish and record its outcome; past the grace
            # period it is cancelled, and hands its claims back to the queue.
            unfinished: set[asyncio.Task[None]] = set()
            if forwarding:
                grace = settings.shutdown_timeout * 0.4
                _done, unfinished = await asyncio.wait(forwarding, timeout=grace)
            for task in [*background, *unfinished]:
                task.cancel()
            for task in [*background, *forwarding]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    return forwarder_ctx


def _senders(
    settings: Settings, session: aiohttp.ClientSession, sandbox_log: Path | None
) -> Callable[[str], tuple[EventSender, str] | None]:
    if sandbox_log is not None:
        sink = SandboxSink(sandbox_log)
        return lambda _pixel: (sink, "")
    client = TikTokClient(session, settings.upstream_url, timeout=settings.upstream_timeout)

    def sender_for(pixel_code: str) -> tuple[EventSender, str] | None:
        token = settings.pixels.get(pixel_code)
        return None if token is None else (client, token)

    return sender_for


async def _sweep_remembered(store: Store, clock: Callable[[], float]) -> None:
    """Remove forgotten fingerprints now and then; lookups already ignore them, this
    frees their memory. Every instance sweeps: the work is small and idempotent."""
    chunk = 256
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            for shard in range(store.shards):
                for start in range(0, store.dedup_buckets, chunk):
                    stop = min(start + chunk, store.dedup_buckets)
                    await store.sweep(clock(), shard, range(start, stop))
        except StoreUnavailable:
            pass  # the gauges count Redis errors; the next round sweeps again
        except Exception:
            log.exception("sweeping remembered keys failed")


async def _refresh_gauges(store: Store, metrics: Metrics, clock: Callable[[], float]) -> None:
    """Gauges that need Redis, read in the background so a scrape never waits on Redis."""
    while True:
        try:
            backlog = await store.backlog(clock())
        except StoreUnavailable:
            metrics.redis_errors.inc()
            metrics.redis_up.set(0)
        except Exception:
            log.exception("could not refresh the backlog gauges")
            metrics.redis_up.set(0)
        else:
            metrics.pending.set(backlog.pending)
            metrics.dead_letters.set(backlog.dead_letters)
            metrics.forward_lag.set(backlog.lag)
            metrics.redis_up.set(1)
        await asyncio.sleep(GAUGE_REFRESH_SECONDS)


# -- handlers ------------------------------------------------------------------


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
            "refused %s %s: %s", request.method, _logged_path(request), exc.message,
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
        request.app[METRICS].rejected.labels(StoreUnavailable.reason).inc()
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


def _logged_path(request: web.Request) -> str:
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


async def _name_worker(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers[WORKER_HEADER] = str(os.getpid())


async def metrics_handler(request: web.Request) -> web.Response:
    body = request.app[SCRAPE]()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


@functools.cache
def openapi_document() -> bytes:
    """The OpenAPI document shipped with the package (gateway/static/openapi.json)."""
    return (importlib.resources.files("gateway") / "static" / "openapi.json").read_bytes()


async def openapi_handler(request: web.Request) -> web.Response:
    """GET /openapi.json — the API contract: every path, its bodies, answers and errors."""
    return web.Response(body=openapi_document(), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"}, dumps=lambda o: orjson.dumps(o).decode())


async def readyz(request: web.Request) -> web.Response:
    """Ready when Redis answers and our scripts are loaded (reloading them if flushed)."""
    store = request.app[RESOURCES].store
    try:
        assert store is not None
        await store.load_scripts()
        await store.check_layout()  # once; Redis may have been away at start-up
    except StoreUnavailable as exc:
        return web.json_response(
            {"status": "unavailable", "redis": str(exc)}, status=503,
            dumps=lambda o: orjson.dumps(o).decode(),
        )
    except LayoutMismatch as exc:
        log.error("not ready: %s", exc)
        return web.json_response(
            {"status": "misconfigured", "redis": str(exc)}, status=503,
            dumps=lambda o: orjson.dumps(o).decode(),
        )
    return web.json_response({"status": "ready"}, dumps=lambda o: orjson.dumps(o).decode())


async def passthrough_handler(request: web.Request) -> web.StreamResponse:
    """Other /open_api/ paths go to TikTok, for our callers and allowed paths only: a
    client's whole base URL can point here (passthrough.check_passthrough says what passes)."""
    settings, res = request.app[SETTINGS], request.app[RESOURCES]
    if request.path in INGEST_PATHS:
        raise web.HTTPMethodNotAllowed(request.method, ["POST"])
    if not settings.passthrough or res.session is None:
        raise NotFound(f"{request.path} is not served here (GATEWAY_PASSTHROUGH=0)")
    # The raw target: aiohttp's request.path is already decoded (%2e%2e is ..).
    target = passthrough.check_passthrough(
        request.raw_path, request.headers.getall("Access-Token", []), settings
    )
    return await passthrough.proxy(
        request, res.session, settings.upstream_url, target,
        outcomes=request.app[METRICS].passthrough_requests,
    )
