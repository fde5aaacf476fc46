"""`serve --workers N` as real processes: one port, one Redis, one /metrics across workers.

Every answer of a worker names it (X-Gateway-Worker: its pid). The kernel
spreads connections across the workers (SO_REUSEPORT), so the tests open
connections until each worker has answered one, then send the pixel copy of
an event to one worker and the server copy to the other.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import WORKER_HEADER
from gateway.cli import main
from gateway.workers import restart_delay
from tests.helpers import browser_event, server_event
from tests.processes import GatewayProcess, Launcher, alive, embedded_redis_pid, wait_gone
from tests.support import PIXEL, TOKEN, poll_until, sha256
from tests.tiktok_stub import TikTokStub

WORKERS = 2
KEYS = 6
MAX_CONNECTIONS = 200


@pytest_asyncio.fixture
async def launcher(data_dir: Path) -> AsyncIterator[Launcher]:
    launcher = Launcher(data_dir, data_dir.parent, f"{data_dir.name}-gateway")
    yield launcher
    await launcher.close()
    for pid in _redis_servers(data_dir):  # nothing may outlive a test, whatever happened
        os.kill(pid, signal.SIGKILL)


def _worker_pids(gateway: GatewayProcess) -> list[int]:
    return [int(pid) for pid in re.findall(r"worker (\d+) started", gateway.log_text())]


def _redis_servers(data_dir: Path) -> list[int]:
    """Pids of live redis-server processes listening in `data_dir`."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ours = "redis-server" in cmdline and str(data_dir) in cmdline
        if ours and proc.name.isdigit() and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


async def _one_session_per_worker(
    url: str, count: int, tries: int = MAX_CONNECTIONS
) -> dict[int, aiohttp.ClientSession]:
    """A keep-alive session (one connection) on each of `count` workers, keyed by pid."""
    sessions: dict[int, aiohttp.ClientSession] = {}
    for _ in range(tries):
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
        async with session.get(f"{url}/healthz") as resp:
            assert resp.status == 200
            pid = int(resp.headers[WORKER_HEADER])
        if pid in sessions:
            await session.close()
            continue
        sessions[pid] = session
        if len(sessions) == count:
            return sessions
    for session in sessions.values():
        await session.close()
    raise AssertionError(f"{tries} connections reached only workers {list(sessions)}")


