-- slm.shared.redis (slm.redis): budgets, rate limits, concurrency limits,
-- session stores and a response cache kept in Redis, so that every worker
-- of every nginx and every batch job pointed at one Redis shares them.
--
--   local R = slm.redis
--   local conn = R.connect{ host = "127.0.0.1", port = 6379, password = nil,
--     db = nil, timeout = 1, prefix = "slm:" }     -- or pass that table as `redis`
--   slm.budget{ usd = 5, backend = R.budget{ redis = conn, name = "team-a",
--     hold_ttl = 300, period = nil | "day" | "month" } }
--   local lim = R.ratelimit{ redis = conn, name = "rpm", limit = 60, per = 60 }
--   lim:take(n, rt) -> true | nil, err                (waits through rt.sleep)
--   local sem = R.semaphore{ redis = conn, name = "gpu", n = 4, ttl = 300 }
--   sem:acquire(rt, timeout) -> token | nil, err;  sem:release(token)
--   R.store{ redis = conn, prefix = "sessions:", ttl = nil } -> a session store (slm.store's interface)
--   local c = R.cache{ redis = conn, ttl = 3600 }
--   c:get(key) -> string | nil [, err];  c:set(key, value, ttl) -> true | nil, err
--
-- The shared-dict storage (slm.shdict) has the same constructors with
-- `dict = name` in place of `redis`.
--
-- How a budget stays exact across hosts: reserve and settle are Redis Lua
-- scripts (EVALSHA; EVAL when the server lost its script cache), so each
-- runs atomically on the server.  A reservation ("hold") is an entry of a
-- ZSET of hold ids by expiry (Redis server time) and of a HASH of their
-- amounts; reserve first drops the holds whose time is up (their holder
-- died or hung), then checks spent + held + the new worst case against
-- the limits, then adds the hold.  Settle removes the hold and adds the
-- real amounts to the spent totals.  With a period ("day", "month") the
-- keys carry the UTC day or month of Redis' clock (":2026-12-02"), so the
-- totals start from zero at the boundary; old periods expire by
-- themselves.  A hold settles into the period it was reserved in.
--
-- Connections: inside nginx (where cosockets are allowed) resty.redis
-- from Debian's lua-nginx-redis (`require "nginx.redis"`) with its
-- keepalive pool; elsewhere lua-slm's own RESP client over the libcurl
-- runtime's non-blocking sockets (rt.tcp, lua/slm/transport/tcp.lua): inside a
-- task a Redis call yields and other tasks' HTTP requests go on.
--
-- Errors: a Redis that cannot be reached, times out or refuses a command
-- is `nil, err`: kind "connect" or "timeout" (or "auth" for a refused
-- password, "server" for another refusal), err.storage = "redis", a
-- message naming host:port and what failed, never the password.  A budget
-- whose Redis fails refuses the request (fails closed).
local errors = require "slm.errors"
local store = require "slm.store"
local core = require "slm.core"

local type, pairs, tostring, tonumber, setmetatable, error, format, concat, require, getmetatable =
  type, pairs, tostring, tonumber, setmetatable, error, string.format, table.concat, require, getmetatable
local find, sub, ceil, huge = string.find, string.sub, math.ceil, math.huge
local select, unpack = select, table.unpack or unpack

local M = {}

local function class(name)
  local C = {}
  C.__index = C
  C.__name = name
  return C
end

------------------------------------------------------------------ errors

local function fail(conn, kind, what, msg)
  return nil, errors.new(kind, format("redis %s: %s: %s", conn.where, what, tostring(msg)),
    { status = 0, storage = "redis" })
end

-- A server's error reply -> a kind.
local function reply_kind(msg)
  if find(msg, "^WRONGPASS") or find(msg, "^NOAUTH") or find(msg, "^NOPERM") then return "auth" end
  return "server"
end

------------------------------------------------------------------ RESP (plain Lua)

local function resp_encode(args, n)
  local out = { "*" .. n .. "\r\n" }
  for i = 1, n do
    local a = tostring(args[i])
    out[#out + 1] = "$" .. #a .. "\r\n" .. a .. "\r\n"
  end
  return concat(out)
end

-- One reply: value | nil, kind, msg.  A server error reply is returned as
-- a value { err = message } so that the connection stays usable.
local function resp_read(s, depth)
  local line, kind, msg = s:receive_line()
  if not line then return nil, kind, msg end
  local t, rest = sub(line, 1, 1), sub(line, 2)
  if t == "+" then return rest end
  if t == "-" then return { err = rest } end
  if t == ":" then return tonumber(rest) end
  if t == "$" then
    local n = tonumber(rest)
    if not n then return nil, "protocol", "bad bulk length" end
    if n < 0 then return false end
    local b, k2, m2 = s:receive(n + 2)
    if not b then return nil, k2, m2 end
    return sub(b, 1, n)
  end
  if t == "*" then
    local n = tonumber(rest)
    if not n then return nil, "protocol", "bad array length" end
    if n < 0 then return false end
    if depth > 8 then return nil, "protocol", "reply nested too deep" end
    local arr = {}
    for i = 1, n do
      local v, k2, m2 = resp_read(s, depth + 1)
      if v == nil then return nil, k2, m2 end
      arr[i] = v
    end
    return arr
  end
  return nil, "protocol", "not a RESP reply"
end

------------------------------------------------------------------ connections

local Conn = class("slm.redis.connection")
function Conn:__tostring() return "slm.redis.connection(" .. self.where .. ")" end

local CONN_OPTS = { host = true, port = true, password = true, db = true, timeout = true, prefix = true,
  pool_size = true }

local function in_nginx()
  return ngx ~= nil and type(ngx.get_phase) == "function" and ngx.socket ~= nil
    and ngx.get_phase() ~= "init" and ngx.get_phase() ~= "init_worker"
end

--- connect(opts) -> a connection (no socket is opened before the first command)
function M.connect(opts)
  if getmetatable(opts) == Conn then return opts end
  if opts == nil then opts = {} end
  if type(opts) ~= "table" then error("slm.redis: option 'redis' must be a table or a connection", 2) end
  for k in pairs(opts) do
    if not CONN_OPTS[k] then error(format("slm.redis: unknown redis option '%s'", tostring(k)), 2) end
  end
  local host, port = opts.host or "127.0.0.1", opts.port or 6379
  if type(host) ~= "string" then error("slm.redis: option 'host' must be a string", 2) end
  if type(port) ~= "number" or port % 1 ~= 0 or port < 1 or port > 65535 then
    error("slm.redis: option 'port' must be a port number", 2)
  end
  local timeout = opts.timeout or 1
  if type(timeout) ~= "number" or timeout <= 0 then error("slm.redis: option 'timeout' must be a positive number", 2) end
  if opts.password ~= nil and type(opts.password) ~= "string" then error("slm.redis: option 'password' must be a string", 2) end
  if opts.db ~= nil and (type(opts.db) ~= "number" or opts.db % 1 ~= 0 or opts.db < 0) then
    error("slm.redis: option 'db' must be a non-negative integer", 2)
  end
  local pool = opts.pool_size or 32
  if type(pool) ~= "number" or pool % 1 ~= 0 or pool < 1 then
    error("slm.redis: option 'pool_size' must be a positive integer", 2)
  end
  local prefix = opts.prefix or "slm:"
  if type(prefix) ~= "string" then error("slm.redis: option 'prefix' must be a string", 2) end
  -- the password lives in a closure, not in a field a dump would print
  local password = opts.password
  return setmetatable({ host = host, port = port, db = opts.db, timeout = timeout, prefix = prefix,
    where = host .. ":" .. port, idle = {}, pool_size = pool,
    secret = function() return password end }, Conn)
end

-- Plain Lua: a socket from the pool, or a new one, authenticated and on
-- its db: socket, reused | nil, kind, msg.
local function take(self)
  local idle = self.idle
  local s = idle[#idle]
  if s then
    idle[#idle] = nil
    return s, true
  end
  local rt = require("slm.runtime").get("curl")
  local sock, kind, msg = rt.tcp(self.host, self.port, { timeout = self.timeout })
  if not sock then return nil, kind, msg end
  local pw = self.secret()
  local setup = {}
  if pw then setup[#setup + 1] = { "AUTH", pw } end
  if self.db and self.db ~= 0 then setup[#setup + 1] = { "SELECT", self.db } end
  for i = 1, #setup do
    local ok, k, m = sock:send(resp_encode(setup[i], #setup[i]))
    local r
    if ok then r, k, m = resp_read(sock, 0) end
    if r == nil then sock:close(); return nil, k, setup[i][1] .. ": " .. tostring(m) end
    if type(r) == "table" and r.err then
      sock:close()
      -- never the command's arguments: AUTH's is the password
      return nil, reply_kind(r.err), setup[i][1] .. " refused: " .. r.err
    end
  end
  return sock, false
end

local function give_back(self, s)
  local idle = self.idle
  if #idle < self.pool_size then idle[#idle + 1] = s else s:close() end
end

-- Plain Lua: one command -> reply | nil, kind, msg.  A reused connection
-- that turns out dead before any reply (Redis restarted) is replaced once
-- when `again` allows it.
local function call_plain(self, args, n, again)
  local s, reused, why = take(self)
  if not s then return nil, reused, why end
  local ok, kind, msg = s:send(resp_encode(args, n))
  local r
  if ok then r, kind, msg = resp_read(s, 0) end
  if r == nil then
    s:close()
    if reused and kind == "connect" then
      -- the server closed it (restarted, killed, idle timeout): the other
      -- idle ones went the same way
      self:close()
      if again then return call_plain(self, args, n, false) end
    end
    return nil, kind, msg
  end
  give_back(self, s)
  return r
end

-- nginx: resty.redis on a keepalive pool -> reply | nil, kind, msg.
local resty_redis
local function call_ngx(self, args, n)
  resty_redis = resty_redis or require "nginx.redis"
  local red = resty_redis:new()
  local ms = ceil(self.timeout * 1000)
  red:set_timeout(ms)
  local ok, err = red:connect(self.host, self.port)
  if not ok then
    return nil, err == "timeout" and "timeout" or "connect", "connect: " .. tostring(err)
  end
  if (red:get_reused_times() or 0) == 0 then
    local pw = self.secret()
    if pw then
      local r, e = red:auth(pw)
      if not r then
        red:close()
        if e == "timeout" then return nil, "timeout", "AUTH: timeout" end
        return nil, reply_kind(tostring(e)), "AUTH refused: " .. tostring(e)
      end
    end
    if self.db and self.db ~= 0 then
      local r, e = red:select(self.db)
      if not r then red:close(); return nil, e == "timeout" and "timeout" or "server", "SELECT: " .. tostring(e) end
    end
  end
  local cmd = args[1]:lower()
  local res, e = red[cmd](red, unpack(args, 2, n))
  if res == nil and e then
    -- resty.redis: nil, "timeout" / "closed" for the socket; false, msg for
    -- a server's error reply (res == false, and the connection is fine)
    -- (no second try on a pooled connection: nginx's pool drops the ones
    -- the server closes while they are idle, redis_ngx_spec restarts Redis)
    red:close()
    return nil, e == "timeout" and "timeout" or "connect", cmd:upper() .. ": " .. tostring(e)
  end
  red:set_keepalive(60000, self.pool_size)
  if res == false and e then return { err = e } end
  if res == ngx.null then return false end
  if type(res) == "table" then
    for i = 1, #res do if res[i] == ngx.null then res[i] = false end end
  end
  return res
end

-- One command -> reply | nil, err; `again`: it may be sent a second time
-- on a fresh connection when a pooled one was dead (plain Lua).
local function exec(self, args, n, again)
  local r, kind, msg
  if in_nginx() then r, kind, msg = call_ngx(self, args, n)
  else r, kind, msg = call_plain(self, args, n, again) end
  if r == nil then return fail(self, kind, args[1], msg) end
  if type(r) == "table" and r.err then return fail(self, reply_kind(r.err), args[1], r.err) end
  return r
end

--- conn:command(name, args...) -> reply | nil, err.  nil replies are false.
function Conn:command(...)
  return exec(self, { ... }, select("#", ...), true)
end

--- conn:close(): closes the idle connections of the plain-Lua pool.
function Conn:close()
  local idle = self.idle
  for i = #idle, 1, -1 do idle[i]:close(); idle[i] = nil end
end

-- A script: { src = text, sha = nil until SCRIPT LOAD said }.
local function script(src) return { src = src } end

--- conn:eval(script, keys, args) -> reply | nil, err: EVALSHA, loading
-- the script first, and EVAL when the server has lost it (NOSCRIPT).
local function run(conn, sc, keys, args, again)
  local a, n = { "EVALSHA", "", #keys }, 3
  for i = 1, #keys do n = n + 1; a[n] = keys[i] end
  for i = 1, #args do n = n + 1; a[n] = args[i] end
  if not sc.sha then
    local sha, err = conn:command("SCRIPT", "LOAD", sc.src)
    if not sha then return nil, err end
    sc.sha = sha
  end
  a[1], a[2] = "EVALSHA", sc.sha
  local r, err = exec(conn, a, n, again)
  if not r and err and find(err.message, "NOSCRIPT", 1, true) then
    a[1], a[2] = "EVAL", sc.src
    r, err = exec(conn, a, n, again)
  end
  return r, err
end

------------------------------------------------------------------ option checks

local function check_opts(opts, what, known)
  if type(opts) ~= "table" then error(format("slm.redis.%s: expected an options table", what), 3) end
  for k in pairs(opts) do
    if not known[k] then error(format("slm.redis.%s: unknown option '%s'", what, tostring(k)), 3) end
  end
  if opts.redis == nil then error(format("slm.redis.%s: option 'redis' is required", what), 3) end
end

local function check_name(v, what)
  if type(v) ~= "string" or v == "" then error(format("slm.redis.%s: option 'name' must be a non-empty string", what), 3) end
end

local function check_positive(v, name, what, optional)
  if v == nil and optional then return end
  if type(v) ~= "number" or v ~= v or v <= 0 or v == huge then
    error(format("slm.redis.%s: option '%s' must be a positive number", what, name), 3)
  end
end

local function num(x) return format("%.17g", x) end

------------------------------------------------------------------ budget

-- The period suffix of the keys, from Redis' clock (or ARGV's test clock).
local PERIOD_LUA = [[
local function period_key(period, secs)
  if period == "" then return "" end
  local days = math.floor(secs / 86400)
  local z = days + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local d = doy - math.floor((153 * mp + 2) / 5) + 1
  local m = mp < 10 and mp + 3 or mp - 9
  if m <= 2 then y = y + 1 end
  if period == "day" then return string.format(":%04d-%02d-%02d", y, m, d) end
  return string.format(":%04d-%02d", y, m)
end
local function clock(override)
  if override ~= "" then
    local s = tonumber(override)
    return s, math.floor(s * 1000)
  end
  local t = redis.call("TIME")
  return tonumber(t[1]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- drop the holds whose time is up (kept aside in :reaped, so that a late
-- settle of one still charges it, once, for a day: :reapedz has when each
-- was reaped, and older ones go, else a budget without a period whose
-- holders keep dying grows :reaped for ever); -> held usd, held tokens
local function reap(k, now_ms)
  local dead = redis.call("ZRANGEBYSCORE", k .. ":holds", "-inf", now_ms)
  for i = 1, #dead do
    local a = redis.call("HGET", k .. ":amts", dead[i])
    if a then
      redis.call("HSET", k .. ":reaped", dead[i], a)
      redis.call("ZADD", k .. ":reapedz", now_ms, dead[i])
    end
    redis.call("HDEL", k .. ":amts", dead[i])
  end
  if #dead > 0 then
    redis.call("ZREMRANGEBYSCORE", k .. ":holds", "-inf", now_ms)
    redis.call("EXPIRE", k .. ":reaped", 33 * 86400)
    redis.call("EXPIRE", k .. ":reapedz", 33 * 86400)
  end
  local old = redis.call("ZRANGEBYSCORE", k .. ":reapedz", "-inf", now_ms - 86400000, "LIMIT", 0, 1000)
  for i = 1, #old do redis.call("HDEL", k .. ":reaped", old[i]) end
  if #old > 0 then redis.call("ZREM", k .. ":reapedz", unpack(old)) end
  local hu, ht = 0, 0
  local amts = redis.call("HVALS", k .. ":amts")
  for i = 1, #amts do
    local u, t = string.match(amts[i], "^(%S+) (%S+)$")
    hu = hu + tonumber(u)
    ht = ht + tonumber(t)
  end
  return hu, ht
end
local function spent(k)
  local s = redis.call("HMGET", k .. ":spent", "usd", "tokens")
  return tonumber(s[1]) or 0, tonumber(s[2]) or 0
end
]]

-- KEYS[1] base key; ARGV usd, tokens, limit_usd (-1: none), limit_tokens
-- (-1: none), hold_ttl_ms, period, clock override ("" = TIME)
-- -> { 1, id } | { 0, left_usd, left_tokens }
local RESERVE = script(PERIOD_LUA .. [[
local usd, tokens = tonumber(ARGV[1]), tonumber(ARGV[2])
local lu, lt = tonumber(ARGV[3]), tonumber(ARGV[4])
local secs, now_ms = clock(ARGV[7])
local pk = period_key(ARGV[6], secs)
local k = KEYS[1] .. pk
local hu, ht = reap(k, now_ms)
local su, st = spent(k)
local left_u, left_t = lu - su - hu, lt - st - ht
if (lu >= 0 and usd > left_u + 1e-12) or (lt >= 0 and tokens > left_t) then
  return { 0, lu < 0 and "none" or string.format("%.17g", left_u),
    lt < 0 and "none" or string.format("%.17g", left_t) }
end
-- the id carries Redis' clock besides the counter: a Redis restarted from
-- an older snapshot (or from nothing) counts from an older seq again, and a
-- settle of a hold from before must not settle a new one of the same number
local n = redis.call("HINCRBY", k .. ":spent", "seq", 1)
local now = redis.call("TIME")
local id = pk .. "#" .. n .. "-" .. now[1] .. string.format("%06d", tonumber(now[2]))
redis.call("ZADD", k .. ":holds", now_ms + tonumber(ARGV[5]), id)
redis.call("HSET", k .. ":amts", id, ARGV[1] .. " " .. ARGV[2])
if pk ~= "" then
  local keep = (ARGV[6] == "day" and 2 or 33) * 86400
  redis.call("EXPIRE", k .. ":spent", keep)
  redis.call("EXPIRE", k .. ":holds", keep)
  redis.call("EXPIRE", k .. ":amts", keep)
  redis.call("EXPIRE", k .. ":reaped", keep)
  redis.call("EXPIRE", k .. ":reapedz", keep)
end
return { 1, id }
]])

-- KEYS[1] base key; ARGV id, usd, tokens: the hold replaced by the spend
-- (charged even when the hold had expired and was reaped: the money was
-- spent).  Idempotent: a hold is charged once, so a settle whose reply was
-- lost can be sent again -> 1 charged now, 0 charged before.
local SETTLE = script([[
local id = ARGV[1]
local pk = string.match(id, "^(.*)#[%d%-]+$") or ""
local k = KEYS[1] .. pk
if redis.call("HDEL", k .. ":amts", id) == 0 and redis.call("HDEL", k .. ":reaped", id) == 0 then
  return 0
end
redis.call("ZREM", k .. ":holds", id)
redis.call("ZREM", k .. ":reapedz", id)
redis.call("HINCRBYFLOAT", k .. ":spent", "usd", ARGV[2])
redis.call("HINCRBYFLOAT", k .. ":spent", "tokens", ARGV[3])
return 1
]])

-- KEYS[1] base key; ARGV period, clock override -> { su, st, hu, ht }
local TOTALS = script(PERIOD_LUA .. [[
local secs, now_ms = clock(ARGV[2])
local k = KEYS[1] .. period_key(ARGV[1], secs)
local hu, ht = reap(k, now_ms)
local su, st = spent(k)
local f = "%.17g"
return { string.format(f, su), string.format(f, st), string.format(f, hu), string.format(f, ht) }
]])

local Budget = class("slm.redis.budget")
function Budget:__tostring() return "slm.redis.budget(" .. self.key .. ")" end

local BUDGET_OPTS = { redis = true, name = true, hold_ttl = true, period = true, clock = true }

--- budget{ redis, name, hold_ttl = 300, period = nil | "day" | "month" }
-- -> a budget backend for slm.budget{ usd, tokens, backend = ... }.
-- (clock: a function -> epoch seconds used in place of Redis' TIME, for
-- tests of periods and expiry; never needed otherwise)
function M.budget(opts)
  check_opts(opts, "budget", BUDGET_OPTS)
  check_name(opts.name, "budget")
  check_positive(opts.hold_ttl, "hold_ttl", "budget", true)
  if opts.period ~= nil and opts.period ~= "day" and opts.period ~= "month" then
    error("slm.redis.budget: option 'period' must be \"day\" or \"month\"", 2)
  end
  if opts.clock ~= nil and type(opts.clock) ~= "function" then
    error("slm.redis.budget: option 'clock' must be a function", 2)
  end
  local conn = M.connect(opts.redis)
  return setmetatable({ conn = conn, key = conn.prefix .. "budget:" .. opts.name,
    ttl_ms = ceil((opts.hold_ttl or 300) * 1000), period = opts.period or "", clock = opts.clock,
    unsettled = {} }, Budget)
end

local function clock_arg(self)
  return self.clock and num(self.clock()) or ""
end

local function limit_arg(v) return v == huge and "-1" or num(v) end

M.SETTLE_TRIES = 3        -- a settle's tries before it is kept for later
M.SETTLE_PAUSE = 0.05     -- seconds before the second try (doubled after)
M.UNSETTLED_MAX = 10000   -- settles kept per budget object at most

local function settle_once(self, u)
  return run(self.conn, SETTLE, { self.key }, { u[1], num(u[2]), num(u[3]) }, true)
end

-- Send the settles kept from earlier failures (oldest first), until one fails.
local function flush_unsettled(self)
  local list = self.unsettled
  while list[1] do
    if not settle_once(self, list[1]) then return end
    table.remove(list, 1)
  end
end

--- -> id | nil, left_usd, left_tokens | nil, err (Redis failed: refused)
function Budget:reserve(usd, tokens, limit_usd, limit_tokens)
  flush_unsettled(self)
  local r, err = run(self.conn, RESERVE, { self.key },
    { num(usd), num(tokens), limit_arg(limit_usd), limit_arg(limit_tokens), self.ttl_ms, self.period,
      clock_arg(self) }, true)
  if not r then return nil, err end
  if tonumber(r[1]) == 1 then return r[2] end
  return nil, r[2] == "none" and huge or tonumber(r[2]), r[3] == "none" and huge or tonumber(r[3])
end

--- -> true | nil, err.  SETTLE is idempotent, so a settle that fails is
-- tried again (M.SETTLE_TRIES in all, pausing in between); when Redis
-- stays away it is kept in this budget object and sent before its next
-- reserve, settle or totals (budget.unsettled, at most UNSETTLED_MAX): the
-- spend is recorded once Redis is back, never twice.  Meanwhile the hold
-- counts until hold_ttl, then as spent when the kept settle lands.
function Budget:settle(id, usd, tokens)
  flush_unsettled(self)
  local u = { id, usd, tokens }
  local r, err = settle_once(self, u)
  local pause = M.SETTLE_PAUSE
  for _ = 2, M.SETTLE_TRIES do
    if r then break end
    -- (a phase where nginx cannot sleep: the tries follow at once)
    pcall(require("slm.runtime").default().sleep, pause)
    pause = pause * 2
    r, err = settle_once(self, u)
  end
  if r then return true end
  local list = self.unsettled
  if #list < M.UNSETTLED_MAX then
    list[#list + 1] = u
    err.message = err.message .. " (the settle is kept and sent again with this budget's next call)"
  else
    err.message = err.message .. " (" .. M.UNSETTLED_MAX .. " settles already kept: this spend is not recorded)"
  end
  return nil, err
end

--- -> spent_usd, spent_tokens, held_usd, held_tokens | nil, err
function Budget:totals()
  flush_unsettled(self)
  local r, err = run(self.conn, TOTALS, { self.key }, { self.period, clock_arg(self) }, true)
  if not r then return nil, err end
  return tonumber(r[1]), tonumber(r[2]), tonumber(r[3]), tonumber(r[4])
end

------------------------------------------------------------------ rate limit

-- A token bucket on Redis' clock.  KEYS[1]; ARGV limit, per_ms, n
-- -> 0 (taken) | ms to wait before n can be there
local TAKE = script([[
local limit, per, n = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call("HMGET", KEYS[1], "level", "at")
local level, at = tonumber(b[1]), tonumber(b[2])
if not level then level, at = limit, now end
-- (Redis' clock set back refills nothing: as negative time it would drain
-- the bucket, and every taker would wait as long as the clock went back)
if now > at then level = math.min(limit, level + (now - at) * limit / per) end
local wait = 0
if level >= n then level = level - n else wait = math.ceil((n - level) * per / limit) end
redis.call("HSET", KEYS[1], "level", string.format("%.17g", level), "at", now)
redis.call("PEXPIRE", KEYS[1], per * 2)
return wait
]])

local Limit = class("slm.redis.ratelimit")

--- ratelimit{ redis, name, limit, per = 60 }: at most `limit` units per
-- `per` seconds, shared by everyone on that Redis.
function M.ratelimit(opts)
  check_opts(opts, "ratelimit", { redis = true, name = true, limit = true, per = true })
  check_name(opts.name, "ratelimit")
  check_positive(opts.limit, "limit", "ratelimit")
  check_positive(opts.per, "per", "ratelimit", true)
  local conn = M.connect(opts.redis)
  return setmetatable({ conn = conn, key = conn.prefix .. "ratelimit:" .. opts.name, limit = opts.limit,
    per_ms = ceil((opts.per or 60) * 1000) }, Limit)
end

--- lim:take(n, rt) -> true | nil, err: waits (rt.sleep) until n units are
-- there.  More than the limit at once is taken as the whole limit.
function Limit:take(n, rt)
  n = n or 1
  if type(n) ~= "number" or n < 0 or n ~= n then error("slm.redis.ratelimit: take needs a non-negative number", 2) end
  if n > self.limit then n = self.limit end
  rt = rt or require("slm.runtime").default()
  while true do
    local wait, err = run(self.conn, TAKE, { self.key }, { num(self.limit), self.per_ms, num(n) }, true)
    if not wait then return nil, err end
    if wait == 0 then return true end
    rt.sleep(wait / 1000)
  end
end

------------------------------------------------------------------ semaphore

-- KEYS[1] zset of tokens by expiry, KEYS[2] token counter; ARGV n, ttl_ms
-- -> token | false (full)
local ACQUIRE = script([[
local t = redis.call("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call("ZREMRANGEBYSCORE", KEYS[1], "-inf", now)
if redis.call("ZCARD", KEYS[1]) >= tonumber(ARGV[1]) then return false end
-- (with Redis' clock: a restarted Redis counts from an older value again,
-- and the release of a token from before must not free a new holder's slot)
local token = redis.call("INCR", KEYS[2]) .. "-" .. t[1] .. string.format("%06d", tonumber(t[2]))
redis.call("ZADD", KEYS[1], now + tonumber(ARGV[2]), token)
redis.call("PEXPIRE", KEYS[1], tonumber(ARGV[2]) * 2)
return token
]])

local Sem = class("slm.redis.semaphore")

--- semaphore{ redis, name, n, ttl = 300 }: at most n holders at once; a
-- holder that never releases (it died) loses its slot after ttl seconds
-- (300 as slm.shdict's: longer than a call's default timeout of 60 s with
-- its retries, since a live holder's slot is dropped as well).
function M.semaphore(opts)
  check_opts(opts, "semaphore", { redis = true, name = true, n = true, ttl = true })
  check_name(opts.name, "semaphore")
  if type(opts.n) ~= "number" or opts.n < 1 or opts.n % 1 ~= 0 then
    error("slm.redis.semaphore: option 'n' must be a positive integer", 2)
  end
  check_positive(opts.ttl, "ttl", "semaphore", true)
  local conn = M.connect(opts.redis)
  local key = conn.prefix .. "semaphore:" .. opts.name
  return setmetatable({ conn = conn, key = key, seq = key .. ":seq", n = opts.n,
    ttl_ms = ceil((opts.ttl or 300) * 1000) }, Sem)
end

--- sem:acquire(rt, timeout) -> token | nil, err (kind "timeout" when no
-- slot freed within timeout seconds; nil: wait for ever)
function Sem:acquire(rt, timeout)
  rt = rt or require("slm.runtime").default()
  local until_t = timeout and rt.now() + timeout
  local pause = 0.005
  while true do
    local tok, err = run(self.conn, ACQUIRE, { self.key, self.seq }, { self.n, self.ttl_ms }, true)
    if tok == nil then return nil, err end
    if tok then return tok end
    local left = until_t and until_t - rt.now()
    if left and left <= 0 then
      return nil, errors.new("timeout", format("redis %s: no slot of semaphore %s freed within %g s",
        self.conn.where, self.key, timeout), { status = 0, storage = "redis" })
    end
    rt.sleep(left and left < pause and left or pause)
    if pause < 0.1 then pause = pause * 2 end
  end
end

--- sem:release(token) -> true | nil, err
function Sem:release(token)
  local r, err = self.conn:command("ZREM", self.key, token)
  if not r then return nil, err end
  return true
end

------------------------------------------------------------------ session store

local Store = class("slm.redis.store")
local SPFX = "slm.store: "

--- store{ redis, prefix = "session:", ttl = nil } -> a session store with
-- slm.store's interface; a session is one key (the SHA-256 of its id, never
-- the id) holding store.encode's document, expiring after ttl seconds.
function M.store(opts)
  check_opts(opts, "store", { redis = true, prefix = true, ttl = true })
  check_positive(opts.ttl, "ttl", "store", true)
  if opts.prefix ~= nil and type(opts.prefix) ~= "string" then error("slm.redis.store: option 'prefix' must be a string", 2) end
  local conn = M.connect(opts.redis)
  return setmetatable({ conn = conn, prefix = conn.prefix .. (opts.prefix or "session:"),
    ttl = opts.ttl and ceil(opts.ttl) }, Store)
end

local function check_store(self, method, id)
  if self.closed then error("slm.store: " .. method .. " on a closed store", 3) end
  if type(id) ~= "string" or id == "" then
    error(format("slm.store: %s: the session id must be a non-empty string", method), 3)
  end
end

local function store_err(self, what, err)
  return nil, SPFX .. "redis " .. self.conn.where .. ": " .. what .. ": " .. tostring(err.kind) .. ": "
    .. tostring(err.message):gsub("^redis [^:]+:%d+: ", "")
end

function Store:load(id)
  check_store(self, "load", id)
  local text, err = self.conn:command("GET", self.prefix .. core.sha256(id))
  if text == nil then return store_err(self, "cannot load", err) end
  if text == false then return nil end
  local h, why = store.decode(text, id)
  if h == nil then return nil, SPFX .. "redis " .. self.conn.where .. ": " .. tostring(why) end
  return h
end

function Store:save(id, history)
  check_store(self, "save", id)
  local text, why = store.encode(id, history)
  if not text then return nil, SPFX .. "redis " .. self.conn.where .. ": cannot save: " .. tostring(why) end
  local ok, err
  if self.ttl then ok, err = self.conn:command("SET", self.prefix .. core.sha256(id), text, "EX", self.ttl)
  else ok, err = self.conn:command("SET", self.prefix .. core.sha256(id), text) end
  if not ok then return store_err(self, "cannot save", err) end
  return true
end

function Store:delete(id)
  check_store(self, "delete", id)
  local ok, err = self.conn:command("DEL", self.prefix .. core.sha256(id))
  if not ok then return store_err(self, "cannot delete", err) end
  return true
end

function Store:close() self.closed = true end
Store.__close = Store.close

------------------------------------------------------------------ cache

local Cache = class("slm.redis.cache")

--- cache{ redis, ttl = 3600 }: an exact-match cache of strings; keys are
-- hashed (SHA-256), so any string can be one.
function M.cache(opts)
  check_opts(opts, "cache", { redis = true, ttl = true })
  check_positive(opts.ttl, "ttl", "cache", true)
  local conn = M.connect(opts.redis)
  return setmetatable({ conn = conn, prefix = conn.prefix .. "cache:", ttl = opts.ttl or 3600 }, Cache)
end

--- c:get(key) -> value | nil (absent) | nil, err
function Cache:get(key)
  if type(key) ~= "string" then error("slm.redis.cache: get needs a string key", 2) end
  local v, err = self.conn:command("GET", self.prefix .. core.sha256(key))
  if v == nil then return nil, err end
  if v == false then return nil end
  return v
end

--- c:set(key, value, ttl) -> true | nil, err
function Cache:set(key, value, ttl)
  if type(key) ~= "string" or type(value) ~= "string" then
    error("slm.redis.cache: set needs a string key and a string value", 2)
  end
  ttl = ttl or self.ttl
  if type(ttl) ~= "number" or ttl <= 0 then error("slm.redis.cache: ttl must be a positive number", 2) end
  local ok, err = self.conn:command("SET", self.prefix .. core.sha256(key), value, "PX", ceil(ttl * 1000))
  if not ok then return nil, err end
  return true
end

-- what slm.quotas asks: the objects keep their state in Redis (a budget's
-- kept settles excepted: quotas keeps those objects)
M.shares_state = true

return M
