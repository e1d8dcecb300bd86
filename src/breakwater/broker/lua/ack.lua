-- Acknowledge and delete a finished job's entry (queue memory stays bounded, XLEN exact), forget its
-- binding, and correct its tenant's virtual token counter from the estimate to the tokens it used --
-- once: a second ack of the same entry (a retry after a lost reply, or two attempts that both ended
-- it) changes nothing.
-- KEYS[1] jobs stream, KEYS[2] bound entries, KEYS[3] fair-share hash, KEYS[4] backlogged tenants
-- ARGV[1] consumer group, ARGV[2] entry id, ARGV[3] tenant ('' : none), ARGV[4] counter correction

-- Jobs end out of order: when the entry the group read last is deleted while an older one is still
-- in the stream, Redis answers the group's `lag` (XINFO GROUPS, what KEDA's redis-streams trigger
-- reads) NULL until the group reads on, because its bound on deletions (`max-deleted-entry-id`)
-- then reaches the group's last id, where it counts a deletion as possibly unread. None is: only
-- delivered entries are ever deleted (unqueue.lua leaves unread ones), so the lag Redis keeps
-- (entries added - entries read) is exact. Lower the bound to just below that entry: every other
-- deletion is below it too (also when it was the newest entry: those added next would be behind it).
local function keep_lag_known(stream, group, id)
  local last
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    if g[2] == group then
      for i = 3, #g - 1, 2 do
        if g[i] == 'last-delivered-id' then last = g[i + 1] end
      end
    end
  end
  if last ~= id then return end
  local info = redis.call('XINFO', 'STREAM', stream)
  local top
  for i = 1, #info - 1, 2 do
    if info[i] == 'last-generated-id' then top = info[i + 1] end
  end
  if top == nil then return end
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  local below
  if seq ~= '0' then
    below = ms .. '-' .. string.format('%d', tonumber(seq) - 1)
  elseif ms ~= '0' then
    below = string.format('%d', tonumber(ms) - 1) .. '-18446744073709551615'
  else
    return
  end
  redis.call('XSETID', stream, top, 'MAXDELETEDID', below)
end

redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if redis.call('XDEL', KEYS[1], ARGV[2]) == 1 then
  keep_lag_known(KEYS[1], ARGV[1], ARGV[2])
end
local forgotten = redis.call('HDEL', KEYS[2], ARGV[2])
local tenant, delta = ARGV[3], tonumber(ARGV[4])
if forgotten == 1 and tenant ~= '' and delta ~= 0 then
  redis.call('HINCRBYFLOAT', KEYS[3], 'c:' .. tenant, delta)
  if redis.call('ZSCORE', KEYS[4], tenant) then
    redis.call('ZINCRBY', KEYS[4], delta, tenant)
  end
end
return 1
