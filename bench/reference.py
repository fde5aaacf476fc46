"""R0: what Redis charges for the simplest durable write, on the rig's Redis in the same run.

`SET r0:<n> <1 KB>` for `count` fresh keys, sent 100 at a time down one
connection (each batch one write, its 100 answers read before the next), as
pre-encoded RESP so the client costs little. Redis's own CPU (INFO cpu:
used_cpu_user + used_cpu_sys, the process's getrusage, all its threads) over
the run, less the background the gateway's idle polls cost in an idle second
just before, divided by the SETs: Redis CPU µs per SET. The rig's Redis writes
its append-only file as for the gateway's commands, so the two are comparable.
The keys are deleted afterwards.

    python -m bench.reference REDIS_URL      # prints the figure as JSON
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any
from urllib.parse import urlparse

import orjson
import redis.asyncio as aioredis

PIPELINE = 100  # SETs per write
VALUE = b"v" * 1024
IDLE_SECONDS = 1.0


async def redis_cpu(client: aioredis.Redis) -> float:
    """Redis's CPU seconds so far (user + system), as Redis itself reports them."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _batch(start: int) -> bytes:
    value = b"$%d\r\n%s\r\n" % (len(VALUE), VALUE)
    parts = []
    for n in range(start, start + PIPELINE):
        key = b"r0:%d" % n
        parts.append(b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n%s" % (len(key), key, value))
    return b"".join(parts)


async def measure(redis_url: str, count: int) -> dict[str, Any]:
    """Redis CPU µs per pipelined SET of a 1 KB value (see the module's doc)."""
    url = urlparse(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    try:
        idle0, t0 = await redis_cpu(client), time.monotonic()
        await asyncio.sleep(IDLE_SECONDS)
        idle_rate = (await redis_cpu(client) - idle0) / (time.monotonic() - t0)
        batches = [_batch(start) for start in range(0, count, PIPELINE)]
        expected = len(b"+OK\r\n") * PIPELINE
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            cpu0, t0 = await redis_cpu(client), time.monotonic()
            for batch in batches:
                writer.write(batch)
                answers = await reader.readexactly(expected)
                if answers.count(b"+OK\r\n") != PIPELINE:
                    raise RuntimeError(f"SET answered {answers[:80]!r}")
            seconds = time.monotonic() - t0
            cpu = await redis_cpu(client) - cpu0
        finally:
            writer.close()
            await writer.wait_closed()
        sets = len(batches) * PIPELINE
        for start in range(0, sets, 10_000):
            await client.unlink(*(f"r0:{n}" for n in range(start, min(start + 10_000, sets))))
    finally:
        await client.aclose()
    net = max(0.0, cpu - idle_rate * seconds)
    return {
        "sets": sets,
        "pipeline": PIPELINE,
        "value_bytes": len(VALUE),
        "seconds": round(seconds, 3),
        "redis_cpu_s": round(cpu, 4),
        "background_cpu_s": round(cpu - net, 4),
        "redis_cpu_usec_per_set": round(net * 1e6 / sets, 3),
    }


if __name__ == "__main__":
    result = asyncio.run(measure(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 200_000))
    sys.stdout.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
