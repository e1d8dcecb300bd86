-- Admit a job: refuse when the lane is full, else create the request record, queue the request on
-- its tenant's waiting list (fair share, see bind.lua) and add one entry to the lane's stream. Stream
-- entries carry no request: a worker that reads one binds it to the next request in fair order, so
-- the stream's length, lag and pending counts stay the exact queue signals they were.
--
-- ARGV[1] mode:
--   'whole' (one Redis): all of it atomically. KEYS[1] jobs stream of the model and lane,
--     KEYS[2] request record, KEYS[3] the lane's fair-share hash, KEYS[4] the lane's backlogged
--     tenants (zset: tenant -> virtual token counter), KEYS[5] the lane's joins stream (capped: a
--     tenant that joins the backlog is announced to full workers, which may preempt a more-served
--     tenant's sequence for it; see bind.lua), KEYS[6] the lane's deadlines (zset: the request's
--     waiting-list item and tenant -> its deadline, ms; bind.lua removes it, gateway.deadlines ends
--     it at its deadline when no worker took it).
--   On a Redis Cluster the record ({rid}) and the job ({model}) live on different slots, so admission
--   is two calls, the record first (a worker that reads the job always finds its record):
--   'record': KEYS[1] request record; creates it unless it exists.
--   'job': the keys of 'whole' with KEYS[2] the lane's admitted requests (zset: rid -> ms, the last
--     ADMITTED_MS of them) instead of the record: a retried call queues the request once.
--   'forget': KEYS[1] request record; deletes it if no worker has started it (its job was refused).
-- ARGV[2] rid, ARGV[3] max queued, ARGV[4] consumer group, ARGV[5] X-Request-ID,
-- ARGV[6] result TTL (s), ARGV[7] timeout (ms), ARGV[8] tenant, ARGV[9] estimated tokens (cost),
-- ARGV[10] weight, ARGV[11] waiting-list key prefix (+ tenant), ARGV[12..] field/value pairs of the
-- spec ('whole' and 'record'); 'job': ARGV[12] the record's deadline (ms, as 'record' answered it)
-- Returns {1, waiting} when enqueued (or created), {0, waiting} when the lane is full, {2, 0} when this
-- rid is already queued (or created): a retried call whose first reply was lost was admitted once.
-- 'record' adds the record's deadline: {1 or 2, 0, deadline_ms}. A request's entry on the lane's
-- deadlines has its record's deadline as its score, so a cancel finds it by that (gateway.requests).
--
-- Every argument is checked before the first write, and the record gets its TTL before its job is
-- queued: a failing script leaves nothing half-written (Redis does not roll back a script's writes).
local ADMITTED_MS = 120000
local mode = ARGV[1]
if mode == 'forget' then
  local cur = redis.call('HMGET', KEYS[1], 'status', 'attempt')
  if cur[1] == 'queued' and cur[2] == '0' then
    redis.call('DEL', KEYS[1])
  end
  return {1, 0}
end
local result_ttl = tonumber(ARGV[6])
local timeout_ms = tonumber(ARGV[7])
if not result_ttl or not timeout_ms or result_ttl < 1 or timeout_ms < 1 or timeout_ms > 1e12 then
  return redis.error_reply('ERR invalid TTL or timeout')
end
local tenant, cost, weight = ARGV[8], tonumber(ARGV[9]), tonumber(ARGV[10])
if tenant == '' or not cost or cost < 0 or not weight or weight <= 0 then
  return redis.error_reply('ERR invalid tenant, cost or weight')
end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function create_record(key)
  local fields = {'status', 'queued', 'attempt', 0, 'seq', 0, 'tokens', 0, 'watchers', 1,
    'created', t[1], 'created_ms', now_ms, 'deadline_ms', now_ms + timeout_ms}
  for i = 12, #ARGV do
    fields[#fields + 1] = ARGV[i]
  end
  redis.call('HSET', key, unpack(fields))
  redis.call('EXPIRE', key, math.ceil(timeout_ms / 1000) + result_ttl)
end

if mode == 'record' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return {2, 0, tonumber(redis.call('HGET', KEYS[1], 'deadline_ms') or '0')}
  end
  create_record(KEYS[1])
  return {1, 0, now_ms + timeout_ms}
end
if mode == 'whole' then
  if redis.call('EXISTS', KEYS[2]) == 1 then
    return {2, 0}
  end
elseif redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  return {2, 0}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[1], ARGV[4], '0', 'MKSTREAM')
end
-- Entries are deleted when acknowledged, so XLEN = waiting + in flight; XPENDING counts in flight.
-- Less the entries left by requests that ended while they waited (the fair-share hash's `dead`,
-- unqueue.lua): no request will be bound to those.
-- (`dead` may exceed the unread entries: a worker may have read one and not bound it yet.)
local unread = redis.call('XLEN', KEYS[1]) - redis.call('XPENDING', KEYS[1], ARGV[4])[1]
local waiting = unread - (tonumber(redis.call('HGET', KEYS[3], 'dead') or '0') or 0)
if waiting < 0 then waiting = 0 end
if waiting >= tonumber(ARGV[3]) then
  return {0, waiting}
end
if mode == 'whole' then
  create_record(KEYS[2])
else
  redis.call('ZADD', KEYS[2], now_ms, ARGV[2])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now_ms - ADMITTED_MS)
  redis.call('PEXPIRE', KEYS[2], ADMITTED_MS)
end
-- A tenant that joins the backlog starts level with the least-served backlogged tenant (or where
-- service stands), so an idle spell does not bank credit (Sheng et al., OSDI 2024: VTC). Lifted to
-- that level, it goes just before the tenant it ties with: it has waited less than it was owed.
local list = ARGV[11] .. tenant
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
local item = ARGV[2] .. '\t' .. ARGV[5] .. '\t' .. cost .. '\t' .. weight
redis.call('RPUSH', list, item)
local deadline_ms = now_ms + timeout_ms
if mode == 'job' and tonumber(ARGV[12] or '') then
  deadline_ms = tonumber(ARGV[12])  -- the record's (on its own server's clock)
end
redis.call('ZADD', KEYS[6], deadline_ms, item .. '\t' .. tenant)
redis.call('XADD', KEYS[1], '*', 'slot', '1')
return {1, waiting + 1}
