-- slm.transport.tcp: TCP client sockets on the libcurl runtime's loop, for
-- protocols lua-slm speaks itself (Redis' RESP, slm.shared.redis).  The
-- libcurl runtime hands them out as rt.tcp; under OpenResty a cosocket
-- plays the same part.
--
--   local s, kind, msg = tcp.connect(host, port, { timeout = 1 })
--   s:send(bytes)       -> true | nil, kind, msg
--   s:receive_line()    -> line (without CRLF) | nil, kind, msg
--   s:receive(n)        -> n bytes | nil, kind, msg
--   s:close()           idempotent
--
-- Kinds as the HTTP transport's: "connect" (refused, reset, closed) and
-- "timeout" (opts.timeout seconds for the connect, and for each wait for
-- bytes or room to send).  A socket is non-blocking (slm.core's Tcp); a
-- wait arms its descriptor in the multi's event set (sched.await_fd), so a
-- task waiting for Redis yields and the others' HTTP requests go on.
-- Outside any task the call drives the loop itself, like an HTTP call.
local core = require "slm.core"
local sched = require "slm.transport.sched"

local setmetatable, find, sub, tostring = setmetatable, string.find, string.sub, tostring
local now = core.now

local M = {}

local Sock = {}
Sock.__index = Sock
Sock.__name = "slm.transport.tcp"

local function deadline(self)
  return self.timeout and now() + self.timeout or nil
end

-- Wait for want ("r"/"w"): true, or nil, "timeout", msg.
local function wait(self, want, what)
  if sched.await_fd(self.fd, want, deadline(self)) then return true end
  return nil, "timeout", what .. " timed out after " .. tostring(self.timeout) .. " s"
end

--- connect(host, port, opts) -> socket | nil, kind, msg
function M.connect(host, port, opts)
  local timeout = opts and opts.timeout
  local tcp, err = core.tcp_connect(host, port)
  if not tcp then return nil, "connect", err end
  local self = setmetatable({ tcp = tcp, fd = tcp:fd(), timeout = timeout, buf = "", where = host .. ":" .. port }, Sock)
  local ok, kind, msg = wait(self, "w", "connecting to " .. self.where)
  if not ok then
    self:close()
    return nil, kind, msg
  end
  local c, cerr = tcp:connected()
  if not c then
    self:close()
    return nil, "connect", cerr .. " (" .. self.where .. ")"
  end
  return self
end

function Sock:close()
  if self.closed then return end
  self.closed = true
  if self.fd >= 0 and sched.multi then sched.multi():watch(self.fd, nil) end
  self.tcp:close()
end
Sock.__close = Sock.close

-- A failed socket is closed: a reply half read must never be taken for
-- the next request's.
local function broken(self, kind, msg)
  self:close()
  return nil, kind, msg
end

function Sock:send(s)
  if self.closed then return nil, "connect", "the connection is closed" end
  local i, n = 1, #s
  while i <= n do
    local last, err = self.tcp:send(s, i)
    if not last then return broken(self, "connect", err .. " (" .. self.where .. ")") end
    if last >= i then
      i = last + 1
    else
      local ok, kind, msg = wait(self, "w", "sending to " .. self.where)
      if not ok then return broken(self, kind, msg) end
    end
  end
  return true
end

-- More bytes into the buffer: true | nil, kind, msg.
local function fill(self)
  while true do
    local b, err = self.tcp:recv()
    if b then
      self.buf = self.buf .. b
      return true
    end
    if b == nil then
      if err == "closed" then return broken(self, "connect", "the connection to " .. self.where .. " closed") end
      return broken(self, "connect", err .. " (" .. self.where .. ")")
    end
    local ok, kind, msg = wait(self, "r", "waiting for " .. self.where)
    if not ok then return broken(self, kind, msg) end
  end
end

function Sock:receive_line()
  if self.closed then return nil, "connect", "the connection is closed" end
  local from = 1
  while true do
    local e = find(self.buf, "\r\n", from, true)
    if e then
      local line = sub(self.buf, 1, e - 1)
      self.buf = sub(self.buf, e + 2)
      return line
    end
    from = #self.buf > 0 and #self.buf or 1
    local ok, kind, msg = fill(self)
    if not ok then return nil, kind, msg end
  end
end

function Sock:receive(n)
  if self.closed then return nil, "connect", "the connection is closed" end
  while #self.buf < n do
    local ok, kind, msg = fill(self)
    if not ok then return nil, kind, msg end
  end
  local s = sub(self.buf, 1, n)
  self.buf = sub(self.buf, n + 1)
  return s
end

return M
