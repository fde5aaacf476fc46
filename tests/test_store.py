"""`gateway.store.Store` against a real redis-server, no HTTP.

Every call gets an explicit `now`, so windows and leases are exact and nothing
sleeps. Times start at a whole second near the real clock: a sent key expires
with PEXPIREAT, which Redis measures against its own clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from gateway.errors import StoreUnavailable
from gateway.events import Event, Source
from gateway.store import BATCH_CALL_MAX, HISTORY_MIN_PER_SHARD, Claim, Store, connect
from tests.conftest import PIXEL, PIXEL2, free_port

MERGE = 10.0
DEDUP = 100.0
LEASE = 30.0

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


def entry(**fields: Any) -> bytes:
    return orjson.dumps(fields)


@pytest.fixture
def t0() -> float:
    """A whole second near the real clock: exact in milliseconds, and sane for PEXPIREAT."""
    return float(int(time.time()))


@pytest_asyncio.fixture
async def make_store(redis_client: aioredis.Redis) -> AsyncIterator[StoreFactory]:
    def make(**overrides: Any) -> Store:
        options: dict[str, Any] = {
            "shards": 4,
            "merge_window": MERGE,
            "dedup_window": DEDUP,
            "early_flush": True,
            "legacy_aliases": True,
        }
        options.update(overrides)
        return Store(redis_client, **options)

    yield make


@pytest.fixture
def store(make_store: StoreFactory) -> Store:
    return make_store()


async def statuses(store: Store, events: list[Event], now: float) -> list[str]:
    return [r.status for r in await store.ingest(events, now)]


async def key_exists(client: aioredis.Redis, store: Store, member: str) -> dict[str, bool]:
    hk, ck, _due = store.keys_of(member)
    return {name: bool(await client.exists(key)) for name, key in (("k", hk), ("c", ck))}


async def claim_pair(store: Store, t0: float, event_id: str = "o-1") -> Claim:
    """A complete pixel+server pair ingested at t0 and claimed at once."""
    await store.ingest([event(event_id, "pixel"), event(event_id, "server")], t0)
    [claim] = await store.claim(t0, 100, LEASE)
    return claim


# -- ingest: new, merged, complete, and when the key falls due ----------------------


async def test_first_copy_is_new(store: Store, t0: float) -> None:
    [result] = await store.ingest([event()], t0)
    assert result.status == "new"
    assert result.first_seen == t0


@pytest.mark.parametrize(
    ("early_flush", "second", "status", "due_at_once"),
    [
        (True, "server", "complete", True),
        (False, "server", "merged", False),
        (True, "pixel", "merged", False),
        (False, "pixel", "merged", False),
    ],
)
async def test_second_copy(
    make_store: StoreFactory,
    t0: float,
    early_flush: bool,
    second: Source,
    status: str,
    due_at_once: bool,
) -> None:
    store = make_store(early_flush=early_flush)
    assert await statuses(store, [event(source="pixel")], t0) == ["new"]
    [result] = await store.ingest([event(source=second)], t0 + 1)
    assert result.status == status
    assert result.first_seen == t0  # the first copy's time, not this one's

    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["due"] == (t0 + 1 if due_at_once else t0 + MERGE)
    if due_at_once:
        [claim] = await store.claim(t0 + 1, 100, LEASE)
        assert len(claim.copies) == 2
    else:
        assert await store.claim(t0 + 1, 100, LEASE) == []
        assert await store.claim(t0 + MERGE - 0.001, 100, LEASE) == []
        [claim] = await store.claim(t0 + MERGE, 100, LEASE)
        assert len(claim.copies) == 2


async def test_copy_after_complete_still_merges_until_claimed(store: Store, t0: float) -> None:
    await store.ingest([event(source="pixel"), event(source="server")], t0)
    [result] = await store.ingest([event(source="pixel")], t0 + 0.5)
    assert result.status in ("merged", "complete")
    [claim] = await store.claim(t0 + 0.5, 100, LEASE)
    assert [c["source"] for c in claim.copies] == ["pixel", "server", "pixel"]


async def test_lone_copy_falls_due_at_window_end_not_before(store: Store, t0: float) -> None:
    await store.ingest([event(source="server")], t0)
    assert await store.claim(t0 + MERGE - 0.001, 100, LEASE) == []
    [claim] = await store.claim(t0 + MERGE, 100, LEASE)
    assert claim.sources == frozenset({"server"})


async def test_keys_are_per_pixel_event_id_and_name(store: Store, t0: float) -> None:
    events = [
        event("o-1"),
        event("o-2"),
        event("o-1", name="AddToCart"),
        event("o-1", pixel=PIXEL2),
        event("o-1", "server"),
    ]
    assert await statuses(store, events, t0) == ["new", "new", "new", "new", "complete"]


# -- claim, lease, ack -----------------------------------------------------------------


async def test_claim_returns_every_copy_in_arrival_order(
    make_store: StoreFactory, t0: float
) -> None:
    store = make_store(early_flush=False)
    copies = [
        Event(PIXEL, "pixel", {"event": "Purchase", "event_id": "o-1", "event_time": 1, "a": 1}),
        Event(
            PIXEL,
            "server",
            {"event": "Purchase", "event_id": "o-1", "event_time": 2, "b": 2},
            test_event_code="TEST123",
            event_source="web",
        ),
        Event(PIXEL, "pixel", {"event": "Purchase", "event_id": "o-1", "event_time": 3, "c": 3}),
    ]
    for i, copy in enumerate(copies):
        await store.ingest([copy], t0 + i)

    [claim] = await store.claim(t0 + MERGE, 100, LEASE)
    member = store.member(copies[0])
    assert claim.member == member == f"{PIXEL}:Purchase:o-1"
    assert claim.shard == store.shard_of(member)
    assert claim.token
    assert claim.first_seen == t0
    assert claim.sources == frozenset({"pixel", "server"})
    assert claim.attempts == 1
    assert claim.dedup is True
    assert [c["source"] for c in claim.copies] == ["pixel", "server", "pixel"]
    assert [c["body"] for c in claim.copies] == [c.body for c in copies]
    assert [c["received_ms"] for c in claim.copies] == [int(t0 + i) * 1000 for i in range(3)]
    assert claim.copies[1]["test_event_code"] == "TEST123"
    assert claim.copies[0]["test_event_code"] is None
    assert all(c["pixel_code"] == PIXEL and c["event_source"] == "web" for c in claim.copies)

    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "claimed"
    assert info["attempts"] == 1


async def test_lease_then_reclaim_and_ack_by_token(store: Store, t0: float) -> None:
    first = await claim_pair(store, t0)

    assert await store.claim(t0, 100, LEASE) == []
    assert await store.claim(t0 + LEASE - 0.001, 100, LEASE) == []

    [second] = await store.claim(t0 + LEASE, 100, LEASE)
    assert second.member == first.member
    assert second.attempts == 2
    assert second.token != first.token
    assert len(second.copies) == 2

    assert await store.ack([first], t0 + LEASE + 1, "req-old") == 0
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "claimed"

    assert await store.ack([second], t0 + LEASE + 1, "req-1") == 1
    assert await store.ack([second], t0 + LEASE + 2, "req-2") == 0
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "sent"
    assert info["tiktok_request_id"] == "req-1"
    assert info["forwarded_at"] == t0 + LEASE + 1
    assert await store.counts() == (0, 0)


async def test_claim_limit_is_per_shard(store: Store, t0: float) -> None:
    events = [event(None) for _ in range(40)]
    await store.ingest(events, t0)
    first = await store.claim(t0, 2, LEASE)
    per_shard: dict[int, int] = {}
    for c in first:
        per_shard[c.shard] = per_shard.get(c.shard, 0) + 1
    assert all(n <= 2 for n in per_shard.values())
    rest = await store.claim(t0, 100, LEASE)
    assert len(first) + len(rest) == 40
    assert {c.member for c in first}.isdisjoint(c.member for c in rest)


async def test_ack_in_one_call_over_several_shards_and_tokens(store: Store, t0: float) -> None:
    await store.ingest([event(None) for _ in range(20)], t0)
    a = await store.claim(t0, 3, LEASE)
    b = await store.claim(t0, 100, LEASE)
    assert len({c.shard for c in a + b}) > 1
    assert await store.ack(a + b, t0 + 1, "req") == 20
    assert await store.counts() == (0, 0)


# -- after the forward: duplicates, expiry, forgetting -------------------------------------


async def test_copy_after_ack_is_duplicate_until_expiry(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    await store.ingest([event(source="pixel"), event(source="server")], t0, [b"{}", b"{}"])
    [claim] = await store.claim(t0, 100, LEASE)
    hk, ck, due = store.keys_of(claim.member)
    assert await redis_client.pttl(hk) == -1  # no TTL while pending
    assert await store.ack([claim], t0 + 1, "req-1") == 1

    # Only the fingerprint remains, with the second at which the key is forgotten.
    assert await redis_client.exists(hk, ck) == 0
    assert await redis_client.zscore(due, claim.member) is None
    expected_ms = (t0 + DEDUP) * 1000 - time.time() * 1000
    [remembered] = await redis_client.keys(f"{store.prefix(claim.shard)}r:*")
    fp, _bucket = store.fingerprint(claim.member)
    assert await redis_client.hgetall(remembered) == {fp: str(int(t0 + DEDUP)).encode()}
    assert await redis_client.keys(f"{store.prefix(claim.shard)}t:*") == []  # no timeline list

    # After the forward, dropped copies are counted in the history.
    results = await store.ingest(
        [event(source="pixel"), event(source="server")], t0 + 50, [b"{}", b"{}"]
    )
    assert [r.status for r in results] == ["duplicate", "duplicate"]
    assert all(r.first_seen == t0 for r in results)
    assert await store.claim(t0 + 1000, 100, LEASE) == []

    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["duplicates_dropped"] == 2
    assert info["copies_received"] == 2
    assert info["copies_pending"] == 0
    assert info["due"] is None
    assert info["forgotten_in"] is not None
    assert abs(info["forgotten_in"] - expected_ms / 1000) < 5


async def test_ack_past_dedup_window_forgets_key_at_once(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    claim = await claim_pair(store, t0)
    assert await store.ack([claim], t0 + DEDUP, "req-late") == 1
    assert await key_exists(redis_client, store, claim.member) == {
        "k": False,
        "c": False,
    }
    assert await store.inspect(PIXEL, "o-1", "Purchase") is None

    [result] = await store.ingest([event()], t0 + DEDUP + 1)
    assert result.status == "new"
    assert result.first_seen == t0 + DEDUP + 1


async def test_key_is_new_again_once_expired(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    claim = await claim_pair(store, t0)
    await store.ack([claim], t0 + 1, "req")
    [remembered] = await redis_client.keys(f"{store.prefix(claim.shard)}r:*")
    assert [r.status for r in await store.ingest([event()], t0 + DEDUP - 1)] == ["duplicate"]
    # A lookup ignores a fingerprint past its second; the sweep then removes it.
    assert [r.status for r in await store.ingest([event()], t0 + DEDUP)] == ["new"]
    assert await store.sweep(t0 + DEDUP, claim.shard, range(store.dedup_buckets)) == 1
    assert not await redis_client.exists(remembered)


# -- events without event_id ---------------------------------------------------------------


@pytest.mark.parametrize("missing_id", [None, ""])
async def test_events_without_event_id_are_never_merged(
    store: Store, redis_client: aioredis.Redis, t0: float, missing_id: str | None
) -> None:
    events = [event(missing_id, "pixel"), event(missing_id, "server"), event(missing_id, "pixel")]
    assert await statuses(store, events, t0) == ["new", "new", "new"]

    claims = await store.claim(t0, 100, LEASE)
    assert len(claims) == 3
    assert len({c.member for c in claims}) == 3
    assert all(c.dedup is False and len(c.copies) == 1 for c in claims)
    assert all(c.member.startswith(f"{PIXEL}:Purchase:~") for c in claims)

    assert await store.ack(claims, t0 + 1, "req", entry(outcome="forwarded")) == 3
    for c in claims:
        assert await key_exists(redis_client, store, c.member) == {
            "k": False,
            "c": False,
        }
    assert await store.counts() == (0, 0)
    # Nobody can look such a key up: it costs the history nothing.
    assert sum([await redis_client.xlen(store.history_key(s)) for s in range(store.shards)]) == 0


# -- legacy aliases ------------------------------------------------------------------------


@pytest.mark.parametrize(("old", "new"), [("CompletePayment", "Purchase"), ("SubmitForm", "Lead")])
async def test_legacy_alias_shares_key(
    make_store: StoreFactory, t0: float, old: str, new: str
) -> None:
    store = make_store(legacy_aliases=True)
    results = await store.ingest(
        [event(name=old, source="pixel"), event(name=new, source="server")], t0
    )
    assert [r.status for r in results] == ["new", "complete"]
    [claim] = await store.claim(t0, 100, LEASE)
    assert claim.member == f"{PIXEL}:{new}:o-1"
    assert [c["body"]["event"] for c in claim.copies] == [old, new]
    # Either name finds the key.
    assert await store.inspect(PIXEL, "o-1", old) is not None
    assert await store.inspect(PIXEL, "o-1", new) is not None


async def test_legacy_aliases_off_keeps_names_apart(make_store: StoreFactory, t0: float) -> None:
    store = make_store(legacy_aliases=False)
    results = await store.ingest(
        [event(name="CompletePayment", source="pixel"), event(name="Purchase", source="server")], t0
    )
    assert [r.status for r in results] == ["new", "new"]
    assert await store.claim(t0, 100, LEASE) == []
    claims = await store.claim(t0 + MERGE, 100, LEASE)
    assert sorted(c.member for c in claims) == [
        f"{PIXEL}:CompletePayment:o-1",
        f"{PIXEL}:Purchase:o-1",
    ]


# -- release (retry later) -----------------------------------------------------------------


async def test_release_waits_for_retry_at(store: Store, t0: float) -> None:
    claim = await claim_pair(store, t0)
    retry_at = t0 + 20
    assert await store.release([claim], retry_at, entry(outcome="retry")) == 1

    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "retry"
    assert info["due"] == retry_at
    assert info["timeline"][-1] == {"outcome": "retry"}

    [dup] = await store.ingest([event(source="server")], t0 + 5)
    assert dup.status == "duplicate"

    assert await store.claim(t0 + 5, 100, LEASE) == []
    assert await store.claim(retry_at - 0.001, 100, LEASE) == []
    [again] = await store.claim(retry_at, 100, LEASE)
    assert again.member == claim.member
    assert again.attempts == 2
    assert again.token != claim.token
    assert [c["source"] for c in again.copies] == ["pixel", "server"]  # the duplicate is not kept

    # The old claim can neither release nor ack the new one.
    assert await store.release([claim], retry_at + 100) == 0
    assert await store.ack([claim], retry_at + 1, "req") == 0
    assert await store.ack([again], retry_at + 1, "req") == 1


# -- dead letters and replay ---------------------------------------------------------------


def letter_of(claim: Claim, now: float) -> dict[str, Any]:
    """A dead letter shaped as the forwarder writes it."""
    return {
        "reason": "rejected",
        "code": 40002,
        "message": "bad field",
        "pixel_code": PIXEL,
        "event_source": "web",
        "test_event_code": None,
        "first_seen": claim.first_seen,
        "dead_lettered_at": now,
        "attempts": claim.attempts,
        "dedup": claim.dedup,
        "event": {**claim.copies[0]["body"], "merged": True},
    }


async def test_dead_letter_and_replay(store: Store, t0: float) -> None:
    claim = await claim_pair(store, t0)
    letter = letter_of(claim, t0 + 1)
    dead_id = await store.dead_letter(claim, letter, t0 + 1, entry(outcome="dead_lettered"))
    assert isinstance(dead_id, str) and dead_id

    [dl] = await store.dead_letters()
    assert (dl.id, dl.shard, dl.member, dl.letter) == (dead_id, claim.shard, claim.member, letter)
    assert await store.counts() == (0, 1)

    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "dead"
    assert info["copies_pending"] == 0
    assert info["forgotten_in"] is not None
    assert info["timeline"][-1] == {"attempts": 1, "outcome": "dead_lettered"}

    assert await statuses(store, [event(source="pixel")], t0 + 2) == ["duplicate"]
    assert await store.claim(t0 + 1000, 100, LEASE) == []
    # The claim is gone: neither ack nor a second dead letter applies.
    assert await store.ack([claim], t0 + 3, "req") == 0
    assert await store.dead_letter(claim, letter, t0 + 3) is None

    assert await store.replay([dl], t0 + 10) == 1
    assert await store.replay([dl], t0 + 10) == 0
    assert await store.dead_letters() == []
    assert await store.counts() == (1, 0)

    [again] = await store.claim(t0 + 10, 100, LEASE)
    assert again.member == claim.member
    assert again.first_seen == t0
    assert again.attempts == 1
    assert again.dedup is True
    [copy] = again.copies
    assert copy["source"] == "replay"
    assert copy["body"] == letter["event"]
    assert copy["pixel_code"] == PIXEL
    assert copy["received_ms"] == int((t0 + 10) * 1000)

    assert await store.ack([again], t0 + 11, "req-replay") == 1
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "sent"
    assert await statuses(store, [event(source="server")], t0 + 12) == ["duplicate"]


async def test_replay_of_event_without_id(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    await store.ingest([event(None)], t0)
    [claim] = await store.claim(t0, 100, LEASE)
    assert await store.dead_letter(claim, letter_of(claim, t0), t0) is not None
    [dl] = await store.dead_letters()
    assert await store.replay([dl], t0 + 1) == 1
    [again] = await store.claim(t0 + 1, 100, LEASE)
    assert again.dedup is False
    assert await store.ack([again], t0 + 2, "req") == 1
    assert (await key_exists(redis_client, store, claim.member))["k"] is False


async def test_dead_letter_with_lost_claim_returns_none(store: Store, t0: float) -> None:
    old = await claim_pair(store, t0)
    [new] = await store.claim(t0 + LEASE, 100, LEASE)
    assert await store.dead_letter(old, letter_of(old, t0 + LEASE), t0 + LEASE) is None
    assert await store.dead_letters() == []
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "claimed"
    assert await store.dead_letter(new, letter_of(new, t0 + LEASE), t0 + LEASE) is not None


async def test_dead_letters_over_shards(store: Store, t0: float) -> None:
    await store.ingest([event(None) for _ in range(30)], t0)
    claims = await store.claim(t0, 100, LEASE)
    for claim in claims:
        assert await store.dead_letter(claim, letter_of(claim, t0), t0) is not None
    letters = await store.dead_letters()
    assert sorted(dl.member for dl in letters) == sorted(c.member for c in claims)
    assert {dl.shard for dl in letters} == set(range(4))
    assert all(dl.shard == store.shard_of(dl.member) for dl in letters)
    assert await store.counts() == (0, 30)
    assert await store.replay(letters, t0 + 1) == 30
    assert await store.counts() == (30, 0)


# -- reading: counts and inspect -------------------------------------------------------


async def test_counts_over_shards(store: Store, t0: float) -> None:
    assert await store.counts() == (0, 0)
    events = [event(f"o-{i}") for i in range(40)]
    await store.ingest(events, t0)
    assert {store.shard_of(store.member(e)) for e in events} == set(range(4))
    assert await store.counts() == (40, 0)
    claims = await store.claim(t0 + MERGE, 100, LEASE)
    assert await store.counts() == (40, 0)  # claimed events still wait to be acknowledged
    await store.ack(claims[:15], t0 + MERGE, "req")
    assert await store.counts() == (25, 0)


async def test_inspect_fields_and_timeline(make_store: StoreFactory, t0: float) -> None:
    store = make_store(early_flush=False)
    assert await store.inspect(PIXEL, "o-1", "Purchase") is None

    await store.ingest([event(source="pixel")], t0, [entry(at=t0, source="pixel")])
    await store.ingest([event(source="server")], t0 + 1, [entry(at=t0 + 1, source="server")])
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
            {"outcome": "new", "at": t0, "source": "pixel"},
            {"outcome": "merged", "at": t0 + 1, "source": "server"},
        ],
        "history": {"kept_entries": 100_000, "from_first_copy": True},
    }

    [claim] = await store.claim(t0 + MERGE, 100, LEASE)
    await store.ack([claim], t0 + MERGE, "req-9", entry(outcome="forwarded", at=t0 + MERGE))
    await store.ingest([event(source="pixel")], t0 + 20, [entry(at=t0 + 20, source="pixel")])
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["state"] == "sent"
    assert info["attempts"] == 1
    assert info["copies_pending"] == 0
    assert info["forwarded_at"] == t0 + MERGE
    assert info["tiktok_request_id"] == "req-9"
    assert info["duplicates_dropped"] == 1
    assert [e["outcome"] for e in info["timeline"]] == ["new", "merged", "forwarded", "duplicate"]


async def test_timeline_complete_outcome_and_empty_entry(store: Store, t0: float) -> None:
    await store.ingest([event(source="pixel"), event(source="server")], t0, [b"{}", entry(n=2)])
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["timeline"] == [{"outcome": "new"}, {"outcome": "complete", "n": 2}]


async def test_history_has_a_fixed_size_and_state_outlives_it(
    make_store: StoreFactory,
    redis_client: aioredis.Redis,
    t0: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("gateway.store.reading.HISTORY_READ_CHUNK", 7)  # a scan of many round trips
    # The smallest history: HISTORY_MIN_PER_SHARD entries in each of the 4 shards.
    store = make_store(history=1)
    assert store.history_cap == HISTORY_MIN_PER_SHARD
    assert store.history_budget == 4 * HISTORY_MIN_PER_SHARD
    await store.ingest([event("first")], t0, [entry(i=-1)])
    [claim] = await store.claim(t0 + MERGE, 100, LEASE)
    await store.ack([claim], t0 + MERGE, "req-1")
    info = await store.inspect(PIXEL, "first", "Purchase")
    assert info is not None
    assert [e["outcome"] for e in info["timeline"]] == ["new", "forwarded"]
    assert info["history"] == {"kept_entries": store.history_budget, "from_first_copy": True}

    # Ten times the shard's share of entries, for other keys of the shard of "first": the
    # stream stays at its cap, give or take the node of entries Redis trims by.
    shard = claim.shard
    ids = [f"o-{i}" for i in range(200)]
    others = [o for o in ids if store.shard_of(store.member_of(PIXEL, o, "Purchase")) == shard]
    count = 10 * HISTORY_MIN_PER_SHARD
    copies = [event(others[i % len(others)]) for i in range(count)]
    await store.ingest(copies, t0 + MERGE + 1, [entry(i=i) for i in range(count)])
    assert await redis_client.xlen(store.history_key(shard)) <= 2 * HISTORY_MIN_PER_SHARD

    # "first" has no entries left, but its state still answers, and says so.
    info = await store.inspect(PIXEL, "first", "Purchase")
    assert info is not None
    assert info["state"] == "sent"
    assert info["first_seen"] == t0  # from its fingerprint, not from the evicted entries
    assert info["timeline"] == []
    assert info["history"]["from_first_copy"] is False
    # A pending key whose first entries went: its newest entries, oldest first.
    last = len(others) - 1
    info = await store.inspect(PIXEL, others[last], "Purchase")
    assert info is not None
    assert info["copies_received"] == len(range(last, count, len(others)))
    assert info["history"]["from_first_copy"] is False
    kept = [e["i"] for e in info["timeline"]]
    assert kept and kept == list(range(last, count, len(others)))[-len(kept) :]


async def test_a_timeline_list_of_an_earlier_version_goes_with_its_key(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    """A Redis written by a version that kept a timeline list per key: the list does not
    disturb the new code, and is deleted when its key is forwarded or dead-lettered."""
    sent, dead = await claim_pair(store, t0, "old-1"), await claim_pair(store, t0, "old-2")
    lists = [f"{store.prefix(c.shard)}t:{c.member}" for c in (sent, dead)]
    for key in lists:
        await redis_client.rpush(key, orjson.dumps({"outcome": "new", "at": t0}))
    assert await store.ack([sent], t0 + 1, "req") == 1
    assert await store.dead_letter(dead, letter_of(dead, t0 + 1), t0 + 1) is not None
    assert await redis_client.exists(*lists) == 0
    info = await store.inspect(PIXEL, "old-1", "Purchase")
    assert info is not None and info["state"] == "sent"


async def test_history_off_records_nothing(
    make_store: StoreFactory, redis_client: aioredis.Redis, t0: float
) -> None:
    store = make_store(history=0)
    await store.ingest([event()], t0, [entry(at=t0)])
    [claim] = await store.claim(t0 + MERGE, 100, LEASE)
    await store.ack([claim], t0 + MERGE, "req", entry(outcome="forwarded"))
    info = await store.inspect(PIXEL, "o-1", "Purchase")
    assert info is not None
    assert info["timeline"] == []


# -- scripts reload after SCRIPT FLUSH -------------------------------------------------


async def test_scripts_reload_after_script_flush(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    await redis_client.script_flush()  # before the first call too: nothing loaded yet
    assert await statuses(store, [event(source="pixel")], t0) == ["new"]
    await redis_client.script_flush()
    assert await statuses(store, [event(source="server")], t0) == ["complete"]
    await redis_client.script_flush()
    [claim] = await store.claim(t0, 100, LEASE)
    await redis_client.script_flush()
    assert await store.release([claim], t0 + 1) == 1
    await redis_client.script_flush()
    [claim] = await store.claim(t0 + 1, 100, LEASE)
    await redis_client.script_flush()
    assert await store.dead_letter(claim, letter_of(claim, t0 + 1), t0 + 1) is not None
    await redis_client.script_flush()
    assert await store.replay(await store.dead_letters(), t0 + 2) == 1
    [claim] = await store.claim(t0 + 2, 100, LEASE)
    await redis_client.script_flush()
    assert await store.ack([claim], t0 + 3, "req") == 1
    assert await statuses(store, [event()], t0 + 4) == ["duplicate"]


async def test_load_scripts_after_flush(store: Store, redis_client: aioredis.Redis) -> None:
    await redis_client.script_flush()
    await store.load_scripts()
    shas = [s.sha for s in store.runner.scripts.values()]
    assert await redis_client.script_exists(*shas) == [True] * len(shas)


async def test_script_flush_mid_batch_keeps_order(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    await store.ingest([event("warm")], t0)  # scripts loaded
    await redis_client.script_flush()
    events = [event("o-1", "pixel"), event("o-2"), event("o-1", "server"), event("o-1", "pixel")]
    assert await statuses(store, events, t0) == ["new", "new", "complete", "complete"]


# -- many events in one call -----------------------------------------------------------


async def test_many_events_in_one_pipeline(
    store: Store, t0: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Ten keys already forwarded: their copies in the batch are duplicates.
    await store.ingest([event(f"done-{i}", s) for i in range(10) for s in ("pixel", "server")], t0)
    assert await store.ack(await store.claim(t0, 100, LEASE), t0, "req") == 10

    events: list[Event] = []
    expected: list[str] = []
    for i in range(500):
        if i < 250:
            events.append(event(f"o-{i}", "pixel"))
            expected.append("new")
        elif i < 450:
            source: Source = "server" if i % 2 else "pixel"
            events.append(event(f"o-{i - 250}", source))
            expected.append("complete" if source == "server" else "merged")
        elif i < 480:
            events.append(event(f"done-{i % 10}", "server"))
            expected.append("duplicate")
        else:
            events.append(event(None, "server"))
            expected.append("new")

    calls = 0
    original = store.runner._pipeline

    async def counting(batch: Any) -> list[Any]:
        nonlocal calls
        calls += 1
        return await original(batch)

    monkeypatch.setattr(store.runner, "_pipeline", counting)
    results = await store.ingest(events, t0 + 1)
    assert calls == 1
    assert [r.status for r in results] == expected
    assert {store.shard_of(store.member(e)) for e in events if e.event_id} == set(range(4))
    assert await store.counts() == (250 + 20, 0)

    claims = await store.claim(t0 + 1, 1000, LEASE)
    completed = {f"{PIXEL}:Purchase:o-{i - 250}" for i in range(250, 450) if i % 2}
    with_id = {c.member for c in claims if c.dedup}
    assert with_id == completed
    assert sum(not c.dedup for c in claims) == 20
    later = await store.claim(t0 + 1 + MERGE, 1000, LEASE)
    assert len(later) == 250 - len(completed)


async def script_calls(redis_client: aioredis.Redis) -> int:
    stats = await redis_client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_concurrent_ingests_share_one_script_call(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    await store.ingest([event("warm")], t0)  # scripts loaded
    before = await script_calls(redis_client)
    pairs = [[event(f"c-{i}", "pixel"), event(f"c-{i}", "server")] for i in range(40)]
    results = await asyncio.gather(*(store.ingest(pair, t0) for pair in pairs))
    assert [[r.status for r in rs] for rs in results] == [["new", "complete"]] * 40
    # 80 copies of 40 requests: one call, or two when the first left before the rest queued.
    assert await script_calls(redis_client) - before <= 2


async def test_a_large_batch_is_cut_into_bounded_script_calls(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    await store.ingest([event("warm")], t0)
    before = await script_calls(redis_client)
    count = 2 * BATCH_CALL_MAX + 1
    results = await store.ingest([event(f"b-{i}") for i in range(count)], t0)
    assert [r.status for r in results] == ["new"] * count
    # Redis runs nothing else while a script runs: no call holds it for a whole batch.
    assert await script_calls(redis_client) - before == 3


async def test_a_claim_takes_one_script_call_per_shard(
    store: Store, redis_client: aioredis.Redis, t0: float
) -> None:
    await store.ingest([event(f"s-{i}") for i in range(40)], t0)
    before = await script_calls(redis_client)
    assert len(await store.claim(t0 + MERGE, 1000, LEASE)) == 40
    # A shard's claim may take a whole batch: Redis serves others between shards.
    assert await script_calls(redis_client) - before == store.shards


# -- two gateways at once ------------------------------------------------------------------


async def test_concurrent_claims_take_each_event_once(
    store: Store, redis_url: str, t0: float
) -> None:
    other_client = aioredis.Redis.from_url(redis_url)
    try:
        other = Store(other_client, shards=4, merge_window=MERGE, dedup_window=DEDUP)
        events = [event(None) for _ in range(150)] + [
            event(f"o-{i}", s) for i in range(50) for s in ("pixel", "server")
        ]
        await store.ingest(events, t0)

        a, b = await asyncio.gather(store.claim(t0, 1000, LEASE), other.claim(t0, 1000, LEASE))
        members_a = [c.member for c in a]
        members_b = [c.member for c in b]
        assert len(members_a) + len(members_b) == 200
        assert set(members_a).isdisjoint(members_b)

        async def drain(s: Store) -> list[str]:
            taken: list[str] = []
            while batch := await s.claim(t0 + LEASE, 3, LEASE):
                taken += [c.member for c in batch]
            return taken

        x, y = await asyncio.gather(drain(store), drain(other))
        assert len(x) + len(y) == 200
        assert set(x).isdisjoint(y)
        assert set(x) | set(y) == set(members_a) | set(members_b)
    finally:
        await other_client.aclose()


# -- Redis away --------------------------------------------------------------------------


async def test_redis_unreachable_raises_store_unavailable() -> None:
    client = connect(f"redis://127.0.0.1:{free_port()}", timeout=0.5)
    try:
        store = Store(client, shards=4)
        with pytest.raises(StoreUnavailable):
            await store.ingest([event()], time.time())
        with pytest.raises(StoreUnavailable):
            await store.claim(time.time(), 10, LEASE)
        with pytest.raises(StoreUnavailable):
            await store.counts()
        with pytest.raises(StoreUnavailable):
            await store.inspect(PIXEL, "o-1", "Purchase")
        with pytest.raises(StoreUnavailable):
            await store.ping()
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
        with pytest.raises(StoreUnavailable, match="OOM"):
            await store.ingest([event("oom-1")], now=time.time())
    finally:
        await redis_client.config_set("maxmemory", "0")
    assert await redis_client.keys("tkgw:*") == []
    [said] = [r for r in caplog.records if r.name == "gateway.store" and r.levelname == "ERROR"]
    assert "OOM" in said.getMessage()


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
