"""Delivery guarantees across failures: once the gateway answered code 0, TikTok gets the event.

"Exactly once as far as TikTok can tell": every acknowledged event reaches
the stand-in's ledger of accepted events, and a resend, if any, carries the
same event_id so TikTok's own dedup absorbs it. The faults that need a real
process are played against `python -m gateway serve` on the session's Redis
(kill -9, SIGTERM, two instances sharing Redis); retry pacing is watched
in-process, where the timeline and metrics are at hand.

Waiting on another process has nothing to await, so its exit and Redis's
queue are polled with deadlines; the stand-in is awaited on conditions.
"""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.store import Store
from tests.helpers import browser_event, post_browser, post_server, server_event, wait_drained
from tests.processes import FAST_FORWARDING, GatewayProcess, Launcher
from tests.support import PIXEL, TOKEN, Gateway, GatewayFactory, poll_until, sha256
from tests.tiktok_stub import Answer, RecordedRequest, TikTokStub

SHARDS = 4
TTP = "ttp-delivery-test-00000001"
EMAIL = "jane.doe@example.com"
FORWARDED = re.compile(r"^forwarded (\d+) event\(s\)")


@pytest_asyncio.fixture
async def launcher(redis_url: str, tiktok: TikTokStub, tmp_path: Path) -> AsyncIterator[Launcher]:
    """Gateway processes on this test's Redis and stand-in; killed if still running at the end."""
    launcher = Launcher(
        tmp_path,
        tmp_path,
        GATEWAY_REDIS_URL=redis_url,
        GATEWAY_UPSTREAM_URL=tiktok.url,
        GATEWAY_PIXELS=f"{PIXEL}={TOKEN}",
        GATEWAY_SHARDS=str(SHARDS),
        GATEWAY_MERGE_WINDOW="0.3",
        GATEWAY_DEDUP_WINDOW="60",
        **FAST_FORWARDING,
        GATEWAY_PIXEL_RATE_BURST="1000",
    )
    yield launcher
    await launcher.close()


@pytest.fixture
def store(redis_client: aioredis.Redis) -> Store:
    """The gateway's own view of the test Redis, to read the queue and a key's timeline."""
    return Store(redis_client, shards=SHARDS)


async def pending(store: Store) -> int:
    """Events still in a due queue: waiting for their window, claimed, or waiting to retry."""
    waiting, _dead = await store.counts()
    return waiting


async def wait_nothing_pending(store: Store, seconds: float = 10.0) -> None:
    async def empty() -> bool:
        return await pending(store) == 0

    await poll_until(empty, "every due queue to empty", seconds)


async def logged_copies(store: Store) -> int:
    """Copies in the shards' logs: acknowledged, and not yet resolved by an owner."""
    total = 0
    for shard in range(store.shards):
        for _id, fields in await store.client.xrange(store.log_key(shard)):
            total += len(fields)  # one field a member; a member twice is two copies
    return total


def sent_ids(requests: Sequence[RecordedRequest]) -> Counter[str]:
    """How often each event_id was sent to event/track, whatever TikTok answered."""
    return Counter(str(e["event_id"]) for r in requests for e in r.body["data"])


def accepted_ids(tiktok: TikTokStub) -> Counter[str]:
    return Counter(str(e["event_id"]) for e in tiktok.events())


def forwarded_in_log(gateway: GatewayProcess) -> int:
    """Events a process says it forwarded (its "forwarded N event(s)" lines)."""
    return sum(int(m.group(1)) for line in gateway.messages() if (m := FORWARDED.match(line)))


def requests_counted(gateway: Gateway, outcome: str) -> float:
    """gateway_forward_requests_total for one outcome, summed over its other labels."""
    return sum(
        sample.value
        for family in gateway.registry.collect()
        for sample in family.samples
        if sample.name == "gateway_forward_requests_total"
        and sample.labels.get("outcome") == outcome
    )


async def post_in_chunks(
    http: aiohttp.ClientSession, base: str, ids: Sequence[str], size: int
) -> list[dict[str, Any]]:
    return await asyncio.gather(
        *(
            post_server(http, base, [server_event(i) for i in ids[n : n + size]])
            for n in range(0, len(ids), size)
        )
    )


# -- kill -9 --------------------------------------------------------------------------


async def test_kill_9_inside_the_merge_window_then_restart_sends_each_event_once(
    launcher: Launcher, tiktok: TikTokStub, http: aiohttp.ClientSession, store: Store
) -> None:
    ids = [f"k9-window-{i:03d}" for i in range(300)]
    held = {"GATEWAY_MERGE_WINDOW": "3", "GATEWAY_EARLY_FLUSH": "0"}
    a = await launcher.start(**held)

    answers = await post_in_chunks(http, a.url, ids, 50)
    assert [x["code"] for x in answers] == [0] * 6, answers
    await a.kill()
    # Killed with every event acknowledged and still inside its window: all in the logs.
    assert tiktok.track_requests() == []
    assert await logged_copies(store) == 300

    b = await launcher.start(**held)
    await tiktok.wait_for_events(300, timeout=15)
    await wait_nothing_pending(store)
    assert await b.stop() == 0

    assert accepted_ids(tiktok) == Counter(ids)
    assert sent_ids(tiktok.track_requests()) == Counter(ids)  # no resend at all
    assert forwarded_in_log(b) == 300
    state = await store.inspect(PIXEL, ids[0], "Purchase")
    assert state is not None
    assert (state["state"], state["attempts"]) == ("sent", 1)


