"""A Redis Cluster primary dies under steady traffic; its replica takes over.

Black box: clients send server events over HTTP, the TikTok stand-in keeps a
ledger of what arrives, and nothing here looks inside Redis for the gateway's
keys, so the test holds whichever store the gateway uses to the same promises:

- no answer but 200 (code 0) or 503 (code 50002): never a 500;
- with GATEWAY_REDIS_WAIT_REPLICAS=1, every acknowledged event reaches TikTok;
- without it, only events acknowledged within LOSS_WINDOW before a kill may be
  lost (replication is asynchronous), at most LOSS_SHARE of the acknowledged;
- none arrives more than twice, and only one first sent around a kill (from
  TWICE_WINDOW before it to the promotion: sent, but its owner's commit never reached
  the replica that took over) arrives twice;
- every request is served again within RECOVERY seconds of the promotion.

The cluster: three primaries, three replicas, append-only with fsync always,
cluster-node-timeout 1.5 s. The primary with the most slots is SIGKILLed; once
its replica serves its slots, it is started again and rejoins as a replica (as a
supervisor would restart it). Replicas hold no scripts when promoted, as on
Redis 7, which does not copy SCRIPT LOAD to them.

`make test` runs one kill per variant; `make soak-failover` sets
FAILOVER_SOAK_SECONDS and kills a primary every few seconds for that long.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from tests.cluster import NODES, BreakableCluster
from tests.helpers import server_event, wait_for
from tests.processes import FAST_FORWARDING, Launcher, scraped
from tests.redis_faults import crash, revive
from tests.support import PIXEL, TOKEN, poll_until
from tests.tiktok_stub import TikTokStub

SOAK_SECONDS = float(os.environ.get("FAILOVER_SOAK_SECONDS", "0"))
CLIENTS = 3
BATCH = 10  # events a request
PACE = 0.02  # seconds between a client's requests
BEFORE_KILL = 600  # events acknowledged before each kill
AFTER_RECOVERY = 600  # events acknowledged after the gateway serves everything again
LOSS_WINDOW = 1.0  # seconds before a kill in which an acknowledged event may be lost (WAIT 0)
LOSS_SHARE = 0.02  # of acknowledged events, at most lost (WAIT 0)
TWICE_WINDOW = 1.0  # seconds before a kill in which a send's commit may be lost with it
RECOVERY = 10.0  # seconds from a promotion until every request is served again
LEASE = 2.0  # the forwarder's lease: how soon an unacknowledged claim is sent again

pytestmark = pytest.mark.timeout(max(120.0, SOAK_SECONDS * 2 + 120.0))


@dataclass
class Ledger:
    """Every request's answer, and when each event was acknowledged."""

    acknowledged: dict[str, float] = field(default_factory=dict)  # event_id -> answered at
    unanswered: set[str] = field(default_factory=set)  # 503: stored or not, the client moves on
    statuses: collections.Counter[tuple[int, int | None]] = field(
        default_factory=collections.Counter
    )
    refused_at: list[float] = field(default_factory=list)  # when each 503 was answered


@pytest_asyncio.fixture
async def replicated_cluster() -> AsyncIterator[BreakableCluster]:
    cluster = BreakableCluster(appendfsync="always", replicas=1, node_timeout=1500)
    await cluster.start()
    yield cluster
    await cluster.stop()


@pytest_asyncio.fixture
async def launcher(tiktok: TikTokStub, tmp_path: Path) -> AsyncIterator[Launcher]:
    """A gateway process, as deployed: its Redis client's troubles stay in it."""
    launcher = Launcher(
        tmp_path,
        tmp_path,
        GATEWAY_REDIS_CLUSTER="1",
        GATEWAY_REDIS_TIMEOUT="2",
        GATEWAY_REDIS_WAIT_TIMEOUT="0.5",
        GATEWAY_UPSTREAM_URL=tiktok.url,
        GATEWAY_PIXELS=f"{PIXEL}={TOKEN}",
        GATEWAY_SHARDS="16",
        GATEWAY_MERGE_WINDOW="0.3",
        GATEWAY_DEDUP_WINDOW="600",
        GATEWAY_FORWARD_BATCH_SIZE="500",
        **(FAST_FORWARDING | {"GATEWAY_FORWARD_LEASE": str(LEASE)}),
    )
    yield launcher
    await launcher.close()


async def _client(
    http: aiohttp.ClientSession, url: str, name: str, ledger: Ledger, stop: asyncio.Event
) -> None:
    for seq in itertools.count():
        if stop.is_set():
            return
        ids = [f"{name}-{seq}-{i}" for i in range(BATCH)]
        body = {
            "event_source": "web",
            "event_source_id": PIXEL,
            "data": [server_event(event_id) for event_id in ids],
        }
        async with http.post(
            f"{url}/open_api/v1.3/event/track/", json=body, headers={"Access-Token": TOKEN}
        ) as resp:
            try:
                answer = await resp.json(content_type=None)
            except ValueError:  # not JSON: counted by its status alone
                answer = None
        code = answer.get("code") if isinstance(answer, dict) else None
        ledger.statuses[resp.status, code] += 1
        now = time.monotonic()
        if resp.status == 200 and code == 0:
            ledger.acknowledged.update(dict.fromkeys(ids, now))
        else:
            ledger.unanswered.update(ids)
            ledger.refused_at.append(now)
        await asyncio.sleep(PACE)


