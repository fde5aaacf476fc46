"""The console at /console/ over real HTTP: who gets in (token, session cookie, bearer,
open sandbox), CSRF, the headers every answer carries, escaping, dead-letter replay and
the test event, against a real gateway, real Redis and the TikTok stand-in."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest_asyncio

from gateway.console.access import SECURITY_HEADERS, SESSION_COOKIE
from gateway.console.actions import SANDBOX_TEST_CODE, TEST_EVENT
from gateway.console.render import key_path
from tests.helpers import post_server, server_event, wait_drained
from tests.support import PIXEL, Gateway, GatewayFactory
from tests.tiktok_stub import Answer, TikTokStub

ADMIN = "admin-token-for-the-console-0123456789"
BEARER = {"Authorization": f"Bearer {ADMIN}"}
TRUST_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"),)
HOSTILE_EVENT = "Purchase"  # event names are letters, digits, '_' and '-' (else refused)
HOSTILE_ID = '"><img src=x onerror=alert(1)>/../?x#y'
# Pages that need no tallies (the overview, checks and live read them: see
# test_console_chromium.py for those).
PAGES = ("/console/dead-letters", key_path(PIXEL, "some-id", "Purchase"))
CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps cookies for 127.0.0.1 (aiohttp's default jar refuses IP hosts)."""
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        yield session


async def console_gateway(make_gateway: GatewayFactory, **overrides: Any) -> Gateway:
    settings: dict[str, Any] = {"admin_token": ADMIN, "shutdown_timeout": 1.0, **overrides}
    return await make_gateway(**settings)


