-- slm.count and slm.fit: OpenAI's published counts (the "How to count
-- tokens with tiktoken" cookbook), per-message overhead, content parts,
-- tool calls, tools, images, unknown models, ChatML for Hermes 3, and the
-- properties of fit.
local slm = require "slm"
local T = require "slm.tokenizer"
local C = require "slm.count"
local image = require "slm.image"
local make = require "tests.fixtures.images.make"

local o200k = T.get("o200k_base")

-- The cookbook's example_messages, exactly.
local EXAMPLE_MESSAGES = {
  { role = "system",
    content = "You are a helpful, pattern-following assistant that translates corporate jargon into plain English." },
  { role = "system", name = "example_user", content = "New synergies will help drive top-line growth." },
  { role = "system", name = "example_assistant", content = "Things working well together will increase revenue." },
  { role = "system", name = "example_user",
    content = "Let's circle back when we have more bandwidth to touch base on opportunities for increased leverage." },
  { role = "system", name = "example_assistant",
    content = "Let's talk later when we're less busy about how to do better." },
  { role = "user",
    content = "This late pivot means we don't have time to boil the ocean for the client deliverable." },
}

-- The cookbook's tools example (section 7), exactly.
local WEATHER_TOOLS = {
  { type = "function",
    ["function"] = {
      name = "get_current_weather",
      description = "Get the current weather in a given location",
      parameters = {
        type = "object",
        properties = {
          location = { type = "string", description = "The city and state, e.g. San Francisco, CA" },
          unit = { type = "string", description = "The unit of temperature to return",
                   enum = { "celsius", "fahrenheit" } },
        },
        required = { "location" },
      },
    } },
}
local WEATHER_MESSAGES = {
  { role = "system", content = "You are a helpful assistant that can answer to questions about the weather." },
  { role = "user", content = "What's the weather like in San Francisco?" },
}

