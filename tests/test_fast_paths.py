"""The cheaper ways the hot path computes a value, each against the library it stands in for.

- The E.164 fast path (gateway/pii.py `e164_fast`) against phonenumbers itself:
  wherever it answers, its answer is exactly what parsing with phonenumbers,
  checking the number is possible and formatting it as E.164 gives, whatever the
  region; where it cannot be sure, it steps aside (None).
- A page URL's ttclid (gateway/normalise.py `ttclid_from_url`) against parse_qs.
- A body's nesting depth read from its bytes (gateway/formats.py) against a walk
  of the parsed document.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import phonenumbers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import formats
from gateway.normalise import ttclid_from_url
from gateway.pii import e164, e164_fast

CODES = sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
REGIONS = (None, "US", "GB", "DE", "IT", "AR", "BR", "IN", "ZZ")
# What clients put between digits, including the trunk zero some write in brackets.
SEPARATORS = ("", "", "", " ", "-", "(", ")", "--", " (0) ", "(0)", ") ", " (", " - ")


def by_phonenumbers(text: str, region: str | None) -> str | None:
    """E.164 as the gateway's phonenumbers path computes it; None where it drops the number."""
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_possible_number(number):
        return None
    formatted: str = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return formatted


@st.composite
def international_numbers(draw: st.DrawFn) -> str:
    """"+", a country code (known or not), a national number, separators anywhere."""
    code = draw(st.sampled_from(CODES) | st.integers(0, 999))
    national = draw(st.text("0123456789", max_size=18))
    head = draw(st.sampled_from(("+", "+", "+", "+(", "+ ", "++")))
    pieces = [head]
    for digit in f"{code}{national}":
        pieces.append(digit)
        pieces.append(draw(st.sampled_from(SEPARATORS)))
    return "".join(pieces)


@settings(max_examples=3000, suppress_health_check=[HealthCheck.too_slow])
@given(international_numbers(), st.sampled_from(REGIONS))
def test_fast_path_answers_only_as_phonenumbers_does(text: str, region: str | None) -> None:
    fast = e164_fast(text)
    if fast is not None:
        assert fast == by_phonenumbers(text, region), text
        assert e164(text, region) == fast


@pytest.mark.parametrize("code", CODES)
def test_fast_path_for_every_country_code_and_length(code: int) -> None:
    """Every national length and leading digit pair, so each country's plan is met."""
    for size in range(1, 18):
        for lead in ("0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "15", "90", "11"):
            national = (lead + "2345678901234567890")[:size]
            for text in (f"+{code}{national}", f"+{code} ({national[:3]}) {national[3:]}"):
                fast = e164_fast(text)
                if fast is not None:
                    assert fast == by_phonenumbers(text, None), text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("+1 415-555-0123", "+14155550123"),
        ("+1 (415) 555-0123", "+14155550123"),
        ("+14155550123", "+14155550123"),
        ("+44 20 7946 0958", "+442079460958"),
        ("+49 30 1234567", "+49301234567"),
        ("+33 6 12 34 56 78", "+33612345678"),
        ("+39 312 345 6789", "+393123456789"),
        ("+61 4 1234 5678", "+61412345678"),
        ("+91 98765 43210", "+919876543210"),
    ],
)
def test_common_international_numbers_take_the_fast_path(text: str, expected: str) -> None:
    assert e164_fast(text) == expected
    assert by_phonenumbers(text, None) == expected


@pytest.mark.parametrize(
    "text",
    [
        "+44 (0)20 7946 0958",  # the trunk zero phonenumbers drops
        "+39 06 1234 5678",  # Italy keeps its leading zero: left to phonenumbers
        "+1 1415 555 0123",  # the US trunk prefix "1" before the area code
        "+54 9 11 1234 5678",  # Argentina's mobile prefix is rewritten
        "+800 1234 5678",  # not a country
        "+1 415 555 01234",  # too long for the plan
        "+1.415.555.0123",  # dots
        "+1 415 555 0123 ext 7",  # an extension
        "+\uff11 415 555 0123",  # a full-width digit
        "2133734253",  # no country code
        " +1 415 555 0123",  # not trimmed
    ],
)
def test_numbers_phonenumbers_must_decide_are_left_to_it(text: str) -> None:
    assert e164_fast(text) is None


# --- a page URL's ttclid --------------------------------------------------------------


