"""The runner: pipelines, cluster routing, replicas and Redis errors.

Calls are scripts (by name, see scripts.py) or plain commands (XADD, XREAD, HMGET, ...).
The request path's calls are *batched*: one call takes many items. The copies
ingested for one shard share one XADD to its log; RATE_LIMIT items of one slot share
one script call. Concurrent requests queue their items and go to Redis together
(`Runner.shared`): one round trip, and one command a shard, for all.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from ..errors import StoreUnavailable
from .scripts import SCRIPTS

RedisClient = aioredis.Redis | RedisCluster
# (script, KEYS, ARGV), or (command, [the key that routes it], every argument)
Call = tuple[str, Sequence[str], Sequence[Any]]
log = logging.getLogger("gateway.store")  # one logger for the whole store
SHARED_PIPELINE_MAX = 2000  # items in one shared pipeline; the rest go in the next
BATCH_CALL_MAX = 250  # items in one batched script call: Redis runs nothing else meanwhile


class BatchItem(NamedTuple):
    """One item of a batched call: a copy to append (XADD), or a request to count
    (RATE_LIMIT).

    Items of a script with the same slot and common arguments go in one call; items of a
    command, with the same key (`route`): concurrent requests share one call, not only
    one round trip.
    """

    script: str  # a script's name, or a command (XADD)
    route: str  # the command's key; for a script, a key in the slot its items share
    common: tuple[Any, ...]  # the call's first arguments, the same for every item in it
    args: tuple[Any, ...]



class Runner:
    """Runs the scripts on one Redis or a cluster; every Redis failure leaves it as
    StoreUnavailable."""

    def __init__(
        self, client: RedisClient, *, wait_replicas: int = 0, wait_timeout: float = 1.0
    ) -> None:
        self.client = client
        # Acknowledge an ingest only once this many replicas have it (WAIT), or answer 503.
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = max(1, int(wait_timeout * 1000))
        self._queue: collections.deque[
            tuple[Sequence[BatchItem], asyncio.Future[list[Any]]]
        ] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None
        # Script objects give the SHA1 and source; calls go through `run`.
        self.scripts = {
            name: aioredis.Redis.register_script(client, source)  # type: ignore[arg-type]
            for name, source in SCRIPTS.items()
        }

    async def load_scripts(self) -> None:
        """Load every script; /readyz calls this so a flushed cache heals itself.

        On a cluster, SCRIPT LOAD goes to every primary (redis-py routes it so)."""
        async with self.guard():
            for script in self.scripts.values():
                await self.client.script_load(script.script)

    async def shared(self, items: Sequence[BatchItem]) -> list[Any]:
        """Run batched-script items in the next pipeline, together with everyone else's;
        one reply per item.

        While a pipeline is in flight, items queue; the flusher then sends all of
        them as one, with one script call per script and slot (on one Redis, per
        script). Under load many requests share a round trip and a call, and a quiet
        gateway still sends at once. The flusher is a task of its own, so a caller
        that gives up (a client hung up) cannot cut a pipeline in half.
        """
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((items, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="store-flush")
        return await future

    async def _flush(self) -> None:
        while self._queue:
            batch: list[tuple[Sequence[BatchItem], asyncio.Future[list[Any]]]] = []
            size = 0
            while self._queue and size < SHARED_PIPELINE_MAX:
                items, future = self._queue.popleft()
                batch.append((items, future))
                size += len(items)
            try:
                replies = await self.run_batched([i for items, _ in batch for i in items])
            except Exception as exc:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            start = 0
            for items, future in batch:
                if not future.done():
                    future.set_result(replies[start : start + len(items)])
                start += len(items)

    async def run_batched(
        self, items: Sequence[BatchItem], *, partial: bool = False
    ) -> list[Any]:
        """Items grouped into calls (a script's per slot and common arguments, a command's
        per key, of at most BATCH_CALL_MAX items) in one pipeline; one reply per item, in
        order: a script's reply is a list with one element per item, a command's reply is
        every item's. With `partial`, the items of a call that failed get its exception
        (see `run`)."""
        cluster = isinstance(self.client, RedisCluster)
        groups: dict[tuple[str, int | str, tuple[Any, ...]], list[int]] = {}
        for i, item in enumerate(items):
            where: int | str = item.route
            if item.script in SCRIPTS:
                where = key_slot(item.route.encode()) if cluster else 0
            groups.setdefault((item.script, where, item.common), []).append(i)
        chunks: list[tuple[str, tuple[Any, ...], list[int]]] = []
        for (script, _where, common), indexes in groups.items():
            for start in range(0, len(indexes), BATCH_CALL_MAX):
                chunks.append((script, common, indexes[start : start + BATCH_CALL_MAX]))
        calls = [
            (script, [items[chunk[0]].route], [*common, *(a for i in chunk for a in items[i].args)])
            for script, common, chunk in chunks
        ]
        replies: list[Any] = [None] * len(items)
        results = await self.run(calls, partial=partial)
        for (script, _common, chunk), result in zip(chunks, results, strict=True):
            whole = isinstance(result, Exception) or script not in SCRIPTS
            for j, i in enumerate(chunk):
                replies[i] = result if whole else result[j]
        return replies

    async def run(self, calls: Sequence[Call], *, partial: bool = False) -> list[Any]:
        """Run calls (scripts or commands) in one pipeline; rerun those a node had no
        script for.

        A node answers NOSCRIPT when its script cache is empty: it restarted, someone ran
        SCRIPT FLUSH, or it is a replica just promoted (Redis 7 no longer copies SCRIPT
        LOAD to replicas). The calls it refused run again once as EVAL with the script's
        source, routed like the first time, so the node that refused runs them and keeps
        the script for the next EVALSHA: one mechanism for one Redis and for a cluster,
        whichever node lost its scripts.

        With `wait_replicas`, a pipeline that appends to a log (XADD) ends with WAIT on
        each node written to (see `_node_pipeline`). A failed call raises, unless
        `partial`: then its exception takes its place in the replies (on a cluster one
        primary may be away while the others answer), and only when every call failed is
        the first raised.
        """
        if not calls:
            return []
        async with self.guard():
            replies = await self._pipeline(calls)
            missing = [
                i for i, r in enumerate(replies) if isinstance(r, redis_errors.NoScriptError)
            ]
            if missing:
                log.info("Redis lost scripts; running %d call(s) with their source", len(missing))
                retried = await self._pipeline([calls[i] for i in missing], source=True)
                for i, reply in zip(missing, retried, strict=True):
                    replies[i] = reply
            failed = [r for r in replies if isinstance(r, Exception)]
            if failed and (not partial or len(failed) == len(replies)):
                raise failed[0]
        return replies

    async def _pipeline(self, calls: Sequence[Call], *, source: bool = False) -> list[Any]:
        """One reply (or exception) per call, in order; with `source`, as EVAL."""
        if isinstance(self.client, RedisCluster):
            return await self._cluster_pipeline(self.client, calls, source)
        return await self._node_pipeline(calls, source)

    async def _cluster_pipeline(
        self, client: RedisCluster, calls: Sequence[Call], source: bool
    ) -> list[Any]:
        """One pipeline per primary, concurrently: a primary that is away fails only its
        own calls. redis-py's cluster pipeline would group per node too, but raises for
        all calls when one node's connection fails, and a claim made on the other nodes
        would then be lost until its lease ends."""
        await client.initialize()  # the slot map; a no-op once known
        groups: dict[str, tuple[ClusterNode | None, list[int]]] = {}
        for i, (_name, keys, _args) in enumerate(calls):
            node = client.get_node_from_key(keys[0])
            groups.setdefault(node.name if node else "", (node, []))[1].append(i)
        results = await asyncio.gather(
            *(
                self._node_pipeline([calls[i] for i in idx], source, node)
                for node, idx in groups.values()
            ),
            return_exceptions=True,
        )
        replies: list[Any] = [None] * len(calls)
        for (_node, idx), result in zip(groups.values(), results, strict=True):
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result  # cancelled
            for j, i in enumerate(idx):
                replies[i] = result if isinstance(result, Exception) else result[j]
        return replies

    async def _node_pipeline(
        self, calls: Sequence[Call], source: bool = False, node: ClusterNode | None = None
    ) -> list[Any]:
        """The calls of one node (all of them on one Redis) in one pipeline: one
        connection, so a WAIT at its end waits for exactly these writes."""
        pipe = self.client.pipeline(transaction=False)
        for name, keys, args in calls:
            script = self.scripts.get(name)
            if script is None:  # a command: `keys` route it, `args` are all its arguments
                pipe.execute_command(name, *args)
                continue
            # execute_command, not pipe.evalsha: redis-py's cluster pipeline blocks the
            # evalsha method, yet routes a queued EVALSHA by its KEYS (one slot per call),
            # groups the calls per node, and hands back a NOSCRIPT reply per call.
            command = ("EVAL", script.script) if source else ("EVALSHA", script.sha)
            pipe.execute_command(*command, len(keys), *keys, *args)
        wait = self.wait_replicas > 0 and any(name == "XADD" for name, _k, _a in calls)
        if wait:
            # WAIT counts the replicas that have every write this connection made. On a
            # cluster, `target_nodes` keeps it on the node (and connection) of the writes.
            target = {} if node is None else {"target_nodes": node}
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms, **target)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        if wait:
            confirmed = replies.pop()
            if isinstance(confirmed, Exception):
                raise confirmed
            if int(confirmed) < self.wait_replicas:
                raise StoreUnavailable(
                    f"{confirmed} of {self.wait_replicas} replica(s) confirmed the write "
                    f"within {self.wait_timeout_ms} ms (GATEWAY_REDIS_WAIT_REPLICAS)"
                )
        return replies

    @asynccontextmanager
    async def guard(self) -> AsyncIterator[None]:
        """Turn any Redis failure into StoreUnavailable, which callers answer with 503:
        Redis away, a cluster failing over or resharding, a node that cannot write now.
        To a client each is a transient outage (its retry is safe), never our bug."""
        try:
            yield
        except redis_errors.MovedError as exc:
            if not isinstance(self.client, RedisCluster):
                raise StoreUnavailable(
                    f"Redis answered MOVED {exc}: it is a cluster; set GATEWAY_REDIS_CLUSTER=1"
                ) from exc
            raise StoreUnavailable(f"Redis unavailable: {exc} (MovedError)") from exc
        except (redis_errors.RedisError, redis_errors.RedisClusterException, OSError) as exc:
            # RedisClusterException: the cluster client found no node to ask.
            if _refused_for_good(exc):
                # Still a 503 to the client, but no outage: someone must look.
                log.error("Redis refused a command: %s (%s)", exc, type(exc).__name__)
            raise StoreUnavailable(f"Redis unavailable: {exc} ({type(exc).__name__})") from exc


# Errors that a Redis answers while it is away, failing over, loading or reconfiguring:
# they pass by themselves. Any other error reply (OOM, WRONGTYPE, a script that fails)
# does not, and is logged as an error.
_PASSING = (
    redis_errors.ClusterDownError,  # MasterDownError too
    redis_errors.TryAgainError,
    redis_errors.AskError,  # MovedError too
    redis_errors.ReadOnlyError,
    redis_errors.NoScriptError,
)
_PASSING_PREFIXES = ("LOADING", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN", "NOREPLICAS")


def _refused_for_good(exc: Exception) -> bool:
    """An error reply that will not pass by itself: a bug, a full Redis, a foreign key."""
    return (
        isinstance(exc, redis_errors.ResponseError)
        and not isinstance(exc, _PASSING)
        and not str(exc).startswith(_PASSING_PREFIXES)
    )


def connect(url: str, *, cluster: bool = False, timeout: float = 5.0) -> RedisClient:
    """A Redis client with bounded timeouts; commands fail fast while Redis is away."""
    if cluster:
        return RedisCluster.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    # A blocking pool makes a burst of requests wait for a connection instead of
    # failing with MaxConnectionsError, which would look like an outage.
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=64,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )
    # from_pool, not Redis(connection_pool=...): a client given a pool leaves it open on
    # aclose(), leaking every connection; from_pool makes aclose() close the pool too.
    return aioredis.Redis.from_pool(pool)


def text(value: Any) -> str:
    """A Redis reply (bytes) or a number as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
