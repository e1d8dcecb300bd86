-- Admit a job atomically: refuse when the lane is full, else create the request record, queue the
-- request on its tenant's waiting list (fair share, see bind.lua) and add one entry to the lane's
-- stream. Stream entries carry no request: a worker that reads one binds it to the next request in
-- fair order, so the stream's length, lag and pending counts stay the exact queue signals they were.
-- KEYS[1] jobs stream of the model and lane, KEYS[2] request record, KEYS[3] the lane's fair-share
-- hash, KEYS[4] the lane's backlogged tenants (zset: tenant -> virtual token counter), KEYS[5] the
-- lane's joins stream (capped: a tenant that joins the backlog is announced to full workers, which
-- may preempt a more-served tenant's sequence for it; see bind.lua)
-- ARGV[1] rid, ARGV[2] max queued, ARGV[3] consumer group, ARGV[4] X-Request-ID,
-- ARGV[5] result TTL (s), ARGV[6] timeout (ms), ARGV[7] tenant, ARGV[8] estimated tokens (cost),
-- ARGV[9] weight, ARGV[10] waiting-list key prefix (+ tenant), ARGV[11..] field/value pairs of the spec
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
local tenant, cost, weight = ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
if tenant == '' or not cost or cost < 0 or not weight or weight <= 0 then
  return redis.error_reply('ERR invalid tenant, cost or weight')
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
for i = 11, #ARGV do
  fields[#fields + 1] = ARGV[i]
end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('EXPIRE', KEYS[2], math.ceil(timeout_ms / 1000) + result_ttl)
-- A tenant that joins the backlog starts level with the least-served backlogged tenant (or where
-- service stands), so an idle spell does not bank credit (Sheng et al., OSDI 2024: VTC). Lifted to
-- that level, it goes just before the tenant it ties with: it has waited less than it was owed.
local list = ARGV[10] .. tenant
if redis.call('LLEN', list) == 0 then
  local counter = tonumber(redis.call('HGET', KEYS[3], 'c:' .. tenant)) or 0
  local least = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  local level = tonumber(least[2]) or tonumber(redis.call('HGET', KEYS[3], 'floor')) or 0
  if counter < level then
    counter = level - 0.001
    redis.call('HSET', KEYS[3], 'c:' .. tenant, counter)  -- the credit it gives up is gone for good
  end
  redis.call('ZADD', KEYS[4], counter, tenant)
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', 64, '*', 't', tenant)
end
redis.call('RPUSH', list, ARGV[1] .. '\t' .. ARGV[4] .. '\t' .. cost .. '\t' .. weight)
redis.call('XADD', KEYS[1], '*', 'slot', '1')
return {1, waiting + 1}
