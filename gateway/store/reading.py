"""What the store reads back: counts and backlog for the gauges, dead letters, and one
key's state and timeline for /debug and `inspect`. Reads only; no state changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson

from ..events import SOURCES
from .keys import HISTORY_READ_CHUNK, SOURCE_BITS, Keys
from .runner import Runner, text


@dataclass(frozen=True, slots=True)
class Backlog:
    """What waits in Redis, for the gauges."""

    pending: int  # events stored and not yet forwarded (open, claimed or waiting to retry)
    dead_letters: int
    lag: float  # seconds the oldest due event has waited to be claimed; 0 when none is overdue


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    shard: int
    member: str
    letter: dict[str, Any]


class Reader:
    """Reads of the store's keys (laid out by `keys`), through the runner's client."""

    def __init__(self, keys: Keys, runner: Runner, dedup_window_ms: int) -> None:
        self.keys = keys
        self.runner = runner
        self.dedup_window_ms = dedup_window_ms

    async def dead_letters(self, count: int = 1000) -> list[DeadLetter]:
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
                    DeadLetter(
                        id=text(entry_id),
                        shard=shard,
                        member=text(fields[b"member"]),
                        letter=orjson.loads(fields[b"letter"]),
                    )
                )
        return letters

    async def counts(self) -> tuple[int, int]:
        """(events waiting to be forwarded, dead letters), over all shards."""
        async with self.runner.guard():
            pipe = self.runner.client.pipeline(transaction=False)
            for shard in range(self.keys.shards):
                pipe.zcard(self.keys.due_key(shard))
                pipe.xlen(self.keys.dead_key(shard))
            replies = await pipe.execute()
        return sum(replies[0::2]), sum(replies[1::2])

    async def backlog(self, now: float) -> Backlog:
        """Pending events, dead letters and forward lag, over all shards; one round trip."""
        async with self.runner.guard():
            pipe = self.runner.client.pipeline(transaction=False)
            for shard in range(self.keys.shards):
                due = self.keys.due_key(shard)
                pipe.zcard(due)
                pipe.xlen(self.keys.dead_key(shard))
                # The lowest score is the next due time; a claimed event's score is its
                # lease's end, so only events no forwarder holds can be overdue.
                pipe.zrange(due, 0, 0, withscores=True)
            replies = await pipe.execute()
        firsts = [int(r[0][1]) for r in replies[2::3] if r]
        oldest = min(firsts, default=None)
        lag = 0.0 if oldest is None else max(0.0, now - oldest / 1000)
        return Backlog(sum(replies[0::3]), sum(replies[1::3]), lag)

    async def inspect(
        self, pixel_code: str, event_id: str, event_name: str
    ) -> dict[str, Any] | None:
        """A key's state and timeline, for /debug and `inspect`; None when unknown.

        The state comes from the key's own records (pending hash, or remembered
        fingerprint); the timeline from the shard's bounded history, so a key whose
        entries were pushed out by newer ones shows its state with a partial timeline."""
        member = self.keys.member_of(pixel_code, event_id, event_name)
        shard = self.keys.shard_of(member)
        hk, ck, _due = self.keys.keys_of(member)
        fp, bucket = self.keys.fingerprint(member)
        now_ms = int(time.time() * 1000)
        async with self.runner.guard():
            pipe = self.runner.client.pipeline(transaction=False)
            pipe.hgetall(hk)
            pipe.llen(ck)
            remembered = self.keys.remembered_key(shard, bucket)
            pipe.hget(remembered, fp)  # type: ignore[arg-type]  # binary field names are fine
            state, copies, until_s = await pipe.execute()
        names = {"pixel_code": pixel_code, "event_id": event_id, "event": event_name}
        until = None if until_s is None else int(until_s)
        if not state and (until is None or abs(until) * 1000 <= now_ms):
            return None
        timeline = await self._history_of(shard, member)
        whole = bool(timeline) and timeline[0].get("outcome") == "new"
        history = {"kept_entries": self.keys.history_budget, "from_first_copy": whole}
        if state:
            return {"key": names, **_pending_state(state, copies), "timeline": timeline,
                    "history": history}  # fmt: skip
        assert until is not None
        return {
            "key": names,
            **_remembered_state(timeline, abs(until) - self.dedup_window_ms / 1000, whole),
            "state": "sent" if until > 0 else "dead",
            "forgotten_in": abs(until) - now_ms / 1000,
            "timeline": timeline,
            "history": history,
        }

    async def _history_of(self, shard: int, member: str) -> list[dict[str, Any]]:
        """A member's entries in its shard's history, oldest first: read newest first, in
        chunks, back to the key's first copy or to the oldest entry kept. The history is
        capped, so the scan is bounded; an admin's question, not the hot path."""
        if not self.keys.keeps_history:
            return []
        wanted = member.encode()
        found: list[dict[str, Any]] = []
        upper = "+"
        async with self.runner.guard():
            while True:
                chunk = await self.runner.client.xrevrange(
                    self.keys.history_key(shard), upper, "-", count=HISTORY_READ_CHUNK
                )
                for _id, fields in chunk:
                    if fields.get(b"m") != wanted:
                        continue
                    found.append(orjson.loads(fields[b"e"]))
                    if found[-1].get("outcome") == "new":
                        return found[::-1]
                if len(chunk) < HISTORY_READ_CHUNK:
                    return found[::-1]
                upper = _id_before(text(chunk[-1][0]))

