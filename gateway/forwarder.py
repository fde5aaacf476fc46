"""Owns shards, merges their copies, sends due events to TikTok, records the outcome.

Each shard has one owner at a time (a lease in Redis, renewed in the background;
instances share the shards evenly). The loop: read the owned shards' logs -> absorb
each copy into its shard's window (gateway/window.py: merged, or a duplicate) -> take
the keys that fell due -> dead-letter the ones too old to send -> batch per (pixel,
event source, test code) -> send -> commit each shard's outcome in one script call,
which also trims its log. A batch TikTok rejects is split until the bad event is
alone, so its batch-mates still arrive.

An owner that dies loses nothing: every copy stays in its shard's log until the
commit that resolves its key, and the next owner rebuilds the window from there. A
key may go twice only when its owner dies (or loses its lease) between sending it and
committing that; TikTok's dedup on event_id absorbs such a resend.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import StoreUnavailable
from .events import dedup_name
from .merge import merge_copies
from .metrics import MATCH_KEYS, Metrics
from .records import DeadLetter, DeadRecord, ForwardRecord, RetryRecord
from .settings import Settings
from .store import Store
from .upstream import RATE_LIMIT_CODES, EventSender, Outcome, UpstreamResult, retry_delay
from .window import Absorbed, PendingKey, ShardWindow

log = logging.getLogger("gateway.forwarder")
WAKE_LINGER = 0.1  # seconds a wake waits for more copies before reading
LOG_READ_COUNT = 200  # log entries a round reads a shard


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


class Forwarder:
    """The background loop that owns shards and moves their due events to TikTok."""

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
        self.token = uuid.uuid4().hex  # this instance, in the shard leases
        self.windows: dict[int, ShardWindow] = {}
        self.failing: dict[int, float] = {}
        """Owned shards whose last read or commit failed -> since when (Unix seconds)."""
        self._failing_said = -math.inf
        self._next_balance = 0.0
        self._wake = asyncio.Event()
        self._stopping = False
        self._limit = asyncio.Semaphore(settings.forward_concurrency)
        # Rate-limit answers in a row, per pixel: whether a throttle persists. An event's
        # attempt count cannot tell; it also counts the 5xx and timeouts before the first.
        self._rate_limited: dict[str, int] = {}

    def wake(self) -> None:
        """Read the logs now rather than at the next poll (copies were just appended)."""
        self._wake.set()

    async def run(self) -> None:
        """Forward until stopped; Redis outages are waited out, never fatal."""
        renewing = asyncio.create_task(self._keep_leases(), name="shard-leases")
        failures = 0
        try:
            while not self._stopping:
                try:
                    await self.balance()
                    busy = await self.forward_once()
                    failures = 0
                except StoreUnavailable as exc:
                    failures += 1
                    self.metrics.redis_errors.inc()
                    if failures == 1 or failures % 50 == 0:
                        log.warning("forwarder waiting for Redis: %s", exc)
                    busy = False
                except Exception:
                    log.exception("forwarder iteration failed")
                    busy = False
                self._report_failing()
                if not busy and not self._stopping:
                    await self._idle(self._idle_seconds(failures))
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            await asyncio.shield(self._let_go_all())

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    def _idle_seconds(self, failures: int) -> float:
        """Until the next poll, or the next key or commit due, whichever is first; at
        least WAKE_LINGER, so keys falling due one after another leave in batches (and a
        shard is committed a few times a second, not once a key)."""
        poll = min(self.settings.forward_poll_interval * (1 + failures), 5.0)
        dues = [
            d
            for w in self.windows.values()
            for d in (w.next_due(), w.commit_due())
            if d is not None
        ]
        if dues:
            poll = min(poll, min(dues) / 1000 - self.clock())
        return max(WAKE_LINGER, poll)

    async def _idle(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)
        if self._wake.is_set() and not self._stopping:
            # Woken by an ingest: a moment more lets the copies arriving meanwhile share
            # this read and this request to TikTok, rather than one request each.
            await asyncio.sleep(min(WAKE_LINGER, seconds))
        self._wake.clear()

    # -- shard ownership ------------------------------------------------------------

    async def balance(self) -> None:
        """Own a fair share of the shards: take free ones, give back extra ones. Every
        third of a lease, so a shard whose owner died is taken over within about a lease."""
        now = self.clock()
        if now < self._next_balance:
            return
        try:
            instances = await self.store.heartbeat(self.token, now)
        except StoreUnavailable:
            if not self.windows:
                raise  # nothing to forward meanwhile: try again at the next round
            # The heartbeats' node is away (a cluster primary): the shards owned go on
            # forwarding, their nodes may be up; balanced again a lease step later.
            self._next_balance = now + self._lease_step()
            self.metrics.redis_errors.inc()
            log.warning("cannot balance shards (Redis away); forwarding the %d owned",
                        len(self.windows))  # fmt: skip
            return
        self._next_balance = now + self._lease_step()
        share = math.ceil(self.store.shards / instances)
        if len(self.windows) > share:
            idle = [s for s, w in self.windows.items() if not _sending(w)]
            extra = idle[: len(self.windows) - share]
            for shard in extra:
                del self.windows[shard]
            await self.store.let_go(extra, self.token)
            return
        if len(self.windows) == share:
            return
        others = (s for s in range(self.store.shards) if s not in self.windows)
        free = await self.store.unowned(others, self.token)
        random.shuffle(free)  # instances starting together take different shards first
        for shard in await self.store.acquire(free[: share - len(self.windows)], self.token):
            await self._take_over(shard)

    async def _take_over(self, shard: int) -> None:
        """Start owning a shard: its predecessor's keys waiting for a retry, and its log
        from the start (copies already counted rebuild the window silently)."""
        await self.store.import_legacy(shard, self.token)
        counted, retries = await self.store.take_over(shard)
        window = ShardWindow(
            shard=shard,
            keys=self.store,
            merge_window_ms=self.store.merge_window_ms,
            dedup_window_ms=self.store.dedup_window_ms,
            early_flush=self.store.early_flush,
            history=self.store.keeps_history,
            counted_id=counted,
        )
        window.load_retries(retries)
        self.windows[shard] = window
        log.info("owning shard %d (%d key(s) waiting for a retry)", shard, len(retries))

    async def _keep_leases(self) -> None:
        """Renew the leases apart from the loop, so a slow send does not lose them."""
        while True:
            await asyncio.sleep(self._lease_step())
            owned = list(self.windows)
            try:
                held = await self.store.renew(owned, self.token)
            except StoreUnavailable:
                continue
            except Exception:
                log.exception("renewing shard leases failed")
                continue
            for shard, ours in held.items():
                if ours is False and self.windows.pop(shard, None) is not None:
                    log.warning("shard %d is owned by another instance now; letting it go", shard)

    def _lease_step(self) -> float:
        return max(0.05, self.settings.forward_lease / 3)

    async def _let_go_all(self) -> None:
        shards = list(self.windows)
        self.windows.clear()
        with contextlib.suppress(StoreUnavailable):
            await self.store.let_go(shards, self.token)
            await self.store.leave(self.token)

    def _report_failing(self) -> None:
        self.metrics.unclaimable_shards.set(len(self.failing))
        since = min(self.failing.values(), default=None)
        self.metrics.unclaimable_seconds.set(0.0 if since is None else self.clock() - since)

    def _note_failing(self, failures: dict[int, Exception], shards: Sequence[int]) -> None:
        """Keep `failing` up to date for the shards just tried, and say which fail, and
        since when: when that changes, and once a minute while it lasts."""
        now = self.clock()
        recovered = [s for s in shards if s in self.failing and s not in failures]
        if recovered:
            since = min(self.failing[s] for s in recovered)
            log.warning("shard(s) %s readable again, after %.1f s", _shard_list(recovered),
                        now - since)  # fmt: skip
            for shard in recovered:
                del self.failing[shard]
        fresh = [s for s in failures if s not in self.failing]
        for shard in fresh:
            self.failing[shard] = now
        if failures and (fresh or time.monotonic() - self._failing_said > 60.0):
            self._failing_said = time.monotonic()
            failing = sorted(self.failing)
            log.warning(
                "cannot read %d of %d owned shards (%s) since %.1f s (%s); forwarding the others",
                len(failing), len(self.windows), _shard_list(failing),
                now - min(self.failing.values()), failures[failing[0]],
            )  # fmt: skip

    # -- one round --------------------------------------------------------------------

    async def forward_once(self) -> bool:
        """Read, merge, send what is due, commit; returns whether more work is waiting
        now (a read that took a whole count, or more keys due than a round takes): then
        the next round starts at once, else after a poll, a wake or the next key due, so
        that what arrives meanwhile shares the round."""
        windows = dict(self.windows)
        if not windows:
            return False
        full = await self._read(windows)
        now = self.clock()
        outgoing: list[Outgoing] = []
        limit = self.settings.forward_batch_size
        more = full
        for window in windows.values():
            taken = window.take_due(int(now * 1000), limit)
            more = more or len(taken) == limit
            for key in taken:
                outgoing.append(build_outgoing(window, key, self.settings.test_event_code))
        batches: dict[tuple[str, str, str | None], list[Outgoing]] = {}
        for item in outgoing:
            if now - item.body.get("event_time", now) > self.settings.max_event_age:
                self._dead_letter(item, "too_old", None, "older than GATEWAY_MAX_EVENT_AGE")
                continue
            batches.setdefault(item.batch_key, []).append(item)
        size = self.settings.forward_batch_size
        chunks = [
            items[i : i + size] for items in batches.values() for i in range(0, len(items), size)
        ]
        try:
            await asyncio.gather(*(self._send_limited(chunk) for chunk in chunks))
        except asyncio.CancelledError:
            # Stopping mid-send: what was not recorded goes to the next owner, who
            # sends it again (TikTok's dedup absorbs a copy that did arrive).
            for item in outgoing:
                if item.key.state == "sending":
                    item.window.release(item.key)
            raise
        await self._commit(windows)
        return more

    async def _read(self, windows: dict[int, ShardWindow]) -> bool:
        """Read every owned log once and absorb what is new; returns whether a shard had
        more than one read takes."""
        found = await self.store.read({s: w.read_id for s, w in windows.items()}, LOG_READ_COUNT)
        failures = {s: r for s, r in found.items() if isinstance(r, Exception)}
        self._note_failing(failures, list(windows))
        entries = {s: r for s, r in found.items() if not isinstance(r, Exception) and r}
        if not entries:
            return False
        unknown = {s: windows[s].unknown(e) for s, e in entries.items()}
        remembered = await self.store.remembered(unknown)
        now_ms = int(self.clock() * 1000)
        absorbed: list[Absorbed] = []
        for shard, shard_entries in entries.items():
            absorbed += windows[shard].absorb(shard_entries, remembered, now_ms)
            await asyncio.sleep(0)  # requests waiting meanwhile go first: a shard at a time
        self._count_absorbed(absorbed)
        return any(len(e) >= LOG_READ_COUNT for e in entries.values())

    def _count_absorbed(self, absorbed: Sequence[Absorbed]) -> None:
        tally: collections.Counter[tuple[str, str]] = collections.Counter()
        debug = log.isEnabledFor(logging.DEBUG)
        for a in absorbed:
            tally[self._pixel_label(a.copy.pixel_code), a.outcome] += 1
            if debug:
                body = a.copy.body
                log.debug(
                    "%s %s event %s for pixel %s: %s",
                    a.copy.source, body.get("event"), body.get("event_id"),
                    a.copy.pixel_code, a.outcome,
                    extra={"pixel": a.copy.pixel_code, "event": body.get("event"),
                           "event_id": body.get("event_id"), "source": a.copy.source,
                           "outcome": a.outcome},
                )  # fmt: skip
        for (pixel, outcome), count in tally.items():
            if outcome in ("merged", "complete"):
                self.metrics.merged.labels(pixel).inc(count)
            elif outcome == "duplicate":
                self.metrics.duplicates.labels(pixel).inc(count)

    async def _commit(self, windows: dict[int, ShardWindow]) -> None:
        """Record every changed shard in one pipeline. A shard found to be another's is let
        go; so is one whose commit failed (unknown whether it was written): its next owner,
        perhaps us again after the lease, rebuilds from what Redis has."""
        now_ms = int(self.clock() * 1000)
        commits = [c for w in windows.values() if (c := w.take_commit(now_ms)) is not None]
        if not commits:
            return
        try:
            results = await asyncio.shield(self.store.commit(self.token, commits))
        except StoreUnavailable as exc:
            results = dict.fromkeys((c.shard for c in commits), exc)
        failed = {s: r for s, r in results.items() if isinstance(r, Exception)}
        if failed:
            log.warning(
                "could not record a batch's outcome in shard(s) %s; they start over from "
                "Redis after their lease: %s", _shard_list(sorted(failed)),
                next(iter(failed.values())),
            )  # fmt: skip
        for c in commits:
            letters = results.get(c.shard)
            if isinstance(letters, Exception):
                self.windows.pop(c.shard, None)
                self._next_balance = 0.0  # take it back (TAKE) as soon as Redis answers
            elif letters is None:
                if self.windows.pop(c.shard, None) is not None:
                    log.warning("shard %d is owned by another instance now; letting it go",
                                c.shard)  # fmt: skip
            else:
                for _member, letter in c.dead:
                    self.metrics.dead_lettered.labels(letter.reason).inc()
        if len(failed) == len(commits):
            raise next(iter(failed.values()))

    async def _send_limited(self, items: list[Outgoing]) -> None:
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
        pixel = self._pixel_label(items[0].pixel_code)
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
            self._dead_letter(items[0], "rejected", result.code, result.message, batch)
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
            self._dead_letter(item, reason, code, message, batch)

    def _dead_letter(
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

    def _pixel_label(self, pixel_code: str) -> str:
        return self.metrics.pixel_label(pixel_code, self.settings.pixels)


def _sending(window: ShardWindow) -> bool:
    return any(key.state == "sending" for key in window.pending.values())


def _shard_list(shards: Sequence[int]) -> str:
    """Shards for a log line: 1, 4, 7 (the first twenty, and how many more)."""
    listed = ", ".join(str(shard) for shard in shards[:20])
    return listed if len(shards) <= 20 else f"{listed} and {len(shards) - 20} more"


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
