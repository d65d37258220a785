-- slm.transport.curl: how bytes move in plain Lua 5.4 and batch jobs:
-- one libcurl multi handle (slm.core) shared by every request of the
-- process, driven by slm.sched.
--
-- Interface shared with slm.transport.ngx:
--   local conn = transport.open{ url, method, headers = {"K: v"}, body,
--     connect_timeout, timeout, first_byte_timeout, idle_timeout, max_body,
--     ca_file, http_version }
--   conn:response() -> status, headers | nil, kind, message   (waits for headers)
--   conn:read()     -> bytes | nil                             (nil at the end)
--   conn:result()   -> true | nil, kind, message               (after the end)
--   conn:cancel()
--   conn:info()     -> { ttfb, total_time, new_connections, ... }
local sched = require "slm.sched"

local M = { name = "curl" }

local Conn = {}
Conn.__index = Conn

function M.open(opts)
  local req = sched.multi():add(opts)
  return setmetatable({ req = req }, Conn)
end

function Conn:response()
  local req = self.req
  while true do
    local h = req:headers()
    if h and req:status() > 0 then return req:status(), h end
    if req:done() then
      local ok, kind, msg = req:result()
      if ok then return nil, "protocol", "reply ended without an HTTP status" end
      return nil, kind, msg
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
  return self.req:result()
end

function Conn:cancel()
  sched.forget(self.req)
  self.req:cancel()
end

function Conn:info()
  return self.req:info()
end

return M
