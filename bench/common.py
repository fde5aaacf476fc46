"""What the bench's processes share: the pixel, ledger keys, percentiles, child processes,
the redis-server to run."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gateway.redis_process import find_redis_server

PIXEL = "CBENCHPIXEL0000000001"
TOKEN = "bench-access-token-0123456789"
TRACK_PATH = "/open_api/v1.3/event/track/"
BROWSER_PATH = "/pixel/events"
# TikTok converts the old names itself, and so does the gateway's key (PRODUCT.md 3).
LEGACY_ALIASES = {"CompletePayment": "Purchase", "SubmitForm": "Lead"}
START_SECONDS = 30.0  # longest wait for a process of the rig to answer
PERCENTILES = (50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.99)


def ledger_key(pixel: str, event: str, event_id: str | None, order_id: str | None) -> str:
    """The stand-in's ledger key; an event without event_id is known by its order id."""
    name = LEGACY_ALIASES.get(event, event)
    return f"{pixel}|{name}|{event_id}" if event_id else f"{pixel}|{name}|order:{order_id}"


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of already sorted values; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Count, mean, max and the PERCENTILES of latencies given in seconds, in ms."""
    values = sorted(seconds)
    out: dict[str, float] = {"count": len(values)}
    if values:
        out["mean"] = round(sum(values) / len(values) * 1000, 3)
        out["max"] = round(values[-1] * 1000, 3)
    for q in PERCENTILES:
        out[f"p{q:g}"] = round(percentile(values, q) * 1000, 3) if values else math.nan
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def spawn(
    argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A child in its own process group, stdout and stderr into `log_path`."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM the child's process group, SIGKILL it after `timeout`; its exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


async def wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    """Until GET `url` answers 200 (at most START_SECONDS); fails early when the process exits."""
    import aiohttp

    deadline = time.monotonic() + START_SECONDS
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args!r} exited with code {proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not answer 200 within {START_SECONDS:g}s")


def redis_version(binary: str) -> tuple[int, ...]:
    try:
        text = subprocess.run([binary, "--version"], capture_output=True, text=True,
                              timeout=10, check=False).stdout
    except OSError:
        return ()
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in match.groups()) if match else ()


def choose_redis_server() -> str:
    """$BENCH_REDIS_SERVER, else the newest redis-server found (the system's or the embedded)."""
    chosen = os.environ.get("BENCH_REDIS_SERVER")
    if chosen:
        return chosen
    found = {p for p in (shutil.which("redis-server"), "/usr/bin/redis-server",
                         "/usr/local/bin/redis-server", find_redis_server()) if p and
             os.access(p, os.X_OK)}  # fmt: skip
    return max(sorted(found), key=redis_version)
