"""One setting: how it is declared (`setting`), shown (`show_value`; secrets masked) and
read from its variable's text (the parsers, each raising ConfigError naming the
variable). gateway/settings.py declares every setting with these (`parse.seconds`, ...).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from copy import copy
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

PREFIX = "GATEWAY_"
T = TypeVar("T")

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


def masked(_value: object) -> str:
    return "***"


def show_pixels(pixels: Mapping[str, str]) -> str:
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


def show_auto(value: bool | None) -> str:
    return "auto" if value is None else show_value(value)


def show_listen(host_port: tuple[str, int]) -> str:
    host, port = host_port
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- each reads one variable's text, or raises ConfigError naming it ----------


def host_port(name: str, raw: str) -> tuple[str, int]:
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ConfigError(name, f"expected host:port, got {raw!r}")
    return host.strip("[]"), port_number(name, port)


def port_number(name: str, raw: str) -> int:
    if not raw.isdigit() or not 0 <= int(raw) <= 65535:
        raise ConfigError(name, f"invalid port {raw!r}")
    return int(raw)


def redis_url(name: str, raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(name, "must start with redis://, rediss:// or unix://")
    return raw


def http_url(name: str, raw: str) -> str:
    if not raw.startswith(("http://", "https://")):
        raise ConfigError(name, "must start with http:// or https://")
    return raw.rstrip("/")


def flag(name: str, raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(name, f"expected 1 or 0, got {raw!r}")


def number(expected: str, zero: str | None = None) -> Callable[[str, str], float]:
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


seconds = number("a number of seconds")
per_second = number("a number a second")
rate = number("a number a second (0: no limit)", zero="no limit")


def positive_int(name: str, raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(name, f"expected a positive whole number, got {raw!r}")
    return int(raw)


def whole_number(name: str, raw: str) -> int:
    if not raw.isdigit():
        raise ConfigError(name, f"expected a whole number, 0 or more, got {raw!r}")
    return int(raw)


def batch_size(name: str, raw: str) -> int:
    value = positive_int(name, raw)
    if value > 1000:
        raise ConfigError(name, "TikTok accepts at most 1000 events a request")
    return value


def pixels(name: str, raw: str) -> dict[str, str]:
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


def path_prefixes(name: str, raw: str) -> tuple[str, ...]:
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


def origins(name: str, raw: str) -> frozenset[str]:
    origins = set()
    for item in raw.split(","):
        origin = item.strip().rstrip("/")
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ConfigError(name, f"origin {origin!r} must be * or start with http:// or https://")
        origins.add(origin)
    return frozenset(origins)


def networks(
    name: str, raw: str
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in raw.split(","))
    except ValueError as exc:
        raise ConfigError(name, str(exc)) from None


def auto_flag(name: str, raw: str) -> bool | None:
    """1 or 0, or `auto` (None): the gateway decides."""
    return None if raw.lower() == "auto" else flag(name, raw)


_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"\.?{_LABEL}(\.{_LABEL})*")


def cookie_domain(name: str, raw: str) -> str:
    if not _DOMAIN.fullmatch(raw):
        raise ConfigError(name, f"expected a domain such as .shop.example.com, got {raw!r}")
    return raw.lower()


def samesite(name: str, raw: str) -> str:
    for value in ("Lax", "Strict", "None"):
        if raw.lower() == value.lower():
            return value
    raise ConfigError(name, f"expected Lax, Strict or None, got {raw!r}")


def region(name: str, raw: str) -> str:
    if len(raw) != 2 or not raw.isalpha():
        raise ConfigError(name, f"expected a two-letter region code such as US, got {raw!r}")
    return raw.upper()


def choice(options: tuple[str, ...], *, upper: bool = False) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.upper() if upper else raw.lower()
        if value not in options:
            raise ConfigError(name, f"expected one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def text(_name: str, raw: str) -> str:
    return raw


def path(_name: str, raw: str) -> Path:
    return Path(raw)
