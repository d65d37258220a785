#!/usr/bin/env lua5.4
-- examples/ticket_triage.lua: triage a CSV of customer-support tickets with
-- a small model, all tickets concurrently.
--
--   lua5.4 examples/ticket_triage.lua [tickets.csv]
--
-- For every ticket the model returns, as JSON constrained by a strict JSON
-- schema: category, priority, language and a one-line English summary. The
-- reply is decoded and validated; a reply that does not fit the schema marks
-- that ticket "invalid reply" and the job goes on. At the end: a table of
-- results, token usage, cost, throughput and counts per category/priority.
--
-- Backend: with OPENAI_API_KEY, SLM_API_KEY or SLM_BASE_URL set it talks to
-- that endpoint (model SLM_MODEL, default gpt-4o-mini). With none of them it
-- starts the local simulator from tests/upstream on 127.0.0.1 and stops it
-- at the end, so the example runs offline from a plain checkout.
--
-- Exit status: 0 when every ticket was classified, 1 otherwise (130 on Ctrl-C).

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

local cjson = require "cjson.safe"
local csv = require "examples.lib.csv"
local tf = require "examples.lib.table_fmt"

-- What we ask for ----------------------------------------------------------

local CATEGORIES = {
  "billing", "delivery", "technical", "account",
  "product_question", "complaint", "feature_request", "other",
}
local PRIORITIES = { "urgent", "high", "medium", "low" }
local LANGUAGES = { "ru", "en" }

local function set_of(list)
  local s = {}
  for _, v in ipairs(list) do s[v] = true end
  return s
end
local VALID = {
  category = set_of(CATEGORIES),
  priority = set_of(PRIORITIES),
  language = set_of(LANGUAGES),
}

-- The property descriptions double as the labelling guide: each enum value
-- is followed by short cue words (English and Russian) that point to it.
local SCHEMA = {
  type = "object",
  additionalProperties = false,
  required = { "category", "priority", "language", "summary" },
  properties = {
    category = {
      type = "string",
      enum = CATEGORIES,
      description = table.concat({
        "What the ticket is mainly about. When a ticket both complains and asks for"
          .. " something actionable such as a refund or a replacement then choose the actionable"
          .. " category unless the customer mainly wants to complain. Cue words per category:",
        "billing: payment, charged, double charge, refund, invoice, VAT, receipt, subscription,"
          .. " promo code discount / оплата, списание, списали, возврат, счёт, чек, НДС, подписка.",
        "delivery: parcel, package, shipping, courier, tracking, late, delivery address,"
          .. " wrong item, missing item, damaged box / доставка, посылка, курьер, трек,"
          .. " пункт выдачи, привёз не тот.",
        "technical: app, Android, iOS, version, update, crash, bug, error 500, logs me out,"
          .. " pairing failed, notifications / приложение, версия, вылетает, ошибка, баг,"
          .. " зависает, не работает, уведомления, синхронизация.",
        "account: login, password, 2FA, two-factor, verification code, email, delete account,"
          .. " hacked / вход, войти, пароль, аккаунт, учётная запись, личный кабинет,"
          .. " двухфакторная, код, удалить.",
        "product_question: question, before I buy, compatible, specs, in stock, available,"
          .. " pickup, warranty, which model, do you ship / подойдёт,"
          .. " подскажите, какой, какая, гарантия, характеристики, в наличии.",
        "complaint: disappointed, terrible, rude, third time, nobody answers, never again /"
          .. " жалоба, отвратительное, нагрубил, опоздал, требую, разобраться, больше не буду.",
        "feature_request: feature request, suggestion, please add, would be great, export /"
          .. " предложение, добавить, было бы здорово, было бы удобно.",
        "other: thanks, praise, polite, great service / спасибо, поблагодарить, вежливый, так держать.",
      }, " "),
    },
    priority = {
      type = "string",
      enum = PRIORITIES,
      description = table.concat({
        "How fast support must act. Urgent when the customer says so or when money or"
          .. " account security is at risk right now. High when the customer is blocked or is"
          .. " owed money. Medium for ordinary problems. Low for questions and ideas and thanks."
          .. " Cue words per priority:",
        "urgent: urgent, ASAP, immediately, tomorrow, deadline, hacked /"
          .. " срочно, немедленно, до пятницы, взлом.",
        "high: charged twice, refund, wrong item, damaged, missing, cannot, locked out,"
          .. " error 500, terrible / дважды, возврат, не тот, не могу, не приходит,"
          .. " не получается, не пускает, ошибка, перепутали, требую.",
        "medium: late parcel, tracking, invoice, documents, logs out / трек, задержка, документы.",
        "low: question, before I buy, in stock, warranty, do you ship, suggestion, idea,"
          .. " feature, feature request, would be great, thanks, minor / вопрос,"
          .. " подскажите, какая, какой, предложение, было бы, спасибо, мелочь.",
      }, " "),
    },
    language = {
      type = "string",
      enum = LANGUAGES,
      description = "Language the customer wrote in. ru: Russian (Cyrillic text)."
        .. " en: English.",
    },
    summary = {
      type = "string",
      description = "One line in English, at most 15 words, saying what the customer needs."
        .. " Include order numbers when given.",
    },
  },
}

