"""The TikTok client and its outcome rules, against the stub TikTok on loopback."""

from __future__ import annotations

import asyncio
import email.utils
import pathlib
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.upstream import (
    RETRY_AFTER_MAX,
    EventSender,
    Outcome,
    SandboxSink,
    TikTokClient,
    UpstreamResult,
    bad_event_index,
    classify,
    parse_retry_after,
    retry_delay,
)
from tests.support import free_port
from tests.tiktok_stub import Answer, TikTokStub

TOKEN = "0123456789abcdef0123456789abcdef01234567"
PIXEL = "C4EXAMPLEPIXEL0CODE1"


@pytest.fixture
def client(http: aiohttp.ClientSession, tiktok: TikTokStub) -> TikTokClient:
    return TikTokClient(http, tiktok.url, timeout=5.0)


def make_events(n: int) -> list[dict[str, Any]]:
    return [
        {"event": "Purchase", "event_time": 1767225600 + i, "event_id": f"order-{i}"}
        for i in range(n)
    ]


async def send(
    sender: EventSender, data: list[dict[str, Any]], test_event_code: str | None = None
) -> UpstreamResult:
    return await sender.send_events(
        access_token=TOKEN,
        event_source="web",
        event_source_id=PIXEL,
        data=data,
        test_event_code=test_event_code,
    )


def result_with(code: int | None = None, retry_after: float | None = None) -> UpstreamResult:
    return UpstreamResult(
        outcome=classify(200, code),
        code=code,
        message="",
        request_id=None,
        http_status=200,
        retry_after=retry_after,
        bad_event_index=None,
        duration=0.0,
    )


# --- classify -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0, Outcome.DELIVERED),
        (20001, Outcome.DELIVERED),
        (40016, Outcome.RETRY),
        (40100, Outcome.RETRY),
        (40132, Outcome.RETRY),
        (40133, Outcome.RETRY),
        (40202, Outcome.RETRY),
        (50000, Outcome.RETRY),
        (50002, Outcome.RETRY),
        (51000, Outcome.RETRY),
        (51012, Outcome.RETRY),
        (51999, Outcome.RETRY),
        (60001, Outcome.RETRY),
        (40001, Outcome.AUTH),
        (40102, Outcome.AUTH),
        (40104, Outcome.AUTH),
        (40105, Outcome.AUTH),
        (40000, Outcome.REJECTED),
        (40002, Outcome.REJECTED),
        (40006, Outcome.REJECTED),
        (40050, Outcome.REJECTED),
        (40061, Outcome.REJECTED),
        (40062, Outcome.REJECTED),
        (40063, Outcome.REJECTED),
        (40118, Outcome.REJECTED),
        (40700, Outcome.REJECTED),
        (41000, Outcome.REJECTED),
        (50999, Outcome.REJECTED),
        (52000, Outcome.REJECTED),
    ],
)
def test_classify_by_code(code: int, outcome: Outcome) -> None:
    assert classify(200, code) is outcome


@pytest.mark.parametrize("status", [200, 400, 401])
def test_body_code_decides_over_other_http_statuses(status: int) -> None:
    assert classify(status, 0) is Outcome.DELIVERED
    assert classify(status, 40100) is Outcome.RETRY
    assert classify(status, 40105) is Outcome.AUTH
    assert classify(status, 40002) is Outcome.REJECTED


@pytest.mark.parametrize("status", [None, 408, 429, 500, 502])
def test_server_failure_status_is_retried_whatever_the_body(status: int | None) -> None:
    for code in (0, 40002, 40105):
        assert classify(status, code) is Outcome.RETRY


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (None, Outcome.RETRY),  # network error, timeout
        (500, Outcome.RETRY),
        (502, Outcome.RETRY),
        (503, Outcome.RETRY),
        (504, Outcome.RETRY),
        (599, Outcome.RETRY),
        (429, Outcome.RETRY),
        (408, Outcome.RETRY),
        (200, Outcome.RETRY),  # a 2xx without TikTok's code came from something in between
        (401, Outcome.AUTH),
        (403, Outcome.AUTH),
        (400, Outcome.REJECTED),
        (404, Outcome.REJECTED),
        (413, Outcome.REJECTED),
        (301, Outcome.REJECTED),
    ],
)
def test_classify_without_body_code(status: int | None, outcome: Outcome) -> None:
    assert classify(status, None) is outcome


