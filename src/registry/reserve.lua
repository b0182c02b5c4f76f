-- reserve: binds a name in one scope to a job, counting it against the scope's quota unless
-- the job already holds it. The rules are those of `reserve_decision` in src/registry/mod.rs
-- and of EmbeddedRegistry::reserve, applied atomically:
--   no entry                                  -> needs a slot: "fresh", or "quota" when full
--   reservation of this job                   -> "resumed"   (nothing counted twice)
--   expired reservation of another job        -> "tookover"  (its slot reused)
--   undelivered key pair of this job          -> "replacing" (its slot reused)
--   delivered key pair of this job            -> "delivered" (answered before; nothing written)
--   anything else                             -> "exists"
-- At the quota, expired reservations of the scope are swept first; as in the embedded store,
-- the sweep is only kept when it makes room (otherwise no entry is written). They are found in
-- the scope's deadline index (a sorted set, name -> reservation deadline), so a refusal at a
-- full scope costs O(log n), not a read of the whole scope. The index may hold names that are
-- no longer reservations (committed, released, deleted by an older version): each one found
-- is checked against its entry and dropped from the index. A scope written before the index
-- existed is indexed once, by one full read, the first time it is full (KEYS[4] marks it).
-- On success the entry becomes {"state":"reserved","job_id":..,"deadline_ms":now+ttl} plus
-- "tried_keys" when resuming (kept) or replacing (the pair's earlier keys and its own).
--
-- KEYS[1]  <prefix>:{<scope>}:pairs   hash: name -> Entry JSON
-- KEYS[2]  <prefix>:{<scope>}:used    string: slots counted against the quota
-- KEYS[3]  <prefix>:{<scope>}:deadlines  sorted set: name -> reservation deadline (ms)
-- KEYS[4]  <prefix>:{<scope>}:indexed    string: set once KEYS[3] covers every reservation
-- ARGV[1]  name
-- ARGV[2]  job id (UUID, hyphenated)
-- ARGV[3]  quota (integer >= 0)
-- ARGV[4]  reservation TTL in milliseconds
--
-- Returns "fresh" | "resumed" | "tookover" | "replacing" | "delivered" | "exists" | "quota".
--
-- "now" is the server's clock (TIME), so every worker judges deadlines by the same clock,
-- whatever its own says. Before Redis 5 a script that reads TIME may only write under effects
-- replication, hence replicate_commands (a no-op since Redis 5).

if redis.replicate_commands then
  redis.replicate_commands()
end

local name = ARGV[1]
local job = string.lower(ARGV[2])
local quota = tonumber(ARGV[3])
local ttl = tonumber(ARGV[4])

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function decode(raw, what)
  local ok, e = pcall(cjson.decode, raw)
  if not ok or type(e) ~= 'table' then
    error('keyfleet: entry ' .. what .. ' is not valid JSON')
  end
  return e
end

-- Integers are doubles in Lua 5.1; '%.0f' prints them exactly up to 2^53.
local function int(n)
  return string.format('%.0f', n)
end

local how
local tried = {}
local raw = redis.call('HGET', KEYS[1], name)
if raw then
  local e = decode(raw, name)
  local owner = string.lower(tostring(e.job_id))
  if e.state == 'reserved' and owner == job then
    how = 'resumed'
    tried = e.tried_keys or {}
  elseif e.state == 'reserved' and tonumber(e.deadline_ms) <= now then
    how = 'tookover'
  elseif e.state == 'pair' and owner == job and e.delivered == false then
    how = 'replacing'
    -- The public keys this job tried before, and the pair's own: its private half is lost.
    for _, k in ipairs(e.earlier_keys or {}) do
      tried[#tried + 1] = k
    end
    local known = false
    for _, k in ipairs(tried) do
      if k == e.public_key then
        known = true
      end
    end
    if not known then
      tried[#tried + 1] = e.public_key
    end
  elseif e.state == 'pair' and owner == job then
    return 'delivered'
  else
    return 'exists'
  end
else
  local used = tonumber(redis.call('GET', KEYS[2]) or '0')
  if used >= quota then
    if redis.call('EXISTS', KEYS[4]) == 0 then
      local all = redis.call('HGETALL', KEYS[1])
      for i = 1, #all, 2 do
        -- Key pairs are large and never expire: only decode what can be a reservation. The
        -- tag "state" is the only key of that name in an entry, so the plain search is exact.
        if string.find(all[i + 1], '"state":"reserved"', 1, true) then
          local e = decode(all[i + 1], all[i])
          if e.state == 'reserved' then
            redis.call('ZADD', KEYS[3], int(tonumber(e.deadline_ms)), all[i])
          end
        end
      end
      redis.call('SET', KEYS[4], '1')
    end
    local expired = {}
    for _, k in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', int(now))) do
      local r = redis.call('HGET', KEYS[1], k)
      local e = r and decode(r, k)
      if e and e.state == 'reserved' and tonumber(e.deadline_ms) <= now then
        expired[#expired + 1] = k
      elseif e and e.state == 'reserved' then
        redis.call('ZADD', KEYS[3], int(tonumber(e.deadline_ms)), k)
      else
        redis.call('ZREM', KEYS[3], k)
      end
    end
    used = used - math.min(#expired, used)
    if used >= quota then
      return 'quota'
    end
    for _, k in ipairs(expired) do
      redis.call('HDEL', KEYS[1], k)
      redis.call('ZREM', KEYS[3], k)
    end
  end
  redis.call('SET', KEYS[2], int(used + 1))
  how = 'fresh'
end

-- cjson writes an empty list as {}: the field is left out instead.
local extra = ''
if #tried > 0 then
  extra = ',"tried_keys":' .. cjson.encode(tried)
end
redis.call('HSET', KEYS[1], name, string.format(
  '{"state":"reserved","job_id":"%s","deadline_ms":%s%s}', ARGV[2], int(now + ttl), extra))
redis.call('ZADD', KEYS[3], int(now + ttl), name)
return how
