"""The gateway's state changes in Redis: ingest (append to a shard's log), the shard
leases, reading a log, looking up remembered keys, the owner's commit of a batch,
replay, sweep, rate limit and the layout check.

Who decides what a copy is (merged, duplicate) is the shard's owner (see
gateway/window.py); the store only moves bytes and keeps each step atomic. Key
shapes are in keys.py, the scripts in scripts.py, how they reach Redis in
runner.py, the reads for gauges and /debug in reading.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster

from ..errors import LayoutMismatch
from ..events import Event
from ..records import Copy, DeadLetter, HistoryRecord, RetryState
from ..settings import StoreSettings
from .keys import INSTANCES_KEY, LAYOUT_KEY, Keys
from .reading import Backlog, DeadLetterEntry, Reader
from .runner import BatchItem, RedisClient, Runner, log, text

# The store's options default to the settings' (GATEWAY_SHARDS, ...), declared there once.
DEFAULTS = StoreSettings()
LEGACY_IMPORT_CHUNK = 500  # pending keys of the previous design imported a script call


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of a shard's log: the copies one ingest call appended, (member, copy)."""

    id: str
    copies: list[tuple[str, bytes]]


@dataclass(slots=True)
class Commit:
    """What an owner records for one shard in one step (see scripts.COMMIT)."""

    shard: int
    seen: str = ""  # the last log entry counted ("" unchanged)
    trim: str = ""  # log entries before this id are resolved ("" none)
    pending: int = 0  # keys open in the window
    due_ms: int = 0  # the earliest due time, 0 when none
    remember: list[tuple[int, bytes, int]] = field(default_factory=list)  # bucket, fp, second
    retry_set: list[tuple[str, RetryState]] = field(default_factory=list)
    retry_del: list[str] = field(default_factory=list)
    dead: list[tuple[str, DeadLetter]] = field(default_factory=list)
    history: list[HistoryRecord] = field(default_factory=list)  # oldest first


