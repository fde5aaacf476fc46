"""Forwarding: batching, retries, poison isolation, dead letters, against the TikTok stand-in."""

from __future__ import annotations

import dataclasses
import time

import aiohttp

from gateway.appkeys import FORWARDER
from gateway.records import Copy
from gateway.sending import Pacer, build_outgoing
from gateway.store import Keys
from gateway.window import PendingKey, ShardWindow
from tests.helpers import post_server, server_event, wait_drained, wait_for
from tests.support import PIXEL, GatewayFactory
from tests.tiktok_stub import Answer, TikTokStub


async def test_batches_per_pixel_up_to_the_batch_size(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.3, forward_batch_size=10)
    await post_server(http, gateway.url, [server_event(f"b-{i}") for i in range(25)])
    await tiktok.wait_for_events(25)
    sizes = [len(r.body["data"]) for r in tiktok.track_requests()]
    assert sum(sizes) == 25
    assert max(sizes) <= 10
    assert len(sizes) >= 3
    assert all(r.body["event_source_id"] == PIXEL for r in tiktok.track_requests())


async def test_server_errors_are_retried_until_delivered(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    tiktok.queue(Answer(http_status=500), Answer(http_status=502), Answer(code=50002))
    gateway = await make_gateway(merge_window=0.1)
    await post_server(http, gateway.url, [server_event("retry-1")])
    [event] = await tiktok.wait_for_events(1)
    assert event["event_id"] == "retry-1"
    await wait_drained(gateway)
    assert len(tiktok.track_requests()) == 4
    requests = "gateway_forward_requests_total"
    assert gateway.metric(requests, {"outcome": "retry", "code_class": "http_5xx"}) == 2
    assert gateway.metric(requests, {"outcome": "retry", "code_class": "5xxxx"}) == 1
    assert gateway.metric(requests, {"outcome": "delivered", "code_class": "0"}) == 1
    state = await gateway.store.inspect(PIXEL, "retry-1", "Purchase")
    assert state["state"] == "sent"
    assert [e["outcome"] for e in state["timeline"]].count("retry") == 3


async def test_rate_limit_answers_are_retried(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    tiktok.queue(
        Answer(code=40100, message="Too many requests. Please retry in some time."),
        Answer(http_status=429, retry_after="0"),
    )
    gateway = await make_gateway(merge_window=0.1)
    await post_server(http, gateway.url, [server_event("rl-1")])
    await tiktok.wait_for_events(1)
    requests = "gateway_forward_requests_total"
    assert gateway.metric(requests, {"outcome": "retry", "code_class": "4xxxx_rate_limit"}) == 1
    assert gateway.metric(requests, {"outcome": "retry", "code_class": "http_4xx"}) == 1


async def test_one_poison_event_is_isolated_and_its_batch_mates_delivered(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    tiktok.reject_event_ids = {"poison-7"}
    gateway = await make_gateway(merge_window=0.3)
    await post_server(http, gateway.url, [server_event(f"poison-{i}") for i in range(10)])
    await tiktok.wait_for_events(9)
    await wait_drained(gateway, 1)
    assert sorted(e["event_id"] for e in tiktok.events()) == sorted(
        f"poison-{i}" for i in range(10) if i != 7
    )
    [letter] = await gateway.store.dead_letters()
    assert letter.letter.event["event_id"] == "poison-7"
    assert letter.letter.code == 40002
    assert "event_id" in letter.letter.message
    await wait_for(
        lambda: gateway.metric("gateway_events_dead_lettered_total", {"reason": "rejected"}) == 1,
        "the poison event counted as dead-lettered",
    )


async def test_token_errors_are_dead_lettered_not_retried(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    tiktok.queue(Answer(code=40105, message="Access token is incorrect or has been revoked."))
    gateway = await make_gateway(merge_window=0.1)
    await post_server(http, gateway.url, [server_event("auth-1"), server_event("auth-2")])
    await wait_drained(gateway, 2)
    # Counted once Redis has the letter: a moment after the drain shows it.
    await wait_for(
        lambda: gateway.metric("gateway_events_dead_lettered_total", {"reason": "auth"}) == 2,
        "both events counted as dead-lettered",
    )
    assert len(tiktok.track_requests()) == 1
    assert gateway.metric("gateway_upstream_auth_failures_total", {"pixel": PIXEL}) == 1


async def test_events_too_old_to_send_are_dead_lettered(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.1, max_event_age=60.0)
    old = int(time.time()) - 3600
    await post_server(
        http, gateway.url, [server_event("old-1", event_time=old), server_event("new-1")]
    )
    [event] = await tiktok.wait_for_events(1)
    assert event["event_id"] == "new-1"
    await wait_drained(gateway, 1)
    [letter] = await gateway.store.dead_letters()
    assert letter.letter.reason == "too_old"


async def test_dead_letters_replay_through_the_normal_path(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    tiktok.reject_event_ids = {"replay-1"}
    gateway = await make_gateway(merge_window=0.1)
    await post_server(http, gateway.url, [server_event("replay-1")])
    await wait_drained(gateway, 1)
    tiktok.reject_event_ids = set()
    letters = await gateway.store.dead_letters()
    assert await gateway.store.replay(letters, time.time()) == 1
    [event] = await tiktok.wait_for_events(1)
    assert event["event_id"] == "replay-1"
    _, dead = await gateway.store.counts()
    assert dead == 0


async def test_match_keys_and_merge_wait_are_counted(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.1)
    await post_server(http, gateway.url, [server_event("mk-1")])
    await tiktok.wait_for_events(1)
    await wait_drained(gateway)  # the stand-in answers before the gateway records the outcome
    assert gateway.metric("gateway_match_keys_total", {"pixel": PIXEL, "key": "email"}) == 1
    assert gateway.metric("gateway_match_keys_total", {"pixel": PIXEL, "key": "external_id"}) == 1
    assert gateway.metric("gateway_match_keys_total", {"pixel": PIXEL, "key": "ttp"}) == 0
    assert gateway.metric("gateway_merge_wait_seconds_count") == 1


def test_outgoing_takes_first_copy_name_and_first_test_code() -> None:
    keys = Keys(shards=4, dedup_buckets=1024, legacy_aliases=True, history=0)
    window = ShardWindow(shard=0, keys=keys, merge_window_ms=1000, dedup_window_ms=60_000,
                         early_flush=True, history=False)  # fmt: skip
    key = PendingKey(
        member="P:Purchase:1",
        first_seen_ms=1000,
        due_ms=2000,
        sources=3,
        dedup=True,
        copies=[
            Copy("pixel", "P", "web", None, 1000,
                 {"event": "CompletePayment", "event_time": 5, "user": {"ttp": "a"}}),
            Copy("server", "P", "web", "T1", 1500,
                 {"event": "Purchase", "event_time": 9, "user": {"email": "e"}}),
        ],
    )  # fmt: skip
    out = build_outgoing(window, key, default_test_code="CONF")
    assert out.body == {"event": "CompletePayment", "event_time": 5,
                        "user": {"ttp": "a", "email": "e"}}  # fmt: skip
    assert out.test_event_code == "T1"
    assert out.batch_key == ("P", "web", "T1")
    assert (out.window, out.key) == (window, key)
    key.copies[1] = dataclasses.replace(key.copies[1], test_event_code=None)
    assert build_outgoing(window, key, "CONF").test_event_code == "CONF"


async def test_pacer_spaces_requests_per_key() -> None:
    now = [100.0]
    pacer = Pacer(per_second=1000.0, clock=lambda: now[0])
    await pacer.wait("a")
    await pacer.wait("b")
    assert pacer._next == {"a": 100.001, "b": 100.001}


async def test_a_shard_whose_lease_may_have_lapsed_is_rebuilt_before_it_sends(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    # As after renewals that failed for longer than the lease (its node away): the window
    # is not trusted; the shard is taken again, rebuilt from its log, and the key sent once.
    gateway = await make_gateway(merge_window=0.5)
    forwarder = gateway.app[FORWARDER]
    await post_server(http, gateway.url, [server_event("lapsed-1")])
    member = gateway.store.member_of(PIXEL, "lapsed-1", "Purchase")
    shard = gateway.store.shard_of(member)
    await wait_for(
        lambda: member in getattr(forwarder.windows.get(shard), "pending", {}),
        "the key open in its owner's window",
    )
    window = forwarder.windows[shard]
    forwarder.shards.held_until[shard] = 0.0

    [event] = await tiktok.wait_for_events(1)
    assert event["event_id"] == "lapsed-1"
    await wait_drained(gateway)
    assert forwarder.windows[shard] is not window  # let go and taken again
    assert len(tiktok.events()) == 1
