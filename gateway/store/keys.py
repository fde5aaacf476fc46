"""Every Redis key shape and the layout that places keys: the one place they are written.

One event key is `(pixel, dedup name, event_id)`, written as the *member*
`PIXEL:NAME:EVENT_ID`. Each member belongs to one of `shards` hash slots,
`tkgw:{N}:`, chosen by CRC32; everything about a shard shares that hash tag, so
every script touches one slot and works on a Redis Cluster.

The store is log-structured. Ingest appends each accepted copy to its shard's log
and answers; one instance at a time owns a shard (a lease), reads its log, holds
the merge window in memory, forwards, and records the outcome in one script call
per batch. Keys of shard N:

    tkgw:{N}:log          STREAM the copies accepted and not yet resolved. One entry per
                                ingest call and shard: field = member, value = the copy
                                (JSON), as many pairs as copies. The owner trims it
                                (XTRIM MINID) up to the oldest copy of a key still open.
    tkgw:{N}:owner        STRING the owner's token; expires after GATEWAY_FORWARD_LEASE
                                unless renewed. Only the owner's scripts change the shard.
    tkgw:{N}:meta         HASH  the owner's bookkeeping: `seen` (the last log entry it
                                has counted), `pending` (keys open in its window), `due`
                                (the earliest due time, ms, or 0), `at` (when written, ms).
    tkgw:{N}:retry        HASH  member -> a key whose send failed: its merged copy, first
                                seen, sources, attempts and next due time (JSON). Kept
                                out of the log, so a key that waits does not pin it.
    tkgw:{N}:r:<B>        HASH  remembered keys: 8-byte fingerprint -> Unix second at which
                                the key is forgotten (first copy + dedup window), negated
                                for a dead-lettered key. B is a bucket of the fingerprint.
                                Redis stores small hashes packed (listpack), so a
                                remembered key costs about 14 bytes instead of a key of its
                                own (~140 bytes). Entries past their second are removed by
                                SWEEP; a lookup ignores them meanwhile.
    tkgw:{N}:hist         LIST  the shard's debug history, newest first, what /debug and
                                `inspect` show: one JSON record per copy, retry, forward,
                                dead letter, replay or dropped duplicate (member, outcome,
                                time, field names, never values). Written by the owner a
                                batch at a time and cut back to its share of
                                GATEWAY_DEBUG_HISTORY once a tenth longer: a fixed
                                budget whatever the traffic.
    tkgw:{N}:dead         STREAM dead letters: the merged event, TikTok's code and message.

A copy of a key that is open in the owner's window is merged; of a key being sent,
waiting for a retry, or remembered, it is a duplicate.

Fingerprints are 64 bits of BLAKE2b of the member, in a bucket chosen by 16
further bits: two keys collide, and the later is wrongly dropped, with
probability about (remembered keys in its bucket) / 2**64, i.e. below 1e-17
per event even at hundreds of events per bucket.

The browser endpoint's rate limit (see RATE_LIMIT), in the shard of the client address:

    tkgw:{N}:rl:<client>  STRING one client address's (an IPv6 /64's) theoretical arrival
                                time in ms (GCRA). Shared, so the limit holds across gateway
                                instances. Expires when its burst is whole again.

Shared by every shard:

    tkgw:layout           STRING the shards, dedup buckets and store design of the first
                                instance to start on this Redis. An instance with others
                                refuses to start: it would look for every key in the wrong
                                place.
    tkgw:instances        ZSET  instance id -> when its heartbeat expires (ms): how many
                                instances share the shards, so each owns its fair share.

The console's tallies (gateway/console/tally.py), written by the shard owners about once a
second each, one script call a write (TALLY); all under one hash tag, one node of a cluster:

    tkgw:{console}:m:<M>  HASH  counts of Unix minute M: `pixel|kind|label...` -> count (or
                                a maximum); expires after CONSOLE_MINUTE_TTL.
    tkgw:{console}:h:<H>  HASH  the same counts by Unix hour H; expires after CONSOLE_HOUR_TTL.
    tkgw:{console}:answers HASH pixel -> TikTok's last answer for it (JSON); expires a week
                                after the last write.

The previous design's keys (`due`, `k:`, `c:`, `t:`, `h`: pending keys in hashes and
lists, a per-shard due queue) are read once by IMPORT_LEGACY when a shard is first
owned, and deleted; see LEGACY_LAYOUT.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib

from ..events import Event, Source, dedup_name

LAYOUT_KEY = "tkgw:layout"
INSTANCES_KEY = "tkgw:instances"
CONSOLE_PREFIX = "tkgw:{console}:"
CONSOLE_ANSWERS_KEY = CONSOLE_PREFIX + "answers"
CONSOLE_MINUTE_TTL = 30 * 60  # the console shows minutes for the last 15 of them
CONSOLE_HOUR_TTL = 26 * 3600  # and hours for the last 24
CONSOLE_ANSWERS_TTL = 7 * 86400
HISTORY_MIN_PER_SHARD = 10  # records kept a shard at least, when the history is on
HISTORY_READ_CHUNK = 1000  # records a history scan reads a round trip
SOURCE_BITS: dict[Source, int] = {"pixel": 1, "server": 2}
BOTH_SOURCES = 3


class Keys:
    """Where an event's keys live, given the layout (shards, dedup buckets) and the history
    budget; names only, no I/O."""

    def __init__(
        self,
        *,
        shards: int,
        dedup_buckets: int,
        legacy_aliases: bool,
        history: int,
    ) -> None:
        self.shards = shards
        self.dedup_buckets = dedup_buckets
        self.legacy_aliases = legacy_aliases
        # Debug history entries kept per shard (0: none), of `history` over all shards.
        self.history_cap = (
            max(HISTORY_MIN_PER_SHARD, -(-history // shards)) if history > 0 else 0
        )

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

    def log_key(self, shard: int) -> str:
        """The shard's log of accepted copies."""
        return f"{self.prefix(shard)}log"

    def owner_key(self, shard: int) -> str:
        return f"{self.prefix(shard)}owner"

    def meta_key(self, shard: int) -> str:
        return f"{self.prefix(shard)}meta"

    def retry_key(self, shard: int) -> str:
        return f"{self.prefix(shard)}retry"

    def history_key(self, shard: int) -> str:
        """The shard's debug history, a list cut to `history_cap` records."""
        return f"{self.prefix(shard)}hist"

    @property
    def keeps_history(self) -> bool:
        """Whether entries for /debug are written at all (GATEWAY_DEBUG_HISTORY > 0)."""
        return self.history_cap > 0

    @property
    def history_slack(self) -> int:
        """Records a shard's history may hold beyond its cap before it is cut back: a
        tenth more, so a commit cuts it now and then rather than every time."""
        return max(HISTORY_MIN_PER_SHARD, self.history_cap // 10)

    @property
    def history_budget(self) -> int:
        """Debug history records kept over all shards."""
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

    @staticmethod
    def console_minute_key(minute: int) -> str:
        """The console's tallies of one Unix minute (seconds // 60)."""
        return f"{CONSOLE_PREFIX}m:{minute}"

    @staticmethod
    def console_hour_key(hour: int) -> str:
        """The console's tallies of one Unix hour (seconds // 3600)."""
        return f"{CONSOLE_PREFIX}h:{hour}"

    @property
    def layout(self) -> str:
        """Where keys live: instances sharing a Redis must agree on it (see LAYOUT_KEY)."""
        return f"shards={self.shards} dedup_buckets={self.dedup_buckets} store=log"

    def legacy_layout(self) -> str:
        """The layout the previous design recorded: its keys can be imported (IMPORT_LEGACY)."""
        return f"shards={self.shards} dedup_buckets={self.dedup_buckets}"
