"""Redis outages end to end: a real redis-server of the test's own is killed, restarted, hung.

Each test starts its own `EmbeddedRedis` (append-only file, `appendfsync always`
unless said otherwise) in a short temporary directory, so killing it touches no
other test, and a gateway on it through `make_gateway(redis_url=...)`.

What is promised while Redis is away: nothing is acknowledged (server paths and
/pixel/events answer HTTP 503 with TikTok's retryable code 50002, /readyz says
503, /healthz stays 200); when it is back the gateway carries on by itself, with
no restart, reloading the Lua scripts the restarted Redis forgot; and every
event acknowledged before the outage is forwarded after it, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from gateway.appkeys import FORWARDER
from gateway.embedded import EmbeddedRedis
from gateway.errors import ConfigError
from gateway.settings import Settings
from tests.helpers import (
    browser_event,
    post_browser,
    post_server,
    server_event,
    wait_counts,
    wait_drained,
    wait_for,
    wait_timeline,
)
from tests.redis_faults import crash, revive
from tests.support import PIXEL, TOKEN, Gateway, GatewayFactory, sha256
from tests.tiktok_stub import Answer, TikTokStub

ENVELOPE_KEYS = {"code", "message", "request_id", "data"}
TTP = "ttp-cookie-value-0000000001"  # what post_browser sends as the _ttp cookie

OwnRedis = Callable[..., Awaitable[EmbeddedRedis]]


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    """Start redis-servers of this test's own; stopped and removed afterwards.

    Ask for it before `make_gateway`, so the gateways are stopped first.
    """
    started: list[EmbeddedRedis] = []

    async def start(appendfsync: str = "always") -> EmbeddedRedis:
        # Short and private: a killed server must not be any other test's Redis.
        server = EmbeddedRedis(
            Path(tempfile.mkdtemp(prefix="gwr")), port=0, appendfsync=appendfsync
        )
        started.append(server)
        await server.start()
        return server

    yield start
    for server in started:
        if server.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(server.pid, signal.SIGCONT)  # a test that failed while it was stopped
        await server.stop()
        shutil.rmtree(server.data_dir, ignore_errors=True)


# -- requests as clients send them ---------------------------------------------------------


def pixel_style_event(event_id: str) -> dict[str, Any]:
    """One event as TikTok's pixel/track and pixel/batch bodies carry it."""
    return {
        "event": "Purchase",
        "event_id": event_id,
        "timestamp": int(time.time()),
        "context": {"user": {"email": "jane.doe@example.com"}, "ip": "203.0.113.9"},
        "properties": {"currency": "USD", "value": 10},
    }


def server_requests(event_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(path, body) of one event on each TikTok-compatible server path."""
    return [
        (
            "/open_api/v1.3/event/track/",
            {"event_source": "web", "event_source_id": PIXEL, "data": [server_event(event_id)]},
        ),
        ("/open_api/v1.3/pixel/track/", {"pixel_code": PIXEL, **pixel_style_event(event_id)}),
        (
            "/open_api/v1.2/pixel/batch/",
            {"pixel_code": PIXEL, "batch": [pixel_style_event(event_id)]},
        ),
    ]


async def post_json(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    async with http.post(url, json=body, headers=headers or {}) as resp:
        answer: dict[str, Any] = orjson.loads(await resp.read())
        return resp.status, answer


async def post_track(
    http: aiohttp.ClientSession, gateway: Gateway, data: list[dict[str, Any]]
) -> tuple[int, dict[str, Any]]:
    """POST event/track whatever the answer (helpers.post_server insists on 200)."""
    body = {"event_source": "web", "event_source_id": PIXEL, "data": data}
    return await post_json(
        http, f"{gateway.url}/open_api/v1.3/event/track/", body, {"Access-Token": TOKEN}
    )


def assert_refused(status: int, answer: dict[str, Any]) -> None:
    """503 in TikTok's envelope, with the code TikTok's clients retry."""
    assert status == 503, answer
    assert set(answer) == ENVELOPE_KEYS, answer
    assert answer["code"] == 50002, answer
    assert "retry" in answer["message"], answer


def assert_refused_unstored(status: int, answer: dict[str, Any]) -> None:
    """Refused, and saying the event was not acknowledged and may be retried."""
    assert_refused(status, answer)
    assert "not acknowledged" in answer["message"], answer


async def get_status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url) as resp:
        await resp.read()
        return resp.status


async def wait_ready(http: aiohttp.ClientSession, gateway: Gateway, within: float = 10.0) -> None:
    """Poll /readyz (as a load balancer would) until it says 200; bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while await get_status(http, f"{gateway.url}/readyz") != 200:
        if loop.time() > deadline:
            raise AssertionError(f"/readyz still not 200 after {within}s")
        await asyncio.sleep(0.05)


def forwarder_task() -> asyncio.Task[Any]:
    """The one running gateway's forwarder loop (each test runs at most one that forwards)."""
    [task] = [t for t in asyncio.all_tasks() if t.get_name() == "forwarder"]
    return task


def delivered(tiktok: TikTokStub) -> Counter[str]:
    """How many times TikTok accepted each event_id."""
    return Counter(str(e.get("event_id")) for e in tiktok.events())


@contextlib.contextmanager
def stopped(server: EmbeddedRedis) -> Iterator[None]:
    """SIGSTOP the redis-server: it keeps its sockets but answers nothing, as a hung host."""
    pid = server.pid
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def rewrite_aof(client: aioredis.Redis) -> None:
    """BGREWRITEAOF and wait for it: the file then holds the data and no SCRIPT LOAD."""
    await client.bgrewriteaof()

    async def done() -> bool:
        info = await client.info("persistence")
        return not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]

    for _ in range(500):
        if await done():
            assert (await client.info("persistence"))["aof_last_bgrewrite_status"] == "ok"
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the AOF rewrite did not finish")


