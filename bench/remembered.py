"""Redis bytes per remembered key as a user gets them: default settings, events sent over HTTP.

1. A redis-server of its own (the rig's binary, no append-only file: it
   would only slow this down; `used_memory` is the data either way) and a
   gateway on it (`tiktok-gateway serve --workers 2`, so that a million keys
   fit in the bench's time on two cores) with the rig's settings: the
   defaults but for `GATEWAY_MERGE_WINDOW` (the rig's 2 s instead of 300 s, so
   that events forward promptly) and what the rig needs to reach it (pixel,
   origin, trusted proxy, upstream = the stand-in, pass-through off, log
   level). Timelines and their retention are the defaults.
2. The keys' copies go to the gateway over HTTP, as the mixed traffic sends
   them (80% a pixel and a server copy of one `event_id`, 10% only one, 10%
   only the other; every copy with an `event_id`, no resends): server copies in
   Events API batches of 100, pixel copies as beacons of `PIXEL_LIST` events
   each (a JSON list, the browser endpoint takes them: one beacon per event
   would take the gateway minutes), on `CONNECTIONS` connections at once.
3. Once the stand-in has every acknowledged key exactly once, and the shards'
   owners have trimmed their logs (`tkgw:{N}:log`) to empty (the commit after
   a send resolves the keys; bounded wait, what is left is reported),
   `used_memory` (settled) minus what it was before, divided by the keys: bytes
   per remembered key, just after the forward. The keys are sent in steps
   (`counts`), each measured when forwarded, on top of the last. Beside it,
   the same less the `/debug` history lists (`MEMORY USAGE` of each shard's
   `tkgw:{N}:hist`): that history has a fixed budget (`GATEWAY_DEBUG_HISTORY`
   entries), so it is a constant, not a cost per key.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from typing import Any

import redis.asyncio as aioredis

from bench.common import free_port, python_module, wait_http
from bench.load import Connection, answer_code, connect
from bench.memory import settled_memory
from bench.rig import Rig, Target, stop_tree, wait_listening
from bench.traffic import BATCH, Actions, Copy, pixel_list_request, server_request
from gateway.embedded import EmbeddedRedis
from gateway.settings import Settings
from gateway.store.keys import Keys

CHUNK = 100  # keys whose copies are sent together
PIXEL_LIST = 50  # pixel copies per beacon: within the default 64 KB and 100 events
CONNECTIONS = 8
WORKERS = 2  # gateway processes
NAME = "gateway-remembered"
TRIM_WAIT = 30.0  # longest wait for the owners to trim their logs after the forward
# The gateway's key layout at its default settings, which the rig's gateway runs with.
DEFAULTS = Settings()
LAYOUT = Keys(shards=DEFAULTS.shards, dedup_buckets=DEFAULTS.dedup_buckets,
              legacy_aliases=DEFAULTS.legacy_aliases, history=DEFAULTS.debug_history)  # fmt: skip


async def history_bytes(client: aioredis.Redis) -> int:
    """Bytes the shards' /debug history lists take (exact: every entry sampled)."""
    pipe = client.pipeline(transaction=False)
    for shard in range(LAYOUT.shards):
        pipe.memory_usage(LAYOUT.history_key(shard), samples=0)
    return sum(int(size or 0) for size in await pipe.execute())


async def log_entries(client: aioredis.Redis) -> int:
    """Copies left in the shards' logs, not yet resolved by their owners."""
    pipe = client.pipeline(transaction=False)
    for shard in range(LAYOUT.shards):
        pipe.xlen(LAYOUT.log_key(shard))
    return sum(int(n) for n in await pipe.execute())


async def trimmed(client: aioredis.Redis) -> int:
    """Wait (TRIM_WAIT at most) until the owners have trimmed every log; entries left."""
    deadline = time.monotonic() + TRIM_WAIT
    while True:
        left = await log_entries(client)
        if not left or time.monotonic() >= deadline:
            return left
        await asyncio.sleep(0.1)


def requests(actions: Actions, count: int) -> Iterator[tuple[str, list[Copy]]]:
    """("pixel" | "server", copies) of `count` new keys, CHUNK keys at a time."""
    for start in range(0, count, CHUNK):
        pixel: list[Copy] = []
        server: list[Copy] = []
        for _ in range(min(CHUNK, count - start)):
            n, name, event_id, order_id = actions.new(no_id_rate=0.0)
            roll = actions.rng.random()
            if roll < 0.9:  # a pair, or a pixel copy alone
                pixel.append(actions.copy(n, name, event_id, order_id, "pixel"))
            if roll < 0.8 or roll >= 0.9:  # a pair, or a server copy alone
                server.append(actions.copy(n, name, event_id, order_id, "server"))
        for at in range(0, len(pixel), PIXEL_LIST):
            yield "pixel", pixel[at : at + PIXEL_LIST]
        for at in range(0, len(server), BATCH):
            yield "server", server[at : at + BATCH]


