-- Fenced, idempotent append of one sequence's delta: only the request's current attempt may write,
-- and a write it retries (its first reply lost) is applied once.
-- KEYS[1] request record, KEYS[2] token stream, KEYS[3] emitted text
-- ARGV[1] attempt, ARGV[2] channel, ARGV[3] stream max length, ARGV[4] text, ARGV[5] token count,
-- ARGV[6] the attempt's own write number (1, 2, ...)
-- Returns the new seq (or, for a repeated write, the current one), -1 when fenced off (another
-- attempt owns the request), -2 when not running.
-- Five commands per call (this runs once per token per sequence): one read, one HSET for all counters.
local cur = redis.call('HMGET', KEYS[1], 'attempt', 'status', 'wseq', 'seq', 'tokens')
if cur[1] ~= ARGV[1] then
  return -1
end
if cur[2] ~= 'running' then
  return -2
end
if tonumber(ARGV[6]) <= tonumber(cur[3] or '0') then
  return tonumber(cur[4] or '0')
end
local seq = tonumber(cur[4] or '0') + 1
local tokens = tonumber(cur[5] or '0') + tonumber(ARGV[5])
if seq == 1 then
  local t = redis.call('TIME')
  local first = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'seq', seq, 'tokens', tokens, 'wseq', ARGV[6], 'first_token_ms', first)
else
  redis.call('HSET', KEYS[1], 'seq', seq, 'tokens', tokens, 'wseq', ARGV[6])
end
redis.call('APPEND', KEYS[3], ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], seq .. '-0', 'seq', seq, 'kind', 'token', 'text', ARGV[4], 'n', ARGV[5])
-- The live payload of a token is 't<seq> <n> <text>' (no JSON to build here or to parse in the gateway).
redis.call('PUBLISH', ARGV[2], 't' .. seq .. ' ' .. ARGV[5] .. ' ' .. ARGV[4])
return seq
