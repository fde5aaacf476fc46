"""The console in a real headless Chromium (Debian's, driven by Playwright), clicking
through every page against a running gateway with real Redis and the TikTok stand-in.

The browser may load nothing but the gateway on 127.0.0.1 (the fixtures of
test_browser_chromium.py block and record anything else), and the pages must run
under their Content-Security-Policy without a violation. With CONSOLE_SCREENSHOTS=1
each page is also written to docs/console/*.png for the README.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.console.actions import TEST_EVENT
from tests import test_browser_chromium as chromium
from tests.helpers import browser_event, post_browser, post_server, server_event, wait_drained
from tests.support import PIXEL, Gateway, GatewayFactory, poll_until
from tests.test_browser_chromium import OpenTab, Tab
from tests.tiktok_stub import Answer, TikTokStub

with contextlib.suppress(ImportError):  # the `browser` fixture says what is missing
    from playwright.async_api import expect

# The browser and its tabs, as the pixel.js tests have them (only 127.0.0.1 reachable).
browser = chromium.browser
open_tab = chromium.open_tab

ADMIN = "console-admin-token-0123456789abcdef"
LAPTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
SHOTS = Path(__file__).resolve().parent.parent / "docs" / "console"
SECONDS = 10_000  # Playwright's timeouts are in milliseconds


async def console_gateway(make_gateway: GatewayFactory, **overrides: Any) -> Gateway:
    settings: dict[str, Any] = {
        "admin_token": ADMIN, "test_event_code": "TEST-CONSOLE-UI", "merge_window": 0.5,
        "shutdown_timeout": 1.0, **overrides,
    }  # fmt: skip
    return await make_gateway(**settings)


async def screenshot(tab: Tab, name: str, size: dict[str, int] = LAPTOP) -> None:
    """docs/console/<name>.png, only when CONSOLE_SCREENSHOTS=1 (so tests leave the tree be)."""
    if os.environ.get("CONSOLE_SCREENSHOTS") != "1":
        return
    SHOTS.mkdir(parents=True, exist_ok=True)
    await tab.page.set_viewport_size(size)
    await tab.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)
    await tab.page.set_viewport_size(LAPTOP)


async def logged_in(
    open_tab: OpenTab, gateway: Gateway, path: str = "/console/", heading: str = "Overview"
) -> Tab:
    """A tab that logged in on `path`'s login form, and shows `path` (its `heading`)."""
    tab = await open_tab(gateway)
    await tab.page.set_viewport_size(LAPTOP)
    await tab.goto(path)
    await tab.page.fill("#token", ADMIN)
    await tab.page.click("form[action='/console/login'] button")
    await expect(tab.page.locator("h1")).to_contain_text(heading, timeout=SECONDS)
    return tab


def no_csp_violations(tab: Tab) -> None:
    refused = [line for line in tab.console if "Content Security Policy" in line]
    assert refused == [], refused


async def send_pair(http: aiohttp.ClientSession, gateway: Gateway, event_id: str) -> None:
    """A pixel copy and a server copy of one purchase, as a shop's page and server send them."""
    answer = await post_browser(http, gateway.url, browser_event(event_id))
    assert answer["code"] == 0, answer
    await post_server(http, gateway.url, [server_event(event_id)])