local RESPONSE_FORMAT = {
  type = "json_schema",
  json_schema = { name = "ticket_triage", strict = true, schema = SCHEMA },
}

-- Kept short on purpose: the guidance lives in the schema's property
-- descriptions, which the model sees as well.
local SYSTEM_PROMPT = "You triage customer-support tickets for Gadgetory which is an online"
  .. " electronics store. Tickets arrive in Russian or English. Answer only with the JSON"
  .. " object that the schema describes and follow the guidance in each field description."
  .. " Always write the summary in English even when the ticket is in Russian."

local function user_message(t)
  return ("Ticket %s via %s\nSubject: %s\n\n%s"):format(t.id, t.channel, t.subject, t.body)
end

-- Validation ---------------------------------------------------------------

-- Returns the triage table, or nil and why the reply is unusable.
local function validate(reply)
  if type(reply) ~= "table" then return nil, "reply is not a JSON object" end
  for _, field in ipairs({ "category", "priority", "language" }) do
    local v = reply[field]
    if v == nil then return nil, field .. " is missing" end
    if type(v) ~= "string" or not VALID[field][v] then
      return nil, ("%s %s is not allowed"):format(field, type(v) == "string" and ("%q"):format(v) or type(v))
    end
  end
  local s = reply.summary
  if type(s) ~= "string" or not s:find("%S") then return nil, "summary is missing" end
  s = s:gsub("%s+", " "):gsub("^ ", ""):gsub(" $", "")
  return { category = reply.category, priority = reply.priority, language = reply.language, summary = s }
end

-- The job ------------------------------------------------------------------

local function getenv_nonempty(name)
  local v = os.getenv(name)
  if v and v ~= "" then return v end
end

