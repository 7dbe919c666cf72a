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
-- A window is a sorted set of the request times inside it, in microseconds from Redis TIME
-- (so hosts with skewed clocks agree); members are unique per call and per allowed check.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stamp = t[1] .. '.' .. t[2] .. ':' .. ARGV[1] .. ':'
local policies = {}
local ai = 3
for p = 1, tonumber(ARGV[2]) do
  local prefix, nwin = ARGV[ai], tonumber(ARGV[ai + 1])
  ai = ai + 2
  local wins = {}
  for w = 1, nwin do
    local limit, secs = tonumber(ARGV[ai]), ARGV[ai + 1]
    wins[w] = {limit, tonumber(secs) * 1000000, prefix .. secs .. ':', tonumber(secs) * 1000}
    ai = ai + 2
  end
  policies[p] = wins
end
local out = {}
local seq = 0
for pi, ident in string.gmatch(ARGV[ai], '(%d+) ([^\n]+)') do
  local wins = policies[tonumber(pi)]
  local allowed, retry = 1, 0
  local keys, counts = {}, {}
  for w = 1, #wins do
    local win = wins[w]
    local key = win[3] .. ident
    keys[w] = key
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - win[2])
    local count = redis.call('ZCARD', key)
    counts[w] = count
    if count >= win[1] then
      allowed = 0
      local oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
      local wait = tonumber(oldest[2]) + win[2] - now
      if wait > retry then retry = wait end
    end
  end
  if allowed == 1 then
    seq = seq + 1
    local member = stamp .. seq
    for w = 1, #wins do
      redis.call('ZADD', keys[w], now, member)
      redis.call('PEXPIRE', keys[w], wins[w][4])
      counts[w] = counts[w] + 1
    end
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
    local oldest = redis.call('ZRANGE', keys[best], 0, 0, 'WITHSCORES')
    reset = tonumber(oldest[2]) + wins[best][2] - now
  end
  out[#out + 1] = allowed
  out[#out + 1] = best - 1
  out[#out + 1] = best_left
  out[#out + 1] = reset
  out[#out + 1] = retry
end
return out
