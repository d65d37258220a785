-- slm.shdict: budgets, rate limits, concurrency slots, session stores and
-- a response cache shared by all the workers of one nginx, in a
-- lua_shared_dict.  The same five constructors as slm.redis (shared across
-- hosts), with dict = "<lua_shared_dict name>" where Redis takes its
-- connection; every other option is the same:
--
--   local F = require "slm.shared.shdict"      -- or slm.shdict
--   F.budget{ dict, name, hold_ttl = 300, period = nil | "day" | "month" }
--       -> a slm.budget backend: slm.budget{ usd = 5, backend = F.budget{...} }
--   F.ratelimit{ dict, name, limit, per = 60 }   -> lim:take(n, rt) -> true | nil, err
--   F.semaphore{ dict, name, n, ttl = 300 }      -> sem:acquire(rt, timeout) -> token | nil, err
--                                                   sem:release(token) (idempotent)
--   F.store{ dict, prefix = "slm:s:", ttl }      -> a session store (slm.store's interface)
--   F.cache{ dict, prefix = "slm:c:", ttl = 3600, evict = false } -> c:get(key) -> string | nil; c:set(key, value, ttl)
--   slm.shdict{ dict = "x" }                     -> the same constructors with dict = "x" preset
--
-- Every constructor also takes now = function() -> seconds (the clock:
-- ngx.now by default; tests move it across a period's end).
--
-- Errors are slm errors: a full dict is kind "storage" (err.storage =
-- "shdict"), and a budget's reserve then refuses with kind "budget" (it
-- fails closed); a semaphore's wait that runs out is kind "timeout".
--
-- The ledger.  Budgets, semaphores and rate limits are one mechanism: a
-- counter of what is in use, raised with the dictionary's atomic incr and
-- checked against the limit on the value incr returned (over it: lowered
-- again and refused), so that workers racing for the last units can never
-- both get them; no lock, nothing that yields between the check and the
-- hold.  Each hold is recorded twice: a claim key (0; whoever raises it to
-- 1 first, the settling request or the sweeper, gives the amounts back)
-- and an entry "id deadline key amount ..." pushed on the ledger's queue.
-- Every call first sweeps the oldest entries: a settled hold is dropped, a
-- hold past its deadline (its holder died, or never settles: a rate
-- limit's units) is claimed and its amounts returned.  Keys are only ever
-- added with safe_add (never evicting anything when the dictionary is
-- full); a full dictionary is an error, and a budget then refuses.
local store = require "slm.store"
local core = require "slm.core"
local errors = require "slm.errors"

local type, pairs, tostring, tonumber, setmetatable, error, format, floor, huge =
  type, pairs, tostring, tonumber, setmetatable, error, string.format, math.floor, math.huge
local concat, sha256 = table.concat, core.sha256

local M = {}

local EPS = 1e-9 -- a nano-dollar: float dust of adding and removing the same prices
local SWEEP = 64 -- queue entries looked at per call at most

------------------------------------------------------------------ options

-- Misuse raises at the caller of a constructor: `lvl` levels above these
-- helpers' callers.
local function dict_of(opts, where, lvl)
  if type(ngx) ~= "table" or type(ngx.shared) ~= "table" then
    error(where .. ": slm.shdict works inside nginx only (lua_shared_dict); outside it "
      .. "use the in-process defaults or slm.redis", lvl + 1)
  end
  local name = opts.dict
  if type(name) ~= "string" or name == "" then
    error(where .. ": option 'dict' must name a lua_shared_dict", lvl + 1)
  end
  local d = ngx.shared[name]
  if not d then
    error(format("%s: there is no lua_shared_dict %q (declare it in nginx.conf)", where, name), lvl + 1)
  end
  return d
end

local function check_pos(v, where, opt, what, lvl)
  if v ~= nil and (type(v) ~= "number" or v ~= v or v <= 0 or v == huge) then
    error(format("%s: option '%s' must be %s", where, opt, what), (lvl or 2) + 1)
  end
end

-- The options of constructor `where` (known: its own besides dict and
-- now; name = true: a name is required, it becomes part of keys and
-- messages, so printable and without spaces) -> the dictionary.
local function open(opts, where, known)
  if type(opts) ~= "table" then error(where .. ": expected an options table", 3) end
  for k in pairs(opts) do
    if not known[k] and k ~= "dict" and k ~= "now" then
      error(format("%s: unknown option '%s'", where, tostring(k)), 3)
    end
  end
  if opts.now ~= nil and type(opts.now) ~= "function" then
    error(where .. ": option 'now' must be a function returning seconds", 3)
  end
  local d = dict_of(opts, where, 3)
  local v = opts.name
  if known.name and (type(v) ~= "string" or v == "" or v:find("[%c%s]") or #v > 200) then
    error(where .. ": option 'name' must be a non-empty string without spaces or control characters", 3)
  end
  if known.ttl then check_pos(opts.ttl, where, "ttl", "a positive number of seconds", 3) end
  if known.prefix and opts.prefix ~= nil and type(opts.prefix) ~= "string" then
    error(where .. ": option 'prefix' must be a string", 3)
  end
  return d
end

local function class(name)
  local C = { __name = name }
  C.__index = C
  return C
end

local function clock(opts) return opts.now or ngx.now end

------------------------------------------------------------------ the ledger

local Ledger = {}
Ledger.__index = Ledger

-- prefix: every key of this ledger starts with it (then "seq": the last
-- hold id, "q": the queue, "c:<id>": claim keys, and the counters' names,
-- which must differ from those); ttl: a hold's life; counter_ttl: how long
-- counters live (0: for ever).
local function ledger(d, prefix, ttl, now, counter_ttl)
  return setmetatable({ d = d, p = prefix, q = prefix .. "q", ttl = ttl, now = now,
    cttl = counter_ttl or 0 }, Ledger)
end

-- d:incr that creates a missing counter with safe_add (no eviction).
local function incr(d, key, v, ttl)
  local n, err = d:incr(key, v)
  if n then return n end
  if err ~= "not found" then return nil, err end
  local ok, aerr = d:safe_add(key, 0, ttl)
  if not ok and aerr ~= "exists" then return nil, aerr end
  return d:incr(key, v)
end

function Ledger:add(suffix, v)
  if v == 0 then return true end
  return incr(self.d, self.p .. suffix, v, self.cttl)
end

-- Give back the amounts of a queue entry's pairs (key, amount, ...) from i on.
local function give_back(self, parts, i)
  for j = i, #parts - 1, 2 do self:add(parts[j], -tonumber(parts[j + 1])) end
end

local function split(s)
  local t, n = {}, 0
  for w in s:gmatch("%S+") do n = n + 1; t[n] = w end
  return t
end

--- Return the amounts of holds past their deadline; drop settled entries.
function Ledger:sweep()
  local d, q, now = self.d, self.q, self.now()
  for _ = 1, SWEEP do
    local item = d:rpop(q)
    if not item then return end
    local parts = split(item)
    local ckey = self.p .. "c:" .. parts[1]
    if d:get(ckey) ~= nil then -- not settled yet
      local expired = true
      if tonumber(parts[2]) > now then
        expired = false
        if tonumber(parts[2]) <= now + self.ttl + 1 then -- (1 s: workers' cached clocks differ)
          -- the oldest is still alive: so are the others
          if d:rpush(q, item) then return end
          -- (the dict full in between: rather given back now than never)
          expired = true
        else
          -- further away than a hold lives: the clock went back (the wall
          -- clock set back).  Such a hold would be kept as long as the
          -- clock went back (a rate limit's window shut for an hour, a dead
          -- holder's slot gone as long): it lives ttl from now instead, as
          -- the newest entry, and the sweep goes on to the next
          parts[2] = format("%.17g", now + self.ttl)
          if not d:lpush(q, concat(parts, " ")) then expired = true end
        end
      end
      if expired then
        if d:incr(ckey, 1) == 1 then -- ours to give back (its holder did not settle in time)
          give_back(self, parts, 3)
          d:delete(ckey)
        end
      end
    end
  end
end

-- Lower the first `done` counters of `takes` again.
local function undo(self, takes, done)
  for j = 1, done do self:add(takes[j][1], -takes[j][2]) end
end

--- Raise each counter of `takes` ({ suffix, amount, limit }, ...) by its
-- amount, unless one would go over its limit; then record a hold of them
-- (and raise the counters of `extra`, { suffix, amount, ... }, with it).
-- -> id | false, i (the take that did not fit), before (its value before) |
--    nil, err (the dictionary failed; nothing is held)
function Ledger:take(takes, extra)
  self:sweep()
  for i = 1, #takes do
    local t = takes[i]
    local v, err = self:add(t[1], t[2])
    if not v then undo(self, takes, i - 1); return nil, err end
    if t[3] and v ~= true and v > t[3] + EPS then -- (true: an amount of 0, nothing to check)
      undo(self, takes, i)
      return false, i, v - t[2]
    end
  end
  local d = self.d
  local id, err = incr(d, self.p .. "seq", 1, 0)
  local ok
  -- (a period's claim keys and queue go when its counters go)
  if id then ok, err = d:safe_add(self.p .. "c:" .. id, 0, self.cttl) end
  if ok then
    local parts = { id, self.now() + self.ttl }
    for i = 1, #takes do
      local t = takes[i]
      if t[2] ~= 0 then parts[#parts + 1] = t[1]; parts[#parts + 1] = format("%.17g", t[2]) end
    end
    if extra then
      for i = 1, #extra, 2 do parts[#parts + 1] = extra[i]; parts[#parts + 1] = format("%.17g", extra[i + 1]) end
    end
    ok, err = d:lpush(self.q, concat(parts, " "))
    if not ok then
      d:delete(self.p .. "c:" .. id)
    elseif self.cttl > 0 and not self.q_expires and d.expire then
      d:expire(self.q, self.cttl)
      self.q_expires = true
    end
  end
  if not ok then
    undo(self, takes, #takes)
    return nil, err
  end
  if extra then for i = 1, #extra, 2 do self:add(extra[i], extra[i + 1]) end end
  return id
end

--- Claim hold id: true when the caller is the one to give its amounts
-- back (false: settled already, or expired and given back by a sweep).
function Ledger:claim(id)
  local d, ckey = self.d, self.p .. "c:" .. id
  if d:incr(ckey, 1) ~= 1 then return false end
  d:delete(ckey)
  return true
end

local function get_num(d, key) return tonumber(d:get(key)) or 0 end

-- The dict failed (full): an slm error of kind "storage" (err.storage = "shdict").
local function storage_error(where, err)
  return errors.new("storage", format("%s: the shared dict failed: %s", where, tostring(err)),
    { status = 0, storage = "shdict" })
end

------------------------------------------------------------------ periods

-- UTC day / month of a time: its key suffix and how long its counters live.
local PERIOD = {
  day = function(t) return os.date("!%Y-%m-%d", floor(t)), 3 * 86400 end,
  month = function(t) return os.date("!%Y-%m", floor(t)), 63 * 86400 end,
}

------------------------------------------------------------------ budget

local Budget = class("slm.shdict.budget")

--- F.budget{ dict, name, hold_ttl = 300, period } -> a slm.budget backend
function M.budget(opts)
  local where = "slm.shdict.budget"
  local d = open(opts, where, { name = true, hold_ttl = true, period = true })
  check_pos(opts.hold_ttl, where, "hold_ttl", "a positive number of seconds")
  if opts.period ~= nil and not PERIOD[opts.period] then
    error(where .. ": option 'period' must be \"day\" or \"month\"", 2)
  end
  local now = clock(opts)
  return setmetatable({ d = d, name = opts.name, hold_ttl = opts.hold_ttl or 300, period = opts.period,
    now = now, ledgers = {}, where = format("%s '%s'", where, opts.name) }, Budget)
end

-- The ledger of the current period (a budget without period has one).
function Budget:ledger()
  local suffix, cttl = "all", 0
  if self.period then suffix, cttl = PERIOD[self.period](self.now()) end
  local l = self.ledgers[suffix]
  if not l then
    self.ledgers = {} -- the previous period's is not needed any more
    l = ledger(self.d, "slm:b:" .. self.name .. ":" .. suffix .. ":", self.hold_ttl, self.now, cttl)
    l.period = suffix
    self.ledgers[suffix] = l
  end
  return l
end

-- counters: u, t = in use (spent + held), hu, ht = held
function Budget:reserve(usd, tokens, limit_usd, limit_tokens)
  local l = self:ledger()
  local id, i, before = l:take({ { "u", usd, limit_usd < huge and limit_usd or nil },
    { "t", tokens, limit_tokens < huge and limit_tokens or nil } }, { "hu", usd, "ht", tokens })
  if id == nil then -- the budget fails closed
    local e = storage_error(self.where, i)
    e.kind, e.message = "budget", "budget unavailable, request refused: " .. e.message
    return nil, e
  end
  if not id then
    local su, st = get_num(l.d, l.p .. "u"), get_num(l.d, l.p .. "t")
    if i == 1 then return nil, limit_usd - before, limit_tokens - st end
    return nil, limit_usd - su, limit_tokens - before
  end
  return { id = id, l = l, usd = usd, tokens = tokens }
end

function Budget:settle(r, usd, tokens)
  -- idempotent, as a backend's settle must be: once the claim key is gone
  -- a second settle would look like one of an expired hold and charge again
  if r.settled then return true end
  r.settled = true
  local l = r.l
  local held = l:claim(r.id)
  -- held: in use goes from the reservation to the real amounts; else the
  -- hold expired and was given back, and the real amounts count anew
  local ok, err = l:add("u", held and usd - r.usd or usd)
  if ok then ok, err = l:add("t", held and tokens - r.tokens or tokens) end
  if held then
    l:add("hu", -r.usd)
    l:add("ht", -r.tokens)
  end
  if not ok then return nil, storage_error(self.where, err) end
  return true
end

function Budget:totals()
  local l = self:ledger()
  l:sweep()
  local d, p = l.d, l.p
  local hu, ht = get_num(d, p .. "hu"), get_num(d, p .. "ht")
  if hu < EPS then hu = 0 end
  return get_num(d, p .. "u") - hu, get_num(d, p .. "t") - ht, hu, ht
end

------------------------------------------------------------------ rate limit

local Limiter = class("slm.shdict.ratelimit")

--- F.ratelimit{ dict, name, limit, per = 60 }: at most `limit` units in any
-- `per` seconds, across the workers (each take holds its units for `per`).
function M.ratelimit(opts)
  local where = "slm.shdict.ratelimit"
  local d = open(opts, where, { name = true, limit = true, per = true })
  if opts.limit == nil then error(where .. ": option 'limit' is required", 2) end
  check_pos(opts.limit, where, "limit", "a positive number (units per period)")
  check_pos(opts.per, where, "per", "a positive number of seconds")
  local per = opts.per or 60
  return setmetatable({ limit = opts.limit, per = per, name = opts.name,
    l = ledger(d, "slm:r:" .. opts.name .. ":", per, clock(opts)),
    where = format("%s '%s'", where, opts.name) }, Limiter)
end

local function sleeper(rt) return rt and rt.sleep or ngx.sleep end

--- Wait until n units are free and take them: -> true | nil, err
function Limiter:take(n, rt)
  if type(n) ~= "number" or n ~= n or n < 0 then error("slm.shdict.ratelimit: take needs a count", 2) end
  local limit = self.limit
  if n > limit then n = limit end -- a single huge request still goes, alone
  local sleep = sleeper(rt)
  local wait = self.per * n / limit
  if wait < 0.005 then wait = 0.005 elseif wait > 0.25 then wait = 0.25 end
  while true do
    local id, err = self.l:take({ { "u", n, limit } })
    if id then return true end
    if id == nil then return nil, storage_error(self.where, err) end
    sleep(wait)
  end
end

--- -> units taken in the last `per` seconds
function Limiter:used()
  self.l:sweep()
  return get_num(self.l.d, self.l.p .. "u")
end

------------------------------------------------------------------ semaphore

local Sem = class("slm.shdict.semaphore")

--- F.semaphore{ dict, name, n, ttl = 300 }: n slots shared by the workers;
-- a slot whose holder died comes back after ttl seconds.
function M.semaphore(opts)
  local where = "slm.shdict.semaphore"
  local d = open(opts, where, { name = true, n = true, ttl = true })
  if type(opts.n) ~= "number" or opts.n < 1 or opts.n % 1 ~= 0 or opts.n == huge then
    error(where .. ": option 'n' must be a positive integer", 2)
  end
  return setmetatable({ n = opts.n, name = opts.name, now = clock(opts),
    l = ledger(d, "slm:s:" .. opts.name .. ":", opts.ttl or 300, clock(opts)),
    where = format("%s '%s'", where, opts.name) }, Sem)
end

--- Wait (at most `timeout` seconds; nil: as long as it takes) for a slot:
-- -> token | nil, err
function Sem:acquire(rt, timeout)
  local sleep, now = sleeper(rt), (rt and rt.now) or self.now
  local t0, wait = now(), 0.002
  while true do
    local id, err = self.l:take({ { "taken", 1, self.n } })
    if id then return { id = id } end
    if id == nil then return nil, storage_error(self.where, err) end
    if timeout and now() - t0 + wait > timeout then
      return nil, errors.new("timeout", format("%s: no slot free within %gs (all %d taken)", self.where,
        timeout, self.n), { status = 0 })
    end
    sleep(wait)
    if wait < 0.05 then wait = wait * 2 end
  end
end

--- Give a slot back (idempotent; a token that expired is ignored).
function Sem:release(token)
  if type(token) ~= "table" or token.released then return end
  token.released = true
  if self.l:claim(token.id) then self.l:add("taken", -1) end
end

--- -> slots taken now
function Sem:taken()
  self.l:sweep()
  return get_num(self.l.d, self.l.p .. "taken")
end

------------------------------------------------------------------ session store

local Store = store.class("slm.shdict.store", "shdict store")

--- F.store{ dict, prefix = "slm:s:", ttl }: sessions in the dictionary,
-- named by the SHA-256 of their id (an id is often an e-mail); ttl: a
-- session unused that long is forgotten (nil: kept until deleted).
function M.store(opts)
  local d = open(opts, "slm.shdict.store", { prefix = true, ttl = true })
  return setmetatable({ d = d, prefix = opts.prefix or "slm:sess:", ttl = opts.ttl or 0, name = opts.dict }, Store)
end

function Store:key(id) return self.prefix .. sha256(id) end
function Store:where() return format("shdict store '%s'", self.name) end
function Store:get(id)
  local v, err = self.d:get(self:key(id))
  if v == nil and err then return nil, err end
  if v ~= nil and type(v) ~= "string" then return nil, "the entry is not a session document" end
  return v
end
function Store:put(id, text)
  local ok, err = self.d:safe_set(self:key(id), text, self.ttl)
  if not ok then return nil, tostring(err) end
  return true
end
function Store:drop(id)
  self.d:delete(self:key(id))
  return true
end

------------------------------------------------------------------ cache

local Cache = class("slm.shdict.cache")

--- F.cache{ dict, prefix = "slm:c:", ttl = 3600, evict = false }: by
-- default an entry is only added where there is room (expired entries are
-- reclaimed), never by evicting anything: in a dict shared with budgets,
-- limits or sessions, the dict's LRU eviction would drop their counters
-- and holds (a budget's spend forgotten is money spent twice).  A full
-- dict then fails the set (the client counts it in stats.cache_errors and
-- goes on).  evict = true: the least recently used entries make room, for
-- a dict that holds the cache alone.
function M.cache(opts)
  local d = open(opts, "slm.shdict.cache", { prefix = true, ttl = true, evict = true })
  if opts.evict ~= nil and type(opts.evict) ~= "boolean" then
    error("slm.shdict.cache: option 'evict' must be a boolean (true only for a dict of the cache's own)", 2)
  end
  return setmetatable({ d = d, prefix = opts.prefix or "slm:c:", ttl = opts.ttl or 3600,
    store = opts.evict and d.set or d.safe_set }, Cache)
end

function Cache:get(key)
  local v, err = self.d:get(self.prefix .. key)
  if v == nil and err then return nil, "slm.shdict.cache: " .. tostring(err) end
  if type(v) ~= "string" then return nil end
  return v
end

function Cache:set(key, value, ttl)
  local ok, err = self.store(self.d, self.prefix .. key, value, ttl or self.ttl)
  if not ok then return nil, "slm.shdict.cache: " .. tostring(err) end
  return true
end

------------------------------------------------------------------ bound factory

local NAMES = { "budget", "ratelimit", "semaphore", "store", "cache" }

-- what slm.quotas asks: the objects keep their state in the dict, so one
-- made again for the same name is the same budget, limit or semaphore
M.shares_state = true

--- slm.shdict{ dict = "x", now = fn }: the constructors with those options preset.
local function bind(_, preset)
  if type(preset) ~= "table" then error("slm.shdict: expected an options table", 2) end
  dict_of(preset, "slm.shdict", 2)
  local F = { shares_state = true }
  for _, n in pairs(NAMES) do
    F[n] = function(o)
      if type(o) ~= "table" then error("slm.shdict." .. n .. ": expected an options table", 2) end
      local all = {}
      for k, v in pairs(preset) do all[k] = v end
      for k, v in pairs(o) do all[k] = v end
      return M[n](all)
    end
  end
  return F
end

return setmetatable(M, { __call = bind })
