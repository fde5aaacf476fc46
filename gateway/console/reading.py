"""The console's reads: the per-minute tallies the shard owners write (console/tally.py),
TikTok's last answers, and the shards' bounded /debug history, turned into the views of
console/views.py. Reads only, from Redis: every instance shows the same numbers.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from ..events import dedup_name
from ..metrics import MATCH_KEYS
from ..records import (
    CopyRecord,
    DeadRecord,
    ForwardRecord,
    HistoryRecord,
    RetryRecord,
    history_from_json,
)
from ..store import Store
from ..store.keys import CONSOLE_ANSWERS_KEY
from ..store.reading import COPY_OUTCOMES as STORED_COPY_OUTCOMES
from ..store.runner import text
from .checks import run_checks
from .views import (
    ANSWER_CLASSES,
    Answer,
    Check,
    CopySeen,
    EventRow,
    LiveKey,
    Overview,
    Point,
    Range,
)

LIVE_RECORDS = 200  # newest history records a live view reads a shard
COPY_OUTCOMES = (*STORED_COPY_OUTCOMES, "duplicate")  # a copy's record, whatever it counted as


@dataclass(slots=True)
class Totals:
    """The tallies of one pixel (or all) summed over some minutes or hours."""

    counts: collections.Counter[tuple[str, ...]] = field(default_factory=collections.Counter)
    lag_max: int = 0  # ms

    def add(self, kind_and_labels: tuple[str, ...], value: int) -> None:
        if kind_and_labels == ("lx",):
            self.lag_max = max(self.lag_max, value)
        else:
            self.counts[kind_and_labels] += value

    def by(self, kind: str) -> dict[tuple[str, ...], int]:
        """The counts of one kind, by their labels."""
        return {k[1:]: v for k, v in self.counts.items() if k[0] == kind and v}

    def sum(self, kind: str) -> int:
        return sum(v for k, v in self.counts.items() if k[0] == kind)

    def counts_of(self, kind: str, label: str) -> int:
        """The sum of one kind's counts whose first label is `label`."""
        return sum(v for k, v in self.counts.items() if k[0] == kind and k[1] == label)


@dataclass(frozen=True, slots=True)
class Tallies:
    """A range's tallies as read: per bucket (minute or hour), per pixel."""

    starts: list[float]  # each bucket's start, Unix seconds
    buckets: list[dict[str, Totals]]  # pixel -> totals, per bucket

    def pixels(self) -> list[str]:
        return sorted({p for b in self.buckets for p in b})

    def last_seen(self, pixel: str | None, kind: str) -> dict[str, float]:
        """A kind's first label (an origin, ...) -> the start of the last bucket it was in."""
        seen: dict[str, float] = {}
        for start, b in zip(self.starts, self.buckets, strict=True):
            for p, t in b.items():
                if pixel is None or p == pixel:
                    for labels in t.by(kind):
                        seen[labels[0]] = start
        return seen

    def total(self, pixel: str | None) -> Totals:
        """One pixel's (or every pixel's) totals over the range."""
        out = Totals()
        for b in self.buckets:
            for p, t in b.items():
                if pixel is None or p == pixel:
                    for k, v in t.counts.items():
                        out.counts[k] += v
                    out.lag_max = max(out.lag_max, t.lag_max)
        return out


