-- tests/ngx_capture_rt.lua: a runtime for the OpenResty specs that moves
-- the client's bytes with ngx.location.capture through a proxy location
-- (`location /__up/ { internal; proxy_pass <upstream>/; }`), so that
-- slm.client runs inside nginx, without blocking it, before the cosocket
-- transport is there.  A whole reply at once (streams too: the SSE body
-- is read in one piece); only the request's method, body and the headers
-- that matter to the simulator go through.  A test fixture, not a
-- transport: no timeouts of its own, no TLS of its own.
local unpack = table.unpack or unpack

local R = { name = "capture" }

function R.now() ngx.update_time(); return ngx.now() end
R.sleep = ngx.sleep
function R.current() return nil end
function R.run(fn, ...) return fn(...) end

function R.semaphore(n)
  local s = assert(require("ngx.semaphore").new(n))
  return { acquire = function() assert(s:wait(3600)) end, release = function() s:post(1) end }
end

function R.spawn(fn, ...)
  local th = ngx.thread.spawn(fn, ...)
  return {
    wait = function()
      local r = { ngx.thread.wait(th) }
      if not r[1] then error(r[2], 0) end
      return unpack(r, 2)
    end,
    join = function() pcall(ngx.thread.wait, th) end,
  }
end

local Conn = {}
Conn.__index = Conn

function R.open(o)
  local path = o.url:gsub("^https?://[^/]+", "/__up")
  local accept = "application/json"
  for _, h in ipairs(o.headers or {}) do
    local v = h:match("^[Aa]ccept:%s*(.*)$")
    if v then accept = v end
  end
  return setmetatable({ path = path, body = o.body, accept = accept }, Conn)
end

function Conn:fetch()
  if self.res then return self.res end
  self.res = ngx.location.capture(self.path, { method = ngx.HTTP_POST, body = self.body,
    args = { accept = self.accept } })
  return self.res
end

function Conn:response()
  local res = self:fetch()
  if res.status == 502 or res.status == 504 then return nil, "connect", "the upstream did not answer" end
  local h = {}
  for k, v in pairs(res.header) do h[k:lower()] = type(v) == "table" and v[1] or v end
  return res.status, h
end

function Conn:read()
  local res = self:fetch()
  if self.done then return nil end
  self.done = true
  if res.body == "" then return nil end
  return res.body
end

function Conn:result()
  if self.res and self.res.truncated then return nil, "connect", "the reply was cut" end
  return true
end

function Conn:cancel() self.done = true end
function Conn:info() return {} end

return R
