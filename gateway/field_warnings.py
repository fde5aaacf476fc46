"""Field warnings: what the gateway flags in an accepted event instead of refusing it.

The gateway refuses only what TikTok refuses or what would harm the gateway
(docs/field-rules.md). Two other findings are warnings, never refusals:

- advisory: a value outside what TikTok documents but does not enforce (a
  `content_type` other than `product`/`product_group`, an unknown currency, a
  negative value). The field is forwarded as sent; TikTok has the last word.
- dropped: a match key the gateway cannot normalise (a phone without country
  code and no GATEWAY_PHONE_REGION, an unparseable email or ip) or a user field
  TikTok does not define (it could hold unhashed PII). The field is left out.

Every warning is one (field, reason) pair of `FIELD_WARNINGS`, a fixed set, so
metric labels stay bounded. The field is its Events API 2.0 path without list
indexes ("properties.contents.content_type"). `WarningLog` logs each pixel,
field and reason at most once a minute; no value is ever logged.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("gateway.ingest")

# Reasons. Forwarded as sent:
UNKNOWN_VALUE = "unknown_value"  # not one of the values TikTok documents
OUT_OF_RANGE = "out_of_range"  # a number outside the range TikTok documents
# Dropped from the event:
NO_COUNTRY_CODE = "no_country_code"  # a phone without "+", and no GATEWAY_PHONE_REGION
UNPARSEABLE = "unparseable"  # an email, phone or ip that is none
UNKNOWN_FIELD = "unknown_field"  # a user field TikTok does not define
DROPPED_REASONS = frozenset({NO_COUNTRY_CODE, UNPARSEABLE, UNKNOWN_FIELD})

LOG_INTERVAL = 60.0  # seconds between two lines about one pixel, field and reason


@dataclass(frozen=True, slots=True)
class FieldWarning:
    """One finding about one field of an accepted event; never its value."""

    field: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason}


FIELD_WARNINGS: tuple[FieldWarning, ...] = (
    FieldWarning("properties.content_type", UNKNOWN_VALUE),
    FieldWarning("properties.contents.content_type", UNKNOWN_VALUE),
    FieldWarning("properties.currency", UNKNOWN_VALUE),
    FieldWarning("properties.value", OUT_OF_RANGE),
    FieldWarning("properties.price", OUT_OF_RANGE),
    FieldWarning("properties.quantity", OUT_OF_RANGE),
    FieldWarning("properties.num_items", OUT_OF_RANGE),
    FieldWarning("properties.contents.price", OUT_OF_RANGE),
    FieldWarning("properties.contents.quantity", OUT_OF_RANGE),
    FieldWarning("ad.attribution_share", OUT_OF_RANGE),
    FieldWarning("user.att_status", UNKNOWN_VALUE),
    FieldWarning("user.email", UNPARSEABLE),
    FieldWarning("user.phone", UNPARSEABLE),
    FieldWarning("user.phone", NO_COUNTRY_CODE),
    FieldWarning("user.ip", UNPARSEABLE),
    FieldWarning("user", UNKNOWN_FIELD),
)


class WarningLog:
    """Logs a field warning at most once per pixel, field and reason in `interval`
    seconds; the line says how many were not logged since the last one."""

    def __init__(
        self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self.clock = clock
        # Keyed by the pixel's metric label, so bounded like the metric.
        self._last: dict[tuple[str, FieldWarning], float] = {}
        self._quiet: dict[tuple[str, FieldWarning], int] = {}

    def note(self, pixel_label: str, pixel_code: str, warning: FieldWarning) -> None:
        """Count `warning` for the pixel; log it unless it was logged recently."""
        key = (pixel_label, warning)
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        kept = "dropped" if warning.reason in DROPPED_REASONS else "forwarded as sent"
        log.warning(
            "field %s of an event for pixel %s: %s, %s (%d more since the last such line)",
            warning.field, pixel_code, warning.reason, kept, quiet,
            extra={"pixel": pixel_code, "field": warning.field, "reason": warning.reason,
                   "suppressed": quiet},
        )  # fmt: skip
