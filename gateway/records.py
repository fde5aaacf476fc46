"""What the gateway keeps in Redis, one frozen type a record, with the JSON it is stored as.

- `Copy`: one copy of an event in its shard's log. Ingest writes it, the shard's
  owner reads it, a replay writes one from a dead letter.
- `RetryState`: a key whose send failed, in its shard's retry hash.
- `DeadLetter`: a merged event dead-lettered, in its shard's dead-letter stream.
- `HistoryRecord`: one entry of a shard's /debug history: a copy's (`CopyRecord`)
  or an attempt's (`ForwardRecord`, `RetryRecord`, `DeadRecord`).

Records written by earlier versions must still read (tests/test_upgrade.py,
tests/test_store.py): a stored name never changes, a field added later is
optional when read, and a record reads whatever order its names come in. Numbers
and text are stored as orjson writes them; nothing here re-encodes a body.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Self

import orjson

from .events import Event
from .history import FIELD_TABLE

CopySource = Literal["pixel", "server", "replay"]  # "replay": a dead letter sent again
CopyOutcome = Literal["new", "merged", "complete", "duplicate", "replayed"]


@dataclass(frozen=True, slots=True)
class Copy:
    """One copy of an event as its shard's log keeps it: where it came from, when, the
    event body, and what the owner needs of it besides."""

    source: CopySource
    pixel_code: str
    event_source: str | None
    test_event_code: str | None
    received_ms: int
    body: dict[str, Any]  # the owner merges a key's bodies in place, into the first
    dedup: bool = True  # False: no event_id, so the key is sent alone and at once
    warnings: list[dict[str, str]] | None = None  # its field warnings, for the history
    first_ms: int | None = None  # a replay: when its key's first copy arrived
    dead_letter: str | None = None  # a replay: the dead letter's entry id

    @staticmethod
    def event_json(event: Event, received_ms: int) -> bytes:
        """The JSON of an event's copy, as `to_json` writes it, without building the record
        (ingest writes every copy)."""
        return orjson.dumps(
            _stored_copy(
                event.source, event.pixel_code, event.event_source, event.test_event_code,
                received_ms, event.body, dedup=event.event_id is not None,
                warnings=[w.as_dict() for w in event.warnings] or None,
            )
        )  # fmt: skip

    def stored(self) -> dict[str, Any]:
        """The copy as stored: `nd` (no dedup) and `w` (warnings) only when set."""
        return _stored_copy(
            self.source, self.pixel_code, self.event_source, self.test_event_code,
            self.received_ms, self.body, dedup=self.dedup, warnings=self.warnings,
            first_ms=self.first_ms, dead_letter=self.dead_letter,
        )  # fmt: skip

    def to_json(self) -> bytes:
        return orjson.dumps(self.stored())

    @classmethod
    def from_stored(cls, stored: dict[str, Any]) -> Copy:
        body = stored["body"]
        return cls(
            stored["source"], stored["pixel_code"], stored.get("event_source"),
            stored.get("test_event_code"), stored["received_ms"], body,
            # The previous design marked no-dedup keys apart from their copies, so the
            # copies IMPORT_LEGACY moves carry no `nd`. A copy lacks event_id exactly when
            # its key has no dedup: the body tells it (see scripts.IMPORT_LEGACY).
            not stored.get("nd") and body.get("event_id") is not None,
            stored.get("w"), stored.get("first_ms"), stored.get("dead_letter"),
        )  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes | str) -> Copy:
        """A copy read from a log (the owner reads every one: kept to one pass)."""
        return cls.from_stored(orjson.loads(raw))


def _stored_copy(
    source: str,
    pixel_code: str,
    event_source: str | None,
    test_event_code: str | None,
    received_ms: int,
    body: dict[str, Any],
    *,
    dedup: bool,
    warnings: list[dict[str, str]] | None,
    first_ms: int | None = None,
    dead_letter: str | None = None,
) -> dict[str, Any]:
    stored: dict[str, Any] = {
        "source": source, "pixel_code": pixel_code, "event_source": event_source,
        "test_event_code": test_event_code, "received_ms": received_ms, "body": body,
    }  # fmt: skip
    if not dedup:
        stored["nd"] = 1
    if warnings:
        stored["w"] = warnings
    if first_ms is not None:
        stored["first_ms"] = first_ms
    if dead_letter is not None:
        stored["dead_letter"] = dead_letter
    return stored


@dataclass(frozen=True, slots=True)
class RetryState:
    """A key whose send failed, waiting in its shard's retry hash for its next attempt
    (see window.PendingKey). Stored with short names: `t0`, `due`, `src`, ..."""

    first_seen_ms: int
    due_ms: int
    sources: int  # bits of keys.SOURCE_BITS
    attempts: int
    dedup: bool
    copies_received: int
    duplicates: int
    copies: tuple[Copy, ...]

    def to_json(self) -> bytes:
        return orjson.dumps(
            {
                "t0": self.first_seen_ms, "due": self.due_ms, "src": self.sources,
                "att": self.attempts, "nd": 0 if self.dedup else 1, "n": self.copies_received,
                "dup": self.duplicates, "copies": [c.stored() for c in self.copies],
            }
        )  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes | str) -> RetryState:
        s = orjson.loads(raw)
        return cls(
            first_seen_ms=s["t0"], due_ms=s["due"], sources=s["src"], attempts=s["att"],
            dedup=s["nd"] != 1, copies_received=s["n"], duplicates=s["dup"],
            copies=tuple(Copy.from_stored(c) for c in s["copies"]),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A merged event that will not be sent again unless replayed: why (`reason`, TikTok's
    `code` and `message`), where to, and the event."""

    reason: str
    code: int | None
    message: str
    pixel_code: str
    event_source: str
    test_event_code: str | None
    first_seen: float  # Unix seconds
    dead_lettered_at: float
    attempts: int
    dedup: bool
    event: dict[str, Any]

    def stored(self) -> dict[str, Any]:
        """The letter as stored, and as `dead-letters list --json` prints it."""
        return {
            "reason": self.reason, "code": self.code, "message": self.message,
            "pixel_code": self.pixel_code, "event_source": self.event_source,
            "test_event_code": self.test_event_code, "first_seen": self.first_seen,
            "dead_lettered_at": self.dead_lettered_at, "attempts": self.attempts,
            "dedup": self.dedup, "event": self.event,
        }  # fmt: skip

    def to_json(self) -> bytes:
        return orjson.dumps(self.stored())

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        s = orjson.loads(raw)
        return cls(
            reason=s["reason"], code=s["code"], message=s["message"],
            pixel_code=s["pixel_code"], event_source=s["event_source"],
            test_event_code=s.get("test_event_code"), first_seen=s["first_seen"],
            dead_lettered_at=s["dead_lettered_at"], attempts=s["attempts"],
            dedup=s.get("dedup", True), event=s["event"],
        )  # fmt: skip

    def replay_copy(self, entry_id: str, now_ms: int) -> Copy:
        """The copy a replay appends to the log: sent again, whatever is remembered."""
        return Copy(
            "replay", self.pixel_code, self.event_source, self.test_event_code, now_ms,
            self.event, dedup=self.dedup, first_ms=int(self.first_seen * 1000),
            dead_letter=entry_id,
        )  # fmt: skip


