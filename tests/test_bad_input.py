"""Bad input end to end (PRODUCT.md 8): every refusal is a TikTok envelope naming the field.

Four ingest paths, one table of malformations each. TikTok-compatible paths
answer as TikTok does (HTTP 200 with a non-zero code; 413 for an oversized
body), `/pixel/events` with real HTTP statuses. A refused request stores
nothing: Redis holds no `tkgw:*` key afterwards (but the rate limit's counter).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import browser_event, event_keys, server_event, wait_counts
from tests.support import PIXEL, TOKEN, Gateway, GatewayFactory
from tests.tiktok_stub import TikTokStub

ENVELOPE_KEYS = {"code", "message", "request_id", "data"}


@dataclass(frozen=True)
class Shape:
    """One ingest path: where its events sit in the body and how fields are named."""

    name: str
    path: str
    time_key: str  # event_time, or timestamp in pixel-style bodies
    list_prefix: str  # the events' list in field paths ("data", "batch", "events")
    single_prefix: str  # prefix of the one event's fields ("data.0." or "")
    tiktok: bool

    def event(self, event_id: str | None = None) -> dict[str, Any]:
        """A valid event as this path's clients send it."""
        if self.name == "event_track":
            return server_event(event_id)
        if self.name == "browser":
            return browser_event(event_id)
        event: dict[str, Any] = {
            "event": "Purchase",
            "timestamp": int(time.time()),
            "context": {
                "user": {"email": "jane.doe@example.com"},
                "page": {"url": "https://shop.example.com/checkout"},
                "ip": "203.0.113.9",
            },
            "properties": {"currency": "USD", "value": 10},
        }
        if event_id is not None:
            event["event_id"] = event_id
        return event

    def body(self, events: list[dict[str, Any]], pixel: str = PIXEL) -> Any:
        if self.name == "event_track":
            return {"event_source": "web", "event_source_id": pixel, "data": events}
        if self.name == "pixel_track":
            [event] = events
            return {"pixel_code": pixel, **event}
        if self.name == "pixel_batch":
            return {"pixel_code": pixel, "batch": events}
        return events[0] if len(events) == 1 else events

    def user_path(self) -> str:
        return "context.user" if self.name in ("pixel_track", "pixel_batch") else "user"

    def ok_status(self, tiktok_status: int, http_status: int) -> int:
        return tiktok_status if self.tiktok else http_status


EVENT_TRACK = Shape("event_track", "/open_api/v1.3/event/track/", "event_time", "data",
                    "data.0.", tiktok=True)
PIXEL_TRACK = Shape("pixel_track", "/open_api/v1.3/pixel/track/", "timestamp", "",
                    "", tiktok=True)
PIXEL_BATCH = Shape("pixel_batch", "/open_api/v1.2/pixel/batch/", "timestamp", "batch",
                    "batch.0.", tiktok=True)
BROWSER = Shape("browser", "/pixel/events", "timestamp", "events", "", tiktok=False)
SHAPES = (EVENT_TRACK, PIXEL_TRACK, PIXEL_BATCH, BROWSER)
TIKTOK_SHAPES = (EVENT_TRACK, PIXEL_TRACK, PIXEL_BATCH)
LIST_SHAPES = (EVENT_TRACK, PIXEL_BATCH, BROWSER)


