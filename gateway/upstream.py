"""The TikTok client: one POST to event/track, and what its answer means.

TikTok answers most errors as HTTP 200 with a non-zero body `code`, so the
body decides the outcome; the HTTP status only matters when there is no
TikTok body at all (a proxy's 502 page, a dropped connection). Nothing here
raises for a failed delivery: every attempt becomes an `UpstreamResult`, and
the forwarder decides from its `outcome` what to do next.

`SandboxSink` takes TikTok's place when no pixels are configured, so the
whole pipeline can be tried without a token.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import pathlib
import random
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import orjson

from .backoff import full_jitter

log = logging.getLogger(__name__)

TRACK_PATH = "/open_api/v1.3/event/track/"

SUCCESS_CODES = frozenset({0, 20001})
# Rate limits: app-level (40016, 40100), per pixel (40132), per advertiser (40133).
RATE_LIMIT_CODES = frozenset({40016, 40100, 40132, 40133})
# Write conflict, system errors, maintenance: TikTok says a retry may succeed.
TRANSIENT_CODES = frozenset({40202, 50000, 50002, 60001})
RETRY_CODES = RATE_LIMIT_CODES | TRANSIENT_CODES
# Permission on the pixel, token expired / empty / invalid: only a human fixes these.
AUTH_CODES = frozenset({40001, 40102, 40104, 40105})
MAINTENANCE_CODE = 60001

# TikTok's rule for a per-minute quota: suspend for 5 minutes.
RATE_LIMIT_FLOOR = 300.0
# Attempt from which a rate limit counts as persistent (not a one-second burst).
RATE_LIMIT_PERSISTS_AT = 3
# Maintenance lasts minutes; hammering it helps nobody.
MAINTENANCE_FLOOR = 300.0
# A Retry-After beyond a day is a bug on the other side, not a plan.
RETRY_AFTER_MAX = 86_400.0
# Spread floored delays so every pixel does not come back in the same second.
FLOOR_JITTER = 0.1

# The part of a non-JSON body kept in the message: enough to recognise a proxy page.
_SNIPPET = 200
# "data.3.properties...", "Batch.0.properties...", "batch.3", "data[3]": the index of
# the event TikTok complains about; not "metadata.3".
_BAD_INDEX = re.compile(r"(?<![A-Za-z0-9_])(?:data|batch)(?:\.|\[)(\d+)", re.IGNORECASE)


class Outcome(enum.Enum):
    """What the forwarder should do with the events of one attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    AUTH = "auth"
    REJECTED = "rejected"


@dataclass(frozen=True, slots=True)
class UpstreamResult:
    """One attempt's answer, whether it came from TikTok, a proxy or the network."""

    outcome: Outcome
    code: int | None
    message: str
    request_id: str | None
    http_status: int | None
    retry_after: float | None
    bad_event_index: int | None
    duration: float

    @property
    def code_class(self) -> str:
        """The answer's class among `CODE_CLASSES`: a bounded metric label."""
        return code_class(self.http_status, self.code)


# What a metric label says about an answer; a small, fixed set:
#   "0", "20001"        success, partial success (TikTok's body code)
#   "4xxxx_auth"        token or permission (40001, 40102, 40104, 40105): an operator must act
#   "4xxxx_rate_limit"  TikTok's rate limits (40016, 40100, 40132, 40133)
#   "4xxxx_transient"   other 4xxxx TikTok says to retry (40202, a write conflict)
#   "4xxxx_invalid"     any other 4xxxx code: the body or an event was refused
#   "5xxxx"             TikTok's internal errors (50000, 50002, 51xxx)
#   "http_4xx", "http_5xx"  an HTTP error without a TikTok body (a proxy, a load balancer)
#   "network"           no answer: connection refused or reset, timeout
#   "other"             anything else (60001 maintenance, a 2xx without a TikTok code)
CODE_CLASSES = (
    "0",
    "20001",
    "4xxxx_auth",
    "4xxxx_rate_limit",
    "4xxxx_transient",
    "4xxxx_invalid",
    "5xxxx",
    "http_4xx",
    "http_5xx",
    "network",
    "other",
)


