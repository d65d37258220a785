-- bench/openresty/redis_budget.lua: Redis budget operations per second.
--
--   bin/build build && bin/build build-jit -DSLM_LUA=luajit
--   lua5.4 bench/openresty/redis_budget.lua [seconds]      (from the checkout)
--
-- Starts a throw-away redis-server (tests/redis_launch.lua) and an nginx
-- running lua-slm with 2 workers (tests/upstream/launch.lua's app mode),
-- then drives it with wrk (64 connections, 2 threads):
--   /op    one reserve + one settle of slm.redis.budget (two EVALSHA)
--   /ping  two PINGs on the same connection pool: the floor for any
--          operation that takes two Redis round trips from nginx
--   /noop  nothing: the floor of a request to nginx itself
-- and the plain-Lua batch path: 64 tasks in slm.run doing reserve+settle
-- for the same time over lua-slm's own RESP client (one process, one core).
-- Prints operations per second and the ratios; not a test, no thresholds.
local root = debug.getinfo(1, "S").source:match("^@(.*)/bench/openresty/") or "."
package.path = root .. "/lua/?.lua;" .. root .. "/lua/?/init.lua;" .. root .. "/?.lua;" .. package.path
package.cpath = root .. "/build/?.so;" .. package.cpath
local secs = tonumber(arg[1]) or 5

local slm = require "slm"
local redis_launch = require "tests.redis_launch"
local upstream = require "tests.upstream.launch"
local U = upstream.util

local srv = redis_launch.start{ quiet = true }
local app = upstream.start{ workers = 2, quiet = true, app = {
  http = ("init_by_lua_block { REDIS = { port = %d }; slm = require 'slm' }"):format(srv.port),
  server = [[
    location = /op {
      content_by_lua_block {
        local b = BUDGET
        if not b then
          b = slm.budget{ usd = 1e12, backend = slm.redis.budget{ redis = REDIS, name = "bench" } }
          BUDGET = b
        end
        local r, err = b:reserve(0.001, 100)
        if not r then ngx.status = 500; ngx.say(tostring(err)); return end
        b:settle(r, 0.0005, 50)
        ngx.say("ok")
      }
    }
    location = /ping {
      content_by_lua_block {
        local c = CONN or slm.redis.connect(REDIS)
        CONN = c
        assert(c:command("PING")); assert(c:command("PING"))
        ngx.say("ok")
      }
    }
    location = /noop { content_by_lua_block { ngx.say("ok") } }
  ]] } }

local function wrk(path)
  local out = U.run(("wrk -t2 -c64 -d%ds %s"):format(secs, app.base .. path))
  local rps = tonumber(out:match("Requests/sec:%s*([%d%.]+)"))
  local non2xx = out:match("Non%-2xx or 3xx responses: (%d+)")
  if not rps then error("wrk failed: " .. out, 0) end
  if non2xx then error(path .. ": " .. non2xx .. " failed requests", 0) end
  return rps
end

local ok, err = pcall(function()
  wrk("/op") -- warm-up: scripts loaded, pools filled
  local op, ping, noop = wrk("/op"), wrk("/ping"), wrk("/noop")
  -- the plain-Lua batch path
  local b = slm.budget{ usd = 1e12, backend = slm.redis.budget{ redis = srv.conf, name = "bench-batch" } }
  local n, stop = 0, slm.core.now() + secs
  slm.run(function()
    local ts = {}
    for i = 1, 64 do
      ts[i] = slm.spawn(function()
        while slm.core.now() < stop do
          local r = assert(b:reserve(0.001, 100))
          b:settle(r, 0.0005, 50)
          n = n + 1
        end
      end)
    end
    for i = 1, 64 do ts[i]:wait() end
  end)
  local batch = n / secs
  print(("nginx, 2 workers, wrk 64 connections, %d s each"):format(secs))
  print(("  reserve+settle  %9.0f ops/s"):format(op))
  print(("  2 x PING        %9.0f req/s   reserve+settle / 2 PINGs = %.2f"):format(ping, op / ping))
  print(("  no Redis        %9.0f req/s   reserve+settle / no-op   = %.2f"):format(noop, op / noop))
  print(("plain Lua 5.4, one process, 64 tasks"):format())
  print(("  reserve+settle  %9.0f ops/s   batch / nginx = %.2f"):format(batch, batch / op))
  local su = b:spent()
  assert(math.abs(su - n * 0.0005) < 1e-6 * n, "the batch spend does not add up")
end)
app:stop()
srv:stop()
if not ok then io.stderr:write(tostring(err), "\n"); os.exit(1) end
