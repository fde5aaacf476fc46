"""What the console counts, kept by each shard owner as it works and written to Redis
about once a second: one script call a write (store.scripts.TALLY), never one a copy,
and never on the request path.

Counts are per Unix minute (and hour), per pixel, under fields `pixel|kind|label...`:

    r|<source>|<event>   copies received (a source: pixel, server, replay)
    n|<source>           copies without event_id (each sent alone, never deduplicated)
    d|<event>            copies dropped as duplicates
    f|<event>|<pair>     keys TikTok took, by the sources they had (both, pixel_only, ...)
    k|<event>|<key>      ... of which carried a match key (email, phone, ...)
    a|<class>            events by TikTok's answer (ok, retry, rate_limited, auth, rejected)
    l                    the sum of the forward lags (ms); `lx` their maximum (ms)
    g|<bucket>           pairs that met: how long after the first copy the other came
    L|<bucket>           copies of the other source that came after their key had left
    s|<source>|<bucket>  event_time against the time of receipt (clock skew)
    w|<field>|<reason>   field warnings
    o|<origin>           pixel copies by the origin of their page

Pixel codes and event names come from accepted events but are the client's to choose
(any pixel in sandbox mode, any custom event name): past `MAX_PIXELS` pixels and
`MAX_EVENTS` names a write, the rest count as OTHER, so a write stays bounded. A tally
lost with its instance (a crash before its write) is a second of diagnostics, not data.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import orjson

from ..errors import StoreUnavailable
from ..events import SOURCES
from ..metrics import MATCH_KEYS
from ..store import Store
from ..store.keys import (
    CONSOLE_ANSWERS_KEY,
    CONSOLE_ANSWERS_TTL,
    CONSOLE_HOUR_TTL,
    CONSOLE_MINUTE_TTL,
    SOURCE_BITS,
)
from ..upstream import AUTH_CODES, RATE_LIMIT_CODES, Outcome, UpstreamResult

if TYPE_CHECKING:
    from ..sending import Outgoing
    from ..window import Absorbed

log = logging.getLogger("gateway.console")

WRITE_INTERVAL = 1.0  # seconds between two writes of an instance's tallies
MAX_PIXELS = 100  # pixels a write counts by name; the rest as OTHER
MAX_EVENTS = 100  # event names (or origins) a pixel counts by name in a write
OTHER = "(other)"
RECENT_KEYS = 20_000  # keys left recently, remembered to date a late copy of theirs
MESSAGE_MAX = 300  # characters of TikTok's message kept with its last answer
# Upper bounds (seconds) of the gap and skew buckets; the last bucket is "more".
GAP_BUCKETS = (1, 10, 60, 300)
# Where a key's `firsts` keeps each source's first copy.
_SLOTS: dict[str, int] = {source: i for i, source in enumerate(SOURCES)}
SKEW_BUCKETS = (-300, -60, 60, 300, 3600)  # event_time minus receipt: in the past is < 0


def bucket(seconds: float, bounds: Sequence[int]) -> str:
    """The name of the first bucket whose upper bound holds `seconds`: `le<N>`, or `more`."""
    for bound in bounds:
        if seconds <= bound:
            return f"le{bound}"
    return "more"


def answer_class(result: UpstreamResult) -> str:
    """An answer as the console counts it: ok, retry, rate_limited, auth or rejected."""
    if result.outcome is Outcome.DELIVERED:
        return "ok"
    if result.code in RATE_LIMIT_CODES:
        return "rate_limited"
    if result.outcome is Outcome.AUTH or result.code in AUTH_CODES:
        return "auth"
    return "retry" if result.outcome is Outcome.RETRY else "rejected"


def origin_of(body: dict[str, Any]) -> str | None:
    """The origin (scheme://host[:port]) of an event's page URL, if it has one."""
    page = body.get("page")
    url = page.get("url") if isinstance(page, dict) else None
    if not isinstance(url, str):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if not parts.scheme or not parts.netloc:
        return None
    return f"{parts.scheme}://{parts.netloc}"[:200]


class Tally:
    """One instance's counts since its last write, by minute; `write` sends them."""

    def __init__(self, store: Store, clock: Callable[[], float]) -> None:
        self.store = store
        self.clock = clock
        self._counts: dict[int, collections.Counter[str]] = {}
        self._maxima: dict[int, dict[str, int]] = {}
        self._answers: dict[str, bytes] = {}
        self._names: dict[str, set[str]] = {}  # pixel -> names counted by name this write
        # Keys that left lately -> when each source's first copy came (ms, 0: none), so a
        # copy of the other source arriving after its key left is dated ("late").
        self._left: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        assert len(SOURCES) == 2  # `firsts`: the pixel's, the server's
        self._written = clock()

    # -- what the owner saw ----------------------------------------------------------

    def copies(self, absorbed: Iterable[Absorbed]) -> None:
        """Copies just read from the logs, with what each counted as."""
        for a in absorbed:
            copy, body = a.copy, a.copy.body
            pixel = self._pixel(copy.pixel_code)
            minute = copy.received_ms // 60_000
            counts = self._minute(minute)
            event = self._name(pixel, str(body.get("event")))
            if a.outcome == "duplicate":
                counts[f"{pixel}|d|{event}"] += 1
                self._late(a.member, copy.source, copy.received_ms, pixel, counts)
                continue
            counts[f"{pixel}|r|{copy.source}|{event}"] += 1
            if not copy.dedup:
                counts[f"{pixel}|n|{copy.source}"] += 1
            event_time = body.get("event_time")
            if isinstance(event_time, int | float) and copy.source != "replay":
                skew = bucket(event_time - copy.received_ms / 1000, SKEW_BUCKETS)
                counts[f"{pixel}|s|{copy.source}|{skew}"] += 1
            for warning in copy.warnings or ():
                counts[f"{pixel}|w|{warning['field']}|{warning['reason']}"] += 1
            if copy.source == "pixel" and (origin := origin_of(body)) is not None:
                counts[f"{pixel}|o|{self._name(pixel, origin)}"] += 1

    def delivered(self, items: Sequence[Outgoing], result: UpstreamResult, now: float) -> None:
        """TikTok took these events."""
        self.answered(items, result, now)
        minute = int(now // 60)
        counts = self._minute(minute)
        maxima = self._maxima.setdefault(minute, {})
        for item in items:
            key = item.key
            pixel = self._pixel(item.pixel_code)
            event = self._name(pixel, str(item.body.get("event")))
            firsts = [0, 0]
            for c in key.copies:
                slot = _SLOTS.get(c.source)
                if slot is not None and not firsts[slot]:
                    firsts[slot] = c.received_ms
            pair = _pair(firsts, key.sources)
            counts[f"{pixel}|f|{event}|{pair}"] += 1
            user = item.body.get("user") or {}
            for name in MATCH_KEYS:
                if user.get(name):
                    counts[f"{pixel}|k|{event}|{name}"] += 1
            lag_ms = max(0, int(now * 1000) - key.first_seen_ms)
            counts[f"{pixel}|l"] += lag_ms
            field = f"{pixel}|lx"
            maxima[field] = max(maxima.get(field, 0), lag_ms)
            if firsts[0] and firsts[1]:
                counts[f"{pixel}|g|{bucket(abs(firsts[0] - firsts[1]) / 1000, GAP_BUCKETS)}"] += 1
            if key.dedup:
                self._left[key.member] = firsts
                if len(self._left) > RECENT_KEYS:
                    self._left.popitem(last=False)

    def answered(
        self,
        items: Sequence[Outgoing],
        result: UpstreamResult,
        now: float,
        *,
        counted: bool = True,
    ) -> None:
        """TikTok's answer to a batch: counted by class (unless not `counted`), and kept as
        its pixel's last."""
        counts = self._minute(int(now // 60))
        pixel = self._pixel(items[0].pixel_code)
        kind = answer_class(result)
        counts[f"{pixel}|a|{kind}"] += len(items) if counted else 0
        self._answers[pixel] = orjson.dumps(
            {
                "at": round(now, 3), "outcome": kind, "code": result.code,
                "http_status": result.http_status, "message": result.message[:MESSAGE_MAX],
            }
        )  # fmt: skip

    def _late(
        self, member: str, source: str, received_ms: int, pixel: str, counts: Any
    ) -> None:
        firsts = self._left.get(member)
        slot = _SLOTS.get(source)
        if firsts is None or slot is None or firsts[slot]:
            return
        other = firsts[1 - slot]
        firsts[slot] = received_ms  # counted once
        if other:
            counts[f"{pixel}|L|{bucket((received_ms - other) / 1000, GAP_BUCKETS)}"] += 1

    # -- bounds ----------------------------------------------------------------------

    def _minute(self, minute: int) -> collections.Counter[str]:
        counts = self._counts.get(minute)
        if counts is None:
            counts = self._counts[minute] = collections.Counter()
        return counts

    def _pixel(self, pixel_code: str) -> str:
        pixel = pixel_code.replace("|", "?")[:64]
        if pixel not in self._names and len(self._names) >= MAX_PIXELS:
            return OTHER
        self._names.setdefault(pixel, set())
        return pixel

    def _name(self, pixel: str, name: str) -> str:
        """An event name or origin as counted: by name until a pixel has MAX_EVENTS."""
        name = name.replace("|", "?")
        names = self._names.setdefault(pixel, set())
        if name in names:
            return name
        if len(names) >= MAX_EVENTS:
            return OTHER
        names.add(name)
        return name

    # -- to Redis --------------------------------------------------------------------

    async def write_if_due(self) -> None:
        """Write the counts when WRITE_INTERVAL has passed since the last write."""
        if self.clock() - self._written >= WRITE_INTERVAL:
            await self.write()

    async def write(self) -> None:
        """Send the counts, one script call a minute counted; kept for the next write if
        Redis is away (merged with what comes meanwhile)."""
        self._written = self.clock()
        if not self._counts:
            return  # an answer is always counted too (see `answered`)
        calls = []
        answers = [x for pair in self._answers.items() for x in pair]
        for minute in sorted(self._counts):
            counts = self._counts[minute]
            maxima = self._maxima.get(minute, {})
            args: list[Any] = [
                CONSOLE_MINUTE_TTL, CONSOLE_HOUR_TTL, CONSOLE_ANSWERS_TTL,
                len(counts), len(maxima),
            ]  # fmt: skip
            for name, value in (*counts.items(), *maxima.items()):
                args += (name, value)
            args += answers
            answers = []
            keys = (
                self.store.console_minute_key(minute),
                self.store.console_hour_key(minute // 60),
                CONSOLE_ANSWERS_KEY,
            )
            calls.append(("tally", keys, args))
        try:
            await self.store.runner.run(calls)
        except StoreUnavailable as exc:
            log.debug("console tallies kept for the next write: %s", exc)
            return
        self._counts.clear()
        self._maxima.clear()
        self._answers.clear()
        self._names.clear()


def _pair(firsts: list[int], sources: int) -> str:
    """A forwarded key's sources as the console names them."""
    have = [s for s, first in zip(SOURCES, firsts, strict=True) if first] or [
        s for s in SOURCES if sources & SOURCE_BITS[s]
    ]
    if len(have) == len(SOURCES):
        return "both"
    return f"{have[0]}_only" if have else "replay"
