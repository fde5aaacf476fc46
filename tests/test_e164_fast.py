"""The E.164 fast path (gateway/pii.py `e164_fast`) against phonenumbers itself.

Wherever the fast path answers, its answer must be exactly what parsing with
phonenumbers, checking the number is possible and formatting it as E.164 gives,
whatever the region; where it cannot be sure, it must step aside (None).
"""

from __future__ import annotations

import phonenumbers
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
