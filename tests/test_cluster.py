"""The same dedup, merge, forward and delivery tests, on a three-primary Redis Cluster.

Representative tests of `test_dedup_e2e`, `test_forwarder` and `test_store` are
imported here and run again with this module's fixtures: `redis_url` is the
cluster's, gateways start with `redis_cluster=True`, and the store tests get a
`RedisCluster` client. The single-Redis runs stay in their own modules.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from gateway.errors import StoreUnavailable
from gateway.store import Store, connect
from tests.cluster import NODES, LocalCluster
from tests.conftest import PIXEL, TOKEN, Gateway, GatewayFactory
from tests.helpers import post_server, server_event, wait_drained
from tests.test_dedup_e2e import (
    test_copy_after_the_forward_is_dropped,
    test_lone_event_is_forwarded_once_when_the_window_closes,
    test_pixel_and_server_copies_merge_into_one_enriched_event,
    test_three_copies_give_one_forward,
    test_two_instances_on_one_redis_forward_each_key_once,
)
from tests.test_forwarder import (
    test_dead_letters_replay_through_the_normal_path,
    test_one_poison_event_is_isolated_and_its_batch_mates_delivered,
    test_server_errors_are_retried_until_delivered,
)
from tests.test_store import (
    event,
    make_store,
    store,
    t0,
    test_ack_in_one_call_over_several_shards_and_tokens,
    test_claim_returns_every_copy_in_arrival_order,
    test_counts_over_shards,
    test_dead_letter_and_replay,
    test_dead_letters_over_shards,
    test_inspect_fields_and_timeline,
    test_lease_then_reclaim_and_ack_by_token,
    test_many_events_in_one_pipeline,
    test_release_waits_for_retry_at,
    test_script_flush_mid_batch_keeps_order,
    test_scripts_reload_after_script_flush,
    test_second_copy,
)
from tests.tiktok_stub import TikTokStub

__all__ = [  # re-exported, so pytest collects them here too, on the cluster
    "make_store",
    "store",
    "t0",
    "test_ack_in_one_call_over_several_shards_and_tokens",
    "test_claim_returns_every_copy_in_arrival_order",
    "test_copy_after_the_forward_is_dropped",
    "test_counts_over_shards",
    "test_dead_letter_and_replay",
    "test_dead_letters_over_shards",
    "test_dead_letters_replay_through_the_normal_path",
    "test_inspect_fields_and_timeline",
    "test_lease_then_reclaim_and_ack_by_token",
    "test_lone_event_is_forwarded_once_when_the_window_closes",
    "test_many_events_in_one_pipeline",
    "test_one_poison_event_is_isolated_and_its_batch_mates_delivered",
    "test_pixel_and_server_copies_merge_into_one_enriched_event",
    "test_release_waits_for_retry_at",
    "test_script_flush_mid_batch_keeps_order",
    "test_scripts_reload_after_script_flush",
    "test_second_copy",
    "test_server_errors_are_retried_until_delivered",
    "test_three_copies_give_one_forward",
    "test_two_instances_on_one_redis_forward_each_key_once",
]

SHARDS = 16  # sixteen hash tags: enough to land on every primary (asserted below)


@pytest.fixture
def redis_url(cluster_url: str) -> str:
    """Overrides conftest's: gateways of this module use the cluster."""
    return cluster_url


@pytest.fixture
def make_gateway(make_gateway: GatewayFactory) -> GatewayFactory:
    """conftest's factory, with the cluster client."""

    async def start(**overrides: Any) -> Gateway:
        overrides.setdefault("shards", SHARDS)
        return await make_gateway(redis_cluster=True, **overrides)

    return start


@pytest_asyncio.fixture
async def redis_client(cluster_url: str) -> AsyncIterator[RedisCluster]:
    """Overrides conftest's: the store tests run on a cluster client."""
    client = connect(cluster_url, cluster=True)
    assert isinstance(client, RedisCluster)
    yield client
    await client.aclose()


async def test_shards_spread_over_every_primary(redis_client: RedisCluster) -> None:
    """Each shard is one slot: sixteen reach every primary, the tests' four more than one."""
    await redis_client.initialize()
    ports = [_port(redis_client, f"{Store.prefix(shard)}due") for shard in range(SHARDS)]
    assert len(set(ports)) == NODES
    assert len(set(ports[:4])) > 1


