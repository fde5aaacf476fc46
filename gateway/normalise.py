"""`normalise_event`: one Events API 2.0 `data[]` item in, its clean body out; no I/O here.

It is the single gate every event passes, whatever body shape it came in
(formats.py converts the shapes first). It validates every field TikTok defines
(PRODUCT.md 3a) with the typed cleaners of `gateway.fields` and hashes the
user's PII through `gateway.pii`. It refuses only what TikTok refuses or what
would harm the gateway, raising InvalidEvent naming the field by its dotted
path inside the event ("properties.value"); the caller prefixes the event's
place in the request ("data.3."). A value TikTok documents but does not enforce
is forwarded as sent with a field warning (docs/field-rules.md has every rule
and its class).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import unquote_plus, urlsplit

from gateway.errors import InvalidEvent
from gateway.events import STANDARD_EVENTS
from gateway.field_warnings import OUT_OF_RANGE, UNKNOWN_VALUE, FieldWarning
from gateway.fields import (
    Cleaner,
    clean_bool,
    clean_fields,
    clean_id,
    clean_id_list,
    clean_money,
    clean_object,
    clean_share,
    clean_text,
    clean_whole,
    parse_timestamp,
    section_cleaner,
)
from gateway.pii import ATT_STATUSES, normalise_user

MAX_EVENT_ID_LENGTH = 512
MAX_EVENT_NAME_LENGTH = 50  # TikTok's rule for custom event names
MAX_CONTENTS = 1000  # items in `properties.contents`
MAX_FUTURE_SECONDS = 300  # PRODUCT.md 4: later than this is refused at ingest

# fmt: off
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
    user_raw = clean_object(raw.get("user"), "user")
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
    text = clean_id(value, field)
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


def _currency(value: Any, field: str) -> str | None:
    """A listed code upper-cased; any other string as sent."""
    text = clean_text(value, field)
    if text is None:
        return None
    code = text.strip().upper()
    return code if code in CURRENCIES else text


def _content_type(value: Any, field: str) -> str | None:
    """`product` or `product_group` lower-cased; any other string (e.g. "socks") as sent."""
    text = clean_text(value, field)
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


# --- properties and contents --------------------------------------------------

_ITEM_FIELDS: dict[str, Cleaner] = {
    "price": clean_money,
    "quantity": clean_whole,
    "content_id": clean_id,
    "content_type": _content_type,
}
_contents_item = section_cleaner(_ITEM_FIELDS, keep_unknown=True)


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
    "value": clean_money,
    "currency": _currency,
    "num_items": clean_whole,
    "content_ids": clean_id_list,
    "contents": _contents,
    "order_id": clean_id,
    "shop_id": clean_id,
}


_PROPERTY_ADVICE = _advice(_PROPERTY_FIELDS, "properties")
_ITEM_ADVICE = _advice(_ITEM_FIELDS, "properties.contents")


def _properties(value: Any, field: str) -> dict[str, Any] | None:
    """Every property kept; the ones TikTok defines are validated."""
    obj = clean_object(value, field)
    if obj is None:
        return None
    return clean_fields(obj, field, _PROPERTY_FIELDS) or None


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
    "page": section_cleaner({"url": clean_text, "referrer": clean_text}),
    "properties": _properties,
    "app": section_cleaner({"app_id": clean_id, "app_name": clean_text, "app_version": clean_text}),
    "ad": section_cleaner(
        {
            "callback": clean_text,
            "campaign_id": clean_id,
            "ad_id": clean_id,
            "creative_id": clean_id,
            "is_retargeting": clean_bool,
            "attributed": clean_bool,
            "attribution_type": clean_text,
            "attribution_provider": clean_text,
            "attribution_share": clean_share,
        }
    ),
    "lead": section_cleaner({"lead_id": clean_id, "lead_event_source": clean_text}),
    "device": section_cleaner({}, keep_unknown=True),
    "limited_data_use": clean_bool,
}
