"""The /debug history's records as Redis keeps them: small, so a fixed budget holds many.

A record is a JSON object: the member, then what happened (`outcome`, `at`, the
copy's `source` and `fields`, TikTok's request id, ...). Stored, the common names
are one letter and the field names a bit set over FIELD_TABLE (a name outside it is
kept as text): a copy's record is about 110 bytes instead of 330. `/debug` and
`inspect` read records back with their full names.
"""

from __future__ import annotations

from typing import Any

import orjson

# The fields TikTok's Events API knows, as history records name them. Append only:
# records written by earlier versions keep their meaning.
FIELD_TABLE: tuple[str, ...] = (
    "event", "event_id", "event_time", "limited_data_use", "test_event_code",
    "user.email", "user.phone", "user.external_id", "user.ip", "user.user_agent",
    "user.ttp", "user.ttclid", "user.idfa", "user.idfv", "user.gaid", "user.locale",
    "user.first_name", "user.last_name", "user.city", "user.state", "user.country",
    "user.zip_code", "user.att_status", "user.anonymous_id",
    "page.url", "page.referrer",
    "properties.currency", "properties.value", "properties.contents",
    "properties.content_type", "properties.content_id", "properties.content_name",
    "properties.content_category", "properties.num_items", "properties.order_id",
    "properties.search_string", "properties.query", "properties.description",
    "properties.shop_id", "properties.price", "properties.quantity", "properties.status",
    "properties.delivery_category", "properties.predicted_ltv",
    "ad.callback", "app.app_id", "app.app_name", "app.app_version", "lead.lead_id",
    "lead.lead_event_source", "partner_name", "context.ad.callback",
)  # fmt: skip
_INDEX = {name: i for i, name in enumerate(FIELD_TABLE)}


def _tree(names: tuple[str, ...]) -> dict[str, Any]:
    """FIELD_TABLE as nested dicts: a name's parts down to its bit's index."""
    tree: dict[str, Any] = {}
    for index, name in enumerate(names):
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = index
    return tree


_TREE = _tree(FIELD_TABLE)
_SHORT = {"outcome": "o", "at": "t", "source": "s", "warnings": "w"}
_LONG = {short: name for name, short in _SHORT.items()}


def copy_fields(body: dict[str, Any], tree: dict[str, Any] = _TREE) -> tuple[int, list[str]]:
    """The fields an event body carries: the bit set of those in FIELD_TABLE, and the
    dotted names of the others; `contents` counts as one. One walk, no name built for a
    known field: the owner does this for every copy."""
    mask, other = 0, list[str]()
    for key, value in body.items():
        node = tree.get(key)
        if isinstance(value, dict) and key != "contents":
            if isinstance(node, dict):
                inner, more = copy_fields(value, node)
                mask |= inner
                other += (f"{key}.{name}" for name in more)
            else:
                other += field_names(value, f"{key}.")
        elif isinstance(node, int):
            mask |= 1 << node
        else:
            other.append(key)
    return mask, other


def field_names(body: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted names of a body's fields; `contents` counts as one."""
    names: list[str] = []
    for key, value in body.items():
        if isinstance(value, dict) and key != "contents":
            names.extend(field_names(value, f"{prefix}{key}."))
        else:
            names.append(prefix + key)
    return names


def pack(member: str, record: dict[str, Any]) -> bytes:
    """A record as stored (see the module docstring). Its `fields` are names, or a
    (bit set, other names) pair from copy_fields."""
    stored: dict[str, Any] = {"m": member}
    for name, value in record.items():
        if name == "fields":
            if isinstance(value, tuple):
                mask, other = value
            else:
                mask, other = 0, []
                for field in value:
                    index = _INDEX.get(field)
                    if index is None:
                        other.append(field)
                    else:
                        mask |= 1 << index
            stored["f"] = format(mask, "x")
            if other:
                stored["fx"] = other
        else:
            stored[_SHORT.get(name, name)] = value
    return orjson.dumps(stored)


def unpack(raw: bytes) -> tuple[str | None, dict[str, Any]]:
    """(member, record with its full names) of a stored record."""
    stored = orjson.loads(raw)
    member = stored.pop("m", None)
    record: dict[str, Any] = {}
    for name, value in stored.items():
        if name == "f":
            mask = int(value, 16)
            fields = [field for i, field in enumerate(FIELD_TABLE) if mask >> i & 1]
            record["fields"] = fields + stored.get("fx", [])
        elif name != "fx":
            record[_LONG.get(name, name)] = value
    return member, record