async def send(port: int, work: Iterator[tuple[str, list[Copy]]]) -> dict[str, Any]:
    """Every request of `work`, CONNECTIONS at a time; the acknowledged keys, and failures."""
    host = f"127.0.0.1:{port}".encode()
    acked: dict[str, float] = {}
    failed: dict[str, int] = {}
    copies_sent = 0

    async def worker(conn: Connection) -> None:
        nonlocal copies_sent
        for kind, copies in work:  # one iterator shared by the workers
            now = int(time.time())
            data = (pixel_list_request(copies, now, host) if kind == "pixel"
                    else server_request(copies, now, host))  # fmt: skip
            sent = time.time()
            status, body = await conn.request(data)
            code, refused = answer_code(status, body)
            copies_sent += len(copies)
            if code != 0 or refused:
                error = f"http {status} code {code}"
                failed[error] = failed.get(error, 0) + 1
                continue
            for copy in copies:
                acked.setdefault(copy.key, sent)

    conns = [await connect("127.0.0.1", port) for _ in range(CONNECTIONS)]
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        for conn in conns:
            conn.close()
    return {"acked": acked, "failed": failed, "copies": copies_sent}


async def measure(rig: Rig, counts: list[int], seed: int = 11) -> dict[str, Any]:
    """Bytes per remembered key at each of `counts` keys (ascending), through the HTTP path."""
    started = time.monotonic()
    server = EmbeddedRedis(rig.workdir / "redis-remembered", port=0, binary=rig.redis_binary,
                           extra_args=["--appendonly", "no"])  # fmt: skip
    url = await server.start()
    client = aioredis.Redis.from_url(url)
    port = free_port()
    argv = python_module("gateway", "serve", "--workers", str(WORKERS))
    proc = rig.spawn(NAME, argv, rig.gateway_env(NAME, port, url))
    out: dict[str, Any] = {"steps": [], "connections": CONNECTIONS, "pixel_list": PIXEL_LIST,
                           "workers": WORKERS,
                           "server_batch": BATCH, "merge_window": rig.plan.merge_window}
    try:
        await wait_listening(proc, port, WORKERS)
        await wait_http(f"http://127.0.0.1:{port}/readyz", proc)
        target = Target(NAME, port, proc.pid, rig.plan.merge_window, uses_redis=False)
        info, mem_info = await client.info("server"), await client.info("memory")
        out |= {"redis_version": info["redis_version"],
                "mem_allocator": mem_info.get("mem_allocator")}
        before = await settled_memory(client)
        actions = Actions(f"{rig.run_id}-remembered", random.Random(seed))
        keys = 0
        for count in counts:
            t0 = time.monotonic()
            sent = await send(port, requests(actions, count - keys))
            keys = count
            send_seconds = time.monotonic() - t0
            acked_path = rig.workdir / f"{NAME}-{count}.acked"
            window = rig.plan.merge_window
            acked_path.write_text("".join(f"{key}\t{at + window:.6f}\tremembered\n"
                                          for key, at in sent["acked"].items()))
            delivery = await rig.deliver(f"{NAME}-{count}", acked_path, target)
            left = await trimmed(client)
            after = await settled_memory(client)
            history = await history_bytes(client)
            out["steps"].append({
                "keys": count,
                "acked_keys": len(sent["acked"]),
                "failed_requests": sent["failed"],
                "bytes_per_key": round((after - before) / count, 1),
                "history_bytes": history,
                "bytes_per_key_beyond_history": round((after - before - history) / count, 1),
                "redis_keys_per_key": round(await client.dbsize() / count, 3),
                "log_entries_left": left,
                "send_seconds": round(send_seconds, 1),
                "copies": sent["copies"],
                "copies_per_s": round(sent["copies"] / send_seconds),
                "delivery": {k: delivery[k] for k in ("acked_keys", "missing", "repeated",
                                                      "exactly_once", "waited_s")},
                "seconds": round(time.monotonic() - t0, 1),
            })  # fmt: skip
            print(f"  {count:,} keys: {out['steps'][-1]['bytes_per_key']} bytes per key, "
                  f"{out['steps'][-1]['seconds']:.0f} s", flush=True)
    finally:
        await asyncio.to_thread(stop_tree, proc)
        rig.procs.pop(NAME, None)
        await client.aclose()
        await server.stop()
        await rig.clear()
    out["seconds"] = round(time.monotonic() - started, 1)
    return out
