"""The same dedup, merge, forward and delivery tests, on a three-primary Redis Cluster.

Representative tests of `test_dedup_e2e`, `test_forwarder` and `test_store` are
imported here and run again with this module's fixtures: `redis_url` is the
cluster's, gateways start with `redis_cluster=True`, and the store tests get a
`RedisCluster` client, so each shard's owner reads and commits on the primary
serving that shard. The single-Redis runs stay in their own modules.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster

from bench.cluster import primary_of
from gateway.appkeys import FORWARDER
from gateway.errors import StoreUnavailable
from gateway.store import Store, connect
from tests.cluster import NODES, BreakableCluster
from tests.helpers import post_server, server_event, wait_drained, wait_for
from tests.redis_faults import crash, revive
from tests.support import PIXEL, TOKEN, Gateway, GatewayFactory
from tests.test_console_data import (
    test_live_lists_recent_keys_newest_first_with_filters,
    test_overview_counts_pairs_duplicates_match_keys_and_answers,
)
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
    Owner,
    event,
    make_store,
    owner,
    store,
    t0,
    test_a_key_waiting_for_a_retry_lives_in_the_retry_hash_not_the_log,
    test_a_new_owner_rebuilds_the_window_without_counting_copies_again,
    test_a_stale_owners_commit_writes_nothing,
    test_copies_merge_in_arrival_order,
    test_dead_letter_is_remembered_negative_and_replaying_twice_sends_once,
    test_dead_letters_over_shards_and_replay_without_event_id,
    test_every_script_runs_again_after_script_flush,
    test_import_legacy_moves_pending_keys_into_the_log_with_their_copies,
    test_inspect_fields_and_timeline,
    test_once_everything_is_resolved_the_logs_are_empty,
    test_second_copy,
    test_two_instances_own_disjoint_shards_and_let_go,
)
from tests.tiktok_stub import TikTokStub

__all__ = [  # re-exported, so pytest collects them here too, on the cluster
    "make_store",
    "owner",
    "store",
    "t0",
    "test_a_key_waiting_for_a_retry_lives_in_the_retry_hash_not_the_log",
    "test_a_new_owner_rebuilds_the_window_without_counting_copies_again",
    "test_a_stale_owners_commit_writes_nothing",
    "test_copies_merge_in_arrival_order",
    "test_copy_after_the_forward_is_dropped",
    "test_dead_letter_is_remembered_negative_and_replaying_twice_sends_once",
    "test_dead_letters_over_shards_and_replay_without_event_id",
    "test_dead_letters_replay_through_the_normal_path",
    "test_every_script_runs_again_after_script_flush",
    "test_import_legacy_moves_pending_keys_into_the_log_with_their_copies",
    "test_inspect_fields_and_timeline",
    "test_live_lists_recent_keys_newest_first_with_filters",
    "test_lone_event_is_forwarded_once_when_the_window_closes",
    "test_once_everything_is_resolved_the_logs_are_empty",
    "test_one_poison_event_is_isolated_and_its_batch_mates_delivered",
    "test_overview_counts_pairs_duplicates_match_keys_and_answers",
    "test_pixel_and_server_copies_merge_into_one_enriched_event",
    "test_second_copy",
    "test_server_errors_are_retried_until_delivered",
    "test_three_copies_give_one_forward",
    "test_two_instances_on_one_redis_forward_each_key_once",
    "test_two_instances_own_disjoint_shards_and_let_go",
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
    ports = [_port(redis_client, Store.prefix(shard) + "log") for shard in range(SHARDS)]
    assert len(set(ports)) == NODES
    assert len(set(ports[:4])) > 1


async def test_scripts_are_loaded_on_every_primary(
    redis_cluster: BreakableCluster, redis_client: RedisCluster
) -> None:
    await redis_client.script_flush()
    store = Store(redis_client, shards=SHARDS)
    await store.load_scripts()
    sha = store.runner.scripts["commit"].sha
    for url in redis_cluster.urls:
        node = connect(url)
        try:
            assert await node.script_exists(sha) == [True]
        finally:
            await node.aclose()
    # Every shard's lease script runs, wherever its slot lives.
    assert await store.renew(range(SHARDS), "no-one") == dict.fromkeys(range(SHARDS), False)


async def test_owners_read_and_commit_every_shard_across_the_primaries(
    redis_client: RedisCluster,
) -> None:
    store = Store(redis_client, shards=SHARDS)
    now = time.time()
    events = [event(f"spread-{i}", s) for i in range(100) for s in ("pixel", "server")]
    await store.ingest(events, now)
    assert {store.shard_of(store.member(e)) for e in events} == set(range(SHARDS))
    one, two = Owner(store, "owner-a"), Owner(store, "owner-b")
    taken = await one.own(range(0, SHARDS, 2))
    taken += await two.own(range(SHARDS))
    assert sorted(taken) == list(range(SHARDS))
    outcomes = await one.read(now) + await two.read(now)
    assert sorted(set(outcomes)) == ["complete", "new"]
    assert outcomes.count("complete") == 100  # each pair merged once, by its shard's owner
    await one.deliver(one.due(now), now)
    await two.deliver(two.due(now), now)
    assert await store.counts() == (0, 0)
    assert [await redis_client.xlen(store.log_key(s)) for s in range(SHARDS)] == [0] * SHARDS
    # Dedup holds on every primary: the same copies again are duplicates.
    await store.ingest(events[::2], now + 1)
    outcomes = await one.read(now + 1) + await two.read(now + 1)
    assert outcomes == ["duplicate"] * 100


async def test_a_slot_moved_under_a_running_store_is_followed(
    redis_cluster: BreakableCluster, redis_client: RedisCluster
) -> None:
    """Resharding: the client's slot map goes stale, MOVED replies lead it to the new owner."""
    store = Store(redis_client, shards=SHARDS, merge_window=0.0)
    now = time.time()
    await store.acquire(range(SHARDS), "owner-a")  # the client now caches the slot map
    key = store.log_key(0)
    slot = redis_client.keyslot(key)
    home = await redis_cluster.owner(key)
    to = (home + 1) % NODES
    await redis_cluster.flushall()  # only an empty slot moves
    await redis_cluster.move_slot(slot, key, to)
    try:
        assert _port(redis_client, key) == _port_of(redis_cluster.urls[home])  # stale
        events = [event(f"moved-{i}") for i in range(40)]
        await store.ingest(events, now)
        assert any(store.shard_of(store.member(e)) == 0 for e in events)
        owner = Owner(store)
        await owner.own()
        assert await owner.read(now) == ["new"] * 40
        await owner.deliver(owner.due(now), now)
        assert await store.counts() == (0, 0)
        assert _port(redis_client, key) == _port_of(redis_cluster.urls[to])  # refreshed
    finally:
        await redis_cluster.flushall()
        await redis_cluster.move_slot(slot, key, home)