def ttclid_by_parse_qs(url: str) -> str | None:
    """The first ttclid of the URL's query, as parse_qs reads it; None if blank or absent,
    and for a URL that does not spell "ttclid" (an encoded name is not looked for)."""
    if "ttclid" not in url:
        return None
    try:
        query = urlsplit(url).query
    except ValueError:
        return None
    values = parse_qs(query).get("ttclid")
    return values[0] if values and values[0].strip() else None


QUERY_PARTS = ("ttclid", "ttclid=", "=", "&", "&&", "+", "%", "%74", "%2B", "%20", "%ZZ", "%C3%A9",
               "#", "?", " ", "a", "E.C.P.x1", "utm_source=tiktok", "é", "ttcl%69d", "ttclid+",
               "[", "]", "\t")  # fmt: skip


@settings(max_examples=2000)
@given(
    st.sampled_from(("https://shop.example/p", "https://[::1]/p", "https://[bad/p", "/p", "")),
    st.lists(st.sampled_from(QUERY_PARTS), max_size=12),
)
def test_ttclid_is_the_one_parse_qs_reads(base: str, parts: list[str]) -> None:
    url = f"{base}?{''.join(parts)}"
    assert ttclid_from_url.__wrapped__(url) == ttclid_by_parse_qs(url), url


@given(st.text(max_size=60))
def test_ttclid_of_any_text_is_the_one_parse_qs_reads(text: str) -> None:
    url = f"https://shop.example/?{text}&ttclid={text}"
    assert ttclid_from_url.__wrapped__(url) == ttclid_by_parse_qs(url), url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://s.example/p?utm_source=tiktok&ttclid=E.C.P.abc&x=1", "E.C.P.abc"),
        ("https://s.example/p?ttcl%69d=first&ttclid=second", "first"),  # a name is decoded
        ("https://s.example/p?ttclid&ttclid=&ttclid=E.C.P.abc", "E.C.P.abc"),  # no value: skipped
        ("https://s.example/p?ttclid=+&ttclid=E.C.P.abc", None),  # the first is blank
        ("https://s.example/p?ttclid=a%2Bb+c", "a+b c"),
        ("https://s.example/p#?ttclid=E.C.P.abc", None),  # in the fragment
        ("https://[s.example/p?ttclid=E.C.P.abc", None),  # no URL at all
    ],
)
def test_ttclid_examples(url: str, expected: str | None) -> None:
    assert ttclid_from_url.__wrapped__(url) == ttclid_by_parse_qs(url) == expected


# --- a body's nesting depth -----------------------------------------------------------

# Strings that could fool a reading of the bytes: brackets, quotes, escapes, non-ASCII.
TRICKY_TEXT = st.text(alphabet='{}[]"\\ab:,é\u2028\U0001f600', max_size=6)
documents = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | TRICKY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TRICKY_TEXT, inner, max_size=4),
    max_leaves=40,
)


def serialisations(doc: Any) -> list[bytes]:
    """The document as different clients write it: compact, spaced, ASCII-escaped."""
    return [
        orjson.dumps(doc),
        json.dumps(doc, ensure_ascii=False, indent=1).encode(),
        json.dumps(doc).encode(),  # every non-ASCII character a \\u escape
    ]


@settings(max_examples=1500)
@given(documents, st.integers(0, 8))
def test_depth_read_from_bytes_is_the_depth_of_the_document(doc: Any, max_depth: int) -> None:
    for raw in serialisations(doc):
        assert formats._depth_exceeds(raw, doc, max_depth) == formats._walk_exceeds(
            doc, max_depth
        ), raw


@pytest.mark.parametrize(
    ("raw", "deepest"),
    [
        (b'{"a":[{"b":[[1]]}],"c":"]]]"}', 5),  # closing brackets in a string
        (b'{"a":"[[[[","b":[{}]}', 3),  # opening ones
        (b'["\\"[[[", [[]]]', 3),  # an escaped quote before them
        (b'["\\"[\\"", [1]]', 2),  # escaped quotes around one
        (b'[[["x"],["{"]],"(("]', 3),
    ],
)
def test_depth_of_bodies_with_brackets_in_strings(raw: bytes, deepest: int) -> None:
    doc = orjson.loads(raw)
    assert not formats._depth_exceeds(raw, doc, deepest)
    assert formats._depth_exceeds(raw, doc, deepest - 1)
