"""Where an event leaves for TikTok: batches sent, paced per pixel, and what each answer
does to its events (delivered, retried later, or dead-lettered). A batch TikTok rejects is
split until the bad event is alone, so its batch-mates still arrive. The outcomes are
recorded in the events' shard windows, and reach Redis with their shard's next commit.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .console.tally import Tally
from .events import dedup_name
from .merge import merge_copies
from .metrics import MATCH_KEYS, Metrics
from .records import DeadLetter, DeadRecord, ForwardRecord, RetryRecord
from .settings import Settings
from .upstream import RATE_LIMIT_CODES, EventSender, Outcome, UpstreamResult, retry_delay
from .window import PendingKey, ShardWindow

log = logging.getLogger("gateway.forwarder")


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One merged event ready to leave, with the window and key that own it."""

    window: ShardWindow
    key: PendingKey
    pixel_code: str
    event_source: str
    test_event_code: str | None
    body: dict[str, Any]

    @property
    def batch_key(self) -> tuple[str, str, str | None]:
        return (self.pixel_code, self.event_source, self.test_event_code)


def build_outgoing(
    window: ShardWindow, key: PendingKey, default_test_code: str | None
) -> Outgoing:
    """Merge a key's copies in arrival order; the first copy decides what it is."""
    first = key.copies[0]
    test_code = next(
        (c.test_event_code for c in key.copies if c.test_event_code), default_test_code
    )
    return Outgoing(
        window=window,
        key=key,
        pixel_code=first.pixel_code,
        event_source=first.event_source or "web",
        test_event_code=test_code,
        # The copies were parsed for this window alone: merged in place, nothing copied.
        body=merge_copies((c.body for c in key.copies), in_place=True),
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


class BatchSender:
    """Sends batches of merged events to TikTok and records each event's outcome."""

    def __init__(
        self,
        senders: Callable[[str], tuple[EventSender, str] | None],
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float],
        tally: Tally,
    ) -> None:
        self.senders = senders
        self.tally = tally
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.pacer = Pacer(settings.upstream_rate_limit)
        self._limit = asyncio.Semaphore(settings.forward_concurrency)
        # Rate-limit answers in a row, per pixel: whether a throttle persists. An event's
        # attempt count cannot tell; it also counts the 5xx and timeouts before the first.
        self._rate_limited: dict[str, int] = {}

    async def send(self, items: list[Outgoing]) -> None:
        async with self._limit:
            try:
                await self._send(items)
            except Exception:
                # A bug, not TikTok's answer (its failures are outcomes): try again later.
                log.exception("sending a batch for pixel %s failed", items[0].pixel_code)
                for item in items:
                    if item.key.state == "sending":
                        item.window.release(item.key)

    async def _send(self, items: Sequence[Outgoing]) -> None:
        first = items[0]
        # Names this attempt in the keys' timelines and in the log lines, so both can be joined.
        batch = uuid.uuid4().hex[:12]
        found = self.senders(first.pixel_code)
        if found is None:
            self._dead_letter_all(items, "auth", None, "pixel no longer configured", batch)
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
        if result.outcome is not Outcome.DELIVERED:
            # A rejected batch is split and sent again: its events count at their own answer.
            final = result.outcome is not Outcome.REJECTED or len(items) == 1
            self.tally.answered(items, result, self.clock(), counted=final)
        self.metrics.forward_duration.observe(result.duration)
        if result.outcome is Outcome.DELIVERED:
            await self._delivered(items, result, batch)
        elif result.outcome is Outcome.RETRY:
            await self._retry(items, result, batch)
        elif result.outcome is Outcome.AUTH:
            self.metrics.upstream_auth_failures.labels(self.pixel_label(first.pixel_code)).inc()
            log.error(
                "TikTok refused the access token of pixel %s (code %s: %s); events dead-lettered",
                first.pixel_code, result.code, result.message,
                extra=_batch_fields(items, batch, "auth", result),
            )
            self._dead_letter_all(items, "auth", result.code, result.message, batch)
        else:
            await self._rejected(items, result, batch)

    async def _delivered(
        self, items: Sequence[Outgoing], result: UpstreamResult, batch: str
    ) -> None:
        now = self.clock()
        # Counted before the commit: TikTok has the events whatever happens to our
        # bookkeeping, and anyone who sees the key remembered also sees the counts.
        self._count_delivered(items, now)
        self.tally.delivered(items, result, now)
        at, now_ms = round(now, 3), int(now * 1000)
        for item in items:
            record = ForwardRecord(item.key.member, at, result.request_id, result.code, batch,
                                   len(items), item.key.attempts)  # fmt: skip
            item.window.delivered(item.key, now_ms, record)
        log.info(
            "forwarded %d event(s) for pixel %s (request_id %s)",
            len(items), items[0].pixel_code, result.request_id,
            extra=_batch_fields(items, batch, "forwarded", result),
        )

    def _count_delivered(self, items: Sequence[Outgoing], now: float) -> None:
        pixel = self.pixel_label(items[0].pixel_code)
        self.metrics.forwarded.labels(pixel).inc(len(items))
        # Tallied first: a batch updates each labelled counter once.
        match_keys: collections.Counter[str] = collections.Counter()
        keys: collections.Counter[tuple[str, str]] = collections.Counter()
        for item in items:
            self.metrics.merge_wait.observe(max(0.0, now - item.key.first_seen_ms / 1000))
            user = item.body.get("user") or {}
            match_keys.update(key for key in MATCH_KEYS if user.get(key))
            sources = self.metrics.pair_label(item.key.source_set)
            if item.key.dedup and sources is not None:
                name = dedup_name(str(item.body.get("event")), self.settings.legacy_aliases)
                keys[self.metrics.event_label(name), sources] += 1
        for key, count in match_keys.items():
            self.metrics.match_keys.labels(pixel, key).inc(count)
        for (event, sources), count in keys.items():
            self.metrics.forwarded_keys.labels(pixel, event, sources).inc(count)

    async def _retry(self, items: Sequence[Outgoing], result: UpstreamResult, batch: str) -> None:
        attempt = max(i.key.attempts for i in items)
        delay = retry_delay(
            result,
            attempt,
            base=self.settings.retry_base,
            cap=self.settings.retry_cap,
            rate_limits=self._rate_limited.get(items[0].pixel_code, 0),
        )
        now = self.clock()
        due_ms = int((now + delay) * 1000)
        for item in items:
            record = RetryRecord(item.key.member, round(now, 3), result.code, result.http_status,
                                 result.message, round(delay, 3), batch, attempt)  # fmt: skip
            item.window.retry(item.key, due_ms, record)
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
            self.dead_letter(items[0], "rejected", result.code, result.message, batch)
            return
        bad = result.bad_event_index
        if bad is not None and 0 <= bad < len(items):
            parts = [[items[bad]], [*items[:bad], *items[bad + 1 :]]]
        else:
            half = len(items) // 2
            parts = [list(items[:half]), list(items[half:])]
        for part in parts:
            await self._send(part)

    def _dead_letter_all(
        self,
        items: Sequence[Outgoing],
        reason: str,
        code: int | None,
        message: str,
        batch: str | None = None,
    ) -> None:
        for item in items:
            self.dead_letter(item, reason, code, message, batch)

    def dead_letter(
        self,
        item: Outgoing,
        reason: str,
        code: int | None,
        message: str,
        batch: str | None = None,
    ) -> None:
        """Move an event to the dead letters, at its shard's next commit."""
        now = self.clock()
        letter = DeadLetter(
            reason=reason, code=code, message=message, pixel_code=item.pixel_code,
            event_source=item.event_source, test_event_code=item.test_event_code,
            first_seen=item.key.first_seen_ms / 1000, dead_lettered_at=now,
            attempts=item.key.attempts, dedup=item.key.dedup, event=item.body,
        )  # fmt: skip
        record = DeadRecord(item.key.member, round(now, 3), reason, code, message,
                            item.key.attempts, batch or None)  # fmt: skip
        item.window.dead(item.key, letter, int(now * 1000), record)
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

    def pixel_label(self, pixel_code: str) -> str:
        return self.metrics.pixel_label(pixel_code, self.settings.pixels)


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
