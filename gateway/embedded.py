"""Start and supervise a local redis-server when no GATEWAY_REDIS_URL is given.

`redis_process.py` knows how one server process is configured, started and
stopped; `EmbeddedRedis` owns the data directory's lock for as long as it runs
and a supervisor task that restarts the server if it dies, after a backoff,
until it keeps dying.

The test suite uses the same class to run the real Redis it tests against.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from .backoff import doubling
from .errors import ConfigError
from .redis_process import (
    LOG_NAME,
    ServerConfig,
    find_redis_server,
    launch,
    lock_data_dir,
    terminate,
)

log = logging.getLogger("gateway.embedded")

# A server that ran this long before dying was healthy: start counting afresh.
_STABLE_SECONDS = 30.0
_MAX_QUICK_FAILURES = 5
_RESTART_BASE_SECONDS = 0.1
_RESTART_CAP_SECONDS = 2.0


def restart_delay(failures: int) -> float:
    """Seconds to wait before restart number `failures` (1-based) in a quick series."""
    return doubling(failures, base=_RESTART_BASE_SECONDS, cap=_RESTART_CAP_SECONDS)


class EmbeddedRedis:
    """Starts and supervises a local redis-server with append-only persistence."""

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendfsync: str = "everysec",
        binary: str | None = None,
        extra_args: Sequence[str] = (),
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self._port_arg = port
        self._appendfsync = appendfsync
        self._binary = binary
        self._extra_args = tuple(extra_args)
        self._start_timeout = start_timeout
        self._stop_timeout = stop_timeout
        self._config: ServerConfig | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self.restarts = 0
        """How many times the supervisor brought the server back."""
        self.failed = False
        """True once the supervisor gave up after too many quick failures."""

    @property
    def url(self) -> str:
        """`unix:///.../redis.sock` or `redis://127.0.0.1:PORT`; set by start()."""
        if self._config is None:
            raise RuntimeError("EmbeddedRedis.url is only known after start()")
        return self._config.url

    @property
    def pid(self) -> int | None:
        """The running server's pid, None when it is not running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def log_path(self) -> Path:
        """redis-server's log, which also gets its stdout and stderr."""
        return self.data_dir / LOG_NAME

    async def start(self) -> str:
        """Start the server, wait until it answers, supervise it; returns its URL."""
        if self._lock_fd is not None:
            raise RuntimeError("EmbeddedRedis is already started")
        binary = self._binary = self._binary or find_redis_server()
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = lock_data_dir(self.data_dir)
        except OSError as exc:  # a file in the way, no permission, a read-only disk
            raise ConfigError(
                "GATEWAY_DATA_DIR", f"cannot use {self.data_dir}: {exc.strerror or exc}"
            ) from None
        try:
            self._config = ServerConfig.choose(
                binary,
                self.data_dir,
                port=self._port_arg,
                appendfsync=self._appendfsync,
                extra_args=self._extra_args,
            )
            self._proc = await self._launch()
        except BaseException:
            self._unlock_data_dir()
            raise
        self._supervise_in_background()
        log.info(
            "embedded redis-server (pid %d) listening on %s, data in %s",
            self._proc.pid,
            self.url,
            self.data_dir,
        )
        return self.url

    async def stop(self) -> None:
        """Stop supervising, shut the server down cleanly (AOF fsynced); safe to repeat."""
        await self._cancel_supervisor()
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.returncode is None:
                await self._terminate(proc)
                log.info("embedded redis-server (pid %d) stopped", proc.pid)
        finally:
            # Safe even if the server outlived us: it holds its own copy of the lock.
            self._unlock_data_dir()

    # -- the process ---------------------------------------------------------

    async def _launch(self) -> asyncio.subprocess.Process:
        assert self._config is not None
        return await launch(
            self._config, lock_fd=self._lock_fd, start_timeout=self._start_timeout
        )

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        assert self._config is not None
        await terminate(self._config, proc, stop_timeout=self._stop_timeout)

    def _unlock_data_dir(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    # -- supervision ---------------------------------------------------------

    def _supervise_in_background(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="embedded-redis-supervisor")

    async def _cancel_supervisor(self) -> None:
        task, self._supervisor = self._supervisor, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _supervise(self) -> None:
        """Wait for the server to die; bring it back unless it keeps dying."""
        loop = asyncio.get_running_loop()
        failures = 0
        while self._proc is not None:
            proc = self._proc
            began = loop.time()
            code = await proc.wait()
            failures = failures + 1 if loop.time() - began < _STABLE_SECONDS else 1
            log.warning(
                "embedded redis-server (pid %d) exited unexpectedly with code %d; restarting",
                proc.pid,
                code,
            )
            failures = await self._relaunch(failures)
            if self.failed:
                return

    async def _relaunch(self, failures: int) -> int:
        """Try to start the server again; returns the updated failure count."""
        while failures <= _MAX_QUICK_FAILURES:
            await asyncio.sleep(restart_delay(failures))
            try:
                self._proc = await self._launch()
            except ConfigError as exc:
                log.warning("restarting embedded redis-server failed: %s", exc)
                failures += 1
                continue
            log.warning("embedded redis-server restarted (pid %d)", self._proc.pid)
            self.restarts += 1
            return failures
        log.error(
            "embedded redis-server failed %d times in quick succession; giving up (see %s)",
            failures,
            self.log_path,
        )
        self.failed = True
        return failures