class ConsoleReader:
    """Reads what the console shows from the store's Redis."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- tallies -------------------------------------------------------------------------

    async def tallies(self, range_: Range, now: float) -> Tallies:
        """The range's tallies: 15 minutes by minute, or 24 hours by hour."""
        if range_ == "15m":
            first = int(now // 60) - 14
            units = range(first, first + 15)
            keys = [self.store.console_minute_key(m) for m in units]
            starts = [m * 60.0 for m in units]
        else:
            first = int(now // 3600) - 23
            units = range(first, first + 24)
            keys = [self.store.console_hour_key(h) for h in units]
            starts = [h * 3600.0 for h in units]
        replies = await self.store.runner.run([("HGETALL", (k,), (k,)) for k in keys])
        return Tallies(starts, [_parse_tallies(r) for r in replies])

    async def answers(self) -> dict[str, Answer]:
        """TikTok's last answer per pixel."""
        [raw] = await self.store.runner.run(
            [("HGETALL", (CONSOLE_ANSWERS_KEY,), (CONSOLE_ANSWERS_KEY,))]
        )
        out = {}
        for pixel, value in _pairs(raw):
            a = orjson.loads(value)
            out[text(pixel)] = Answer(
                a["at"], a["outcome"], a["code"], a["http_status"], a["message"]
            )
        return out

    async def pixels(self, now: float) -> list[str]:
        """The pixels seen over the last 24 hours, or answered for: the pages' picker."""
        day = await self.tallies("24h", now)
        return sorted(set(day.pixels()) | set(await self.answers()))

    # -- the pages -----------------------------------------------------------------------

    async def overview(self, pixel: str | None, range_: Range, now: float) -> Overview:
        """One pixel's (or all pixels', `pixel` None) numbers over a range ending now."""
        day = await self.tallies("24h", now)
        tallies = day if range_ == "24h" else await self.tallies("15m", now)
        answers = await self.answers()
        backlog = await self.store.backlog(now)
        if pixel is None:
            dead = backlog.dead_letters
        else:
            dead = sum(e.letter.pixel_code == pixel for e in await self.store.dead_letters())
        t = tallies.total(pixel)
        forwarded = t.sum("f")
        return Overview(
            pixel=pixel,
            range=range_,
            since=tallies.starts[0],
            until=now,
            pixels=sorted(set(day.pixels()) | set(answers)),
            received=_by_first_label(t.by("r")),
            without_event_id=t.sum("n"),
            events=event_rows(t),
            duplicates=t.sum("d"),
            answers={c: t.counts[("a", c)] for c in ANSWER_CLASSES},
            lag_avg=t.sum("l") / 1000 / forwarded if forwarded else None,
            lag_max=t.lag_max / 1000 if forwarded else None,
            pending=backlog.pending,
            dead_letters=dead,
            series=[
                Point(start, b.received, b.forwarded, b.duplicates)
                for start, b in zip(
                    tallies.starts, (_point(bucket, pixel) for bucket in tallies.buckets),
                    strict=True,
                )
            ],
            last_answers={p: a for p, a in answers.items() if pixel is None or p == pixel},
        )

    async def checks(self, pixel: str | None, now: float) -> list[Check]:
        """The setup checks of one pixel (or all), over the last 24 hours."""
        day = await self.tallies("24h", now)
        recent = await self.tallies("15m", now)
        answers = await self.answers()
        keys = await self.live(now, pixel=pixel, limit=None)
        return run_checks(
            day.total(pixel),
            {p: a for p, a in answers.items() if pixel is None or p == pixel},
            keys,
            now,
            merge_window=self.store.merge_window_ms / 1000,
            origins_seen={**day.last_seen(pixel, "o"), **recent.last_seen(pixel, "o")},
        )

    async def live(
        self,
        now: float,
        *,
        pixel: str | None = None,
        event: str | None = None,
        event_id: str | None = None,
        limit: int | None = 50,
    ) -> list[LiveKey]:
        """Recent keys, newest first (by first copy), filtered by pixel, event name and
        event_id (exact); `limit` None: every key the history holds."""
        if not self.store.keeps_history:
            return []
        deep = limit is None or event_id is not None
        stop = -1 if deep else LIVE_RECORDS - 1
        keys = [self.store.history_key(s) for s in range(self.store.shards)]
        replies = await self.store.runner.run([("LRANGE", (k,), (k, 0, stop)) for k in keys])
        name = None if event is None else dedup_name(event, self.store.legacy_aliases)
        found = live_keys(
            (history_from_json(raw) for reply in replies for raw in reply),
            lambda p, n, i: (
                (pixel is None or p == pixel)
                and (name is None or n == name)
                and (event_id is None or i == event_id)
            ),
        )
        found.sort(key=lambda k: k.first_at, reverse=True)  # a key keeps its place
        return found if limit is None else found[:limit]


def event_rows(t: Totals) -> list[EventRow]:
    """The events table of some totals, most received first."""
    forwarded: dict[str, dict[str, int]] = {}  # event -> pair -> keys
    for (event, pair), v in t.by("f").items():
        forwarded.setdefault(event, {})[pair] = v
    events = {labels[1] for labels in t.by("r")} | set(forwarded)
    rows = []
    for event in events:
        pairs = forwarded.get(event, {})
        rows.append(
            EventRow(
                event=event,
                received_pixel=t.counts[("r", "pixel", event)],
                received_server=t.counts[("r", "server", event)],
                forwarded=sum(pairs.values()),
                both=pairs.get("both", 0),
                pixel_only=pairs.get("pixel_only", 0),
                server_only=pairs.get("server_only", 0),
                duplicates=t.counts[("d", event)],
                match_keys={k: t.counts[("k", event, k)] for k in MATCH_KEYS},
            )
        )
    rows.sort(key=lambda r: (-(r.received_pixel + r.received_server), r.event))
    return rows


def live_keys(records: Iterable[HistoryRecord], wanted: Any) -> list[LiveKey]:
    """Keys from history records (any order, newest first as a list holds them), those
    whose (pixel, event, event_id) `wanted` accepts."""
    by_member: dict[str, list[HistoryRecord]] = {}
    for record in records:
        by_member.setdefault(record.member, []).append(record)
    out = []
    for member, found in by_member.items():
        pixel, _, rest = member.partition(":")
        event, _, event_id = rest.partition(":")
        if not wanted(pixel, event, event_id):
            continue
        found.sort(key=lambda r: r.at)
        out.append(_live_key(pixel, event, event_id, found))
    return out


def _live_key(pixel: str, event: str, event_id: str, records: Sequence[HistoryRecord]) -> LiveKey:
    copies = [
        CopySeen(r.source or "?", r.at, r.outcome, r.field_names())
        for r in records
        if isinstance(r, CopyRecord) and r.outcome in COPY_OUTCOMES
    ]
    state: Any = "open"
    code = message = request_id = None
    for r in records:
        if isinstance(r, ForwardRecord):
            state, code, message, request_id = "forwarded", r.code, None, r.request_id
        elif isinstance(r, RetryRecord):
            state, code, message = "retry", r.code, r.message
        elif isinstance(r, DeadRecord):
            state, code, message = "dead_lettered", r.code, r.message
        elif r.outcome in ("new", "replayed"):
            state = "open"
    return LiveKey(
        pixel=pixel, event=event, event_id=event_id, first_at=records[0].at,
        last_at=records[-1].at, copies=copies, state=state,
        duplicates=sum(c.outcome == "duplicate" for c in copies), code=code,
        message=message, request_id=request_id,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Bar:
    received: int
    forwarded: int
    duplicates: int


def _point(bucket: dict[str, Totals], pixel: str | None) -> _Bar:
    received = forwarded = duplicates = 0
    for p, t in bucket.items():
        if pixel is None or p == pixel:
            received += t.sum("r")
            forwarded += t.sum("f")
            duplicates += t.sum("d")
    return _Bar(received, forwarded, duplicates)


def _by_first_label(counts: dict[tuple[str, ...], int]) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for labels, v in counts.items():
        out[labels[0]] += v
    return dict(out)


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    """A HGETALL reply as (field, value) pairs, whichever shape the client gave."""
    if isinstance(reply, dict):
        return list(reply.items())
    return [(reply[i], reply[i + 1]) for i in range(0, len(reply or ()), 2)]


def _parse_tallies(reply: Any) -> dict[str, Totals]:
    """One minute's (or hour's) hash: pixel -> totals."""
    out: dict[str, Totals] = {}
    for name, value in _pairs(reply):
        pixel, *labels = text(name).split("|")
        if not labels:
            continue
        totals = out.get(pixel)
        if totals is None:
            totals = out[pixel] = Totals()
        totals.add(tuple(labels), int(value))
    return out
