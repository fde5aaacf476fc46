"""Claims due events from Redis, merges their copies, sends them to TikTok, records the outcome.

The loop: claim (with a lease) -> merge each event's copies -> dead-letter the
ones too old to send -> batch per (pixel, event source, test code) -> send ->
acknowledge, retry later, or dead-letter. A batch TikTok rejects is split
until the bad event is alone, so its batch-mates still arrive.

Every decision about an event is a store script keyed by the claim token; an
instance that dies mid-send loses nothing: its lease runs out and any
instance claims the event again (TikTok's dedup on event_id absorbs a resend).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from .errors import StoreUnavailable
from .events import dedup_name
from .merge import merge_copies
from .metrics import MATCH_KEYS, Metrics
from .settings import Settings
from .store import Claim, Store
from .upstream import RATE_LIMIT_CODES, EventSender, Outcome, UpstreamResult, retry_delay

log = logging.getLogger("gateway.forwarder")
WAKE_LINGER = 0.05  # seconds a wake waits for more due events before claiming


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One merged event ready to leave, with the claim that owns it."""

    claim: Claim
    pixel_code: str
    event_source: str
    test_event_code: str | None
    body: dict[str, Any]

    @property
    def batch_key(self) -> tuple[str, str, str | None]:
        return (self.pixel_code, self.event_source, self.test_event_code)


def build_outgoing(claim: Claim, default_test_code: str | None) -> Outgoing:
    """Merge a claim's copies in arrival order; the first copy decides what it is."""
    first = claim.copies[0]
    test_code = next(
        (c["test_event_code"] for c in claim.copies if c.get("test_event_code")), default_test_code
    )
    return Outgoing(
        claim=claim,
        pixel_code=first["pixel_code"],
        event_source=first.get("event_source") or "web",
        test_event_code=test_code,
        body=merge_copies(c["body"] for c in claim.copies),
    )


