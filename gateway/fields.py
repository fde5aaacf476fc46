"""Typed cleaners for one JSON value of an event: (value, field) in, clean value out.

A cleaner returns the value TikTok should get (None when it is absent: null,
"", [] and {} count as absent) or raises InvalidEvent. It is given the name of
its field relative to the object holding it (a key, or "" for a list item) and
raises with that name; each object or list adds its own part as the error
passes through it (`InvalidEvent.within`), so a path is built only for the
field that is refused. TikTok's types are enforced here; the ranges and lists it
documents are only advice (normalise.py): a negative value is forwarded.

The size limits guard the gateway (storage, recursion), not TikTok's rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.errors import InvalidEvent

MAX_STRING_LENGTH = 8192  # any string; page.url and user_agent can be this long
MAX_KEY_LENGTH = 256  # a key of a free-form object
MAX_PROPERTIES = 200  # keys in `properties`, and in any free-form object
MAX_LIST_ITEMS = 1000  # items in a list (`properties.contents` has its own limit)
MAX_NESTING = 8  # levels of objects and lists inside a free-form value
MAX_NUMBER_TEXT = 64  # characters in a numeric string
# Unix times at or above this are milliseconds: 1e11 s is the year 5138, and
# 1e11 ms is 1973, so no real time of either kind is on the wrong side.
MILLISECONDS_FROM = 10**11
# orjson serialises integers up to 64 bits; anything wider would fail at store.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

# ASCII digits only: int() and float() would also read other scripts' digits.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
# Adobe's extension writes yyyy-MM-dd'T'HH:mm:ss:SSSZ: a colon before the
# fraction, which ISO 8601 (and fromisoformat) wants as a dot.
_ADOBE_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}):(\d{1,6})(.*)", re.ASCII)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A tuple, not `int | float`: that expression builds a new union object at every call.
_NUMBERS = (int, float)

Cleaner = Callable[[Any, str], Any]


def parse_timestamp(value: Any) -> int:
    """Unix seconds (floored) from any accepted time form; ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip()
        number = parse_number_text(text)
        if number is None:
            return _seconds_from_iso(text)
        value = number
    if isinstance(value, bool) or not isinstance(value, _NUMBERS):
        raise ValueError("not a time")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("not finite")
        return math.floor(value / 1000 if abs(value) >= MILLISECONDS_FROM else value)
    return value // 1000 if abs(value) >= MILLISECONDS_FROM else value


def _seconds_from_iso(text: str) -> int:
    adobe = _ADOBE_TIME.fullmatch(text)
    if adobe:
        text = f"{adobe[1]}.{adobe[2]}{adobe[3]}"
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:  # naive: TikTok's times are UTC
            moment = moment.replace(tzinfo=UTC)
        return (moment - _EPOCH) // timedelta(seconds=1)
    except OverflowError:
        raise ValueError("out of range") from None



