-- release: gives back the job's reservation or its undelivered key pair, and its quota slot
-- (EmbeddedRegistry::release). Anything else under the name is left alone: another job's
-- entry, or a delivered key pair (whose private key is out in the world).
--
-- Runs after entry.lua (`job_entry`).
--
-- KEYS[1]  <prefix>:{<scope>}:pairs   hash: name -> Entry JSON
-- KEYS[2]  <prefix>:{<scope>}:used    string: slots counted against the quota
-- KEYS[3]  <prefix>:{<scope>}:deadlines  sorted set of reservation deadlines (reserve.lua)
-- ARGV[1]  name
-- ARGV[2]  job id (UUID, hyphenated)
--
-- Returns 1 when something was freed, else 0.

local e = job_entry(nil)
if not e then
  return 0
end
if not (e.state == 'reserved' or (e.state == 'pair' and e.delivered == false)) then
  return 0
end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
redis.call('SET', KEYS[2], string.format('%.0f', math.max(used - 1, 0)))
return 1
