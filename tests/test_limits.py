"""Limits that hold under attack, end to end over real sockets.

Each limit is tested at its edge (the largest allowed passes) and past it (a
clear refusal that stores nothing), with inputs an attacker would pick: a body
that claims a gigabyte, a gzip bomb, a hundred thousand events, a megabyte of
brackets, headers past the parser's limits, a body trickled a byte at a time,
and one client flooding /pixel/events while another goes about its business.

tests/test_bad_input.py covers the everyday malformations of each shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import io
import time
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.app import MAX_HEADER_FIELD_BYTES, MAX_HEADERS, MAX_REQUEST_LINE_BYTES
from gateway.fields import (
    MAX_KEY_LENGTH,
    MAX_LIST_ITEMS,
    MAX_NESTING,
    MAX_PROPERTIES,
    MAX_STRING_LENGTH,
)
from gateway.formats import MAX_CODE_LENGTH, MAX_JSON_DEPTH, MAX_TEST_EVENT_CODE_LENGTH
from gateway.normalise import MAX_CONTENTS, MAX_EVENT_ID_LENGTH
from gateway.pii import MAX_PII_ITEMS, MAX_PII_LENGTH
from tests.helpers import (
    RawAnswer,
    browser_event,
    connection,
    head,
    read_answer,
    server_event,
)
from tests.support import PIXEL, TOKEN, Gateway, GatewayFactory

TRACK = "/open_api/v1.3/event/track/"
BROWSER = "/pixel/events"


async def closed_by_server(reader: asyncio.StreamReader, within: float = 5.0) -> bool:
    """True when the server closes the connection (EOF) within `within` seconds."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except TimeoutError:
        return False


def json_headers(length: int, **extra: str) -> dict[str, str]:
    return {"Content-Type": "application/json", "Access-Token": TOKEN,
            "Content-Length": str(length), **extra}  # fmt: skip


async def assert_nothing_stored(gateway: Gateway) -> None:
    """No event was accepted: none pending, none received (a rate limit's count may be kept)."""
    assert await gateway.store.counts() == (0, 0)
    for source in ("pixel", "server"):
        labels = {"source": source, "pixel": PIXEL}
        assert gateway.metric("gateway_events_received_total", labels) == 0


async def still_serves(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{gateway.url}/readyz") as resp:
        assert resp.status == 200


# -- body size --------------------------------------------------------------------------------

KIB = 1024


@pytest.mark.parametrize("path", [TRACK, BROWSER])
async def test_a_body_claiming_a_gigabyte_is_refused_without_reading_it(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    path: str,
) -> None:
    gateway = await make_gateway(max_body_bytes=64 * KIB, forward=False)
    async with connection(gateway) as (reader, writer):
        writer.write(head(path, json_headers(2**30)))
        await writer.drain()
        # Past the limit, then nothing more; the gateway may answer before it has it all.
        with contextlib.suppress(ConnectionError):
            writer.write(b"[" + b" " * (80 * KIB))
            await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), 5)
    assert answer.status == 413
    assert answer.envelope()["message"] == f"body: larger than {64 * KIB} bytes"
    await assert_nothing_stored(gateway)
    await still_serves(gateway, http)


@pytest.mark.parametrize("path", [TRACK, BROWSER])
async def test_a_gzip_bomb_is_limited_after_decompression(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    path: str,
) -> None:
    # aiohttp inflates Content-Encoding: gzip bodies itself: 16 MiB of blanks in ~16 KiB.
    gateway = await make_gateway(max_body_bytes=256 * KIB, forward=False)
    bomb = gzip.compress(b"[" + b" " * (16 * KIB * KIB), compresslevel=9)
    assert len(bomb) < 32 * KIB
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip",
               "Access-Token": TOKEN}  # fmt: skip
    async with http.post(gateway.url + path, data=bomb, headers=headers) as resp:
        assert resp.status == 413
        assert "body: larger than" in (await resp.json())["message"]
    await assert_nothing_stored(gateway)
    await still_serves(gateway, http)


