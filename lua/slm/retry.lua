-- slm.retry: when to retry a failed attempt and how long to wait, exactly
-- as the official OpenAI SDKs do it.
--
--  * an `x-should-retry` header decides first: "true" retries whatever the
--    status, "false" retries nothing (openai-python and openai-node alike);
--  * without it: connection errors, timeouts, 408, 409, 429 and >= 500;
--  * delay: `retry-after-ms`, else `retry-after` (seconds as digits with an
--    optional fraction, or an HTTP date) when above 0 and at most 60 s; else
--    min(0.5 * 2^n, 8) * (1 - 0.25 * rand) where n is the number of
--    retries already made.  A value of 0, or one that is not a plain
--    number ("0x3", "1e2", " 3"), counts as absent (RFC 9110's delay-seconds
--    is digits).
local tonumber, type, floor, min, random, time = tonumber, type, math.floor, math.min, math.random, os.time

local M = {}


local MONTHS = { Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8,
  Sep = 9, Oct = 10, Nov = 11, Dec = 12 }

-- Seconds since the epoch for a UTC calendar date (no os.time timezone games).
local function utc_epoch(y, mo, d, h, mi, s)
  local a = floor((14 - mo) / 12)
  local yy = y + 4800 - a
  local mm = mo + 12 * a - 3
  local jdn = d + floor((153 * mm + 2) / 5) + 365 * yy + floor(yy / 4) - floor(yy / 100) + floor(yy / 400) - 32045
  return (jdn - 2440588) * 86400 + h * 3600 + mi * 60 + s
end
M.utc_epoch = utc_epoch

--- Parse an HTTP date (IMF-fixdate, e.g. "Wed, 21 Oct 2015 07:28:00 GMT").
function M.parse_http_date(s)
  if type(s) ~= "string" then return nil end
  local d, mon, y, h, mi, sec = s:match("^%a+,%s*(%d%d?)[%s%-](%a%a%a)[%s%-](%d%d%d%d)%s+(%d%d):(%d%d):(%d%d)%s*GMT$")
  if not d or not MONTHS[mon] then return nil end
  return utc_epoch(tonumber(y), MONTHS[mon], tonumber(d), tonumber(h), tonumber(mi), tonumber(sec))
end

-- "12" or "1.5": digits with an optional fraction, nothing else (tonumber
-- would take "0x3", "1e2", " 3", "inf").
local function decimal(v)
  if type(v) ~= "string" or not v:match("^%d+%.?%d*$") then return nil end
  return tonumber(v)
end

--- The server-requested delay in seconds from response headers, or nil.
-- `now_epoch` (optional) is the wall clock used for HTTP dates.
function M.retry_after(headers, now_epoch)
  if type(headers) ~= "table" then return nil end
  local ms = decimal(headers["retry-after-ms"])
  if ms and ms > 0 then return ms / 1000 end
  local ra = headers["retry-after"]
  if ra then
    local secs = decimal(ra)
    if secs then return secs > 0 and secs or nil end
    local at = M.parse_http_date(ra)
    if at then
      local d = at - (now_epoch or time())
      return d > 0 and d or nil
    end
  end
  return nil
end

--- Should this error be retried (by its status, headers and kind)?
-- err.no_retry set by the caller wins.
function M.should_retry(err)
  if err.no_retry then return false end
  local h = type(err.headers) == "table" and err.headers["x-should-retry"]
  if h == "true" then return true end
  if h == "false" then return false end
  local status = err.status
  if status and status > 0 and status ~= 200 then
    return status == 408 or status == 409 or status == 429 or status >= 500
  end
  return err.kind == "connect" or err.kind == "timeout"
end

--- Delay before retry number n+1 (n = retries already made, from 0).
function M.delay(err, n, rand)
  local ra = err and err.retry_after
  if ra and ra > 0 and ra <= 60 then return ra end
  local base = min(0.5 * 2 ^ n, 8)
  return base * (1 - 0.25 * (rand or random)())
end

return M
