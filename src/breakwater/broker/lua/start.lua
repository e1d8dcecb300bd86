-- A worker takes a claimed job: check it is still worth running, then fence it with a new attempt.
-- KEYS[1] request record
-- ARGV[1] worker id, ARGV[2] now (ms), ARGV[3] max attempts
-- Returns {'run', attempt, record...} or {'missing'|'terminal'|'expired'|'cancelled'|'poison', attempt}
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'missing', 0}
end
local cur = redis.call('HMGET', KEYS[1], 'status', 'deadline_ms', 'attempt', 'cancel')
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
if attempt >= tonumber(ARGV[3]) then
  return {'poison', attempt}
end
attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_ms', ARGV[2])
return {'run', attempt, redis.call('HGETALL', KEYS[1])}