async def post(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    shape: Shape,
    raw: bytes,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    all_headers = {"Content-Type": "application/json", "Access-Token": TOKEN, **(headers or {})}
    async with http.post(gateway.url + shape.path, data=raw, headers=all_headers) as resp:
        assert resp.status < 500, await resp.text()
        answer: dict[str, Any] = orjson.loads(await resp.read())
        assert set(answer) == ENVELOPE_KEYS, answer
        assert resp.headers["X-Request-Id"] == answer["request_id"]
        return resp.status, answer


async def assert_nothing_stored(redis_client: aioredis.Redis) -> None:
    assert await event_keys(redis_client) == []


# -- one bad event ------------------------------------------------------------------

# (case, mutate the event in place and return the field's path inside the event)
Mutation = Callable[[Shape, dict[str, Any]], str]


def _missing_event_name(shape: Shape, event: dict[str, Any]) -> str:
    del event["event"]
    return "event"


def _event_a_number(shape: Shape, event: dict[str, Any]) -> str:
    event["event"] = 42
    return "event"


def _event_time_unparseable(shape: Shape, event: dict[str, Any]) -> str:
    event[shape.time_key] = "yesterday around noon"
    return shape.time_key


def _event_time_in_the_future(shape: Shape, event: dict[str, Any]) -> str:
    event[shape.time_key] = int(time.time()) + 3600
    return shape.time_key


def _user_a_list(shape: Shape, event: dict[str, Any]) -> str:
    if shape.user_path() == "context.user":
        event["context"]["user"] = ["jane.doe@example.com"]
    else:
        event["user"] = ["jane.doe@example.com"]
    return shape.user_path()


def _value_not_a_number(shape: Shape, event: dict[str, Any]) -> str:
    event["properties"]["value"] = "abc"
    return "properties.value"


def _quantity_not_an_integer(shape: Shape, event: dict[str, Any]) -> str:
    # A wrong type is refused; quantity 0 (outside TikTok's advice) is forwarded with a
    # field warning (tests/test_field_warnings.py).
    event["properties"]["contents"] = [{"content_id": "sku-1", "quantity": 1.5}]
    return "properties.contents.0.quantity"


def _properties_a_string(shape: Shape, event: dict[str, Any]) -> str:
    event["properties"] = "value=10"
    return "properties"


MUTATIONS: dict[str, Mutation] = {
    "missing event name": _missing_event_name,
    "event a number": _event_a_number,
    "unparseable event_time": _event_time_unparseable,
    "event_time an hour ahead": _event_time_in_the_future,
    "user a list": _user_a_list,
    "properties.value abc": _value_not_a_number,
    "quantity 1.5": _quantity_not_an_integer,
    "properties a string": _properties_a_string,
}


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize("mutation", MUTATIONS.values(), ids=list(MUTATIONS))
async def test_a_bad_event_is_refused_naming_its_field(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    shape: Shape,
    mutation: Mutation,
) -> None:
    gateway = await make_gateway()
    event = shape.event("bad-1")
    field = shape.single_prefix + mutation(shape, event)
    status, answer = await post(http, gateway, shape, orjson.dumps(shape.body([event])))
    assert status == shape.ok_status(200, 400)
    assert answer["code"] == 40002
    assert answer["message"].startswith(f"{field}: "), answer
    await assert_nothing_stored(redis_client)
    assert gateway.metric("gateway_events_rejected_total", {"reason": "invalid_event"}) == 1
    assert gateway.metric("gateway_events_received_total", {"source": "server", "pixel": PIXEL}) \
        + gateway.metric("gateway_events_received_total", {"source": "pixel", "pixel": PIXEL}) == 0


# -- a bad request --------------------------------------------------------------------


@dataclass(frozen=True)
class BadRequest:
    """A malformed request: its bytes for a shape, and what the answer must say."""

    build: Callable[[Shape], bytes]
    message: Callable[[Shape], str]  # a piece the message must contain
    reason: str  # gateway_events_rejected_total{reason}
    shapes: tuple[Shape, ...] = SHAPES
    overrides: tuple[tuple[str, Any], ...] = ()
    code: int = 40002
    statuses: tuple[int, int] = (200, 400)  # (TikTok paths, /pixel/events)


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"x": value}
    return value


def _with_properties(shape: Shape, **properties: Any) -> bytes:
    event = shape.event("req-1")
    event["properties"].update(properties)
    return orjson.dumps(shape.body([event]))


