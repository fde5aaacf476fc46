"""A stand-in for TikTok's Events API, to try the gateway without credentials.

It answers `POST /open_api/v1.3/event/track/` (where the gateway forwards) in
TikTok's envelope with code 0, and logs one line per request: the pixel, how
many events, their names and ids, and which match keys they carried (names
only, never values). `--code` makes it answer another TikTok code instead
(40100 to watch the gateway back off, 40105 for a dead-lettered token error).
GET /healthz answers 200, for the compose file's health check.

    python deploy/tiktok_standin.py --port 9000

Nothing here is imported by the gateway or its tests; it needs only aiohttp.
"""

from __future__ import annotations

import argparse
import logging
import uuid
from typing import Any

from aiohttp import web

log = logging.getLogger("tiktok-standin")

TRACK_PATH = "/open_api/v1.3/event/track/"
CODE: web.AppKey[int] = web.AppKey("code", int)
MESSAGES = {0: "OK", 40100: "Too many requests", 40105: "Access token is invalid"}


def envelope(code: int, message: str, data: dict[str, Any] | None = None) -> web.Response:
    """TikTok's answer shape; TikTok answers errors as HTTP 200 too."""
    body = {"code": code, "message": message, "request_id": uuid.uuid4().hex, "data": data or {}}
    return web.json_response(body)


async def track(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError:
        return envelope(40002, "body: invalid JSON")
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return envelope(40002, "data: a list of events is required")
    events = [e for e in body["data"] if isinstance(e, dict)]
    keys = sorted({k for e in events for k, v in (e.get("user") or {}).items() if v})
    log.info(
        "pixel %s: %d event(s) %s; match keys %s; test_event_code %s; token %s",
        body.get("event_source_id"),
        len(events),
        ", ".join(f"{e.get('event')}/{e.get('event_id')}" for e in events[:10])
        + (" ..." if len(events) > 10 else ""),
        ",".join(keys) or "none",
        body.get("test_event_code"),
        "given" if request.headers.get("Access-Token") else "MISSING",
    )
    code = request.app[CODE]
    return envelope(code, MESSAGES.get(code, "stand-in error"))


async def other(request: web.Request) -> web.Response:
    log.info("%s %s: not served by the stand-in", request.method, request.path)
    return web.json_response(
        {"code": 40400, "message": f"{request.path} is not served by the stand-in",
         "request_id": uuid.uuid4().hex, "data": {}},
        status=404,
    )


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app(code: int = 0) -> web.Application:
    """The stand-in as an aiohttp application answering `code` to every batch."""
    app = web.Application(client_max_size=10 * 1024 * 1024)
    app[CODE] = code
    app.router.add_post(TRACK_PATH, track)
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/{tail:.*}", other)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on")
    parser.add_argument("--code", type=int, default=0, help="TikTok code to answer with")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("answering code %d on http://%s:%d%s", args.code, args.host, args.port, TRACK_PATH)
    web.run_app(
        create_app(args.code), host=args.host, port=args.port, print=None, access_log=None
    )


if __name__ == "__main__":
    main()