class Store(Keys):
    """The gateway's state in Redis. A Store is its key layout (keys.Keys); it runs
    commands and scripts through a Runner and reads through a Reader."""

    def __init__(
        self,
        client: RedisClient,
        *,
        shards: int = DEFAULTS.shards,
        merge_window: float = DEFAULTS.merge_window,
        dedup_window: float = DEFAULTS.dedup_window,
        early_flush: bool = DEFAULTS.early_flush,
        legacy_aliases: bool = DEFAULTS.legacy_aliases,
        history: int = DEFAULTS.debug_history,
        dedup_buckets: int = DEFAULTS.dedup_buckets,
        wait_replicas: int = DEFAULTS.redis_wait_replicas,
        wait_timeout: float = DEFAULTS.redis_wait_timeout,
        lease: float = DEFAULTS.forward_lease,
    ) -> None:
        super().__init__(
            shards=shards, dedup_buckets=dedup_buckets, legacy_aliases=legacy_aliases,
            history=history,
        )  # fmt: skip
        self.client = client
        self.runner = Runner(client, wait_replicas=wait_replicas, wait_timeout=wait_timeout)
        self.reader = Reader(
            self, self.runner, int(merge_window * 1000), int(dedup_window * 1000)
        )
        self.merge_window_ms = int(merge_window * 1000)
        self.dedup_window_ms = int(dedup_window * 1000)
        self.early_flush = early_flush
        self.lease_ms = max(1, int(lease * 1000))
        self.cluster = isinstance(client, RedisCluster)
        # A log entry may name one member twice (two copies appended in one call);
        # redis-py would fold its fields into a dict and keep one. Read XREAD raw.
        client.set_response_callback("XREAD", _raw_reply)
        self._layout_checked = False

    # -- the request path ----------------------------------------------------------

    async def ingest(self, events: Sequence[Event], now: float) -> None:
        """Append copies to their shards' logs: durable (and on the replicas asked for)
        when this returns. One XADD a shard, shared with the requests ingesting at the
        same time; what each copy turns out to be is its shard owner's to decide."""
        now_ms = int(now * 1000)
        items = []
        for event in events:
            member = self.member(event)
            key = self.log_key(self.shard_of(member))
            items.append(
                BatchItem("XADD", key, (key, "*"), (member, Copy.event_json(event, now_ms)))
            )
        await self.runner.shared(items)

    async def rate_limit(self, client: str, now: float, rate: float, burst: int) -> float:
        """Count a request of `client` against `rate` a second with bursts of `burst`, shared
        by every instance; 0.0 when it may go ahead, else the seconds to wait. One round trip."""
        key = self.rate_counter_key(client)
        item = BatchItem("rate_limit", key, (1000.0 / rate, burst), (key, int(now * 1000)))
        [wait_ms] = await self.runner.shared([item])
        return int(wait_ms) / 1000

    # -- shard leases --------------------------------------------------------------

    async def heartbeat(self, instance: str, now: float) -> int:
        """Say this instance is alive for a lease; returns how many instances are."""
        now_ms = int(now * 1000)
        async with self.runner.guard():
            pipe = self.client.pipeline(transaction=False)
            pipe.zadd(INSTANCES_KEY, {instance: now_ms + self.lease_ms})
            pipe.zremrangebyscore(INSTANCES_KEY, "-inf", now_ms)
            pipe.zcard(INSTANCES_KEY)
            replies = await pipe.execute()
        return max(1, int(replies[-1]))

    async def leave(self, instance: str) -> None:
        """This instance stops: the others take its share at once."""
        async with self.runner.guard():
            await self.client.zrem(INSTANCES_KEY, instance)

    async def unowned(self, shards: Iterable[int], token: str) -> list[int]:
        """Those of `shards` no instance owns now, or `token` does (its window was let go);
        a shard whose node is away is left out."""
        asked = list(shards)
        calls = [("GET", (key,), (key,)) for key in map(self.owner_key, asked)]
        replies = await self.runner.run(calls, partial=True)
        return [
            s for s, r in zip(asked, replies, strict=True)
            if not isinstance(r, Exception) and (r is None or text(r) == token)
        ]  # fmt: skip

    async def acquire(self, shards: Iterable[int], token: str) -> list[int]:
        """Take the shards no one owns, or `token` does (see scripts.TAKE); returns those
        taken."""
        wanted = list(shards)
        calls = [("take", (self.owner_key(s),), (token, self.lease_ms)) for s in wanted]
        replies = await self.runner.run(calls, partial=True)
        return [s for s, r in zip(wanted, replies, strict=True) if r == 1]

    async def renew(self, shards: Iterable[int], token: str) -> dict[int, bool | Exception]:
        """Renew our leases: per shard whether it is still ours, or the error that stopped
        us asking (a node away: the lease may run out if that lasts)."""
        owned = list(shards)
        calls = [("renew", (self.owner_key(s),), (token, self.lease_ms)) for s in owned]
        replies = await self.runner.run(calls, partial=True)
        return {
            s: r if isinstance(r, Exception) else int(r) == 1
            for s, r in zip(owned, replies, strict=True)
        }

    async def let_go(self, shards: Iterable[int], token: str) -> None:
        """Give shards up, so another instance takes them without waiting for the lease."""
        calls = [("let_go", (self.owner_key(s),), (token,)) for s in shards]
        await self.runner.run(calls, partial=True)

    async def import_legacy(self, shard: int, token: str) -> None:
        """Move the previous design's pending keys of a shard into its log (see
        scripts.IMPORT_LEGACY); nothing to do, one cheap call, on a Redis without them."""
        while True:
            args = (self.prefix(shard), token, self.lease_ms, LEGACY_IMPORT_CHUNK)
            [left] = await self.runner.run([("import_legacy", (self.owner_key(shard),), args)])
            if int(left) <= 0:
                return

    # -- what an owner reads -------------------------------------------------------------

    async def take_over(self, shard: int) -> tuple[str, dict[str, RetryState]]:
        """What a new owner starts from: the last log entry its predecessor counted, and
        the keys waiting for a retry (member -> state)."""
        async with self.runner.guard():
            pipe = self.client.pipeline(transaction=False)
            pipe.hget(self.meta_key(shard), "seen")
            pipe.hgetall(self.retry_key(shard))
            seen, retry = await pipe.execute()
        return (
            text(seen) if seen else "0-0",
            {text(m): RetryState.from_json(state) for m, state in retry.items()},
        )

    async def read(
        self, after: dict[int, str], count: int = 200
    ) -> dict[int, list[LogEntry] | Exception]:
        """Log entries after the given ids, per shard; a shard whose read failed gets its
        error (a cluster node away), the others their entries."""
        if not after:
            return {}
        shards = list(after)
        if self.cluster:
            calls = [
                ("XREAD", (key,), ("COUNT", count, "STREAMS", key, after[s]))
                for s, key in zip(shards, map(self.log_key, shards), strict=True)
            ]
            replies = await self.runner.run(calls, partial=True)
            found: dict[int, list[LogEntry] | Exception] = {}
            for shard, reply in zip(shards, replies, strict=True):
                found[shard] = reply if isinstance(reply, Exception) else _entries(reply)
            return found
        # One Redis: one XREAD for every shard.
        keys = [self.log_key(s) for s in shards]
        async with self.runner.guard():
            reply = await self.client.execute_command(
                "XREAD", "COUNT", count, "STREAMS", *keys, *(after[s] for s in shards)
            )
        by_key = {text(k): v for k, v in _stream_pairs(reply)}
        return {s: _entries_of(by_key.get(key, [])) for s, key in zip(shards, keys, strict=True)}

    async def remembered(self, members: Mapping[int, Sequence[str]]) -> dict[str, int]:
        """The remembered keys among `members` (by shard): member -> the Unix second it is
        forgotten, negative when dead-lettered; one HMGET a bucket, in one pipeline."""
        lookups: dict[str, list[tuple[str, bytes]]] = {}
        for shard, shard_members in members.items():
            for member in shard_members:
                fp, bucket = self.fingerprint(member)
                lookups.setdefault(self.remembered_key(shard, bucket), []).append((member, fp))
        calls = [
            ("HMGET", (key,), [key, *(fp for _m, fp in pairs)]) for key, pairs in lookups.items()
        ]
        replies = await self.runner.run(calls)
        found = {}
        for pairs, values in zip(lookups.values(), replies, strict=True):
            for (member, _fp), value in zip(pairs, values, strict=True):
                if value is not None:
                    found[member] = int(value)
        return found

    async def commit(
        self, token: str, commits: Sequence[Commit]
    ) -> dict[int, list[str] | Exception | None]:
        """Record each shard's batch in one script call, all in one pipeline: per shard the
        ids of the dead letters added, None when the shard is no longer ours (nothing was
        written), or the error that stopped the call (a cluster node away: whether it was
        written is unknown). Raises only when every call failed."""
        calls = []
        for c in commits:
            args: list[Any] = [
                self.prefix(c.shard), token, self.history_slack, c.seen, c.trim, c.pending,
                c.due_ms, int(time.time() * 1000), self.history_cap,
                len(c.remember), len(c.retry_set), len(c.retry_del), len(c.dead),
                len(c.history),
            ]  # fmt: skip
            for bucket, fp, second in c.remember:
                args += (bucket, fp, second)
            for member, state in c.retry_set:
                args += (member, state.to_json())
            args += c.retry_del
            for member, letter in c.dead:
                args += (member, letter.to_json())
            args += (record.to_json() for record in c.history)
            calls.append(("commit", (self.owner_key(c.shard),), args))
        replies = await self.runner.run(calls, partial=True)
        out: dict[int, list[str] | Exception | None] = {}
        for c, reply in zip(commits, replies, strict=True):
            if isinstance(reply, Exception):
                out[c.shard] = reply
            else:
                out[c.shard] = None if reply == 0 else [text(x) for x in reply[1:]]
        return out

    # -- dead letters and house-keeping ------------------------------------------------

    async def replay(self, letters: Sequence[DeadLetterEntry], now: float) -> int:
        """Queue dead letters for sending again; returns how many were queued."""
        calls = []
        for dl in letters:
            copy = dl.letter.replay_copy(dl.id, int(now * 1000))
            keys = (self.dead_key(dl.shard), self.log_key(dl.shard))
            calls.append(("replay", keys, (dl.id, dl.member, copy.to_json())))
        return sum(int(r) for r in await self.runner.run(calls))

    async def sweep(self, now: float, shard: int, buckets: range) -> int:
        """Remove forgotten fingerprints from some buckets of a shard; returns how many."""
        calls = [
            ("sweep", (self.remembered_key(shard, bucket),), (int(now),)) for bucket in buckets
        ]
        return sum(int(r) for r in await self.runner.run(calls))

    async def check_layout(self, *, record: bool = True) -> None:
        """Compare our layout with the one recorded in Redis, LayoutMismatch if they differ;
        with `record`, ours is recorded when none is (a gateway's; an admin command only
        compares: run with the wrong settings, it must not decide for the gateways).

        The previous design's layout (same shards and buckets) is upgraded: a gateway
        records ours, and each shard's first owner imports that design's pending keys.
        Instances that disagree on shards or buckets each miss the keys of the others:
        copies of one event go unmerged, duplicates undropped, pending events unsent."""
        if self._layout_checked:
            return
        async with self.runner.guard():
            if record:
                await self.client.set(LAYOUT_KEY, self.layout, nx=True)
            recorded = await self.client.get(LAYOUT_KEY)
            if recorded is not None and text(recorded) == self.legacy_layout():
                if not record:
                    return
                log.warning(
                    "Redis holds the previous store layout (%s); upgrading to %s: pending "
                    "events move to the shard logs as each shard is owned",
                    text(recorded), self.layout,
                )
                await self.client.set(LAYOUT_KEY, self.layout)
                recorded = self.layout.encode()
        if recorded is None:
            return
        if text(recorded) != self.layout:
            raise LayoutMismatch(text(recorded), self.layout)
        self._layout_checked = True

    async def ping(self) -> None:
        async with self.runner.guard():
            await self.client.ping()  # type: ignore[misc]

    async def load_scripts(self) -> None:
        """Load every script; /readyz calls this so a flushed cache heals itself."""
        await self.runner.load_scripts()

    # -- reading (see reading.py) ------------------------------------------------

    async def dead_letters(self, count: int = 1000) -> list[DeadLetterEntry]:
        """Dead letters of every shard, oldest first within a shard."""
        return await self.reader.dead_letters(count)

    async def counts(self) -> tuple[int, int]:
        """(events waiting to be forwarded, dead letters), over all shards."""
        backlog = await self.reader.backlog(time.time())
        return backlog.pending, backlog.dead_letters

    async def backlog(self, now: float) -> Backlog:
        """Pending events, dead letters and forward lag, over all shards; one round trip."""
        return await self.reader.backlog(now)

    async def inspect(
        self, pixel_code: str, event_id: str, event_name: str
    ) -> dict[str, Any] | None:
        """A key's state and timeline, for /debug and `inspect`; None when unknown."""
        return await self.reader.inspect(pixel_code, event_id, event_name)


def until_second(ms: int) -> int:
    """A fingerprint's value: the whole second from which a key is forgotten."""
    return math.ceil(ms / 1000)


def _raw_reply(response: Any, **_options: Any) -> Any:
    return response


def _stream_pairs(reply: Any) -> list[tuple[Any, Any]]:
    """XREAD's raw reply as (stream, entries) pairs."""
    if not reply:
        return []
    if isinstance(reply, dict):  # RESP3
        return list(reply.items())
    return [(pair[0], pair[1]) for pair in reply]


def _entries(reply: Any) -> list[LogEntry]:
    pairs = _stream_pairs(reply)
    return _entries_of(pairs[0][1]) if pairs else []


def _entries_of(raw: Any) -> list[LogEntry]:
    entries = []
    for entry_id, fields in raw:
        copies = [(text(fields[i]), fields[i + 1]) for i in range(0, len(fields), 2)]
        entries.append(LogEntry(text(entry_id), copies))
    return entries
