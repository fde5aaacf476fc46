"""Measure the Redis memory one event costs: while pending, and remembered for the dedup window.

Starts a private redis-server (the binary the gateway embeds) on a free
loopback port, then does to it what the gateway does to its Redis:

1. parses N server copies (Events API 2.0 bodies with email, phone,
   external id, order value, three `contents`) and N browser copies (page URL
   with ttclid, `_ttp` cookie, IP, user agent) with the gateway's own parsers,
   so PII is hashed as in production; each copy is about 1 KB of JSON;
2. ingests them through `gateway.store.Store` with history entries, as the
   HTTP handlers do: each pair completes its key;
3. claims and acknowledges every key, as a successful forward does.

`used_memory` (INFO memory) is read before, after step 2 (everything
pending) and after step 3 (only the dedup memory left: the keys' fingerprints,
the /debug history, whose size is fixed, is deleted before each reading and
reported apart, by what deleting it frees). The differences divided by N are the figures
for sizing Redis in docs/deploying.md:

    .venv/bin/python deploy/measure_redis_memory.py --events 20000
    .venv/bin/python deploy/measure_redis_memory.py --redis-server /usr/bin/redis-server

`--history N` sets the history's entries (GATEWAY_DEBUG_HISTORY; 0: none).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from gateway.embedded import EmbeddedRedis
from gateway.events import Event
from gateway.formats import BrowserContext, ParseOptions, parse_browser, parse_event_track
from gateway.forwarder import _timeline as forward_timeline  # the forwarder's own entry
from gateway.ingest import _timeline as ingest_timeline  # the handlers' own entry
from gateway.settings import StoreSettings
from gateway.store import Store

DEBUG_HISTORY = StoreSettings().debug_history  # the gateway's default

PIXEL = "CABCDEFGHIJ0123456789"  # TikTok pixel codes are 20-odd characters
BATCH = 500  # events per ingest call and per claim, like a busy gateway's batches
UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)


@dataclass(frozen=True)
class Report:
    events: int
    redis_version: str
    copy_bytes: int  # JSON size of one server copy plus one browser copy, as stored
    pending_bytes_per_event: float  # both copies stored, waiting to be forwarded
    # After the forward, until the dedup window ends; not counting the history streams.
    remembered_bytes_per_event: float
    keys_per_remembered_event: float
    history_entries: int  # written to the /debug history, over all shards
    history_bytes: int  # what deleting them freed (once full, the history's fixed budget)


def server_body(i: int, event_id: str) -> dict[str, Any]:
    return {
        "event_source": "web",
        "event_source_id": PIXEL,
        "data": [{
            "event": "Purchase",
            "event_id": event_id,
            "event_time": int(time.time()) - 5,
            "user": {
                "email": f"customer.{i}@example-shop.com",
                "phone": f"+1415555{i % 10000:04d}",
                "external_id": f"customer-{i:09d}",
            },
            "properties": {
                "currency": "USD",
                "content_type": "product",
                "order_id": f"order-{i:09d}",
                "contents": [
                    {"content_id": f"SKU-{i % 997:05d}-{n}", "content_name": "Merino wool "
                     f"crew-neck sweater, size M, colour {n}", "price": 49.5 + n,
                     "quantity": 1 + n % 2}
                    for n in range(3)
                ],
            },
        }],
    }


def browser_body(i: int, event_id: str) -> dict[str, Any]:
    return {
        "pixel_code": PIXEL,
        "event": "Purchase",
        "event_id": event_id,
        "page": {
            "url": f"https://www.example-shop.com/checkout/thank-you?order=order-{i:09d}"
                   f"&utm_source=tiktok&utm_medium=paid&ttclid=E.C.P.{uuid.uuid4().hex}"
                   f"{uuid.uuid4().hex}",
            "referrer": "https://www.example-shop.com/checkout/payment",
        },
        "properties": {"currency": "USD", "value": 151.5},
    }


def make_events(n: int) -> tuple[list[Event], list[Event]]:
    """N server copies and the N browser copies of the same events, parsed as the gateway does."""
    opts = ParseOptions(now=time.time(), phone_region="US")
    servers, browsers = [], []
    for i in range(n):
        event_id = str(uuid.uuid4())
        servers += parse_event_track(server_body(i, event_id), opts).events
        ctx = BrowserContext(
            ip=f"2a02:c7c:{i % 65536:x}:1200:d1c5:3c6b:58e1:{i % 9999:x}",
            user_agent=UA,
            ttp=f"01J{uuid.uuid4().hex[:23].upper()}",
        )
        browsers += parse_browser(browser_body(i, event_id), opts, ctx).events
    return servers, browsers


async def used_memory(client: aioredis.Redis) -> int:
    info = await client.info("memory")
    return int(info["used_memory"])


async def drop_history(client: aioredis.Redis, streams: list[str]) -> tuple[int, int]:
    """Delete the /debug history streams: (entries, bytes) they held, by what deleting frees.
    The history is a fixed budget, not a cost per event: the figures leave it out."""
    entries = sum([await client.xlen(key) for key in streams])
    held = await used_memory(client)
    await client.delete(*streams)
    return entries, held - await used_memory(client)


async def measure(n: int, *, binary: str | None = None, history: int = DEBUG_HISTORY) -> Report:
    """Start a private Redis, run N pairs through ingest, claim and ack, and read its memory."""
    servers, browsers = make_events(n)
    copy_bytes = len(json.dumps(servers[0].body)) + len(json.dumps(browsers[0].body))
    with tempfile.TemporaryDirectory(prefix="tkgw-measure-") as tmp:
        redis_server = EmbeddedRedis(Path(tmp), port=0, binary=binary)
        await redis_server.start()
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            # Production defaults: 16 shards, 300 s merge window, 48 h dedup window.
            store = Store(client, history=history)
            await store.load_scripts()
            version = str((await client.info("server"))["redis_version"])
            before = await used_memory(client)
            for copies in (servers, browsers):
                for start in range(0, n, BATCH):
                    batch = copies[start:start + BATCH]
                    now = time.time()
                    await store.ingest(batch, now, [ingest_timeline(e, now) for e in batch])
            streams = [store.history_key(shard) for shard in range(store.shards)]
            entries, history_bytes = await drop_history(client, streams)
            pending = await used_memory(client)
            forwarded = 0
            while claims := await store.claim(time.time() + 1, BATCH, 60.0):
                entry = forward_timeline("forwarded", time.time(), request_id=uuid.uuid4().hex,
                                         code=0, batch_size=len(claims))
                forwarded += await store.ack(claims, time.time(), uuid.uuid4().hex, entry)
            if forwarded != n:
                raise RuntimeError(f"forwarded {forwarded} of {n} events")
            more_entries, more_bytes = await drop_history(client, streams)
            remembered = await used_memory(client)
            return Report(
                events=n,
                redis_version=version,
                copy_bytes=copy_bytes,
                pending_bytes_per_event=round((pending - before) / n, 1),
                remembered_bytes_per_event=round((remembered - before) / n, 1),
                keys_per_remembered_event=await client.dbsize() / n,
                history_entries=entries + more_entries,
                history_bytes=history_bytes + more_bytes,
            )
        finally:
            await client.aclose()
            await redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events to run through")
    parser.add_argument("--redis-server", help="redis-server binary (default: the embedded one)")
    parser.add_argument("--history", type=int, default=DEBUG_HISTORY,
                        help="/debug history entries kept (GATEWAY_DEBUG_HISTORY; 0: none)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = asyncio.run(
        measure(args.events, binary=args.redis_server, history=args.history)
    )
    if args.json:
        print(json.dumps(asdict(report)))
        return
    print(f"redis-server {report.redis_version}, {report.events} events "
          f"(server + browser copy, {report.copy_bytes} bytes of JSON together)")
    print(f"pending (both copies, before the forward): "
          f"{report.pending_bytes_per_event:,.0f} bytes per event")
    print(f"remembered (after the forward, for the dedup window): "
          f"{report.remembered_bytes_per_event:,.0f} bytes per event, "
          f"{report.keys_per_remembered_event:g} keys each")
    if report.history_entries:
        print(f"/debug history (a fixed budget, not per event; left out above): "
              f"{report.history_entries:,} entries, {report.history_bytes:,} bytes, "
              f"{report.history_bytes / report.history_entries:,.0f} bytes an entry")


if __name__ == "__main__":
    main()
