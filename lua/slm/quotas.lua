-- slm.quotas: per-consumer budgets, rate limits and concurrency.  A
-- client with quotas = slm.quotas{...} gives each consumer (the request's
-- `consumer`: an API key, a header, an ngx.var) its own budget, rpm/tpm
-- limiters and slots, made lazily from a storage factory (slm.shdict,
-- slm.redis: anything with budget, ratelimit and semaphore constructors)
-- the first time the consumer is seen, on top of the client's own limits.
--
--   slm.quotas{ storage = F, storage_options = { dict = "slm" },
--               name = "quota", usd = 1, tokens = 100000, period = "day",
--               hold_ttl = 300, rpm = 60, tpm = 50000,
--               concurrency = 4, concurrency_ttl = 300 }
--   q:consumer(key) -> { name, display, budget, rpm, tpm, sem }
--
-- A consumer key is often a secret: it is never part of a storage name, an
-- error, a log line or a Response.  Its objects are named by the SHA-256
-- of the key; res.consumer and err.consumer carry the display form
-- "consumer:" .. the first 12 hex digits of that hash.
local core = require "slm.core"
local budget = require "slm.budget"

local type, pairs, tostring, error, format, setmetatable, huge, sha256 =
  type, pairs, tostring, error, string.format, setmetatable, math.huge, core.sha256

local M = {}

local Quotas = {}
Quotas.__index = Quotas
Quotas.__name = "slm.Quotas"

local KNOWN = { storage = true, storage_options = true, name = true, usd = true, tokens = true, period = true,
  hold_ttl = true, rpm = true, tpm = true, concurrency = true, concurrency_ttl = true }

-- Consumers' objects kept per worker before the idle ones are let go; only
-- with a storage whose objects keep their state in it (F.shares_state:
-- slm.shdict, slm.redis): with one of one's own, an object may be the
-- state (an in-process budget's spend, a semaphore's slots), and making it
-- again would give the consumer a fresh quota.
local MAX_CACHED = 10000
M.MAX_CACHED = MAX_CACHED

local function positive(v) return type(v) == "number" and v > 0 and v < huge end

--- slm.quotas{ storage = F, ... } -> quotas
function M.new(opts)
  if type(opts) ~= "table" then error("slm.quotas: expected an options table", 2) end
  for k in pairs(opts) do
    if not KNOWN[k] then error(format("slm.quotas: unknown option '%s'", tostring(k)), 2) end
  end
  local F = opts.storage
  if type(F) ~= "table" then
    error("slm.quotas: option 'storage' must be a storage factory (slm.shdict, slm.redis)", 2)
  end
  local function need(ctor, why)
    if type(F[ctor]) ~= "function" then
      error(format("slm.quotas: the storage has no '%s' constructor (needed for %s)", ctor, why), 3)
    end
  end
  for _, k in pairs{ "rpm", "tpm", "hold_ttl", "concurrency_ttl" } do
    if opts[k] ~= nil and not positive(opts[k]) then
      error(format("slm.quotas: option '%s' must be a positive number", k), 2)
    end
  end
  for _, k in pairs{ "usd", "tokens" } do
    local v = opts[k]
    if v ~= nil and (type(v) ~= "number" or v < 0 or v ~= v) then
      error(format("slm.quotas: option '%s' must be a non-negative number", k), 2)
    end
  end
  local c = opts.concurrency
  if c ~= nil and (type(c) ~= "number" or c < 1 or c % 1 ~= 0 or c == huge) then
    error("slm.quotas: option 'concurrency' must be a positive integer", 2)
  end
  if opts.period ~= nil and opts.period ~= "day" and opts.period ~= "month" then
    error('slm.quotas: option \'period\' must be "day" or "month"', 2)
  end
  if opts.storage_options ~= nil and type(opts.storage_options) ~= "table" then
    error("slm.quotas: option 'storage_options' must be a table", 2)
  end
  local name = opts.name or "quota"
  if type(name) ~= "string" or name == "" or name:find("[%c%s]") then
    error("slm.quotas: option 'name' must be a non-empty string without spaces", 2)
  end
  if opts.usd or opts.tokens then need("budget", "usd/tokens") end
  if opts.rpm or opts.tpm then need("ratelimit", "rpm/tpm") end
  if c then need("semaphore", "concurrency") end
  return setmetatable({ F = F, o = opts, so = opts.storage_options or {}, name = name,
    cache = {}, ncached = 0 }, Quotas)
end

function Quotas:__tostring()
  return format("slm.quotas(%s)", self.name)
end

--- The display form of a consumer key (never the key).
function M.display(key)
  return "consumer:" .. sha256(key):sub(1, 12)
end

-- F.ctor with the storage options and these.
function Quotas:make(ctor, o)
  for k, v in pairs(self.so) do if o[k] == nil then o[k] = v end end
  return self.F[ctor](o)
end

--- The objects of one consumer (made on first use, then kept).
function Quotas:consumer(key)
  if type(key) ~= "string" or key == "" then error("slm.quotas: a consumer key must be a non-empty string", 2) end
  local h = sha256(key)
  local e = self.cache[h]
  if e then return e end
  local o = self.o
  local name = self.name .. ":" .. h:sub(1, 24)
  e = { name = name, display = "consumer:" .. h:sub(1, 12) }
  if o.usd or o.tokens then
    e.budget = budget.new{ usd = o.usd, tokens = o.tokens,
      backend = self:make("budget", { name = name, hold_ttl = o.hold_ttl, period = o.period }) }
  end
  if o.rpm then e.rpm = self:make("ratelimit", { name = name .. ":rpm", limit = o.rpm, per = 60 }) end
  if o.tpm then e.tpm = self:make("ratelimit", { name = name .. ":tpm", limit = o.tpm, per = 60 }) end
  if o.concurrency then
    e.sem = self:make("semaphore", { name = name .. ":slots", n = o.concurrency, ttl = o.concurrency_ttl })
  end
  if self.ncached >= M.MAX_CACHED and self.F.shares_state then self:shed() end
  self.cache[h] = e
  self.ncached = self.ncached + 1
  return e
end

-- Let go of the consumers' objects that hold nothing of their own: all but
-- those whose budget still keeps settles for a storage that was away
-- (slm.redis' budget.unsettled), which would be lost with their object.
function Quotas:shed()
  local keep, n = {}, 0
  for h, e in pairs(self.cache) do
    local be = e.budget and e.budget.backend
    if be and type(be.unsettled) == "table" and #be.unsettled > 0 then
      keep[h], n = e, n + 1
    end
  end
  self.cache, self.ncached = keep, n
end

M.Quotas = Quotas
return M
