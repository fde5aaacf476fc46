"""TikTok's body shapes in, `Event`s out; pure, no I/O.

Four shapes reach the gateway (PRODUCT.md 2):

    parse_event_track   Events API 2.0: event_source, event_source_id, data[]
    parse_pixel_track   Events 1.0, one event: pixel_code, event, timestamp, context, ...
    parse_pixel_batch   Events 1.0, pixel_code + batch[] of such events
    parse_browser       our /pixel/events: one event object or a list of them

Each converts its events to the Events API 2.0 `data[]` form and passes them
through `normalise.normalise_event`, the one validator. A problem with the whole
request raises InvalidRequest; a problem with one event becomes a `Refusal`
naming the field by its path in the request ("data.3.event_time"), and the
other events are still returned (pixel/track, having one event, raises
InvalidEvent instead). Dropped match keys (a bad ip, an unusable phone) and
values TikTok only advises against are not refusals: each accepted `Event`
carries its field warnings, each (field, reason) once.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.errors import InvalidEvent, InvalidRequest
from gateway.events import EVENT_SOURCES, Event
from gateway.field_warnings import FieldWarning
from gateway.normalise import normalise_event, ttclid_from_url

MAX_JSON_DEPTH = 32  # nesting of objects and lists in a request body
DEFAULT_MAX_EVENTS = 1000  # TikTok's own cap per request
MAX_CODE_LENGTH = 64  # pixel_code / event_source_id
MAX_TEST_EVENT_CODE_LENGTH = 256

# Letters, digits, '_' and '-': what TikTok's pixel codes and event set ids
# are made of, and nothing that could break a Redis key's {hash tag}.
_PIXEL_CODE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_CODE_LENGTH}}}")
_BOM = b"\xef\xbb\xbf"
# A body's brackets as "(" and ")", its quotes kept, every other byte deleted.
_AS_NESTING = bytes.maketrans(b"{[}]", b"(())")
_NOT_NESTING = bytes(sorted(set(range(256)) - set(b'{}[]"')))


@dataclass(frozen=True, slots=True)
class ParseOptions:
    """How to read a body: the time of receipt and the deployment's choices."""

    now: float  # time of receipt, Unix seconds
    phone_region: str | None = None  # region for phones without country code
    max_events: int = DEFAULT_MAX_EVENTS


@dataclass(frozen=True, slots=True)
class BrowserContext:
    """What the HTTP layer learned from the browser request itself."""

    ip: str | None = None
    user_agent: str | None = None
    ttp: str | None = None  # the _ttp cookie
    ttclid_cookie: str | None = None  # a ttclid cookie


@dataclass(frozen=True, slots=True)
class Refusal:
    """One event of a request that was not accepted, and why."""

    index: int  # position of the event in the request
    field: str  # dotted path as TikTok writes it, e.g. "data.3.event_time"
    message: str


@dataclass(frozen=True, slots=True)
class ParsedBody:
    """The accepted events of one request (with their field warnings) and the refused ones."""

    pixel_code: str | None  # pixel whose Access-Token is checked; None for browser bodies
    events: list[Event]
    refused: list[Refusal]


# An event's 2.0 path -> its path in the body as sent, e.g. ("user.ip", "context.ip").
Renames = list[tuple[str, str]]
# One raw event in, its Event out. Raises InvalidEvent with the field's path in
# 2.0 form; appends to the warnings and renames lists it is given.
Converter = Callable[[Any, list[FieldWarning], Renames], Event]


# --- JSON ---------------------------------------------------------------------