async def test_a_body_at_the_size_limit_is_accepted(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(max_body_bytes=8 * KIB, forward=False)
    event = server_event("at-the-limit")
    body = {"event_source": "web", "event_source_id": PIXEL, "data": [event]}
    padding = 8 * KIB - len(orjson.dumps(body)) - len(',"description":""')
    event["properties"]["description"] = "x" * padding
    raw = orjson.dumps(body)
    assert len(raw) == 8 * KIB
    headers = {"Content-Type": "application/json", "Access-Token": TOKEN}
    async with http.post(gateway.url + TRACK, data=raw, headers=headers) as resp:
        assert (resp.status, (await resp.json())["code"]) == (200, 0)
    async with http.post(gateway.url + TRACK, data=raw + b" ", headers=headers) as resp:
        assert resp.status == 413


# -- events per request -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "count"),
    # As many as fit the body limit: 2 MiB on TikTok's paths, 64 KiB on /pixel/events.
    [(TRACK, 500_000), (BROWSER, 20_000)],
)
async def test_a_flood_of_events_in_one_request_is_refused_before_one_is_read(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    path: str,
    count: int,
) -> None:
    gateway = await make_gateway(forward=False)
    events = [{}] * count
    body: Any = events if path == BROWSER else {"event_source_id": PIXEL, "data": events}
    headers = {"Content-Type": "application/json", "Access-Token": TOKEN}
    raw = io.BytesIO(orjson.dumps(body))  # streamed: aiohttp warns of large bytes otherwise
    async with http.post(gateway.url + path, data=raw, headers=headers) as resp:
        answer = await resp.json()
    assert resp.status == (400 if path == BROWSER else 200)
    assert answer["code"] == 40002
    assert f"has {count} events; at most" in answer["message"], answer
    # Refused as a whole: no event was parsed, so none was refused on its own.
    assert gateway.metric("gateway_events_rejected_total", {"reason": "invalid_request"}) == 1
    assert gateway.metric("gateway_events_rejected_total", {"reason": "invalid_event"}) == 0
    await assert_nothing_stored(gateway)


# -- nesting depth ----------------------------------------------------------------------------


