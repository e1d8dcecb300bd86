-- Settle a job whose request ended: meter it (meter.lua, once) and then acknowledge its entry
-- (ack.lua) in one round trip instead of two. Only on a single Redis: the usage keys are on the
-- tenant's hash slot and the job's on the model's. Meter first, as the two separate calls do: a
-- script that fails in the metering stops before the ack, so the job stays pending, is reclaimed and
-- settled again (meter.lua counts a request once: what a failed call had counted stays counted).
-- KEYS[1..7] meter.lua's, KEYS[8..11] ack.lua's; ARGV[1..9] meter.lua's, ARGV[10..13] ack.lua's.
-- Returns meter.lua's reply (1 when metered now, 0 when it had been already).
local metered = meter({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]},
  {ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]})
ack({KEYS[8], KEYS[9], KEYS[10], KEYS[11]}, {ARGV[10], ARGV[11], ARGV[12], ARGV[13]})
return metered
