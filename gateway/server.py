"""Serve the app until SIGTERM or SIGINT, then drain: nothing acknowledged is lost on the way out.

First signal: stop accepting connections, let in-flight requests finish, let
the forwarder finish (or hand back) its batches, close Redis. A second
signal, or the drain taking longer than `shutdown_timeout`, forces the exit;
the embedded Redis is still asked to stop, so its append-only file is synced.
Batches abandoned by a forced exit come back when their lease runs out.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal

from aiohttp import web

from .app import RESOURCES, create_app
from .errors import ConfigError
from .settings import Settings

log = logging.getLogger("gateway.server")
FORCED_EXIT_CODE = 3


async def serve(settings: Settings) -> None:
    """Run the gateway until a signal; returns after a clean drain."""
    app = create_app(settings)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.shutdown_timeout / 2)
    await runner.setup()
    try:
        await _listen(runner, settings)
        log.info("listening on http://%s", settings.listen)
        await _until_signalled(app)
        log.info("shutting down: draining requests and in-flight batches")
        await asyncio.wait_for(runner.cleanup(), settings.shutdown_timeout)
    except TimeoutError:
        _force_exit(app, f"drain took longer than {settings.shutdown_timeout:.0f}s")
    except BaseException:
        await runner.cleanup()
        raise
    log.info("stopped cleanly")


async def _listen(runner: web.AppRunner, settings: Settings) -> None:
    try:
        await web.TCPSite(runner, settings.listen_host, settings.listen_port).start()
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        raise ConfigError(
            "GATEWAY_LISTEN", f"cannot listen on {settings.listen}: {os.strerror(exc.errno)}"
        ) from None


async def _until_signalled(app: web.Application) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: signal.Signals) -> None:
        if stop.is_set():
            _force_exit(app, f"second {signum.name}")
        log.info("%s received", signum.name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    await stop.wait()


def _force_exit(app: web.Application, why: str) -> None:
    log.error("forced exit (%s); unfinished batches return after their lease", why)
    embedded = app[RESOURCES].embedded
    if embedded is not None and embedded.pid is not None:
        # SIGTERM makes redis-server sync its append-only file before it exits.
        os.kill(embedded.pid, signal.SIGTERM)
    logging.shutdown()
    os._exit(FORCED_EXIT_CODE)
