"""Structured logs: one JSON object a line (text on a terminal), with the request id, pixel,
event name and outcome, the level from configuration, and never raw PII or tokens."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.cli import main
from gateway.logs import (
    REDACTED,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    request_context,
    setup_logging,
)
from tests.helpers import browser_event, post_browser, post_server, server_event, wait_for
from tests.support import PIXEL, TOKEN, GatewayFactory, sha256
from tests.tiktok_stub import TikTokStub

EMAIL = "jane.doe@example.com"
PHONE = "+1 415 555 2671"


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, restored after the test (setup_logging replaces its handlers)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    access_level = logging.getLogger("aiohttp.access").level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)


@pytest.fixture
def json_lines(root_logger: logging.Logger) -> Iterator[io.StringIO]:
    """Everything logged during the test, as the JSON handler writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.DEBUG)
    yield stream
    root_logger.removeHandler(handler)


def record(msg: str = "hello %s", args: tuple[Any, ...] = ("world",), **extra: Any) -> Any:
    rec = logging.LogRecord("gateway.test", logging.INFO, __file__, 1, msg, args, None)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_json_formatter_writes_one_object_with_the_extra_fields() -> None:
    line = JsonFormatter().format(record(pixel=PIXEL, event="Purchase", outcome="new"))
    assert "\n" not in line
    entry = orjson.loads(line)
    assert entry["message"] == "hello world"
    assert entry["level"] == "info"
    assert entry["logger"] == "gateway.test"
    assert entry["time"].endswith("Z")
    assert (entry["pixel"], entry["event"], entry["outcome"]) == (PIXEL, "Purchase", "new")


def test_secret_and_pii_fields_are_redacted_whatever_passes_them() -> None:
    rec = record(
        access_token=TOKEN, email=EMAIL, Authorization="Bearer x", phone=PHONE, pixel=PIXEL
    )
    for formatter in (JsonFormatter(), TextFormatter()):
        line = formatter.format(rec)
        for secret in (TOKEN, EMAIL, "Bearer x", PHONE):
            assert secret not in line
        assert REDACTED in line
        assert PIXEL in line


