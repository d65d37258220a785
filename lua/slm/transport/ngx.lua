-- slm.transport.ngx: the cosocket runtime.  Inside nginx (lua-nginx-module,
-- LuaJIT) the bytes move over ngx.socket.tcp, waits are ngx.sleep and
-- ngx.semaphore, tasks are ngx.thread light threads: nothing blocks the
-- worker.  The interface is the one documented at the top of
-- slm.transport.curl (open -> conn with response/read/result/cancel/info;
-- sleep, now, semaphore, spawn, run, current) with the same error kinds.
--
-- One exchange: open() starts a light thread that owns the socket
-- (connect, TLS handshake, send, receive) and feeds slm.transport.http1's
-- parser; response()/read() wait on the conn's semaphore for what it has
-- parsed.  So cancel() from any light thread wakes a reader at once (a
-- cosocket blocked in receive cannot be closed from another thread: "socket
-- busy reading"); and it wakes the exchange's thread, which runs the
-- socket's work in a child thread of its own and kills it (only a parent
-- may), aborting its pending receive, then closes the socket: the upstream
-- sees the connection go at once, whichever thread opened it.
--
-- Connections are kept alive in nginx's cosocket pool (setkeepalive, only
-- after a body was read in full and the reply allows reuse), one pool per
-- host, port, TLS, server name and CA file.  TLS: sslhandshake with
-- verification on, the URL's host as server name (SNI, and the name the
-- certificate is checked against); the trusted CAs are nginx's
-- `lua_ssl_trusted_certificate` (lua-nginx-module has no per-socket CA
-- list).  A request's `ca_file` must therefore name that same file: say
-- which one with configure{ trusted_certificate = path } (e.g. in
-- init_by_lua); a ca_file that differs, or that was never declared, fails
-- with kind "connect" before anything is sent, instead of being ignored.
-- http_version = "2" is served over HTTP/1.1 (cosockets speak HTTP/1.1
-- only); info().http_version says "1.1".
local http1 = require "slm.transport.http1"
local core = require "slm.core"

local ngx = ngx
local tcp, spawn_thread, kill_thread = ngx.socket.tcp, ngx.thread.spawn, ngx.thread.kill
local get_phase, ngx_sleep, ngx_log, ERR = ngx.get_phase, ngx.sleep, ngx.log, ngx.ERR
local semaphore = require "ngx.semaphore"
local type, pairs, pcall, error, tostring, setmetatable, select, floor, max, format =
  type, pairs, pcall, error, tostring, setmetatable, select, math.floor, math.max, string.format
local unpack = unpack or table.unpack
local co_running = coroutine.running
local now = core.now

local M = { name = "ngx", now = now }

local settings = {
  trusted_certificate = false, -- the file of lua_ssl_trusted_certificate, when declared
  pool_size = 64,              -- kept-alive connections per pool and worker
  keepalive_timeout = 60,      -- seconds an idle pooled connection is kept
  read_size = 65536,           -- receiveany's maximum
  read_ahead = 131072,         -- body bytes read beyond what the consumer took, at most (plus one read)
  resolve = false,             -- host name -> IP address, used instead of nginx's resolver
}

