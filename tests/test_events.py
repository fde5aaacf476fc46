"""One Events API 2.0 event: its names (gateway/events.py), its field types (gateway/fields.py)
and its validation (gateway/normalise.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import InvalidEvent
from gateway.events import LEGACY_ALIASES, STANDARD_EVENTS, Event, dedup_name, is_standard_event
from gateway.field_warnings import (
    FIELD_WARNINGS,
    NO_COUNTRY_CODE,
    OUT_OF_RANGE,
    UNKNOWN_VALUE,
    UNPARSEABLE,
    FieldWarning,
)
from gateway.fields import MAX_NESTING, MAX_PROPERTIES, MAX_STRING_LENGTH, parse_timestamp
from gateway.normalise import (
    CURRENCIES,
    MAX_CONTENTS,
    MAX_EVENT_ID_LENGTH,
    MAX_FUTURE_SECONDS,
    normalise_event,
    parse_event_time,
    ttclid_from_url,
    validate_event_id,
    validate_event_name,
)
from tests.support import sha256

NOW = 1_695_723_400.5  # 2023-09-26T10:16:40.5Z
T = 1_695_723_330  # 2023-09-26T10:15:30Z


def norm(raw: dict[str, Any], region: str | None = None) -> dict[str, Any]:
    return normalise_event(raw, now=NOW, phone_region=region, warnings=[])


def refused_field(raw: dict[str, Any]) -> str:
    with pytest.raises(InvalidEvent) as exc:
        norm(raw)
    return exc.value.field


def props(properties: Any) -> Any:
    return norm({"event": "Purchase", "properties": properties}).get("properties")


# --- the existing model --------------------------------------------------------------


def test_event_accessors_and_dedup_name() -> None:
    event = Event("PIX", "server", {"event": "CompletePayment", "event_time": T, "event_id": "1"})
    assert (event.name, event.event_id, event.event_time) == ("CompletePayment", "1", T)
    assert dedup_name("CompletePayment", True) == "Purchase"
    assert dedup_name("SubmitForm", True) == "Lead"
    assert dedup_name("CompletePayment", False) == "CompletePayment"
    assert set(LEGACY_ALIASES) <= STANDARD_EVENTS


# --- event name ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Purchase", "CompletePayment", "Pageview", "my_event-2", "a"])
def test_valid_event_names(name: str) -> None:
    assert validate_event_name(name) == name


def test_custom_name_may_be_fifty_characters() -> None:
    assert validate_event_name("E" * 50) == "E" * 50


@pytest.mark.parametrize("name", ["1event", "_x", "with space", "Purchase ", "x" * 51, "émoji"])
def test_invalid_event_names(name: str) -> None:
    with pytest.raises(InvalidEvent) as exc:
        validate_event_name(name)
    assert exc.value.field == "event"


@pytest.mark.parametrize("value", [None, "", 5, ["Purchase"], True])
def test_event_is_a_required_string(value: Any) -> None:
    with pytest.raises(InvalidEvent):
        validate_event_name(value)


def test_standard_names_are_case_sensitive() -> None:
    assert is_standard_event("Purchase")
    assert not is_standard_event("purchase")  # still a valid custom name
    assert validate_event_name("purchase") == "purchase"


# --- event_time --------------------------------------------------------------------------

SAME_SECOND = [
    T,
    T + 0.999,
    float(T),
    str(T),
    f" {T}.25 ",
    T * 1000 + 123,
    str(T * 1000 + 999),
    float(T * 1000 + 500),
    "2023-09-26T10:15:30Z",
    "2023-09-26T10:15:30.999Z",
    "2023-09-26T10:15:30+00:00",
    "2023-09-26T12:15:30+02:00",
    "2023-09-26T05:15:30-0500",
    "2023-09-26T10:15:30",  # naive is UTC
    "2023-09-26 10:15:30",
    "20230926T101530Z",
    "2023-09-26T10:15:30:123+0000",  # Adobe's form
    "2023-09-26T12:15:30:999+0200",
]


@pytest.mark.parametrize("value", SAME_SECOND)
def test_time_forms_give_the_same_second(value: Any) -> None:
    assert parse_event_time(value, now=NOW) == T


def test_missing_time_is_time_of_receipt() -> None:
    assert parse_event_time(None, now=NOW) == int(NOW)
    assert parse_event_time("", now=NOW) == int(NOW)
    assert norm({"event": "Purchase"})["event_time"] == int(NOW)


def test_future_limit() -> None:
    assert parse_event_time(int(NOW) + MAX_FUTURE_SECONDS, now=NOW) == int(NOW) + 300
    with pytest.raises(InvalidEvent) as exc:
        parse_event_time(int(NOW) + MAX_FUTURE_SECONDS + 1, now=NOW)
    assert exc.value.field == "event_time"
    assert "future" in exc.value.detail


@pytest.mark.parametrize(
    "value",
    [True, False, "yesterday", "2023-13-01T00:00:00Z", "NaN", "inf", "1_000", {}, [T], "١٢٣"],
)
def test_unreadable_time_is_refused(value: Any) -> None:
    with pytest.raises(InvalidEvent) as exc:
        parse_event_time(value, now=NOW, field="timestamp")
    assert exc.value.field == "timestamp"


def test_time_before_1970_is_refused() -> None:
    with pytest.raises(InvalidEvent):
        parse_event_time(-5, now=NOW)


def test_far_future_and_huge_numbers_are_refused_not_crashing() -> None:
    for value in (10**30, 1e300, "9999-12-31T23:59:59Z", "0001-01-01T00:00:00+05:00"):
        with pytest.raises(InvalidEvent):
            parse_event_time(value, now=NOW)


@given(
    st.datetimes(
        min_value=datetime(2001, 1, 1),
        max_value=datetime(2099, 1, 1),
        timezones=st.just(UTC),
    ),
    st.integers(min_value=-14 * 60, max_value=14 * 60),
)
def test_any_time_form_parses_to_the_same_second(moment: datetime, offset_minutes: int) -> None:
    second = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
    millis = second * 1000 + moment.microsecond // 1000
    local = moment.astimezone(timezone(timedelta(minutes=offset_minutes)))
    sign = "+" if offset_minutes >= 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    adobe = local.strftime("%Y-%m-%dT%H:%M:%S") + f":{local.microsecond // 1000:03d}"
    forms: list[Any] = [
        second,
        str(second),
        millis,
        str(millis),
        moment.isoformat(),
        moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        local.isoformat(),
        moment.replace(tzinfo=None).isoformat(),
        f"{adobe}{sign}{hours:02d}{minutes:02d}",
    ]
    assert {parse_timestamp(form) for form in forms} == {second}


# --- event_id --------------------------------------------------------------------------


def test_event_id_rules() -> None:
    assert validate_event_id("order-1") == "order-1"
    assert validate_event_id(1616318632825) == "1616318632825"
    assert validate_event_id(12.0) == "12"
    assert validate_event_id("") is None
    assert validate_event_id("  ") is None
    assert validate_event_id(None) is None
    assert validate_event_id("x" * MAX_EVENT_ID_LENGTH) == "x" * MAX_EVENT_ID_LENGTH
    with pytest.raises(InvalidEvent):
        validate_event_id("x" * (MAX_EVENT_ID_LENGTH + 1))
    for bad in (True, ["a"], {"a": 1}):
        with pytest.raises(InvalidEvent):
            validate_event_id(bad)


def test_empty_event_id_is_left_out_of_the_body() -> None:
    assert "event_id" not in norm({"event": "Purchase", "event_id": ""})
    assert norm({"event": "Purchase", "event_id": 42})["event_id"] == "42"


# --- whole event -------------------------------------------------------------------------


def test_full_event_is_kept_in_2_0_form() -> None:
    body = norm(
        {
            "event": "Purchase",
            "event_time": T,
            "event_id": "e1",
            "user": {"email": "A@b.co", "ip": "203.0.113.7"},
            "page": {"url": "https://x.test/p", "referrer": "https://r.test/", "title": "x"},
            "properties": {"currency": "usd", "value": "10.50"},
            "app": {"app_id": 123, "app_name": "Shop", "app_version": "1.2", "other": 1},
            "ad": {
                "callback": "cb",
                "campaign_id": 1,
                "ad_id": "2",
                "creative_id": 3,
                "is_retargeting": False,
                "attributed": True,
                "attribution_type": "click",
                "attribution_provider": "AppsFlyer",
                "attribution_share": 0.5,
            },
            "lead": {"lead_id": 99, "lead_event_source": "HubSpot"},
            "device": {"platform": "iOS", "mobile": True, "versions": [], "model": ""},
            "limited_data_use": True,
            "context": {"ignored": True},
            "test_event_code": "TEST1",
        }
    )
    assert body == {
        "event": "Purchase",
        "event_time": T,
        "event_id": "e1",
        "user": {"email": sha256("a@b.co"), "ip": "203.0.113.7"},
        "page": {"url": "https://x.test/p", "referrer": "https://r.test/"},
        "properties": {"currency": "USD", "value": 10.5},
        "app": {"app_id": "123", "app_name": "Shop", "app_version": "1.2"},
        "ad": {
            "callback": "cb",
            "campaign_id": "1",
            "ad_id": "2",
            "creative_id": "3",
            "is_retargeting": False,
            "attributed": True,
            "attribution_type": "click",
            "attribution_provider": "AppsFlyer",
            "attribution_share": 0.5,
        },
        "lead": {"lead_id": "99", "lead_event_source": "HubSpot"},
        "device": {"platform": "iOS", "mobile": True},
        "limited_data_use": True,
    }


def test_empty_sections_are_absent() -> None:
    body = norm(
        {
            "event": "Purchase",
            "user": {"email": "", "phone": []},
            "page": {},
            "properties": {"contents": [], "x": None, "y": {}},
            "app": None,
            "ad": {"callback": ""},
            "lead": {},
            "device": {"a": [None, {}]},
        }
    )
    assert body == {"event": "Purchase", "event_time": int(NOW)}


def test_ttclid_filled_from_page_url_when_user_has_none() -> None:
    body = norm({"event": "Purchase", "page": {"url": "https://x.test/?a=1&ttclid=E.C.P.1"}})
    assert body["user"] == {"ttclid": "E.C.P.1"}
    body = norm(
        {
            "event": "Purchase",
            "user": {"ttclid": "mine"},
            "page": {"url": "https://x.test/?ttclid=E.C.P.1"},
        }
    )
    assert body["user"] == {"ttclid": "mine"}


def test_ttclid_from_url() -> None:
    assert ttclid_from_url("https://x.test/?ttclid=abc&b=2") == "abc"
    assert ttclid_from_url("https://x.test/?b=2") is None
    assert ttclid_from_url("https://x.test/?ttclid=") is None
    assert ttclid_from_url("http://[::1/?ttclid=x") is None


def test_warnings_are_collected() -> None:
    warnings: list[FieldWarning] = []
    body = normalise_event(
        {"event": "Purchase", "user": {"ip": "bad", "phone": "2133734253"}},
        now=NOW,
        phone_region=None,
        warnings=warnings,
    )
    assert "user" not in body
    assert warnings == [
        FieldWarning("user.ip", UNPARSEABLE), FieldWarning("user.phone", NO_COUNTRY_CODE)
    ]


def advised(raw: dict[str, Any]) -> tuple[dict[str, Any], list[FieldWarning]]:
    """The clean body and the field warnings of one event."""
    warnings: list[FieldWarning] = []
    body = normalise_event(raw, now=NOW, phone_region=None, warnings=warnings)
    assert set(warnings) <= set(FIELD_WARNINGS), "a warning outside the fixed label set"
    return body, warnings


@pytest.mark.parametrize(
    ("properties", "forwarded", "warning"),
    [
        # Events 1.0 items as CDPs send them: the item's content_type is lifted, as sent.
        ({"contents": [{"content_id": "1", "content_type": "socks"}]},
         {"contents": [{"content_id": "1"}], "content_type": "socks"},
         FieldWarning("properties.contents.content_type", UNKNOWN_VALUE)),
        ({"content_type": " Service "}, {"content_type": " Service "},
         FieldWarning("properties.content_type", UNKNOWN_VALUE)),
        ({"currency": "usdollar"}, {"currency": "usdollar"},
         FieldWarning("properties.currency", UNKNOWN_VALUE)),
        ({"currency": "ABC"}, {"currency": "ABC"},
         FieldWarning("properties.currency", UNKNOWN_VALUE)),
        ({"value": -1}, {"value": -1}, FieldWarning("properties.value", OUT_OF_RANGE)),
        ({"value": "-5.5"}, {"value": -5.5}, FieldWarning("properties.value", OUT_OF_RANGE)),
        ({"price": -2}, {"price": -2}, FieldWarning("properties.price", OUT_OF_RANGE)),
        ({"quantity": 0}, {"quantity": 0}, FieldWarning("properties.quantity", OUT_OF_RANGE)),
        ({"num_items": -1}, {"num_items": -1},
         FieldWarning("properties.num_items", OUT_OF_RANGE)),
        ({"contents": [{"price": 1, "quantity": 1}, {"price": 1, "quantity": -2}]},
         {"contents": [{"price": 1, "quantity": 1}, {"price": 1, "quantity": -2}], "value": -1.0},
         FieldWarning("properties.contents.quantity", OUT_OF_RANGE)),
        ({"contents": [{"price": -3}]}, {"contents": [{"price": -3}]},
         FieldWarning("properties.contents.price", OUT_OF_RANGE)),
    ],
)  # fmt: skip
def test_advisory_rules_forward_as_sent_and_warn(
    properties: dict[str, Any], forwarded: dict[str, Any], warning: FieldWarning
) -> None:
    body, warnings = advised({"event": "Purchase", "properties": properties})
    assert body["properties"] == forwarded
    assert warnings == [warning]


def test_every_item_with_an_odd_content_type_warns_but_the_event_counts_it_per_item() -> None:
    body, warnings = advised(
        {"event": "Purchase", "properties": {"contents": [
            {"content_id": "1", "content_type": "socks"},
            {"content_id": "2", "content_type": "dress"},
        ]}}
    )  # fmt: skip
    assert body["properties"]["content_type"] == "socks"  # the first item's, as 1.0 -> 2.0
    # One per item here; formats.py keeps each (field, reason) once per event.
    assert warnings == [FieldWarning("properties.contents.content_type", UNKNOWN_VALUE)] * 2


def test_attribution_share_and_att_status_outside_the_documented_values_warn() -> None:
    body, warnings = advised(
        {"event": "Purchase", "ad": {"attribution_share": 2}, "user": {"att_status": "maybe"}}
    )
    assert body["ad"] == {"attribution_share": 2.0}
    assert body["user"] == {"att_status": "maybe"}
    assert warnings == [
        FieldWarning("ad.attribution_share", OUT_OF_RANGE),
        FieldWarning("user.att_status", UNKNOWN_VALUE),
    ]


def test_documented_values_give_no_warning() -> None:
    body, warnings = advised(
        {"event": "Purchase", "ad": {"attribution_share": "0.5"},
         "user": {"att_status": "denied"},
         "properties": {"currency": " eur ", "content_type": "Product", "value": 0,
                        "num_items": 0, "contents": [{"price": 0, "quantity": 1}],
                        "customer_type": "returning", "gtm_version": "2"}}
    )  # fmt: skip
    assert warnings == []
    assert body["properties"]["currency"] == "EUR" and body["user"]["att_status"] == "DENIED"


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"event": "Purchase", "user": []}, "user"),
        ({"event": "Purchase", "user": {"email": 1.5}}, "user.email"),
        ({"event": "Purchase", "page": "https://x"}, "page"),
        ({"event": "Purchase", "page": {"url": 5}}, "page.url"),
        ({"event": "Purchase", "page": {"url": "x" * (MAX_STRING_LENGTH + 1)}}, "page.url"),
        ({"event": "Purchase", "properties": []}, "properties"),
        ({"event": "Purchase", "app": {"app_name": 5}}, "app.app_name"),
        ({"event": "Purchase", "ad": {"attributed": "yes"}}, "ad.attributed"),
        ({"event": "Purchase", "ad": {"attribution_share": "half"}}, "ad.attribution_share"),
        ({"event": "Purchase", "lead": "x"}, "lead"),
        ({"event": "Purchase", "device": [1]}, "device"),
        ({"event": "Purchase", "limited_data_use": "true"}, "limited_data_use"),
        ({"event": "Purchase", "event_time": "soon"}, "event_time"),
        ({"event": "Purchase", "event_id": ["x"]}, "event_id"),
        ({"event": 5}, "event"),
        ({}, "event"),
    ],
)
def test_wrong_types_are_refused_naming_the_field(raw: dict[str, Any], field: str) -> None:
    assert refused_field(raw) == field


# --- properties ----------------------------------------------------------------------------


def test_custom_properties_are_kept() -> None:
    assert props({"gtm_version": "2", "flags": [1, "a", None], "nested": {"a": {"b": 1}}}) == {
        "gtm_version": "2",
        "flags": [1, "a"],
        "nested": {"a": {"b": 1}},
    }


def test_numeric_strings_become_numbers() -> None:
    assert props({"value": "10.00", "price": "3", "quantity": "2", "num_items": 2.0}) == {
        "value": 10.0,
        "price": 3,
        "quantity": 2,
        "num_items": 2,
    }


@pytest.mark.parametrize(
    ("properties", "field"),
    [
        ({"value": "$10"}, "properties.value"),
        ({"value": "10,00"}, "properties.value"),
        ({"value": True}, "properties.value"),
        ({"value": "nan"}, "properties.value"),
        ({"price": [1]}, "properties.price"),
        ({"quantity": 1.5}, "properties.quantity"),
        ({"quantity": "two"}, "properties.quantity"),
        ({"quantity": 2**64 + 1}, "properties.quantity"),
        ({"quantity": -3.5e19}, "properties.quantity"),
        ({"num_items": 1e30}, "properties.num_items"),
        ({"num_items": "many"}, "properties.num_items"),
        ({"currency": 840}, "properties.currency"),
        ({"content_type": 1}, "properties.content_type"),
        ({"content_id": {"a": 1}}, "properties.content_id"),
        ({"content_ids": [["x"]]}, "properties.content_ids.0"),
        ({"contents": {"price": 1}}, "properties.contents"),
        ({"contents": ["x"]}, "properties.contents.0"),
        ({"contents": [{"price": 1}, {"quantity": 2.5}]}, "properties.contents.1.quantity"),
        ({"contents": [{"content_id": [1]}]}, "properties.contents.0.content_id"),
        ({"contents": [{"content_type": ["x"]}]}, "properties.contents.0.content_type"),
        ({"custom": 10**30}, "properties.custom"),
        ({"custom": "x" * (MAX_STRING_LENGTH + 1)}, "properties.custom"),
    ],
)
def test_wrong_types_in_properties_are_refused(properties: dict[str, Any], field: str) -> None:
    assert refused_field({"event": "Purchase", "properties": properties}) == field


def test_currency_is_upper_cased() -> None:
    assert props({"currency": " eur "}) == {"currency": "EUR"}
    assert {"USD", "EUR", "JPY", "BRL", "INR", "IDR", "KWD"} <= CURRENCIES


def test_content_type_values() -> None:
    assert props({"content_type": "product_group"}) == {"content_type": "product_group"}
    assert props({"content_type": "Product"}) == {"content_type": "product"}


def test_ids_are_strings() -> None:
    assert props({"content_id": 123, "content_ids": [1, "b", ""], "order_id": 100234}) == {
        "content_id": "123",
        "content_ids": ["1", "b"],
        "order_id": "100234",
    }
    assert props({"content_ids": "SKU-1"}) == {"content_ids": ["SKU-1"]}
    assert props({"contents": [{"content_id": 7, "price": 1, "quantity": 1}]}) == {
        "contents": [{"content_id": "7", "price": 1, "quantity": 1}],
        "value": 1.0,
    }


def test_content_type_is_lifted_from_items() -> None:
    result = props(
        {
            "contents": [
                {"content_id": "a", "content_type": "product_group"},
                {"content_id": "b", "content_type": "product"},
                {"content_type": "product"},
            ]
        }
    )
    assert result == {
        "content_type": "product_group",
        "contents": [{"content_id": "a"}, {"content_id": "b"}],
    }


def test_lifted_content_type_does_not_override_the_event_one() -> None:
    result = props({"content_type": "product", "contents": [{"content_type": "product_group"}]})
    assert result == {"content_type": "product"}


def test_value_is_computed_from_contents() -> None:
    assert props({"contents": [{"price": 29.99, "quantity": 2}]})["value"] == 59.98
    result = props({"contents": [{"price": 0.1, "quantity": 3}, {"price": "0.2", "quantity": 1}]})
    assert result["value"] == 0.5  # exactly, no float noise
    assert props({"contents": [{"price": 0.125, "quantity": 3}]})["value"] == 0.375


def test_value_is_not_computed_when_present_or_incomplete() -> None:
    assert props({"value": 5, "contents": [{"price": 1, "quantity": 1}]})["value"] == 5
    assert "value" not in props({"contents": [{"price": 1, "quantity": 1}, {"price": 2}]})
    assert "value" not in props({"contents": [{"quantity": 1}]})


def test_property_limits() -> None:
    many = {f"k{i}": i for i in range(MAX_PROPERTIES + 1)}
    assert refused_field({"event": "Purchase", "properties": many}) == "properties"
    items = [{"price": 1}] * (MAX_CONTENTS + 1)
    field = refused_field({"event": "Purchase", "properties": {"contents": items}})
    assert field == "properties.contents"
    nested: Any = 1
    for _ in range(MAX_NESTING + 1):
        nested = [nested]
    assert refused_field({"event": "Purchase", "properties": {"deep": nested}}).startswith(
        "properties.deep"
    )


def test_bodies_serialise() -> None:
    body = norm(
        {
            "event": "Purchase",
            "properties": {"value": 2**63, "contents": [{"price": 1e300, "quantity": 2**40}]},
        }
    )
    orjson.dumps(body)


def test_numbers_too_big_for_an_id_are_refused() -> None:
    assert refused_field({"event": "Purchase", "event_id": 10**5000}) == "event_id"
    assert refused_field({"event": "Purchase", "user": {"external_id": 10**30}}) == (
        "user.external_id"
    )
    field = refused_field({"event": "Purchase", "properties": {"content_ids": [10**30]}})
    assert field == "properties.content_ids.0"
