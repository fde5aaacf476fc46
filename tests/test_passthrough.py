"""Pass-through of other /open_api/ paths.

First proxy() itself, streaming both ways, in a tiny app in front of the stub;
then the whole gateway over raw sockets (request lines as an attacker writes
them, not as a client library would normalise them): only configured pixels'
tokens, only canonical paths, only GATEWAY_PASSTHROUGH_PATHS, only the
headers TikTok needs, and nothing refused ever reaches the stub.
tests/test_passthrough_checks.py holds check_passthrough to every input.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from gateway.passthrough import canonical_target, proxy
from tests.helpers import RawAnswer, connection, head, read_answer
from tests.support import TOKEN, TOKEN2, Gateway, GatewayFactory, free_port
from tests.tiktok_stub import Answer, TikTokStub, big_payload

Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start an app whose /open_api/ routes call proxy() with no other check; returns its URL."""
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(base_url: str, **kwargs: Any) -> str:
        session = aiohttp.ClientSession()
        sessions.append(session)

        async def handler(request: web.Request) -> web.StreamResponse:
            target = canonical_target(request.raw_path)
            return await proxy(request, session, base_url, target, **kwargs)

        app = web.Application()
        app.router.add_route("*", "/open_api/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()
    for session in sessions:
        await session.close()


@pytest.fixture
async def proxied(serve: Serve, tiktok: TikTokStub) -> str:
    """A proxying app in front of the stub TikTok."""
    return await serve(tiktok.url)


async def test_post_with_query_body_and_the_headers_tiktok_needs(
    proxied: str, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    body = orjson.dumps({"advertiser_id": "123", "names": ["a", "b"]})
    async with http.post(
        # encoded=True: the query goes out exactly as written, %2F and all.
        URL(f"{proxied}/open_api/v1.3/pixel/list/?advertiser_id=123&code=a%2Fb", encoded=True),
        data=body,
        headers={
            "Access-Token": TOKEN,
            "Content-Type": "application/json",
            "User-Agent": "tiktok-business-api-sdk-python",
            "X-Custom": "not TikTok's business",
        },
    ) as response:
        assert response.status == 200
        answer = await response.json()

    assert answer["code"] == 0
    assert answer["data"] == {
        "method": "POST",
        "path": "/open_api/v1.3/pixel/list/",
        "query": "advertiser_id=123&code=a%2Fb",
        "body_length": len(body),
    }
    [request] = tiktok.requests
    assert request.body == orjson.loads(body)
    assert request.query == {"advertiser_id": "123", "code": "a/b"}
    assert request.headers["Access-Token"] == TOKEN
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == "tiktok-business-api-sdk-python"
    assert "X-Custom" not in request.headers
    # Host names TikTok, not the gateway.
    assert request.headers["Host"] == URL(tiktok.url).raw_authority
    assert request.headers["Host"] != URL(proxied).raw_authority


@pytest.mark.parametrize("method", ["GET", "PUT", "PATCH", "DELETE"])
async def test_methods(
    proxied: str, tiktok: TikTokStub, http: aiohttp.ClientSession, method: str
) -> None:
    async with http.request(method, f"{proxied}/open_api/v1.3/thing/?x=1") as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["data"]["method"] == method
    assert answer["data"]["query"] == "x=1"
    assert tiktok.requests[0].method == method


async def test_get_adds_nothing_the_client_did_not_send(
    proxied: str, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    async with http.get(
        f"{proxied}/open_api/v1.3/thing/",
        skip_auto_headers=["Accept-Encoding", "User-Agent", "Accept"],
    ) as response:
        assert response.status == 200
    headers = tiktok.requests[0].headers
    assert tiktok.requests[0].body == b""
    for name in ("Accept-Encoding", "Content-Type", "Transfer-Encoding", "User-Agent"):
        assert name not in headers


async def test_hop_by_hop_headers_are_dropped(
    proxied: str, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    async with http.get(
        f"{proxied}/open_api/v1.3/thing/",
        headers={
            "Access-Token": TOKEN,
            "Connection": "keep-alive, X-Per-Hop",
            "X-Per-Hop": "secret",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic abc",
            "TE": "trailers",
        },
    ) as response:
        assert response.status == 200
    headers = tiktok.requests[0].headers
    assert headers["Access-Token"] == TOKEN
    for name in ("X-Per-Hop", "Keep-Alive", "Proxy-Authorization", "TE"):
        assert name not in headers


async def test_upstream_status_headers_and_body_relayed(
    proxied: str, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    tiktok.queue(Answer(http_status=503, raw_body=b"down for a bit", retry_after="3"))
    async with http.post(
        f"{proxied}/open_api/v1.3/event/track/", json={"data": []}, headers={"Access-Token": TOKEN}
    ) as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "3"
        assert await response.read() == b"down for a bit"


async def test_big_response_streams_back_intact(
    proxied: str, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    size = 8 * 1024 * 1024 + 17
    received = bytearray()
    chunks = 0
    async with http.get(f"{proxied}/open_api/v1.3/big/?size={size}") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        async for chunk in response.content.iter_chunked(256 * 1024):
            received += chunk
            chunks += 1
    assert chunks > 1
    assert len(received) == size
    assert bytes(received) == big_payload(size)


async def test_chunked_response_streams_back_intact(
    proxied: str, http: aiohttp.ClientSession
) -> None:
    size = 3 * 1024 * 1024 + 5
    async with http.get(f"{proxied}/open_api/v1.3/big/?size={size}&chunked=1") as response:
        assert response.status == 200
        assert "Content-Length" not in response.headers
        assert await response.read() == big_payload(size)


async def test_big_request_body_streams_through(
    proxied: str, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    payload = big_payload(5 * 1024 * 1024 + 3)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 100_000):
            yield payload[start : start + 100_000]

    # Chunked on the way in (no Content-Length), so the proxy cannot know the size.
    async with http.post(f"{proxied}/open_api/v1.3/upload/", data=chunks()) as response:
        assert response.status == 200
        answer = await response.json()
    assert answer["data"]["body_length"] == len(payload)
    assert tiktok.requests[0].body == payload


async def test_request_with_content_length_keeps_it(
    proxied: str, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    payload = big_payload(200_000)
    async with http.put(f"{proxied}/open_api/v1.3/upload/", data=payload) as response:
        assert response.status == 200
    headers = tiktok.requests[0].headers
    assert headers["Content-Length"] == str(len(payload))
    assert "Transfer-Encoding" not in headers
    assert tiktok.requests[0].body == payload


async def test_compressed_response_is_relayed_undecoded(
    proxied: str, http: aiohttp.ClientSession
) -> None:
    url = f"{proxied}/open_api/v1.3/gzip/"
    async with http.get(url, headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as raw:
        assert raw.headers["Content-Encoding"] == "gzip"
        envelope = orjson.loads(gzip.decompress(await raw.read()))
    assert envelope["code"] == 0
    # And a client that decodes on its own gets consistent headers and bytes.
    async with http.get(url, headers={"Accept-Encoding": "gzip"}) as decoded:
        assert (await decoded.json())["code"] == 0


async def test_head_request(proxied: str, http: aiohttp.ClientSession) -> None:
    async with http.head(f"{proxied}/open_api/v1.3/thing/") as response:
        assert response.status == 200
        assert await response.read() == b""


@pytest.mark.parametrize("chunked", [False, True])
async def test_upstream_dying_mid_body_is_not_passed_off_as_whole(
    proxied: str, http: aiohttp.ClientSession, chunked: bool
) -> None:
    # Status 200 and headers arrive before the upstream dies: the proxy streams (a
    # buffering one would have answered 502). The cut must still reach the client.
    size = 2 * 1024 * 1024
    url = f"{proxied}/open_api/v1.3/big/?size={size}&cut={size // 2}"
    if chunked:
        url += "&chunked=1"
    async with http.get(url) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_unreachable_upstream_gives_502_envelope(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    proxied = await serve(f"http://127.0.0.1:{free_port()}")
    async with http.post(
        f"{proxied}/open_api/v1.3/pixel/list/", json={"a": 1}, headers={"Access-Token": TOKEN}
    ) as response:
        assert response.status == 502
        assert response.content_type == "application/json"
        answer = await response.json()
    assert answer["code"] == 50002
    assert answer["message"]
    assert answer["request_id"] == ""
    assert answer["data"] == {}


async def test_timeout_gives_504_envelope(
    serve: Serve, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    proxied = await serve(tiktok.url, client_timeout=aiohttp.ClientTimeout(total=0.2))
    tiktok.echo_delay = 1.0
    async with http.get(f"{proxied}/open_api/v1.3/slow/") as response:
        assert response.status == 504
        answer = await response.json()
    assert answer["code"] == 50002
    assert answer["request_id"] == ""
    assert answer["data"] == {}


async def test_logs_method_path_status_but_never_the_token(
    proxied: str, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.passthrough")
    async with http.get(
        f"{proxied}/open_api/v1.3/thing/?advertiser_id=9", headers={"Access-Token": TOKEN}
    ) as response:
        assert response.status == 200
    messages = [r.getMessage() for r in caplog.records if r.name == "gateway.passthrough"]
    assert any("GET /open_api/v1.3/thing/ -> 200" in m for m in messages)
    assert all(TOKEN not in m for m in messages)


# -- the whole gateway, over raw sockets ------------------------------------------------------

PIXEL_LIST = "/open_api/v1.3/pixel/list/"
OUTCOMES = "gateway_passthrough_requests_total"


async def send(
    gateway: Gateway,
    target: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    body: bytes = b"",
) -> RawAnswer:
    """`method target` written on a socket as given: no client library normalises it."""
    sent = {"Connection": "close", **(headers or {})}
    if body:
        sent["Content-Length"] = str(len(body))
    async with connection(gateway) as (reader, writer):
        writer.write(head(target, sent, method) + body)
        return await read_answer(reader)


def outcomes(gateway: Gateway) -> dict[str, float]:
    """The pass-through's outcome counters that moved."""
    names = ("relayed", "upstream_error", "refused_path", "refused_token", "refused_prefix")
    counts = {name: gateway.metric(OUTCOMES, {"outcome": name}) for name in names}
    return {name: count for name, count in counts.items() if count}


def refusal(
    answer: RawAnswer, gateway: Gateway, tiktok: TikTokStub, status: int, outcome: str
) -> dict[str, Any]:
    """The envelope of `answer`, a refusal TikTok never saw, counted once as `outcome`."""
    assert answer.status == status
    assert tiktok.requests == []
    assert outcomes(gateway) == {outcome: 1}
    return answer.envelope()


# Each with a configured token: the path alone must be refused. Several are one
# normalisation away from TikTok's campaign management or from our own /metrics.
TRAVERSALS = [
    "/open_api/../admin/x",
    "/open_api/%2e%2e/admin/y",
    "/open_api/..%2fadmin/z",
    "/open_api/../metrics",
    "/open_api/v1.3/pixel/../campaign/update/",
    "/open_api/v1.3/pixel/../../v1.3/campaign/update/",
    "/open_api/v1.3/pixel/%2E%2E/campaign/update/",
    "/open_api/v1.3/pixel/%2e./campaign/update/",
    "/open_api/v1.3/pixel/.%2E/campaign/update/",
    "/open_api/v1.3/pixel/..%2Fcampaign/update/",
    "/open_api/v1.3/pixel/list%2f..%2f..%2fcampaign/update/",
    "/open_api/v1.3/pixel/..%5ccampaign/update/",
    "/open_api/v1.3/pixel/..%5Ccampaign/update/",
    "/open_api/v1.3/pixel/..\\campaign\\update/",
    "/open_api/v1.3/pixel\\..\\campaign/update/",
    "/open_api//v1.3/pixel/list/",
    "/open_api/v1.3/pixel//list/",
    "/open_api/./v1.3/pixel/list/",
    "/open_api/v1.3/pixel/./list/",
    "/open_api/v1.3/pixel/list/.",
    "/open_api/v1.3/pixel/list/..",
    "/open_api/v1.3/pixel/.../list/",
    "/open_api/v1.3/pixel/list/%00",
    "/open_api/v1.3/pixel/list%00/",
    "/open_api/v1.3/pixel/list%0a/",
    "/open_api/v1.3/pixel/list%0D%0AX-Injected:%201/",
    "/open_api/v1.3/pixel/list%7f/",
    "/open_api/v1.3/pixel/%252e%252e/campaign/update/",
    "/open_api/v1.3/pixel/%25%32%65%25%32%65/campaign/update/",
    "/open_api/v1.3/pixel/%c0%ae%c0%ae/campaign/update/",
    "/open_api/v1.3/pixel/..;/campaign/update/",
    "/open_api/v1.3/pixel/..%3b/campaign/update/",
    "/open_api/v1.3/pixel/list;jsessionid=1/",
    "/open_api/v1.3/pixel/%zz/",
    "/open_api/v1.3/pixel/list%/",
    "/open_api/v1.3/pixel/list/%3f/../../campaign/",
    "/open_api/v1.3/pixel/list/#/../../campaign/",
    "http://127.0.0.1/open_api/v1.3/pixel/list/",
    "http://upstream.invalid/open_api/v1.3/campaign/update/",  # an absolute URI as the target
]


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_a_path_that_is_not_canonical_is_refused_and_never_relayed(
    gateway: Gateway, tiktok: TikTokStub, target: str
) -> None:
    answer = await send(gateway, target, {"Access-Token": TOKEN}, method="POST", body=b"{}")
    envelope = refusal(answer, gateway, tiktok, 400, "refused_path")
    assert envelope["code"] == 40002
    assert envelope["message"].startswith("path: ")


@pytest.mark.parametrize(
    "target", ["/open_api/v1.3/pixel/\x01list/", "/open_api/v1.3/pixel/caf\xc3\xa9/"]
)
async def test_raw_control_and_non_ascii_bytes_stop_at_the_http_parser(
    gateway: Gateway, tiktok: TikTokStub, target: str
) -> None:
    answer = await send(gateway, target, {"Access-Token": TOKEN})
    assert answer.status == 400
    assert tiktok.requests == []


async def test_dot_segments_outside_open_api_are_not_routed_into_it(
    gateway: Gateway, tiktok: TikTokStub
) -> None:
    # aiohttp routes the raw path: no resolving of `..` that could land in the pass-through.
    answer = await send(gateway, f"/x/..{PIXEL_LIST}", {"Access-Token": TOKEN})
    assert answer.status == 404
    assert tiktok.requests == []


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, 40104),
        ({"Access-Token": ""}, 40104),
        ({"Access-Token": "made-up-token"}, 40105),
        ({"Access-Token": TOKEN + "x"}, 40105),
        ({"Access-Token": TOKEN[:-1]}, 40105),
        ({"Access-Token": f"Bearer {TOKEN}"}, 40105),
        ({"Authorization": f"Bearer {TOKEN}"}, 40104),
        ({"Access-Token": "t\xff\xfeoken"}, 40105),  # not UTF-8 on the wire
    ],
)
async def test_a_caller_without_a_configured_token_is_refused(
    gateway: Gateway, tiktok: TikTokStub, headers: dict[str, str], code: int
) -> None:
    answer = await send(gateway, PIXEL_LIST, headers)
    assert refusal(answer, gateway, tiktok, 401, "refused_token")["code"] == code


async def test_a_second_access_token_header_is_refused(
    gateway: Gateway, tiktok: TikTokStub
) -> None:
    async with connection(gateway) as (reader, writer):
        request = head(PIXEL_LIST, {"Access-Token": "made-up", "Connection": "close"}, "GET")
        # Both orders: whichever one a check reads, TikTok must not get the other.
        writer.write(request.replace(b"\r\n\r\n", f"\r\nAccess-Token: {TOKEN}\r\n\r\n".encode()))
        answer = await read_answer(reader)
    assert answer.status == 401
    assert tiktok.requests == []


@pytest.mark.parametrize(
    "path",
    [
        "/open_api/v1.3/campaign/update/",
        "/open_api/v1.3/campaign/get/",
        "/open_api/v1.3/ad/create/",
        "/open_api/v1.3/adgroup/update/",
        "/open_api/v1.3/dmp/custom_audience/create/",
        "/open_api/v1.3/advertiser/info/",
        "/open_api/v1.3/bc/pixel/link/update/",
        "/open_api/v1.3/pixelfoo/list/",
        "/open_api/v1.3",  # a prefix's parent
        "/open_api/v1.3/",
        "/open_api/",
        "/open_api/v1.3/%63ampaign/update/",  # decoded once: campaign
    ],
)
async def test_a_known_caller_reaches_only_the_allowed_prefixes(
    gateway: Gateway, tiktok: TikTokStub, path: str
) -> None:
    answer = await send(gateway, path, {"Access-Token": TOKEN}, method="POST", body=b"{}")
    envelope = refusal(answer, gateway, tiktok, 404, "refused_prefix")
    assert envelope["code"] == 40400
    assert "GATEWAY_PASSTHROUGH_PATHS" in envelope["message"]


@pytest.mark.parametrize("token", [TOKEN, TOKEN2])
@pytest.mark.parametrize(
    ("target", "path"),
    [
        (PIXEL_LIST, PIXEL_LIST),
        ("/open_api/v1.3/pixel/event/stats/", "/open_api/v1.3/pixel/event/stats/"),
        ("/open_api/v1.2/pixel/list/", "/open_api/v1.2/pixel/list/"),
        ("/open_api/v1.3/offline/get/", "/open_api/v1.3/offline/get/"),
        # Decoded once, relayed in its canonical form.
        ("/open_api/v1.3/%70ixel/li%73t/", PIXEL_LIST),
    ],
)
async def test_a_known_caller_is_relayed_by_the_canonical_path(
    gateway: Gateway, tiktok: TikTokStub, token: str, target: str, path: str
) -> None:
    answer = await send(gateway, target + "?advertiser_id=1", {"Access-Token": token})
    assert answer.status == 200
    assert answer.envelope()["request_id"].startswith("stub")  # TikTok's answer
    [relayed] = tiktok.requests
    assert relayed.path == path
    assert relayed.headers["Access-Token"] == token
    assert outcomes(gateway) == {"relayed": 1}
    # TikTok's cookie stays with TikTok: it would land on the gateway's domain.
    assert "set-cookie" not in answer.headers


async def test_the_query_is_relayed_as_sent_and_cannot_move_the_path(
    gateway: Gateway, tiktok: TikTokStub
) -> None:
    query = "advertiser_id=1&next=/../../campaign/update/&code=a%2Fb%2e%2e&x=%00"
    answer = await send(gateway, f"{PIXEL_LIST}?{query}", {"Access-Token": TOKEN})
    assert answer.status == 200
    echo = answer.envelope()["data"]
    assert echo["path"] == PIXEL_LIST
    assert echo["query"] == query


async def test_only_the_headers_tiktok_needs_are_relayed(
    gateway: Gateway, tiktok: TikTokStub
) -> None:
    body = orjson.dumps({"advertiser_id": "1"})
    sent = {
        "Access-Token": TOKEN,
        "Content-Type": "application/json",
        "Accept": "application/json",
        "User-Agent": "sdk/1.0",
        "Cookie": "_ttp=browser-cookie; session=secret",
        "Authorization": "Basic c2VjcmV0",
        "X-Forwarded-For": "203.0.113.7",
        "X-Forwarded-Host": "evil.example",
        "X-Forwarded-Proto": "https",
        "Forwarded": "for=203.0.113.7;host=evil.example",
        "X-Real-IP": "203.0.113.7",
        "Origin": "https://shop.example.com",
        "Referer": "https://shop.example.com/cart",
        "X-Custom": "1",
    }
    answer = await send(gateway, PIXEL_LIST, sent, method="POST", body=body)
    assert answer.status == 200
    [relayed] = tiktok.requests
    assert relayed.body == {"advertiser_id": "1"}
    relayed_names = {name.lower() for name in relayed.headers}
    assert relayed_names == {
        "host", "access-token", "content-type", "content-length", "accept", "user-agent",
    }  # fmt: skip
    assert relayed.headers["Host"] == URL(tiktok.url).raw_authority  # TikTok's, not ours
    assert relayed.headers["User-Agent"] == "sdk/1.0"


async def test_a_big_answer_streams_through_the_gateway(
    make_gateway: GatewayFactory, tiktok: TikTokStub, http: aiohttp.ClientSession
) -> None:
    gateway = await make_gateway(passthrough_paths=("/open_api/v1.3/big/",))
    size = 3 * 1024 * 1024 + 5
    async with http.get(
        f"{gateway.url}/open_api/v1.3/big/?size={size}&chunked=1", headers={"Access-Token": TOKEN}
    ) as response:
        assert response.status == 200
        assert await response.read() == big_payload(size)
    # And the default prefixes are replaced, not added to.
    answer = await send(gateway, PIXEL_LIST, {"Access-Token": TOKEN})
    assert answer.status == 404
    assert outcomes(gateway) == {"relayed": 1, "refused_prefix": 1}


async def test_an_unreachable_tiktok_is_counted(gateway: Gateway, tiktok: TikTokStub) -> None:
    await tiktok.stop()
    answer = await send(gateway, PIXEL_LIST, {"Access-Token": TOKEN})
    assert answer.status == 502
    assert outcomes(gateway) == {"upstream_error": 1}


async def test_sandbox_mode_relays_nothing_and_says_why(
    make_gateway: GatewayFactory, tiktok: TikTokStub
) -> None:
    gateway = await make_gateway(pixels={})
    for token in ({}, {"Access-Token": TOKEN}):
        answer = await send(gateway, PIXEL_LIST, token)
        assert answer.status == 401
        assert "Sandbox mode" in answer.envelope()["message"]
    assert tiktok.requests == []
    assert outcomes(gateway) == {"refused_token": 2}


async def test_a_refused_path_is_logged_as_sent(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.app")
    answer = await send(gateway, "/open_api/v1.3/pixel/%2e%2e/x%0aFORGED?token=secret")
    assert answer.status == 400
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert "GET /open_api/v1.3/pixel/%2e%2e/x%0aFORGED: path: an encoded '.'" in line
    assert "secret" not in line


async def test_ingest_paths_with_another_method_still_answer_405(
    gateway: Gateway, tiktok: TikTokStub
) -> None:
    answer = await send(gateway, "/open_api/v1.3/pixel/track/", {"Access-Token": TOKEN})
    assert answer.status == 405
    assert tiktok.requests == []
