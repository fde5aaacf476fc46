"""Normalise and hash the user's personal data, as TikTok specifies; pure functions.

TikTok matches on SHA-256 of a normalised value (TIKTOK_API.md section 5):
email trimmed and lower-cased, phone in E.164 with its `+`, external_id
trimmed but case kept. A value that already is a 64-hex digest was hashed by
the client and passes through lower-cased, so hashing twice is harmless.

Each `normalise_*` returns the value ready for TikTok, or None when the input
is empty (empty is absent: never hashed). A match key that is present but
unusable raises `Dropped(reason)`; the caller drops the field and records a
field warning instead of refusing the whole event (ip, phone, email are match
keys, not the event itself).

`normalise_user` turns one Events API 2.0 `user` object into its clean form.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumber, ValidationResult

from gateway.errors import InvalidEvent
from gateway.field_warnings import NO_COUNTRY_CODE, UNKNOWN_FIELD, UNPARSEABLE, FieldWarning

MAX_PII_LENGTH = 8192  # longest string accepted in any user field
MAX_PII_ITEMS = 100  # longest list accepted for email, phone, external_id

ATT_STATUSES = frozenset({"AUTHORIZED", "DENIED", "NOT_DETERMINED", "RESTRICTED", "NOT_APPLICABLE"})

_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# Deliberately loose: one `@` with something on each side and no blanks. An
# address that fails this cannot match anyone, so hashing it only adds noise.
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


class Dropped(ValueError):
    """A present but unusable value; `reason` is the field warning's reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def sha256_hex(text: str) -> str:
    """Lower-case hex SHA-256 of the UTF-8 bytes of `text`."""
    # surrogatepass: a lone surrogate (never from orjson) must not raise here.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def is_sha256_hex(value: str) -> bool:
    """True when `value` already is a SHA-256 digest in hex (either case)."""
    return len(value) == 64 and _SHA256_HEX.fullmatch(value) is not None


def _hash_unless_hashed(text: str) -> str:
    return text.lower() if is_sha256_hex(text) else sha256_hex(text)


def canonical_email(value: str) -> str:
    """Trimmed and lower-cased: TikTok's form of an email before hashing."""
    return value.strip().lower()


def normalise_email(value: str) -> str | None:
    """SHA-256 of the canonical email; raises Dropped("unparseable") for a non-address."""
    email = canonical_email(value)
    if not email:
        return None
    if is_sha256_hex(email):
        return email
    if _EMAIL.fullmatch(email) is None:
        raise Dropped(UNPARSEABLE)
    return sha256_hex(email)


def e164(value: str, region: str | None) -> str:
    """The phone number as "+<digits>"; raises Dropped when that cannot be known.

    A number without a country code is read in `region`; with no region it is
    dropped rather than guessed ("no_country_code").
    """
    fast = e164_fast(value)
    if fast is not None:
        return fast
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException as exc:
        # No "+": the number lacks a country code, and no region says which.
        # With a "+", the code itself is bad.
        no_code = exc.error_type == phonenumbers.NumberParseException.INVALID_COUNTRY_CODE
        if no_code and region is None and not _has_plus(value):
            raise Dropped(NO_COUNTRY_CODE) from None
        raise Dropped(UNPARSEABLE) from None
    # Possible (right length for the country), not "valid": the validity
    # metadata lags new number ranges, and a lost real number costs a match.
    if not phonenumbers.is_possible_number(number):
        raise Dropped(UNPARSEABLE)
    formatted: str = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return formatted


# "+", the country code and the number with ASCII digits and the usual separators only:
# what most clients send. Anything else (letters, dots, "ext", other scripts' digits, more
# than 65 characters) is left to phonenumbers.
_INTERNATIONAL = re.compile(r"\+[0-9][0-9 ()-]{0,63}")
_COUNTRY_CODES = frozenset(str(code) for code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)


