"""check_passthrough, the one gate of the pass-through, on every kind of input.

Pure functions, so exhaustively: every canonical path is let through unchanged
(and so are its needlessly encoded spellings, decoded once); anything that
carries a trick anywhere is refused; whatever is let through has no dot
segment, no empty segment and no character outside RFC 3986's unreserved
ones, so no server further on can read it as another path. The socket-level
tests are in tests/test_passthrough.py.
"""

from __future__ import annotations

import dataclasses
import posixpath
import urllib.parse

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from gateway.errors import NotOurCaller, PathNotCanonical, PathNotRelayed, RelayRefused
from gateway.metrics import PASSTHROUGH_OUTCOMES
from gateway.passthrough import (
    RELAYED_REQUEST_HEADERS,
    Target,
    canonical_target,
    check_passthrough,
    check_token,
    is_allowed,
)
from gateway.setting_types import CANONICAL_SEGMENT
from gateway.settings import Settings

UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
SETTINGS = dataclasses.replace(Settings(), pixels={"P1": "token-one", "P2": "token-two"})

# The machine is shared: a slow draw is not a failure.
relaxed = settings(deadline=None)
segments = st.text(UNRESERVED, min_size=1, max_size=12).filter(lambda s: s.strip(".") != "")
canonical_paths = st.builds(
    lambda parts, slash: "/open_api/" + "/".join(parts) + ("/" if slash else ""),
    st.lists(segments, max_size=6),
    st.booleans(),
).map(lambda path: path.replace("/open_api//", "/open_api/"))
# Each one, inserted anywhere in a path, makes it something else than a canonical path.
TRICKS = [
    "/../", "/./", "//", "/..", "\\", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%25",
    "%252e", "%00", "%0a", "%0d", "%1f", "%7f", "%ff", "%c0%ae", "..;", ";", "%3b", ":",
    "@", "%", "%4/", "%zz", "#", " ", "\x00", "\t", "é", "?x=/../#",
]  # fmt: skip


def is_canonical(path: str) -> bool:
    """What every let-through path must be, stated independently of the implementation."""
    parts = path.removeprefix("/open_api/").split("/")
    inner, last = parts[:-1], parts[-1]
    return (
        path.startswith("/open_api/")
        and all(p and set(p) <= set(UNRESERVED) and p.strip(".") for p in inner)
        and (last == "" or (set(last) <= set(UNRESERVED) and last.strip(".") != ""))
        and posixpath.normpath(path) == path.rstrip("/")
    )


# -- paths -------------------------------------------------------------------------------


@relaxed
@given(canonical_paths)
@example("/open_api/v1.3/pixel/list/")
@example("/open_api/")
def test_a_canonical_path_passes_unchanged(path: str) -> None:
    assert is_canonical(path)
    assert canonical_target(path) == Target(path)


@relaxed
@given(canonical_paths, st.data())
def test_encoded_letters_and_digits_are_decoded_once(path: str, data: st.DataObject) -> None:
    # Needless, but allowed (RFC 3986 6.2.2.2): %70ixel is pixel. Dots stay unencoded, and
    # so does the root (aiohttp routes /%6fpen_api/ here too, but such a root is refused).
    root = len("/open_api/")
    encodable = [i for i, char in enumerate(path) if char not in "/." and i >= root]
    chosen = set(data.draw(st.lists(st.sampled_from(encodable), unique=True)) if encodable else [])
    encoded = "".join(
        f"%{ord(char):02{data.draw(st.sampled_from('xX'))}}" if i in chosen else char
        for i, char in enumerate(path)
    )
    assert canonical_target(encoded) == Target(path)


@relaxed
@given(canonical_paths, st.sampled_from(TRICKS), st.data())
def test_a_trick_anywhere_after_the_root_is_refused(
    path: str, trick: str, data: st.DataObject
) -> None:
    at = data.draw(st.integers(len("/open_api/"), len(path)))
    tricked = path[:at] + trick + path[at:]
    if trick.startswith("?") or trick == "/..":
        return  # a query, or `..` possibly glued to a segment: the next tests cover them
    with pytest.raises(PathNotCanonical):
        canonical_target(tricked)


@relaxed
@given(st.text(max_size=40))
@example("/open_api/%2e%2e/admin/y")
@example("/open_api/..%2fadmin/z")
@example("/open_api/a%252e%252e/")
def test_whatever_passes_is_canonical(tail: str) -> None:
    for raw in (tail, "/open_api/" + tail, "/open_api/" + urllib.parse.quote(tail, safe="/%")):
        try:
            target = canonical_target(raw)
        except PathNotCanonical:
            continue
        assert is_canonical(target.path), raw
        assert canonical_target(target.path_qs) == target  # a second look changes nothing


@relaxed
@given(canonical_paths, st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E)))
def test_the_query_is_kept_as_sent_and_never_moves_the_path(path: str, query: str) -> None:
    if "#" in query:
        with pytest.raises(PathNotCanonical):
            canonical_target(f"{path}?{query}")
        return
    target = canonical_target(f"{path}?{query}")
    assert target == Target(path, query)
    assert target.path_qs == (f"{path}?{query}" if query else path)