def code_class(http_status: int | None, code: int | None) -> str:
    """Which of `CODE_CLASSES` an answer falls in.

    TikTok's error code says more than the HTTP status; an HTTP error whose body has
    no code, or a success code, is classed by its status (a proxy's page, a 429).
    """
    if http_status is not None and http_status >= 400 and code in (None, *SUCCESS_CODES):
        return "http_5xx" if http_status >= 500 else "http_4xx"
    if code is None:
        return "network" if http_status is None else "other"
    if code in SUCCESS_CODES:
        return str(code)
    if code in AUTH_CODES:
        return "4xxxx_auth"
    if code in RATE_LIMIT_CODES:
        return "4xxxx_rate_limit"
    if 40000 <= code <= 49999:
        return "4xxxx_transient" if code in RETRY_CODES else "4xxxx_invalid"
    return "5xxxx" if 50000 <= code <= 59999 else "other"


def classify(http_status: int | None, code: int | None) -> Outcome:
    """The outcome of an answer: a server failure or throttle status first, then the body code."""
    # A 5xx or 429 says the request did not get through cleanly, whatever body came
    # with it; resending is safe because TikTok deduplicates on event_id.
    if http_status is None or http_status in (408, 429) or http_status >= 500:
        return Outcome.RETRY
    if code is not None:
        return _classify_code(code)
    if http_status in (401, 403):
        return Outcome.AUTH
    if 200 <= http_status < 300:
        # TikTok always puts a code in a 2xx body; one without came from something in
        # between and says nothing about the events. Resending is safe: TikTok
        # deduplicates on event_id.
        return Outcome.RETRY
    return Outcome.REJECTED


def _classify_code(code: int) -> Outcome:
    if code in SUCCESS_CODES:
        return Outcome.DELIVERED
    if code in RETRY_CODES or 51000 <= code <= 51999:
        return Outcome.RETRY
    if code in AUTH_CODES:
        return Outcome.AUTH
    return Outcome.REJECTED


def retry_delay(
    result: UpstreamResult,
    attempt: int,
    *,
    base: float,
    cap: float,
    rand: Callable[[], float] = random.random,
    rate_limits: int | None = None,
) -> float:
    """Seconds to wait before attempt `attempt + 1` after `result`.

    Never less than a Retry-After; at least five minutes for a rate limit that
    persists (TikTok's per-minute quota rule) and for maintenance. A rate limit
    persists once `rate_limits` answers in a row (this one included) were rate
    limits; without that count, once `attempt` reaches RATE_LIMIT_PERSISTS_AT.
    """
    delay = full_jitter(attempt, base=base, cap=cap, rand=rand)
    floor = 0.0
    in_a_row = attempt if rate_limits is None else rate_limits
    if result.code in RATE_LIMIT_CODES and in_a_row >= RATE_LIMIT_PERSISTS_AT:
        floor = RATE_LIMIT_FLOOR
    elif result.code == MAINTENANCE_CODE:
        floor = MAINTENANCE_FLOOR
    if floor > delay:
        delay = floor * (1.0 + FLOOR_JITTER * rand())
    if result.retry_after is not None:
        delay = max(delay, result.retry_after)
    return delay


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), or None."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    seconds: float | None
    try:
        seconds = float(value)
    except ValueError:
        seconds = _seconds_until(value, time.time() if now is None else now)
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def _seconds_until(http_date: str, now: float) -> float | None:
    try:
        when = parsedate_to_datetime(http_date)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": RFC 9110 dates are GMT anyway
        when = when.replace(tzinfo=UTC)
    return when.timestamp() - now


def bad_event_index(message: str, batch_size: int) -> int | None:
    """The index into data[] that TikTok's message names, if it names one in range."""
    match = _BAD_INDEX.search(message)
    if match is None:
        return None
    index = int(match.group(1))
    return index if index < batch_size else None


class EventSender(Protocol):
    """Anything the forwarder can hand a batch to: TikTok, or the sandbox file."""

    async def send_events(
        self,
        *,
        access_token: str,
        event_source: str,
        event_source_id: str,
        data: list[dict[str, Any]],
        test_event_code: str | None,
    ) -> UpstreamResult: ...


@dataclass(frozen=True, slots=True)
class _Body:
    """What could be read from an answer's body."""

    code: int | None
    message: str
    request_id: str | None


