-- A worker takes a claimed job: check it is still worth running, then fence it with a new attempt.
-- KEYS[1] request record, KEYS[2] emitted text, KEYS[3] token stream
-- ARGV[1] worker id, ARGV[2] max attempts, ARGV[3] '1' if the worker can run it alone,
-- ARGV[4] result TTL (s), ARGV[5] the detach grace (ms; '' or absent: not checked)
-- Returns {'run', attempt, emitted, record...} or
--         {'missing'|'terminal'|'expired'|'detached'|'poison'|'suspect', attempt}
-- 'detached': nobody has followed it for longer than the grace (its client left while it was
-- queued): it would run for nobody, so the worker cancels it instead, as its heartbeat would.
--
-- Deadlines are compared with Redis's clock (TIME), never a worker's, so clock skew between hosts
-- cannot expire or extend a request.
--
-- Poison detection counts attempts that ended without progress: an attempt that emitted tokens resets
-- the count, so jobs that merely shared a batch with a crashing one are not dead-lettered. A job whose
-- last attempt made no progress is a suspect: it only runs on a worker with nothing else running
-- ('suspect' tells a busy worker to hold it until its engine is empty).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing', 0}
end
local cur = redis.call('HMGET', KEYS[1], 'status', 'deadline_ms', 'attempt', 'tokens',
  'tokens_at_start', 'failures')
local attempt = tonumber(cur[3] or '0')
if cur[1] == 'done' or cur[1] == 'error' or cur[1] == 'cancelled' then
  return {'terminal', attempt}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = tonumber(cur[2] or '0')
if deadline > 0 and now_ms > deadline then
  return {'expired', attempt}
end
local grace = tonumber(ARGV[5] or '')
if grace then
  local w = redis.call('HMGET', KEYS[1], 'watchers', 'detached_ms')
  local detached = tonumber(w[2] or '0')
  if tonumber(w[1] or '0') <= 0 and detached > 0 and now_ms - detached > grace then
    return {'detached', attempt}
  end
end
local max_attempts = tonumber(ARGV[2])
local failures = tonumber(cur[6] or '0')
if attempt > 0 then
  if tonumber(cur[4] or '0') > tonumber(cur[5] or '0') then
    failures = 0
  else
    failures = failures + 1
  end
end
if failures >= max_attempts or attempt >= 4 * max_attempts then
  return {'poison', attempt}
end
if failures > 0 and ARGV[3] ~= '1' then
  return {'suspect', attempt}
end
attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_ms', now_ms,
  'failures', failures, 'tokens_at_start', cur[4] or '0', 'wseq', 0)
-- A running request must outlive its run: the lease refresh keeps extending this while it runs.
local ttl = tonumber(ARGV[4])
for i = 1, 3 do
  if redis.call('TTL', KEYS[i]) < ttl then
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
return {'run', attempt, redis.call('GET', KEYS[2]) or '', redis.call('HGETALL', KEYS[1])}
