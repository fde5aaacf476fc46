"""Field warnings end to end: what TikTok only advises is forwarded as sent, what the gateway
drops while normalising is said, and both are counted, logged (rate-limited, never a value)
and written to the key's /debug history."""

from __future__ import annotations

import logging

import aiohttp
import orjson
import pytest

from gateway.field_warnings import (
    FIELD_WARNINGS,
    NO_COUNTRY_CODE,
    UNKNOWN_VALUE,
    FieldWarning,
    WarningLog,
)
from tests.helpers import post_server, server_event
from tests.support import PIXEL, PIXEL2, TOKEN2, Gateway, GatewayFactory
from tests.tiktok_stub import TikTokStub

PHONE = "4155552671"  # no country code


def warnings_metric(gateway: Gateway, pixel: str, field: str, reason: str) -> float:
    labels = {"pixel": pixel, "field": field, "reason": reason}
    return gateway.metric("gateway_field_warnings_total", labels)


async def test_advisory_fields_are_forwarded_as_sent_counted_logged_and_in_the_history(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.ingest")
    gateway = await make_gateway(admin_token="secret", merge_window=0.2)
    # Every known series exists at zero from the start, for each configured pixel.
    for pixel in (PIXEL, PIXEL2):
        for warning in FIELD_WARNINGS:
            assert warnings_metric(gateway, pixel, warning.field, warning.reason) == 0
    items = [
        {"content_id": "1", "content_type": "socks", "price": 3, "quantity": 2},
        {"content_id": "2", "content_type": "dress", "price": 4, "quantity": 1},
    ]
    event = server_event("warn-1", "AddToCart")
    event["properties"] = {"currency": "XBT", "contents": items}
    event["user"]["phone"] = [PHONE, "+1 415 555 2671"]

    answer = await post_server(http, gateway.url, [event])

    assert answer["code"] == 0
    [forwarded] = await tiktok.wait_for_events(1)
    assert forwarded["properties"] == {
        "currency": "XBT",
        "content_type": "socks",
        "contents": [
            {"content_id": "1", "price": 3, "quantity": 2},
            {"content_id": "2", "price": 4, "quantity": 1},
        ],
        "value": 10.0,
    }
    assert len(forwarded["user"]["phone"]) == 1  # the one with a country code
    expected = {
        ("properties.contents.content_type", UNKNOWN_VALUE),
        ("properties.currency", UNKNOWN_VALUE),
        ("user.phone", NO_COUNTRY_CODE),
    }
    for field, reason in expected:  # once per event, though two items said "socks"/"dress"
        assert warnings_metric(gateway, PIXEL, field, reason) == 1
    assert warnings_metric(gateway, PIXEL2, "properties.currency", UNKNOWN_VALUE) == 0

    lines = [r for r in caplog.records if getattr(r, "field", None)]
    assert {(r.field, r.reason, r.pixel) for r in lines} == {  # type: ignore[attr-defined]
        (field, reason, PIXEL) for field, reason in expected
    }
    logged = "\n".join(r.getMessage() + repr(vars(r)) for r in lines)
    assert PHONE not in logged and "socks" not in logged and "XBT" not in logged

    url = f"{gateway.url}/debug/events/{PIXEL}/warn-1/AddToCart"
    async with http.get(url, headers={"Authorization": "Bearer secret"}) as resp:
        text = await resp.text()
    [first] = orjson.loads(text)["data"]["timeline"][:1]
    assert first["outcome"] == "new"
    assert {(w["field"], w["reason"]) for w in first["warnings"]} == expected
    assert PHONE not in text and "XBT" not in text


async def test_a_second_warning_within_the_minute_is_counted_but_not_logged(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.ingest")
    gateway = await make_gateway(merge_window=0.2)
    for n in range(3):
        event = server_event(f"no-cc-{n}")
        event["user"]["phone"] = PHONE
        await post_server(http, gateway.url, [event])
    other = server_event("no-cc-p2")
    other["user"]["phone"] = PHONE
    await post_server(http, gateway.url, [other], pixel=PIXEL2, token=TOKEN2)
    events = await tiktok.wait_for_events(4)
    assert all("phone" not in e["user"] for e in events)  # dropped, not guessed
    assert warnings_metric(gateway, PIXEL, "user.phone", NO_COUNTRY_CODE) == 3
    assert warnings_metric(gateway, PIXEL2, "user.phone", NO_COUNTRY_CODE) == 1
    lines = [r for r in caplog.records if getattr(r, "field", None) == "user.phone"]
    assert sorted(r.pixel for r in lines) == [PIXEL, PIXEL2]  # type: ignore[attr-defined]


def test_the_warning_log_says_how_many_it_kept_quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.ingest")
    now = [1000.0]
    warning_log = WarningLog(interval=60.0, clock=lambda: now[0])
    warning = FieldWarning("user.ip", "unparseable")
    for at in (1000.0, 1010.0, 1059.9, 1060.0, 1061.0):
        now[0] = at
        warning_log.note(PIXEL, PIXEL, warning)
    warning_log.note("sandbox", "CSOMEOTHERPIXEL", warning)  # another pixel: its own minute
    assert [(r.pixel, r.suppressed) for r in caplog.records] == [  # type: ignore[attr-defined]
        (PIXEL, 0), (PIXEL, 2), ("CSOMEOTHERPIXEL", 0)
    ]
