-- entry.lua: put in front of the scripts that act on one job's entry (redis.rs joins them).
--
-- KEYS[1]  <prefix>:{<scope>}:pairs   hash: name -> Entry JSON
-- KEYS[2]  <prefix>:{<scope>}:deadlines  sorted set of reservation deadlines (reserve.lua)
-- ARGV[1]  name
-- ARGV[2]  job id (UUID, hyphenated)

-- The entry under ARGV[1] when it belongs to job ARGV[2] (job ids compare without regard to
-- case) and, if `state` is given, is in that state: decoded, and its raw JSON. nil otherwise.
local function job_entry(state)
  local raw = redis.call('HGET', KEYS[1], ARGV[1])
  if not raw then
    return nil, nil
  end
  local ok, e = pcall(cjson.decode, raw)
  if not ok or type(e) ~= 'table' then
    error('keyfleet: entry ' .. ARGV[1] .. ' is not valid JSON')
  end
  if string.lower(tostring(e.job_id)) ~= string.lower(ARGV[2]) then
    return nil, nil
  end
  if state and e.state ~= state then
    return nil, nil
  end
  return e, raw
end
