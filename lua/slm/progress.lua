-- slm.progress: a terminal progress bar with count, rate and ETA, written
-- to stderr (redrawn at most 10 times a second); a bar whose `cost` field
-- is set (the batch runner's) shows the running cost too.
local core = require "slm.core"
local now, floor, format, rep = core.now, math.floor, string.format, string.rep

local Bar = {}
Bar.__index = Bar

local M = {}

--- new(total, {width = 30, label = "", out = io.stderr})
function M.new(total, opts)
  opts = opts or {}
  local b = setmetatable({
    total = total, done = 0, failed = 0, t0 = now(), last = 0,
    width = opts.width or 30, label = opts.label or "", out = opts.out or io.stderr,
  }, Bar)
  b:draw(true)
  return b
end

local function fmt_time(s)
  if s ~= s or s == math.huge then return "--" end
  s = floor(s + 0.5)
  if s >= 3600 then return format("%dh%02dm", floor(s / 3600), floor((s % 3600) / 60)) end
  if s >= 60 then return format("%dm%02ds", floor(s / 60), s % 60) end
  return format("%ds", s)
end

function Bar:line()
  local el = now() - self.t0
  local rate = el > 0 and self.done / el or 0
  local frac = self.total > 0 and self.done / self.total or 1
  local fill = floor(frac * self.width + 0.5)
  local eta = rate > 0 and (self.total - self.done) / rate or math.huge
  local s = format("%s[%s%s] %d/%d %3d%%  %.1f/s  ETA %s", self.label ~= "" and self.label .. " " or "",
    rep("#", fill), rep(".", self.width - fill), self.done, self.total, floor(frac * 100), rate,
    self.done >= self.total and "0s" or fmt_time(eta))
  if self.cost then s = s .. format("  $%.4f", self.cost) end
  if self.failed > 0 then s = s .. format("  (%d failed)", self.failed) end
  return s
end

function Bar:draw(force)
  local t = now()
  if not force and t - self.last < 0.1 then return end
  self.last = t
  self.out:write("\r", self:line(), "\27[K")
  self.out:flush()
end

function Bar:tick(failed)
  self.done = self.done + 1
  if failed then self.failed = self.failed + 1 end
  self:draw(self.done >= self.total)
end

function Bar:finish()
  self:draw(true)
  self.out:write("\n")
  self.out:flush()
end

return M
