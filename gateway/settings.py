"""Typed, frozen configuration, read once from the environment (and an optional TOML file).

Nothing else in the gateway reads the environment: `cli.py` calls
`Settings.from_env()` and passes the result down. A bad value raises
`ConfigError` naming the variable, which the CLI prints as one line.

Each setting is declared once, as a field of one of the groups below: its variable,
default, parser and help (`setting(...)`). The parsing, the README's configuration
table (`markdown_table`, held equal to the README by a test) and `check-config`'s
listing (`effective`) are derived from those declarations. `Settings` is every group
at once, so a component that needs one group takes that type and sees only it.
"""

from __future__ import annotations

import difflib
import ipaddress
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from . import setting_types as parse
from .errors import ConfigError
from .setting_types import (
    PREFIX,
    VARIABLE,
    Variable,
    masked,
    redact_url,
    setting,
    show_auto,
    show_listen,
    show_pixels,
)

T = TypeVar("T")

TIKTOK_URL = "https://business-api.tiktok.com"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("auto", "json", "text")
# What an events client calls on TikTok besides the ingest paths: pixel and offline event
# set management and statistics (the official SDK's MeasurementApi). README says why.
PASSTHROUGH_PATHS = ("/open_api/v1.2/pixel/", "/open_api/v1.3/pixel/", "/open_api/v1.3/offline/")
# Variables earlier versions read, and what took their place: set, they are named in a
# warning at start-up rather than silently ignored.
RETIRED = {
    "GATEWAY_TIMELINE_RETENTION": "/debug timelines are no longer kept per key for a time; "
    "they come from a history of fixed size, GATEWAY_DEBUG_HISTORY (records, default 10000)",
}


# -- the settings, in groups; the README's table lists them in this order ---------------


@dataclass(frozen=True)
class ServerSettings:
    """The process: where it listens and keeps files, how it logs, stops, and is inspected."""

    listen_host: str = field(
        default="127.0.0.1",
        metadata={
            VARIABLE: Variable(
                "GATEWAY_LISTEN", parse.host_port, "host:port to serve on",
                show=show_listen, also=("listen_port",),
            )
        },
    )  # fmt: skip
    listen_port: int = 8080  # set with listen_host, by GATEWAY_LISTEN
    data_dir: Path = setting(
        "DATA_DIR", Path(".gateway"), parse.path,
        "the embedded Redis's append-only file, the sandbox log",
    )
    admin_token: str | None = setting(
        "ADMIN_TOKEN", None, parse.text,
        "bearer token for `/debug/*` and the console at `/console/` (its login); unset, debug "
        "is off and the console is open only in sandbox mode, to requests from this machine",
        unset="unset", show=masked,
    )
    # The demo shop at /demo/; None: on in sandbox mode only.
    demo: bool | None = setting(
        "DEMO", None, parse.auto_flag,
        "the demo shop at `/demo/`: `auto` (in sandbox mode only), `1` or `0`; with "
        "`GATEWAY_PIXELS` it needs `GATEWAY_TEST_EVENT_CODE`, so its events only reach "
        "TikTok's Test Events",
        show=show_auto,
    )
    shutdown_timeout: float = setting(
        "SHUTDOWN_TIMEOUT", 30.0, parse.seconds,
        "seconds a graceful shutdown may take before the exit is forced",
    )
    log_level: str = setting(
        "LOG_LEVEL", "INFO", parse.choice(LOG_LEVELS, upper=True),
        "`DEBUG`, `INFO`, `WARNING`, `ERROR`",
    )
    log_format: str = setting(
        "LOG_FORMAT", "auto", parse.choice(LOG_FORMATS),
        "`json` (one object a line), `text`, or `auto` (text on a terminal)",
    )

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"


