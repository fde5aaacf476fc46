"""The application's resources, one typed `web.AppKey` each.

`create_app` sets SETTINGS, METRICS and SCRAPE; every other key is published by
the cleanup context that creates its resource (app.py), so a key is there
exactly while its resource is usable. The keys live here, not in app.py, so
that the handler modules app.py wires can read them without importing it.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp import web

from .embedded import EmbeddedRedis
from .forwarder import Forwarder
from .metrics import Metrics
from .settings import Settings
from .store import Store

SETTINGS: web.AppKey[Settings] = web.AppKey("settings", Settings)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
# What GET /metrics answers: this process's metrics, or all workers' (`serve --workers N`).
SCRAPE: web.AppKey[Callable[[], bytes]] = web.AppKey("scrape")
# The local Redis, published only when the gateway runs one (no GATEWAY_REDIS_URL).
EMBEDDED: web.AppKey[EmbeddedRedis] = web.AppKey("embedded", EmbeddedRedis)
# The one way to Redis: the store, over the client its cleanup context owns.
STORE: web.AppKey[Store] = web.AppKey("store", Store)
# The one HTTP client session for TikTok (forwarding and the pass-through).
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)
FORWARDER: web.AppKey[Forwarder] = web.AppKey("forwarder", Forwarder)
