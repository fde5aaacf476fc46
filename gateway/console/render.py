"""How console pages are rendered: Jinja2 templates shipped in the package, autoescaped,
and what the pages compute from the views (the chart's bars, a key's link, times, the
live list as JSON)."""

from __future__ import annotations

import functools
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import jinja2
import orjson
from aiohttp import web

from ..appkeys import SETTINGS
from . import access
from .access import Access
from .views import LiveKey, Point

ACCESS: web.RequestKey[Access] = web.RequestKey("console_access", Access)
API_PREFIX = "/console/api/"
NONE = "\u2013"  # what a missing number or time shows: an en dash

CHART_WIDTH = 600
CHART_HEIGHT = 120


@dataclass(frozen=True, slots=True)
class Bar:
    """One bar pair of the overview chart, in the SVG's own units."""

    x: float
    width: float
    received_y: float
    received_height: float
    forwarded_y: float
    forwarded_height: float
    label: str  # the bar's tooltip


@dataclass(frozen=True, slots=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    peak: int
    first: str  # the first bar's time, under the axis
    last: str


def chart(series: list[Point]) -> Chart:
    """Received (behind) and forwarded (in front) per point, scaled to the highest bar."""
    peak = max((max(p.received, p.forwarded) for p in series), default=0)
    slot = CHART_WIDTH / max(len(series), 1)
    scale = (CHART_HEIGHT - 4) / peak if peak else 0.0
    bars = []
    for i, point in enumerate(series):
        received, forwarded = point.received * scale, point.forwarded * scale
        bars.append(
            Bar(
                x=round(i * slot + slot * 0.1, 2),
                width=round(max(slot * 0.8, 1), 2),
                received_y=round(CHART_HEIGHT - received, 2),
                received_height=round(received, 2),
                forwarded_y=round(CHART_HEIGHT - forwarded, 2),
                forwarded_height=round(forwarded, 2),
                label=f"{when(point.start)}: {point.received} received, "
                f"{point.forwarded} forwarded, {point.duplicates} duplicates",
            )
        )
    first = when(series[0].start) if series else ""
    last = when(series[-1].start) if series else ""
    return Chart(CHART_WIDTH, CHART_HEIGHT, bars, peak, first, last)


def when(at: float | None) -> str:
    """A time as the pages show it: UTC, to the second."""
    if at is None:
        return NONE
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at)) + " UTC"


def key_path(pixel: str, event_id: str, event: str) -> str:
    """The console page of one key; every part percent-encoded (ids may hold '/', '?')."""
    parts = (urllib.parse.quote(p, safe="") for p in (pixel, event_id, event))
    return "/console/keys/" + "/".join(parts)


def live_json(keys: list[LiveKey]) -> dict[str, Any]:
    """GET /console/api/live's body: the keys as the live page lists them."""
    return {
        "keys": [
            {
                "pixel": k.pixel, "event": k.event, "event_id": k.event_id,
                "first_at": k.first_at, "last_at": k.last_at, "when": when(k.last_at),
                "state": k.state, "sources": k.sources, "merged": k.merged,
                "duplicates": k.duplicates, "code": k.code, "message": k.message,
                "request_id": k.request_id, "href": key_path(k.pixel, k.event_id, k.event),
                "copies": [
                    {"source": c.source, "at": c.at, "outcome": c.outcome, "fields": c.fields}
                    for c in k.copies
                ],
            }
            for k in keys
        ]
    }


# -- pages -------------------------------------------------------------------------


@functools.cache
def environment() -> jinja2.Environment:
    """Templates from the package, every value escaped (names, ids and TikTok's messages
    are the internet's)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("gateway", "console/templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=_pct, when=when, secs=_secs, num=_num, key_path=key_path)
    return env


def page(
    request: web.Request, template: str, status: int = 200, **context: Any
) -> web.Response:
    """A console page: the template with what every page shows (mode, nav, CSRF token)."""
    settings = request.app[SETTINGS]
    who = request.get(ACCESS) or access.check(request, settings)
    body = environment().get_template(template).render(
        access=who,
        csrf=access.csrf_token(who, settings),
        sandbox=settings.sandbox,
        path=request.path,
        now=time.time(),
        **context,
    )
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8")


def _pct(value: float | None) -> str:
    return NONE if value is None else f"{value * 100:.0f}%"


def _secs(value: float | None) -> str:
    if value is None:
        return NONE
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _num(value: int | float) -> str:
    return f"{value:,}"


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    """A console error, as a page (the API's as JSON)."""
    if request.path.startswith(API_PREFIX):
        return web.Response(
            body=orjson.dumps({"error": message}), status=status, content_type="application/json"
        )
    return page(request, "error.html", status, code=status, message=message)
