"""Typed, frozen configuration, read once from the environment (and an optional TOML file).

Nothing else in the gateway reads the environment: `cli.py` calls
`Settings.from_env()` and passes the result down. A bad value raises
`ConfigError` naming the variable, which the CLI prints as one line.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

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


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway can be told; defaults are PRODUCT.md's."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    redis_url: str | None = None
    redis_cluster: bool = False
    # Longest wait on Redis (connect, command, a pooled connection) before answering 503.
    redis_timeout: float = 5.0
    # Acknowledge an ingest only once this many replicas confirm it (WAIT); 0: do not wait
    # (replication is asynchronous: a primary dying an instant after may lose the write).
    redis_wait_replicas: int = 0
    # How long an ingest waits for those replicas before answering 503.
    redis_wait_timeout: float = 1.0
    data_dir: Path = Path(".gateway")
    pixels: Mapping[str, str] = field(default_factory=dict)
    upstream_url: str = TIKTOK_URL
    merge_window: float = 300.0
    dedup_window: float = 172_800.0
    early_flush: bool = True
    test_event_code: str | None = None
    allowed_origins: frozenset[str] = frozenset()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    admin_token: str | None = None
    max_event_age: float = 604_800.0
    phone_region: str | None = None
    legacy_aliases: bool = True
    passthrough: bool = True
    # Path prefixes the pass-through relays (segment-wise, see passthrough.is_allowed).
    passthrough_paths: tuple[str, ...] = PASSTHROUGH_PATHS
    # Operational knobs beyond PRODUCT.md's table; the defaults suit production.
    max_body_bytes: int = 2 * 1024 * 1024
    max_events_per_request: int = 1000
    # Longest a client may take to send a request body: a slow-loris trickle is cut off.
    body_timeout: float = 15.0
    pixel_rate_limit: float = 20.0
    pixel_rate_burst: int = 100
    # /pixel/events takes beacons, which browsers cap at 64 KiB: far less than a server body.
    pixel_max_body_bytes: int = 64 * 1024
    pixel_max_events: int = 100
    # The first-party ttclid cookie set when a page URL carries a click id. Secure None:
    # auto, when the request came over HTTPS (directly or per a trusted proxy).
    cookie_domain: str | None = None
    cookie_secure: bool | None = None
    cookie_samesite: str = "Lax"
    # The demo shop at /demo/; None: on in sandbox mode only.
    demo: bool | None = None
    forward_batch_size: int = 1000
    forward_poll_interval: float = 0.2
    forward_concurrency: int = 8
    forward_lease: float = 10.0
    upstream_timeout: float = 10.0
    shutdown_timeout: float = 30.0
    upstream_rate_limit: float = 50.0
    retry_base: float = 1.0
    retry_cap: float = 300.0
    shards: int = 16
    dedup_buckets: int = 1024
    # /debug history records kept over all shards: a fixed memory budget; 0: none.
    debug_history: int = 10_000
    log_level: str = "INFO"
    log_format: str = "auto"
    # Set variables that no longer do anything, each with what replaced it (see RETIRED).
    retired: tuple[str, ...] = ()

    @property
    def sandbox(self) -> bool:
        """No pixels configured: accept any pixel and write forwards to a local log."""
        return not self.pixels

    @property
    def demo_enabled(self) -> bool:
        """Serve the demo shop: in sandbox mode, unless GATEWAY_DEMO says otherwise."""
        return self.sandbox if self.demo is None else self.demo

    @property
    def listen(self) -> str:
        return f"{self.listen_host}:{self.listen_port}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str], config_file: Path | None = None) -> Settings:
        """Build settings from `GATEWAY_*` variables; a TOML file supplies defaults for them."""
        values: dict[str, str] = {}
        if config_file is not None:
            values.update(_read_toml(config_file))
        values.update({k: v for k, v in environ.items() if k.startswith(PREFIX)})
        return _parse(values)


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
    def get(name: str, parse: Callable[[str, str], T], default: T) -> T:
        raw = env.get(PREFIX + name)
        if raw is None or raw.strip() == "":
            return default
        return parse(PREFIX + name, raw.strip())

    d = Settings()
    host, port = get("LISTEN", _host_port, (d.listen_host, d.listen_port))
    settings = Settings(
        listen_host=host,
        listen_port=port,
        redis_url=get("REDIS_URL", _redis_url, None),
        redis_cluster=get("REDIS_CLUSTER", _bool, False),
        redis_timeout=get("REDIS_TIMEOUT", _seconds, d.redis_timeout),
        redis_wait_replicas=get("REDIS_WAIT_REPLICAS", _whole_number, d.redis_wait_replicas),
        redis_wait_timeout=get("REDIS_WAIT_TIMEOUT", _seconds, d.redis_wait_timeout),
        data_dir=get("DATA_DIR", lambda _n, v: Path(v), d.data_dir),
        pixels=get("PIXELS", _pixels, {}),
        upstream_url=get("UPSTREAM_URL", _http_url, d.upstream_url),
        merge_window=get("MERGE_WINDOW", _seconds, d.merge_window),
        dedup_window=get("DEDUP_WINDOW", _seconds, d.dedup_window),
        early_flush=get("EARLY_FLUSH", _bool, d.early_flush),
        test_event_code=get("TEST_EVENT_CODE", lambda _n, v: v, None),
        allowed_origins=get("ALLOWED_ORIGINS", _origins, frozenset()),
        trusted_proxies=get("TRUSTED_PROXIES", _networks, ()),
        admin_token=get("ADMIN_TOKEN", lambda _n, v: v, None),
        max_event_age=get("MAX_EVENT_AGE", _seconds, d.max_event_age),
        phone_region=get("PHONE_REGION", _region, None),
        legacy_aliases=get("LEGACY_ALIASES", _bool, d.legacy_aliases),
        passthrough=get("PASSTHROUGH", _bool, d.passthrough),
        passthrough_paths=get("PASSTHROUGH_PATHS", _path_prefixes, d.passthrough_paths),
        max_body_bytes=get("MAX_BODY_BYTES", _positive_int, d.max_body_bytes),
        max_events_per_request=get("MAX_EVENTS_PER_REQUEST", _positive_int, 1000),
        body_timeout=get("BODY_TIMEOUT", _seconds, d.body_timeout),
        pixel_rate_limit=get("PIXEL_RATE_LIMIT", _rate, d.pixel_rate_limit),
        pixel_rate_burst=get("PIXEL_RATE_BURST", _positive_int, d.pixel_rate_burst),
        pixel_max_body_bytes=get("PIXEL_MAX_BODY_BYTES", _positive_int, d.pixel_max_body_bytes),
        pixel_max_events=get("PIXEL_MAX_EVENTS", _positive_int, d.pixel_max_events),
        cookie_domain=get("COOKIE_DOMAIN", _cookie_domain, None),
        cookie_secure=get("COOKIE_SECURE", _auto_bool, None),
        cookie_samesite=get("COOKIE_SAMESITE", _samesite, d.cookie_samesite),
        demo=get("DEMO", _auto_bool, None),
        forward_batch_size=get("FORWARD_BATCH_SIZE", _batch_size, d.forward_batch_size),
        forward_poll_interval=get("FORWARD_POLL_INTERVAL", _seconds, d.forward_poll_interval),
        forward_concurrency=get("FORWARD_CONCURRENCY", _positive_int, d.forward_concurrency),
        forward_lease=get("FORWARD_LEASE", _seconds, d.forward_lease),
        upstream_timeout=get("UPSTREAM_TIMEOUT", _seconds, d.upstream_timeout),
        shutdown_timeout=get("SHUTDOWN_TIMEOUT", _seconds, d.shutdown_timeout),
        upstream_rate_limit=get("UPSTREAM_RATE_LIMIT", _per_second, d.upstream_rate_limit),
        retry_base=get("RETRY_BASE", _seconds, d.retry_base),
        retry_cap=get("RETRY_CAP", _seconds, d.retry_cap),
        shards=get("SHARDS", _positive_int, d.shards),
        dedup_buckets=get("DEDUP_BUCKETS", _positive_int, d.dedup_buckets),
        debug_history=get("DEBUG_HISTORY", _whole_number, d.debug_history),
        log_level=get("LOG_LEVEL", _choice(LOG_LEVELS), d.log_level),
        log_format=get("LOG_FORMAT", _choice(LOG_FORMATS), d.log_format),
        retired=tuple(
            f"{name} is no longer used: {why}" for name, why in RETIRED.items()
            if env.get(name, "").strip()
        ),
    )
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
    _check_browser_settings(settings)
    return settings


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