# --- retry_delay ----------------------------------------------------------------------


def test_retry_delay_is_plain_backoff_for_ordinary_errors() -> None:
    result = result_with(code=50002)
    assert retry_delay(result, 3, base=1.0, cap=300.0, rand=lambda: 1.0) == 4.0
    assert retry_delay(result_with(), 2, base=1.0, cap=300.0, rand=lambda: 1.0) == 2.0


def test_retry_delay_never_less_than_retry_after() -> None:
    result = result_with(retry_after=120.0)
    assert retry_delay(result, 1, base=1.0, cap=300.0, rand=lambda: 0.0) == 120.0
    # A longer backoff wins over a short Retry-After.
    short = result_with(retry_after=0.5)
    assert retry_delay(short, 6, base=1.0, cap=300.0, rand=lambda: 1.0) == 32.0


@pytest.mark.parametrize("code", [40100, 40016, 40132, 40133])
def test_persistent_rate_limit_backs_off_five_minutes(code: int) -> None:
    result = result_with(code=code)
    # A first or second rate limit may be a one-second burst: ordinary backoff.
    assert retry_delay(result, 1, base=1.0, cap=300.0, rand=lambda: 1.0) == 1.0
    assert retry_delay(result, 2, base=1.0, cap=300.0, rand=lambda: 1.0) == 2.0
    for attempt in (3, 4, 10):
        low = retry_delay(result, attempt, base=1.0, cap=300.0, rand=lambda: 0.0)
        high = retry_delay(result, attempt, base=1.0, cap=300.0, rand=lambda: 1.0)
        assert low == 300.0
        assert 300.0 <= high <= 330.0  # spread so pixels do not return together


def test_persistent_rate_limit_ignores_small_cap() -> None:
    # Test settings use tiny caps; TikTok's quota rule is not theirs to shorten.
    result = result_with(code=40100)
    assert retry_delay(result, 3, base=0.01, cap=0.1, rand=lambda: 0.5) >= 300.0


def test_maintenance_backs_off_long_from_the_first_attempt() -> None:
    assert retry_delay(result_with(code=60001), 1, base=1.0, cap=300.0) >= 300.0


def test_retry_after_above_the_floor_wins() -> None:
    result = result_with(code=40100, retry_after=900.0)
    assert retry_delay(result, 5, base=1.0, cap=300.0, rand=lambda: 1.0) == 900.0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("-5", 0.0),
        ("1e400", RETRY_AFTER_MAX),
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, seconds: float | None) -> None:
    assert parse_retry_after(value) == seconds


def test_parse_retry_after_http_date() -> None:
    now = 1_767_225_600.0
    in_a_minute = email.utils.formatdate(now + 60, usegmt=True)
    assert parse_retry_after(in_a_minute, now=now) == pytest.approx(60.0)
    past = email.utils.formatdate(now - 60, usegmt=True)
    assert parse_retry_after(past, now=now) == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 00:01:00 -0000", now=now) == pytest.approx(60.0)


@pytest.mark.parametrize(
    ("message", "index"),
    [
        ("data.3.properties.value: Not a valid number", 3),
        ("Batch.0.properties.contents.0.content_id: Not a valid string", 0),
        ("batch.3", 3),
        ("Invalid value at data[2].event_time", 2),
        ("data.12.event_id: Invalid value", None),  # out of range for a batch of 10
        ("metadata.3: whatever", None),
        ("properties.contents.0.content_id: Not a valid string", None),
        ("Invalid parameters", None),
        ("", None),
    ],
)
def test_bad_event_index(message: str, index: int | None) -> None:
    assert bad_event_index(message, 10) == index


