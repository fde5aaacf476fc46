"""What the store reads back: counts and backlog for the gauges, dead letters, and one
key's state and timeline for /debug and `inspect`. Reads only; no state changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..events import SOURCES
from ..records import (
    CopyRecord,
    DeadLetter,
    DeadRecord,
    ForwardRecord,
    HistoryRecord,
    RetryState,
    history_from_json,
)
from .keys import HISTORY_READ_CHUNK, SOURCE_BITS, Keys
from .runner import Runner, text


@dataclass(frozen=True, slots=True)
class Backlog:
    """What waits in Redis, for the gauges."""

    pending: int  # events stored and not yet forwarded (open, claimed or waiting to retry)
    dead_letters: int
    lag: float  # seconds the oldest due event has waited to be claimed; 0 when none is overdue


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """A dead letter where its shard's stream keeps it."""

    id: str
    shard: int
    member: str
    letter: DeadLetter

    @property
    def ref(self) -> str:
        """`SHARD:ID`, what names one letter: stream ids repeat across shards (two letters
        written in the same millisecond to two shards' streams get the same id)."""
        return f"{self.shard}:{self.id}"


class Reader:
    """Reads of the store's keys (laid out by `keys`), through the runner's client."""

    def __init__(
        self, keys: Keys, runner: Runner, merge_window_ms: int, dedup_window_ms: int
    ) -> None:
        self.keys = keys
        self.runner = runner
        self.merge_window_ms = merge_window_ms
        self.dedup_window_ms = dedup_window_ms

    async def dead_letters(self, count: int = 1000) -> list[DeadLetterEntry]:
        """Dead letters of every shard, oldest first within a shard."""
        async with self.runner.guard():
            pipe = self.runner.client.pipeline(transaction=False)
            for shard in range(self.keys.shards):
                pipe.xrange(self.keys.dead_key(shard), count=count)
            replies = await pipe.execute()
        letters = []
        for shard, entries in enumerate(replies):
            for entry_id, fields in entries:
                letters.append(
                    DeadLetterEntry(
                        id=text(entry_id),
                        shard=shard,
                        member=text(fields[b"member"]),
                        letter=DeadLetter.from_json(fields[b"letter"]),
                    )
                )
        return letters

    async def backlog(self, now: float) -> Backlog:
        """Pending events, dead letters and forward lag, over all shards; one round trip.

        Each shard's owner writes how many keys its window holds and when the first is
        due; keys waiting for a retry are in the retry hash; copies not yet read by an
        owner count as at least one pending key, due at the latest a merge window after
        they arrived. A shard whose owner died keeps its last figures, and its lag grows
        until another instance takes it over; so does a shard no instance owns."""
        async with self.runner.guard():
            pipe = self.runner.client.pipeline(transaction=False)
            for shard in range(self.keys.shards):
                pipe.hmget(self.keys.meta_key(shard), ["pending", "due", "seen"])
                pipe.hlen(self.keys.retry_key(shard))
                pipe.xlen(self.keys.log_key(shard))
                pipe.xrange(self.keys.log_key(shard), count=1)
                pipe.xlen(self.keys.dead_key(shard))
            replies = await pipe.execute()
        pending = dead = 0
        dues: list[int] = []
        for i in range(0, len(replies), 5):
            (open_keys, due, seen), retrying, logged, oldest, letters = replies[i : i + 5]
            in_window = int(open_keys or 0)
            pending += retrying + max(in_window, 1 if logged else 0)
            dead += letters
            if due and int(due) > 0 and (in_window or retrying):
                dues.append(int(due))
            if oldest and _entry_order(oldest[0][0]) > _entry_order(seen or b"0-0"):
                # The oldest copy in the log is one no owner has read yet.
                dues.append(_entry_order(oldest[0][0])[0] + self.merge_window_ms)
        lag = 0.0 if not dues else max(0.0, now - min(dues) / 1000)
        return Backlog(pending, dead, lag)

    async def inspect(
        self, pixel_code: str, event_id: str, event_name: str
    ) -> dict[str, Any] | None:
        """A key's state and timeline, for /debug and `inspect`; None when unknown.

        The state comes from the key's own records (a retry state, or its remembered
        fingerprint) and, while it is open in its owner's window (from the owner's first
        read of it, or of its replay, to its forward), from the history; the timeline
        from the shard's bounded history, so a key whose records were pushed out by newer
        ones shows its state with a partial timeline (and an open one none at all)."""
        member = self.keys.member_of(pixel_code, event_id, event_name)
        shard = self.keys.shard_of(member)
        fp, bucket = self.keys.fingerprint(member)
        now_ms = int(time.time() * 1000)
        async with self.runner.guard():
            pipe = self.runner.client.pipeline(transaction=False)
            pipe.hget(self.keys.retry_key(shard), member)
            remembered = self.keys.remembered_key(shard, bucket)
            pipe.hget(remembered, fp)  # type: ignore[arg-type]  # binary field names are fine
            retry, until_s = await pipe.execute()
        names = {"pixel_code": pixel_code, "event_id": event_id, "event": event_name}
        until = None if until_s is None else int(until_s)
        if until is not None and abs(until) * 1000 <= now_ms:
            until = None
        timeline = await self._history_of(shard, member)
        whole = bool(timeline) and timeline[0].outcome == "new"
        history = {"kept_entries": self.keys.history_budget, "from_first_copy": whole}
        if retry is not None:
            state = _retry_state(RetryState.from_json(retry), timeline)
        elif _is_open(timeline):
            # Before the remembered fingerprint: a replayed dead letter is open again.
            state = _open_state(timeline, whole)
        elif until is not None:
            state = {
                **_remembered_state(timeline, abs(until) - self.dedup_window_ms / 1000, whole),
                "state": "sent" if until > 0 else "dead",
                "forgotten_in": abs(until) - now_ms / 1000,
            }
        else:
            return None
        shown = [record.view() for record in timeline]
        return {"key": names, **state, "timeline": shown, "history": history}

    async def _history_of(self, shard: int, member: str) -> list[HistoryRecord]:
        """A member's records in its shard's history, oldest first: read newest first, in
        chunks, back to the key's first copy or to the oldest record kept. The history is
        capped, so the scan is bounded; an admin's question, not the hot path."""
        if not self.keys.keeps_history:
            return []
        found: list[HistoryRecord] = []
        key = self.keys.history_key(shard)
        async with self.runner.guard():
            for start in range(0, self.keys.history_cap, HISTORY_READ_CHUNK):
                stop = min(start + HISTORY_READ_CHUNK, self.keys.history_cap) - 1
                chunk = await self.runner.client.lrange(key, start, stop)  # type: ignore[misc]
                for raw in chunk:
                    record = history_from_json(raw)
                    if record.member != member:
                        continue
                    found.append(record)
                    if record.outcome == "new":
                        return found[::-1]
                if len(chunk) <= stop - start:
                    break
        return found[::-1]


