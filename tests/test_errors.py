"""The error classes: the tree in errors.py's docstring, and each class's rejection label."""

from __future__ import annotations

import re

from gateway import errors
from gateway.errors import GatewayError, RequestError, StoreUnavailable
from gateway.metrics import REJECT_REASONS


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        if sub.__module__ == errors.__name__:
            found += [sub, *_subclasses(sub)]
    return found


def test_the_docstring_tree_lists_every_error_class_once() -> None:
    assert errors.__doc__ is not None
    named = re.findall(r"[├└]── (\w+)", errors.__doc__)
    assert sorted(named) == sorted(cls.__name__ for cls in _subclasses(GatewayError))


def test_every_rejection_reason_is_a_label_known_at_zero() -> None:
    reasons = {
        cls.reason for cls in _subclasses(RequestError) if cls.reason is not None
    } | {StoreUnavailable.reason}
    assert reasons <= set(REJECT_REASONS)
    # invalid_event is counted per event by ingest, not by class.
    assert set(REJECT_REASONS) - reasons == {"invalid_event"}