@pytest.mark.parametrize(
    "raw",
    [
        "/open_api/../admin/x",
        "/open_api/%2e%2e/admin/y",
        "/open_api/..%2fadmin/z",
        "/open_api/v1.3/pixel/..",
        "/open_api/v1.3/pixel/...",
        "/open_api/v1.3/pixel/.",
        "/open_api/v1.3/pixel/%252e%252e/",
        "/open_api/v1.3/pixel/..;/campaign/",
        "/OPEN_API/v1.3/pixel/list/",
        "/%6fpen_api/v1.3/pixel/list/",
        "/open_api",
        "//open_api/v1.3/pixel/list/",
        "open_api/v1.3/pixel/list/",
        "http://upstream.invalid/open_api/v1.3/pixel/list/",  # an absolute URI as the target
        "*",
        "",
    ],
)
def test_known_tricks_are_refused(raw: str) -> None:
    with pytest.raises(PathNotCanonical) as info:
        canonical_target(raw)
    assert info.value.message.startswith("path: ")


# -- prefixes ----------------------------------------------------------------------------


@relaxed
@given(canonical_paths, canonical_paths)
def test_a_prefix_matches_whole_segments_only(path: str, prefix: str) -> None:
    path_parts = [p for p in path.split("/") if p]
    prefix_parts = [p for p in prefix.split("/") if p]
    expected = path_parts[: len(prefix_parts)] == prefix_parts
    assert is_allowed(path, [prefix]) == expected


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("/open_api/v1.3/pixel/list/", True),
        ("/open_api/v1.3/pixel/event/stats/", True),
        ("/open_api/v1.3/pixel", True),
        ("/open_api/v1.3/pixelfoo/", False),
        ("/open_api/v1.3/pixel.list/", False),
        ("/open_api/v1.3/bc/pixel/link/get/", False),
        ("/open_api/v1.3/campaign/update/", False),
        ("/open_api/v1.4/pixel/list/", False),
        ("/open_api/v1.3/offline/get/", True),
        ("/open_api/v1.2/pixel/list/", True),
    ],
)
def test_the_default_prefixes(path: str, allowed: bool) -> None:
    assert is_allowed(path, Settings().passthrough_paths) == allowed


def test_every_default_prefix_is_canonical() -> None:
    for prefix in Settings().passthrough_paths:
        assert is_canonical(prefix)
        assert all(CANONICAL_SEGMENT.fullmatch(s) for s in prefix.strip("/").split("/"))


# -- tokens ------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["token-one", "token-two"])
def test_each_configured_token_is_ours(token: str) -> None:
    check_token([token], SETTINGS)


@pytest.mark.parametrize(
    ("tokens", "code"),
    [
        ([], 40104),
        ([""], 40104),
        (["token-on"], 40105),
        (["token-one "], 40105),
        (["TOKEN-ONE"], 40105),
        (["token-one", "token-one"], 40105),
        (["made-up", "token-one"], 40105),
        (["to\udcffken"], 40105),  # a byte that was not UTF-8 on the wire
    ],
)
def test_anything_else_is_not_our_caller(tokens: list[str], code: int) -> None:
    with pytest.raises(NotOurCaller) as info:
        check_token(tokens, SETTINGS)
    assert info.value.code == code
    assert (info.value.http_status, info.value.tiktok_status) == (401, 401)


@relaxed
@given(st.text(max_size=40))
def test_no_made_up_token_is_ours(token: str) -> None:
    if token in SETTINGS.pixels.values():
        return
    with pytest.raises(NotOurCaller):
        check_token([token], SETTINGS)


def test_in_sandbox_mode_no_token_is_ours() -> None:
    with pytest.raises(NotOurCaller, match="Sandbox mode"):
        check_token(["anything"], Settings())


# -- all three, in order -----------------------------------------------------------------


def test_the_path_is_checked_first_then_the_token_then_the_prefix() -> None:
    with pytest.raises(PathNotCanonical):
        check_passthrough("/open_api/../campaign/", [], SETTINGS)
    with pytest.raises(NotOurCaller):
        check_passthrough("/open_api/v1.3/campaign/update/", ["made-up"], SETTINGS)
    with pytest.raises(PathNotRelayed):
        check_passthrough("/open_api/v1.3/campaign/update/", ["token-two"], SETTINGS)
    target = check_passthrough(
        "/open_api/v1.3/pixel/list/?advertiser_id=1", ["token-two"], SETTINGS
    )
    assert target == Target("/open_api/v1.3/pixel/list/", "advertiser_id=1")


def test_refusals_answer_real_statuses_and_are_counted_by_known_outcomes() -> None:
    for error, status in ((PathNotCanonical, 400), (NotOurCaller, 401), (PathNotRelayed, 404)):
        assert issubclass(error, RelayRefused)
        assert error.http_status == error.tiktok_status == status
        assert error.outcome in PASSTHROUGH_OUTCOMES


def test_no_forwarding_or_cookie_header_is_relayed() -> None:
    relayed = {name.lower() for name in RELAYED_REQUEST_HEADERS}
    assert "access-token" in relayed
    for name in ("cookie", "authorization", "forwarded", "x-forwarded-for", "x-real-ip", "host"):
        assert name not in relayed
