-- Hands one reclaimed delivery back to the head of its queue, or, once its task has been
-- lost `limit` times, to the exhausted hash (its task is then failed). Only the sweeper
-- whose HDEL takes the delivery acts, so each is handed back once.
-- KEYS: reclaiming, redeliveries, exhausted, the queue's list for the message's priority
-- ARGV: delivery tag, task id, the message as it goes back, delivery limit
-- Returns 0 (already handled), n (requeued after n losses) or -n (exhausted).
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local n = redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
if n >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[3])
  return -n
end
redis.call('RPUSH', KEYS[4], ARGV[3])
return n