async def test_a_megabyte_of_brackets_is_refused_not_recursed_into(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(forward=False)
    for raw in (b"[" * 1_000_000, b'{"a":' * 200_000 + b"1" + b"}" * 200_000):
        headers = {"Content-Type": "application/json", "Access-Token": TOKEN}
        async with http.post(gateway.url + TRACK, data=io.BytesIO(raw), headers=headers) as resp:
            answer = await resp.json()
        assert (resp.status, answer["code"]) == (200, 40002)
        assert f"deeper than {MAX_JSON_DEPTH} levels" in answer["message"]
    await assert_nothing_stored(gateway)
    await still_serves(gateway, http)


def nested(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = {"x": value}
    return value


async def test_free_form_values_nest_at_most_eight_levels(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    # `properties` itself is the first level: a custom property may hold seven more.
    gateway = await make_gateway(forward=False)
    deep = server_event("nest-ok", properties={"custom": nested(MAX_NESTING - 1)})
    deeper = server_event("nest-bad", properties={"custom": nested(MAX_NESTING)})
    answer = await post_track(http, gateway, [deep, deeper])
    assert answer["code"] == 20001, answer
    [failed] = answer["data"]["failed_events"]
    assert failed["index"] == 1
    assert failed["field"] == "data.1.properties.custom" + ".x" * (MAX_NESTING - 1)
    assert failed["message"] == f"nests deeper than {MAX_NESTING} levels"


async def post_track(
    http: aiohttp.ClientSession, gateway: Gateway, data: list[dict[str, Any]], **top: Any
) -> dict[str, Any]:
    body = {"event_source": "web", "event_source_id": PIXEL, "data": data, **top}
    headers = {"Content-Type": "application/json", "Access-Token": TOKEN}
    async with http.post(gateway.url + TRACK, data=orjson.dumps(body), headers=headers) as resp:
        assert resp.status == 200
        answer: dict[str, Any] = await resp.json()
        return answer


# -- string lengths and counts ----------------------------------------------------------------


def _set(path: str, value: Any) -> dict[str, Any]:
    """A server event with `value` at the dotted `path` (inside the event)."""
    event = server_event("limit-1")
    *parents, leaf = path.split(".")
    node = event
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value
    return event


def _long_email(length: int) -> str:
    return "x" * (length - len("@example.com")) + "@example.com"


# (name, field path inside the event or "" for a key, value at the limit, value past it)
LIMITS: list[tuple[str, str, Any, Any]] = [
    ("event_id", "event_id", "e" * MAX_EVENT_ID_LENGTH, "e" * (MAX_EVENT_ID_LENGTH + 1)),
    ("a string", "properties.description", "d" * MAX_STRING_LENGTH,
     "d" * (MAX_STRING_LENGTH + 1)),
    ("page.url", "page.url", "https://x.test/" + "p" * (MAX_STRING_LENGTH - 15),
     "https://x.test/" + "p" * (MAX_STRING_LENGTH - 14)),
    ("an email", "user.email", _long_email(MAX_PII_LENGTH), _long_email(MAX_PII_LENGTH + 1)),
    ("emails", "user.email", ["a@b.co"] * MAX_PII_ITEMS, ["a@b.co"] * (MAX_PII_ITEMS + 1)),
    ("properties", "properties", {f"k{i}": i for i in range(MAX_PROPERTIES)},
     {f"k{i}": i for i in range(MAX_PROPERTIES + 1)}),
    ("a property name", "properties", {"k" * MAX_KEY_LENGTH: 1}, {"k" * (MAX_KEY_LENGTH + 1): 1}),
    ("contents", "properties.contents", [{"content_id": "a"}] * MAX_CONTENTS,
     [{"content_id": "a"}] * (MAX_CONTENTS + 1)),
    ("a list", "properties.content_ids", ["a"] * MAX_LIST_ITEMS, ["a"] * (MAX_LIST_ITEMS + 1)),
]  # fmt: skip


@pytest.mark.parametrize(("field", "at_limit", "past_limit"),
                         [pytest.param(f, a, p, id=n) for n, f, a, p in LIMITS])  # fmt: skip
async def test_sizes_at_the_limit_pass_and_past_it_are_refused_naming_the_field(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    field: str,
    at_limit: Any,
    past_limit: Any,
) -> None:
    gateway = await make_gateway(forward=False)
    answer = await post_track(http, gateway, [_set(field, at_limit), _set(field, past_limit)])
    assert answer["code"] == 20001, answer
    assert answer["data"]["accepted"] == 1
    [failed] = answer["data"]["failed_events"]
    assert failed["index"] == 1
    assert failed["field"] == f"data.1.{field}", failed
    assert any(words in failed["message"] for words in ("more than", "longer than", "at most"))


@pytest.mark.parametrize(
    ("top", "field"),
    [
        ({"event_source_id": "P" * (MAX_CODE_LENGTH + 1)}, "event_source_id"),
        ({"test_event_code": "T" * (MAX_TEST_EVENT_CODE_LENGTH + 1)}, "test_event_code"),
    ],
)
async def test_request_level_strings_past_their_limit_refuse_the_request(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    top: dict[str, Any],
    field: str,
) -> None:
    gateway = await make_gateway(pixels={}, forward=False)
    answer = await post_track(http, gateway, [server_event("top-1")], **top)
    assert answer["code"] == 40002
    assert answer["message"].startswith(f"{field}: must be")
    await assert_nothing_stored(gateway)


# -- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "request_head",
    [
        pytest.param(head("/healthz", {"Cookie": "c" * (MAX_HEADER_FIELD_BYTES + 1)}, "GET"),
                     id="one header too long"),
        pytest.param(head("/healthz", {f"X-H{i}": "v" for i in range(MAX_HEADERS + 1)}, "GET"),
                     id="too many headers"),
        pytest.param(head("/healthz?" + "q" * MAX_REQUEST_LINE_BYTES, {}, "GET"),
                     id="request line too long"),
    ],
)  # fmt: skip
async def test_headers_past_the_limits_are_refused_and_the_connection_closed(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, request_head: bytes
) -> None:
    gateway = await make_gateway(forward=False)
    async with connection(gateway) as (reader, writer):
        writer.write(request_head)
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), 5)
        assert answer.status == 400
        assert await closed_by_server(reader)
    await still_serves(gateway, http)


