"""`tiktok-gateway healthcheck`, the Dockerfile's HEALTHCHECK, against real gateways.

`main()` blocks on urllib, so it runs in a worker thread while this test's
loop serves the gateway. Docker reads the exit code: 0 healthy, 1 unhealthy
(2 is reserved by Docker, so the command never uses it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import time
from collections.abc import Awaitable, Callable

import pytest

from gateway.cli import main, readyz_url
from gateway.settings import Settings
from tests.support import Gateway, GatewayFactory, free_port

Healthcheck = Callable[..., Awaitable[tuple[int, str, str]]]


@pytest.fixture
def healthcheck(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Healthcheck:
    """Run `tiktok-gateway healthcheck ARGS` with only the GATEWAY_* variables given."""
    for name in list(os.environ):
        if name.startswith("GATEWAY_") or name.lower() in ("http_proxy", "no_proxy"):
            monkeypatch.delenv(name)

    async def run(*args: str, **env: str) -> tuple[int, str, str]:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        code = await asyncio.to_thread(main, ["healthcheck", *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def port_of(gateway: Gateway) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


async def test_a_ready_gateway_is_healthy(gateway: Gateway, healthcheck: Healthcheck) -> None:
    code, out, err = await healthcheck("--url", f"{gateway.url}/readyz")
    assert (code, err) == (0, "")
    assert '"status":"ready"' in out


async def test_it_probes_gateway_listen_with_a_wildcard_host_on_loopback(
    gateway: Gateway, healthcheck: Healthcheck
) -> None:
    # The container listens on 0.0.0.0:8080; the check inside it must reach 127.0.0.1:8080.
    code, out, _err = await healthcheck(GATEWAY_LISTEN=f"0.0.0.0:{port_of(gateway)}")
    assert code == 0
    assert f"http://127.0.0.1:{port_of(gateway)}/readyz" in out


async def test_a_gateway_without_redis_is_unhealthy(
    make_gateway: GatewayFactory, healthcheck: Healthcheck
) -> None:
    gateway = await make_gateway(redis_url=f"redis://127.0.0.1:{free_port()}/0", forward=False)
    code, out, err = await healthcheck("--url", f"{gateway.url}/readyz")
    assert (code, out) == (1, "")
    assert "HTTP 503" in err and '"status":"unavailable"' in err


async def test_healthz_can_be_probed_instead(
    make_gateway: GatewayFactory, healthcheck: Healthcheck
) -> None:
    gateway = await make_gateway(redis_url=f"redis://127.0.0.1:{free_port()}/0", forward=False)
    code, _out, _err = await healthcheck("--url", f"{gateway.url}/healthz")
    assert code == 0  # alive, though not ready


async def test_nothing_listening_is_unhealthy(healthcheck: Healthcheck) -> None:
    port = free_port()
    code, out, err = await healthcheck(GATEWAY_LISTEN=f"127.0.0.1:{port}")
    assert (code, out) == (1, "")
    assert f"unhealthy: http://127.0.0.1:{port}/readyz" in err


async def test_a_gateway_that_does_not_answer_is_unhealthy_after_the_timeout(
    healthcheck: Healthcheck, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.cli.HEALTHCHECK_TIMEOUT", 0.3)
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        started = time.monotonic()
        code, _out, err = await healthcheck("--url", f"http://127.0.0.1:{silent.getsockname()[1]}/")
    assert code == 1
    assert "timed out" in err
    assert time.monotonic() - started < 3


async def test_a_proxy_in_the_environment_is_not_used(
    gateway: Gateway, healthcheck: Healthcheck
) -> None:
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    code, _out, err = await healthcheck(
        "--url", f"{gateway.url}/readyz", http_proxy=dead_proxy, HTTP_PROXY=dead_proxy
    )
    assert (code, err) == (0, "")


async def test_bad_configuration_is_unhealthy_not_dockers_reserved_2(
    healthcheck: Healthcheck,
) -> None:
    code, _out, err = await healthcheck(GATEWAY_LISTEN="no-port-here")
    assert code == 1
    assert "GATEWAY_LISTEN" in err


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("0.0.0.0", "http://127.0.0.1:8080/readyz"),
        ("::", "http://[::1]:8080/readyz"),
        ("127.0.0.1", "http://127.0.0.1:8080/readyz"),
        ("10.1.2.3", "http://10.1.2.3:8080/readyz"),
        ("::1", "http://[::1]:8080/readyz"),
        ("gateway.internal", "http://gateway.internal:8080/readyz"),
    ],
)
def test_readyz_url_of_the_listen_address(host: str, url: str) -> None:
    assert readyz_url(dataclasses.replace(Settings(), listen_host=host, listen_port=8080)) == url
