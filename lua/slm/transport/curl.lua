-- slm.transport.curl: the libcurl runtime.  Plain Lua 5.4 scripts and batch
-- jobs move their bytes over one libcurl multi handle (slm.core) shared by
-- every request of the process, driven by the scheduler of
-- slm.transport.sched.
--
-- A transport module returns a runtime; the client, rate limits, budgets
-- and slm.map use nothing else, so the cosocket runtime (slm.transport.ngx)
-- plugs in without touching them:
--
--   local conn = rt.open{ url, method, headers = {"K: v"}, body,
--     connect_timeout, timeout, first_byte_timeout, idle_timeout, max_body,
--     ca_file, http_version, fresh_connect }
--   conn:response() -> status, headers | nil, kind, message   (waits for the headers)
--   conn:read()     -> bytes | nil                             (nil at the end)
--   conn:result()   -> true | nil, kind, message               (after the end)
--   conn:cancel()   -- idempotent; a task blocked in response()/read() of
--                   -- this conn wakes and sees the end (kind "cancelled")
--   conn:info()     -> { ttfb, total_time, new_connections, ... }
--   rt.sleep(s); rt.now(); rt.semaphore(n) -> sem (sem:acquire([timeout]) -> true | nil, "timeout"; sem:release())
--   rt.spawn(fn, ...) -> task (task:wait() -> fn's results or raises; task:join())
--   rt.run(fn, ...)   -- fn and everything it spawns, to completion
--   rt.current()      -- the running task, or nil outside any task
--   rt.tcp(host, port, { timeout }) -> a TCP socket that yields inside tasks
--                     -- (slm.transport.tcp; for Redis: slm.shared.redis)
--
-- Kinds are lua-slm's: "timeout", "connect" (refused, reset, closed before
-- or while replying, TLS), "cancelled", "protocol" (a reply larger than
-- max_body; no memory to buffer it).  libcurl's own distinctions stay here.
local core = require "slm.core"
local sched = require "slm.transport.sched"

local setmetatable = setmetatable

local M = {
  name = "curl",
  now = core.now,
  sleep = sched.sleep,
  semaphore = sched.semaphore,
  spawn = sched.spawn,
  run = sched.run,
  current = sched.current,
  tcp = require("slm.transport.tcp").connect,
  -- an outer event loop drives this runtime with these (examples/luv_loop.lua)
  step = sched.step,
  timeout = sched.timeout,
  fd = sched.fd,
}

-- slm.core's result kinds -> lua-slm's
local KIND = {
  timeout = "timeout", connect = "connect", cancelled = "cancelled",
  broken = "connect",     -- reset or closed mid-reply, HTTP/2 framing
  reused = "connect",     -- a kept-alive connection was dead: libcurl's re-send stopped
  transport = "connect",  -- anything else libcurl reports about the exchange
  protocol = "protocol",  -- larger than max_body
  memory = "protocol",    -- no memory to buffer the reply or track its socket
}

local Conn = {}
Conn.__index = Conn

function M.open(opts)
  local req = sched.multi():add(opts)
  return setmetatable({ req = req }, Conn)
end

local function failure(req)
  local _, kind, msg = req:result()
  local k = KIND[kind] or "connect"
  if kind == "broken" and req:status() > 0 then msg = "connection broken mid-reply: " .. tostring(msg) end
  return nil, k, msg
end

function Conn:response()
  local req = self.req
  while true do
    local h, complete = req:headers()
    if complete and req:status() > 0 then return req:status(), h end
    if req:done() then
      -- a reply cut inside its header block (a reset after "HTTP/1.1 401"
      -- and one header) is a broken connection, not a 401
      if not req:result() then return failure(req) end
      -- libcurl takes a close inside the header block as the end of a
      -- reply without a body: it is a broken connection all the same
      if req:status() > 0 then return nil, "connect", "the connection closed inside the reply's headers" end
      return nil, "protocol", "reply ended without an HTTP status"
    end
    sched.await(req)
  end
end

function Conn:read()
  local req = self.req
  while true do
    local b = req:read()
    if b then return b end
    if req:done() then return nil end
    sched.await(req)
  end
end

function Conn:result()
  local req = self.req
  if req:result() then return true end
  return failure(req)
end

function Conn:cancel()
  local req = self.req
  req:cancel()
  sched.wake(req)
end

function Conn:info()
  return self.req:info()
end

return M
