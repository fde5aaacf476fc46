"""Who may open the console, and the checks every console request goes through.

Three modes, decided per request:

    token   GATEWAY_ADMIN_TOKEN is set: a session cookie from the login form, or
            `Authorization: Bearer <token>`, is needed for every page and action.
    open    no token, sandbox mode, and the request came straight from loopback (no
            proxy header): the console is open, and every page says so.
    off     otherwise: 404, saying to set GATEWAY_ADMIN_TOKEN.

Sessions are stateless: the cookie is an expiry and an HMAC of it under a key derived
from the admin token, so every instance accepts it and changing the token logs everyone
out. Every POST carries a CSRF token (an HMAC tied to the session, or in open mode to a
random cookie under a per-process secret) and is refused when the browser says it came
from another site.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from ..appkeys import STORE
from ..browser import client_address, rate_limit_subject, reached_over_https
from ..settings import Settings

SESSION_COOKIE = "tkgw_console"
NONCE_COOKIE = "tkgw_console_nonce"  # a browser's random id: what a login form's CSRF binds to
COOKIE_PATH = "/console"
SESSION_SECONDS = 12 * 3600
# Credential guesses (login posts, bearer headers) per client: a token bucket in Redis.
GUESS_RATE = 5.0  # a second
GUESS_BURST = 30
PROXY_HEADERS = ("Forwarded", "X-Forwarded-For", "X-Real-IP")
# Open mode's CSRF secret: random per process (a sandbox on one machine).
_PROCESS_SECRET = secrets.token_bytes(32)

Mode = Literal["token", "open", "off"]


@dataclass(frozen=True, slots=True)
class Access:
    """What one request may do: its mode, whether it is let in, and its CSRF binding."""

    mode: Mode
    allowed: bool
    session: str | None = None  # the session cookie's value, when logged in with it
    bearer: bool = False  # let in by an Authorization header (a script, no CSRF needed)
    nonce: str | None = None  # the browser's nonce cookie (set on this answer if new)
    new_nonce: bool = False

    @property
    def open(self) -> bool:
        return self.mode == "open"


def mode_of(request: web.Request, settings: Settings) -> Mode:
    """The console's mode for this request (see the module docstring)."""
    if settings.admin_token is not None:
        return "token"
    if (
        settings.sandbox
        and is_loopback(request.remote)
        and not _proxied(request)
        and _loopback_host(request.host)
    ):
        return "open"
    return "off"


def is_loopback(address: str | None) -> bool:
    try:
        return address is not None and ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _loopback_host(host: str) -> bool:
    """Whether the browser named a loopback host: a page on a name the attacker rebound
    to 127.0.0.1 (DNS rebinding) must not find the console open."""
    name = urllib.parse.urlsplit(f"//{host}").hostname or ""
    return name == "localhost" or name.endswith(".localhost") or is_loopback(name)


def _proxied(request: web.Request) -> bool:
    """A proxy in front (its headers): the peer being loopback says nothing of the client."""
    return any(name in request.headers for name in PROXY_HEADERS)


def check(request: web.Request, settings: Settings) -> Access:
    """Who the request is; `allowed` False means answer 401 (or 404 when off)."""
    mode = mode_of(request, settings)
    nonce = request.cookies.get(NONCE_COOKIE)
    new_nonce = not _valid_nonce(nonce)
    if new_nonce:
        nonce = secrets.token_urlsafe(24)
    if mode != "token":
        return Access(mode, mode == "open", nonce=nonce, new_nonce=new_nonce)
    assert settings.admin_token is not None
    if bearer_matches(request, settings.admin_token):
        return Access(mode, True, bearer=True, nonce=nonce, new_nonce=new_nonce)
    session = request.cookies.get(SESSION_COOKIE)
    if session is not None and session_valid(settings.admin_token, session, time.time()):
        return Access(mode, True, session=session, nonce=nonce, new_nonce=new_nonce)
    return Access(mode, False, nonce=nonce, new_nonce=new_nonce)


def bearer_given(request: web.Request) -> str | None:
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    return given.strip() if scheme.lower() == "bearer" else None


def bearer_matches(request: web.Request, admin_token: str) -> bool:
    given = bearer_given(request)
    return given is not None and token_matches(given, admin_token)


