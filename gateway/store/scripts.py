"""The Lua scripts, each headed by its KEYS/ARGV/returns contract, registered once.

Every script is safe to run twice: a call that timed out may be retried. Key names
inside a script are built from the shard's key prefix (see keys.py); they share its
hash tag, so each call touches one slot. The text of a script is its identity (its
SHA1): gateways of two versions sharing a Redis must agree on it, so change a script
only knowing that.
"""

from __future__ import annotations

from .keys import BOTH_SOURCES

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


# A batched script (see runner.Runner.shared): KEYS[1] only routes the call to the node serving
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

# A batched script (see runner.Runner.run_batched); KEYS[1] routes the call, as for INGEST.
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

# A batched script (see runner.Runner.run_batched); KEYS[1] routes the call, as for INGEST.
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

# A batched script (see runner.Runner.run_batched); KEYS[1] routes the call, as for INGEST.
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


SCRIPTS = {
    name: _lua(source)
    for name, source in (
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
"""Each script's source by name, the Python constants written in."""
