"""Everything the gateway keeps in Redis: key names, Lua scripts, atomic state changes.

One event key is `(pixel, dedup name, event_id)`, written as the *member*
`PIXEL:NAME:EVENT_ID`. Each member belongs to one of `shards` hash slots,
`tkgw:{N}:`, chosen by CRC32; everything about a member and its shard's due
queue shares that hash tag, so every script touches one slot and works on a
Redis Cluster, and no global key becomes a hot spot.

Keys of shard N (the only place key shapes are written):

    tkgw:{N}:due          ZSET  member -> due time (ms). The forwarder's queue; a claim
                                moves the score to the lease's end, so an unacknowledged
                                claim simply becomes due again (no separate lease list).
    tkgw:{N}:k:<member>   HASH  a pending key's state (see INGEST); no TTL. Deleted when
                                the event leaves: from then on only its fingerprint remains.
    tkgw:{N}:c:<member>   LIST  the copies received (JSON), merged by the forwarder;
                                deleted when the event leaves.
    tkgw:{N}:r:<B>        HASH  remembered keys: 8-byte fingerprint -> Unix second at which
                                the key is forgotten (first copy + dedup window), negated
                                for a dead-lettered key. B is a bucket of the fingerprint.
                                Redis stores small hashes packed (ziplist/listpack), so a
                                remembered key costs about 20 bytes instead of a key of its
                                own (~190 bytes). Entries past their second are removed by
                                SWEEP; a lookup ignores them meanwhile.
    tkgw:{N}:h            STREAM the shard's debug history, what /debug and `inspect` show:
                                one entry per copy, retry, forward, dead letter, replay or
                                dropped duplicate, fields m (member) and e (the entry, JSON:
                                outcome, time, field names, never values). Capped (XADD
                                MAXLEN ~) at the history's share of this shard, so its
                                memory is a fixed budget whatever the traffic.
    tkgw:{N}:t:<member>   LIST  a key's timeline as versions before the history wrote it;
                                none is written now. Deleted when its key leaves, and each
                                expires by its own TTL once its key was forwarded.
    tkgw:{N}:dead         STREAM dead letters: the merged event, TikTok's code and message.

States of a pending key: open (merging) -> claimed (being sent) -> gone and
remembered, or retry (a send failed; waits for its next attempt). Only an
open key takes new copies; a copy of a key in any other state, or of a
remembered key, is a duplicate.

Fingerprints are 64 bits of BLAKE2b of the member, in a bucket chosen by 16
further bits: two keys collide, and the later is wrongly dropped, with
probability about (remembered keys in its bucket) / 2**64, i.e. below 1e-17
per event even at hundreds of events per bucket.

The browser endpoint's rate limit (see RATE_LIMIT), in the shard of the client address:

    tkgw:{N}:rl:<client>  STRING one client address's (an IPv6 /64's) theoretical arrival
                                time in ms (GCRA). Shared, so the limit holds across gateway
                                instances. Expires when its burst is whole again: an idle
                                client costs nothing.

Shared by every shard:

    tkgw:layout           STRING the shards and dedup buckets of the first instance to
                                start on this Redis. An instance with others refuses to
                                start: it would look for every key in the wrong place.

The busy scripts (INGEST, RATE_LIMIT, CLAIM, ACK, RELEASE) are *batched*: one call
takes many items (copies, requests, shards, members), each touching the keys of its
own shard. Items of one script and one slot share a call: on one Redis that is every
item, on a cluster one call per slot. Concurrent requests queue their items and go
to Redis together (`Store._shared`): one round trip and a few script calls for all.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import math
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import orjson
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from .errors import LayoutMismatch, StoreUnavailable
from .events import SOURCES, Event, Source, dedup_name

RedisClient = aioredis.Redis | RedisCluster
IngestStatus = Literal["new", "merged", "complete", "duplicate"]
ScriptCall = tuple[str, Sequence[str], Sequence[Any]]  # (script name, KEYS, ARGV)
log = logging.getLogger("gateway.store")
SOURCE_BITS: dict[Source, int] = {"pixel": 1, "server": 2}
BOTH_SOURCES = 3
SHARED_PIPELINE_MAX = 2000  # items in one shared pipeline; the rest go in the next
BATCH_CALL_MAX = 250  # items in one batched script call: Redis runs nothing else meanwhile
# ... except CLAIM, whose item is a whole shard: up to a forward batch (1,000 events) each.
# One shard a call, so that draining a backlog leaves Redis free for ingest between shards.
CALL_MAX_ITEMS = {"claim": 1}
LAYOUT_KEY = "tkgw:layout"
DEBUG_HISTORY = 100_000  # history entries kept over all shards, by default
# Entries kept a shard at least: Redis trims a capped stream by whole nodes of 100 entries
# (stream-node-max-entries), so a smaller cap would not hold.
HISTORY_MIN_PER_SHARD = 100
HISTORY_READ_CHUNK = 1000  # entries a history scan reads a round trip


# Lua shared by every script that writes the debug history. history_entry puts one more
# field first into an entry given as a JSON object; history_add appends it to the shard's
# capped stream: `MAXLEN ~` trims whole nodes of entries, one cheap step now and then.
HISTORY_ADD = """
local function history_entry(entry, head)
  local rest = string.sub(entry, 2)
  if not string.find(rest, '^%s*}') then rest = ',' .. rest end  -- no comma before '}' of {}
  return '{' .. head .. rest
end

local function history_add(p, member, line, cap)
  redis.call('XADD', p .. 'h', 'MAXLEN', '~', cap, '*', 'm', member, 'e', line)
