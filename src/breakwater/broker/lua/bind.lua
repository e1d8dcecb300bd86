-- Bind stream entries a worker has read (or reclaimed) to requests, in fair order: the backlogged
-- tenant with the least weighted service (virtual token counter) goes first, and its counter grows by
-- the request's estimated tokens over its weight (Sheng et al., OSDI 2024: VTC). Work-conserving: only
-- backlogged tenants compete. An entry stays bound to its request until it is acknowledged, so a
-- reclaimed entry continues the same request. Every key is on the model's hash slot.
-- KEYS[1] jobs stream, KEYS[2] bound entries (hash: entry id -> request), KEYS[3] fair-share hash,
-- KEYS[4] backlogged tenants (zset), KEYS[5] the lane's deadlines (enqueue.lua: a bound request's
-- is removed, its worker keeps it)
-- ARGV[1] waiting-list key prefix (+ tenant), ARGV[2] mode:
--   'ids': ARGV[3..] entry ids the worker read or reclaimed;
--   'preempt': a full worker asks for one more entry, for a tenant it would preempt another for.
--     ARGV[3] consumer group, ARGV[4] consumer, ARGV[5..] pairs (tenant, sequences it runs here).
--     Only when a tenant that has received more service than the least-served backlogged one runs
--     at least two more sequences here than it does: that tenant (the victim) gives up one sequence,
--     so a tenant that sends a little gets a slot without waiting for one to free, and it never
--     ends up with more sequences here than the victim (no thrashing). Otherwise nothing is read.
-- Returns, per entry: {entry id, rid, X-Request-ID, tenant, cost, weight}; rid '' when no request
-- was waiting for it (the entry is then only acknowledged). 'preempt' returns {victim, rows}, or {}.
local ids = {}
local victim
if ARGV[2] == 'preempt' then
  local least = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  if not least[1] then return {} end
  local score = tonumber(least[2])
  local running = {}
  for i = 5, #ARGV, 2 do running[ARGV[i]] = tonumber(ARGV[i + 1]) end
  local floor = (running[least[1]] or 0) + 2
  local most = score
  for tenant, n in pairs(running) do
    if n >= floor then
      local counter = tonumber(redis.call('HGET', KEYS[3], 'c:' .. tenant)) or 0
      if counter > most then victim, most = tenant, counter end
    end
  end
  if not victim then return {} end
  local read = redis.call('XREADGROUP', 'GROUP', ARGV[3], ARGV[4], 'COUNT', 1, 'STREAMS', KEYS[1], '>')
  if not read or not read[1] or #read[1][2] == 0 then return {} end
  ids[1] = read[1][2][1][1]
else
  for i = 3, #ARGV do ids[#ids + 1] = ARGV[i] end
end
local out = {}
for _, id in ipairs(ids) do
  local item = redis.call('HGET', KEYS[2], id)
  if not item then
    local entry = redis.call('XRANGE', KEYS[1], id, id)
    local fields = entry[1] and entry[1][2] or {}
    local rid, xrid
    for j = 1, #fields, 2 do
      if fields[j] == 'rid' then rid = fields[j + 1] elseif fields[j] == 'xrid' then xrid = fields[j + 1] end
    end
    if #entry == 0 then  -- deleted meanwhile (acknowledged by another attempt): nothing to bind
      item = nil
    elseif rid then  -- queued before fair share: the entry names its request
      item = rid .. '\t' .. (xrid or '') .. '\t\t0\t1'
    else
      -- A tenant listed as backlogged with nothing waiting (repaired here) is skipped, not the entry.
      while not item do
        local least = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
        local tenant = least[1]
        if not tenant then break end
        local list = ARGV[1] .. tenant
        local next_item = redis.call('LPOP', list)
        if next_item then
          redis.call('ZREM', KEYS[5], next_item .. '\t' .. tenant)
          local rid_, xrid_, cost, weight = string.match(next_item, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$')
          local counter = tonumber(least[2]) + tonumber(cost) / tonumber(weight)
          redis.call('HSET', KEYS[3], 'c:' .. tenant, counter)
          local floor = tonumber(redis.call('HGET', KEYS[3], 'floor')) or 0
          if counter > floor then redis.call('HSET', KEYS[3], 'floor', counter) end
          if redis.call('LLEN', list) > 0 then
            redis.call('ZADD', KEYS[4], counter, tenant)
          else
            redis.call('ZREM', KEYS[4], tenant)
          end
          item = rid_ .. '\t' .. xrid_ .. '\t' .. tenant .. '\t' .. cost .. '\t' .. weight
        else
          redis.call('ZREM', KEYS[4], tenant)
        end
      end
    end
    if item then
      redis.call('HSET', KEYS[2], id, item)
    elseif #entry > 0 and (tonumber(redis.call('HGET', KEYS[3], 'dead') or '0') or 0) > 0 then
      -- No request for it: the entry of one that ended while it waited (unqueue.lua) is read.
      redis.call('HINCRBY', KEYS[3], 'dead', -1)
    end
  end
  if item then
    local rid, xrid, tenant, cost, weight = string.match(item, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$')
    out[#out + 1] = {id, rid, xrid, tenant, cost, weight}
  else
    out[#out + 1] = {id, '', '', '', '0', '1'}
  end
end
if victim then return {victim, out} end
return out