async def test_headers_at_the_limits_are_served(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(forward=False)
    # Each header line counts its name, ": " and value; the field limit is on the value.
    headers = {f"X-H{i}": "v" for i in range(MAX_HEADERS - 3)}  # with Host, Cookie, Connection
    headers["Cookie"] = "_ttp=" + "c" * (MAX_HEADER_FIELD_BYTES - 5)
    headers["Connection"] = "close"
    async with connection(gateway) as (reader, writer):
        writer.write(head("/healthz", headers, "GET"))
        await writer.drain()
        answer = await asyncio.wait_for(read_answer(reader), 5)
    assert answer.status == 200, answer


# -- slow bodies (slow loris) ---------------------------------------------------------------

BODY_TIMEOUT = 1.0
DEMO_ORDER = "/demo/order"


async def trickle(gateway: Gateway, path: str, interval: float = 0.1) -> tuple[RawAnswer, float]:
    """Send a body a byte every `interval`; the answer and how long it took to come."""
    body = orjson.dumps(browser_event("slow-1") if path == BROWSER else {
        "event_source_id": PIXEL, "data": [server_event("slow-1")]})  # fmt: skip
    async with connection(gateway) as (reader, writer):
        started = time.monotonic()
        writer.write(head(path, json_headers(len(body))))

        async def drip() -> None:
            with contextlib.suppress(ConnectionError):
                for byte in body:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(interval)

        dripping = asyncio.create_task(drip())
        try:
            answer = await asyncio.wait_for(read_answer(reader), BODY_TIMEOUT + 5)
        finally:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dripping
        return answer, time.monotonic() - started


@pytest.mark.parametrize("path", [TRACK, BROWSER, DEMO_ORDER])
async def test_a_body_trickled_byte_by_byte_times_out(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    path: str,
) -> None:
    sandbox = {"pixels": {}} if path == DEMO_ORDER else {}  # the demo shop is sandbox mode's
    gateway = await make_gateway(body_timeout=BODY_TIMEOUT, forward=False, **sandbox)
    answer, took = await trickle(gateway, path)
    assert answer.status == 408
    assert answer.headers.get("connection") == "close"
    envelope = answer.envelope()
    assert envelope["code"] == 40002
    assert envelope["message"] == "body: not received within 1 seconds"
    assert BODY_TIMEOUT <= took < BODY_TIMEOUT + 3
    assert gateway.metric("gateway_events_rejected_total", {"reason": "body_timeout"}) == 1
    await assert_nothing_stored(gateway)
    await still_serves(gateway, http)


async def test_a_slow_body_within_the_timeout_is_accepted(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(body_timeout=5.0, forward=False)
    body = orjson.dumps({"event_source_id": PIXEL, "data": [server_event("slow-ok")]})
    async with connection(gateway) as (reader, writer):
        writer.write(head(TRACK, json_headers(len(body))))
        for start in range(0, len(body), len(body) // 5 + 1):  # five pieces over a second
            writer.write(body[start : start + len(body) // 5 + 1])
            await writer.drain()
            await asyncio.sleep(0.2)
        answer = await asyncio.wait_for(read_answer(reader), 5)
    assert (answer.status, answer.envelope()["code"]) == (200, 0)


async def test_slow_clients_do_not_starve_a_normal_one(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(body_timeout=3.0, forward=False)
    slow = [asyncio.create_task(trickle(gateway, TRACK, interval=0.2)) for _ in range(50)]
    await asyncio.sleep(0.3)  # all of them connected and dripping
    started = time.monotonic()
    answer = await post_track(http, gateway, [server_event("fast-1")])
    assert answer["code"] == 0
    assert time.monotonic() - started < 1.0  # not queued behind the slow ones
    results = await asyncio.gather(*slow)
    assert {answer.status for answer, _took in results} == {408}


# -- a flood on /pixel/events -------------------------------------------------------------


async def test_a_flooding_client_is_rate_limited_without_starving_others(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    rate, burst = 5.0, 10
    gateway = await make_gateway(pixel_rate_limit=rate, pixel_rate_burst=burst, forward=False)
    # The flooder comes from another loopback address: another client to the gateway.
    flooder = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0), limit=50)
    )
    statuses: list[int] = []
    retry_after: set[str] = set()

    async def flood_one(i: int) -> None:
        async with flooder.post(f"{gateway.url}{BROWSER}", json=browser_event(f"flood-{i}")) as r:
            statuses.append(r.status)
            if r.status == 429:
                retry_after.add(r.headers["Retry-After"])
                assert (await r.json())["code"] == 40100

    async def flood() -> None:
        await asyncio.gather(*(flood_one(i) for i in range(400)))

    async def go_about_business() -> list[int]:
        codes = []
        for i in range(8):
            async with http.post(f"{gateway.url}{BROWSER}", json=browser_event(f"calm-{i}")) as r:
                codes.append(r.status)
            await asyncio.sleep(0.1)
        return codes

    started = time.monotonic()
    try:
        _, calm = await asyncio.gather(flood(), go_about_business())
    finally:
        await flooder.close()
    elapsed = time.monotonic() - started

    assert calm == [200] * 8  # the other client was served throughout
    allowed = statuses.count(200)
    assert allowed + statuses.count(429) == 400, sorted(set(statuses))
    assert allowed <= burst + rate * elapsed + 1, (allowed, elapsed)
    assert all(value.isdigit() and int(value) >= 1 for value in retry_after)
    refused = gateway.metric("gateway_events_rejected_total", {"reason": "rate_limited"})
    assert refused == 400 - allowed
    received = gateway.metric("gateway_events_received_total", {"source": "pixel", "pixel": PIXEL})
    assert received == allowed + 8
