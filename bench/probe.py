"""`tiktok-gateway serve`, counting its Redis round trips. The gateway's code runs unchanged.

A round trip is one `send_packed_command` of redis-py's asyncio connection:
a single command, or a whole pipeline, sent and then answered; the script
calls (EVALSHA) in it are counted too. Each is
counted under the coroutine of the asyncio task that made it (aiohttp's
`RequestHandler.start` for requests, `Forwarder.run` and the tasks it
starts for forwarding, ...). On SIGUSR1 the counts are written as JSON to
`$BENCH_PROBE_FILE`, with a sequence number, so the orchestrator can read them
at the edges of a measured window; nothing runs in between.

    BENCH_PROBE_FILE=/tmp/rt.json GATEWAY_REDIS_URL=... python -m bench.probe
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from types import FrameType
from typing import Any

import orjson
from redis.asyncio.connection import AbstractConnection

from gateway.cli import main as gateway_main

COUNTS: Counter[str] = Counter()
SCRIPT_CALLS: Counter[str] = Counter()  # EVALSHA commands in those round trips, per task
SCRIPT_CALL = b"$7\r\nEVALSHA\r\n"  # as redis-py packs it; a JSON payload cannot hold \r\n
DUMPS = itertools.count(1)


def _task_name() -> str:
    task = asyncio.current_task()
    if task is None:
        return "no task"
    coro: Any = task.get_coro()
    return str(getattr(coro, "__qualname__", type(coro).__name__))


def install() -> None:
    """Wrap send_packed_command; every round trip of redis-py's asyncio client passes there."""
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        task = _task_name()
        COUNTS[task] += 1
        # A command's name is packed with its header; large arguments (memoryviews) follow.
        chunks = [command] if isinstance(command, bytes) else command
        SCRIPT_CALLS[task] += sum(c.count(SCRIPT_CALL) for c in chunks if isinstance(c, bytes))
        await original(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]


def dump(path: Path) -> None:
    """Write the counts (Python runs this between bytecodes of the main thread)."""
    counts = dict(COUNTS)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps({"seq": next(DUMPS), "total": sum(counts.values()),
                                  "by_task": counts, "script_calls_by_task": dict(SCRIPT_CALLS)}))
    tmp.replace(path)


def main() -> int:
    install()
    path = os.environ.get("BENCH_PROBE_FILE")
    if path:

        def on_usr1(_signum: int, _frame: FrameType | None) -> None:
            dump(Path(path))

        signal.signal(signal.SIGUSR1, on_usr1)
    return gateway_main(["serve"])


if __name__ == "__main__":
    sys.exit(main())
