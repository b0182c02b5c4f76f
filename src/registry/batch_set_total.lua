-- batch_set_total: records how many jobs a batch has, once its producer knows
-- (BatchStatusStore::set_total in src/batch_status.rs), and refreshes the batch's expiry.
--
-- KEYS[1]  <prefix>:batch:{<batch>}:counts  hash: total, answered, created, failed:<code>
-- KEYS[2]  <prefix>:batch:{<batch>}:jobs    hash: job id -> outcome
-- KEYS[3]  <prefix>:batch:{<batch>}:recipient  string: the batch's age recipient (may be absent)
-- ARGV[1]  total
-- ARGV[2]  time to live of the batch's keys, milliseconds
--
-- Returns 1.

redis.call('HSET', KEYS[1], 'total', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
return 1