def _first_event_as_non_utf8(shape: Shape) -> bytes:
    raw = orjson.dumps(shape.body([shape.event("req-1")]))
    return raw.replace(b'"Purchase"', b'"Purch\xe4se"', 1)  # Latin-1, not UTF-8


def _too_many(shape: Shape) -> bytes:
    return orjson.dumps(shape.body([shape.event(f"many-{i}") for i in range(4)]))


def _events_not_a_list(shape: Shape) -> bytes:
    body = shape.body([shape.event("req-1")])
    body[shape.list_prefix] = shape.event("req-1")
    return orjson.dumps(body)


def _events_empty(shape: Shape) -> bytes:
    body = shape.body([shape.event("req-1")])
    body[shape.list_prefix] = []
    return orjson.dumps(body)


def _top_level_array(shape: Shape) -> bytes:
    return orjson.dumps([shape.body([shape.event("req-1")])])


def _wrong_pixel_type(shape: Shape) -> bytes:
    body = shape.body([shape.event("req-1")])
    body["event_source_id" if shape is EVENT_TRACK else "pixel_code"] = ["CPIXEL"]
    return orjson.dumps(body)


def _pixel_field(shape: Shape) -> str:
    return "event_source_id: " if shape is EVENT_TRACK else "pixel_code: "


def _unknown_pixel(shape: Shape) -> bytes:
    return orjson.dumps(shape.body([shape.event("req-1")], pixel="CUNKNOWNPIXEL01"))


def _valid(shape: Shape) -> bytes:
    return orjson.dumps(shape.body([shape.event("req-1")]))


BAD_REQUESTS: dict[str, BadRequest] = {
    "invalid JSON": BadRequest(
        lambda s: _valid(s)[:-7], lambda s: "body is not valid JSON", "invalid_json"
    ),
    "empty body": BadRequest(lambda s: b"", lambda s: "body is empty", "invalid_json"),
    "only whitespace": BadRequest(lambda s: b" \r\n ", lambda s: "body is empty", "invalid_json"),
    "non-UTF-8": BadRequest(_first_event_as_non_utf8, lambda s: "UTF-8", "invalid_json"),
    "nesting 40 deep": BadRequest(
        lambda s: _with_properties(s, deep=_nested(40)), lambda s: "deeper than 32",
        "invalid_json",
    ),
    "nesting past the parser's own limit": BadRequest(
        lambda s: b"[" * 1500 + b"]" * 1500, lambda s: "deeper than 32", "invalid_json"
    ),
    "a JSON array at top level": BadRequest(
        _top_level_array, lambda s: "body must be a JSON object", "invalid_request",
        shapes=TIKTOK_SHAPES,
    ),
    "a JSON string at top level": BadRequest(
        lambda s: b'"Purchase"', lambda s: "body must be", "invalid_request"
    ),
    "events not a list": BadRequest(
        _events_not_a_list, lambda s: f"{s.list_prefix}: must be a non-empty list",
        "invalid_request", shapes=(EVENT_TRACK, PIXEL_BATCH),
    ),
    "events an empty list": BadRequest(
        _events_empty, lambda s: f"{s.list_prefix}: must be a non-empty list",
        "invalid_request", shapes=(EVENT_TRACK, PIXEL_BATCH),
    ),
    "an empty list of events": BadRequest(
        lambda s: b"[]", lambda s: "events: must be a non-empty list", "invalid_request",
        shapes=(BROWSER,),
    ),
    "event_source unknown": BadRequest(
        lambda s: orjson.dumps({**s.body([s.event("req-1")]), "event_source": "mobile"}),
        lambda s: "event_source: must be one of", "invalid_request", shapes=(EVENT_TRACK,),
    ),
    "pixel code a list": BadRequest(
        _wrong_pixel_type, _pixel_field, "invalid_request", shapes=TIKTOK_SHAPES
    ),
    "too many events": BadRequest(
        _too_many, lambda s: f"{s.list_prefix}: has 4 events; at most 3", "invalid_request",
        shapes=LIST_SHAPES, overrides=(("max_events_per_request", 3),),
    ),
    "oversized body": BadRequest(
        lambda s: _with_properties(s, description="x" * 2000),
        lambda s: "body: larger than 1000 bytes", "too_large",
        overrides=(("max_body_bytes", 1000),), statuses=(413, 413),
    ),
    "unknown pixel": BadRequest(
        _unknown_pixel, lambda s: "No permission to operate pixel code: CUNKNOWNPIXEL01",
        "unknown_pixel", shapes=TIKTOK_SHAPES, code=40001,
    ),
}