COPY_OUTCOMES = ("new", "merged", "complete", "replayed")  # a copy into the window
RECEIVED_OUTCOMES = ("new", "merged", "complete")  # a copy a client sent and that counted


def _retry_state(state: RetryState, timeline: list[HistoryRecord]) -> dict[str, Any]:
    """A key waiting for its next attempt, from its retry state and, for what happened
    before a replay, its timeline."""
    received = _received(timeline)
    return {
        "state": "retry",
        "sources": _sources(received, state.sources),
        "first_seen": state.first_seen_ms / 1000,
        "due": state.due_ms / 1000,
        "forwarded_at": None,
        "tiktok_request_id": None,
        "copies_received": max(state.copies_received, len(received)),
        "copies_pending": len(state.copies),
        "attempts": max(state.attempts, _attempts(timeline)),
        "duplicates_dropped": max(state.duplicates, _duplicates(timeline)),
        "forgotten_in": None,
    }


def _is_open(timeline: list[HistoryRecord]) -> bool:
    """Whether the key's latest record, duplicates aside, is a copy: it is in its owner's
    window (merging, or being sent) and not yet resolved."""
    latest = next((e for e in reversed(timeline) if e.outcome != "duplicate"), None)
    return latest is not None and latest.outcome in COPY_OUTCOMES


def _open_state(timeline: list[HistoryRecord], whole: bool) -> dict[str, Any]:
    """A key open in its owner's window, as its history tells it: the copies since its
    first copy or its replay are pending, due as the latest of them recorded."""
    starts = [i for i, e in enumerate(timeline) if e.outcome in ("new", "replayed")]
    waiting = timeline[starts[-1] if starts else 0 :]
    received = _received(timeline)
    dues = (e.due for e in reversed(waiting) if isinstance(e, CopyRecord) and e.due is not None)
    return {
        "state": "open",
        "sources": _sources(received),
        "first_seen": received[0].at if whole else None,
        "due": next(dues, None),
        "forwarded_at": None,
        "tiktok_request_id": None,
        "copies_received": len(received),
        "copies_pending": sum(e.outcome in COPY_OUTCOMES for e in waiting),
        "attempts": _attempts(timeline),
        "duplicates_dropped": _duplicates(timeline),
        "forgotten_in": None,
    }


def _remembered_state(
    timeline: list[HistoryRecord], first_seen: float, whole: bool
) -> dict[str, Any]:
    """What is known of a key after it left: its fingerprint (`first_seen`, to the second),
    and what its history still holds (`whole`: back to its first copy)."""
    received = _received(timeline)
    forwards = [e for e in timeline if isinstance(e, ForwardRecord)]
    return {
        "sources": _sources(received),
        "first_seen": received[0].at if whole else first_seen,
        "due": None,
        "forwarded_at": forwards[-1].at if forwards else None,
        "tiktok_request_id": forwards[-1].request_id if forwards else None,
        "copies_received": len(received),
        "copies_pending": 0,
        "attempts": _attempts(timeline),
        "duplicates_dropped": _duplicates(timeline),
    }


def _received(timeline: list[HistoryRecord]) -> list[CopyRecord]:
    return [
        e for e in timeline if isinstance(e, CopyRecord) and e.outcome in RECEIVED_OUTCOMES
    ]


def _sources(received: list[CopyRecord], bits: int = 0) -> list[str]:
    """The sources of the copies received (or named by `bits`, of SOURCE_BITS)."""
    seen = {e.source for e in received}
    return [s for s in SOURCES if s in seen or bits & SOURCE_BITS[s]]


def _duplicates(timeline: list[HistoryRecord]) -> int:
    return sum(e.outcome == "duplicate" for e in timeline)


def _attempts(timeline: list[HistoryRecord]) -> int:
    """Sends made, over the key's dead letters and replays: each forward or dead letter
    records the sends that led to it (earlier retries may have been pushed out); failed
    sends since the last of them count one each."""
    attempts = since_final = 0
    for e in timeline:
        if e.outcome == "retry":
            since_final += 1
        elif isinstance(e, ForwardRecord | DeadRecord):
            attempts += e.attempts
            since_final = 0
    return attempts + since_final


def _entry_order(entry_id: bytes | str) -> tuple[int, int]:
    """A stream entry id as a sortable pair."""
    ms, _, seq = text(entry_id).partition("-")
    return int(ms), int(seq or 0)
