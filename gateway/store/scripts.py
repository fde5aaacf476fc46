"""The Lua scripts, each headed by its KEYS/ARGV/returns contract, registered once.

The request path runs no script: ingest is a plain XADD to the shard's log. Scripts
are for the steps that must be atomic: the owner's commit of a batch (fenced by its
lease), the lease itself, a replay, the import of the previous design's keys, the
sweep of forgotten fingerprints, the browser rate limit and the console's tallies.

Key names inside a script are built from the shard's key prefix (see keys.py); they
share its hash tag, so each call touches one slot. Redis Cluster routes a script by
its KEYS only; a key not declared works as long as this node serves its slot (same
tag, same slot). While a slot is being migrated key by key, a key already moved
reads as absent, so reshard with the gateways stopped. The text of a script is its
identity (its SHA1): change a script only knowing that.
"""

from __future__ import annotations


def _lua(source: str) -> str:
    """Write the Python constants a script uses into its source."""
    return source.replace("$RATE_LIMIT_ITEM", str(RATE_LIMIT_ITEM))


# Lua shared by the owner's scripts: whether `token` still holds the shard's lease, renewed
# for `lease` ms when it does.
OWNS = """
local function owns(owner_key, token, lease)
  if redis.call('GET', owner_key) ~= token then return false end
  redis.call('PEXPIRE', owner_key, lease)
  return true
end
"""

# KEYS[1] the shard's owner key
# ARGV[1] token, ARGV[2] lease ms
# Renews the lease while `token` holds it; returns 1, or 0 when another instance owns the
# shard (or none does: the lease ran out) and the caller must let the shard go.
RENEW = OWNS + """
if owns(KEYS[1], ARGV[1], ARGV[2]) then return 1 end
return 0
"""

# KEYS[1] the shard's owner key
# ARGV[1] token, ARGV[2] lease ms
# Takes the shard when no one owns it, or when `token` does already (an instance that let
# its window go after a failed commit takes the shard back at once, not after its lease).
# Returns 1 when the shard is ours now.
TAKE = """
local owner = redis.call('GET', KEYS[1])
if owner and owner ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS[1] the shard's owner key
# ARGV[1] token
# Gives the shard up (an instance stopping, or owning more than its share); returns 1 when
# it was ours.
LET_GO = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1] the shard's owner key (the call's route; every other key shares its slot)
# ARGV[1] shard key prefix, ARGV[2] token, ARGV[3] history records beyond ARGV[9] before the
# list is cut (cutting it at every commit would cost a command a commit), ARGV[4] last log
# entry counted ("" unchanged), ARGV[5] trim: log entries before this id are resolved ("" none),
# ARGV[6] keys open in the window, ARGV[7] earliest due ms (0 none), ARGV[8] now ms,
# ARGV[9] history records kept, ARGV[10..14] how many of each list below follows:
#   fingerprints to remember: bucket, fingerprint, Unix second (negative: dead-lettered)
#   retry states to write: member, state (JSON)
#   retry states to delete: member
#   dead letters: member, letter (JSON)
#   history records (JSON), oldest first
# Records the outcome of a batch as one step, if the token still owns the shard: an event
# is remembered, moved to the retry hash or dead-lettered in the same step that trims its
# copies from the log, so a crash between the two cannot lose or resurrect it.
# Returns 0 when the shard is no longer ours (nothing written), else {1, dead letter ids...}.
# Repeated (a retried timeout), it writes the same state again; only dead letters would be
# added twice, and they are committed one batch at a time. The lease is renewed apart (RENEW).
COMMIT = """
local p = ARGV[1]
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
local counts, i = {}, 15
for k = 1, 5 do counts[k] = tonumber(ARGV[9 + k]) end

