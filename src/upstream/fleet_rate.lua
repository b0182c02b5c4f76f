-- fleet_rate: one upstream rate limit shared by every process on this Redis (workers, `serve`
-- in front of a cloud), per provider + account + region, as the clouds throttle. GCRA (the
-- generic cell rate algorithm, as redis-cell uses): one number per scope, the theoretical
-- arrival time of the next call, so a refusal costs one GET and nothing is ever scanned.
--
-- KEYS[1]  <prefix>:{<scope>}:upstream-rate   string: theoretical arrival time (µs, server clock)
-- ARGV[1]  interval between calls, µs (1,000,000 / rps)
-- ARGV[2]  burst (calls that may go at once after a quiet spell, >= 1)
--
-- Returns 0 when the call may go now (and counts it), else how many milliseconds to wait
-- before asking again (>= 1).
--
-- "now" is the server's clock (TIME), so every process judges by the same clock. Before Redis 5
-- a script that reads TIME may only write under effects replication, hence replicate_commands.

if redis.replicate_commands then
  redis.replicate_commands()
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])

local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
local next_tat = tat + interval
local allowed_at = next_tat - burst * interval
if now < allowed_at then
  return math.max(1, math.ceil((allowed_at - now) / 1000))
end
-- Kept only as long as it matters: once it is in the past, an absent key means the same.
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX',
  math.ceil((next_tat - now) / 1000) + 1000)
return 0