@dataclass(frozen=True)
class RedisSettings:
    """How Redis is reached."""

    redis_url: str | None = setting(
        "REDIS_URL", None, parse.redis_url, "`redis://`, `rediss://`, `unix://`",
        unset="unset: embedded Redis", show=redact_url,
    )
    redis_cluster: bool = setting(
        "REDIS_CLUSTER", False, parse.flag, "use the Redis Cluster client"
    )
    # Longest wait on Redis (connect, command, a pooled connection) before answering 503.
    redis_timeout: float = setting(
        "REDIS_TIMEOUT", 5.0, parse.seconds,
        "seconds Redis may take to connect or answer a command; past it the request is "
        "answered 503 (code 50002), so a hung Redis does not hang clients",
    )


@dataclass(frozen=True)
class UpstreamSettings:
    """TikTok: the pixels and their tokens, where and how fast requests go."""

    pixels: Mapping[str, str] = setting(
        "PIXELS", {}, parse.pixels, "`PIXEL_CODE=ACCESS_TOKEN` pairs, comma separated",
        unset="none (sandbox)", show=show_pixels,
    )
    upstream_url: str = setting(
        "UPSTREAM_URL", TIKTOK_URL, parse.http_url, "TikTok's API base URL"
    )
    upstream_timeout: float = setting(
        "UPSTREAM_TIMEOUT", 10.0, parse.seconds, "seconds for one request to TikTok"
    )
    upstream_rate_limit: float = setting(
        "UPSTREAM_RATE_LIMIT", 50.0, parse.per_second, "requests per second to TikTok, per pixel"
    )
    passthrough: bool = setting(
        "PASSTHROUGH", True, parse.flag,
        "pass other `/open_api/` paths through to TikTok, for our tokens only "
        "([The pass-through](#the-pass-through))",
    )
    # Path prefixes the pass-through relays (segment-wise, see passthrough.is_allowed).
    passthrough_paths: tuple[str, ...] = setting(
        "PASSTHROUGH_PATHS", PASSTHROUGH_PATHS, parse.path_prefixes,
        "comma-separated path prefixes the pass-through relays, each under `/open_api/`",
    )

    @property
    def sandbox(self) -> bool:
        """No pixels configured: accept any pixel and write forwards to a local log."""
        return not self.pixels


@dataclass(frozen=True)
class StoreSettings:
    """The state in Redis: its layout, the windows, the history; what `make_store` needs."""

    merge_window: float = setting(
        "MERGE_WINDOW", 300.0, parse.seconds, "seconds a key stays open for merging"
    )
    dedup_window: float = setting(
        "DEDUP_WINDOW", 172_800.0, parse.seconds, "seconds a key is remembered, from its first copy"
    )
    early_flush: bool = setting(
        "EARLY_FLUSH", True, parse.flag, "forward as soon as both sources were seen"
    )
    legacy_aliases: bool = setting(
        "LEGACY_ALIASES", True, parse.flag,
        "treat TikTok's renamed events as their new names in the key",
    )
    # Acknowledge an ingest only once this many replicas confirm it (WAIT); 0: do not wait
    # (replication is asynchronous: a primary dying an instant after may lose the write).
    redis_wait_replicas: int = setting(
        "REDIS_WAIT_REPLICAS", 0, parse.whole_number,
        "acknowledge an ingest only once this many replicas of each primary written to "
        "confirm it (Redis `WAIT`); see [Delivery guarantees](#delivery-guarantees-for-operators)",
    )
    # How long an ingest waits for those replicas before answering 503.
    redis_wait_timeout: float = setting(
        "REDIS_WAIT_TIMEOUT", 1.0, parse.seconds,
        "seconds an ingest waits for those replicas before answering 503 (code 50002); below "
        "`GATEWAY_REDIS_TIMEOUT`",
    )
    forward_lease: float = setting(
        "FORWARD_LEASE", 10.0, parse.seconds,
        "seconds an instance owns a shard without renewing its lease (renewed every third of "
        "it); a dead instance's shards are taken over after this",
    )
    shards: int = setting(
        "SHARDS", 16, parse.positive_int,
        "hash slots the state is spread over; every instance on one Redis must use the same "
        "(one with another value refuses to start)",
    )
    dedup_buckets: int = setting(
        "DEDUP_BUCKETS", 1024, parse.positive_int,
        "hashes per shard that remembered keys are packed into; about events per 48 h / "
        "1,000,000 × 1024 keeps each at ~60 keys (keep it fixed: a change forgets remembered "  # noqa: RUF001 (as the README says it)
        "keys; like `GATEWAY_SHARDS`, the same on every instance)",
    )
    # /debug history records kept over all shards: a fixed memory budget; 0: none.
    debug_history: int = setting(
        "DEBUG_HISTORY", 10_000, parse.whole_number,
        "records of the `/debug` history kept in Redis, over all shards (at least 10 a "
        "shard): a fixed budget, about 2 MB by default; `0`: none (see [Inspecting one "
        "event](#inspecting-one-event))",
    )