def e164_fast(text: str) -> str | None:
    """The E.164 form of an already international number ("+1 415-555-0123"), or None
    when phonenumbers must decide: the same answer, at a tenth of the cost.

    Taken only where phonenumbers provably keeps the digits as they are: a known
    country code, a national number that does not start with 0 and that the
    country's national prefix does not match (so "+44 (0)20 ..." is left to it,
    which drops the 0), and a length the country's plan calls possible.
    """
    if _INTERNATIONAL.fullmatch(text) is None:
        return None
    # Four C loops are cheaper than one str.translate, which maps character by character.
    digits = text[1:].replace(" ", "").replace("-", "").replace("(", "").replace(")", "")
    for size in (1, 2, 3):  # the shortest known code, as phonenumbers reads it
        code = digits[:size]
        if code in _COUNTRY_CODES:
            break
    else:
        return None
    rule = _national_rule(code)
    national = digits[size:]
    if rule is None or not national or national[0] == "0":
        return None
    lengths, national_prefix = rule
    if len(national) not in lengths:
        return None
    if national_prefix is not None and national_prefix.match(national):
        return None
    return "+" + digits


@functools.cache  # one entry per country code seen, of about 250
def _national_rule(code: str) -> tuple[frozenset[int], re.Pattern[str] | None] | None:
    """For a geographic country code: the national number lengths phonenumbers calls
    possible (not merely "local only") and the pattern of the national prefix it would
    strip. The same metadata phonenumbers.parse and is_possible_number read."""
    country_code = int(code)
    region = phonenumbers.region_code_for_country_code(country_code)
    if region == phonenumbers.REGION_CODE_FOR_NON_GEO_ENTITY:
        return None
    metadata = PhoneMetadata.metadata_for_region_or_calling_code(country_code, region)
    if metadata is None:
        return None
    # The check reads only the number's length; ones of each length stand for all.
    lengths = frozenset(
        size
        for size in range(1, 18)
        if phonenumbers.is_possible_number_with_reason(
            PhoneNumber(country_code=country_code, national_number=int("1" * size))
        )
        == ValidationResult.IS_POSSIBLE
    )
    prefix = metadata.national_prefix_for_parsing
    return lengths, re.compile(prefix) if prefix else None


def _has_plus(value: str) -> bool:
    return "+" in value or "\uff0b" in value  # libphonenumber accepts the full-width plus too


def normalise_phone(value: str, region: str | None) -> str | None:
    """SHA-256 of the E.164 form ("+12133734253"); a 64-hex value is kept."""
    text = value.strip()
    if not text:
        return None
    if is_sha256_hex(text):
        return text.lower()
    return sha256_hex(e164(text, region))


def normalise_external_id(value: str) -> str | None:
    """SHA-256 of the trimmed id; case is kept, as TikTok specifies."""
    text = value.strip()
    return _hash_unless_hashed(text) if text else None


def normalise_hashed_name(value: str) -> str | None:
    """first_name, last_name, zip_code: trimmed, lower-cased, SHA-256."""
    text = value.strip().lower()
    return _hash_unless_hashed(text) if text else None


def normalise_place(value: str) -> str | None:
    """city, state, country: lower-case letters and digits only, not hashed."""
    text = "".join(ch for ch in value.lower() if ch.isalnum())
    return text or None


def normalise_ip(value: str) -> str | None:
    """The address in compressed form; raises Dropped("unparseable")."""
    text = value.strip()
    if not text:
        return None
    if is_plain_ipv4(text):
        return text
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise Dropped(UNPARSEABLE) from None
    # A dual-stack proxy reports IPv4 clients as ::ffff:a.b.c.d; TikTok knows
    # them by the IPv4 address.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def is_plain_ipv4(text: str) -> bool:
    """A dotted quad already in canonical form (no leading zeros), checked in C: most
    addresses, and several times cheaper than `ipaddress` for the same answer."""
    try:
        socket.inet_pton(socket.AF_INET, text)
    except (OSError, ValueError):  # ValueError: a NUL, or a character no codec takes
        return False
    return True


def normalise_att_status(value: str) -> str | None:
    """One of TikTok's ATT statuses, upper-cased; any other value as sent (TikTok
    documents the list but the gateway leaves the verdict to it: a field warning)."""
    text = value.strip().upper()
    if not text:
        return None
    return text if text in ATT_STATUSES else value


def _raw(value: str) -> str | None:
    return value if value.strip() else None


# --- the user object ---------------------------------------------------------

Normaliser = Callable[[str], str | None]

# Neither a string nor a list of them (a tuple: `dict | float | bool` is built anew per call).
_NOT_TEXT = (dict, float, bool)

