"""The browser source end to end: `/pixel/events` as pages and `navigator.sendBeacon` call it.

The request itself vouches for ip, user agent and cookies; what TikTok (the
stand-in) finally receives is checked where it matters.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from tests.helpers import browser_event, event_keys, post_browser, wait_drained
from tests.support import PIXEL, PIXEL2, Gateway, GatewayFactory
from tests.tiktok_stub import TikTokStub

SHOP = "https://shop.example.com"
UA = "Mozilla/5.0 (X11; Linux x86_64) TestBrowser/1.0"
TTP = "ttp-cookie-value-0000000001"
WINDOW = 0.1  # merge window: lone browser copies leave for TikTok this soon


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
    assert await event_keys(redis_client) == []


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
    assert await event_keys(redis_client) == []
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


# -- the ttclid cookie --------------------------------------------------------------------


def set_cookies(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    return {name: morsel for name, morsel in resp.cookies.items()}


async def test_a_page_url_with_ttclid_sets_a_first_party_cookie_for_30_days(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(shutdown_timeout=1.0)
    resp, answer = await send(http, gateway, browser_event("click-1"))  # ?ttclid=E.C.P.click-1
    assert (resp.status, answer["code"]) == (200, 0), answer
    cookie = set_cookies(resp)["ttclid"]
    assert cookie.value == "E.C.P.click-1"
    assert cookie["max-age"] == str(30 * 24 * 3600)
    assert cookie["path"] == "/"
    assert cookie["samesite"] == "Lax"
    assert not cookie["domain"]  # host-only unless GATEWAY_COOKIE_DOMAIN says otherwise
    assert not cookie["secure"]  # auto: this request came over plain HTTP
    assert not cookie["httponly"]  # pixel.js on a sibling subdomain may read it

    resp, _ = await send(http, gateway, browser_event("click-2", page={"url": SHOP + "/cart"}))
    assert "ttclid" not in set_cookies(resp)  # no click id in this URL: the cookie stays


async def test_the_cookie_attributes_are_configurable(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(
        cookie_domain=".shop.example.com", cookie_secure=True, cookie_samesite="None",
        shutdown_timeout=1.0,
    )
    event = browser_event("click-3", page={"url": f"{SHOP}/?ttclid=E.C.P.a%2Fb%3Dc"})
    resp, _ = await send(http, gateway, event)
    cookie = set_cookies(resp)["ttclid"]
    assert cookie["domain"] == ".shop.example.com"
    assert cookie["secure"]
    assert cookie["samesite"] == "None"
    # Characters a cookie cannot hold as they are travel percent-encoded.
    assert cookie.value == "E.C.P.a%2Fb%3Dc"


async def test_https_behind_a_trusted_proxy_makes_the_cookie_secure(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(trusted_proxies=TRUST_LOOPBACK, shutdown_timeout=1.0)
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.5"}
    resp, _ = await send(http, gateway, browser_event("click-4"), headers=headers)
    assert set_cookies(resp)["ttclid"]["secure"]
    untrusted = await make_gateway(shutdown_timeout=1.0)
    resp, _ = await send(http, untrusted, browser_event("click-5"), headers=headers)
    assert not set_cookies(resp)["ttclid"]["secure"]


async def test_a_later_purchase_carries_the_click_from_the_cookie(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=WINDOW, shutdown_timeout=1.0)
    landing = browser_event("land-1", page={"url": f"{SHOP}/?ttclid=E.C.P.a%2Fb%3Dc"})
    resp, _ = await send(http, gateway, landing)
    ttclid_cookie = set_cookies(resp)["ttclid"].value
    later = browser_event("buy-1", page={"url": f"{SHOP}/thanks"})
    cookies = {"Cookie": f"_ttp={TTP}; ttclid={ttclid_cookie}"}
    resp, _ = await send(http, gateway, later, headers=cookies)
    forwarded = {e["event_id"]: e for e in await tiktok.wait_for_events(2)}
    assert forwarded["buy-1"]["user"]["ttclid"] == "E.C.P.a/b=c"  # decoded again


# -- origins, sizes and counts ----------------------------------------------------------


async def test_a_page_of_the_gateway_itself_may_post_without_being_listed(
    shop_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    # The demo shop is served by the gateway: same origin, no CORS involved.
    resp, answer = await send(
        http, shop_gateway, browser_event("own-1"), headers={"Origin": shop_gateway.url}
    )
    assert (resp.status, answer["code"]) == (200, 0), answer
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_a_beacon_is_limited_to_its_own_smaller_size(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    gateway = await make_gateway(pixel_max_body_bytes=2000, shutdown_timeout=1.0)
    event = browser_event("big-1", properties={"description": "x" * 3000})
    resp, answer = await send(http, gateway, event)
    assert resp.status == 413
    assert answer["message"] == "body: larger than 2000 bytes"
    assert gateway.metric("gateway_events_rejected_total", {"reason": "too_large"}) == 1
    assert await event_keys(redis_client) == []
    # The server paths keep GATEWAY_MAX_BODY_BYTES.
    assert gateway.settings.max_body_bytes > 3000


async def test_a_beacon_carries_at_most_pixel_max_events(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    gateway = await make_gateway(pixel_max_events=2, shutdown_timeout=1.0)
    events = [browser_event(f"many-{i}") for i in range(3)]
    resp, answer = await send(http, gateway, events)
    assert resp.status == 400
    assert answer["message"].startswith("events: has 3 events; at most 2")
    assert await event_keys(redis_client) == []
