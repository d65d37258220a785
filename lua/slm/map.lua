-- slm.map: fn over a list with a bounded number of calls in flight, on any
-- runtime (its spawn and run; the libcurl scheduler's or OpenResty's
-- threads).
local options = require "slm.options"

local type, pairs, tostring, pcall, error, min = type, pairs, tostring, pcall, error, math.min

local M = {}

local OPTIONS = { concurrency = true, progress = true, runtime = true }

local function apply(fn, list, i) return fn(list[i], i) end

--- map(list, fn, opts) -> results, errs, nfailed
-- fn(item, i) for every item with at most opts.concurrency (16) calls in
-- flight.  Results in input order; errs[i] is what fn returned as its
-- second value with a nil first, or the error it raised (a raised error is
-- reported for its item and does not stop the others; error(nil) is
-- reported as the string "error raised with no value").  opts.progress
-- draws a progress bar on stderr; opts.runtime picks the runtime.
function M.map(list, fn, opts)
  if type(list) ~= "table" then error("slm.map: expected a list, got " .. type(list), 2) end
  if type(fn) ~= "function" then error("slm.map: expected a function, got " .. type(fn), 2) end
  opts = opts or {}
  if type(opts) ~= "table" then error("slm.map: options must be a table", 2) end
  local copy, why = options.plain_copy(opts)
  if not copy then error("slm.map: the options table cannot be read (" .. why .. ")", 2) end
  opts = copy
  for k in pairs(opts) do
    if not OPTIONS[k] then error("slm.map: unknown option '" .. options.safe_tostring(k) .. "'", 2) end
  end
  local conc = opts.concurrency or 16
  if type(conc) ~= "number" or conc < 1 or conc % 1 ~= 0 or conc == math.huge then
    error("slm.map: option 'concurrency' must be a positive integer", 2)
  end
  local rt = require("slm.runtime").get(opts.runtime)
  local lok, n = pcall(function() return #list end)
  if not lok then error("slm.map: the list's length cannot be read (" .. options.raised(n) .. ")", 2) end
  local results, errs = {}, {}
  local nerr = 0
  local bar
  if opts.progress then
    bar = require("slm.progress").new(n, type(opts.progress) == "table" and opts.progress or nil)
  end
  local nexti = 1
  local function worker()
    while nexti <= n do
      local i = nexti
      nexti = i + 1
      -- (list[i] read inside: a proxy list whose __index raises fails its item only)
      local ok, r, e = pcall(apply, fn, list, i)
      if not ok then
        if r == nil then r = "error raised with no value" end
        errs[i] = r; nerr = nerr + 1
      elseif r == nil and e ~= nil then
        errs[i] = e; nerr = nerr + 1
      else
        results[i] = r
      end
      if bar then bar:tick(errs[i] ~= nil) end
    end
  end
  rt.run(function()
    local workers = {}
    for w = 1, min(conc, n) do workers[w] = rt.spawn(worker) end
    for w = 1, #workers do workers[w]:wait() end
  end)
  if bar then bar:finish() end
  return results, errs, nerr
end

return M
