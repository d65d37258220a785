#!/usr/bin/env lua5.4
-- examples/product_descriptions.lua: product copy for every row of a
-- catalogue, in the brand's voice, written concurrently, with the brand's
-- banned words checked.
--
--   lua5.4 examples/product_descriptions.lua [--words N] [--variants N] [--sim DIRECTIVES] [catalogue.csv]
--
-- Data: examples/data/catalogue.csv (29 products in 51 Russian and English
-- rows) and examples/data/brand.json (Voltamart's tone, audience, do's and
-- don'ts, and 23 words product copy must never use).
--   1. slm.route picks the model: the request every row sends (the brand
--      voice in the system prompt, the row in the user message) and the
--      output it asks for (--variants texts of --words words), priced on
--      gpt-4o-mini and on Hermes 3 405B. Hermes' output costs half of
--      gpt-4o-mini's ($0.30 against $0.60 per million tokens) but its
--      input almost seven times as much ($1.00 against $0.15), so it is
--      the cheaper only when a request writes more than 2.83 tokens per
--      token it reads: both estimates are printed with the choice.
--   2. slm.generate for every row, 8 at a time (slm.map): the template
--      filled from the row's columns, in the row's language, at most
--      --words words; a text with a banned word is written again once
--      with the words named, and flagged if it still has one.
-- At the end: a table of every text, the flags, tokens, cost and time.
--
-- Backend: examples/lib/backend.lua (a real endpoint from OPENAI_API_KEY,
-- SLM_API_KEY or SLM_BASE_URL, else the local simulator, whose "model"
-- echoes the prompt: its copy is no copy, its token counts are 4 bytes per
-- token). --sim DIRECTIVES sends the simulator's scenario header with
-- every request, with one X-Sim-Key for the run (e.g. --sim banned=cheap:
-- every reply gets the word "cheap", so the regeneration and the flags
-- show; --sim banned=cheap,fail=10: only the run's first 10 requests).
--
-- Exit status: 0 when every row got its text, 1 otherwise.

local script_dir = (arg and arg[0] or ""):match("^(.*)[/\\]") or "."
local repo_root = script_dir .. "/.."
package.path = table.concat({
  repo_root .. "/?.lua",
  repo_root .. "/lua/?.lua",
  repo_root .. "/lua/?/init.lua",
  package.path,
}, ";")
package.cpath = repo_root .. "/build/?.so;" .. package.cpath

local tf = require "examples.lib.table_fmt"
local csv = require "examples.lib.csv"
local backend = require "examples.lib.backend"
local fmt_count = backend.fmt_count

local HERMES = "nousresearch/hermes-3-llama-3.1-405b"
local CANDIDATES = { "gpt-4o-mini", HERMES }

-- the prompt in the row's language
local TEMPLATES = {
  en = "Write the product description of {{name}} (category: {{category}}).\n"
    .. "Features: {{features}}.\nWho it suits: {{audience}}.",
  ru = "Напишите описание товара {{name}} (категория: {{category}}).\n"
    .. "Характеристики: {{features}}.\nКому подходит: {{audience}}.",
}

local USAGE = {
  "usage: lua5.4 examples/product_descriptions.lua [--words N] [--variants N] [--sim DIRECTIVES] [catalogue.csv]",
  "  --words N      at most N words per text (default 80: brand.json asks for 40-80)",
  "  --variants N   N texts per row in one request (default 1)",
  "  --sim D        against the simulator: its scenario directives for every request (e.g. banned=cheap)",
}

local function run_job(b, argv)
  local slm = require "slm"
  local json = require "slm.json"
  local core = require "slm.core"
  local o = backend.parse_args(argv, { words = "count", variants = "count", sim = "string" },
    { words = 80, variants = 1 })
  local report = {}
  local function say(s) report[#report + 1] = (s or "") .. "\n" end

  local path = o.args[1] or (script_dir .. "/data/catalogue.csv")
  local rows, rerr = csv.read_file(path)
  if not rows then error(rerr, 0) end
  if #rows == 0 then error("no rows in " .. path, 0) end
  local brand = json.decode(backend.read_file(script_dir .. "/data/brand.json"))
  say(("product_descriptions: %d rows from %s, brand %s (%d banned words), at most %d words, %d text%s per row"):format(
    #rows, path, brand.name, #brand.banned, o.words, o.variants, o.variants > 1 and "s" or ""))

  -- 1. the model: what one row's request costs on each candidate
  local function options(row, model)
    return { template = TEMPLATES[row.lang] or TEMPLATES.en, vars = row, brand = brand, max_words = o.words, n = o.variants,
      language = row.lang, model = model }
  end
  local sample = slm.generate.request(options(rows[1], CANDIDATES[1]))
  local output = (sample.max_tokens or 0) * o.variants
  local chosen, routes = slm.route { request = sample, output_tokens = output, models = CANDIDATES }
  if not chosen then error(tostring(routes), 0) end
  local prompt_tokens = slm.count(sample, CANDIDATES[1])
  say(("route: %d prompt + %d output tokens per row (output at the max_tokens bound: %d for each of %d text%s)"):format(
    prompt_tokens, output, sample.max_tokens or 0, o.variants, o.variants > 1 and "s" or ""))
  for _, r in ipairs(routes) do
    say(("  %-40s $%.6f per row, $%.4f for the catalogue%s"):format(r.model, r.cost or 0, (r.cost or 0) * #rows,
      r.model == chosen and "   <- chosen" or (r.why and ("   (" .. r.why .. ")") or "")))
  end
  -- where the two cross: Hermes' dearer input against its cheaper output
  local mini, hermes = slm.models[CANDIDATES[1]], slm.models[HERMES]
  say(("  Hermes 3 is the cheaper above %.2f output tokens per prompt token; this job writes %.2f"):format(
    (hermes.input_per_m - mini.input_per_m) / (mini.output_per_m - hermes.output_per_m),
    output / math.max(1, prompt_tokens)))

  local client = slm.client { base_url = b.base_url, api_key = b.api_key, model = chosen, timeout = 60,
    max_concurrency = 8, headers = backend.sim_headers(b, "product_descriptions", o.sim) }

  -- 2. the copy, 8 rows at a time
  local started = core.now()
  local results, errs = slm.map(rows, function(row)
    local opts = options(row, chosen)
    opts.client = client
    return slm.generate(opts)
  end, { concurrency = 8, progress = core.isatty(2) })
  local wall = core.now() - started

  local out, problems = {}, {}
  local ok_n, regenerated, tokens_in, tokens_out, cost = 0, 0, 0, 0, 0
  local flagged = { banned = 0, too_long = 0, cut = 0 }
  local banned_seen = {}
  for i, row in ipairs(rows) do
    local res, err = results[i], errs[i]
    local spent = res or (type(err) == "table" and err) or {}
    local u = spent.usage or {}
    tokens_in = tokens_in + (u.prompt_tokens or 0)
    tokens_out = tokens_out + (u.completion_tokens or 0)
    cost = cost + (tonumber(spent.cost) or 0)
    local line = { sku = row.sku, lang = row.lang }
    if res then
      ok_n = ok_n + 1
      if res.regenerated then regenerated = regenerated + 1 end
      local texts = res.texts or { res.text }
      local all = res.texts and res.flags or { res.flags }
      local f = {}
      for k = 1, #texts do
        local fl = all and all[k]
        if fl then
          for name in pairs(flagged) do
            if fl[name] then flagged[name] = flagged[name] + 1; f[name] = true end
          end
          for _, w in ipairs(fl.banned or {}) do banned_seen[w] = true end
        end
      end
      local names = {}
      for _, name in ipairs{ "banned", "too_long", "cut" } do if f[name] then names[#names + 1] = name end end
      line.words = tostring(require("slm.tasks.common").word_count(res.text))
      line.flags = (#names > 0 and table.concat(names, ",") or "-") .. (res.regenerated and " (rewritten)" or "")
      line.text = backend.one_line(res.text)
    else
      line.words, line.flags, line.text = "-", "failed", backend.one_line(tostring(err))
      problems[#problems + 1] = ("  %s/%s: %s"):format(row.sku, row.lang, backend.one_line(tostring(err)))
    end
    out[i] = line
  end

  say()
  report[#report + 1] = tf.render({
    { key = "sku", title = "sku" },
    { key = "lang", title = "lang" },
    { key = "words", title = "words", align = "right" },
    { key = "flags", title = "flags", max = 24 },
    { key = "text", title = "text", max = 70 },
  }, out)
  if #problems > 0 then
    say()
    say("failures:")
    for n, p in ipairs(problems) do
      if n > 10 then say(("  ... and %d more"):format(#problems - 10)); break end
      say(p)
    end
  end
  local words = {}
  for w in pairs(banned_seen) do words[#words + 1] = w end
  table.sort(words)
  say()
  say(("rows:         %d    succeeded: %d    failed: %d"):format(#rows, ok_n, #rows - ok_n))
  say(("model:        %s (chosen by slm.route)"):format(chosen))
  say(("banned words: %d rows written again once for one; %d texts still have one%s"):format(regenerated,
    flagged.banned, #words > 0 and (" (" .. table.concat(words, ", ") .. ")") or ""))
  say(("length:       %d texts over %d words (too_long), %d cut by max_tokens"):format(flagged.too_long, o.words,
    flagged.cut))
  say(("tokens:       %s prompt + %s completion = %s"):format(fmt_count(tokens_in), fmt_count(tokens_out),
    fmt_count(tokens_in + tokens_out)))
  say(backend.cost_line(b, cost, tokens_in + tokens_out, chosen))
  say(("wall time:    %.2f s"):format(wall))
  return ok_n == #rows, table.concat(report)
end

os.exit(backend.main("product_descriptions", USAGE, run_job, arg))
