"""Bodies and requests the end-to-end tests send, as real clients would."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis

from tests.support import PIXEL, TOKEN, Gateway, poll_until


def is_rate_counter(key: bytes) -> bool:
    """A browser rate-limit counter (`tkgw:{N}:rl:<client>`): it counts refused requests too."""
    return re.match(rb"tkgw:\{\d+\}:rl:", key) is not None


# Bookkeeping that exists whatever was received: the shard leases, their owners' notes,
# the instances' heartbeats and the recorded layout.
BOOKKEEPING = re.compile(rb"tkgw:(\{\d+\}:(owner|meta)|instances|layout)$")


async def event_keys(redis_client: aioredis.Redis) -> list[bytes]:
    """The gateway's keys about events: not the rate limit's counters (they count refused
    requests too), nor the shards' bookkeeping (see BOOKKEEPING)."""
    keys = await redis_client.keys("tkgw:*")
    return [k for k in keys if not is_rate_counter(k) and not BOOKKEEPING.match(k)]


def server_event(
    event_id: str | None,
    event: str = "Purchase",
    *,
    email: str | None = "jane.doe@example.com",
    event_time: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One `data[]` item as an advertiser's server sends it: PII in the clear, value known."""
    item: dict[str, Any] = {
        "event": event,
        "event_time": event_time or int(time.time()),
        "user": {"email": email, "external_id": "customer-8841"} if email else {},
        "properties": {"currency": "USD", "value": 59.98, "order_id": "100234"},
        "page": {"url": "https://shop.example.com/checkout/thank-you"},
        **extra,
    }
    if event_id is not None:
        item["event_id"] = event_id
    return item


def browser_event(
    event_id: str | None, event: str = "Purchase", *, pixel: str = PIXEL, **extra: Any
) -> dict[str, Any]:
    item: dict[str, Any] = {
        "pixel_code": pixel,
        "event": event,
        "timestamp": int(time.time()),
        "page": {"url": "https://shop.example.com/checkout/thank-you?ttclid=E.C.P.click-1"},
        "properties": {"currency": "USD"},
        **extra,
    }
    if event_id is not None:
        item["event_id"] = event_id
    return item


async def post_server(
    http: aiohttp.ClientSession,
    base: str,
    data: list[dict[str, Any]],
    *,
    pixel: str = PIXEL,
    token: str = TOKEN,
    **top: Any,
) -> dict[str, Any]:
    body = {"event_source": "web", "event_source_id": pixel, "data": data, **top}
    async with http.post(
        f"{base}/open_api/v1.3/event/track/", json=body, headers={"Access-Token": token}
    ) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer


async def post_browser(
    http: aiohttp.ClientSession,
    base: str,
    body: Any,
    *,
    ttp: str = "ttp-cookie-value-0000000001",
    user_agent: str = "Mozilla/5.0 (X11; Linux x86_64) TestBrowser/1.0",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    all_headers = {"User-Agent": user_agent, "Cookie": f"_ttp={ttp}", **(headers or {})}
    async with http.post(f"{base}/pixel/events", json=body, headers=all_headers) as resp:
        answer: dict[str, Any] = await resp.json()
        answer["_status"] = resp.status
        return answer


async def wait_for(predicate: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Until `predicate()` holds (a metric counted, a line logged); fails after `within`."""

    async def holds() -> bool:
        return predicate()

    await poll_until(holds, what, within, every=0.02)


async def wait_counts(gateway: Gateway, pending: int, dead_letters: int = 0) -> None:
    """Until the store counts this many pending events and dead letters: the shards' owners
    count what they have read, a moment after the copies were acknowledged."""
    counts = None

    async def counted() -> bool:
        nonlocal counts
        counts = await gateway.store.counts()
        return counts == (pending, dead_letters)

    await poll_until(counted, lambda: f"counts {(pending, dead_letters)}, have {counts}",
                     every=0.025)  # fmt: skip


async def wait_timeline(
    gateway: Gateway, event_id: str, outcomes: list[str], event: str = "Purchase"
) -> None:
    """Until a key's timeline (of PIXEL) holds these outcomes: the shard's owner records
    a copy once it has read it, shortly after the client's answer."""
    found = None

    async def recorded() -> bool:
        nonlocal found
        found = await gateway.store.inspect(PIXEL, event_id, event)
        return found is not None and [e["outcome"] for e in found["timeline"]] == outcomes

    await poll_until(recorded, lambda: f"{event_id}'s timeline to be {outcomes}: {found}",
                     every=0.025)  # fmt: skip


async def wait_drained(gateway: Gateway, dead_letters: int = 0) -> None:
    """Until nothing is pending in Redis: every key was forwarded (or dead-lettered, at
    least `dead_letters` of them)."""
    counts = None

    async def drained() -> bool:
        nonlocal counts
        counts = pending, dead = await gateway.store.counts()
        return pending == 0 and dead >= dead_letters

    await poll_until(drained, lambda: f"nothing pending, {dead_letters}+ dead letters: {counts}",
                     every=0.025)  # fmt: skip


# -- a raw HTTP/1.1 client: what an attacker controls, aiohttp's client does not let us ---------


@dataclass
class RawAnswer:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes

    def envelope(self) -> dict[str, Any]:
        answer: dict[str, Any] = orjson.loads(self.body)
        assert set(answer) == {"code", "message", "request_id", "data"}, answer
        return answer


def address(gateway: Gateway) -> tuple[str, int]:
    host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def head(path: str, headers: dict[str, str], method: str = "POST") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway.test", *(f"{k}: {v}" for k, v in
             headers.items())]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_answer(reader: asyncio.StreamReader) -> RawAnswer:
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawAnswer(int(status_line.split()[1]), headers, body)


@contextlib.asynccontextmanager
async def connection(
    gateway: Gateway, local: str | None = None
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = address(gateway)
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(local, 0) if local else None
    )
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
