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


def merge_copies(bodies: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The merged body of copies given in arrival order; the first copy's values win."""
    merged: dict[str, Any] = {}
    for body in bodies:
        if not merged:
            merged = _deep_copy(body)
        else:
            merge_into(merged, _deep_copy(body))
    return merged


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value