async def test_scripts_are_loaded_on_every_primary(
    redis_cluster: LocalCluster, redis_client: RedisCluster
) -> None:
    await redis_client.script_flush()
    store = Store(redis_client, shards=SHARDS)
    await store.load_scripts()
    sha = store.runner.scripts["claim"].sha
    for url in redis_cluster.urls:
        node = connect(url)
        try:
            assert await node.script_exists(sha) == [True]
        finally:
            await node.aclose()
    # Every shard's claim runs, wherever its slot lives.
    assert await store.claim(time.time(), 10, 30.0) == []


async def test_ingest_over_all_shards_in_one_pipeline(
    redis_client: RedisCluster,
) -> None:
    store = Store(redis_client, shards=SHARDS, merge_window=0.0)
    now = time.time()
    events = [event(f"spread-{i}") for i in range(200)]
    results = await store.ingest(events, now)
    assert {r.status for r in results} == {"new"}
    assert {store.shard_of(store.member(e)) for e in events} == set(range(SHARDS))
    claims = await store.claim(now + 1, 1000, 30.0)
    assert len(claims) == 200
    assert await store.ack(claims, now + 1) == 200
    assert await store.counts() == (0, 0)


async def test_concurrent_claims_on_two_clients_take_each_event_once(
    store: Store, cluster_url: str, t0: float
) -> None:
    other_client = connect(cluster_url, cluster=True)
    try:
        other = Store(other_client, shards=4)
        await store.ingest([event(f"cc-{i}") for i in range(100)], t0)
        due = t0 + 3600
        a, b = await asyncio.gather(store.claim(due, 1000, 30.0), other.claim(due, 1000, 30.0))
        members_a, members_b = {c.member for c in a}, {c.member for c in b}
        assert len(members_a | members_b) == 100
        assert members_a.isdisjoint(members_b)
    finally:
        await other_client.aclose()


async def test_a_slot_moved_under_a_running_store_is_followed(
    redis_cluster: LocalCluster, redis_client: RedisCluster
) -> None:
    """Resharding: the client's slot map goes stale, MOVED replies lead it to the new owner."""
    store = Store(redis_client, shards=SHARDS, merge_window=0.0)
    now = time.time()
    assert await store.claim(now, 10, 30.0) == []  # the client now caches the slot map
    key = f"{store.prefix(0)}due"
    slot = redis_client.keyslot(key)
    home = await redis_cluster.owner(key)
    to = (home + 1) % NODES
    await redis_cluster.move_slot(slot, key, to)
    try:
        assert _port(redis_client, key) == _port_of(redis_cluster.urls[home])  # stale
        events = [event(f"moved-{i}") for i in range(40)]
        assert {r.status for r in await store.ingest(events, now)} == {"new"}
        assert any(store.shard_of(store.member(e)) == 0 for e in events)
        claims = await store.claim(now + 1, 1000, 30.0)
        assert len(claims) == 40
        assert await store.ack(claims, now + 1) == 40
        assert _port(redis_client, key) == _port_of(redis_cluster.urls[to])  # refreshed
    finally:
        await redis_cluster.flushall()
        await redis_cluster.move_slot(slot, key, home)


# redis-py's cluster client, on a connection error, closes itself and rebuilds its node
# map while other commands are in flight; connections those commands then hand back belong
# to nodes it no longer knows, and are closed by the garbage collector, with a warning.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_primary_down_answers_503_and_the_gateway_carries_on_when_it_is_back(
    redis_cluster: LocalCluster,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(merge_window=0.2)
    events = [server_event(f"down-{i}") for i in range(20)]  # over every primary
    victim = redis_cluster.nodes[1]
    await victim.kill()
    try:
        body = {"event_source": "web", "event_source_id": PIXEL, "data": events}
        async with http.post(
            f"{gateway.url}/open_api/v1.3/event/track/", json=body, headers={"Access-Token": TOKEN}
        ) as resp:
            assert resp.status == 503
            assert (await resp.json())["code"] == 50002
    finally:
        await victim.restart()
        await redis_cluster.wait_ok()
    answer = await post_server(http, gateway.url, events)
    assert answer["code"] == 0, answer
    forwarded = await tiktok.wait_for_events(20)
    assert sorted(e["event_id"] for e in forwarded) == sorted(e["event_id"] for e in events)
    await wait_drained(gateway)
    gc.collect()  # here, where the warnings are expected, not in a later test