local buckets, order = {}, {}
for _ = 1, counts[1] do
  local b = ARGV[i]
  if not buckets[b] then buckets[b] = {}; order[#order + 1] = b end
  local t = buckets[b]
  t[#t + 1] = ARGV[i + 1]; t[#t + 1] = ARGV[i + 2]
  i = i + 3
end
for _, b in ipairs(order) do redis.call('HSET', p .. 'r:' .. b, unpack(buckets[b])) end

if counts[2] > 0 then
  local pairs_ = {}
  for _ = 1, counts[2] do
    pairs_[#pairs_ + 1] = ARGV[i]; pairs_[#pairs_ + 1] = ARGV[i + 1]; i = i + 2
  end
  redis.call('HSET', p .. 'retry', unpack(pairs_))
end
if counts[3] > 0 then
  local members = {}
  for _ = 1, counts[3] do members[#members + 1] = ARGV[i]; i = i + 1 end
  redis.call('HDEL', p .. 'retry', unpack(members))
end
local out = {1}
for _ = 1, counts[4] do
  out[#out + 1] = redis.call('XADD', p .. 'dead', '*', 'member', ARGV[i], 'letter', ARGV[i + 1])
  i = i + 2
end
if counts[5] > 0 then
  local records = {}
  for _ = 1, counts[5] do records[#records + 1] = ARGV[i]; i = i + 1 end
  local kept = tonumber(ARGV[9])
  if redis.call('LPUSH', p .. 'hist', unpack(records)) > kept + tonumber(ARGV[3]) then
    redis.call('LTRIM', p .. 'hist', 0, kept - 1)
  end
end
if ARGV[5] ~= '' then redis.call('XTRIM', p .. 'log', 'MINID', ARGV[5]) end
local meta = {'pending', ARGV[6], 'due', ARGV[7], 'at', ARGV[8]}
if ARGV[4] ~= '' then meta[#meta + 1] = 'seen'; meta[#meta + 1] = ARGV[4] end
redis.call('HSET', p .. 'meta', unpack(meta))
return out
"""

# KEYS[1] the shard's dead-letter stream, KEYS[2] the shard's log
# ARGV[1] dead-letter entry id, ARGV[2] member, ARGV[3] the copy to send again (JSON)
# Moves a dead letter back into the log as one copy; its owner sends it again. Returns 1,
# or 0 when the entry is gone (already replayed), so replaying twice sends once.
REPLAY = """
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[2], '*', ARGV[2], ARGV[3])
return 1
"""

# KEYS[1] the shard's owner key
# ARGV[1] shard key prefix, ARGV[2] token, ARGV[3] lease ms, ARGV[4] members at most
# The previous design kept a pending key as a hash (k:), its copies as a list (c:) and
# its timeline (t:), queued in a due zset. Moves up to ARGV[4] of them into the log, each
# copy byte for byte as it was received, and deletes them; with the last, the zset and
# the old history stream go too. Returns how many remain, or -1 when the shard is not ours.
# A key without dedup (no event_id) was marked in its hash, not in its copies, and the
# copies are not marked here: decoding and encoding one with cjson would round numbers of
# more than 14 digits, and splicing JSON text is fragile. The owner needs no mark: a copy
# without event_id is one of such a key (see records.Copy.from_stored).
IMPORT_LEGACY = OWNS + """
local p = ARGV[1]
if not owns(KEYS[1], ARGV[2], ARGV[3]) then return -1 end
local members = redis.call('ZRANGE', p .. 'due', 0, tonumber(ARGV[4]) - 1)
for _, member in ipairs(members) do
  local entry = {}
  for _, copy in ipairs(redis.call('LRANGE', p .. 'c:' .. member, 0, -1)) do
    entry[#entry + 1] = member; entry[#entry + 1] = copy
  end
  if #entry > 0 then redis.call('XADD', p .. 'log', '*', unpack(entry)) end
  redis.call('DEL', p .. 'k:' .. member, p .. 'c:' .. member, p .. 't:' .. member)
  redis.call('ZREM', p .. 'due', member)
end
local left = redis.call('ZCARD', p .. 'due')
if left == 0 then redis.call('DEL', p .. 'h') end
return left
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


# A batched script (see runner.Runner.shared); KEYS[1] routes the call, as for INGEST.
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


# KEYS[1] a minute's tallies, KEYS[2] its hour's, KEYS[3] the last answers (one hash tag)
# ARGV[1] minute TTL s, ARGV[2] hour TTL s, ARGV[3] answers TTL s, ARGV[4] counts,
# ARGV[5] maxima, then `counts` (field, increment) pairs, `maxima` (field, value) pairs,
# and (pixel, answer JSON) pairs to the end.
# Adds the counts to both hashes, keeps the larger of each maximum, sets the answers.
# Returns 1. Run twice (a retried timeout), it counts twice: diagnostics, not state.
TALLY = """
local counts, maxima = tonumber(ARGV[4]), tonumber(ARGV[5])
local i = 6
for _ = 1, counts do
  redis.call('HINCRBY', KEYS[1], ARGV[i], ARGV[i + 1])
  redis.call('HINCRBY', KEYS[2], ARGV[i], ARGV[i + 1])
  i = i + 2
end
for _ = 1, maxima do
  local value = tonumber(ARGV[i + 1])
  for k = 1, 2 do
    if value > tonumber(redis.call('HGET', KEYS[k], ARGV[i]) or '-1') then
      redis.call('HSET', KEYS[k], ARGV[i], ARGV[i + 1])
    end
  end
  i = i + 2
end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
if i < #ARGV then
  for j = i, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[j], ARGV[j + 1]) end
  redis.call('EXPIRE', KEYS[3], ARGV[3])
end
return 1
"""


SCRIPTS = {
    name: _lua(source)
    for name, source in (
        ("take", TAKE),
        ("renew", RENEW),
        ("let_go", LET_GO),
        ("commit", COMMIT),
        ("replay", REPLAY),
        ("import_legacy", IMPORT_LEGACY),
        ("sweep", SWEEP),
        ("rate_limit", RATE_LIMIT),
        ("tally", TALLY),
    )
}
"""Each script's source by name, the Python constants written in."""
