-- slm.accumulate: folding chat.completion.chunk objects into a Response.
local cjson = require "cjson"
local Acc = require "slm.accumulate"

local null = cjson.null
local decode = cjson.decode

-- Feeds JSON chunk texts; returns the accumulator and what add() returned.
local function feed(list)
  local acc, texts, errs = Acc.new(), {}, {}
  for i, s in ipairs(list) do
    local text, err = acc:add(type(s) == "string" and decode(s) or s)
    texts[i] = text or false
    errs[i] = err or false
  end
  return acc, texts, errs
end

local function chunk(choices, extra)
  local c = { id = "chatcmpl-1", object = "chat.completion.chunk", created = 1700000000,
    model = "gpt-4o-mini", choices = choices }
  for k, v in pairs(extra or {}) do c[k] = v end
  return c
end

local function delta(index, d, finish)
  return { index = index, delta = d, finish_reason = finish or null }
end

describe("slm.accumulate", function()
  it("accumulates text and returns each choice-0 delta", function()
    local acc, texts = feed{
      '{"id":"a","created":5,"model":"m","system_fingerprint":"fp","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
      '{"id":"a","model":"m","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}',
      '{"id":"a","model":"m","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":null}]}',
      '{"id":"a","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}',
    }
    assert.same({ false, "Hel", "lo", false }, texts)
    acc:done()
    local r = acc:result()
    assert.equal("a", r.id)
    assert.equal("m", r.model)
    assert.equal(5, r.created)
    assert.equal("fp", r.system_fingerprint)
    assert.is_true(r.done)
    assert.equal("Hello", r.text)
    assert.equal("stop", r.finish_reason)
    assert.same({ role = "assistant", content = "Hello" }, r.message)
    assert.same({}, r.tool_calls)
    assert.is_nil(r.message.tool_calls)
    assert.is_nil(r.refusal)
    assert.is_nil(r.usage)
    assert.equal(1, #r.choices)
    assert.equal(0, r.choices[1].index)
  end)

  it("starts empty", function()
    local r = Acc.new():result()
    assert.equal("", r.text)
    assert.is_false(r.done)
    assert.same({}, r.tool_calls)
    assert.same({}, r.choices)
    assert.same({ role = "assistant", content = "" }, r.message)
  end)

  it("merges tool calls by index, arguments concatenated, id/type/name set once", function()
    local acc = feed{
      chunk{ delta(0, { role = "assistant", content = null, tool_calls = {
        { index = 0, id = "call_a", type = "function", ["function"] = { name = "get_weather", arguments = "" } } } }) },
      chunk{ delta(0, { tool_calls = { { index = 0, ["function"] = { arguments = "{\"city\":" } } } }) },
      chunk{ delta(0, { tool_calls = { { index = 0, id = "call_a", ["function"] = { name = "get_weather", arguments = "\"Paris\"}" } } } }) },
      chunk({ delta(0, {}, "tool_calls") }),
    }
    local r = acc:result()
    assert.same({ { id = "call_a", type = "function",
      ["function"] = { name = "get_weather", arguments = "{\"city\":\"Paris\"}" } } }, r.tool_calls)
    assert.equal(r.tool_calls, r.message.tool_calls)
    assert.is_nil(r.message.content)
    assert.equal("", r.text)
    assert.equal("tool_calls", r.finish_reason)
  end)

  it("orders tool calls by index when indexes arrive out of order", function()
    local acc = feed{
      chunk{ delta(0, { tool_calls = { { index = 2, id = "c2", type = "function", ["function"] = { name = "f2", arguments = "[2" } } } }) },
      chunk{ delta(0, { tool_calls = { { index = 0, id = "c0", type = "function", ["function"] = { name = "f0", arguments = "[0" } } } }) },
      chunk{ delta(0, { tool_calls = {
        { index = 1, id = "c1", type = "function", ["function"] = { name = "f1", arguments = "[1]" } },
        { index = 2, ["function"] = { arguments = "]" } },
      } }) },
      chunk{ delta(0, { tool_calls = { { index = 0, ["function"] = { arguments = "]" } } } }) },
    }
    local r = acc:result()
    assert.equal(3, #r.tool_calls)
    for i, t in ipairs(r.tool_calls) do
      local k = i - 1
      assert.equal("c" .. k, t.id)
      assert.equal("f" .. k, t["function"].name)
      assert.equal("[" .. k .. "]", t["function"].arguments)
    end
  end)

  it("handles tool calls without index: an id opens a call, no id continues it", function()
    local acc = feed{
      chunk{ delta(0, { role = "assistant", content = "", tool_calls = {
        { id = "t1", type = "function", ["function"] = { name = "a", arguments = "{\"x\"" } } } }) },
      chunk{ delta(0, { tool_calls = { { ["function"] = { arguments = ":1}" } } } }) },
      -- some providers repeat the id on every delta of the same call
      chunk{ delta(0, { tool_calls = { { id = "t2", ["function"] = { name = "b", arguments = "{" } } } }) },
      chunk{ delta(0, { tool_calls = { { id = "t2", ["function"] = { arguments = "}" } } } }) },
      chunk{ delta(0, { tool_calls = { { id = "t3", type = "function", ["function"] = { name = "c" } } } }) },
      chunk({ delta(0, {}, "tool_calls") }),
    }
    local r = acc:result()
    assert.same({
      { id = "t1", type = "function", ["function"] = { name = "a", arguments = "{\"x\":1}" } },
      { id = "t2", type = "function", ["function"] = { name = "b", arguments = "{}" } },
      { id = "t3", type = "function", ["function"] = { name = "c", arguments = "" } },
    }, r.tool_calls)
    assert.is_nil(r.message.content) -- "" with tool calls is no content
  end)

  it("interleaves n = 3 choices by choices[].index", function()
    local list = {}
    local words = { [0] = { "a", "b" }, [1] = { "c", "d" }, [2] = { "e", "f" } }
    for _, k in ipairs{ 2, 0, 1 } do
      list[#list + 1] = chunk{ delta(k, { role = "assistant", content = "" }) }
    end
    for step = 1, 2 do
      for _, k in ipairs{ 1, 2, 0 } do
        list[#list + 1] = chunk{ delta(k, { content = words[k][step] }) }
      end
    end
    list[#list + 1] = chunk{ delta(1, {}, "length"), delta(0, {}, "stop") }
    list[#list + 1] = chunk{ delta(2, {}, "stop") }
    local acc, texts = feed(list)
    local r = acc:result()
    assert.equal(3, #r.choices)
    for i, c in ipairs(r.choices) do
      local k = i - 1
      assert.equal(k, c.index)
      assert.equal(words[k][1] .. words[k][2], c.text)
      assert.equal(c.text, c.message.content)
      assert.equal("assistant", c.message.role)
      assert.same({}, c.tool_calls)
    end
    assert.equal("length", r.choices[2].finish_reason)
    assert.equal("ab", r.text)
    assert.equal("stop", r.finish_reason)
    local streamed = {}
    for _, t in ipairs(texts) do if t then streamed[#streamed + 1] = t end end
    assert.same({ "a", "b" }, streamed)
  end)

  it("takes usage from a chunk whose choices are empty, null or missing", function()
    local usage = { prompt_tokens = 3, completion_tokens = 2, total_tokens = 5 }
    for _, choices in ipairs{ {}, null, false } do
      local last = { id = "x", model = "m", usage = usage }
      if choices ~= false then last.choices = choices end
      local acc, texts, errs = feed{
        chunk({ delta(0, { content = "hi" }, "stop") }, { usage = null }),
        last,
      }
      assert.same({ "hi", false }, texts)
      assert.same({ false, false }, errs)
      local r = acc:result()
      assert.same(usage, r.usage)
      assert.equal("hi", r.text)
      assert.equal(1, #r.choices)
    end
  end)

  it("keeps the last non-null usage", function()
    local acc = feed{
      chunk({ delta(0, { content = "x" }) }, { usage = { total_tokens = 1 } }),
      chunk({ delta(0, {}, "stop") }, { usage = null }),
    }
    assert.same({ total_tokens = 1 }, acc:result().usage)
  end)

  it("returns nil, err for a top-level error chunk", function()
    local acc, texts, errs = feed{
      chunk{ delta(0, { content = "partial" }) },
      '{"error":{"message":"The server had an error","type":"server_error","param":null,"code":null}}',
    }
    assert.same({ "partial", false }, texts)
    local err = errs[2]
    assert.equal("The server had an error", err.message)
    assert.truthy(tostring(err):find("The server had an error", 1, true))
    assert.equal("server_error", err.type)
    assert.is_nil(err.code)
    assert.is_nil(err.status)
    local r = acc:result()
    assert.equal("partial", r.text) -- nothing received is dropped
    assert.equal(err, r.error)
  end)

  it("reads status from a numeric error code and accepts a string error", function()
    local _, _, errs = feed{ '{"error":{"message":"Rate limited","code":429}}' }
    assert.equal(429, errs[1].status)
    assert.equal(429, errs[1].code)
    _, _, errs = feed{ '{"error":"boom"}' }
    assert.equal("boom", errs[1].message)
  end)

  it("returns nil, err for OpenRouter's finish_reason error", function()
    -- error details in chunk.error
    local acc, texts, errs = feed{
      chunk{ delta(0, { role = "assistant", content = "Hel" }) },
      chunk({ delta(0, { content = "lo" }, "error") },
        { error = { code = 502, message = "Provider returned error", metadata = { provider_name = "X" } } }),
    }
    assert.same({ "Hel", false }, texts)
    assert.equal("Provider returned error", errs[2].message)
    assert.equal(502, errs[2].status)
    assert.same({ provider_name = "X" }, errs[2].metadata)
    local r = acc:result()
    assert.equal("Hello", r.text)
    assert.equal("error", r.finish_reason)

    -- error details on the choice
    local c = chunk{ delta(0, {}, "error") }
    c.choices[1].error = { message = "upstream timeout", code = 504 }
    _, _, errs = feed{ c }
    assert.equal("upstream timeout", errs[1].message)
    assert.equal(504, errs[1].status)

    -- no details at all
    _, _, errs = feed{ chunk{ delta(0, {}, "error") } }
    assert.is_string(errs[1].message)
    assert.truthy(errs[1].message:find("error"))
  end)

  it("passes unknown finish_reason values through", function()
    local acc, _, errs = feed{
      chunk{ delta(0, { content = "x" }, "content_filter") },
      chunk{ delta(1, { content = "y" }, "brand_new_reason") },
    }
    assert.same({ false, false }, errs)
    local r = acc:result()
    assert.equal("content_filter", r.finish_reason)
    assert.equal("brand_new_reason", r.choices[2].finish_reason)
  end)

  it("accumulates refusals; content is nil then", function()
    local acc = feed{
      chunk{ delta(0, { role = "assistant", content = null, refusal = "" }) },
      chunk{ delta(0, { refusal = "I can't " }) },
      chunk{ delta(0, { refusal = "help." }) },
      chunk{ delta(0, {}, "stop") },
    }
    local r = acc:result()
    assert.equal("I can't help.", r.refusal)
    assert.equal("I can't help.", r.message.refusal)
    assert.is_nil(r.message.content)
    assert.equal("", r.text)
  end)

  it("uses the position when a choice has no index", function()
    local acc = feed{
      { id = "x", choices = { { delta = { content = "a" } }, { delta = { content = "b" } } } },
      { id = "x", choices = { { delta = { content = "c" } } } },
    }
    local r = acc:result()
    assert.equal("ac", r.text)
    assert.equal("b", r.choices[2].text)
  end)

  it("accepts a whole message in place of a delta", function()
    local acc = feed{ { id = "x", choices = { { index = 0, message = { role = "assistant", content = "all" }, finish_reason = "stop" } } } }
    assert.equal("all", acc:result().text)
  end)

  it("accumulates reasoning deltas separately", function()
    local acc = feed{
      chunk{ delta(0, { reasoning = "think " }) },
      chunk{ delta(0, { reasoning_content = "more" }) },
      chunk{ delta(0, { content = "answer" }, "stop") },
    }
    local r = acc:result()
    assert.equal("think more", r.reasoning)
    assert.equal("answer", r.text)
  end)

  it("can be read at any time and keeps accumulating afterwards", function()
    local acc = Acc.new()
    acc:add(chunk{ delta(0, { content = "a" }) })
    acc:add(chunk{ delta(0, { content = "b" }) })
    assert.equal("ab", acc:result().text)
    assert.equal("ab", acc:result().text)
    acc:add(chunk{ delta(0, { content = "c" }) })
    assert.equal("abc", acc:result().text)
  end)

  it("survives pieces of the wrong type", function()
    local acc = feed{
      chunk{ delta(0, { content = "a" }) },
      chunk{ delta(0, { content = { "weird" } }) },
      chunk{ delta(0, { content = "b", tool_calls = "nope" }) },
      chunk{ delta(0, { content = 7 }) },
    }
    assert.equal("ab7", acc:result().text)
  end)

  it("copes with a non-numeric choice index", function()
    local acc = feed{ { choices = { { index = "1", delta = { content = "x" } } } },
      { choices = { { index = 0, delta = { content = "y" } } } } }
    local r = acc:result()
    assert.equal(2, #r.choices)
    assert.equal("y", r.text)
  end)

  it("hands on only string deltas, as the text is made, and keeps integer indexes", function()
    local acc, texts = feed{
      '{"choices":[{"index":0.0,"delta":{"role":"assistant","content":"a"}}]}',
      chunk{ delta(0, { content = { "weird" } }) },
      chunk{ delta(0, { content = 7 }) },
      '{"choices":[{"index":1.0,"delta":{"content":"b"}}]}',
    }
    assert.same({ "a", false, "7", false }, texts)
    local r = acc:result()
    assert.equal("a7", r.text)
    assert.equal(2, #r.choices)
    for i, c in ipairs(r.choices) do
      assert.equal(i - 1, c.index)
      assert.equal(tostring(i - 1), tostring(c.index)) -- 0, never 0.0
    end
  end)

  it("leaves out top-level and choice fields of the wrong type", function()
    local acc = feed{ { id = 5, model = { 1 }, created = "x", system_fingerprint = 9,
      choices = { { index = 0, delta = { role = { 1 }, content = "a" }, finish_reason = 3 } } },
      chunk{ delta(0, { content = "b" }, "stop") } }
    local r = acc:result()
    assert.equal("chatcmpl-1", r.id)        -- the first id of the right type
    assert.equal("gpt-4o-mini", r.model)
    assert.equal("assistant", r.message.role)
    assert.equal("stop", r.finish_reason)
    assert.is_nil(r.system_fingerprint)
  end)

  it("raises on misuse", function()
    local acc = Acc.new()
    assert.has_error(function() acc:add(nil) end)
    assert.has_error(function() acc:add("data: {}") end)
  end)

  it("is linear in the number of chunks", function()
    local function run(n)
      local acc = Acc.new()
      local c = chunk{ delta(0, { content = "tok " }) }
      local t0 = os.clock()
      for _ = 1, n do acc:add(c) end
      local r = acc:result()
      local t = os.clock() - t0
      assert.equal(4 * n, #r.text)
      return t
    end
    run(10000) -- warm up
    local small = math.max(run(10000), 1e-4)
    local big = run(100000)
    -- linear: ~10x; repeated string concatenation would be ~100x
    assert.is_true(big / small < 40, ("100k chunks took %.1fx 10k"):format(big / small))
  end)
end)
