"""Prometheus metrics: built by `make_metrics(registry)`, never at import time.

Label values are bounded: pixels come from configuration (sandbox traffic is
labelled "sandbox"), event names are TikTok's standard names or "custom",
reasons, outcomes and code classes come from fixed sets defined here and in
`upstream.CODE_CLASSES`, field warnings from `field_warnings.FIELD_WARNINGS`.
Known label values are created at zero, so `rate()` and the dashboard see
every series from the first scrape.

Gauges that need Redis (pending, dead letters, forward lag, Redis up) are set
by a background task in `app.py`; a scrape never waits on Redis.

Under `serve --workers N` every worker writes its values to files in
PROMETHEUS_MULTIPROC_DIR and `exposition()` adds them up per scrape. Each
gauge says how: the Redis-derived ones are the same number in every worker,
so the most recent live reading wins; Redis up is the worst live reading.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from . import __version__
from .events import SOURCES, STANDARD_EVENTS, Source
from .field_warnings import FIELD_WARNINGS

# The pixel label of every event in sandbox mode (no pixels configured): one series, whatever
# pixel codes clients send.
SANDBOX_PIXEL_LABEL = "sandbox"
MATCH_KEYS = ("email", "phone", "external_id", "ttp", "ttclid", "ip", "user_agent")
REJECT_REASONS = (
    "invalid_json",
    "invalid_request",
    "invalid_event",
    "unknown_pixel",
    "auth",
    "origin",
    "too_large",
    "body_timeout",
    "rate_limited",
    "store_unavailable",
)
# The code classes (upstream.CODE_CLASSES) each outcome can come with; these pairs start at zero.
FORWARD_CODE_CLASSES: dict[str, tuple[str, ...]] = {
    "delivered": ("0", "20001"),
    "retry": (
        "4xxxx_rate_limit", "4xxxx_transient", "5xxxx", "http_4xx", "http_5xx", "network", "other",
    ),
    "auth": ("4xxxx_auth", "http_4xx"),
    "rejected": ("4xxxx_invalid", "http_4xx", "other"),
}
CUSTOM_EVENT = "custom"
EVENT_LABELS = (*sorted(STANDARD_EVENTS), CUSTOM_EVENT)
# How a forwarded key was seen: from both sources (the pair matched) or from one.
PAIR_SOURCES = ("both", "pixel_only", "server_only")
DEAD_LETTER_REASONS = ("rejected", "auth", "too_old")
# What became of a request to the pass-through (errors.RelayRefused.outcome for refusals).
PASSTHROUGH_OUTCOMES = (
    "relayed", "upstream_error", "refused_path", "refused_token", "refused_prefix",
)
INGEST_ENDPOINTS = ("event_track", "pixel_track", "pixel_batch", "browser")

# Ingest is sub-millisecond to a few ms; forwarding is a network call to TikTok (tens of
# ms to seconds, up to GATEWAY_UPSTREAM_TIMEOUT); both start below a millisecond, where a
# local Redis or a sandbox file answers.
INGEST_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
)
FORWARD_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
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
    field_warnings: Counter
    forward_requests: Counter
    forward_retries: Counter
    forwarded_keys: Counter
    upstream_auth_failures: Counter
    forward_duration: Histogram
    ingest_duration: Histogram
    merge_wait: Histogram
    pending: Gauge
    dead_letters: Gauge
    forward_lag: Gauge
    match_keys: Counter
    redis_errors: Counter
    redis_up: Gauge
    passthrough_requests: Counter
    unclaimable_shards: Gauge
    unclaimable_seconds: Gauge
    build_info: Info

    def pixel_label(self, pixel_code: str, configured: Iterable[str]) -> str:
        return pixel_code if pixel_code in configured else SANDBOX_PIXEL_LABEL

    @staticmethod
    def event_label(name: str) -> str:
        """TikTok's standard names as they are; any custom name is "custom"."""
        return name if name in STANDARD_EVENTS else CUSTOM_EVENT

    @staticmethod
    def pair_label(sources: Iterable[Source]) -> str | None:
        """`both`, `pixel_only` or `server_only`; None for a key without a known source."""
        seen = set(sources)
        if len(seen) == len(SOURCES):
            return "both"
        return f"{seen.pop()}_only" if seen else None


