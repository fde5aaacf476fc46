"""Real gateway processes for tests: `python -m gateway serve`, configured by environment only.

A `Launcher` starts them as a service manager would (no inherited `GATEWAY_*`
variable, stdin closed, stdout and stderr into one log file per process) and
kills whatever is still running when the test ends. Nothing can be awaited
across a process boundary, so readiness, exits and Redis state are polled,
each with a deadline.

    launcher = Launcher(data_dir, log_dir, GATEWAY_MERGE_WINDOW="0.5")
    gateway = await launcher.start(GATEWAY_SHARDS="4")  # returns once /readyz says 200
    assert await gateway.stop() == 0                    # SIGTERM, then the exit code
    await launcher.close()
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port

START_SECONDS = 30.0
STOP_SECONDS = 15.0
POLL_SECONDS = 0.05
# Settings a process test wants so that forwarding and retries take moments, not seconds.
FAST_FORWARDING = {
    "GATEWAY_FORWARD_POLL_INTERVAL": "0.05",
    "GATEWAY_RETRY_BASE": "0.05",
    "GATEWAY_RETRY_CAP": "0.5",
    "GATEWAY_UPSTREAM_RATE_LIMIT": "1000",
    # A killed instance's shards are taken over after this: seconds, not the default 10.
    "GATEWAY_FORWARD_LEASE": "2",
}


def environment(**variables: str) -> dict[str, str]:
    """This process's environment without any GATEWAY_* variable, plus `variables`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update(variables)
    return env


@dataclass
class GatewayProcess:
    """One `python -m gateway serve`; its stdout and stderr go to `log_path`."""

    proc: asyncio.subprocess.Process
    url: str
    data_dir: Path
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_lines(self) -> list[dict[str, Any]]:
        """This run's log, one JSON object per line (GATEWAY_LOG_FORMAT=json)."""
        raw = self.log_path.read_bytes()
        return [orjson.loads(line) for line in raw.splitlines() if line.strip()]

    def log_text(self) -> str:
        return self.log_path.read_bytes().decode(errors="replace")

    def messages(self) -> list[str]:
        return [str(line["message"]) for line in self.log_lines()]

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, seconds: float = STOP_SECONDS) -> int:
        """The exit code; fails if the process is still running after `seconds`."""
        try:
            return await asyncio.wait_for(self.proc.wait(), seconds)
        except TimeoutError:
            raise AssertionError(
                f"gateway {self.pid} still running after {seconds}s; log:\n{self.log_text()}"
            ) from None

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> int:
        """SIGTERM (or `sig`), then the exit code; fails if it takes longer than STOP_SECONDS."""
        self.proc.send_signal(sig)
        try:
            return await asyncio.wait_for(self.proc.wait(), STOP_SECONDS)
        except TimeoutError:
            raise AssertionError(
                f"gateway did not exit {STOP_SECONDS}s after SIGTERM; log:\n{self.log_text()}"
            ) from None

    async def kill(self) -> None:
        """SIGKILL, as the OOM killer or a lost machine would: no drain, no goodbye."""
        self.proc.kill()
        await self.proc.wait()


Starter = Callable[..., Awaitable[GatewayProcess]]


class Launcher:
    """Starts gateway processes with `defaults` plus per-call variables; `close()` cleans up."""

    def __init__(self, data_dir: Path, log_dir: Path, log_prefix: str = "gateway", **defaults: str):
        self.data_dir = data_dir
        self.log_dir = log_dir
        self.log_prefix = log_prefix
        self.defaults = defaults
        self.started: list[GatewayProcess] = []
        self._numbers = itertools.count(1)  # taken before any await: starts may run concurrently

    async def start(self, *options: str, **variables: str) -> GatewayProcess:
        """One more gateway on a free port; returns when it is ready, fails if it exits.

        `options` follow `serve` on the command line, e.g. "--workers", "2".
        """
        port = free_port()
        env = environment(
            GATEWAY_LISTEN=f"127.0.0.1:{port}",
            GATEWAY_DATA_DIR=str(self.data_dir),
            GATEWAY_LOG_FORMAT="json",
            **{**self.defaults, **variables},
        )
        log_path = self.log_dir / f"{self.log_prefix}-{next(self._numbers)}.log"
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "gateway", "serve", *options,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
                env=env, cwd=self.data_dir,
            )  # fmt: skip
        gateway = GatewayProcess(proc, f"http://127.0.0.1:{port}", self.data_dir, log_path)
        self.started.append(gateway)
        await wait_ready(gateway)
        return gateway

    async def close(self) -> None:
        """Kill every gateway still running and remove the logs."""
        for gateway in self.started:
            if gateway.proc.returncode is None:
                await gateway.kill()
            gateway.log_path.unlink(missing_ok=True)


async def wait_ready(gateway: GatewayProcess) -> None:
    """Poll /readyz until 200; fail at once if the process exits, or after START_SECONDS."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + START_SECONDS
    timeout = aiohttp.ClientTimeout(total=2.0)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while loop.time() < deadline:
            if gateway.proc.returncode is not None:
                raise AssertionError(
                    f"gateway exited with {gateway.proc.returncode}:\n{gateway.log_text()}"
                )
            try:
                async with http.get(f"{gateway.url}/readyz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(POLL_SECONDS)
    raise AssertionError(f"gateway not ready in {START_SECONDS}s:\n{gateway.log_text()}")


async def scraped(http: aiohttp.ClientSession, base: str, name: str) -> float:
    """The sum of a metric's samples over all labels, from a gateway's /metrics."""
    async with http.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


def embedded_redis_pid(data_dir: Path) -> int | None:
    """The pid of the embedded redis-server of `data_dir`, from its pid file."""
    try:
        return int((data_dir / "redis.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie answers signal 0 but is gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


async def wait_gone(pid: int, seconds: float = 5.0) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while alive(pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL_SECONDS)
    return True
