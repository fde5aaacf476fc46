"""The demo shop over plain HTTP: its pages, its "server" and its status, in sandbox mode.

The click-through in a real browser is tests/test_browser_chromium.py; here each
piece the page uses is checked on its own, as a browser would call it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.demo import DEMO_EMAIL, DEMO_PIXEL_CODE
from gateway.errors import ConfigError
from gateway.settings import Settings
from tests.support import PIXEL, TOKEN, Gateway, GatewayFactory, sha256
from tests.tiktok_stub import TikTokStub

UA = "Mozilla/5.0 (X11; Linux x86_64) DemoTest/1.0"
TTP = "demoTtpCookieValue000000001"
QUICK = {"shutdown_timeout": 1.0}


@pytest.fixture
async def sandbox(make_gateway: GatewayFactory) -> Gateway:
    """A gateway as `make run` starts it: no pixels, so sandbox mode and the demo."""
    return await make_gateway(pixels={}, merge_window=30.0, **QUICK)


def sandbox_log(gateway: Gateway) -> Path:
    return gateway.settings.data_dir / "sandbox-forwarded.jsonl"


async def get_json(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Cache-Control"] == "no-store"
        answer: dict[str, Any] = orjson.loads(await resp.read())
        return answer


async def place_order(
    http: aiohttp.ClientSession, gateway: Gateway, event: str, event_id: Any
) -> tuple[int, dict[str, Any]]:
    body = {"event": event, "event_id": event_id, "value": 29.99, "currency": "USD"}
    headers = {"Referer": f"{gateway.url}/demo/"}
    async with http.post(f"{gateway.url}/demo/order", json=body, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read())


async def beacon(
    http: aiohttp.ClientSession, gateway: Gateway, event: str, event_id: str, pixel: str
) -> None:
    """The browser copy, as pixel.js posts it from the demo page (same origin)."""
    body = {
        "pixel_code": pixel,
        "event": event,
        "event_id": event_id,
        "page": {"url": f"{gateway.url}/demo/"},
        "properties": {"currency": "USD", "value": 29.99},
    }
    headers = {
        "Content-Type": "text/plain;charset=UTF-8",
        "User-Agent": UA,
        "Origin": gateway.url,
        "Cookie": f"_ttp={TTP}",
    }
    url = f"{gateway.url}/pixel/events"
    async with http.post(url, data=orjson.dumps(body), headers=headers) as resp:
        assert resp.status == 200, await resp.text()


async def wait_for_state(
    http: aiohttp.ClientSession, gateway: Gateway, pixel: str, event: str, event_id: str
) -> dict[str, Any]:
    url = f"{gateway.url}/demo/status?pixel={pixel}&event={event}&event_id={event_id}"
    for _ in range(200):
        status = await get_json(http, url)
        if status["key"] and status["key"]["state"] == "sent" and (
            status["forwarded"] or not gateway.settings.sandbox
        ):
            return status
        await asyncio.sleep(0.025)
    raise AssertionError(f"{event} {event_id} was not forwarded: {status}")


# -- the pages -----------------------------------------------------------------------------


async def test_the_shop_page_loads_the_stand_in_pixel_and_pixel_js(
    sandbox: Gateway, http: aiohttp.ClientSession
) -> None:
    async with http.get(f"{sandbox.url}/demo", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == "/demo/"
    async with http.get(f"{sandbox.url}/demo/") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    assert f"ttq.load('{DEMO_PIXEL_CODE}')" in page
    assert 'var r="/demo/tiktok-pixel-standin.js"' in page  # TikTok's base code, one URL changed
    assert '<script async src="/pixel.js"></script>' in page
    assert "tkgw.lastEventId" in page
    assert DEMO_EMAIL in page
    assert "%" + "PIXEL%" not in page
    async with http.get(f"{sandbox.url}/demo/tiktok-pixel-standin.js") as resp:
        assert resp.status == 200
        assert resp.content_type == "application/javascript"
        assert "TiktokPixelStandIn" in await resp.text()


async def test_not_served_when_pixels_are_configured(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(**QUICK)
    for method, path in [("GET", "/demo/"), ("POST", "/demo/order"), ("GET", "/demo/status")]:
        async with http.request(method, gateway.url + path) as resp:
            assert resp.status == 404, path


def test_outside_sandbox_mode_the_demo_needs_a_test_event_code() -> None:
    env = {"GATEWAY_PIXELS": f"{PIXEL}={TOKEN}", "GATEWAY_DEMO": "1"}
    with pytest.raises(ConfigError, match=r"GATEWAY_DEMO.*GATEWAY_TEST_EVENT_CODE"):
        Settings.from_env(env)
    settings = Settings.from_env({**env, "GATEWAY_TEST_EVENT_CODE": "TEST123"})
    assert settings.demo_enabled
    assert Settings.from_env({}).demo_enabled  # sandbox: on by default
    assert not Settings.from_env({"GATEWAY_DEMO": "0"}).demo_enabled


# -- the shop's server and the merge ---------------------------------------------------------


async def test_the_order_and_the_beacon_merge_into_one_event_in_the_sandbox_log(
    sandbox: Gateway, http: aiohttp.ClientSession
) -> None:
    status, answer = await place_order(http, sandbox, "CompletePayment", "demo-order-1")
    assert status == 200, answer
    assert answer["answer"]["code"] == 0
    [sent] = answer["sent"]["data"]
    assert sent["event_id"] == "demo-order-1"
    assert sent["user"]["email"] == DEMO_EMAIL  # what the shop's server sends, in the clear
    await beacon(http, sandbox, "CompletePayment", "demo-order-1", DEMO_PIXEL_CODE)

    state = await wait_for_state(http, sandbox, DEMO_PIXEL_CODE, "CompletePayment", "demo-order-1")
    assert state["key"]["sources"] == ["pixel", "server"]
    forwarded = state["forwarded"]
    assert forwarded["event_source_id"] == DEMO_PIXEL_CODE
    assert forwarded["user"]["email"] == sha256(DEMO_EMAIL)
    assert forwarded["user"]["ttp"] == TTP
    assert forwarded["user"]["user_agent"] == UA
    assert forwarded["properties"]["value"] == 29.99
    metrics = state["metrics"]
    assert metrics["gateway_events_received_total{source=pixel}"] == 1
    assert metrics["gateway_events_received_total{source=server}"] == 1
    assert metrics["gateway_events_merged_total"] == 1
    assert metrics["gateway_events_forwarded_total"] == 1

    lines = [orjson.loads(line) for line in sandbox_log(sandbox).read_bytes().splitlines()]
    events = [e for line in lines for e in line["data"] if e["event_id"] == "demo-order-1"]
    assert len(events) == 1


async def test_outside_sandbox_the_demo_reaches_tiktok_as_test_events(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(
        demo=True, test_event_code="TEST-DEMO", merge_window=30.0, **QUICK
    )
    status, answer = await place_order(http, gateway, "AddToCart", "demo-cart-1")
    assert (status, answer["answer"]["code"]) == (200, 0), answer
    assert answer["sent"]["event_source_id"] == PIXEL  # the first configured pixel
    await beacon(http, gateway, "AddToCart", "demo-cart-1", PIXEL)

    [event] = await tiktok.wait_for_events(1)
    assert event["event_id"] == "demo-cart-1"
    assert event["user"]["email"] == sha256(DEMO_EMAIL)
    assert event["user"]["ttp"] == TTP
    [request] = tiktok.track_requests()
    assert request.body["test_event_code"] == "TEST-DEMO"
    assert request.headers["Access-Token"] == TOKEN
    state = await wait_for_state(http, gateway, PIXEL, "AddToCart", "demo-cart-1")
    assert state["forwarded"] is None  # no sandbox log: the events went to TikTok


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"event": "Purchase", "event_id": "x"}, "event"),
        ({"event": "AddToCart"}, "event_id"),
        ({"event": "AddToCart", "event_id": "x", "value": "lots"}, "value"),
        ([], ""),
    ],
    ids=["other-event", "no-event-id", "bad-value", "not-an-object"],
)
async def test_a_bad_order_is_refused_naming_the_field(
    sandbox: Gateway, http: aiohttp.ClientSession, body: Any, field: str
) -> None:
    async with http.post(f"{sandbox.url}/demo/order", json=body) as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert answer["message"].startswith(field)


async def test_status_without_a_key_still_shows_the_counters(
    sandbox: Gateway, http: aiohttp.ClientSession
) -> None:
    status = await get_json(http, f"{sandbox.url}/demo/status")
    assert status["key"] is None
    assert status["metrics"]["gateway_events_forwarded_total"] == 0
