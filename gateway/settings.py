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
import math
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from copy import copy
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

PREFIX = "GATEWAY_"
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


# -- declaring a setting -------------------------------------------------------------

VARIABLE = "variable"  # the key of a field's declaration in its metadata


def show_value(value: object) -> str:
    """A value written as its variable would say it."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, frozenset):
        return ",".join(sorted(str(v) for v in value))
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Variable:
    """How one GATEWAY_* variable is read, shown and documented."""

    name: str
    parse: Callable[[str, str], object]
    help: str  # the README's "meaning" column
    # What no value means, for a setting whose default is none (None or empty).
    unset: str | None = None
    # How a value is shown by check-config and in the README; secrets are masked here.
    show: Callable[[Any], str] = show_value
    # Further fields the variable sets, from a tuple its parser returns (GATEWAY_LISTEN).
    also: tuple[str, ...] = ()


def setting(
    name: str,
    default: T,
    parse: Callable[[str, str], T],
    help: str,
    *,
    unset: str | None = None,
    show: Callable[[Any], str] = show_value,
) -> T:
    """A field read from GATEWAY_`name` by `parse`, `default` when unset or empty."""
    metadata = {VARIABLE: Variable(PREFIX + name, parse, help, unset, show)}
    if isinstance(default, dict):  # a fresh one each time, as dataclasses want
        return field(default_factory=partial(copy, default), metadata=metadata)
    return field(default=default, metadata=metadata)


def _masked(_value: object) -> str:
    return "***"


def _show_pixels(pixels: Mapping[str, str]) -> str:
    return ",".join(f"{code}=***" for code in pixels)


def redact_url(url: str | None) -> str:
    """A Redis URL with its password hidden, fit for logs and check-config."""
    if url is None:
        return ""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def _show_auto(value: bool | None) -> str:
    return "auto" if value is None else show_value(value)


def _show_listen(host_port: tuple[str, int]) -> str:
    host, port = host_port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- parsers: each reads one variable's text, or raises ConfigError naming it ----------


def _host_port(name: str, raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ConfigError(name, f"expected host:port, got {raw!r}")
    return host.strip("[]"), _port(name, port)


def _port(name: str, raw: str) -> int:
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ConfigError(name, f"invalid port {raw!r}")
    return int(raw)


def _redis_url(name: str, raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(name, "must start with redis://, rediss:// or unix://")
    return raw


def _http_url(name: str, raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ConfigError(name, "must start with http:// or https://")
    return raw.rstrip("/")


def _bool(name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"expected 1 or 0, got {raw!r}")


def _number(expected: str, zero: str | None = None) -> Callable[[str, str], float]:
    """A reader of finite numbers above 0; from 0 when `zero` is given (what 0 means)."""

    def read(name: str, raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise ConfigError(name, f"expected {expected}, got {raw!r}")
        if value < 0 or (value == 0 and zero is None):
            meaning = f" ({zero})" if zero else ""
            bound = "a positive number" if zero is None else f"0{meaning} or more"
            raise ConfigError(name, f"must be {bound}, got {raw!r}")
        return value

    return read


_seconds = _number("a number of seconds")
_per_second = _number("a number a second")
_rate = _number("a number a second (0: no limit)", zero="no limit")


def _positive_int(name: str, raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(name, f"expected a positive whole number, got {raw!r}")
    return int(raw)


def _whole_number(name: str, raw: str) -> int:
    if not raw.isdigit():
        raise ConfigError(name, f"expected a whole number, 0 or more, got {raw!r}")
    return int(raw)


def _batch_size(name: str, raw: str) -> int:
    value = _positive_int(name, raw)
    if value > 1000:
        raise ConfigError(name, "TikTok accepts at most 1000 events a request")
    return value


def _pixels(name: str, raw: str) -> dict[str, str]:
    pixels: dict[str, str] = {}
    for item in raw.split(","):
        code, sep, token = item.strip().partition("=")
        code, token = code.strip(), token.strip()
        if not sep or not code or not token:
            raise ConfigError(name, f"expected PIXEL_CODE=ACCESS_TOKEN pairs, got {item.strip()!r}")
        if not code.isalnum():
            raise ConfigError(name, f"pixel code {code!r} must be letters and digits")
        pixels[code] = token
    return pixels


# One segment of a canonical path: RFC 3986's unreserved characters, not dots alone.
# Every TikTok API path is made of such segments; passthrough.py holds requests to it.
CANONICAL_SEGMENT = re.compile(r"(?!\.+$)[A-Za-z0-9._~-]+")


def _path_prefixes(name: str, raw: str) -> tuple[str, ...]:
    prefixes = []
    for item in raw.split(","):
        prefix = item.strip()
        segments = prefix.removesuffix("/").split("/")[1:]
        if not prefix.startswith("/open_api/") or not all(
            CANONICAL_SEGMENT.fullmatch(segment) for segment in segments
        ):
            raise ConfigError(
                name,
                f"expected paths under /open_api/ such as /open_api/v1.3/pixel/, made of "
                f"letters, digits and - . _ ~ (no empty or dot-only segment), got {prefix!r}",
            )
        prefixes.append(prefix)
    return tuple(prefixes)


def _origins(name: str, raw: str) -> frozenset[str]:
    origins = set()
    for item in raw.split(","):
        origin = item.strip().rstrip("/")
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(name, f"origin {origin!r} must be * or start with http:// or https://")
        origins.add(origin)
    return frozenset(origins)


def _networks(
    name: str, raw: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in raw.split(","))
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None


def _auto_bool(name: str, raw: str) -> bool | None:
    """1 or 0, or `auto` (None): the gateway decides."""
    return None if raw.lower() == "auto" else _bool(name, raw)


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"\.?{_LABEL}(\.{_LABEL})*")


def _cookie_domain(name: str, raw: str) -> str:
    if not _DOMAIN.fullmatch(raw):
        raise ConfigError(name, f"expected a domain such as .shop.example.com, got {raw!r}")
    return raw.lower()


def _samesite(name: str, raw: str) -> str:
    for value in ("Lax", "Strict", "None"):
        if raw.lower() == value.lower():
            return value
    raise ConfigError(name, f"expected Lax, Strict or None, got {raw!r}")


def _region(name: str, raw: str) -> str:
    if len(raw) != 2 or not raw.isalpha():
        raise ConfigError(name, f"expected a two-letter region code such as US, got {raw!r}")
    return raw.upper()


def _choice(options: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.upper() if options is LOG_LEVELS else raw.lower()
        if value not in options:
            raise ConfigError(name, f"expected one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _text(_name: str, raw: str) -> str:
    return raw


def _path(_name: str, raw: str) -> Path:
    return Path(raw)



# -- the settings, in groups; the README's table lists them in this order ---------------


@dataclass(frozen=True)
class ServerSettings:
    """The process: where it listens and keeps files, how it logs, stops, and is inspected."""

    listen_host: str = field(
        default="127.0.0.1",
        metadata={
            VARIABLE: Variable(
                "GATEWAY_LISTEN", _host_port, "host:port to serve on",
                show=_show_listen, also=("listen_port",),
            )
        },
    )  # fmt: skip
    listen_port: int = 8080  # set with listen_host, by GATEWAY_LISTEN
    data_dir: Path = setting(
        "DATA_DIR", Path(".gateway"), _path,
        "the embedded Redis's append-only file, the sandbox log",
    )
    admin_token: str | None = setting(
        "ADMIN_TOKEN", None, _text,
        "bearer token for `/debug/*`; debug is off when unset",
        unset="unset", show=_masked,
    )
    # The demo shop at /demo/; None: on in sandbox mode only.
    demo: bool | None = setting(
        "DEMO", None, _auto_bool,
        "the demo shop at `/demo/`: `auto` (in sandbox mode only), `1` or `0`; with "
        "`GATEWAY_PIXELS` it needs `GATEWAY_TEST_EVENT_CODE`, so its events only reach "
        "TikTok's Test Events",
        show=_show_auto,
    )
    shutdown_timeout: float = setting(
        "SHUTDOWN_TIMEOUT", 30.0, _seconds,
        "seconds a graceful shutdown may take before the exit is forced",
    )
    log_level: str = setting(
        "LOG_LEVEL", "INFO", _choice(LOG_LEVELS), "`DEBUG`, `INFO`, `WARNING`, `ERROR`"
    )
    log_format: str = setting(
        "LOG_FORMAT", "auto", _choice(LOG_FORMATS),
        "`json` (one object a line), `text`, or `auto` (text on a terminal)",
    )

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"


@dataclass(frozen=True)
class RedisSettings:
    """How Redis is reached."""

    redis_url: str | None = setting(
        "REDIS_URL", None, _redis_url, "`redis://`, `rediss://`, `unix://`",
        unset="unset: embedded Redis", show=redact_url,
    )
    redis_cluster: bool = setting(
        "REDIS_CLUSTER", False, _bool, "use the Redis Cluster client"
    )
    # Longest wait on Redis (connect, command, a pooled connection) before answering 503.
    redis_timeout: float = setting(
        "REDIS_TIMEOUT", 5.0, _seconds,
        "seconds Redis may take to connect or answer a command; past it the request is "
        "answered 503 (code 50002), so a hung Redis does not hang clients",
    )


@dataclass(frozen=True)
class UpstreamSettings:
    """TikTok: the pixels and their tokens, where and how fast requests go."""

    pixels: Mapping[str, str] = setting(
        "PIXELS", {}, _pixels, "`PIXEL_CODE=ACCESS_TOKEN` pairs, comma separated",
        unset="none (sandbox)", show=_show_pixels,
    )
    upstream_url: str = setting(
        "UPSTREAM_URL", TIKTOK_URL, _http_url, "TikTok's API base URL"
    )
    upstream_timeout: float = setting(
        "UPSTREAM_TIMEOUT", 10.0, _seconds, "seconds for one request to TikTok"
    )
    upstream_rate_limit: float = setting(
        "UPSTREAM_RATE_LIMIT", 50.0, _per_second, "requests per second to TikTok, per pixel"
    )
    passthrough: bool = setting(
        "PASSTHROUGH", True, _bool,
        "pass other `/open_api/` paths through to TikTok, for our tokens only "
        "([The pass-through](#the-pass-through))",
    )
    # Path prefixes the pass-through relays (segment-wise, see passthrough.is_allowed).
    passthrough_paths: tuple[str, ...] = setting(
        "PASSTHROUGH_PATHS", PASSTHROUGH_PATHS, _path_prefixes,
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
        "MERGE_WINDOW", 300.0, _seconds, "seconds a key stays open for merging"
    )
    dedup_window: float = setting(
        "DEDUP_WINDOW", 172_800.0, _seconds, "seconds a key is remembered, from its first copy"
    )
    early_flush: bool = setting(
        "EARLY_FLUSH", True, _bool, "forward as soon as both sources were seen"
    )
    legacy_aliases: bool = setting(
        "LEGACY_ALIASES", True, _bool,
        "treat TikTok's renamed events as their new names in the key",
    )
    # Acknowledge an ingest only once this many replicas confirm it (WAIT); 0: do not wait
    # (replication is asynchronous: a primary dying an instant after may lose the write).
    redis_wait_replicas: int = setting(
        "REDIS_WAIT_REPLICAS", 0, _whole_number,
        "acknowledge an ingest only once this many replicas of each primary written to "
        "confirm it (Redis `WAIT`); see [Delivery guarantees](#delivery-guarantees-for-operators)",
    )
    # How long an ingest waits for those replicas before answering 503.
    redis_wait_timeout: float = setting(
        "REDIS_WAIT_TIMEOUT", 1.0, _seconds,
        "seconds an ingest waits for those replicas before answering 503 (code 50002); below "
        "`GATEWAY_REDIS_TIMEOUT`",
    )
    forward_lease: float = setting(
        "FORWARD_LEASE", 10.0, _seconds,
        "seconds an instance owns a shard without renewing its lease (renewed every third of "
        "it); a dead instance's shards are taken over after this",
    )
    shards: int = setting(
        "SHARDS", 16, _positive_int,
        "hash slots the state is spread over; every instance on one Redis must use the same "
        "(one with another value refuses to start)",
    )
    dedup_buckets: int = setting(
        "DEDUP_BUCKETS", 1024, _positive_int,
        "hashes per shard that remembered keys are packed into; about events per 48 h / "
        "1,000,000 × 1024 keeps each at ~60 keys (keep it fixed: a change forgets remembered "  # noqa: RUF001 (as the README says it)
        "keys; like `GATEWAY_SHARDS`, the same on every instance)",
    )
    # /debug history records kept over all shards: a fixed memory budget; 0: none.
    debug_history: int = setting(
        "DEBUG_HISTORY", 10_000, _whole_number,
        "records of the `/debug` history kept in Redis, over all shards (at least 10 a "
        "shard): a fixed budget, about 1.3 MB by default; `0`: none (see [Inspecting one "
        "event](#inspecting-one-event))",
    )


@dataclass(frozen=True)
class IngestSettings:
    """What one request to the gateway may hold, and how its fields are read."""

    max_body_bytes: int = setting(
        "MAX_BODY_BYTES", 2 * 1024 * 1024, _positive_int, "largest request body"
    )
    max_events_per_request: int = setting(
        "MAX_EVENTS_PER_REQUEST", 1000, _positive_int, "most events in one request"
    )
    # Longest a client may take to send a request body: a slow-loris trickle is cut off.
    body_timeout: float = setting(
        "BODY_TIMEOUT", 15.0, _seconds,
        "seconds a client may take to send a request body; past it the answer is 408 and the "
        "connection is closed (a body trickled in byte by byte holds no connection for long)",
    )
    phone_region: str | None = setting(
        "PHONE_REGION", None, _region,
        "default region (e.g. `US`) for phone numbers without a country code; without it such "
        "numbers are dropped (a counted, logged field warning), not guessed",
        unset="unset",
    )


@dataclass(frozen=True)
class BrowserSettings:
    """`/pixel/events`: which pages may post, who they are, how often, the ttclid cookie."""

    allowed_origins: frozenset[str] = setting(
        "ALLOWED_ORIGINS", frozenset(), _origins,
        "CORS origins for `/pixel/events` (`*` for any)", unset="none",
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = setting(
        "TRUSTED_PROXIES", (), _networks,
        "CIDRs whose `X-Forwarded-For` is believed", unset="none",
    )
    pixel_rate_limit: float = setting(
        "PIXEL_RATE_LIMIT", 20.0, _rate,
        "`/pixel/events` requests per second, per client address (an IPv6 /64), shared by all "
        "instances through Redis; a rate of `0` turns the limit off, for a CDN or load "
        "balancer that limits rates already, and saves a beacon one Redis round trip",
    )
    pixel_rate_burst: int = setting(
        "PIXEL_RATE_BURST", 100, _positive_int,
        "`/pixel/events` requests a client address may send at once, above "
        "`GATEWAY_PIXEL_RATE_LIMIT`",
    )
    # /pixel/events takes beacons, which browsers cap at 64 KiB: far less than a server body.
    pixel_max_body_bytes: int = setting(
        "PIXEL_MAX_BODY_BYTES", 64 * 1024, _positive_int,
        "largest `/pixel/events` body (browsers cap a beacon at 64 KiB)",
    )
    pixel_max_events: int = setting(
        "PIXEL_MAX_EVENTS", 100, _positive_int, "most events in one `/pixel/events` request"
    )
    # The first-party ttclid cookie set when a page URL carries a click id. Secure None:
    # auto, when the request came over HTTPS (directly or per a trusted proxy).
    cookie_domain: str | None = setting(
        "COOKIE_DOMAIN", None, _cookie_domain,
        "`Domain` of the `ttclid` cookie, e.g. `.shop.example.com`", unset="unset: host-only",
    )
    cookie_secure: bool | None = setting(
        "COOKIE_SECURE", None, _auto_bool,
        "`Secure` on the `ttclid` cookie: `1`, `0`, or `auto`: when the request came over "
        "HTTPS (directly, or per `X-Forwarded-Proto` from a trusted proxy)",
        show=_show_auto,
    )
    cookie_samesite: str = setting(
        "COOKIE_SAMESITE", "Lax", _samesite,
        "`Lax`, `Strict`, or `None` (not with `GATEWAY_COOKIE_SECURE=0`)",
    )


@dataclass(frozen=True)
class ForwardSettings:
    """Sending to TikTok: batches, polling, what is added, retries and giving up."""

    forward_batch_size: int = setting(
        "FORWARD_BATCH_SIZE", 1000, _batch_size, "most events in one request to TikTok"
    )
    forward_poll_interval: float = setting(
        "FORWARD_POLL_INTERVAL", 0.2, _seconds,
        "seconds between looks at the shard logs for copies another instance received; a copy "
        "this instance received wakes its forwarder at once (after 100 ms, so the copies "
        "arriving meanwhile share its read and its request to TikTok)",
    )
    forward_concurrency: int = setting(
        "FORWARD_CONCURRENCY", 8, _positive_int,
        "requests to TikTok one instance has in flight at once, at most",
    )
    test_event_code: str | None = setting(
        "TEST_EVENT_CODE", None, _text,
        "sent with every event (a request's own code wins)", unset="unset",
    )
    max_event_age: float = setting(
        "MAX_EVENT_AGE", 604_800.0, _seconds,
        "seconds after which an undelivered event is dead-lettered",
    )
    retry_base: float = setting(
        "RETRY_BASE", 1.0, _seconds, "backoff: first delay, seconds"
    )
    retry_cap: float = setting(
        "RETRY_CAP", 300.0, _seconds, "backoff: largest delay, seconds"
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
