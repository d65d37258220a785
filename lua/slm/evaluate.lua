-- slm.evaluate: the decision table of a workload: a labelled dataset run
-- through several models, with accuracy (classification) or the
-- schema-valid rate (extraction), cost per 1,000 items and latency.
--
--   local rows = slm.evaluate{ task = "classify", dataset = items, models = { "gpt-4o-mini", "hermes-3-405b" },
--     client = c, labels = {...}, concurrency = 8, progress = false, ... }   -- the task's own options too
--   slm.evaluate.print(rows)
--   rows: one per model: { model, n, failed, accuracy, macro_f1 | valid_rate, field_accuracy,
--          cost, cost_per_1000, p50, p95, report }
--
-- classify: items { text = , label = }; extract: items { document = ,
-- expected = (optional) }: valid_rate is the share of items that came back
-- valid against the schema, field_accuracy the share of expected top-level
-- fields that came back equal.
local json = require "slm.json"

local type, pairs, ipairs, error, format, sort = type, pairs, ipairs, error, string.format, table.sort

local M = {}

local function percentile(sorted, q)
  if #sorted == 0 then return nil end
  return sorted[math.max(1, math.ceil(q * #sorted))]
end

local function eval_extract(o, model)
  local extract = require("slm.tasks.extract")
  local results, errs = require("slm.map").map(o.dataset, function(item, i)
    if type(item) ~= "table" or type(item.document) ~= "string" then
      error(format("slm.evaluate: dataset[%d] must be a table with a string 'document'", i), 0)
    end
    local t = { document = item.document, model = model }
    for k, v in pairs(o.task_opts) do t[k] = v end
    local t0 = require("slm.core").now()
    local res, err = extract.extract(t)
    if res then res.wall = require("slm.core").now() - t0 end
    return res, err
  end, { concurrency = o.concurrency or 4, progress = o.progress })
  local n, valid, cost, priced, lat, fields, right = #o.dataset, 0, 0, true, {}, 0, 0
  for i, item in ipairs(o.dataset) do
    local res = results[i]
    if res then
      valid = valid + 1
      if res.cost then cost = cost + res.cost else priced = false end
      lat[#lat + 1] = res.wall
      if type(item.expected) == "table" then
        for k, v in pairs(item.expected) do
          fields = fields + 1
          local got = res.data[k]
          local ok1, a = pcall(json.encode, got)
          local ok2, b = pcall(json.encode, v)
          if ok1 and ok2 and a == b then right = right + 1 end
        end
      end
    elseif type(errs[i]) == "table" then
      -- a failed item was billed too: its cost, or unknown (the sum is then unknown)
      if errs[i].cost then cost = cost + errs[i].cost elseif errs[i].usage then priced = false end
    end
  end
  sort(lat)
  return { model = model, n = n, failed = n - valid, valid_rate = n > 0 and valid / n or nil,
    field_accuracy = fields > 0 and right / fields or nil, cost = priced and cost or nil,
    cost_per_1000 = priced and n > 0 and cost / n * 1000 or nil, p50 = percentile(lat, 0.5), p95 = percentile(lat, 0.95) }
end

function M.evaluate(o)
  if type(o) ~= "table" then error("slm.evaluate: expected an options table", 2) end
  local task = o.task or "classify"
  if task ~= "classify" and task ~= "extract" then error("slm.evaluate: option 'task' must be \"classify\" or \"extract\"", 2) end
  if type(o.dataset) ~= "table" then error("slm.evaluate: option 'dataset' must be a list", 2) end
  if type(o.models) ~= "table" or not o.models[1] then error("slm.evaluate: option 'models' must be a list of model names", 2) end
  for i, m in ipairs(o.models) do
    if type(m) ~= "string" or m == "" then error(format("slm.evaluate: models[%d] must be a model name (a string)", i), 2) end
  end
  -- the task's options go to every item, after its own fields: one of these
  -- would replace each row's model (every row then measuring the same
  -- model under different names) or each item's input
  local item_field = task == "classify" and "text" or "document"
  for _, k in ipairs{ "model", item_field } do
    if o[k] ~= nil then
      error(format("slm.evaluate: option '%s' is not allowed (%s); the models go in 'models', the inputs in "
        .. "the dataset", k, k == "model" and "it would replace every row's model" or "it would replace every item's"), 2)
    end
  end
  local task_opts = {}
  for k, v in pairs(o) do
    if k ~= "task" and k ~= "dataset" and k ~= "models" and k ~= "concurrency" and k ~= "progress" then task_opts[k] = v end
  end
  local rows = {}
  for _, model in ipairs(o.models) do
    if task == "classify" then
      local t = { model = model, concurrency = o.concurrency, progress = o.progress }
      for k, v in pairs(task_opts) do t[k] = v end
      local r = require("slm.tasks.classify").evaluate(o.dataset, t)
      rows[#rows + 1] = { model = model, n = r.n, failed = r.failed, accuracy = r.accuracy, macro_f1 = r.macro_f1,
        cost = r.cost, cost_per_1000 = r.cost_per_1000, p50 = r.latency.p50, p95 = r.latency.p95, report = r }
    else
      rows[#rows + 1] = eval_extract({ dataset = o.dataset, task_opts = task_opts, concurrency = o.concurrency,
        progress = o.progress }, model)
    end
  end
  return rows
end

--- Print the decision table (write: io.write by default).
function M.print(rows, write)
  write = write or io.write
  local function pct(x) return x and format("%6.1f%%", x * 100) or "     -" end
  local function num(x, f) return x and format(f, x) or "-" end
  write(format("%-40s %7s %8s %8s %14s %8s %8s\n", "model", "items", "quality", "failed", "$ per 1,000", "p50 s", "p95 s"))
  for _, r in ipairs(rows) do
    write(format("%-40s %7d %8s %8d %14s %8s %8s\n", r.model, r.n, pct(r.accuracy or r.valid_rate), r.failed,
      num(r.cost_per_1000, "%.4f"), num(r.p50, "%.3f"), num(r.p95, "%.3f")))
  end
  write("quality: accuracy (classify) or the share of schema-valid results (extract)\n")
end

return setmetatable(M, { __call = function(_, ...) return M.evaluate(...) end })
