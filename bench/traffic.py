"""The traffic: realistic copies of about 1 KB each, and the mixes the clients send.

An *action* is one real event on the shop (a view, a cart, a purchase). Its
*copies* are what reaches the gateway: a pixel copy from the browser
(`/pixel/events`, the page URL with `ttclid`, the `_ttp` cookie, IP and user
agent from the request) and a server copy in an Events API 2.0 batch (email,
phone and external id in plain text, to be hashed at the edge; the basket).

The mix (the issue's, PLAN in docs/benchmarks.md):

- a *pure* stream (`Stream`, the saturation and latency runs) is one source's
  copies in sending order: new events, 10% extra resends of earlier copies
  (some inside the merge window, some after the forward), and 3% without
  `event_id`;
- the *mixed* plan (`mixed_plan`) is both sources on a timeline: 80% of the
  actions send a pixel and a server copy of one `event_id` within the merge
  window (the server copy from -0.5 s to +1.2 s after the pixel's, batched by
  100), 10% only a pixel copy, 10% only a server copy, 10% extra resends, and
  3% single copies without `event_id`.

Bodies are rendered from byte templates, so the clients spend little CPU.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass
from functools import lru_cache

from bench.common import BROWSER_PATH, PIXEL, TOKEN, TRACK_PATH, ledger_key

BATCH = 100  # events per server request
DUPLICATE_RATE = 0.10  # extra resends, as a share of new copies
NO_ID_RATE = 0.03  # copies without event_id
# (name, weight); a pixel Purchase says CompletePayment a third of the time (TikTok's old name).
EVENT_NAMES: tuple[tuple[str, int], ...] = (
    ("ViewContent", 40), ("AddToCart", 25), ("InitiateCheckout", 15), ("Purchase", 20),
)  # fmt: skip
ORIGIN = b"https://www.example-shop.com"
USER_AGENT = (
    b"Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 "
    b"(KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1"
)

_CONTENT = (
    b'{"content_id":"SKU-%05d-%d","content_name":"Merino wool crew-neck sweater, size M, '
    b'colour %d","price":%d.5,"quantity":%d}'
)
_PIXEL_BODY = (
    b'{"pixel_code":"%s","event":"%s",%s"timestamp":%d,'
    b'"page":{"url":"https://www.example-shop.com/products/merino-crew-neck-sweater-%d'
    b"?variant=%d&utm_source=tiktok&utm_medium=paid&utm_campaign=autumn_sale_2024"
    b'&ttclid=E.C.P.%016x%016x%016x","referrer":"https://www.tiktok.com/"},'
    b'"properties":{"currency":"USD","value":%d.5,"order_id":"%s","content_type":"product",'
    b'"contents":[%s]},"user":{"locale":"en-US"}}'
)
_SERVER_ITEM = (
    b'{"event":"%s",%s"event_time":%d,"user":{"email":"Customer.%d@Example-Shop.com",'
    b'"phone":"+1 415-555-%04d","external_id":"customer-%09d","ip":"%s","user_agent":"%s",'
    b'"ttp":"01J%023X"},"properties":{"currency":"USD","value":%d.5,"order_id":"%s",'
    b'"content_type":"product","contents":[%s]},'
    b'"page":{"url":"https://www.example-shop.com/checkout/thank-you?order=%s",'
    b'"referrer":"https://www.example-shop.com/checkout/payment"}}'
)


@dataclass(frozen=True, slots=True)
class Copy:
    """One copy of an action, as one source sends it."""

    n: int  # the action: decides PII, order and basket
    source: str  # "pixel" or "server"
    name: str  # event name as sent
    event_id: str | None
    order_id: str

    @property
    def key(self) -> str:
        return ledger_key(PIXEL, self.name, self.event_id, self.order_id)


def client_ip(n: int) -> str:
    """A browser's address (a string in a payload; nothing is sent to it)."""
    return f"198.51.{(n >> 8) & 255}.{n & 255}"


