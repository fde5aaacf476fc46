"""The Redis memory the gateway's store costs, measured on a private redis-server.

Both measurements start their own redis-server (`--redis-server`, else the
embedded one for `--events`, the rig's choice for `--keys`) on a free loopback
port and do to it what the gateway does to its Redis: copies parsed with the
gateway's own parsers (PII hashed as in production) go through
`gateway.store.Store.ingest` into the shards' logs; then every shard's owner,
the gateway's own `Forwarder` (`Owner`, below: TikTok is a stand-in that
accepts every batch at once), reads the logs, merges each pair, sends it,
remembers its key, writes the /debug history and trims the logs. `used_memory`
(INFO memory) is read around each step; the /debug history, a fixed budget
(GATEWAY_DEBUG_HISTORY entries) rather than a cost per event, is measured
apart by what deleting it frees.

`--events N`, per event, for sizing Redis (docs/deploying.md): N server copies
(Events API 2.0 bodies with email, phone, external id, order value, three
`contents`) and the N browser copies of the same events (page URL with
ttclid, `_ttp` cookie, IP, user agent), about 1 KB of JSON each, all ingested,
then all forwarded; the differences divided by N: bytes while pending (both
copies stored) and remembered for the dedup window (the keys' fingerprints,
the history left out). `--history N` sets the history's entries (0: none).

`--keys N`, per remembered key, for the benchmark (`bench.run`'s memory
phase, default 1,000,000 keys):

1. a redis-server without an append-only file (it would only slow this down;
   `used_memory` is the data either way);
2. the keys' copies (80% a pixel and a server copy, 10% only one or the
   other, ~1 KB each) ingested CHUNK keys at a time, while the owner forwards
   the previous chunk, so pending copies never pile up; the clock is virtual
   (the store's API takes it, the owner is given one);
3. `used_memory` before and after, divided by the keys: bytes per remembered
   key in the default configuration, so with the /debug history, whose share
   per key shrinks as keys grow (its own size is reported apart too);
4. no false drops: of copies of fresh keys, the owner must drop none as a
   duplicate; of copies of remembered keys, every one;
5. FLUSHALL, then the naive layout on the same server: one
   `SET tkgw:seen:<pixel>:<event>:<event_id> 1 PX <48 h>` per key (run by a
   script, 10,000 keys a call: the same keys and values, only faster).

    .venv/bin/python -m bench.memory --events 20000
    .venv/bin/python -m bench.memory --events 20000 --history 0 --redis-server /usr/bin/redis-server
    .venv/bin/python -m bench.memory --keys 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from bench.common import PIXEL, choose_redis_server
from bench.traffic import EVENT_NAMES, Copy, pixel_body, server_item
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
# The owner's lease outlasts the measurement, so it needs no renewing meanwhile; and the
# stand-in TikTok has no rate limit to pace the sends by.
OWNER_LEASE = 3600.0
UNPACED = 1e9

# --events: the copies' pixel (TikTok pixel codes are 20-odd characters), the events per
# ingest call (a busy gateway's batches) and the browser's user agent.
SIZING_PIXEL = "CABCDEFGHIJ0123456789"
BATCH = 500
UA = (
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    "(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)
# --keys:
CHUNK = 10_000  # keys ingested while the previous chunk is forwarded
INGEST_BATCH = 1_000  # events per Store.ingest call
PARALLEL = 3  # Store.ingest calls in flight
PROBES = 10_000  # fresh and remembered keys ingested again after the measurement
NAIVE_BATCH = 10_000  # keys per naive SET script call
NAIVE_TTL_MS = 172_800_000
SETTLE_SECONDS = 10.0  # longest wait for used_memory to stop moving
MERGE_WINDOW = 2.0  # the rig's; the remembered state does not depend on it
FORWARDED = "gateway_events_forwarded_total"
DROPPED = "gateway_events_duplicates_dropped_total"


# -- what both measurements share --------------------------------------------------


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


async def settled_memory(client: aioredis.Redis) -> int:
    """used_memory once it stops moving (an incremental rehash finishing, lazy frees)."""
    last = await used_memory(client)
    deadline = time.monotonic() + SETTLE_SECONDS
    while time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        now = await used_memory(client)
        if abs(now - last) <= last * 0.0005:
            return now
        last = now
    return last


# -- per event, for sizing Redis ---------------------------------------------------


@dataclass(frozen=True)
class EventReport:
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


def server_body(i: int, event_id: str) -> dict[str, Any]:
    return {
        "event_source": "web",
        "event_source_id": SIZING_PIXEL,
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
        "pixel_code": SIZING_PIXEL,
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


async def measure_per_event(
    n: int, *, binary: str | None = None, history: int = DEBUG_HISTORY
) -> EventReport:
    """Start a private Redis, run N pairs through ingest and their shards' owner, and read
    its memory: the figures for sizing Redis (docs/deploying.md)."""
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
            return EventReport(
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


# -- per remembered key, for the benchmark -----------------------------------------


def template_bodies() -> dict[str, dict[str, Any]]:
    """One normalised body per source, parsed by the gateway itself (PII hashed)."""
    now = time.time()
    opts = ParseOptions(now=now, phone_region=None)
    copy = Copy(1, "server", "Purchase", "x", "order-1")
    server = parse_event_track(
        orjson.loads(b'{"event_source_id":"%s","data":[%s]}'
                     % (PIXEL.encode(), server_item(copy, int(now)))), opts
    ).events[0]
    browser = BrowserContext(ip="198.51.100.7", user_agent="Mozilla/5.0 (bench)", ttp="01JBENCH")
    pixel = parse_browser(
        orjson.loads(pixel_body(Copy(1, "pixel", "Purchase", "x", "order-1"), int(now))),
        opts, browser,
    ).events[0]
    return {"server": server.body, "pixel": pixel.body}


class Keys:
    """The keys' event ids and names, and copies of them to ingest."""

    def __init__(self, count: int, seed: int) -> None:
        rng = random.Random(seed)
        names, weights = [n for n, _ in EVENT_NAMES], [w for _, w in EVENT_NAMES]
        self.names = rng.choices(names, weights, k=count)
        self.ids = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]
        # 0: pixel and server copy, 1: pixel only, 2: server only
        self.shapes = rng.choices((0, 1, 2), (80, 10, 10), k=count)
        self.templates = template_bodies()

    def copies(self, indices: Sequence[int]) -> list[Event]:
        events = []
        for i in indices:
            shape = self.shapes[i]
            sources = ("pixel", "server") if shape == 0 else (("pixel",) if shape == 1
                                                               else ("server",))
            for source in sources:
                body = dict(self.templates[source])
                body["event"] = self.names[i]
                body["event_id"] = self.ids[i]
                events.append(Event(PIXEL, source, body))  # type: ignore[arg-type]
        return events

    def naive_key(self, i: int) -> str:
        return f"tkgw:seen:{PIXEL}:{self.names[i]}:{self.ids[i]}"


