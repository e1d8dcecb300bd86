-- Admit a job atomically: refuse when the lane is full, else create the request record and XADD.
-- KEYS[1] jobs stream of the model and lane, KEYS[2] request record
-- ARGV[1] rid, ARGV[2] max queued, ARGV[3] consumer group, ARGV[4] X-Request-ID, ARGV[5] record TTL (s),
-- ARGV[6..] field/value pairs of the record
-- Returns {1, waiting} when enqueued, {0, waiting} when the lane is full, {-1, 0} when the rid exists.
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[3], '0', 'MKSTREAM')
end
-- Entries are deleted when acknowledged, so XLEN = waiting + in flight; XPENDING counts in flight.
local waiting = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[3])[1]
if waiting >= tonumber(ARGV[2]) then
  return {0, waiting}
end
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {-1, 0}
end
local fields = {}
for i = 6, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[2], unpack(fields))
local id = redis.call('XADD', KEYS[1], '*', 'rid', ARGV[1], 'xrid', ARGV[4])
redis.call('HSET', KEYS[2], 'job_id', id)
redis.call('EXPIRE', KEYS[2], ARGV[5])
return {1, waiting + 1}
