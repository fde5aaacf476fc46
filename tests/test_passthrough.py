"""Pass-through of other /open_api/ paths: a tiny app calling proxy() in front of the stub."""

from __future__ import annotations

import gzip
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from yarl import URL

from gateway.passthrough import proxy
from tests.tiktok_stub import Answer, TikTokStub, big_payload

TOKEN = "0123456789abcdef0123456789abcdef01234567"

Serve = Callable[..., Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start a gateway-like app whose /open_api/ routes call proxy(); returns its URL."""
    runners: list[web.AppRunner] = []
    sessions: list[aiohttp.ClientSession] = []

    async def start(base_url: str, **kwargs: Any) -> str:
        session = aiohttp.ClientSession()
        sessions.append(session)

        async def handler(request: web.Request) -> web.StreamResponse:
            return await proxy(request, session, base_url, **kwargs)

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


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_post_with_query_body_and_headers(
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
            "X-Custom": "kept",
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
    assert request.headers["X-Custom"] == "kept"
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
