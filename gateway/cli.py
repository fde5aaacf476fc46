"""`tiktok-gateway`: serve, check-config, healthcheck, inspect, dead-letters.

The only module that reads the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import orjson

from . import __version__, server, workers
from .app import make_store, sandbox_log_path
from .embedded import EmbeddedRedis
from .errors import ConfigError, GatewayError
from .logs import setup_logging
from .setting_types import redact_url
from .settings import Settings, effective
from .store import DeadLetterEntry, Store, connect

log = logging.getLogger("gateway.cli")
# Seconds `healthcheck` waits for /readyz; below the Dockerfile's HEALTHCHECK --timeout.
HEALTHCHECK_TIMEOUT = 3.0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script and of `python -m gateway`."""
    args = _parser().parse_args(argv)
    if args.command == "healthcheck":
        return healthcheck(args.url, args.config)
    try:
        settings = Settings.from_env(os.environ, args.config)
    except ConfigError as exc:
        print(f"tiktok-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    command = args.command or "serve"
    if command == "check-config":
        warn_about_variables(settings)
    try:
        if command == "serve":
            if getattr(args, "worker", None) is not None:
                return serve_worker(settings, args.worker)
            return serve(settings, getattr(args, "workers", 1), args.config)
        return asyncio.run(_admin(command, args, settings))
    except ConfigError as exc:
        print(f"tiktok-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"tiktok-gateway: {exc}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tiktok-gateway",
        description="Deduplicating gateway for TikTok's Events API.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config", type=Path, default=None,
        help="TOML file setting GATEWAY_* names; the environment wins over it",
    )
    sub = parser.add_subparsers(dest="command")
    serve_cmd = sub.add_parser("serve", help="run the gateway (the default)")
    serve_cmd.add_argument(
        "--workers", type=_workers, default=1, metavar="N",
        help="run N processes sharing the port, one Redis and one /metrics (default 1)",
    )
    # One of the processes `serve --workers N` starts, given the parent's pid: not for people.
    serve_cmd.add_argument("--worker", type=int, metavar="PARENT_PID", help=argparse.SUPPRESS)
    sub.add_parser("check-config", help="validate configuration and Redis reach, then exit")
    health = sub.add_parser(
        "healthcheck", help="exit 0 when the running gateway's /readyz answers 200 (for Docker)"
    )
    health.add_argument(
        "--url", default=None, help="URL to GET instead of /readyz on GATEWAY_LISTEN"
    )
    inspect = sub.add_parser("inspect", help="print a key's state and timeline")
    inspect.add_argument("pixel")
    inspect.add_argument("event_id")
    inspect.add_argument("event")
    dead = sub.add_parser("dead-letters", help="list or replay dead letters")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    listing = dead_sub.add_parser("list", help="show dead letters")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    replay = dead_sub.add_parser("replay", help="send dead letters again")
    replay.add_argument("ids", nargs="*", help="dead-letter ids to replay (SHARD:ID, as listed)")
    replay.add_argument("--all", action="store_true", help="replay every dead letter")
    return parser


def _workers(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {raw!r}")
    return int(raw)


def serve(settings: Settings, worker_count: int = 1, config: Path | None = None) -> int:
    """Run the gateway until SIGINT or SIGTERM: in this process, or in `worker_count`."""
    mode = (
        f"SANDBOX mode: no GATEWAY_PIXELS, any pixel accepted, forwards written to "
        f"{sandbox_log_path(settings)}"
        if settings.sandbox
        else f"forwarding {len(settings.pixels)} pixel(s) to {settings.upstream_url}"
    )
    redis = settings.redis_url or f"embedded (data in {settings.data_dir})"
    log.info("tiktok-gateway %s starting", __version__)
    log.info("Redis: %s", redact_url(redis))
    log.info("%s", mode)
    warn_about_variables(settings)
    if not settings.sandbox and not settings.allowed_origins:
        log.warning("GATEWAY_ALLOWED_ORIGINS is empty: browsers cannot post to /pixel/events")
    if settings.demo_enabled:
        log.info("demo shop: http://%s/demo/ (click, then watch one merged event)", settings.listen)
    if worker_count > 1:
        return asyncio.run(workers.run(settings, worker_count, os.environ, config))
    asyncio.run(server.serve(settings))
    return 0


def warn_about_variables(settings: Settings) -> None:
    """One warning line a set variable that does nothing: retired, or not a setting (a typo)."""
    for line in (*settings.retired, *settings.unknown):
        log.warning("%s", line)


def serve_worker(settings: Settings, parent: int) -> int:
    """One worker of `serve --workers N`; the parent set the variables it needs."""
    multiprocess_dir = os.environ.get(workers.MULTIPROC_ENV)
    if not multiprocess_dir:
        raise ConfigError(workers.MULTIPROC_ENV, "unset: `serve --worker` is started by --workers")
    asyncio.run(server.serve(settings, worker_of=(parent, Path(multiprocess_dir))))
    return 0


def healthcheck(url: str | None, config: Path | None = None) -> int:
    """GET the gateway's /readyz (or `url`): 0 when it answers 200, else 1.

    Docker's HEALTHCHECK reserves exit code 2, so even a configuration error is 1.
    """
    if url is None:
        try:
            url = readyz_url(Settings.from_env(os.environ, config))
        except ConfigError as exc:
            print(f"tiktok-gateway: configuration error: {exc}", file=sys.stderr)
            return 1
    # No proxies: a container's HTTP_PROXY must not carry a probe of our own port elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=HEALTHCHECK_TIMEOUT) as response:
            status, body = response.status, response.read(512)
    except urllib.error.HTTPError as exc:
        with exc:
            status, body = exc.code, exc.read(512)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        print(f"unhealthy: {url}: {reason or type(exc).__name__}", file=sys.stderr)
        return 1
    text = body.decode("utf-8", "replace").strip()
    if status != 200:
        print(f"unhealthy: {url}: HTTP {status} {text}", file=sys.stderr)
        return 1
    print(f"healthy: {url}: {text}")
    return 0


def readyz_url(settings: Settings) -> str:
    """The /readyz URL of a gateway with these settings, as seen from its own host."""
    # A wildcard address is not one to connect to: probe the loopback of the same family.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(settings.listen_host, settings.listen_host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.listen_port}/readyz"


@asynccontextmanager
async def _store(settings: Settings) -> AsyncIterator[Store]:
    """A store on the configured Redis; with none, the running gateway's or our own embedded one."""
    embedded = None
    url = settings.redis_url
    socket = (settings.data_dir / "redis.sock").absolute()
    if url is None and socket.exists():
        url = f"unix://{socket}"
    if url is None:
        embedded = EmbeddedRedis(settings.data_dir)
        url = await embedded.start()
    client = connect(url, cluster=settings.redis_cluster, timeout=settings.redis_timeout)
    try:
        yield make_store(client, settings)
    finally:
        await client.aclose()
        if embedded is not None:
            await embedded.stop()


async def _admin(command: str, args: argparse.Namespace, settings: Settings) -> int:
    async with _store(settings) as store:
        # Read with another layout than the gateways', every key would look missing.
        await store.check_layout(record=False)
        if command == "check-config":
            await store.load_scripts()
            mode = "sandbox" if settings.sandbox else f"{len(settings.pixels)} pixel(s)"
            print(f"configuration OK ({mode}); Redis reachable, {store.layout}; scripts loaded")
            print("\n".join(effective(settings)))
            return 0
        if command == "inspect":
            state = await store.inspect(args.pixel, args.event_id, args.event)
            if state is None:
                print("no such key: never seen, or forgotten after the dedup window")
                return 1
            print(orjson.dumps(state, option=orjson.OPT_INDENT_2).decode())
            return 0
        if args.action == "list":
            return await _list_dead_letters(store, args.json)
        return await _replay(store, args.ids, args.all)


async def _list_dead_letters(store: Store, as_json: bool) -> int:
    letters = await store.dead_letters()
    if as_json:
        for dl in letters:
            named = {"id": dl.ref, "member": dl.member, **dl.letter.stored()}
            print(orjson.dumps(named).decode())
        return 0
    if not letters:
        print("no dead letters")
        return 0
    print(
        f"{'ID':<24} {'PIXEL':<22} {'EVENT':<18} {'EVENT_ID':<24} {'REASON':<9} {'CODE':<6} "
        "MESSAGE"
    )
    for dl in letters:
        letter, event = dl.letter, dl.letter.event
        print(
            f"{dl.ref:<24} {letter.pixel_code:<22} {event.get('event', ''):<18} "
            f"{event.get('event_id', '')!s:<24} {letter.reason:<9} "
            f"{letter.code or '':<6} {letter.message}"
        )
    print(f"{len(letters)} dead letter(s)")
    return 0


async def _replay(store: Store, ids: Sequence[str], replay_all: bool) -> int:
    if not ids and not replay_all:
        print("name dead-letter ids to replay, or --all", file=sys.stderr)
        return 2
    letters = await store.dead_letters()
    chosen, refused = (letters, []) if replay_all else _named_letters(letters, ids)
    for why in refused:
        print(why, file=sys.stderr)
    queued = await store.replay(chosen, time.time())
    print(f"replayed {queued} dead letter(s); they leave with the next forward")
    return 1 if refused else 0


def _named_letters(
    letters: Sequence[DeadLetterEntry], names: Sequence[str]
) -> tuple[list[DeadLetterEntry], list[str]]:
    """The letters `names` name (`SHARD:ID` as listed, or a bare stream ID when one shard
    has it), and a line for each name that names none, or several."""
    chosen: dict[str, DeadLetterEntry] = {}
    refused = []
    for name in dict.fromkeys(names):
        found = [dl for dl in letters if name in (dl.ref, dl.id)]
        if len(found) == 1:
            chosen[found[0].ref] = found[0]
        elif not found:
            refused.append(f"no dead letter {name}")
        else:
            refs = ", ".join(dl.ref for dl in found)
            refused.append(f"dead letter {name} is in several shards ({refs}): name one")
    return list(chosen.values()), refused
