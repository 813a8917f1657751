"""The Lua scripts of the Redis backend: each runs atomically on the node that holds its
keys (one stream's keys share a hash slot)."""

from service.stores.base import HISTORY_EXTRA

# KEYS: meta, win, sections, nudges, legacy state, pending receipts' keys, the batch's
# receipt. ARGV: channels, default window, default
# detector, ttl seconds, created_at, the last_ts and points_seen the plan was made on (""
# and "0": no stream or no points), the new last_ts, n, m, the most unscored points to keep, the
# version the plan was made on, then n encoded points (the plan's rows), then m encoded
# (stored, sent) stamp pairs of nudged points, then the batch's Idempotency-Key ("": none),
# its pending receipt and the receipt's ttl seconds. Returns 'ok', created, the stream's
# unscored points before the batch, the length of the meta hash and the hash after the
# append (field, value, ...), then the held points: up to that many unscored ones with
# their context, then the batch.
APPEND = """
local meta, win, sections, nudges, legacy = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local pending, receipt = KEYS[6], KEYS[7]
local channels = tonumber(ARGV[1])
local ttl, n, m = tonumber(ARGV[4]), tonumber(ARGV[9]), tonumber(ARGV[10])
local cap = tonumber(ARGV[11])
local P = 12  -- ARGV[P + i]: the i-th encoded point
local created = 0
local window
local unscored = 0
if redis.call('EXISTS', meta) == 1 then
  local h = redis.call('HMGET', meta, 'channels', 'window', 'last_ts', 'points_seen',
                       'scored', 'version')
  if tonumber(h[1]) ~= channels then return {'err_channels', h[1]} end
  -- the plan was made on this state: another write since means plan again
  if (h[3] or '') ~= ARGV[6] or (h[4] or '0') ~= ARGV[7] or (h[6] or '0') ~= ARGV[12] then
    return {'err_stale'}
  end
  window = tonumber(h[2])
  -- stored but never scored (a crash before the commit): held until scored
  if h[5] then unscored = math.max(0, tonumber(h[4] or '0') - tonumber(h[5])) end
else
  if ARGV[6] ~= '' then return {'err_stale'} end
  window = tonumber(ARGV[2])
  created = 1
end
if created == 1 then
  redis.call('HSET', meta, 'channels', channels, 'window', window, 'detector', ARGV[3],
             'created_at', ARGV[5], 'points_seen', 0, 'scored', 0, 'version', 0)
end
-- held after the batch: the batch whole (a retry of it is recognised), the unscored
-- before it, and the context that scoring them needs
local keep = n + math.min(unscored, cap) + window - 1 + EXTRA
local context = {}
if n > 0 then
  for i = 1, n, 500 do
    redis.call('RPUSH', win, unpack(ARGV, P + i, P + math.min(i + 499, n)))
  end
  for i = 1, m, 500 do
    redis.call('RPUSH', nudges, unpack(ARGV, P + n + i, P + n + math.min(i + 499, m)))
  end
  if m > 0 then redis.call('LTRIM', nudges, -keep, -1) end
  context = redis.call('LRANGE', win, -keep, -1)
  redis.call('LTRIM', win, -keep, -1)
  redis.call('HINCRBY', meta, 'points_seen', n)
  redis.call('HINCRBY', meta, 'version', 1)
  redis.call('HSET', meta, 'last_ts', ARGV[8])
elseif unscored > 0 then
  context = redis.call('LRANGE', win, -keep, -1)
end
local idem = P + n + m  -- the pending receipt: with the append, or not at all
if ARGV[idem + 1] ~= '' then
  redis.call('SET', receipt, ARGV[idem + 2], 'EX', ARGV[idem + 3])
  redis.call('SADD', pending, ARGV[idem + 1])
  redis.call('EXPIRE', pending, ARGV[idem + 3])
end
if ttl > 0 then
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', win, ttl)
  if redis.call('EXISTS', sections) == 1 then redis.call('EXPIRE', sections, ttl) end
  if redis.call('EXISTS', legacy) == 1 then redis.call('EXPIRE', legacy, ttl) end
  if redis.call('EXISTS', nudges) == 1 then redis.call('EXPIRE', nudges, ttl) end
end
local h = redis.call('HGETALL', meta)
local out = {'ok', tostring(created), tostring(unscored), tostring(#h)}
for _, e in ipairs(h) do out[#out + 1] = e end
for _, e in ipairs(context) do out[#out + 1] = e end
return out
""".replace("EXTRA", str(HISTORY_EXTRA))

# KEYS: meta, win, sections, nudges, legacy state. ARGV: channels, window, detector, names
# json, created_at, ttl, threshold json, alert budget ("" = unset), timestamp policy (""
# = the backend's), detector params json ("" = none).
PUT = """
local meta, win, sections, legacy = KEYS[1], KEYS[2], KEYS[3], KEYS[5]
local channels, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local created = 0
if redis.call('EXISTS', meta) == 1 then
  local m = redis.call('HMGET', meta, 'channels', 'window', 'detector', 'params')
  if tonumber(m[1]) ~= channels then return {'err_channels', m[1]} end
  if tonumber(m[2]) ~= window or m[3] ~= ARGV[3] or (m[4] or '') ~= ARGV[10] then
    redis.call('DEL', sections, legacy)  -- a new detector starts afresh: nothing to score
    redis.call('HSET', meta, 'scored', redis.call('HGET', meta, 'points_seen') or 0)
  end
  redis.call('LTRIM', win, -(window + EXTRA), -1)
else
  created = 1
  redis.call('HSET', meta, 'created_at', ARGV[5], 'points_seen', 0, 'scored', 0)
end
redis.call('HSET', meta, 'channels', channels, 'window', window, 'detector', ARGV[3],
           'names', ARGV[4], 'threshold', ARGV[7], 'alert_budget', ARGV[8],
           'timestamps', ARGV[9], 'params', ARGV[10])
redis.call('HINCRBY', meta, 'version', 1)
if tonumber(ARGV[6]) > 0 then redis.call('EXPIRE', meta, tonumber(ARGV[6])) end
return created
""".replace("EXTRA", str(HISTORY_EXTRA))

UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lock. ARGV: token, lease ms. The holder extends its own lease only.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease. ARGV: owner, lease ms. Take a free lease, or renew one the owner holds.
LEASE = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: meta. ARGV: points scored ("": unchanged), then field, value pairs of the meta to
# set (a detector binding switched with its state). A state commit: set the mark, bump
# the version, return it. Only on a stream that still exists (a mark alone would be a meta
# hash without its fields): 0. The sections follow it in the same MULTI.
COMMIT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' then redis.call('HSET', KEYS[1], 'scored', ARGV[1]) end
if #ARGV > 1 then redis.call('HSET', KEYS[1], unpack(ARGV, 2)) end
return redis.call('HINCRBY', KEYS[1], 'version', 1)
"""
