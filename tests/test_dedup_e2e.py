"""Deduplication end to end: real gateways, real Redis, the TikTok stand-in over HTTP."""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.helpers import (
    browser_event,
    post_browser,
    post_server,
    server_event,
    wait_drained,
    wait_for,
)
from tests.support import PIXEL, PIXEL2, TOKEN2, GatewayFactory, sha256
from tests.tiktok_stub import TikTokStub


async def test_pixel_and_server_copies_merge_into_one_enriched_event(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    # A long merge window: only the early flush of a complete pair can forward in time.
    gateway = await make_gateway(merge_window=60.0)
    answer = await post_browser(http, gateway.url, browser_event("order-1"))
    assert answer["code"] == 0, answer
    answer = await post_server(http, gateway.url, [server_event("order-1")])
    assert answer["code"] == 0, answer

    [event] = await tiktok.wait_for_events(1)
    assert event["event_id"] == "order-1"
    assert event["user"]["ttp"] == "ttp-cookie-value-0000000001"
    assert event["user"]["ttclid"] == "E.C.P.click-1"
    assert event["user"]["user_agent"].startswith("Mozilla/5.0")
    assert event["user"]["ip"] == "127.0.0.1"
    assert event["user"]["email"] == sha256("jane.doe@example.com")
    assert event["user"]["external_id"] == sha256("customer-8841")
    assert event["properties"]["value"] == 59.98
    [request] = tiktok.track_requests()
    assert request.headers["Access-Token"] == "token-one-0123456789"
    assert request.body["event_source_id"] == PIXEL
    assert gateway.metric("gateway_events_merged_total", {"pixel": PIXEL}) == 1
    await wait_drained(gateway)


async def test_lone_event_is_forwarded_once_when_the_window_closes(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.5)
    sent_at = asyncio.get_running_loop().time()
    await post_server(http, gateway.url, [server_event("lone-1")])
    [event] = await tiktok.wait_for_events(1)
    assert tiktok.track_requests()[0].received_at - sent_at >= 0.5
    assert event["event_id"] == "lone-1"
    await wait_drained(gateway)
    assert len(tiktok.events()) == 1
    assert gateway.metric("gateway_events_forwarded_total", {"pixel": PIXEL}) == 1


async def test_copy_after_the_forward_is_dropped(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.2)
    await post_server(http, gateway.url, [server_event("late-1")])
    await tiktok.wait_for_events(1)
    await wait_drained(gateway)

    answer = await post_browser(http, gateway.url, browser_event("late-1"))
    assert answer["code"] == 0
    answer = await post_server(http, gateway.url, [server_event("late-1")])
    assert answer["code"] == 0
    # What a copy is, the shard's owner decides once it reads it: shortly after the answer.
    await wait_for(
        lambda: gateway.metric("gateway_events_duplicates_dropped_total", {"pixel": PIXEL}) >= 2,
        "the duplicates counted",
    )
    await wait_drained(gateway)
    assert gateway.metric("gateway_events_duplicates_dropped_total", {"pixel": PIXEL}) == 2
    assert len(tiktok.events()) == 1


async def test_same_event_id_with_other_name_or_pixel_stays_apart(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.3)
    await post_server(http, gateway.url, [server_event("shared-1", "Purchase")])
    await post_server(http, gateway.url, [server_event("shared-1", "AddToCart")])
    await post_server(
        http, gateway.url, [server_event("shared-1", "Purchase")], pixel=PIXEL2, token=TOKEN2
    )
    events = await tiktok.wait_for_events(3)
    await wait_drained(gateway)
    assert sorted(e["event"] for e in events) == ["AddToCart", "Purchase", "Purchase"]
    pixels = sorted(r.body["event_source_id"] for r in tiktok.track_requests())
    assert pixels.count(PIXEL2) == 1
    assert len(tiktok.events()) == 3


async def test_three_copies_give_one_forward(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.5, early_flush=False)
    await post_server(http, gateway.url, [server_event("three-1", email=None)])
    await post_browser(http, gateway.url, browser_event("three-1"))
    await post_server(http, gateway.url, [server_event("three-1", email="late@example.com")])
    [event] = await tiktok.wait_for_events(1)
    await wait_drained(gateway)
    assert len(tiktok.events()) == 1
    # The third copy filled the email the first two lacked.
    assert event["user"]["email"] == sha256("late@example.com")
    assert event["user"]["ttp"] == "ttp-cookie-value-0000000001"
    assert gateway.metric("gateway_events_merged_total", {"pixel": PIXEL}) == 2


async def test_early_flush_off_waits_for_the_window(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.6, early_flush=False)
    sent_at = asyncio.get_running_loop().time()
    await post_browser(http, gateway.url, browser_event("wait-1"))
    await post_server(http, gateway.url, [server_event("wait-1")])
    await tiktok.wait_for_events(1)
    assert tiktok.track_requests()[0].received_at - sent_at >= 0.6


async def test_event_without_event_id_goes_straight_through(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=60.0)
    await post_server(http, gateway.url, [server_event(None), server_event(None)])
    events = await tiktok.wait_for_events(2)
    assert all("event_id" not in e for e in events)
    await wait_drained(gateway)


async def test_legacy_name_and_new_name_are_one_event(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=60.0)
    await post_browser(http, gateway.url, browser_event("alias-1", "CompletePayment"))
    await post_server(http, gateway.url, [server_event("alias-1", "Purchase")])
    [event] = await tiktok.wait_for_events(1)
    assert event["event"] == "CompletePayment"  # the first copy's name


async def test_legacy_aliases_off_keeps_names_apart(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.3, legacy_aliases=False)
    await post_browser(http, gateway.url, browser_event("alias-2", "CompletePayment"))
    await post_server(http, gateway.url, [server_event("alias-2", "Purchase")])
    events = await tiktok.wait_for_events(2)
    assert sorted(e["event"] for e in events) == ["CompletePayment", "Purchase"]


async def test_forwarded_event_keeps_first_copy_event_time(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=60.0)
    first = int(time.time()) - 30
    await post_server(http, gateway.url, [server_event("time-1", event_time=first)])
    await post_browser(http, gateway.url, browser_event("time-1", timestamp=first + 20))
    [event] = await tiktok.wait_for_events(1)
    assert event["event_time"] == first


async def test_test_event_code_from_request_wins_over_configured(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.2, test_event_code="CONFIGURED")
    await post_server(http, gateway.url, [server_event("tec-1")], test_event_code="REQUEST")
    await post_server(http, gateway.url, [server_event("tec-2")])
    await tiktok.wait_for_events(2)
    codes = sorted(r.body.get("test_event_code") for r in tiktok.track_requests())
    assert codes == ["CONFIGURED", "REQUEST"]
    assert all("test_event_code" not in e for e in tiktok.events())


async def test_two_instances_on_one_redis_forward_each_key_once(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    one = await make_gateway(merge_window=0.5)
    two = await make_gateway(merge_window=0.5)
    keys = [f"pair-{i}" for i in range(60)]

    async def send(i: int, key: str) -> None:
        pixel_to, server_to = (one, two) if i % 2 else (two, one)
        await asyncio.gather(
            post_browser(http, pixel_to.url, browser_event(key)),
            post_server(http, server_to.url, [server_event(key)]),
        )

    await asyncio.gather(*(send(i, key) for i, key in enumerate(keys)))
    await tiktok.wait_for_events(len(keys))
    await wait_drained(one)
    events = tiktok.events()
    assert sorted(e["event_id"] for e in events) == sorted(keys)
    merged = sum(
        g.metric("gateway_events_merged_total", {"pixel": PIXEL}) for g in (one, two)
    )
    assert merged == len(keys)
    for event in events:
        assert event["user"]["email"] == sha256("jane.doe@example.com")
        assert event["user"]["ttp"] == "ttp-cookie-value-0000000001"
