-- slm.support's history under a hostile reviewer: a session reset while a
-- turn is in flight (its messages must not come back, nor join the
-- conversation started after the reset), stored histories of another
-- shape (a clear error, nothing sent, nothing overwritten), the ids of
-- handover tool calls (unique in a history, each result after its own
-- call) and overlapping turns in every store (memory, file, SQLite,
-- Redis).  A scripted client (no network); Redis through
-- tests/redis_launch.lua when redis-server is installed.  Runs under Lua
-- 5.4 and LuaJIT.
local H = require "tests.helpers"
local slm = require "slm"

local scripted = H.scripted_client -- replies scripted (tests/helpers.lua)
local KB = { { id = "faq-1", title = "Delivery", text = "Delivery takes three working days." } }
local HANDOFF = slm.support.HANDOFF

local function answer(text)
  return { text = text, finish_reason = "stop", usage = { prompt_tokens = 10, completion_tokens = 5, total_tokens = 15 },
    cost = 0, attempts = 1, tool_calls = {}, model = "gpt-4o-mini", choices = {} }
end

-- a handover by the tool; id nil: a provider that sends calls without ids
local function escalation(id)
  return { text = "", finish_reason = "tool_calls", usage = { prompt_tokens = 1, completion_tokens = 1, total_tokens = 2 },
    cost = 0, attempts = 1, model = "gpt-4o-mini", choices = {},
    tool_calls = { { id = id, type = "function", ["function"] = { name = "escalate_to_human",
      arguments = '{"reason":"complaint","category":"delivery","summary":"late parcel"}' } } } }
end

local contents = H.contents

