-- The business tasks under a hostile user: stores that raise in the middle
-- of a conversation, banned words in every case form, brand options of
-- the wrong types, budgets that run out half-way (what was paid for is
-- kept and reported), chunked tasks failing part-way.  Mostly with a
-- scripted client (no network); the budget cases against the simulator
-- too.  Runs under Lua 5.4 and LuaJIT.
local H = require "tests.helpers"
local slm = require "slm"

local scripted = H.scripted_client -- replies scripted (tests/helpers.lua)

local function budget_error()
  return nil, require("slm.errors").new("budget", "the budget has 0.0000 USD left", { status = 0 })
end

------------------------------------------------------------------ support

describe("slm.support with a store that raises mid-conversation", function()
  local KB = { { id = "faq-1", title = "Delivery", text = "Delivery takes three working days." } }

  -- a memory store whose load / save raise (a closed database, a dropped connection)
  local function raising(what)
    local inner = slm.store.memory()
    local s = {}
    function s:load(id) if what == "load" then error("connection reset by peer") end return inner:load(id) end
    function s:save(id, h) if what == "save" then error("disk I/O error") end return inner:save(id, h) end
    function s:delete(id) if what == "delete" then error("read-only database") end return inner:delete(id) end
    return s, inner
  end

  it("a save that raises: the answer, paid for, is still given, res.error names the store's failure", function()
    local store = raising("save")
    local c = scripted{ "Delivery takes three working days [faq-1]." }
    local bot = slm.support.new{ client = c, store = store, knowledge = KB }
    local ok, res = pcall(bot.reply, bot, "s-1", "How long does delivery take?")
    assert.is_true(ok, tostring(res))
    assert.equal("Delivery takes three working days [faq-1].", res.text)
    assert.same({ { id = "faq-1", title = "Delivery" } }, res.sources)
    assert.matches("^slm%.store: cannot save: .*disk I/O error", tostring(res.error))
    assert.equal(120, res.usage.total_tokens)
    assert.equal(1, #c.calls)
  end)

  it("a load that raises: handed over with the store's error, nothing sent, nothing raised", function()
    local store = raising("load")
    local c = scripted{ "should not be sent" }
    local bot = slm.support.new{ client = c, store = store, knowledge = KB }
    local ok, res = pcall(bot.reply, bot, "s-2", "Where is my parcel?")
    assert.is_true(ok, tostring(res))
    assert.equal("error", res.escalate.reason)
    assert.equal(slm.support.HANDOFF.en, res.text)
    assert.matches("^slm%.store: cannot load: .*connection reset by peer", tostring(res.error))
    assert.equal(0, #c.calls)
    -- bot:history and bot:reset say so as nil, err too
    local h, herr = bot:history("s-2")
    assert.is_nil(h)
    assert.matches("connection reset by peer", herr)
    local d, derr = slm.support.new{ client = c, store = raising("delete") }:reset("s-2")
    assert.is_nil(d)
    assert.matches("^slm%.store: cannot delete: .*read%-only database", derr)
  end)
end)

------------------------------------------------------------------ banned words

describe("banned words in every case form", function()
  local common = require "slm.tasks.common"
  local CASES = {
    { "GÜNSTIG", "günstig" }, { "ÉLÉGANT", "élégant" }, { "ŁATWY", "łatwy" }, { "ŽLUŤOUČKÝ", "žluťoučký" },
    { "ЇЖАК", "їжак" }, { "ҐАНОК", "ґанок" }, { "ΦΘΗΝΟ", "φθηνο" }, { "ДЁШЕВО", "дешево" }, { "Cheap", "cheap" },
  }

  it("are found whatever the case, in Latin-1, Latin Extended, Greek and Cyrillic", function()
    for _, p in ipairs(CASES) do
      assert.same({ p[2] }, common.find_words("Only " .. p[1] .. " today!", { p[2] }), p[1])
      assert.same({ p[1] }, common.find_words("only " .. p[2] .. " today", { p[1] }), p[2])
    end
    -- still whole words only: a banned word inside a longer word is not one
    assert.same({}, common.find_words("ÜBERGÜNSTIGES Angebot", { "günstig" }))
    assert.same({}, common.find_words("ΦΘΗΝΟΤΕΡΟ", { "φθηνο" }))
  end)

  it("slm.generate regenerates a reply with a banned word in capitals and flags it when it stays", function()
    local c = scripted{ "Ein GÜNSTIGER Preis und GÜNSTIG obendrein." }
    local res = assert(slm.generate{ client = c, template = "Beschreibe den Wasserkocher",
      brand = { banned = { "günstig" } } })
    assert.is_true(res.regenerated)
    assert.equal(2, #c.calls)
    assert.same({ banned = { "günstig" } }, res.flags)
  end)
end)

------------------------------------------------------------------ generate

describe("slm.generate under a budget that runs out before the regeneration", function()
  it("keeps the text already paid for, flagged, with res.error the budget's failure (scripted)", function()
    local c = scripted{ "Our cheap kettle boils fast.", budget_error }
    local res, err = slm.generate{ client = c, template = "Describe the kettle", brand = { banned = { "cheap" } } }
    assert.is_nil(err)
    assert.equal("Our cheap kettle boils fast.", res.text)
    assert.same({ banned = { "cheap" } }, res.flags)
    assert.is_false(res.regenerated)
    assert.equal("budget", res.error.kind)
    assert.equal(120, res.usage.total_tokens)
    assert.equal(1, res.calls - 1) -- the refused call is counted, nothing billed for it
  end)

  it("n > 1: every text is kept when the regeneration fails", function()
    local c = scripted{ function(req)
      return { text = "A cheap one", finish_reason = "stop", usage = { prompt_tokens = 10, completion_tokens = 10,
        total_tokens = 20 }, cost = 0.00001, attempts = 1, tool_calls = {}, model = "gpt-4o-mini",
        choices = { { text = "A cheap one", finish_reason = "stop" }, { text = "A fine one", finish_reason = "stop" } } }
    end, budget_error }
    local texts, res = slm.generate("Describe it", {}, { client = c, n = 2, brand = { banned = { "cheap" } } })
    assert.same({ "A cheap one", "A fine one" }, texts)
    assert.same({ banned = { "cheap" } }, res.flags[1])
    assert.is_nil(res.flags[2])
    assert.equal("budget", res.error.kind)
  end)

  describe("against the simulator", function()
    local up
    setup(function() up = H.upstream() end)
    teardown(function() if up then up:stop() end end)

    it("a budget with room for one call only: the first text is returned, the spend is within the budget", function()
      local b = slm.budget{ tokens = 200 }
      local c = H.task_client(up, { budget = b }, "banned=revolutionary")
      local res, err = slm.generate{ client = c, template = "Describe a kettle that boils water in two minutes",
        brand = { banned = { "revolutionary" } }, max_words = 40 }
      assert.is_nil(err, tostring(err))
      assert.truthy(res.text:lower():find("revolutionary", 1, true), res.text)
      assert.same({ "revolutionary" }, res.flags.banned)
      assert.equal("budget", res.error.kind)
      local _, tokens = b:spent()
      assert.equal(tokens, res.usage.total_tokens)
      assert.is_true(tokens <= 200)
      assert.equal(1, #res.requests)
    end)
  end)
end)

describe("slm.generate's brand of the wrong types", function()
  local c = scripted{ "x" }
  local CASES = {
    { { banned = { 42 } }, "brand%.banned must be a list of strings; its entry 1 is a number" },
    { { banned = { "ok", {} } }, "brand%.banned must be a list of strings; its entry 2 is a table" },
    { { banned = 5 }, "brand%.banned must be a string or a list of strings, got number" },
    { { dont = true }, "brand%.dont must be a string or a list of strings, got boolean" },
    { { name = {} }, "brand%.name must be a string, got table" },
    { { tone = function() end }, "brand%.tone must be a string, got function" },
  }
  it("raise naming the field, in every form, before anything is sent", function()
    for _, case in ipairs(CASES) do
      local ok, e = pcall(slm.generate, { client = c, template = "t", brand = case[1] })
      assert.is_false(ok)
      assert.matches("^[^\n]*slm%.generate: " .. case[2], e)
      ok, e = pcall(slm.generate, "t", {}, { client = c, brand = case[1] })
      assert.matches("slm%.generate: " .. case[2], e)
      ok, e = pcall(slm.generate.request, { client = c, template = "t", brand = case[1] })
      assert.matches("slm%.generate: " .. case[2], e)
    end
    assert.equal(0, #c.calls)
    -- a brand's own other fields (a tagline table) and a single string are fine
    assert(slm.generate{ client = c, template = "t", brand = { banned = "cheap", tagline = { en = "x" } } })
  end)
end)

------------------------------------------------------------------ chunked tasks failing part-way

describe("chunked tasks whose budget runs out part-way", function()
  local SCHEMA = { type = "object", additionalProperties = false, required = { "items" },
    properties = { vendor = { type = "string" }, items = { type = "array", items = { type = "object",
      required = { "sku" }, additionalProperties = false, properties = { sku = { type = "string" },
        qty = { type = "integer" } } } } } }
  local DOC = {}
  for i = 1, 60 do DOC[#DOC + 1] = ("Line %d: item SKU-%03d, quantity %d, delivered to the Riga warehouse."):format(i, i, i) end
  DOC = table.concat(DOC, "\n")

  it("slm.extract: the data of the chunks done is kept in err.data, their numbers in err.chunks_done", function()
    local c = scripted{ '{"vendor": "Acme", "items": [{"sku": "SKU-001", "qty": 1}]}',
      '{"items": [{"sku": "SKU-030", "qty": 30}]}', budget_error }
    local res, err = slm.extract{ client = c, document = DOC, schema = SCHEMA, chunk_tokens = 300, overlap = 0,
      concurrency = 1, key = "sku" }
    assert.is_nil(res)
    assert.equal("budget", err.kind)
    assert.equal(3, err.chunk)
    assert.same({ 1, 2 }, err.chunks_done)
    assert.same({ vendor = "Acme", items = { { sku = "SKU-001", qty = 1 }, { sku = "SKU-030", qty = 30 } } }, err.data)
    assert.equal(240, err.usage.total_tokens)
    assert.equal(3, #c.calls) -- the chunks after the failure were not sent
  end)

  it("slm.extract with mask_pii: err.data comes back unmasked", function()
    local c = scripted{ function(req)
      local ph = req.messages[#req.messages].content:match("%[EMAIL_%d+%]")
      return { text = '{"vendor": "' .. tostring(ph) .. '", "items": []}', finish_reason = "stop",
        usage = { prompt_tokens = 1, completion_tokens = 1, total_tokens = 2 }, cost = 0, attempts = 1,
        tool_calls = {}, model = "gpt-4o-mini", choices = {} }
    end, budget_error }
    local doc = "Vendor contact: anna.k@example.org.\n" .. DOC
    local _, err = slm.extract{ client = c, document = doc, schema = SCHEMA, chunk_tokens = 300, overlap = 0,
      concurrency = 1, mask_pii = true }
    assert.equal("budget", err.kind)
    assert.equal("anna.k@example.org", err.data.vendor)
  end)

  it("slm.summarize: err.level and err.part say which call of which level failed", function()
    local chunks = #require("slm.tokenizer").get("o200k_base"):chunks(DOC, 300, 0)
    assert.is_true(chunks >= 3, tostring(chunks))
    -- fail_at: the call the budget runs out at
    local function run(fail_at)
      local n = 0
      local c = scripted{ function()
        n = n + 1
        if n == fail_at then return budget_error() end
        return { text = ("Summary %d: the warehouse in Riga received items."):format(n), finish_reason = "stop",
          usage = { prompt_tokens = 50, completion_tokens = 10, total_tokens = 60 }, cost = 0.00001, attempts = 1,
          tool_calls = {}, model = "gpt-4o-mini", choices = {} }
      end }
      return slm.summarize{ client = c, document = DOC, max_words = 30, chunk_tokens = 300, overlap = 0,
        concurrency = 1 }
    end
    -- the last chunk's call: level 1, its number
    local res, err = run(chunks)
    assert.is_nil(res)
    assert.equal("budget", err.kind)
    assert.equal(1, err.level)
    assert.equal(chunks, err.part)
    assert.equal((chunks - 1) * 60, err.usage.total_tokens)
    -- the final reduction (the summaries fit one group): level 2, call 1
    res, err = run(chunks + 1)
    assert.is_nil(res)
    assert.equal(2, err.level)
    assert.equal(1, err.part)
    assert.equal(chunks * 60, err.usage.total_tokens)
  end)
end)

------------------------------------------------------------------ support: a history without end

describe("slm.support over a conversation that never ends", function()
  local function answering(model)
    return scripted({ "Your parcel is on its way; it usually takes three working days to arrive at your door." }, model)
  end
  local Q = "Where is my parcel? I ordered it on Monday and it has still not arrived, please check it."

  it("history_tokens bounds what each turn sends, for a known model and for one slm.models does not know", function()
    for _, model in ipairs{ "gpt-4o-mini", "acme/unknown-model-7b" } do
      local c = answering(model)
      local bot = slm.support.new{ client = c, knowledge = {}, max_failures = 1000, history_tokens = 300 }
      for i = 1, 60 do bot:reply("s", Q .. " #" .. i) end
      local last = c.calls[#c.calls]
      local sys_tokens = slm.count({ messages = { last.messages[1] } }, "gpt-4o-mini")
      local all = slm.count({ messages = last.messages }, "gpt-4o-mini")
      assert.is_true(all - sys_tokens <= 300, model .. ": " .. tostring(all - sys_tokens))
      assert.is_true(#last.messages >= 4, model) -- some history still goes
      assert.equal(Q .. " #60", last.messages[#last.messages].content)
      assert.equal("user", last.messages[2].role)
      assert.equal(120, #bot:history("s")) -- the store keeps it all (max_history not given)
    end
  end)

  it("max_history bounds the stored history, whole turns from a customer's message", function()
    local c = answering()
    local bot = slm.support.new{ client = c, knowledge = {}, max_failures = 1000, max_history = 9 }
    for i = 1, 40 do bot:reply("s", Q .. " #" .. i) end
    local h = bot:history("s")
    assert.is_true(#h <= 9, tostring(#h))
    assert.equal("user", h[1].role)
    assert.equal(Q .. " #40", h[#h - 1].content)
    -- a handover (three messages) is kept whole
    local esc = scripted{ { text = "", tool_calls = { { id = "call_1", type = "function",
      ["function"] = { name = "escalate_to_human", arguments = '{"reason":"user_request","category":"other","summary":"x"}' } } } } }
    bot = slm.support.new{ client = esc, knowledge = {}, max_history = 2 }
    bot:reply("s2", "I want a human")
    h = bot:history("s2")
    assert.equal(4, #h)
    assert.equal("user", h[1].role)
    assert.equal("tool", h[3].role)
  end)

  it("options of the wrong types raise naming them", function()
    assert.has_error(function() slm.support.new{ history_tokens = 0 } end,
      "slm.support.new: option 'history_tokens' must be a positive integer (tokens of history sent with a turn), got number")
    assert.has_error(function() slm.support.new{ max_history = 1 } end,
      "slm.support.new: option 'max_history' must be an integer of at least 2 (messages kept in the store), got number")
  end)
end)

------------------------------------------------------------------ support: two turns at the same moment

describe("slm.support with two turns of one session at the same moment", function()
  local KB = { { id = "faq-1", title = "Delivery", text = "Delivery takes three working days." } }
  local function answer(text)
    return { text = text, finish_reason = "stop", usage = { prompt_tokens = 10, completion_tokens = 5, total_tokens = 15 },
      cost = 0, attempts = 1, tool_calls = {}, model = "gpt-4o-mini", choices = {} }
  end
  -- a client whose first call (turn A's) runs turn B of the same session
  -- from start to end while A waits for its answer: B loads, answers and
  -- saves between A's load and A's save, as a second tab would
  local function overlapping(bot_ref, session)
    return scripted{ function(req)
      if req.messages[#req.messages].content:find("^Question A") then
        bot_ref.res_b = bot_ref.bot:reply(session, "Question B: do you deliver on Sundays?")
        return answer("Answer A: three working days [faq-1].")
      end
      if req.messages[#req.messages].content:find("^Question B") then
        return answer("Answer B: no Sunday deliveries [faq-1].")
      end
      return answer("Hello! Delivery takes three working days [faq-1].")
    end }
  end
  local contents = H.contents

  local function both_kept(store)
    local ref = {}
    local c = overlapping(ref, "s-2tabs")
    ref.bot = slm.support.new{ client = c, store = store, knowledge = KB, max_failures = 100 }
    local bot = ref.bot
    assert(bot:reply("s-2tabs", "Hello, a question first"))
    local res_a = bot:reply("s-2tabs", "Question A: how long does delivery take?")
    assert.is_nil(res_a.error, tostring(res_a.error))
    assert.is_nil(ref.res_b.error, tostring(ref.res_b.error))
    assert.equal("Answer A: three working days [faq-1].", res_a.text)
    assert.equal("Answer B: no Sunday deliveries [faq-1].", ref.res_b.text)
    -- both turns, each whole and in order; B saved first, so it comes first
    assert.same({
      "user:Hello, a question first", "assistant:Hello! Delivery takes three working days [faq-1].",
      "user:Question B: do you deliver on Sundays?", "assistant:Answer B: no Sunday deliveries [faq-1].",
      "user:Question A: how long does delivery take?", "assistant:Answer A: three working days [faq-1].",
    }, contents(assert(bot:history("s-2tabs"))))
  end

  it("with the memory store: both turns' questions and answers are in the history", function()
    both_kept(slm.store.memory())
  end)

  it("with the file store: both turns' questions and answers are in the history", function()
    local dir = os.tmpname()
    os.remove(dir)
    assert(os.execute("mkdir -p " .. H.q(dir)))
    local store = assert(slm.store.file{ dir = dir })
    local ok, e = pcall(both_kept, store)
    os.execute("rm -rf " .. H.q(dir))
    assert(ok, e)
  end)

  it("max_history: trimmed from a customer's message, each turn whole, the later one always kept", function()
    local ref = {}
    local esc = { text = "", finish_reason = "tool_calls", usage = { prompt_tokens = 1, completion_tokens = 1,
      total_tokens = 2 }, cost = 0, attempts = 1, model = "gpt-4o-mini", choices = {},
      tool_calls = { { id = "call_a", type = "function", ["function"] = { name = "escalate_to_human",
        arguments = '{"reason":"complaint","category":"delivery","summary":"late parcel"}' } } } }
    local n = 0
    local c = scripted{ function()
      n = n + 1
      if n == 3 then -- turn A (a handover: four messages) waits; turn B runs whole meanwhile
        ref.res_b = ref.bot:reply("s-mh", "Question B")
        return esc
      end
      return answer(n == 4 and "Answer B [faq-1]." or ("Answer " .. n .. " [faq-1]."))
    end }
    ref.bot = slm.support.new{ client = c, knowledge = KB, max_history = 6 }
    ref.bot:reply("s-mh", "Question 1")
    ref.bot:reply("s-mh", "Question 2")
    local res_a = ref.bot:reply("s-mh", "Question A: my parcel is late again")
    assert.equal("complaint", res_a.escalate.reason)
    assert.is_nil(res_a.error)
    local h = assert(ref.bot:history("s-mh"))
    assert.same({ "user:Question B", "assistant:Answer B [faq-1].", "user:Question A: my parcel is late again",
      "assistant:nil", "tool:handed over to a human agent", "assistant:" .. slm.support.HANDOFF.en }, contents(h))
    assert.equal("call_a", h[4].tool_calls[1].id)
    assert.equal("call_a", h[5].tool_call_id)
  end)

  it("a store whose load fails at the re-read before saving: the answer stands, res.error says so, nothing raised",
    function()
    for _, how in ipairs{ "returns", "raises" } do
      local inner = slm.store.memory()
      local loads = 0
      local store = {}
      function store:load(id)
        loads = loads + 1
        if loads == 2 then
          if how == "raises" then error("connection reset by peer") end
          return nil, "slm.store: redis store: cannot load: connection reset by peer"
        end
        return inner:load(id)
      end
      function store:save(id, h) return inner:save(id, h) end
      function store:delete(id) return inner:delete(id) end
      assert(inner:save("s-re", { { role = "user", content = "earlier" }, { role = "assistant", content = "ok" } }))
      local c = scripted{ "Delivery takes three working days [faq-1]." }
      local bot = slm.support.new{ client = c, store = store, knowledge = KB }
      local ok, res = pcall(bot.reply, bot, "s-re", "How long does delivery take?")
      assert.is_true(ok, tostring(res))
      assert.equal("Delivery takes three working days [faq-1].", res.text, how)
      assert.same({ { id = "faq-1", title = "Delivery" } }, res.sources)
      assert.is_nil(res.escalate)
      assert.matches("^slm%.store: .*cannot load: .*connection reset by peer %(reading the history again before "
        .. "saving: this turn was not saved%)$", tostring(res.error))
      assert.equal(120, res.usage.total_tokens) -- the turn, paid for, is reported
      -- what could not be read is not overwritten
      assert.same({ "user:earlier", "assistant:ok" }, contents(assert(inner:load("s-re"))))
    end
  end)

  describe("against the simulator (two tasks of the curl scheduler)", function()
    local up
    setup(function() up = H.upstream() end)
    teardown(function() if up then up:stop() end end)

    it("two replies of one session in flight at once: both turns are kept", function()
      local c = H.task_client(up, { timeout = 10 }, "delay=300")
      local bot = slm.support.new{ client = c, knowledge = KB, max_failures = 100 }
      local r1, r2
      slm.run(function()
        local t1 = slm.spawn(function() return bot:reply("s-sim", "First tab: how long does delivery take?") end)
        local t2 = slm.spawn(function() return bot:reply("s-sim", "Second tab: and how long does delivery take?") end)
        r1, r2 = t1:wait(), t2:wait()
      end)
      assert.is_nil(r1.error, tostring(r1.error))
      assert.is_nil(r2.error, tostring(r2.error))
      local h = assert(bot:history("s-sim"))
      assert.equal(4, #h)
      local asked = {}
      for i = 1, 4, 2 do
        assert.equal("user", h[i].role)
        assert.equal("assistant", h[i + 1].role)
        asked[h[i].content] = h[i + 1].content
      end
      assert.equal(r1.text, asked["First tab: how long does delivery take?"])
      assert.equal(r2.text, asked["Second tab: and how long does delivery take?"])
    end)
  end)
end)

------------------------------------------------------------------ extract: chunks too small

describe("slm.extract with a chunk_tokens too small to be useful", function()
  local SCHEMA = { type = "object", properties = { order = { type = "string" } } }
  local DOC = ("Order 123 was shipped to the Riga warehouse on Monday. "):rep(40)

  it("raises naming the option and the minimum, before anything is sent", function()
    local c = scripted{ '{"order": "123"}' }
    for _, n in ipairs{ 1, 10, 99 } do
      local ok, e = pcall(slm.extract, { client = c, document = DOC, schema = SCHEMA, chunk_tokens = n })
      assert.is_false(ok)
      assert.matches("slm%.extract: option 'chunk_tokens' must be an integer of at least 100 %(tokens of the "
        .. "document per request", e)
      ok, e = pcall(slm.extract, DOC, SCHEMA, { client = c, chunk_tokens = n, overlap = 0 })
      assert.matches("option 'chunk_tokens' must be an integer of at least 100", e)
    end
    assert.equal(0, #c.calls)
    -- the minimum itself is taken
    local res = assert(slm.extract{ client = c, document = DOC, schema = SCHEMA, chunk_tokens = 100, overlap = 0 })
    assert.equal("123", res.data.order)
    assert.is_true(res.chunks > 1)
    assert.equal(res.chunks, #c.calls)
  end)
end)

describe("slm.summarize with a chunk_tokens too small to be useful", function()
  it("raises naming the option and the minimum, before anything is sent", function()
    local c = scripted{ "A short summary." }
    local doc = ("The warehouse in Riga ships parcels every working day. "):rep(40)
    for _, n in ipairs{ 1, 99 } do
      local ok, e = pcall(slm.summarize, { client = c, document = doc, chunk_tokens = n })
      assert.is_false(ok)
      assert.matches("slm%.summarize: option 'chunk_tokens' must be an integer of at least 100", e)
    end
    assert.equal(0, #c.calls)
  end)
end)

describe("a task's local image that is not a regular file", function()
  it("is refused unread (a FIFO, a device, a directory), never blocking or reading for ever", function()
    local dir = H.tmpdir()
    assert(H.sh("mkfifo " .. H.q(dir .. "/pipe.png")))
    -- in a child under `timeout 10`: a read that blocks fails the spec
    -- (no "done") instead of hanging the suite
    local out = H.run_lua(([[
      local common = require "slm.tasks.common"
      for _, p in ipairs{ %q, "/dev/zero", %q } do
        local parts, err = common.image_parts({ p }, "classify")
        print(parts and "read" or (err.kind .. ": " .. err.message))
      end
      print("done")
    ]]):format(dir .. "/pipe.png", dir), "timeout 10")
    os.execute("rm -rf " .. H.q(dir))
    assert.matches("done", out)
    assert.matches("invalid_request: images%[1%]: [^\n]*/pipe%.png: a fifo, not a regular file: not read", out)
    assert.matches("invalid_request: images%[1%]: /dev/zero: a character device, not a regular file", out)
    assert.matches("invalid_request: images%[1%]: [^\n]*: a directory, not a regular file", out)
  end)

  it("larger than a request can carry is refused before it is read", function()
    local common = require "slm.tasks.common"
    local path = H.write_tmp(("x"):rep(2000))
    local keep = common.MAX_IMAGE_BYTES
    common.MAX_IMAGE_BYTES = 1000
    local parts, err = common.image_parts({ path }, "classify")
    common.MAX_IMAGE_BYTES = keep
    os.remove(path)
    assert.is_nil(parts)
    assert.equal("invalid_request", err.kind)
    assert.matches("2000 bytes, more than the 1000 taken: not read", err.message)
  end)
end)