# --- TikTokClient against the stub ---------------------------------------------------


async def test_success_sends_tiktoks_request(client: TikTokClient, tiktok: TikTokStub) -> None:
    data = make_events(3)
    result = await send(client, data)

    assert result.outcome is Outcome.DELIVERED
    assert result.code == 0
    assert result.message == "OK"
    assert result.request_id
    assert result.http_status == 200
    assert result.retry_after is None
    assert result.bad_event_index is None
    assert result.duration > 0
    assert tiktok.events() == data
    [request] = tiktok.requests
    assert request.method == "POST"
    assert request.path == "/open_api/v1.3/event/track/"
    assert request.headers["Access-Token"] == TOKEN  # raw, no "Bearer "
    assert request.headers["Content-Type"] == "application/json"
    assert request.body == {"event_source": "web", "event_source_id": PIXEL, "data": data}


async def test_test_event_code_goes_top_level(client: TikTokClient, tiktok: TikTokStub) -> None:
    data = make_events(2)
    result = await send(client, data, test_event_code="TEST12345")

    assert result.outcome is Outcome.DELIVERED
    [request] = tiktok.requests
    assert request.body["test_event_code"] == "TEST12345"
    assert all("test_event_code" not in event for event in request.body["data"])


async def test_base_url_with_trailing_slash(
    http: aiohttp.ClientSession, tiktok: TikTokStub
) -> None:
    client = TikTokClient(http, tiktok.url + "/")
    assert (await send(client, make_events(1))).outcome is Outcome.DELIVERED
    assert tiktok.requests[0].path == "/open_api/v1.3/event/track/"


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (Answer(code=20001, message="Partially successful"), Outcome.DELIVERED),
        (Answer(code=40100, message="Too many requests."), Outcome.RETRY),
        (Answer(code=40132, message="QPS limited"), Outcome.RETRY),
        (Answer(code=50002, message="Error processing"), Outcome.RETRY),
        (Answer(code=51012, message="PIXEL_ERROR"), Outcome.RETRY),
        (Answer(code=60001, message="System maintenance"), Outcome.RETRY),
        (Answer(code=40001, message="No permission to operate pixel code"), Outcome.AUTH),
        (Answer(code=40105, message="Access token is invalid"), Outcome.AUTH),
        (Answer(code=40000, message="Invalid parameters"), Outcome.REJECTED),
        (Answer(code=50000, http_status=500, message="System error"), Outcome.RETRY),
        (Answer(code=0, http_status=500), Outcome.RETRY),  # a server failure status wins
    ],
)
async def test_answer_types(
    client: TikTokClient, tiktok: TikTokStub, answer: Answer, outcome: Outcome
) -> None:
    tiktok.queue(answer)
    result = await send(client, make_events(2))

    assert result.outcome is outcome
    assert result.code == answer.code
    assert result.message == answer.message
    assert result.http_status == answer.http_status
    assert result.request_id
    assert len(tiktok.events()) == (2 if answer.accepts else 0)


async def test_rejected_event_index_from_message(client: TikTokClient, tiktok: TikTokStub) -> None:
    tiktok.queue(Answer(code=40002, message="data.1.properties.value: Not a valid number"))
    result = await send(client, make_events(3))

    assert result.outcome is Outcome.REJECTED
    assert result.code == 40002
    assert result.bad_event_index == 1


async def test_stub_rejects_poison_event(client: TikTokClient, tiktok: TikTokStub) -> None:
    data = make_events(4)
    tiktok.reject_event_ids.add("order-2")
    result = await send(client, data)

    assert result.outcome is Outcome.REJECTED
    assert result.code == 40002
    assert result.bad_event_index == 2
    assert tiktok.events() == []
    # Without the poison event the rest goes through.
    good = [event for i, event in enumerate(data) if i != result.bad_event_index]
    assert (await send(client, good)).outcome is Outcome.DELIVERED
    assert tiktok.events() == good