async def _post(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str]
) -> tuple[dict[str, Any], int]:
    """(TikTok-style answer, pid of the worker that answered)."""
    async with session.post(url, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        answer: dict[str, Any] = await resp.json()
        return answer, int(resp.headers[WORKER_HEADER])


async def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of /metrics: every sample by (name, sorted labels)."""
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _total(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:  # fmt: skip
    return sum(
        value for (sample, sample_labels), value in samples.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )  # fmt: skip


async def test_copies_answered_by_different_workers_merge_into_one_forward(
    launcher: Launcher, redis_url: str, tiktok: TikTokStub
) -> None:
    gateway = await launcher.start(
        "--workers", str(WORKERS),
        GATEWAY_REDIS_URL=redis_url,
        GATEWAY_UPSTREAM_URL=tiktok.url,
        GATEWAY_PIXELS=f"{PIXEL}={TOKEN}",
        GATEWAY_SHARDS="4",
        GATEWAY_MERGE_WINDOW="10",
        GATEWAY_FORWARD_POLL_INTERVAL="0.05",
    )  # fmt: skip
    workers = _worker_pids(gateway)
    assert len(workers) == WORKERS, gateway.log_text()

    async def all_listening() -> bool:  # a worker is started before it has bound the port
        return gateway.log_text().count("listening on http://") == WORKERS

    await poll_until(all_listening, "every worker listening")
    sessions = await _one_session_per_worker(gateway.url, WORKERS)
    assert sorted(sessions) == sorted(workers)
    try:
        first, second = sessions.values()
        for n in range(KEYS):
            # The server copy goes to one worker, the pixel copy to the other; by turns.
            server, pixel = (first, second) if n % 2 == 0 else (second, first)
            answer, by_server = await _post(
                server, f"{gateway.url}/open_api/v1.3/event/track/",
                {"event_source": "web", "event_source_id": PIXEL,
                 "data": [server_event(f"multi-{n}")]},
                {"Access-Token": TOKEN},
            )  # fmt: skip
            assert answer["code"] == 0, answer
            answer, by_pixel = await _post(
                pixel, f"{gateway.url}/pixel/events", browser_event(f"multi-{n}"),
                {"Cookie": f"_ttp=ttp-workers-{n:04d}", "User-Agent": "TestBrowser/1.0"},
            )
            assert answer["code"] == 0, answer
            assert by_server != by_pixel
    finally:
        for session in sessions.values():
            await session.close()

    # Each key reaches TikTok once, merged: the server's email with the browser's cookie.
    events = await tiktok.wait_for_events(KEYS)
    assert sorted(e["event_id"] for e in events) == sorted(f"multi-{n}" for n in range(KEYS))
    for event in events:
        n = int(event["event_id"].removeprefix("multi-"))
        assert event["user"]["email"] == sha256("jane.doe@example.com")
        assert event["user"]["ttp"] == f"ttp-workers-{n:04d}"

    # One scrape, whichever worker answers it, counts what both workers received.
    samples = await _scrape(gateway.url)
    received = "gateway_events_received_total"
    assert _total(samples, received) == 2 * KEYS
    assert _total(samples, received, source="server") == KEYS
    assert _total(samples, received, source="pixel") == KEYS
    assert _total(samples, "gateway_events_merged_total") == KEYS
    assert _total(samples, "gateway_build_info") == 1

    async def all_forwarded() -> bool:
        samples = await _scrape(gateway.url)
        return _total(samples, "gateway_events_forwarded_total") == KEYS

    await poll_until(all_forwarded, f"gateway_events_forwarded_total == {KEYS}")
    assert len(tiktok.events()) == KEYS

    # SIGTERM to the parent: it passes it on, both workers drain, everyone exits 0.
    assert await gateway.stop() == 0
    for pid in workers:
        assert await wait_gone(pid), f"worker {pid} outlived the parent"
    messages = gateway.messages()
    assert messages.count("stopped cleanly") == WORKERS, messages
    assert messages[-1] == "all workers stopped cleanly", messages


async def test_embedded_redis_is_started_once_by_the_parent_and_stopped_with_it(
    launcher: Launcher, data_dir: Path
) -> None:
    gateway = await launcher.start("--workers", str(WORKERS))
    redis_pid = embedded_redis_pid(data_dir)
    assert redis_pid is not None
    assert _redis_servers(data_dir) == [redis_pid]
    workers = _worker_pids(gateway)
    assert len(workers) == WORKERS, gateway.log_text()

    # A worker that dies is replaced; the others keep serving meanwhile.
    os.kill(workers[0], signal.SIGKILL)

    async def replaced() -> bool:
        return len(_worker_pids(gateway)) == WORKERS + 1

    await poll_until(replaced, "a replacement worker")
    assert await wait_gone(workers[0])
    current = [workers[1], _worker_pids(gateway)[-1]]

    async def both_answer() -> bool:  # the replacement answers once it has bound the port
        try:
            sessions = await _one_session_per_worker(gateway.url, WORKERS, tries=20)
        except AssertionError:
            return False
        for session in sessions.values():
            await session.close()
        return sorted(sessions) == sorted(current)

    await poll_until(both_answer, "the surviving and the replacement worker answering")
    assert _redis_servers(data_dir) == [redis_pid]

    assert await gateway.stop() == 0
    for pid in current:
        assert await wait_gone(pid), f"worker {pid} outlived the parent"
    assert await wait_gone(redis_pid), f"redis-server {redis_pid} outlived the gateway"
    assert _redis_servers(data_dir) == []


async def test_workers_stop_by_themselves_when_the_parent_is_killed(
    launcher: Launcher, redis_url: str
) -> None:
    gateway = await launcher.start("--workers", str(WORKERS), GATEWAY_REDIS_URL=redis_url)
    workers = _worker_pids(gateway)
    assert len(workers) == WORKERS, gateway.log_text()

    await gateway.kill()  # no signal to pass on: the workers notice they were orphaned

    for pid in workers:
        assert await wait_gone(pid), f"worker {pid} outlived its killed parent"
    messages = gateway.messages()
    assert sum("parent process" in m and "is gone" in m for m in messages) == WORKERS, messages
    assert messages.count("stopped cleanly") == WORKERS, messages


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_workers_must_be_a_positive_whole_number(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--workers", value])
    assert exited.value.code == 2
    assert f"expected a positive whole number, got {value!r}" in capsys.readouterr().err


def test_worker_restarts_back_off_exponentially_up_to_a_cap() -> None:
    delays = [restart_delay(n) for n in range(1, 10)]
    assert delays[:3] == [0.5, 1.0, 2.0]
    assert delays == sorted(delays)
    assert max(delays) == 10.0
