-- Fenced append of one sequence's delta: only the request's current attempt may write.
-- KEYS[1] request record, KEYS[2] token stream
-- ARGV[1] attempt, ARGV[2] channel, ARGV[3] stream max length, ARGV[4] text, ARGV[5] token count, ARGV[6] now (ms)
-- Returns the new seq, -1 when fenced off (another attempt owns the request), -2 when not running.
local cur = redis.call('HMGET', KEYS[1], 'attempt', 'status', 'emitted')
if cur[1] ~= ARGV[1] then
  return -1
end
if cur[2] ~= 'running' then
  return -2
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HINCRBY', KEYS[1], 'tokens', tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 'emitted', (cur[3] or '') .. ARGV[4])
if seq == 1 then
  redis.call('HSET', KEYS[1], 'first_token_ms', ARGV[6])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'seq', seq, 'kind', 'token', 'text', ARGV[4], 'n', ARGV[5])
redis.call('PUBLISH', ARGV[2], cjson.encode({seq = tostring(seq), kind = 'token', text = ARGV[4], n = ARGV[5]}))
return seq
