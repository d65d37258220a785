-- slm.ratelimit: a token bucket for client-side rpm/tpm limits.  take(n)
-- waits (yielding inside tasks) until n units are available, through the
-- runtime it was made with (rt.sleep, rt.now): the libcurl scheduler's or
-- OpenResty's.  take(n) -> true, the interface of the shared limiters
-- (slm.shdict.ratelimit, slm.redis' ratelimit), which take a runtime as
-- their second argument.
local min, setmetatable = math.min, setmetatable

local Bucket = {}
Bucket.__index = Bucket

local M = {}

--- new(limit, per_seconds, runtime): at most `limit` units per `per_seconds`.
function M.new(limit, per, rt)
  rt = rt or require("slm.runtime").default()
  return setmetatable({ cap = limit, level = limit, rate = limit / per, now = rt.now, sleep = rt.sleep,
    t = rt.now() }, Bucket)
end

function Bucket:refill()
  local t = self.now()
  -- a clock that went back (a wall clock set back) refills nothing: as
  -- negative time it would drain the bucket, and every take would wait as
  -- long as the clock went back
  if t > self.t then self.level = min(self.cap, self.level + (t - self.t) * self.rate) end
  self.t = t
end

function Bucket:take(n)
  if n > self.cap then n = self.cap end -- a single huge request still goes, alone
  while true do
    self:refill()
    if self.level >= n then
      self.level = self.level - n
      return true
    end
    self.sleep((n - self.level) / self.rate)
  end
end

return M