async def test_readyz_on_a_cluster(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway()
    async with http.get(f"{gateway.url}/readyz") as resp:
        assert resp.status == 200, await resp.text()


async def test_single_node_client_on_a_cluster_says_to_set_the_flag(cluster_url: str) -> None:
    client = connect(cluster_url)
    try:
        store = Store(client, shards=SHARDS)
        with pytest.raises(StoreUnavailable, match="GATEWAY_REDIS_CLUSTER=1"):
            await store.ingest([event(f"flag-{i}") for i in range(20)], time.time())
    finally:
        await client.aclose()


async def test_one_primary_without_its_scripts_runs_them_from_source(
    redis_cluster: LocalCluster, redis_client: RedisCluster
) -> None:
    """A primary restarted or just promoted has an empty script cache (Redis 7 does not copy
    SCRIPT LOAD to replicas): its calls run as EVAL, the others' as EVALSHA, in one go."""
    store = Store(redis_client, shards=SHARDS, merge_window=0.0)
    await store.load_scripts()
    emptied = connect(redis_cluster.urls[1])
    try:
        await emptied.script_flush()
        now = time.time()
        events = [event(f"lost-{i}") for i in range(60)]  # over every primary
        assert {r.status for r in await store.ingest(events, now)} == {"new"}
        await emptied.script_flush()
        claims = await store.claim(now + 1, 1000, 30.0)
        assert len(claims) == 60
        await emptied.script_flush()
        assert await store.ack(claims, now + 1) == 60
        # The node keeps the script EVAL ran: the next call is an EVALSHA again.
        assert await emptied.script_exists(store.runner.scripts["ack"].sha) == [True]
    finally:
        await emptied.aclose()


async def test_wait_replicas_without_replicas_is_unavailable(redis_client: RedisCluster) -> None:
    """WAIT goes to each primary written to; none has a replica here, so none confirms."""
    store = Store(redis_client, shards=SHARDS, wait_replicas=1, wait_timeout=0.05)
    with pytest.raises(StoreUnavailable, match="0 of 1 replica"):
        await store.ingest([event(f"wait-{i}") for i in range(20)], time.time())
    # Reads and the other scripts do not wait.
    assert await store.claim(time.time(), 10, 30.0) is not None


@pytest.mark.parametrize(
    "error",
    [
        redis_errors.NoScriptError("No matching script. Please use EVAL."),
        redis_errors.ReadOnlyError("You can't write against a read only replica."),
        redis_errors.ConnectionError("Connection closed by server."),
        redis_errors.TimeoutError("Timeout reading from socket"),
        redis_errors.BusyLoadingError("Redis is loading the dataset in memory"),
        redis_errors.ResponseError("ERR Error running script"),
        redis_errors.RedisClusterException("Redis Cluster cannot be connected"),
        redis_errors.MaxConnectionsError("Too many connections"),
        TimeoutError(),
        ConnectionResetError(104, "Connection reset by peer"),
        redis_errors.ClusterDownError("The cluster is down"),
        redis_errors.MasterDownError("Link with MASTER is down"),
        redis_errors.TryAgainError("Multiple keys request during rehashing of slot"),
        redis_errors.MovedError("3999 127.0.0.1:6381"),
        redis_errors.AskError("3999 127.0.0.1:6381"),
        redis_errors.SlotNotCoveredError("Slot 3999 is not covered by the cluster"),
        redis_errors.ClusterError("no primary reachable"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_redis_errors_are_unavailable_not_crashes(
    redis_client: RedisCluster, error: Exception
) -> None:
    store = Store(redis_client, shards=4)
    with pytest.raises(StoreUnavailable):
        async with store.runner.guard():
            raise error


def _port(client: RedisCluster, key: str) -> int:
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


def _port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])
