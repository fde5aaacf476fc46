"""The one internal event every accepted body becomes, and the names events go by.

An `Event` is one *copy* of an advertiser's event as one source saw it. Its
`body` is already in the shape TikTok's Events API 2.0 wants inside `data[]`
(`event`, `event_time`, `event_id`, `user`, `properties`, `page`, ...), with
email, phone and external_id hashed, so forwarding is a merge and a dump.
`normalise.py` builds that body from what a client sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from gateway.field_warnings import FieldWarning

Source = Literal["pixel", "server"]
SOURCES: tuple[Source, ...] = ("pixel", "server")

# TikTok converts these old names to the new ones on its side (May 2025), so a
# pixel `CompletePayment` and a server `Purchase` are the same event to it.
LEGACY_ALIASES: dict[str, str] = {"CompletePayment": "Purchase", "SubmitForm": "Lead"}


@dataclass(frozen=True, slots=True)
class Event:
    """One copy of an event, normalised and with PII hashed."""

    pixel_code: str
    source: Source
    body: dict[str, Any]
    test_event_code: str | None = None
    event_source: str = "web"
    warnings: tuple[FieldWarning, ...] = ()  # what was flagged, each (field, reason) once

    @property
    def name(self) -> str:
        name: str = self.body["event"]
        return name

    @property
    def event_id(self) -> str | None:
        event_id: str | None = self.body.get("event_id")
        return event_id

    @property
    def event_time(self) -> int:
        event_time: int = self.body["event_time"]
        return event_time


def dedup_name(name: str, legacy_aliases: bool) -> str:
    """The event name as it appears in the dedup key."""
    return LEGACY_ALIASES.get(name, name) if legacy_aliases else name


def is_standard_event(name: str) -> bool:
    """True for TikTok's standard event names (case-sensitive)."""
    return name in STANDARD_EVENTS


# TikTok's `event_source` values.
EVENT_SOURCES: tuple[str, ...] = ("web", "app", "offline", "crm")

# TIKTOK_API.md 4: current web names, legacy names still accepted, app names.
# fmt: off
STANDARD_EVENTS = frozenset(
    {
        "AddPaymentInfo", "AddToCart", "AddToWishlist", "ApplicationApproval",
        "CompleteRegistration", "Contact", "CustomizeProduct", "Download", "FindLocation",
        "InitiateCheckout", "Lead", "Purchase", "Schedule", "Search", "StartTrial",
        "SubmitApplication", "Subscribe", "ViewContent", "ClickButton", "CompletePayment",
        "PlaceAnOrder", "SubmitForm", "Pageview", "PageView", "AchieveLevel", "Checkout",
        "CompleteTutorial", "CreateGroup", "CreateRole", "GenerateLead", "InAppADClick",
        "InAppADImpr", "InstallApp", "JoinGroup", "LaunchAPP", "LoanApplication",
        "LoanApproval", "LoanDisbursal", "Login", "Rate", "Registration", "SpendCredits",
        "UnlockAchievement",
    }
)
# fmt: on
