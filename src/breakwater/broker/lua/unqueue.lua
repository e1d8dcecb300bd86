-- Take requests that ended while they waited for a worker (their deadline passed, or they were
-- cancelled) out of their lane: each one's deadline entry and its item on its tenant's waiting list.
-- An item still there (no worker had bound it) leaves a stream entry no request will be bound to
-- (entries carry no request, see enqueue.lua): it is counted in the fair-share hash's `dead`, which
-- enqueue.lua's `max queued` and the queue depth subtract, until a worker reads an entry and finds
-- no request for it (bind.lua). Deleting an unread entry instead would leave the consumer group's
-- `lag` unknown (NULL) until the group had read past it, and autoscalers read that lag.
-- Every key is on the model's hash slot.
-- KEYS[1] backlogged tenants (zset), KEYS[2] deadlines (zset), KEYS[3] fair-share hash
-- ARGV[1] waiting-list key prefix (+ tenant), ARGV[2..] deadline members (the waiting-list item, a
-- tab, the tenant)
-- Returns the rids of those that were still waiting: no worker will settle them.
local waiting = {}
for i = 2, #ARGV do
  local member = ARGV[i]
  redis.call('ZREM', KEYS[2], member)
  local item, tenant = string.match(member, '^([^\t]*\t[^\t]*\t[^\t]*\t[^\t]*)\t(.*)$')
  if item then
    local list = ARGV[1] .. tenant
    if redis.call('LREM', list, 1, item) == 1 then
      waiting[#waiting + 1] = string.match(item, '^([^\t]*)')
      redis.call('HINCRBY', KEYS[3], 'dead', 1)
      if redis.call('LLEN', list) == 0 then
        redis.call('ZREM', KEYS[1], tenant)
      end
    end
  end
end
return waiting
