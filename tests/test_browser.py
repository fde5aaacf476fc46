"""The browser source end to end: `/pixel/events` as pages and `navigator.sendBeacon` call it.

The request itself vouches for ip, user agent and cookies; what TikTok (the
stand-in) finally receives is checked where it matters.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import PIXEL, PIXEL2, Gateway, GatewayFactory
from tests.helpers import browser_event, post_browser
from tests.tiktok_stub import TikTokStub

SHOP = "https://shop.example.com"
UA = "Mozilla/5.0 (X11; Linux x86_64) TestBrowser/1.0"
TTP = "ttp-cookie-value-0000000001"
WINDOW = 0.1  # merge window: lone browser copies leave for TikTok this soon


async def wait_drained(gateway: Gateway) -> None:
    """Until nothing is pending: every stored event was forwarded (and acknowledged)."""
    for _ in range(200):
        pending, _dead = await gateway.store.counts()
        if pending == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("events still pending")


async def send(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    body: Any,
    *,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> tuple[aiohttp.ClientResponse, dict[str, Any]]:
    """POST raw bytes as a browser would, with a user agent; the response and its envelope."""
    all_headers = {"User-Agent": UA, "Content-Type": content_type, **(headers or {})}
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    async with http.post(f"{gateway.url}/pixel/events", data=raw, headers=all_headers) as resp:
        answer: dict[str, Any] = orjson.loads(await resp.read())
    assert set(answer) == {"code", "message", "request_id", "data"}, answer
    return resp, answer


# -- what the request itself tells --------------------------------------------------------


async def test_json_body_is_enriched_from_the_request(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=WINDOW)
    event = browser_event("json-1")
    # What a page claims about the visitor loses to what the request shows.
    event["user"] = {"ip": "198.51.100.1", "user_agent": "Spoofed/1.0"}
    answer = await post_browser(http, gateway.url, event, ttp=TTP, user_agent=UA)
    assert (answer["_status"], answer["code"]) == (200, 0), answer

    [forwarded] = await tiktok.wait_for_events(1)
    assert forwarded["event_id"] == "json-1"
    assert forwarded["user"]["ip"] == "127.0.0.1"
    assert forwarded["user"]["user_agent"] == UA
    assert forwarded["user"]["ttp"] == TTP
    assert forwarded["user"]["ttclid"] == "E.C.P.click-1"
    assert gateway.metric(
        "gateway_events_received_total", {"source": "pixel", "pixel": PIXEL}
    ) == 1


@pytest.mark.parametrize(
    "content_type", ["text/plain;charset=UTF-8", "text/plain", "application/octet-stream"]
)
async def test_beacon_body_is_accepted(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    content_type: str,
) -> None:
    # navigator.sendBeacon(url, JSON.stringify(events)) posts a text/plain string,
    # which needs no CORS preflight; a Blob without a type arrives untyped.
    gateway = await make_gateway(merge_window=WINDOW)
    events = [browser_event("beacon-1"), browser_event("beacon-2", "AddToCart")]
    resp, answer = await send(
        http, gateway, events, content_type=content_type, headers={"Cookie": f"_ttp={TTP}"}
    )
    assert (resp.status, answer["code"]) == (200, 0), answer
    forwarded = await tiktok.wait_for_events(2)
    assert sorted(e["event_id"] for e in forwarded) == ["beacon-1", "beacon-2"]
    assert all(e["user"]["ttp"] == TTP for e in forwarded)


async def test_beacon_body_with_a_byte_order_mark_is_accepted(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=WINDOW)
    raw = b"\xef\xbb\xbf" + orjson.dumps(browser_event("bom-1"))
    resp, answer = await send(http, gateway, raw, content_type="text/plain;charset=UTF-8")
    assert (resp.status, answer["code"]) == (200, 0), answer
    [forwarded] = await tiktok.wait_for_events(1)
    assert forwarded["event_id"] == "bom-1"


async def test_ttclid_comes_from_the_cookie_when_the_page_url_has_none(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=WINDOW)
    from_cookie = browser_event("click-cookie-1", page={"url": f"{SHOP}/cart"})
    from_url = browser_event("click-url-1")  # ?ttclid=E.C.P.click-1 in its page URL
    cookies = {"Cookie": f"_ttp={TTP}; ttclid=E.C.P.from-cookie"}
    resp, answer = await send(http, gateway, [from_cookie, from_url], headers=cookies)
    assert (resp.status, answer["code"]) == (200, 0), answer

    forwarded = {e["event_id"]: e for e in await tiktok.wait_for_events(2)}
    assert forwarded["click-cookie-1"]["user"]["ttclid"] == "E.C.P.from-cookie"
    # The landing URL is TikTok's own word on the click: it wins over an older cookie.
    assert forwarded["click-url-1"]["user"]["ttclid"] == "E.C.P.click-1"


async def test_without_cookies_no_ttp_is_invented(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=WINDOW)
    resp, answer = await send(http, gateway, browser_event("no-cookie-1", page={"url": SHOP}))
    assert (resp.status, answer["code"]) == (200, 0)
    [forwarded] = await tiktok.wait_for_events(1)
    assert "ttp" not in forwarded["user"]
    assert "ttclid" not in forwarded["user"]
    assert forwarded["user"]["user_agent"] == UA


# -- only configured pixels --------------------------------------------------------------


async def test_events_for_an_unconfigured_pixel_are_refused_and_the_rest_accepted(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    gateway = await make_gateway(merge_window=WINDOW)
    events = [
        browser_event("px-1"),
        browser_event("px-2", pixel="CNOTCONFIGURED000001"),
        browser_event("px-3", pixel=PIXEL2),
    ]
    resp, answer = await send(http, gateway, events)
    assert (resp.status, answer["code"]) == (200, 20001), answer
    assert answer["data"]["accepted"] == 2
    assert answer["data"]["failed_events"] == [
        {"index": 1, "field": "events.1.pixel_code", "message": "unknown pixel code"}
    ]
    assert gateway.metric("gateway_events_rejected_total", {"reason": "unknown_pixel"}) == 1

    forwarded = await tiktok.wait_for_events(2)
    assert sorted(e["event_id"] for e in forwarded) == ["px-1", "px-3"]
    pixels = sorted(r.body["event_source_id"] for r in tiktok.track_requests())
    assert pixels == sorted([PIXEL, PIXEL2])
    await wait_drained(gateway)
    assert len(tiktok.events()) == 2
    assert not [k for k in await redis_client.keys("tkgw:*") if b"CNOTCONFIGURED" in k]


async def test_a_lone_event_for_an_unconfigured_pixel_stores_nothing(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    gateway = await make_gateway()
    resp, answer = await send(http, gateway, browser_event("px-9", pixel="CNOTCONFIGURED000001"))
    assert resp.status == 400
    assert answer["code"] != 0
    assert answer["message"] == "pixel_code: unknown pixel code"
    assert await redis_client.keys("tkgw:*") == []


# -- CORS ---------------------------------------------------------------------------------


@pytest.fixture
async def shop_gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway(allowed_origins=frozenset({SHOP}), merge_window=WINDOW)


async def test_preflight_from_an_allowed_origin(
    shop_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    headers = {
        "Origin": SHOP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }
    async with http.options(f"{shop_gateway.url}/pixel/events", headers=headers) as resp:
        assert resp.status == 204
        assert resp.headers["Access-Control-Allow-Origin"] == SHOP
        assert "POST" in resp.headers["Access-Control-Allow-Methods"]
        assert "content-type" in resp.headers["Access-Control-Allow-Headers"].lower()
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
        assert "Origin" in resp.headers["Vary"]


async def test_preflight_from_another_origin_is_refused(
    shop_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    headers = {"Origin": "https://evil.example.net", "Access-Control-Request-Method": "POST"}
    async with http.options(f"{shop_gateway.url}/pixel/events", headers=headers) as resp:
        assert resp.status == 403
        assert "Access-Control-Allow-Origin" not in resp.headers


async def test_post_from_another_origin_is_refused_and_nothing_stored(
    shop_gateway: Gateway, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    resp, answer = await send(
        http, shop_gateway, browser_event("cors-1"), headers={"Origin": "https://evil.example.net"}
    )
    assert resp.status == 403
    assert answer["code"] != 0
    assert "https://evil.example.net" in answer["message"]
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert await redis_client.keys("tkgw:*") == []
    assert shop_gateway.metric("gateway_events_rejected_total", {"reason": "origin"}) == 1


@pytest.mark.parametrize("origin", [SHOP, SHOP + "/", None], ids=["shop", "slash", "none"])
async def test_post_from_the_allowed_origin_or_without_one_is_accepted(
    shop_gateway: Gateway,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    origin: str | None,
) -> None:
    headers = {"Origin": origin} if origin else {}
    resp, answer = await send(http, shop_gateway, browser_event("cors-ok-1"), headers=headers)
    assert (resp.status, answer["code"]) == (200, 0), answer
    if origin:
        assert resp.headers["Access-Control-Allow-Origin"] == origin
    else:
        assert "Access-Control-Allow-Origin" not in resp.headers
    [forwarded] = await tiktok.wait_for_events(1)
    assert forwarded["event_id"] == "cors-ok-1"


async def test_an_error_answer_to_an_allowed_origin_is_readable_by_the_page(
    shop_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    # Without CORS headers on the error, the page's fetch() sees only a network error.
    event = browser_event("cors-bad-1", timestamp="not a time")
    resp, answer = await send(http, shop_gateway, event, headers={"Origin": SHOP})
    assert resp.status == 400
    assert answer["message"].startswith("timestamp: ")
    assert resp.headers["Access-Control-Allow-Origin"] == SHOP


# -- the client's address -----------------------------------------------------------------

TRUST_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)


@pytest.mark.parametrize(
    ("trusted", "forwarded_for", "expected_ip"),
    [
        (TRUST_LOOPBACK, ["203.0.113.7"], "203.0.113.7"),
        # Nearest hop first: our inner proxy 127.0.0.5 is skipped, the client is before it.
        (TRUST_LOOPBACK, ["198.51.100.2, 127.0.0.5"], "198.51.100.2"),
        # Two headers are one list, in order.
        (TRUST_LOOPBACK, ["198.51.100.3", "127.0.0.6"], "198.51.100.3"),
        # A client-written hop before an untrusted one is not believed.
        (TRUST_LOOPBACK, ["192.0.2.66, 198.51.100.9"], "198.51.100.9"),
        (TRUST_LOOPBACK, ["2001:db8::7"], "2001:db8::7"),
        (TRUST_LOOPBACK, [], "127.0.0.1"),
        ((), ["203.0.113.7"], "127.0.0.1"),
        ((ipaddress.ip_network("10.0.0.0/8"),), ["203.0.113.7"], "127.0.0.1"),
    ],
    ids=["one-hop", "two-hops", "two-headers", "spoofed", "ipv6", "no-header", "untrusted",
         "other-proxy"],
)
async def test_x_forwarded_for_is_believed_only_from_trusted_proxies(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    trusted: tuple[Any, ...],
    forwarded_for: list[str],
    expected_ip: str,
) -> None:
    gateway = await make_gateway(merge_window=WINDOW, trusted_proxies=trusted)
    headers = [("User-Agent", UA), ("Content-Type", "application/json")]
    headers += [("X-Forwarded-For", value) for value in forwarded_for]
    raw = orjson.dumps(browser_event("xff-1"))
    async with http.post(f"{gateway.url}/pixel/events", data=raw, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    [forwarded] = await tiktok.wait_for_events(1)
    assert forwarded["user"]["ip"] == expected_ip


# -- rate limit ---------------------------------------------------------------------------


async def test_a_client_over_its_rate_gets_429_and_nothing_stored(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(
        pixel_rate_limit=1.0, pixel_rate_burst=3, merge_window=WINDOW
    )
    for i in range(3):
        resp, answer = await send(http, gateway, browser_event(f"rate-{i}"))
        assert (resp.status, answer["code"]) == (200, 0), answer
    resp, answer = await send(http, gateway, browser_event("rate-3"))
    assert resp.status == 429
    assert answer["code"] == 40100
    assert int(resp.headers["Retry-After"]) >= 1
    assert gateway.metric("gateway_events_rejected_total", {"reason": "rate_limited"}) == 1

    forwarded = await tiktok.wait_for_events(3)
    await wait_drained(gateway)
    assert sorted(e["event_id"] for e in tiktok.events()) == ["rate-0", "rate-1", "rate-2"]
    assert "rate-3" not in {e["event_id"] for e in forwarded}


async def test_the_rate_limit_is_per_client(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(
        pixel_rate_limit=1.0, pixel_rate_burst=1, trusted_proxies=TRUST_LOOPBACK
    )
    one, two = {"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "203.0.113.2"}
    resp, _ = await send(http, gateway, browser_event("per-1"), headers=one)
    assert resp.status == 200
    resp, _ = await send(http, gateway, browser_event("per-2"), headers=one)
    assert resp.status == 429
    resp, _ = await send(http, gateway, browser_event("per-3"), headers=two)
    assert resp.status == 200
