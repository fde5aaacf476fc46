"""One shard's merge window, held in memory by the shard's owner: where copies meet.

The owner reads its shard's log in order and hands each copy to `ShardWindow.absorb`,
which decides what the copy is: the first of its key (`new`), another copy of an open
key (`merged`, or `complete` when both sources are now in and early flush is on), or a
`duplicate` (of a key being sent, waiting for a retry, or remembered in Redis). Keys
fall due at the end of their merge window; `take_due` hands them to the forwarder,
and `delivered`, `retry` and `dead` record what TikTok made of them.

Nothing here talks to Redis. What must reach it is gathered in a `Commit`: the
fingerprints to remember, the retry states, the dead letters, the history records,
and how far the log may be trimmed. The log holds every copy of a key until the
commit that resolves the key; a new owner rebuilds the window from it.
"""

from __future__ import annotations

import collections
import heapq
from dataclasses import dataclass, field
from typing import Literal

from . import history
from .events import SOURCES, Source
from .records import Copy, CopyOutcome, CopyRecord, DeadLetter, HistoryRecord, RetryState
from .store.keys import BOTH_SOURCES, SOURCE_BITS, Keys
from .store.state import Commit, LogEntry, until_second

Outcome = CopyOutcome
KeyState = Literal["open", "sending", "retry"]
HISTORY_FIELDS_MAX = 64  # field names a history record lists; the rest are counted
HISTORY_NAME_MAX = 64  # characters of a field name a history record keeps
# Copies read but not yet resolving anything (their history records, how far the log was
# read) wait this long for a commit that resolves a key, so a shard costs Redis one commit
# a batch sent rather than one a read.
COMMIT_LINGER_MS = 250
# A key without event_id, or past its dedup window, is remembered this long after it
# leaves, only so that a new owner reading copies not yet trimmed does not send it again.
RESEND_GUARD_MS = 600_000


@dataclass(slots=True)
class PendingKey:
    """A key in the window: open (merging), sending, or waiting for a retry."""

    member: str
    first_seen_ms: int
    due_ms: int
    sources: int  # bits of SOURCE_BITS
    copies: list[Copy]
    dedup: bool
    state: KeyState = "open"
    attempts: int = 0
    copies_received: int = 1
    duplicates: int = 0
    in_retry_hash: bool = False  # written to the retry hash: its resolution deletes it there

    @property
    def source_set(self) -> frozenset[Source]:
        return frozenset(s for s in SOURCES if self.sources & SOURCE_BITS[s])

    def retry_state(self) -> RetryState:
        """The key as the retry hash keeps it."""
        return RetryState(
            first_seen_ms=self.first_seen_ms, due_ms=self.due_ms, sources=self.sources,
            attempts=self.attempts, dedup=self.dedup, copies_received=self.copies_received,
            duplicates=self.duplicates, copies=tuple(self.copies),
        )  # fmt: skip

    @classmethod
    def from_retry(cls, member: str, state: RetryState) -> PendingKey:
        return cls(
            member=member, first_seen_ms=state.first_seen_ms, due_ms=state.due_ms,
            sources=state.sources, copies=list(state.copies), dedup=state.dedup, state="retry",
            attempts=state.attempts, copies_received=state.copies_received,
            duplicates=state.duplicates, in_retry_hash=True,
        )  # fmt: skip


@dataclass(slots=True)
class Absorbed:
    """What the window made of one copy, for the counters and the log lines."""

    member: str
    copy: Copy
    outcome: Outcome


