-- commit: turns the job's reservation into its key-pair record (EmbeddedRegistry::commit).
-- Only over a reservation held by this job (expired or not, as in the embedded store);
-- anything else means the reservation was lost to another job.
--
-- Runs after entry.lua (`job_entry`).
--
-- KEYS[1]  <prefix>:{<scope>}:pairs   hash: name -> Entry JSON
-- KEYS[2]  <prefix>:{<scope>}:deadlines  sorted set of reservation deadlines (reserve.lua)
-- ARGV[1]  name
-- ARGV[2]  job id (UUID, hyphenated)
-- ARGV[3]  the new entry: Entry::Pair JSON as serde writes it (public half only)
--
-- Returns "ok" | "lost". The quota count is unchanged: the reservation's slot becomes the
-- record's.

local e = job_entry('reserved')
if not e then
  return 'lost'
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return 'ok'
