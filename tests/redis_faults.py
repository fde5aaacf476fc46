"""Crashing an `EmbeddedRedis`, bringing it back, and waiting for its supervisor, for the
tests that break Redis.

Production never does any of it: it only starts and stops its Redis. So this
reaches into the class on purpose rather than giving it test-only methods.
"""

from __future__ import annotations

import contextlib
import logging

from gateway.embedded import EmbeddedRedis
from tests.support import poll_until

log = logging.getLogger("tests.redis_faults")


async def crash(server: EmbeddedRedis) -> None:
    """SIGKILL the server and keep its supervisor from restarting it."""
    await server._cancel_supervisor()
    proc = server._proc
    if proc is not None and proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):  # it may have just exited
            proc.kill()
        await proc.wait()


async def revive(server: EmbeddedRedis) -> None:
    """Start the server again (after `crash` or a give-up) on the same endpoint and data,
    supervised again."""
    if server._lock_fd is None:
        await server.start()
        return
    await server._cancel_supervisor()
    if server._proc is not None and server._proc.returncode is None:
        await server._terminate(server._proc)
    server.failed = False
    server._proc = await server._launch()
    server._supervise_in_background()
    log.info("embedded redis-server restarted (pid %d) on %s", server._proc.pid, server.url)


async def wait_restarted(server: EmbeddedRedis, count: int) -> None:
    """Until the supervisor has restarted the server `count` times in all, or given up
    (`server.failed`); the caller tells the two apart."""

    async def settled() -> bool:
        return server.restarts >= count or server.failed

    await poll_until(settled, lambda: f"restart {count} (restarts: {server.restarts})",
                     every=0.02)  # fmt: skip
