"""The Lua scripts of the Redis backend: each runs atomically on the node that holds its
keys (one stream's keys share a hash slot)."""

from service.stores.base import HISTORY_EXTRA

# KEYS: meta, win, sections, nudges, legacy state, pending receipts' keys, the batch's
# receipt. ARGV: channels, default window, default
# detector, ttl seconds, created_at, the last_ts and points_seen the plan was made on (""
# and "0": no stream or no points), the new last_ts, n, m, the most unscored points to keep,
# the version the plan was made on, the n points of the plan (one string: n rows of
# little-endian float64, timestamp first), the m (stored, sent) stamp pairs of nudged
# points (one string, likewise), how many stored points before the batch to return when
# none is unscored ("": all that are held), then the batch's Idempotency-Key ("": none),
# its pending receipt and the receipt's ttl seconds. The meta that results is the one the
# plan was made on, moved on by the batch, so nothing of it is returned. Returns 'ok',
# created, the stream's unscored points before the batch, then the held points as one
# string: up to that many unscored ones with their context (or the points asked for),
# then the batch.
APPEND = """
local meta, win, sections, nudges, legacy = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local pending, receipt = KEYS[6], KEYS[7]
local channels = tonumber(ARGV[1])
local ttl, n, m = tonumber(ARGV[4]), tonumber(ARGV[9]), tonumber(ARGV[10])
local cap = tonumber(ARGV[11])
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
local wanted = keep
if unscored == 0 and ARGV[15] ~= '' then wanted = math.min(keep, n + tonumber(ARGV[15])) end
local function split(blob, count, size, key)
  local rows = {}
  for i = 0, count - 1 do rows[i + 1] = string.sub(blob, i * size + 1, (i + 1) * size) end
  for i = 1, count, 500 do redis.call('RPUSH', key, unpack(rows, i, math.min(i + 499, count))) end
end
local held = ''
if n > 0 then
  split(ARGV[13], n, 8 * (channels + 1), win)
  if m > 0 then
    split(ARGV[14], m, 16, nudges)
    redis.call('LTRIM', nudges, -keep, -1)
  end
  redis.call('LTRIM', win, -keep, -1)
  held = table.concat(redis.call('LRANGE', win, -wanted, -1))
  redis.call('HINCRBY', meta, 'points_seen', n)
  redis.call('HINCRBY', meta, 'version', 1)
  redis.call('HSET', meta, 'last_ts', ARGV[8])
elseif unscored > 0 then
  held = table.concat(redis.call('LRANGE', win, -keep, -1))
end
if ARGV[16] ~= '' then  -- the pending receipt: with the append, or not at all
  redis.call('SET', receipt, ARGV[17], 'EX', ARGV[18])
  redis.call('SADD', pending, ARGV[16])
  redis.call('EXPIRE', pending, ARGV[18])
end
if ttl > 0 then
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', win, ttl)
  if redis.call('EXISTS', sections) == 1 then redis.call('EXPIRE', sections, ttl) end
  if redis.call('EXISTS', legacy) == 1 then redis.call('EXPIRE', legacy, ttl) end
  if redis.call('EXISTS', nudges) == 1 then redis.call('EXPIRE', nudges, ttl) end
end
return {'ok', tostring(created), tostring(unscored), held}
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

# The fair stream lock (lock.py). Its keys: lock (the holder's token, with its lease),
# queue (waiting tokens, in arrival order), alive (waiting token -> the time, in Redis ms,
# by which its waiter must have shown it is alive). ``promote`` hands a free lock to the
# first live waiter (the caller then wakes it) and returns its token; ``release`` frees
# the holder's lock and hands it on.
_LOCK_LIB = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function promote(lock, queue, alive, lease, now)
  if redis.call('EXISTS', lock) == 1 then return false end
  while true do
    local head = redis.call('LPOP', queue)
    if not head then return false end
    local by = redis.call('HGET', alive, head)
    redis.call('HDEL', alive, head)
    if by and tonumber(by) >= now then
      redis.call('SET', lock, head, 'PX', lease)
      return head
    end
  end
end
local function release(lock, queue, alive, token, lease)
  if redis.call('GET', lock) == token then redis.call('DEL', lock) end
  return promote(lock, queue, alive, lease, now_ms()) or ''
end
local function show_alive(queue, alive, token, lease, now)
  redis.call('HSET', alive, token, now + lease)
  redis.call('PEXPIRE', queue, 3 * lease)
  redis.call('PEXPIRE', alive, 3 * lease)
end
-- take the lock if it is free and nobody waits ({1}), else join the queue ({0, the token
-- the lock was just handed to or '', the holder's lease left in ms})
local function acquire(lock, queue, alive, token, lease, now)
  local granted = promote(lock, queue, alive, lease, now)
  if not granted and redis.call('EXISTS', lock) == 0 then
    redis.call('SET', lock, token, 'PX', lease)
    return {1}
  end
  redis.call('RPUSH', queue, token)
  show_alive(queue, alive, token, lease, now)
  return {0, granted or '', redis.call('PTTL', lock)}
end
"""

