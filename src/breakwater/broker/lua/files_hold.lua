-- A tenant's file quota held by the uploads being written now, so that two at once cannot both pass
-- it. KEYS[1] the tenant's holds (zset: '<upload id>:<bytes>' -> when the hold lapses, unix s: an
-- upload whose gateway died gives nothing back, and its hold alone lapses). ARGV[1] 'take' or
-- 'give', ARGV[2] the upload's member; 'take' also ARGV[3] the quota, ARGV[4] how long the hold
-- lasts (s). The caller adds the stored files, read after the hold is taken.
-- 'take' returns {1, bytes the other holds take} when the holds fit the quota (this one taken),
-- else {0, those}.
if ARGV[1] == 'give' then
  redis.call('ZREM', KEYS[1], ARGV[2])
  return {1, 0}
end
local now = tonumber(redis.call('TIME')[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = 0
for _, member in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  held = held + tonumber(string.match(member, ':(%d+)$'))
end
local size = tonumber(string.match(ARGV[2], ':(%d+)$'))
if held + size > tonumber(ARGV[3]) then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[2])
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[4]) then  -- never shortens a longer hold's life
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return {1, held}