def _pending_state(state: dict[bytes, bytes], copies: int) -> dict[str, Any]:
    fields = {text(k): text(v) for k, v in state.items()}
    src = int(fields.get("src", "0"))
    return {
        "state": fields.get("st"),
        "sources": [s for s in SOURCES if src & SOURCE_BITS[s]],
        "first_seen": int(fields["t0"]) / 1000 if "t0" in fields else None,
        "due": int(fields["due"]) / 1000 if "due" in fields else None,
        "forwarded_at": None,
        "tiktok_request_id": None,
        "copies_received": int(fields.get("n", "0")),
        "copies_pending": copies,
        "attempts": int(fields.get("att", "0")),
        "duplicates_dropped": int(fields.get("dup", "0")),
        "forgotten_in": None,
    }


COPY_OUTCOMES = ("new", "merged", "complete")
ATTEMPT_OUTCOMES = ("forwarded", "retry", "dead_lettered")


def _remembered_state(
    timeline: list[dict[str, Any]], first_seen: float, whole: bool
) -> dict[str, Any]:
    """What is known of a key after it left: its fingerprint (`first_seen`, to the second),
    and what its history still holds (`whole`: back to its first copy)."""
    copies = [e for e in timeline if e.get("outcome") in COPY_OUTCOMES]
    forwards = [e for e in timeline if e.get("outcome") == "forwarded"]
    return {
        "sources": [s for s in SOURCES if any(e.get("source") == s for e in copies)],
        "first_seen": copies[0].get("at", first_seen) if whole else first_seen,
        "due": None,
        "forwarded_at": forwards[-1].get("at") if forwards else None,
        "tiktok_request_id": forwards[-1].get("request_id") if forwards else None,
        "copies_received": len(copies),
        "copies_pending": 0,
        "attempts": _attempts(timeline),
        "duplicates_dropped": sum(e.get("outcome") == "duplicate" for e in timeline),
    }


def _attempts(timeline: list[dict[str, Any]]) -> int:
    """Sends made: as the key's last outcome recorded them, else as the timeline shows."""
    final = [e for e in timeline if e.get("outcome") in ("forwarded", "dead_lettered")]
    if final and "attempts" in final[-1]:
        return int(final[-1]["attempts"])
    return sum(e.get("outcome") in ATTEMPT_OUTCOMES for e in timeline)


def _id_before(entry_id: str) -> str:
    """The stream entry id just before `entry_id` (XREVRANGE's bound is inclusive)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-{2**64 - 1}"