BAD_REQUEST_CASES = [
    pytest.param(case, shape, id=f"{name}-{shape.name}")
    for name, case in BAD_REQUESTS.items()
    for shape in case.shapes
]


@pytest.mark.parametrize(("case", "shape"), BAD_REQUEST_CASES)
async def test_a_bad_request_is_refused_with_a_clear_message(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    case: BadRequest,
    shape: Shape,
) -> None:
    gateway = await make_gateway(**dict(case.overrides))
    status, answer = await post(http, gateway, shape, case.build(shape))
    assert status == shape.ok_status(*case.statuses)
    assert answer["code"] == case.code
    assert case.message(shape) in answer["message"], answer
    await assert_nothing_stored(redis_client)
    assert gateway.metric("gateway_events_rejected_total", {"reason": case.reason}) == 1


@pytest.mark.parametrize("shape", TIKTOK_SHAPES, ids=lambda s: s.name)
@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"Access-Token": "token-wrong-0123456789"}, 40105),
        ({"Access-Token": ""}, 40104),
        ({}, 40104),
        ({"Access-Token": f"Bearer {TOKEN}"}, 40105),  # TikTok takes the raw token only
    ],
    ids=["wrong", "empty", "missing", "bearer-prefixed"],
)
async def test_a_bad_access_token_is_refused_and_nothing_stored(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    shape: Shape,
    headers: dict[str, str],
    code: int,
) -> None:
    gateway = await make_gateway()
    raw = orjson.dumps(shape.body([shape.event("auth-1")]))
    all_headers = {"Content-Type": "application/json", **headers}
    async with http.post(gateway.url + shape.path, data=raw, headers=all_headers) as resp:
        assert resp.status == 200
        answer = await resp.json()
    assert set(answer) == ENVELOPE_KEYS
    assert answer["code"] == code, answer
    assert "Access" in answer["message"] or "token" in answer["message"]
    await assert_nothing_stored(redis_client)
    assert gateway.metric("gateway_events_rejected_total", {"reason": "auth"}) == 1
    pending, _dead = await gateway.store.counts()
    assert pending == 0
    assert tiktok.requests == []


@pytest.mark.parametrize("shape", (EVENT_TRACK, BROWSER), ids=lambda s: s.name)
async def test_an_oversized_chunked_body_is_refused_too(
    make_gateway: GatewayFactory,
    http: aiohttp.ClientSession,
    redis_client: aioredis.Redis,
    shape: Shape,
) -> None:
    # No Content-Length to refuse up front: the limit must hold while reading.
    gateway = await make_gateway(max_body_bytes=1000)
    raw = _with_properties(shape, description="x" * 5000)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 500):
            yield raw[start : start + 500]

    headers = {"Content-Type": "application/json", "Access-Token": TOKEN}
    async with http.post(gateway.url + shape.path, data=chunks(), headers=headers) as resp:
        assert resp.status == 413
        answer = await resp.json()
    assert answer["message"] == "body: larger than 1000 bytes"
    await assert_nothing_stored(redis_client)


# -- one bad event among good ones ------------------------------------------------------


