"""The browser endpoint's rate limit: per client, kept in Redis, so it holds across instances.

One GCRA counter per client address (an IPv6 /64), `tkgw:{shard}:rl:<client>`, changed by
one Lua script in one round trip; a refused request is answered 429 with
Retry-After and stores nothing.
"""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.browser import rate_limit_subject
from gateway.store import Store
from tests.helpers import browser_event, is_rate_counter
from tests.support import Gateway, GatewayFactory, free_port
from tests.tiktok_stub import TikTokStub

TRUST_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
QUICK = {"shutdown_timeout": 1.0}  # these gateways have nothing in flight to drain


async def post(
    http: aiohttp.ClientSession, gateway: Gateway, event_id: str, client: str | None = None
) -> tuple[int, dict[str, Any], Any]:
    headers = {"Content-Type": "text/plain"}
    if client is not None:
        headers["X-Forwarded-For"] = client
    raw = orjson.dumps(browser_event(event_id))
    async with http.post(f"{gateway.url}/pixel/events", data=raw, headers=headers) as resp:
        return resp.status, orjson.loads(await resp.read()), resp.headers


# -- across instances ----------------------------------------------------------------------


async def test_two_instances_on_one_redis_share_a_clients_budget(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    limits = {"pixel_rate_limit": 0.5, "pixel_rate_burst": 3, "merge_window": 0.1, **QUICK}
    one, two = await make_gateway(**limits), await make_gateway(**limits)
    statuses = [
        (await post(http, gateway, f"shared-{i}"))[0]
        for i, gateway in enumerate([one, two, one, two])
    ]
    # An in-memory limiter would have let all four through: each instance saw only two.
    assert statuses == [200, 200, 200, 429]
    status, answer, headers = await post(http, one, "shared-4")
    assert status == 429
    assert answer["code"] == 40100
    assert "at most 0.5 a second (bursts of 3)" in answer["message"]
    assert int(headers["Retry-After"]) >= 1
    assert one.metric("gateway_events_rejected_total", {"reason": "rate_limited"}) == 1
    assert two.metric("gateway_events_rejected_total", {"reason": "rate_limited"}) == 1

    forwarded = await tiktok.wait_for_events(3)
    assert sorted(e["event_id"] for e in forwarded) == ["shared-0", "shared-1", "shared-2"]


async def test_other_clients_keep_their_own_budget_on_every_instance(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    limits = {"pixel_rate_limit": 0.5, "pixel_rate_burst": 1, "trusted_proxies": TRUST_LOOPBACK}
    one, two = await make_gateway(**limits, **QUICK), await make_gateway(**limits, **QUICK)
    assert (await post(http, one, "c-1", "203.0.113.1"))[0] == 200
    assert (await post(http, two, "c-2", "203.0.113.1"))[0] == 429
    assert (await post(http, two, "c-3", "203.0.113.2"))[0] == 200
    assert (await post(http, one, "c-4", "203.0.113.2"))[0] == 429


async def test_an_ipv6_client_is_counted_by_its_64(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(
        pixel_rate_limit=0.5, pixel_rate_burst=1, trusted_proxies=TRUST_LOOPBACK, **QUICK
    )
    assert (await post(http, gateway, "v6-1", "2001:db8:1:2::1"))[0] == 200
    # Another address of the same /64: the same subscriber, the same budget.
    assert (await post(http, gateway, "v6-2", "2001:db8:1:2:ffff::9"))[0] == 429
    assert (await post(http, gateway, "v6-3", "2001:db8:1:3::1"))[0] == 200


async def test_the_budget_refills_at_the_rate(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(pixel_rate_limit=20.0, pixel_rate_burst=2, **QUICK)
    assert [(await post(http, gateway, f"r-{i}"))[0] for i in range(3)] == [200, 200, 429]
    started = time.monotonic()
    while (await post(http, gateway, "r-again"))[0] == 429:
        assert time.monotonic() - started < 2.0, "the budget never refilled"
    # One request every 50 ms: the next one is allowed within a few of those.
    assert time.monotonic() - started < 1.0


async def test_redis_unreachable_is_503_not_a_free_pass(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(
        redis_url=f"redis://127.0.0.1:{free_port()}", redis_timeout=0.5, forward=False, **QUICK
    )
    status, answer, _ = await post(http, gateway, "no-redis-1")
    assert status == 503
    assert answer["code"] == 50002
    assert gateway.metric("gateway_events_rejected_total", {"reason": "store_unavailable"}) == 1


# -- the store's counter ---------------------------------------------------------------------


async def test_the_counter_is_one_key_in_the_clients_shard_and_expires(
    redis_client: aioredis.Redis,
) -> None:
    store = Store(redis_client)
    now = 1_800_000_000.0
    assert [await store.rate_limit("198.51.100.7", now, 2.0, 3) for _ in range(3)] == [0, 0, 0]
    # Three requests at once took the burst; the next is due one interval (0.5 s) later.
    assert await store.rate_limit("198.51.100.7", now, 2.0, 3) == pytest.approx(0.5)
    assert await store.rate_limit("198.51.100.7", now + 0.25, 2.0, 3) == pytest.approx(0.25)
    assert await store.rate_limit("198.51.100.7", now + 0.5, 2.0, 3) == 0
    key = f"tkgw:{{{store.shard_of('198.51.100.7')}}}:rl:198.51.100.7"
    assert await redis_client.keys("*") == [key.encode()]
    # Forgotten once the burst would be whole again: an idle client costs nothing.
    ttl_ms = await redis_client.pttl(key)
    assert 0 < ttl_ms <= 2000


async def test_a_refused_request_does_not_use_up_budget(redis_client: aioredis.Redis) -> None:
    store = Store(redis_client)
    now = 1_800_000_000.0
    assert await store.rate_limit("c", now, 1.0, 1) == 0
    for _ in range(5):  # hammering while refused does not push the next slot further out
        assert await store.rate_limit("c", now, 1.0, 1) == pytest.approx(1.0)
    assert await store.rate_limit("c", now + 1.0, 1.0, 1) == 0


async def test_the_script_is_loaded_again_after_a_flush(redis_client: aioredis.Redis) -> None:
    store = Store(redis_client)
    assert await store.rate_limit("flushed", time.time(), 10.0, 5) == 0
    await redis_client.script_flush()
    assert await store.rate_limit("flushed", time.time(), 10.0, 5) == 0
    await store.load_scripts()  # it is one of the store's scripts from now on


@pytest.mark.parametrize(
    ("address", "subject"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
        (None, "unknown"),
        ("not-an-ip{x}", "not-an-ip_x_"),
    ],
    ids=["ipv4", "ipv6", "mapped", "none", "odd"],
)
def test_whom_the_limit_counts(address: str | None, subject: str) -> None:
    assert rate_limit_subject(address) == subject


async def test_a_rate_of_zero_turns_the_limit_off(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    gateway = await make_gateway(pixel_rate_limit=0.0, pixel_rate_burst=1, **QUICK)
    assert [(await post(http, gateway, f"off-{i}"))[0] for i in range(5)] == [200] * 5
    # Nothing counted: no round trip is spent on a limit that is off.
    assert [k for k in await redis_client.keys("tkgw:*") if is_rate_counter(k)] == []