async def redis_cpu(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def ingest(store: Store, events: list[Event], now: float) -> None:
    """Ingest in batches, PARALLEL at a time, so the client encodes while Redis runs."""
    limit = asyncio.Semaphore(PARALLEL)

    async def one(batch: list[Event]) -> None:
        async with limit:
            await store.ingest(batch, now)

    await asyncio.gather(*(one(events[i : i + INGEST_BATCH])
                           for i in range(0, len(events), INGEST_BATCH)))  # fmt: skip


def measurement_settings() -> Settings:
    """The gateway's defaults but for the rig's merge window (the /debug history on, at
    its default budget), for an owner that needs no lease renewals and no pacing."""
    return owner_settings(dataclasses.replace(Settings(), merge_window=MERGE_WINDOW))


async def through_store(store: Store, keys: Keys, count: int, base: float) -> Owner:
    """The first `count` keys ingested, CHUNK at a time, and forwarded by their shards'
    owner while the next chunk is ingested; returns the owner, done.

    The store's and the owner's clock is virtual: chunk n at `base + n * 10 ms`, the
    owner at the end of the previous chunk's merge window, so that every key of it is
    due (pairs are sent as soon as both copies are in)."""
    at = base
    owner = Owner(store, measurement_settings(), lambda: at)
    await owner.own()
    previous: float | None = None
    for n, start in enumerate(range(0, count, CHUNK)):
        now = base + n * 0.01
        steps = [ingest(store, keys.copies(range(start, min(start + CHUNK, count))), now)]
        if previous is not None:
            at = previous
            steps.append(owner.forward())
        await asyncio.gather(*steps)
        previous = now + MERGE_WINDOW + 0.001
    if previous is not None:
        at = previous
        await owner.forward()
    return owner


async def dropped(owner: Owner, store: Store, events: list[Event], now: float) -> int:
    """How many of these copies the owner drops as duplicates, ingested at `now`."""
    before = owner.counted(DROPPED)
    await ingest(store, events, now)
    await owner.forward()
    return owner.counted(DROPPED) - before


# KEYS: the naive keys; ARGV[1] expiry in ms. One SET with expiry per key, run server-side
# so that Python's per-command cost does not slow the measurement down.
NAIVE_SET = """
for i = 1, #KEYS do redis.call('SET', KEYS[i], '1', 'PX', ARGV[1]) end
return #KEYS
"""


async def naive(client: aioredis.Redis, keys: Keys, count: int) -> None:
    script = client.register_script(NAIVE_SET)
    for start in range(0, count, NAIVE_BATCH):
        names = [keys.naive_key(i) for i in range(start, min(start + NAIVE_BATCH, count))]
        await script(keys=names, args=[NAIVE_TTL_MS])


async def measure_per_key(
    count: int, binary: str | None = None, seed: int = 7
) -> dict[str, Any]:
    """Bytes per remembered key through the store, next to the naive layout, with the
    false-drop checks (the benchmark's memory figures)."""
    started = time.monotonic()
    probes = min(PROBES, count)
    keys = Keys(count + probes, seed)
    with tempfile.TemporaryDirectory(prefix="tkgw-bench-memory-") as tmp:
        server = EmbeddedRedis(Path(tmp), port=0, binary=binary,
                               extra_args=["--appendonly", "no"])
        await server.start()
        client = aioredis.Redis.from_url(server.url)
        try:
            info = await client.info("server")
            mem_info = await client.info("memory")
            store = make_store(client, measurement_settings())
            await store.load_scripts()
            base = time.time()
            before = await settled_memory(client)
            t0, cpu0, redis_cpu0 = time.monotonic(), time.process_time(), await redis_cpu(client)
            owner = await through_store(store, keys, count, base)
            store_seconds = time.monotonic() - t0
            store_client_cpu = time.process_time() - cpu0
            store_redis_cpu = await redis_cpu(client) - redis_cpu0
            forwarded = owner.counted(FORWARDED)
            log_entries = await owner.log_entries()
            # With the owner's leases and heartbeat (a few dozen bytes a shard), held for
            # the probes below.
            after_keys = await client.dbsize()
            after = await settled_memory(client)
            # The history's own size: what deleting it frees.
            history_entries, history_bytes = await drop_history(client, store)
            without_history = await settled_memory(client)
            # No false drops: new keys are new, remembered keys are duplicates.
            now = base + (count // CHUNK + 1) * 0.01
            false_drops = await dropped(
                owner, store, keys.copies(range(count, count + probes))[:probes], now)
            sample = random.Random(seed).sample(range(count), probes)
            missed_duplicates = probes - await dropped(
                owner, store, keys.copies(sample)[:probes], now)
            await owner.let_go()

            await client.flushall()
            naive_before = await settled_memory(client)
            t0 = time.monotonic()
            await naive(client, keys, count)
            naive_seconds = time.monotonic() - t0
            naive_after = await settled_memory(client)
        finally:
            await client.aclose()
            await server.stop()
    return {
        "keys": count,
        "redis_version": info["redis_version"],
        "mem_allocator": mem_info.get("mem_allocator"),
        "forwarded": forwarded,
        "log_entries_left": log_entries,
        "store_bytes_per_key": round((after - before) / count, 1),
        "store_redis_keys_per_key": round(after_keys / count, 3),
        "naive_bytes_per_key": round((naive_after - naive_before) / count, 1),
        "history_entries": history_entries,
        "history_bytes": history_bytes,
        "store_bytes_per_key_beyond_history": round((without_history - before) / count, 1),
        "probes": probes,
        "false_drops": false_drops,
        "missed_duplicates": missed_duplicates,
        "store_seconds": round(store_seconds, 1),
        "store_client_cpu_s": round(store_client_cpu, 1),
        "store_redis_cpu_s": round(store_redis_cpu, 1),
        "naive_seconds": round(naive_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--events", type=int, help="per event: events to run through (sizing)")
    what.add_argument("--keys", type=int, help="per remembered key: keys to run through "
                      "(the benchmark's figures; 1000000 in `make bench`)")  # fmt: skip
    parser.add_argument("--redis-server", help="redis-server binary (default: the embedded "
                        "one for --events, the rig's choice for --keys)")  # fmt: skip
    parser.add_argument("--history", type=int, default=DEBUG_HISTORY,
                        help="--events: /debug history entries kept (GATEWAY_DEBUG_HISTORY; "
                             "0: none)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="--events: the report as JSON")
    args = parser.parse_args()
    if args.keys is not None:
        binary = args.redis_server or choose_redis_server()
        print(orjson.dumps(asyncio.run(measure_per_key(args.keys, binary)),
                           option=orjson.OPT_INDENT_2).decode())  # fmt: skip
        return
    report = asyncio.run(
        measure_per_event(args.events, binary=args.redis_server, history=args.history)
    )
    if args.json:
        print(json.dumps(asdict(report)))
        return
    print_event_report(report)


def print_event_report(report: EventReport) -> None:
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
