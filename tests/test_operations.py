"""Operations end to end: health, readiness, metrics, pass-through, debug, and Redis trouble."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from gateway.app import create_app
from gateway.embedded import EmbeddedRedis
from gateway.errors import LayoutMismatch
from gateway.store import LAYOUT_KEY
from tests.helpers import (
    browser_event,
    post_browser,
    post_server,
    server_event,
    wait_counts,
    wait_timeline,
)
from tests.support import PIXEL, TOKEN, Gateway, GatewayFactory, base_settings, free_port, sha256
from tests.tiktok_stub import TikTokStub

WINDOW = 0.2
ENVELOPE_KEYS = {"code", "message", "request_id", "data"}
EMAIL = "jane.doe@example.com"


async def get_envelope(
    http: aiohttp.ClientSession, url: str | URL, **kwargs: Any
) -> tuple[int, dict[str, Any]]:
    async with http.get(url, **kwargs) as resp:
        answer: dict[str, Any] = orjson.loads(await resp.read())
        return resp.status, answer


# -- health and readiness -----------------------------------------------------------------


async def test_healthz_and_readyz_with_redis(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    async with http.get(f"{gateway.url}/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "ready"


@pytest.fixture
async def gateway_without_redis(
    redis_url: str, tiktok: TikTokStub, tmp_path: Path
) -> AsyncIterator[Gateway]:
    """A gateway whose Redis is a closed port (make_gateway fixes the URL to the test's Redis)."""
    settings = dataclasses.replace(
        base_settings(redis_url, tiktok.url, tmp_path / "data"), redis_url="redis://127.0.0.1:1"
    )
    registry = CollectorRegistry()
    app = create_app(settings, registry=registry)
    runner = web.AppRunner(app, shutdown_timeout=2.0)
    await runner.setup()  # starts although Redis does not answer
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield Gateway(f"http://127.0.0.1:{port}", app, settings, registry, runner)
    await runner.cleanup()


async def test_without_redis_the_gateway_starts_and_acknowledges_nothing(
    gateway_without_redis: Gateway,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    gateway = gateway_without_redis
    async with http.get(f"{gateway.url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{gateway.url}/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["status"] == "unavailable"

    body = {"event_source": "web", "event_source_id": PIXEL, "data": [server_event("down-1")]}
    async with http.post(
        f"{gateway.url}/open_api/v1.3/event/track/", json=body, headers={"Access-Token": TOKEN}
    ) as resp:
        assert resp.status == 503
        answer = await resp.json()
    assert set(answer) == ENVELOPE_KEYS
    assert answer["code"] == 50002  # TikTok's "retry later": clients' retry logic knows it
    assert "retry" in answer["message"]

    async with http.post(
        f"{gateway.url}/pixel/events", json=browser_event("down-2")
    ) as resp:
        assert resp.status == 503
        assert (await resp.json())["code"] == 50002

    assert gateway.metric("gateway_events_rejected_total", {"reason": "store_unavailable"}) == 2
    for source in ("server", "pixel"):
        labels = {"source": source, "pixel": PIXEL}
        assert gateway.metric("gateway_events_received_total", labels) == 0
    assert gateway.metric("gateway_redis_errors_total") >= 2
    assert tiktok.requests == []
    assert await redis_client.keys("tkgw:*") == []  # the real Redis saw nothing either


# -- one layout per Redis ------------------------------------------------------------------


async def test_a_gateway_with_other_shards_refuses_to_start_on_a_used_redis(
    make_gateway: GatewayFactory, redis_client: aioredis.Redis
) -> None:
    await make_gateway()  # 4 shards: the first on this Redis records its layout
    assert await redis_client.get(LAYOUT_KEY) == b"shards=4 dedup_buckets=1024 store=log"
    # It would look for every event in the wrong shard: unmerged pairs, undropped duplicates.
    with pytest.raises(
        LayoutMismatch, match="shards=4 dedup_buckets=1024 store=log, this instance has"
    ):
        await make_gateway(shards=8)
    with pytest.raises(LayoutMismatch):
        await make_gateway(dedup_buckets=4096)
    assert await redis_client.get(LAYOUT_KEY) == b"shards=4 dedup_buckets=1024 store=log"


async def test_readyz_says_misconfigured_when_redis_appears_laid_out_otherwise(
    redis_url: str, tiktok: TikTokStub, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    redis_port = free_port()
    settings = dataclasses.replace(
        base_settings(redis_url, tiktok.url, tmp_path / "data"),
        redis_url=f"redis://127.0.0.1:{redis_port}",
    )
    runner = web.AppRunner(create_app(settings, registry=CollectorRegistry()))
    await runner.setup()  # Redis is not there yet: it starts, unready
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    late = EmbeddedRedis(tmp_path / "late-redis", port=redis_port)
    try:
        status, answer = await get_envelope(http, f"http://127.0.0.1:{port}/readyz")
        assert (status, answer["status"]) == (503, "unavailable")
        client = aioredis.Redis.from_url(await late.start())
        await client.set(LAYOUT_KEY, "shards=64 dedup_buckets=1024")
        await client.aclose()

        status, answer = await get_envelope(http, f"http://127.0.0.1:{port}/readyz")
        assert (status, answer["status"]) == (503, "misconfigured")
        assert "laid out with shards=64 dedup_buckets=1024, this instance has shards=4" in (
            answer["redis"]
        )
    finally:
        await runner.cleanup()
        await late.stop()


# -- metrics -------------------------------------------------------------------------------

COUNTERS = (
    "gateway_events_received",
    "gateway_events_merged",
    "gateway_events_duplicates_dropped",
    "gateway_events_forwarded",
    "gateway_events_rejected",
    "gateway_events_dead_lettered",
    "gateway_forward_requests",
    "gateway_match_keys",
)
HISTOGRAMS = (
    "gateway_forward_duration_seconds",
    "gateway_ingest_duration_seconds",
    "gateway_merge_wait_seconds",
)
GAUGES = ("gateway_pending_events", "gateway_dead_letter_events")


async def scrape(http: aiohttp.ClientSession, gateway: Gateway) -> dict[str, Any]:
    """The exposition as {family name: family}, read over HTTP like Prometheus does."""
    async with http.get(f"{gateway.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(families: dict[str, Any], name: str, **labels: str) -> float:
    """The value of one sample (e.g. `x_total`, `x_count`) with exactly these labels."""
    for family in families.values():
        for s in family.samples:
            if s.name == name and s.labels == labels:
                value: float = s.value
                return value
    raise AssertionError(f"no sample {name}{labels}")


async def test_metrics_expose_every_product_metric(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    families = await scrape(http, gateway)
    for name in COUNTERS:
        assert families[name].type == "counter", name
        assert any(s.name == f"{name}_total" for s in families[name].samples), name
    for name in HISTOGRAMS:
        assert families[name].type == "histogram", name
    for name in GAUGES:
        assert families[name].type == "gauge", name
    # Known label values start at zero, so dashboards and rate() see them from the start.
    assert sample(families, "gateway_events_received_total", source="pixel", pixel=PIXEL) == 0
    for key in ("email", "phone", "external_id", "ttp", "ttclid", "ip", "user_agent"):
        assert sample(families, "gateway_match_keys_total", pixel=PIXEL, key=key) == 0
    for outcome, code_class in (
        ("delivered", "0"), ("retry", "network"), ("rejected", "4xxxx_invalid"),
        ("auth", "4xxxx_auth"),
    ):
        assert sample(
            families, "gateway_forward_requests_total", outcome=outcome, code_class=code_class
        ) == 0


async def test_metrics_move_with_traffic(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=WINDOW)
    await post_browser(http, gateway.url, browser_event("m-1"))
    server = server_event("m-1")
    server["user"]["phone"] = "+1 415 555 2671"
    assert (await post_server(http, gateway.url, [server]))["code"] == 0
    [forwarded] = await tiktok.wait_for_events(1)
    await wait_counts(gateway, 0)
    assert (await post_server(http, gateway.url, [server_event("m-1")]))["code"] == 0  # too late
    tiktok.reject_event_ids.add("m-bad")
    assert (await post_server(http, gateway.url, [server_event("m-bad")]))["code"] == 0
    await wait_counts(gateway, 0, dead_letters=1)
    async with http.post(f"{gateway.url}/pixel/events", data=b"{") as resp:
        assert resp.status == 400

    families = await scrape(http, gateway)
    assert sample(families, "gateway_events_received_total", source="pixel", pixel=PIXEL) == 1
    assert sample(families, "gateway_events_received_total", source="server", pixel=PIXEL) == 3
    assert sample(families, "gateway_events_merged_total", pixel=PIXEL) == 1
    assert sample(families, "gateway_events_duplicates_dropped_total", pixel=PIXEL) == 1
    assert sample(families, "gateway_events_forwarded_total", pixel=PIXEL) == 1
    assert sample(families, "gateway_events_dead_lettered_total", reason="rejected") == 1
    assert sample(families, "gateway_events_rejected_total", reason="invalid_json") == 1
    delivered = {"outcome": "delivered", "code_class": "0"}
    assert sample(families, "gateway_forward_requests_total", **delivered) >= 1
    rejected = {"outcome": "rejected", "code_class": "4xxxx_invalid"}
    assert sample(families, "gateway_forward_requests_total", **rejected) >= 1
    assert set(forwarded["user"]) >= {"email", "phone", "external_id", "ttp", "ttclid", "ip"}
    for key in ("email", "phone", "external_id", "ttp", "ttclid", "ip", "user_agent"):
        assert sample(families, "gateway_match_keys_total", pixel=PIXEL, key=key) == 1, key
    assert sample(families, "gateway_ingest_duration_seconds_count", endpoint="browser") == 1
    assert sample(families, "gateway_ingest_duration_seconds_count", endpoint="event_track") == 3
    assert sample(families, "gateway_forward_duration_seconds_count") >= 2
    assert sample(families, "gateway_merge_wait_seconds_count") == 1
    # The pair left at once when complete, long before its window would have closed.
    assert sample(families, "gateway_merge_wait_seconds_sum") < WINDOW


async def test_metric_labels_stay_bounded_under_unknown_pixels(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    for i in range(5):
        await post_browser(http, gateway.url, browser_event(f"b-{i}", pixel=f"CBOT{i:016d}"))
    families = await scrape(http, gateway)
    pixels = {
        s.labels.get("pixel")
        for family in families.values()
        for s in family.samples
        if "pixel" in s.labels
    }
    assert pixels == set(gateway.settings.pixels)


# -- pass-through --------------------------------------------------------------------------


async def test_other_open_api_paths_pass_through_unchanged(
    gateway: Gateway, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    # encoded=True: sent exactly as written, so the relay must keep the %2F too.
    url = URL(f"{gateway.url}/open_api/v1.3/pixel/list/?advertiser_id=1&code=a%2Fb", encoded=True)
    status, answer = await get_envelope(http, url, headers={"Access-Token": TOKEN})
    assert status == 200
    assert answer["code"] == 0
    assert answer["request_id"].startswith("stub")  # TikTok's answer, not ours
    assert answer["data"] == {
        "method": "GET", "path": "/open_api/v1.3/pixel/list/",
        "query": "advertiser_id=1&code=a%2Fb", "body_length": 0,
    }

    body = orjson.dumps({"advertiser_id": "1", "name": "shop pixel"})
    async with http.post(
        f"{gateway.url}/open_api/v1.3/pixel/create/", data=body,
        headers={"Access-Token": TOKEN, "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert answer["data"]["method"] == "POST"
    assert answer["data"]["body_length"] == len(body)

    get, post = tiktok.requests
    assert get.headers["Access-Token"] == TOKEN
    assert get.query == {"advertiser_id": "1", "code": "a/b"}
    assert post.headers["Access-Token"] == TOKEN
    assert post.body == {"advertiser_id": "1", "name": "shop pixel"}
    assert tiktok.track_requests() == []


async def test_pass_through_off_answers_404_in_tiktok_envelope(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(passthrough=False)
    status, answer = await get_envelope(
        http, f"{gateway.url}/open_api/v1.3/pixel/list/?advertiser_id=1",
        headers={"Access-Token": TOKEN},
    )
    assert status == 404
    assert set(answer) == ENVELOPE_KEYS
    assert answer["code"] == 40400
    assert "/open_api/v1.3/pixel/list/" in answer["message"]
    assert tiktok.requests == []


# -- unknown routes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/nope", 404),
        ("POST", "/pixel/nope", 404),
        ("GET", "/pixel/events", 405),
        ("DELETE", "/metrics", 405),
    ],
)
async def test_unknown_routes_get_a_tiktok_envelope(
    gateway: Gateway, http: aiohttp.ClientSession, method: str, path: str, status: int
) -> None:
    async with http.request(method, gateway.url + path) as resp:
        assert resp.status == status
        answer = await resp.json()
    assert set(answer) == ENVELOPE_KEYS
    assert answer["code"] == (40400 if status == 404 else 40000)
    assert path in answer["message"]


# -- debug -------------------------------------------------------------------------------


async def test_debug_is_off_without_an_admin_token(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    await post_server(http, gateway.url, [server_event("dbg-0")])
    status, answer = await get_envelope(
        http, f"{gateway.url}/debug/events/{PIXEL}/dbg-0/Purchase",
        headers={"Authorization": "Bearer anything"},
    )
    assert status == 404
    assert answer["code"] == 40400
    assert "GATEWAY_ADMIN_TOKEN" in answer["message"]


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong", "Bearer ", "Basic c2VjcmV0"],
    ids=["none", "wrong", "empty", "basic"],
)
async def test_debug_needs_the_bearer_token(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, authorization: str | None
) -> None:
    gateway = await make_gateway(admin_token="secret")
    await post_server(http, gateway.url, [server_event("dbg-1")])
    headers = {"Authorization": authorization} if authorization else {}
    status, answer = await get_envelope(
        http, f"{gateway.url}/debug/events/{PIXEL}/dbg-1/Purchase", headers=headers
    )
    assert status in (401, 403)
    assert answer["code"] != 0
    assert answer["data"] == {}


async def test_debug_shows_state_and_timeline_but_never_pii(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(admin_token="secret", merge_window=WINDOW)
    await post_browser(http, gateway.url, browser_event("dbg-2"))
    await post_server(http, gateway.url, [server_event("dbg-2", email=EMAIL)])
    await tiktok.wait_for_events(1)
    await wait_counts(gateway, 0)
    await post_server(http, gateway.url, [server_event("dbg-2", email=EMAIL)])  # a duplicate
    await wait_timeline(gateway, "dbg-2", ["new", "complete", "forwarded", "duplicate"])

    url = f"{gateway.url}/debug/events/{PIXEL}/dbg-2/Purchase"
    async with http.get(url, headers={"Authorization": "Bearer secret"}) as resp:
        assert resp.status == 200
        text = await resp.text()
    answer = orjson.loads(text)
    assert answer["code"] == 0
    state = answer["data"]
    assert state["key"] == {"pixel_code": PIXEL, "event_id": "dbg-2", "event": "Purchase"}
    assert state["sources"] == ["pixel", "server"]
    assert state["forwarded_at"] is not None
    assert state["tiktok_request_id"].startswith("stub")  # TikTok's id for the forward
    assert state["duplicates_dropped"] == 1
    assert state["state"] == "sent"
    timeline = state["timeline"]
    assert [e["outcome"] for e in timeline] == ["new", "complete", "forwarded", "duplicate"]
    assert [e.get("source") for e in timeline] == ["pixel", "server", None, "server"]
    assert timeline[2]["request_id"] == state["tiktok_request_id"]
    assert {"user.ttp", "user.ttclid", "user.ip"} <= set(timeline[0]["fields"])
    assert {"user.email", "user.external_id", "properties.value"} <= set(timeline[1]["fields"])

    for secret in (EMAIL, sha256(EMAIL), "customer-8841", sha256("customer-8841")):
        assert secret not in text
    assert "59.98" not in text  # names only, never values


async def test_debug_unknown_key_is_404(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(admin_token="secret")
    status, answer = await get_envelope(
        http, f"{gateway.url}/debug/events/{PIXEL}/never-seen/Purchase",
        headers={"Authorization": "Bearer secret"},
    )
    assert status == 404
    assert answer["code"] == 40400


# -- Redis losing our scripts --------------------------------------------------------------


async def test_script_flush_between_requests_does_not_break_ingest(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    gateway = await make_gateway(merge_window=WINDOW)
    assert (await post_server(http, gateway.url, [server_event("flush-1")]))["code"] == 0
    await redis_client.script_flush()
    assert (await post_server(http, gateway.url, [server_event("flush-2")]))["code"] == 0
    answer = await post_browser(http, gateway.url, browser_event("flush-2"))
    assert answer["code"] == 0
    events = await tiktok.wait_for_events(2)
    await wait_counts(gateway, 0)
    assert sorted(e["event_id"] for e in events) == ["flush-1", "flush-2"]

    await redis_client.script_flush()  # the forwarder's scripts are gone too
    assert (await post_server(http, gateway.url, [server_event("flush-3")]))["code"] == 0
    await tiktok.wait_for_events(3)
    await wait_counts(gateway, 0)
    await redis_client.script_flush()
    async with http.get(f"{gateway.url}/readyz") as resp:
        assert resp.status == 200
    assert len(tiktok.events()) == 3
