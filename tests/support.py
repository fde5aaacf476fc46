"""What the tests share besides fixtures: the pixels they send for, free ports, the
reference hash, waiting on a condition, and a gateway served on a real port.

tests/conftest.py builds its fixtures from these; test modules import them from here
(never from conftest).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.appkeys import STORE
from gateway.settings import Settings

PIXEL = "CPIXEL0000000000001"
PIXEL2 = "CPIXEL0000000000002"
TOKEN = "token-one-0123456789"
TOKEN2 = "token-two-0123456789"


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sha256(text: str) -> str:
    """The reference hash (hex SHA-256 of UTF-8), computed apart from the gateway's own."""
    return hashlib.sha256(text.encode()).hexdigest()


async def poll_until(
    check: Callable[[], Awaitable[bool]],
    what: str | Callable[[], str],
    seconds: float = 10.0,
    every: float = 0.05,
) -> None:
    """Await `check()` every `every` seconds until it is true; after `seconds`, fail naming
    `what` (or what `what()` says then: the last state seen)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await check():
        if loop.time() >= deadline:
            said = what if isinstance(what, str) else what()
            raise AssertionError(f"waited {seconds}s for {said}")
        await asyncio.sleep(every)


@dataclass
class Gateway:
    """A gateway app served on a real loopback port."""

    url: str
    app: web.Application
    settings: Settings
    registry: CollectorRegistry
    runner: web.AppRunner

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    @property
    def store(self) -> Any:
        return self.app[STORE]


GatewayFactory = Callable[..., Awaitable[Gateway]]


def base_settings(redis_url: str, upstream_url: str, data_dir: Path, **overrides: Any) -> Settings:
    """Test defaults: two pixels, one-second windows, fast polling and retries."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "upstream_url": upstream_url,
        "data_dir": data_dir,
        "pixels": {PIXEL: TOKEN, PIXEL2: TOKEN2},
        "merge_window": 1.0,
        "dedup_window": 30.0,
        "forward_poll_interval": 0.05,
        "retry_base": 0.05,
        "retry_cap": 0.5,
        "upstream_timeout": 2.0,
        "upstream_rate_limit": 1000.0,
        "shards": 4,
    }
    values.update(overrides)
    return dataclasses.replace(Settings(), **values)
