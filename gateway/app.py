"""`create_app(settings)`: the wiring. Routes, middlewares, and each resource in the
cleanup context that creates it and publishes it under its key (appkeys.py).

Start-up order (torn down in reverse): Redis (embedded when no URL is
given) -> the store and its scripts -> the HTTP client for TikTok (or the
sandbox file) -> the forwarder and the background loops.

Where a request goes: ingest.py (TikTok's paths), browser.py (/pixel/events),
ops.py (health, readiness, metrics, OpenAPI, /debug), passthrough.py (other
/open_api/ paths), console/ (the diagnostics pages at /console/); answers.py turns
every error into TikTok's envelope (the console's own into pages).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from . import browser, demo, ops, passthrough, pixeljs
from .answers import error_middleware
from .appkeys import EMBEDDED, FORWARDER, METRICS, SCRAPE, SESSION, SETTINGS, STORE
from .console import web as console
from .embedded import EmbeddedRedis
from .errors import LayoutMismatch, StoreUnavailable
from .forwarder import Forwarder
from .housekeeping import refresh_gauges, sweep_remembered
from .ingest import INGEST, INGEST_PATHS, IngestContext
from .metrics import exposition, make_metrics
from .settings import Settings, StoreSettings
from .store import RedisClient, Store, connect
from .upstream import EventSender, SandboxSink, TikTokClient

log = logging.getLogger("gateway.app")

WORKER_HEADER = "X-Gateway-Worker"
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


def make_store(client: RedisClient, settings: StoreSettings) -> Store:
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
        # CORS outermost, so error answers carry its headers too and the page can read them;
        # the console's innermost: its errors are pages, not TikTok's envelope.
        middlewares=[browser.cors_middleware, error_middleware, console.console_middleware],
        client_max_size=settings.max_body_bytes,
        handler_args=HTTP_LIMITS,
    )
    metrics = make_metrics(registry or CollectorRegistry(), settings.pixels)
    app[SETTINGS] = settings
    app[METRICS] = metrics
    scrape: Callable[[], bytes] = functools.partial(exposition, metrics, multiprocess_dir)
    app[SCRAPE] = scrape
    if multiprocess_dir is not None:
        app.on_response_prepare.append(_name_worker)
    app.cleanup_ctx.append(_redis_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.cleanup_ctx.append(_make_forwarder_ctx(clock, forward))
    _add_routes(app, settings)
    return app


def _add_routes(app: web.Application, settings: Settings) -> None:
    r = app.router
    for path, handler in INGEST_PATHS.items():
        r.add_post(path, handler)
    r.add_post("/pixel/events", browser.browser_events)
    r.add_route("OPTIONS", "/pixel/events", browser.browser_preflight)
    pixeljs.add_routes(app)  # GET /pixel.js
    if settings.demo_enabled:  # /demo/: sandbox mode, or GATEWAY_DEMO=1
        demo.add_routes(app, settings, sandbox_log_path(settings) if settings.sandbox else None)
    r.add_get("/metrics", ops.metrics_handler)
    r.add_get("/healthz", ops.healthz)
    r.add_get("/readyz", ops.readyz)
    r.add_get("/debug/events/{pixel}/{event_id}/{event}", ops.debug_event)
    r.add_get("/openapi.json", ops.openapi_handler)
    console.add_routes(app, settings)  # /console/: see console/web.py
    # Any tail, even one a decoded %0a ends (`.` alone stops there): the check answers it.
    r.add_route("*", "/open_api/{tail:(?s:.*)}", passthrough.handler)


async def _name_worker(_request: web.Request, response: web.StreamResponse) -> None:
    response.headers[WORKER_HEADER] = str(os.getpid())


# -- resources: each cleanup context publishes what it creates ---------------------


async def _redis_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    embedded: EmbeddedRedis | None = None
    if settings.redis_url is None:
        embedded = app[EMBEDDED] = EmbeddedRedis(settings.data_dir)
        redis_url = await embedded.start()
    else:
        redis_url = settings.redis_url
    client = connect(redis_url, cluster=settings.redis_cluster, timeout=settings.redis_timeout)
    store = app[STORE] = make_store(client, settings)
    try:
        await store.load_scripts()
        await store.check_layout()
    except StoreUnavailable as exc:
        # Start anyway: /readyz says 503 until Redis answers, and nothing is acknowledged.
        log.warning("Redis not reachable at start-up (%s); will keep trying", exc)
    except LayoutMismatch:
        await _close_redis(client, embedded)
        raise
    try:
        yield
    finally:
        await _close_redis(client, embedded)


async def _close_redis(client: RedisClient, embedded: EmbeddedRedis | None) -> None:
    await client.aclose()
    if embedded is not None:
        await embedded.stop()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    session = app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=100, limit_per_host=50),
        timeout=aiohttp.ClientTimeout(total=settings.upstream_timeout * 3),
        auto_decompress=False,
    )
    try:
        yield
    finally:
        await session.close()


def _make_forwarder_ctx(
    clock: Callable[[], float], forward: bool
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def forwarder_ctx(app: web.Application) -> AsyncIterator[None]:
        settings, store, metrics = app[SETTINGS], app[STORE], app[METRICS]
        sandbox_log = sandbox_log_path(settings) if settings.sandbox else None
        senders = _senders(settings, app[SESSION], sandbox_log)
        forwarder = app[FORWARDER] = Forwarder(store, senders, settings, metrics, clock=clock)
        app[INGEST] = IngestContext(wake=forwarder.wake, clock=clock)
        background = [
            asyncio.create_task(refresh_gauges(store, metrics, clock), name="gauges"),
            asyncio.create_task(sweep_remembered(store, clock), name="sweeper"),
        ]
        forwarding = [asyncio.create_task(forwarder.run(), name="forwarder")] if forward else []
        try:
            yield
        finally:
            forwarder.stop()
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
