-- Takes deliveries whose holder is gone out of kombu's unacked bookkeeping, atomically,
-- into the reclaiming hash: from there exactly one sweeper hands each back (requeue.lua).
-- A delivery is taken only if it is still held by the owner the sweeper saw, and was
-- delivered at least `grace` seconds ago (a holder that has only just started may not
-- have beaten yet).
-- KEYS: unacked, unacked_index, unacked_owner, reclaiming
-- ARGV: grace (seconds), then delivery tag and expected owner, pair after pair
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local grace = tonumber(ARGV[1])
local taken = 0
for i = 2, #ARGV, 2 do
  local tag, owner = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[3], tag) == owner then
    local since = redis.call('ZSCORE', KEYS[2], tag)
    if not since or now - tonumber(since) >= grace then
      local entry = redis.call('HGET', KEYS[1], tag)
      if entry then
        redis.call('HSET', KEYS[4], tag, entry)
      end
      redis.call('HDEL', KEYS[1], tag)
      redis.call('ZREM', KEYS[2], tag)
      redis.call('HDEL', KEYS[3], tag)
      taken = taken + 1
    end
  end
end
return taken
