-- tests/redis_launch.lua: a throw-away redis-server for specs and benchmarks,
-- on a random free 127.0.0.1 port, nothing saved (--save "" --appendonly no),
-- in a mktemp directory of its own that stop() removes.
--
--   local redis_launch = require "tests.redis_launch"
--   local srv = redis_launch.start{ password = nil, quiet = true }
--   srv.host, srv.port, srv.dir, srv.pid
--   srv.conf          -- { host, port, password } for slm.redis's `redis` option
--   srv:cli(args...)  -- redis-cli's output (trimmed) for one command
--   srv:pause(secs)   -- CLIENT PAUSE: commands stall for secs (not the caller)
--   srv:kill()        -- SIGKILL (a crash); srv:stop() also works after it
--   srv:stop()        -- SHUTDOWN NOSAVE, then SIGKILL if need be; removes dir; idempotent
--
-- CLI: lua5.4 tests/redis_launch.lua start  -> stdout "port dir"; leaves it running
--      lua5.4 tests/redis_launch.lua stop <dir>
local M = {}

-- the simulator launcher's helpers: quoting, commands, files, ports, pids
local U = require("tests.upstream.launch").util
local q, run, read_file, port_taken, alive = U.q, U.run, U.read_file, U.port_taken, U.alive

local Srv = {}
Srv.__index = Srv
Srv.__close = function(s) s:stop() end

function Srv:cli(...)
  local args = { "redis-cli", "-h", self.host, "-p", tostring(self.port), "--no-auth-warning" }
  if self.password then args[#args + 1] = "-a"; args[#args + 1] = self.password end
  for _, a in ipairs({ ... }) do args[#args + 1] = a end
  local parts = {}
  for i, a in ipairs(args) do parts[i] = q(a) end
  local out = run(table.concat(parts, " "))
  return (out:gsub("%s+$", ""))
end

function Srv:pause(secs)
  return self:cli("CLIENT", "PAUSE", tostring(math.floor(secs * 1000)))
end

function Srv:kill()
  if self.pid and alive(self.pid) then
    os.execute("kill -KILL " .. self.pid)
    for _ = 1, 250 do
      if not alive(self.pid) then break end
      os.execute("sleep 0.02")
    end
  end
end

function Srv:stop()
  if self.stopped then return end
  self.stopped = true
  if self.pid and alive(self.pid) then
    self:cli("SHUTDOWN", "NOSAVE")
    for _ = 1, 100 do
      if not alive(self.pid) then break end
      os.execute("sleep 0.02")
    end
    self:kill()
  end
  if self.dir and self.dir:match("/slm%-redis%.") then os.execute("rm -rf " .. q(self.dir)) end
end

--- start{ password, quiet, port } -> a running server
function M.start(opts)
  opts = opts or {}
  local tmp = os.getenv("TMPDIR")
  if not tmp or tmp == "" then tmp = "/tmp" end
  local dir = run("mktemp -d " .. q(tmp .. "/slm-redis.XXXXXX")):match("^([^\n]+)")
  if not dir then error("redis_launch: mktemp failed", 0) end
  math.randomseed(os.time(), math.floor(os.clock() * 1e6) + tonumber(tostring({}):match("0x(%x+)") or "0", 16))
  local last
  for _ = 1, 10 do
    local port = opts.port or math.random(45001, 59999)
    if not port_taken(port) then
      local args = { "redis-server", "--bind", "127.0.0.1", "--port", tostring(port), "--save", "",
        "--appendonly", "no", "--daemonize", "yes", "--dir", dir, "--pidfile", dir .. "/redis.pid",
        "--logfile", dir .. "/redis.log", "--protected-mode", "no" }
      if opts.password then args[#args + 1] = "--requirepass"; args[#args + 1] = opts.password end
      local parts = {}
      for i, a in ipairs(args) do parts[i] = q(a) end
      local out, ok = run(table.concat(parts, " "))
      last = out
      if ok then
        local srv = setmetatable({ host = "127.0.0.1", port = port, dir = dir, password = opts.password }, Srv)
        srv.conf = { host = srv.host, port = port, password = opts.password }
        for _ = 1, 250 do
          if srv:cli("PING") == "PONG" then
            srv.pid = tonumber((read_file(dir .. "/redis.pid") or ""):match("%d+"))
            if not opts.quiet then io.stderr:write("redis: 127.0.0.1:", port, " (", dir, ")\n") end
            return srv
          end
          os.execute("sleep 0.02")
        end
        last = read_file(dir .. "/redis.log") or last
        srv.pid = tonumber((read_file(dir .. "/redis.pid") or ""):match("%d+"))
        srv:stop()
        dir = run("mktemp -d " .. q(tmp .. "/slm-redis.XXXXXX")):match("^([^\n]+)")
      end
    end
    if opts.port then break end
  end
  os.execute("rm -rf " .. q(dir))
  error("redis_launch: redis-server did not start: " .. tostring(last), 0)
end

if arg and arg[0] and arg[0]:match("redis_launch%.lua$") then
  local cmd = arg[1]
  if cmd == "start" then
    local s = M.start{ quiet = true }
    print(s.port .. " " .. s.dir)
  elseif cmd == "stop" and arg[2] then
    local pid = tonumber((read_file(arg[2] .. "/redis.pid") or ""):match("%d+") or "")
    local s = setmetatable({ host = "127.0.0.1", dir = arg[2], pid = pid,
      port = tonumber((read_file(arg[2] .. "/port") or ""):match("%d+") or "0") }, Srv)
    s:kill()
    s.stopped = true
    os.execute("rm -rf " .. q(arg[2]))
  else
    io.stderr:write("usage: lua5.4 tests/redis_launch.lua start | stop <dir>\n")
    os.exit(2)
  end
end

return M
