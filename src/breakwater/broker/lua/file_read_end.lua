-- A download of a file ended: its readers' count (KEYS[1]) one less, the key gone at 0. A count
-- that lapsed during a slow download is not made negative (a negative one would hide the next
-- download from a delete). Returns the count left.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local left = redis.call('DECR', KEYS[1])
if left <= 0 then
  redis.call('DEL', KEYS[1])
end
return left
