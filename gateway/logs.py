"""Logging set-up: one JSON object per line, or plain text on a terminal.

Every line carries the time, level, logger and message, and whatever the code
passed with `extra=`: `pixel`, `event`, `event_id`, `source`, `outcome`,
`batch`, `tiktok_request_id`, ... Lines written while a request is handled
also carry its `request_id` (the one in the answer's envelope and
`X-Request-Id` header), so one request's lines can be found together.

Nothing logged anywhere includes raw PII or tokens: events are logged by
pixel, name and event_id only; email, phone and external_id are hashed
before any code that logs sees them; and an `extra` field named like a secret
or a PII field is written as "[redacted]" whatever its value, as a last guard.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}
# `extra` fields that must never reach a log, whatever code passes them.
SENSITIVE_FIELDS = frozenset(
    {
        "access_token", "admin_token", "authorization", "password", "token",
        "email", "phone", "phone_number", "external_id",
    }
)
REDACTED = "[redacted]"

# The id of the request being handled, set by the app's error middleware.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "request_id", default=None
)


@contextmanager
def request_context(request_id: str) -> Iterator[None]:
    """Lines logged inside carry `request_id`."""
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to a record (unless the caller gave one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = request_id_var.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse at ERROR with a traceback, though it has
    answered it 400 already. On the internet that is a scanner or a broken client, not
    our fault: one INFO line with aiohttp's reason, so alerts on errors stay meaningful."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= (exc.code or 400) < 500:
            return True
        peer = record.args[0] if isinstance(record.args, tuple) and record.args else None
        reason = " ".join(str(exc.message).split())[:200]
        record.msg, record.args = "refused a malformed HTTP request from %s: %s", (peer, reason)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        record.outcome, record.status = "refused", exc.code or 400
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The record's `extra` fields, sensitive ones redacted."""
    return {
        key: REDACTED if key.lower() in SENSITIVE_FIELDS else value
        for key, value in vars(record).items()
        if key not in _STANDARD
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(extra_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    """For a terminal: the usual line, then the `extra` fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = " ".join(
            f"{key}={value}" for key, value in extra_fields(record).items() if value is not None
        )
        if not fields:
            return line
        first, newline, rest = line.partition("\n")  # a traceback stays below the fields
        return f"{first}  [{fields}]{newline}{rest}"


def setup_logging(level: str = "INFO", fmt: str = "auto") -> None:
    """Configure the root logger once; `auto` is text on a terminal and JSON otherwise."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log would print every beacon; our own lines say what matters.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server.filters):
        server.addFilter(MalformedRequestFilter())
