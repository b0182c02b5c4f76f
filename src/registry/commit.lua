-- commit: turns the job's reservation into its key-pair record (EmbeddedRegistry::commit).
-- Only over a reservation held by this job (expired or not, as in the embedded store);
-- anything else means the reservation was lost to another job.
--
-- KEYS[1]  <prefix>:{<scope>}:pairs   hash: name -> Entry JSON
-- ARGV[1]  name
-- ARGV[2]  job id (UUID, hyphenated)
-- ARGV[3]  the new entry: Entry::Pair JSON as serde writes it (public half only)
--
-- Returns "ok" | "lost". The quota count is unchanged: the reservation's slot becomes the
-- record's.

local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then
  return 'lost'
end
local ok, e = pcall(cjson.decode, raw)
if not ok or type(e) ~= 'table' then
  error('keyfleet: entry ' .. ARGV[1] .. ' is not valid JSON')
end
if e.state ~= 'reserved' or string.lower(tostring(e.job_id)) ~= string.lower(ARGV[2]) then
  return 'lost'
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 'ok'
