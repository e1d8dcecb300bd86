-- Bind new stream entries to requests (bind.lua's 'ids' mode) and fence the first request bound, if
-- it never ran, with its first attempt (start.lua): one round trip instead of two between a worker's
-- read and its engine. Only on a single Redis: the request's keys are not on the model's hash slot,
-- so they ride in ARGV (built from the templates below), which a Redis Cluster would refuse.
-- KEYS[1..5] as bind.lua.
-- ARGV[1] waiting-list key prefix; ARGV[2..7] the request record's, emitted text's and token
-- stream's keys, each as the part before and after the request id; ARGV[8..12] start.lua's ARGV
-- (worker id, max attempts, '1' if the worker can run it alone, result TTL, detach grace ms);
-- ARGV[13..] entry ids.
-- Returns {bind.lua's rows, rid, start.lua's reply}; rid '' (and no reply) when nothing was fenced:
-- a request that ran before (a continuation, its status not 'queued') is fenced by start.lua alone,
-- after the worker's own checks.
local args = {ARGV[1], 'ids'}
for i = 13, #ARGV do args[#args + 1] = ARGV[i] end
local rows = bind(KEYS, args)
for _, row in ipairs(rows) do
  local rid = row[2]
  if rid ~= '' then
    local record = ARGV[2] .. rid .. ARGV[3]
    if redis.call('HGET', record, 'status') ~= 'queued' then
      return {rows, '', {}}
    end
    local started = start({record, ARGV[4] .. rid .. ARGV[5], ARGV[6] .. rid .. ARGV[7]},
      {ARGV[8], ARGV[9], ARGV[10], ARGV[11], ARGV[12]})
    return {rows, rid, started}
  end
end
return {rows, '', {}}
