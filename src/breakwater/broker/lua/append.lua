-- Fenced, idempotent append of one sequence's delta: only the request's current attempt may write,
-- and a write it retries (its first reply lost) is applied once.
-- KEYS[1] request record, KEYS[2] token stream, KEYS[3] emitted text
-- ARGV[1] attempt, ARGV[2] channel, ARGV[3] stream max length, ARGV[4] text, ARGV[5] token count,
-- ARGV[6] the attempt's own write number (1, 2, ...)
-- Returns the new seq (or, for a repeated write, the current one), -1 when fenced off (another
-- attempt owns the request), -2 when not running.
local cur = redis.call('HMGET', KEYS[1], 'attempt', 'status', 'wseq', 'seq')
if cur[1] ~= ARGV[1] then
  return -1
end
if cur[2] ~= 'running' then
  return -2
end
if tonumber(ARGV[6]) <= tonumber(cur[3] or '0') then
  return tonumber(cur[4] or '0')
end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('HINCRBY', KEYS[1], 'tokens', tonumber(ARGV[5]))
redis.call('HSET', KEYS[1], 'wseq', ARGV[6])
redis.call('APPEND', KEYS[3], ARGV[4])
if seq == 1 then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'first_token_ms', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'seq', seq, 'kind', 'token', 'text', ARGV[4], 'n', ARGV[5])
redis.call('PUBLISH', ARGV[2], cjson.encode({seq = tostring(seq), kind = 'token', text = ARGV[4], n = ARGV[5]}))
return seq