async def get(
    client: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[int, str, aiohttp.ClientResponse]:
    async with client.get(url, allow_redirects=False, **kwargs) as resp:
        return resp.status, await resp.text(), resp


async def post(
    client: aiohttp.ClientSession, url: str, data: Any, **kwargs: Any
) -> tuple[int, str, aiohttp.ClientResponse]:
    async with client.post(url, data=data, allow_redirects=False, **kwargs) as resp:
        return resp.status, await resp.text(), resp


async def csrf_from(client: aiohttp.ClientSession, url: str) -> str:
    """The CSRF token of a console page's forms (and its nonce cookie, in the jar)."""
    status, body, _ = await get(client, url)
    match = CSRF_FIELD.search(body)
    assert match, f"no CSRF field on {url} ({status})"
    return match.group(1)


async def log_in(client: aiohttp.ClientSession, gateway: Gateway, token: str = ADMIN) -> int:
    csrf = await csrf_from(client, f"{gateway.url}/console/login")
    data = {"csrf": csrf, "token": token, "next": "/console/dead-letters"}
    status, _, _ = await post(client, f"{gateway.url}/console/login", data)
    return status


def assert_console_headers(resp: aiohttp.ClientResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers.get(name) == value, (resp.url, name)


# -- access ----------------------------------------------------------------------------


async def test_without_credentials_every_page_answers_401_with_the_login_form_and_no_data(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await console_gateway(make_gateway, merge_window=0.1)
    tiktok.reject_event_ids = {"secret-id-1"}
    await post_server(http, gateway.url, [server_event("secret-id-1")])
    await wait_drained(gateway, 1)
    for path in (*PAGES, "/console/", "/console/checks", "/console/live"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN}):
            status, body, resp = await get(http, gateway.url + path, headers=headers)
            assert status == 401, (path, headers)
            assert 'name="token"' in body and "secret-id-1" not in body
            assert_console_headers(resp)
    status, body, resp = await get(http, f"{gateway.url}/console/api/live")
    assert status == 401 and resp.content_type == "application/json"
    assert "secret-id-1" not in body
    # A forged, expired or foreign session cookie is no session.
    for cookie in ("9999999999.abc", "1.deadbeef", "x"):
        forged = {"Cookie": f"{SESSION_COOKIE}={cookie}"}
        status, _, _ = await get(http, f"{gateway.url}/console/dead-letters", headers=forged)
        assert status == 401


async def test_the_bearer_token_opens_pages_and_actions_without_a_form(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await console_gateway(make_gateway)
    status, body, resp = await get(http, f"{gateway.url}/console/dead-letters", headers=BEARER)
    assert status == 200 and "No dead letters" in body
    assert_console_headers(resp)
    # A script's POST carries the token itself: no CSRF token, but still no other site's.
    status, _, _ = await post(http, f"{gateway.url}/console/dead-letters/replay",
                              {"all": "1", "confirm": "yes"}, headers=BEARER)  # fmt: skip
    assert status == 303
    status, _, _ = await post(
        http, f"{gateway.url}/console/dead-letters/replay", {"all": "1", "confirm": "yes"},
        headers={**BEARER, "Sec-Fetch-Site": "cross-site"},
    )  # fmt: skip
    assert status == 403


async def test_logging_in_sets_a_strict_session_cookie_and_logging_out_ends_it(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gateway = await console_gateway(make_gateway, trusted_proxies=TRUST_LOOPBACK)
    assert await log_in(client, gateway, "not-the-token") == 401
    csrf = await csrf_from(client, f"{gateway.url}/console/login")
    status, _, resp = await post(
        client, f"{gateway.url}/console/login",
        {"csrf": csrf, "token": ADMIN, "next": "https://evil.example/"},
    )  # fmt: skip
    assert status == 303 and resp.headers["Location"] == "/console/"
    cookie = next(h for h in resp.headers.getall("Set-Cookie") if h.startswith(SESSION_COOKIE))
    attributes = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attributes and "samesite=strict" in attributes
    assert "path=/console" in attributes and "secure" not in attributes
    session = cookie.split(";")[0].partition("=")[2]
    status, body, _ = await get(client, f"{gateway.url}/console/dead-letters")
    assert status == 200 and "Log out" in body
    # Another token (another deployment, or the token changed): the session is worthless.
    other = await console_gateway(make_gateway, admin_token="another-admin-token-987654")
    foreign = {"Cookie": f"{SESSION_COOKIE}={session}"}
    status, _, _ = await get(client, f"{other.url}/console/dead-letters", headers=foreign)
    assert status == 401
    csrf = await csrf_from(client, f"{gateway.url}/console/test-event")
    status, _, _ = await post(client, f"{gateway.url}/console/logout", {"csrf": csrf})
    assert status == 303
    status, _, _ = await get(client, f"{gateway.url}/console/dead-letters")
    assert status == 401
    # Behind a TLS proxy (a trusted one says so), the cookie is Secure.
    csrf = await csrf_from(client, f"{gateway.url}/console/test-event")
    status, _, resp = await post(
        client, f"{gateway.url}/console/login", {"csrf": csrf, "token": ADMIN},
        headers={"X-Forwarded-Proto": "https"},
    )  # fmt: skip
    cookie = next(h for h in resp.headers.getall("Set-Cookie") if h.startswith(SESSION_COOKIE))
    assert "secure" in [a.strip().lower() for a in cookie.split(";")]


async def test_posts_without_this_consoles_csrf_token_or_from_another_site_are_refused(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession, http: aiohttp.ClientSession
) -> None:
    gateway = await console_gateway(make_gateway, test_event_code="TEST-1")
    # The login form too: no nonce cookie (another site's form), or no token.
    status, _, _ = await post(http, f"{gateway.url}/console/login", {"token": ADMIN})
    assert status == 403
    assert await log_in(client, gateway) == 303
    csrf = await csrf_from(client, f"{gateway.url}/console/test-event")
    url = f"{gateway.url}/console/test-event"
    refused = [
        ({"pixel": PIXEL}, {}),
        ({"pixel": PIXEL, "csrf": "0" * 64}, {}),
        ({"pixel": PIXEL, "csrf": csrf}, {"Sec-Fetch-Site": "cross-site"}),
        ({"pixel": PIXEL, "csrf": csrf}, {"Origin": "http://evil.example"}),
        ({"pixel": PIXEL, "csrf": csrf}, {"Origin": "null"}),
        ({"pixel": PIXEL, "csrf": csrf}, {"Origin": "null", "Sec-Fetch-Site": "same-site"}),
    ]
    for data, headers in refused:
        status, body, resp = await post(client, url, data, headers=headers)
        assert status == 403, (data, headers)
        assert "did not come from this console" in body
        assert_console_headers(resp)
    assert await gateway.store.counts() == (0, 0)
    for headers in (
        {"Origin": gateway.url},
        # Our own form under `Referrer-Policy: no-referrer`, as Chromium posts it.
        {"Origin": "null", "Sec-Fetch-Site": "same-origin"},
    ):
        status, _, _ = await post(client, url, {"pixel": PIXEL, "csrf": csrf}, headers=headers)
        assert status == 303


async def test_without_a_token_the_console_is_open_only_in_sandbox_mode_from_loopback(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    closed = await make_gateway(shutdown_timeout=1.0)  # pixels configured, no admin token
    status, body, resp = await get(client, f"{closed.url}/console/dead-letters")
    assert status == 404 and "GATEWAY_ADMIN_TOKEN" in body
    assert resp.content_type == "text/html"
    assert_console_headers(resp)

    sandbox = await make_gateway(pixels={}, shutdown_timeout=1.0)
    status, body, _ = await get(client, f"{sandbox.url}/console/dead-letters")
    assert status == 200 and "Open without a token" in body
    # Through a proxy, or by a name rebound to 127.0.0.1: not from this machine.
    for headers in (
        {"X-Forwarded-For": "203.0.113.9"},
        {"Forwarded": "for=203.0.113.9"},
        {"Host": "attacker.example"},
    ):
        status, body, _ = await get(client, f"{sandbox.url}/console/dead-letters", headers=headers)
        assert status == 404 and "GATEWAY_ADMIN_TOKEN" in body, headers
    # Open still needs CSRF: a page on the internet can post to 127.0.0.1.
    status, _, _ = await post(client, f"{sandbox.url}/console/test-event", {"pixel": PIXEL})
    assert status == 403


async def test_console_errors_are_pages_and_static_files_are_served(
    make_gateway: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    gateway = await console_gateway(make_gateway)
    status, body, resp = await get(http, f"{gateway.url}/console/no-such-page", headers=BEARER)
    assert status == 404 and resp.content_type == "text/html" and "request_id" not in body
    assert_console_headers(resp)
    for name, kind in (("console.css", "text/css"), ("console.js", "application/javascript")):
        status, body, resp = await get(http, f"{gateway.url}/console/static/{name}")
        assert status == 200 and resp.content_type == kind and body
        assert_console_headers(resp)
    status, _, _ = await get(http, f"{gateway.url}/console/static/..%2fsettings.py")
    assert status == 404
    status, _, resp = await get(http, f"{gateway.url}/console", headers=BEARER)
    assert status == 303 and resp.headers["Location"] == "/console/"
    # A form that cannot be read is the client's mistake, not ours.
    status, body, resp = await post(
        http, f"{gateway.url}/console/dead-letters/replay", b"all=1&confirm=yes",
        headers={**BEARER, "Content-Type": "multipart/form-data"},
    )  # fmt: skip
    assert status == 400 and resp.content_type == "text/html"
    # TikTok's own paths keep their envelope.
    async with http.get(f"{gateway.url}/open_api/v1.3/nope/") as resp:
        assert resp.content_type == "application/json"


# -- what the pages show -----------------------------------------------------------------


async def test_hostile_names_ids_and_messages_are_escaped(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await console_gateway(make_gateway, merge_window=0.1)
    tiktok.queue(Answer(code=40105, message="<img src=x onerror=alert(2)> token refused"))
    await post_server(http, gateway.url, [server_event(HOSTILE_ID, HOSTILE_EVENT)])
    await wait_drained(gateway, 1)
    status, body, _ = await get(
        http, gateway.url + key_path(PIXEL, HOSTILE_ID, HOSTILE_EVENT), headers=BEARER
    )
    assert status == 200, body
    assert "&#34;&gt;&lt;img" in body and "<img src=x" not in body
    status, body, _ = await get(http, f"{gateway.url}/console/dead-letters", headers=BEARER)
    assert status == 200
    assert "&lt;img src=x onerror=alert(2)&gt; token refused" in body
    assert "<img" not in body
    # The key's link is percent-encoded, so it leads back to the same key.
    assert key_path(PIXEL, HOSTILE_ID, HOSTILE_EVENT).replace("%", "%") in body


async def test_a_dead_letter_is_replayed_after_a_confirmation(
    make_gateway: GatewayFactory, tiktok: TikTokStub, client: aiohttp.ClientSession
) -> None:
    gateway = await console_gateway(make_gateway, merge_window=0.1)
    tiktok.queue(Answer(code=40105, message="Access token is incorrect or has been revoked."))
    await post_server(client, gateway.url, [server_event("dl-1"), server_event("dl-2")])
    await wait_drained(gateway, 2)
    assert await log_in(client, gateway) == 303
    status, body, _ = await get(client, f"{gateway.url}/console/dead-letters")
    assert status == 200 and "dl-1" in body and "40105" in body
    letters = {dl.letter.event["event_id"]: f"{dl.shard}:{dl.id}"
               for dl in await gateway.store.dead_letters()}  # fmt: skip
    csrf = CSRF_FIELD.search(body)
    assert csrf
    url = f"{gateway.url}/console/dead-letters/replay"
    # First a page naming the letter; nothing replayed yet.
    status, body, _ = await post(client, url, {"csrf": csrf.group(1), "letter": letters["dl-1"]})
    assert status == 200 and "Replay 1 dead letter(s)?" in body and "dl-2" not in body
    assert len(await gateway.store.dead_letters()) == 2
    confirm = dict(re.findall(r'name="(\w+)" value="([^"]*)"', body))
    assert confirm["confirm"] == "yes" and confirm["letter"] == letters["dl-1"]
    status, _, resp = await post(client, url, confirm)
    assert status == 303 and resp.headers["Location"] == "/console/dead-letters?replayed=1"
    [event] = await tiktok.wait_for_events(1)
    assert event["event_id"] == "dl-1"
    [left] = await gateway.store.dead_letters()
    assert left.letter.event["event_id"] == "dl-2"
    status, body, _ = await get(client, gateway.url + resp.headers["Location"])
    assert "Replayed 1 dead letter(s)" in body


async def test_the_test_event_merges_and_leaves_under_the_test_code(
    make_gateway: GatewayFactory, tiktok: TikTokStub, client: aiohttp.ClientSession
) -> None:
    gateway = await console_gateway(make_gateway, test_event_code="TEST-77", merge_window=30.0)
    assert await log_in(client, gateway) == 303
    csrf = await csrf_from(client, f"{gateway.url}/console/test-event")
    status, _, resp = await post(
        client, f"{gateway.url}/console/test-event", {"csrf": csrf, "pixel": PIXEL}
    )
    assert status == 303
    location = resp.headers["Location"]
    assert location.startswith(f"/console/keys/{PIXEL}/console-test-")
    # Both copies came, so it leaves at once, not after the 30 s merge window.
    [event] = await tiktok.wait_for_events(1)
    assert event["event"] == TEST_EVENT and location.split("/")[-2] == event["event_id"]
    [request] = tiktok.track_requests()
    assert request.body["test_event_code"] == "TEST-77"
    await wait_drained(gateway)
    state = await gateway.store.inspect(PIXEL, event["event_id"], TEST_EVENT)
    assert state is not None and state["sources"] == ["pixel", "server"]
    status, body, _ = await get(client, gateway.url + location)
    assert status == 200 and "merged: both copies met" in body and "sent" in body


async def test_no_test_event_without_a_test_code_outside_sandbox_mode(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gateway = await console_gateway(make_gateway)
    assert await log_in(client, gateway) == 303
    csrf = await csrf_from(client, f"{gateway.url}/console/test-event")
    status, body, _ = await post(
        client, f"{gateway.url}/console/test-event", {"csrf": csrf, "pixel": PIXEL}
    )
    assert status == 409 and "GATEWAY_TEST_EVENT_CODE" in body
    assert await gateway.store.counts() == (0, 0)


async def test_in_sandbox_mode_the_test_event_carries_the_consoles_own_code(
    make_gateway: GatewayFactory, client: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(pixels={}, shutdown_timeout=1.0, merge_window=30.0)
    csrf = await csrf_from(client, f"{gateway.url}/console/test-event")
    status, _, resp = await post(
        client, f"{gateway.url}/console/test-event", {"csrf": csrf, "pixel": "CSANDBOXPIXEL"}
    )
    assert status == 303
    event_id = resp.headers["Location"].split("/")[-2]
    await wait_drained(gateway)
    log = (gateway.settings.data_dir / "sandbox-forwarded.jsonl").read_text()
    [line] = [line for line in log.splitlines() if event_id in line]
    assert SANDBOX_TEST_CODE in line
