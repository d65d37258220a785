-- slm.guard: what is checked and held before a request is sent to one
-- model, and given back after.
--
--   local g, err = guard.open(client, body, opts, model)  -- nil, err: nothing may be sent
--   g:prompt_tokens()        -- the counted prompt (counted now if it was not)
--   g:settle(usd, tokens)    -- the real cost of what was sent (0, 0 when nothing was billed)
--
-- Context: prompt + max_tokens (or max_completion_tokens) beyond the
-- model's context is refused as "context_length"; images of unknown size
-- count as small as they can be here (only what cannot fit is refused).
-- Budget: the worst case (counted prompt with unknown images at their
-- largest, + max output for each of n choices, at the model's prices) is
-- reserved; settle() replaces the reservation with the real cost.
-- settle() is idempotent; the caller calls it on every exit path.
local json = require "slm.json"
local errors = require "slm.errors"
local models = require "slm.models"

local type, pairs, pcall, setmetatable, format, ceil, max =
  type, pairs, pcall, setmetatable, string.format, math.ceil, math.max
local null = json.null

local M = {}

local count_mod -- slm.count, loaded lazily (it loads tokenizers)

--- Prompt tokens of a request for a model: n (worst case), info (from
-- slm.count: estimate, min = the least it can count).
function M.prompt_tokens(body, model)
  if count_mod == nil then
    local ok, m = pcall(require, "slm.count")
    count_mod = ok and m or false
  end
  if count_mod then
    local ok, n, info = pcall(count_mod.count, body, model or body.model)
    if ok and n then return n, info end
  end
  -- conservative fallback: one token per 3 bytes of JSON
  local ok, s = pcall(json.encode, body.messages or {})
  local n = ok and ceil(#s / 3) or 0
  return n, { estimate = true, min = n }
end

--- The largest completion a request allows itself (nil when it names none).
local function max_out_of(body)
  local a, b = body.max_tokens, body.max_completion_tokens
  if a and b then return max(a, b) end
  return a or b
end
M.max_out = max_out_of

-- A byte-level BPE token covers at least one byte, so when the message
-- strings plus the per-message overhead plus max_tokens fit in the context
-- the exact count is not needed.  Images and tools (counted by formula, not
-- by bytes) always take the exact path.
local function cheap_fits(body, context)
  if body.tools ~= nil or body.functions ~= nil then return false end
  local n = 3 + (max_out_of(body) or 0)
  local msgs = body.messages
  for i = 1, #msgs do
    local m = msgs[i]
    n = n + 4
    for k, v in pairs(m) do
      local tv = type(v)
      if tv == "string" then
        n = n + #v
      elseif k == "tool_calls" and tv == "table" then
        local ok, js = pcall(json.encode, v)
        if not ok then return false end
        n = n + #js
      elseif tv == "table" then
        -- content parts: text only; anything else (images) counts exactly
        for j = 1, #v do
          local part = v[j]
          if type(part) ~= "table" or part.type ~= "text" or type(part.text) ~= "string" then return false end
          n = n + #part.text + 1
        end
      elseif v ~= null and tv ~= "number" and tv ~= "boolean" then
        return false
      end
    end
    if n > context then return false end
  end
  return n <= context
end

local Guard = {}
Guard.__index = Guard

function M.open(client, body, opts, model)
  local info = models.find(model)
  local budget = opts.budget or client.budget
  local check = opts.check_context
  if check == nil then check = client.check_context end
  local g = setmetatable({ body = body, model = model, info = info, budget = budget }, Guard)
  local context = check and info and info.context
  if not budget and not (context and not cheap_fits(body, context)) then return g end
  local prompt, cinfo = M.prompt_tokens(body, model)
  g.prompt, g.prompt_info = prompt, cinfo
  local asked = max_out_of(body)
  if context then
    local least = cinfo and cinfo.min or prompt
    local need = least + (asked or 0)
    if need > context then
      local est = cinfo and cinfo.estimate
      return nil, errors.new("context_length", format(
        "request needs %s%d tokens (%d prompt%s + %d max_tokens) but %s has a context of %d",
        least < prompt and "at least " or "", need, least, est and " (estimated)" or "",
        asked or 0, model, context),
        { status = 0, model = model, prompt_tokens = least, local_check = true })
    end
  end
  if not budget then return g end
  -- every choice of n > 1 can produce the whole max output
  local worst_out = (asked or (info and info.max_output) or 4096) * (body.n or 1)
  local usd = models.cost(info or model, { prompt_tokens = prompt, completion_tokens = worst_out })
  if not usd and budget.usd and budget.usd ~= math.huge then
    return nil, errors.new("budget", format("model %s has no price, so a USD budget cannot bound it "
      .. "(add its prices to slm.models, or use a token budget)", model), { status = 0, model = model })
  end
  local resv, berr = budget:reserve(usd or 0, prompt + worst_out, model)
  if not resv then
    berr.model = model
    return nil, berr
  end
  g.resv, g.reserved_usd = resv, usd or 0
  return g
end

--- The counted prompt (counted now when the checks did not need it).
function Guard:prompt_tokens()
  if not self.prompt then
    self.prompt, self.prompt_info = M.prompt_tokens(self.body, self.model)
  end
  return self.prompt, self.prompt_info
end

--- Replace the reservation with what the request really cost.  usd nil
-- (no price known for what answered) charges the reserved worst case.
function Guard:settle(usd, tokens)
  local r = self.resv
  if not r then return end
  self.resv = nil
  self.budget:settle(r, usd or self.reserved_usd, tokens or 0)
end

return M
