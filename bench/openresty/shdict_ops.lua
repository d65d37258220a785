-- bench/openresty/shdict_ops.lua: shared-dict budget operations per second
-- at 2 nginx workers (slm.shdict's ledger: reserve + settle, also a
-- semaphore's acquire + release and a rate limit's take), next to the
-- in-process budget backend in the same workers (the floor: no sharing).
--
--   lua5.4 bench/openresty/shdict_ops.lua [seconds=2] [workers=2]
--
-- Each worker runs one request that loops over the operation for the
-- given time (a single light thread: the dict's lock is contended only
-- across workers); the figures are summed over the workers.  Prints
-- operations per second and the ratio to the in-process backend.  Not a
-- test: nothing here gates on a time.
local root = debug.getinfo(1, "S").source:match("^@(.*)/bench/openresty/") or "."
package.path = root .. "/?.lua;" .. root .. "/lua/?.lua;" .. package.path
local launch = require "tests.upstream.launch"
local H = require "tests.helpers"
local json = require "cjson"

local secs = tonumber(arg[1]) or 2
local workers = math.tointeger(tonumber(arg[2]) or 2)

local HANDLER = [=[
local slm = require "slm"
local budget = require "slm.budget"
local F = slm.shdict
local a = ngx.req.get_uri_args()
local secs = tonumber(a.secs)
local name = a.mode .. ":" .. a.run
local op
if a.mode == "memory" then
  local b = slm.budget{ usd = 1e9, tokens = 1e15, backend = budget.memory() }
  op = function() b:settle(b:reserve(0.001, 300), 0.0005, 150) end
elseif a.mode == "shdict" then
  local b = slm.budget{ usd = 1e9, tokens = 1e15, backend = F.budget{ dict = "slm", name = name } }
  op = function() b:settle(b:reserve(0.001, 300), 0.0005, 150) end
elseif a.mode == "semaphore" then
  local s = F.semaphore{ dict = "slm", name = name, n = 1000 }
  op = function() s:release(s:acquire()) end
elseif a.mode == "ratelimit" then
  local l = F.ratelimit{ dict = "slm", name = name, limit = 1e12, per = 1 }
  op = function() l:take(1) end
end
ngx.update_time()
local t0, n = ngx.now(), 0
local deadline = t0 + secs
while true do
  for _ = 1, 1000 do op() end
  n = n + 1000
  ngx.update_time()
  if ngx.now() >= deadline then break end
end
ngx.say(string.format('{"ops":%d,"secs":%.6f}', n, ngx.now() - t0))
]=]

local app = launch.start{ quiet = true, workers = workers, app = {
  http = "lua_shared_dict slm 256m;",
  server = "location = /ops { content_by_lua_block {\n" .. HANDLER .. "\n} }",
} }

local run = 0
-- one request per worker at once (more than one in flight, in case two
-- land on the same worker: then each gets its share of its time)
local function measure(mode)
  run = run + 1
  local urls = {}
  for i = 1, workers do
    urls[i] = H.q(("%s/ops?mode=%s&secs=%g&run=%d"):format(app.base, mode, secs, run))
  end
  local p = io.popen("curl -s -Z --parallel-max 64 " .. table.concat(urls, " ") .. " 2>/dev/null")
  local out = p:read("a")
  p:close()
  local total = 0
  for line in out:gmatch("[^\n]+") do
    local r = json.decode(line)
    total = total + r.ops / r.secs
  end
  return total
end

local ok, err = pcall(function()
  measure("shdict") -- warm up (JIT, dict pages)
  local base = measure("memory")
  print(("%d workers, %gs per run"):format(workers, secs))
  print(("%-34s %14s %8s"):format("operation", "ops/s", "ratio"))
  print(("%-34s %14.0f %8s"):format("in-process budget reserve+settle", base, "1.00"))
  for _, m in ipairs{ { "shdict", "shdict budget reserve+settle" }, { "semaphore", "shdict semaphore acquire+release" },
      { "ratelimit", "shdict rate limit take" } } do
    local v = measure(m[1])
    print(("%-34s %14.0f %8.2f"):format(m[2], v, v / base))
  end
end)
app:stop()
if not ok then error(err, 0) end
