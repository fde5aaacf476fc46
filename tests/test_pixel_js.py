"""GET /pixel.js: served with caching headers and a content hash, and what the script holds.

What the script does in a page is proven in a real browser (test_browser_chromium.py);
here: how it is served, and that it is the small dependency-free script the README
tells site owners to include.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re

import aiohttp
import pytest

from gateway import __version__
from gateway.pixeljs import LONG_MAX_AGE, SHORT_MAX_AGE, load_script
from tests.support import Gateway, GatewayFactory

TEMPLATE = (importlib.resources.files("gateway") / "static" / "pixel.js").read_bytes()
DIGEST = hashlib.sha256(TEMPLATE).hexdigest()[:16]


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(shutdown_timeout=1.0)


async def test_served_as_javascript_with_a_short_cache_and_an_etag(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/pixel.js") as resp:
        assert resp.status == 200
        body = await resp.read()
        assert resp.headers["Content-Type"] == "application/javascript; charset=utf-8"
        assert resp.headers["Cache-Control"] == f"public, max-age={SHORT_MAX_AGE}"
        assert resp.headers["ETag"] == f'"{DIGEST}"'
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        # Any shop may load it, with integrity= and crossorigin= too; it carries no cookies.
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        assert "Access-Control-Allow-Credentials" not in resp.headers
    assert body == load_script().body
    assert f"{__version__}+{DIGEST}".encode() in body
    assert b"%VERSION%" not in body


async def test_the_hash_in_the_url_makes_it_immutable(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{gateway.url}/pixel.js?v={DIGEST}") as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == f"public, max-age={LONG_MAX_AGE}, immutable"
    # An old hash gets today's script, so it must not be pinned for a year.
    async with http.get(f"{gateway.url}/pixel.js?v=0123456789abcdef") as resp:
        assert resp.status == 200
        assert resp.headers["Cache-Control"] == f"public, max-age={SHORT_MAX_AGE}"


@pytest.mark.parametrize(
    ("if_none_match", "status"),
    [(f'"{DIGEST}"', 304), (f'W/"{DIGEST}"', 304), ("*", 304), ('"0000000000000000"', 200)],
    ids=["same", "weak", "any", "other"],
)
async def test_a_cached_copy_is_revalidated_by_etag(
    gateway: Gateway, http: aiohttp.ClientSession, if_none_match: str, status: int
) -> None:
    headers = {"If-None-Match": if_none_match}
    async with http.get(f"{gateway.url}/pixel.js", headers=headers) as resp:
        assert resp.status == status
        body = await resp.read()
        assert resp.headers["ETag"] == f'"{DIGEST}"'
        assert resp.headers["Cache-Control"] == f"public, max-age={SHORT_MAX_AGE}"
    assert (body == b"") == (status == 304)


async def test_head_answers_without_the_body(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.head(f"{gateway.url}/pixel.js") as resp:
        assert resp.status == 200
        assert resp.headers["ETag"] == f'"{DIGEST}"'
        assert await resp.read() == b""


async def test_served_in_sandbox_mode_too(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(pixels={}, shutdown_timeout=1.0)
    async with http.get(f"{gateway.url}/pixel.js") as resp:
        assert resp.status == 200


def test_the_version_changes_with_the_content() -> None:
    script = load_script()
    assert script.digest == DIGEST
    assert script.etag == f'"{DIGEST}"'
    assert re.fullmatch(r"[0-9a-f]{16}", script.digest)


# -- what the script is -------------------------------------------------------------------

SCRIPT = TEMPLATE.decode()
CODE = re.sub(r"/\*.*?\*/", "", SCRIPT, flags=re.S)  # without its comments


def test_small_and_dependency_free() -> None:
    assert len(TEMPLATE) < 16 * 1024
    # No module system, no other script, no host of its own: it posts beside itself.
    for needle in ("import ", "require(", "createElement(", "http://", "https://", "//cdn"):
        assert needle not in CODE, needle
    assert CODE.strip().startswith("(function (window, document) {")


def test_it_mirrors_track_and_page_with_the_same_event_id() -> None:
    assert 'wrap(q, "track"' in CODE and 'wrap(q, "page"' in CODE
    assert '"Pageview"' in CODE
    # The page's own event_id, or a new one that ttq gets too.
    assert "opts.event_id" in CODE and "copy.event_id = newEventId()" in CODE
    assert "lastEventId" in CODE


def test_it_posts_with_sendbeacon_and_falls_back_to_fetch_keepalive() -> None:
    assert "navigator.sendBeacon(endpoint, body)" in CODE
    assert "keepalive: true" in CODE
    assert 'beside(script, "/pixel/events")' in CODE


def test_it_honours_consent_and_limited_data_use() -> None:
    for attribute in ("consent", "consent-check", "limited-data-use", "endpoint", "pixel"):
        assert f'attr("{attribute}")' in CODE, attribute
    for method in ("holdConsent", "grantConsent", "revokeConsent"):
        assert f'wrap(q, "{method}"' in CODE, method
    assert "event.limited_data_use = true" in CODE
