"""Redis bytes per remembered key, next to a naive layout, on one Redis in one run.

1. A private redis-server (the rig's binary, no append-only file: it would
   only slow this down; `used_memory` is the data either way).
2. `--keys` keys (default 1,000,000) go through the gateway's own store, as
   the gateway drives it: `Store.ingest` of their copies (80% a pixel and a
   server copy, 10% only one or the other, ~1 KB each) into the shards' logs,
   then the shards' owner, the gateway's own `Forwarder` (deploy/
   measure_redis_memory.py's `Owner`: TikTok accepts every batch at once),
   reads the logs, merges, sends, remembers each key, writes the /debug
   history and trims the logs: what is left is what the store remembers for
   the dedup window. The clock is virtual (the store's API takes it, the
   owner is given one); chunks of keys overlap (one is ingested while the
   owner forwards the last), so pending copies never pile up.
3. `used_memory` before and after, divided by the keys: bytes per remembered key,
   in the default configuration, so with the /debug history: a fixed budget
   (GATEWAY_DEBUG_HISTORY entries), whose share per key shrinks as keys grow.
   Its own size (what deleting the history lists frees) is reported apart too.
4. No false drops: of copies of fresh keys, the owner must drop none as a
   duplicate; of copies of remembered keys, every one.
5. FLUSHALL, then the naive layout on the same server: one
   `SET tkgw:seen:<pixel>:<event>:<event_id> 1 PX <48 h>` per key (run by a
   script, 10,000 keys a call: the same keys and values, only faster).

    python -m bench.memory --keys 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench.common import PIXEL, choose_redis_server
from bench.traffic import EVENT_NAMES, Copy, pixel_body, server_item
from deploy.measure_redis_memory import Owner, drop_history, owner_settings, used_memory
from gateway.app import make_store
from gateway.embedded import EmbeddedRedis
from gateway.events import Event
from gateway.formats import BrowserContext, ParseOptions, parse_browser, parse_event_track
from gateway.settings import Settings
from gateway.store import Store

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


async def measure(count: int, binary: str | None = None, seed: int = 7) -> dict[str, Any]:
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
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--redis-server", help="redis-server binary (default: the rig's choice)")
    args = parser.parse_args()
    binary = args.redis_server or choose_redis_server()
    print(orjson.dumps(asyncio.run(measure(args.keys, binary)), option=orjson.OPT_INDENT_2)
          .decode())


if __name__ == "__main__":
    main()