end
"""


def _lua(source: str) -> str:
    """Write the Python constants a script uses into its source."""
    for name, value in (
        ("$BOTH_SOURCES", BOTH_SOURCES),
        ("$INGEST_ITEM", INGEST_ITEM),
        ("$RATE_LIMIT_ITEM", RATE_LIMIT_ITEM),
        ("$ACK_ITEM", ACK_ITEM),
        ("$RELEASE_ITEM", RELEASE_ITEM),
    ):
        source = source.replace(name, str(value))
    return source


# A batched script (see Store._shared): KEYS[1] only routes the call to the node serving
# the slot that every item's keys share (on one Redis, items of all shards share a call).
# ARGV[1] merge window ms, ARGV[2] early flush 1|0, ARGV[3] dedup window ms, ARGV[4] history
# entries per shard, then per copy INGEST_ITEM arguments: shard key prefix, member, now ms,
# source bit, copy (JSON), history entry (JSON object) or "", no dedup 1|0 (events without
# event_id: due at once, forgotten after the forward), fingerprint, remembered-keys bucket.
# Returns {status, first copy ms} per copy, in order; status is new | merged | complete |
# duplicate. Copies of one key in one call are taken in order, as if sent one by one.
# Retried after a timeout, a copy may be stored twice; merging it again changes nothing.
INGEST_ITEM = 9
INGEST = HISTORY_ADD + """
local merge_ms, early, dedup_ms = tonumber(ARGV[1]), ARGV[2] == '1', tonumber(ARGV[3])

local function log(p, member, entry, outcome)
  if entry ~= '' then
    history_add(p, member, history_entry(entry, '"outcome":"' .. outcome .. '"'), ARGV[4])
  end
end

local function ingest(p, member, now, source, copy, entry, nodedup, fp, bucket)
  local hk, ck = p .. 'k:' .. member, p .. 'c:' .. member
  local state = redis.call('HMGET', hk, 'st', 'src', 't0', 'n')
  if not state[1] then
    -- Events without event_id have a key of their own: nothing to look up.
    local until_s = nodedup ~= '1' and tonumber(redis.call('HGET', p .. 'r:' .. bucket, fp))
    if until_s and math.abs(until_s) * 1000 > now then
      log(p, member, entry, 'duplicate')
      return {'duplicate', tostring(math.abs(until_s) * 1000 - dedup_ms)}
    end
    local due = now
    if nodedup ~= '1' then due = now + merge_ms end
    redis.call('HSET', hk, 'st', 'open', 'src', source, 't0', now, 'due', due,
               'n', 1, 'att', 0, 'nd', nodedup, 'dup', 0)
    redis.call('RPUSH', ck, copy)
    redis.call('ZADD', p .. 'due', due, member)
    log(p, member, entry, 'new')
    return {'new', tostring(now)}
  end
  if state[1] ~= 'open' then
    redis.call('HINCRBY', hk, 'dup', 1)
    log(p, member, entry, 'duplicate')
    return {'duplicate', state[3]}
  end
  local src = bit.bor(tonumber(state[2]), source)
  local copies = (tonumber(state[4]) or 0) + 1
  redis.call('RPUSH', ck, copy)
  if src == $BOTH_SOURCES and early then
    redis.call('HSET', hk, 'src', src, 'n', copies, 'due', now)
    redis.call('ZADD', p .. 'due', 'LT', now, member)
    log(p, member, entry, 'complete')
    return {'complete', state[3]}
  end
  redis.call('HSET', hk, 'src', src, 'n', copies)
  log(p, member, entry, 'merged')
  return {'merged', state[3]}
end

local out = {}
for i = 5, #ARGV, $INGEST_ITEM do
  out[#out + 1] = ingest(ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]),
                         ARGV[i + 4], ARGV[i + 5], ARGV[i + 6], ARGV[i + 7], ARGV[i + 8])
end
return out
"""

# A batched script (see Store._run_batched); KEYS[1] routes the call, as for INGEST.
# ARGV[1] now ms, ARGV[2] lease ms, ARGV[3] limit per shard, ARGV[4] claim token, then per
# shard its key prefix.
# Returns per shard one entry per claimed member: {member, t0, src, attempts, nodedup, copy...}.
# Reads the members' keys by name; they share the zset's hash tag, so the same slot.
# (So do ACK, RELEASE, DEAD_LETTER and REPLAY.) Redis Cluster routes a script by its KEYS
# only; inside it a key not passed in KEYS works as long as this node serves its slot
# (6.2 does not check; 7.x refuses keys of other slots). Same tag, same slot: served
# here, tested on a 6.2 cluster in tests/test_cluster.py. One caveat: while a slot is
# being migrated key by key, a key already moved reads as absent here (Redis answers
# TRYAGAIN only for declared keys), so reshard with the gateways stopped.
CLAIM = """
local now, lease_end, limit = tonumber(ARGV[1]), tonumber(ARGV[1]) + tonumber(ARGV[2]),
                              tonumber(ARGV[3])