# Fields that may be one string or a list of strings (Events API 2.0).
_LIST_FIELDS = ("email", "phone", "external_id")
_SINGLE_FIELDS: dict[str, Normaliser] = {
    "first_name": normalise_hashed_name,
    "last_name": normalise_hashed_name,
    "zip_code": normalise_hashed_name,
    "city": normalise_place,
    "state": normalise_place,
    "country": normalise_place,
    "ip": normalise_ip,
    "att_status": normalise_att_status,
    "ttclid": _raw,
    "ttp": _raw,
    "user_agent": _raw,
    "locale": _raw,
    "idfa": _raw,
    "idfv": _raw,
    "gaid": _raw,
}
# Identifiers that clients often send as JSON numbers; read as their digits.
_NUMBER_AS_TEXT = frozenset({"phone", "external_id", "zip_code"})


def normalise_user(
    raw: Mapping[str, Any], *, path: str, region: str | None, warnings: list[FieldWarning]
) -> dict[str, Any]:
    """The clean `user` object: known fields normalised and hashed, others dropped.

    Wrong types raise InvalidEvent naming `path.<field>`; unusable values are
    dropped with a field warning appended to `warnings` (named by the 2.0 path,
    "user.phone", whatever `path` the client sent it under).
    """
    normalisers = _normalisers(region)
    user: dict[str, Any] = {}
    for key, value in raw.items():
        normalise = normalisers.get(key)
        if normalise is None:
            # Unknown fields could hold raw PII that must not be stored.
            warnings.append(FieldWarning("user", UNKNOWN_FIELD))
            continue
        cleaned: str | list[str] | None
        try:
            if type(value) is str and len(value) <= MAX_PII_LENGTH:  # nearly every value
                cleaned = _apply(normalise, value, key, warnings)
            elif key in _LIST_FIELDS:
                cleaned = _list_or_string(value, key, normalise, key, warnings)
            else:
                cleaned = _single(value, key, normalise, key, warnings)
        except InvalidEvent as exc:  # its path is built only now (fields.py says why)
            raise exc.within(path) from None
        if cleaned is not None:
            user[key] = cleaned
    return user


@functools.lru_cache(maxsize=16)  # a deployment reads phones in one region
def _normalisers(region: str | None) -> dict[str, Normaliser]:
    """Every user field's normaliser, phone numbers read in `region`."""
    return {
        "email": normalise_email,
        "phone": functools.partial(normalise_phone, region=region),
        "external_id": normalise_external_id,
        **_SINGLE_FIELDS,
    }


def _text(value: Any, field: str, key: str) -> str | None:
    """The string in `value`, None for null; InvalidEvent for other types."""
    if value is None:
        return None
    if key in _NUMBER_AS_TEXT and isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 64:  # no real id is this long, and str() has a limit
            raise InvalidEvent(field, "must be a string")
        return str(value)
    if not isinstance(value, str):
        raise InvalidEvent(field, "must be a string")
    if len(value) > MAX_PII_LENGTH:
        raise InvalidEvent(field, f"is longer than {MAX_PII_LENGTH} characters")
    return value


def _apply(
    normalise: Normaliser, text: str, key: str, warnings: list[FieldWarning]
) -> str | None:
    try:
        return normalise(text)
    except Dropped as dropped:
        warnings.append(FieldWarning(f"user.{key}", dropped.reason))
        return None


def _single(
    value: Any, field: str, normalise: Normaliser, key: str, warnings: list[FieldWarning]
) -> str | None:
    text = _text(value, field, key)
    return None if text is None else _apply(normalise, text, key, warnings)


def _list_or_string(
    value: Any, field: str, normalise: Normaliser, key: str, warnings: list[FieldWarning]
) -> str | list[str] | None:
    """A string stays a string; a list stays a list, deduplicated, order kept."""
    if not isinstance(value, list):
        if isinstance(value, _NOT_TEXT):
            raise InvalidEvent(field, "must be a string or a list of strings")
        return _single(value, field, normalise, key, warnings)
    if len(value) > MAX_PII_ITEMS:
        raise InvalidEvent(field, f"has more than {MAX_PII_ITEMS} items")
    out: list[str] = []
    for index, item in enumerate(value):
        try:
            cleaned = _single(item, "", normalise, key, warnings)
        except InvalidEvent as exc:
            raise exc.within(f"{field}.{index}") from None
        if cleaned is not None and cleaned not in out:
            out.append(cleaned)
    return out or None
