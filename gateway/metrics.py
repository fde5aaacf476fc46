"""Prometheus metrics: built by `make_metrics(registry)`, never at import time.

Label values are bounded: pixels come from configuration (sandbox traffic is
labelled "sandbox"), reasons and outcomes from fixed sets defined here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from .events import SOURCES
from .formats import WARNING_KINDS as FORMAT_WARNING_KINDS

SANDBOX_PIXEL = "sandbox"
MATCH_KEYS = ("email", "phone", "external_id", "ttp", "ttclid", "ip", "user_agent")
REJECT_REASONS = (
    "invalid_json",
    "invalid_request",
    "invalid_event",
    "unknown_pixel",
    "auth",
    "origin",
    "too_large",
    "rate_limited",
    "store_unavailable",
)
FORWARD_OUTCOMES = ("delivered", "retry", "rejected", "auth")
DEAD_LETTER_REASONS = ("rejected", "auth", "too_old")
WARNING_KINDS = (*FORMAT_WARNING_KINDS, "other")

# Ingest is sub-millisecond to a few ms; forwarding is a network call to TikTok.
INGEST_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
FORWARD_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
MERGE_WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True, slots=True)
class Metrics:
    registry: CollectorRegistry
    received: Counter
    merged: Counter
    duplicates: Counter
    forwarded: Counter
    rejected: Counter
    dead_lettered: Counter
    input_warnings: Counter
    forward_requests: Counter
    forward_retries: Counter
    upstream_auth_failures: Counter
    forward_duration: Histogram
    ingest_duration: Histogram
    merge_wait: Histogram
    pending: Gauge
    dead_letters: Gauge
    match_keys: Counter
    redis_errors: Counter

    def pixel_label(self, pixel_code: str, configured: Iterable[str]) -> str:
        return pixel_code if pixel_code in configured else SANDBOX_PIXEL


def make_metrics(registry: CollectorRegistry, pixels: Iterable[str] = ()) -> Metrics:
    """Create every metric in `registry`, with known label values at zero."""
    # `*_created` series double the exposition and no dashboard uses them. The switch is
    # process-wide in prometheus_client; every registry of ours wants it off.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    pixel_labels = list(pixels) or [SANDBOX_PIXEL]
    m = Metrics(
        registry=registry,
        received=Counter(
            "gateway_events_received", "Event copies received.", ["source", "pixel"],
            registry=registry,
        ),
        merged=Counter(
            "gateway_events_merged", "Copies merged into an event already waiting.", ["pixel"],
            registry=registry,
        ),
        duplicates=Counter(
            "gateway_events_duplicates_dropped",
            "Copies dropped because their event was already forwarded.", ["pixel"],
            registry=registry,
        ),
        forwarded=Counter(
            "gateway_events_forwarded", "Events delivered to TikTok.", ["pixel"],
            registry=registry,
        ),
        rejected=Counter(
            "gateway_events_rejected", "Requests or events refused at ingest.", ["reason"],
            registry=registry,
        ),
        dead_lettered=Counter(
            "gateway_events_dead_lettered", "Events moved to the dead-letter stream.", ["reason"],
            registry=registry,
        ),
        input_warnings=Counter(
            "gateway_input_warnings", "Fields dropped from accepted events (e.g. an invalid ip).",
            ["kind"], registry=registry,
        ),
        forward_requests=Counter(
            "gateway_forward_requests", "Requests sent to TikTok, by outcome.", ["outcome"],
            registry=registry,
        ),
        forward_retries=Counter(
            "gateway_forward_retries", "Events put back for a later attempt.", registry=registry,
        ),
        upstream_auth_failures=Counter(
            "gateway_upstream_auth_failures",
            "TikTok refused a pixel's access token or permission; needs an operator.",
            ["pixel"], registry=registry,
        ),
        forward_duration=Histogram(
            "gateway_forward_duration_seconds", "Time of one request to TikTok.",
            buckets=FORWARD_BUCKETS, registry=registry,
        ),
        ingest_duration=Histogram(
            "gateway_ingest_duration_seconds", "Time to validate, store and answer a request.",
            ["endpoint"], buckets=INGEST_BUCKETS, registry=registry,
        ),
        merge_wait=Histogram(
            "gateway_merge_wait_seconds", "Time from an event's first copy to its forward.",
            buckets=MERGE_WAIT_BUCKETS, registry=registry,
        ),
        pending=Gauge(
            "gateway_pending_events", "Events stored and not yet forwarded.", registry=registry,
        ),
        dead_letters=Gauge(
            "gateway_dead_letter_events", "Events in the dead-letter stream.", registry=registry,
        ),
        match_keys=Counter(
            "gateway_match_keys", "Forwarded events carrying each match key.", ["key"],
            registry=registry,
        ),
        redis_errors=Counter(
            "gateway_redis_errors", "Redis calls that failed because Redis was unavailable.",
            registry=registry,
        ),
    )
    for pixel in pixel_labels:
        for source in SOURCES:
            m.received.labels(source, pixel)
        m.merged.labels(pixel)
        m.duplicates.labels(pixel)
        m.forwarded.labels(pixel)
        m.upstream_auth_failures.labels(pixel)
    for reason in REJECT_REASONS:
        m.rejected.labels(reason)
    for reason in DEAD_LETTER_REASONS:
        m.dead_lettered.labels(reason)
    for kind in WARNING_KINDS:
        m.input_warnings.labels(kind)
    for outcome in FORWARD_OUTCOMES:
        m.forward_requests.labels(outcome)
    for key in MATCH_KEYS:
        m.match_keys.labels(key)
    return m