local function b64(s)
  local A = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
  local out = {}
  for i = 1, #s, 3 do
    local a, b, c = s:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local q = { math.floor(n / 262144) % 64, math.floor(n / 4096) % 64, math.floor(n / 64) % 64, n % 64 }
    out[#out + 1] = A:sub(q[1] + 1, q[1] + 1) .. A:sub(q[2] + 1, q[2] + 1)
      .. (b and A:sub(q[3] + 1, q[3] + 1) or "=") .. (c and A:sub(q[4] + 1, q[4] + 1) or "=")
  end
  return table.concat(out)
end

describe("slm.count (OpenAI format)", function()
  it("gives the cookbook's 124 prompt tokens for example_messages on gpt-4o-mini", function()
    local n, info = slm.count(EXAMPLE_MESSAGES, "gpt-4o-mini")
    assert.are.equal(124, n)
    assert.is_false(info.estimate)
    assert.are.equal("o200k_base", info.tokenizer)
    assert.are.equal("openai", info.format)
    -- aliases and snapshots count the same; the cookbook's gpt-4 (cl100k) count is 129
    assert.are.equal(124, (slm.count(EXAMPLE_MESSAGES, "gpt-4o-mini-2024-07-18")))
    assert.are.equal(124, (slm.count(EXAMPLE_MESSAGES, "openai/gpt-4o-mini")))
    assert.are.equal(124, (slm.count(EXAMPLE_MESSAGES, "gpt-4o")))
    assert.are.equal(129, (slm.count(EXAMPLE_MESSAGES, "gpt-4")))
  end)

  it("gives the cookbook's 101 prompt tokens for the weather tool on gpt-4o-mini", function()
    local n, info = slm.count({ messages = WEATHER_MESSAGES, tools = WEATHER_TOOLS }, "gpt-4o-mini")
    assert.are.equal(101, n)
    assert.is_false(info.estimate)
    assert.are.equal(n - (slm.count(WEATHER_MESSAGES, "gpt-4o-mini")), info.tools)
    -- the cookbook's gpt-4 / gpt-3.5-turbo figure (func_init 10, cl100k_base)
    assert.are.equal(105, (slm.count({ messages = WEATHER_MESSAGES, tools = WEATHER_TOOLS }, "gpt-4")))
  end)

  it("counts the tools formula term by term", function()
    -- one function, no properties: func_init + "name:desc" (trailing dot dropped) + func_end
    local tools = { { type = "function", ["function"] = { name = "ping", description = "Ping the server.",
      parameters = { type = "object", properties = {} } } } }
    local base = slm.count({}, "gpt-4o-mini")
    local n = slm.count({ messages = {}, tools = tools }, "gpt-4o-mini")
    assert.are.equal(base + 7 + o200k:count("ping:Ping the server") + 12, n)
    -- one plain property: + prop_init + prop_key + "key:type:desc"
    tools[1]["function"].parameters.properties.host = { type = "string", description = "Host name." }
    n = slm.count({ messages = {}, tools = tools }, "gpt-4o-mini")
    assert.are.equal(base + 7 + o200k:count("ping:Ping the server") + 3 + 3
      + o200k:count("host:string:Host name") + 12, n)
  end)

  it("adds 3 per message, the string fields, 1 per name and 3 to prime the reply", function()
    assert.are.equal(3, (slm.count({}, "gpt-4o-mini")))
    local m = { role = "user", content = "Where is my parcel?" }
    local expect = 3 + o200k:count("user") + o200k:count("Where is my parcel?") + 3
    assert.are.equal(expect, (slm.count({ m }, "gpt-4o-mini")))
    m.name = "alice_42"
    assert.are.equal(expect + o200k:count("alice_42") + 1, (slm.count({ m }, "gpt-4o-mini")))
    local tool = { role = "tool", tool_call_id = "call_abc123", content = "42" }
    assert.are.equal(3 + o200k:count("tool") + o200k:count("call_abc123") + o200k:count("42") + 3,
      (slm.count({ tool }, "gpt-4o-mini")))
    -- two messages: the sum of both, one priming
    local two = slm.count({ { role = "user", content = "a" }, { role = "assistant", content = "b" } }, "gpt-4o-mini")
    assert.are.equal((slm.count({ { role = "user", content = "a" } })) - 3
      + (slm.count({ { role = "assistant", content = "b" } })) - 3 + 3, two)
  end)

  it("takes a request table: the model argument wins, then request.model, then gpt-4o-mini", function()
    local req = { model = "gpt-4", messages = EXAMPLE_MESSAGES }
    assert.are.equal(129, (slm.count(req)))
    assert.are.equal(124, (slm.count(req, "gpt-4o-mini")))
    assert.are.equal(124, (slm.count({ messages = EXAMPLE_MESSAGES })))
    local _, info = slm.count(req)
    assert.are.equal("cl100k_base", info.tokenizer)
  end)

  it("counts text parts as text and null content as nothing", function()
    local parts = { role = "user", content = { { type = "text", text = "Hello " }, { type = "text", text = "world" } } }
    assert.are.equal(3 + o200k:count("user") + o200k:count("Hello ") + o200k:count("world") + 3,
      (slm.count({ parts }, "gpt-4o-mini")))
    local null = require("slm.json").null
    local a = { role = "assistant", content = null }
    assert.are.equal(3 + o200k:count("assistant") + 3, (slm.count({ a }, "gpt-4o-mini")))
  end)

  it("counts an image part by its size (data URL), low detail at the base price", function()
    local png = make.png(1024, 1024)
    local url = "data:image/png;base64," .. b64(png)
    local text_only = slm.count({ { role = "user", content = { { type = "text", text = "What is this?" } } } })
    local msg = { role = "user", content = {
      { type = "text", text = "What is this?" },
      { type = "image_url", image_url = { url = url, detail = "high" } },
    } }
    local n, info = slm.count({ msg }, "gpt-4o-mini")
    assert.are.equal(text_only + 2833 + 4 * 5667, n) -- 1024x1024 -> 768x768 -> 4 tiles
    assert.is_false(info.estimate)
    assert.are.equal(1, info.image_count)
    assert.are.equal(25501, info.images)
    assert.is_nil(info.warnings)
    msg.content[2].image_url.detail = "low"
    assert.are.equal(text_only + 2833, (slm.count({ msg }, "gpt-4o-mini")))
    -- auto counts as high
    msg.content[2].image_url.detail = "auto"
    assert.are.equal(text_only + 25501, (slm.count({ msg }, "gpt-4o-mini")))
  end)

  it("counts a remote image as the worst case and says it is an estimate", function()
    local msg = { role = "user", content = {
      { type = "image_url", image_url = { url = "https://example.invalid/cat.png" } } } }
    local n, info = slm.count({ msg }, "gpt-4o-mini")
    assert.are.equal(3 + o200k:count("user") + 3 + 2833 + 8 * 5667, n)
    assert.is_true(info.estimate)
    assert.is_string(info.reason)
  end)

  it("warns when a model without vision gets an image, and still counts it", function()
    local msg = { role = "user", content = {
      { type = "text", text = "hi" },
      { type = "image_url", image_url = { url = "tests/fixtures/images/tiny.png", detail = "low" } } } }
    local n, info = slm.count({ msg }, "nousresearch/hermes-3-llama-3.1-405b")
    assert.is_table(info.warnings)
    assert.matches("does not take images", info.warnings[1])
    assert.are.equal(2833, info.images)
    assert.is_true(n > 2833)
  end)

  it("counts an assistant's tool_calls: name + arguments + 3 per call", function()
    local a = { role = "assistant", content = nil, tool_calls = {
      { id = "call_1", type = "function", ["function"] = { name = "get_current_weather",
        arguments = '{"location": "Boston, MA"}' } },
      { id = "call_2", type = "function", ["function"] = { name = "get_time", arguments = "{}" } },
    } }
    local expect = 3 + o200k:count("assistant")
      + o200k:count("get_current_weather") + o200k:count('{"location": "Boston, MA"}') + C.TOOL_CALL_OVERHEAD
      + o200k:count("get_time") + o200k:count("{}") + C.TOOL_CALL_OVERHEAD + 3
    assert.are.equal(3, C.TOOL_CALL_OVERHEAD)
    assert.are.equal(expect, (slm.count({ a }, "gpt-4o-mini")))
  end)

  it("counts an unknown model with o200k_base and flags the estimate, never silently", function()
    local n, info = slm.count(EXAMPLE_MESSAGES, "acme-llm-7")
    assert.are.equal(124, n)
    assert.is_true(info.estimate)
    assert.matches("unknown model 'acme%-llm%-7'", info.reason)
    -- a known model is not an estimate
    local _, known = slm.count(EXAMPLE_MESSAGES, "gpt-4o-mini")
    assert.is_false(known.estimate)
    assert.is_nil(known.reason)
  end)

  it("raises on misuse", function()
    assert.has_error(function() slm.count("hello") end)
    assert.has_error(function() slm.count(nil) end)
    assert.has_error(function() slm.count({ "not a message" }) end)
    assert.has_error(function() slm.count({ { role = "user", content = 42 } }) end)
    assert.has_error(function() slm.count({}, 42) end)
  end)
end)

describe("slm.count (ChatML, Hermes 3)", function()
  local HERMES = "nousresearch/hermes-3-llama-3.1-405b"
  local llama = T.get("llama3")

  -- An independent count of ChatML text: markers are one token each, the
  -- text between them is counted on its own.
  local function independent(s)
    local n = 0
    local rest = s
    local markers = { "<|begin_of_text|>", "<|im_start|>", "<|im_end|>" }
    while #rest > 0 do
      local best, bm
      for _, m in ipairs(markers) do
        local a = rest:find(m, 1, true)
        if a and (not best or a < best) then best, bm = a, m end
      end
      if not best then n = n + llama:count(rest); break end
      if best > 1 then n = n + llama:count(rest:sub(1, best - 1)) end
      n = n + 1
      rest = rest:sub(best + #bm)
    end
    return n
  end

  it("renders the ChatML template", function()
    local msgs = { { role = "system", content = "Be brief." }, { role = "user", content = "Hi there" } }
    assert.are.equal("<|begin_of_text|><|im_start|>system\nBe brief.<|im_end|>\n"
      .. "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", C.render_chatml(msgs))
  end)

  it("counts the rendered template with the llama3 tokenizer (estimate flag passed through)", function()
    local msgs = {
      { role = "system", content = "You are a support agent for an online shop." },
      { role = "user", content = "My order #12345 arrived damaged. Can I get a refund?" },
      { role = "assistant", content = "I'm sorry! Yes, send a photo of the parcel please." },
      { role = "user", content = "Sent. Отправил фото." },
    }
    local rendered = "<|begin_of_text|>"
      .. "<|im_start|>system\nYou are a support agent for an online shop.<|im_end|>\n"
      .. "<|im_start|>user\nMy order #12345 arrived damaged. Can I get a refund?<|im_end|>\n"
      .. "<|im_start|>assistant\nI'm sorry! Yes, send a photo of the parcel please.<|im_end|>\n"
      .. "<|im_start|>user\nSent. Отправил фото.<|im_end|>\n"
      .. "<|im_start|>assistant\n"
    assert.are.equal(rendered, C.render_chatml(msgs))
    local n, info = slm.count(msgs, HERMES)
    assert.are.equal(independent(rendered), n)
    assert.are.equal("chatml", info.format)
    assert.are.equal("llama3", info.tokenizer)
    assert.are.equal(llama.estimate, info.estimate)
    if llama.estimate then assert.is_string(info.reason) end
    -- the OpenAI formula would give another number: the format matters
    assert.are_not.equal(n, (slm.count(msgs, "gpt-4o-mini")))
  end)

  it("renders tools as a JSON list in a <tools> system block and tool calls as <tool_call>", function()
    local msgs = {
      { role = "user", content = "Weather in Paris?" },
      { role = "assistant", tool_calls = { { id = "c1", type = "function",
        ["function"] = { name = "get_current_weather", arguments = '{"location": "Paris"}' } } } },
      { role = "tool", tool_call_id = "c1", content = "18C, sunny" },
    }
    local s = C.render_chatml(msgs, WEATHER_TOOLS)
    assert.truthy(s:find("<|im_start|>system\nYou are a function calling AI model.", 1, true))
    assert.truthy(s:find('<tools> [{"function": {"description": "Get the current weather in a given location", '
      .. '"name": "get_current_weather", "parameters": {"properties": {"location": {"description": '
      .. '"The city and state, e.g. San Francisco, CA", "type": "string"}, "unit": {"description": '
      .. '"The unit of temperature to return", "enum": ["celsius", "fahrenheit"], "type": "string"}}, '
      .. '"required": ["location"], "type": "object"}}, "type": "function"}] </tools>', 1, true))
    assert.truthy(s:find('<|im_start|>assistant\n<tool_call>\n{"name": "get_current_weather", '
      .. '"arguments": {"location": "Paris"}}\n</tool_call><|im_end|>\n', 1, true))
    assert.truthy(s:find("<|im_start|>tool\n<tool_response>\n18C, sunny\n</tool_response><|im_end|>\n", 1, true))
    local n, info = slm.count({ messages = msgs, tools = WEATHER_TOOLS }, HERMES)
    assert.are.equal(independent(s), n)
    assert.is_true(info.tools > 0)
  end)
end)

describe("slm.fit", function()
  local TINY = "tiny-test"
  setup(function()
    slm.models[TINY] = { context = 200, max_output = 100, input_per_m = 1, output_per_m = 1,
      tokenizer = "o200k_base", format = "openai" }
  end)
  teardown(function() slm.models[TINY] = nil end)

  local function words(n, seed)
    local w = {}
    for i = 1, n do w[i] = ({ "parcel", "refund", "order", "late", "box", "thanks" })[(i + seed) % 6 + 1] end
    return table.concat(w, " ")
  end

  local function conversation()
    return {
      { role = "system", content = "You are a terse support bot." },                 -- 1
      { role = "user", content = words(12, 1) },                                     -- 2
      { role = "assistant", content = words(12, 2) },                                -- 3
      { role = "user", content = words(12, 3) },                                     -- 4
      { role = "assistant", content = nil, tool_calls = {                            -- 5
        { id = "c1", type = "function", ["function"] = { name = "lookup", arguments = '{"order":"1"}' } },
        { id = "c2", type = "function", ["function"] = { name = "lookup", arguments = '{"order":"2"}' } } } },
      { role = "tool", tool_call_id = "c1", content = words(10, 4) },                -- 6
      { role = "tool", tool_call_id = "c2", content = words(10, 5) },                -- 7
      { role = "assistant", content = words(12, 6) },                                -- 8
      { role = "user", content = words(12, 7) },                                     -- 9
      { role = "assistant", content = words(8, 8) },                                 -- 10
    }
  end

  local function index_of(list, x)
    for i, y in ipairs(list) do if y == x then return i end end
  end

  -- Every property fit promises, checked on one result.
  local function check(orig, out, dropped, reserve)
    assert.is_true(slm.count(out, TINY) + reserve <= 200, "result does not fit")
    assert.are.equal(#orig, #out + #dropped)
    -- order kept; every message either kept or dropped
    local last = 0
    for _, m in ipairs(out) do
      local i = index_of(orig, m)
      assert.is_true(i > last)
      last = i
    end
    -- systems and the last user message are kept
    local last_user
    for i, m in ipairs(orig) do if m.role == "user" then last_user = i end end
    for i, m in ipairs(orig) do
      if m.role == "system" or i == last_user then assert.truthy(index_of(out, m)) end
    end
    -- tool-call units are kept or dropped whole
    for i, m in ipairs(orig) do
      if m.role == "tool" then
        local j = i
        while orig[j].role == "tool" do j = j - 1 end
        assert.are.equal(index_of(out, orig[j]) ~= nil, index_of(out, m) ~= nil)
      end
    end
    -- oldest first: no dropped message is newer than a kept droppable one
    for _, d in ipairs(dropped) do
      local di = index_of(orig, d)
      for _, m in ipairs(out) do
        local mi = index_of(orig, m)
        if m.role ~= "system" and mi ~= last_user then assert.is_true(mi > di) end
      end
    end
  end

  it("keeps everything when it fits", function()
    local msgs = conversation()
    local out, dropped = slm.fit(msgs, { model = TINY, reserve = 0 })
    assert.are.equal(#msgs, #out)
    assert.are.same({}, dropped)
    assert.are_not.equal(msgs, out) -- a new list
  end)

  it("drops the oldest turns first, keeping systems, tool units and the last user message", function()
    local msgs = conversation()
    local total = slm.count(msgs, TINY)
    local seen_drops = {}
    for reserve = 0, 199, 3 do
      local out, dropped = slm.fit(msgs, { model = TINY, reserve = reserve })
      if out then
        check(msgs, out, dropped, reserve)
        if total + reserve <= 200 then assert.are.equal(0, #dropped) else assert.is_true(#dropped > 0) end
        seen_drops[#dropped] = true
        -- as much as possible is kept: putting back the newest dropped unit would not fit
        if #dropped > 0 then
          local back = {}
          local newest = dropped[#dropped]
          local ni = index_of(msgs, newest)
          for i, m in ipairs(msgs) do
            local keep = index_of(out, m) ~= nil or i == ni
            -- the whole unit of the newest dropped message
            if not keep and m.role == "tool" and i > ni then
              local j = i
              while msgs[j].role == "tool" do j = j - 1 end
              keep = j == ni
            end
            if not keep and msgs[ni].role == "tool" and i < ni and index_of(dropped, m) then
              local j = ni
              while msgs[j].role == "tool" do j = j - 1 end
              keep = i >= j
            end
            if keep then back[#back + 1] = m end
          end
          assert.is_true(slm.count(back, TINY) + reserve > 200)
        end
      else
        assert.are.equal("context_length", dropped.kind)
      end
      -- an error exactly when the messages that must stay do not fit
      local must = slm.count({ msgs[1], msgs[9] }, TINY)
      assert.are.equal(must + reserve > 200, out == nil)
    end
    -- the sweep really dropped different amounts, tool units included
    assert.truthy(seen_drops[1])
    assert.truthy(seen_drops[4] or seen_drops[5] or seen_drops[6])
  end)

  it("drops an assistant with tool_calls together with its tool results", function()
    local msgs = conversation()
    -- find a reserve where message 5's unit goes
    for reserve = 0, 199 do
      local out, dropped = slm.fit(msgs, { model = TINY, reserve = reserve })
      if out and index_of(dropped, msgs[5]) then
        assert.truthy(index_of(dropped, msgs[6]))
        assert.truthy(index_of(dropped, msgs[7]))
        assert.is_nil(index_of(out, msgs[6]))
        return
      end
    end
    error("no reserve dropped the tool-call unit")
  end)

  it("returns context_length when the kept messages alone cannot fit", function()
    local msgs = { { role = "system", content = words(150, 0) }, { role = "user", content = "hi" } }
    local out, err = slm.fit(msgs, { model = TINY, reserve = 50 })
    assert.is_nil(out)
    assert.are.equal("context_length", err.kind)
    assert.matches("context", tostring(err))
    -- a huge last user message cannot be dropped either
    out, err = slm.fit({ { role = "user", content = "old" }, { role = "user", content = words(300, 1) } },
      { model = TINY, reserve = 0 })
    assert.is_nil(out)
    assert.are.equal("context_length", err.kind)
  end)

  it("defaults the reserve to max_tokens, else max_output capped at a quarter of the context", function()
    local msgs = conversation()
    local a = slm.fit(msgs, { model = TINY })               -- min(100, 200/4) = 50
    local b = slm.fit(msgs, { model = TINY, reserve = 50 })
    assert.are.same(b, a)
    local c = slm.fit(msgs, { model = TINY, max_tokens = 120 })
    local d = slm.fit(msgs, { model = TINY, reserve = 120 })
    assert.are.same(d, c)
    check(msgs, c, select(2, slm.fit(msgs, { model = TINY, max_tokens = 120 })), 120)
  end)

  it("counts tools as part of the prompt", function()
    local msgs = conversation()
    local without = slm.fit(msgs, { model = TINY, reserve = 40 })
    local with = slm.fit(msgs, { model = TINY, reserve = 40, tools = WEATHER_TOOLS })
    assert.is_true(#with < #without)
    assert.is_true(slm.count({ messages = with, tools = WEATHER_TOOLS }, TINY) + 40 <= 200)
  end)

  it("raises on misuse", function()
    assert.has_error(function() slm.fit("x", { model = TINY }) end)
    assert.has_error(function() slm.fit({}, { model = TINY, resrve = 1 }) end)
    assert.has_error(function() slm.fit({}, { model = "no-such-model" }) end)
  end)
end)

describe("slm.image token rule (used by count)", function()
  it("matches OpenAI's worked examples for gpt-4o-mini", function()
    assert.are.equal(2833 + 4 * 5667, (image.tokens(1024, 1024, "high")))
    assert.are.equal(2833 + 6 * 5667, (image.tokens(2048, 4096, "high")))
    assert.are.equal(2833, (image.tokens(4096, 8192, "low")))
  end)
end)

describe("slm.compare (slm.models.compare)", function()
  local compare = require "slm.compare"
  local MINI, HERMES = "gpt-4o-mini", "nousresearch/hermes-3-llama-3.1-405b"

  local function close(a, b) return math.abs(a - b) < 1e-12 end

  it("prices each task per 1,000 runs on each model, with a total for the workload", function()
    local rows = compare.compare{
      tasks = {
        { name = "triage", prompt_tokens = 300, output_tokens = 60, count = 1000 },
        { name = "reply", prompt_tokens = 1200, output_tokens = 250, count = 200 },
      },
      models = { MINI, "hermes-3-405b" },
    }
    assert.are.equal(2, #rows)
    assert.are.equal(MINI, rows[1].model)
    assert.are.equal(HERMES, rows[2].model) -- aliases resolve
    -- gpt-4o-mini: (300 * 0.15 + 60 * 0.60) / 1e6 per task
    local t = rows[1].tasks[1]
    assert.are.equal("triage", t.name)
    assert.is_true(close((300 * 0.15 + 60 * 0.60) / 1e6 * 1000, t.per_1000))
    assert.is_true(close(slm.cost(MINI, { prompt_tokens = 300, completion_tokens = 60 }) * 1000, t.per_1000))
    assert.is_true(close(t.per_1000, 0.081))
    -- Hermes 3: input 1.00, output 0.30
    assert.is_true(close(rows[2].tasks[1].per_1000, (300 * 1.00 + 60 * 0.30) / 1e3))
    assert.is_true(close(rows[2].tasks[2].per_1000, (1200 * 1.00 + 250 * 0.30) / 1e3))
    for _, row in ipairs(rows) do
      local total = row.tasks[1].cost * 1000 + row.tasks[2].cost * 200
      assert.is_true(close(total, row.total))
      assert.is_true(row.fits)
    end
  end)

  it("says whether prompt + output fits each model's context", function()
    local rows = compare.compare{
      tasks = { { name = "contract", prompt_tokens = 70000, output_tokens = 2000, count = 5 } },
      models = { MINI, HERMES },
    }
    assert.is_true(rows[1].tasks[1].fits)                 -- 72,000 <= 128,000
    assert.is_false(rows[2].tasks[1].fits)                -- 72,000 > 65,536
    assert.matches("context 65536", rows[2].tasks[1].why)
    assert.is_false(rows[2].fits)
    local big_out = compare.compare{ tasks = { { prompt_tokens = 10, output_tokens = 20000 } }, models = { MINI } }
    assert.is_false(big_out[1].tasks[1].fits)             -- beyond max_output 16,384
    assert.are.equal("task 1", big_out[1].tasks[1].name)
    assert.are.equal(1, big_out[1].tasks[1].count)
  end)

  it("counts a prompt given as text with each model's own tokenizer and format", function()
    local text = "Summarise this complaint: the parcel arrived two weeks late and the box was crushed."
    local rows = compare.compare{ tasks = { { name = "s", prompt = text, output_tokens = 100 } },
      models = { MINI, HERMES } }
    local msgs = { { role = "user", content = text } }
    assert.are.equal((slm.count(msgs, MINI)), rows[1].tasks[1].prompt_tokens)
    assert.are.equal((slm.count(msgs, HERMES)), rows[2].tasks[1].prompt_tokens)
    assert.are.equal(T.get("llama3").estimate, rows[2].tasks[1].estimate)
    assert.is_false(rows[1].tasks[1].estimate)
    local out = compare.compare{ tasks = { { prompt_tokens = 1, output = "Hello there, friend." } }, models = { MINI } }
    assert.are.equal(o200k:count("Hello there, friend."), out[1].tasks[1].output_tokens)
  end)

  it("defaults to every model with prices", function()
    local rows = compare.compare{ tasks = { { prompt_tokens = 1, output_tokens = 1 } } }
    local seen = {}
    for _, r in ipairs(rows) do seen[r.model] = true end
    assert.truthy(seen[MINI])
    assert.truthy(seen[HERMES])
  end)

  it("prints the comparison table", function()
    local rows = compare.compare{
      tasks = { { name = "triage", prompt_tokens = 300, output_tokens = 60, count = 1000 },
                { name = "contract", prompt_tokens = 70000, output_tokens = 2000, count = 5 } },
      models = { MINI, HERMES } }
    local got = {}
    local s = compare.print(rows, function(x) got[#got + 1] = x end)
    assert.are.equal(s, table.concat(got))
    assert.matches("gpt%-4o%-mini", s)
    assert.matches("128,000", s)
    assert.matches("65,536", s)
    assert.matches("triage %(300 in %+ 60 out%), %$ per 1,000 +%$0%.0810 +%$0%.3180", s)
    assert.matches("does not fit", s)
    assert.matches("total, %$ for 1,000 triage %+ 5 contract", s)
  end)

  it("raises on misuse", function()
    assert.has_error(function() compare.compare() end)
    assert.has_error(function() compare.compare{ tasks = {} } end)
    assert.has_error(function() compare.compare{ tasks = { { output_tokens = 1 } } } end)
    assert.has_error(function() compare.compare{ tasks = { { prompt_tokens = 1 } } } end)
    assert.has_error(function() compare.compare{ tasks = { { prompt_tokens = 1, output_tokens = 1 } },
      models = { "no-such-model" } } end)
    assert.has_error(function() compare.compare{ tasks = { { prompt_tokens = 1, output_tokens = 1 } }, modles = {} } end)
  end)
end)