# -- kill -9 and restart from the append-only file -------------------------------------------


async def test_kill_and_restart_acknowledges_nothing_while_down_and_loses_nothing(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    """Redis dies with events pending (appendfsync always: kill -9 loses nothing acknowledged).

    While it is down every ingest path refuses with 503/50002 and /readyz is 503;
    after the restart the gateway carries on by itself. The events acknowledged
    before the kill come back from the append-only file still open: pixel copies
    posted after the restart merge into them, the rest leave when their window
    closes. A client retrying a refused event gets it forwarded once.
    """
    own = await own_redis()
    window = 2.5  # outlives the outage below, so the first events are still pending at the kill
    gateway = await make_gateway(redis_url=own.url, merge_window=window)
    before = [f"before-{i}" for i in range(6)]
    for event_id in before:
        assert (await post_server(http, gateway.url, [server_event(event_id)]))["code"] == 0
    for event_id in before:  # read and recorded by the shards' owner
        await wait_timeline(gateway, event_id, ["new"])
    await wait_counts(gateway, len(before))
    assert tiktok.requests == []

    await crash(own)

    refused = 0
    for path, body in server_requests("down-server"):
        status, answer = await post_json(http, gateway.url + path, body, {"Access-Token": TOKEN})
        assert_refused_unstored(status, answer)
        refused += 1
    status, answer = await post_json(
        http, f"{gateway.url}/pixel/events", browser_event("down-pixel")
    )
    assert_refused_unstored(status, answer)
    refused += 1
    status, answer = await post_track(http, gateway, [server_event("retried")])
    assert_refused_unstored(status, answer)  # this client will try again later
    refused += 1
    assert await get_status(http, f"{gateway.url}/readyz") == 503
    assert await get_status(http, f"{gateway.url}/healthz") == 200
    assert (
        gateway.metric("gateway_events_rejected_total", {"reason": "store_unavailable"}) == refused
    )
    assert gateway.metric("gateway_redis_errors_total") >= refused
    for source in ("server", "pixel"):
        received = gateway.metric(
            "gateway_events_received_total", {"source": source, "pixel": PIXEL}
        )
        assert received == (len(before) if source == "server" else 0)  # nothing more taken

    await revive(own)
    await wait_ready(http, gateway)

    # Every acknowledged event came back from the append-only file, still open.
    for event_id in before:
        state = await gateway.store.inspect(PIXEL, event_id, "Purchase")
        assert state is not None, event_id
        assert (state["state"], state["sources"], state["copies_pending"]) == (
            "open",
            ["server"],
            1,
        )
    # Same gateway, no restart: new requests are taken again.
    paired = before[:3]
    for event_id in paired:  # the pixel copies complete the pairs: forwarded at once
        answer = await post_browser(http, gateway.url, browser_event(event_id))
        assert answer["code"] == 0, answer
    assert (await post_server(http, gateway.url, [server_event("retried")]))["code"] == 0
    answer = await post_browser(http, gateway.url, browser_event("retried"))
    assert answer["code"] == 0, answer
    after = ["after-0", "after-1"]
    for event_id in after:
        assert (await post_server(http, gateway.url, [server_event(event_id)]))["code"] == 0
        assert (await post_browser(http, gateway.url, browser_event(event_id)))["code"] == 0

    expected = [*before, "retried", *after]
    events = await tiktok.wait_for_events(len(expected), timeout=window + 10.0)
    await wait_drained(gateway)
    assert delivered(tiktok) == Counter(expected)  # each once; nothing refused slipped in
    assert await gateway.store.counts() == (0, 0)
    by_id = {e["event_id"]: e for e in events}
    for event_id in [*paired, "retried", *after]:  # merged across the outage
        user = by_id[event_id]["user"]
        assert user["email"] == sha256("jane.doe@example.com")
        assert user["ttp"] == TTP
    for event_id in before[3:]:  # lone server copies, forwarded when their window closed
        assert "ttp" not in by_id[event_id]["user"]
        assert by_id[event_id]["user"]["email"] == sha256("jane.doe@example.com")


async def test_everysec_loses_nothing_acknowledged_when_only_redis_is_killed(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    """The default `appendfsync everysec`, killed within the same second as the last writes.

    everysec fsyncs once a second, so a power cut or kernel crash may lose the last
    second. But Redis write()s the append-only buffer to the file before it sends
    the replies of the commands in it: an acknowledged event is in the OS page
    cache, which a SIGKILL of redis-server alone (the process, not the machine)
    cannot lose. That, and only that, is asserted: kill -9 right after the
    acknowledgements, restart, and every acknowledged event is there and is
    forwarded once.
    """
    own = await own_redis(appendfsync="everysec")
    window = 1.0
    gateway = await make_gateway(redis_url=own.url, merge_window=window)
    batch = [server_event(f"everysec-{i}") for i in range(20)]
    assert (await post_server(http, gateway.url, batch))["code"] == 0
    singles = [f"everysec-single-{i}" for i in range(5)]
    for event_id in singles:
        assert (await post_server(http, gateway.url, [server_event(event_id)]))["code"] == 0
    await crash(own)  # no pause for an fsync
    assert tiktok.requests == []

    await revive(own)
    await wait_ready(http, gateway)
    expected = [e["event_id"] for e in batch] + singles
    await wait_counts(gateway, len(expected))
    await tiktok.wait_for_events(len(expected), timeout=window + 10.0)
    await wait_drained(gateway)
    assert delivered(tiktok) == Counter(expected)


# -- the forwarder across an outage ---------------------------------------------------------


async def test_events_due_during_the_outage_are_forwarded_after_it(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Their windows close while Redis is down: the forwarder waits it out and sends them after."""
    own = await own_redis()
    window = 1.0
    gateway = await make_gateway(redis_url=own.url, merge_window=window)
    task = forwarder_task()
    ids = [f"due-{i}" for i in range(3)]
    posted_at = time.time()
    for event_id in ids:
        assert (await post_server(http, gateway.url, [server_event(event_id)]))["code"] == 0
    await wait_counts(gateway, len(ids))

    with caplog.at_level(logging.WARNING, logger="gateway.forwarder"):
        await crash(own)
        assert tiktok.requests == []
        errors_at_kill = gateway.metric("gateway_redis_errors_total")
        # Stay down until the events are due and the forwarder has failed to claim since.
        due_at = posted_at + window
        await asyncio.sleep(max(0.0, due_at - time.time()))
        errors_when_due = gateway.metric("gateway_redis_errors_total")
        await wait_for(
            lambda: gateway.metric("gateway_redis_errors_total") >= errors_when_due + 2,
            "the forwarder to fail claims while Redis is down",
        )
        assert gateway.metric("gateway_redis_errors_total") > errors_at_kill
        assert tiktok.requests == []
        assert not task.done()

        await revive(own)
        await tiktok.wait_for_events(len(ids))
        await wait_drained(gateway)
    assert delivered(tiktok) == Counter(ids)
    assert "forwarder waiting for Redis" in caplog.text
    assert "forwarder iteration failed" not in caplog.text  # no unexpected error path
    assert forwarder_task() is task and not task.done()

    # The same loop carries on: a pair completed now leaves at once.
    assert (await post_server(http, gateway.url, [server_event("later")]))["code"] == 0
    assert (await post_browser(http, gateway.url, browser_event("later")))["code"] == 0
    await tiktok.wait_for_events(len(ids) + 1)
    await wait_drained(gateway)
    assert delivered(tiktok) == Counter([*ids, "later"])


async def test_a_batch_in_flight_when_redis_dies_is_sent_again_after_its_lease(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Sent, and Redis dies before the outcome is committed.

    TikTok took the batch, but the gateway could not mark it sent. Forwarding is
    at-least-once (PRODUCT.md section 4): when Redis is back and the lease has run
    out, the same events (same event_id, so TikTok's own dedup absorbs them) are
    sent again, and then marked sent, so never a third time.
    """
    own = await own_redis()
    lease = 1.5
    gateway = await make_gateway(redis_url=own.url, merge_window=0.2, forward_lease=lease)
    task = forwarder_task()
    tiktok.queue(Answer(delay=0.6))  # slow enough to kill Redis while TikTok holds the batch
    ids = ["inflight-0", "inflight-1"]
    assert (await post_server(http, gateway.url, [server_event(i) for i in ids]))["code"] == 0

    with caplog.at_level(logging.WARNING, logger="gateway.forwarder"):
        await tiktok.wait_for_requests(1)
        await crash(own)
        first = await tiktok.wait_for_events(len(ids))
        await wait_for(
            lambda: "could not record a batch's outcome" in caplog.text,
            "the forwarder to fail the acknowledgement",
        )
        # Its next claim, at the next poll, finds Redis away too.
        await wait_for(
            lambda: gateway.metric("gateway_redis_errors_total") >= 1,
            "the forwarder to count Redis away",
        )

    await revive(own)
    events = await tiktok.wait_for_events(2 * len(ids), timeout=lease + 10.0)
    await wait_drained(gateway)
    assert delivered(tiktok) == Counter(ids * 2)
    resent = events[len(ids) :]
    assert sorted((e["event_id"], e["event_time"]) for e in resent) == sorted(
        (e["event_id"], e["event_time"]) for e in first
    )
    assert not task.done()


# -- Lua scripts after a restart ---------------------------------------------------------------


async def test_scripts_reload_after_a_restart_emptied_the_script_cache(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    """A restarted Redis has the data (AOF) but no scripts: the owner's calls reload them.

    Redis 7 never keeps scripts across a restart. Redis 6.2 (the embedded one)
    writes SCRIPT LOAD into the append-only file, but an AOF rewrite, which Redis
    runs by itself as the file grows, drops them: rewriting before the kill gives
    the restart that Redis 7 always gives. SCRIPT FLUSH on a live Redis is covered
    in test_operations.py and test_store.py. No /readyz here (it loads the scripts
    itself), and the forwarder loop is off: the test runs its rounds, so the commit
    meets the empty cache first. Ingest runs no script (a plain XADD).
    """
    own = await own_redis()
    gateway = await make_gateway(redis_url=own.url, merge_window=60.0, forward=False)
    forwarder = gateway.app[FORWARDER]
    assert forwarder is not None
    shas = [script.sha for script in gateway.store.runner.scripts.values()]
    for event_id in ("script-0", "script-1"):
        assert (await post_server(http, gateway.url, [server_event(event_id)]))["code"] == 0

    client = aioredis.Redis.from_url(own.url)
    try:
        await rewrite_aof(client)
        await crash(own)
        await revive(own)
        assert await client.script_exists(*shas) == [False] * len(shas)
        # The pixel copy completes the pair with the stored server copy.
        assert (await post_browser(http, gateway.url, browser_event("script-0")))["code"] == 0
        await forwarder.balance()  # owns every shard: the only instance
        # The round's commit meets NOSCRIPT first: the pair is sent and committed.
        await forwarder.forward_once()
        [event] = await tiktok.wait_for_events(1)
        assert event["event_id"] == "script-0"
        assert event["user"]["ttp"] == TTP
        # The script that ran as EVAL is cached again: the next calls are EVALSHA.
        assert await client.script_exists(gateway.store.runner.scripts["commit"].sha) == [True]
        state = await gateway.store.inspect(PIXEL, "script-0", "Purchase")
        assert state is not None and state["state"] == "sent"
        assert await gateway.store.counts() == (1, 0)  # script-1 still open, unharmed
    finally:
        await client.aclose()


# -- a Redis that hangs ------------------------------------------------------------------------


async def test_a_hung_redis_gets_503_within_the_timeout_and_a_retry_is_forwarded_once(
    own_redis: OwnRedis,
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
) -> None:
    """SIGSTOP: connections stay open but nothing answers; GATEWAY_REDIS_TIMEOUT bounds the wait.

    The refused command already sits in the stopped server's socket buffer and
    runs when it resumes, so the refused copy may be stored after all (and then
    forwarded; never acknowledged, though), which is why the answer says "not
    acknowledged" rather than "not stored". The client's retry merges into that
    copy, or is dropped as a duplicate once it left: one forward either way.
    """
    own = await own_redis()
    timeout = 0.4
    gateway = await make_gateway(redis_url=own.url, merge_window=0.3, redis_timeout=timeout)
    assert (await post_server(http, gateway.url, [server_event("warm")]))["code"] == 0
    await tiktok.wait_for_events(1)  # connections are pooled and the scripts loaded

    loop = asyncio.get_running_loop()
    with stopped(own):
        requests: list[tuple[str, Callable[[], Awaitable[tuple[int, dict[str, Any]]]]]] = [
            ("server", lambda: post_track(http, gateway, [server_event("hung")])),
            (
                "pixel",
                lambda: post_json(http, f"{gateway.url}/pixel/events", browser_event("hung-px")),
            ),
        ]
        for name, request in requests:
            began = loop.time()
            status, answer = await request()
            elapsed = loop.time() - began
            assert_refused(status, answer)
            # A few timeouts at most (a pooled connection, a fresh one), never a hang.
            assert elapsed < 4 * timeout + 0.5, (name, elapsed)
        began = loop.time()
        assert await get_status(http, f"{gateway.url}/readyz") == 503
        assert loop.time() - began < 4 * timeout + 0.5
        assert await get_status(http, f"{gateway.url}/healthz") == 200

    await wait_ready(http, gateway)
    # The client retries what was refused, as TikTok's clients do on 50002.
    assert (await post_server(http, gateway.url, [server_event("hung")]))["code"] == 0
    answer = await post_browser(http, gateway.url, browser_event("hung-px"))
    assert answer["code"] == 0, answer
    await tiktok.wait_for_events(3)
    await wait_drained(gateway)
    assert delivered(tiktok) == Counter(["warm", "hung", "hung-px"])


# -- the setting that bounds the wait ------------------------------------------------------------


def test_redis_timeout_is_configurable_and_checked() -> None:
    assert Settings().redis_timeout == 5.0
    assert Settings.from_env({"GATEWAY_REDIS_TIMEOUT": "0.5"}).redis_timeout == 0.5
    for bad in ("0", "-1", "soon"):
        with pytest.raises(ConfigError, match="GATEWAY_REDIS_TIMEOUT"):
            Settings.from_env({"GATEWAY_REDIS_TIMEOUT": bad})


# -- waiting for replicas ----------------------------------------------------------------------


async def test_wait_replicas_unconfirmed_answers_503_and_the_retry_is_forwarded_once(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    """GATEWAY_REDIS_WAIT_REPLICAS=1 on a Redis without replicas: WAIT times out, the
    copy is stored but not acknowledged (503, 50002); the client's retry is merged."""
    waiting = await make_gateway(
        redis_wait_replicas=1, redis_wait_timeout=0.05, merge_window=0.2, forward=False
    )
    body = {"event_source": "web", "event_source_id": PIXEL, "data": [server_event("w-1")]}
    async with http.post(
        f"{waiting.url}/open_api/v1.3/event/track/", json=body, headers={"Access-Token": TOKEN}
    ) as resp:
        assert resp.status == 503
        assert (await resp.json())["code"] == 50002
    plain = await make_gateway(merge_window=0.2)
    assert (await post_server(http, plain.url, [server_event("w-1")]))["code"] == 0
    [event] = await tiktok.wait_for_events(1)
    assert event["event_id"] == "w-1"
    await wait_drained(plain)
    assert len(tiktok.events()) == 1
