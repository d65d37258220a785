-- bench/concurrency/trace.lua: where the time of the map contender goes,
-- request by request.  A diagnostic, not a contender: run.sh does not run
-- it, and its figures are read, not judged.  See README.md, "Latest
-- numbers" and "Where lua-slm's time goes".
--
--   taskset -c 0 lua5.4 tests/upstream/launch.lua start --workers 1   # URL, prefix
--   LUA_PATH="lua/?.lua;lua/?/init.lua;;" LUA_CPATH="build-bench/?.so;;" \
--     taskset -c 1 lua5.4 bench/concurrency/trace.lua URL
--   (the cores as run.sh's PIN=1 sets them: README.md, "Cores")
--   env: BENCH_N (1000), BENCH_WARMUP (50), BENCH_CONC (50),
--        TRACE_BURN_US (0): busy-wait that many microseconds before each
--        request, to see how throughput follows the client's work per task
--
-- The same requests as slm_bench.lua map (prompt.json, slm.map, one
-- client).  Prints:
--   wall, % of ideal, mean/p50/p90/max time of a client:chat call;
--   the call split at the request's own clock (req:info()): "pre" from the
--   call to multi:add, "wire" from multi:add to the first reply byte seen
--   by libcurl (sending, the simulator, the reply's trip), "post" from
--   there to the call's return (the wait behind other tasks, decoding);
--   how far apart the first 50 requests left, and when the tasks finished.
local slm = require "slm"
local json = require "slm.json"
local transport = require "slm.transport.curl"
local core = slm.core

local url = arg[1]
if not url then
  io.stderr:write("usage: lua5.4 bench/concurrency/trace.lua URL\n")
  os.exit(2)
end
local function env_int(name, default)
  return math.tointeger(tonumber(os.getenv(name) or "")) or default
end
local N, WARMUP, CONC = env_int("BENCH_N", 1000), env_int("BENCH_WARMUP", 50), env_int("BENCH_CONC", 50)
local BURN = (tonumber(os.getenv("TRACE_BURN_US") or "") or 0) / 1e6
local DELAY = 0.020 -- the "delay=20" scenario of prompt.json

local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
local f = assert(io.open(here .. "prompt.json", "rb"))
local P = json.decode(f:read("a"))
f:close()

local client = slm.client{
  base_url = url, api_key = "sk-bench", max_concurrency = CONC,
  headers = { ["X-Sim-Scenario"] = P.scenario },
}

-- the connection of the request a task has in flight
local conn_of = setmetatable({}, { __mode = "k" })
local open = transport.open
transport.open = function(o)
  local c = open(o)
  conn_of[coroutine.running()] = c
  return c
end

local rec -- per request: started (call), ended (return), pre, wire, post
local tasks -- per task (coroutine): n, first, last

local function ask(i)
  if BURN > 0 then
    local t = core.now() + BURN
    while core.now() < t do end
  end
  local t0 = core.now()
  local res, err = client:chat{
    model = P.model, max_tokens = P.max_tokens,
    messages = {
      { role = "system", content = P.system },
      { role = "user", content = (P.user:gsub("{i}", tostring(i))) },
    },
  }
  local t1 = core.now()
  if not res then error("request " .. i .. ": " .. tostring(err)) end
  local co = coroutine.running()
  local info = conn_of[co]:info()
  local first_byte = info.started + (info.ttfb or 0)
  rec[#rec + 1] = { started = t0, ended = t1, pre = info.started - t0, wire = info.ttfb or 0, post = t1 - first_byte }
  local t = tasks[co]
  if not t then
    t = { n = 0, first = t0 }
    tasks[co] = t
  end
  t.n, t.last = t.n + 1, t1
end

local function batch(first, count)
  local list = {}
  for k = 1, count do list[k] = first + k - 1 end
  local _, errs, nerr = slm.map(list, function(i) ask(i) return true end, { concurrency = CONC })
  if nerr > 0 then
    local _, e = next(errs)
    error(nerr .. " requests failed, e.g. " .. tostring(e))
  end
end

rec, tasks = {}, {}
batch(1, WARMUP)
rec, tasks = {}, {}
collectgarbage()
local t0 = core.now()
batch(WARMUP + 1, N)
local wall = core.now() - t0

local function ms(x) return x * 1e3 end
local function sorted(field)
  local l = {}
  for k = 1, #rec do l[k] = rec[k][field] end
  table.sort(l)
  return l
end
local function mean(field)
  local s = 0
  for k = 1, #rec do s = s + rec[k][field] end
  return s / #rec
end
for k = 1, #rec do rec[k].call = rec[k].ended - rec[k].started end
local calls, wires, starts = sorted("call"), sorted("wire"), sorted("started")
local n = #rec
local ideal = N * DELAY / CONC

print(("wall %.1f ms, %.1f%% of ideal; client:chat mean %.3f ms (p50 %.3f, p90 %.3f, max %.3f)"):format(
  ms(wall), ideal / wall * 100, ms(mean("call")), ms(calls[n // 2]), ms(calls[n * 9 // 10]), ms(calls[n])))
print(("  split: pre %.3f ms, wire %.3f ms (p10 %.3f, p50 %.3f, p90 %.3f), post %.3f ms"):format(
  ms(mean("pre")), ms(mean("wire")), ms(wires[math.max(1, n // 10)]), ms(wires[n // 2]), ms(wires[n * 9 // 10]),
  ms(mean("post"))))
print(("  wall - %d x mean call: %.1f ms"):format(N // CONC, ms(wall - N / CONC * mean("call"))))
local fin, counts = {}, {}
for _, t in pairs(tasks) do
  fin[#fin + 1] = t.last - t0
  counts[t.n] = (counts[t.n] or 0) + 1
end
table.sort(fin)
local cl = {}
for k, v in pairs(counts) do cl[#cl + 1] = ("%d tasks x %d requests"):format(v, k) end
table.sort(cl)
print(("  first %d requests left between +%.2f and +%.2f ms; the %d tasks (%s) finished between +%.1f and +%.1f ms"):format(
  math.min(CONC, n), ms(starts[1] - t0), ms(starts[math.min(CONC, n)] - t0), #fin, table.concat(cl, ", "),
  ms(fin[1]), ms(fin[#fin])))
