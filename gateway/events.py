"""The one internal event every accepted body becomes; no I/O here.

An `Event` is one *copy* of an advertiser's event as one source saw it. Its
`body` is already in the shape TikTok's Events API 2.0 wants inside `data[]`
(`event`, `event_time`, `event_id`, `user`, `properties`, `page`, ...), with
email, phone and external_id hashed, so forwarding is a merge and a dump.

`normalise_event` builds that body from one raw Events API 2.0 `data[]` item,
validating every field TikTok defines (PRODUCT.md 3a) and hashing the user's
PII through `gateway.pii`. It refuses only what TikTok refuses or what would
harm the gateway; a value TikTok documents but does not enforce is forwarded as
sent with a field warning (docs/field-rules.md has every rule and its class).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal
from urllib.parse import unquote_plus, urlsplit

from gateway.errors import InvalidEvent
from gateway.field_warnings import OUT_OF_RANGE, UNKNOWN_VALUE, FieldWarning
from gateway.pii import ATT_STATUSES, normalise_user

Source = Literal["pixel", "server"]
SOURCES: tuple[Source, ...] = ("pixel", "server")

# TikTok converts these old names to the new ones on its side (May 2025), so a
# pixel `CompletePayment` and a server `Purchase` are the same event to it.
LEGACY_ALIASES: dict[str, str] = {"CompletePayment": "Purchase", "SubmitForm": "Lead"}


@dataclass(frozen=True, slots=True)
class Event:
    """One copy of an event, normalised and with PII hashed."""

    pixel_code: str
    source: Source
    body: dict[str, Any]
    test_event_code: str | None = None
    event_source: str = "web"
    warnings: tuple[FieldWarning, ...] = ()  # what was flagged, each (field, reason) once

    @property
    def name(self) -> str:
        name: str = self.body["event"]
        return name

    @property
    def event_id(self) -> str | None:
        event_id: str | None = self.body.get("event_id")
        return event_id

    @property
    def event_time(self) -> int:
        event_time: int = self.body["event_time"]
        return event_time


def dedup_name(name: str, legacy_aliases: bool) -> str:
    """The event name as it appears in the dedup key."""
    return LEGACY_ALIASES.get(name, name) if legacy_aliases else name


# --- validation: one Events API 2.0 `data[]` item in, its clean body out ------
#
# `normalise_event` is the single gate every event passes, whatever body shape
# it came in (formats.py converts the shapes first). It raises InvalidEvent
# naming the field by its dotted path inside the event ("properties.value");
# the caller prefixes the event's place in the request ("data.3.").
#
# A cleaner is given the name of its field relative to the object holding it
# (a key, or "" for a list item) and raises with that name; each object or list
# adds its own part as the error passes through it (`InvalidEvent.within`), so a
# path is built only for the field that is refused.

MAX_STRING_LENGTH = 8192  # any string; page.url and user_agent can be this long
MAX_KEY_LENGTH = 256  # a key of a free-form object
MAX_EVENT_ID_LENGTH = 512
MAX_EVENT_NAME_LENGTH = 50  # TikTok's rule for custom event names
MAX_PROPERTIES = 200  # keys in `properties`, and in any free-form object
MAX_CONTENTS = 1000  # items in `properties.contents`
MAX_LIST_ITEMS = 1000  # items in any other list
MAX_NESTING = 8  # levels of objects and lists inside a free-form value
MAX_FUTURE_SECONDS = 300  # PRODUCT.md 4: later than this is refused at ingest
MAX_NUMBER_TEXT = 64  # characters in a numeric string
# Unix times at or above this are milliseconds: 1e11 s is the year 5138, and
# 1e11 ms is 1973, so no real time of either kind is on the wrong side.
MILLISECONDS_FROM = 10**11
# orjson serialises integers up to 64 bits; anything wider would fail at store.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1

EVENT_SOURCES: tuple[str, ...] = ("web", "app", "offline", "crm")

# TIKTOK_API.md 4: current web names, legacy names still accepted, app names.
# fmt: off
STANDARD_EVENTS = frozenset(
    {
        "AddPaymentInfo", "AddToCart", "AddToWishlist", "ApplicationApproval",
        "CompleteRegistration", "Contact", "CustomizeProduct", "Download", "FindLocation",
        "InitiateCheckout", "Lead", "Purchase", "Schedule", "Search", "StartTrial",
        "SubmitApplication", "Subscribe", "ViewContent", "ClickButton", "CompletePayment",
        "PlaceAnOrder", "SubmitForm", "Pageview", "PageView", "AchieveLevel", "Checkout",
        "CompleteTutorial", "CreateGroup", "CreateRole", "GenerateLead", "InAppADClick",
        "InAppADImpr", "InstallApp", "JoinGroup", "LaunchAPP", "LoanApplication",
        "LoanApproval", "LoanDisbursal", "Login", "Rate", "Registration", "SpendCredits",
        "UnlockAchievement",
    }
)

# ISO 4217 (current codes plus a few recently withdrawn that clients still
# send). TikTok documents a subset; any other code is forwarded with a warning.
CURRENCIES = frozenset(
    {
        "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD",
        "BDT", "BGN", "BHD", "BIF", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP",
        "BYN", "BYR", "BZD", "CAD", "CDF", "CHE", "CHF", "CHW", "CLF", "CLP", "CNY", "COP",
        "COU", "CRC", "CUC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP", "ERN",
        "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD",
        "HKD", "HNL", "HRK", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD",
        "JOD", "JPY", "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK",
        "LBP", "LKR", "LRD", "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP",
        "MRO", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN", "NIO",
        "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "PYG", "QAR",
        "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE",
        "SLL", "SOS", "SRD", "SSP", "STD", "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT",
        "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "USN", "UYI", "UYU",
        "UYW", "UZS", "VED", "VEF", "VES", "VND", "VUV", "WST", "XAF", "XAG", "XAU", "XBA",
        "XBB", "XBC", "XBD", "XCD", "XCG", "XDR", "XOF", "XPD", "XPF", "XPT", "XSU", "XTS",
        "XUA", "XXX", "YER", "ZAR", "ZMW", "ZWG", "ZWL",
    }
)
# fmt: on
CONTENT_TYPES = frozenset({"product", "product_group"})

_EVENT_NAME = re.compile(rf"[A-Za-z][A-Za-z0-9_-]{{0,{MAX_EVENT_NAME_LENGTH - 1}}}")
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


def is_standard_event(name: str) -> bool:
    """True for TikTok's standard event names (case-sensitive)."""
    return name in STANDARD_EVENTS


