"""TikTok's Events API for the bench: answers code 0 and keeps a ledger of what arrived.

Every `data[]` item of an event/track request is counted under its ledger key
(pixel, event name with TikTok's old names mapped to the new, event_id; the
order id for an event without one), with the time its first copy arrived.
The orchestrator hands it the keys a phase's clients had acknowledged and asks
whether each arrived exactly once, and how late against its due time.

    POST /open_api/v1.3/event/track/   record each event; answer code 0
    GET  /stats                        requests, events, keys, repeated arrivals
    POST /expect {"phase", "path"}     load a phase's acked keys (key TAB due TAB class)
    GET  /check?phase=P[&full=1]       missing / repeated keys; with full=1 the slip too
    POST /reset                        forget the ledger (between phases)

    python -m bench.standin --port 8090
"""

from __future__ import annotations

import argparse
import itertools
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from bench.common import TRACK_PATH, ledger_key, summary_ms


class Ledger:
    """What arrived, per key: how often, and when first."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.first: dict[str, float] = {}
        self.requests = 0
        self.events = 0
        self.repeats = 0  # arrivals of a key already seen
        self.expected: dict[str, dict[str, tuple[float, str]]] = {}  # phase -> key -> (due, class)

    def record(self, doc: Any, now: float) -> int:
        pixel = doc.get("event_source_id")
        data = doc.get("data") or []
        self.requests += 1
        for item in data:
            props = item.get("properties") or {}
            key = ledger_key(pixel, item.get("event"), item.get("event_id"), props.get("order_id"))
            count = self.counts.get(key)
            if count is None:
                self.counts[key] = 1
                self.first[key] = now
            else:
                self.counts[key] = count + 1
                self.repeats += 1
        self.events += len(data)
        return len(data)

    def expect(self, phase: str, path: Path) -> int:
        keys: dict[str, tuple[float, str]] = {}
        for line in path.read_text().splitlines():
            key, due, kind = line.split("\t")
            keys[key] = (float(due), kind)
        self.expected[phase] = keys
        return len(keys)

    def check(self, phase: str, full: bool) -> dict[str, Any]:
        expected = self.expected[phase]
        counts = self.counts
        missing = repeated = 0
        for key in expected:
            count = counts.get(key, 0)
            if count == 0:
                missing += 1
            elif count > 1:
                repeated += 1
        result: dict[str, Any] = {
            "acked_keys": len(expected),
            "missing": missing,
            "repeated": repeated,
            "exactly_once": missing == 0 and repeated == 0,
            "ledger_keys": len(counts),
            "unacked_keys_arrived": len(counts) - (len(expected) - missing),
            "events_arrived": self.events,
            "repeat_arrivals": self.repeats,
            "requests": self.requests,
        }
        if full:
            by_kind: dict[str, list[float]] = {}
            for key, (due, kind) in expected.items():
                first = self.first.get(key)
                if first is not None:
                    by_kind.setdefault(kind, []).append(first - due)
            every = list(itertools.chain.from_iterable(by_kind.values()))
            result["slip_ms"] = summary_ms(every)
            result["slip_ms_by_kind"] = {k: summary_ms(v) for k, v in sorted(by_kind.items())}
        return result

    def reset(self) -> None:
        self.counts.clear()
        self.first.clear()
        self.requests = self.events = self.repeats = 0
        self.expected.clear()


LEDGER: web.AppKey[Ledger] = web.AppKey("ledger", Ledger)


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(doc), status=status, content_type="application/json")


async def track(request: web.Request) -> web.Response:
    doc = orjson.loads(await request.read())
    request.app[LEDGER].record(doc, time.time())
    return _json({"code": 0, "message": "OK", "request_id": uuid.uuid4().hex, "data": {}})


async def stats(request: web.Request) -> web.Response:
    ledger = request.app[LEDGER]
    return _json(
        {
            "requests": ledger.requests,
            "events": ledger.events,
            "keys": len(ledger.counts),
            "repeats": ledger.repeats,
        }
    )


async def expect(request: web.Request) -> web.Response:
    doc = await request.json(loads=orjson.loads)
    loaded = request.app[LEDGER].expect(doc["phase"], Path(doc["path"]))
    return _json({"loaded": loaded})


async def check(request: web.Request) -> web.Response:
    phase = request.query["phase"]
    full = request.query.get("full") == "1"
    return _json(request.app[LEDGER].check(phase, full))


async def reset(request: web.Request) -> web.Response:
    request.app[LEDGER].reset()
    return _json({"reset": True})


def create_app() -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[LEDGER] = Ledger()
    app.router.add_post(TRACK_PATH, track)
    app.router.add_get("/stats", stats)
    app.router.add_post("/expect", expect)
    app.router.add_get("/check", check)
    app.router.add_post("/reset", reset)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(create_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
