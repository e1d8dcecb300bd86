-- Move a batch to another status if it is in one of the given ones. KEYS[1] the batch; ARGV[1] the
-- statuses it may move from (space-separated), ARGV[2] the new status, ARGV[3] the time (s), kept
-- as '<status>_at'. Returns 1 when moved, 0 when the batch is gone or in another status.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then
  return 0
end
for from in string.gmatch(ARGV[1], '%S+') do
  if from == status then
    redis.call('HSET', KEYS[1], 'status', ARGV[2], ARGV[2] .. '_at', ARGV[3])
    return 1
  end
end
return 0