def make_metrics(registry: CollectorRegistry, pixels: Iterable[str] = ()) -> Metrics:
    """Create every metric in `registry`, with known label values at zero."""
    # `*_created` series double the exposition and no dashboard uses them. The switch is
    # process-wide in prometheus_client; every registry of ours wants it off.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    pixel_labels = list(pixels) or [SANDBOX_PIXEL_LABEL]
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
        field_warnings=Counter(
            "gateway_field_warnings",
            "Fields of accepted events flagged, once per event: forwarded as sent (a value "
            "TikTok only advises against) or dropped (a match key that cannot be normalised).",
            ["pixel", "field", "reason"], registry=registry,
        ),
        forward_requests=Counter(
            "gateway_forward_requests",
            "Requests sent to TikTok, by outcome and class of TikTok's code (or HTTP status).",
            ["outcome", "code_class"], registry=registry,
        ),
        forward_retries=Counter(
            "gateway_forward_retries", "Events put back for a later attempt.", registry=registry,
        ),
        forwarded_keys=Counter(
            "gateway_forwarded_keys",
            "Deduplicated keys forwarded, by the sources their copies came from: the share "
            "with sources=\"both\" is the pair completion (do pixel and server event_ids match).",
            ["pixel", "event", "sources"], registry=registry,
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
            "gateway_pending_events", "Events stored and not yet forwarded.",
            multiprocess_mode="livemostrecent", registry=registry,
        ),
        dead_letters=Gauge(
            "gateway_dead_letter_events", "Events in the dead-letter stream.",
            multiprocess_mode="livemostrecent", registry=registry,
        ),
        forward_lag=Gauge(
            "gateway_forward_lag_seconds",
            "How long the oldest due event has waited for a forwarder to claim it.",
            multiprocess_mode="livemostrecent", registry=registry,
        ),
        match_keys=Counter(
            "gateway_match_keys", "Forwarded events carrying each match key.", ["pixel", "key"],
            registry=registry,
        ),
        redis_errors=Counter(
            "gateway_redis_errors", "Redis calls that failed because Redis was unavailable.",
            registry=registry,
        ),
        redis_up=Gauge(
            "gateway_redis_up",
            "1 when the last background read of Redis succeeded, 0 when it failed.",
            multiprocess_mode="livemin", registry=registry,
        ),
        passthrough_requests=Counter(
            "gateway_passthrough_requests",
            "Requests to other /open_api/ paths: relayed to TikTok, or refused and why.",
            ["outcome"], registry=registry,
        ),
        unclaimable_shards=Gauge(
            "gateway_unclaimable_shards",
            "Shards the forwarder's last claim failed on (their Redis node away, failing over "
            "or refusing); retried at every claim. The log names them.",
            multiprocess_mode="livemax", registry=registry,
        ),
        unclaimable_seconds=Gauge(
            "gateway_unclaimable_shards_seconds",
            "How long the longest-failing shard has failed to be claimed; 0 when all are claimed.",
            multiprocess_mode="livemax", registry=registry,
        ),
        build_info=Info("gateway_build", "The gateway's version.", registry=registry),
    )
    m.build_info.info({"version": __version__})
    for pixel in pixel_labels:
        for source in SOURCES:
            m.received.labels(source, pixel)
        m.merged.labels(pixel)
        m.duplicates.labels(pixel)
        m.forwarded.labels(pixel)
        m.upstream_auth_failures.labels(pixel)
        for key in MATCH_KEYS:
            m.match_keys.labels(pixel, key)
        for warning in FIELD_WARNINGS:
            m.field_warnings.labels(pixel, warning.field, warning.reason)
        for event in EVENT_LABELS:
            for sources in PAIR_SOURCES:
                m.forwarded_keys.labels(pixel, event, sources)
    one_label: list[tuple[Counter | Histogram, tuple[str, ...]]] = [
        (m.rejected, REJECT_REASONS),
        (m.dead_lettered, DEAD_LETTER_REASONS),
        (m.ingest_duration, INGEST_ENDPOINTS),
        (m.passthrough_requests, PASSTHROUGH_OUTCOMES),
    ]
    for metric, values in one_label:
        for value in values:
            metric.labels(value)
    for outcome, classes in FORWARD_CODE_CLASSES.items():
        for code_class in classes:
            m.forward_requests.labels(outcome, code_class)
    return m


def exposition(metrics: Metrics, multiprocess_dir: Path | None = None) -> bytes:
    """The text a scrape of /metrics answers: this process's, or every worker's added up."""
    if multiprocess_dir is None:
        return generate_latest(metrics.registry)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(multiprocess_dir))  # type: ignore[no-untyped-call]
    # An Info keeps its value in memory, not in the workers' files; it is the same in all.
    registry.register(metrics.build_info)
    return generate_latest(registry)
