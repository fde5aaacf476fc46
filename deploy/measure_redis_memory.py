"""Measure the Redis memory one event costs: while pending, and remembered for the dedup window.

Starts a private redis-server (the binary the gateway embeds) on a free
loopback port, then does to it what the gateway does to its Redis:

1. parses N server copies (Events API 2.0 bodies with email, phone,
   external id, order value, three `contents`) and N browser copies (page URL
   with ttclid, `_ttp` cookie, IP, user agent) with the gateway's own parsers,
   so PII is hashed as in production; each copy is about 1 KB of JSON;
2. ingests them through `gateway.store.Store`, as the HTTP handlers do: the
   copies go to their shards' logs;
3. owns every shard with the gateway's own `Forwarder` (`Owner`, below: TikTok
   is a stand-in that accepts every batch), which reads the logs, merges each
   pair, sends it, remembers its key, writes the /debug history and trims the
   logs, as a gateway's shard owner does.

`used_memory` (INFO memory) is read before, after step 2 (everything
pending) and after step 3 (only the dedup memory left: the keys' fingerprints,
the /debug history, whose size is fixed, is deleted before each reading and
reported apart, by what deleting it frees). The differences divided by N are the figures
for sizing Redis in docs/deploying.md:

    .venv/bin/python deploy/measure_redis_memory.py --events 20000
    .venv/bin/python deploy/measure_redis_memory.py --redis-server /usr/bin/redis-server

`--history N` sets the history's entries (GATEWAY_DEBUG_HISTORY; 0: none).
`Owner`, `used_memory` and `drop_history` are bench/memory.py's too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.app import make_store
from gateway.embedded import EmbeddedRedis
from gateway.events import Event
from gateway.formats import BrowserContext, ParseOptions, parse_browser, parse_event_track
from gateway.forwarder import Forwarder
from gateway.metrics import make_metrics
from gateway.settings import Settings, StoreSettings
from gateway.store import Store
from gateway.upstream import Outcome, UpstreamResult

DEBUG_HISTORY = StoreSettings().debug_history  # the gateway's default

PIXEL = "CABCDEFGHIJ0123456789"  # TikTok pixel codes are 20-odd characters
BATCH = 500  # events per ingest call, like a busy gateway's batches
# The owner's lease outlasts the measurement, so it needs no renewing meanwhile; and the
# stand-in TikTok has no rate limit to pace the sends by.
OWNER_LEASE = 3600.0
UNPACED = 1e9
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
    log_entries_left: int  # in the shards' logs after the forward: 0, they are trimmed


class Accepting:
    """A TikTok that accepts every batch at once: the measurement needs the forward's
    bookkeeping in Redis, not the network."""

    async def send_events(
        self,
        *,
        access_token: str,
        event_source: str,
        event_source_id: str,
        data: list[dict[str, Any]],
        test_event_code: str | None,
    ) -> UpstreamResult:
        return UpstreamResult(Outcome.DELIVERED, 0, "OK", uuid.uuid4().hex, 200, None, None,
                              0.0)  # fmt: skip


def owner_settings(settings: Settings) -> Settings:
    """`settings` for a measurement's owner: a lease that needs no renewing, no pacing."""
    return dataclasses.replace(settings, forward_lease=OWNER_LEASE,
                               upstream_rate_limit=UNPACED)  # fmt: skip


class Owner:
    """Every shard's owner, as a gateway runs it (`gateway.forwarder.Forwarder`), sending to
    `Accepting`, on its own clock; what it did is in its counters."""

    def __init__(self, store: Store, settings: Settings, clock: Callable[[], float]) -> None:
        self.registry = CollectorRegistry()
        sender = Accepting()
        self.forwarder = Forwarder(
            store, lambda _pixel: (sender, "token"), settings,
            make_metrics(self.registry, settings.pixels), clock,
        )  # fmt: skip
        self.store = store

    async def own(self) -> None:
        """Take every shard: the only instance, it owns them all."""
        await self.forwarder.balance()
        if len(self.forwarder.windows) != self.store.shards:
            raise RuntimeError(f"owning {len(self.forwarder.windows)} of {self.store.shards} "
                               "shards: is another gateway on this Redis?")  # fmt: skip

    async def forward(self) -> None:
        """Read, merge, send what is due and commit, until there is nothing more to do."""
        while await self.forwarder.forward_once():
            pass

    async def let_go(self) -> None:
        """Give the shards up, and leave: no lease or heartbeat is left behind."""
        await self.store.let_go(list(self.forwarder.windows), self.forwarder.token)
        await self.store.leave(self.forwarder.token)

    def counted(self, name: str) -> int:
        """A counter of the owner's (e.g. gateway_events_forwarded_total), over its labels."""
        return int(sum(s.value for metric in self.registry.collect()
                       for s in metric.samples if s.name == name))  # fmt: skip

    async def log_entries(self) -> int:
        """Entries in the shards' logs: copies not yet resolved."""
        keys = [self.store.log_key(shard) for shard in range(self.store.shards)]
        return sum([await self.store.client.xlen(key) for key in keys])


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


async def drop_history(client: aioredis.Redis, store: Store) -> tuple[int, int]:
    """Delete the shards' /debug history lists: (entries, bytes) they held, by what deleting
    frees. The history is a fixed budget, not a cost per event: the figures leave it out."""
    lists = [store.history_key(shard) for shard in range(store.shards)]
    entries = sum([await client.llen(key) for key in lists])
    held = await used_memory(client)
    await client.delete(*lists)
    return entries, held - await used_memory(client)


async def measure(n: int, *, binary: str | None = None, history: int = DEBUG_HISTORY) -> Report:
    """Start a private Redis, run N pairs through ingest and their shards' owner, and read
    its memory."""
    servers, browsers = make_events(n)
    copy_bytes = len(json.dumps(servers[0].body)) + len(json.dumps(browsers[0].body))
    with tempfile.TemporaryDirectory(prefix="tkgw-measure-") as tmp:
        redis_server = EmbeddedRedis(Path(tmp), port=0, binary=binary)
        await redis_server.start()
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            # Production defaults: 16 shards, 300 s merge window, 48 h dedup window.
            settings = owner_settings(dataclasses.replace(Settings(), debug_history=history))
            store = make_store(client, settings)
            await store.load_scripts()
            version = str((await client.info("server"))["redis_version"])
            before = await used_memory(client)
            for copies in (servers, browsers):
                for start in range(0, n, BATCH):
                    await store.ingest(copies[start:start + BATCH], time.time())
            entries, history_bytes = await drop_history(client, store)
            pending = await used_memory(client)
            # Each pair is complete: sent at once, not at the end of the merge window.
            owner = Owner(store, settings, time.time)
            await owner.own()
            await owner.forward()
            await owner.let_go()
            forwarded = owner.counted("gateway_events_forwarded_total")
            if forwarded != n:
                raise RuntimeError(f"forwarded {forwarded} of {n} events")
            more_entries, more_bytes = await drop_history(client, store)
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
                log_entries_left=await owner.log_entries(),
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
          f"{report.keys_per_remembered_event:g} keys each; "
          f"{report.log_entries_left:,} log entries left")
    if report.history_entries:
        print(f"/debug history (a fixed budget, not per event; left out above): "
              f"{report.history_entries:,} entries, {report.history_bytes:,} bytes, "
              f"{report.history_bytes / report.history_entries:,.0f} bytes an entry")


if __name__ == "__main__":
    main()
