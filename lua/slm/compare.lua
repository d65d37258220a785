--- slm.compare: what a workload costs on each model, and whether it fits.
--
--   local rows = slm.models.compare{
--     tasks = {
--       { name = "triage",    prompt_tokens = 300,  output_tokens = 60,  count = 1000 },
--       { name = "summarise", prompt = long_text,   output_tokens = 200, count = 50 },
--     },
--     models = { "gpt-4o-mini", "hermes-3-405b" },   -- default: every model with prices
--   }
--   require("slm.compare").print(rows)
--
-- A task gives its prompt as `prompt_tokens`, as text (`prompt`, counted
-- as one user message with the model's own tokenizer and format, so the
-- same text may cost a different number of tokens per model) or as
-- `messages` (counted with slm.count); its reply as `output_tokens` or
-- as text (`output`, counted with the model's tokenizer).  `count` is how
-- many times the task runs (default 1).
--
-- Returns one row per model, in the order given (default: by name):
--   { model, context, max_output, input_per_m, output_per_m, vision,
--     tokenizer, estimate (some count is an estimate),
--     tasks = { { name, prompt_tokens, output_tokens, count,
--                 cost (USD per task), per_1000 (USD per 1,000 tasks),
--                 total (USD for `count` tasks), fits, why, estimate }, ... },
--     total (USD for the whole workload), fits (every task fits) }
-- A model without prices has cost, per_1000 and total nil (printed
-- "unknown"), never 0.  Token counts and `count` are finite numbers >= 0.
-- `fits`: prompt + output <= context, and output <= max_output when the
-- model has one; `why` says what does not fit.
--
-- Pure Lua; 5.1/LuaJIT and 5.4 alike.
local models = require "slm.models"

local type, ipairs, pairs, tostring, error, format =
  type, ipairs, pairs, tostring, error, string.format
local floor, concat, sort, huge = math.floor, table.concat, table.sort, math.huge

local M = {}

-- a finite number >= 0 (NaN would fit every context and make every sum NaN)
local function amount(v) return type(v) == "number" and v == v and v >= 0 and v < huge end

local function check_spec(spec)
  if type(spec) ~= "table" then error("slm.models.compare: expected a table { tasks = ..., models = ... }", 3) end
  for k in pairs(spec) do
    if k ~= "tasks" and k ~= "models" then error(format("slm.models.compare: unknown option '%s'", tostring(k)), 3) end
  end
  if type(spec.tasks) ~= "table" or spec.tasks[1] == nil then
    error("slm.models.compare: 'tasks' must be a non-empty list", 3)
  end
  for i, t in ipairs(spec.tasks) do
    if type(t) ~= "table" then error(format("slm.models.compare: tasks[%d] must be a table", i), 3) end
    local np = (t.prompt_tokens ~= nil and 1 or 0) + (t.prompt ~= nil and 1 or 0) + (t.messages ~= nil and 1 or 0)
    if np ~= 1 then
      error(format("slm.models.compare: tasks[%d] needs exactly one of prompt_tokens, prompt, messages", i), 3)
    end
    if t.prompt_tokens ~= nil and not amount(t.prompt_tokens) then
      error(format("slm.models.compare: tasks[%d].prompt_tokens must be a finite number >= 0", i), 3)
    end
    if t.prompt ~= nil and type(t.prompt) ~= "string" then
      error(format("slm.models.compare: tasks[%d].prompt must be a string", i), 3)
    end
    if t.messages ~= nil and type(t.messages) ~= "table" then
      error(format("slm.models.compare: tasks[%d].messages must be a list of messages", i), 3)
    end
    if (t.output_tokens ~= nil) == (t.output ~= nil) then
      error(format("slm.models.compare: tasks[%d] needs exactly one of output_tokens, output", i), 3)
    end
    if t.output_tokens ~= nil and not amount(t.output_tokens) then
      error(format("slm.models.compare: tasks[%d].output_tokens must be a finite number >= 0", i), 3)
    end
    if t.output ~= nil and type(t.output) ~= "string" then
      error(format("slm.models.compare: tasks[%d].output must be a string", i), 3)
    end
    if t.count ~= nil and not amount(t.count) then
      error(format("slm.models.compare: tasks[%d].count must be a finite number >= 0", i), 3)
    end
    if t.name ~= nil and type(t.name) ~= "string" then
      error(format("slm.models.compare: tasks[%d].name must be a string", i), 3)
    end
  end
  if spec.models ~= nil then
    if type(spec.models) ~= "table" or spec.models[1] == nil then
      error("slm.models.compare: 'models' must be a non-empty list of model names", 3)
    end
    for i, m in ipairs(spec.models) do
      if type(m) ~= "string" then error(format("slm.models.compare: models[%d] must be a string", i), 3) end
      if not models.find(m) then error(format("slm.models.compare: unknown model '%s'", m), 3) end
    end
  end
end

-- Every model with prices, by name.
local function all_models()
  local names = {}
  for name, m in pairs(models.raw) do
    if type(m) == "table" and models.price(m.input_per_m) then names[#names + 1] = name end
  end
  sort(names)
  return names
end

local function task_row(entry, name, t, i)
  local count = require "slm.count"
  local estimate = false
  local prompt, output = t.prompt_tokens, t.output_tokens
  if prompt == nil then
    local msgs = t.messages or { { role = "user", content = t.prompt } }
    local n, info = count.count(msgs, name)
    prompt, estimate = n, info.estimate
  end
  if output == nil then
    local tok = require("slm.tokenizer").get(entry.tokenizer or "o200k_base")
    output = tok:count(t.output)
    estimate = estimate or tok.estimate
  end
  -- nil: the model has no prices (unknown, never shown as free)
  local cost = models.cost(entry, { prompt_tokens = prompt, completion_tokens = output })
  local n = t.count or 1
  local fits, why = true, nil
  if entry.context and prompt + output > entry.context then
    fits, why = false, format("%.0f + %.0f tokens > context %.0f", prompt, output, entry.context)
  elseif entry.max_output and output > entry.max_output then
    fits, why = false, format("%.0f output tokens > max output %.0f", output, entry.max_output)
  end
  return {
    name = t.name or ("task " .. i), prompt_tokens = prompt, output_tokens = output, count = n,
    cost = cost, per_1000 = cost and cost * 1000, total = cost and cost * n, fits = fits, why = why,
    estimate = estimate,
    prompt_given = t.prompt_tokens ~= nil, output_given = t.output_tokens ~= nil,
  }
end

--- slm.models.compare(spec) -> rows (see the header of this file).
-- Raises on misuse (unknown model, malformed task).
function M.compare(spec)
  check_spec(spec)
  local names = spec.models or all_models()
  local rows = {}
  for _, given in ipairs(names) do
    local entry, canonical = models.find(given)
    local row = {
      model = canonical or given, context = entry.context, max_output = entry.max_output,
      input_per_m = entry.input_per_m, output_per_m = entry.output_per_m, vision = entry.vision,
      tokenizer = entry.tokenizer, tasks = {}, total = 0, fits = true, estimate = false,
    }
    for i, t in ipairs(spec.tasks) do
      local tr = task_row(entry, row.model, t, i)
      row.tasks[i] = tr
      row.total = row.total and tr.total and row.total + tr.total
      row.fits = row.fits and tr.fits
      row.estimate = row.estimate or tr.estimate
    end
    rows[#rows + 1] = row
  end
  return rows
end

------------------------------------------------------------------ printing

local function thousands(n)
  if n >= 1e15 or n <= -1e15 then return format("%.3g", n) end -- (%d has no integer past 2^63)
  local s = format("%d", floor(n + 0.5))
  local neg = s:sub(1, 1) == "-"
  if neg then s = s:sub(2) end
  local out = s:reverse():gsub("(%d%d%d)", "%1,"):reverse()
  if out:sub(1, 1) == "," then out = out:sub(2) end
  return (neg and "-" or "") .. out
end
M.thousands = thousands

local function usd(x)
  if x == nil then return "unknown" end -- a model without prices
  if x >= 100 then return format("$%s", thousands(x)) end
  if x >= 1 then return format("$%.2f", x) end
  return format("$%.4f", x)
end

local function price(x)
  if x == nil then return "-" end
  return format("%.2f", x)
end

-- width in characters (UTF-8 continuation bytes do not count)
local function ulen(s) return #(s:gsub("[\128-\191]", "")) end

local function pad(s, w, right)
  local len = ulen(s)
  if len >= w then return s end
  if right then return string.rep(" ", w - len) .. s end
  return s .. string.rep(" ", w - len)
end

--- The comparison as text: the seed's model table (context, prices,
-- images, tokenizer), then per task the USD per 1,000 tasks on each model
-- ("does not fit" where prompt + output exceeds the context), then the
-- total for the workload (each task `count` times).  "~" marks numbers
-- that rest on an estimated token count.
function M.format(rows)
  if type(rows) ~= "table" or rows[1] == nil then error("slm.compare.format: expected the rows of compare()", 2) end
  local lines = {}
  local labels = { "model", "context", "input $/1M", "output $/1M", "images", "tokenizer" }
  local first = rows[1]
  for _, tr in ipairs(first.tasks) do
    -- token numbers in the label only when the task gave them (text
    -- counts differ per model)
    labels[#labels + 1] = format("%s (%s in + %s out), $ per 1,000", tr.name,
      tr.prompt_given and thousands(tr.prompt_tokens) or "text",
      tr.output_given and thousands(tr.output_tokens) or "text")
  end
  local counts = {}
  for _, tr in ipairs(first.tasks) do counts[#counts + 1] = thousands(tr.count) .. " " .. tr.name end
  labels[#labels + 1] = "total, $ for " .. concat(counts, " + ")
  -- one column per model
  local cols = {}
  for c, row in ipairs(rows) do
    local col = { row.model, row.context and thousands(row.context) or "-", price(row.input_per_m),
      price(row.output_per_m), row.vision and "yes" or "no", row.tokenizer or "-" }
    for _, tr in ipairs(row.tasks) do
      local cell = (tr.estimate and "~" or "") .. usd(tr.per_1000)
      if not tr.fits then cell = cell .. " (does not fit)" end
      col[#col + 1] = cell
    end
    local tot = (row.estimate and "~" or "") .. usd(row.total)
    if not row.fits then tot = tot .. " (not all fit)" end
    col[#col + 1] = tot
    cols[c] = col
  end
  -- widths
  local lw = 0
  for _, l in ipairs(labels) do if ulen(l) > lw then lw = ulen(l) end end
  local widths = {}
  for c, col in ipairs(cols) do
    local w = 0
    for _, cell in ipairs(col) do if ulen(cell) > w then w = ulen(cell) end end
    widths[c] = w
  end
  local function line(i)
    local parts = { pad(labels[i], lw) }
    for c, col in ipairs(cols) do parts[#parts + 1] = pad(col[i], widths[c], i > 1) end
    return concat(parts, "  ")
  end
  lines[#lines + 1] = line(1)
  local rule = { string.rep("-", lw) }
  for c = 1, #cols do rule[#rule + 1] = string.rep("-", widths[c]) end
  lines[#lines + 1] = concat(rule, "  ")
  for i = 2, #labels - 1 do lines[#lines + 1] = line(i) end
  lines[#lines + 1] = concat(rule, "  ")
  lines[#lines + 1] = line(#labels)
  return concat(lines, "\n") .. "\n"
end

--- Print M.format(rows) (to io.stdout, or with write(s) when given).
function M.print(rows, write)
  local s = M.format(rows)
  if write then write(s) else io.stdout:write(s) end
  return s
end

return M
