"""The console script as a real process, as `make run` starts it: embedded Redis, sandbox mode.

Nothing here is in-process: the gateway is `python -m gateway serve` with only
environment variables, it starts its own redis-server in a short temporary
data directory, and it is stopped with SIGTERM as a service manager would.
Waiting on another process has no condition to await, so readiness and the
sandbox file are polled, each with a deadline.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio

from tests.helpers import browser_event, post_browser, post_server, server_event
from tests.processes import (
    POLL_SECONDS,
    STOP_SECONDS,
    Launcher,
    Starter,
    alive,
    embedded_redis_pid,
    environment,
    scraped,
    wait_gone,
    wait_ready,
)
from tests.support import PIXEL, TOKEN, free_port, sha256

TTP = "ttp-process-test-0000001"


@pytest_asyncio.fixture
async def start_gateway(data_dir: Path) -> AsyncIterator[Starter]:
    """Start gateway processes on `data_dir`; any still running afterwards are killed."""
    launcher = Launcher(
        data_dir, data_dir.parent, f"{data_dir.name}-gateway", GATEWAY_MERGE_WINDOW="0.5"
    )
    yield launcher.start
    await launcher.close()
    # The embedded Redis must not outlive a test, whatever the gateway did.
    pid = embedded_redis_pid(data_dir)
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGKILL)


async def _wait_sandbox_lines(path: Path, n: int, seconds: float = 10.0) -> list[dict[str, Any]]:
    """The sandbox file's records once it has `n` lines (bounded poll)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    lines: list[bytes] = []
    while loop.time() < deadline:
        lines = _nonempty_lines(path)
        if len(lines) >= n:
            return [orjson.loads(line) for line in lines]
        await asyncio.sleep(POLL_SECONDS)
    raise AssertionError(f"{path} has {len(lines)} lines, expected {n}")


def _nonempty_lines(path: Path) -> list[bytes]:
    try:
        return [line for line in path.read_bytes().splitlines() if line.strip()]
    except FileNotFoundError:
        return []


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