local function choose_backend()
  local key = getenv_nonempty("SLM_API_KEY") or getenv_nonempty("OPENAI_API_KEY")
  local base = getenv_nonempty("SLM_BASE_URL")
  local model = getenv_nonempty("SLM_MODEL") or "gpt-4o-mini"
  if key or base then
    base = base or getenv_nonempty("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    print(("ticket_triage: using %s (model %s)"):format(base, model))
    io.stdout:flush()
    return { base_url = base, api_key = key, model = model }
  end
  local upstream = require "tests.upstream.launch"
  local up = upstream.start { quiet = true }
  print(("ticket_triage: no OPENAI_API_KEY/SLM_BASE_URL set — using the local simulator at %s"):format(up.url))
  io.stdout:flush()
  return { base_url = up.url, api_key = "sk-local-simulator", model = model, upstream = up }
end

local MAX_PROBLEMS_SHOWN = 10

local function fmt_count(n) -- 12345 -> "12,345"
  local s = tostring(math.floor(n))
  local out = s:reverse():gsub("(%d%d%d)", "%1,"):reverse()
  return (out:gsub("^,", ""))
end

local function counts_line(list, counts)
  local parts = {}
  for _, k in ipairs(list) do
    if (counts[k] or 0) > 0 then parts[#parts + 1] = ("%s %d"):format(k, counts[k]) end
  end
  return #parts > 0 and table.concat(parts, ", ") or "-"
end

-- Runs the batch and returns whether every ticket succeeded, plus the
-- report text. The report is printed by the caller after the simulator has
-- been stopped, so a reader that goes away early (`| head`) cannot leave a
-- simulator running behind a SIGPIPE.
local function run_job(backend, tickets_path)
  local report = {}
  local function say(s) report[#report + 1] = (s or "") .. "\n" end
  local slm = require "slm"
  local core = require "slm.core"

  local tickets, read_err = csv.read_file(tickets_path)
  if not tickets then error("cannot read tickets: " .. tostring(read_err), 0) end
  if #tickets == 0 then error("no tickets in " .. tickets_path, 0) end

  local client = slm.client {
    base_url = backend.base_url,
    api_key = backend.api_key,
    model = backend.model,
    max_concurrency = 16,
    timeout = 30,
  }

  say(("ticket_triage: %d tickets from %s"):format(#tickets, tickets_path))
  local started = core.now()

  -- fn returns a result table for every reply that arrived (usable or not,
  -- since an unusable one still cost tokens), and nil, err when no reply did.
  local results, errs = slm.map(tickets, function(t)
    local res, err = client:chat {
      messages = {
        { role = "system", content = SYSTEM_PROMPT },
        { role = "user", content = user_message(t) },
      },
      temperature = 0,
      max_tokens = 200,
      response_format = RESPONSE_FORMAT,
    }
    if not res then return nil, err end
    local out = { res = res }
    if res.refusal then
      out.invalid = "model refused: " .. tostring(res.refusal)
      return out
    end
    local reply, jerr = cjson.decode(res.text or "")
    if reply == nil then
      out.invalid = "reply is not JSON: " .. tostring(jerr)
    else
      out.triage, out.invalid = validate(reply)
    end
    return out
  end, { concurrency = 16, progress = core.isatty(2) })

  local wall = core.now() - started
  errs = errs or {}

  -- Table and totals -------------------------------------------------------
  local rows, problems = {}, {}
  local ok_n, failed_n = 0, 0
  local prompt_tokens, completion_tokens, cost = 0, 0, 0
  -- Replies of the bundled simulator (the one started here, or one started
  -- with `slm sim start` and named by SLM_BASE_URL) carry ids
  -- "chatcmpl-sim-<n>": their token counts are the simulator's 4 bytes per
  -- token, not a real model's, so their cost is only an illustration.
  local simulated = backend.upstream ~= nil
  local by_category, by_priority = {}, {}

  for i, t in ipairs(tickets) do
    local r, e = results and results[i], errs[i]
    local row = { id = t.id }
    if r and r.res then
      local u = r.res.usage or {}
      prompt_tokens = prompt_tokens + (u.prompt_tokens or 0)
      completion_tokens = completion_tokens + (u.completion_tokens or 0)
      cost = cost + (tonumber(r.res.cost) or 0)
      if type(r.res.id) == "string" and r.res.id:find("^chatcmpl%-sim%-") then simulated = true end
    end
    if r and r.triage then
      ok_n = ok_n + 1
      local tr = r.triage
      row.lang, row.category, row.priority, row.summary = tr.language, tr.category, tr.priority, tr.summary
      by_category[tr.category] = (by_category[tr.category] or 0) + 1
      by_priority[tr.priority] = (by_priority[tr.priority] or 0) + 1
    else
      failed_n = failed_n + 1
      local why
      if r and r.invalid then
        row.summary = "invalid reply"
        why = r.invalid
      else
        local kind = type(e) == "table" and e.kind
        row.summary = kind and ("request failed (" .. kind .. ")") or "request failed"
        why = tostring(e or "no result")
      end
      row.lang, row.category, row.priority = "-", "-", "-"
      problems[#problems + 1] = tf.truncate(("  %s: %s"):format(t.id, (why:gsub("%s+", " "):gsub(" $", ""))), 160)
    end
    rows[i] = row
  end

  say()
  report[#report + 1] = tf.render({
    { key = "id", title = "id" },
    { key = "lang", title = "lang" },
    { key = "category", title = "category" },
    { key = "priority", title = "priority" },
    { key = "summary", title = "summary", max = 72 },
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
  say(("tokens:       %s prompt + %s completion = %s"):format(
    fmt_count(prompt_tokens), fmt_count(completion_tokens), fmt_count(prompt_tokens + completion_tokens)))
  local cost_note = ""
  if cost == 0 and prompt_tokens + completion_tokens > 0 and not slm.models[backend.model] then
    cost_note = ("    (no prices known for model %s)"):format(backend.model)
  elseif simulated then
    cost_note = (" (the simulator's token counts at %s's prices, not a real bill)"):format(backend.model)
  end
  say(("cost:         $%.6f%s%s"):format(cost, simulated and " simulated" or "", cost_note))
  say(("wall time:    %.2f s    (%.1f requests/s)"):format(wall, wall > 0 and #tickets / wall or 0))
  say(("by category:  %s"):format(counts_line(CATEGORIES, by_category)))
  say(("by priority:  %s"):format(counts_line(PRIORITIES, by_priority)))

  return failed_n == 0, table.concat(report)
end

-- Main: always stop the simulator, also when the job fails ----------------

local function main(argv)
  if argv[1] == "-h" or argv[1] == "--help" then
    print("usage: lua5.4 examples/ticket_triage.lua [tickets.csv]")
    print("env:   OPENAI_API_KEY / SLM_API_KEY, SLM_BASE_URL, SLM_MODEL (default gpt-4o-mini);")
    print("       with none of the first three set, a local simulator on 127.0.0.1 is used")
    return 0
  end
  local tickets_path = argv[1] or (script_dir .. "/data/tickets.csv")

  local got_backend, backend = pcall(choose_backend)
  if not got_backend then
    io.stderr:write("ticket_triage: cannot start the local simulator: ", tostring(backend), "\n")
    return 1
  end

  local interrupted = false
  local ok, all_ok, report = xpcall(run_job, function(e)
    if type(e) == "string" and e:find("interrupted!$") then -- Ctrl-C
      interrupted = true
      return "interrupted"
    end
    -- our own errors are plain messages; anything else gets a traceback
    if type(e) == "string" and not e:find("^[^\n]-:%d+: ") then return e end
    return debug.traceback(tostring(e), 2)
  end, backend, tickets_path)
  if backend.upstream then
    local stopped, stop_err = pcall(backend.upstream.stop, backend.upstream)
    if not stopped then io.stderr:write("ticket_triage: stopping the simulator: ", tostring(stop_err), "\n") end
  end
  if not ok then
    io.stderr:write("ticket_triage: ", tostring(all_ok), "\n")
    return interrupted and 130 or 1
  end
  io.stdout:write(report)
  return all_ok and 0 or 1
end

os.exit(main(arg or {}))
