"""What one event's validation and hashing cost, in-process: a floor under the gateway's CPU.

B0 checks a few fields; the gateway validates every field, normalises and
hashes the PII (an email, a phone number parsed by `phonenumbers`, an external
id) and fills the browser's fields. Timed here on the bench's own traffic, in
this process, with no HTTP and no Redis, so the figure says how many events a
core could validate at best, whatever the rest of the gateway costs.

It also times one round trip to Redis over loopback, as the gateway's Redis
client makes it (a pipeline of one script call) and as a bare blocking socket
makes it (PING): what this machine charges the caller, in CPU and in wall time,
for every request and answer, whatever the code around them.

    python -m bench.floor [REDIS_URL]     # prints the figures as JSON
"""

from __future__ import annotations

import asyncio
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.traffic import BATCH, Copy, pixel_body, server_item
from gateway import formats, pii
from gateway.store import connect

ROUNDS = 5  # the best of several rounds: the least disturbed by other work on the machine


def _best_seconds(work: Callable[[], object], repeat: int) -> float:
    """The shortest time of `repeat` calls of `work`, over ROUNDS rounds, per call."""
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(repeat):
            work()
        best = min(best, (time.perf_counter() - started) / repeat)
    return best


def measure(repeat: int = 20) -> dict[str, Any]:
    """µs per event: decoding and validating a beacon, a 100-event batch, and the phone
    number of a server event alone."""
    now = int(time.time())
    options = formats.ParseOptions(now=float(now), phone_region=None, max_events=1000)
    browser = formats.BrowserContext(
        ip="198.51.100.7", user_agent="Mozilla/5.0", ttp="01JBENCHTTP", ttclid_cookie=None
    )
    beacon = pixel_body(Copy(7, "pixel", "Purchase", "floor-7", "order-7"), now)
    copies = [Copy(n, "server", "Purchase", f"floor-{n}", f"order-{n}") for n in range(BATCH)]
    batch = b'{"event_source":"web","event_source_id":"%s","data":[%s]}' % (
        b"CFLOOR", b",".join(server_item(c, now) for c in copies)
    )
    phones = [orjson.loads(server_item(c, now))["user"]["phone"] for c in copies]

    def beacons() -> None:
        for _ in range(BATCH):
            formats.parse_browser(formats.decode_json(beacon), options, browser)

    def batches() -> None:
        formats.parse_event_track(formats.decode_json(batch), options)

    def phone_numbers() -> None:
        for phone in phones:
            pii.normalise_phone(phone, None)

    per_event = {
        "beacon_parse_us": _best_seconds(beacons, repeat) / BATCH,
        "server_parse_us": _best_seconds(batches, repeat) / BATCH,
        "server_phone_us": _best_seconds(phone_numbers, repeat) / BATCH,
    }
    return {name: round(seconds * 1e6, 1) for name, seconds in per_event.items()}


async def round_trip(redis_url: str, repeat: int = 2000) -> dict[str, float]:
    """µs of this process's CPU and of wall time per Redis round trip over loopback: through
    the gateway's client (a pipeline of one EVALSHA, as the store sends them) and through a
    blocking socket (PING, the least any client can pay). The best of ROUNDS rounds each."""
    client = connect(redis_url)
    try:
        sha = await client.script_load("return 1")
        client_cpu = client_wall = float("inf")
        for _ in range(ROUNDS):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(repeat):
                pipe = client.pipeline(transaction=False)
                pipe.execute_command("EVALSHA", sha, 1, "tkgw:floor", "a")
                await pipe.execute(raise_on_error=False)
            client_cpu = min(client_cpu, (time.process_time() - cpu) / repeat)
            client_wall = min(client_wall, (time.perf_counter() - wall) / repeat)
        kwargs = client.connection_pool.connection_kwargs
    finally:
        await client.aclose()
    socket_cpu = socket_wall = float("inf")
    with socket.create_connection((kwargs["host"], kwargs["port"])) as conn:
        for _ in range(ROUNDS):
            cpu, wall = time.process_time(), time.perf_counter()
            for _ in range(repeat):
                conn.sendall(b"PING\r\n")
                conn.recv(64)  # "+PONG\r\n" comes in one segment
            socket_cpu = min(socket_cpu, (time.process_time() - cpu) / repeat)
            socket_wall = min(socket_wall, (time.perf_counter() - wall) / repeat)
    return {
        "redis_round_trip_cpu_us": round(client_cpu * 1e6, 1),
        "redis_round_trip_wall_us": round(client_wall * 1e6, 1),
        "socket_round_trip_cpu_us": round(socket_cpu * 1e6, 1),
        "socket_round_trip_wall_us": round(socket_wall * 1e6, 1),
    }


if __name__ == "__main__":
    figures = measure()
    if len(sys.argv) > 1:
        figures |= asyncio.run(round_trip(sys.argv[1]))
    sys.stdout.write(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode() + "\n")
