"""What one event's validation and hashing cost, in-process: a floor under the gateway's CPU.

B0 checks a few fields; the gateway validates every field, normalises and
hashes the PII (an email, a phone number parsed by `phonenumbers`, an external
id) and fills the browser's fields. Timed here on the bench's own traffic, in
this process, with no HTTP and no Redis, so the figure says how many events a
core could validate at best, whatever the rest of the gateway costs.

    python -m bench.floor      # prints the figures as JSON
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.traffic import BATCH, Copy, pixel_body, server_item
from gateway import formats, pii

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


if __name__ == "__main__":
    sys.stdout.write(orjson.dumps(measure(), option=orjson.OPT_INDENT_2).decode() + "\n")
