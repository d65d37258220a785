-- slm.models: model data (context, output limit, prices, vision, tokenizer,
-- and what the task layer may ask of it: `structured` = "json_schema"
-- (OpenAI's strict structured outputs) | "json_object" (JSON mode) |
-- "none"; `logprobs` = whether the endpoint returns them).
--
-- Prices are USD per 1M tokens; `batch_factor` is the share of them a
-- request sent through the provider's Batch API costs (slm.batchapi;
-- its default is slm.batchapi.BATCH_FACTOR, 0.5).  This is data, not code: users add models
-- or override prices with `slm.models["my-model"] = { ... }`.  Aliases map
-- a name to another entry; dated snapshots (gpt-4o-mini-2024-07-18) and
-- provider prefixes (openai/gpt-4o-mini) resolve to their base entry.
local type, pairs, rawget, setmetatable, tonumber, tostring, error, format, huge =
  type, pairs, rawget, setmetatable, tonumber, tostring, error, string.format, math.huge

local models = {
  ["gpt-4o-mini"] = {
    context = 128000, max_output = 16384,
    input_per_m = 0.15, output_per_m = 0.60, cached_input_per_m = 0.075,
    batch_factor = 0.5, -- the Batch API's share of these prices (slm.batchapi)
    vision = true, tokenizer = "o200k_base", format = "openai",
    structured = "json_schema", logprobs = true,
  },
  ["nousresearch/hermes-3-llama-3.1-405b"] = {
    context = 65536, max_output = 16384,
    input_per_m = 1.00, output_per_m = 0.30,
    vision = false, tokenizer = "llama3", format = "chatml",
    structured = "json_object", logprobs = false,
  },
}

local aliases = {
  ["openai/gpt-4o-mini"] = "gpt-4o-mini",
  ["gpt-4o-mini-2024-07-18"] = "gpt-4o-mini",
  ["hermes-3-405b"] = "nousresearch/hermes-3-llama-3.1-405b",
  ["hermes-3-llama-3.1-405b"] = "nousresearch/hermes-3-llama-3.1-405b",
  ["nousresearch/hermes-3-llama-3.1-405b:free"] = "nousresearch/hermes-3-llama-3.1-405b",
}

local M = {}
M.aliases = aliases

local function resolve(name)
  if type(name) ~= "string" then return nil end
  local m = rawget(models, name)
  if m then return m, name end
  local a = aliases[name]
  if a and rawget(models, a) then return rawget(models, a), a end
  -- dated snapshot: strip a trailing -YYYY-MM-DD
  local base = name:match("^(.-)%-%d%d%d%d%-%d%d%-%d%d$")
  if base then return resolve(base) end
  -- provider prefix: "openai/gpt-4o-mini"
  local tail = name:match("^[^/]+/(.+)$")
  if tail and rawget(models, tail) then return rawget(models, tail), tail end
  return nil
end

--- Find a model's data: M.find(name) -> entry, canonical_name | nil
M.find = resolve

-- A price (USD per 1M tokens) usable in arithmetic: a finite number >= 0,
-- or a string holding one ("0.15"); else nil.
local function price(v)
  v = tonumber(v)
  if v == nil or v ~= v or v < 0 or v == huge then return nil end
  return v
end

-- The numeric fields of an entry: name -> the least value allowed (a
-- price may be 0; a context or an output limit must be positive).
local NUMERIC = { input_per_m = 0, output_per_m = 0, cached_input_per_m = 0, batch_factor = 0,
  context = 1, max_output = 1 }

-- Check a new entry, turning numeric strings ("0.15", "128000") into
-- numbers in place; raises naming the model and the field otherwise.
local function check_entry(name, e)
  for k, least in pairs(NUMERIC) do
    local v = e[k]
    if v ~= nil then
      local n = tonumber(v)
      if n == nil or n ~= n or n == huge or n < least then
        error(format("slm.models['%s'].%s must be a finite number >= %d (or a string holding one), got %s",
          name, k, least, type(v) == "string" and format("%q", v) or tostring(v)), 3)
      end
      e[k] = n
    end
  end
  if e.vision ~= nil and type(e.vision) ~= "boolean" then
    error(format("slm.models['%s'].vision must be a boolean", name), 3)
  end
end

--- USD cost of a usage table for a model; nil when the model has no prices.
-- Cached prompt tokens (usage.prompt_tokens_details.cached_tokens) are
-- billed at cached_input_per_m where the model has that price.
function M.cost(name, usage)
  local m = type(name) == "table" and name or resolve(name)
  if not m or type(usage) ~= "table" then return nil end
  -- a price that is not a number (an entry changed after it was added:
  -- "free", NaN) makes the cost unknown, never a crash or a NaN
  local pin = price(m.input_per_m)
  if not pin then return nil end
  local pout, pcached = 0, price(m.cached_input_per_m)
  if m.output_per_m ~= nil then
    pout = price(m.output_per_m)
    if not pout then return nil end
  end
  local p = tonumber(usage.prompt_tokens) or 0
  local c = tonumber(usage.completion_tokens) or 0
  local cached = 0
  local d = usage.prompt_tokens_details
  if type(d) == "table" and pcached then
    cached = tonumber(d.cached_tokens) or 0
    if cached > p then cached = p end
  end
  return ((p - cached) * pin + cached * (pcached or pin) + c * pout) / 1e6
end

-- The table users see: index by any known name or alias, assign new models.
local functions = {
  compare = function(spec) return require("slm.compare").compare(spec) end,
  print_comparison = function(rows, write) return require("slm.compare").print(rows, write) end,
  find = resolve,
}
M.table = setmetatable({}, {
  __index = function(_, k)
    local f = functions[k]
    if f then return f end
    return (resolve(k))
  end,
  __newindex = function(_, k, v)
    if type(k) ~= "string" then error("slm.models: model names are strings", 2) end
    if v ~= nil and type(v) ~= "table" then error("slm.models['" .. k .. "'] must be a table", 2) end
    if v ~= nil then check_entry(k, v) end
    models[k] = v
  end,
  __pairs = function() return pairs(models) end,
})
M.raw = models
M.price = price

return M
