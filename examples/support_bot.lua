#!/usr/bin/env lua5.4
-- examples/support_bot.lua: Voltamart's first-line support bot. It answers
-- customers from the shop's FAQ and its returns & warranty policy, citing
-- the entries it used, and hands the conversation over to a person (with a
-- summary for the agent) when the customer asks for one, when the
-- knowledge has no answer twice in a row, or when the model cannot be
-- reached. Conversations are kept in SQLite, so a session can go on in
-- another process (or after a restart).
--
--   lua5.4 examples/support_bot.lua                  # two scripted conversations, Russian and English
--   lua5.4 examples/support_bot.lua --interactive    # your messages from stdin, one a line
--
-- Interactive: each line is the customer's next message in one session;
-- the reply streams as it arrives; "/reset" starts the session again,
-- "/history" prints it, an empty line or end of input ends.
--
-- Data: examples/data/kb/faq.jsonl (55 FAQ entries, ru/en, with a planted
-- prompt injection that the bot quotes as data) and kb/policies.md (cut
-- into passages). Card numbers, e-mail addresses and phone numbers are
-- masked before a message leaves for the model (slm.pii) and put back in
-- what comes back. Sessions go to a temporary SQLite database (Debian's
-- lua-sql-sqlite3; without it, a temporary directory of session files),
-- removed at the end.
--
-- Backend: with OPENAI_API_KEY, SLM_API_KEY or SLM_BASE_URL set it talks to
-- that endpoint (model SLM_MODEL, default gpt-4o-mini); with none of them it
-- starts the local simulator from tests/upstream on 127.0.0.1 and stops it
-- at the end (its "model" quotes the best-matching passage: the answers
-- show the bot's plumbing, not a real model's writing).
--
-- Exit status: 0 when every turn got a reply without an error, 1 otherwise
-- (130 on Ctrl-C).

-- run from a checkout without installing anything
local repo_root = ((arg and arg[0] or ""):match("^(.*)[/\\]") or ".") .. "/.."
package.path = repo_root .. "/?.lua;" .. repo_root .. "/lua/?.lua;" .. repo_root .. "/lua/?/init.lua;" .. package.path
package.cpath = repo_root .. "/build/?.so;" .. package.cpath

local backend = require "examples.lib.backend"
local fmt_count = backend.fmt_count

-- What the bot is told -----------------------------------------------------

local SYSTEM = "You are the support assistant of Voltamart, an online shop of home electronics with stores "
  .. "in Russia (voltamart.ru, prices in roubles) and the EU (voltamart.eu, prices in euros). "
  .. "Be brief and friendly; never promise what the passages do not say."

local CATEGORIES = { "billing", "delivery", "technical", "account", "product_question", "complaint",
  "feature_request", "cancellation", "other" }

local HANDOFF = {
  ru = "Передаю ваш вопрос коллеге из службы поддержки: он ответит здесь же в течение 15 минут "
    .. "(ежедневно с 08:00 до 22:00 по Москве).",
  en = "I'm passing this to a colleague from our support team, who will reply here within 15 minutes "
    .. "(Monday to Saturday, 09:00-19:00 Riga time).",
}

-- Two customers, one session each.
local SCRIPT = {
  { session = "ru-olga", text = "Здравствуйте! Сколько я заплачу за доставку по Москве?" },
  { session = "en-mark", text = "Hi, when is my money refunded after a return?" },
  { session = "ru-olga", text = "А как отменить подписку Plus?" },
  { session = "en-mark", text = "Any tips for getting more out of Plus?" },
  { session = "ru-olga",
    text = "Позовите оператора: с карты 4276 3801 2345 6787 дважды списали деньги за заказ VM-4817235, "
      .. "мой телефон +7 912 345-67-89" },
  { session = "en-mark", text = "What's the weather like on Mars?" },
  { session = "en-mark", text = "And on Venus, then?" },
}

-- Report helpers -------------------------------------------------------------

local function one_line(s)
  return ((s or ""):gsub("%s+", " "):gsub("^ ", ""):gsub(" $", ""))
end