@lru_cache(maxsize=1024)
def _contents(basket: int) -> bytes:
    return b",".join(_CONTENT % (basket, i, i, 49 + i, 1 + i % 2) for i in range(3))


def _event_id_field(copy: Copy) -> bytes:
    return b'"event_id":"%s",' % copy.event_id.encode() if copy.event_id else b""


def pixel_body(copy: Copy, now: int) -> bytes:
    n = copy.n
    return _PIXEL_BODY % (
        PIXEL.encode(), copy.name.encode(), _event_id_field(copy), now * 1000 + n % 1000,
        n % 997, n % 5, n, n * 31 + 7, n * 131 + 3, 150 + n % 50, copy.order_id.encode(),
        _contents(n % 997),
    )  # fmt: skip


def server_item(copy: Copy, now: int) -> bytes:
    n = copy.n
    order = copy.order_id.encode()
    return _SERVER_ITEM % (
        copy.name.encode(), _event_id_field(copy), now, n, n % 10000, n,
        client_ip(n).encode(), USER_AGENT, n, 150 + n % 50, order, _contents(n % 997), order,
    )  # fmt: skip


def pixel_request(copy: Copy, now: int, host: bytes) -> bytes:
    """One browser beacon: text/plain, the `_ttp` cookie, behind a load balancer."""
    return _beacon(copy, pixel_body(copy, now), host)


def pixel_list_request(copies: list[Copy], now: int, host: bytes) -> bytes:
    """Several pixel copies in one beacon (a JSON list), as from the first copy's browser."""
    return _beacon(copies[0], b"[%s]" % b",".join(pixel_body(c, now) for c in copies), host)


def _beacon(copy: Copy, body: bytes, host: bytes) -> bytes:
    head = (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: text/plain;charset=UTF-8\r\n"
        b"Origin: %s\r\nUser-Agent: %s\r\nCookie: _ttp=01J%023X; ttclid=E.C.P.%016x\r\n"
        b"X-Forwarded-For: %s\r\nContent-Length: %d\r\n\r\n"
    ) % (
        BROWSER_PATH.encode(), host, ORIGIN, USER_AGENT, copy.n, copy.n,
        client_ip(copy.n).encode(), len(body),
    )  # fmt: skip
    return head + body


def server_request(copies: list[Copy], now: int, host: bytes) -> bytes:
    """One Events API 2.0 request with the access token."""
    body = b'{"event_source":"web","event_source_id":"%s","data":[%s]}' % (
        PIXEL.encode(),
        b",".join(server_item(c, now) for c in copies),
    )
    head = (
        b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Access-Token: %s\r\nContent-Length: %d\r\n\r\n"
    ) % (TRACK_PATH.encode(), host, TOKEN.encode(), len(body))
    return head + body


class Actions:
    """New actions, numbered; their names and whether they carry an event_id."""

    def __init__(self, prefix: str, rng: random.Random) -> None:
        self.prefix = prefix
        self.rng = rng
        self.count = 0
        self._names = [name for name, _ in EVENT_NAMES]
        self._weights = [weight for _, weight in EVENT_NAMES]

    def new(self, no_id_rate: float = NO_ID_RATE) -> tuple[int, str, str | None, str]:
        """(n, name, event_id or None, order_id) of the next action."""
        n = self.count
        self.count += 1
        name = self.rng.choices(self._names, self._weights)[0]
        event_id = None if self.rng.random() < no_id_rate else f"{self.prefix}-{n:016d}"
        return n, name, event_id, f"{self.prefix}-{n:09d}"

    def copy(self, n: int, name: str, event_id: str | None, order_id: str, source: str) -> Copy:
        if source == "pixel" and name == "Purchase" and self.rng.random() < 1 / 3:
            name = "CompletePayment"
        return Copy(n, source, name, event_id, order_id)