def decode_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The parsed body; InvalidRequest for non-UTF-8, invalid JSON or deep nesting."""
    if raw.startswith(_BOM):  # some text/plain senders prepend one
        raw = raw[len(_BOM) :]
    try:
        doc = orjson.loads(raw)  # it refuses invalid UTF-8 too
    except orjson.JSONDecodeError as exc:
        raise _decode_error(raw, exc, max_depth) from None
    if _depth_exceeds(raw, doc, max_depth):
        raise _too_deep(max_depth)
    return doc


def _decode_error(raw: bytes, exc: orjson.JSONDecodeError, max_depth: int) -> InvalidRequest:
    """What is wrong with a body orjson refused, said as precisely as we can."""
    if not raw.strip():
        return InvalidRequest("", "body is empty")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return InvalidRequest("", f"body is not valid UTF-8 (byte {bad.start})")
    if "depth" in exc.msg or "recursion" in exc.msg:
        return _too_deep(max_depth)
    return InvalidRequest(
        "", f"body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    )


def _too_deep(max_depth: int) -> InvalidRequest:
    return InvalidRequest("", f"body nests objects and lists deeper than {max_depth} levels")


def _depth_exceeds(raw: bytes, doc: Any, max_depth: int) -> bool:
    # A body with fewer opening brackets than the limit cannot nest deeper (a beacon has
    # a handful).
    if raw.count(b"{") + raw.count(b"[") <= max_depth:
        return False
    nesting = _bracket_nesting(raw)
    if nesting is not None:
        for _ in range(max_depth):
            # Each pass takes away the innermost level: "()" is a container holding none.
            nesting = nesting.replace(b"()", b"")
            if not nesting:
                return False
        return True
    return _walk_exceeds(doc, max_depth)


def _bracket_nesting(raw: bytes) -> bytes | None:
    """The valid JSON body's brackets alone, "(" and ")", in C loops rather than a walk of
    every parsed value; None when strings might hold brackets or quotes, so only a walk
    can tell. UTF-8 never has these bytes inside a multi-byte character."""
    if b"\\" in raw:  # an escaped quote would end a string early here
        return None
    # Without escapes a string runs from one quote to the next. If no string holds a
    # bracket each is '""' here, and taking those away leaves no quote (a string that
    # holds one keeps its quotes, a pair split by its bracket).
    nesting = raw.translate(_AS_NESTING, _NOT_NESTING).replace(b'""', b"")
    return None if b'"' in nesting else nesting


def _walk_exceeds(doc: Any, max_depth: int) -> bool:
    """Whether the parsed document nests deeper than `max_depth`."""
    # Iterative, so a deep document cannot exhaust the stack here either. orjson makes
    # exactly dicts and lists, so `type(...) is` will do (several times faster).
    stack: list[tuple[Any, int]] = [(doc, 1)] if type(doc) in (dict, list) else []
    while stack:
        value, depth = stack.pop()
        if depth > max_depth:
            return True
        for child in value.values() if type(value) is dict else value:
            if type(child) is dict or type(child) is list:
                stack.append((child, depth + 1))
    return False


# --- the four shapes ------------------------------------------------------------


def parse_event_track(doc: Any, opts: ParseOptions) -> ParsedBody:
    """An Events API 2.0 body (`/open_api/v1.3/event/track/`)."""
    body = _request_object(doc)
    event_source = _event_source(body.get("event_source"))
    pixel_code = _pixel_code(body.get("event_source_id"), "event_source_id")
    test_code = _test_event_code(body.get("test_event_code"), "test_event_code", InvalidRequest)
    items = _event_list(body.get("data"), "data", opts)

    def convert(raw: Any, warnings: list[FieldWarning], renames: Renames) -> Event:
        item = _event_object(raw)
        user = item.get("user")
        aliased = _with_user_aliases(user, "user", renames)
        if aliased is not user:  # copied only when an alias moved (the body stays as sent)
            item = dict(item, user=aliased)
        # Segment once sent test_event_code inside data[]; honour it there too.
        code = test_code or _test_event_code(item.get("test_event_code"), "test_event_code")
        event_body = _normalise(item, opts, warnings)
        return Event(pixel_code, "server", event_body, code, event_source)

    return _parse_events(items, "data", convert, pixel_code)


def parse_pixel_track(doc: Any, opts: ParseOptions) -> ParsedBody:
    """An Events 1.0 single event (`/open_api/v1.x/pixel/track/`); InvalidEvent if bad."""
    body = _request_object(doc)
    pixel_code = _pixel_code(body.get("pixel_code"), "pixel_code")
    test_code = _test_event_code(body.get("test_event_code"), "test_event_code", InvalidRequest)
    warnings: list[FieldWarning] = []
    renames: Renames = []
    try:
        event = _pixel_event(body, pixel_code, test_code, opts, warnings, renames)
    except InvalidEvent as exc:
        raise InvalidEvent(_translate(exc.field, renames), exc.detail) from None
    return ParsedBody(pixel_code, [_with_warnings(event, warnings)], [])


def parse_pixel_batch(doc: Any, opts: ParseOptions) -> ParsedBody:
    """An Events 1.0 batch (`/open_api/v1.x/pixel/batch/`): pixel_code and batch[]."""
    body = _request_object(doc)
    pixel_code = _pixel_code(body.get("pixel_code"), "pixel_code")
    test_code = _test_event_code(body.get("test_event_code"), "test_event_code", InvalidRequest)
    items = _event_list(body.get("batch"), "batch", opts)

    def convert(raw: Any, warnings: list[FieldWarning], renames: Renames) -> Event:
        item = _event_object(raw)
        if item.get("type") not in (None, "track"):
            raise InvalidEvent("type", "must be 'track'")
        return _pixel_event(item, pixel_code, test_code, opts, warnings, renames)

    return _parse_events(items, "batch", convert, pixel_code)


def parse_browser(doc: Any, opts: ParseOptions, ctx: BrowserContext) -> ParsedBody:
    """Our browser endpoint: one event object, or a list of them, each with its pixel_code.

    An event's bad pixel_code is a refusal of that event, not of the request.
    """
    if isinstance(doc, dict):
        items, prefix = [doc], ""
    elif isinstance(doc, list):
        items, prefix = _event_list(doc, "events", opts), "events"
    else:
        raise InvalidRequest("", "body must be an event object or a list of them")

    def convert(raw: Any, warnings: list[FieldWarning], renames: Renames) -> Event:
        return _browser_event(_event_object(raw), ctx, opts, warnings, renames)

    return _parse_events(items, prefix, convert, None)


# --- shared steps -----------------------------------------------------------------


def _parse_events(
    items: list[Any], prefix: str, convert: Converter, pixel_code: str | None
) -> ParsedBody:
    """Convert each event; a bad one becomes a Refusal and its warnings are discarded."""
    events: list[Event] = []
    refused: list[Refusal] = []
    for index, raw in enumerate(items):
        warnings: list[FieldWarning] = []
        renames: Renames = []
        try:
            events.append(_with_warnings(convert(raw, warnings, renames), warnings))
        except InvalidEvent as exc:
            field = _translate(exc.field, renames)
            refused.append(Refusal(index, _join(prefix, index, field), exc.detail))
    return ParsedBody(pixel_code, events, refused)


def _with_warnings(event: Event, warnings: list[FieldWarning]) -> Event:
    """The event carrying its warnings, each (field, reason) once, in order of finding."""
    if not warnings:  # nearly every event: no copy
        return event
    return dataclasses.replace(event, warnings=tuple(dict.fromkeys(warnings)))


def _join(prefix: str, index: int, field: str) -> str:
    head = f"{prefix}.{index}" if prefix else ""
    return ".".join(part for part in (head, field) if part)


def _translate(field: str, renames: Renames) -> str:
    """The path as the client sent it, for a path in the 2.0 form."""
    for new, old in sorted(renames, key=lambda pair: len(pair[0]), reverse=True):
        if field == new or field.startswith(new + "."):
            return old + field[len(new) :]
    return field


def _normalise(
    item: dict[str, Any], opts: ParseOptions, warnings: list[FieldWarning]
) -> dict[str, Any]:
    return normalise_event(item, now=opts.now, phone_region=opts.phone_region, warnings=warnings)


def _request_object(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InvalidRequest("", "body must be a JSON object")
    return doc


def _event_object(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidEvent("", "must be an object")
    return raw


def _event_list(value: Any, field: str, opts: ParseOptions) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest(field, "must be a non-empty list of events")
    if len(value) > opts.max_events:
        raise InvalidRequest(
            field, f"has {len(value)} events; at most {opts.max_events} are allowed"
        )
    return value


def _event_source(value: Any) -> str:
    if value is None:
        return "web"
    if value not in EVENT_SOURCES:
        raise InvalidRequest("event_source", f"must be one of {', '.join(EVENT_SOURCES)}")
    source: str = value
    return source


def _pixel_code(value: Any, field: str, error: type[InvalidRequest] = InvalidRequest) -> str:
    # Offline and CRM event set ids are numbers; clients send them unquoted.
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        value = str(value)
    if value is None or value == "":
        raise error(field, "is required")
    if not isinstance(value, str) or not _PIXEL_CODE.fullmatch(value):
        raise error(field, f"must be up to {MAX_CODE_LENGTH} letters, digits, '_' or '-'")
    return value


def _test_event_code(
    value: Any, field: str, error: type[InvalidRequest] = InvalidEvent
) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_TEST_EVENT_CODE_LENGTH:
        raise error(field, f"must be a string of at most {MAX_TEST_EVENT_CODE_LENGTH}")
    return value


# Other names clients use for user fields: Events 1.0 `phone_number`, and the
# pre-hashed keys of the pixel's `ttq.identify`.
USER_ALIASES = {"phone_number": "phone", "sha256_email": "email", "sha256_phone_number": "phone"}


def _with_user_aliases(user: Any, path: str, renames: Renames) -> Any:
    """The user object with aliased fields under their 2.0 names (the 2.0 name wins)."""
    if not isinstance(user, dict) or not USER_ALIASES.keys() & user.keys():
        return user
    user = dict(user)
    for alias, name in USER_ALIASES.items():
        if alias not in user:
            continue
        value = user.pop(alias)
        if user.get(name) in (None, "", []):
            user[name] = value
            renames.append((f"user.{name}", f"{path}.{alias}"))
    return user


# --- Events 1.0 ---------------------------------------------------------------------

# Where Events 1.0 keeps what 2.0 has in `user`: (2.0 user field, 1.0 context field).
_CONTEXT_TO_USER = (("ip", "ip"), ("user_agent", "user_agent"), ("locale", "locale"))


def _pixel_event(
    raw: dict[str, Any],
    pixel_code: str,
    test_code: str | None,
    opts: ParseOptions,
    warnings: list[FieldWarning],
    renames: Renames,
) -> Event:
    """One Events 1.0 event as an Event; `renames` learns the 1.0 paths of moved fields."""
    item = _pixel_to_v2(raw, renames)
    code = test_code or _test_event_code(raw.get("test_event_code"), "test_event_code")
    return Event(pixel_code, "server", _normalise(item, opts, warnings), code, "web")


def _pixel_to_v2(raw: dict[str, Any], renames: Renames) -> dict[str, Any]:
    """The 1.0 event in 2.0 form (TIKTOK_API.md 2.4)."""
    renames.extend([("user", "context.user"), ("page", "context.page")])
    context = _sub_object(raw.get("context"), "context")
    user = dict(_sub_object(context.get("user"), "context.user"))
    user = _with_user_aliases(user, "context.user", renames)
    for user_key, context_key in _CONTEXT_TO_USER:
        if context.get(context_key) not in (None, "") and user.get(user_key) in (None, ""):
            user[user_key] = context[context_key]
            renames.append((f"user.{user_key}", f"context.{context_key}"))
    ad = _sub_object(context.get("ad"), "context.ad")
    if ad.get("callback") not in (None, "") and user.get("ttclid") in (None, ""):
        user["ttclid"] = ad["callback"]  # the 1.0 name of the click id
        renames.append(("user.ttclid", "context.ad.callback"))
    item = _common_fields(raw, renames)
    item.update(user=user, page=context.get("page"))
    return item


def _common_fields(raw: dict[str, Any], renames: Renames) -> dict[str, Any]:
    """The fields 1.0 and browser events share with 2.0; `timestamp` is `event_time`."""
    time_key = "timestamp" if raw.get("timestamp") not in (None, "") else "event_time"
    if time_key == "timestamp":
        renames.append(("event_time", "timestamp"))
    return {
        "event": raw.get("event"),
        "event_id": raw.get("event_id"),
        "properties": raw.get("properties"),
        "limited_data_use": raw.get("limited_data_use"),
        "event_time": raw.get(time_key),
    }


def _sub_object(value: Any, field: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidEvent(field, "must be an object")
    return value


# --- browser ------------------------------------------------------------------------


def _browser_event(
    raw: dict[str, Any],
    ctx: BrowserContext,
    opts: ParseOptions,
    warnings: list[FieldWarning],
    renames: Renames,
) -> Event:
    pixel_code = _pixel_code(raw.get("pixel_code"), "pixel_code", InvalidEvent)
    code = _test_event_code(raw.get("test_event_code"), "test_event_code")
    item = _common_fields(raw, renames)
    page = raw.get("page")
    user = _with_user_aliases(_sub_object(raw.get("user"), "user"), "user", renames)
    item.update(user=_browser_user(user, page, ctx), page=page)
    return Event(pixel_code, "pixel", _normalise(item, opts, warnings), code, "web")


def _browser_user(user: dict[str, Any], page: Any, ctx: BrowserContext) -> dict[str, Any]:
    """The body's user with what the request itself tells: ttclid, ttp, ip, user agent."""
    user = dict(user)
    url = page.get("url") if isinstance(page, dict) else None
    from_url = ttclid_from_url(url) if isinstance(url, str) else None
    if from_url:  # the landing URL is TikTok's own word on the click
        user["ttclid"] = from_url
    elif user.get("ttclid") in (None, "") and ctx.ttclid_cookie:
        user["ttclid"] = ctx.ttclid_cookie
    if user.get("ttp") in (None, "") and ctx.ttp:
        user["ttp"] = ctx.ttp
    # The request's own address and agent are trusted over what the page says.
    if ctx.ip:
        user["ip"] = ctx.ip
    if ctx.user_agent:
        user["user_agent"] = ctx.user_agent
    return user


__all__ = [
    "DEFAULT_MAX_EVENTS",
    "MAX_JSON_DEPTH",
    "BrowserContext",
    "ParseOptions",
    "ParsedBody",
    "Refusal",
    "decode_json",
    "parse_browser",
    "parse_event_track",
    "parse_pixel_batch",
    "parse_pixel_track",
]
