"""TikTok body shapes to Events (gateway/formats.py)."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidEvent, InvalidRequest
from gateway.events import dedup_name
from gateway.field_warnings import (
    FIELD_WARNINGS,
    NO_COUNTRY_CODE,
    UNKNOWN_VALUE,
    UNPARSEABLE,
    FieldWarning,
)
from gateway.formats import (
    BrowserContext,
    ParsedBody,
    ParseOptions,
    Refusal,
    decode_json,
    parse_browser,
    parse_event_track,
    parse_pixel_batch,
    parse_pixel_track,
)
from tests.support import sha256

NOW = 1_767_225_700.0  # a little after 2026-01-01T00:00:00Z
T = 1_767_225_600
OPTS = ParseOptions(now=NOW)
PIXEL = "C4EXAMPLEPIXEL0CODE1"
EMAIL_H = "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d"
PHONE_H = "36a2cef4ff9bf7a1abd2a93359136b870393be4106e6c5d19b72ff564f9deca4"
EXTERNAL_H = "6f18e35ae8422566f6fcb6af0245f9530bffdbe1ed06f192c4de095c18ac3e46"
TTCLID = "E.C.P.v3ExampleClickIdValue"
TTP = "Qm3xP0aZtY8rLk2VnB7cWd4EfGh"
UA = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X)"


# TIKTOK_API.md 9.1
V2_EXAMPLE: dict[str, Any] = {
    "event_source": "web",
    "event_source_id": PIXEL,
    "data": [
        {
            "event": "Purchase",
            "event_time": T,
            "event_id": "order-100234",
            "user": {
                "ttclid": TTCLID,
                "ttp": TTP,
                "external_id": EXTERNAL_H,
                "email": EMAIL_H,
                "phone": PHONE_H,
                "ip": "203.0.113.7",
                "user_agent": UA,
                "locale": "en-US",
            },
            "page": {
                "url": "https://shop.example.com/checkout/thank-you?order=100234&ttclid=" + TTCLID,
                "referrer": "https://shop.example.com/checkout",
            },
            "properties": {
                "currency": "USD",
                "value": 59.98,
                "content_type": "product",
                "content_ids": ["SKU-123"],
                "num_items": 2,
                "order_id": "100234",
                "contents": [
                    {
                        "content_id": "SKU-123",
                        "content_name": "Trail Runner",
                        "content_category": "Shoes > Running",
                        "brand": "Acme",
                        "price": 29.99,
                        "quantity": 2,
                    }
                ],
            },
            "limited_data_use": False,
        }
    ],
}

# TIKTOK_API.md 9.3
V1_EXAMPLE: dict[str, Any] = {
    "pixel_code": PIXEL,
    "event": "CompletePayment",
    "event_id": "order-100234",
    "timestamp": "2026-01-01T00:00:00Z",
    "context": {
        "ad": {"callback": TTCLID},
        "page": {
            "url": "https://shop.example.com/checkout/thank-you?order=100234",
            "referrer": "https://shop.example.com/checkout",
        },
        "user": {
            "external_id": EXTERNAL_H,
            "phone_number": PHONE_H,
            "email": EMAIL_H,
            "ttp": TTP,
        },
        "ip": "203.0.113.7",
        "user_agent": UA,
    },
    "properties": {
        "contents": [
            {
                "content_id": "SKU-123",
                "content_type": "product",
                "content_name": "Trail Runner",
                "price": 29.99,
                "quantity": 2,
            }
        ],
        "currency": "USD",
        "value": 59.98,
    },
}


def v2(*events: Any, **top: Any) -> dict[str, Any]:
    return {"event_source": "web", "event_source_id": PIXEL, "data": list(events), **top}


def batch(*events: Any, **top: Any) -> dict[str, Any]:
    return {"pixel_code": PIXEL, "batch": list(events), **top}


def request_error(call: Any, *args: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as exc:
        call(*args)
    assert type(exc.value) is InvalidRequest
    return exc.value


# --- decode_json -------------------------------------------------------------------------


def test_decode_json_ok() -> None:
    assert decode_json(b'{"a": [1, "\xc3\xa9"]}') == {"a": [1, "é"]}
    assert decode_json(b"\xef\xbb\xbf[1]") == [1]


def test_decode_json_errors_are_clear() -> None:
    cases = {
        b"": "empty",
        b"  \n": "empty",
        b'{"a": "\xff"}': "UTF-8 (byte 7)",
        b'{"a": 1,\n "b": }': "line 2 column",
        b"[1, 2": "not valid JSON",
        b"NaN": "not valid JSON",
    }
    for raw, text in cases.items():
        exc = request_error(decode_json, raw)
        assert exc.field == ""
        assert text in exc.message, (raw, exc.message)


def test_decode_json_nesting_limit() -> None:
    assert decode_json(b"[" * 32 + b"]" * 32) is not None
    assert decode_json(b'{"a":' * 31 + b"[]" + b"}" * 31) is not None
    for raw in (b"[" * 33 + b"]" * 33, b'{"a":' * 32 + b"[]" + b"}" * 32, b"[" * 5000):
        exc = request_error(decode_json, raw)
        assert "deeper than 32" in exc.message
    assert decode_json(b"[[[1]]]", max_depth=3) == [[[1]]]
    with pytest.raises(InvalidRequest):
        decode_json(b"[[[1]]]", max_depth=2)


# --- TikTok's examples ---------------------------------------------------------------------


def test_v2_example() -> None:
    parsed = parse_event_track(copy.deepcopy(V2_EXAMPLE), OPTS)
    assert parsed.pixel_code == PIXEL
    assert parsed.refused == [] and parsed.events[0].warnings == ()
    (event,) = parsed.events
    assert (event.pixel_code, event.source, event.event_source) == (PIXEL, "server", "web")
    assert event.test_event_code is None
    assert event.body == V2_EXAMPLE["data"][0]  # already clean: unchanged


def test_v1_example_converts_to_the_same_event() -> None:
    parsed = parse_pixel_track(copy.deepcopy(V1_EXAMPLE), OPTS)
    assert parsed.pixel_code == PIXEL and parsed.refused == []
    assert all(event.warnings == () for event in parsed.events)
    (event,) = parsed.events
    (reference,) = parse_event_track(copy.deepcopy(V2_EXAMPLE), OPTS).events
    assert (event.pixel_code, event.source, event.event_source) == (PIXEL, "server", "web")
    assert dedup_name(event.name, True) == dedup_name(reference.name, True)
    assert (event.event_id, event.event_time) == (reference.event_id, reference.event_time)
    expected_user = {k: v for k, v in reference.body["user"].items() if k != "locale"}
    assert event.body["user"] == expected_user
    assert event.body["page"]["referrer"] == reference.body["page"]["referrer"]
    assert event.body["properties"] == {
        "contents": [
            {"content_id": "SKU-123", "content_name": "Trail Runner", "price": 29.99, "quantity": 2}
        ],
        "content_type": "product",
        "currency": "USD",
        "value": 59.98,
    }


def test_v1_batch_example() -> None:
    item = {k: v for k, v in V1_EXAMPLE.items() if k != "pixel_code"}
    parsed = parse_pixel_batch(batch({"type": "track", **item}, item), OPTS)
    assert len(parsed.events) == 2 and parsed.refused == []
    assert (
        parsed.events[0].body == parse_pixel_track(copy.deepcopy(V1_EXAMPLE), OPTS).events[0].body
    )


# --- Events API 2.0 -------------------------------------------------------------------------


def test_event_source_defaults_to_web_and_is_checked() -> None:
    body = v2({"event": "Purchase"})
    del body["event_source"]
    assert parse_event_track(body, OPTS).events[0].event_source == "web"
    for source in ("app", "offline", "crm"):
        assert (
            parse_event_track(v2({"event": "Lead"}, event_source=source), OPTS)
            .events[0]
            .event_source
            == source
        )
    exc = request_error(parse_event_track, v2({"event": "Lead"}, event_source="shop"), OPTS)
    assert exc.field == "event_source"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], ""),
        ("x", ""),
        ({"event_source_id": PIXEL}, "data"),
        ({"event_source_id": PIXEL, "data": []}, "data"),
        ({"event_source_id": PIXEL, "data": {"event": "Purchase"}}, "data"),
        ({"data": [{"event": "Purchase"}]}, "event_source_id"),
        ({"event_source_id": "", "data": [{"event": "Purchase"}]}, "event_source_id"),
        ({"event_source_id": "bad code!", "data": [{"event": "Purchase"}]}, "event_source_id"),
        ({"event_source_id": "{x}", "data": [{"event": "Purchase"}]}, "event_source_id"),
        ({"event_source_id": ["P"], "data": [{"event": "Purchase"}]}, "event_source_id"),
        ({"event_source_id": "P" * 65, "data": [{"event": "Purchase"}]}, "event_source_id"),
        ({"event_source_id": PIXEL, "data": [{}], "test_event_code": 5}, "test_event_code"),
    ],
)
def test_v2_request_errors(body: Any, field: str) -> None:
    assert request_error(parse_event_track, body, OPTS).field == field


def test_numeric_event_source_id_is_a_string() -> None:
    parsed = parse_event_track(
        v2({"event": "Purchase"}, event_source_id=7234, event_source="crm"), OPTS
    )
    assert parsed.pixel_code == "7234" and parsed.events[0].pixel_code == "7234"


def test_too_many_events() -> None:
    opts = ParseOptions(now=NOW, max_events=3)
    assert len(parse_event_track(v2(*[{"event": "Purchase"}] * 3), opts).events) == 3
    exc = request_error(parse_event_track, v2(*[{"event": "Purchase"}] * 4), opts)
    assert exc.field == "data" and "at most 3" in exc.message
    exc = request_error(parse_event_track, v2(*[{"event": "Purchase"}] * 1001), OPTS)
    assert exc.field == "data"


def test_bad_events_are_refused_and_the_others_kept() -> None:
    parsed = parse_event_track(
        v2(
            {"event": "Purchase", "event_id": "ok-1"},
            {"event": "Purchase", "event_time": "tomorrow-ish"},
            "not an object",
            {"event": "Purchase", "event_time": NOW + 301},
            {"event": "Purchase", "properties": {"contents": [{"price": 1}, {"quantity": 0.5}]}},
            {"event_id": "no-name"},
            {"event": "Purchase", "event_id": "ok-2"},
        ),
        OPTS,
    )
    assert [e.event_id for e in parsed.events] == ["ok-1", "ok-2"]
    assert [(r.index, r.field) for r in parsed.refused] == [
        (1, "data.1.event_time"),
        (2, "data.2"),
        (3, "data.3.event_time"),
        (4, "data.4.properties.contents.1.quantity"),
        (5, "data.5.event"),
    ]
    assert all(isinstance(r, Refusal) and r.message for r in parsed.refused)


def test_cdp_items_with_odd_content_types_are_forwarded_with_one_warning_per_event() -> None:
    # RudderStack's Events 1.0 bodies carry the product's category as content_type.
    items = [
        {"content_id": "1", "content_type": "socks", "price": 3, "quantity": 2},
        {"content_id": "2", "content_type": "dress", "price": 20, "quantity": 1},
    ]
    event = {"type": "track", "event": "AddToCart", "properties": {"contents": items}}
    parsed = parse_pixel_batch({"pixel_code": PIXEL, "batch": [event, event]}, OPTS)
    assert parsed.refused == [] and len(parsed.events) == 2
    for accepted in parsed.events:
        assert accepted.body["properties"] == {
            "content_type": "socks",
            "contents": [
                {"content_id": "1", "price": 3, "quantity": 2},
                {"content_id": "2", "price": 20, "quantity": 1},
            ],
            "value": 26.0,
        }
        assert accepted.warnings == (
            FieldWarning("properties.contents.content_type", UNKNOWN_VALUE),
        )


def test_test_event_code_top_level_or_inside_data() -> None:
    parsed = parse_event_track(v2({"event": "Purchase"}, test_event_code="TEST1"), OPTS)
    assert parsed.events[0].test_event_code == "TEST1"
    assert "test_event_code" not in parsed.events[0].body
    parsed = parse_event_track(v2({"event": "Purchase", "test_event_code": "TEST2"}), OPTS)
    assert parsed.events[0].test_event_code == "TEST2"


def test_v2_user_lists_and_warnings() -> None:
    parsed = parse_event_track(
        v2(
            {
                "event": "Purchase",
                "user": {
                    "email": [" A@B.co ", "", "a@b.co"],
                    "phone": ["2133734253", "(+1)2133734253"],
                    "external_id": [],
                    "ip": "300.1.1.1",
                },
            }
        ),
        OPTS,
    )
    assert parsed.events[0].body["user"] == {
        "email": [sha256("a@b.co")],
        "phone": [sha256("+12133734253")],
    }
    # Each (field, reason) once per event, though two phones lacked a country code.
    assert parsed.events[0].warnings == (
        FieldWarning("user.phone", NO_COUNTRY_CODE),
        FieldWarning("user.ip", UNPARSEABLE),
    )


def test_phone_region_option() -> None:
    opts = ParseOptions(now=NOW, phone_region="US")
    parsed = parse_event_track(v2({"event": "Purchase", "user": {"phone": "213-373-4253"}}), opts)
    assert parsed.events[0].body["user"] == {"phone": sha256("+12133734253")}


def test_warnings_of_refused_events_are_not_counted() -> None:
    parsed = parse_event_track(
        v2({"event": "Purchase", "event_time": "bad", "user": {"ip": "nope"}}), OPTS
    )
    assert parsed.events == [] and len(parsed.refused) == 1


# --- Events 1.0 -----------------------------------------------------------------------------


def test_v1_context_mapping() -> None:
    parsed = parse_pixel_track(
        {
            "pixel_code": PIXEL,
            "event": "SubmitForm",
            "timestamp": T,
            "test_event_code": "T1",
            "context": {
                "ad": {"callback": "clk"},
                "page": {"url": "https://x.test/"},
                "user": {"phone_number": "+1 213 373 4253", "locale": "en_US", "ttclid": ""},
                "ip": "2001:db8::0:1",
                "user_agent": "UA",
                "locale": "de-DE",
            },
        },
        OPTS,
    )
    (event,) = parsed.events
    assert event.test_event_code == "T1"
    assert event.body == {
        "event": "SubmitForm",
        "event_time": T,
        "user": {
            "phone": sha256("+12133734253"),
            "locale": "en_US",
            "ip": "2001:db8::1",
            "user_agent": "UA",
            "ttclid": "clk",
        },
        "page": {"url": "https://x.test/"},
    }


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"timestamp": "later"}, "timestamp"),
        ({"timestamp": None, "event_time": "later"}, "event_time"),
        ({"context": []}, "context"),
        ({"context": {"user": "x"}}, "context.user"),
        ({"context": {"ad": 1}}, "context.ad"),
        ({"context": {"ad": {"callback": 5}}}, "context.ad.callback"),
        ({"context": {"ip": 5}}, "context.ip"),
        ({"context": {"user_agent": ["UA"]}}, "context.user_agent"),
        ({"context": {"locale": 1}}, "context.locale"),
        ({"context": {"page": {"url": 5}}}, "context.page.url"),
        ({"context": {"page": "x"}}, "context.page"),
        ({"context": {"user": {"phone_number": 1.5}}}, "context.user.phone_number"),
        ({"context": {"user": {"email": [1.5]}}}, "context.user.email.0"),
        ({"properties": {"contents": [{"price": "x"}]}}, "properties.contents.0.price"),
        ({"event": ""}, "event"),
        ({"event_id": True}, "event_id"),
    ],
)
def test_v1_single_event_errors_name_the_1_0_field(change: dict[str, Any], field: str) -> None:
    body = {"pixel_code": PIXEL, "event": "Purchase", "timestamp": T, **change}
    with pytest.raises(InvalidEvent) as exc:
        parse_pixel_track(body, OPTS)
    assert exc.value.field == field


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"event": "Purchase"}, "pixel_code"),
        ({"pixel_code": 1.5, "event": "Purchase"}, "pixel_code"),
        ({"pixel_code": PIXEL, "event": "Purchase", "test_event_code": ["x"]}, "test_event_code"),
    ],
)
def test_v1_single_request_errors(body: dict[str, Any], field: str) -> None:
    assert request_error(parse_pixel_track, body, OPTS).field == field


def test_v1_batch_refusals_use_batch_paths() -> None:
    parsed = parse_pixel_batch(
        batch(
            {"type": "track", "event": "Purchase", "event_id": "a"},
            {"type": "identify", "event": "Purchase"},
            {"event": "Purchase", "context": {"ip": 1}},
            7,
            {"event": "Purchase", "timestamp": "x"},
            test_event_code="T9",
        ),
        OPTS,
    )
    assert [e.event_id for e in parsed.events] == ["a"]
    assert parsed.events[0].test_event_code == "T9"
    assert [(r.index, r.field) for r in parsed.refused] == [
        (1, "batch.1.type"),
        (2, "batch.2.context.ip"),
        (3, "batch.3"),
        (4, "batch.4.timestamp"),
    ]


def test_v1_batch_request_errors() -> None:
    assert request_error(parse_pixel_batch, {"pixel_code": PIXEL}, OPTS).field == "batch"
    assert request_error(parse_pixel_batch, batch(), OPTS).field == "batch"
    assert request_error(parse_pixel_batch, {"batch": [{}]}, OPTS).field == "pixel_code"
    opts = ParseOptions(now=NOW, max_events=1)
    assert request_error(parse_pixel_batch, batch({}, {}), opts).field == "batch"


# --- browser --------------------------------------------------------------------------------

CTX = BrowserContext(
    ip="198.51.100.4", user_agent="BrowserUA", ttp="ttp-cookie", ttclid_cookie="ck"
)


def browser_event(**fields: Any) -> dict[str, Any]:
    return {"pixel_code": PIXEL, "event": "ViewContent", **fields}


def test_browser_single_event() -> None:
    parsed = parse_browser(
        browser_event(
            event_id="ev-1",
            timestamp=T * 1000,
            page={"url": "https://x.test/p", "referrer": "https://r.test/"},
            user={"email": " ALICE_abc@gmail.com ", "phone": "(+1)2133734253", "external_id": "u1"},
            properties={"contents": [{"content_id": 1, "content_type": "product"}]},
            limited_data_use=True,
            test_event_code="TEST7",
        ),
        OPTS,
        CTX,
    )
    assert parsed.pixel_code is None and parsed.refused == []
    assert all(event.warnings == () for event in parsed.events)
    (event,) = parsed.events
    assert (event.pixel_code, event.source, event.event_source) == (PIXEL, "pixel", "web")
    assert event.test_event_code == "TEST7"
    assert event.body == {
        "event": "ViewContent",
        "event_time": T,
        "event_id": "ev-1",
        "user": {
            "email": sha256("alice_abc@gmail.com"),
            "phone": sha256("+12133734253"),
            "external_id": sha256("u1"),
            "ttclid": "ck",
            "ttp": "ttp-cookie",
            "ip": "198.51.100.4",
            "user_agent": "BrowserUA",
        },
        "page": {"url": "https://x.test/p", "referrer": "https://r.test/"},
        "properties": {"contents": [{"content_id": "1"}], "content_type": "product"},
        "limited_data_use": True,
    }


def test_browser_event_time_or_timestamp() -> None:
    for key in ("event_time", "timestamp"):
        (event,) = parse_browser(browser_event(**{key: T}), OPTS, CTX).events
        assert event.event_time == T


def test_browser_ttclid_precedence() -> None:
    def ttclid(ctx: BrowserContext, **fields: Any) -> Any:
        (event,) = parse_browser(browser_event(**fields), OPTS, ctx).events
        return event.body.get("user", {}).get("ttclid")

    url_page = {"url": "https://x.test/?ttclid=from-url"}
    assert ttclid(CTX, page=url_page, user={"ttclid": "body"}) == "from-url"
    assert ttclid(CTX, user={"ttclid": "body"}) == "body"
    assert ttclid(CTX) == "ck"
    assert ttclid(BrowserContext()) is None


def test_browser_request_facts_are_trusted_over_the_body() -> None:
    body = browser_event(user={"ip": "10.0.0.1", "user_agent": "Fake", "ttp": "body-ttp"})
    (event,) = parse_browser(body, OPTS, CTX).events
    assert event.body["user"] == {
        "ip": "198.51.100.4",
        "user_agent": "BrowserUA",
        "ttp": "body-ttp",
        "ttclid": "ck",
    }
    (event,) = parse_browser(body, OPTS, BrowserContext()).events
    assert event.body["user"] == {"ip": "10.0.0.1", "user_agent": "Fake", "ttp": "body-ttp"}


def test_browser_bad_context_ip_is_a_warning() -> None:
    parsed = parse_browser(browser_event(), OPTS, BrowserContext(ip="unknown"))
    assert parsed.events[0].warnings == (FieldWarning("user.ip", UNPARSEABLE),)
    assert "user" not in parsed.events[0].body


def test_browser_list_with_refusals() -> None:
    parsed = parse_browser(
        [
            browser_event(event_id="1"),
            browser_event(pixel_code=None),
            browser_event(pixel_code="a b"),
            browser_event(timestamp="x"),
            browser_event(user={"phone_number": 1.5}),
            browser_event(test_event_code=3),
            [],
        ],
        OPTS,
        CTX,
    )
    assert [e.event_id for e in parsed.events] == ["1"]
    assert [(r.index, r.field) for r in parsed.refused] == [
        (1, "events.1.pixel_code"),
        (2, "events.2.pixel_code"),
        (3, "events.3.timestamp"),
        (4, "events.4.user.phone_number"),
        (5, "events.5.test_event_code"),
        (6, "events.6"),
    ]


def test_browser_single_refusal_has_a_bare_path() -> None:
    parsed = parse_browser(browser_event(properties={"value": "ten"}), OPTS, CTX)
    assert parsed.events == []
    assert parsed.refused == [Refusal(0, "properties.value", parsed.refused[0].message)]


def test_browser_request_errors() -> None:
    bodies: list[Any] = ["x", 5, None, []]
    for body in bodies:
        assert request_error(parse_browser, body, OPTS, CTX).field in ("", "events")
    opts = ParseOptions(now=NOW, max_events=2)
    assert request_error(parse_browser, [browser_event()] * 3, opts, CTX).field == "events"


# --- nothing but InvalidRequest, whatever the input -----------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["", "Purchase", "2023-09-26T10:15:30Z", "+12133734253", "1.5", PIXEL]),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    [
        "event", "event_id", "event_time", "timestamp", "user", "properties", "page", "context",
        "contents", "value", "price", "quantity", "currency", "content_type", "content_id",
        "content_ids", "email", "phone", "phone_number", "ip", "ad", "callback", "app", "lead",
        "device", "limited_data_use", "test_event_code", "pixel_code", "type", "url", "num_items",
    ]
)  # fmt: skip
shaped = st.recursive(
    json_values,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(field_names, children, max_size=6)
    ),
    max_leaves=30,
)


def _check(parsed: ParsedBody) -> None:
    for event in parsed.events:
        orjson.dumps(event.body)  # every accepted body can be stored
        assert isinstance(event.body["event"], str) and isinstance(event.body["event_time"], int)
        assert set(event.warnings) <= set(FIELD_WARNINGS)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(shaped)
def test_parsers_never_raise_anything_but_invalid_request(doc: Any) -> None:
    # Also with a valid name and pixel, so the deeper checks are reached.
    named = {"pixel_code": PIXEL, "event": "Purchase", **doc} if isinstance(doc, dict) else doc
    wrapped: list[tuple[Any, Any]] = [
        (parse_event_track, {"event_source_id": PIXEL, "data": [doc, named]}),
        (parse_event_track, doc),
        (parse_pixel_track, named),
        (parse_pixel_batch, {"pixel_code": PIXEL, "batch": [doc, named]}),
    ]
    for parse, body in wrapped:
        with contextlib.suppress(InvalidRequest):
            _check(parse(body, OPTS))
    for browser_body in (doc, [doc], [named]):
        with contextlib.suppress(InvalidRequest):
            _check(parse_browser(browser_body, OPTS, CTX))


@settings(max_examples=100)
@given(st.binary(max_size=64))
def test_decode_json_never_raises_anything_but_invalid_request(raw: bytes) -> None:
    with contextlib.suppress(InvalidRequest):
        decode_json(raw)


def test_user_aliases_in_every_shape() -> None:
    hashed = sha256("a@b.co")
    aliases = {"sha256_email": hashed.upper(), "sha256_phone_number": PHONE_H}
    expected = {"email": hashed, "phone": PHONE_H}
    (event,) = parse_event_track(v2({"event": "Purchase", "user": aliases}), OPTS).events
    assert event.body["user"] == expected
    (event,) = parse_browser(browser_event(user=aliases), OPTS, BrowserContext()).events
    assert event.body["user"] == expected
    body = {"pixel_code": PIXEL, "event": "Purchase", "context": {"user": aliases}}
    assert parse_pixel_track(body, OPTS).events[0].body["user"] == expected
    both = {"phone": "+12133734253", "phone_number": "+442079460958"}
    (event,) = parse_event_track(v2({"event": "Purchase", "user": both}), OPTS).events
    assert event.body["user"] == {"phone": sha256("+12133734253")}  # the 2.0 name wins


def test_timestamp_wins_over_event_time_in_pixel_shapes() -> None:
    body = {"pixel_code": PIXEL, "event": "Purchase", "timestamp": T, "event_time": T - 60}
    assert parse_pixel_track(body, OPTS).events[0].event_time == T
    (event,) = parse_browser(browser_event(timestamp=T, event_time=T - 60), OPTS, CTX).events
    assert event.event_time == T