local function claim(p)
  local due = redis.call('ZRANGEBYSCORE', p .. 'due', '-inf', now, 'LIMIT', 0, limit)
  local out = {}
  for _, member in ipairs(due) do
    local hk = p .. 'k:' .. member
    local f = redis.call('HMGET', hk, 'st', 't0', 'src', 'nd', 'att')
    if not f[1] then
      redis.call('ZREM', p .. 'due', member)
    else
      local attempts = (tonumber(f[5]) or 0) + 1
      redis.call('HSET', hk, 'st', 'claimed', 'tok', ARGV[4], 'att', attempts)
      redis.call('ZADD', p .. 'due', lease_end, member)
      local entry = {member, f[2], f[3], tostring(attempts), f[4]}
      for _, copy in ipairs(redis.call('LRANGE', p .. 'c:' .. member, 0, -1)) do
        entry[#entry + 1] = copy
      end
      out[#out + 1] = entry
    end
  end
  return out
end

local out = {}
for i = 5, #ARGV do out[#out + 1] = claim(ARGV[i]) end
return out
"""

# Lua shared by ACK and DEAD_LETTER: forget a pending key's state and remember its
# fingerprint until first copy + dedup window, and add the entry to the history (with the
# attempts, known only here, before the key's state goes). A key without dedup, or past
# its window, is forgotten: no one can look it up, so it gets no entry.
# remember(prefix, member, t0 ms, nodedup, attempts, fingerprint, bucket, sign, now ms,
#          dedup ms, history entries per shard, history entry)
REMEMBER = HISTORY_ADD + """
local function remember(prefix, member, t0, nd, attempts, fp, bucket, sign, now, dedup, cap,
                        entry)
  -- t: the timeline list an earlier version kept, gone with its key.
  redis.call('DEL', prefix .. 'k:' .. member, prefix .. 'c:' .. member, prefix .. 't:' .. member)
  local expire_at = t0 + dedup
  if nd == '1' or expire_at <= now then return end
  redis.call('HSET', prefix .. 'r:' .. bucket, fp, sign * math.ceil(expire_at / 1000))
  if entry ~= '' then
    history_add(prefix, member, history_entry(entry, '"attempts":' .. (attempts or '0')), cap)
  end
end
"""

# A batched script (see Store._run_batched); KEYS[1] routes the call, as for INGEST.
# ARGV[1] now ms, ARGV[2] dedup window ms, ARGV[3] claim token, ARGV[4] history entry or "",
# ARGV[5] history entries per shard, then per member ACK_ITEM arguments: shard key prefix,
# member, fingerprint, bucket.
# Forwarded: each member still claimed by this token is forgotten and remembered; returns
# 1 per member that was, 0 per member left alone. Safe to repeat: a member no longer
# claimed is left alone.
ACK_ITEM = 4
ACK = REMEMBER + """
local now = tonumber(ARGV[1])
local out = {}
for i = 6, #ARGV, $ACK_ITEM do
  local p, member = ARGV[i], ARGV[i + 1]
  local f = redis.call('HMGET', p .. 'k:' .. member, 'st', 'tok', 't0', 'nd', 'att')
  if f[1] == 'claimed' and f[2] == ARGV[3] then
    redis.call('ZREM', p .. 'due', member)
    remember(p, member, tonumber(f[3]), f[4], f[5], ARGV[i + 2], ARGV[i + 3], 1, now,
             tonumber(ARGV[2]), ARGV[5], ARGV[4])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# A batched script (see Store._run_batched); KEYS[1] routes the call, as for INGEST.
# ARGV[1] claim token, ARGV[2] next attempt ms, ARGV[3] history entry or "", ARGV[4] history
# entries per shard, then per member RELEASE_ITEM arguments: shard key prefix, member.
# Puts members still claimed by this token back in the queue for a later attempt; returns
# 1 per member put back, 0 per member left alone.
RELEASE_ITEM = 2
RELEASE = HISTORY_ADD + """
local out = {}
for i = 5, #ARGV, $RELEASE_ITEM do
  local p, member = ARGV[i], ARGV[i + 1]
  local hk = p .. 'k:' .. member
  local f = redis.call('HMGET', hk, 'st', 'tok')
  if f[1] == 'claimed' and f[2] == ARGV[1] then
    redis.call('HSET', hk, 'st', 'retry', 'due', ARGV[2])
    redis.call('HDEL', hk, 'tok')
    redis.call('ZADD', p .. 'due', ARGV[2], member)
    if ARGV[3] ~= '' then history_add(p, member, ARGV[3], ARGV[4]) end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
"""

# KEYS[1] shard due zset, KEYS[2] shard dead-letter stream, KEYS[3] key hash
# ARGV[1] now ms, ARGV[2] claim token, ARGV[3] dedup window ms, ARGV[4] member,
# ARGV[5] dead letter (JSON), ARGV[6] history entry or "", ARGV[7] shard key prefix,
# ARGV[8] fingerprint, ARGV[9] bucket, ARGV[10] history entries per shard
# Moves a member still claimed by this token to the dead-letter stream; returns the
# entry id, or false when the claim was lost. Later copies stay dropped until it is
# replayed or forgotten.
DEAD_LETTER = REMEMBER + """
local f = redis.call('HMGET', KEYS[3], 'st', 'tok', 't0', 'nd', 'att')
if f[1] ~= 'claimed' or f[2] ~= ARGV[2] then return false end
local id = redis.call('XADD', KEYS[2], '*', 'member', ARGV[4], 'letter', ARGV[5])
redis.call('ZREM', KEYS[1], ARGV[4])
remember(ARGV[7], ARGV[4], tonumber(f[3]), f[4], f[5], ARGV[8], ARGV[9], -1, tonumber(ARGV[1]),
         tonumber(ARGV[3]), ARGV[10], ARGV[6])
return id
"""

# KEYS[1] shard due zset, KEYS[2] shard dead-letter stream, KEYS[3] key hash, KEYS[4] copies list,
# KEYS[5] shard history stream
# ARGV[1] dead-letter entry id, ARGV[2] now ms, ARGV[3] member, ARGV[4] copy (JSON),
# ARGV[5] first copy ms, ARGV[6] no dedup 1|0, ARGV[7] history entry or "",
# ARGV[8] history entries per shard
# Queues a dead-lettered event again as a single copy due now; returns 1, or 0 when the
# entry is gone (already replayed), so replaying twice sends once.
REPLAY = """
if redis.call('XDEL', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[4])
redis.call('RPUSH', KEYS[4], ARGV[4])
redis.call('PERSIST', KEYS[3])
if ARGV[7] ~= '' then
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'm', ARGV[3], 'e', ARGV[7])
end
redis.call('HSET', KEYS[3], 'st', 'retry', 't0', ARGV[5], 'due', ARGV[2], 'att', 0, 'nd', ARGV[6])
redis.call('HSETNX', KEYS[3], 'src', 0)
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[3])
return 1
"""


# KEYS[1] a remembered-keys bucket
# ARGV[1] now (Unix seconds)
# Removes the fingerprints whose keys are forgotten by now; returns how many.
SWEEP = """
local entries = redis.call('HGETALL', KEYS[1])
local now = tonumber(ARGV[1])
local removed = 0
for i = 1, #entries, 2 do
  if math.abs(tonumber(entries[i + 1])) <= now then
    redis.call('HDEL', KEYS[1], entries[i])
    removed = removed + 1
  end
end
return removed
"""


# A batched script (see Store._shared); KEYS[1] routes the call, as for INGEST.
# ARGV[1] ms between requests at the sustained rate, ARGV[2] burst, then per request
# RATE_LIMIT_ITEM arguments: the client's rate key, now ms.
# Returns per request 0 when it may go ahead (it is counted), else the ms to wait (nothing
# is counted). GCRA: a request is allowed while the theoretical arrival time is at most
# (burst - 1) intervals ahead of now; each allowed one moves it an interval on. Run twice
# (a retried timeout), it counts the request twice: stricter, never looser.
RATE_LIMIT_ITEM = 2
RATE_LIMIT = """
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])

local function count(key, now)
  local tat = math.max(tonumber(redis.call('GET', key) or now), now)
  local wait = tat - now - (burst - 1) * interval
  if wait > 0 then return math.ceil(wait) end
  tat = tat + interval
  redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now))
  return 0
end

local out = {}
for i = 3, #ARGV, $RATE_LIMIT_ITEM do
  out[#out + 1] = count(ARGV[i], tonumber(ARGV[i + 1]))
end
return out
"""


class BatchItem(NamedTuple):
    """One item of a batched script (INGEST, RATE_LIMIT): a copy, or a request to count.

    Items with the same script, slot and common arguments go in one call, so concurrent
    requests share one script call, not only one round trip.
    """

    script: str
    route: str  # a key in the slot that every key the item touches shares
    common: tuple[Any, ...]  # the call's first arguments, the same for every item in it
    args: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class IngestResult:
    status: IngestStatus
    first_seen: float


@dataclass(frozen=True, slots=True)
class Claim:
    """One due event claimed for sending, with every copy received for it."""

    member: str
    shard: int
    token: str
    first_seen: float
    sources: frozenset[Source]
    attempts: int
    dedup: bool
    copies: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Backlog:
    """What waits in Redis, for the gauges."""

    pending: int  # events stored and not yet forwarded (open, claimed or waiting to retry)
    dead_letters: int
    lag: float  # seconds the oldest due event has waited to be claimed; 0 when none is overdue


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: str
    shard: int
    member: str
    letter: dict[str, Any]


class Store:
    """The gateway's state in Redis; every change is one atomic script call."""

    def __init__(
        self,
        client: RedisClient,
        *,
        shards: int = 16,
        merge_window: float = 300.0,
        dedup_window: float = 172_800.0,
        early_flush: bool = True,
        legacy_aliases: bool = True,
        history: int = DEBUG_HISTORY,
        dedup_buckets: int = 1024,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        self.client = client
        # Acknowledge an ingest only once this many replicas have it (WAIT), or answer 503.
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = max(1, int(wait_timeout * 1000))
        self.shards = shards
        self.merge_window_ms = int(merge_window * 1000)
        self.dedup_window_ms = int(dedup_window * 1000)
        self.early_flush = early_flush
        self.legacy_aliases = legacy_aliases
        # Debug history entries kept per shard (0: none), of `history` over all shards.
        self.history_cap = (
            max(HISTORY_MIN_PER_SHARD, -(-history // shards)) if history > 0 else 0
        )
        self.dedup_buckets = dedup_buckets
        self._queue: collections.deque[
            tuple[Sequence[BatchItem], asyncio.Future[list[Any]]]
        ] = collections.deque()
        self._flusher: asyncio.Task[None] | None = None
        self._claim_warned_at = -math.inf
        self.unclaimable: dict[int, float] = {}
        """Shards whose last claim failed -> when (Unix seconds) their claims began failing."""
        self._layout_checked = False
        # Script objects give the SHA1 and source; calls go through `_run`.
        self._scripts = {
            name: aioredis.Redis.register_script(client, _lua(lua))  # type: ignore[arg-type]
            for name, lua in (
                ("ingest", INGEST),
                ("claim", CLAIM),
                ("ack", ACK),
                ("release", RELEASE),
                ("dead_letter", DEAD_LETTER),
                ("replay", REPLAY),
                ("sweep", SWEEP),
                ("rate_limit", RATE_LIMIT),
            )
        }

    # -- key names ---------------------------------------------------------

    def member(self, event: Event) -> str:
        """The dedup key of an event; events without event_id get a unique one."""
        name = dedup_name(event.name, self.legacy_aliases)
        event_id = event.event_id or "~" + uuid.uuid4().hex
        return f"{event.pixel_code}:{name}:{event_id}"

    def member_of(self, pixel_code: str, event_id: str, event_name: str) -> str:
        return f"{pixel_code}:{dedup_name(event_name, self.legacy_aliases)}:{event_id}"

    def shard_of(self, member: str) -> int:
        return zlib.crc32(member.encode()) % self.shards

    @staticmethod
    def prefix(shard: int) -> str:
        return f"tkgw:{{{shard}}}:"

    def keys_of(self, member: str) -> tuple[str, str, str]:
        """Key hash, copies list and due zset of a member."""
        p = self.prefix(self.shard_of(member))
        return f"{p}k:{member}", f"{p}c:{member}", f"{p}due"

    def history_key(self, shard: int) -> str:
        """The shard's capped debug history stream (see HISTORY_ADD)."""
        return f"{self.prefix(shard)}h"

    @property
    def keeps_history(self) -> bool:
        """Whether entries for /debug are written at all (GATEWAY_DEBUG_HISTORY > 0)."""
        return self.history_cap > 0

    @property
    def history_budget(self) -> int:
        """Debug history entries kept over all shards, about (MAXLEN ~ trims by nodes)."""
        return self.history_cap * self.shards

    def rate_counter_key(self, client: str) -> str:
        """The browser rate limit's counter of one client address (see RATE_LIMIT)."""
        return f"{self.prefix(self.shard_of(client))}rl:{client}"

    def dead_key(self, shard: int) -> str:
        return f"{self.prefix(shard)}dead"

    def fingerprint(self, member: str) -> tuple[bytes, int]:
        """The 8 bytes remembered for a key, and the bucket they go in."""
        digest = hashlib.blake2b(member.encode(), digest_size=10).digest()
        return digest[2:], int.from_bytes(digest[:2], "big") % self.dedup_buckets

    def remembered_key(self, shard: int, bucket: int) -> str:
        """The hash a forwarded key's fingerprint is remembered in."""
        return f"{self.prefix(shard)}r:{bucket}"

    # -- state changes -------------------------------------------------------

    async def ingest(
        self, events: Sequence[Event], now: float, history: Sequence[bytes] | None = None
    ) -> list[IngestResult]:
        """Store copies atomically, each merged, opened or dropped; one round trip and
        one script call, shared with the requests ingesting at the same time. `history`:
        each copy's history entry (a JSON object; the script adds its outcome)."""
        now_ms = int(now * 1000)
        common = (self.merge_window_ms, 1 if self.early_flush else 0, self.dedup_window_ms,
                  self.history_cap)  # fmt: skip
        items = []
        for i, event in enumerate(events):
            member = self.member(event)
            prefix = self.prefix(self.shard_of(member))
            copy = orjson.dumps(
                {
                    "source": event.source,
                    "pixel_code": event.pixel_code,
                    "event_source": event.event_source,
                    "test_event_code": event.test_event_code,
                    "received_ms": now_ms,
                    "body": event.body,
                }
            )
            # Events without event_id have a key of their own: nothing to remember, and
            # nothing to look up, so no history either.
            entry = b""
            if history is not None and self.keeps_history and event.event_id:
                entry = history[i]
            fp, bucket = self.fingerprint(member) if event.event_id else (b"", 0)
            args = (
                prefix,
                member,
                now_ms,
                SOURCE_BITS[event.source],
                copy,
                entry,
                0 if event.event_id else 1,
                fp,
                bucket,
            )
            items.append(BatchItem("ingest", f"{prefix}due", common, args))
        replies = await self._shared(items)
        return [
            IngestResult(status=_text(r[0]), first_seen=int(r[1]) / 1000)  # type: ignore[arg-type]
            for r in replies
        ]

    async def claim(self, now: float, limit: int, lease: float) -> list[Claim]:
        """Claim up to `limit` due events per shard, each for `lease` seconds."""
        token = uuid.uuid4().hex
        common = (int(now * 1000), int(lease * 1000), limit, token)
        items = [
            BatchItem("claim", f"{self.prefix(shard)}due", common, (self.prefix(shard),))
            for shard in range(self.shards)
        ]
        # Partial: on a cluster with one primary away, the others' shards still forward.
        try:
            replies = await self._run_batched(items, partial=True)
        except StoreUnavailable as exc:
            # Every shard: Redis is away, which the forwarder says itself.
            self._note_unclaimable({shard: exc for shard in range(self.shards)}, now, say=False)
            raise
        self._note_unclaimable(
            {shard: r for shard, r in enumerate(replies) if isinstance(r, Exception)}, now
        )
        claims = []
        for shard, entries in enumerate(replies):
            if isinstance(entries, Exception):
                continue
            for entry in entries:
                member, t0, src, attempts, nodedup = (_text(x) for x in entry[:5])
                claims.append(
                    Claim(
                        member=member,
                        shard=shard,
                        token=token,
                        first_seen=int(t0) / 1000,
                        sources=frozenset(s for s in SOURCES if int(src) & SOURCE_BITS[s]),
                        attempts=int(attempts),
                        dedup=nodedup != "1",
                        copies=[orjson.loads(c) for c in entry[5:]],
                    )
                )
        return claims

    def _note_unclaimable(
        self, failures: dict[int, Exception], now: float, *, say: bool = True
    ) -> None:
        """Keep `unclaimable` up to date and say which shards cannot be claimed, and since
        when: when that changes, and once a minute while it lasts. A failing shard is
        tried again at every claim, never given up on."""
        recovered = sorted(set(self.unclaimable) - set(failures))
        if recovered:
            since = min(self.unclaimable[shard] for shard in recovered)
            log.warning(
                "claiming shard(s) %s again, after %.1f s", _shard_list(recovered), now - since
            )
        for shard in recovered:
            del self.unclaimable[shard]
        fresh = sorted(set(failures) - set(self.unclaimable))
        for shard in fresh:
            self.unclaimable[shard] = now
        # Said at most once a minute unless the set grows: the forwarder claims several
        # times a second.
        if say and failures and (fresh or time.monotonic() - self._claim_warned_at > 60.0):
            self._claim_warned_at = time.monotonic()
            failing = sorted(self.unclaimable)
            log.warning(
                "cannot claim %d of %d shards (%s) since %.1f s (%s); claiming the others",
                len(failing),
                self.shards,
                _shard_list(failing),
                now - min(self.unclaimable.values()),
                failures[failing[0]],
            )

    async def ack(
        self, claims: Sequence[Claim], now: float, request_id: str = "", history: bytes = b""
    ) -> int:
        """Forwarded: forget the claims' state, remember their keys; returns how many
        were still ours. The history entry defaults to the time and TikTok's request id."""
        line = b""
        if self.keeps_history:
            entry = orjson.loads(history or b'{"outcome": "forwarded"}')
            entry.setdefault("at", round(now, 3))
            if request_id:
                entry.setdefault("request_id", request_id)
            line = orjson.dumps(entry)
        items = []
        for claim in claims:
            prefix = self.prefix(claim.shard)
            common = (int(now * 1000), self.dedup_window_ms, claim.token, line, self.history_cap)
            args = (prefix, claim.member, *self.fingerprint(claim.member))
            items.append(BatchItem("ack", f"{prefix}due", common, args))
        return sum(int(r) for r in await self._run_batched(items))

    async def release(
        self, claims: Sequence[Claim], retry_at: float, history: bytes = b""
    ) -> int:
        """Give claims back to the queue, due again at `retry_at`."""
        line = history if self.keeps_history else b""
        items = []
        for claim in claims:
            prefix = self.prefix(claim.shard)
            common = (claim.token, int(retry_at * 1000), line, self.history_cap)
            items.append(BatchItem("release", f"{prefix}due", common, (prefix, claim.member)))
        return sum(int(r) for r in await self._run_batched(items))

    async def dead_letter(
        self, claim: Claim, letter: dict[str, Any], now: float, history: bytes = b""
    ) -> str | None:
        """Move a claimed event to the dead-letter stream; None when the claim was lost."""
        hk, _ck, due = self.keys_of(claim.member)
        fp, bucket = self.fingerprint(claim.member)
        args = (
            int(now * 1000),
            claim.token,
            self.dedup_window_ms,
            claim.member,
            orjson.dumps(letter),
            history if self.keeps_history else b"",
            self.prefix(claim.shard),
            fp,
            bucket,
            self.history_cap,
        )
        [reply] = await self._run([("dead_letter", (due, self.dead_key(claim.shard), hk), args)])
        return None if reply is None else _text(reply)

    async def dead_letters(self, count: int = 1000) -> list[DeadLetter]:
        """Dead letters of every shard, oldest first within a shard."""
        async with self._guard():
            pipe = self.client.pipeline(transaction=False)
            for shard in range(self.shards):
                pipe.xrange(self.dead_key(shard), count=count)
            replies = await pipe.execute()
        letters = []
        for shard, entries in enumerate(replies):
            for entry_id, fields in entries:
                letters.append(
                    DeadLetter(
                        id=_text(entry_id),
                        shard=shard,
                        member=_text(fields[b"member"]),
                        letter=orjson.loads(fields[b"letter"]),
                    )
                )
        return letters

    async def replay(self, letters: Sequence[DeadLetter], now: float) -> int:
        """Queue dead letters for sending again; returns how many were queued."""
        calls = []
        for dl in letters:
            hk, ck, due = self.keys_of(dl.member)
            copy = orjson.dumps(
                {
                    "source": "replay",
                    "pixel_code": dl.letter["pixel_code"],
                    "event_source": dl.letter["event_source"],
                    "test_event_code": dl.letter.get("test_event_code"),
                    "received_ms": int(now * 1000),
                    "body": dl.letter["event"],
                }
            )
            args = (
                dl.id,
                int(now * 1000),
                dl.member,
                copy,
                int(dl.letter["first_seen"] * 1000),
                0 if dl.letter.get("dedup", True) else 1,
                orjson.dumps({"outcome": "replayed", "at": round(now, 3), "dead_letter": dl.id})
                if self.keeps_history
                else b"",
                self.history_cap,
            )
            keys = (due, self.dead_key(dl.shard), hk, ck, self.history_key(dl.shard))
            calls.append(("replay", keys, args))
        return sum(int(r) for r in await self._run(calls))

    # -- reading -----------------------------------------------------------------

    async def counts(self) -> tuple[int, int]:
        """(events waiting to be forwarded, dead letters), over all shards."""
        async with self._guard():
            pipe = self.client.pipeline(transaction=False)
            for shard in range(self.shards):
                pipe.zcard(f"{self.prefix(shard)}due")
                pipe.xlen(self.dead_key(shard))
            replies = await pipe.execute()
        return sum(replies[0::2]), sum(replies[1::2])

    async def backlog(self, now: float) -> Backlog:
        """Pending events, dead letters and forward lag, over all shards; one round trip."""
        async with self._guard():
            pipe = self.client.pipeline(transaction=False)
            for shard in range(self.shards):
                due = f"{self.prefix(shard)}due"
                pipe.zcard(due)
                pipe.xlen(self.dead_key(shard))
                # The lowest score is the next due time; a claimed event's score is its
                # lease's end, so only events no forwarder holds can be overdue.
                pipe.zrange(due, 0, 0, withscores=True)
            replies = await pipe.execute()
        firsts = [int(r[0][1]) for r in replies[2::3] if r]
        oldest = min(firsts, default=None)
        lag = 0.0 if oldest is None else max(0.0, now - oldest / 1000)
        return Backlog(sum(replies[0::3]), sum(replies[1::3]), lag)

    async def inspect(
        self, pixel_code: str, event_id: str, event_name: str
    ) -> dict[str, Any] | None:
        """A key's state and timeline, for /debug and `inspect`; None when unknown.

        The state comes from the key's own records (pending hash, or remembered
        fingerprint); the timeline from the shard's bounded history, so a key whose
        entries were pushed out by newer ones shows its state with a partial timeline."""
        member = self.member_of(pixel_code, event_id, event_name)
        shard = self.shard_of(member)
        hk, ck, _due = self.keys_of(member)
        fp, bucket = self.fingerprint(member)
        now_ms = int(time.time() * 1000)
        async with self._guard():
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(hk)
            pipe.llen(ck)
            remembered = self.remembered_key(shard, bucket)
            pipe.hget(remembered, fp)  # type: ignore[arg-type]  # binary field names are fine
            state, copies, until_s = await pipe.execute()
        names = {"pixel_code": pixel_code, "event_id": event_id, "event": event_name}
        until = None if until_s is None else int(until_s)
        if not state and (until is None or abs(until) * 1000 <= now_ms):
            return None
        timeline = await self._history_of(shard, member)
        whole = bool(timeline) and timeline[0].get("outcome") == "new"
        history = {"kept_entries": self.history_budget, "from_first_copy": whole}
        if state:
            return {"key": names, **_pending_state(state, copies), "timeline": timeline,
                    "history": history}  # fmt: skip
        assert until is not None
        return {
            "key": names,
            **_remembered_state(timeline, abs(until) - self.dedup_window_ms / 1000, whole),
            "state": "sent" if until > 0 else "dead",
            "forgotten_in": abs(until) - now_ms / 1000,
            "timeline": timeline,
            "history": history,
        }

    async def _history_of(self, shard: int, member: str) -> list[dict[str, Any]]:
        """A member's entries in its shard's history, oldest first: read newest first, in
        chunks, back to the key's first copy or to the oldest entry kept. The history is
        capped, so the scan is bounded; an admin's question, not the hot path."""
        if not self.keeps_history:
            return []
        wanted = member.encode()
        found: list[dict[str, Any]] = []
        upper = "+"
        async with self._guard():
            while True:
                chunk = await self.client.xrevrange(
                    self.history_key(shard), upper, "-", count=HISTORY_READ_CHUNK
                )
                for _id, fields in chunk:
                    if fields.get(b"m") != wanted:
                        continue
                    found.append(orjson.loads(fields[b"e"]))
                    if found[-1].get("outcome") == "new":
                        return found[::-1]
                if len(chunk) < HISTORY_READ_CHUNK:
                    return found[::-1]
                upper = _id_before(_text(chunk[-1][0]))

    async def sweep(self, now: float, shard: int, buckets: range) -> int:
        """Remove forgotten fingerprints from some buckets of a shard; returns how many."""
        calls = [
            ("sweep", (self.remembered_key(shard, bucket),), (int(now),)) for bucket in buckets
        ]
        return sum(int(r) for r in await self._run(calls))

    async def rate_limit(self, client: str, now: float, rate: float, burst: int) -> float:
        """Count a request of `client` against `rate` a second with bursts of `burst`, shared
        by every instance; 0.0 when it may go ahead, else the seconds to wait. One round trip."""
        key = self.rate_counter_key(client)
        item = BatchItem("rate_limit", key, (1000.0 / rate, burst), (key, int(now * 1000)))
        [wait_ms] = await self._shared([item])
        return int(wait_ms) / 1000

    @property
    def layout(self) -> str:
        """Where keys live: instances sharing a Redis must agree on it (see LAYOUT_KEY)."""
        return f"shards={self.shards} dedup_buckets={self.dedup_buckets}"

    async def check_layout(self, *, record: bool = True) -> None:
        """Compare our layout with the one recorded in Redis, LayoutMismatch if they differ;
        with `record`, ours is recorded when none is (a gateway's; an admin command only
        compares: run with the wrong settings, it must not decide for the gateways).

        Instances that disagree on shards or buckets each miss the keys of the others:
        copies of one event go unmerged, duplicates undropped, pending events unsent."""
        if self._layout_checked:
            return
        async with self._guard():
            if record:
                await self.client.set(LAYOUT_KEY, self.layout, nx=True)
            recorded = await self.client.get(LAYOUT_KEY)
        if recorded is None:
            return
        if _text(recorded) != self.layout:
            raise LayoutMismatch(_text(recorded), self.layout)
        self._layout_checked = True

    async def ping(self) -> None:
        async with self._guard():
            await self.client.ping()  # type: ignore[misc]

    async def load_scripts(self) -> None:
        """Load every script; /readyz calls this so a flushed cache heals itself.

        On a cluster, SCRIPT LOAD goes to every primary (redis-py routes it so)."""
        async with self._guard():
            for script in self._scripts.values():
                await self.client.script_load(script.script)

    # -- plumbing ----------------------------------------------------------------

    async def _shared(self, items: Sequence[BatchItem]) -> list[Any]:
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
                replies = await self._run_batched([i for items, _ in batch for i in items])
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

    async def _run_batched(
        self, items: Sequence[BatchItem], *, partial: bool = False
    ) -> list[Any]:
        """Items grouped into script calls (one per script, slot and common arguments, of
        at most BATCH_CALL_MAX items, see CALL_MAX_ITEMS) in one pipeline; one reply per
        item, in order.
        With `partial`, the items of a call that failed get its exception (see `_run`)."""
        cluster = isinstance(self.client, RedisCluster)
        groups: dict[tuple[str, int, tuple[Any, ...]], list[int]] = {}
        for i, item in enumerate(items):
            slot = key_slot(item.route.encode()) if cluster else 0
            groups.setdefault((item.script, slot, item.common), []).append(i)
        chunks: list[tuple[str, tuple[Any, ...], list[int]]] = []
        for (script, _slot, common), indexes in groups.items():
            size = CALL_MAX_ITEMS.get(script, BATCH_CALL_MAX)
            for start in range(0, len(indexes), size):
                chunks.append((script, common, indexes[start : start + size]))
        calls = [
            (script, [items[chunk[0]].route], [*common, *(a for i in chunk for a in items[i].args)])
            for script, common, chunk in chunks
        ]
        replies: list[Any] = [None] * len(items)
        results = await self._run(calls, partial=partial)
        for (_script, _common, chunk), result in zip(chunks, results, strict=True):
            for j, i in enumerate(chunk):
                replies[i] = result if isinstance(result, Exception) else result[j]
        return replies

    async def _run(self, calls: Sequence[ScriptCall], *, partial: bool = False) -> list[Any]:
        """Run script calls in one pipeline; rerun those a node had no script for.

        A node answers NOSCRIPT when its script cache is empty: it restarted, someone ran
        SCRIPT FLUSH, or it is a replica just promoted (Redis 7 no longer copies SCRIPT
        LOAD to replicas). The calls it refused run again once as EVAL with the script's
        source, routed like the first time, so the node that refused runs them and keeps
        the script for the next EVALSHA: one mechanism for one Redis and for a cluster,
        whichever node lost its scripts.

        With `wait_replicas`, a pipeline that ingests ends with WAIT on each node written
        to (see `_node_pipeline`). A failed call raises, unless `partial`: then its
        exception takes its place in the replies (on a cluster one primary may be away
        while the others answer), and only when every call failed is the first raised.
        """
        if not calls:
            return []
        async with self._guard():
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

    async def _pipeline(self, calls: Sequence[ScriptCall], *, source: bool = False) -> list[Any]:
        """One reply (or exception) per call, in order; with `source`, as EVAL."""
        if isinstance(self.client, RedisCluster):
            return await self._cluster_pipeline(self.client, calls, source)
        return await self._node_pipeline(calls, source)

    async def _cluster_pipeline(
        self, client: RedisCluster, calls: Sequence[ScriptCall], source: bool
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
        self, calls: Sequence[ScriptCall], source: bool = False, node: ClusterNode | None = None
    ) -> list[Any]:
        """The calls of one node (all of them on one Redis) in one pipeline: one
        connection, so a WAIT at its end waits for exactly these writes."""
        pipe = self.client.pipeline(transaction=False)
        for name, keys, args in calls:
            # execute_command, not pipe.evalsha: redis-py's cluster pipeline blocks the
            # evalsha method, yet routes a queued EVALSHA by its KEYS (one slot per call),
            # groups the calls per node, and hands back a NOSCRIPT reply per call.
            script = self._scripts[name]
            command = ("EVAL", script.script) if source else ("EVALSHA", script.sha)
            pipe.execute_command(*command, len(keys), *keys, *args)
        wait = self.wait_replicas > 0 and any(name == "ingest" for name, _k, _a in calls)
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
    async def _guard(self) -> AsyncIterator[None]:
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


def _pending_state(state: dict[bytes, bytes], copies: int) -> dict[str, Any]:
    fields = {_text(k): _text(v) for k, v in state.items()}
    src = int(fields.get("src", "0"))
    return {
        "state": fields.get("st"),
        "sources": [s for s in SOURCES if src & SOURCE_BITS[s]],
        "first_seen": int(fields["t0"]) / 1000 if "t0" in fields else None,
        "due": int(fields["due"]) / 1000 if "due" in fields else None,
        "forwarded_at": None,
        "tiktok_request_id": None,
        "copies_received": int(fields.get("n", "0")),
        "copies_pending": copies,
        "attempts": int(fields.get("att", "0")),
        "duplicates_dropped": int(fields.get("dup", "0")),
        "forgotten_in": None,
    }


COPY_OUTCOMES = ("new", "merged", "complete")
ATTEMPT_OUTCOMES = ("forwarded", "retry", "dead_lettered")


def _remembered_state(
    timeline: list[dict[str, Any]], first_seen: float, whole: bool
) -> dict[str, Any]:
    """What is known of a key after it left: its fingerprint (`first_seen`, to the second),
    and what its history still holds (`whole`: back to its first copy)."""
    copies = [e for e in timeline if e.get("outcome") in COPY_OUTCOMES]
    forwards = [e for e in timeline if e.get("outcome") == "forwarded"]
    return {
        "sources": [s for s in SOURCES if any(e.get("source") == s for e in copies)],
        "first_seen": copies[0].get("at", first_seen) if whole else first_seen,
        "due": None,
        "forwarded_at": forwards[-1].get("at") if forwards else None,
        "tiktok_request_id": forwards[-1].get("request_id") if forwards else None,
        "copies_received": len(copies),
        "copies_pending": 0,
        "attempts": _attempts(timeline),
        "duplicates_dropped": sum(e.get("outcome") == "duplicate" for e in timeline),
    }


def _attempts(timeline: list[dict[str, Any]]) -> int:
    """Sends made: as the key's last outcome recorded them, else as the timeline shows."""
    final = [e for e in timeline if e.get("outcome") in ("forwarded", "dead_lettered")]
    if final and "attempts" in final[-1]:
        return int(final[-1]["attempts"])
    return sum(e.get("outcome") in ATTEMPT_OUTCOMES for e in timeline)


def _id_before(entry_id: str) -> str:
    """The stream entry id just before `entry_id` (XREVRANGE's bound is inclusive)."""
    ms, _, seq = entry_id.partition("-")
    if int(seq) > 0:
        return f"{ms}-{int(seq) - 1}"
    return f"{int(ms) - 1}-{2**64 - 1}"


def _shard_list(shards: Sequence[int]) -> str:
    """Shards for a log line: 1, 4, 7 (the first twenty, and how many more)."""
    listed = ", ".join(str(shard) for shard in shards[:20])
    return listed if len(shards) <= 20 else f"{listed} and {len(shards) - 20} more"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