@dataclass(slots=True)
class ShardWindow:
    """The pending keys of one shard, the log position read, and what is yet to commit."""

    shard: int
    keys: Keys
    merge_window_ms: int
    dedup_window_ms: int
    early_flush: bool
    history: bool
    read_id: str = "0-0"  # the last log entry absorbed
    counted_id: str = "0-0"  # entries up to here were counted by a previous owner
    pending: dict[str, PendingKey] = field(default_factory=dict)
    # Keys whose copies are only in the log, by their first copy's entry id, oldest first:
    # the log can be trimmed up to the first of them.
    pins: collections.OrderedDict[str, str] = field(default_factory=collections.OrderedDict)
    _due: list[tuple[int, str]] = field(default_factory=list)  # heap; stale items skipped
    _retrying: int = 0  # pending keys in state "retry" (the rest are open or being sent)
    _commit: Commit | None = None
    _committed_ms: int = 0  # when the last commit was taken

    def __post_init__(self) -> None:
        self._commit = Commit(self.shard)

    # -- copies in ----------------------------------------------------------------

    def load_retries(self, retries: dict[str, RetryState]) -> None:
        """Keys a previous owner left waiting for a retry."""
        for member, state in retries.items():
            key = PendingKey.from_retry(member, state)
            self.pending[member] = key
            self._retrying += 1
            heapq.heappush(self._due, (key.due_ms, member))

    def unknown(self, entries: list[LogEntry]) -> list[str]:
        """Members of these entries not in the window: their fingerprints must be looked up."""
        return list(
            {m: None for e in entries for m, _c in e.copies if m not in self.pending}
        )

    def absorb(
        self, entries: list[LogEntry], remembered: dict[str, int], now_ms: int
    ) -> list[Absorbed]:
        """Take log entries in order; `remembered`: the fingerprints found for the members
        `unknown` named. Returns what each copy counted as; copies a previous owner
        already counted are taken silently (they rebuild its window) and not returned."""
        out: list[Absorbed] = []
        for entry in entries:
            counted = _id(entry.id) <= _id(self.counted_id)
            for member, raw in entry.copies:
                copy = Copy.from_json(raw)
                outcome = self._absorb(entry.id, member, copy, remembered, now_ms)
                if counted:
                    continue
                out.append(Absorbed(member, copy, outcome))
                if self.history:
                    self._record_copy(member, copy, outcome)
            self.read_id = entry.id
        return out

    def _absorb(
        self,
        entry_id: str,
        member: str,
        copy: Copy,
        remembered: dict[str, int],
        now_ms: int,
    ) -> Outcome:
        key = self.pending.get(member)
        source = copy.source
        # A replayed dead letter: sent again whatever is remembered. One the previous design
        # replayed (imported by IMPORT_LEGACY) has no dead letter id nor first copy time.
        if source == "replay":
            if key is not None:
                return "duplicate"
            first_ms = copy.received_ms if copy.first_ms is None else copy.first_ms
            self._open(entry_id, member, copy, first_ms, now_ms, sources=0)
            return "replayed"
        if key is not None:
            if key.state != "open":
                key.duplicates += 1
                return "duplicate"
            key.copies.append(copy)
            key.copies_received += 1
            key.sources |= SOURCE_BITS.get(source, 0)
            if key.sources == BOTH_SOURCES and self.early_flush and key.due_ms > now_ms:
                self._set_due(key, now_ms)
                return "complete"
            return "merged"
        until = remembered.get(member)
        if until is not None and abs(until) * 1000 > now_ms:
            return "duplicate"
        first = copy.received_ms
        due = first + self.merge_window_ms if copy.dedup else first
        self._open(entry_id, member, copy, first, due, SOURCE_BITS.get(source, 0))
        return "new"

    def _open(
        self, entry_id: str, member: str, copy: Copy, first_ms: int, due_ms: int, sources: int
    ) -> None:
        key = PendingKey(member, first_ms, due_ms, sources, [copy], dedup=copy.dedup)
        self.pending[member] = key
        self.pins[member] = entry_id
        heapq.heappush(self._due, (due_ms, member))

    def _set_due(self, key: PendingKey, due_ms: int) -> None:
        key.due_ms = due_ms
        heapq.heappush(self._due, (due_ms, key.member))

    # -- keys out -----------------------------------------------------------------

    def next_due(self) -> int | None:
        """When the next key falls due (ms), None when none waits."""
        while self._due:
            due, member = self._due[0]
            key = self.pending.get(member)
            if key is not None and key.state != "sending" and key.due_ms == due:
                return due
            heapq.heappop(self._due)
        return None

    def take_due(self, now_ms: int, limit: int) -> list[PendingKey]:
        """Up to `limit` keys due by now, marked as being sent (later copies are duplicates)."""
        taken: list[PendingKey] = []
        while len(taken) < limit:
            due = self.next_due()
            if due is None or due > now_ms:
                break
            _due, member = heapq.heappop(self._due)
            key = self.pending[member]
            self._retrying -= key.state == "retry"
            key.state = "sending"
            key.attempts += 1
            taken.append(key)
        return taken

    def delivered(self, key: PendingKey, now_ms: int, record: HistoryRecord | None) -> None:
        """TikTok has it: remember the key for its dedup window."""
        self._resolve(key, now_ms, sign=1, record=record)

    def dead(
        self, key: PendingKey, letter: DeadLetter, now_ms: int, record: HistoryRecord | None
    ) -> None:
        """Dead-lettered: remembered as dead, so later copies stay dropped until a replay."""
        assert self._commit is not None
        self._commit.dead.append((key.member, letter))
        self._resolve(key, now_ms, sign=-1, record=record)

    def retry(self, key: PendingKey, due_ms: int, record: HistoryRecord | None) -> None:
        """A send failed: the key waits in the retry hash, out of the log."""
        assert self._commit is not None
        key.state = "retry"
        key.in_retry_hash = True
        self._retrying += 1
        self._set_due(key, due_ms)
        self.pins.pop(key.member, None)
        self._commit.retry_set.append((key.member, key.retry_state()))
        self._note(record)

    def release(self, key: PendingKey) -> None:
        """Not sent after all (stopping): due again as it was."""
        key.state = "open" if key.member in self.pins else "retry"
        self._retrying += key.state == "retry"
        key.attempts -= 1
        self._set_due(key, key.due_ms)

    def _resolve(
        self, key: PendingKey, now_ms: int, sign: int, record: HistoryRecord | None
    ) -> None:
        assert self._commit is not None
        del self.pending[key.member]
        self._retrying -= key.state == "retry"
        self.pins.pop(key.member, None)
        if key.in_retry_hash:
            self._commit.retry_del.append(key.member)
        forget_ms = key.first_seen_ms + self.dedup_window_ms
        if not key.dedup or forget_ms <= now_ms:
            forget_ms = now_ms + self.merge_window_ms + RESEND_GUARD_MS
        fp, bucket = self.keys.fingerprint(key.member)
        self._commit.remember.append((bucket, fp, sign * until_second(forget_ms)))
        if key.dedup:
            self._note(record)

    # -- history and commits --------------------------------------------------------

    def _note(self, record: HistoryRecord | None) -> None:
        if record is not None and self.history:
            assert self._commit is not None
            self._commit.history.append(record)

    def _record_copy(self, member: str, copy: Copy, outcome: Outcome) -> None:
        """A history record naming the fields a copy brought and its field warnings, never
        values; of bounded size (see HISTORY_FIELDS_MAX)."""
        if not copy.dedup:
            return  # a key no one can look up
        mask, other = history.copy_fields(copy.body)
        room = max(0, HISTORY_FIELDS_MAX - mask.bit_count())
        key = self.pending.get(member)
        open_key = key is not None and key.state == "open" and outcome != "duplicate"
        self._note(
            CopyRecord(
                member, outcome, copy.received_ms / 1000, copy.source, mask,
                [name[:HISTORY_NAME_MAX] for name in other[:room]],
                len(other) - room if len(other) > room else None, copy.warnings,
                copy.dead_letter, key.due_ms / 1000 if open_key and key else None,
            )
        )  # fmt: skip

    def commit_due(self) -> int | None:
        """When the changes not yet committed must be (ms): now for a resolved key, after
        COMMIT_LINGER_MS for the rest; None when nothing changed."""
        c = self._commit
        assert c is not None
        if c.remember or c.retry_set or c.retry_del or c.dead:
            return 0
        if c.history or (self.read_id != c.seen and _id(self.read_id) > (0, 0)):
            return self._committed_ms + COMMIT_LINGER_MS
        return None

    def take_commit(self, now_ms: int, *, force: bool = False) -> Commit | None:
        """What to record by `now_ms` (see commit_due); None when nothing needs to be yet.
        With `force`, whatever changed."""
        due = self.commit_due()
        if due is None or (due > now_ms and not force):
            return None
        c = self._commit
        assert c is not None
        c.seen = self.read_id if _id(self.read_id) > _id(self.counted_id) else ""
        first_pin = next(iter(self.pins.values()), None)
        c.trim = first_pin if first_pin is not None else _after(self.read_id)
        c.pending = len(self.pending) - self._retrying
        c.due_ms = self.next_due() or 0
        self._commit = Commit(self.shard, seen=self.read_id)
        self._committed_ms = now_ms
        return c


def _id(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _after(entry_id: str) -> str:
    """The smallest log id after `entry_id` (XTRIM MINID keeps ids from its argument on)."""
    ms, seq = _id(entry_id)
    return f"{ms}-{seq + 1}"
