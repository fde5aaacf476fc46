"""The gateway's state changes in Redis: ingest, claim, ack, release, dead letters,
replay, sweep, rate limit and the layout check; each one atomic script call.

States of a pending key: open (merging) -> claimed (being sent) -> gone and
remembered, or retry (a send failed; waits for its next attempt). Only an
open key takes new copies; a copy of a key in any other state, or of a
remembered key, is a duplicate. Key shapes are in keys.py, the scripts in
scripts.py, how they reach Redis in runner.py, the reads in reading.py.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from ..errors import LayoutMismatch, StoreUnavailable
from ..events import SOURCES, Event, Source
from .keys import DEBUG_HISTORY, LAYOUT_KEY, SOURCE_BITS, Keys
from .reading import Backlog, DeadLetter, Reader
from .runner import BatchItem, RedisClient, Runner, log, text

IngestStatus = Literal["new", "merged", "complete", "duplicate"]


@dataclass(frozen=True, slots=True)
class IngestResult:
    status: IngestStatus
    first_seen: float


@dataclass(frozen=True, slots=True)
class Claim:
    """One due event claimed for sending, with every copy received for it."""

    member: str
    shard: int
    token: str
    first_seen: float
    sources: frozenset[Source]
    attempts: int
    dedup: bool
    copies: list[dict[str, Any]]


class Store(Keys):
    """The gateway's state in Redis; every change is one atomic script call. A Store is its
    key layout (keys.Keys); it runs scripts through a Runner and reads through a Reader."""

    def __init__(
        self,
        client: RedisClient,
        *,
        shards: int = 16,
        merge_window: float = 300.0,
        dedup_window: float = 172_800.0,
        early_flush: bool = True,
        legacy_aliases: bool = True,
        history: int = DEBUG_HISTORY,
        dedup_buckets: int = 1024,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        super().__init__(
            shards=shards, dedup_buckets=dedup_buckets, legacy_aliases=legacy_aliases,
            history=history,
        )  # fmt: skip
        self.client = client
        self.runner = Runner(client, wait_replicas=wait_replicas, wait_timeout=wait_timeout)
        self.reader = Reader(self, self.runner, int(dedup_window * 1000))
        self.merge_window_ms = int(merge_window * 1000)
        self.dedup_window_ms = int(dedup_window * 1000)
        self.early_flush = early_flush
        self._claim_warned_at = -math.inf
        self.unclaimable: dict[int, float] = {}
        """Shards whose last claim failed -> when (Unix seconds) their claims began failing."""
        self._layout_checked = False

    # -- state changes -------------------------------------------------------

    async def ingest(
        self, events: Sequence[Event], now: float, history: Sequence[bytes] | None = None
    ) -> list[IngestResult]:
        """Store copies atomically, each merged, opened or dropped; one round trip and
        one script call, shared with the requests ingesting at the same time. `history`:
        each copy's history entry (a JSON object; the script adds its outcome)."""
        now_ms = int(now * 1000)
        common = (self.merge_window_ms, 1 if self.early_flush else 0, self.dedup_window_ms,
                  self.history_cap)  # fmt: skip
        items = []
        for i, event in enumerate(events):
            member = self.member(event)
            prefix = self.prefix(self.shard_of(member))
            copy = orjson.dumps(
                {
                    "source": event.source,
                    "pixel_code": event.pixel_code,
                    "event_source": event.event_source,
                    "test_event_code": event.test_event_code,
                    "received_ms": now_ms,
                    "body": event.body,
                }
            )
            # Events without event_id have a key of their own: nothing to remember, and
            # nothing to look up, so no history either.
            entry = b""
            if history is not None and self.keeps_history and event.event_id:
                entry = history[i]
            fp, bucket = self.fingerprint(member) if event.event_id else (b"", 0)
            args = (
                prefix,
                member,
                now_ms,
                SOURCE_BITS[event.source],
                copy,
                entry,
                0 if event.event_id else 1,
                fp,
                bucket,
            )
            items.append(BatchItem("ingest", f"{prefix}due", common, args))
        replies = await self.runner.shared(items)
        return [
            IngestResult(status=text(r[0]), first_seen=int(r[1]) / 1000)  # type: ignore[arg-type]
            for r in replies
        ]

    async def claim(self, now: float, limit: int, lease: float) -> list[Claim]:
        """Claim up to `limit` due events per shard, each for `lease` seconds."""
        token = uuid.uuid4().hex
        common = (int(now * 1000), int(lease * 1000), limit, token)
        items = [
            BatchItem("claim", self.due_key(shard), common, (self.prefix(shard),))
            for shard in range(self.shards)
        ]
        # Partial: on a cluster with one primary away, the others' shards still forward.
        try:
            replies = await self.runner.run_batched(items, partial=True)
        except StoreUnavailable as exc:
            # Every shard: Redis is away, which the forwarder says itself.
            self._note_unclaimable({shard: exc for shard in range(self.shards)}, now, say=False)
            raise
        self._note_unclaimable(
            {shard: r for shard, r in enumerate(replies) if isinstance(r, Exception)}, now
        )
        claims = []
        for shard, entries in enumerate(replies):
            if isinstance(entries, Exception):
                continue
            for entry in entries:
                member, t0, src, attempts, nodedup = (text(x) for x in entry[:5])
                claims.append(
                    Claim(
                        member=member,
                        shard=shard,
                        token=token,
                        first_seen=int(t0) / 1000,
                        sources=frozenset(s for s in SOURCES if int(src) & SOURCE_BITS[s]),
                        attempts=int(attempts),
                        dedup=nodedup != "1",
                        copies=[orjson.loads(c) for c in entry[5:]],
                    )
                )
        return claims

    def _note_unclaimable(
        self, failures: dict[int, Exception], now: float, *, say: bool = True
    ) -> None:
        """Keep `unclaimable` up to date and say which shards cannot be claimed, and since
        when: when that changes, and once a minute while it lasts. A failing shard is
        tried again at every claim, never given up on."""
        recovered = sorted(set(self.unclaimable) - set(failures))
        if recovered:
            since = min(self.unclaimable[shard] for shard in recovered)
            log.warning(
                "claiming shard(s) %s again, after %.1f s", _shard_list(recovered), now - since
            )
        for shard in recovered:
            del self.unclaimable[shard]
        fresh = sorted(set(failures) - set(self.unclaimable))
        for shard in fresh:
            self.unclaimable[shard] = now
        # Said at most once a minute unless the set grows: the forwarder claims several
        # times a second.
        if say and failures and (fresh or time.monotonic() - self._claim_warned_at > 60.0):
            self._claim_warned_at = time.monotonic()
            failing = sorted(self.unclaimable)
            log.warning(
                "cannot claim %d of %d shards (%s) since %.1f s (%s); claiming the others",
                len(failing),
                self.shards,
                _shard_list(failing),
                now - min(self.unclaimable.values()),
                failures[failing[0]],
            )

    async def ack(
        self, claims: Sequence[Claim], now: float, request_id: str = "", history: bytes = b""
    ) -> int:
        """Forwarded: forget the claims' state, remember their keys; returns how many
        were still ours. The history entry defaults to the time and TikTok's request id."""
        line = b""
        if self.keeps_history:
            entry = orjson.loads(history or b'{"outcome": "forwarded"}')
            entry.setdefault("at", round(now, 3))
            if request_id:
                entry.setdefault("request_id", request_id)
            line = orjson.dumps(entry)
        items = []
        for claim in claims:
            prefix = self.prefix(claim.shard)
            common = (int(now * 1000), self.dedup_window_ms, claim.token, line, self.history_cap)
            args = (prefix, claim.member, *self.fingerprint(claim.member))
            items.append(BatchItem("ack", f"{prefix}due", common, args))
        return sum(int(r) for r in await self.runner.run_batched(items))

    async def release(
        self, claims: Sequence[Claim], retry_at: float, history: bytes = b""
    ) -> int:
        """Give claims back to the queue, due again at `retry_at`."""
        line = history if self.keeps_history else b""
        items = []
        for claim in claims:
            prefix = self.prefix(claim.shard)
            common = (claim.token, int(retry_at * 1000), line, self.history_cap)
            items.append(BatchItem("release", f"{prefix}due", common, (prefix, claim.member)))
        return sum(int(r) for r in await self.runner.run_batched(items))

    async def dead_letter(
        self, claim: Claim, letter: dict[str, Any], now: float, history: bytes = b""
    ) -> str | None:
        """Move a claimed event to the dead-letter stream; None when the claim was lost."""
        hk, _ck, due = self.keys_of(claim.member)
        fp, bucket = self.fingerprint(claim.member)
        args = (
            int(now * 1000),
            claim.token,
            self.dedup_window_ms,
            claim.member,
            orjson.dumps(letter),
            history if self.keeps_history else b"",
            self.prefix(claim.shard),
            fp,
            bucket,
            self.history_cap,
        )
        [reply] = await self.runner.run(
            [("dead_letter", (due, self.dead_key(claim.shard), hk), args)]
        )
        return None if reply is None else text(reply)

    async def replay(self, letters: Sequence[DeadLetter], now: float) -> int:
        """Queue dead letters for sending again; returns how many were queued."""
        calls = []
        for dl in letters:
            hk, ck, due = self.keys_of(dl.member)
            copy = orjson.dumps(
                {
                    "source": "replay",
                    "pixel_code": dl.letter["pixel_code"],
                    "event_source": dl.letter["event_source"],
                    "test_event_code": dl.letter.get("test_event_code"),
                    "received_ms": int(now * 1000),
                    "body": dl.letter["event"],
                }
            )
            args = (
                dl.id,
                int(now * 1000),
                dl.member,
                copy,
                int(dl.letter["first_seen"] * 1000),
                0 if dl.letter.get("dedup", True) else 1,
                orjson.dumps({"outcome": "replayed", "at": round(now, 3), "dead_letter": dl.id})
                if self.keeps_history
                else b"",
                self.history_cap,
            )
            keys = (due, self.dead_key(dl.shard), hk, ck, self.history_key(dl.shard))
            calls.append(("replay", keys, args))
        return sum(int(r) for r in await self.runner.run(calls))

    async def sweep(self, now: float, shard: int, buckets: range) -> int:
        """Remove forgotten fingerprints from some buckets of a shard; returns how many."""
        calls = [
            ("sweep", (self.remembered_key(shard, bucket),), (int(now),)) for bucket in buckets
        ]
        return sum(int(r) for r in await self.runner.run(calls))

    async def rate_limit(self, client: str, now: float, rate: float, burst: int) -> float:
        """Count a request of `client` against `rate` a second with bursts of `burst`, shared
        by every instance; 0.0 when it may go ahead, else the seconds to wait. One round trip."""
        key = self.rate_counter_key(client)
        item = BatchItem("rate_limit", key, (1000.0 / rate, burst), (key, int(now * 1000)))
        [wait_ms] = await self.runner.shared([item])
        return int(wait_ms) / 1000

    async def check_layout(self, *, record: bool = True) -> None:
        """Compare our layout with the one recorded in Redis, LayoutMismatch if they differ;
        with `record`, ours is recorded when none is (a gateway's; an admin command only
        compares: run with the wrong settings, it must not decide for the gateways).

        Instances that disagree on shards or buckets each miss the keys of the others:
        copies of one event go unmerged, duplicates undropped, pending events unsent."""
        if self._layout_checked:
            return
        async with self.runner.guard():
            if record:
                await self.runner.client.set(LAYOUT_KEY, self.layout, nx=True)
            recorded = await self.runner.client.get(LAYOUT_KEY)
        if recorded is None:
            return
        if text(recorded) != self.layout:
            raise LayoutMismatch(text(recorded), self.layout)
        self._layout_checked = True

    async def ping(self) -> None:
        async with self.runner.guard():
            await self.runner.client.ping()  # type: ignore[misc]

    async def load_scripts(self) -> None:
        """Load every script; /readyz calls this so a flushed cache heals itself."""
        await self.runner.load_scripts()

    # -- reading (see reading.py) ------------------------------------------------

    async def dead_letters(self, count: int = 1000) -> list[DeadLetter]:
        """Dead letters of every shard, oldest first within a shard."""
        return await self.reader.dead_letters(count)

    async def counts(self) -> tuple[int, int]:
        """(events waiting to be forwarded, dead letters), over all shards."""
        return await self.reader.counts()

    async def backlog(self, now: float) -> Backlog:
        """Pending events, dead letters and forward lag, over all shards; one round trip."""
        return await self.reader.backlog(now)

    async def inspect(
        self, pixel_code: str, event_id: str, event_name: str
    ) -> dict[str, Any] | None:
        """A key's state and timeline, for /debug and `inspect`; None when unknown."""
        return await self.reader.inspect(pixel_code, event_id, event_name)


def _shard_list(shards: Sequence[int]) -> str:
    """Shards for a log line: 1, 4, 7 (the first twenty, and how many more)."""
    listed = ", ".join(str(shard) for shard in shards[:20])
    return listed if len(shards) <= 20 else f"{listed} and {len(shards) - 20} more"
