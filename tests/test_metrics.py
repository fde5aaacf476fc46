"""The metrics beyond the product minimum: code classes, pair completion, per-pixel match
keys, the background gauges (pending, dead letters, forward lag, Redis up), bounded labels."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from gateway import __version__
from gateway.events import STANDARD_EVENTS
from gateway.metrics import (
    EVENT_LABELS,
    FORWARD_BUCKETS,
    FORWARD_CODE_CLASSES,
    INGEST_BUCKETS,
    INGEST_ENDPOINTS,
    MATCH_KEYS,
    PAIR_SOURCES,
    SANDBOX_PIXEL_LABEL,
    Metrics,
    make_metrics,
)
from gateway.upstream import CODE_CLASSES, code_class
from tests.helpers import browser_event, post_browser, post_server, server_event, wait_drained
from tests.support import PIXEL, PIXEL2, TOKEN2, Gateway, GatewayFactory
from tests.tiktok_stub import Answer, TikTokStub

KEYS = "gateway_forwarded_keys_total"


@pytest.fixture
def fast_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.housekeeping.GAUGE_REFRESH_SECONDS", 0.05)


async def until(gateway: Gateway, name: str, check: object, labels: dict[str, str] | None = None,
                seconds: float = 5.0) -> float:
    deadline = time.monotonic() + seconds
    while True:
        value = gateway.metric(name, labels)
        if check(value) or time.monotonic() > deadline:  # type: ignore[operator]
            return value
        await asyncio.sleep(0.02)


# -- code classes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("http_status", "code", "expected"),
    [
        (200, 0, "0"),
        (200, 20001, "20001"),
        (200, 40105, "4xxxx_auth"),
        (200, 40001, "4xxxx_auth"),
        (200, 40100, "4xxxx_rate_limit"),
        (429, 40100, "4xxxx_rate_limit"),
        (200, 40202, "4xxxx_transient"),
        (200, 40002, "4xxxx_invalid"),
        (200, 50002, "5xxxx"),
        (200, 51003, "5xxxx"),
        (200, 60001, "other"),
        (502, None, "http_5xx"),
        (503, 0, "http_5xx"),  # a success code under an error status: the status says more
        (429, None, "http_4xx"),
        (403, None, "http_4xx"),
        (None, None, "network"),
        (200, None, "other"),  # a 2xx without TikTok's body: something in between
    ],
)
def test_code_class(http_status: int | None, code: int | None, expected: str) -> None:
    assert code_class(http_status, code) == expected
    assert expected in CODE_CLASSES


def test_the_outcome_code_class_pairs_started_at_zero_are_real_classes() -> None:
    assert set(FORWARD_CODE_CLASSES) == {"delivered", "retry", "rejected", "auth"}
    for classes in FORWARD_CODE_CLASSES.values():
        assert set(classes) <= set(CODE_CLASSES)
    assert {c for cs in FORWARD_CODE_CLASSES.values() for c in cs} == set(CODE_CLASSES)


# -- the registry and label values ------------------------------------------------------------


def test_each_registry_has_its_own_metrics() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    first, second = make_metrics(one, [PIXEL]), make_metrics(two, [PIXEL])
    first.forwarded.labels(PIXEL).inc()
    assert one.get_sample_value("gateway_events_forwarded_total", {"pixel": PIXEL}) == 1
    assert two.get_sample_value("gateway_events_forwarded_total", {"pixel": PIXEL}) == 0
    assert second.registry is two


def test_known_label_values_start_at_zero() -> None:
    registry = CollectorRegistry()
    make_metrics(registry, [PIXEL, PIXEL2])
    value = registry.get_sample_value
    for pixel in (PIXEL, PIXEL2):
        for key in MATCH_KEYS:
            assert value("gateway_match_keys_total", {"pixel": pixel, "key": key}) == 0
        for event in EVENT_LABELS:
            for sources in PAIR_SOURCES:
                labels = {"pixel": pixel, "event": event, "sources": sources}
                assert value(KEYS, labels) == 0
    for outcome, classes in FORWARD_CODE_CLASSES.items():
        for cls in classes:
            labels = {"outcome": outcome, "code_class": cls}
            assert value("gateway_forward_requests_total", labels) == 0
    for endpoint in INGEST_ENDPOINTS:
        assert value("gateway_ingest_duration_seconds_count", {"endpoint": endpoint}) == 0
    for name in ("gateway_forward_lag_seconds", "gateway_redis_up", "gateway_pending_events"):
        assert value(name) == 0
    assert value("gateway_build_info", {"version": __version__}) == 1
    # No pixel outside the configuration and TikTok's standard names (and "custom").
    pixels, events = set(), set()
    for metric in registry.collect():
        for sample in metric.samples:
            pixels.add(sample.labels.get("pixel"))
            events.add(sample.labels.get("event"))
    assert pixels - {None} == {PIXEL, PIXEL2}
    assert events - {None} == {*STANDARD_EVENTS, "custom"}


def test_sandbox_pixels_share_one_label() -> None:
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    assert metrics.pixel_label("CANYTHING", {}) == SANDBOX_PIXEL_LABEL
    assert registry.get_sample_value(
        "gateway_events_received_total", {"source": "pixel", "pixel": SANDBOX_PIXEL_LABEL}
    ) == 0


def test_event_and_pair_labels() -> None:
    assert Metrics.event_label("Purchase") == "Purchase"
    assert Metrics.event_label("purchase") == "custom"  # standard names are case-sensitive
    assert Metrics.event_label("MyCustomEvent") == "custom"
    assert Metrics.pair_label(frozenset({"pixel", "server"})) == "both"
    assert Metrics.pair_label(frozenset({"pixel"})) == "pixel_only"
    assert Metrics.pair_label(frozenset({"server"})) == "server_only"
    assert Metrics.pair_label(frozenset()) is None


def test_buckets_reach_from_below_a_millisecond_to_seconds() -> None:
    assert INGEST_BUCKETS[0] < 0.001 and INGEST_BUCKETS[-1] >= 2.5
    assert FORWARD_BUCKETS[0] < 0.001 and FORWARD_BUCKETS[-1] >= 10
    assert list(INGEST_BUCKETS) == sorted(INGEST_BUCKETS)
    assert list(FORWARD_BUCKETS) == sorted(FORWARD_BUCKETS)


# -- pair completion and match keys, end to end ---------------------------------------------


async def test_pair_completion_counts_keys_by_the_sources_they_were_seen_from(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.3)
    for i in range(2):  # two pairs
        await post_browser(http, gateway.url, browser_event(f"pc-{i}"))
        await post_server(http, gateway.url, [server_event(f"pc-{i}")])
    # A pixel CompletePayment and a server Purchase are one key, labelled by the current name.
    await post_browser(http, gateway.url, browser_event("pc-alias", "CompletePayment"))
    await post_server(http, gateway.url, [server_event("pc-alias", "Purchase")])
    await post_server(http, gateway.url, [server_event("pc-solo")])  # the pixel never came
    await post_browser(http, gateway.url, browser_event("pc-blocked", "AddToCart"))
    await post_server(http, gateway.url, [server_event("pc-custom", "MyCustomEvent")])
    await post_server(http, gateway.url, [server_event(None)])  # no event_id: not a key
    await post_server(http, gateway.url, [server_event("pc-p2")], pixel=PIXEL2, token=TOKEN2)
    await tiktok.wait_for_events(8)
    await wait_drained(gateway)

    def keys(event: str, sources: str, pixel: str = PIXEL) -> float:
        return gateway.metric(KEYS, {"pixel": pixel, "event": event, "sources": sources})

    assert keys("Purchase", "both") == 3
    assert keys("Purchase", "server_only") == 1
    assert keys("Purchase", "pixel_only") == 0
    assert keys("CompletePayment", "both") == 0
    assert keys("AddToCart", "pixel_only") == 1
    assert keys("custom", "server_only") == 1
    assert gateway.metric("gateway_events_forwarded_total", {"pixel": PIXEL}) == 7
    # 3 + 1 + 1 + 1 keys; the event without event_id is forwarded but is no key.
    total = sum(
        keys(event, sources) for event in EVENT_LABELS for sources in PAIR_SOURCES
    )
    assert total == 6
    # Match keys per pixel: the merged pairs carry both sides' keys.
    assert gateway.metric("gateway_match_keys_total", {"pixel": PIXEL, "key": "ttp"}) == 4
    assert gateway.metric("gateway_match_keys_total", {"pixel": PIXEL, "key": "email"}) == 6
    assert gateway.metric("gateway_match_keys_total", {"pixel": PIXEL2, "key": "email"}) == 1
    assert gateway.metric("gateway_match_keys_total", {"pixel": PIXEL2, "key": "ttp"}) == 0


async def test_upstream_requests_are_counted_by_code_class(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    tiktok.queue(Answer(code=40100), Answer(http_status=502, raw_body=b"<html>bad gateway"))
    gateway = await make_gateway(merge_window=0.05)
    await post_server(http, gateway.url, [server_event("cc-1")])
    await tiktok.wait_for_events(1)
    await wait_drained(gateway)

    def requests(outcome: str, cls: str) -> float:
        return gateway.metric(
            "gateway_forward_requests_total", {"outcome": outcome, "code_class": cls}
        )

    assert requests("retry", "4xxxx_rate_limit") == 1
    assert requests("retry", "http_5xx") == 1
    assert requests("delivered", "0") == 1
    assert gateway.metric("gateway_forward_retries_total") == 2


# -- gauges from the background task ---------------------------------------------------------


async def test_backlog_gauges_follow_redis(
    fast_gauges: None,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    # No forwarder: events stay due, and the lag grows from the end of their merge window.
    gateway = await make_gateway(forward=False, merge_window=0.1)
    assert await until(gateway, "gateway_redis_up", lambda v: v == 1) == 1
    await post_server(http, gateway.url, [server_event("g-1"), server_event("g-2")])
    assert await until(gateway, "gateway_pending_events", lambda v: v == 2) == 2
    lag = await until(gateway, "gateway_forward_lag_seconds", lambda v: v >= 0.3)
    assert 0.3 <= lag < 10
    assert gateway.metric("gateway_dead_letter_events") == 0


async def test_dead_letter_gauge_and_lag_back_to_zero_once_forwarded(
    fast_gauges: None,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(merge_window=0.05)
    tiktok.reject_event_ids.add("g-bad")
    await post_server(http, gateway.url, [server_event("g-bad"), server_event("g-ok")])
    await wait_drained(gateway, dead_letters=1)
    assert await until(gateway, "gateway_dead_letter_events", lambda v: v == 1) == 1
    assert await until(gateway, "gateway_pending_events", lambda v: v == 0) == 0
    assert await until(gateway, "gateway_forward_lag_seconds", lambda v: v == 0) == 0


async def test_a_scrape_never_waits_on_redis(
    fast_gauges: None, make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(redis_url="redis://127.0.0.1:1")  # nothing listens there
    started = time.monotonic()
    async with http.get(f"{gateway.url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    assert time.monotonic() - started < 0.5
    assert "gateway_redis_up 0.0" in text
    assert await until(gateway, "gateway_redis_errors_total", lambda v: v >= 2) >= 2
