"""A key's timeline, through `/debug/events/...` and `tiktok-gateway inspect`.

Each copy received (source, time, field names), merges, retries, the forward
(time, batch, TikTok's request id and code), dropped duplicates, dead letters
and replays, from the shard's bounded history; the key is forgotten after its
dedup window whatever the history still holds.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway import history, window
from gateway.cli import main
from tests.helpers import browser_event, post_browser, post_server, server_event, wait_timeline
from tests.support import PIXEL, TOKEN, Gateway, GatewayFactory, sha256
from tests.tiktok_stub import Answer, TikTokStub

ADMIN = "admin-secret"
EMAIL = "jane.doe@example.com"


async def debug(http: aiohttp.ClientSession, gateway: Gateway, event_id: str) -> dict[str, Any]:
    url = f"{gateway.url}/debug/events/{PIXEL}/{event_id}/Purchase"
    async with http.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        text = await resp.text()
        assert resp.status == 200, text
    for secret in (EMAIL, sha256(EMAIL), TOKEN, "customer-8841", "+14155552671"):
        assert secret not in text
    state: dict[str, Any] = orjson.loads(text)["data"]
    return state


async def wait_state(gateway: Gateway, event_id: str, state: str) -> dict[str, Any]:
    for _ in range(200):
        found = await gateway.store.inspect(PIXEL, event_id, "Purchase")
        if found is not None and found["state"] == state:
            result: dict[str, Any] = found
            return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"{event_id} never reached {state}: {found}")


async def test_timeline_shows_copies_merge_retry_forward_and_duplicates(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    tiktok.queue(Answer(http_status=500, raw_body=b"busy"))
    gateway = await make_gateway(admin_token=ADMIN, merge_window=5.0)
    await post_browser(http, gateway.url, browser_event("tl-1"))
    server = server_event("tl-1", email=EMAIL)
    server["user"]["phone"] = "+1 415 555 2671"
    await post_server(http, gateway.url, [server])
    await tiktok.wait_for_events(1)
    await wait_state(gateway, "tl-1", "sent")
    await post_server(http, gateway.url, [server_event("tl-1")])
    await post_browser(http, gateway.url, browser_event("tl-1"))
    outcomes = ["new", "complete", "retry", "forwarded", "duplicate", "duplicate"]
    await wait_timeline(gateway, "tl-1", outcomes)

    state = await debug(http, gateway, "tl-1")
    timeline = state["timeline"]
    assert [e["outcome"] for e in timeline] == outcomes
    new, complete, retry, forwarded, dup_server, dup_pixel = timeline
    times = [e["at"] for e in timeline]
    assert times == sorted(times)
    assert times[0] == pytest.approx(state["first_seen"], abs=0.01)
    # Each copy: its source and the names of the fields it brought, never their values.
    assert (new["source"], complete["source"]) == ("pixel", "server")
    assert {"user.ttp", "user.ip", "user.user_agent", "page.url"} <= set(new["fields"])
    assert "user.email" not in new["fields"]
    assert {"user.email", "user.phone", "user.external_id", "properties.value"} <= set(
        complete["fields"]
    )
    # The failed attempt and the forward, each named by its batch.
    assert retry["http_status"] == 500 and retry["attempt"] == 1 and retry["retry_in"] >= 0
    assert forwarded["code"] == 0
    assert forwarded["request_id"] == state["tiktok_request_id"]
    assert forwarded["request_id"].startswith("stub")
    assert forwarded["batch_size"] == 1
    assert forwarded["batch"] and retry["batch"] and forwarded["batch"] != retry["batch"]
    assert forwarded["at"] == pytest.approx(state["forwarded_at"], abs=0.01)
    # Late copies: dropped, with their time and source.
    assert (dup_server["source"], dup_pixel["source"]) == ("server", "pixel")
    assert dup_pixel["at"] >= dup_server["at"] >= forwarded["at"]
    assert state["duplicates_dropped"] == 2
    assert state["sources"] == ["pixel", "server"]
    assert state["attempts"] == 2


async def test_key_is_forgotten_after_its_dedup_window(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    gateway = await make_gateway(admin_token=ADMIN, merge_window=0.1, dedup_window=1.5)
    await post_server(http, gateway.url, [server_event("tl-exp")])
    await tiktok.wait_for_events(1)
    await wait_state(gateway, "tl-exp", "sent")
    await post_server(http, gateway.url, [server_event("tl-exp")])
    await wait_timeline(gateway, "tl-exp", ["new", "forwarded", "duplicate"])

    # After the forward only the fingerprint remains of the key itself: its copies are
    # trimmed from the log, and its history records are in the shard's list, of a size
    # fixed by GATEWAY_DEBUG_HISTORY.
    await assert_only_remembered(gateway, redis_client, "tl-exp")
    state = await debug(http, gateway, "tl-exp")
    assert [e["outcome"] for e in state["timeline"]] == ["new", "forwarded", "duplicate"]
    assert state["history"] == {
        "kept_entries": gateway.store.history_budget, "from_first_copy": True,
    }
    # The fingerprint is kept to the whole second after first copy + dedup window; then
    # the key is unknown, though its entries may still be in the history.
    url = f"{gateway.url}/debug/events/{PIXEL}/tl-exp/Purchase"
    for _ in range(30):
        async with http.get(url, headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            if resp.status == 404:
                break
        await asyncio.sleep(0.1)
    assert resp.status == 404


async def test_dead_letter_and_replay_are_on_the_timeline(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
) -> None:
    gateway = await make_gateway(admin_token=ADMIN, merge_window=0.1, dedup_window=30.0)
    tiktok.reject_event_ids.add("tl-dead")
    await post_server(http, gateway.url, [server_event("tl-dead")])
    await wait_state(gateway, "tl-dead", "dead")
    tiktok.reject_event_ids.clear()
    letters = await gateway.store.dead_letters()
    assert await gateway.store.replay(letters, time.time()) == 1
    await tiktok.wait_for_events(1)
    await wait_state(gateway, "tl-dead", "sent")

    state = await debug(http, gateway, "tl-dead")
    outcomes = [e["outcome"] for e in state["timeline"]]
    assert outcomes == ["new", "dead_lettered", "replayed", "forwarded"]
    dead, replayed = state["timeline"][1], state["timeline"][2]
    assert dead["reason"] == "rejected" and dead["code"] == 40002 and dead["batch"]
    assert replayed["dead_letter"] == letters[0].id
    assert state["attempts"] == 2  # the one before the dead letter, and the replay
    await assert_only_remembered(gateway, redis_client, "tl-dead")


async def test_an_open_key_shows_when_it_is_due_whatever_came_after(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    # A first life, sent at once (both sources: early flush) and dead-lettered; forgotten.
    gateway = await make_gateway(admin_token=ADMIN, merge_window=30.0, dedup_window=1.0)
    tiktok.reject_event_ids.add("tl-open")
    await post_browser(http, gateway.url, browser_event("tl-open"))
    await post_server(http, gateway.url, [server_event("tl-open")])
    await wait_state(gateway, "tl-open", "dead")
    tiktok.reject_event_ids.clear()
    for _ in range(200):
        if await gateway.store.inspect(PIXEL, "tl-open", "Purchase") is None:
            break
        await asyncio.sleep(0.02)
    # A second life, open for its merge window; the old dead letter replayed meanwhile is
    # a duplicate of it.
    await post_server(http, gateway.url, [server_event("tl-open")])
    await wait_timeline(gateway, "tl-open", ["new"])
    assert await gateway.store.replay(await gateway.store.dead_letters(), time.time()) == 1
    await wait_timeline(gateway, "tl-open", ["new", "duplicate"])

    state = await debug(http, gateway, "tl-open")
    new, duplicate = state["timeline"]
    assert state["state"] == "open"
    assert state["first_seen"] == new["at"]
    assert state["due"] == new["due"] == pytest.approx(new["at"] + 30.0, abs=0.01)
    assert (state["attempts"], state["duplicates_dropped"]) == (0, 1)
    assert (state["copies_received"], state["copies_pending"]) == (1, 1)
    assert state["sources"] == ["server"]
    assert duplicate["dead_letter"]
    assert len(tiktok.track_requests()) == 1


async def assert_only_remembered(
    gateway: Gateway, redis_client: aioredis.Redis, event_id: str
) -> None:
    """Nothing of a resolved key is left in Redis but its fingerprint (and history)."""
    member = gateway.store.member_of(PIXEL, event_id, "Purchase")
    shard = gateway.store.shard_of(member)
    assert await redis_client.hexists(gateway.store.retry_key(shard), member) == 0
    assert await redis_client.xlen(gateway.store.log_key(shard)) == 0
    assert [k for k in await redis_client.keys("tkgw:*") if event_id.encode() in k] == []


async def test_cli_inspect_prints_the_timeline(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Any,
) -> None:
    gateway = await make_gateway(merge_window=5.0)
    await post_browser(http, gateway.url, browser_event("tl-cli"))
    await post_server(http, gateway.url, [server_event("tl-cli", email=EMAIL)])
    await tiktok.wait_for_events(1)
    await wait_state(gateway, "tl-cli", "sent")
    await post_server(http, gateway.url, [server_event("tl-cli", email=EMAIL)])
    await wait_timeline(gateway, "tl-cli", ["new", "complete", "forwarded", "duplicate"])

    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(tmp_path / "cli"))
    monkeypatch.setenv("GATEWAY_PIXELS", f"{PIXEL}={TOKEN}")
    monkeypatch.setenv("GATEWAY_SHARDS", str(gateway.settings.shards))
    monkeypatch.setattr("gateway.cli.setup_logging", lambda *_args: None)
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["inspect", PIXEL, "tl-cli", "Purchase"])
    out = capsys.readouterr().out
    assert code == 0, out

    state = orjson.loads(out)
    assert [e["outcome"] for e in state["timeline"]] == [
        "new", "complete", "forwarded", "duplicate",
    ]
    assert state["timeline"][2]["request_id"] == state["tiktok_request_id"]
    assert state["duplicates_dropped"] == 1
    assert EMAIL not in out and sha256(EMAIL) not in out


async def test_a_history_entry_stays_small_whatever_a_copy_carries(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """The history's budget counts entries: one copy with hundreds of fields, or very long
    names, must not make its entry large."""
    gateway = await make_gateway(admin_token=ADMIN, merge_window=30.0)
    event = server_event("tl-big")
    long_name = "x" * 250  # keys are at most 256 characters, 200 a level
    event["properties"] = {long_name: 1, **event["properties"]}
    event["properties"].update({f"custom_{i}": i for i in range(150)})
    event["properties"]["more"] = {f"custom_{i}": i for i in range(150)}
    answer = await post_server(http, gateway.url, [event])
    assert answer["code"] == 0, answer
    await wait_state(gateway, "tl-big", "open")

    [entry] = (await debug(http, gateway, "tl-big"))["timeline"]
    names = len(history.field_names(event))
    assert len(entry["fields"]) == window.HISTORY_FIELDS_MAX
    assert entry["fields_omitted"] == names - window.HISTORY_FIELDS_MAX
    assert all(len(name) <= window.HISTORY_NAME_MAX for name in entry["fields"])
    assert f"properties.{long_name}"[: window.HISTORY_NAME_MAX] in entry["fields"]
    assert len(orjson.dumps(entry)) < window.HISTORY_FIELDS_MAX * (window.HISTORY_NAME_MAX + 8)
