"""Properties of the pure parts, for any input hypothesis can think of.

- One event, written in each of TikTok's shapes (Events API 2.0 `data[]`,
  Events 1.0 `pixel/track` and `pixel/batch`) and as our browser body, is one
  internal event: accepted by all or refused by all, the same body, the same
  refused field (translated to each shape's own path).
- Merging is deterministic, keeps every value of the first copy, and two
  arrival orders differ only where the copies disagree, each order taking the
  first copy's word there.
- Hashing is a projection (a hashed user or event normalises to itself), never
  hashes an empty value, and reproduces TikTok's published examples
  (TIKTOK_API.md 5) from any spelling TikTok's rules normalise to them.
- Every `event_time` form of PRODUCT.md 3a is the same second, in every shape.

tests/test_formats.py, test_events.py, test_merge.py and test_pii.py hold the
example-based tests and the "never raises anything else" fuzzing; this file
checks relations between results instead.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.errors import InvalidEvent, InvalidRequest
from gateway.field_warnings import DROPPED_REASONS, FieldWarning
from gateway.fields import parse_timestamp
from gateway.formats import (
    BrowserContext,
    ParsedBody,
    ParseOptions,
    parse_browser,
    parse_event_track,
    parse_pixel_batch,
    parse_pixel_track,
)
from gateway.merge import is_absent, merge_copies
from gateway.normalise import normalise_event
from gateway.pii import (
    is_sha256_hex,
    normalise_email,
    normalise_external_id,
    normalise_phone,
    normalise_user,
)
from tests.support import sha256

NOW = 1_767_225_700.0  # 2026-01-01T00:01:40Z
OPTS = ParseOptions(now=NOW)
PIXEL = "C4EXAMPLEPIXEL0CODE1"
MISSING: Any = object()  # a field left out of the body altogether

# The machine is shared: a slow draw is not a failure, and no example has a deadline.
relaxed = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# --- one event, any shape -------------------------------------------------------------

# Each field mixes values that are kept, values that are dropped (empty, an
# unusable match key) and, less often, values that refuse the event, so that
# accepted and refused events are both common.


def often(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`common` seven times in eight, else `rare` (one_of would draw each half the time)."""
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda c: common if c else rare)


def mostly(kept: list[Any], refused: list[Any]) -> st.SearchStrategy[Any]:
    """A value from `kept` seven times in eight, else one that refuses the event."""
    return often(st.sampled_from(kept), st.sampled_from(refused))


names = mostly(
    ["Purchase", "CompletePayment", "ViewContent", "AddToCart", "custom_event-1"],
    ["", "9lives", "x" * 51, 42, None],
)

event_ids = st.one_of(
    mostly(["order-100234", "", "  ", 1.5, None, 2**63], ["x" * 513, True, 2**70]),
    st.integers(-5, 10**6),
    st.text(max_size=12),
)
moments = st.datetimes(
    min_value=datetime(1973, 3, 4), max_value=datetime(2025, 12, 31), timezones=st.just(UTC)
)
emails = mostly(
    [" ALICE_abc@gmail.com ", "bob@example.com", "", "  ", "not-an-email", sha256("x").upper(),
     None],
    [5, {"a": 1}],
)  # fmt: skip
phones = mostly(
    ["(+1)2133734253", "+44 20 7946 0958", "2133734253", "abc", "", sha256("p"), 12133734253,
     None],
    [1.5, True],
)  # fmt: skip
ids = mostly(["user_123", " user_123 ", "", " ", 8841, None], [1.5, ["x"]])
raw_texts = mostly(["E.C.P.click", " Mozilla/5.0 ", "", " ", None], [7, ["x"]])
ips = mostly(
    ["203.0.113.7", "2001:db8:0:0::1", "::ffff:203.0.113.7", "999.1.1.1", "", None], [[], 127]
)
urls = mostly(
    ["https://shop.example.com/thanks", "https://shop.example.com/p?ttclid=E.C.P.from-url",
     "https://[bad/?ttclid=x", ""],
    [5],
)  # fmt: skip
money = mostly([59.98, 0, "10.00", "12", None], [-1, "ten"])
content_items = st.fixed_dictionaries(
    {},
    optional={
        "content_id": mostly(["SKU-1", 123, 1.5, ""], [True]),
        "price": money,
        "quantity": mostly([1, 2, "3", None], [0, 1.5]),
        "content_type": mostly(["product", "PRODUCT_GROUP", ""], ["thing"]),
    },
)
properties = often(
    st.fixed_dictionaries(
        {},
        optional={
            "value": money,
            "currency": mostly(["USD", " eur ", ""], ["XXXX", 5]),
            "contents": st.one_of(st.lists(content_items, max_size=3), st.just([])),
            "content_type": mostly(["product", "product_group"], ["x"]),
            "order_id": mostly(["100234", 100234, ""], [True]),
            "custom": st.sampled_from(["x", "", {"a": []}, [1, None]]),
        },
    ),
    st.sampled_from([None, "value=10", []]),
)