async def test_login_is_refused_then_accepted_and_the_overview_counts_traffic(
    make_gateway: GatewayFactory, tiktok: TikTokStub, open_tab: OpenTab,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    gateway = await console_gateway(make_gateway)
    tab = await open_tab(gateway)
    await tab.page.set_viewport_size(LAPTOP)
    await tab.goto("/console/")
    await tab.page.fill("#token", "not-the-admin-token")
    await tab.page.click("form[action='/console/login'] button")
    await expect(tab.page.locator(".alert")).to_have_text("Wrong token.", timeout=SECONDS)
    await screenshot(tab, "login")
    await tab.page.fill("#token", ADMIN)
    await tab.page.click("form[action='/console/login'] button")
    received = tab.page.locator("#kpi-received")
    await expect(received).to_have_text("0", timeout=SECONDS)

    for i in range(3):
        await send_pair(http, gateway, f"order-{i}")
    await post_server(http, gateway.url, [server_event("order-0")])  # a duplicate
    await tiktok.wait_for_events(3)
    await wait_drained(gateway)

    async def counted() -> bool:
        await tab.page.reload()
        return await received.text_content() == "7"

    await poll_until(counted, "the overview counting 7 copies received", every=0.2)
    await expect(tab.page.locator("#kpi-forwarded")).to_have_text("3")
    await expect(tab.page.locator("table.events")).to_contain_text("Purchase")
    await screenshot(tab, "overview")
    await screenshot(tab, "overview-phone", PHONE)
    no_csp_violations(tab)


async def test_a_live_event_appears_within_two_seconds_and_links_to_its_key(
    make_gateway: GatewayFactory, tiktok: TikTokStub, open_tab: OpenTab,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    gateway = await console_gateway(make_gateway)
    tab = await logged_in(open_tab, gateway)
    await tab.page.click("nav >> text=Live")
    await expect(tab.page.locator("#live-status")).to_contain_text("updated", timeout=SECONDS)
    event_id = f"live-{time.time_ns()}"
    await send_pair(http, gateway, event_id)
    link = tab.page.locator(f"#live-keys a:text-is('{event_id}')")
    await expect(link).to_be_visible(timeout=2000)
    await tiktok.wait_for_events(1)
    await screenshot(tab, "live")
    await link.click()
    await expect(tab.page.locator("#key-state")).to_have_text("sent", timeout=SECONDS)
    await expect(tab.page.locator("#key-sources")).to_contain_text("pixel")
    await expect(tab.page.locator("#key-sources")).to_contain_text("server")
    no_csp_violations(tab)


async def test_a_mismatched_id_setup_is_diagnosed_on_the_checks_page(
    make_gateway: GatewayFactory, tiktok: TikTokStub, open_tab: OpenTab,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    gateway = await console_gateway(make_gateway, merge_window=0.2)
    # The page's pixel makes up its own ids; the server sends its order numbers.
    for i in range(4):
        await post_browser(http, gateway.url, browser_event(f"px-{i}-a81f"))
        await post_server(http, gateway.url, [server_event(f"order-100{i}")])
    await tiktok.wait_for_events(8)
    await wait_drained(gateway)
    tab = await logged_in(open_tab, gateway)
    await tab.page.click("nav >> text=Checks")
    pairs = tab.page.locator("#check-pairs")
    await expect(pairs).to_be_visible(timeout=SECONDS)
    assert "ok" not in (await pairs.get_attribute("class") or "").split()

    async def tallied() -> bool:  # the owner's counts land within about a second
        await tab.page.reload()
        return "ok" in (await tab.page.locator("#check-tiktok").get_attribute("class") or "")

    await poll_until(tallied, "TikTok's answers counted on the checks page", every=0.2)
    await expect(pairs).to_contain_text("0% of keys both sources send met")
    await expect(pairs.locator("td.pixel-id").first).to_contain_text("px-")
    await expect(pairs.locator("td.server-id").first).to_contain_text("order-100")
    await screenshot(tab, "checks")
    no_csp_violations(tab)


async def test_a_dead_letter_is_replayed_from_the_page(
    make_gateway: GatewayFactory, tiktok: TikTokStub, open_tab: OpenTab,
    http: aiohttp.ClientSession,
) -> None:  # fmt: skip
    gateway = await console_gateway(make_gateway, merge_window=0.1)
    tiktok.queue(Answer(code=40105, message="Access token is incorrect or has been revoked."))
    await post_server(http, gateway.url, [server_event("refused-1")])
    await wait_drained(gateway, 1)
    tab = await logged_in(open_tab, gateway, "/console/dead-letters", "Dead letters")
    row = tab.page.locator("table.letters tr", has_text="refused-1")
    await expect(row).to_contain_text("40105", timeout=SECONDS)
    await screenshot(tab, "dead-letters")
    await row.locator("button").click()
    await expect(tab.page.locator("h1")).to_have_text("Replay 1 dead letter(s)?")
    await tab.page.click("#confirm-replay")
    await expect(tab.page.locator(".notice")).to_contain_text("Replayed 1", timeout=SECONDS)
    [event] = await tiktok.wait_for_events(1)
    assert event["event_id"] == "refused-1"
    assert await gateway.store.dead_letters() == []
    no_csp_violations(tab)


async def test_the_test_event_button_shows_a_merged_event_leaving(
    make_gateway: GatewayFactory, tiktok: TikTokStub, open_tab: OpenTab
) -> None:
    gateway = await console_gateway(make_gateway, merge_window=30.0)
    tab = await logged_in(open_tab, gateway)
    await tab.page.select_option("#test-pixel", PIXEL)
    await tab.page.click("#send-test")
    # The key's page reloads itself until the key has left.
    await expect(tab.page.locator("#key-state")).to_have_text("sent", timeout=SECONDS)
    await expect(tab.page.locator("#key-sources")).to_contain_text("merged: both copies met")
    [event] = await tiktok.wait_for_events(1)
    assert event["event"] == TEST_EVENT and event["event_id"] in tab.page.url
    [request] = tiktok.track_requests()
    assert request.body["test_event_code"] == "TEST-CONSOLE-UI"
    await screenshot(tab, "key")
    no_csp_violations(tab)


@pytest.mark.parametrize("path", ["/console/", "/console/live", "/console/dead-letters"])
async def test_without_login_the_pages_show_only_the_login_form(
    make_gateway: GatewayFactory, open_tab: OpenTab, path: str
) -> None:
    gateway = await console_gateway(make_gateway)
    tab = await open_tab(gateway)
    response = await tab.page.goto(gateway.url + path)
    assert response is not None and response.status == 401
    await expect(tab.page.locator("#token")).to_be_visible()
    assert await tab.page.locator("nav").count() == 0