def token_matches(given: str, admin_token: str) -> bool:
    """Constant time, over the hashes (so the length of the token does not show either)."""
    return hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(admin_token.encode()).digest()
    )


async def guess_allowed(request: web.Request, settings: Settings) -> bool:
    """Whether this client may try a credential now (login post, bearer header)."""
    subject = "console:" + rate_limit_subject(client_address(request, settings))
    wait = await request.config_dict[STORE].rate_limit(
        subject, time.time(), GUESS_RATE, GUESS_BURST
    )
    return wait <= 0


# -- sessions ------------------------------------------------------------------------------


def _key(secret: str | bytes, purpose: str) -> bytes:
    raw = secret.encode() if isinstance(secret, str) else secret
    return hmac.new(raw, f"tkgw-console:{purpose}".encode(), hashlib.sha256).digest()


def _mac(key: bytes, message: str) -> str:
    return hmac.new(key, message.encode(), hashlib.sha256).hexdigest()


def new_session(admin_token: str, now: float) -> str:
    """A session cookie's value: its expiry and an HMAC of it under the admin token."""
    expires = int(now) + SESSION_SECONDS
    return f"{expires}.{_mac(_key(admin_token, 'session'), str(expires))}"


def session_valid(admin_token: str, value: str, now: float) -> bool:
    expires, _, mac = value.partition(".")
    if not expires.isdigit() or len(expires) > 12 or int(expires) <= now:
        return False
    return hmac.compare_digest(mac, _mac(_key(admin_token, "session"), expires))


def _valid_nonce(nonce: str | None) -> bool:
    return nonce is not None and 16 <= len(nonce) <= 64 and nonce.replace("-", "").replace(
        "_", ""
    ).isalnum()


# -- CSRF ----------------------------------------------------------------------------------


def csrf_token(access: Access, settings: Settings) -> str:
    """The hidden field every form of this answer carries."""
    if access.mode == "token" and access.session is not None:
        assert settings.admin_token is not None
        return _mac(_key(settings.admin_token, "csrf"), access.session)
    secret: str | bytes = settings.admin_token or _PROCESS_SECRET
    return _mac(_key(secret, "csrf-nonce"), access.nonce or "")


def csrf_ok(request: web.Request, access: Access, settings: Settings, given: str | None) -> bool:
    """Whether a POST is this console's own form: same site, and the right token."""
    fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
    if fetch_site == "cross-site":
        return False
    origin = request.headers.get("Origin")
    # Under `Referrer-Policy: no-referrer` a browser posts our own forms with `Origin: null`;
    # it is believed only with the browser's own word that the form was same-origin.
    own_form = origin == "null" and fetch_site == "same-origin"
    if origin is not None and not own_form and not same_origin(origin, request.host):
        return False
    if access.bearer:  # a script with the token itself: no browser, no ambient credential
        return True
    if access.new_nonce and access.session is None:
        return False  # no nonce cookie came: the form was not ours
    return given is not None and hmac.compare_digest(given, csrf_token(access, settings))


def same_origin(origin: str, host: str) -> bool:
    """Whether a browser's Origin names this gateway (the Host it was reached by). The
    scheme is not compared: behind a TLS proxy the browser says https, we see http."""
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    return _netloc(parts.scheme, parts.netloc) in {
        _netloc("http", host),
        _netloc("https", host),
    }


def _netloc(scheme: str, netloc: str) -> str:
    netloc = netloc.lower()
    default = ":443" if scheme == "https" else ":80"
    return netloc[: -len(default)] if netloc.endswith(default) else netloc


# -- cookies and headers ---------------------------------------------------------------------

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def secure_cookies(request: web.Request, settings: Settings) -> bool:
    return reached_over_https(request, settings)


def set_cookie(
    response: web.StreamResponse,
    request: web.Request,
    settings: Settings,
    name: str,
    value: str,
    max_age: int | None,
) -> None:
    """A console cookie: HttpOnly, SameSite=Strict, Path=/console, Secure over https."""
    response.set_cookie(
        name, value, max_age=max_age, path=COOKIE_PATH, httponly=True, samesite="Strict",
        secure=secure_cookies(request, settings),
    )  # fmt: skip