async def test_kill_9_mid_send_resends_after_the_lease_with_the_same_event_ids(
    launcher: Launcher, tiktok: TikTokStub, http: aiohttp.ClientSession, store: Store
) -> None:
    ids = [f"k9-send-{i:02d}" for i in range(20)]
    # TikTok takes the first request but answers too late for the gateway that sent it.
    tiktok.queue(Answer(delay=3.0))
    leased = {"GATEWAY_FORWARD_LEASE": "1", "GATEWAY_UPSTREAM_TIMEOUT": "30"}
    a = await launcher.start(**leased)

    answer = await post_server(http, a.url, [server_event(i) for i in ids])
    assert answer["code"] == 0, answer
    [in_flight] = await tiktok.wait_for_requests(1)
    await a.kill()
    assert tiktok.events() == []  # not answered yet

    b = await launcher.start(**leased)
    await tiktok.wait_for_events(20)
    await wait_nothing_pending(store)
    assert await b.stop() == 0

    first, resend = tiktok.track_requests()
    assert first is in_flight
    # The resend is the same events, so TikTok's dedup on event_id absorbs it.
    assert sorted(e["event_id"] for e in resend.body["data"]) == sorted(
        e["event_id"] for e in first.body["data"]
    )
    sends = sent_ids(tiktok.track_requests())
    assert set(sends) == set(ids)
    assert set(sends.values()) <= {1, 2}
    assert set(accepted_ids(tiktok)) == set(ids)
    assert forwarded_in_log(b) == 20
    state = await store.inspect(PIXEL, ids[0], "Purchase")
    assert state is not None
    # The attempt that died with its owner was never recorded: a new owner starts at 1.
    assert (state["state"], state["attempts"]) == ("sent", 1)


# -- two instances ------------------------------------------------------------------------


async def test_two_processes_sharing_redis_forward_each_pair_once_merged(
    launcher: Launcher, tiktok: TikTokStub, http: aiohttp.ClientSession, store: Store
) -> None:
    a, b = await asyncio.gather(
        launcher.start(GATEWAY_MERGE_WINDOW="2"), launcher.start(GATEWAY_MERGE_WINDOW="2")
    )
    keys = [f"pair-{i:03d}" for i in range(100)]
    posts = []
    for n, key in enumerate(keys):
        pixel_side, server_side = (a, b) if n % 2 == 0 else (b, a)
        posts.append(post_browser(http, pixel_side.url, browser_event(key), ttp=TTP))
        posts.append(post_server(http, server_side.url, [server_event(key, email=EMAIL)]))
    answers = await asyncio.gather(*posts)
    assert all(x["code"] == 0 for x in answers), [x for x in answers if x["code"] != 0]

    await tiktok.wait_for_events(100)
    await wait_nothing_pending(store)
    assert await a.stop() == 0
    assert await b.stop() == 0

    assert sent_ids(tiktok.track_requests()) == Counter(keys)
    for event in tiktok.events():
        assert event["user"]["ttp"] == TTP, event
        assert event["user"]["email"] == sha256(EMAIL), event
    assert forwarded_in_log(a) + forwarded_in_log(b) == 100


# -- SIGTERM ------------------------------------------------------------------------------


async def test_sigterm_during_a_slow_upstream_drains_the_batch_and_exits_0(
    launcher: Launcher, tiktok: TikTokStub, http: aiohttp.ClientSession, store: Store
) -> None:
    ids = [f"term-{i:02d}" for i in range(30)]
    tiktok.queue(Answer(delay=2.0))
    a = await launcher.start(GATEWAY_SHUTDOWN_TIMEOUT="10")
    answer = await post_server(http, a.url, [server_event(i) for i in ids])
    assert answer["code"] == 0, answer
    await tiktok.wait_for_requests(1)

    loop = asyncio.get_running_loop()
    signalled = loop.time()
    assert await a.stop() == 0
    assert loop.time() - signalled < 10

    # The in-flight batch was answered and recorded before the exit: no restart needed.
    assert await pending(store) == 0
    assert accepted_ids(tiktok) == Counter(ids)
    assert sent_ids(tiktok.track_requests()) == Counter(ids)
    messages = a.messages()
    assert forwarded_in_log(a) == 30
    assert "stopped cleanly" in messages, messages
    assert not any(line["level"] == "error" for line in a.log_lines()), a.log_text()


