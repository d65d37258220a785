-- slm.budget: a spending limit in USD and/or tokens, shared by any number
-- of clients and requests.
--
-- Before a request is sent its worst case (counted prompt tokens +
-- max_tokens, at the model's prices) is reserved; a request whose worst
-- case does not fit what is left is refused with kind "budget" and never
-- sent.  When the reply arrives the reservation is settled with the real
-- usage.  Reservations count against the budget, so concurrent requests
-- can never overspend it together.
local errors = require "slm.errors"
local type, format, setmetatable, huge = type, string.format, setmetatable, math.huge

local Budget = {}
Budget.__index = Budget
Budget.__name = "slm.Budget"

local M = {}

local function check_limit(v, name)
  if v ~= nil and (type(v) ~= "number" or v < 0 or v ~= v) then
    error(format("slm.budget: option '%s' must be a non-negative number", name), 3)
  end
end

--- slm.budget{ usd = n, tokens = n } (either or both)
function M.new(opts)
  if type(opts) ~= "table" then error("slm.budget: expected an options table", 2) end
  for k in pairs(opts) do
    if k ~= "usd" and k ~= "tokens" then error(format("slm.budget: unknown option '%s'", tostring(k)), 2) end
  end
  check_limit(opts.usd, "usd")
  check_limit(opts.tokens, "tokens")
  return setmetatable({
    usd = opts.usd or huge, tokens = opts.tokens or huge,
    spent_usd = 0, spent_tokens = 0, held_usd = 0, held_tokens = 0,
    requests = 0, refused = 0,
  }, Budget)
end

function Budget:__tostring()
  local u, t = self:remaining()
  return format("slm.budget(spent $%.6f, %d tokens; remaining $%s, %s tokens)", self.spent_usd,
    self.spent_tokens, u == huge and "inf" or format("%.6f", u), t == huge and "inf" or tostring(t))
end

--- Reserve the worst case of a request; -> reservation | nil, err
function Budget:reserve(usd, tokens, model)
  usd, tokens = usd or 0, tokens or 0
  local left_usd = self.usd - self.spent_usd - self.held_usd
  local left_tok = self.tokens - self.spent_tokens - self.held_tokens
  if usd > left_usd + 1e-12 or tokens > left_tok then
    self.refused = self.refused + 1
    local what
    if usd > left_usd + 1e-12 then
      what = format("worst case $%.6f exceeds the $%.6f left", usd, left_usd < 0 and 0 or left_usd)
    else
      what = format("worst case %d tokens exceeds the %d left", tokens, left_tok < 0 and 0 or left_tok)
    end
    return nil, errors.new("budget", "budget exhausted: " .. what, {
      status = 0, model = model, needed_usd = usd, needed_tokens = tokens,
      remaining_usd = left_usd, remaining_tokens = left_tok,
    })
  end
  self.held_usd = self.held_usd + usd
  self.held_tokens = self.held_tokens + tokens
  self.requests = self.requests + 1
  return { usd = usd, tokens = tokens }
end

--- Settle a reservation with what the request really cost.
function Budget:settle(r, usd, tokens)
  if r.settled then return end
  r.settled = true
  self.held_usd = self.held_usd - r.usd
  self.held_tokens = self.held_tokens - r.tokens
  if self.held_usd < 1e-12 then self.held_usd = 0 end
  self.spent_usd = self.spent_usd + (usd or 0)
  self.spent_tokens = self.spent_tokens + (tokens or 0)
end

--- -> usd, tokens spent so far (settled requests)
function Budget:spent() return self.spent_usd, self.spent_tokens end

--- -> usd, tokens still available (limits minus spent minus reserved)
function Budget:remaining()
  return self.usd - self.spent_usd - self.held_usd, self.tokens - self.spent_tokens - self.held_tokens
end

--- -> usd, tokens reserved by requests in flight
function Budget:reserved() return self.held_usd, self.held_tokens end

M.Budget = Budget
return M