# -- the /debug history ---------------------------------------------------------------
#
# Stored small, so a fixed budget holds many: the member as `m`, the outcome as `o`, the
# time as `t`; a copy's source as `s`, its warnings as `w`, and its field names as a bit
# set over history.FIELD_TABLE in hex (`f`) plus the names outside it as text (`fx`). A
# copy's record takes about half the bytes of its full form. `/debug` and `inspect` show records
# with their full names (`view`).


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """A copy read by its shard's owner: what it counted as, the field names it brought
    (never values) and its field warnings."""

    member: str
    outcome: CopyOutcome
    at: float
    source: str | None
    field_bits: int  # of history.FIELD_TABLE
    other_fields: list[str]  # names outside FIELD_TABLE
    fields_omitted: int | None = None  # names left out past the record's bound
    warnings: list[dict[str, str]] | None = None
    dead_letter: str | None = None  # a replay's dead letter
    due: float | None = None  # a key still open: when it falls due, as of this copy

    def field_names(self) -> list[str]:
        bits = self.field_bits
        return [name for i, name in enumerate(FIELD_TABLE) if bits >> i & 1] + self.other_fields

    def to_json(self) -> bytes:
        stored: dict[str, Any] = {
            "m": self.member, "o": self.outcome, "t": self.at, "s": self.source,
            "f": format(self.field_bits, "x"),
        }  # fmt: skip
        if self.other_fields:
            stored["fx"] = self.other_fields
        if self.fields_omitted is not None:
            stored["fields_omitted"] = self.fields_omitted
        if self.warnings is not None:
            stored["w"] = self.warnings
        if self.dead_letter is not None:
            stored["dead_letter"] = self.dead_letter
        if self.due is not None:
            stored["due"] = self.due
        return orjson.dumps(stored)

    @classmethod
    def from_stored(cls, s: dict[str, Any]) -> CopyRecord:
        return cls(
            s["m"], s["o"], s["t"], s.get("s"), int(s["f"], 16),
            s.get("fx", []), s.get("fields_omitted"), s.get("w"), s.get("dead_letter"),
            s.get("due"),
        )  # fmt: skip

    def view(self) -> dict[str, Any]:
        """The record as /debug shows it."""
        shown: dict[str, Any] = {
            "outcome": self.outcome, "at": self.at, "source": self.source,
            "fields": self.field_names(),
        }  # fmt: skip
        for name, value in (("fields_omitted", self.fields_omitted),
                            ("warnings", self.warnings), ("dead_letter", self.dead_letter),
                            ("due", self.due)):  # fmt: skip
            if value is not None:
                shown[name] = value
        return shown


