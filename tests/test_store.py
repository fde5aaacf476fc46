"""`gateway.store.Store` and `gateway.window.ShardWindow` against a real redis-server, no HTTP.

Ingest appends copies to the shards' logs; an `Owner` below does by hand what the
forwarder does in its loop (own shards, read, absorb, take due, record outcomes,
commit), each step at an explicit `now`, so windows are exact and nothing sleeps.
Times start at a whole second near the real clock: leases expire by Redis's clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from gateway.errors import LayoutMismatch, StoreUnavailable
from gateway.events import Event, Source
from gateway.records import DeadLetter, DeadRecord, ForwardRecord, RetryRecord
from gateway.store import BATCH_CALL_MAX, HISTORY_MIN_PER_SHARD, LAYOUT_KEY, Store, connect
from gateway.window import RESEND_GUARD_MS, PendingKey, ShardWindow
from tests.support import PIXEL, PIXEL2, free_port

MERGE = 10.0
DEDUP = 100.0

StoreFactory = Callable[..., Store]


def event(
    event_id: str | None = "o-1",
    source: Source = "pixel",
    name: str = "Purchase",
    *,
    pixel: str = PIXEL,
    **fields: Any,
) -> Event:
    body: dict[str, Any] = {"event": name, "event_time": 1700000000, "user": {"ttp": "x"}}
    if event_id is not None:
        body["event_id"] = event_id
    body.update(fields)
    return Event(pixel_code=pixel, source=source, body=body)


def ms(seconds: float) -> int:
    return int(seconds * 1000)


def ids_in_shard(store: Store, shard: int, count: int, prefix: str = "o") -> list[str]:
    """`count` event ids whose Purchase key of PIXEL lives in `shard`."""
    found = []
    i = 0
    while len(found) < count:
        if store.shard_of(store.member_of(PIXEL, f"{prefix}-{i}", "Purchase")) == shard:
            found.append(f"{prefix}-{i}")
        i += 1
    return found


class Owner:
    """One instance owning shards, driven step by step as the forwarder's loop would."""

    def __init__(self, store: Store, token: str = "owner-a") -> None:
        self.store = store
        self.token = token
        self.windows: dict[int, ShardWindow] = {}

    async def own(self, shards: Iterable[int] | None = None) -> list[int]:
        """Take the free shards among `shards` (all by default) and start their windows."""
        wanted = range(self.store.shards) if shards is None else shards
        taken = await self.store.acquire(wanted, self.token)
        for shard in taken:
            await self.store.import_legacy(shard, self.token)
            counted, retries = await self.store.take_over(shard)
            window = ShardWindow(
                shard=shard, keys=self.store, merge_window_ms=self.store.merge_window_ms,
                dedup_window_ms=self.store.dedup_window_ms, early_flush=self.store.early_flush,
                history=self.store.keeps_history, counted_id=counted,
            )  # fmt: skip
            window.load_retries(retries)
            self.windows[shard] = window
        return taken

    async def read(self, now: float) -> list[str]:
        """Read every owned log and absorb what is new: the outcomes counted, in order."""
        found = await self.store.read({s: w.read_id for s, w in self.windows.items()})
        entries = {}
        for shard, reply in found.items():
            assert not isinstance(reply, Exception), reply
            if reply:
                entries[shard] = reply
        unknown = {s: self.windows[s].unknown(e) for s, e in entries.items()}
        remembered = await self.store.remembered(unknown)
        outcomes = []
        for shard, shard_entries in entries.items():
            absorbed = self.windows[shard].absorb(shard_entries, remembered, ms(now))
            outcomes += [a.outcome for a in absorbed]
        return outcomes

    def due(self, now: float, limit: int = 1000) -> list[PendingKey]:
        return [k for w in self.windows.values() for k in w.take_due(ms(now), limit)]

    def window_of(self, key: PendingKey) -> ShardWindow:
        return self.windows[self.store.shard_of(key.member)]

    async def commit(self) -> dict[int, list[str] | None]:
        taken = (w.take_commit(0, force=True) for w in self.windows.values())
        commits = [c for c in taken if c is not None]
        return await self.store.commit(self.token, commits)

    async def deliver(self, keys: list[PendingKey], now: float, request_id: str = "req") -> None:
        for key in keys:
            record = ForwardRecord(key.member, now, request_id, 0, "b-1", len(keys), key.attempts)
            self.window_of(key).delivered(key, ms(now), record)
        replies = await self.commit()
        assert None not in replies.values()

    async def dead(self, keys: list[PendingKey], now: float) -> list[str]:
        for key in keys:
            record = DeadRecord(key.member, now, "rejected", 40002, "bad field", key.attempts)
            self.window_of(key).dead(key, letter_of(key, now), ms(now), record)
        replies = await self.commit()
        return [i for ids in replies.values() if ids is not None for i in ids]


def letter_of(key: PendingKey, now: float) -> DeadLetter:
    """A dead letter as the forwarder writes it."""
    return DeadLetter(
        reason="rejected", code=40002, message="bad field", pixel_code=PIXEL,
        event_source="web", test_event_code=None, first_seen=key.first_seen_ms / 1000,
        dead_lettered_at=now, attempts=key.attempts, dedup=key.dedup,
        event={**key.copies[0].body, "merged": True},
    )  # fmt: skip


@pytest.fixture
def t0() -> float:
    """A whole second near the real clock: exact in milliseconds."""
    return float(int(time.time()))