def _parse_body(raw: bytes, http_status: int) -> _Body:
    """TikTok's envelope if the body is one; otherwise a message quoting the body."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict):
        code = parsed.get("code")
        # bool is an int to Python, not to TikTok.
        if isinstance(code, int) and not isinstance(code, bool):
            message = parsed.get("message")
            request_id = parsed.get("request_id")
            return _Body(
                code=code,
                message=message if isinstance(message, str) else "",
                request_id=request_id if isinstance(request_id, str) and request_id else None,
            )
    snippet = raw[:_SNIPPET].decode("utf-8", errors="replace").strip()
    return _Body(code=None, message=f"HTTP {http_status}: {snippet}", request_id=None)


class TikTokClient:
    """Posts batches to TikTok's Events API 2.0 over the app's one session."""

    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, *, timeout: float = 10.0
    ) -> None:
        self._session = session
        self._url = base_url.rstrip("/") + TRACK_PATH
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def send_events(
        self,
        *,
        access_token: str,
        event_source: str,
        event_source_id: str,
        data: list[dict[str, Any]],
        test_event_code: str | None,
    ) -> UpstreamResult:
        """Send one batch; network errors and bad answers come back as results."""
        payload: dict[str, Any] = {
            "event_source": event_source,
            "event_source_id": event_source_id,
            "data": data,
        }
        if test_event_code:
            # Top level, next to event_source: TikTok ignores it inside data[].
            payload["test_event_code"] = test_event_code
        headers = {
            # The raw token: a "Bearer " prefix is answered with 40105.
            "Access-Token": access_token,
            "Content-Type": "application/json",
        }
        started = time.monotonic()
        try:
            async with self._session.post(
                self._url,
                data=orjson.dumps(payload),
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
                raise_for_status=False,
                # The shared session may turn decoding off (pass-through needs that);
                # this body is read here and must be decoded.
                auto_decompress=True,
            ) as response:
                raw = await response.read()
                status = response.status
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except TimeoutError:
            # Before ClientError: aiohttp's timeout errors are both.
            return _network_result(f"timeout after {self._timeout.total}s", started)
        except (aiohttp.ClientError, OSError) as exc:
            return _network_result(f"{type(exc).__name__}: {exc}", started)
        result = _answer_result(raw, status, retry_after, len(data), started)
        log.debug(
            "event/track %s: %d events, HTTP %d, code %s, request_id %s, %.3fs",
            event_source_id,
            len(data),
            status,
            result.code,
            result.request_id,
            result.duration,
        )
        return result


def _network_result(message: str, started: float) -> UpstreamResult:
    return UpstreamResult(
        outcome=Outcome.RETRY,
        code=None,
        message=message,
        request_id=None,
        http_status=None,
        retry_after=None,
        bad_event_index=None,
        duration=time.monotonic() - started,
    )


def _answer_result(
    raw: bytes, status: int, retry_after: float | None, batch_size: int, started: float
) -> UpstreamResult:
    body = _parse_body(raw, status)
    outcome = classify(status, body.code)
    index = bad_event_index(body.message, batch_size) if outcome is Outcome.REJECTED else None
    return UpstreamResult(
        outcome=outcome,
        code=body.code,
        message=body.message,
        request_id=body.request_id,
        http_status=status,
        retry_after=retry_after,
        bad_event_index=index,
        duration=time.monotonic() - started,
    )


class SandboxSink:
    """Stands in for TikTok when no pixels are configured: appends each batch as one
    JSON line to a file and logs a one-line summary."""

    def __init__(self, path: pathlib.Path) -> None:
        self._path = path
        # Lines are written from worker threads; one writer at a time keeps them whole.
        self._lock = threading.Lock()

    @property
    def path(self) -> pathlib.Path:
        return self._path

    async def send_events(
        self,
        *,
        access_token: str,
        event_source: str,
        event_source_id: str,
        data: list[dict[str, Any]],
        test_event_code: str | None,
    ) -> UpstreamResult:
        """Append the batch as one line; always delivered."""
        started = time.monotonic()
        request_id = f"sandbox-{uuid.uuid4().hex}"
        record: dict[str, Any] = {
            "request_id": request_id,
            "sent_at": time.time(),
            "event_source": event_source,
            "event_source_id": event_source_id,
            "data": data,
        }
        if test_event_code:
            record["test_event_code"] = test_event_code
        # The token is deliberately not written: the file is for looking at events.
        line = orjson.dumps(record) + b"\n"
        await asyncio.to_thread(self._append, line)
        names = sorted({str(event.get("event")) for event in data})
        log.info(
            "sandbox: %d events for %s (%s) -> %s",
            len(data),
            event_source_id,
            ", ".join(names),
            self._path,
        )
        return UpstreamResult(
            outcome=Outcome.DELIVERED,
            code=0,
            message="OK",
            request_id=request_id,
            http_status=None,
            retry_after=None,
            bad_event_index=None,
            duration=time.monotonic() - started,
        )

    def _append(self, line: bytes) -> None:
        with self._lock:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            with self._path.open("ab") as file:
                file.write(line)