def a_node_goes_away(test: Callable[..., Any]) -> Callable[..., Any]:
    """redis-py's cluster client, on a connection error, closes itself and rebuilds its
    node map while other commands are in flight; connections those commands then hand
    back belong to nodes it no longer knows, and are closed by the garbage collector, with
    a warning. Expected in the tests that kill a node."""
    test = pytest.mark.filterwarnings("ignore::ResourceWarning")(test)
    return pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")(test)


@a_node_goes_away
async def test_a_primary_down_answers_503_and_the_gateway_carries_on_when_it_is_back(
    redis_cluster: BreakableCluster,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(merge_window=0.2)
    events = [server_event(f"down-{i}") for i in range(20)]  # over every primary
    victim = redis_cluster.nodes[1]
    await crash(victim)
    try:
        body = {"event_source": "web", "event_source_id": PIXEL, "data": events}
        async with http.post(
            f"{gateway.url}/open_api/v1.3/event/track/", json=body, headers={"Access-Token": TOKEN}
        ) as resp:
            assert resp.status == 503
            assert (await resp.json())["code"] == 50002
    finally:
        await revive(victim)
        await redis_cluster.wait_ok()
    answer = await post_server(http, gateway.url, events)
    assert answer["code"] == 0, answer
    forwarded = await tiktok.wait_for_events(20)
    assert sorted(e["event_id"] for e in forwarded) == sorted(e["event_id"] for e in events)
    await wait_drained(gateway)
    gc.collect()  # here, where the warnings are expected, not in a later test


@contextlib.asynccontextmanager
async def partial_coverage(cluster: BreakableCluster) -> AsyncIterator[None]:
    """The live primaries keep serving their slots while one is away (by default a cluster
    refuses every command once a primary without a replica is marked failed)."""
    clients = [aioredis.Redis.from_url(url) for url in cluster.urls]
    try:
        for client in clients:
            await client.config_set("cluster-require-full-coverage", "no")
        yield
    finally:
        for client in clients:
            with contextlib.suppress(redis_errors.RedisError):
                await client.config_set("cluster-require-full-coverage", "yes")
            await client.aclose()


@a_node_goes_away
async def test_one_primary_away_leaves_the_other_shards_forwarding(
    redis_cluster: BreakableCluster,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    gateway = await make_gateway(merge_window=0.1, forward_lease=1.5)
    forwarder = gateway.app[FORWARDER]
    await wait_for(lambda: len(forwarder.windows) == SHARDS, "every shard owned")
    store: Store = gateway.store
    victim = primary_of("tkgw:instances")  # the heartbeats' node too: the hardest case
    away = {s for s in range(SHARDS) if primary_of(store.log_key(s)) == victim}
    ids = [f"alive-{i}" for i in range(200)]
    served = [
        i for i in ids if store.shard_of(store.member_of(PIXEL, i, "Purchase")) not in away
    ][:20]
    stranded = [
        i for i in ids if store.shard_of(store.member_of(PIXEL, i, "Purchase")) in away
    ][:5]
    async with partial_coverage(redis_cluster):
        await crash(redis_cluster.nodes[victim])
        try:
            await wait_for(lambda: set(forwarder.failing) == away, "the away shards failing")
            await post_server(http, gateway.url, [server_event(i) for i in served])
            forwarded = await tiktok.wait_for_events(len(served))
            assert sorted(e["event_id"] for e in forwarded) == sorted(served)
            await wait_for(
                lambda: gateway.metric("gateway_unclaimable_shards") == len(away),
                "the gauge naming the away shards",
            )
        finally:
            await revive(redis_cluster.nodes[victim])
            await redis_cluster.wait_ok()
    await wait_for(lambda: not forwarder.failing, "every shard readable again", within=20.0)
    await post_server(http, gateway.url, [server_event(i) for i in stranded])
    forwarded = await tiktok.wait_for_events(len(served) + len(stranded), timeout=20.0)
    assert sorted(e["event_id"] for e in forwarded) == sorted(served + stranded)
    await wait_for(lambda: gateway.metric("gateway_unclaimable_shards") == 0, "the gauge at 0")
    gc.collect()


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
    redis_cluster: BreakableCluster, redis_client: RedisCluster
) -> None:
    """A primary restarted or just promoted has an empty script cache (Redis 7 does not copy
    SCRIPT LOAD to replicas): its calls run as EVAL, the others' as EVALSHA, in one go."""
    store = Store(redis_client, shards=SHARDS, merge_window=0.0)
    await store.load_scripts()
    owner = Owner(store)
    await owner.own()
    emptied = connect(redis_cluster.urls[1])
    try:
        now = time.time()
        await store.ingest([event(f"lost-{i}") for i in range(60)], now)  # every primary
        await owner.read(now)
        await emptied.script_flush()
        await owner.deliver(owner.due(now), now)  # commits on every primary, one pipeline
        assert await store.counts() == (0, 0)
        # The node keeps the script EVAL ran: the next call is an EVALSHA again.
        assert await emptied.script_exists(store.runner.scripts["commit"].sha) == [True]
    finally:
        await emptied.aclose()


async def test_wait_replicas_without_replicas_is_unavailable(redis_client: RedisCluster) -> None:
    """WAIT goes to each primary written to; none has a replica here, so none confirms."""
    store = Store(redis_client, shards=SHARDS, wait_replicas=1, wait_timeout=0.05)
    with pytest.raises(StoreUnavailable, match="0 of 1 replica"):
        await store.ingest([event(f"wait-{i}") for i in range(20)], time.time())
    # Reads and the owners' scripts do not wait (the copies were written, unconfirmed: a
    # client's retry of the refused request is then a duplicate, dropped by the owner).
    assert await store.acquire(range(SHARDS), "owner") == list(range(SHARDS))
    found = await store.read(dict.fromkeys(range(SHARDS), "0-0"))
    assert not [r for r in found.values() if isinstance(r, Exception)]


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