@pytest.fixture
def make_store(redis_client: aioredis.Redis) -> StoreFactory:
    def make(**overrides: Any) -> Store:
        options: dict[str, Any] = {"shards": 4, "merge_window": MERGE, "dedup_window": DEDUP}
        options.update(overrides)
        return Store(redis_client, **options)

    return make


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store()


@pytest.fixture
def owner(store: Store) -> Owner:
    return Owner(store)


async def logged(store: Store) -> list[tuple[str, bytes]]:
    """Every (member, copy) in the shards' logs, in log order per shard."""
    found = await store.read(dict.fromkeys(range(store.shards), "0-0"))
    copies = []
    for entries in found.values():
        assert not isinstance(entries, Exception), entries
        copies += [pair for entry in entries for pair in entry.copies]
    return copies


async def log_lengths(client: aioredis.Redis, store: Store) -> list[int]:
    return [await client.xlen(store.log_key(s)) for s in range(store.shards)]


async def command_calls(client: aioredis.Redis, command: str) -> int:
    stats = await client.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# -- ingest: the log ---------------------------------------------------------------------


async def test_ingest_appends_one_entry_per_call_and_shard(
    store: Store, owner: Owner, redis_client: aioredis.Redis, t0: float
) -> None:
    events = [event(f"o-{i}") for i in range(40)] + [event(None, "server")]
    assert await store.ingest(events, t0) is None  # it says nothing of what a copy is
    assert {store.shard_of(store.member(e)) for e in events} == set(range(4))
    assert await log_lengths(redis_client, store) == [1, 1, 1, 1]

    await owner.own()
    copies = {m: orjson.loads(c) for m, c in await logged(store)}
    assert len(copies) == 41
    copy = copies[f"{PIXEL}:Purchase:o-7"]
    assert copy == {
        "source": "pixel", "pixel_code": PIXEL, "event_source": "web", "test_event_code": None,
        "received_ms": ms(t0), "body": events[7].body,
    }  # fmt: skip
    [no_id] = [c for m, c in copies.items() if m.startswith(f"{PIXEL}:Purchase:~")]
    assert no_id["nd"] == 1


async def test_a_log_entry_naming_one_member_twice_keeps_both_copies(
    store: Store, owner: Owner, redis_client: aioredis.Redis, t0: float
) -> None:
    await store.ingest([event(source="pixel", a=1), event(source="pixel", b=2)], t0)
    await owner.own()
    assert [m for m, _c in await logged(store)] == [f"{PIXEL}:Purchase:o-1"] * 2
    assert sum(await log_lengths(redis_client, store)) == 1
    assert await owner.read(t0) == ["new", "merged"]
    [key] = owner.due(t0 + MERGE)
    assert [(c.body.get("a"), c.body.get("b")) for c in key.copies] == [(1, None), (None, 2)]