class _AttemptRecord:
    """What the records of an attempt share: stored as the member, outcome and time under
    short names and their other fields under their own names, in declaration order (a
    field defaulting to None is left out while None); shown without the member."""

    __slots__ = ()
    outcome: ClassVar[str]
    member: str
    at: float

    @classmethod
    def _fields(cls) -> tuple[tuple[str, bool], ...]:
        """(name, optional) of the fields after `member` and `at`, worked out once."""
        found = _ATTEMPT_FIELDS.get(cls)
        if found is None:
            found = _ATTEMPT_FIELDS[cls] = tuple(
                (f.name, f.default is None) for f in dataclasses.fields(cls)[2:]  # type: ignore[arg-type]
            )
        return found

    def _named(self) -> dict[str, Any]:
        named = {}
        for name, optional in self._fields():
            value = getattr(self, name)
            if value is not None or not optional:
                named[name] = value
        return named

    @classmethod
    def from_stored(cls, s: dict[str, Any]) -> Self:
        rest = (s.get(name) if optional else s[name] for name, optional in cls._fields())
        return cls(s["m"], s["t"], *rest)  # type: ignore[call-arg]

    def to_json(self) -> bytes:
        return orjson.dumps({"m": self.member, "o": self.outcome, "t": self.at, **self._named()})

    def view(self) -> dict[str, Any]:
        """The record as /debug shows it."""
        return {"outcome": self.outcome, "at": self.at, **self._named()}


_ATTEMPT_FIELDS: dict[type, tuple[tuple[str, bool], ...]] = {}


@dataclass(frozen=True, slots=True)
class ForwardRecord(_AttemptRecord):
    """TikTok took the key's event: its request id and code, the batch, and the sends it
    took (over the key's retries)."""

    outcome: ClassVar[str] = "forwarded"
    member: str
    at: float
    request_id: str | None
    code: int | None
    batch: str
    batch_size: int
    attempts: int


@dataclass(frozen=True, slots=True)
class RetryRecord(_AttemptRecord):
    """A send failed: TikTok's (or the network's) answer, and when the key goes again."""

    outcome: ClassVar[str] = "retry"
    member: str
    at: float
    code: int | None
    http_status: int | None
    message: str
    retry_in: float
    batch: str
    attempt: int


@dataclass(frozen=True, slots=True)
class DeadRecord(_AttemptRecord):
    """The key was dead-lettered: why, and the sends it took."""

    outcome: ClassVar[str] = "dead_lettered"
    member: str
    at: float
    reason: str
    code: int | None
    message: str
    attempts: int
    batch: str | None = None  # none when it never left (too old, pixel gone)


HistoryRecord = CopyRecord | ForwardRecord | RetryRecord | DeadRecord
_ATTEMPT_RECORDS: dict[str, type[ForwardRecord | RetryRecord | DeadRecord]] = {
    cls.outcome: cls for cls in (ForwardRecord, RetryRecord, DeadRecord)
}


def history_from_json(raw: bytes | str) -> HistoryRecord:
    """A stored history record of any kind, by its outcome."""
    stored = orjson.loads(raw)
    kind = _ATTEMPT_RECORDS.get(stored["o"])
    return CopyRecord.from_stored(stored) if kind is None else kind.from_stored(stored)