async def _kill_and_recover(cluster: BreakableCluster) -> tuple[float, float]:
    """Kill the primary with the most slots, wait for its replica to take over, start it
    again as a replica; returns when it was killed and when the replica was promoted."""
    counts = await cluster.slot_counts()
    victim = max(counts, key=lambda i: (counts[i], -i))
    await crash(cluster.nodes[victim])
    killed = time.monotonic()
    await cluster.wait_promoted(victim)
    promoted = time.monotonic()
    await revive(cluster.nodes[victim])
    await cluster.wait_ok()
    return killed, promoted


async def _empty_replica_script_caches(cluster: BreakableCluster) -> None:
    """As on Redis 7: a replica has none of the scripts loaded on its primary."""
    for url in cluster.urls:
        client = aioredis.Redis.from_url(url)
        try:
            if (await client.info("replication"))["role"] == "slave":
                await client.script_flush()
        finally:
            await client.aclose()


async def _more_acknowledged(ledger: Ledger, count: int) -> None:
    """Until `count` more events are acknowledged: traffic for a while, by its own measure."""
    target = len(ledger.acknowledged) + count
    await wait_for(lambda: len(ledger.acknowledged) >= target, f"{count} more acknowledged", 30.0)


def _lost_outside_the_window(ledger: Ledger, kills: list[tuple[float, float]]) -> set[str]:
    """Acknowledged events not delivered (yet) that were not acknowledged just before a kill."""
    return {
        event_id
        for event_id, at in ledger.acknowledged.items()
        if not any(k - LOSS_WINDOW <= at <= k for k, _p in kills)
    }


@pytest.mark.parametrize("wait_replicas", [1, 0], ids=["wait_replicas_1", "wait_replicas_0"])
async def test_a_primary_killed_under_traffic_loses_nothing_acknowledged(
    wait_replicas: int,
    replicated_cluster: BreakableCluster,
    launcher: Launcher,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    cluster = replicated_cluster
    gateway = await launcher.start(
        GATEWAY_REDIS_URL=cluster.url, GATEWAY_REDIS_WAIT_REPLICAS=str(wait_replicas)
    )
    ledger = Ledger()

    async def served_again(promoted: float) -> bool:
        """A whole second of requests with no refusal, and every shard claimed."""
        if time.monotonic() - max([promoted, *ledger.refused_at]) <= 1.0:
            return False
        return not await scraped(http, gateway.url, "gateway_unclaimable_shards")

    stop = asyncio.Event()
    clients = [
        asyncio.create_task(_client(http, gateway.url, f"c{wait_replicas}{n}", ledger, stop))
        for n in range(CLIENTS)
    ]
    kills: list[tuple[float, float]] = []
    recovered_by: list[float] = []
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + SOAK_SECONDS
        while True:
            await _more_acknowledged(ledger, BEFORE_KILL)
            await _empty_replica_script_caches(cluster)
            killed, promoted = await _kill_and_recover(cluster)
            kills.append((killed, promoted))
            await poll_until(
                lambda p=promoted: served_again(p),
                "every request served and every shard claimed again",
                RECOVERY + 2.0,
            )
            recovered_by.append(max([promoted, *ledger.refused_at]))
            if loop.time() >= end:
                break
        await _more_acknowledged(ledger, AFTER_RECOVERY)
    finally:
        stop.set()
        await asyncio.gather(*clients)

    # Every acknowledged event arrives; with WAIT 0, all but those acknowledged just before
    # a kill, and then the gateway has nothing left to send.
    acknowledged = set(ledger.acknowledged)
    must_arrive = acknowledged if wait_replicas else _lost_outside_the_window(ledger, kills)

    async def arrived() -> bool:
        if not must_arrive <= {e["event_id"] for e in tiktok.events()}:
            return False
        return bool(wait_replicas) or not await scraped(
            http, gateway.url, "gateway_pending_events"
        )

    await poll_until(arrived, "every acknowledged event delivered", 30.0)
    delivered = collections.Counter(e["event_id"] for e in tiktok.events())
    lost = acknowledged - set(delivered)
    twice = [event_id for event_id, n in delivered.items() if n == 2]
    first_sent: dict[str, float] = {}
    for request in tiktok.track_requests():
        for item in request.body["data"]:
            first_sent.setdefault(item["event_id"], request.received_at)
    twice_apart = [
        e for e in twice
        if not any(k - TWICE_WINDOW <= first_sent[e] <= p for k, p in kills)
    ]  # fmt: skip
    recoveries = [round(r - p, 2) for r, (_k, p) in zip(recovered_by, kills, strict=True)]
    summary = (
        f"{len(acknowledged)} acknowledged, {len(ledger.unanswered)} refused, "
        f"{len(lost)} lost, {len(twice)} twice ({len(twice_apart)} first sent away from a "
        f"kill), answers {dict(ledger.statuses)}, "
        f"kills at {[round(p - k, 2) for k, p in kills]} s to promotion, "
        f"served again {recoveries} s after"
    )
    print(summary)

    assert set(ledger.statuses) <= {(200, 0), (503, 50002)}, summary
    assert ledger.statuses[200, 0] > 0 and ledger.statuses[503, 50002] > 0, summary
    assert max(delivered.values()) <= 2, summary
    assert twice_apart == [], summary
    assert all(r <= RECOVERY for r in recoveries), summary
    assert len(kills) >= 1 and len(cluster.nodes) == 2 * NODES
    if wait_replicas:
        assert not lost, summary
    else:
        assert len(lost) <= LOSS_SHARE * len(acknowledged), summary
        for event_id in lost:
            at = ledger.acknowledged[event_id]
            assert any(k - LOSS_WINDOW <= at <= k for k, _p in kills), (event_id, summary)