@st.composite
def users(draw: st.DrawFn) -> Any:
    """A 2.0 user object, in the order Events 1.0's conversion rebuilds it (so errors agree)."""
    if not draw(st.sampled_from([True] * 15 + [False])):
        return draw(st.sampled_from([["jane@example.com"], "jane@example.com"]))
    fields = {
        "email": draw(st.one_of(emails, st.lists(emails, max_size=3))),
        "external_id": draw(st.one_of(ids, st.lists(ids, max_size=2))),
        "ttp": draw(raw_texts),
        "phone": draw(st.one_of(phones, st.lists(phones, max_size=2))),
        "ip": draw(ips),
        "user_agent": draw(raw_texts),
        "locale": draw(mostly(["en-US", "", None], [1])),
        "ttclid": draw(raw_texts),
    }
    keep = draw(st.sets(st.sampled_from(sorted(fields))))
    return {key: value for key, value in fields.items() if key in keep}


@st.composite
def abstract_events(draw: st.DrawFn) -> dict[str, Any]:
    """One event in 2.0 terms, with only what every shape can carry; MISSING = left out."""

    def maybe(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(st.one_of(st.just(MISSING), strategy))

    moment = draw(moments)
    event = {
        "event": draw(often(names, st.just(MISSING))),
        "event_time": maybe(often(time_forms(moment), st.sampled_from(["soon", NOW + 3600]))),
        "event_id": maybe(event_ids),
        "user": maybe(users()),
        "page": maybe(
            often(
                st.fixed_dictionaries({}, optional={"url": urls, "referrer": urls}),
                st.just("https://shop.example.com/"),
            )
        ),
        "properties": maybe(properties),
        "limited_data_use": maybe(mostly([True, False, None], ["yes"])),
    }
    page = event["page"]
    url = page.get("url") if isinstance(page, dict) else None
    user = event["user"]
    if isinstance(url, str) and "ttclid=" in url and isinstance(user, dict):
        # The browser shape trusts the landing URL over the body's ttclid, the server
        # shapes the other way round (formats._browser_user): not comparable, by design.
        user.pop("ttclid", None)
    return event


def present(mapping: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in mapping.items() if value is not MISSING}


def as_event_track(event: dict[str, Any], test_code: str | None) -> dict[str, Any]:
    body = {"event_source": "web", "event_source_id": PIXEL, "data": [present(event)]}
    return body if test_code is None else {**body, "test_event_code": test_code}


def as_pixel_event(event: dict[str, Any]) -> dict[str, Any]:
    """The 1.0 form (TIKTOK_API.md 2.4): timestamp, context.user/ip/user_agent/ad/page."""
    item = present({key: event[key] for key in ("event", "event_id", "properties")})
    item["limited_data_use"] = event["limited_data_use"]
    item["timestamp"] = event["event_time"]
    context: dict[str, Any] = {"page": event["page"]}
    user = event["user"]
    if isinstance(user, dict):
        renamed = {"phone": "phone_number"}
        context["user"] = {renamed.get(k, k): v for k, v in user.items()
                           if k in ("email", "external_id", "ttp", "phone")}  # fmt: skip
        for key in ("ip", "user_agent", "locale"):
            context[key] = user.get(key, MISSING)
        if "ttclid" in user:
            context["ad"] = {"callback": user["ttclid"]}
    else:
        context["user"] = user
    item["context"] = present(context)
    return present(item)


def as_pixel_track(event: dict[str, Any], test_code: str | None) -> dict[str, Any]:
    body = {"pixel_code": PIXEL, **as_pixel_event(event)}
    return body if test_code is None else {**body, "test_event_code": test_code}


def as_pixel_batch(event: dict[str, Any], test_code: str | None) -> dict[str, Any]:
    body = {"pixel_code": PIXEL, "batch": [{"type": "track", **as_pixel_event(event)}]}
    return body if test_code is None else {**body, "test_event_code": test_code}


def as_browser(event: dict[str, Any], test_code: str | None) -> dict[str, Any]:
    item = present({**event, "event_time": MISSING, "timestamp": event["event_time"]})
    return {"pixel_code": PIXEL, **item, **({"test_event_code": test_code} if test_code else {})}


def v1_path(path: str) -> str:
    """A 2.0 field path as Events 1.0 spells it (TIKTOK_API.md 2.4)."""
    head, _, rest = path.partition(".")
    if head == "event_time":
        return "timestamp"
    if head in ("page", "user"):
        moved = {"ip": "context.ip", "user_agent": "context.user_agent",
                 "locale": "context.locale", "ttclid": "context.ad.callback",
                 "phone": "context.user.phone_number"}  # fmt: skip
        field, _, tail = rest.partition(".")
        if head == "user" and field in moved:
            return ".".join(part for part in (moved[field], tail) if part)
        return f"context.{path}"
    return path


Outcome = tuple[str, Any]  # ("accepted", (event fields)) or ("refused", (field, message))


def outcome(parse: Callable[[], ParsedBody], prefix: str) -> Outcome:
    """What a parser made of a one-event body; refused fields without the event's prefix."""
    try:
        parsed = parse()
    except InvalidEvent as exc:  # pixel/track's one event
        return "refused", (exc.field, exc.detail)
    except InvalidRequest as exc:
        return "request refused", (exc.field, exc.detail)
    if parsed.refused:
        [refusal] = parsed.refused
        field = refusal.field
        if prefix:
            assert field.startswith(prefix + "."), (field, prefix)
            field = field[len(prefix) + 1 :]
        return "refused", (field, refusal.message)
    [event] = parsed.events
    return "accepted", (event.pixel_code, event.body, event.test_event_code, event.event_source)


@relaxed
@given(abstract_events(), st.sampled_from([None, "TEST123"]))
def test_one_event_in_every_shape_is_one_internal_event(
    event: dict[str, Any], test_code: str | None
) -> None:
    def run(shape: Callable[..., ParsedBody], body: dict[str, Any], *args: Any) -> ParsedBody:
        return shape(copy.deepcopy(body), OPTS, *args)

    v2 = outcome(lambda: run(parse_event_track, as_event_track(event, test_code)), "data.0")
    track = outcome(lambda: run(parse_pixel_track, as_pixel_track(event, test_code)), "")
    batch = outcome(lambda: run(parse_pixel_batch, as_pixel_batch(event, test_code)), "batch.0")
    browser = outcome(
        lambda: run(parse_browser, as_browser(event, test_code), BrowserContext()), ""
    )

    kinds = {v2[0], track[0], batch[0], browser[0]}
    assert len(kinds) == 1, (v2, track, batch, browser)
    if v2[0] == "accepted":
        _pixel, body, code, _source = v2[1]
        assert track[1] == batch[1] == (PIXEL, body, code, "web")
        assert browser[1] == (PIXEL, body, code, "web")
        return
    assert track == batch
    # Events 1.0 and the browser check that `user` is an object before anything
    # else: with a user that is not, which of two bad fields comes first may differ.
    if isinstance(event["user"], dict) or event["user"] is MISSING:
        v2_field, message = v2[1]
        assert track[1] == (v1_path(v2_field), message)
        browser_field = "timestamp" if v2_field == "event_time" else v2_field
        assert browser[1] == (browser_field, message)


@relaxed
@given(abstract_events())
def test_an_event_normalised_twice_is_unchanged(event: dict[str, Any]) -> None:
    """What the gateway forwards, sent to it again (a client relaying it), stays as it is."""
    try:
        once = normalise_event(present(event), now=NOW, phone_region="US", warnings=[])
    except InvalidEvent:
        return
    again: list[FieldWarning] = []
    assert normalise_event(copy.deepcopy(once), now=NOW, phone_region=None, warnings=again) == once
    # Nothing more is dropped; a value forwarded as sent is flagged again, as it should be.
    assert not [w for w in again if w.reason in DROPPED_REASONS]


# --- event_time: every form, the same second, in every shape --------------------------


def time_forms(moment: datetime) -> st.SearchStrategy[Any]:
    """The forms PRODUCT.md 3a accepts for `moment`, each naming its second."""
    return st.integers(-14 * 60, 14 * 60).flatmap(
        lambda offset: st.sampled_from(list(_forms(moment, offset)))
    )


def _forms(moment: datetime, offset_minutes: int) -> Iterator[Any]:
    second = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
    ms = moment.microsecond // 1000
    local = moment.astimezone(timezone(timedelta(minutes=offset_minutes)))
    sign = "+" if offset_minutes >= 0 else "-"
    hours, minutes = divmod(abs(offset_minutes), 60)
    wall = local.strftime("%Y-%m-%dT%H:%M:%S")
    yield from (second, str(second), f" {second} ", float(second), second + ms / 1000)
    yield from (f"{second}.{ms:03d}", second * 1000 + ms, str(second * 1000 + ms))
    yield float(second * 1000 + ms)
    yield moment.strftime("%Y-%m-%dT%H:%M:%SZ")  # ISO 8601, UTC
    yield moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    yield moment.strftime("%Y%m%dT%H%M%SZ")  # the basic format
    yield moment.replace(tzinfo=None).isoformat()  # naive: UTC
    yield moment.replace(tzinfo=None).isoformat(sep=" ")
    yield local.isoformat()  # with the offset, +hh:mm
    yield f"{wall}{sign}{hours:02d}{minutes:02d}"  # +hhmm
    yield f"{wall}:{local.microsecond // 1000:03d}{sign}{hours:02d}{minutes:02d}"  # Adobe's
    if offset_minutes == 0:
        yield f"{wall}:{ms:03d}Z"


@relaxed
@given(
    st.datetimes(
        min_value=datetime(1973, 3, 4), max_value=datetime(5000, 1, 1), timezones=st.just(UTC)
    ),
    st.integers(-14 * 60, 14 * 60),
)
def test_every_time_form_is_the_same_second(moment: datetime, offset_minutes: int) -> None:
    second = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
    forms = list(_forms(moment, offset_minutes))
    assert {form: parse_timestamp(form) for form in forms} == dict.fromkeys(forms, second)


@relaxed
@given(moments, st.integers(-14 * 60, 14 * 60), st.data())
def test_every_time_form_gives_the_same_event_time_in_every_shape(
    moment: datetime, offset_minutes: int, data: st.DataObject
) -> None:
    second = (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(seconds=1)
    form = data.draw(st.sampled_from(list(_forms(moment, offset_minutes))))
    event = {"event": "Purchase", "event_id": "t-1", "pixel_code": PIXEL}
    bodies: list[ParsedBody] = [
        parse_event_track({"event_source_id": PIXEL, "data": [{**event, "event_time": form}]},
                          OPTS),
        parse_pixel_track({**event, "timestamp": form}, OPTS),
        parse_pixel_batch({"pixel_code": PIXEL, "batch": [{**event, "timestamp": form}]}, OPTS),
        parse_browser({**event, "timestamp": form}, OPTS, BrowserContext()),
        parse_browser([{**event, "event_time": form}], OPTS, BrowserContext()),
    ]  # fmt: skip
    assert [parsed.events[0].event_time for parsed in bodies] == [second] * len(bodies)


# --- merging ----------------------------------------------------------------------------

leaves = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from(["", "a", "b"]))
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=2)
    | st.dictionaries(st.sampled_from(["a", "b", "contents"]), inner, max_size=3),
    max_leaves=8,
)
# Bodies shaped like events: the sections merged recursively, and `contents`, taken whole.
bodies = st.dictionaries(
    st.sampled_from(["event", "event_time", "user", "page", "properties"]),
    st.one_of(
        values,
        st.dictionaries(st.sampled_from(["email", "ip", "contents", "value"]), values, max_size=3),
    ),
    max_size=4,
)
merge_settings = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def walk(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (path, value) a merge treats as one unit: a leaf, a list, or `contents`."""
    for key, item in value.items():
        if isinstance(item, dict) and key != "contents" and not is_absent(item):
            yield from walk(item, (*path, key))
        else:
            yield (*path, key), item


def at(body: dict[str, Any], path: tuple[str, ...]) -> Any:
    """The value at `path`, or MISSING where the path does not run through objects."""
    value: Any = body
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return MISSING
        value = value[key]
    return value


def pruned(value: Any) -> Any:
    """Without absent values: how TikTok (and our forward) reads a body."""
    if not isinstance(value, dict):
        return value
    kept = {k: pruned(v) if k != "contents" else v for k, v in value.items()}
    return {k: v for k, v in kept.items() if not is_absent(v)}


def differences(a: Any, b: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(a, dict) and isinstance(b, dict) and (not path or path[-1] != "contents"):
        for key in a.keys() | b.keys():
            yield from differences(a.get(key, MISSING), b.get(key, MISSING), (*path, key))
    elif a != b:
        yield path


def first_word(copies: list[dict[str, Any]], path: tuple[str, ...]) -> Any:
    """The value at `path` of the first copy that has one there."""
    for body in copies:
        value = at(body, path)
        if value is not MISSING and not is_absent(value):
            return value
    return MISSING


@merge_settings
@given(st.lists(bodies, min_size=1, max_size=4))
def test_merging_keeps_every_value_of_the_first_copy(copies: list[dict[str, Any]]) -> None:
    merged = merge_copies(copies)
    assert merged == merge_copies(copy.deepcopy(copies))  # deterministic
    for path, value in walk(copies[0]):
        if not is_absent(value):
            assert at(merged, path) == value, path


@merge_settings
@given(st.lists(bodies, min_size=2, max_size=4), st.randoms(use_true_random=False))
def test_another_arrival_order_differs_only_where_the_first_copy_decides(
    copies: list[dict[str, Any]], random: Any
) -> None:
    shuffled = copies[:]
    random.shuffle(shuffled)
    one, other = pruned(merge_copies(copies)), pruned(merge_copies(shuffled))
    for path in differences(one, other):
        # Where the orders disagree, the copies disagree: two of them have different values
        # there (or one has an object where another has a value) ...
        words: list[Any] = []
        for body in copies:
            word = at(body, path)
            if word is not MISSING and not is_absent(word) and word not in words:
                words.append(word)
        assert len(words) >= 2, (path, copies)
        # ... and each order took the first copy's word: its value, or its kind of value.
        for order in (copies, shuffled):
            first, got = first_word(order, path), at(merge_copies(order), path)
            if isinstance(first, dict) and path[-1] != "contents":
                assert isinstance(got, dict), (path, order)
            else:
                assert got == first, (path, order)


@merge_settings
@given(st.lists(bodies, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_copies_that_agree_merge_alike_in_any_order(
    copies: list[dict[str, Any]], random: Any
) -> None:
    # Copies of one real event: each knows some fields, and where two know one, they agree.
    reference = merge_copies(copies)
    agreeing = [_restricted_to(reference, body) for body in copies]
    shuffled = agreeing[:]
    random.shuffle(shuffled)
    assert pruned(merge_copies(shuffled)) == pruned(merge_copies(agreeing))


def _restricted_to(reference: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
    """`body`'s fields with the reference's values (what an agreeing copy would say)."""
    out: dict[str, Any] = {}
    for key, value in body.items():
        if key not in reference:
            continue
        mine = reference[key]
        if isinstance(mine, dict) and isinstance(value, dict) and key != "contents":
            out[key] = _restricted_to(mine, value)
        else:
            out[key] = copy.deepcopy(mine)
    return out


# --- hashing ----------------------------------------------------------------------------

whitespace = st.text(alphabet=" \t\n\r\u00a0\u2003", max_size=4)
pii_texts = st.one_of(
    whitespace,
    st.text(max_size=30),
    st.emails().map(lambda e: e.upper()),
    st.from_regex(r"\+?1? ?\(?[2-9][0-9]{2}\)?[ .-]?[2-9][0-9]{2}[ .-]?[0-9]{4}", fullmatch=True),
    st.sampled_from([sha256("a"), sha256("b").upper(), "+12133734253"]),
)
user_objects = st.fixed_dictionaries(
    {},
    optional={
        "email": st.one_of(pii_texts, st.lists(pii_texts, max_size=3)),
        "phone": st.one_of(pii_texts, st.lists(pii_texts, max_size=3)),
        "external_id": st.one_of(pii_texts, st.lists(pii_texts, max_size=3)),
        "first_name": pii_texts,
        "last_name": pii_texts,
        "zip_code": pii_texts,
        "city": pii_texts,
        "country": pii_texts,
        "ip": st.one_of(st.ip_addresses().map(str), pii_texts),
        "att_status": st.sampled_from(["authorized", " DENIED ", "maybe", ""]),
        "ttp": pii_texts,
        "ttclid": pii_texts,
        "user_agent": pii_texts,
        "locale": pii_texts,
    },
)
HASHED_FIELDS = ("email", "phone", "external_id", "first_name", "last_name", "zip_code")


def hashes(user: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for key in HASHED_FIELDS:
        value = user.get(key)
        found.extend(value if isinstance(value, list) else [] if value is None else [value])
    return found


@relaxed
@given(user_objects, st.sampled_from([None, "US", "GB"]))
def test_hashing_a_hashed_user_keeps_it(raw: dict[str, Any], region: str | None) -> None:
    once = normalise_user(raw, path="user", region=region, warnings=[])
    assert all(is_sha256_hex(h) and h == h.lower() for h in hashes(once)), once
    warnings: list[FieldWarning] = []
    # Region or none: a digest is never read as a phone number again.
    assert normalise_user(once, path="user", region=None, warnings=warnings) == once
    assert warnings == []


@relaxed
@given(user_objects)
def test_no_empty_value_is_ever_hashed(raw: dict[str, Any]) -> None:
    blanks = {"", " ", "\t", "\n", "\u00a0", "\u2003"}
    for value in _strings(raw):
        if not value.strip():
            blanks.add(value)
    forbidden = {sha256(blank) for blank in blanks}
    user = normalise_user(raw, path="user", region="US", warnings=[])
    assert not forbidden & set(hashes(user)), user
    for key in HASHED_FIELDS:
        value = raw.get(key)
        items = value if isinstance(value, list) else [value]
        if all(isinstance(item, str) and not item.strip() for item in items):
            assert key not in user  # nothing but blanks: the field is absent, not hashed


def _strings(raw: dict[str, Any]) -> Iterator[str]:
    for value in raw.values():
        items = value if isinstance(value, list) else [value]
        yield from (item for item in items if isinstance(item, str))


@st.composite
def spelled(draw: st.DrawFn, text: str, *, any_case: bool = False, spaced: bool = True) -> str:
    """`text` in any letter case and/or with blanks around it."""
    if any_case:
        flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
        text = "".join(c.upper() if up else c.lower() for c, up in zip(text, flips, strict=True))
    return draw(whitespace) + text + draw(whitespace) if spaced else text


# TIKTOK_API.md 5, as published: a prefix and a suffix of each digest.
EMAIL_DIGEST = ("848a7714", "3bb4f")
PHONE_DIGEST = ("9f7ec22d", "2dd2fd")
EXTERNAL_ID_DIGEST = ("80fba0ae", "f2ab8b")


def _is(digest: str | None, published: tuple[str, str]) -> bool:
    return digest is not None and digest.startswith(published[0]) and digest.endswith(published[1])


@relaxed
@given(spelled(" ALICE_abc@gmail.com ", any_case=True))
def test_any_spelling_of_tiktoks_email_example_hashes_to_its_digest(email: str) -> None:
    digest = normalise_email(email)
    assert _is(digest, EMAIL_DIGEST), email
    assert normalise_email(digest or "") == digest  # and the digest stays itself


# With its country code, any region (or none) reads it; without, the region must be US.
PHONE_SPELLINGS = [
    *[(p, region) for p in ("(+1)2133734253", "+1 213 373 4253", "+1 (213) 373-4253",
                            "+1.213.373.4253", "+12133734253", "\uff0b1 213 373 4253")
      for region in (None, "US", "GB")],
    ("1-213-373-4253", "US"), ("(213) 373-4253", "US"), ("213.373.4253", "US"),
]  # fmt: skip


@relaxed
@given(st.sampled_from(PHONE_SPELLINGS).flatmap(lambda p: st.tuples(spelled(p[0]), st.just(p[1]))))
def test_any_spelling_of_tiktoks_phone_example_hashes_to_its_digest(
    spelling: tuple[str, str | None],
) -> None:
    phone, region = spelling
    assert _is(normalise_phone(phone, region), PHONE_DIGEST), spelling


@relaxed
@given(spelled("user_123"), spelled("user_123", any_case=True, spaced=False))
def test_tiktoks_external_id_example_is_trimmed_but_keeps_its_case(
    spaced: str, cased: str
) -> None:
    assert _is(normalise_external_id(spaced), EXTERNAL_ID_DIGEST)
    assume(cased != "user_123")
    assert not _is(normalise_external_id(cased), EXTERNAL_ID_DIGEST)  # TikTok keeps case
