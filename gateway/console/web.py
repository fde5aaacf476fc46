"""The console's pages, wired by `add_routes`; every answer under /console goes through
`console_middleware` (access.py's checks, HTML errors, the security headers).

    GET  /console/                              overview of a pixel (?pixel=&range=15m|24h)
    GET  /console/checks                        setup checks (?pixel=)
    GET  /console/live                          recent keys (?pixel=&event=&event_id=)
    GET  /console/api/live                      the same as JSON, polled by console.js
    GET  /console/keys/{pixel}/{event_id}/{event}   one key's state and timeline
    GET  /console/dead-letters                  dead letters
    POST /console/dead-letters/replay           ids or all=1; confirm=yes replays (actions.py)
    GET  /console/test-event                    its form (also on the overview)
    POST /console/test-event                    a pixel and a server copy, shared id (actions.py)
    GET  /console/login, POST /console/login, POST /console/logout
    GET  /console/static/{name}                 the stylesheet and the script
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TypedDict

import orjson
from aiohttp import web
from redis.exceptions import RedisClusterException, RedisError

from ..answers import logged_path
from ..appkeys import SETTINGS, STORE
from ..errors import RequestError, StoreUnavailable
from ..metrics import MATCH_KEYS
from ..settings import Settings
from . import access, actions
from .access import Access
from .reading import ConsoleReader
from .render import ACCESS, chart, error_page, live_json, page
from .views import ANSWER_CLASSES, RANGES, Range

log = logging.getLogger("gateway.console")

PREFIX = "/console"
STATIC = {"console.css": "text/css", "console.js": "application/javascript"}
# The login page and the static files are served to anyone the console is not off for.
PUBLIC = ("/console/login", "/console/static/")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_routes(app: web.Application, settings: Settings) -> None:
    """Serve the console on `app` (its middleware is in app.py's list)."""
    r = app.router
    r.add_get("/console", to_console)
    r.add_get("/console/", overview)
    r.add_get("/console/checks", checks)
    r.add_get("/console/live", live)
    r.add_get("/console/api/live", api_live)
    r.add_get("/console/keys/{pixel}/{event_id}/{event}", key)
    r.add_get("/console/dead-letters", actions.dead_letters)
    r.add_post("/console/dead-letters/replay", actions.replay)
    r.add_get("/console/test-event", actions.test_event_page)
    r.add_post("/console/test-event", actions.test_event)
    r.add_get("/console/login", login_page)
    r.add_post("/console/login", login)
    r.add_post("/console/logout", logout)
    r.add_get("/console/static/{name}", static)


async def to_console(request: web.Request) -> web.Response:
    return _redirect(PREFIX + "/")


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _pixel_arg(request: web.Request) -> str | None:
    return request.query.get("pixel") or None


# -- pages -----------------------------------------------------------------------------


async def overview(request: web.Request) -> web.Response:
    """GET /console/ — one pixel's numbers over 15 minutes or 24 hours."""
    range_: Range = "24h" if request.query.get("range") == "24h" else "15m"
    pixel = _pixel_arg(request)
    view = await ConsoleReader(request.app[STORE]).overview(pixel, range_, time.time())
    return page(
        request, "overview.html", view=view, ranges=list(RANGES), chart=chart(view.series),
        match_keys=MATCH_KEYS, answer_classes=ANSWER_CLASSES,
        test_pixels=actions.test_pixels(request.app[SETTINGS], view.pixels),
        test_refusal=actions.test_refusal(request.app[SETTINGS]),
    )  # fmt: skip


async def checks(request: web.Request) -> web.Response:
    """GET /console/checks — the setup checks, each a verdict, its evidence and its fix."""
    pixel = _pixel_arg(request)
    reader = ConsoleReader(request.app[STORE])
    now = time.time()
    found = await reader.checks(pixel, now)
    pixels = await reader.pixels(now)
    return page(request, "checks.html", checks=found, pixel=pixel, pixels=pixels)


class LiveFilters(TypedDict):
    pixel: str | None
    event: str | None
    event_id: str | None


def _live_filters(request: web.Request) -> LiveFilters:
    q = request.query

    def arg(name: str) -> str | None:
        return (q.get(name) or "").strip() or None

    return LiveFilters(pixel=arg("pixel"), event=arg("event"), event_id=arg("event_id"))


async def live(request: web.Request) -> web.Response:
    """GET /console/live — recent keys, newest first; console.js keeps the list fresh."""
    filters = _live_filters(request)
    keys = await ConsoleReader(request.app[STORE]).live(time.time(), **filters)
    return page(request, "live.html", keys=keys, filters=filters)


async def api_live(request: web.Request) -> web.Response:
    """GET /console/api/live — what /console/live lists, as JSON."""
    keys = await ConsoleReader(request.app[STORE]).live(time.time(), **_live_filters(request))
    return web.Response(body=orjson.dumps(live_json(keys)), content_type="application/json")


async def key(request: web.Request) -> web.Response:
    """GET /console/keys/{pixel}/{event_id}/{event} — what /debug shows, as a page."""
    info = request.match_info
    names = {"pixel": info["pixel"], "event_id": info["event_id"], "event": info["event"]}
    state = await request.app[STORE].inspect(names["pixel"], names["event_id"], names["event"])
    status = 200 if state is not None else 404
    # Reloads itself while something may still happen to the key.
    live_state = state is None or state.get("state") in ("open", "retry")
    return page(request, "key.html", status, names=names, state=state, refresh=live_state)


async def static(request: web.Request) -> web.Response:
    """GET /console/static/{name} — files shipped in gateway/static/console/."""
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=_static_file(name), content_type=STATIC[name], charset="utf-8")


