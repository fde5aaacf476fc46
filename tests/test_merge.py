"""Merge rules: first copy's values win, gaps are filled recursively, contents are atomic."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.merge import is_absent, merge_copies, merge_into


def test_first_values_win_and_gaps_are_filled() -> None:
    pixel = {"event": "Purchase", "event_time": 100, "user": {"ttp": "T", "ip": "1.2.3.4"}}
    server = {
        "event": "Purchase",
        "event_time": 200,
        "user": {"email": "E", "ip": "9.9.9.9"},
        "properties": {"value": 10.0},
    }
    merged = merge_copies([pixel, server])
    assert merged == {
        "event": "Purchase",
        "event_time": 100,
        "user": {"ttp": "T", "ip": "1.2.3.4", "email": "E"},
        "properties": {"value": 10.0},
    }


def test_empty_values_count_as_absent() -> None:
    first = {"user": {"email": "", "phone": [], "external_id": None}, "page": {}}
    later = {"user": {"email": "E", "phone": ["P"], "external_id": "X"}, "page": {"url": "U"}}
    merged = merge_copies([first, later])
    assert merged["user"] == {"email": "E", "phone": ["P"], "external_id": "X"}
    assert merged["page"] == {"url": "U"}


def test_later_empty_values_never_win() -> None:
    merged = merge_copies([{"user": {"email": "E"}}, {"user": {"email": ""}, "page": None}])
    assert merged == {"user": {"email": "E"}}


def test_contents_are_taken_whole_from_the_first_copy_that_has_them() -> None:
    first = {"properties": {"currency": "USD"}}
    second = {"properties": {"contents": [{"content_id": "A", "price": 1.0}]}}
    third = {"properties": {"contents": [{"content_id": "B", "quantity": 2}]}}
    merged = merge_copies([first, second, third])
    assert merged["properties"]["contents"] == [{"content_id": "A", "price": 1.0}]


def test_nested_objects_fill_recursively() -> None:
    merged = merge_copies([{"properties": {"a": {"x": 1}}}, {"properties": {"a": {"y": 2}}}])
    assert merged == {"properties": {"a": {"x": 1, "y": 2}}}


def test_merge_into_reports_filled_fields() -> None:
    stored: dict[str, Any] = {"user": {"ttp": "T"}}
    assert merge_into(stored, {"user": {"ttp": "U", "email": "E"}, "page": {"url": "P"}}) == [
        "user.email",
        "page",
    ]


def test_inputs_are_not_modified() -> None:
    first = {"user": {"ttp": "T"}}
    second = {"user": {"email": "E"}}
    merge_copies([first, second])
    assert first == {"user": {"ttp": "T"}}


json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=5))
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=10,
)
bodies = st.dictionaries(st.sampled_from(["user", "page", "properties", "event", "x"]), json_value)


# Generation is cheap but the machine may be busy; a slow draw is not a failure here.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], max_examples=60)


@relaxed
@given(st.lists(bodies, min_size=1, max_size=4))
def test_merge_is_deterministic_and_keeps_first_copy_values(copies: list[dict[str, Any]]) -> None:
    merged = merge_copies(copies)
    assert merged == merge_copies(copies)
    for key, value in copies[0].items():
        if not is_absent(value) and not isinstance(value, dict):
            assert merged[key] == value


@relaxed
@given(bodies, bodies)
def test_merging_a_copy_twice_changes_nothing(
    first: dict[str, Any], second: dict[str, Any]
) -> None:
    assert merge_copies([first, second, second]) == merge_copies([first, second])
