-- slm.budget: a spending limit in USD and/or tokens, shared by any number
-- of clients and requests.
--
-- Before a request is sent its worst case (counted prompt tokens +
-- max_tokens, at the model's prices) is reserved; a request whose worst
-- case does not fit what is left is refused with kind "budget" and never
-- sent.  When the reply arrives the reservation is settled with the real
-- usage.  Reservations count against the budget, so concurrent requests
-- can never overspend it together.
--
-- Where the numbers live is a backend's business, behind one interface, so
-- that a budget is not tied to one Lua state:
--
--   backend:reserve(usd, tokens, limit_usd, limit_tokens)
--       -> id | nil, left_usd, left_tokens      atomically: hold the amounts
--                                               only if spent + held + them
--                                               stays within the limits
--   backend:settle(id, usd, tokens)             the hold is replaced by the
--                                               amounts really spent
--   backend:totals() -> spent_usd, spent_tokens, held_usd, held_tokens
--
-- A backend on shared storage that cannot reach it returns nil, err (an
-- slm error: kind "connect", "timeout", ...) from any of the three: the
-- request is then refused (a budget fails closed) with that error.
--
-- slm.budget.memory() is the in-process backend (the default).  Backends
-- shared by the workers of one nginx (lua_shared_dict) and by many hosts
-- (Redis: reserve before sending, settle after, reservations that expire
-- when their holder dies) implement the same three calls.
local errors = require "slm.errors"
local type, pairs, tostring, format, setmetatable, huge = type, pairs, tostring, string.format, setmetatable, math.huge

local M = {}

------------------------------------------------------------------ in-process backend

local Memory = {}
Memory.__index = Memory
Memory.__name = "slm.budget.memory"

--- The in-process backend: plain numbers in this Lua state.
function M.memory()
  return setmetatable({ spent_usd = 0, spent_tokens = 0, held_usd = 0, held_tokens = 0,
    holds = {}, next_id = 0 }, Memory)
end

local EPS = 1e-12 -- float dust of adding and removing the same prices

function Memory:reserve(usd, tokens, limit_usd, limit_tokens)
  local left_usd = limit_usd - self.spent_usd - self.held_usd
  local left_tok = limit_tokens - self.spent_tokens - self.held_tokens
  if usd > left_usd + EPS or tokens > left_tok then return nil, left_usd, left_tok end
  self.held_usd = self.held_usd + usd
  self.held_tokens = self.held_tokens + tokens
  self.next_id = self.next_id + 1
  local id = self.next_id
  self.holds[id] = { usd, tokens }
  return id
end

function Memory:settle(id, usd, tokens)
  local h = self.holds[id]
  if not h then return end -- settled already
  self.holds[id] = nil
  self.held_usd = self.held_usd - h[1]
  self.held_tokens = self.held_tokens - h[2]
  if self.held_usd < EPS then self.held_usd = 0 end
  self.spent_usd = self.spent_usd + usd
  self.spent_tokens = self.spent_tokens + tokens
end

function Memory:totals()
  return self.spent_usd, self.spent_tokens, self.held_usd, self.held_tokens
end

------------------------------------------------------------------ Budget

local Budget = {}
Budget.__index = Budget
Budget.__name = "slm.Budget"

local function check_limit(v, name)
  if v ~= nil and (type(v) ~= "number" or v < 0 or v ~= v) then
    error(format("slm.budget: option '%s' must be a non-negative number", name), 3)
  end
end

local function is_backend(b)
  return type(b) == "table" and type(b.reserve) == "function" and type(b.settle) == "function"
    and type(b.totals) == "function"
end

--- slm.budget{ usd = n, tokens = n, backend = b } (usd and/or tokens)
function M.new(opts)
  if type(opts) ~= "table" then error("slm.budget: expected an options table", 2) end
  for k in pairs(opts) do
    if k ~= "usd" and k ~= "tokens" and k ~= "backend" then
      error(format("slm.budget: unknown option '%s'", tostring(k)), 2)
    end
  end
  check_limit(opts.usd, "usd")
  check_limit(opts.tokens, "tokens")
  if opts.backend ~= nil and not is_backend(opts.backend) then
    error("slm.budget: option 'backend' must have reserve, settle and totals methods", 2)
  end
  return setmetatable({
    usd = opts.usd or huge, tokens = opts.tokens or huge,
    backend = opts.backend or M.memory(),
    requests = 0, refused = 0, rejected_amounts = 0,
  }, Budget)
end

-- A token count for a message: limits and usage may be fractions, which
-- %d refuses under Lua 5.4.
local function tokens_str(n)
  if n == huge then return "inf" end
  if n % 1 == 0 then return format("%d", n) end
  return format("%.6g", n)
end

function Budget:__tostring()
  local su, st = self:spent()
  local u, t = self:remaining()
  if su == nil then return "slm.budget(unavailable: " .. tostring(st) .. ")" end
  return format("slm.budget(spent $%.6f, %s tokens; remaining $%s, %s tokens)", su, tokens_str(st),
    u == huge and "inf" or format("%.6f", u), tokens_str(t))
end

-- A finite, non-negative amount, else nil.
local function amount(v)
  if type(v) == "number" and v == v and v >= 0 and v < huge then return v end
  return nil
end

--- Reserve the worst case of a request; -> reservation | nil, err
function Budget:reserve(usd, tokens, model)
  usd, tokens = amount(usd or 0), amount(tokens or 0)
  if not usd or not tokens then
    error("slm.budget: reserve needs finite non-negative amounts", 2)
  end
  local id, left_usd, left_tok = self.backend:reserve(usd, tokens, self.usd, self.tokens)
  if not id and type(left_usd) == "table" then -- the storage failed: refused
    self.refused = self.refused + 1
    left_usd.model = left_usd.model or model
    return nil, left_usd
  end
  if not id then
    self.refused = self.refused + 1
    local what
    if usd > left_usd + EPS then
      what = format("worst case $%.6f exceeds the $%.6f left", usd, left_usd < 0 and 0 or left_usd)
    else
      what = format("worst case %s tokens exceeds the %s left", tokens_str(tokens),
        tokens_str(left_tok < 0 and 0 or left_tok))
    end
    return nil, errors.new("budget", "budget exhausted: " .. what, {
      status = 0, model = model, needed_usd = usd, needed_tokens = tokens,
      remaining_usd = left_usd, remaining_tokens = left_tok,
    })
  end
  self.requests = self.requests + 1
  return { id = id, usd = usd, tokens = tokens, budget = self }
end

--- Settle a reservation with what the request really cost (idempotent).
-- An amount that is not a finite non-negative number (a provider's NaN,
-- infinity or negative usage that got this far) is charged as the
-- reservation's worst case: it can neither switch the budget off nor
-- refill it.
function Budget:settle(r, usd, tokens)
  -- a reservation of another budget would settle one of this budget's
  -- holds that has the same id (ids are per backend), and then that
  -- hold's own settle would charge nothing
  if type(r) ~= "table" or r.budget ~= self then
    error("slm.budget: settle needs a reservation that this budget's reserve returned", 2)
  end
  if r.settled then return end
  r.settled = true
  local u, t = amount(usd or 0), amount(tokens or 0)
  if not u or not t then -- the figures cannot be trusted: the worst case
    self.rejected_amounts = self.rejected_amounts + 1
    u, t = r.usd, r.tokens
  end
  return self.backend:settle(r.id, u, t)
end

-- (spent, remaining and reserved: nil, err when a shared backend failed)

--- -> usd, tokens spent so far (settled requests)
function Budget:spent()
  local su, st = self.backend:totals()
  return su, st
end

--- -> usd, tokens still available (limits minus spent minus reserved)
function Budget:remaining()
  local su, st, hu, ht = self.backend:totals()
  if su == nil then return nil, st end
  return self.usd - su - hu, self.tokens - st - ht
end

--- -> usd, tokens reserved by requests in flight
function Budget:reserved()
  local su, st, hu, ht = self.backend:totals()
  if su == nil then return nil, st end
  return hu, ht
end

M.Budget = Budget
return M