async def test_concurrent_ingests_share_one_xadd_per_shard(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    await store.ingest([event("warm")], t0)
    before = await command_calls(redis_client, "xadd")
    pairs = [[event(f"c-{i}", "pixel"), event(f"c-{i}", "server")] for i in range(40)]
    await asyncio.gather(*(store.ingest(pair, t0) for pair in pairs))
    # 80 copies of 40 requests: one XADD a shard, or two when the first request went alone.
    assert await command_calls(redis_client, "xadd") - before <= 2 * store.shards
    assert len(await logged(store)) == 80 + 1
    assert sum(await log_lengths(redis_client, store)) <= 1 + 2 * store.shards


async def test_a_large_ingest_is_cut_into_bounded_xadds_in_one_round_trip(
    store: Store, redis_client: aioredis.Redis, t0: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    count = 2 * BATCH_CALL_MAX + 1
    events = [event(i) for i in ids_in_shard(store, 0, count)]
    pipelines = 0
    original = store.runner._pipeline

    async def counting(*args: Any, **kwargs: Any) -> list[Any]:
        nonlocal pipelines
        pipelines += 1
        return await original(*args, **kwargs)

    monkeypatch.setattr(store.runner, "_pipeline", counting)
    before = await command_calls(redis_client, "xadd")
    await store.ingest(events, t0)
    assert pipelines == 1
    # Redis runs nothing else during one command: no XADD holds it for a whole batch.
    assert await command_calls(redis_client, "xadd") - before == 3
    assert await redis_client.xlen(store.log_key(0)) == 3


# -- the window: new, merged, complete, and when a key falls due ---------------------------


@pytest.mark.parametrize(
    ("early_flush", "second", "outcome", "due_at_once"),
    [
        (True, "server", "complete", True),
        (False, "server", "merged", False),
        (True, "pixel", "merged", False),
    ],
)
async def test_second_copy(
    make_store: StoreFactory,
    t0: float,
    early_flush: bool,
    second: Source,
    outcome: str,
    due_at_once: bool,
) -> None:
    store = make_store(early_flush=early_flush)
    owner = Owner(store)
    await owner.own()
    await store.ingest([event(source="pixel")], t0)
    assert await owner.read(t0) == ["new"]
    await store.ingest([event(source=second)], t0 + 1)
    assert await owner.read(t0 + 1) == [outcome]
    if due_at_once:
        [key] = owner.due(t0 + 1)
    else:
        assert owner.due(t0 + MERGE - 0.001) == []
        [key] = owner.due(t0 + MERGE)
    assert key.first_seen_ms == ms(t0)  # the first copy's time, not the second's
    assert len(key.copies) == 2


async def test_copies_merge_in_arrival_order(make_store: StoreFactory, t0: float) -> None:
    store = make_store(early_flush=False)
    owner = Owner(store)
    await owner.own()
    copies = [
        Event(PIXEL, "pixel", {"event": "Purchase", "event_id": "o-1", "event_time": 1, "a": 1}),
        Event(PIXEL, "server", {"event": "Purchase", "event_id": "o-1", "event_time": 2, "b": 2},
              test_event_code="TEST123"),
        Event(PIXEL, "pixel", {"event": "Purchase", "event_id": "o-1", "event_time": 3, "c": 3}),
    ]  # fmt: skip
    for i, copy in enumerate(copies):
        await store.ingest([copy], t0 + i)
    assert await owner.read(t0 + 2) == ["new", "merged", "merged"]

    [key] = owner.due(t0 + MERGE)
    assert key.member == store.member(copies[0]) == f"{PIXEL}:Purchase:o-1"
    assert key.source_set == frozenset({"pixel", "server"})
    assert (key.attempts, key.dedup, key.copies_received) == (1, True, 3)
    assert [c.body for c in key.copies] == [c.body for c in copies]
    assert [c.received_ms for c in key.copies] == [ms(t0 + i) for i in range(3)]
    assert [c.test_event_code for c in key.copies] == [None, "TEST123", None]


async def test_copy_after_complete_merges_until_taken_then_is_a_duplicate(
    store: Store, owner: Owner, t0: float
) -> None:
    await owner.own()
    await store.ingest([event(source="pixel"), event(source="server")], t0)
    await store.ingest([event(source="pixel")], t0 + 0.5)
    assert await owner.read(t0 + 0.5) == ["new", "complete", "merged"]
    [key] = owner.due(t0 + 0.5)
    assert [c.source for c in key.copies] == ["pixel", "server", "pixel"]
    await store.ingest([event(source="server")], t0 + 0.6)
    assert await owner.read(t0 + 0.6) == ["duplicate"]  # while being sent
    assert len(key.copies) == 3


@pytest.mark.parametrize(
    ("aliases", "outcomes"),
    [(True, ["new", "new", "new", "new", "complete", "complete"]),
     (False, ["new", "new", "new", "new", "complete", "new"])],
)  # fmt: skip
async def test_keys_are_per_pixel_event_id_and_dedup_name(
    make_store: StoreFactory, t0: float, aliases: bool, outcomes: list[str]
) -> None:
    store = make_store(legacy_aliases=aliases)
    owner = Owner(store)
    await owner.own()
    await store.ingest(
        [
            event("o-1"),
            event("o-2"),
            event("o-1", name="AddToCart"),
            event("o-1", pixel=PIXEL2),
            event("o-1", "server"),
            event("o-2", "server", name="CompletePayment"),  # Purchase's legacy name
        ],
        t0,
    )
    # Read in log order: outcomes per shard. Compare as multisets of (member, outcome).
    assert sorted(await owner.read(t0)) == sorted(outcomes)


async def test_events_without_event_id_are_never_merged_nor_kept_in_the_history(
    store: Store, owner: Owner, redis_client: aioredis.Redis, t0: float
) -> None:
    await owner.own()
    await store.ingest([event(None, "pixel"), event(None, "server"), event(None, "pixel")], t0)
    assert await owner.read(t0) == ["new"] * 3
    keys = owner.due(t0)  # due at once: nothing to wait for
    assert len({k.member for k in keys}) == 3
    assert all(not k.dedup and len(k.copies) == 1 for k in keys)
    assert all(k.member.startswith(f"{PIXEL}:Purchase:~") for k in keys)
    await owner.deliver(keys, t0 + 1)
    assert await store.counts() == (0, 0)
    assert await log_lengths(redis_client, store) == [0] * 4
    # Nobody can look such a key up: it costs the history nothing. It is remembered only
    # long enough that a new owner reading an untrimmed log would not send it again.
    assert sum([await redis_client.llen(store.history_key(s)) for s in range(4)]) == 0
    fp, bucket = store.fingerprint(keys[0].member)
    shard = store.shard_of(keys[0].member)
    until = await redis_client.hget(store.remembered_key(shard, bucket), fp)  # type: ignore[arg-type]
    assert int(until) == -(-(ms(t0 + 1 + MERGE) + RESEND_GUARD_MS) // 1000)


# -- after the forward: remembered, duplicates, forgetting, sweep --------------------------


async def test_copy_after_delivery_is_a_duplicate_until_the_dedup_window_ends(
    store: Store, owner: Owner, redis_client: aioredis.Redis, t0: float
) -> None:
    await owner.own()
    await store.ingest([event(source="pixel"), event(source="server")], t0)
    assert await owner.read(t0) == ["new", "complete"]
    [key] = owner.due(t0)
    await owner.deliver([key], t0 + 1)

    # Only the fingerprint remains, with the second at which the key is forgotten.
    shard = store.shard_of(key.member)
    fp, _bucket = store.fingerprint(key.member)
    [remembered] = await redis_client.keys(f"{store.prefix(shard)}r:*")
    assert await redis_client.hgetall(remembered) == {fp: str(int(t0 + DEDUP)).encode()}
    assert await redis_client.hlen(store.retry_key(shard)) == 0
    assert await store.remembered({shard: [key.member]}) == {key.member: int(t0 + DEDUP)}

    await store.ingest([event(source="pixel"), event(source="server")], t0 + 50)
    assert await owner.read(t0 + 50) == ["duplicate", "duplicate"]
    await store.ingest([event(source="server")], t0 + DEDUP - 1)
    assert await owner.read(t0 + DEDUP - 1) == ["duplicate"]
    assert owner.due(t0 + 1000) == []
    await owner.commit()
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert (info["state"], info["duplicates_dropped"], info["copies_received"]) == ("sent", 3, 2)

    # A lookup ignores a fingerprint past its second; the sweep then removes it.
    await store.ingest([event()], t0 + DEDUP)
    assert await owner.read(t0 + DEDUP) == ["new"]
    assert await store.sweep(t0 + DEDUP - 1, shard, range(store.dedup_buckets)) == 0
    assert await store.sweep(t0 + DEDUP, shard, range(store.dedup_buckets)) == 1
    assert not await redis_client.exists(remembered)


# -- commits: fenced by the lease, trimming the log ----------------------------------------


async def test_once_everything_is_resolved_the_logs_are_empty(
    store: Store, owner: Owner, redis_client: aioredis.Redis, t0: float
) -> None:
    await owner.own()
    await store.ingest([event(f"o-{i}", s) for i in range(40) for s in ("pixel", "server")], t0)
    await store.ingest([event(f"lone-{i}") for i in range(20)], t0 + 1)
    assert (await store.counts())[0] >= 1  # copies not yet read count as pending
    outcomes = await owner.read(t0 + 1)
    assert outcomes.count("complete") == 40 and outcomes.count("new") == 60
    await owner.deliver(owner.due(t0 + 1), t0 + 1)
    # The lone keys are still open: their entries stay, the pairs' were trimmed before them.
    assert sum(await log_lengths(redis_client, store)) == 4
    assert await store.counts() == (20, 0)
    await owner.deliver(owner.due(t0 + 1 + MERGE), t0 + 1 + MERGE)
    assert await log_lengths(redis_client, store) == [0] * 4
    assert await store.counts() == (0, 0)
    for shard in range(4):
        meta = await redis_client.hgetall(store.meta_key(shard))
        assert (meta[b"pending"], meta[b"due"]) == (b"0", b"0")
        assert meta[b"seen"] == owner.windows[shard].read_id.encode()


async def test_the_log_is_trimmed_up_to_the_oldest_open_key(
    store: Store, owner: Owner, redis_client: aioredis.Redis, t0: float
) -> None:
    first, second = ids_in_shard(store, 1, 2)
    await owner.own()
    await store.ingest([event(first)], t0)
    await store.ingest([event(second)], t0 + 1)
    await store.ingest([event(first, "server")], t0 + 2)  # after `second`'s entry
    assert await owner.read(t0 + 2) == ["new", "new", "complete"]
    await owner.deliver(owner.due(t0 + 2), t0 + 2)
    # `second` is open: its entry and every later one stay, for a new owner to rebuild from.
    entries = await redis_client.xrange(store.log_key(1))
    assert [list(fields) for _id, fields in entries] == [
        [store.member_of(PIXEL, second, "Purchase").encode()],
        [store.member_of(PIXEL, first, "Purchase").encode()],
    ]


async def test_a_stale_owners_commit_writes_nothing(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    stale, fresh = Owner(store, "owner-a"), Owner(store, "owner-b")
    assert await stale.own() == [0, 1, 2, 3]
    assert await fresh.own() == []
    await store.ingest([event(source="pixel"), event(source="server")], t0)
    assert await stale.read(t0) == ["new", "complete"]
    [key] = stale.due(t0)
    shard = store.shard_of(key.member)

    await redis_client.delete(store.owner_key(shard))  # its lease ran out meanwhile
    assert await fresh.own() == [shard]
    assert await store.renew([shard], stale.token) == {shard: False}
    stale.window_of(key).delivered(
        key, ms(t0 + 1), ForwardRecord(key.member, t0 + 1, "req", 0, "b-1", 1, 1)
    )
    assert await stale.commit() == {shard: None}
    assert await redis_client.keys(f"{store.prefix(shard)}r:*") == []
    assert await redis_client.xlen(store.log_key(shard)) == 1
    assert not await redis_client.exists(store.meta_key(shard), store.history_key(shard))

    # The new owner finds the key where the log left it (TikTok's dedup absorbs a resend).
    assert await fresh.read(t0 + 1) == ["new", "complete"]
    [again] = fresh.due(t0 + 1)
    assert len(again.copies) == 2
    await fresh.deliver([again], t0 + 1)
    assert await redis_client.xlen(store.log_key(shard)) == 0


async def test_two_instances_own_disjoint_shards_and_let_go(store: Store) -> None:
    a, b = Owner(store, "owner-a"), Owner(store, "owner-b")
    taken_a, taken_b = await asyncio.gather(a.own(), b.own())
    assert sorted(taken_a + taken_b) == [0, 1, 2, 3]
    await store.let_go(taken_a, b.token)  # not b's: nothing happens
    assert await b.own(taken_a) == []
    await store.let_go(taken_a, a.token)
    assert await b.own(taken_a) == taken_a


async def test_a_new_owner_rebuilds_the_window_without_counting_copies_again(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    first = Owner(store, "owner-a")
    await first.own()
    await store.ingest([event(source="pixel")], t0)
    await store.ingest([event(source="pixel")], t0 + 1)
    assert await first.read(t0 + 1) == ["new", "merged"]
    await first.commit()
    shard = store.shard_of(store.member_of(PIXEL, "o-1", "Purchase"))
    counted = first.windows[shard].read_id

    await redis_client.delete(store.owner_key(shard))  # the first owner died
    await store.ingest([event(source="server")], t0 + 2)
    second = Owner(store, "owner-b")
    assert await second.own() == [shard]
    assert second.windows[shard].counted_id == counted
    # The copies counted before rebuild the window silently; the new one is counted.
    assert await second.read(t0 + 2) == ["complete"]
    [key] = second.due(t0 + 2)
    assert [c.received_ms for c in key.copies] == [ms(t0), ms(t0 + 1), ms(t0 + 2)]
    assert key.first_seen_ms == ms(t0)
    await second.deliver([key], t0 + 2)
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    outcomes = [e["outcome"] for e in info["timeline"]]
    assert outcomes == ["new", "merged", "complete", "forwarded"]


async def test_a_key_waiting_for_a_retry_lives_in_the_retry_hash_not_the_log(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    first = Owner(store, "owner-a")
    await first.own()
    await store.ingest([event(source="pixel"), event(source="server")], t0)
    await first.read(t0)
    [key] = first.due(t0)
    shard = store.shard_of(key.member)
    retry_at = t0 + 20
    record = RetryRecord(key.member, t0, 50000, 200, "busy", retry_at - t0, "b-1", 1)
    first.window_of(key).retry(key, ms(retry_at), record)
    await first.commit()
    assert await redis_client.xlen(store.log_key(shard)) == 0  # it does not pin the log
    assert await redis_client.hkeys(store.retry_key(shard)) == [key.member.encode()]
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert (info["state"], info["due"], info["attempts"]) == ("retry", retry_at, 1)
    assert await store.counts() == (1, 0)

    await store.ingest([event(source="server")], t0 + 5)
    assert await first.read(t0 + 5) == ["duplicate"]
    await first.commit()

    await redis_client.delete(store.owner_key(shard))  # the owner died; another takes over
    second = Owner(store, "owner-b")
    await second.own()
    assert await second.read(t0 + 5) == []
    assert second.due(retry_at - 0.001) == []
    [again] = second.due(retry_at)
    assert again.member == key.member
    assert again.attempts == 2
    assert [c.source for c in again.copies] == ["pixel", "server"]  # not the duplicate
    await second.deliver([again], retry_at)
    assert await redis_client.hlen(store.retry_key(shard)) == 0
    assert await store.counts() == (0, 0)


# -- dead letters and replay ---------------------------------------------------------------


async def test_dead_letter_is_remembered_negative_and_replaying_twice_sends_once(
    store: Store, owner: Owner, redis_client: aioredis.Redis, t0: float
) -> None:
    await owner.own()
    await store.ingest([event(source="pixel"), event(source="server")], t0)
    await owner.read(t0)
    [key] = owner.due(t0)
    [dead_id] = await owner.dead([key], t0 + 1)

    [dl] = await store.dead_letters()
    assert (dl.id, dl.shard, dl.member) == (dead_id, store.shard_of(key.member), key.member)
    assert dl.letter == letter_of(key, t0 + 1)
    assert await store.counts() == (0, 1)
    assert await store.remembered({dl.shard: [key.member]}) == {key.member: -int(t0 + DEDUP)}
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "dead"
    assert info["timeline"][-1] == {
        "outcome": "dead_lettered", "at": t0 + 1, "reason": "rejected", "code": 40002,
        "message": "bad field", "attempts": 1,
    }  # fmt: skip

    await store.ingest([event(source="pixel")], t0 + 2)
    assert await owner.read(t0 + 2) == ["duplicate"]  # dropped until a replay

    assert await store.replay([dl], t0 + 10) == 1
    assert await store.replay([dl], t0 + 10) == 0
    assert await store.dead_letters() == []
    assert await owner.read(t0 + 10) == ["replayed"]  # sent again, though remembered
    [again] = owner.due(t0 + 10)
    assert again.member == key.member
    assert (again.first_seen_ms, again.attempts, again.dedup) == (ms(t0), 1, True)
    [copy] = again.copies
    assert copy.source == "replay"
    assert copy.body == dl.letter.event
    assert copy.received_ms == ms(t0 + 10)
    await owner.deliver([again], t0 + 11, "req-replay")
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert (info["state"], info["tiktok_request_id"]) == ("sent", "req-replay")
    await store.ingest([event(source="server")], t0 + 12)
    assert await owner.read(t0 + 12) == ["duplicate"]


async def test_dead_letters_over_shards_and_replay_without_event_id(
    store: Store, owner: Owner, redis_client: aioredis.Redis, t0: float
) -> None:
    await owner.own()
    await store.ingest([event(None) for _ in range(30)], t0)
    await owner.read(t0)
    keys = owner.due(t0)
    assert len(await owner.dead(keys, t0)) == 30
    letters = await store.dead_letters()
    assert sorted(dl.member for dl in letters) == sorted(k.member for k in keys)
    assert {dl.shard for dl in letters} == set(range(4))
    assert all(dl.shard == store.shard_of(dl.member) for dl in letters)
    assert await store.counts() == (0, 30)
    assert await store.replay(letters, t0 + 1) == 30
    assert await owner.read(t0 + 1) == ["replayed"] * 30
    again = owner.due(t0 + 1)
    assert all(not k.dedup for k in again)
    await owner.deliver(again, t0 + 2)
    assert await store.counts() == (0, 0)
    assert await log_lengths(redis_client, store) == [0] * 4


# -- the history: /debug and inspect --------------------------------------------------------


async def test_inspect_fields_and_timeline(make_store: StoreFactory, t0: float) -> None:
    store = make_store(early_flush=False)
    owner = Owner(store)
    await owner.own()
    assert await store.inspect(PIXEL, "o-1", "Purchase") is None
    await store.ingest([event(source="pixel")], t0)
    await store.ingest([event(source="server")], t0 + 1)
    await owner.read(t0 + 1)
    assert await store.inspect(PIXEL, "o-1", "Purchase") is None  # not until committed
    await owner.commit()
    fields = ["event", "event_id", "event_time", "user.ttp"]  # in history.FIELD_TABLE order
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info == {
        "key": {"pixel_code": PIXEL, "event_id": "o-1", "event": "Purchase"},
        "state": "open",
        "sources": ["pixel", "server"],
        "first_seen": t0,
        "due": t0 + MERGE,
        "forwarded_at": None,
        "tiktok_request_id": None,
        "copies_received": 2,
        "copies_pending": 2,
        "attempts": 0,
        "duplicates_dropped": 0,
        "forgotten_in": None,
        "timeline": [
            {"outcome": "new", "at": t0, "source": "pixel", "fields": fields, "due": t0 + MERGE},
            {
                "outcome": "merged",
                "at": t0 + 1,
                "source": "server",
                "fields": fields,
                "due": t0 + MERGE,
            },
        ],
        "history": {"kept_entries": store.history_budget, "from_first_copy": True},
    }

    await owner.deliver(owner.due(t0 + MERGE), t0 + MERGE, "req-9")
    await store.ingest([event(source="pixel")], t0 + 20)
    await owner.read(t0 + 20)
    await owner.commit()
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "sent"
    assert (info["attempts"], info["copies_pending"], info["duplicates_dropped"]) == (1, 0, 1)
    assert (info["forwarded_at"], info["tiktok_request_id"]) == (t0 + MERGE, "req-9")
    assert info["first_seen"] == t0
    assert [e["outcome"] for e in info["timeline"]] == ["new", "merged", "forwarded", "duplicate"]


async def test_the_history_is_capped_per_shard_and_state_outlives_it(
    make_store: StoreFactory,
    redis_client: aioredis.Redis,
    t0: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.store.reading.HISTORY_READ_CHUNK", 3)  # a scan of round trips
    store = make_store(history=1)  # the smallest: HISTORY_MIN_PER_SHARD records a shard
    assert store.history_cap == HISTORY_MIN_PER_SHARD
    assert store.history_budget == 4 * HISTORY_MIN_PER_SHARD
    owner = Owner(store)
    await owner.own()
    first, *others = ids_in_shard(store, 2, 6)
    await store.ingest([event(first)], t0)
    await owner.read(t0)
    await owner.deliver(owner.due(t0 + MERGE), t0 + MERGE)
    info = await store.inspect(PIXEL, first, "Purchase")
    assert info is not None
    assert [e["outcome"] for e in info["timeline"]] == ["new", "forwarded"]
    assert info["history"] == {"kept_entries": store.history_budget, "from_first_copy": True}

    # Ten times the shard's share of records, for other keys of the same shard (LTRIM).
    count = 10 * HISTORY_MIN_PER_SHARD
    for i in range(count):
        await store.ingest([event(others[i % len(others)])], t0 + MERGE + 1 + i / 1000)
    await owner.read(t0 + MERGE + 2)
    await owner.commit()
    assert await redis_client.llen(store.history_key(2)) == HISTORY_MIN_PER_SHARD

    # `first` has no records left, but its state still answers, and says so.
    info = await store.inspect(PIXEL, first, "Purchase")
    assert info is not None
    assert info["state"] == "sent"
    assert info["first_seen"] == t0  # from its fingerprint
    assert info["timeline"] == []
    assert info["history"]["from_first_copy"] is False
    # An open key whose first records went: its newest records, oldest first.
    last = others[-1]
    info = await store.inspect(PIXEL, last, "Purchase")
    assert info is not None
    assert info["state"] == "open"
    assert info["history"]["from_first_copy"] is False
    ats = [e["at"] for e in info["timeline"]]
    expected = [t0 + MERGE + 1 + i / 1000 for i in range(count) if others[i % 5] == last]
    assert ats and ats == pytest.approx(expected[-len(ats) :])


async def test_history_off_records_nothing(
    make_store: StoreFactory, redis_client: aioredis.Redis, t0: float
) -> None:
    store = make_store(history=0)
    owner = Owner(store)
    await owner.own()
    await store.ingest([event()], t0)
    await owner.read(t0)
    await owner.deliver(owner.due(t0 + MERGE), t0 + MERGE)
    assert await redis_client.keys("tkgw:*:hist") == []
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert (info["state"], info["timeline"]) == ("sent", [])


# -- the previous design's keys: layout and pending keys -------------------------------------


async def test_layout_is_recorded_and_other_shards_or_buckets_refused(
    make_store: StoreFactory, redis_client: aioredis.Redis
) -> None:
    await make_store().check_layout(record=False)  # compares only: records nothing
    assert await redis_client.get(LAYOUT_KEY) is None
    await make_store().check_layout()
    assert await redis_client.get(LAYOUT_KEY) == b"shards=4 dedup_buckets=1024 store=log"
    with pytest.raises(LayoutMismatch, match="shards=4 dedup_buckets=1024 store=log"):
        await make_store(shards=8).check_layout()
    with pytest.raises(LayoutMismatch):
        await make_store(dedup_buckets=4096).check_layout(record=False)
    assert await redis_client.get(LAYOUT_KEY) == b"shards=4 dedup_buckets=1024 store=log"


async def test_the_previous_layout_is_upgraded_but_not_to_other_shards(
    make_store: StoreFactory, redis_client: aioredis.Redis
) -> None:
    await redis_client.set(LAYOUT_KEY, "shards=4 dedup_buckets=1024")
    await make_store().check_layout(record=False)  # an admin command decides nothing
    assert await redis_client.get(LAYOUT_KEY) == b"shards=4 dedup_buckets=1024"
    with pytest.raises(LayoutMismatch):
        await make_store(shards=8).check_layout()
    assert await redis_client.get(LAYOUT_KEY) == b"shards=4 dedup_buckets=1024"
    await make_store().check_layout()
    assert await redis_client.get(LAYOUT_KEY) == b"shards=4 dedup_buckets=1024 store=log"


async def legacy_key(
    client: aioredis.Redis, store: Store, member: str, copies: list[bytes], **state: Any
) -> int:
    """Write a pending key as the previous design kept it: hash, copies list, timeline list,
    due queue; returns its shard."""
    shard = store.shard_of(member)
    p = store.prefix(shard)
    hk, ck, tk = f"{p}k:{member}", f"{p}c:{member}", f"{p}t:{member}"  # as IMPORT_LEGACY reads
    fields = {"st": "open", "src": 1, "t0": 0, "due": 0, "n": len(copies), "att": 0, "nd": 0,
              "dup": 0, **state}  # fmt: skip
    await client.hset(hk, mapping=fields)
    await client.rpush(ck, *copies)
    await client.rpush(tk, b'{"outcome":"new"}')
    await client.zadd(f"{store.prefix(shard)}due", {member: fields["due"]})
    await client.xadd(f"{store.prefix(shard)}h", {"m": member, "e": b"{}"})
    return shard


def legacy_copy(source: str, received: float, body: dict[str, Any]) -> bytes:
    """A copy as the previous design wrote it (the same JSON as today's, less the marks)."""
    copy = {"source": source, "pixel_code": PIXEL, "event_source": "web",
            "test_event_code": None, "received_ms": ms(received), "body": body}  # fmt: skip
    return orjson.dumps(copy)


async def test_import_legacy_moves_pending_keys_into_the_log_with_their_copies(
    store: Store, redis_client: aioredis.Redis, t0: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gateway.store.state.LEGACY_IMPORT_CHUNK", 1)  # a call per key
    big = 12345678901234567  # more digits than a Lua number keeps
    pair = [
        legacy_copy("pixel", t0 - 5, {"event": "Purchase", "event_id": "old-1", "value": big}),
        legacy_copy("server", t0 - 4, {"event": "Purchase", "event_id": "old-1", "x": "é"}),
    ]
    member = store.member_of(PIXEL, "old-1", "Purchase")
    shard = await legacy_key(redis_client, store, member, pair, t0=ms(t0 - 5), src=3)
    no_id = f"{PIXEL}:Purchase:~abc"
    lone = legacy_copy("server", t0 - 3, {"event": "Purchase"})
    await legacy_key(redis_client, store, no_id, [lone], nd=1)
    # A key remembered by the previous design: fingerprints kept their shape.
    remembered = store.member_of(PIXEL, "old-2", "Purchase")
    fp, bucket = store.fingerprint(remembered)
    await redis_client.hset(
        store.remembered_key(store.shard_of(remembered), bucket), fp, int(t0 + DEDUP)  # type: ignore[arg-type]
    )

    # Only the shard's owner imports.
    await store.import_legacy(shard, "not-the-owner")
    assert await redis_client.xlen(store.log_key(shard)) == 0
    owner = Owner(store)
    await owner.own()
    legacy = [k for s in range(4) for k in await redis_client.keys(f"{store.prefix(s)}*")
              if not k.endswith((b":log", b":owner")) and b":r:" not in k]  # fmt: skip
    assert legacy == []
    copies: dict[str, list[bytes]] = {}
    for m, c in await logged(store):
        copies.setdefault(m, []).append(c)
    assert copies[member] == pair  # byte for byte: no re-encoding
    assert copies[no_id] == [lone]  # unmarked: its body has no event_id

    assert sorted(await owner.read(t0)) == ["complete", "new", "new"]
    keys = {k.member: k for k in owner.due(t0)}
    assert keys[member].copies[0].body["value"] == big
    assert keys[member].source_set == frozenset({"pixel", "server"})
    assert not keys[no_id].dedup
    await owner.deliver(list(keys.values()), t0)
    await store.ingest([event("old-1"), event("old-2")], t0 + 1)
    assert await owner.read(t0 + 1) == ["duplicate", "duplicate"]


# -- scripts after SCRIPT FLUSH, the browser rate limit -----------------------------------------


async def test_every_script_runs_again_after_script_flush(
    store: Store, owner: Owner, redis_client: aioredis.Redis, t0: float
) -> None:
    await redis_client.script_flush()  # before the first call too: nothing loaded yet
    await store.ingest([event(f"o-{i}") for i in range(20)], t0)
    await owner.own()  # import_legacy
    await redis_client.script_flush()
    assert await store.renew(range(4), owner.token) == {s: True for s in range(4)}
    await owner.read(t0)
    keys = owner.due(t0 + MERGE)
    await redis_client.script_flush()
    assert len(await owner.dead(keys, t0 + MERGE)) == 20  # commits on every shard, one pipeline
    await redis_client.script_flush()
    assert await store.replay(await store.dead_letters(), t0 + MERGE) == 20
    await owner.read(t0 + MERGE)
    await redis_client.script_flush()
    await owner.deliver(owner.due(t0 + MERGE), t0 + MERGE)
    await redis_client.script_flush()
    assert await store.sweep(t0 + DEDUP, 0, range(store.dedup_buckets)) > 0
    await redis_client.script_flush()
    assert await store.rate_limit("198.51.100.7", t0, 1.0, 1) == 0
    await redis_client.script_flush()
    await store.let_go(range(4), owner.token)
    assert await redis_client.keys("tkgw:*:owner") == []


async def test_load_scripts_after_flush(store: Store, redis_client: aioredis.Redis) -> None:
    await redis_client.script_flush()
    await store.load_scripts()
    shas = [s.sha for s in store.runner.scripts.values()]
    assert await redis_client.script_exists(*shas) == [True] * len(shas)


async def test_concurrent_rate_limits_share_one_script_call(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    await store.rate_limit("warm", t0, 10.0, 2)  # the script is loaded
    before = await command_calls(redis_client, "evalsha")
    clients = [f"198.51.100.{i}" for i in range(20)]
    waits = await asyncio.gather(*(store.rate_limit(c, t0, 10.0, 2) for c in clients * 3))
    assert waits == [0.0] * 40 + [pytest.approx(0.1)] * 20  # a burst of 2 at 10 a second
    assert await command_calls(redis_client, "evalsha") - before <= 2


# -- Redis away or full ----------------------------------------------------------------------


async def test_redis_unreachable_raises_store_unavailable() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}", timeout=0.5)
    try:
        store = Store(client, shards=4)
        now = time.time()
        for call in (
            store.ingest([event()], now),
            store.acquire(range(4), "t"),
            store.read({0: "0-0"}),
            store.counts(),
            store.inspect(PIXEL, "o-1", "Purchase"),
            store.ping(),
        ):
            with pytest.raises(StoreUnavailable):
                await call
    finally:
        await client.aclose()


async def test_connect_client_closes_its_connections(
    redis_url: str, redis_client: aioredis.Redis
) -> None:
    before = len(await redis_client.client_list())
    client = connect(redis_url, timeout=1.0)
    await Store(client, shards=4).ping()
    assert len(await redis_client.client_list()) == before + 1
    await client.aclose()
    # Redis notices the closed socket a moment later: wait for it, boundedly.
    for _ in range(100):
        if len(await redis_client.client_list()) == before:
            break
        await asyncio.sleep(0.01)
    assert len(await redis_client.client_list()) == before


async def test_redis_out_of_memory_is_unavailable_not_a_crash(
    store: Store, redis_client: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    """With `noeviction` and maxmemory reached Redis refuses writes: answer 503, store nothing,
    and say so as an error: a full Redis does not pass by itself."""
    await redis_client.config_set("maxmemory-policy", "noeviction")
    await redis_client.config_set("maxmemory", "1")
    try:
        with pytest.raises(StoreUnavailable, match="maxmemory"):
            await store.ingest([event("oom-1")], now=time.time())
    finally:
        await redis_client.config_set("maxmemory", "0")
    assert await redis_client.keys("tkgw:*") == []
    [said] = [r for r in caplog.records if r.name == "gateway.store" and r.levelname == "ERROR"]
    assert "maxmemory" in said.getMessage()


async def test_a_redis_that_is_away_is_not_logged_as_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}", timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await Store(client, shards=4).ingest([event()], time.time())
    finally:
        await client.aclose()
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_a_dead_letter_replayed_before_the_upgrade_is_sent_after_it(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    """The previous design replayed a dead letter as a pending key with a "replay" copy,
    its fingerprint still remembered as dead: imported, it is sent, not dropped."""
    member = store.member_of(PIXEL, "old-dead", "Purchase")
    body = {"event": "Purchase", "event_id": "old-dead", "event_time": 1700000000}
    copy = legacy_copy("replay", t0 - 1, body)
    shard = await legacy_key(
        redis_client, store, member, [copy], st="retry", src=0, t0=ms(t0 - 60), due=ms(t0 - 1)
    )
    fp, bucket = store.fingerprint(member)
    await redis_client.hset(store.remembered_key(shard, bucket), fp, -int(t0 + DEDUP))  # type: ignore[arg-type]
    owner = Owner(store)
    await owner.own()
    assert await owner.read(t0) == ["replayed"]
    [key] = owner.due(t0)
    assert key.member == member
    assert key.copies[0].body == body
    await owner.deliver([key], t0)
    assert (await store.remembered({shard: [member]}))[member] > 0  # sent, no longer dead
