-- Exact sliding windows for every rate-limit check of one event-loop pass, in arrival order,
-- atomically (loaded by windows.py; the batch is one EVALSHA with no KEYS).
--
-- ARGV[1]: a token unique to this call. ARGV[2]: how many policies follow, then per policy:
-- its key prefix, its number of windows, and per window: limit, seconds.
-- The last argument: every check as "policy index (1-based) SP identity", joined by LF.
-- Keys are built here rather than passed in KEYS: hotpath targets one Redis (or a primary),
-- not Redis Cluster, and one joined argument instead of 7 per check saves the client the
-- encoding work that bounds this path (Redis has CPU to spare for the splitting).
-- Returns per check: allowed, index of the reported window (0-based), remaining, then the
-- reset and the retry times in microseconds.
--
-- A caller's requests under one policy are one sorted set of their times, in microseconds from
-- Redis TIME (so hosts with skewed clocks agree), kept for the policy's longest window; each
-- window counts the members newer than its start (ZCOUNT), so an allowed check costs one ZADD
-- whatever the number of windows (a ZADD is most of a check's cost: ~4 us of Redis CPU, a
-- ZCOUNT ~0.5). Members are unique per call and per allowed check.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- ARGV[1] is unique per call (a random per-process prefix and a counter), so members are unique
-- without the time: a short member keeps ZADD cheap (its cost grows with the member's length)
local stamp = ARGV[1] .. ':'
local policies = {}
local ai = 3
for p = 1, tonumber(ARGV[2]) do
  local prefix, nwin = ARGV[ai], tonumber(ARGV[ai + 1])
  ai = ai + 2
  local wins = {prefix = prefix, longest = 0}
  for w = 1, nwin do
    local limit, secs = tonumber(ARGV[ai]), tonumber(ARGV[ai + 1])
    wins[w] = {limit, secs * 1000000}
    if secs * 1000000 > wins.longest then wins.longest = secs * 1000000 end
    ai = ai + 2
  end
  policies[p] = wins
end
local out = {}
local seq = 0
for pi, ident in string.gmatch(ARGV[ai], '(%d+) ([^\n]+)') do
  local wins = policies[tonumber(pi)]
  local key = wins.prefix .. ident
  local allowed, retry = 1, 0
  local counts = {}
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - wins.longest)
  for w = 1, #wins do
    local win = wins[w]
    local count
    if win[2] == wins.longest then
      count = redis.call('ZCARD', key)
    else
      count = redis.call('ZCOUNT', key, '(' .. (now - win[2]), '+inf')
    end
    counts[w] = count
    if count >= win[1] then
      allowed = 0
      -- the oldest request inside this window frees a slot when it leaves it
      local oldest = redis.call('ZRANGEBYSCORE', key, '(' .. (now - win[2]), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
      local wait = tonumber(oldest[2]) + win[2] - now
      if wait > retry then retry = wait end
    end
  end
  if allowed == 1 then
    seq = seq + 1
    redis.call('ZADD', key, now, stamp .. seq)
    redis.call('PEXPIRE', key, math.floor(wins.longest / 1000))
    for w = 1, #wins do counts[w] = counts[w] + 1 end
  end
  local best, best_left = 1, nil
  for w = 1, #wins do
    local left = wins[w][1] - counts[w]
    if left < 0 then left = 0 end
    if best_left == nil or left < best_left then best, best_left = w, left end
  end
  local reset = 0
  if counts[best] == 1 and allowed == 1 then
    reset = wins[best][2]  -- this request is the window's only entry
  elseif counts[best] > 0 then
    local oldest = redis.call('ZRANGEBYSCORE', key, '(' .. (now - wins[best][2]), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    reset = tonumber(oldest[2]) + wins[best][2] - now
  end
  out[#out + 1] = allowed
  out[#out + 1] = best - 1
  out[#out + 1] = best_left
  out[#out + 1] = reset
  out[#out + 1] = retry
end
return out