def normalise_event(
    raw: Mapping[str, Any],
    *,
    now: float,
    phone_region: str | None,
    warnings: list[FieldWarning],
) -> dict[str, Any]:
    """The clean Events API 2.0 body of one event; raises InvalidEvent naming the field.

    Unknown top-level fields are dropped; null, "", [] and {} count as absent.
    Dropped user values and values TikTok only advises against append a field
    warning to `warnings`.
    """
    body: dict[str, Any] = {
        "event": validate_event_name(raw.get("event")),
        "event_time": parse_event_time(raw.get("event_time"), now=now),
    }
    event_id = validate_event_id(raw.get("event_id"))
    if event_id is not None:
        body["event_id"] = event_id
    user_raw = _object(raw.get("user"), "user")
    if user_raw:
        user = normalise_user(user_raw, path="user", region=phone_region, warnings=warnings)
        if user:
            body["user"] = user
    for key, clean in _SECTIONS.items():
        section = raw.get(key)
        if section is None:  # absent; every cleaner gives None for it
            continue
        value = clean(section, key)
        if value is not None:
            body[key] = value
    properties = body.get("properties")
    if properties is not None:
        advise(properties, warnings)
        _lift_content_type(properties)
        _fill_value(properties)
    _advise_share_and_att(body, warnings)
    _fill_ttclid_from_page(body)
    return body


def validate_event_name(value: Any, field: str = "event") -> str:
    """The event name; standard names as given, custom ones by TikTok's rule."""
    if value is None or value == "":
        raise InvalidEvent(field, "is required")
    if not isinstance(value, str):
        raise InvalidEvent(field, "must be a string")
    if value in STANDARD_EVENTS or _EVENT_NAME.fullmatch(value):
        return value
    raise InvalidEvent(
        field,
        f"must start with a letter and have at most {MAX_EVENT_NAME_LENGTH} letters, "
        "digits, '_' or '-'",
    )


def validate_event_id(value: Any, field: str = "event_id") -> str | None:
    """The event id as a string (a number is converted); None when absent."""
    text = _id_text(value, field)
    if text is None or not text.strip():
        return None
    if len(text) > MAX_EVENT_ID_LENGTH:
        raise InvalidEvent(field, f"is longer than {MAX_EVENT_ID_LENGTH} characters")
    return text


