"""Serve the app until SIGTERM or SIGINT, then drain: nothing acknowledged is lost on the way out.

First signal: stop accepting connections, let in-flight requests finish, let
the forwarder finish (or hand back) its batches, close Redis. A second
signal, or the drain taking longer than `shutdown_timeout`, forces the exit;
the embedded Redis is still asked to stop, so its append-only file is synced.
Batches abandoned by a forced exit come back when their lease runs out.

A worker of `serve --workers N` (see `workers.py`) is the same, except that it
shares its port with the other workers (SO_REUSEPORT) and stops, as if
signalled, when the parent that started it is gone.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from .app import create_app
from .appkeys import EMBEDDED
from .errors import ConfigError
from .settings import Settings

log = logging.getLogger("gateway.server")
FORCED_EXIT_CODE = 3
# How often a worker checks that its parent is still there.
PARENT_POLL_SECONDS = 1.0
# Python's cyclic garbage collector by default runs a young collection every 700
# allocations. A shard owner holds its merge window (tens of thousands of parsed
# events) and every request allocates hundreds of objects, so the collections cost
# about a third of the owner's CPU; nearly nothing here makes cycles. Fewer, larger
# collections, and what start-up built moved out of the collector's sight.
GC_THRESHOLDS = (50_000, 20, 100)


async def serve(settings: Settings, *, worker_of: tuple[int, Path] | None = None) -> None:
    """Run the gateway until a signal; returns after a clean drain.

    `worker_of` (the parent's pid, the Prometheus multi-process directory) makes
    this process one worker of `serve --workers N`.
    """
    parent, multiprocess_dir = worker_of if worker_of is not None else (None, None)
    worker = worker_of is not None
    app = create_app(settings, multiprocess_dir=multiprocess_dir)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.shutdown_timeout / 2)
    await runner.setup()
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()
    try:
        await _listen(runner, settings, reuse_port=worker)
        log.info("listening on http://%s", settings.listen)
        await _until_signalled(app, parent)
        log.info("shutting down: draining requests and in-flight batches")
        await asyncio.wait_for(runner.cleanup(), settings.shutdown_timeout)
    except TimeoutError:
        _force_exit(app, f"drain took longer than {settings.shutdown_timeout:.0f}s")
    except BaseException:
        await runner.cleanup()
        raise
    log.info("stopped cleanly")


async def _listen(runner: web.AppRunner, settings: Settings, *, reuse_port: bool) -> None:
    site = web.TCPSite(
        runner, settings.listen_host, settings.listen_port, reuse_port=reuse_port or None
    )
    try:
        await site.start()
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        raise ConfigError(
            "GATEWAY_LISTEN", f"cannot listen on {settings.listen}: {os.strerror(exc.errno)}"
        ) from None


async def _until_signalled(app: web.Application, parent: int | None = None) -> None:
    """Until SIGTERM or SIGINT; or, given the `parent` pid, until that parent is gone."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            _force_exit(app, f"second {signum.name}")
        log.info("%s received", signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    if parent is None:
        await stop.wait()
        return
    waits = [
        asyncio.create_task(stop.wait(), name="signalled"),
        asyncio.create_task(_parent_gone(parent), name="parent-watch"),
    ]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in waits:
        task.cancel()


async def _parent_gone(parent: int) -> None:
    """Returns once the parent exited (we were re-parented): a worker must not outlive it."""
    # The parent may be gone before we got here: compare with its pid, not our first getppid().
    while True:  # no event tells us: poll
        if os.getppid() != parent:
            break
        await asyncio.sleep(PARENT_POLL_SECONDS)
    log.warning("the parent process (pid %d) is gone; stopping", parent)


def _force_exit(app: web.Application, why: str) -> None:
    log.error("forced exit (%s); unfinished batches return after their lease", why)
    embedded = app.get(EMBEDDED)
    if embedded is not None and embedded.pid is not None:
        # SIGTERM makes redis-server sync its append-only file before it exits.
        os.kill(embedded.pid, signal.SIGTERM)
    logging.shutdown()
    os._exit(FORCED_EXIT_CODE)