# KEYS: lock, queue, alive. ARGV: token, lease ms.
_LOCK = _LOCK_LIB + """
local lock, queue, alive = KEYS[1], KEYS[2], KEYS[3]
local token, lease = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local function wait() show_alive(queue, alive, token, lease, now) end
"""

# The lock taken, or the queue joined (``acquire``).
ACQUIRE = _LOCK + """
return acquire(lock, queue, alive, token, lease, now)
"""

# A waiter awake (woken, or its sleep over): holding the lock now ({1}), or still waiting
# ({0, granted, lease left}, as ACQUIRE); it shows it is alive, and hands on a lapsed
# holder's lock. A waiter dropped as dead (it had not shown up in time) queues again.
CHECK = _LOCK + """
if redis.call('GET', lock) == token then return {1} end
if not redis.call('HGET', alive, token) then redis.call('RPUSH', queue, token) end
wait()
local granted = promote(lock, queue, alive, lease, now)
if granted == token then return {1} end
return {0, granted or '', redis.call('PTTL', lock)}
"""

# The holder is done: the lock goes to the first live waiter (its token returned, '' if
# none). A holder whose lease ran out releases nothing.
RELEASE = _LOCK + """
return release(lock, queue, alive, token, lease)
"""

# A waiter gives up (timed out, cancelled): out of the queue, and the lock passed on if it
# had just been handed to it.
ABANDON = _LOCK + """
redis.call('LREM', queue, 0, token)
redis.call('HDEL', alive, token)
return release(lock, queue, alive, token, lease)
"""

# KEYS: lock. ARGV: token, lease ms. The holder extends its own lease only.
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

# KEYS: lease. ARGV: owner. Give up a lease (a watch's) only if the owner holds it.
UNLOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
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

# A scored batch that changed no alert, in one call: what COMMIT and the MULTI around it
# write (the mark, the version, the changed sections, the sections dropped, the
# receipts, none of them pending any more), then the stream's lock released and handed
# on. KEYS: meta, sections, legacy state, lock, queue, alive, pending receipts' keys, then
# one receipt key per receipt. ARGV: points scored (""), ttl, receipt ttl, the lock token
# ("": keep the lock), lease ms, the number of sections and of names to drop, then the
# sections' name/value pairs, the names to drop, the receipts' values and their
# Idempotency-Keys. Returns {version (0: no such stream, nothing written), the token the
# lock was handed to or ''}.
COMMIT_STREAM = _LOCK_LIB + """
local meta, sections, legacy = KEYS[1], KEYS[2], KEYS[3]
local ns, nd = tonumber(ARGV[6]), tonumber(ARGV[7])
local version = 0
if redis.call('EXISTS', meta) == 1 then
  if ARGV[1] ~= '' then redis.call('HSET', meta, 'scored', ARGV[1]) end
  version = redis.call('HINCRBY', meta, 'version', 1)
  local a = 8
  if ns > 0 then
    redis.call('HSET', sections, unpack(ARGV, a, a + 2 * ns - 1))
    redis.call('DEL', legacy)  -- the whole-blob state the sections replace
  end
  a = a + 2 * ns
  if nd > 0 then redis.call('HDEL', sections, unpack(ARGV, a, a + nd - 1)) end
  a = a + nd
  local ttl = tonumber(ARGV[2])
  if ttl > 0 and ns + nd > 0 then redis.call('EXPIRE', sections, ttl) end
  local r = #KEYS - 7
  for i = 1, r do redis.call('SET', KEYS[7 + i], ARGV[a + i - 1], 'EX', ARGV[3]) end
  if r > 0 then redis.call('SREM', KEYS[7], unpack(ARGV, a + r, a + 2 * r - 1)) end
end
local granted = ''
if ARGV[4] ~= '' then
  granted = release(KEYS[4], KEYS[5], KEYS[6], ARGV[4], tonumber(ARGV[5]))
end
return {version, granted}
"""

# The stream's lock taken and a batch appended in one call (a lone request's first round
# trip): APPEND's KEYS and ARGV, then the lock's keys (lock, queue, alive) and its token
# and lease ms. The lock is taken first, as ACQUIRE takes it; if it is not free the
# batch is not appended and the call has queued for the lock, as ACQUIRE queues:
# {'err_locked', the token the lock was just handed to or '', the holder's lease left in
# ms}. Else APPEND's answer, the lock held whatever it says.
LOCKED_APPEND = _LOCK_LIB + """
local function append()
""" + APPEND + """
end
local k, a = #KEYS, #ARGV
local got = acquire(KEYS[k - 2], KEYS[k - 1], KEYS[k], ARGV[a - 1], tonumber(ARGV[a]),
                    now_ms())
if got[1] ~= 1 then return {'err_locked', got[2], got[3]} end
return append()
"""
