-- delete: removes whatever the name is bound to (key pair or reservation) and frees its quota
-- slot (EmbeddedRegistry::delete).
--
-- KEYS[1]  <prefix>:{<scope>}:pairs   hash: name -> Entry JSON
-- KEYS[2]  <prefix>:{<scope>}:used    string: slots counted against the quota
-- KEYS[3]  <prefix>:{<scope>}:deadlines  sorted set of reservation deadlines (reserve.lua)
-- ARGV[1]  name
--
-- Returns 1 when something was removed, else 0.

if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[2], string.format('%.0f', math.max(used - 1, 0)))
return 1
