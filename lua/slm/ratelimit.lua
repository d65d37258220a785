-- slm.ratelimit: a token bucket for client-side rpm/tpm limits.  take(n)
-- waits (yielding inside tasks) until n units are available.
local core = require "slm.core"
local sched = require "slm.sched"
local now, min, setmetatable = core.now, math.min, setmetatable

local Bucket = {}
Bucket.__index = Bucket

local M = {}

--- new(limit, per_seconds): at most `limit` units per `per_seconds`.
function M.new(limit, per)
  return setmetatable({ cap = limit, level = limit, rate = limit / per, t = now() }, Bucket)
end

function Bucket:refill()
  local t = now()
  self.level = min(self.cap, self.level + (t - self.t) * self.rate)
  self.t = t
end

function Bucket:take(n)
  if n > self.cap then n = self.cap end -- a single huge request still goes, alone
  while true do
    self:refill()
    if self.level >= n then
      self.level = self.level - n
      return
    end
    sched.sleep((n - self.level) / self.rate)
  end
end

return M
