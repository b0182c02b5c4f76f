-- mark_delivered: the private key of the job's key pair reached its destination, so from now
-- on the name answers "already exists" even to its own job (EmbeddedRegistry::mark_delivered).
--
-- Runs after entry.lua (`job_entry`).
--
-- KEYS[1]  <prefix>:{<scope>}:pairs   hash: name -> Entry JSON
-- ARGV[1]  name
-- ARGV[2]  job id (UUID, hyphenated)
--
-- Returns "ok" | "lost" (no key pair of this job under that name).
--
-- The record is edited as text rather than decoded and re-encoded: cjson would write an empty
-- tag list as {} (which serde refuses as a list) and round numbers to 14 digits. serde writes
-- compact JSON and "delivered" is the only key of that name in an entry (user text sits in
-- strings, where a quote is always escaped), so exactly one replacement is expected.

local e, raw = job_entry('pair')
if not e then
  return 'lost'
end
if e.delivered == true then
  return 'ok'
end
local updated, n = string.gsub(raw, '"delivered":false', '"delivered":true')
if n ~= 1 then
  error('keyfleet: entry ' .. ARGV[1] .. ' has ' .. n .. ' "delivered":false fields, expected 1')
end
redis.call('HSET', KEYS[1], ARGV[1], updated)
return 'ok'