class Stream:
    """One source's copies in sending order: new ones, 10% extra resends, 3% without event_id.

    A resend comes back 1 to `max_lag` copies later: early ones merge into
    their open key, late ones (past the merge window) are dropped as duplicates.
    """

    def __init__(
        self, source: str, prefix: str, seed: int, max_lag: int, no_id_rate: float = NO_ID_RATE
    ) -> None:
        self.source = source
        self.no_id_rate = no_id_rate
        self.rng = random.Random(seed)
        self.actions = Actions(prefix, self.rng)
        self.max_lag = max(1, max_lag)
        self.sent = 0
        self._resends: list[tuple[int, int, Copy]] = []  # (due at copy number, tiebreak, copy)

    def next(self) -> Copy:
        self.sent += 1
        if self._resends and self._resends[0][0] <= self.sent:
            return heapq.heappop(self._resends)[2]
        copy = self.actions.copy(*self.actions.new(self.no_id_rate), self.source)
        # Only copies with an event_id are resent: without one, a resend is a new event.
        if copy.event_id and self.rng.random() < DUPLICATE_RATE / (1 - self.no_id_rate):
            due = self.sent + self.rng.randint(1, self.max_lag)
            heapq.heappush(self._resends, (due, self.sent, copy))
        return copy

    def take(self, count: int) -> list[Copy]:
        return [self.next() for _ in range(count)]


Request = tuple[float, str, list[Copy]]  # (seconds from the start, "pixel" | "server", copies)


def mixed_plan(
    rate: float, duration: float, prefix: str, seed: int, linger: float = 0.25
) -> list[Request]:
    """Both sources on a timeline, `rate` actions per second for `duration` seconds.

    Pixel copies are single beacons; server copies wait for a batch of 100
    (or `linger` seconds), as a server-side integration would.
    """
    rng = random.Random(seed)
    actions = Actions(prefix, rng)
    pixel: list[tuple[float, Copy]] = []
    server: list[tuple[float, Copy]] = []
    for i in range(int(rate * duration)):
        t = i / rate
        n, name, event_id, order_id = actions.new()
        if event_id is None:  # one copy, from either source: it cannot be matched
            source = rng.choice(("pixel", "server"))
            (pixel if source == "pixel" else server).append(
                (t, actions.copy(n, name, None, order_id, source))
            )
            continue
        roll = rng.random()
        copies: list[tuple[float, Copy]] = []
        if roll < 0.9:  # a pair (0.8) or a pixel copy alone (0.1)
            copies.append((t, actions.copy(n, name, event_id, order_id, "pixel")))
        if roll < 0.8 or roll >= 0.9:  # a pair, or a server copy alone
            at = min(max(t + rng.uniform(-0.5, 1.2), 0.0), duration)
            copies.append((at, actions.copy(n, name, event_id, order_id, "server")))
        for at, copy in list(copies):
            if rng.random() < DUPLICATE_RATE:
                copies.append((min(at + rng.uniform(0.05, 4.0), duration), copy))
        for at, copy in copies:
            (pixel if copy.source == "pixel" else server).append((at, copy))
    plan = [(t, "pixel", [c]) for t, c in pixel] + _batches(server, linger)
    plan.sort(key=lambda r: r[0])
    return plan


def _batches(server: list[tuple[float, Copy]], linger: float) -> list[Request]:
    """Server copies in batches of 100, each sent when full or `linger` after it opened."""
    server.sort(key=lambda item: item[0])
    out: list[Request] = []
    batch: list[Copy] = []
    opened = 0.0
    for t, copy in server:
        if batch and t - opened > linger:
            out.append((opened + linger, "server", batch))
            batch = []
        if not batch:
            opened = t
        batch.append(copy)
        if len(batch) == BATCH:
            out.append((t, "server", batch))
            batch = []
    if batch:
        out.append((opened + linger, "server", batch))
    return out


def uniform_plan(stream: Stream, rate: float, duration: float) -> list[Request]:
    """Requests of one pure stream at a constant `rate` per second."""
    size = 1 if stream.source == "pixel" else BATCH
    return [(i / rate, stream.source, stream.take(size)) for i in range(int(rate * duration))]
