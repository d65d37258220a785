#!/usr/bin/env lua5.4
-- examples/contract_extract.lua: the key facts of a long contract as JSON,
-- each with the words of the contract it came from, and what the parts of
-- the contract disagree on; then the contract in at most 120 words.
--
--   lua5.4 examples/contract_extract.lua [--chunk-tokens N] [--sim DIRECTIVES] [contract.txt]
--
-- Data: examples/data/contract.txt, a 12,600-word fulfilment agreement
-- with one planted inconsistency (clause 7.2: invoices payable within 30
-- days; Annex B 4.2: within 45 days), and contract_expected.json, what a
-- correct extraction finds.
--   1. slm.extract with evidence = true: the contract in chunks of
--      --chunk-tokens tokens (default 3000), extracted 4 at a time and
--      merged; every field comes with a quote, and a field whose quote is
--      not in the contract is dropped and listed. Parties are one party
--      per name. A field the chunks disagree on is a conflict: the planted
--      payment term is the one a correct model reports.
--   2. slm.summarize: the contract in at most 120 words.
-- At the end: the facts, their quotes, what was dropped, the conflicts, a
-- check against contract_expected.json, the summary, tokens and cost.
--
-- Backend: examples/lib/backend.lua (a real endpoint from OPENAI_API_KEY,
-- SLM_API_KEY or SLM_BASE_URL, else the local simulator). The simulator's
-- "model" fills each field from the first words of its chunk (numbers
-- with 0), so its conflicts are the chunks' differing first words, not
-- the payment term, and its values do not match the expected ones: the
-- report says so. --sim DIRECTIVES sends its scenario header with one
-- X-Sim-Key for the run (e.g. --sim bad_quote: every quote is one the
-- contract does not hold, so every field is dropped).
--
-- Exit status: 0 when the extraction and the summary succeeded, 1 otherwise.

local script_dir = (arg and arg[0] or ""):match("^(.*)[/\\]") or "."
local repo_root = script_dir .. "/.."
package.path = table.concat({
  repo_root .. "/?.lua",
  repo_root .. "/lua/?.lua",
  repo_root .. "/lua/?/init.lua",
  package.path,
}, ";")
package.cpath = repo_root .. "/build/?.so;" .. package.cpath

local backend = require "examples.lib.backend"
local fmt_count = backend.fmt_count

local USAGE = {
  "usage: lua5.4 examples/contract_extract.lua [--chunk-tokens N] [--sim DIRECTIVES] [contract.txt]",
  "  --chunk-tokens N  tokens of the contract per request (default 3000)",
  "  --sim D           against the simulator: its scenario directives for every request (e.g. bad_quote)",
}

local function str(description) return { type = "string", description = description } end
local function int(description) return { type = "integer", description = description } end

-- What we ask for: the facts a lawyer checks first.
local SCHEMA = {
  type = "object",
  required = { "title", "agreement_number", "parties", "payment_terms", "liability_cap" },
  properties = {
    title = str("the agreement's title"),
    agreement_number = str("the agreement's number"),
    parties = { type = "array", description = "the contracting parties", items = { type = "object",
      required = { "role", "name" },
      properties = {
        role = { type = "string", enum = { "provider", "client" } },
        name = str("the legal name"),
        registration_number = str("company registration number"),
        vat_number = str("VAT number"),
        address = str("registered address"),
      } } },
    signed_date = { type = "string", format = "date", description = "the date it was signed" },
    effective_date = { type = "string", format = "date", description = "the date it takes effect" },
    initial_term_months = int("the initial term in months"),
    payment_terms = { type = "object", required = { "days" }, properties = {
      days = int("days after the invoice date within which invoices are payable"),
      clause = str("the clause or annex paragraph that says so"),
    } },
    liability_cap = { type = "object", required = { "amount" }, properties = {
      amount = { type = "number", description = "the cap on each party's liability" },
      currency = str("its currency"),
      basis = str("per what: a year, in aggregate, per claim"),
    } },
    governing_law = str("the law that governs the agreement"),
    jurisdiction = str("the courts that have jurisdiction"),
  },
}

local INSTRUCTIONS = "Payment terms: the number of days within which invoices are payable; cure periods, "
  .. "retention periods and suspension rights are not payment terms."

local one_line = backend.one_line

-- The payment-term conflict the contract plants: a conflict at a payment
-- path whose values hold both 30 and 45.
local function planted_found(conflicts)
  for _, c in ipairs(conflicts or {}) do
    if c.path:find("payment", 1, true) then
      local has = {}
      for _, v in ipairs(c.values) do has[tonumber(v) or v] = true end
      if has[30] and has[45] then return c end
    end
  end
end

