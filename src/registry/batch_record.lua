-- batch_record: counts jobs' outcomes in their batch's progress, exactly once per job id
-- (BatchStatusStore::record_many in batch_status.rs). A job answered again (redelivery) finds
-- its id already recorded and changes nothing. The jobs of one v2 message are counted in one
-- call, so the counters are written once per distinct outcome, not once per job.
--
-- KEYS[1]  <prefix>:batch:{<batch>}:counts  hash: total, answered, created, failed:<code>
-- KEYS[2]  <prefix>:batch:{<batch>}:jobs    hash: job id -> outcome
-- KEYS[3]  <prefix>:batch:{<batch>}:recipient  string: the batch's age recipient (may be absent)
-- ARGV[1]  time to live of the batch's keys, milliseconds (refreshed here)
-- ARGV[2], ARGV[3], ...  job id, outcome ("created" or an error code), for each job
--
-- Returns how many of the jobs were counted (the others were recorded before).

local fields = {}
local order = {}
local counted = 0
for i = 2, #ARGV - 1, 2 do
  if redis.call('HSETNX', KEYS[2], ARGV[i], ARGV[i + 1]) == 1 then
    counted = counted + 1
    local field = 'created'
    if ARGV[i + 1] ~= 'created' then
      field = 'failed:' .. ARGV[i + 1]
    end
    if fields[field] == nil then
      fields[field] = 0
      order[#order + 1] = field
    end
    fields[field] = fields[field] + 1
  end
end
if counted == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[1], 'answered', counted)
for _, field in ipairs(order) do
  redis.call('HINCRBY', KEYS[1], field, fields[field])
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[1])
return counted
