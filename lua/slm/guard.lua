-- slm.guard: what is checked and held before a request is sent to one
-- model, and given back after.  It keeps its state on the caller's object
-- (the pipeline's call), so a request that holds nothing costs no table.
--
--   local ok, err = guard.open(h, client, body, opts, model, bytes) -- nil, err: nothing may be sent
--   guard.prompt_tokens_of(h, body, model) -- the counted prompt (counted now if it was not)
--   guard.settle(h, usd, tokens)  -- the real cost of what was sent (0, 0 when nothing was billed)
--
-- Context: prompt + max_tokens (or max_completion_tokens) beyond the
-- model's context is refused as "context_length"; images of unknown size
-- count as small as they can be here (only what cannot fit is refused).
-- Budget: the worst case (counted prompt with unknown images at their
-- largest, + max output for each of n choices, at the model's prices) is
-- reserved; settle() replaces the reservation with the real cost.  A
-- content part that is not counted (input_audio, file) counts 0 in the
-- context check and makes the prompt's worst case the model's whole
-- context (slm.count's info.max); a model whose context is not known
-- cannot be bounded then, and is refused (kind "budget").
-- settle() is idempotent; the caller calls it on every exit path.
-- A request under a consumer's quota (h.quota, slm.quotas) reserves in the
-- consumer's budget too, after the client's: both must have room.
local json = require "slm.json"
local errors = require "slm.errors"
local models = require "slm.models"

local type, pcall, ipairs, format, ceil, max = type, pcall, ipairs, string.format, math.ceil, math.max

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
  -- slm.count failed (a request it cannot read): a bound, never less than
  -- the real count, for the budget: one token per byte of the whole body's
  -- JSON (a byte-level BPE token covers at least one byte), the largest
  -- image count for every image part; and no refusal (min 0) for the
  -- context check, which the server makes
  local ok, s = pcall(json.encode, body)
  if not ok then s = "" end
  local images = 0
  for _ in s:gmatch('"image_url"') do images = images + 1 end
  local per_image = 0
  if images > 0 then
    local iok, image = pcall(require, "slm.image")
    per_image = iok and image.worst_tokens() or 100000
  end
  local n = #s + images * per_image
  return n, { estimate = true, min = 0, reason = "slm.count could not count the request" }
end

--- The largest completion a request allows itself (nil when it names none).
local function max_out_of(body)
  local a, b = body.max_tokens, body.max_completion_tokens
  if a and b then return max(a, b) end
  return a or b
end
M.max_out = max_out_of

-- A byte-level BPE token covers at least one byte, and a message's JSON is
-- longer than its text plus the 4 tokens of framing the count adds, so when
-- the request's JSON plus max_tokens fits in the context the exact count is
-- not needed.  Images and tools (counted by formula, not by bytes) always
-- take the exact path.
local function cheap_fits(body, bytes, context)
  if body.tools ~= nil or body.functions ~= nil then return false end
  if 3 + bytes + (max_out_of(body) or 0) > context then return false end
  local msgs = body.messages
  for i = 1, #msgs do
    local c = msgs[i].content
    if type(c) == "table" then -- content parts: text only
      for j = 1, #c do
        local part = c[j]
        if type(part) ~= "table" or part.type ~= "text" then return false end
      end
    end
  end
  return true
end

--- Check and hold what trying `model` needs, on `h` (the pipeline's call):
-- h.prompt (the counted prompt, when it was counted), h.resv (the budget's
-- reservation) -> true | nil, err.  `bytes` is the length of the request's
-- JSON.
function M.open(h, client, body, opts, model, bytes)
  local info = models.find(model)
  local budget = opts.budget or client.budget
  local qbudget = h.quota and h.quota.budget
  local check = opts.check_context
  if check == nil then check = client.check_context end
  h.prompt, h.prompt_info, h.resv, h.budget, h.qresv, h.prompt_max = false, false, false, budget, false, false
  local context = check and info and info.context
  if not budget and not qbudget and not (context and not cheap_fits(body, bytes, context)) then return true end
  local prompt, cinfo = M.prompt_tokens(body, model)
  h.prompt, h.prompt_info = prompt, cinfo
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
  if not budget and not qbudget then return true end
  local worst_in, why = M.worst_prompt(prompt, cinfo, model)
  if not worst_in then return nil, errors.new("budget", why, { status = 0, model = model }) end
  h.prompt_max = worst_in
  -- every choice of n > 1 can produce the whole max output
  local worst_out = (asked or (info and info.max_output) or 4096) * (body.n or 1)
  local usd = models.cost(info or model, { prompt_tokens = worst_in, completion_tokens = worst_out })
  local function usd_bound(b) return b and b.usd and b.usd ~= math.huge end
  if not usd and (usd_bound(budget) or usd_bound(qbudget)) then
    return nil, errors.new("budget", format("model %s has no price, so a USD budget cannot bound it "
      .. "(add its prices to slm.models, or use a token budget)", model), { status = 0, model = model })
  end
  local resv, qresv, berr = false, false, nil
  if budget then resv, berr = budget:reserve(usd or 0, worst_in + worst_out, model) end
  if budget and not resv then
    berr.model = model
    return nil, berr
  end
  -- kept at once: should the consumer's budget raise, the call's abort
  -- gives this reservation back
  h.resv, h.reserved_usd = resv or false, usd or 0
  if qbudget then
    qresv, berr = qbudget:reserve(usd or 0, worst_in + worst_out, model)
    if not qresv then
      if resv then h.resv = false; budget:settle(resv, 0, 0) end -- nothing was sent
      berr.model = model
      berr.message = "the consumer's " .. berr.message
      return nil, berr
    end
  end
  h.qresv = qresv or false
  return true
end

--- The most the prompt counted `prompt` (with slm.count's info) can cost:
-- content parts slm.count cannot count (audio, files) have no bound of
-- their own, so it is then the model's whole context (info.max), the
-- largest prompt it accepts; without a known context nothing bounds it.
-- -> tokens | nil, why
function M.worst_prompt(prompt, info, model)
  if not info or (info.unbounded or 0) == 0 then return prompt end
  if not info.max then
    return nil, format("the request has %d content part(s) that cannot be counted (audio, files) and the "
      .. "context of model %s is not known, so a budget cannot bound it (add its context to slm.models)",
      info.unbounded, tostring(model))
  end
  return max(prompt, info.max)
end

--- Tokens of what the model produced (a Response's choices: text,
-- refusal, tool calls), counted by us: for a reply whose usage is missing
-- or not to be trusted (the client's, and slm.batchapi's output lines).
function M.completion_tokens(res, model)
  local info = models.find(model)
  local ok, tok = pcall(function() return require("slm.tokenizer").get(info and info.tokenizer or "o200k_base") end)
  local function n(s)
    if type(s) ~= "string" or s == "" then return 0 end
    return ok and tok:count(s) or ceil(#s / 4)
  end
  local total = 0
  for _, ch in ipairs(res.choices or {}) do
    total = total + n(ch.text) + n(ch.refusal)
    for _, tc in ipairs(ch.tool_calls or {}) do
      local f = type(tc) == "table" and tc["function"]
      if type(f) == "table" then total = total + n(f.name) + n(f.arguments) end
    end
  end
  return total
end

--- The counted prompt of h's request (counted now when the checks did not
-- need it), for a reply without usage: the budget's worst case of it when
-- the request holds parts that are not counted (audio, files), so that
-- such a reply is never charged less than it may have cost.
function M.prompt_tokens_of(h, body, model)
  if not h.prompt then h.prompt, h.prompt_info = M.prompt_tokens(body, model) end
  local ci = h.prompt_info
  if ci and (ci.unbounded or 0) > 0 then return h.prompt_max or ci.max or h.prompt end
  return h.prompt
end

--- Replace h's reservation with what the request really cost (idempotent).
-- usd nil (no price known for what answered) charges the reserved worst case.
function M.settle(h, usd, tokens)
  local r, q = h.resv, h.qresv
  if not r and not q then return end
  h.resv, h.qresv = nil, nil
  usd, tokens = usd or h.reserved_usd, tokens or 0
  if r then h.budget:settle(r, usd, tokens) end
  if q then h.quota.budget:settle(q, usd, tokens) end
end

return M
