-- Take requests that ended while they waited for a worker (their deadline passed, or they were
-- cancelled) out of their lane: each one's deadline entry, its item on its tenant's waiting list and,
-- when the item was still there (no worker had bound it), one stream entry no worker has read, so
-- the lane's length, queue depth and `max queued` count only requests that can still run. (Entries
-- carry no request, see enqueue.lua: a worker that read one and finds no item acknowledges it.)
-- Every key is on the model's hash slot.
-- KEYS[1] jobs stream, KEYS[2] backlogged tenants (zset), KEYS[3] deadlines (zset)
-- ARGV[1] waiting-list key prefix (+ tenant), ARGV[2] consumer group, ARGV[3..] deadline members
-- (the waiting-list item, a tab, the tenant)
-- Returns how many were still waiting.
local function newer(a, b)  -- stream ids 'ms-seq'
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  if tonumber(ams) ~= tonumber(bms) then return tonumber(ams) > tonumber(bms) end
  return tonumber(aseq) > tonumber(bseq)
end

local function drop_unread_entry()
  local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)[1]
  if not last then return end
  local delivered = '0-0'
  local groups = redis.pcall('XINFO', 'GROUPS', KEYS[1])
  if type(groups) == 'table' then
    for _, group in ipairs(groups) do
      local fields = {}
      for j = 1, #group, 2 do fields[group[j]] = group[j + 1] end
      if fields['name'] == ARGV[2] then delivered = fields['last-delivered-id'] end
    end
  end
  if newer(last[1], delivered) then  -- unread entries are the stream's newest (read in order)
    redis.call('XDEL', KEYS[1], last[1])
  end
end

local waiting = 0
for i = 3, #ARGV do
  local member = ARGV[i]
  redis.call('ZREM', KEYS[3], member)
  local item, tenant = string.match(member, '^([^\t]*\t[^\t]*\t[^\t]*\t[^\t]*)\t(.*)$')
  if item then
    local list = ARGV[1] .. tenant
    if redis.call('LREM', list, 1, item) == 1 then
      waiting = waiting + 1
      if redis.call('LLEN', list) == 0 then
        redis.call('ZREM', KEYS[2], tenant)
      end
      drop_unread_entry()
    end
  end
end
return waiting
