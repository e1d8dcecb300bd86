-- A tenant's file quota held by the uploads being written now, so that two at once cannot both pass
-- it. KEYS[1] the bytes held (a counter). ARGV[1] 'take' or 'give', ARGV[2] this upload's bytes;
-- 'take' also ARGV[3] the bytes of the tenant's stored files, ARGV[4] the quota, ARGV[5] the
-- counter's TTL in seconds (an upload whose gateway died gives nothing back: its hold expires).
-- 'take' returns {1, held by the others} when the upload fits (and holds its bytes), else {0, held}.
local size = tonumber(ARGV[2])
if ARGV[1] == 'give' then
  if redis.call('DECRBY', KEYS[1], size) <= 0 then
    redis.call('DEL', KEYS[1])
  end
  return {1, 0}
end
local held = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[3]) + held + size > tonumber(ARGV[4]) then
  return {0, held}
end
redis.call('INCRBY', KEYS[1], size)
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {1, held}