def clean_object(value: Any, field: str) -> dict[str, Any] | None:
    """An object as it is (its fields are cleaned by the caller)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidEvent(field, "must be an object")
    return value


def clean_text(value: Any, field: str) -> str | None:
    """A string of at most MAX_STRING_LENGTH characters."""
    if type(value) is str and len(value) <= MAX_STRING_LENGTH:  # nearly every value
        return value or None
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEvent(field, "must be a string")
    if len(value) > MAX_STRING_LENGTH:
        raise InvalidEvent(field, f"is longer than {MAX_STRING_LENGTH} characters")
    return value or None


def clean_id(value: Any, field: str) -> str | None:
    """A string id; TikTok wants strings, so a JSON number becomes its digits."""
    if type(value) is str:
        return clean_text(value, field)
    if isinstance(value, _NUMBERS) and not isinstance(value, bool):
        number = as_number(value)
        if number is None:
            raise InvalidEvent(field, "must be a string")
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        return str(number) if isinstance(number, int) else repr(number)
    return clean_text(value, field)


def clean_id_list(value: Any, field: str) -> list[str] | None:
    """A list of ids, each as `clean_id` reads it."""
    if value is None:
        return None
    if not isinstance(value, list):
        value = [value]  # a lone id is a list of one
    if len(value) > MAX_LIST_ITEMS:
        raise InvalidEvent(field, f"has more than {MAX_LIST_ITEMS} items")
    ids: list[str] = []
    for index, item in enumerate(value):
        try:
            text = clean_id(item, "")
        except InvalidEvent as exc:
            raise exc.within(f"{field}.{index}") from None
        if text:
            ids.append(text)
    return ids or None


def clean_bool(value: Any, field: str) -> bool | None:
    """true or false."""
    if value is None or isinstance(value, bool):
        return value
    raise InvalidEvent(field, "must be true or false")


def parse_number_text(text: str) -> int | float | None:
    """A number written as a string ("10.00", "3"), or None if it is not one."""
    if len(text) > MAX_NUMBER_TEXT or not _NUMBER.fullmatch(text):
        return None
    if _INTEGER.fullmatch(text):
        return int(text)
    number = float(text)
    return number if math.isfinite(number) else None


def as_number(value: Any) -> int | float | None:
    """A finite number in 64-bit range from a number or numeric string, else None."""
    kind = type(value)  # exactly float or int, as JSON gives them: no bool, no subclass
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int:
        return value if _INT_MIN <= value <= _INT_MAX else None
    if isinstance(value, str):
        value = parse_number_text(value.strip())
    if isinstance(value, bool) or not isinstance(value, _NUMBERS):
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if _INT_MIN <= value <= _INT_MAX else None


def clean_money(value: Any, field: str) -> int | float | None:
    """An amount: a number or a numeric string ("10.00")."""
    if value is None or value == "":
        return None
    number = as_number(value)
    if number is None:
        raise InvalidEvent(field, "must be a number, digits only (e.g. 10.00)")
    return number


def clean_whole(value: Any, field: str) -> int | None:
    """A count: an integer within 64 bits (2.0 and "2" are 2)."""
    if type(value) is int and _INT_MIN <= value <= _INT_MAX:  # nearly every value
        return value
    if value is None or value == "":
        return None
    number = as_number(value)
    if isinstance(number, float) and number.is_integer():
        number = int(number)  # 2.0 is 2; 1e30 is 2**99-ish, out of range below
    if not isinstance(number, int) or not _INT_MIN <= number <= _INT_MAX:
        raise InvalidEvent(field, "must be an integer (within 64 bits)")
    return number


def clean_share(value: Any, field: str) -> float | None:
    """A fraction as a float; its range is TikTok's advice, checked elsewhere."""
    if value is None:
        return None
    number = as_number(value)
    if number is None:
        raise InvalidEvent(field, "must be a number (TikTok expects 0 to 1)")
    return float(number)


def clean_value(value: Any, field: str, depth: int = 0) -> Any:
    """A JSON value with empties dropped and sizes bounded; None when empty."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return clean_text(value, field)
    if isinstance(value, _NUMBERS):
        number = as_number(value)
        if number is None:
            raise InvalidEvent(field, "must be a finite number within 64 bits")
        return number
    if depth >= MAX_NESTING:
        raise InvalidEvent(field, f"nests deeper than {MAX_NESTING} levels")
    if isinstance(value, list):
        return _clean_list(value, field, depth + 1)
    if isinstance(value, dict):
        return clean_fields(value, field, {}, depth=depth + 1) or None
    raise InvalidEvent(field, "is not a JSON value")


def _clean_list(value: list[Any], field: str, depth: int) -> list[Any] | None:
    if len(value) > MAX_LIST_ITEMS:
        raise InvalidEvent(field, f"has more than {MAX_LIST_ITEMS} items")
    items: list[Any] = []
    for index, item in enumerate(value):
        try:
            cleaned = clean_value(item, "", depth)
        except InvalidEvent as exc:
            raise exc.within(f"{field}.{index}") from None
        if cleaned is not None:
            items.append(cleaned)
    return items or None


def clean_fields(
    value: dict[Any, Any],
    path: str,
    known: Mapping[str, Cleaner],
    *,
    depth: int = 1,
    keep_unknown: bool = True,
) -> dict[str, Any]:
    """Each field through its cleaner (or `clean_value`); absent ones left out."""
    if len(value) > MAX_PROPERTIES:
        raise InvalidEvent(path, f"has more than {MAX_PROPERTIES} fields")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or len(key) > MAX_KEY_LENGTH:
            raise InvalidEvent(path, f"keys must be strings of at most {MAX_KEY_LENGTH} characters")
        clean = known.get(key)
        try:
            if clean is not None:
                cleaned = clean(item, key)
            elif keep_unknown:
                cleaned = clean_value(item, key, depth)
            else:
                continue
        except InvalidEvent as exc:
            raise exc.within(path) from None
        if cleaned is not None:
            out[key] = cleaned
    return out


def section_cleaner(known: Mapping[str, Cleaner], keep_unknown: bool = False) -> Cleaner:
    """A cleaner for an object whose known fields have their own cleaners."""

    def clean(value: Any, field: str) -> dict[str, Any] | None:
        obj = clean_object(value, field)
        if obj is None:
            return None
        return clean_fields(obj, field, known, keep_unknown=keep_unknown) or None

    return clean