--- configure{ trusted_certificate = path, pool_size = n, keepalive_timeout = s,
--   resolve = { [host] = "ip" }, read_ahead = bytes }
--- track_stream(s): a stream opened inside slm.ngx.relay's push source is
-- listed in the request's ngx.ctx.slm_relay_streams, so that the relay can
-- close it at once when the browser leaves or a cap is reached (the other
-- runtimes have no such hook; slm.stream calls it when present).
local function get_ctx() return ngx.ctx end
function M.track_stream(s)
  local ok, ctx = pcall(get_ctx) -- (a phase without ngx.ctx: nothing to track)
  local list = ok and ctx and ctx.slm_relay_streams
  if list then list[#list + 1] = s end
end

function M.configure(opts)
  if type(opts) ~= "table" then error("slm.transport.ngx.configure: expected a table", 2) end
  for k, v in pairs(opts) do
    if settings[k] == nil or k == "read_size" then
      error("slm.transport.ngx.configure: unknown option '" .. tostring(k) .. "'", 2)
    end
    if k == "resolve" then
      if v ~= false and type(v) ~= "table" then
        error("slm.transport.ngx.configure: resolve must be a table of host name -> IP address", 2)
      end
      for name, ip in pairs(v or {}) do
        if type(name) ~= "string" or type(ip) ~= "string" or not ip:match("^[%x.:]+$") then
          error("slm.transport.ngx.configure: resolve must map host names to IP address strings", 2)
        end
      end
    elseif k == "trusted_certificate" then
      if v ~= false and (type(v) ~= "string" or v == "") then
        error("slm.transport.ngx.configure: trusted_certificate must be a path string", 2)
      end
    elseif type(v) ~= "number" or v <= 0 or v ~= v or v == math.huge
        or ((k == "pool_size" or k == "read_ahead") and v % 1 ~= 0) then
      error("slm.transport.ngx.configure: " .. k .. " must be a positive number", 2)
    end
    settings[k] = v
  end
end

------------------------------------------------------------------ phases

-- Where cosockets, ngx.sleep and light threads work (lua-nginx-module).
local ALLOWED = {
  rewrite = true, access = true, content = true, timer = true,
  ssl_cert = true, ssl_session_fetch = true, ssl_client_hello = true,
  preread = true,
}
M.ALLOWED_PHASES = "rewrite_by_lua, access_by_lua, content_by_lua, timers (ngx.timer.at) "
  .. "and ssl_certificate_by_lua"

--- Raise a clear error unless the current phase allows cosockets.
function M.check_phase(what)
  local phase = get_phase()
  if ALLOWED[phase] then return phase end
  local where = phase == "init_worker" and "init_worker_by_lua (outside a timer)" or (phase .. "_by_lua")
  error(format("slm: %s cannot run in %s: nginx does not allow cosockets there, and lua-slm never "
    .. "blocks the worker with libcurl; call it from %s (from init_worker_by_lua: inside "
    .. "ngx.timer.at(0, fn))", what, where, M.ALLOWED_PHASES), 3)
end
local check_phase = M.check_phase

------------------------------------------------------------------ waiting

-- A wait list: threads wait until notify(); spurious wake-ups are fine
-- (waiters re-check their condition).
local function waiter_wait(c)
  local sem = c.sem
  if not sem then
    sem = semaphore.new(0)
    c.sem = sem
  end
  c.nwait = c.nwait + 1
  sem:wait(3600)
end

local function waiter_notify(c)
  local n = c.nwait
  if n > 0 then
    c.nwait = 0
    c.sem:post(n)
  end
end

------------------------------------------------------------------ tasks

local Task = {}
Task.__index = Task
Task.__name = "slm.Task"

local by_co = setmetatable({}, { __mode = "k" }) -- coroutine -> task
local next_id = 0

function Task.__tostring(t)
  return "slm.Task #" .. t.id .. " (" .. (t.finished and "done" or "running") .. ")"
end

local function pack(...) return { n = select("#", ...), ... } end

local function task_body(t, fn, ...)
  by_co[co_running()] = t
  local r = pack(pcall(fn, ...))
  t.finished = true
  if r[1] then
    t.results = r
  else
    t.failed, t.error = true, r[2]
  end
  local g = t.group
  if g then
    g.live = g.live - 1
    if t.failed and not t.observed then g.orphans[#g.orphans + 1] = t end
    waiter_notify(g)
  end
  waiter_notify(t)
end

--- The running task, or nil outside any (the request's entry thread).
function M.current()
  return by_co[co_running()]
end

--- spawn(fn, ...) -> task (a light thread); t:wait() -> fn's results or
-- raises its error; t:join() -> true, results... | false, err.
function M.spawn(fn, ...)
  if type(fn) ~= "function" then error("slm.spawn: expected a function, got " .. type(fn), 2) end
  check_phase("slm.spawn")
  next_id = next_id + 1
  local parent = M.current()
  local t = setmetatable({ id = next_id, nwait = 0, sem = false, finished = false,
    group = parent and parent.group or false }, Task)
  if t.group then t.group.live = t.group.live + 1 end
  local th, err = spawn_thread(task_body, t, fn, ...)
  if not th then
    if t.group then t.group.live = t.group.live - 1 end
    error("slm.spawn: " .. tostring(err), 2)
  end
  t.thread = th
  return t
end

function Task:wait()
  if M.current() == self then error("slm: a task cannot wait for itself", 2) end
  while not self.finished do waiter_wait(self) end
  self.observed = true
  if self.failed then error(self.error, 0) end
  return unpack(self.results, 2, self.results.n)
end

function Task:join()
  local r = pack(pcall(self.wait, self))
  return unpack(r, 1, r.n)
end

function Task:done() return self.finished end

--- run(fn, ...): fn as a task, and every task it spawns, to completion;
-- fn's results, or its error raised.  Errors of spawned tasks nobody
-- waited for go to nginx's error log.
function M.run(fn, ...)
  if type(fn) ~= "function" then error("slm.run: expected a function, got " .. type(fn), 2) end
  check_phase("slm.run")
  if M.current() then return fn(...) end
  local g = { live = 0, nwait = 0, sem = false, orphans = {} }
  next_id = next_id + 1
  local t = setmetatable({ id = next_id, nwait = 0, sem = false, finished = false, group = g,
    observed = true }, Task)
  g.live = 1
  local th, err = spawn_thread(task_body, t, fn, ...)
  if not th then error("slm.run: " .. tostring(err), 2) end
  t.thread = th
  while g.live > 0 do waiter_wait(g) end
  for i = 1, #g.orphans do
    local o = g.orphans[i]
    if not o.observed then ngx_log(ERR, "slm: task #", o.id, " failed: ", tostring(o.error)) end
  end
  if t.failed then error(t.error, 0) end
  return unpack(t.results, 2, t.results.n)
end

function M.sleep(s)
  check_phase("slm.sleep")
  ngx_sleep(s)
end

------------------------------------------------------------------ semaphores

local Sem = {}
Sem.__index = Sem

--- A counting semaphore (ngx.semaphore, made on first use: a client may be
-- created in init_by_lua, where none is needed yet).
function M.semaphore(n)
  return setmetatable({ n = n, sem = false }, Sem)
end

--- sem:acquire([timeout]) -> true | nil, "timeout" (nil: as long as it
-- takes), as the libcurl runtime's.
function Sem:acquire(timeout)
  check_phase("a lua-slm request (client:chat, client:stream, a task)")
  local s = self.sem
  if not s then
    s = semaphore.new(self.n)
    self.sem = s
  end
  local deadline = timeout and timeout < math.huge and ngx.now() + timeout or nil
  while true do
    local wait = 3600
    if deadline then
      wait = deadline - ngx.now()
      if wait <= 0 then return nil, "timeout" end
      if wait > 3600 then wait = 3600 end
    end
    local ok, err = s:wait(wait)
    if ok then return true end
    if err ~= "timeout" then error("slm: semaphore: " .. tostring(err), 2) end
  end
end

function Sem:release()
  local s = self.sem
  if not s then
    s = semaphore.new(self.n)
    self.sem = s
  end
  s:post(1)
end

------------------------------------------------------------------ connections

local Conn = {}
Conn.__index = Conn

local function ms(s) return max(1, floor(s * 1000 + 0.5)) end

-- The I/O thread met an end: record it and wake the readers.
local function conclude(c, ok, kind, msg)
  if c.ended then return end
  c.ended = true
  if not ok then c.kind, c.message = kind, msg end
  c.total_time = now() - c.t0
  waiter_notify(c)
end

local function close_socket(c)
  local sock = c.sock
  if sock then
    c.sock = nil
    pcall(sock.close, sock)
  end
end

-- A cosocket error string -> kind, message.
local function socket_failure(c, err, during)
  if err == "timeout" then
    return "timeout", format("%s timed out", during)
  end
  return "connect", format("%s failed: %s", during, tostring(err))
end

-- The seconds left for the next step: the total deadline, the first-byte
-- deadline before the headers, the idle timeout while the body streams.
local function budget(c, phase)
  local o, t = c.opts, now()
  local left
  if o.timeout then left = c.t0 + o.timeout - t end
  if phase == "connect" then
    local ct = o.connect_timeout or 10
    if not left or ct < left then left = ct end
  elseif phase == "head" then
    if o.first_byte_timeout then
      local fb = c.t0 + o.first_byte_timeout - t
      if not left or fb < left then left = fb end
    end
  else -- body
    if o.idle_timeout and (not left or o.idle_timeout < left) then left = o.idle_timeout end
  end
  return left or 3600
end

-- The address to connect to: nginx parses it as a URL's host, so an IPv6
-- literal (the URL's host without its brackets: "::1") needs them back
-- ("[::1]"), or it reads the last group as a port.
local function connect_host(host)
  local h = settings.resolve and settings.resolve[host] or host
  if h:find(":", 1, true) and h:sub(1, 1) ~= "[" then h = "[" .. h .. "]" end
  return h
end
M.connect_host = connect_host

local function io_main(c)
  local o, u = c.opts, c.url
  local tls = u.scheme == "https"
  local sock = tcp()
  c.sock = sock
  local pool = format("slm:%s:%d%s", u.host, u.port,
    tls and (":tls:" .. u.host .. ":" .. (o.ca_file or "")) or "")
  -- connect, from the pool unless fresh_connect (then pooled ones are
  -- closed until a new connection comes)
  local reused
  for _ = 1, settings.pool_size + 1 do
    local left = budget(c, "connect")
    if left <= 0 then return conclude(c, nil, "timeout", "connect timed out") end
    sock:settimeouts(ms(left), ms(left), ms(left))
    local ok, err = sock:connect(connect_host(u.host), u.port, { pool = pool })
    if c.cancelled then return close_socket(c) end
    if not ok then
      local kind, msg = socket_failure(c, err, "connect to " .. u.authority)
      if err and err:find("no resolver", 1, true) then
        msg = msg .. " (inside nginx host names need a `resolver` directive)"
      end
      return conclude(c, nil, kind, msg)
    end
    reused = sock:getreusedtimes() or 0
    if reused == 0 or not o.fresh_connect then break end
    sock:close()
  end
  c.reused = reused
  c.new_connections = reused == 0 and 1 or 0
  c.connect_time = now() - c.t0
  if tls and reused == 0 then
    local left = budget(c, "connect")
    sock:settimeouts(ms(left), ms(left), ms(left))
    -- lua-resty-core 0.1.25: a handshake that completes at once but fails
    -- verification raises "assertion failed!" when a session is asked for,
    -- and returns true when none is (false), leaving a dead socket; so ask
    -- for one (nil) and take the raise as the failed verification it is
    local hok, session, err = pcall(sock.sslhandshake, sock, nil, u.host, true)
    if not hok then
      session, err = nil, "certificate verify failed (or the server refused the handshake)"
    end
    if c.cancelled then return close_socket(c) end
    if not session and err then
      close_socket(c)
      local kind, msg = socket_failure(c, err, "TLS handshake with " .. u.authority)
      if kind ~= "timeout" then msg = msg .. " (the CAs trusted are lua_ssl_trusted_certificate's)" end
      return conclude(c, nil, kind, msg)
    end
  end
  local left = budget(c, "head")
  sock:settimeouts(ms(budget(c, "connect")), ms(left), ms(left))
  local sent, serr = sock:send(c.request)
  c.request = nil
  if c.cancelled then return close_socket(c) end
  if not sent then
    close_socket(c)
    local kind, msg = socket_failure(c, serr, "sending the request")
    return conclude(c, nil, kind, msg)
  end
  local p = c.parser
  local size = settings.read_size
  while true do
    local phase = p.head_done and "body" or "head"
    left = budget(c, phase)
    if left <= 0 then
      close_socket(c)
      return conclude(c, nil, "timeout", phase == "head" and "no reply headers in time"
        or "timed out reading the reply")
    end
    sock:settimeout(ms(left))
    local data, err = sock:receiveany(size)
    if c.cancelled then return close_socket(c) end
    if data then
      if not c.ttfb then c.ttfb = now() - c.t0 end
      local ok, kind, msg = p:feed(data)
      if not ok then
        close_socket(c)
        return conclude(c, nil, kind, msg)
      end
      if p.done then
        if p.reusable then
          local kok = sock:setkeepalive(ms(settings.keepalive_timeout), settings.pool_size)
          if not kok then pcall(sock.close, sock) end
        else
          sock:close()
        end
        c.sock = nil
        return conclude(c, true)
      end
      if p.head_done or p.nout > 0 then waiter_notify(c) end
      -- backpressure: no more reads while the consumer has not taken what
      -- is there (the upstream's writes wait in the socket buffers, not
      -- up to max_body in this worker's memory); read() wakes us.  Never
      -- past the call's total deadline: a conn nobody reads (nor closes)
      -- then ends as timed out, as it would have without the wait
      while p.nbytes >= settings.read_ahead and not c.cancelled do
        local wait = 60
        if o.timeout then
          wait = c.t0 + o.timeout - now()
          if wait <= 0 then break end
          if wait > 60 then wait = 60 end
        end
        local fill = c.fill
        if not fill then
          fill = semaphore.new(0)
          c.fill = fill
        end
        c.filled = true
        fill:wait(wait)
        c.filled = false
      end
      if c.cancelled then return close_socket(c) end
    elseif err == "closed" then
      c.sock = nil
      local ok, kind, msg = p:eof()
      if not ok and reused > 0 and not p.head_done and p.buf == "" then
        msg = "the reused connection closed before replying"
      end
      return conclude(c, ok, kind, msg)
    else
      close_socket(c)
      if err == "timeout" then
        local o2 = c.opts
        local msg
        if not p.head_done then
          msg = o2.first_byte_timeout and format("no first byte within %g s", o2.first_byte_timeout)
            or format("no reply within %g s", o2.timeout or 0)
        elseif phase == "body" and o2.idle_timeout and (not o2.timeout or now() < c.t0 + o2.timeout - 0.001) then
          msg = format("stalled: no data for %g s", o2.idle_timeout)
        else
          msg = format("the reply took longer than %g s", o2.timeout or 0)
        end
        return conclude(c, nil, "timeout", msg)
      end
      return conclude(c, nil, "connect", "connection broken mid-reply: " .. tostring(err))
    end
  end
end

local function io_worker(c)
  local ok, err = pcall(io_main, c)
  if not ok then
    close_socket(c)
    conclude(c, nil, "connect", "slm: transport error: " .. tostring(err))
  end
  c.worker_done = true
  local sup = c.sup
  if sup then sup:post(1) end
end

-- The exchange's own light thread: it starts the worker (io_main) as its
-- child and waits for it to end or for a cancel.  Only a thread's parent
-- may kill it (which aborts the cosocket operation it is blocked in), and
-- this one is always free to: so cancel() from any light thread (not only
-- the one that opened the conn) closes the socket at once, instead of
-- after the upstream's next bytes or a timeout.
local function io_thread(c)
  local sup = semaphore.new(0)
  c.sup = sup
  local w, err = spawn_thread(io_worker, c)
  if not w then
    conclude(c, nil, "connect", "cannot start the exchange: " .. tostring(err))
  else
    while not c.worker_done and not c.cancelled do sup:wait(3600) end
    if not c.worker_done then
      kill_thread(w)
      close_socket(c)
    end
  end
  c.sup = nil
  c.thread = nil
  c.io_done = true
end

local function basic_auth(userinfo)
  return "Authorization: Basic " .. ngx.encode_base64(ngx.unescape_uri(userinfo))
end

--- open(request) -> conn (the exchange runs in a light thread of its own)
function M.open(o)
  check_phase("a lua-slm request (client:chat, client:stream, a task)")
  local c = setmetatable({ opts = o, t0 = now(), nwait = 0, sem = false, ended = false,
    cancelled = false, new_connections = 0, reused = 0 }, Conn)
  local u, why = http1.parse_url(o.url or "")
  if not u then
    conclude(c, nil, "connect", "bad URL: " .. why)
    return c
  end
  c.url = u
  if o.ca_file and u.scheme == "https" and o.ca_file ~= settings.trusted_certificate then
    conclude(c, nil, "connect", format("ca_file %s is not the file nginx trusts: inside nginx the "
      .. "CAs are lua_ssl_trusted_certificate's; set it to this file and declare it with "
      .. "require('slm.transport.ngx').configure{ trusted_certificate = path }%s", o.ca_file,
      settings.trusted_certificate and " (declared: " .. settings.trusted_certificate .. ")" or ""))
    return c
  end
  local headers = o.headers
  if u.userinfo then
    local h = {}
    local has_auth = false
    for i = 1, #headers do
      h[i] = headers[i]
      if headers[i]:lower():find("^authorization:") then has_auth = true end
    end
    if not has_auth then h[#h + 1] = basic_auth(u.userinfo) end
    headers = h
  end
  local host = u.authority:gsub("^.*@", "")
  c.request = http1.request{ method = o.method or "GET", target = u.target, host = host,
    headers = headers, body = o.body }
  c.parser = http1.parser{ method = o.method or "GET", max_body = o.max_body }
  local th, err = spawn_thread(io_thread, c)
  if not th then
    conclude(c, nil, "connect", "cannot start the exchange: " .. tostring(err))
  elseif not c.io_done then
    c.thread = th
  end
  return c
end

-- Stop the exchange (from any light thread): its thread wakes, kills the
-- worker in the middle of whatever it waits for and closes the socket, as
-- soon as this thread yields.
local function stop_io(c)
  local sup = c.sup
  if sup then sup:post(1) end
end

function Conn:response()
  local p = self.parser
  while true do
    if p and p.head_done then return p.status, p.headers end
    if self.ended then
      if self.cancelled then return nil, "cancelled", "cancelled" end
      if self.kind then return nil, self.kind, self.message end
      return nil, "protocol", "reply ended without an HTTP status"
    end
    waiter_wait(self)
    if self.cancelled then stop_io(self) end
  end
end

function Conn:read()
  local p = self.parser
  while true do
    if self.cancelled then
      stop_io(self)
      return nil
    end
    local b = p and p:take()
    if b then
      if self.filled then self.fill:post(1) end -- the I/O thread may read on
      return b
    end
    if self.ended then return nil end
    waiter_wait(self)
  end
end

function Conn:result()
  if self.cancelled then return nil, "cancelled", "cancelled" end
  if not self.ended then return nil, "running", "the reply is still arriving" end
  if self.kind then return nil, self.kind, self.message end
  return true
end

function Conn:cancel()
  -- already over (complete or failed): nothing to stop, the result stays
  if self.cancelled or self.ended then return end
  self.cancelled = true
  conclude(self, nil, "cancelled", "cancelled")
  waiter_notify(self)
  stop_io(self)
end

function Conn:info()
  return { ttfb = self.ttfb, total_time = self.total_time or (now() - self.t0),
    connect_time = self.connect_time, new_connections = self.new_connections,
    reused = self.reused, http_version = "1.1" }
end

return M
