"""Real parts for every test: a redis-server process, a TikTok stand-in over HTTP, real gateways.

Everything binds to 127.0.0.1. Windows are a second or less, so tests wait on
conditions (the stand-in's `wait_for_events`), never on guesses.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.app import create_app
from gateway.embedded import EmbeddedRedis
from tests.cluster import BreakableCluster
from tests.support import Gateway, GatewayFactory, base_settings, free_port
from tests.tiktok_stub import TikTokStub


@pytest_asyncio.fixture(scope="session")
async def redis_server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EmbeddedRedis]:
    """One real redis-server for the session, on a free loopback port."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), port=0)
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture
async def redis_url(redis_server: EmbeddedRedis) -> AsyncIterator[str]:
    """The session's Redis, emptied for this test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield redis_server.url
    await client.aclose()


@pytest_asyncio.fixture(scope="session")
async def redis_cluster() -> AsyncIterator[BreakableCluster]:
    """A three-primary Redis Cluster for the session, started by the first test needing it."""
    cluster = BreakableCluster()
    await cluster.start()
    yield cluster
    await cluster.stop()


@pytest_asyncio.fixture
async def cluster_url(redis_cluster: BreakableCluster) -> str:
    """The session's cluster (the URL of one node), every primary emptied for this test."""
    await redis_cluster.flushall()
    return redis_cluster.url


@pytest_asyncio.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def data_dir() -> Iterator[Path]:
    """A data directory for a gateway process; short, so the embedded Redis's unix
    socket path fits in sun_path."""
    path = Path(tempfile.mkdtemp(prefix="gw"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def tiktok() -> AsyncIterator[TikTokStub]:
    async with TikTokStub() as stub:
        yield stub


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest_asyncio.fixture
async def make_gateway(
    redis_url: str, tiktok: TikTokStub, tmp_path: Path
) -> AsyncIterator[GatewayFactory]:
    """Start gateways on this test's Redis and stand-in; all are stopped after the test."""
    started: list[Gateway] = []

    async def start(*, forward: bool = True, **overrides: Any) -> Gateway:
        url = overrides.pop("redis_url", redis_url)
        settings = base_settings(url, tiktok.url, tmp_path / "data", **overrides)
        registry = CollectorRegistry()
        app = create_app(settings, registry=registry, forward=forward)
        runner = web.AppRunner(app, shutdown_timeout=2.0)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        gateway = Gateway(f"http://127.0.0.1:{port}", app, settings, registry, runner)
        started.append(gateway)
        return gateway

    yield start
    await asyncio.gather(*(g.runner.cleanup() for g in started))


@pytest_asyncio.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()
