"""What the console shows, as plain frozen types: the reader (console/reading.py) builds
them from Redis, the pages (console/web.py) render them. Field names only, never
values; event ids are shown (they are the advertiser's own identifiers, not PII).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Range = Literal["15m", "24h"]
RANGES: dict[str, int] = {"15m": 15 * 60, "24h": 24 * 3600}  # seconds each range covers
# What TikTok made of the events sent, by class (see console/tally.py).
ANSWER_CLASSES = ("ok", "retry", "rate_limited", "auth", "rejected")
Verdict = Literal["ok", "warn", "fail", "unknown"]


@dataclass(frozen=True, slots=True)
class EventRow:
    """One event name of one pixel (or of all) over a range."""

    event: str
    received_pixel: int  # copies received from the pixel (browser) path
    received_server: int  # copies received from the server paths
    forwarded: int  # keys forwarded (TikTok took them)
    both: int  # forwarded keys that had a pixel and a server copy
    pixel_only: int
    server_only: int
    duplicates: int  # copies dropped as duplicates
    match_keys: dict[str, int]  # match key -> forwarded keys carrying it

    @property
    def pixel_paired(self) -> float | None:
        """Share of the pixel's keys that got a server copy; None when none."""
        n = self.both + self.pixel_only
        return self.both / n if n else None

    @property
    def server_paired(self) -> float | None:
        """Share of the server's keys that got a pixel copy; None when none."""
        n = self.both + self.server_only
        return self.both / n if n else None

    def coverage(self, key: str) -> float | None:
        """Share of forwarded keys carrying a match key; None when none was forwarded."""
        return self.match_keys.get(key, 0) / self.forwarded if self.forwarded else None


@dataclass(frozen=True, slots=True)
class Point:
    """One bar of the overview's chart: a minute (15m) or an hour (24h)."""

    start: float  # Unix seconds
    received: int
    forwarded: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class Answer:
    """TikTok's last answer for a pixel."""

    at: float
    outcome: str  # one of ANSWER_CLASSES
    code: int | None
    http_status: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Overview:
    """The overview of one pixel (or of all, `pixel` None) over a range."""

    pixel: str | None
    range: Range
    since: float
    until: float
    pixels: list[str]  # pixels seen over the last 24 h, for the picker
    received: dict[str, int]  # source ("pixel", "server", "replay") -> copies
    without_event_id: int  # copies received without event_id (never deduplicated)
    events: list[EventRow]  # most received first
    duplicates: int
    answers: dict[str, int]  # ANSWER_CLASSES -> events
    lag_avg: float | None  # seconds from a key's first copy to TikTok's answer
    lag_max: float | None
    pending: int  # now, over all pixels
    dead_letters: int  # now, of this pixel (or all)
    series: list[Point]  # oldest first
    last_answers: dict[str, Answer]  # pixel -> TikTok's last answer

    @property
    def forwarded(self) -> int:
        return sum(row.forwarded for row in self.events)


@dataclass(frozen=True, slots=True)
class Check:
    """One setup check: a verdict, the finding and the fix, each one sentence, and the
    evidence behind them."""

    id: str  # pixel_js, event_id, pairs, gap, names, clock, tiktok, fields
    title: str
    verdict: Verdict
    finding: str
    fix: str | None = None
    evidence: list[tuple[str, str]] = field(default_factory=list)  # (label, value) rows
    # pairs: sample keys side by side that never met, (event, pixel's event_id,
    # server's event_id, minute): the two id schemes at a glance.
    samples: list[tuple[str, str, str, float]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class CopySeen:
    """One copy of a live key."""

    source: str  # pixel, server, replay
    at: float
    outcome: str  # new, merged, complete, duplicate, replayed
    fields: list[str]  # names only


@dataclass(frozen=True, slots=True)
class LiveKey:
    """A recent key, as the live view lists it."""

    pixel: str
    event: str
    event_id: str
    first_at: float
    last_at: float  # its latest record
    copies: list[CopySeen]  # oldest first
    state: Literal["open", "forwarded", "retry", "dead_lettered"]
    duplicates: int
    code: int | None  # TikTok's code for the last attempt, if any
    message: str | None  # TikTok's message for a retry or a dead letter
    request_id: str | None

    @property
    def sources(self) -> list[str]:
        return sorted({c.source for c in self.copies if c.outcome != "duplicate"})

    @property
    def merged(self) -> bool:
        """Whether copies from both sources met in one key."""
        return {"pixel", "server"} <= set(self.sources)
