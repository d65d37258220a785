#!/usr/bin/env lua5.4
-- examples/ticket_triage.lua: a support inbox triaged by a small model,
-- every ticket concurrently: classified (with a confidence), answered from
-- the knowledge base by the support bot when it can be, and handed over to
-- a person when it cannot.
--
--   lua5.4 examples/ticket_triage.lua [tickets.jsonl]
--
-- Data: examples/data/support_tickets.jsonl (248 labelled Russian and
-- English tickets; the labels are the team's own) and the knowledge base
-- in examples/data/kb (FAQ entries and the returns & warranty policy).
-- For each ticket:
--   1. slm.classify: one of nine labels (described in the prompt, with one
--      example per label from the data's dev split), with the model's own
--      probability of it; below 0.5 the ticket is marked for review;
--   2. slm.support: a draft reply citing the FAQ entries it used, or a
--      handover (the customer asked for a person, nothing in the knowledge
--      answers, or an error) with a summary for the agent.
-- Card numbers, e-mail addresses and phone numbers are masked before any
-- text leaves for the model (slm.pii), and put back in the draft.
-- At the end: a table of every ticket, the accuracy against the labels
-- (tickets not used as examples), the handovers, tokens, cost and time.
--
-- Backend: with OPENAI_API_KEY, SLM_API_KEY or SLM_BASE_URL set it talks to
-- that endpoint (model SLM_MODEL, default gpt-4o-mini). With none of them it
-- starts the local simulator from tests/upstream on 127.0.0.1 and stops it
-- at the end, so the example runs offline from a plain checkout (the
-- simulator's "model" is a keyword matcher: its accuracy says nothing about
-- a real model's).
--
-- Exit status: 0 when every ticket was processed, 1 otherwise (130 on Ctrl-C).

-- Paths: run from a checkout without installing anything ------------------

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
local backend = require "examples.lib.backend"
local read_jsonl, read_file, fmt_count = backend.read_jsonl, backend.read_file, backend.fmt_count

-- What we ask for ----------------------------------------------------------

local LABELS = {
  billing = "payments that failed or went through twice, refunds, amounts, promo codes, invoices, receipts, VAT",
  delivery = "status, tracking, delays, couriers, addresses, pickup points, parcels damaged, wrong or missing",
  technical = "the website, the app or a device does not work: errors, setup, faults under warranty",
  account = "login, passwords, two-factor, locked accounts, e-mail or phone changes, data requests, newsletters",
  product_question = "specs, compatibility, stock, warranty coverage, choosing a model, before or after buying",
  complaint = "dissatisfaction with service, staff or quality where nothing concrete is asked for",
  feature_request = "suggestions for the site, the app, the service or the assortment",
  cancellation = "stopping a subscription, a trial, an auto-renewal, an order or a pre-order",
  other = "spam, thanks, job or supplier offers, press, misdirected or empty messages",
}
local LABEL_ORDER = { "billing", "delivery", "technical", "account", "product_question", "complaint",
  "feature_request", "cancellation", "other" }

local INSTRUCTIONS = "Choose what the customer mainly needs the team to do: when a ticket both complains "
  .. "and asks for something actionable (a refund, a replacement), the actionable label wins."

local SYSTEM = "You are the support assistant of Voltamart, an online electronics store. "
  .. "Write a short, friendly reply the agent can send as it is."

-- Data ---------------------------------------------------------------------

-- The text of a ticket as the customer wrote it.
local function ticket_text(t)
  return ("Subject: %s\n\n%s"):format(t.subject or "", t.body or "")
end

-- One example per label from the dev split: the first one of each.
local function few_shot(tickets)
  local picked, out = {}, {}
  for _, t in ipairs(tickets) do
    if t.split == "dev" and LABELS[t.label] and not picked[t.label] then
      picked[t.label] = t
    end
  end
  for _, l in ipairs(LABEL_ORDER) do
    local t = picked[l]
    if t then out[#out + 1] = { text = ticket_text(t), label = l, id = t.id } end
  end
  return out
end

-- Report helpers -------------------------------------------------------------

local MAX_PROBLEMS_SHOWN = 10

local function counts_line(list, counts)
  local parts = {}
  for _, k in ipairs(list) do
    if (counts[k] or 0) > 0 then parts[#parts + 1] = ("%s %d"):format(k, counts[k]) end
  end
  return #parts > 0 and table.concat(parts, ", ") or "-"
end

local function one_line(s)
  return ((s or ""):gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

-- The job ------------------------------------------------------------------

-- Runs the batch and returns whether every ticket was processed, plus the
-- report text. The report is printed by the caller after the simulator has
-- been stopped, so a reader that goes away early (`| head`) cannot leave a
-- simulator running behind a SIGPIPE.
local function run_job(b, argv)
  local tickets_path = argv[1] or (script_dir .. "/data/support_tickets.jsonl")
  local report = {}
  local function say(s) report[#report + 1] = (s or "") .. "\n" end
  local slm = require "slm"
  local core = require "slm.core"

  local tickets = read_jsonl(tickets_path)
  if #tickets == 0 then error("no tickets in " .. tickets_path, 0) end
  local knowledge = read_jsonl(repo_root .. "/examples/data/kb/faq.jsonl")
  knowledge[#knowledge + 1] = read_file(repo_root .. "/examples/data/kb/policies.md")

  local client = slm.client {
    base_url = b.base_url,
    api_key = b.api_key,
    model = b.model,
    max_concurrency = 16,
    timeout = 30,
  }
  local bot = slm.support.new {
    client = client, system = SYSTEM, knowledge = knowledge, categories = LABEL_ORDER,
    mask_pii = true, store = slm.store.memory(),
  }
  local examples = few_shot(tickets)
  local example_ids = {}
  for _, e in ipairs(examples) do example_ids[e.id] = true end

  say(("ticket_triage: %d tickets from %s, %d knowledge entries, %d examples"):format(#tickets, tickets_path,
    #knowledge, #examples))
  local started = core.now()

  -- per ticket: the classification and the bot's reply (each may fail on
  -- its own; what was spent counts either way)
  local results = slm.map(tickets, function(t)
    local text = ticket_text(t)
    local c, cerr = slm.classify { client = client, text = text, labels = LABELS, instructions = INSTRUCTIONS,
      examples = examples, mask_pii = true }
    local r = bot:reply(tostring(t.id), text)
    return { class = c, class_err = cerr, reply = r }
  end, { concurrency = 16, progress = core.isatty(2) })

  local wall = core.now() - started

  -- Table and totals -------------------------------------------------------
  local rows, problems = {}, {}
  local ok_n, failed_n, scored, right, review_n, handover_n, drafts_n = 0, 0, 0, 0, 0, 0, 0
  local escalate_agree, escalate_gold = 0, 0
  local prompt_tokens, completion_tokens, cost = 0, 0, 0
  local by_label, why_handover = {}, {}

  local function spend(x)
    if type(x) ~= "table" then return end
    local u = x.usage or {}
    prompt_tokens = prompt_tokens + (u.prompt_tokens or 0)
    completion_tokens = completion_tokens + (u.completion_tokens or 0)
    cost = cost + (tonumber(x.cost) or 0)
  end

  for i, t in ipairs(tickets) do
    local r = results[i] or {}
    local row = { id = t.id, lang = t.lang or "-" }
    spend(r.class or r.class_err)
    spend(r.reply)
    local c, reply = r.class, r.reply
    if c then
      row.label = c.label
      row.conf = c.confidence and ("%.2f"):format(c.confidence) or "-"
      by_label[c.label] = (by_label[c.label] or 0) + 1
      if c.review then review_n = review_n + 1; row.conf = row.conf .. "?" end
      if t.label and not example_ids[t.id] then
        scored = scored + 1
        if c.label == t.label then right = right + 1 end
        row.gold = c.label == t.label and "ok" or t.label
      else
        -- "ex": a ticket shown to the model as an example; "-": no label to score against
        row.gold = example_ids[t.id] and "ex" or "-"
      end
    else
      row.label, row.conf, row.gold = "-", "-", "-"
    end
    if reply and reply.escalate then
      handover_n = handover_n + 1
      local why = reply.escalate.reason or "?"
      why_handover[why] = (why_handover[why] or 0) + 1
      row.action = "handover: " .. why
      row.text = one_line(reply.escalate.summary)
    elseif reply then
      drafts_n = drafts_n + 1
      local cites = {}
      for _, s in ipairs(reply.sources or {}) do cites[#cites + 1] = s.id end
      row.action = "draft " .. (cites[1] and table.concat(cites, " ") or "(no source)")
      row.text = one_line(reply.text)
    end
    if t.escalate ~= nil and reply then
      if t.escalate then escalate_gold = escalate_gold + 1 end
      if t.escalate and reply.escalate then escalate_agree = escalate_agree + 1 end
    end
    local err = r.class_err or (reply and reply.error)
    if c and reply and not reply.error then
      ok_n = ok_n + 1
    else
      failed_n = failed_n + 1
      local kind = type(err) == "table" and err.kind or "error"
      problems[#problems + 1] = tf.truncate(("  %s: %s: %s"):format(t.id, kind,
        one_line(type(err) == "table" and err.message or tostring(err))), 160)
    end
    rows[i] = row
  end

  say()
  report[#report + 1] = tf.render({
    { key = "id", title = "id" },
    { key = "lang", title = "lang" },
    { key = "label", title = "label" },
    { key = "conf", title = "conf" },
    { key = "gold", title = "gold" },
    { key = "action", title = "action", max = 34 },
    { key = "text", title = "draft / summary for the agent", max = 60 },
  }, rows)

  if #problems > 0 then
    say()
    say("failures:")
    for n, p in ipairs(problems) do
      if n > MAX_PROBLEMS_SHOWN then
        say(("  ... and %d more"):format(#problems - MAX_PROBLEMS_SHOWN))
        break
      end
      say(p)
    end
  end

  say()
  say(("tickets:      %d"):format(#tickets))
  say(("succeeded:    %d    failed: %d"):format(ok_n, failed_n))
  say(("accuracy:     %d of %d = %.1f%% against the labels (conf below 0.50 marked '?': %d for review)"):format(
    right, scored, scored > 0 and right / scored * 100 or 0, review_n))
  say(("replies:      %d drafts, %d handed over (%s); of the %d the labels say need a person, %d handed over"):format(
    drafts_n, handover_n, counts_line({ "user_request", "cannot_answer", "complaint", "sensitive",
      "repeated_failures", "error" }, why_handover), escalate_gold, escalate_agree))
  say(("tokens:       %s prompt + %s completion = %s"):format(
    fmt_count(prompt_tokens), fmt_count(completion_tokens), fmt_count(prompt_tokens + completion_tokens)))
  say(backend.cost_line(b, cost, prompt_tokens + completion_tokens))
  say(("wall time:    %.2f s    (%.1f tickets/s)"):format(wall, wall > 0 and #tickets / wall or 0))
  say(("by label:     %s"):format(counts_line(LABEL_ORDER, by_label)))

  return failed_n == 0, table.concat(report)
end

os.exit(backend.main("ticket_triage", { "usage: lua5.4 examples/ticket_triage.lua [tickets.jsonl]" }, run_job, arg))
