"""pixel.js and the demo shop in a real headless Chromium (Debian's, driven by Playwright).

The browser loads pages from the gateway on 127.0.0.1 only: the demo shop,
pixel.js and the stand-in for TikTok's pixel (the real one cannot be downloaded
here); every other request is blocked, and a test fails if one was tried. A few
pages of the tests' own are answered by Playwright itself, on the gateway's
origin, to load the scripts in every order.

`make test` installs Chromium where it can (scripts/ensure-debian-package.sh: root
with apt-get). Elsewhere these tests skip, saying why; under CI=true a missing
browser fails the run.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
import pytest_asyncio

from gateway.demo import DEMO_EMAIL, DEMO_PIXEL_CODE
from tests.support import PIXEL, TOKEN, Gateway, GatewayFactory, free_port, sha256
from tests.tiktok_stub import TikTokStub

# Without the package, the `browser` fixture says so (and fails under CI) instead of
# collection crashing.
PLAYWRIGHT_ERROR: ImportError | None = None
try:
    from playwright.async_api import Browser, BrowserContext, Page, Route, async_playwright
except ImportError as exc:
    PLAYWRIGHT_ERROR = exc

CHROMIUM_FLAGS = [
    "--no-sandbox",  # we run as root in a container
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
QUICK = {"shutdown_timeout": 1.0}
# The stand-in pixel is loaded and pixel.js has enabled the shop's buttons.
READY = "() => window.TiktokPixelStandIn && !document.querySelector('#{button}').disabled"
CALLED = "() => window.TiktokPixelStandIn.calls.some(c => c.event === '{event}')"
TEST_CODE = "TEST-DEMO-1"
# TikTok's base code as the demo page has it (loading the stand-in), with its ttq.load and
# ttq.page lines as %LOAD%; `window.__holdSdk = true` keeps the stand-in from loading.
_DEMO = (importlib.resources.files("gateway") / "static" / "demo.html").read_text()
BASE_CODE = re.sub(
    r"ttq\.load\('%PIXEL%'\);\s*ttq\.page\(\);",
    "%LOAD%",
    _DEMO[_DEMO.index("<script>\n!function") : _DEMO.index("</script>") + len("</script>")],
).replace("n=document.createElement(", "if(w.__holdSdk)return;n=document.createElement(")
assert "%LOAD%" in BASE_CODE and "__holdSdk" in BASE_CODE


def chromium_or_skip() -> str:
    """The system Chromium; skips (or under CI=true fails) saying what is missing."""
    missing = []
    if PLAYWRIGHT_ERROR is not None:
        missing.append(f"the playwright package ({PLAYWRIGHT_ERROR}; pip install -e '.[dev]')")
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        missing.append(
            "Debian's chromium (make test installs it as root with apt-get: "
            "scripts/ensure-debian-package.sh)"
        )
    if not missing:
        return path
    reason = "REAL-BROWSER TESTS NOT RUN: missing " + " and ".join(missing)
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest_asyncio.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    path = chromium_or_skip()
    playwright = await async_playwright().start()
    try:
        # Playwright gives each launch a fresh --user-data-dir; no browser is downloaded.
        chromium = await playwright.chromium.launch(
            executable_path=path, headless=True, args=CHROMIUM_FLAGS
        )
        yield chromium
        await chromium.close()
    finally:
        await playwright.stop()


@dataclass
class Tab:
    """One page in a fresh browser context (no cookies), and what it did."""

    page: Page
    context: BrowserContext
    base: str
    blocked: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    beacons: list[Any] = field(default_factory=list)  # bodies posted to /pixel/events
    pages: dict[str, str] = field(default_factory=dict)  # path -> HTML served by the test
    console: list[str] = field(default_factory=list)  # what the page logged, for failures

    async def goto(self, path: str) -> None:
        await self.page.goto(self.base + path)

    async def js(self, expression: str, arg: Any = None) -> Any:
        return await self.page.evaluate(expression, arg)

    async def wait(self, expression: str, seconds: float = 10.0) -> None:
        await self.page.wait_for_function(expression, timeout=seconds * 1000)

    async def standin_calls(self) -> list[dict[str, Any]]:
        calls: list[dict[str, Any]] = await self.js("() => window.TiktokPixelStandIn.calls")
        return calls

    def beacon_ids(self) -> list[str]:
        ids = []
        for body in self.beacons:
            for event in body if isinstance(body, list) else [body]:
                ids.append(event["event_id"])
        return ids


OpenTab = Callable[[Gateway], Awaitable[Tab]]


@pytest_asyncio.fixture
async def open_tab(browser: Browser) -> AsyncIterator[OpenTab]:
    tabs: list[Tab] = []

    async def open_(gateway: Gateway) -> Tab:
        context = await browser.new_context()
        page = await context.new_page()
        tab = Tab(page, context, gateway.url)

        async def block(route: Route) -> None:
            tab.blocked.append(route.request.url)
            await route.abort()

        async def serve_html_page(route: Route) -> None:
            path = urlsplit(route.request.url).path
            if path in tab.pages:
                await route.fulfill(body=tab.pages[path], content_type="text/html")
            else:
                await route.continue_()

        # Only 127.0.0.1; the tests' own pages live under /t/ on the gateway's origin.
        await context.route(lambda url: urlsplit(url).hostname != "127.0.0.1", block)
        await context.route(lambda url: urlsplit(url).path.startswith("/t/"), serve_html_page)
        page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
        page.on("console", lambda message: tab.console.append(f"{message.type}: {message.text}"))
        page.on(
            "request",
            lambda request: tab.beacons.append(orjson.loads(request.post_data or "null"))
            if request.method == "POST" and urlsplit(request.url).path == "/pixel/events"
            else None,
        )
        tabs.append(tab)
        return tab

    yield open_
    for tab in tabs:
        await tab.context.close()
        assert tab.blocked == [], f"the page tried to leave 127.0.0.1: {tab.blocked}"
        assert tab.errors == [], f"errors in the page: {tab.errors}"


async def wait_for_key(
    gateway: Gateway, event: str, event_id: str, *, pixel: str = PIXEL, state: str | None = None
) -> dict[str, Any]:
    """Until the gateway holds a key (in `state`, if given); its inspect view."""
    for _ in range(400):
        key: dict[str, Any] | None = await gateway.store.inspect(pixel, event_id, event)
        if key is not None and (state is None or key["state"] == state):
            return key
        await asyncio.sleep(0.025)
    raise AssertionError(f"the gateway never held {event} {event_id} ({state or 'any state'})")


async def demo_gateway(make_gateway: GatewayFactory, **overrides: Any) -> Gateway:
    """The demo outside sandbox mode: forwarding to the TikTok stand-in, as test events.

    The merge window is long: a pair leaves at once only because both copies came.
    """
    settings: dict[str, Any] = {
        "demo": True, "test_event_code": TEST_CODE, "merge_window": 30.0, **QUICK
    }
    return await make_gateway(**{**settings, **overrides})


# -- the demo shop ---------------------------------------------------------------------------


async def test_a_click_in_the_demo_shop_reaches_tiktok_as_one_merged_event(
    make_gateway: GatewayFactory, tiktok: TikTokStub, open_tab: OpenTab
) -> None:
    gateway = await demo_gateway(make_gateway)
    tab = await open_tab(gateway)
    await tab.goto("/demo/")
    await tab.wait(READY.format(button="complete-payment"))
    await tab.page.click("#complete-payment")

    # The pixel (the stand-in ttq) got the purchase with an event_id pixel.js gave it ...
    await tab.wait(CALLED.format(event="CompletePayment"))
    [call] = [c for c in await tab.standin_calls() if c["event"] == "CompletePayment"]
    event_id = call["event_id"]
    assert event_id and event_id == await tab.js("() => tkgw.lastEventId")
    # ... the gateway got the browser's copy with that event_id, and the server's merged in.
    key = await wait_for_key(gateway, "CompletePayment", event_id, state="sent")
    assert key["sources"] == ["pixel", "server"]
    assert key["copies_received"] == 2
    assert event_id in tab.beacon_ids()

    # Exactly one event reached TikTok: the browser's ttp and user agent, the server's email.
    events = await tiktok.wait_for_events(1)
    assert [e["event_id"] for e in events] == [event_id]
    [event] = events
    assert event["event"] == "CompletePayment"
    assert event["user"]["ttp"] == call["ttp"]
    assert event["user"]["ttp"] == await cookie(tab, "_ttp")
    assert event["user"]["user_agent"] == await tab.js("() => navigator.userAgent")
    assert event["user"]["email"] == sha256(DEMO_EMAIL)
    assert event["user"]["ip"] == "127.0.0.1"
    assert event["properties"]["value"] == 29.99
    [request] = tiktok.track_requests()
    assert request.body["test_event_code"] == TEST_CODE
    assert request.headers["Access-Token"] == TOKEN
    # The page itself shows the newcomer what happened.
    await tab.page.wait_for_selector(f"li.forwarded[data-event-id='{event_id}']")


async def test_in_sandbox_mode_a_click_lands_in_the_log_carrying_an_earlier_ad_click(
    make_gateway: GatewayFactory, open_tab: OpenTab
) -> None:
    gateway = await make_gateway(pixels={}, merge_window=30.0, **QUICK)  # what `make run` does
    tab = await open_tab(gateway)
    # The visitor arrives from an ad: the URL's ttclid goes into a 30-day first-party cookie.
    await tab.goto("/demo/?ttclid=E.C.P.demo-click-0001")
    ttclid = await wait_for_cookie(tab, "ttclid")
    assert ttclid["value"] == "E.C.P.demo-click-0001"
    assert 29.9 * 86400 < ttclid["expires"] - await tab.js("() => Date.now() / 1000") <= 30 * 86400
    # Later, a page without it: the purchase still carries the click.
    await tab.goto("/demo/")
    await tab.wait(READY.format(button="add-to-cart"))
    await tab.page.click("#add-to-cart")
    await tab.wait(CALLED.format(event="AddToCart"))
    [call] = [c for c in await tab.standin_calls() if c["event"] == "AddToCart"]
    await tab.page.wait_for_selector(f"li.forwarded[data-event-id='{call['event_id']}']")

    log = gateway.settings.data_dir / "sandbox-forwarded.jsonl"
    lines = [orjson.loads(line) for line in log.read_bytes().splitlines()]
    events = [e for line in lines for e in line["data"]]
    [event] = [e for e in events if e["event_id"] == call["event_id"]]
    assert [line["event_source_id"] for line in lines] == [DEMO_PIXEL_CODE]
    assert event["user"]["ttclid"] == "E.C.P.demo-click-0001"
    assert event["user"]["ttp"] == call["ttp"]
    assert event["user"]["email"] == sha256(DEMO_EMAIL)
    metrics = await tab.js(
        "() => Object.fromEntries([...document.querySelectorAll('#metrics tr')]"
        ".map(r => [r.cells[0].textContent, Number(r.cells[1].textContent)]))"
    )
    assert metrics["gateway_events_forwarded_total"] == 1
    assert metrics["gateway_events_merged_total"] == 1


# -- pixel.js in every order ---------------------------------------------------------------


def html_page(head: str, body: str = "") -> str:
    """A page of the test's own, answered by Playwright on the gateway's origin."""
    return f"<!doctype html><html><head>{head}</head><body>{body}</body></html>"


async def test_pixel_js_before_the_base_code_keeps_the_pages_event_id(
    make_gateway: GatewayFactory, open_tab: OpenTab
) -> None:
    gateway = await demo_gateway(make_gateway)
    tab = await open_tab(gateway)
    load = f"ttq.load('{PIXEL}'); ttq.page();"
    tab.pages["/t/before.html"] = html_page(
        '<script src="/pixel.js"></script>' + BASE_CODE.replace("%LOAD%", load)
    )
    await tab.goto("/t/before.html")
    await tab.wait("() => window.TiktokPixelStandIn")
    await tab.js("() => ttq.track('AddToCart', {value: 5}, {event_id: 'order-42'})")

    calls = await tab.standin_calls()
    assert [(c["event"], c["event_id"]) for c in calls][-1] == ("AddToCart", "order-42")
    await wait_for_key(gateway, "AddToCart", "order-42")
    # The page view too, with the id ttq got for it.
    [page_view] = [c for c in calls if c["event"] == "Pageview"]
    assert page_view["event_id"]
    key = await wait_for_key(gateway, "Pageview", page_view["event_id"])
    assert key["sources"] == ["pixel"]


async def test_calls_queued_before_pixel_js_and_the_pixel_get_their_ids_in_the_queue(
    make_gateway: GatewayFactory, open_tab: OpenTab
) -> None:
    gateway = await demo_gateway(make_gateway)
    tab = await open_tab(gateway)
    # The pixel's SDK is held back; the page queues calls; pixel.js comes; then the SDK.
    load = (
        f"w.__holdSdk = true; ttq.load('{PIXEL}'); ttq.page();"
        "ttq.track('ViewContent', {content_id: 'tote-001'});"
        "ttq.track('Search', {query: 'tote'}, {event_id: 'search-7'});"
    )
    tab.pages["/t/queued.html"] = html_page(
        BASE_CODE.replace("%LOAD%", load) + '<script src="/pixel.js"></script>'
    )
    await tab.goto("/t/queued.html")
    await tab.js(
        "() => { const s = document.createElement('script');"
        " s.src = '/demo/tiktok-pixel-standin.js'; document.head.appendChild(s); }"
    )
    await tab.wait("() => window.TiktokPixelStandIn && TiktokPixelStandIn.calls.length === 3")
    calls = {c["event"]: c["event_id"] for c in await tab.standin_calls()}
    assert calls["Search"] == "search-7"
    assert calls["ViewContent"] and calls["Pageview"]
    for event, event_id in calls.items():
        await wait_for_key(gateway, event, event_id)
    # The SDK replayed the queue: nothing was mirrored twice.
    assert sorted(tab.beacon_ids()) == sorted(calls.values())


async def test_pixel_js_added_after_the_pixel_loaded_mirrors_later_calls(
    make_gateway: GatewayFactory, open_tab: OpenTab
) -> None:
    gateway = await demo_gateway(make_gateway)
    tab = await open_tab(gateway)
    tab.pages["/t/after.html"] = html_page(BASE_CODE.replace("%LOAD%", f"ttq.load('{PIXEL}');"))
    await tab.goto("/t/after.html")
    await tab.wait("() => window.TiktokPixelStandIn")
    await tab.js(
        "() => { const s = document.createElement('script'); s.src = '/pixel.js';"
        " document.head.appendChild(s); }"
    )
    await tab.wait("() => window.tkgw")
    event_id = await tab.js(
        "() => { ttq.track('AddToWishlist', {content_id: 'tote-001'}); return tkgw.lastEventId; }"
    )
    [call] = [c for c in await tab.standin_calls() if c["event"] == "AddToWishlist"]
    assert call["event_id"] == event_id
    await wait_for_key(gateway, "AddToWishlist", event_id)


# -- consent, limited data use, and a gateway that is away ------------------------------------


async def test_nothing_is_sent_while_consent_says_no(
    make_gateway: GatewayFactory, open_tab: OpenTab
) -> None:
    gateway = await demo_gateway(make_gateway)
    tab = await open_tab(gateway)
    tab.pages["/t/consent.html"] = html_page(
        "<script>window.shopConsent = { marketing: false };</script>"
        + BASE_CODE.replace("%LOAD%", f"ttq.load('{PIXEL}');")
        + '<script src="/pixel.js" data-consent-check="shopConsent.marketing"></script>'
    )
    await tab.goto("/t/consent.html")
    await tab.wait("() => window.TiktokPixelStandIn")
    track = "(id) => ttq.track('AddToCart', {value: 1, currency: 'USD'}, {event_id: id})"
    await tab.js(track, "no-consent-1")  # the page's check says no: dropped
    await tab.js("() => { window.shopConsent.marketing = true; }")
    await tab.js(track, "consent-1")
    # TikTok's own consent calls are honoured too: held, then sent or dropped.
    await tab.js("() => ttq.holdConsent()")
    await tab.js(track, "held-1")
    await tab.js("() => ttq.grantConsent()")
    await tab.js("() => ttq.holdConsent()")
    await tab.js(track, "held-2")
    await tab.js("() => ttq.revokeConsent()")
    await tab.js(track, "revoked-1")
    await tab.js("() => tkgw.consent('granted')")
    await tab.js(track, "granted-again-1")

    await wait_for_key(gateway, "AddToCart", "granted-again-1")
    assert tab.beacon_ids() == ["consent-1", "held-1", "granted-again-1"]
    for event_id in ("no-consent-1", "held-2", "revoked-1"):
        assert await gateway.store.inspect(PIXEL, event_id, "AddToCart") is None


async def test_limited_data_use_set_by_the_page_reaches_tiktok(
    make_gateway: GatewayFactory, tiktok: TikTokStub, open_tab: OpenTab
) -> None:
    gateway = await demo_gateway(make_gateway, merge_window=0.2)
    tab = await open_tab(gateway)
    load = f"ttq.load('{PIXEL}', {{limited_data_use: true}});"
    tab.pages["/t/ldu.html"] = html_page(
        BASE_CODE.replace("%LOAD%", load) + '<script src="/pixel.js"></script>'
    )
    await tab.goto("/t/ldu.html")
    await tab.wait("() => window.TiktokPixelStandIn && window.tkgw")
    await tab.js("() => ttq.track('Contact', {}, {event_id: 'ldu-1'})")
    events = await tiktok.wait_for_events(1)
    [event] = [e for e in events if e["event_id"] == "ldu-1"]
    assert event["limited_data_use"] is True


async def test_an_unreachable_gateway_does_not_break_the_page(
    make_gateway: GatewayFactory, open_tab: OpenTab
) -> None:
    gateway = await demo_gateway(make_gateway)
    tab = await open_tab(gateway)
    nowhere = f"http://127.0.0.1:{free_port()}/pixel/events"  # nothing listens there
    tab.pages["/t/away.html"] = html_page(
        BASE_CODE.replace("%LOAD%", f"ttq.load('{PIXEL}');")
        + f'<script src="/pixel.js" data-endpoint="{nowhere}"></script>'
    )
    await tab.goto("/t/away.html")
    await tab.wait("() => window.TiktokPixelStandIn && window.tkgw")
    result = await tab.js(
        "() => { ttq.track('AddToCart', {value: 1, currency: 'USD'});"
        " return {id: tkgw.lastEventId, after: 'the page goes on'}; }"
    )
    assert result["after"] == "the page goes on"
    [call] = [c for c in await tab.standin_calls() if c["event"] == "AddToCart"]
    assert call["event_id"] == result["id"]  # the pixel itself is untouched


async def test_without_send_beacon_fetch_keepalive_carries_the_copy(
    make_gateway: GatewayFactory, open_tab: OpenTab
) -> None:
    gateway = await demo_gateway(make_gateway)
    tab = await open_tab(gateway)
    tab.pages["/t/nobeacon.html"] = html_page(
        "<script>navigator.sendBeacon = () => false;</script>"  # a full beacon queue
        + BASE_CODE.replace("%LOAD%", f"ttq.load('{PIXEL}');")
        + '<script src="/pixel.js"></script>'
    )
    await tab.goto("/t/nobeacon.html")
    await tab.wait("() => window.TiktokPixelStandIn && window.tkgw")
    await tab.js("() => ttq.track('AddToCart', {value: 1}, {event_id: 'f-1'})")
    await wait_for_key(gateway, "AddToCart", "f-1")


# -- helpers -------------------------------------------------------------------------------


async def cookie(tab: Tab, name: str) -> str | None:
    for c in await tab.context.cookies(tab.base):
        if c["name"] == name:
            return c["value"]
    return None


async def wait_for_cookie(tab: Tab, name: str) -> Any:
    # A deadline of 15 s: the beacon that sets it may queue behind a busy machine.
    for _ in range(600):
        for c in await tab.context.cookies(tab.base):
            if c["name"] == name:
                return c
        await asyncio.sleep(0.025)
    raise AssertionError(
        f"no {name} cookie was set; beacons sent: {tab.beacons}, page errors: {tab.errors}, "
        f"console: {tab.console[-20:]}, at {tab.page.url}"
    )