local function sources_line(res)
  local out = {}
  for _, s in ipairs(res.sources) do
    out[#out + 1] = s.title and ("%s (%s)"):format(s.id, s.title) or s.id
  end
  return table.concat(out, "; ")
end

-- The session store: SQLite in a temporary file, else a temporary directory of files.
local function open_store(slm)
  local path = os.tmpname()
  local store, err = slm.store.sqlite{ path = path }
  if store then
    return store, "SQLite " .. path, function()
      store:close()
      for _, p in ipairs{ path, path .. "-wal", path .. "-shm" } do os.remove(p) end
    end, function() return assert(slm.store.sqlite{ path = path }) end
  end
  os.remove(path)
  local p = assert(io.popen("mktemp -d"))
  local dir = p:read("l")
  p:close()
  store = assert(slm.store.file{ dir = dir })
  return store, ("session files in %s (no SQLite: %s)"):format(dir, err), function()
    os.execute("rm -rf '" .. dir:gsub("'", "'\\''") .. "'")
  end, function() return assert(slm.store.file{ dir = dir }) end
end

-- The job ------------------------------------------------------------------

local function run_job(b, argv)
  local interactive = argv[1] == "--interactive"
  if argv[1] and not interactive then error("unknown argument " .. argv[1] .. " (try --help)", 0) end
  local slm = require "slm"
  local report = {}
  local function say(s) report[#report + 1] = (s or "") .. "\n" end

  local knowledge = backend.read_jsonl(repo_root .. "/examples/data/kb/faq.jsonl")
  knowledge[#knowledge + 1] = { id = "policy", title = "Returns, Refunds and Warranty Policy",
    text = backend.read_file(repo_root .. "/examples/data/kb/policies.md") }

  local client = slm.client { base_url = b.base_url, api_key = b.api_key, model = b.model, timeout = 30 }
  local store, where, remove_store, reopen = open_store(slm)
  local bot = slm.support.new {
    client = client, system = SYSTEM, knowledge = knowledge, categories = CATEGORIES,
    handoff = HANDOFF, mask_pii = true, store = store, max_failures = 2,
  }

  local totals = { turns = 0, sourced = 0, handovers = 0, errors = 0, prompt = 0, completion = 0, cost = 0, why = {} }
  local function count(res)
    totals.turns = totals.turns + 1
    totals.prompt = totals.prompt + res.usage.prompt_tokens
    totals.completion = totals.completion + res.usage.completion_tokens
    totals.cost = totals.cost + (res.cost or 0)
    if res.sources[1] then totals.sourced = totals.sourced + 1 end
    if res.escalate then
      totals.handovers = totals.handovers + 1
      totals.why[res.escalate.reason] = (totals.why[res.escalate.reason] or 0) + 1
    end
    if res.error then totals.errors = totals.errors + 1 end
  end
  -- what follows a reply: sources, a handover, what the turn cost
  local function details(res, out)
    local pad = "            "
    if res.sources[1] then out(pad .. "sources:  " .. sources_line(res)) end
    if res.escalate then
      local e = res.escalate
      out(pad .. ("handover: %s%s"):format(e.reason, e.category and (", category " .. e.category) or ""))
      out(pad .. "summary:  " .. one_line(e.summary))
    end
    if res.error then out(pad .. "error:    " .. one_line(tostring(res.error))) end
    out(pad .. ("tokens:   %s prompt + %s completion, $%.6f%s"):format(fmt_count(res.usage.prompt_tokens),
      fmt_count(res.usage.completion_tokens), res.cost or 0, b.simulated and " simulated" or ""))
  end

  local ok, job_err = pcall(function()
    if interactive then
      local id = "interactive"
      local tty = require("slm.core").isatty(0)
      io.write(("support_bot: type a message (ru or en) and press Enter; /reset, /history; sessions in %s\n")
        :format(where))
      while true do
        if tty then io.write("you> ") io.flush() end
        local line = io.read("l")
        if not line or line == "" then break end
        if line == "/reset" then
          bot:reset(id)
          io.write("(session reset)\n")
        elseif line == "/history" then
          for _, m in ipairs(assert(bot:history(id))) do
            io.write(("  %-9s %s\n"):format(m.role, m.tool_calls and "(escalate_to_human)" or one_line(m.content)))
          end
        else
          io.write("bot> ")
          local res = bot:reply(id, line, { on_delta = function(t) io.write(t) io.flush() end })
          io.write("\n")
          count(res)
          details(res, function(s) io.write(s, "\n") end)
        end
      end
      say()
    else
      say(("support_bot: %d knowledge entries (FAQ + the returns policy), sessions in %s"):format(#knowledge, where))
      for _, turn in ipairs(SCRIPT) do
        local res = bot:reply(turn.session, turn.text)
        count(res)
        say()
        say(("[%s] customer: %s"):format(turn.session, turn.text))
        say(("[%s] bot:      %s"):format(turn.session, one_line(res.text)))
        details(res, say)
      end
      -- the sessions are in the store: a bot over a store opened anew (another
      -- process, a restart) carries on where these left off
      local later = slm.support.new { client = client, knowledge = knowledge, store = reopen() }
      say()
      local lines = {}
      for _, id in ipairs{ "ru-olga", "en-mark" } do
        lines[#lines + 1] = ("%s %d messages"):format(id, #assert(later:history(id)))
      end
      say(("sessions:     %s (reopened: %s)"):format(where, table.concat(lines, ", ")))
      later.store:close()
    end
  end)
  remove_store()
  if not ok then error(job_err, 0) end

  local why = {}
  for _, r in ipairs{ "user_request", "cannot_answer", "complaint", "sensitive", "repeated_failures", "error" } do
    if totals.why[r] then why[#why + 1] = ("%s %d"):format(r, totals.why[r]) end
  end
  say(("turns:        %d, %d answered with sources, %d handed over%s"):format(totals.turns, totals.sourced,
    totals.handovers, #why > 0 and (" (" .. table.concat(why, ", ") .. ")") or ""))
  say(("tokens:       %s prompt + %s completion = %s"):format(fmt_count(totals.prompt), fmt_count(totals.completion),
    fmt_count(totals.prompt + totals.completion)))
  say(backend.cost_line(b, totals.cost, totals.prompt + totals.completion))
  return totals.errors == 0, table.concat(report)
end

os.exit(backend.main("support_bot", {
  "usage: lua5.4 examples/support_bot.lua [--interactive]",
  "       without --interactive: two scripted conversations (ru, en); with it: your messages from stdin",
}, run_job, arg))
