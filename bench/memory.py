"""Redis bytes per remembered key, next to a naive layout, on one Redis in one run.

1. A private redis-server (the rig's binary, no append-only file: it would
   only slow this down; `used_memory` is the data either way).
2. `--keys` keys (default 1,000,000) go through the gateway's own store, as
   the gateway drives it: `Store.ingest` of their copies (80% a pixel and a
   server copy, 10% only one or the other, ~1 KB each, with the handlers'
   history entries), then, past the merge window, `Store.claim` and
   `Store.ack` with the forwarder's entry: what is left is what the store
   remembers for the dedup window. The store's clock is the argument its API
   takes; chunks of keys overlap (one is ingested while the last is
   forwarded), so pending copies never pile up. Two client processes share
   the work (`WORKERS`): the store's Python side costs as much CPU as Redis.
3. `used_memory` before and after, divided by the keys: bytes per remembered key,
   in the default configuration, so with the /debug history: a fixed budget
   (GATEWAY_DEBUG_HISTORY entries), whose share per key shrinks as keys grow.
   Its own size (what deleting the history streams frees) is reported apart too.
4. No false drops: fresh keys must be taken as new, remembered ones dropped
   as duplicates.
5. FLUSHALL, then the naive layout on the same server: one
   `SET tkgw:seen:<pixel>:<event>:<event_id> 1 PX <48 h>` per key (run by a
   script, 10,000 keys a call: the same keys and values, only faster).

    python -m bench.memory --keys 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import multiprocessing
import queue
import random
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

from bench.common import PIXEL
from bench.traffic import EVENT_NAMES, Copy, pixel_body, server_item
from gateway.app import make_store as gateway_store
from gateway.embedded import EmbeddedRedis
from gateway.events import Event
from gateway.formats import BrowserContext, ParseOptions, parse_browser, parse_event_track
from gateway.settings import Settings
from gateway.store import Store

CHUNK = 10_000  # keys ingested while the previous chunk is forwarded
INGEST_BATCH = 1_000  # events per Store.ingest call
PARALLEL = 3  # Store.ingest calls in flight
CLAIM_LIMIT = 1_000
PROBES = 10_000  # fresh and remembered keys ingested again after the measurement
WORKERS = 2  # client processes driving the store: on 2 cores, with Redis, CPU-bound
WORKER_TIMEOUT = 900.0  # longest wait for a worker, or for each other
NAIVE_BATCH = 10_000  # keys per naive SET script call
NAIVE_TTL_MS = 172_800_000
SETTLE_SECONDS = 10.0  # longest wait for used_memory to stop moving
MERGE_WINDOW = 2.0  # the rig's; the remembered state does not depend on it

# The handlers' and the forwarder's own history entries, while the gateway has them.
ingest_entry: Callable[[Event, float], bytes] | None
forward_entry: Callable[..., bytes] | None
try:
    from gateway.forwarder import _timeline as forward_entry
    from gateway.ingest import _timeline as ingest_entry
except ImportError:  # pragma: no cover - the gateway may drop its history
    forward_entry = ingest_entry = None


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


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


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


async def ingest(store: Store, events: list[Event], now: float) -> list[str]:
    """Ingest in batches, PARALLEL at a time, so the client encodes while Redis runs."""
    # Every copy of a source has the same fields, so the same history entry at one `now`.
    entries = {e.source: ingest_entry(e, now) for e in events} if ingest_entry else {}
    limit = asyncio.Semaphore(PARALLEL)

    async def one(batch: list[Event]) -> list[str]:
        timeline = [entries[e.source] for e in batch] if entries else None
        async with limit:
            return [r.status for r in await store.ingest(batch, now, timeline)]

    batches = [events[i : i + INGEST_BATCH] for i in range(0, len(events), INGEST_BATCH)]
    return [s for part in await asyncio.gather(*(one(b) for b in batches)) for s in part]


async def forward(store: Store, now: float) -> int:
    """Claim and acknowledge everything due at `now`, as a successful forward does."""
    done = 0
    while claims := await store.claim(now, CLAIM_LIMIT, 60.0):
        entry = (forward_entry("forwarded", now, request_id=uuid.uuid4().hex, code=0,
                               batch_size=len(claims)) if forward_entry else b"")
        done += await store.ack(claims, now, uuid.uuid4().hex, entry)
    return done


def make_store(client: aioredis.Redis) -> Store:
    """A store configured as the gateway configures it by default, but for the rig's
    merge window; the /debug history is on, at its default budget."""
    settings = dataclasses.replace(Settings(), merge_window=MERGE_WINDOW)
    return gateway_store(client, settings)


def _share(start: int, stop: int, index: int) -> range:
    """Worker `index`'s part of the keys [start, stop)."""
    size = -(-(stop - start) // WORKERS)
    return range(start + index * size, min(stop, start + (index + 1) * size))


async def _work(
    url: str, count: int, total: int, seed: int, index: int, base: float, barrier: Any
) -> int:
    """Ingest this worker's share of each chunk while the last chunk is forwarded.

    The workers wait for each other after every chunk (`barrier`), so keys are
    only claimed once every copy of theirs is in: both read the same virtual
    clock, chunk n at `base + n * 10 ms`. `total` keys are made (the probes' too),
    so that every process has the same ones."""
    keys = Keys(total, seed)
    client = aioredis.Redis.from_url(url)
    store = make_store(client)
    forwarded = 0
    previous: float | None = None
    try:
        for n, start in enumerate(range(0, count, CHUNK)):
            now = base + n * 0.01
            steps: list[Any] = [ingest(store, keys.copies(_share(start, min(start + CHUNK, count),
                                                                 index)), now)]
            if previous is not None:
                steps.append(forward(store, previous))
            done = await asyncio.gather(*steps)
            forwarded += done[1] if len(done) > 1 else 0
            await asyncio.to_thread(barrier.wait, WORKER_TIMEOUT)
            previous = now + MERGE_WINDOW + 0.001
        if previous is not None:
            forwarded += await forward(store, previous)
    finally:
        await client.aclose()
    return forwarded


def _worker(url: str, count: int, total: int, seed: int, index: int, base: float, barrier: Any,
            results: Any) -> None:
    """A client process (spawned): its result, or its error, goes on `results`."""
    try:
        forwarded = asyncio.run(_work(url, count, total, seed, index, base, barrier))
        results.put({"forwarded": forwarded, "cpu_s": time.process_time()})
    except BaseException as exc:
        barrier.abort()  # the others must not wait for this one
        results.put({"error": repr(exc)})
        raise


async def through_store(
    url: str, count: int, total: int, seed: int, base: float
) -> dict[str, float]:
    """The first `count` of `total` keys in, forwarded and acknowledged, by WORKERS processes."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, daemon=True,
                    args=(url, count, total, seed, i, base, barrier, results))
        for i in range(WORKERS)
    ]
    for worker in workers:
        worker.start()
    done: list[dict[str, Any]] = []
    deadline = time.monotonic() + WORKER_TIMEOUT
    try:
        while len(done) < len(workers) and time.monotonic() < deadline:
            try:
                done.append(await asyncio.to_thread(results.get, True, 0.5))
            except queue.Empty:
                if not any(w.is_alive() for w in workers) and results.empty():
                    break  # died without a word (killed, or failed to start)
    finally:
        for worker in workers:
            worker.join(5)
            if worker.is_alive():
                worker.kill()
    errors = [d["error"] for d in done if "error" in d]
    if errors or len(done) < len(workers):
        raise RuntimeError(f"memory worker failed: {errors[0] if errors else 'no result'}")
    return {"forwarded": sum(d["forwarded"] for d in done),
            "client_cpu_s": sum(d["cpu_s"] for d in done)}


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
            store = make_store(client)
            await store.load_scripts()
            base = time.time()
            before = await settled_memory(client)
            t0, redis_cpu0 = time.monotonic(), await redis_cpu(client)
            done = await through_store(server.url, count, count + probes, seed, base)
            store_seconds = time.monotonic() - t0
            store_redis_cpu = await redis_cpu(client) - redis_cpu0
            after = await settled_memory(client)
            dbsize = await client.dbsize()
            # The history's own size: what deleting it frees.
            streams = [store.history_key(shard) for shard in range(store.shards)]
            history_entries = sum([await client.xlen(key) for key in streams])
            await client.delete(*streams)
            without_history = await settled_memory(client)
            # No false drops: new keys are new, remembered keys are duplicates.
            now = base + (count // CHUNK + 1) * 0.01
            fresh = await ingest(store, keys.copies(range(count, count + probes))[:probes], now)
            sample = random.Random(seed).sample(range(count), probes)
            again = await ingest(store, keys.copies(sample)[:probes], now)
            false_drops = sum(1 for s in fresh if s == "duplicate")
            missed_duplicates = sum(1 for s in again if s != "duplicate")

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
        "forwarded": done["forwarded"],
        "store_bytes_per_key": round((after - before) / count, 1),
        "store_redis_keys_per_key": round(dbsize / count, 3),
        "naive_bytes_per_key": round((naive_after - naive_before) / count, 1),
        "history_entries": history_entries,
        "history_bytes": after - without_history,
        "store_bytes_per_key_beyond_history": round((without_history - before) / count, 1),
        "probes": probes,
        "false_drops": false_drops,
        "missed_duplicates": missed_duplicates,
        "store_seconds": round(store_seconds, 1),
        "store_client_cpu_s": round(done["client_cpu_s"], 1),
        "store_redis_cpu_s": round(store_redis_cpu, 1),
        "naive_seconds": round(naive_seconds, 1),
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--redis-server", help="redis-server binary (default: the rig's choice)")
    args = parser.parse_args()
    from bench.run import choose_redis_server

    binary = args.redis_server or choose_redis_server()
    print(orjson.dumps(asyncio.run(measure(args.keys, binary)), option=orjson.OPT_INDENT_2)
          .decode())


if __name__ == "__main__":
    main()