async def test_http_500_without_body_code(client: TikTokClient, tiktok: TikTokStub) -> None:
    tiktok.queue(Answer(http_status=500, raw_body=b"Internal Server Error"))
    result = await send(client, make_events(1))

    assert result.outcome is Outcome.RETRY
    assert result.code is None
    assert result.request_id is None
    assert result.http_status == 500
    assert "Internal Server Error" in result.message
    assert tiktok.events() == []


async def test_429_with_retry_after(client: TikTokClient, tiktok: TikTokStub) -> None:
    tiktok.queue(Answer(http_status=429, raw_body=b"Too Many Requests", retry_after="7"))
    result = await send(client, make_events(1))

    assert result.outcome is Outcome.RETRY
    assert result.http_status == 429
    assert result.retry_after == 7.0
    assert retry_delay(result, 1, base=0.01, cap=1.0) >= 7.0


async def test_retry_after_as_http_date(client: TikTokClient, tiktok: TikTokStub) -> None:
    when = email.utils.formatdate(usegmt=True)  # now: nothing left to wait
    tiktok.queue(Answer(code=40100, retry_after=when))
    result = await send(client, make_events(1))

    assert result.outcome is Outcome.RETRY
    assert result.retry_after is not None
    assert 0.0 <= result.retry_after <= 1.0


async def test_non_json_502(client: TikTokClient, tiktok: TikTokStub) -> None:
    page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>"
    tiktok.queue(Answer(http_status=502, raw_body=page))
    result = await send(client, make_events(1))

    assert result.outcome is Outcome.RETRY
    assert result.code is None
    assert result.http_status == 502
    assert "502 Bad Gateway" in result.message


@pytest.mark.parametrize(
    "body",
    [b'{"error": "no code here"}', b"[1, 2]", b'{"code": "0"}', b'{"code": true}', b""],
)
async def test_200_without_tiktok_code_is_retried(
    client: TikTokClient, tiktok: TikTokStub, body: bytes
) -> None:
    tiktok.queue(Answer(raw_body=body))
    result = await send(client, make_events(1))

    assert result.outcome is Outcome.RETRY
    assert result.code is None
    assert result.http_status == 200


async def test_long_message_from_a_proxy_is_shortened(
    client: TikTokClient, tiktok: TikTokStub
) -> None:
    tiktok.queue(Answer(http_status=503, raw_body=b"x" * 100_000))
    result = await send(client, make_events(1))

    assert result.outcome is Outcome.RETRY
    assert len(result.message) < 300


async def test_slow_answer_times_out(http: aiohttp.ClientSession, tiktok: TikTokStub) -> None:
    client = TikTokClient(http, tiktok.url, timeout=0.2)
    tiktok.queue(Answer(delay=1.0))
    result = await send(client, make_events(1))

    assert result.outcome is Outcome.RETRY
    assert result.http_status is None
    assert result.code is None
    assert "timeout" in result.message
    assert 0.15 <= result.duration < 1.0


async def test_dropped_connection(client: TikTokClient, tiktok: TikTokStub) -> None:
    tiktok.queue(Answer(drop_connection=True))
    result = await send(client, make_events(2))

    assert result.outcome is Outcome.RETRY
    assert result.http_status is None
    assert result.code is None
    assert result.message
    assert tiktok.events() == []
    # The next request on the same session works again.
    assert (await send(client, make_events(2))).outcome is Outcome.DELIVERED


async def test_connection_refused(http: aiohttp.ClientSession) -> None:
    client = TikTokClient(http, f"http://127.0.0.1:{free_port()}")
    result = await send(client, make_events(1))

    assert result.outcome is Outcome.RETRY
    assert result.http_status is None
    assert "Connect" in result.message