@dataclass(frozen=True)
class IngestSettings:
    """What one request to the gateway may hold, and how its fields are read."""

    max_body_bytes: int = setting(
        "MAX_BODY_BYTES", 2 * 1024 * 1024, parse.positive_int, "largest request body"
    )
    max_events_per_request: int = setting(
        "MAX_EVENTS_PER_REQUEST", 1000, parse.positive_int, "most events in one request"
    )
    # Longest a client may take to send a request body: a slow-loris trickle is cut off.
    body_timeout: float = setting(
        "BODY_TIMEOUT", 15.0, parse.seconds,
        "seconds a client may take to send a request body; past it the answer is 408 and the "
        "connection is closed (a body trickled in byte by byte holds no connection for long)",
    )
    phone_region: str | None = setting(
        "PHONE_REGION", None, parse.region,
        "default region (e.g. `US`) for phone numbers without a country code; without it such "
        "numbers are dropped (a counted, logged field warning), not guessed",
        unset="unset",
    )


@dataclass(frozen=True)
class BrowserSettings:
    """`/pixel/events`: which pages may post, who they are, how often, the ttclid cookie."""

    allowed_origins: frozenset[str] = setting(
        "ALLOWED_ORIGINS", frozenset(), parse.origins,
        "CORS origins for `/pixel/events` (`*` for any)", unset="none",
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        "TRUSTED_PROXIES", (), parse.networks,
        "CIDRs whose `X-Forwarded-For` is believed", unset="none",
    )
    pixel_rate_limit: float = setting(
        "PIXEL_RATE_LIMIT", 20.0, parse.rate,
        "`/pixel/events` requests per second, per client address (an IPv6 /64), shared by all "
        "instances through Redis; a rate of `0` turns the limit off, for a CDN or load "
        "balancer that limits rates already, and saves a beacon one Redis round trip",
    )
    pixel_rate_burst: int = setting(
        "PIXEL_RATE_BURST", 100, parse.positive_int,
        "`/pixel/events` requests a client address may send at once, above "
        "`GATEWAY_PIXEL_RATE_LIMIT`",
    )
    # /pixel/events takes beacons, which browsers cap at 64 KiB: far less than a server body.
    pixel_max_body_bytes: int = setting(
        "PIXEL_MAX_BODY_BYTES", 64 * 1024, parse.positive_int,
        "largest `/pixel/events` body (browsers cap a beacon at 64 KiB)",
    )
    pixel_max_events: int = setting(
        "PIXEL_MAX_EVENTS", 100, parse.positive_int, "most events in one `/pixel/events` request"
    )
    # The first-party ttclid cookie set when a page URL carries a click id. Secure None:
    # auto, when the request came over HTTPS (directly or per a trusted proxy).
    cookie_domain: str | None = setting(
        "COOKIE_DOMAIN", None, parse.cookie_domain,
        "`Domain` of the `ttclid` cookie, e.g. `.shop.example.com`", unset="unset: host-only",
    )
    cookie_secure: bool | None = setting(
        "COOKIE_SECURE", None, parse.auto_flag,
        "`Secure` on the `ttclid` cookie: `1`, `0`, or `auto`: when the request came over "
        "HTTPS (directly, or per `X-Forwarded-Proto` from a trusted proxy)",
        show=show_auto,
    )
    cookie_samesite: str = setting(
        "COOKIE_SAMESITE", "Lax", parse.samesite,
        "`Lax`, `Strict`, or `None` (not with `GATEWAY_COOKIE_SECURE=0`)",
    )


