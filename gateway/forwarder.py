"""The forwarding loop: owns shards, merges their copies, sends due events, commits.

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
import time
from collections.abc import Callable, Sequence

from .console.tally import Tally
from .errors import StoreUnavailable
from .metrics import Metrics
from .sending import BatchSender, Outgoing, build_outgoing
from .settings import Settings
from .shards import Shards, shard_list
from .store import Store
from .upstream import EventSender
from .window import Absorbed, ShardWindow

log = logging.getLogger("gateway.forwarder")
WAKE_LINGER = 0.1  # seconds a wake waits for more copies before reading
LOG_READ_COUNT = 200  # log entries a round reads a shard


class Forwarder:
    """The background loop that owns shards (`Shards`) and moves their due events to
    TikTok (`BatchSender`)."""

    def __init__(
        self,
        store: Store,
        senders: Callable[[str], tuple[EventSender, str] | None],
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.shards = Shards(store, settings, metrics, clock)
        self.tally = Tally(store, clock)  # what the console shows, written once a second
        self.sender = BatchSender(senders, settings, metrics, clock, self.tally)
        self._wake = asyncio.Event()
        self._stopping = False

    @property
    def windows(self) -> dict[int, ShardWindow]:
        """The owned shards' windows."""
        return self.shards.windows

    @property
    def failing(self) -> dict[int, float]:
        return self.shards.failing

    @property
    def token(self) -> str:
        return self.shards.token

    async def balance(self) -> None:
        """Own a fair share of the shards (see Shards.balance)."""
        await self.shards.balance()

    def wake(self) -> None:
        """Read the logs now rather than at the next poll (copies were just appended)."""
        self._wake.set()

    async def run(self) -> None:
        """Forward until stopped; Redis outages are waited out, never fatal."""
        renewing = asyncio.create_task(self.shards.keep_leases(), name="shard-leases")
        failures = 0
        try:
            while not self._stopping:
                try:
                    await self.balance()
                    busy = await self.forward_once()
                    await self.tally.write_if_due()
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
                self.shards.report_failing()
                if not busy and not self._stopping:
                    await self._idle(self._idle_seconds(failures))
        finally:
            renewing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewing
            await asyncio.shield(self._stop_writes())

    async def _stop_writes(self) -> None:
        with contextlib.suppress(StoreUnavailable):
            await self.tally.write()
        await self.shards.let_go_all()

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
        # After the read, which may have waited for a node that is away: a window let go
        # meanwhile (its renewal refused) or whose lease may have run out sends nothing.
        for shard in self.shards.lapsed(now):
            self.shards.drop(shard, "may have lost its lease (renewals failed)")
            self.shards.next_balance = 0.0  # take it again, rebuilt from Redis
        windows = {s: w for s, w in windows.items() if self.windows.get(s) is w}
        outgoing: list[Outgoing] = []
        limit = self.settings.forward_batch_size
        more = full
        for shard, window in windows.items():
            if shard in self.shards.failing:
                # Its node did not answer the read: a send now could not be committed, and
                # the key would go again from whoever commits next. It waits for the node.
                continue
            taken = window.take_due(int(now * 1000), limit)
            more = more or len(taken) == limit
            for key in taken:
                outgoing.append(build_outgoing(window, key, self.settings.test_event_code))
        batches: dict[tuple[str, str, str | None], list[Outgoing]] = {}
        for item in outgoing:
            if now - item.body.get("event_time", now) > self.settings.max_event_age:
                self.sender.dead_letter(item, "too_old", None, "older than GATEWAY_MAX_EVENT_AGE")
                continue
            batches.setdefault(item.batch_key, []).append(item)
        size = self.settings.forward_batch_size
        chunks = [
            items[i : i + size] for items in batches.values() for i in range(0, len(items), size)
        ]
        try:
            await asyncio.gather(*(self.sender.send(chunk) for chunk in chunks))
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
        self.shards.note_failing(failures, list(windows))
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
            tally[self.sender.pixel_label(a.copy.pixel_code), a.outcome] += 1
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
        self.tally.copies(absorbed)
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
            results = await asyncio.shield(self.store.commit(self.shards.token, commits))
        except StoreUnavailable as exc:
            results = dict.fromkeys((c.shard for c in commits), exc)
        failed = {s: r for s, r in results.items() if isinstance(r, Exception)}
        if failed:
            log.warning(
                "could not record a batch's outcome in shard(s) %s; they start over from "
                "Redis after their lease: %s", shard_list(sorted(failed)),
                next(iter(failed.values())),
            )  # fmt: skip
        for c in commits:
            letters = results.get(c.shard)
            if isinstance(letters, Exception):
                self.shards.drop(c.shard)
                self.shards.next_balance = 0.0  # take it back (TAKE) once Redis answers
            elif letters is None:
                self.shards.drop(c.shard, "is owned by another instance now")
            else:
                for _member, letter in c.dead:
                    self.metrics.dead_lettered.labels(letter.reason).inc()
        if len(failed) == len(commits):
            raise next(iter(failed.values()))
