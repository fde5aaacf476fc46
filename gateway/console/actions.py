"""The console's actions: replaying dead letters (after a confirmation step) and sending a
test event. Both reach the store the way the CLI and real requests do, then wake this
instance's forwarder."""

from __future__ import annotations

import logging
import secrets
import time

from aiohttp import web

from .. import formats
from ..appkeys import FORWARDER, SETTINGS, STORE
from ..demo import DEMO_PIXEL_CODE
from ..ingest import INGEST, parse_options, store_and_answer
from ..settings import Settings
from .render import error_page, key_path, page

log = logging.getLogger("gateway.console")

# In sandbox mode nothing reaches TikTok; the test events carry this code all the same.
SANDBOX_TEST_CODE = "TEST-CONSOLE"
TEST_EVENT = "ViewContent"
TEST_ID_PREFIX = "console-test-"


# -- dead letters --------------------------------------------------------------------------


async def dead_letters(request: web.Request) -> web.Response:
    """GET /console/dead-letters — every dead letter, newest first, each with Replay."""
    letters = await request.app[STORE].dead_letters()
    letters.sort(key=lambda dl: dl.letter.dead_lettered_at, reverse=True)
    replayed = request.query.get("replayed", "")
    return page(
        request, "dead_letters.html", letters=letters,
        replayed=int(replayed) if replayed.isdigit() and len(replayed) < 9 else None,
    )  # fmt: skip


async def replay(request: web.Request) -> web.Response:
    """POST /console/dead-letters/replay — `letter` (repeated) or `all=1`: first a page
    naming the letters, whose button posts them again with `confirm=yes`; then replayed."""
    form = await request.post()
    letters = await request.app[STORE].dead_letters()
    if form.get("all") == "1":
        chosen = letters
    else:
        wanted = {v for v in form.getall("letter", []) if isinstance(v, str)}
        chosen = [dl for dl in letters if dl.ref in wanted]
    if form.get("confirm") != "yes":
        # The confirmation names each letter: what is confirmed is what is replayed, even if
        # more letters arrive meanwhile.
        return page(request, "confirm_replay.html", letters=chosen)
    queued = await request.app[STORE].replay(chosen, time.time()) if chosen else 0
    request.app[FORWARDER].wake()
    log.info("console: replayed %d dead letter(s)", queued, extra={"outcome": "replayed"})
    location = f"/console/dead-letters?replayed={queued}"
    return web.Response(status=303, headers={"Location": location})


# -- test events ---------------------------------------------------------------------------


def test_code(settings: Settings) -> str | None:
    """The code test events go out under; None: none may be sent (it would be real data)."""
    return settings.test_event_code or (SANDBOX_TEST_CODE if settings.sandbox else None)


def test_refusal(settings: Settings) -> str | None:
    """Why no test event can be sent here, or None."""
    if test_code(settings) is None:
        return (
            "Sending a test event needs GATEWAY_TEST_EVENT_CODE (TikTok's Test Events code): "
            "without it the event would reach the pixel's real data."
        )
    return None


def test_pixels(settings: Settings, seen: list[str]) -> list[str]:
    """The pixels a test event may be sent for: the configured ones (any seen, in sandbox)."""
    if not settings.sandbox:
        return list(settings.pixels)
    return [DEMO_PIXEL_CODE, *(p for p in seen if p != DEMO_PIXEL_CODE)]


async def test_event_page(request: web.Request) -> web.Response:
    """GET /console/test-event — the form the overview also shows."""
    settings = request.app[SETTINGS]
    return page(
        request, "test_event.html", selected=request.query.get("pixel"),
        test_pixels=test_pixels(settings, []), test_refusal=test_refusal(settings),
    )  # fmt: skip


async def test_event(request: web.Request) -> web.Response:
    """POST /console/test-event — a pixel copy and a server copy of one event with a fresh
    shared event_id under the test event code, stored as real requests store them; answers
    with that key's page, where they merge and leave."""
    settings = request.app[SETTINGS]
    code, refusal = test_code(settings), test_refusal(settings)
    if code is None or refusal is not None:
        return error_page(request, 409, refusal or "no test event code")
    form = await request.post()
    pixel = form.get("pixel")
    if not isinstance(pixel, str) or (
        not settings.sandbox and pixel not in settings.pixels
    ):  # in sandbox mode the parser checks the code's shape
        return error_page(request, 400, "Choose one of the configured pixels.")
    now = request.app[INGEST].clock()
    event_id = TEST_ID_PREFIX + secrets.token_hex(6)
    options = parse_options(settings, now)
    browser = formats.BrowserContext(user_agent=request.headers.get("User-Agent"))
    pixel_copy = formats.parse_browser(
        {"pixel_code": pixel, "event": TEST_EVENT, "event_id": event_id,
         "timestamp": int(now), "test_event_code": code},
        options, browser,
    )  # fmt: skip
    server_copy = formats.parse_event_track(
        {"event_source": "web", "event_source_id": pixel, "test_event_code": code,
         "data": [{"event": TEST_EVENT, "event_id": event_id, "event_time": int(now),
                   "user": {"external_id": "console-test-customer"}}]},
        options,
    )  # fmt: skip
    for parsed in (pixel_copy, server_copy):  # two requests' worth, as the two sources send
        await store_and_answer(request, parsed, now)
    log.info(
        "console: test event %s for pixel %s", event_id, pixel, extra={"outcome": "test_event"}
    )
    return web.Response(status=303, headers={"Location": key_path(pixel, event_id, TEST_EVENT)})
