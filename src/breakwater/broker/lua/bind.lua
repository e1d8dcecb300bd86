-- Bind stream entries a worker has read (or reclaimed) to requests, in fair order: the backlogged
-- tenant with the least weighted service (virtual token counter) goes first, and its counter grows by
-- the request's estimated tokens over its weight (Sheng et al., OSDI 2024: VTC). Work-conserving: only
-- backlogged tenants compete. An entry stays bound to its request until it is acknowledged, so a
-- reclaimed entry continues the same request. Every key is on the model's hash slot.
-- KEYS[1] jobs stream, KEYS[2] bound entries (hash: entry id -> request), KEYS[3] fair-share hash,
-- KEYS[4] backlogged tenants (zset)
-- ARGV[1] waiting-list key prefix (+ tenant), ARGV[2..] entry ids
-- Returns, per entry: {entry id, rid, X-Request-ID, tenant, cost, weight}; rid '' when no request
-- was waiting for it (the entry is then only acknowledged).
local out = {}
for i = 2, #ARGV do
  local id = ARGV[i]
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
    end
  end
  if item then
    local rid, xrid, tenant, cost, weight = string.match(item, '^([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)\t([^\t]*)$')
    out[#out + 1] = {id, rid, xrid, tenant, cost, weight}
  else
    out[#out + 1] = {id, '', '', '', '0', '1'}
  end
end
return out
