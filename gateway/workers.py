"""`serve --workers N`: N gateway processes on one port, one Redis, one /metrics.

The parent serves nothing itself. It starts the embedded Redis when no
GATEWAY_REDIS_URL is given, so that every worker shares it; it empties a
directory for Prometheus's multi-process files; and it starts each worker as
`python -m gateway [--config FILE] serve --worker PARENT_PID` with GATEWAY_REDIS_URL and
PROMETHEUS_MULTIPROC_DIR in its environment. prometheus_client reads that
variable when it is imported, so a fresh interpreter per worker is the robust
way to set it. The workers bind the same host:port with SO_REUSEPORT and the
kernel spreads connections across them.

Workers run in their own session, so a terminal's Ctrl-C reaches the parent
only; the parent forwards SIGTERM and SIGINT to every worker, waits for them to
drain (GATEWAY_SHUTDOWN_TIMEOUT and a margin, then SIGKILL), and stops the
embedded Redis last. A worker that dies unexpectedly is restarted after a
backoff; one that exits with a configuration error (say, the port is taken)
stops them all. The exit code is 0 when every worker drained cleanly, else the
first worker's failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from .backoff import doubling
from .embedded import EmbeddedRedis
from .errors import ConfigError
from .settings import Settings

log = logging.getLogger("gateway.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# In the data dir; emptied at every start, so counters from an earlier run do not add up.
METRICS_DIR_NAME = "metrics"
CONFIG_EXIT_CODE = 2
# After GATEWAY_SHUTDOWN_TIMEOUT a worker forces its own exit; past this margin it is killed.
STOP_MARGIN_SECONDS = 5.0
# A worker that ran this long before dying was healthy: its restarts count afresh.
_STABLE_SECONDS = 30.0
_RESTART_BASE_SECONDS = 0.5
_RESTART_CAP_SECONDS = 10.0


def restart_delay(failures: int) -> float:
    """Seconds before restarting a worker after `failures` (1-based) quick deaths in a row."""
    return doubling(failures, base=_RESTART_BASE_SECONDS, cap=_RESTART_CAP_SECONDS)


async def run(
    settings: Settings, workers: int, environ: Mapping[str, str], config: Path | None
) -> int:
    """Start the shared Redis (if embedded) and `workers` workers; serve until a signal."""
    embedded: EmbeddedRedis | None = None
    redis_url = settings.redis_url
    if redis_url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        redis_url = await embedded.start()
    try:
        metrics_dir = fresh_metrics_dir(settings.data_dir)
        env = {**environ, "GATEWAY_REDIS_URL": redis_url, MULTIPROC_ENV: str(metrics_dir)}
        argv = [sys.executable, "-m", "gateway"]
        if config is not None:
            argv += ["--config", str(config)]
        worker_argv = [*argv, "serve", "--worker", str(os.getpid())]
        supervisor = Supervisor(worker_argv, env, metrics_dir, settings)
        return await supervisor.run(workers)
    finally:
        if embedded is not None:
            await embedded.stop()


def fresh_metrics_dir(data_dir: Path) -> Path:
    """`<data dir>/metrics`, emptied: the workers' Prometheus files of this run only."""
    path = (data_dir / METRICS_DIR_NAME).absolute()
    try:
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError("GATEWAY_DATA_DIR", f"cannot use {path}: {exc.strerror}") from None
    return path


class Supervisor:
    """Keeps `workers` processes running until told to stop; forwards signals to them."""

    def __init__(
        self, argv: list[str], env: Mapping[str, str], metrics_dir: Path, settings: Settings
    ) -> None:
        self._argv = argv
        self._env = dict(env)
        self._metrics_dir = metrics_dir
        self._settings = settings
        self._running: dict[int, asyncio.subprocess.Process] = {}  # slot -> worker
        self._stopping = asyncio.Event()
        self._deadline: asyncio.Task[None] | None = None
        self._fatal = 0

    async def run(self, workers: int) -> int:
        """Until every worker has exited after a stop; the gateway's exit code."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        log.info("starting %d workers on http://%s", workers, self._settings.listen)
        try:
            codes = await asyncio.gather(*(self._keep(slot) for slot in range(workers)))
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            if self._deadline is not None:
                self._deadline.cancel()
        failed = self._fatal or next((code for code in codes if code != 0), 0)
        if failed == 0:
            log.info("all workers stopped cleanly")
        return 128 - failed if failed < 0 else failed  # -N: killed by signal N, as a shell says

    async def _keep(self, slot: int) -> int:
        """Run worker `slot`, restarting it when it dies; its last exit code after a stop."""
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopping.is_set():
            proc = await self._spawn(slot)
            started = loop.time()
            code = await proc.wait()
            del self._running[slot]
            mark_process_dead(proc.pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
            if self._stopping.is_set():
                return code
            if code == CONFIG_EXIT_CODE:
                log.error("worker %d exited with a configuration error; stopping", proc.pid)
                self._fatal = code
                self._stop(signal.SIGTERM)
                return code
            failures = 1 if loop.time() - started >= _STABLE_SECONDS else failures + 1
            delay = restart_delay(failures)
            log.error(
                "worker %d exited unexpectedly (code %d); restarting it in %.1fs",
                proc.pid, code, delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
        return 0

    async def _spawn(self, slot: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            *self._argv, stdin=asyncio.subprocess.DEVNULL, env=self._env,
            start_new_session=True,  # signals come from us, once, not from the terminal too
        )  # fmt: skip
        self._running[slot] = proc
        log.info("worker %d started", proc.pid)
        if self._stopping.is_set():  # the stop came while it was starting
            proc.send_signal(signal.SIGTERM)
        return proc

    def _on_signal(self, signum: signal.Signals) -> None:
        log.info("%s received; stopping the workers", signum.name)
        self._stop(signum)

    def _stop(self, signum: signal.Signals) -> None:
        """Pass `signum` to every worker (a second one forces their exit); kill them at the end."""
        self._stopping.set()
        for proc in self._running.values():
            if proc.returncode is None:
                proc.send_signal(signum)
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().create_task(self._kill_at_deadline())

    async def _kill_at_deadline(self) -> None:
        await asyncio.sleep(self._settings.shutdown_timeout + STOP_MARGIN_SECONDS)
        for proc in self._running.values():
            if proc.returncode is None:
                log.error("worker %d did not stop in time; killing it", proc.pid)
                proc.kill()
