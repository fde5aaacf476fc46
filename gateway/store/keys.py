"""Every Redis key shape and the layout that places keys: the one place they are written.

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
"""

from __future__ import annotations

import hashlib
import uuid
import zlib

from ..events import Event, Source, dedup_name

LAYOUT_KEY = "tkgw:layout"
DEBUG_HISTORY = 100_000  # history entries kept over all shards, by default
# Entries kept a shard at least: Redis trims a capped stream by whole nodes of 100 entries
# (stream-node-max-entries), so a smaller cap would not hold.
HISTORY_MIN_PER_SHARD = 100
HISTORY_READ_CHUNK = 1000  # entries a history scan reads a round trip
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

    def due_key(self, shard: int) -> str:
        """The shard's due queue (the forwarder's zset)."""
        return f"{self.prefix(shard)}due"

    def keys_of(self, member: str) -> tuple[str, str, str]:
        """Key hash, copies list and due zset of a member."""
        p = self.prefix(self.shard_of(member))
        return f"{p}k:{member}", f"{p}c:{member}", f"{p}due"

    def history_key(self, shard: int) -> str:
        """The shard's capped debug history stream (see scripts.HISTORY_ADD)."""
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

    @property
    def layout(self) -> str:
        """Where keys live: instances sharing a Redis must agree on it (see LAYOUT_KEY)."""
        return f"shards={self.shards} dedup_buckets={self.dedup_buckets}"
