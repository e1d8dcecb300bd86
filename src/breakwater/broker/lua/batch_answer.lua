-- A batch's answer to one of its lines, kept once. KEYS[1] the batch's answers, KEYS[2] the batch;
-- ARGV[1] the line's index, ARGV[2] its output line, ARGV[3] the count it adds to ('completed' or
-- 'failed'). Returns 1 when kept, 0 when the line had its answer already (another runner's).
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return 1