local function last_user(req) return req.messages[#req.messages].content end

------------------------------------------------------------------ reset while a turn is in flight

describe("slm.support: a session reset while one of its turns waits for the model", function()
  it("the turn is not saved: the forgotten conversation does not come back", function()
    local ref = {}
    local c = scripted{ function(req)
      if last_user(req):find("^Old question 2") then
        assert(ref.bot:reset("s-reset")) -- the customer clicks "new conversation", or asks to be forgotten
      end
      return answer("Delivery takes three working days [faq-1].")
    end }
    ref.bot = slm.support.new{ client = c, knowledge = KB }
    assert.is_nil(ref.bot:reply("s-reset", "Old question 1: delivery?").error)
    local res = ref.bot:reply("s-reset", "Old question 2: delivery again?")
    assert.equal("Delivery takes three working days [faq-1].", res.text) -- the answer stands
    assert.is_nil(res.error)
    assert.same({}, assert(ref.bot:history("s-reset")))
  end)

  it("a conversation started after the reset holds its own turns only, none of the old one's", function()
    local ref = {}
    local c = scripted{ function(req)
      local q = last_user(req)
      if q:find("^Old question 2") then
        assert(ref.bot:reset("s-new"))
        ref.res_new = ref.bot:reply("s-new", "New question: delivery?")
        return answer("Old answer: three working days [faq-1].")
      end
      return answer("Answer to " .. q .. " [faq-1].")
    end }
    ref.bot = slm.support.new{ client = c, knowledge = KB }
    ref.bot:reply("s-new", "Old question 1: delivery?")
    local res = ref.bot:reply("s-new", "Old question 2: delivery again?")
    assert.equal("Old answer: three working days [faq-1].", res.text)
    assert.is_nil(res.error)
    assert.is_nil(ref.res_new.error)
    assert.same({ "user:New question: delivery?", "assistant:Answer to New question: delivery? [faq-1]." },
      contents(assert(ref.bot:history("s-new"))))
  end)

  it("two first turns of a new session at once: both are kept (nothing was reset)", function()
    local ref = {}
    local c = scripted{ function(req)
      local q = last_user(req)
      if q == "Tab one: delivery?" then ref.res_b = ref.bot:reply("s-fresh", "Tab two: delivery?") end
      return answer("Answer to " .. q .. " [faq-1].")
    end }
    ref.bot = slm.support.new{ client = c, knowledge = KB }
    local res = ref.bot:reply("s-fresh", "Tab one: delivery?")
    assert.is_nil(res.error)
    assert.is_nil(ref.res_b.error)
    local h = assert(ref.bot:history("s-fresh"))
    assert.same({ "user:Tab two: delivery?", "assistant:Answer to Tab two: delivery? [faq-1].",
      "user:Tab one: delivery?", "assistant:Answer to Tab one: delivery? [faq-1]." }, contents(h))
    -- and a third turn after them goes on the same conversation
    assert.is_nil(ref.bot:reply("s-fresh", "Tab one again: delivery?").error)
    assert.equal(6, #assert(ref.bot:history("s-fresh")))
  end)

  it("a message the application adds itself while a turn waits (an agent's reply): the turn is still saved", function()
    local ref = {}
    local c = scripted{ function(req)
      if last_user(req) == "Second question" then
        local h = assert(ref.bot:history("s-agent"))
        h[#h + 1] = { role = "assistant", content = "Agent Anna here: I have refunded you." }
        assert(ref.bot.store:save("s-agent", h))
      end
      return answer("Delivery takes three working days [faq-1].")
    end }
    ref.bot = slm.support.new{ client = c, knowledge = KB, max_failures = 100 }
    ref.bot:reply("s-agent", "First question")
    assert.is_nil(ref.bot:reply("s-agent", "Second question").error)
    assert.same({ "user:First question", "assistant:Delivery takes three working days [faq-1].",
      "assistant:Agent Anna here: I have refunded you.", "user:Second question",
      "assistant:Delivery takes three working days [faq-1]." }, contents(assert(ref.bot:history("s-agent"))))
  end)

  it("a history stored by an earlier version (no marks) goes on as before, and a reset still wins", function()
    local store = slm.store.memory()
    assert(store:save("s-old", { { role = "user", content = "Earlier question" },
      { role = "assistant", content = "Earlier answer [faq-1].", slm_unsourced = nil } }))
    local ref = {}
    local c = scripted{ function(req)
      if last_user(req) == "Reset me" then assert(ref.bot:reset("s-old")) end
      return answer("Delivery takes three working days [faq-1].")
    end }
    ref.bot = slm.support.new{ client = c, knowledge = KB, store = store }
    assert.is_nil(ref.bot:reply("s-old", "Delivery?").error)
    assert.same({ "user:Earlier question", "assistant:Earlier answer [faq-1].", "user:Delivery?",
      "assistant:Delivery takes three working days [faq-1]." }, contents(assert(ref.bot:history("s-old"))))
    assert.is_nil(ref.bot:reply("s-old", "Reset me").error)
    assert.same({}, assert(ref.bot:history("s-old")))
  end)

  it("two overlapping turns of a history stored by an earlier version: both kept", function()
    local store = slm.store.memory()
    assert(store:save("s-old2", { { role = "user", content = "Earlier question" },
      { role = "assistant", content = "Earlier answer [faq-1]." } }))
    local ref = {}
    local c = scripted{ function(req)
      local q = last_user(req)
      if q == "Tab one" then ref.res_b = ref.bot:reply("s-old2", "Tab two") end
      return answer("Answer to " .. q .. " [faq-1].")
    end }
    ref.bot = slm.support.new{ client = c, knowledge = KB, store = store, max_failures = 100 }
    assert.is_nil(ref.bot:reply("s-old2", "Tab one").error)
    assert.is_nil(ref.res_b.error)
    assert.same({ "user:Earlier question", "assistant:Earlier answer [faq-1].", "user:Tab two",
      "assistant:Answer to Tab two [faq-1].", "user:Tab one", "assistant:Answer to Tab one [faq-1]." },
      contents(assert(ref.bot:history("s-old2"))))
  end)
end)

------------------------------------------------------------------ stored histories of another shape

describe("slm.support with a stored history of another shape (a store of your own, a hand-edited session)", function()
  local SHAPES = {
    { "a number among the messages", { { role = "user", content = "hi" }, 5 }, "history%[2%] is a number" },
    { "a string among the messages", { "hello" }, "history%[1%] is a string" },
    { "a message without a role", { { content = "hi" } }, "history%[1%] has no role" },
    { "a role that is not a string", { { role = 1, content = "hi" } }, "history%[1%] has no role" },
    { "a hole in the list", { [1] = { role = "user", content = "a" }, [3] = { role = "assistant", content = "b" } },
      "not a list" },
    { "the whole document instead of its history", { history = { { role = "user", content = "a" } }, slm_store = 1 },
      "not a list" },
    { "a content that is a number", { { role = "user", content = 42 } }, "history%[1%]%.content is a number" },
    { "a content part that is not a table", { { role = "user", content = { "a part" } } },
      "history%[1%]%.content%[1%] is a string" },
  }
  for _, case in ipairs(SHAPES) do
    local what, stored, why = case[1], case[2], case[3]
    it(what .. ": handed over with a clear error, nothing sent, nothing raised, the session left as it is", function()
      local saves = 0
      local store = { load = function() return stored end, delete = function() return true end,
        save = function() saves = saves + 1; return true end }
      local c = scripted{ "Delivery takes three working days [faq-1]." }
      local bot = slm.support.new{ client = c, knowledge = KB, store = store }
      local ok, res = pcall(bot.reply, bot, "s-shape", "How long does delivery take?")
      assert.is_true(ok, tostring(res))
      assert.equal("error", res.escalate.reason)
      assert.equal(HANDOFF.en, res.text)
      assert.matches("^slm%.store: cannot load: the stored history is not a list of messages", tostring(res.error))
      assert.matches(why, tostring(res.error))
      assert.equal(0, #c.calls)
      assert.equal(0, saves)
    end)
  end

  it("a history stored again in another shape while the turn waited: not overwritten, res.error says so", function()
    local good = { { role = "user", content = "Earlier" }, { role = "assistant", content = "ok [faq-1]." } }
    local loads, saves = 0, 0
    local store = { delete = function() return true end, save = function() saves = saves + 1; return true end,
      load = function() loads = loads + 1; return loads == 1 and good or { good[1], 7 } end }
    local c = scripted{ "Delivery takes three working days [faq-1]." }
    local bot = slm.support.new{ client = c, knowledge = KB, store = store }
    local res = bot:reply("s-shape2", "How long does delivery take?")
    assert.equal("Delivery takes three working days [faq-1].", res.text)
    assert.matches("history%[2%] is a number.*%(reading the history again before saving: this turn was not saved%)$",
      tostring(res.error))
    assert.equal(0, saves)
  end)

  it("what our own stores hold passes: content nil or JSON null, strings, lists of parts, tool calls", function()
    local store = slm.store.memory()
    assert(store:save("s-ok", {
      { role = "user", content = { { type = "text", text = "Look at this" } } },
      { role = "assistant", content = slm.json.null, tool_calls = { { id = "c1", type = "function",
        ["function"] = { name = "escalate_to_human", arguments = "{}" } } } },
      { role = "tool", tool_call_id = "c1", content = "handed over to a human agent" },
      { role = "assistant", content = HANDOFF.en, slm_handoff = "complaint" },
    }))
    local c = scripted{ "Delivery takes three working days [faq-1]." }
    local bot = slm.support.new{ client = c, knowledge = KB, store = store }
    local res = bot:reply("s-ok", "How long does delivery take?")
    assert.is_nil(res.error, tostring(res.error))
    assert.equal(6, #assert(bot:history("s-ok")))
  end)
end)

------------------------------------------------------------------ handover ids

describe("slm.support: the ids of handover tool calls in a stored history", function()
  local function ids_paired(h)
    local seen, n = {}, 0
    for i, m in ipairs(h) do
      if m.tool_calls then
        local id = m.tool_calls[1].id
        assert.is_string(id)
        assert.is_nil(seen[id], "the id " .. id .. " is used twice")
        seen[id] = true
        n = n + 1
        assert.equal("tool", h[i + 1].role)
        assert.equal(id, h[i + 1].tool_call_id) -- each result right after its own call
      end
    end
    return n
  end

  it("calls without an id, turn after turn under max_history: every id unique", function()
    local c = scripted{ escalation(nil) }
    local bot = slm.support.new{ client = c, knowledge = KB, max_history = 8 }
    for i = 1, 5 do assert.is_nil(bot:reply("s-ids", "My parcel is late, complaint " .. i).error) end
    local h = assert(bot:history("s-ids"))
    assert.equal(2, ids_paired(h))
  end)

  it("two overlapping handovers whose calls have no id, or the same id: each keeps an id of its own", function()
    for _, id in ipairs{ false, "call_0" } do
      local ref = {}
      local n = 0
      local c = scripted{ function()
        n = n + 1
        if n == 1 then ref.res_b = ref.bot:reply("s-ids2", "Tab two: my parcel is late") end
        return escalation(id or nil)
      end }
      ref.bot = slm.support.new{ client = c, knowledge = KB }
      local res = ref.bot:reply("s-ids2", "Tab one: my parcel is late")
      assert.equal("complaint", res.escalate.reason)
      assert.is_nil(res.error)
      local h = assert(ref.bot:history("s-ids2"))
      assert.equal(8, #h)
      assert.equal(2, ids_paired(h))
      if id then assert.equal("call_0", h[2].tool_calls[1].id) end -- the first one saved keeps the model's
      -- and the next turn sends them: every call with its own result
      local c2 = scripted{ "Delivery takes three working days [faq-1]." }
      local bot2 = slm.support.new{ client = c2, knowledge = KB, store = ref.bot.store }
      assert.is_nil(bot2:reply("s-ids2", "Any news?").error)
      local sent = {}
      for _, m in ipairs(c2.calls[1].messages) do
        if m.tool_calls then sent[#sent + 1] = m.tool_calls[1].id end
        if m.role == "tool" then assert.equal(sent[#sent], m.tool_call_id) end
      end
      assert.equal(2, #sent)
      assert.are_not.equal(sent[1], sent[2])
    end
  end)
end)

------------------------------------------------------------------ every store, two handles on one

describe("slm.support: overlapping turns, handovers, max_history and a reset, in every store", function()
  local srv, dir
  local have_redis = H.sh("command -v redis-server") ~= ""
  setup(function()
    dir = H.tmpdir()
    if have_redis then srv = require("tests.redis_launch").start{ quiet = true } end
  end)
  teardown(function()
    if srv then srv:stop() end
    if dir then os.execute("rm -rf " .. H.q(dir)) end
  end)

  -- two handles on one store (two workers, two processes): turn B and the
  -- reset go through the second
  local STORES = {
    { "memory", function() local s = slm.store.memory(); return s, s end },
    { "file", function()
      return assert(slm.store.file{ dir = dir }), assert(slm.store.file{ dir = dir })
    end },
    { "sqlite", function()
      local p = dir .. "/sessions.db"
      return assert(slm.store.sqlite{ path = p }), assert(slm.store.sqlite{ path = p })
    end },
    { "redis", function()
      local R = require "slm.shared.redis"
      return R.store{ redis = srv.conf }, R.store{ redis = srv.conf }
    end },
  }

  for _, s in ipairs(STORES) do
    local name, open2 = s[1], s[2]
    it(name .. ": both turns whole and in order, trimmed from a customer's message, every call with its result",
      function()
      if name == "redis" and not have_redis then return pending("redis-server is not installed") end
      local one, two = open2()
      local sid = "overlap \0 " .. name .. " ü/../x" -- odd bytes in the id
      local ref = {}
      local n = 0
      local c = scripted{ function(req)
        n = n + 1
        if last_user(req) == "Question A: late again" then
          ref.res_b = ref.bot_b:reply(sid, "Question B: also late") -- through the other handle
          return escalation(nil)
        end
        if last_user(req) == "Question B: also late" then return escalation(nil) end
        return answer("Answer " .. n .. " [faq-1].")
      end }
      local bot = slm.support.new{ client = c, knowledge = KB, store = one, max_history = 10 }
      ref.bot_b = slm.support.new{ client = c, knowledge = KB, store = two, max_history = 10 }
      for i = 1, 3 do assert.is_nil(bot:reply(sid, "Question " .. i .. ": delivery?").error) end
      local res = bot:reply(sid, "Question A: late again")
      assert.is_nil(res.error, tostring(res.error))
      assert.is_nil(ref.res_b.error, tostring(ref.res_b.error))
      local h = assert(bot:history(sid))
      assert.same({ "user:Question 3: delivery?", "assistant:Answer 3 [faq-1].",
        "user:Question B: also late", "assistant:nil", "tool:handed over to a human agent", "assistant:" .. HANDOFF.en,
        "user:Question A: late again", "assistant:nil", "tool:handed over to a human agent", "assistant:" .. HANDOFF.en },
        contents(h))
      assert.equal(h[4].tool_calls[1].id, h[5].tool_call_id)
      assert.equal(h[8].tool_calls[1].id, h[9].tool_call_id)
      assert.are_not.equal(h[4].tool_calls[1].id, h[8].tool_calls[1].id)
      -- a reset through the other handle while a turn waits: the turn is not saved
      local c2 = scripted{ function()
        assert(ref.bot_b:reset(sid))
        return answer("Delivery takes three working days [faq-1].")
      end }
      local bot2 = slm.support.new{ client = c2, knowledge = KB, store = one }
      local r2 = bot2:reply(sid, "Delivery?")
      assert.is_nil(r2.error, tostring(r2.error))
      assert.same({}, assert(bot:history(sid)))
      assert.same({}, assert(ref.bot_b:history(sid)))
      if one.close then one:close() end
      if two ~= one and two.close then two:close() end
    end)
  end
end)
