"""How copies of one event combine into the event TikTok receives; pure functions.

TikTok "keeps and enriches the first event": values already present win, and
the later copies only fill what the first one lacks. We do the same, so the
result does not depend on which copy TikTok would have seen first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Taken whole from the first copy that has it: mixing two baskets item by item
# would describe an order nobody placed.
ATOMIC_FIELDS = frozenset({"contents"})


def is_absent(value: Any) -> bool:
    """Clients send empty strings and empty lists for fields they do not know."""
    return value is None or value == "" or value == [] or value == {}


def merge_into(stored: dict[str, Any], copy: dict[str, Any]) -> list[str]:
    """Fill fields `stored` lacks from `copy`, recursively; return the dotted names filled."""
    filled: list[str] = []
    _fill(stored, copy, "", filled)
    return filled


def _fill(stored: dict[str, Any], copy: dict[str, Any], prefix: str, filled: list[str]) -> None:
    for key, value in copy.items():
        if is_absent(value):
            continue
        current = stored.get(key)
        if is_absent(current):
            stored[key] = value
            filled.append(prefix + key)
        elif isinstance(current, dict) and isinstance(value, dict) and key not in ATOMIC_FIELDS:
            _fill(current, value, f"{prefix}{key}.", filled)


def merge_copies(bodies: Iterable[dict[str, Any]], *, in_place: bool = False) -> dict[str, Any]:
    """The merged body of copies given in arrival order; the first copy's values win.

    The bodies are left as they are: a lone copy is its own result, and where there
    are several, the objects a merge fills are copies. `in_place`: the caller owns the
    bodies, and the first becomes the result (later ones may share objects with it).
    Merging the result with the same copies again changes nothing.
    """
    merged: dict[str, Any] = {}
    for count, body in enumerate(bodies):
        if count == 0:
            merged = body
        elif in_place:
            merge_into(merged, body)
        elif count == 1:
            merged = _copy_objects(merged)
            merge_into(merged, _copy_objects(body))
        else:
            merge_into(merged, _copy_objects(body))
    return merged


def _copy_objects(value: Any) -> Any:
    """A copy of every object (dict) in `value`; lists are taken whole by a merge, never
    changed, so they are shared."""
    if isinstance(value, dict):
        return {k: _copy_objects(v) for k, v in value.items()}
    return value