def test_exceptions_stay_inside_the_json_object() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.LogRecord("g", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = orjson.loads(JsonFormatter().format(rec))
    assert "ValueError: boom" in entry["exception"]


def test_text_formatter_appends_fields_for_a_terminal() -> None:
    line = TextFormatter().format(record(pixel=PIXEL, outcome="forwarded", code=None))
    assert line.endswith(f"gateway.test: hello world  [pixel={PIXEL} outcome=forwarded]")


def test_request_id_comes_from_the_request_context() -> None:
    rec = record()
    with request_context("req-123"):
        RequestIdFilter().filter(rec)
    assert rec.request_id == "req-123"
    outside = record()
    RequestIdFilter().filter(outside)
    assert not hasattr(outside, "request_id")


@pytest.mark.parametrize(("fmt", "formatter"), [("json", JsonFormatter), ("text", TextFormatter)])
def test_setup_logging_takes_level_and_format(
    root_logger: logging.Logger, fmt: str, formatter: type[logging.Formatter]
) -> None:
    setup_logging("WARNING", fmt)
    [handler] = root_logger.handlers
    assert root_logger.level == logging.WARNING
    assert isinstance(handler.formatter, formatter)
    assert any(isinstance(f, RequestIdFilter) for f in handler.filters)


def test_auto_format_is_json_when_not_on_a_terminal(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    setup_logging("INFO", "auto")
    assert isinstance(root_logger.handlers[0].formatter, JsonFormatter)


async def test_a_malformed_http_request_is_one_info_line_without_a_traceback(
    root_logger: logging.Logger, make_gateway: GatewayFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", "json")
    gateway = await make_gateway(forward=False)
    host, port = gateway.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    status_line = await reader.readline()  # aiohttp logs before it answers
    writer.close()
    await writer.wait_closed()
    assert b" 400 " in status_line

    lines = [orjson.loads(line) for line in capsys.readouterr().err.splitlines()]
    [line] = [entry for entry in lines if entry["logger"] == "aiohttp.server"]
    assert line["level"] == "info"
    assert line["message"].startswith(
        "refused a malformed HTTP request from 127.0.0.1: Invalid header token"
    )
    assert (line["outcome"], line["status"]) == ("refused", 400)
    assert "exception" not in line


def test_the_level_and_format_come_from_configuration(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, redis_url: str, tmp_path: Any
) -> None:
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("GATEWAY_REDIS_URL", redis_url)
    monkeypatch.setenv("GATEWAY_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("GATEWAY_LOG_LEVEL", "ERROR")
    monkeypatch.setenv("GATEWAY_LOG_FORMAT", "json")
    assert main(["check-config"]) == 0
    assert root_logger.level == logging.ERROR
    assert isinstance(root_logger.handlers[0].formatter, JsonFormatter)


async def test_a_requests_lines_carry_its_id_pixel_event_and_outcome_and_no_pii(
    make_gateway: GatewayFactory,
    tiktok: TikTokStub,
    http: aiohttp.ClientSession,
    json_lines: io.StringIO,
) -> None:
    gateway = await make_gateway(merge_window=5.0)
    await post_browser(http, gateway.url, browser_event("log-1"))
    server = server_event("log-1", email=EMAIL)
    server["user"]["phone"] = PHONE
    answer = await post_server(http, gateway.url, [server])
    await tiktok.wait_for_events(1)
    async with http.post(
        f"{gateway.url}/open_api/v1.3/event/track/",
        json={"event_source": "web", "event_source_id": PIXEL, "data": [server]},
        headers={"Access-Token": "wrong-token-0123456789"},
    ) as resp:
        refused = await resp.json()
    # The forwarder logs after TikTok has answered.
    await wait_for(lambda: '"outcome":"forwarded"' in json_lines.getvalue(), "the forward")

    text = json_lines.getvalue()
    entries = [orjson.loads(line) for line in text.splitlines()]  # every line is one object
    assert entries
    ingest = [e for e in entries if e["logger"] == "gateway.ingest"]
    [server_line] = [e for e in ingest if e.get("source") == "server"]
    assert server_line["request_id"] == answer["request_id"]
    assert server_line["pixel"] == PIXEL
    assert server_line["event"] == "Purchase"
    assert server_line["event_id"] == "log-1"
    assert server_line["outcome"] == "accepted"
    [pixel_line] = [e for e in ingest if e.get("source") == "pixel"]
    assert pixel_line["outcome"] == "accepted"
    assert pixel_line["request_id"] != server_line["request_id"]
    # What each copy turned out to be, the shard's owner says, joined by the event's names.
    owner = [e for e in entries if e["logger"] == "gateway.forwarder" and "source" in e]
    assert [(e["source"], e["outcome"]) for e in owner] == [
        ("pixel", "new"), ("server", "complete"),
    ]
    for line in owner:
        assert (line["pixel"], line["event"], line["event_id"]) == (PIXEL, "Purchase", "log-1")
        assert "request_id" not in line  # not handling a client's request

    [forwarded] = [e for e in entries if e.get("outcome") == "forwarded"]
    assert forwarded["pixel"] == PIXEL and forwarded["event"] == "Purchase"
    assert forwarded["tiktok_request_id"].startswith("stub")
    assert forwarded["batch"] and forwarded["batch_size"] == 1 and forwarded["code"] == 0
    assert "request_id" not in forwarded  # not a client's request: no id of one

    [refusal] = [e for e in entries if e.get("outcome") == "refused"]
    assert refusal["request_id"] == refused["request_id"]
    assert refusal["code"] == 40105

    for secret in (
        EMAIL, sha256(EMAIL), PHONE, "+14155552671", sha256("+14155552671"), "customer-8841",
        TOKEN, "wrong-token-0123456789",
    ):
        assert secret not in text, secret
