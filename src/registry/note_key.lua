-- note_key: before a job registers a key upstream, adds the public key (OpenSSH line) to its
-- reservation's "tried_keys" (see Entry::Reserved in src/registry/mod.rs), so a later attempt
-- can tell the job's own lost keys from a key pair someone else made under the same name.
--
-- Runs after entry.lua (`job_entry`).
--
-- KEYS[1]  <prefix>:{<scope>}:pairs   hash: name -> Entry JSON
-- ARGV[1]  name
-- ARGV[2]  job id (UUID, hyphenated)
-- ARGV[3]  the public key, `type base64`
--
-- Returns the JSON list of tried keys, or "lost" when the job no longer holds a reservation.

local e = job_entry('reserved')
if not e then
  return 'lost'
end
local tried = {}
local known = false
for _, k in ipairs(e.tried_keys or {}) do
  tried[#tried + 1] = k
  if k == ARGV[3] then
    known = true
  end
end
if not known then
  tried[#tried + 1] = ARGV[3]
end
redis.call('HSET', KEYS[1], ARGV[1], string.format(
  '{"state":"reserved","job_id":"%s","deadline_ms":%s,"tried_keys":%s}',
  tostring(e.job_id), string.format('%.0f', tonumber(e.deadline_ms)), cjson.encode(tried)))
return cjson.encode(tried)