local function run_job(b, argv)
  local slm = require "slm"
  local json = require "slm.json"
  local core = require "slm.core"
  local common = require "slm.tasks.common"
  local o = backend.parse_args(argv, { chunk_tokens = "count", sim = "string" }, { chunk_tokens = 3000 })
  local report = {}
  local function say(s) report[#report + 1] = (s or "") .. "\n" end

  local path = o.args[1] or (script_dir .. "/data/contract.txt")
  local contract = backend.read_file(path)
  local expected = json.decode(backend.read_file(script_dir .. "/data/contract_expected.json"))
  local client = slm.client { base_url = b.base_url, api_key = b.api_key, model = b.model, timeout = 120,
    headers = backend.sim_headers(b, "contract_extract", o.sim) }
  say(("contract_extract: %s, %s words, %s tokens (%s); chunks of %d tokens"):format(path,
    fmt_count(common.word_count(contract)), fmt_count(slm.tokenizer(b.model):count(contract)), b.model, o.chunk_tokens))

  local started = core.now()
  local res, err = slm.extract { client = client, document = contract, schema = SCHEMA, evidence = true,
    instructions = INSTRUCTIONS, chunk_tokens = o.chunk_tokens, key = { ["$.parties"] = "name" }, concurrency = 4 }
  local sum, serr = slm.summarize { client = client, document = contract, max_words = 120 }
  local wall = core.now() - started

  local prompt, completion, cost = 0, 0, 0
  for _, x in ipairs{ res or err, sum or serr } do
    if type(x) == "table" and x.usage then
      prompt = prompt + x.usage.prompt_tokens
      completion = completion + x.usage.completion_tokens
      cost = cost + (x.cost or 0)
    end
  end

  if res then
    say(("extracted from %d chunks in %d calls (%d re-asked)"):format(res.chunks, res.calls, res.repaired))
    say()
    say("facts (JSON):")
    for _, k in ipairs{ "title", "agreement_number", "parties", "signed_date", "effective_date", "initial_term_months",
      "payment_terms", "liability_cap", "governing_law", "jurisdiction" } do
      if res.data[k] ~= nil then say(("  %-20s %s"):format(k, one_line(json.encode(res.data[k]), 200))) end
    end
    local paths = {}
    for p in pairs(res.evidence) do paths[#paths + 1] = p end
    table.sort(paths)
    say()
    say(("evidence: %d fields quoted from the contract"):format(#paths))
    for n, p in ipairs(paths) do
      if n > 12 then say(("  ... and %d more"):format(#paths - 12)); break end
      say(("  %-32s \"%s\""):format(p, one_line(res.evidence[p], 90)))
    end
    say(("dropped: %d fields whose quote is not in the contract"):format(#res.dropped))
    for n, d in ipairs(res.dropped) do
      if n > 5 then say(("  ... and %d more"):format(#res.dropped - 5)); break end
      say(("  %s (chunk %s): \"%s\""):format(d.path, tostring(d.chunk or 1), one_line(d.quote or "", 80)))
    end
    local conflicts = res.conflicts or {}
    say()
    say(("conflicts between chunks: %d"):format(#conflicts))
    for n, c in ipairs(conflicts) do
      if n > 8 then say(("  ... and %d more"):format(#conflicts - 8)); break end
      local vals = {}
      for i, v in ipairs(c.values) do vals[i] = one_line(json.encode(v), 40) end
      say(("  %-26s %d values: %s"):format(c.path, #c.values, table.concat(vals, " | ")))
    end
    local planted = planted_found(conflicts)
    if planted then
      say(("planted conflict: reported at %s (clause 7.2 says 30 days, Annex B 4.2 says 45; clause 1.4 makes 30 prevail)")
        :format(planted.path))
    else
      say("planted conflict: not reported (clause 7.2 says 30 days, Annex B 4.2 says 45)"
        .. (b.simulated and "; the simulator fills numbers with 0, a real model reads both clauses" or ""))
    end
    -- a few facts against contract_expected.json
    local d = res.data
    local checks = {
      { "title", d.title, expected.title },
      { "agreement_number", d.agreement_number, expected.agreement_number },
      { "liability_cap.amount", (d.liability_cap or {}).amount, expected.liability_cap.amount },
      { "payment_terms.days", (d.payment_terms or {}).days, expected.payment_terms.prevailing_days },
    }
    local right = 0
    for _, c in ipairs(checks) do if c[2] == c[3] then right = right + 1 end end
    say(("against contract_expected.json: %d of %d checked facts match%s"):format(right, #checks,
      b.simulated and " (the simulator's values are its own filling, not a reading of the contract)" or ""))
  else
    say(("extraction failed: %s"):format(one_line(tostring(err))))
  end
  say()
  if sum then
    local flags = {}
    for k in pairs(sum.flags or {}) do flags[#flags + 1] = k end
    table.sort(flags)
    say(("summary (%d words, at most 120%s):"):format(sum.words,
      flags[1] and (", flags: " .. table.concat(flags, ", ")) or ""))
    local line = " "
    for word in one_line(sum.text):gmatch("%S+") do
      if #line + #word > 100 then say(line); line = " " end
      line = line .. " " .. word
    end
    say(line)
  else
    say(("summary failed: %s"):format(one_line(tostring(serr))))
  end
  say()
  say(("tokens:       %s prompt + %s completion = %s"):format(fmt_count(prompt), fmt_count(completion),
    fmt_count(prompt + completion)))
  say(backend.cost_line(b, cost, prompt + completion))
  say(("wall time:    %.2f s"):format(wall))
  return res ~= nil and sum ~= nil, table.concat(report)
end

os.exit(backend.main("contract_extract", USAGE, run_job, arg))
