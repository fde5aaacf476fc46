"""PII normalisation and hashing (gateway/pii.py)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidEvent
from gateway.field_warnings import (
    FIELD_WARNINGS,
    NO_COUNTRY_CODE,
    UNKNOWN_FIELD,
    UNPARSEABLE,
    FieldWarning,
)
from gateway.pii import (
    Dropped,
    e164,
    is_plain_ipv4,
    is_sha256_hex,
    normalise_att_status,
    normalise_email,
    normalise_external_id,
    normalise_hashed_name,
    normalise_ip,
    normalise_phone,
    normalise_place,
    normalise_user,
    sha256_hex,
)
from tests.support import sha256


def user(
    raw: dict[str, Any], region: str | None = None
) -> tuple[dict[str, Any], list[FieldWarning]]:
    warnings: list[FieldWarning] = []
    return normalise_user(raw, path="user", region=region, warnings=warnings), warnings


# --- TikTok's published examples (TIKTOK_API.md 5) ---------------------------------


def test_tiktok_email_example() -> None:
    digest = normalise_email(" ALICE_abc@gmail.com ")
    assert digest == sha256("alice_abc@gmail.com")
    assert digest is not None and digest.startswith("848a7714") and digest.endswith("3bb4f")


def test_tiktok_phone_example() -> None:
    assert e164("(+1)2133734253", None) == "+12133734253"
    digest = normalise_phone("(+1)2133734253", None)
    assert digest == sha256("+12133734253")
    assert digest is not None and digest.startswith("9f7ec22d") and digest.endswith("2dd2fd")


def test_tiktok_external_id_example() -> None:
    digest = normalise_external_id("user_123")
    assert digest == sha256("user_123")
    assert digest is not None and digest.startswith("80fba0ae") and digest.endswith("f2ab8b")


def test_section_9_example_hashes() -> None:
    assert normalise_email("Jane.Doe@Example.com") == (
        "86e0b9e56c17cc4d12387e1949b85053fbe73bc3ce5a1188713a9d300cc6133d"
    )
    assert normalise_phone("+1 (415) 555-0123", None) == (
        "36a2cef4ff9bf7a1abd2a93359136b870393be4106e6c5d19b72ff564f9deca4"
    )
    assert normalise_external_id("customer-8841") == (
        "6f18e35ae8422566f6fcb6af0245f9530bffdbe1ed06f192c4de095c18ac3e46"
    )


# --- primitives ------------------------------------------------------------------


def test_sha256_hex_and_detection() -> None:
    assert sha256_hex("abc") == sha256("abc")
    assert is_sha256_hex(sha256("abc"))
    assert is_sha256_hex(sha256("abc").upper())
    assert not is_sha256_hex(sha256("abc")[:-1])
    assert not is_sha256_hex(sha256("abc") + "0")
    assert not is_sha256_hex("g" * 64)


def test_sha256_hex_never_raises_on_lone_surrogate() -> None:
    assert is_sha256_hex(sha256_hex("\ud800"))


@pytest.mark.parametrize("blank", ["", " ", "\t\n "])
def test_empty_values_are_absent_never_hashed(blank: str) -> None:
    assert normalise_email(blank) is None
    assert normalise_phone(blank, "US") is None
    assert normalise_external_id(blank) is None
    assert normalise_hashed_name(blank) is None
    assert normalise_place(blank) is None
    assert normalise_ip(blank) is None
    assert normalise_att_status(blank) is None


def test_prehashed_values_are_lowercased_not_rehashed() -> None:
    digest = sha256("someone@example.com")
    assert normalise_email(digest.upper()) == digest
    assert normalise_phone(f"  {digest.upper()} ", None) == digest
    assert normalise_external_id(digest.upper()) == digest
    assert normalise_hashed_name(digest.upper()) == digest


def test_email_rules() -> None:
    assert normalise_email("  Bob@Example.COM") == sha256("bob@example.com")
    for bad in ("not-an-email", "a@b@c", "a b@c.d", "@example.com", "bob@"):
        with pytest.raises(Dropped) as exc:
            normalise_email(bad)
        assert exc.value.reason == UNPARSEABLE


def test_phone_with_region() -> None:
    assert e164("(213) 373-4253", "US") == "+12133734253"
    assert e164("1 213 373 4253", "US") == "+12133734253"
    assert e164("020 7946 0958", "GB") == "+442079460958"
    assert e164("+44 20 7946 0958", "US") == "+442079460958"  # an explicit code wins
    assert normalise_phone("213.373.4253", "US") == sha256("+12133734253")


def test_phone_without_country_code_or_region_is_dropped() -> None:
    with pytest.raises(Dropped) as exc:
        normalise_phone("2133734253", None)
    assert exc.value.reason == NO_COUNTRY_CODE


@pytest.mark.parametrize(
    ("value", "region"),
    [("abc", None), ("abc", "US"), ("+1 415 555 01234", None), ("12", "US"), ("+999 123", None)],
)
def test_invalid_phone_is_dropped(value: str, region: str | None) -> None:
    with pytest.raises(Dropped) as exc:
        normalise_phone(value, region)
    assert exc.value.reason == UNPARSEABLE


def test_external_id_keeps_case_and_trims() -> None:
    assert normalise_external_id("  User_ABC ") == sha256("User_ABC")
    assert normalise_external_id("User_ABC") != normalise_external_id("user_abc")


def test_names_and_zip_are_trimmed_lowercased_hashed() -> None:
    assert normalise_hashed_name("  Jane ") == sha256("jane")
    assert normalise_hashed_name("SW1A 1AA") == sha256("sw1a 1aa")


def test_places_keep_lowercase_letters_and_digits_unhashed() -> None:
    assert normalise_place("San Francisco") == "sanfrancisco"
    assert normalise_place(" U.S. ") == "us"
    assert normalise_place("Zürich-3") == "zürich3"
    assert normalise_place("--") is None


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7 ", "203.0.113.7"),
        ("2001:0db8:0000:0000:0000:0000:0000:0001", "2001:db8::1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("::ffff:203.0.113.7", "203.0.113.7"),
    ],
)
def test_ip_normalised(raw: str, clean: str) -> None:
    assert normalise_ip(raw) == clean


@pytest.mark.parametrize("bad", ["999.1.1.1", "localhost", "1.2.3", "2001:db8:::1"])
def test_invalid_ip_dropped(bad: str) -> None:
    with pytest.raises(Dropped) as exc:
        normalise_ip(bad)
    assert exc.value.reason == UNPARSEABLE


@st.composite
def address_like(draw: st.DrawFn) -> str:
    """Dotted quads with odd octets (leading zeros, too large, signs), and any text."""
    octet = st.one_of(
        st.integers(0, 255).map(str),
        st.integers(0, 999).map(lambda n: f"{n:03d}"),
        st.sampled_from(["", "-1", "+1", "0x1", "1 ", "\x00", "\u0661"]),
    )
    quad = st.lists(octet, min_size=3, max_size=5).map(".".join)
    return draw(st.one_of(quad, st.text(max_size=20)))


@given(address_like())
@settings(max_examples=500)
def test_the_ipv4_fast_path_agrees_with_ipaddress(text: str) -> None:
    try:
        expected: str | Exception = str(ipaddress.ip_address(text.strip()))
    except ValueError as exc:
        expected = exc
    if is_plain_ipv4(text):
        assert normalise_ip(text) == expected == text
    elif text.strip() and isinstance(expected, Exception):
        with pytest.raises(Dropped):
            normalise_ip(text)


def test_att_status() -> None:
    assert normalise_att_status("authorized") == "AUTHORIZED"
    # Outside TikTok's list: forwarded as sent (normalise.py adds the field warning).
    assert normalise_att_status(" maybe") == " maybe"


# --- the user object ---------------------------------------------------------------


def test_user_keeps_known_fields_and_hashes_pii() -> None:
    clean, warnings = user(
        {
            "email": " A@B.co ",
            "phone": "+12133734253",
            "external_id": "X1",
            "first_name": " Jane",
            "last_name": "DOE",
            "zip_code": "94107",
            "city": "San Francisco",
            "state": "CA",
            "country": "US",
            "ttp": "ttp-value",
            "ttclid": "E.C.P.abc",
            "ip": "2001:db8:0:0::1",
            "user_agent": "Mozilla/5.0",
            "locale": "en-US",
            "idfa": "IDFA",
            "idfv": "IDFV",
            "gaid": "gaid",
            "att_status": "DENIED",
        }
    )
    assert warnings == []
    assert clean == {
        "email": sha256("a@b.co"),
        "phone": sha256("+12133734253"),
        "external_id": sha256("X1"),
        "first_name": sha256("jane"),
        "last_name": sha256("doe"),
        "zip_code": sha256("94107"),
        "city": "sanfrancisco",
        "state": "ca",
        "country": "us",
        "ttp": "ttp-value",
        "ttclid": "E.C.P.abc",
        "ip": "2001:db8::1",
        "user_agent": "Mozilla/5.0",
        "locale": "en-US",
        "idfa": "IDFA",
        "idfv": "IDFV",
        "gaid": "gaid",
        "att_status": "DENIED",
    }


def test_unknown_user_fields_are_dropped_with_a_warning() -> None:
    clean, warnings = user({"email": "a@b.co", "password": "hunter2", "full_name": "Jane Doe"})
    assert clean == {"email": sha256("a@b.co")}
    assert warnings == [FieldWarning("user", UNKNOWN_FIELD)] * 2


def test_lists_are_normalised_deduplicated_and_kept_as_lists() -> None:
    clean, warnings = user(
        {
            "email": ["A@b.co", " a@b.co", "", "c@d.co", "  "],
            "phone": ["+12133734253", "(+1)2133734253"],
            "external_id": ["x", "X"],
        }
    )
    assert clean == {
        "email": [sha256("a@b.co"), sha256("c@d.co")],
        "phone": [sha256("+12133734253")],
        "external_id": [sha256("x"), sha256("X")],
    }
    assert warnings == []


def test_list_with_nothing_left_drops_the_field() -> None:
    clean, warnings = user({"email": ["", " "], "phone": [], "external_id": ""})
    assert clean == {}
    assert warnings == []


def test_unusable_values_are_dropped_with_warnings_not_refused() -> None:
    clean, warnings = user(
        {"email": ["bad", "a@b.co"], "phone": "2133734253", "ip": "nope", "att_status": "x"}
    )
    assert clean == {"email": [sha256("a@b.co")], "att_status": "x"}
    assert warnings == [
        FieldWarning("user.email", UNPARSEABLE),
        FieldWarning("user.phone", NO_COUNTRY_CODE),
        FieldWarning("user.ip", UNPARSEABLE),
    ]
    assert set(warnings) <= set(FIELD_WARNINGS)


def test_phone_region_applies_in_user() -> None:
    clean, warnings = user({"phone": "(213) 373-4253"}, region="US")
    assert clean == {"phone": sha256("+12133734253")}
    assert warnings == []


def test_numbers_accepted_for_id_like_fields() -> None:
    clean, _ = user({"external_id": 8841, "phone": 12133734253, "zip_code": 94107}, region="US")
    assert clean == {
        "external_id": sha256("8841"),
        "phone": sha256("+12133734253"),
        "zip_code": sha256("94107"),
    }


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"email": 5}, "user.email"),
        ({"email": {"a": 1}}, "user.email"),
        ({"email": ["a@b.co", 5]}, "user.email.1"),
        ({"phone": True}, "user.phone"),
        ({"ip": 127}, "user.ip"),
        ({"ttp": ["x"]}, "user.ttp"),
        ({"first_name": 3}, "user.first_name"),
        ({"email": ["a@b.co"] * 101}, "user.email"),
        ({"user_agent": "x" * 8193}, "user.user_agent"),
    ],
)
def test_wrong_types_raise_naming_the_field(raw: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidEvent) as exc:
        user(raw)
    assert exc.value.field == field


def test_null_values_are_absent() -> None:
    assert user({"email": None, "ip": None, "phone": [None, ""]}) == ({}, [])


# --- properties --------------------------------------------------------------------

texts = st.text(max_size=80)


@given(texts)
def test_email_hashing_is_idempotent(value: str) -> None:
    try:
        once = normalise_email(value)
    except Dropped:
        return
    assert once is None or normalise_email(once) == once


@given(texts)
def test_external_id_and_name_hashing_is_idempotent(value: str) -> None:
    for normalise in (normalise_external_id, normalise_hashed_name):
        once = normalise(value)
        assert once is None or (is_sha256_hex(once) and normalise(once) == once)


@settings(max_examples=50)
@given(st.from_regex(r"\+?1?[ (]?[2-9][0-9]{2}[) -]?[2-9][0-9]{2}[ -]?[0-9]{4}", fullmatch=True))
def test_phone_hashing_is_idempotent(value: str) -> None:
    try:
        once = normalise_phone(value, "US")
    except Dropped:
        return
    assert once is not None and normalise_phone(once, "US") == once


@given(st.text(alphabet=" \t\n\r\u00a0\u2003", max_size=10))
def test_whitespace_is_never_hashed(value: str) -> None:
    assert normalise_email(value) is None
    assert normalise_phone(value, "US") is None
    assert normalise_external_id(value) is None
    assert normalise_hashed_name(value) is None
    assert user({"email": value, "phone": [value], "external_id": value}) == ({}, [])
