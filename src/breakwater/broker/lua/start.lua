-- A worker takes a claimed job: check it is still worth running, then fence it with a new attempt.
-- KEYS[1] request record
-- ARGV[1] worker id, ARGV[2] now (ms), ARGV[3] max attempts, ARGV[4] '1' if the worker can run it alone
-- Returns {'run', attempt, record...} or
--         {'missing'|'terminal'|'expired'|'cancelled'|'poison'|'suspect', attempt}
--
-- Poison detection counts attempts that ended without progress: an attempt that emitted tokens resets
-- the count, so jobs that merely shared a batch with a crashing one are not dead-lettered. A job whose
-- last attempt made no progress is a suspect: it only runs on a worker with nothing else running
-- ('suspect' tells a busy worker to hold it until its engine is empty).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing', 0}
end
local cur = redis.call('HMGET', KEYS[1], 'status', 'deadline_ms', 'attempt', 'cancel', 'tokens',
  'tokens_at_start', 'failures')
local attempt = tonumber(cur[3] or '0')
if cur[1] == 'done' or cur[1] == 'error' or cur[1] == 'cancelled' then
  return {'terminal', attempt}
end
if cur[4] == '1' then
  return {'cancelled', attempt}
end
local deadline = tonumber(cur[2] or '0')
if deadline > 0 and tonumber(ARGV[2]) > deadline then
  return {'expired', attempt}
end
local max_attempts = tonumber(ARGV[3])
local failures = tonumber(cur[7] or '0')
if attempt > 0 then
  if tonumber(cur[5] or '0') > tonumber(cur[6] or '0') then
    failures = 0
  else
    failures = failures + 1
  end
end
if failures >= max_attempts or attempt >= 4 * max_attempts then
  return {'poison', attempt}
end
if failures > 0 and ARGV[4] ~= '1' then
  return {'suspect', attempt}
end
attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_ms', ARGV[2],
  'failures', failures, 'tokens_at_start', cur[5] or '0')
return {'run', attempt, redis.call('HGETALL', KEYS[1])}
