-- batch_record: counts one job's outcome in its batch's progress, exactly once per job id
-- (BatchStatusStore::record in src/batch_status.rs). A job answered again (redelivery) finds
-- its id already recorded and changes nothing.
--
-- KEYS[1]  <prefix>:batch:{<batch>}:counts  hash: total, answered, created, failed:<code>
-- KEYS[2]  <prefix>:batch:{<batch>}:jobs    hash: job id -> outcome
-- KEYS[3]  <prefix>:batch:{<batch>}:recipient  string: the batch's age recipient (may be absent)
-- ARGV[1]  job id
-- ARGV[2]  outcome: "created" or an error code
-- ARGV[3]  time to live of the batch's keys, milliseconds (refreshed here)
--
-- Returns 1 when counted, 0 when the job was already recorded.

if redis.call('HSETNX', KEYS[2], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'answered', 1)
if ARGV[2] == 'created' then
  redis.call('HINCRBY', KEYS[1], 'created', 1)
else
  redis.call('HINCRBY', KEYS[1], 'failed:' .. ARGV[2], 1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
return 1