@functools.cache
def _static_file(name: str) -> bytes:
    return (importlib.resources.files("gateway") / "static" / "console" / name).read_bytes()


# -- login -----------------------------------------------------------------------------


def _next_path(value: str | None) -> str:
    """Where to go after logging in: a console path of ours, never another site."""
    if value and value.startswith(PREFIX + "/") and not value.startswith("//"):
        parts = urllib.parse.urlsplit(value)
        if not parts.scheme and not parts.netloc and "\\" not in value:
            return value
    return PREFIX + "/"


def login_form(request: web.Request, status: int, error: str | None = None) -> web.Response:
    """The login form; with 401 it is what an unauthenticated page answers (no data)."""
    default = request.path_qs if request.method == "GET" else None
    target = _next_path(request.query.get("next") or default)
    return page(request, "login.html", status, error=error, next=target)


async def login_page(request: web.Request) -> web.Response:
    """GET /console/login — the form (or, once logged in or open, the overview)."""
    if request[ACCESS].allowed:
        return _redirect(_next_path(request.query.get("next")))
    return login_form(request, 200)


async def login(request: web.Request) -> web.Response:
    """POST /console/login — the admin token in, a session cookie out."""
    settings = request.app[SETTINGS]
    if settings.admin_token is None:
        return _redirect(PREFIX + "/")
    if not await access.guess_allowed(request, settings):
        return login_form(request, 429, "Too many attempts from this address; wait a moment.")
    form = await request.post()
    given, target = form.get("token"), form.get("next")
    target_path = _next_path(target if isinstance(target, str) else None)
    if not isinstance(given, str) or not access.token_matches(given, settings.admin_token):
        return page(request, "login.html", 401, error="Wrong token.", next=target_path)
    response = _redirect(target_path)
    value = access.new_session(settings.admin_token, time.time())
    access.set_cookie(
        response, request, settings, access.SESSION_COOKIE, value, access.SESSION_SECONDS
    )
    log.info("console login from %s", request.remote, extra={"outcome": "login"})
    return response


async def logout(request: web.Request) -> web.Response:
    """POST /console/logout — forgets the session cookie in this browser."""
    response = _redirect(PREFIX + "/login")
    response.del_cookie(access.SESSION_COOKIE, path=access.COOKIE_PATH)
    return response


# -- the middleware --------------------------------------------------------------------


def _is_console(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Access control, CSRF and HTML errors for /console; security headers on every answer.

    Inside the error middleware: console errors are pages, not TikTok's envelope."""
    if not _is_console(request.path):
        return await handler(request)
    settings = request.app[SETTINGS]
    who = request[ACCESS] = access.check(request, settings)
    try:
        response = await _guarded(request, handler, who, settings)
    except web.HTTPException as exc:
        response = error_page(request, exc.status, exc.reason)
    except RequestError as exc:  # a form's bad value, as the parsers word it
        response = error_page(request, exc.http_status, exc.message)
    except (StoreUnavailable, RedisError, RedisClusterException) as exc:
        log.warning("console: Redis unavailable on %s: %s", logged_path(request), exc)
        response = error_page(request, 503, "Redis is not answering; try again in a moment.")
    except Exception:
        log.exception("console: unhandled error on %s %s", request.method, logged_path(request))
        response = error_page(request, 500, "Internal error; the gateway's log has the details.")
    response.headers.update(access.SECURITY_HEADERS)
    if who.new_nonce and who.nonce is not None:
        access.set_cookie(response, request, settings, access.NONCE_COOKIE, who.nonce, None)
    return response


async def _guarded(
    request: web.Request, handler: Handler, who: Access, settings: Settings
) -> web.StreamResponse:
    api = request.path.startswith(PREFIX + "/api/")
    if who.mode == "off":
        return error_page(
            request, 404, "The console is off: set GATEWAY_ADMIN_TOKEN to use it (it is open "
            "without one only in sandbox mode, to requests from this machine).",
        )  # fmt: skip
    if request.path.startswith(PUBLIC):
        if request.method == "POST" and not await _csrf_passes(request, who, settings):
            return error_page(request, 403, CSRF_REFUSED)
        return await handler(request)
    if access.bearer_given(request) is not None and not await access.guess_allowed(
        request, settings
    ):
        return _refused(request, api, 429, "Too many attempts from this address.")
    if not who.allowed:
        return _refused(request, api, 401, "Log in with the admin token.")
    if request.method == "POST" and not await _csrf_passes(request, who, settings):
        return error_page(request, 403, CSRF_REFUSED)
    return await handler(request)


CSRF_REFUSED = (
    "This form did not come from this console (or it expired): reload the page and try again."
)


async def _csrf_passes(request: web.Request, who: Access, settings: Settings) -> bool:
    try:  # read here, before any handler: they find it parsed (a multipart body without
        form = await request.post()  # its boundary is a ValueError)
    except ValueError:
        raise web.HTTPBadRequest(reason="the form could not be read") from None
    given = form.get("csrf")
    return access.csrf_ok(request, who, settings, given if isinstance(given, str) else None)


def _refused(request: web.Request, api: bool, status: int, message: str) -> web.Response:
    """401 (or 429): the login form, no data; the API's as JSON."""
    if api:
        return error_page(request, status, message)
    return login_form(request, status, message if status != 401 else None)
