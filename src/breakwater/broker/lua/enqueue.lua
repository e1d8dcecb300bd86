-- Admit a job atomically: refuse when the lane is full, else create the request record and XADD.
-- KEYS[1] jobs stream of the model and lane, KEYS[2] request record
-- ARGV[1] rid, ARGV[2] max queued, ARGV[3] consumer group, ARGV[4] X-Request-ID,
-- ARGV[5] result TTL (s), ARGV[6] timeout (ms), ARGV[7..] field/value pairs of the request spec
-- Returns {1, waiting} when enqueued, {0, waiting} when the lane is full, {2, 0} when this rid is
-- already queued (a retried call whose first reply was lost: it was admitted once, and only once).
--
-- Every argument is checked before the first write, and the record gets its TTL before its job is
-- queued: a failing script leaves nothing half-written (Redis does not roll back a script's writes).
local result_ttl = tonumber(ARGV[5])
local timeout_ms = tonumber(ARGV[6])
if not result_ttl or not timeout_ms or result_ttl < 1 or timeout_ms < 1 or timeout_ms > 1e12 then
  return redis.error_reply('ERR invalid TTL or timeout')
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {2, 0}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[3], '0', 'MKSTREAM')
end
-- Entries are deleted when acknowledged, so XLEN = waiting + in flight; XPENDING counts in flight.
local waiting = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[3])[1]
if waiting >= tonumber(ARGV[2]) then
  return {0, waiting}
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local fields = {'status', 'queued', 'attempt', 0, 'seq', 0, 'tokens', 0, 'watchers', 1,
  'created', t[1], 'created_ms', now_ms, 'deadline_ms', now_ms + timeout_ms}
for i = 7, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('EXPIRE', KEYS[2], math.ceil(timeout_ms / 1000) + result_ttl)
local id = redis.call('XADD', KEYS[1], '*', 'rid', ARGV[1], 'xrid', ARGV[4])
redis.call('HSET', KEYS[2], 'job_id', id)
return {1, waiting + 1}
