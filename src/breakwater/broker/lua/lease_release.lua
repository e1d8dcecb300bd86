-- Give a lease back. KEYS[1] the lease; ARGV[1] its owner. Returns 1 when ARGV[1] held it.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
