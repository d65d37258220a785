-- slm.route: which of the configured models to send a request to: the
-- cheapest whose context fits it (the counted prompt plus the expected
-- output), that reads images when the request has some.
--
--   local model, report = slm.route{ request = req, output_tokens = 300,
--     models = { "gpt-4o-mini", "nousresearch/hermes-3-llama-3.1-405b" } }   -- or client = c
--   report: the candidates, cheapest first: { model, fits, prompt_tokens, estimate, cost, why }
--
-- `models` defaults to the client's model and its fallbacks.  The cost is
-- the expected one (prompt + output_tokens at the model's prices); a model
-- without prices (or with prices that are not numbers) comes after every
-- priced one; among equal costs the order given decides.  A model whose
-- max_output is below output_tokens does not fit.  -> model, report, or
-- nil, err (kind "context_length") when none fits.
local models = require "slm.models"
local errors = require "slm.errors"
local count = require "slm.count"

local type, ipairs, error, tostring, format, sort, huge =
  type, ipairs, error, tostring, string.format, table.sort, math.huge

local M = {}

local function has_images(req)
  for _, m in ipairs(req.messages or {}) do
    if type(m.content) == "table" then
      for _, p in ipairs(m.content) do
        if type(p) == "table" and (p.type == "image_url" or p.type == "input_image") then return true end
      end
    end
  end
  return false
end

function M.route(o)
  if type(o) ~= "table" then error("slm.route: expected an options table", 2) end
  local req = o.request
  if type(req) ~= "table" or type(req.messages) ~= "table" then
    error("slm.route: option 'request' must be a request table with messages", 2)
  end
  local list = o.models
  if list == nil and o.client then
    list = { o.client.model }
    for _, m in ipairs(o.client.fallback or {}) do list[#list + 1] = m end
  end
  if type(list) ~= "table" or not list[1] then error("slm.route: give 'models' (a list) or 'client'", 2) end
  local out, from = o.output_tokens, "option 'output_tokens'"
  if out == nil then
    out, from = req.max_tokens or req.max_completion_tokens or 500, "the request's max_tokens"
  end
  -- NaN would fit every context (n + NaN > context is false) and make
  -- every cost NaN; math.huge fits none and says so
  if type(out) ~= "number" or out ~= out or out < 0 or out == huge then
    error(format("slm.route: %s must be a finite number >= 0, got %s", from, tostring(out)), 2)
  end
  for i, name in ipairs(list) do
    if type(name) ~= "string" then error(format("slm.route: models[%d] must be a model name (a string)", i), 2) end
  end
  local images = has_images(req)
  local report, order = {}, {}
  for i, name in ipairs(list) do
    local info = models.find(name)
    local n, cinfo = count.count(req, name)
    local row = { model = name, prompt_tokens = n, estimate = cinfo and cinfo.estimate or nil }
    if not info then
      row.fits, row.why = false, "not in slm.models (its context is unknown)"
    elseif images and info.vision == false then
      row.fits, row.why = false, "does not read images"
    elseif info.context and n + out > info.context then
      row.fits, row.why = false, format("needs %.0f tokens, context %.0f", n + out, info.context)
    elseif info.max_output and out > info.max_output then
      row.fits, row.why = false, format("%.0f output tokens > max output %.0f", out, info.max_output)
    else
      row.fits = true
      row.cost = models.cost(info, { prompt_tokens = n, completion_tokens = out })
    end
    report[#report + 1] = row
    order[row] = i
  end
  sort(report, function(a, b)
    if a.fits ~= b.fits then return a.fits end
    local ca, cb = a.cost or huge, b.cost or huge
    if ca ~= cb then return ca < cb end
    return order[a] < order[b] -- ties (and unpriced ones): the order given
  end)
  if not report[1].fits then
    return nil, errors.new("context_length", "no model fits the request: " .. report[1].model .. ": " .. report[1].why,
      { status = 0, report = report })
  end
  return report[1].model, report
end

return M