@dataclass(frozen=True)
class ForwardSettings:
    """Sending to TikTok: batches, polling, what is added, retries and giving up."""

    forward_batch_size: int = setting(
        "FORWARD_BATCH_SIZE", 1000, parse.batch_size, "most events in one request to TikTok"
    )
    forward_poll_interval: float = setting(
        "FORWARD_POLL_INTERVAL", 0.2, parse.seconds,
        "seconds between looks at the shard logs for copies another instance received; a copy "
        "this instance received wakes its forwarder at once (after 100 ms, so the copies "
        "arriving meanwhile share its read and its request to TikTok)",
    )
    forward_concurrency: int = setting(
        "FORWARD_CONCURRENCY", 8, parse.positive_int,
        "requests to TikTok one instance has in flight at once, at most",
    )
    test_event_code: str | None = setting(
        "TEST_EVENT_CODE", None, parse.text,
        "sent with every event (a request's own code wins)", unset="unset",
    )
    max_event_age: float = setting(
        "MAX_EVENT_AGE", 604_800.0, parse.seconds,
        "seconds after which an undelivered event is dead-lettered",
    )
    retry_base: float = setting(
        "RETRY_BASE", 1.0, parse.seconds, "backoff: first delay, seconds"
    )
    retry_cap: float = setting(
        "RETRY_CAP", 300.0, parse.seconds, "backoff: largest delay, seconds"
    )


GROUPS = (
    ServerSettings, RedisSettings, UpstreamSettings, StoreSettings, IngestSettings,
    BrowserSettings, ForwardSettings,
)  # fmt: skip


@dataclass(frozen=True)
class Settings(
    ServerSettings, RedisSettings, UpstreamSettings, StoreSettings, IngestSettings,
    BrowserSettings, ForwardSettings,
):  # fmt: skip
    """Everything the gateway can be told: every group at once; defaults are PRODUCT.md's."""

    # Set variables that no longer do anything, each with what replaced it (see RETIRED).
    retired: tuple[str, ...] = ()
    # Set GATEWAY_* names that are no setting, each with the closest one (likely a typo).
    unknown: tuple[str, ...] = field(default=(), compare=False)

    @property
    def demo_enabled(self) -> bool:
        """Serve the demo shop: in sandbox mode, unless GATEWAY_DEMO says otherwise."""
        return self.sandbox if self.demo is None else self.demo

    @classmethod
    def from_env(cls, environ: Mapping[str, str], config_file: Path | None = None) -> Settings:
        """Build settings from `GATEWAY_*` variables; a TOML file supplies defaults for them."""
        values: dict[str, str] = {}
        if config_file is not None:
            values.update(_read_toml(config_file))
        values.update({k: v for k, v in environ.items() if k.startswith(PREFIX)})
        return _parse(values)


@dataclass(frozen=True, slots=True)
class Declared:
    """A declared variable, with the fields it sets and their defaults."""

    variable: Variable
    fields: tuple[str, ...]
    default: object  # a tuple when the variable sets several fields

    @property
    def shown_default(self) -> str:
        """The default as the README's table gives it."""
        if self.variable.unset is not None and not self.default:
            return self.variable.unset
        return f"`{self.variable.show(self.default)}`"

    def value(self, settings: Settings) -> object:
        values = tuple(getattr(settings, name) for name in self.fields)
        return values if len(values) > 1 else values[0]


def _declarations() -> Iterator[Declared]:
    for group in GROUPS:
        defaults = group()
        for f in fields(group):
            variable = f.metadata.get(VARIABLE)
            if variable is not None:
                names = (f.name, *variable.also)
                values = tuple(getattr(defaults, name) for name in names)
                yield Declared(variable, names, values if len(values) > 1 else values[0])


DECLARED: tuple[Declared, ...] = tuple(_declarations())
VARIABLES: frozenset[str] = frozenset(d.variable.name for d in DECLARED)


def markdown_table() -> str:
    """The README's configuration table, from the declarations."""
    rows = ["| name | default | meaning |", "| --- | --- | --- |"]
    rows += [
        f"| `{d.variable.name}` | {d.shown_default} | {d.variable.help} |" for d in DECLARED
    ]
    return "\n".join(rows) + "\n"


