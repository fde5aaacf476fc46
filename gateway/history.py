"""The field names a /debug history record lists: FIELD_TABLE, whose bit set a record
stores instead of the names (see records.CopyRecord), and the walk that finds a body's.
"""

from __future__ import annotations

from typing import Any

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