def parse_event_time(value: Any, *, now: float, field: str = "event_time") -> int:
    """Integer Unix seconds; missing is `now`; unreadable or future raises."""
    if value is None or value == "":
        return int(now)
    try:
        seconds = parse_timestamp(value)
    except ValueError:
        raise InvalidEvent(
            field, "must be Unix seconds or milliseconds, or an ISO 8601 time"
        ) from None
    if seconds < 0:
        raise InvalidEvent(field, "must not be before 1970")
    if seconds > now + MAX_FUTURE_SECONDS:
        raise InvalidEvent(field, f"is more than {MAX_FUTURE_SECONDS} seconds in the future")
    return seconds


def parse_timestamp(value: Any) -> int:
    """Unix seconds (floored) from any accepted time form; ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip()
        number = _parse_number_text(text)
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


@functools.lru_cache(maxsize=256)  # a beacon's URL is read for its body, then for the cookie
def ttclid_from_url(url: str) -> str | None:
    """The `ttclid` query parameter of a page URL, if any."""
    if "ttclid" not in url:  # most URLs; parsing them is the expensive part
        return None
    try:
        query = urlsplit(url).query
    except ValueError:  # e.g. an unclosed "[" in the host
        return None
    # The first ttclid as parse_qs reads it, without decoding every other parameter:
    # a field with no "=" or an empty value is skipped; "+" is a space, %XX a byte.
    for field in query.split("&"):
        name, _, value = field.partition("=")
        if value and (name == "ttclid" or (_encoded(name) and unquote_plus(name) == "ttclid")):
            ttclid = unquote_plus(value)
            return ttclid if ttclid.strip() else None
    return None


def _encoded(text: str) -> bool:
    return "%" in text or "+" in text


def _fill_ttclid_from_page(body: dict[str, Any]) -> None:
    # The click id in the landing URL is the one TikTok issued; use it when the
    # client did not send one (formats.py makes it win for browser events).
    url = body.get("page", {}).get("url")
    if not url or body.get("user", {}).get("ttclid"):
        return
    ttclid = ttclid_from_url(url)
    if ttclid is not None:
        body.setdefault("user", {})["ttclid"] = ttclid


# --- typed field cleaners: (value, dotted field) -> clean value or None -------


def _object(value: Any, field: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidEvent(field, "must be an object")
    return value


def _text(value: Any, field: str) -> str | None:
    if type(value) is str and len(value) <= MAX_STRING_LENGTH:  # nearly every value
        return value or None
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEvent(field, "must be a string")
    if len(value) > MAX_STRING_LENGTH:
        raise InvalidEvent(field, f"is longer than {MAX_STRING_LENGTH} characters")
    return value or None


def _id_text(value: Any, field: str) -> str | None:
    """A string id; TikTok wants strings, so a JSON number becomes its digits."""
    if type(value) is str:
        return _text(value, field)
    if isinstance(value, _NUMBERS) and not isinstance(value, bool):
        number = _as_number(value)
        if number is None:
            raise InvalidEvent(field, "must be a string")
        if isinstance(number, float) and number.is_integer():
            number = int(number)
        return str(number) if isinstance(number, int) else repr(number)
    return _text(value, field)


def _id_list(value: Any, field: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        value = [value]  # a lone id is a list of one
    if len(value) > MAX_LIST_ITEMS:
        raise InvalidEvent(field, f"has more than {MAX_LIST_ITEMS} items")
    ids: list[str] = []
    for index, item in enumerate(value):
        try:
            text = _id_text(item, "")
        except InvalidEvent as exc:
            raise exc.within(f"{field}.{index}") from None
        if text:
            ids.append(text)
    return ids or None


def _bool(value: Any, field: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise InvalidEvent(field, "must be true or false")


def _parse_number_text(text: str) -> int | float | None:
    """A number written as a string ("10.00", "3"), or None if it is not one."""
    if len(text) > MAX_NUMBER_TEXT or not _NUMBER.fullmatch(text):
        return None
    if _INTEGER.fullmatch(text):
        return int(text)
    number = float(text)
    return number if math.isfinite(number) else None


def _as_number(value: Any) -> int | float | None:
    """A finite number in 64-bit range from a number or numeric string, else None."""
    kind = type(value)  # exactly float or int, as JSON gives them: no bool, no subclass
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is int:
        return value if _INT_MIN <= value <= _INT_MAX else None
    if isinstance(value, str):
        value = _parse_number_text(value.strip())
    if isinstance(value, bool) or not isinstance(value, _NUMBERS):
        return None
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value if _INT_MIN <= value <= _INT_MAX else None


# TikTok's types are enforced here; the ranges and lists it documents are only
# advice (`advise`): a negative value or an unlisted currency is forwarded.


def _money(value: Any, field: str) -> int | float | None:
    if value is None or value == "":
        return None
    number = _as_number(value)
    if number is None:
        raise InvalidEvent(field, "must be a number, digits only (e.g. 10.00)")
    return number


def _whole(value: Any, field: str) -> int | None:
    if type(value) is int and _INT_MIN <= value <= _INT_MAX:  # nearly every value
        return value
    if value is None or value == "":
        return None
    number = _as_number(value)
    if isinstance(number, float) and number.is_integer():
        number = int(number)  # 2.0 is 2; 1e30 is 2**99-ish, out of range below
    if not isinstance(number, int) or not _INT_MIN <= number <= _INT_MAX:
        raise InvalidEvent(field, "must be an integer (within 64 bits)")
    return number


def _share(value: Any, field: str) -> float | None:
    if value is None:
        return None
    number = _as_number(value)
    if number is None:
        raise InvalidEvent(field, "must be a number (TikTok expects 0 to 1)")
    return float(number)


def _currency(value: Any, field: str) -> str | None:
    """A listed code upper-cased; any other string as sent."""
    text = _text(value, field)
    if text is None:
        return None
    code = text.strip().upper()
    return code if code in CURRENCIES else text


def _content_type(value: Any, field: str) -> str | None:
    """`product` or `product_group` lower-cased; any other string (e.g. "socks") as sent."""
    text = _text(value, field)
    if text is None:
        return None
    kind = text.strip().lower()
    return kind if kind in CONTENT_TYPES else text


# What TikTok documents for a field and does not enforce: (holds, reason if not).
_ADVICE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "content_type": (CONTENT_TYPES.__contains__, UNKNOWN_VALUE),
    "currency": (CURRENCIES.__contains__, UNKNOWN_VALUE),
    "value": (lambda number: number >= 0, OUT_OF_RANGE),
    "price": (lambda number: number >= 0, OUT_OF_RANGE),
    "quantity": (lambda number: number >= 1, OUT_OF_RANGE),
    "num_items": (lambda number: number >= 0, OUT_OF_RANGE),
}


# One object's advice, in _ADVICE's order: (field, holds, the warning if not).
Advice = tuple[tuple[str, Callable[[Any], bool], FieldWarning], ...]


def _advice(typed: Mapping[str, Cleaner], path: str) -> Advice:
    """The advice for an object whose fields `typed` cleans, found at `path`. Only
    fields a typed cleaner produced: a free-form "price" could be anything."""
    return tuple(
        (key, holds, FieldWarning(f"{path}.{key}", reason))
        for key, (holds, reason) in _ADVICE.items()
        if key in typed
    )


def advise(properties: Mapping[str, Any], warnings: list[FieldWarning]) -> None:
    """Append a field warning for each cleaned property (and contents item field)
    outside what TikTok documents; the values themselves stay as they are."""
    _advise_fields(properties, _PROPERTY_ADVICE, warnings)
    for item in properties.get("contents") or ():
        _advise_fields(item, _ITEM_ADVICE, warnings)


def _advise_fields(fields: Mapping[str, Any], advice: Advice, warnings: list[FieldWarning]) -> None:
    for key, holds, warning in advice:
        value = fields.get(key)  # a cleaned field is never None
        if value is not None and not holds(value):
            warnings.append(warning)


def _advise_share_and_att(body: Mapping[str, Any], warnings: list[FieldWarning]) -> None:
    share = body.get("ad", {}).get("attribution_share")
    if share is not None and not 0 <= share <= 1:
        warnings.append(FieldWarning("ad.attribution_share", OUT_OF_RANGE))
    att_status = body.get("user", {}).get("att_status")
    if att_status is not None and att_status not in ATT_STATUSES:
        warnings.append(FieldWarning("user.att_status", UNKNOWN_VALUE))


# --- free-form values: custom properties, `device` ----------------------------


def clean_value(value: Any, field: str, depth: int = 0) -> Any:
    """A JSON value with empties dropped and sizes bounded; None when empty."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        return _text(value, field)
    if isinstance(value, _NUMBERS):
        number = _as_number(value)
        if number is None:
            raise InvalidEvent(field, "must be a finite number within 64 bits")
        return number
    if depth >= MAX_NESTING:
        raise InvalidEvent(field, f"nests deeper than {MAX_NESTING} levels")
    if isinstance(value, list):
        return _clean_list(value, field, depth + 1)
    if isinstance(value, dict):
        return _fields(value, field, {}, depth=depth + 1) or None
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