class Pacer:
    """Spaces requests per pixel so one busy pixel stays under TikTok's rate limits."""

    def __init__(self, per_second: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = 1.0 / per_second
        self.clock = clock
        self._next: dict[str, float] = {}

    async def wait(self, key: str) -> None:
        now = self.clock()
        start = max(now, self._next.get(key, now))
        self._next[key] = start + self.interval
        if start > now:
            await asyncio.sleep(start - now)


class Forwarder:
    """The background loop that moves due events from Redis to TikTok."""

    def __init__(
        self,
        store: Store,
        senders: Callable[[str], tuple[EventSender, str] | None],
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.senders = senders
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.pacer = Pacer(settings.upstream_rate_limit)
        self._wake = asyncio.Event()
        self._stopping = False
        self._limit = asyncio.Semaphore(settings.forward_concurrency)
        # Rate-limit answers in a row, per pixel: whether a throttle persists. An event's
        # attempt count cannot tell; it also counts the 5xx and timeouts before the first.
        self._rate_limited: dict[str, int] = {}

    def wake(self) -> None:
        """Look for due events now rather than at the next poll (a pair just completed)."""
        self._wake.set()

    async def run(self) -> None:
        """Forward until stopped; Redis outages are waited out, never fatal."""
        failures = 0
        while not self._stopping:
            try:
                forwarded = await self.forward_once()
                failures = 0
            except StoreUnavailable as exc:
                failures += 1
                self.metrics.redis_errors.inc()
                if failures == 1 or failures % 50 == 0:
                    log.warning("forwarder waiting for Redis: %s", exc)
                forwarded = 0
            except Exception:
                log.exception("forwarder iteration failed")
                forwarded = 0
            self._report_unclaimable()
            # A claim that took a whole batch may have left more due: claim again at once.
            # Otherwise wait for the next poll, or a wake: under steady load events fall
            # due all the time, and claiming them as they trickle in would send TikTok
            # many small requests instead of a few large ones.
            if forwarded < self.settings.forward_batch_size and not self._stopping:
                await self._idle(min(self.settings.forward_poll_interval * (1 + failures), 5.0))

    def _report_unclaimable(self) -> None:
        failing = self.store.unclaimable
        self.metrics.unclaimable_shards.set(len(failing))
        since = min(failing.values(), default=None)
        self.metrics.unclaimable_seconds.set(0.0 if since is None else self.clock() - since)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        if self._wake.is_set() and not self._stopping:
            # Woken by a completed pair (or an event without event_id): a moment more lets
            # the ones arriving meanwhile share this claim and this request to TikTok,
            # rather than one request each.
            await asyncio.sleep(min(WAKE_LINGER, seconds))
        self._wake.clear()

    async def forward_once(self) -> int:
        """Claim what is due and send it; returns how many events were claimed."""
        now = self.clock()
        claims = await self.store.claim(
            now, limit=self.settings.forward_batch_size, lease=self.settings.forward_lease
        )
        if not claims:
            return 0
        batches: dict[tuple[str, str, str | None], list[Outgoing]] = {}
        for claim in claims:
            item = build_outgoing(claim, self.settings.test_event_code)
            if now - item.body.get("event_time", now) > self.settings.max_event_age:
                await self._dead_letter(item, "too_old", None, "older than GATEWAY_MAX_EVENT_AGE")
                continue
            batches.setdefault(item.batch_key, []).append(item)
        size = self.settings.forward_batch_size
        chunks = [
            items[i : i + size] for items in batches.values() for i in range(0, len(items), size)
        ]
        try:
            await asyncio.gather(*(self._send_limited(chunk) for chunk in chunks))
        except asyncio.CancelledError:
            # Shutting down mid-send: hand back what was not acknowledged, so another
            # instance sends it now rather than after the lease.
            entry = _timeline("released", self.clock(), why="shutdown")
            await asyncio.shield(self.store.release(claims, self.clock(), entry))
            raise
        return len(claims)

    async def _send_limited(self, items: list[Outgoing]) -> None:
        async with self._limit:
            try:
                await self._send(items)
            except StoreUnavailable as exc:
                # The send happened or not; the lease brings the events back either way.
                log.warning("could not record a batch's outcome, it will be retried: %s", exc)

    async def _send(self, items: Sequence[Outgoing]) -> None:
        first = items[0]
        # Names this attempt in the keys' timelines and in the log lines, so both can be joined.
        batch = uuid.uuid4().hex[:12]
        found = self.senders(first.pixel_code)
        if found is None:
            await self._dead_letter_all(items, "auth", None, "pixel no longer configured", batch)
            return
        sender, token = found
        await self.pacer.wait(first.pixel_code)
        result = await sender.send_events(
            access_token=token,
            event_source=first.event_source,
            event_source_id=first.pixel_code,
            data=[item.body for item in items],
            test_event_code=first.test_event_code,
        )
        throttled = result.code in RATE_LIMIT_CODES
        self._rate_limited[first.pixel_code] = (
            self._rate_limited.get(first.pixel_code, 0) + 1 if throttled else 0
        )
        self.metrics.forward_requests.labels(result.outcome.value, result.code_class).inc()
        self.metrics.forward_duration.observe(result.duration)
        if result.outcome is Outcome.DELIVERED:
            await self._delivered(items, result, batch)
        elif result.outcome is Outcome.RETRY:
            await self._retry(items, result, batch)
        elif result.outcome is Outcome.AUTH:
            self.metrics.upstream_auth_failures.labels(self._pixel_label(first.pixel_code)).inc()
            log.error(
                "TikTok refused the access token of pixel %s (code %s: %s); events dead-lettered",
                first.pixel_code, result.code, result.message,
                extra=_batch_fields(items, batch, "auth", result),
            )
            await self._dead_letter_all(items, "auth", result.code, result.message, batch)
        else:
            await self._rejected(items, result, batch)

    async def _delivered(
        self, items: Sequence[Outgoing], result: UpstreamResult, batch: str
    ) -> None:
        now = self.clock()
        # Counted before the acknowledgement: TikTok has the events whatever happens to
        # our bookkeeping, and anyone who sees the key marked sent also sees the counts.
        self._count_delivered(items, now)
        entry = _timeline("forwarded", now, request_id=result.request_id, code=result.code,
                          batch=batch, batch_size=len(items))
        await asyncio.shield(
            self.store.ack([i.claim for i in items], now, result.request_id or "", entry)
        )
        log.info(
            "forwarded %d event(s) for pixel %s (request_id %s)",
            len(items), items[0].pixel_code, result.request_id,
            extra=_batch_fields(items, batch, "forwarded", result),
        )

    def _count_delivered(self, items: Sequence[Outgoing], now: float) -> None:
        pixel = self._pixel_label(items[0].pixel_code)
        self.metrics.forwarded.labels(pixel).inc(len(items))
        # Tallied first: a batch updates each labelled counter once.
        match_keys: collections.Counter[str] = collections.Counter()
        keys: collections.Counter[tuple[str, str]] = collections.Counter()
        for item in items:
            self.metrics.merge_wait.observe(max(0.0, now - item.claim.first_seen))
            user = item.body.get("user") or {}
            match_keys.update(key for key in MATCH_KEYS if user.get(key))
            sources = self.metrics.pair_label(item.claim.sources)
            if item.claim.dedup and sources is not None:
                name = dedup_name(str(item.body.get("event")), self.settings.legacy_aliases)
                keys[self.metrics.event_label(name), sources] += 1
        for key, count in match_keys.items():
            self.metrics.match_keys.labels(pixel, key).inc(count)
        for (event, sources), count in keys.items():
            self.metrics.forwarded_keys.labels(pixel, event, sources).inc(count)

    async def _retry(self, items: Sequence[Outgoing], result: UpstreamResult, batch: str) -> None:
        attempt = max(i.claim.attempts for i in items)
        delay = retry_delay(
            result,
            attempt,
            base=self.settings.retry_base,
            cap=self.settings.retry_cap,
            rate_limits=self._rate_limited.get(items[0].pixel_code, 0),
        )
        now = self.clock()
        entry = _timeline("retry", now, code=result.code, http_status=result.http_status,
                          message=result.message, retry_in=round(delay, 3), batch=batch,
                          attempt=attempt)
        await asyncio.shield(self.store.release([i.claim for i in items], now + delay, entry))
        self.metrics.forward_retries.inc(len(items))
        log.warning(
            "TikTok send failed for pixel %s (http %s, code %s: %s); %d event(s) retry in %.1fs",
            items[0].pixel_code, result.http_status, result.code, result.message,
            len(items), delay,
            extra={**_batch_fields(items, batch, "retry", result), "retry_in": round(delay, 3)},
        )

    async def _rejected(
        self, items: Sequence[Outgoing], result: UpstreamResult, batch: str
    ) -> None:
        """Split a rejected batch until the bad event is alone; send the rest."""
        if len(items) == 1:
            await self._dead_letter(items[0], "rejected", result.code, result.message, batch)
            return
        bad = result.bad_event_index
        if bad is not None and 0 <= bad < len(items):
            parts = [[items[bad]], [*items[:bad], *items[bad + 1 :]]]
        else:
            half = len(items) // 2
            parts = [list(items[:half]), list(items[half:])]
        for part in parts:
            await self._send(part)

    async def _dead_letter_all(
        self,
        items: Sequence[Outgoing],
        reason: str,
        code: int | None,
        message: str,
        batch: str | None = None,
    ) -> None:
        for item in items:
            await self._dead_letter(item, reason, code, message, batch)

    async def _dead_letter(
        self,
        item: Outgoing,
        reason: str,
        code: int | None,
        message: str,
        batch: str | None = None,
    ) -> None:
        now = self.clock()
        letter = {
            "reason": reason,
            "code": code,
            "message": message,
            "pixel_code": item.pixel_code,
            "event_source": item.event_source,
            "test_event_code": item.test_event_code,
            "first_seen": item.claim.first_seen,
            "dead_lettered_at": now,
            "attempts": item.claim.attempts,
            "dedup": item.claim.dedup,
            "event": item.body,
        }
        entry = _timeline("dead_lettered", now, reason=reason, code=code, message=message,
                          **({"batch": batch} if batch else {}))
        stored = await asyncio.shield(self.store.dead_letter(item.claim, letter, now, entry))
        if stored is not None:
            self.metrics.dead_lettered.labels(reason).inc()
            log.warning(
                "dead-lettered %s event %s for pixel %s: %s (code %s)",
                item.body.get("event"), item.body.get("event_id"), item.pixel_code, message, code,
                extra={
                    "pixel": item.pixel_code,
                    "event": item.body.get("event"),
                    "event_id": item.body.get("event_id"),
                    "outcome": "dead_lettered",
                    "reason": reason,
                    "code": code,
                    **({"batch": batch} if batch else {}),
                },
            )

    def _pixel_label(self, pixel_code: str) -> str:
        return self.metrics.pixel_label(pixel_code, self.settings.pixels)


def _timeline(outcome: str, at: float, **fields: Any) -> bytes:
    return orjson.dumps({"outcome": outcome, "at": round(at, 3), **fields})


def _batch_fields(
    items: Sequence[Outgoing], batch: str, outcome: str, result: UpstreamResult
) -> dict[str, Any]:
    """Structured log fields of one send: names and ids only, never event contents."""
    names = sorted({str(item.body.get("event")) for item in items})
    return {
        "pixel": items[0].pixel_code,
        "event": names[0] if len(names) == 1 else names,
        "outcome": outcome,
        "batch": batch,
        "batch_size": len(items),
        "code": result.code,
        "http_status": result.http_status,
        "tiktok_request_id": result.request_id,
        "duration": round(result.duration, 4),
    }