def effective(settings: Settings) -> list[str]:
    """One line a variable: the value in effect, secrets masked (for check-config)."""
    lines = []
    for d in DECLARED:
        value = d.value(settings)
        if d.variable.unset is not None and not value:
            lines.append(f"{d.variable.name}=  # {d.variable.unset}")
        else:
            lines.append(f"{d.variable.name}={d.variable.show(value)}")
    return lines


def _read_toml(path: Path) -> dict[str, str]:
    try:
        with path.open("rb") as fh:
            doc = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("GATEWAY_CONFIG", f"cannot read {path}: {exc}") from exc
    out: dict[str, str] = {}
    for key, value in doc.items():
        name = key.upper() if key.upper().startswith(PREFIX) else PREFIX + key.upper()
        if isinstance(value, bool):
            out[name] = "1" if value else "0"
        elif isinstance(value, list):
            out[name] = ",".join(str(v) for v in value)
        elif isinstance(value, dict):
            out[name] = ",".join(f"{k}={v}" for k, v in value.items())
        else:
            out[name] = str(value)
    return out


def _parse(env: Mapping[str, str]) -> Settings:
    values: dict[str, Any] = {}
    for d in DECLARED:
        raw = env.get(d.variable.name, "").strip()
        if raw:
            parsed: Any = d.variable.parse(d.variable.name, raw)
            values.update(
                zip(d.fields, parsed, strict=True) if d.variable.also else [(d.fields[0], parsed)]
            )
    settings = Settings(
        **values,
        retired=tuple(
            f"{name} is no longer used: {why}" for name, why in RETIRED.items()
            if env.get(name, "").strip()
        ),
        unknown=tuple(
            _unknown(name) for name in sorted(env) if name not in VARIABLES | RETIRED.keys()
        ),
    )
    _check_redis_settings(settings)
    _check_browser_settings(settings)
    return settings


def _unknown(name: str) -> str:
    # Compared without the prefix, which every name shares and would make all look alike.
    known = sorted(v.removeprefix(PREFIX) for v in VARIABLES)
    closest = difflib.get_close_matches(name.removeprefix(PREFIX), known, n=1)
    hint = f"; did you mean {PREFIX}{closest[0]}?" if closest else ""
    return f"{name} is not a setting of the gateway and is ignored{hint}"


def _check_redis_settings(settings: Settings) -> None:
    if settings.dedup_window < settings.merge_window:
        raise ConfigError("GATEWAY_DEDUP_WINDOW", "must not be shorter than GATEWAY_MERGE_WINDOW")
    if settings.redis_cluster and not (settings.redis_url or "").startswith(
        ("redis://", "rediss://")
    ):
        # The embedded Redis is one node, and a cluster is reached over TCP only.
        raise ConfigError(
            "GATEWAY_REDIS_CLUSTER", "needs GATEWAY_REDIS_URL=redis:// or rediss:// of a node"
        )
    if settings.redis_wait_replicas and settings.redis_wait_timeout >= settings.redis_timeout:
        # The connection would time out first, and be dropped, while WAIT still waits.
        raise ConfigError(
            "GATEWAY_REDIS_WAIT_TIMEOUT",
            f"must be shorter than GATEWAY_REDIS_TIMEOUT ({settings.redis_timeout:g} s)",
        )


def _check_browser_settings(settings: Settings) -> None:
    if settings.cookie_samesite == "None" and settings.cookie_secure is False:
        raise ConfigError(
            "GATEWAY_COOKIE_SAMESITE",
            "None needs GATEWAY_COOKIE_SECURE=1 or auto: browsers drop such cookies otherwise",
        )
    if settings.demo and not settings.sandbox and settings.test_event_code is None:
        # The demo posts server events for a real pixel: only to TikTok's Test Events tab.
        raise ConfigError(
            "GATEWAY_DEMO",
            "with GATEWAY_PIXELS set, the demo needs GATEWAY_TEST_EVENT_CODE, so its "
            "events only reach TikTok's Test Events",
        )