@pytest.mark.parametrize("shape", LIST_SHAPES, ids=lambda s: s.name)
async def test_one_bad_event_does_not_reject_the_good_ones(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    shape: Shape,
) -> None:
    gateway = await make_gateway(merge_window=0.2)
    bad = shape.event("mixed-bad")
    bad[shape.time_key] = "not a time"
    events = [shape.event("mixed-good-0"), bad, shape.event("mixed-good-2")]
    status, answer = await post(http, gateway, shape, orjson.dumps(shape.body(events)))

    assert status == 200
    assert answer["code"] == 20001, answer
    field = f"{shape.list_prefix}.1.{shape.time_key}"
    assert field in answer["message"]
    assert answer["data"]["accepted"] == 2
    [failed] = answer["data"]["failed_events"]
    assert failed["index"] == 1
    assert failed["field"] == field
    assert "ISO 8601" in failed["message"]
    assert gateway.metric("gateway_events_rejected_total", {"reason": "invalid_event"}) == 1

    forwarded = await tiktok.wait_for_events(2)
    assert sorted(e["event_id"] for e in forwarded) == ["mixed-good-0", "mixed-good-2"]
    await wait_counts(gateway, 0)
    assert len(tiktok.events()) == 2


async def test_every_event_bad_is_refused_and_each_one_counted(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession, redis_client: aioredis.Redis
) -> None:
    gateway = await make_gateway()
    events = [EVENT_TRACK.event(f"all-bad-{i}") for i in range(3)]
    for event in events:
        event["event"] = ""
    status, answer = await post(http, gateway, EVENT_TRACK, orjson.dumps(EVENT_TRACK.body(events)))
    assert (status, answer["code"]) == (200, 40002)
    assert answer["message"] == "data.0.event: is required"
    await assert_nothing_stored(redis_client)
    assert gateway.metric("gateway_events_rejected_total", {"reason": "invalid_event"}) == 3


async def test_an_invalid_ip_is_dropped_with_a_warning_not_a_refusal(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(merge_window=0.2)
    event = server_event("bad-ip-1")
    event["user"]["ip"] = "999.1.2.3"
    status, answer = await post(http, gateway, EVENT_TRACK, orjson.dumps(EVENT_TRACK.body([event])))
    assert (status, answer["code"]) == (200, 0)
    [forwarded] = await tiktok.wait_for_events(1)
    assert "ip" not in forwarded["user"]
    labels = {"pixel": PIXEL, "field": "user.ip", "reason": "unparseable"}
    assert gateway.metric("gateway_field_warnings_total", labels) == 1


# -- whatever a client sends, never a 5xx ------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)  # what JSON can carry to orjson
    | st.floats()
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)
FIELDS = (
    "event", "event_time", "event_id", "user", "user.email", "user.phone", "user.ip",
    "user.external_id", "user.ttclid", "properties", "properties.value",
    "properties.currency", "properties.contents", "page", "page.url", "limited_data_use",
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(field=st.sampled_from(FIELDS), value=JSON_VALUES)
async def test_any_value_in_any_field_gets_an_envelope_never_a_5xx(
    gateway: Gateway, http: aiohttp.ClientSession, field: str, value: Any
) -> None:
    event = server_event("fuzz-1")
    parent, _, leaf = field.rpartition(".")
    (event[parent] if parent else event)[leaf] = value
    raw = orjson.dumps(EVENT_TRACK.body([event]))
    status, answer = await post(http, gateway, EVENT_TRACK, raw)
    assert status == 200
    assert answer["code"] in (0, 40002), answer
    if answer["code"]:
        assert answer["message"].startswith("data.0."), answer


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(shape=st.sampled_from(SHAPES), raw=st.binary(max_size=200))
async def test_any_bytes_get_an_envelope_never_a_5xx(
    gateway: Gateway, http: aiohttp.ClientSession, shape: Shape, raw: bytes
) -> None:
    status, answer = await post(http, gateway, shape, raw)
    assert status in ((200,) if shape.tiktok else (400,))
    assert answer["code"] == 40002
