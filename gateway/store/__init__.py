"""Everything the gateway keeps in Redis, one concept a module:

    keys.py      every key shape and the layout that places keys (the key table)
    scripts.py   the Lua scripts, each with its KEYS/ARGV/returns contract
    runner.py    pipelines, batching, cluster routing, replicas, Redis errors
    state.py     the state changes (`Store`): ingest, leases, reads, commits, dead letters, ...
    reading.py   counts, backlog, dead letters, one key's state and timeline
"""

from .keys import HISTORY_MIN_PER_SHARD, HISTORY_READ_CHUNK, LAYOUT_KEY, Keys
from .reading import Backlog, DeadLetterEntry
from .runner import BATCH_CALL_MAX, BatchItem, RedisClient, Runner, connect
from .state import Commit, LogEntry, Store

__all__ = [
    "BATCH_CALL_MAX",
    "HISTORY_MIN_PER_SHARD",
    "HISTORY_READ_CHUNK",
    "LAYOUT_KEY",
    "Backlog",
    "BatchItem",
    "Commit",
    "DeadLetterEntry",
    "Keys",
    "LogEntry",
    "RedisClient",
    "Runner",
    "Store",
    "connect",
]