async def _wait_metric(
    http: aiohttp.ClientSession, base: str, name: str, value: float, seconds: float = 10.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while (seen := await scraped(http, base, name)) != value:
        if loop.time() >= deadline:
            raise AssertionError(f"{name} is {seen}, expected {value}")
        await asyncio.sleep(POLL_SECONDS)


async def _run_cli(data_dir: Path, *argv: str) -> tuple[int, str, str]:
    """Another `python -m gateway` process on the same data dir, as an operator runs it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=environment(GATEWAY_DATA_DIR=str(data_dir), GATEWAY_LOG_FORMAT="json"),
        cwd=data_dir,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), STOP_SECONDS)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_serve_embedded_sandbox_survives_a_restart(
    start_gateway: Starter, data_dir: Path
) -> None:
    # A variable of an earlier version, still set, and a mistyped one: named, not silently
    # ignored.
    gateway = await start_gateway(GATEWAY_TIMELINE_RETENTION="3600", GATEWAY_EARLY_FLUSHH="0")

    # -- start-up says where it listens, that Redis is embedded, and SANDBOX mode.
    lines = gateway.log_lines()
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    messages = gateway.messages()
    assert any(f"listening on {gateway.url}" in m for m in messages), messages
    assert any(m.startswith("Redis: embedded") for m in messages), messages
    assert any("embedded redis-server" in m and "redis.sock" in m for m in messages), messages
    assert any(m.startswith("SANDBOX mode") for m in messages), messages
    [retired] = [line for line in lines if "GATEWAY_TIMELINE_RETENTION" in line["message"]]
    assert retired["level"] == "warning" and "GATEWAY_DEBUG_HISTORY" in retired["message"]
    [typo] = [line for line in lines if "GATEWAY_EARLY_FLUSHH" in line["message"]]
    assert typo["level"] == "warning" and typo["message"].endswith("GATEWAY_EARLY_FLUSH?")
    redis_pid = embedded_redis_pid(data_dir)
    assert redis_pid is not None and alive(redis_pid)
    assert (data_dir / "redis.sock").is_socket()

    # -- one action, reported by the server and by the browser: one merged event.
    sandbox = data_dir / "sandbox-forwarded.jsonl"
    async with aiohttp.ClientSession() as http:
        answer = await post_server(http, gateway.url, [server_event("proc-1")])
        assert answer["code"] == 0, answer
        answer = await post_browser(http, gateway.url, browser_event("proc-1"), ttp=TTP)
        assert answer["code"] == 0, answer

        [record] = await _wait_sandbox_lines(sandbox, 1)
        assert record["event_source_id"] == PIXEL
        [event] = record["data"]
        assert event["event_id"] == "proc-1"
        assert event["user"]["email"] == sha256("jane.doe@example.com")
        assert event["user"]["ttp"] == TTP
        assert event["user"]["ttclid"] == "E.C.P.click-1"
        assert event["properties"]["value"] == 59.98
        assert b"jane.doe" not in sandbox.read_bytes()
        assert TOKEN.encode() not in sandbox.read_bytes()
        assert await scraped(http, gateway.url, "gateway_events_merged_total") == 1
        # Counted once TikTok's (here: the file's) answer is recorded in Redis.
        await _wait_metric(http, gateway.url, "gateway_events_forwarded_total", 1)

        # An operator's `inspect` finds the running gateway's Redis through its socket.
        code, out, err = await _run_cli(data_dir, "inspect", PIXEL, "proc-1", "Purchase")
        assert code == 0, err
        state = orjson.loads(out)
        assert state["state"] == "sent"
        assert state["sources"] == ["pixel", "server"]

    # -- SIGTERM: a clean exit, and the embedded Redis goes with it.
    assert await gateway.stop() == 0
    assert await wait_gone(redis_pid), f"redis-server {redis_pid} outlived the gateway"
    assert any(f"redis-server (pid {redis_pid}) stopped" in m for m in gateway.messages())
    assert not any(line["level"] == "error" for line in gateway.log_lines()), gateway.log_text()

    # -- restarted on the same data dir: the dedup memory came back from the AOF.
    again = await start_gateway()
    new_pid = embedded_redis_pid(data_dir)
    assert new_pid is not None and new_pid != redis_pid
    async with aiohttp.ClientSession() as http:
        answer = await post_server(http, again.url, [server_event("proc-1")])
        assert answer["code"] == 0, answer
        # Counted by the shard's owner once it has read the copy.
        await _wait_metric(http, again.url, "gateway_events_duplicates_dropped_total", 1)
        # A later event is forwarded alone: the duplicate never joined the queue.
        await post_server(http, again.url, [server_event("proc-2")])
        records = await _wait_sandbox_lines(sandbox, 2)
        assert len(records) == 2
        assert [e["event_id"] for e in records[1]["data"]] == ["proc-2"]

    # Ctrl-C reaches only the gateway (Redis runs in its own session); it stops Redis itself.
    assert await again.stop(signal.SIGINT) == 0
    assert await wait_gone(new_pid)


async def _serve_once(data_dir: Path, *command: str, **variables: str) -> tuple[int, str, str]:
    """Run `python -m gateway COMMAND` that is expected to stop by itself; (code, out, err)."""
    env = environment(
        GATEWAY_LISTEN=f"127.0.0.1:{free_port()}",
        GATEWAY_DATA_DIR=str(data_dir),
        GATEWAY_LOG_FORMAT="json",
    )
    env.update(variables)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, cwd=data_dir,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), STOP_SECONDS)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"`{' '.join(command)}` did not stop by itself") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("command", [["serve"], []], ids=["serve", "default-command"])
async def test_bad_variable_stops_serve_at_once_with_one_line(
    command: list[str], data_dir: Path
) -> None:
    code, out, err = await _serve_once(data_dir, *command, GATEWAY_MERGE_WINDOW="abc")
    assert code == 2
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("tiktok-gateway: configuration error: GATEWAY_MERGE_WINDOW: ")
    # Stopped before anything started: no Redis, nothing in the data dir.
    assert _entries(data_dir) == []


async def test_busy_port_stops_serve_with_one_line_naming_gateway_listen(data_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, _out, err = await _serve_once(
            data_dir, "serve", GATEWAY_LISTEN=f"127.0.0.1:{port}"
        )
    assert code == 2, err
    assert "Traceback" not in err
    *logged, line = err.splitlines()
    assert line == (
        f"tiktok-gateway: configuration error: GATEWAY_LISTEN: "
        f"cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    messages = [orjson.loads(entry)["message"] for entry in logged]
    # The embedded Redis it had started is stopped again.
    [pid] = [int(m) for m in re.findall(r"embedded redis-server \(pid (\d+)\) listening", err)]
    assert f"embedded redis-server (pid {pid}) stopped" in messages
    assert await wait_gone(pid)


async def test_changed_shards_on_a_used_redis_stop_serve_with_one_line(
    start_gateway: Starter, data_dir: Path
) -> None:
    first = await start_gateway()  # records the default layout in the embedded Redis
    assert await first.stop() == 0

    code, _out, err = await _serve_once(data_dir, "serve", GATEWAY_SHARDS="32")

    assert code == 2, err
    assert "Traceback" not in err
    *logged, line = err.splitlines()
    assert line.startswith(
        "tiktok-gateway: configuration error: GATEWAY_SHARDS / GATEWAY_DEDUP_BUCKETS: this Redis "
        "holds state laid out with shards=16 dedup_buckets=1024 store=log, this instance has "
        "shards=32 "
    )
    # The embedded Redis it had started is stopped again.
    messages = [orjson.loads(entry)["message"] for entry in logged]
    [pid] = [int(m) for m in re.findall(r"embedded redis-server \(pid (\d+)\) listening", err)]
    assert f"embedded redis-server (pid {pid}) stopped" in messages
    assert await wait_gone(pid)


async def test_data_dir_that_is_a_file_stops_serve_with_one_line(data_dir: Path) -> None:
    not_a_dir = data_dir / "a-file"
    not_a_dir.write_text("")
    code, _out, err = await _serve_once(data_dir, "serve", GATEWAY_DATA_DIR=str(not_a_dir))
    assert code == 2, err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"tiktok-gateway: configuration error: GATEWAY_DATA_DIR: "
        f"cannot use {not_a_dir}: File exists"
    )


async def test_second_gateway_on_a_data_dir_in_use_refuses_to_start(
    start_gateway: Starter, data_dir: Path
) -> None:
    first = await start_gateway()
    pid = embedded_redis_pid(data_dir)

    code, _out, err = await _serve_once(data_dir, "serve")

    assert code == 2, err
    line = err.splitlines()[-1]
    assert line.startswith("tiktok-gateway: configuration error: GATEWAY_DATA_DIR: ")
    assert f"in use by another gateway or its redis-server (pid {pid})" in line
    # The first one is unharmed: same Redis, still ready.
    assert embedded_redis_pid(data_dir) == pid
    await wait_ready(first)
    assert await first.stop() == 0