async def test_session_raising_for_status_still_gives_results(tiktok: TikTokStub) -> None:
    # The app's session might be built with raise_for_status; the client must not care.
    async with aiohttp.ClientSession(raise_for_status=True) as strict:
        client = TikTokClient(strict, tiktok.url)
        tiktok.queue(Answer(http_status=503, raw_body=b"down"))
        result = await send(client, make_events(1))
    assert result.outcome is Outcome.RETRY
    assert result.http_status == 503


async def test_request_ids_are_unique(client: TikTokClient, tiktok: TikTokStub) -> None:
    tiktok.queue(Answer(), Answer(code=40100), Answer(code=40002))
    results = [await send(client, make_events(1)) for _ in range(5)]
    ids = [r.request_id for r in results]
    assert None not in ids
    assert len(set(ids)) == len(ids)


async def test_concurrent_sends(client: TikTokClient, tiktok: TikTokStub) -> None:
    batches = [make_events(1) for _ in range(20)]
    for i, batch in enumerate(batches):
        batch[0]["event_id"] = f"concurrent-{i}"
    results = await asyncio.gather(*(send(client, batch) for batch in batches))
    assert all(r.outcome is Outcome.DELIVERED for r in results)
    events = await tiktok.wait_for_events(20)
    assert sorted(e["event_id"] for e in events) == sorted(f"concurrent-{i}" for i in range(20))


async def test_unicode_survives(client: TikTokClient, tiktok: TikTokStub) -> None:
    data = [{"event": "ViewContent", "event_id": "é-1", "properties": {"content_name": "雪 ❄"}}]
    assert (await send(client, data)).outcome is Outcome.DELIVERED
    assert tiktok.events() == data


# --- SandboxSink ----------------------------------------------------------------------


async def test_sandbox_writes_json_lines(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "sandbox" / "events.jsonl"  # the directory is created on demand
    sink = SandboxSink(path)
    first = await send(sink, make_events(2))
    second = await send(sink, make_events(1), test_event_code="TEST1")

    for result in (first, second):
        assert result.outcome is Outcome.DELIVERED
        assert result.code == 0
        assert result.request_id is not None
        assert result.request_id.startswith("sandbox-")
    assert first.request_id != second.request_id
    lines = (await asyncio.to_thread(path.read_bytes)).splitlines()
    records = [orjson.loads(line) for line in lines]
    assert [r["request_id"] for r in records] == [first.request_id, second.request_id]
    assert records[0]["event_source_id"] == PIXEL
    assert records[0]["data"] == make_events(2)
    assert "test_event_code" not in records[0]
    assert records[1]["test_event_code"] == "TEST1"
    assert TOKEN.encode() not in b"".join(lines)


async def test_sandbox_lines_stay_whole_under_concurrency(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = SandboxSink(path)
    # Big enough lines that interleaved writes would show.
    batches = [
        [{"event": "PageView", "event_id": f"{i}-{j}", "pad": "x" * 5000} for j in range(20)]
        for i in range(40)
    ]
    results = await asyncio.gather(*(send(sink, batch) for batch in batches))

    lines = (await asyncio.to_thread(path.read_bytes)).splitlines()
    assert len(lines) == len(batches)
    records = [orjson.loads(line) for line in lines]
    assert {r["request_id"] for r in records} == {r.request_id for r in results}
    assert sorted(r["data"][0]["event_id"] for r in records) == sorted(f"{i}-0" for i in range(40))


async def test_answers_are_decoded_even_if_the_session_does_not(tiktok: TikTokStub) -> None:
    # The app's session turns decompression off for pass-through; event/track answers
    # must still be read as JSON, whatever encoding TikTok picks.
    async with aiohttp.ClientSession(auto_decompress=False) as raw_session:
        client = TikTokClient(raw_session, tiktok.url)
        tiktok.queue(Answer(code=40100, message="Too many requests."))
        limited = await send(client, make_events(1))
        delivered = await send(client, make_events(1))
    assert "gzip" in tiktok.requests[0].headers.get("Accept-Encoding", "")
    assert limited.code == 40100
    assert limited.outcome is Outcome.RETRY
    assert delivered.outcome is Outcome.DELIVERED