async def test_second_sigterm_while_draining_forces_exit_3_and_a_restart_delivers(
    launcher: Launcher, tiktok: TikTokStub, http: aiohttp.ClientSession, store: Store
) -> None:
    ids = [f"force-{i:02d}" for i in range(30)]
    tiktok.queue(Answer(delay=60.0))  # the drain cannot finish
    a = await launcher.start(
        GATEWAY_SHUTDOWN_TIMEOUT="20", GATEWAY_UPSTREAM_TIMEOUT="60", GATEWAY_FORWARD_LEASE="1"
    )
    answer = await post_server(http, a.url, [server_event(i) for i in ids])
    assert answer["code"] == 0, answer
    await tiktok.wait_for_requests(1)

    a.send(signal.SIGTERM)

    async def draining() -> bool:
        return any(m.startswith("shutting down") for m in a.messages())

    await poll_until(draining, "the first SIGTERM's drain")
    a.send(signal.SIGTERM)
    assert await a.wait(5) == 3
    assert any(m.startswith("forced exit (second SIGTERM)") for m in a.messages()), a.log_text()
    # Abandoned, not lost: still claimed in Redis until the lease runs out.
    assert await pending(store) == 30
    assert tiktok.events() == []

    b = await launcher.start(GATEWAY_FORWARD_LEASE="1")
    await tiktok.wait_for_events(30)
    await wait_nothing_pending(store)
    assert await b.stop() == 0

    assert accepted_ids(tiktok) == Counter(ids)
    sends = sent_ids(tiktok.track_requests())
    assert sends == Counter({i: 2 for i in ids})  # once unanswered, once accepted
    assert forwarded_in_log(b) == 30


# -- TikTok failing, then throttling ------------------------------------------------------


async def test_server_errors_then_rate_limits_deliver_everything_without_a_resend_storm(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    ids = [f"storm-{i:02d}" for i in range(50)]
    failures = [
        Answer(http_status=500),
        Answer(http_status=500, raw_body=b"<html>502 Bad Gateway</html>"),
        Answer(http_status=500),
        Answer(code=40100, message="Too many requests. Please retry in some time."),
        Answer(code=40100, message="Too many requests. Please retry in some time."),
        Answer(http_status=429, retry_after="1"),
    ]
    tiktok.queue(*failures)
    base, cap = 0.05, 0.5
    gateway = await make_gateway(merge_window=0.2, retry_base=base, retry_cap=cap)
    answer = await post_server(http, gateway.url, [server_event(i) for i in ids])
    assert answer["code"] == 0, answer

    await tiktok.wait_for_events(50)
    await wait_drained(gateway)

    requests = tiktok.track_requests()
    # One batch: each failure cost one request, then one success; nothing else was sent.
    assert len(requests) == len(failures) + 1
    assert all(sorted(e["event_id"] for e in r.body["data"]) == ids for r in requests)
    assert accepted_ids(tiktok) == Counter(ids)
    assert requests_counted(gateway, "retry") == 6
    assert requests_counted(gateway, "delivered") == 1

    state = await gateway.store.inspect(PIXEL, ids[0], "Purchase")
    assert state["attempts"] == 7
    waits = [e["retry_in"] for e in state["timeline"] if e["outcome"] == "retry"]
    assert len(waits) == 6
    # Full jitter under a doubling, capped bound; the 429's Retry-After: 1 wins over it.
    for attempt, wait in enumerate(waits[:5], start=1):
        assert 0 <= wait <= min(cap, base * 2 ** (attempt - 1)) + 0.001, waits
    assert waits[5] >= 1.0
    # And the gateway did wait that long between attempts (retry_in is rounded to ms).
    gaps = [later.received_at - earlier.received_at for earlier, later in pairwise(requests)]
    for gap, wait in zip(gaps, waits, strict=True):
        assert gap >= wait - 0.002, (gaps, waits)
    assert gaps[5] >= 1.0 - 0.002


async def test_a_rate_limit_that_persists_backs_off_for_minutes(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    throttled = Answer(code=40100, message="Too many requests. Please retry in some time.")
    tiktok.queue(throttled, throttled, throttled)
    gateway = await make_gateway(merge_window=0.1, retry_base=0.05, retry_cap=0.5)
    answer = await post_server(http, gateway.url, [server_event("throttled-1")])
    assert answer["code"] == 0, answer

    async def waits() -> list[float]:
        state = await gateway.store.inspect(PIXEL, "throttled-1", "Purchase")
        timeline = state["timeline"] if state else []  # None until its owner read it
        return [e["retry_in"] for e in timeline if e["outcome"] == "retry"]

    async def three_answered() -> bool:
        return len(await waits()) == 3

    await poll_until(three_answered, "three rate-limited attempts")
    first, second, third = await waits()
    assert first <= 0.5 and second <= 0.5  # a burst: retried within the second
    assert third >= 300.0  # the third in a row: TikTok's per-minute quota, suspend 5 minutes
    assert len(tiktok.track_requests()) == 3