def _fields(
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


def _section(known: Mapping[str, Cleaner], keep_unknown: bool = False) -> Cleaner:
    """A cleaner for an object whose known fields have their own cleaners."""

    def clean(value: Any, field: str) -> dict[str, Any] | None:
        obj = _object(value, field)
        if obj is None:
            return None
        return _fields(obj, field, known, keep_unknown=keep_unknown) or None

    return clean


# --- properties and contents --------------------------------------------------

_ITEM_FIELDS: dict[str, Cleaner] = {
    "price": _money,
    "quantity": _whole,
    "content_id": _id_text,
    "content_type": _content_type,
}
_contents_item = _section(_ITEM_FIELDS, keep_unknown=True)


def _contents(value: Any, field: str) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise InvalidEvent(field, "must be a list of objects")
    if len(value) > MAX_CONTENTS:
        raise InvalidEvent(field, f"has more than {MAX_CONTENTS} items")
    items: list[dict[str, Any]] = []
    for index, item in enumerate(value):
        try:
            cleaned = _contents_item(item, "")
        except InvalidEvent as exc:
            raise exc.within(f"{field}.{index}") from None
        if cleaned is not None:
            items.append(cleaned)
    return items or None


_PROPERTY_FIELDS: dict[str, Cleaner] = {
    **_ITEM_FIELDS,
    "value": _money,
    "currency": _currency,
    "num_items": _whole,
    "content_ids": _id_list,
    "contents": _contents,
    "order_id": _id_text,
    "shop_id": _id_text,
}


_PROPERTY_ADVICE = _advice(_PROPERTY_FIELDS, "properties")
_ITEM_ADVICE = _advice(_ITEM_FIELDS, "properties.contents")


def _properties(value: Any, field: str) -> dict[str, Any] | None:
    """Every property kept; the ones TikTok defines are validated."""
    obj = _object(value, field)
    if obj is None:
        return None
    return _fields(obj, field, _PROPERTY_FIELDS) or None


def _lift_content_type(properties: dict[str, Any]) -> None:
    # Events 1.0 puts content_type on each item; 2.0 has one per event.
    contents = properties.get("contents")
    if not contents:
        return
    lifted = [item.pop("content_type") for item in contents if "content_type" in item]
    if not lifted:  # nothing moved (most events): no item can have become empty
        return
    properties.setdefault("content_type", lifted[0])
    contents = [item for item in contents if item]  # an item may have held only that
    if contents:
        properties["contents"] = contents
    else:
        del properties["contents"]


def _fill_value(properties: dict[str, Any]) -> None:
    """Set `value` to sum(price * quantity) when absent and every item has both."""
    contents = properties.get("contents")
    if "value" in properties or not contents:
        return
    if not all("price" in item and "quantity" in item for item in contents):
        return
    # Decimal of each float's shortest repr: 0.1 * 3 is 0.3, not 0.30000000000000004.
    total = sum(Decimal(repr(item["price"])) * item["quantity"] for item in contents)
    value = float(total)
    if math.isfinite(value):
        properties["value"] = value


# --- the other sections of a 2.0 event ----------------------------------------

_SECTIONS: dict[str, Cleaner] = {
    "page": _section({"url": _text, "referrer": _text}),
    "properties": _properties,
    "app": _section({"app_id": _id_text, "app_name": _text, "app_version": _text}),
    "ad": _section(
        {
            "callback": _text,
            "campaign_id": _id_text,
            "ad_id": _id_text,
            "creative_id": _id_text,
            "is_retargeting": _bool,
            "attributed": _bool,
            "attribution_type": _text,
            "attribution_provider": _text,
            "attribution_share": _share,
        }
    ),
    "lead": _section({"lead_id": _id_text, "lead_event_source": _text}),
    "device": _section({}, keep_unknown=True),
    "limited_data_use": _bool,
}
