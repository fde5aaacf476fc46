"""What the console reads: the shard owners' tallies and the history, through a running
gateway on real Redis with the TikTok stand-in; every instance reads the same numbers."""

from __future__ import annotations

import time

import aiohttp

from gateway.console.reading import ConsoleReader
from gateway.console.tally import GAP_BUCKETS, SKEW_BUCKETS, bucket
from gateway.console.views import Check, Overview
from tests.helpers import browser_event, post_browser, post_server, server_event
from tests.support import PIXEL, Gateway, GatewayFactory, poll_until
from tests.tiktok_stub import Answer, TikTokStub


async def _overview_when(
    gateway: Gateway, holds: object, what: str, pixel: str | None = PIXEL
) -> Overview:
    reader = ConsoleReader(gateway.store)
    seen: list[Overview] = []

    async def check() -> bool:
        seen[:] = [await reader.overview(pixel, "15m", time.time())]
        return bool(holds(seen[0]))  # type: ignore[operator]

    await poll_until(check, lambda: f"{what}; last overview {seen[-1:]}")
    return seen[0]


def _check(checks: list[Check], check_id: str) -> Check:
    return next(c for c in checks if c.id == check_id)


def test_buckets_name_their_upper_bound() -> None:
    assert bucket(0.5, GAP_BUCKETS) == "le1"
    assert bucket(300, GAP_BUCKETS) == "le300"
    assert bucket(301, GAP_BUCKETS) == "more"
    assert bucket(-400, SKEW_BUCKETS) == "le-300"


async def test_overview_counts_pairs_duplicates_match_keys_and_answers(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.5)
    other = await make_gateway(forward=False)  # reads the same numbers
    await post_browser(http, gateway.url, browser_event("both-1"))
    await post_server(http, gateway.url, [server_event("both-1"), server_event("server-1")])
    await post_browser(http, gateway.url, browser_event("pixel-1"))
    await post_server(http, gateway.url, [server_event(None)])  # no event_id
    await tiktok.wait_for_events(4)
    await post_server(http, gateway.url, [server_event("both-1")])  # a duplicate
    await post_server(http, gateway.url, [server_event("pixel-1")])  # late: its key left

    view = await _overview_when(
        other, lambda o: o.duplicates == 2 and o.forwarded == 4, "4 forwarded, 2 dropped"
    )
    assert view.received == {"pixel": 2, "server": 3}
    assert view.without_event_id == 1
    [row] = view.events
    assert (row.event, row.received_pixel, row.received_server) == ("Purchase", 2, 3)
    assert (row.both, row.pixel_only, row.server_only, row.duplicates) == (1, 1, 2, 2)
    assert row.pixel_paired == 0.5
    assert row.match_keys["email"] == 3  # the merged pair and both server-only keys
    assert row.match_keys["ttp"] == 2  # the pixel's cookie, on the two keys it sent
    assert view.answers["ok"] == 4
    assert view.lag_avg is not None and view.lag_max is not None and view.lag_max >= 0.5
    assert view.pixels == [PIXEL]
    assert view.last_answers[PIXEL].outcome == "ok"
    assert sum(p.forwarded for p in view.series) == 4
    assert view.series[-1].start <= time.time() < view.series[-1].start + 60

    checks = await ConsoleReader(other.store).checks(PIXEL, time.time())
    gap = _check(checks, "gap")
    assert gap.verdict == "fail", gap  # one pair met, one copy came late
    assert any("1 met" in value for _label, value in gap.evidence), gap.evidence
    assert _check(checks, "event_id").verdict == "warn"  # 1 of 3 server copies without
    assert _check(checks, "pixel_js").evidence[0][0] == "https://shop.example.com"
    assert _check(checks, "tiktok").verdict == "ok"


async def test_mismatched_ids_are_diagnosed_with_samples_side_by_side(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.2)
    for n in range(3):
        await post_browser(http, gateway.url, browser_event(f"px-{n}"))
        await post_server(http, gateway.url, [server_event(f"order-{n}")])
    await tiktok.wait_for_events(6)
    reader = ConsoleReader(gateway.store)
    found: list[Check] = []

    async def diagnosed() -> bool:
        found[:] = [_check(await reader.checks(None, time.time()), "pairs")]
        return found[0].verdict == "fail"

    await poll_until(diagnosed, lambda: f"pairs failing; last {found}")
    [pairs] = found
    assert pairs.samples
    event, pixel_id, server_id, _minute = pairs.samples[0]
    assert event == "Purchase"
    assert pixel_id.startswith("px-") and server_id.startswith("order-")
    assert "different event_ids" in pairs.finding


async def test_live_lists_recent_keys_newest_first_with_filters(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=30.0)
    await post_browser(http, gateway.url, browser_event("live-1"))
    await post_server(http, gateway.url, [server_event("live-1")])
    await tiktok.wait_for_events(1)
    await post_server(http, gateway.url, [server_event("live-2", "AddToCart")])
    reader = ConsoleReader(gateway.store)

    async def listed() -> bool:
        return len(await reader.live(time.time())) == 2

    await poll_until(listed, "two keys in the live view")
    newest, older = await reader.live(time.time())
    assert (newest.event_id, newest.state, newest.sources) == ("live-2", "open", ["server"])
    assert (older.event_id, older.state, older.merged) == ("live-1", "forwarded", True)
    assert older.request_id and older.code == 0
    assert "user.email" in older.copies[-1].fields
    [only] = await reader.live(time.time(), event="AddToCart")
    assert only.event_id == "live-2"
    [by_id] = await reader.live(time.time(), event_id="live-1")
    assert by_id.event == "Purchase"
    assert await reader.live(time.time(), pixel="CNOSUCHPIXEL") == []


async def test_tiktok_refusing_the_token_fails_its_check(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    tiktok.queue(Answer(code=40105, message="Access token is invalid"))
    gateway = await make_gateway(merge_window=0.1)
    await post_server(http, gateway.url, [server_event("refused-1")])
    view = await _overview_when(gateway, lambda o: o.answers["auth"] == 1, "an auth answer")
    assert view.last_answers[PIXEL].code == 40105
    tiktok_check = _check(await ConsoleReader(gateway.store).checks(None, time.time()), "tiktok")
    assert tiktok_check.verdict == "fail"
    assert "Access token is invalid" in tiktok_check.evidence[0][1]
