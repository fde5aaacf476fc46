"""The setup checks: each a verdict, the finding and the fix in a sentence, and the
evidence, from a day's tallies, TikTok's last answers and the keys the history holds.
Pure functions: console/reading.py reads, this judges.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..events import LEGACY_ALIASES, STANDARD_EVENTS
from ..field_warnings import DROPPED_REASONS
from .views import Answer, Check, LiveKey, Verdict

if TYPE_CHECKING:
    from .reading import Totals

SAMPLES = 5  # unpaired keys shown side by side
UNPAIRED_AFTER = 60.0  # seconds an open key waits before it counts as unpaired
_STANDARD_BY_CASE = {name.lower(): name for name in STANDARD_EVENTS}
_ALIASES = {**LEGACY_ALIASES, **{new: old for old, new in LEGACY_ALIASES.items()}}


def run_checks(
    day: Totals,
    answers: dict[str, Answer],
    keys: Sequence[LiveKey],
    now: float,
    *,
    merge_window: float,
    origins_seen: dict[str, float] | None = None,
) -> list[Check]:
    """Every check, in the order a setup is fixed: the pixel, the ids, the pairs, their
    timing, the names, the clocks, TikTok, the fields."""
    return [
        pixel_js(day, origins_seen or {}),
        event_ids(day),
        pairs(day, keys, now, merge_window),
        gaps(day, merge_window),
        names(day),
        clocks(day),
        tiktok(answers),
        fields(day),
    ]


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def _when(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(at))


def pixel_js(day: Totals, origins_seen: dict[str, float]) -> Check:
    pixel, server = day.counts_of("r", "pixel"), day.counts_of("r", "server")
    origins = sorted(day.by("o").items(), key=lambda kv: -kv[1])
    evidence = [
        (origin, f"{n} copies" + (f", last {_when(origins_seen[origin])}"
                                  if origin in origins_seen else ""))
        for (origin,), n in origins
    ]  # fmt: skip
    title = "The pixel's copies arrive"
    if pixel:
        where = ", ".join(o for (o,), _n in origins[:3]) or "pages without a URL"
        return Check("pixel_js", title, "ok", f"{pixel} pixel copies in 24 h, from {where}.",
                     evidence=evidence)  # fmt: skip
    if server:
        return Check(
            "pixel_js", title, "fail",
            f"No pixel copies in 24 h, while servers sent {server}: pixel.js is not on the "
            "pages, or something blocks it.",
            "Load the gateway's /pixel.js right after TikTok's base code on every page.",
        )  # fmt: skip
    return Check("pixel_js", title, "unknown", "No events in 24 h.")


def event_ids(day: Totals) -> Check:
    server = day.counts_of("r", "server")
    missing = day.counts[("n", "server")]
    title = "Server copies carry event_id"
    evidence = [("server copies", str(server)), ("without event_id", str(missing))]
    if not server:
        return Check("event_id", title, "unknown", "No server copies in 24 h.")
    if not missing:
        return Check("event_id", title, "ok", "Every server copy has an event_id.",
                     evidence=evidence)  # fmt: skip
    return Check(
        "event_id", title, "fail" if missing * 2 >= server else "warn",
        f"{_share(missing, server)} of server copies have no event_id: they can never meet "
        "their pixel copy, and TikTok counts both.",
        "Send the event_id the pixel used (pixel.js gives it to the page) with each server "
        "event.", evidence,
    )  # fmt: skip


def pairs(day: Totals, keys: Sequence[LiveKey], now: float, merge_window: float) -> Check:
    """Whether the pixel's and the server's copies of one event meet; when they do not,
    keys of one event name left alone by each source in the same minute, side by side."""
    title = "Pixel and server copies meet"
    both_sent = {
        event for (source, event) in day.by("r") if source == "pixel"
        and day.counts[("r", "server", event)]
    }  # fmt: skip
    met = alone = 0
    evidence = []
    for event in sorted(both_sent):
        b = day.counts[("f", event, "both")]
        p, s = day.counts[("f", event, "pixel_only")], day.counts[("f", event, "server_only")]
        met, alone = met + b, alone + p + s
        evidence.append((event, f"{b} met, {p} pixel only, {s} server only"))
    samples = unpaired_samples(keys, now, min(merge_window, UNPAIRED_AFTER))
    if samples:
        told = f" ({_share(met, met + alone)} of keys both sources send met)" if met + alone else ""
        return Check(
            "pairs", title, "fail",
            f"Pixel-only and server-only keys of the same event in the same minute: the two "
            f"sources send different event_ids{told}.",
            "Use one event_id for both copies: send the one the pixel used with the server "
            "event.", evidence, samples,
        )  # fmt: skip
    if not met + alone:
        return Check("pairs", title, "unknown",
                     "No event sent by both the pixel and a server in 24 h.", evidence=evidence)
    share = met / (met + alone)
    verdict: Verdict = "ok" if share >= 0.9 else "warn" if share >= 0.5 else "fail"
    return Check(
        "pairs", title, verdict, f"{_share(met, met + alone)} of the keys both sources send met.",
        None if verdict == "ok" else "See when the copies arrive (the next check) and whether "
        "each source sends every event.", evidence,
    )  # fmt: skip


def unpaired_samples(
    keys: Sequence[LiveKey], now: float, after: float
) -> list[tuple[str, str, str, float]]:
    """(event, pixel's event_id, server's event_id, minute) of keys one source alone sent,
    left or waiting `after` seconds, whose event and minute the other source's lone keys
    share."""
    lone: dict[tuple[str, str, int], dict[str, list[str]]] = {}
    for key in keys:
        sources = key.sources
        if len(sources) != 1 or sources[0] not in ("pixel", "server"):
            continue
        if key.state == "open" and now - key.first_at < after:
            continue
        group = lone.setdefault((key.pixel, key.event, int(key.first_at // 60)), {})
        group.setdefault(sources[0], []).append(key.event_id)
    samples = []
    for (_pixel, event, minute), ids in sorted(lone.items(), key=lambda kv: -kv[0][2]):
        for pixel_id, server_id in zip(ids.get("pixel", []), ids.get("server", []),
                                       strict=False):  # fmt: skip
            samples.append((event, pixel_id, server_id, minute * 60.0))
            if len(samples) == SAMPLES:
                return samples
    return samples


def gaps(day: Totals, merge_window: float) -> Check:
    title = "Copies arrive within the merge window"
    met, late = day.by("g"), day.by("L")
    n_met, n_late = sum(met.values()), sum(late.values())
    names = ("le1", "le10", "le60", "le300", "more")
    labels = ("within 1 s", "1-10 s", "10-60 s", "1-5 min", "over 5 min")
    evidence = [
        (label, f"{met.get((b,), 0)} met, {late.get((b,), 0)} late")
        for b, label in zip(names, labels, strict=True)
        if met.get((b,)) or late.get((b,))
    ]
    if not n_met + n_late:
        return Check("gap", title, "unknown", "No key had copies from both sources in 24 h.")
    if not n_late:
        return Check("gap", title, "ok", f"All {n_met} pairs met within the merge window.",
                     evidence=evidence)  # fmt: skip
    return Check(
        "gap", title, "warn" if n_late * 10 < n_met + n_late else "fail",
        f"{n_late} copies came after their key had left ({merge_window:g} s merge window); "
        "their fields never reached TikTok.",
        "Send the server copy sooner, or raise GATEWAY_MERGE_WINDOW (TikTok merges for 5 "
        "minutes at most).", evidence,
    )  # fmt: skip


def names(day: Totals) -> Check:
    title = "Event names agree"
    seen = collections.defaultdict(set)
    for _source, event in day.by("r"):
        seen[event.lower()].add(event)
    problems = []
    for spellings in seen.values():
        if len(spellings) > 1:
            problems.append(("differ only in case", " / ".join(sorted(spellings))))
    for event in {e for s in seen.values() for e in s}:
        standard = _STANDARD_BY_CASE.get(event.lower())
        if standard is not None and standard != event:
            problems.append((event, f"a custom event to TikTok; the standard name is {standard}"))
        alias = _ALIASES.get(event)
        if alias is not None and alias in seen.get(alias.lower(), set()):
            problems.append(("aliases", f"{event} and {alias} both sent (merged as one)"))
    if not seen:
        return Check("names", title, "unknown", "No events in 24 h.")
    if not problems:
        n = len(seen)
        return Check("names", title, "ok",
                     f"{n} event name{'s' if n > 1 else ''}, each spelled one way.")  # fmt: skip
    return Check(
        "names", title, "warn", "Some event names differ only in case or are aliases: copies "
        "under different names never meet.",
        "Send each event under TikTok's standard name, spelled the same by pixel and server.",
        sorted(problems),
    )  # fmt: skip


def clocks(day: Totals) -> Check:
    title = "Event times agree with the clock"
    skew = day.by("s")
    ahead = sum(n for (_s, b), n in skew.items() if b in ("le300", "le3600", "more"))
    total = sum(skew.values())
    late_server = sum(n for (s, b), n in skew.items() if s == "server" and b == "le-300")
    server = sum(n for (s, _b), n in skew.items() if s == "server")
    evidence = [
        ("event_time over a minute ahead", f"{ahead} of {total}"),
        ("server copies over 5 min after their event_time", f"{late_server} of {server}"),
    ]
    if not total:
        return Check("clock", title, "unknown", "No events with event_time in 24 h.")
    if ahead * 20 > total:
        return Check(
            "clock", title, "warn", f"{_share(ahead, total)} of events are dated over a minute "
            "in the future: a client's clock runs ahead.",
            "Set event_time from a synchronised clock (NTP), in Unix seconds.", evidence,
        )  # fmt: skip
    if server and late_server * 2 > server:
        return Check(
            "clock", title, "warn", f"{_share(late_server, server)} of server copies arrive over "
            "5 minutes after their event: too late for TikTok to merge them with the pixel's.",
            "Send server events as they happen, not in delayed batches.", evidence,
        )  # fmt: skip
    return Check("clock", title, "ok", "Event times match the time of receipt.",
                 evidence=evidence)  # fmt: skip


def tiktok(answers: dict[str, Answer]) -> Check:
    title = "TikTok accepts the events"
    if not answers:
        return Check("tiktok", title, "unknown", "Nothing sent to TikTok yet.")
    evidence = [
        (pixel, f"{a.outcome} (code {a.code}) {_when(a.at)}: {a.message}")
        for pixel, a in sorted(answers.items())
    ]
    worst = {a.outcome for a in answers.values()}
    if "auth" in worst:
        return Check("tiktok", title, "fail", "TikTok refused a pixel's access token.",
                     "Renew the access token in TikTok Events Manager and set it in "
                     "GATEWAY_PIXELS.", evidence)  # fmt: skip
    if worst - {"ok"}:
        return Check("tiktok", title, "warn", "TikTok's last answer for a pixel was not ok.",
                     "See TikTok's message; rate limits and errors are retried, rejected "
                     "events wait in the dead letters.", evidence)  # fmt: skip
    return Check("tiktok", title, "ok", "TikTok took the last batch of every pixel.",
                 evidence=evidence)  # fmt: skip


def fields(day: Totals) -> Check:
    title = "Fields arrive as TikTok expects"
    warnings = sorted(day.by("w").items(), key=lambda kv: -kv[1])
    evidence = [
        (f"{field} ({reason})", f"{n}, {'dropped' if reason in DROPPED_REASONS else 'sent'}")
        for (field, reason), n in warnings
    ]
    dropped = sum(n for (_f, reason), n in warnings if reason in DROPPED_REASONS)
    if dropped:
        return Check(
            "fields", title, "warn", f"{dropped} fields were left out (a match key that "
            "could not be normalised, or a user field TikTok does not define).",
            "Send phone numbers with their country code (or set GATEWAY_PHONE_REGION) and "
            "only the user fields TikTok defines.", evidence,
        )  # fmt: skip
    if warnings:
        return Check("fields", title, "ok", "Some values are outside what TikTok documents; "
                     "they were sent as they were.", evidence=evidence)  # fmt: skip
    return Check("fields", title, "ok", "No field warnings in 24 h.")
