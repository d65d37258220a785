-- Streaming through the client against the nginx simulator: every framing
-- and ending the issue names, deltas to callbacks and iterators, tool calls,
-- n > 1, errors inside the stream, partial results, timeouts, retries and
-- cancellation.
local slm = require "slm"
local core = require "slm.core"
local H = require "tests.helpers"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

local function client(opts)
  local o = { base_url = up.url, api_key = "sk-test-good", model = "gpt-4o-mini", timeout = 10 }
  for k, v in pairs(opts or {}) do o[k] = v end
  return slm.client(o)
end

local TEXT = "Привет, where is my order #4521? It was due on Monday."
local function msgs(text) return { { role = "user", content = text or TEXT } } end

-- stream with a scenario, collecting deltas through on_delta
local function stream(sc, extra, copts)
  local deltas = {}
  local req = { messages = msgs(), stream = true, model = sc and ("sim:" .. sc) or nil,
    on_delta = function(text) deltas[#deltas + 1] = text end }
  for k, v in pairs(extra or {}) do req[k] = v end
  local res, err = client(copts):chat(req)
  return res, err, deltas
end

describe("streamed chat", function()
  it("returns the same Response as the non-streamed call", function()
    local c = client()
    local plain = assert(c:chat{ messages = msgs() })
    local res, err, deltas = stream(nil)
    assert.is_nil(err)
    assert.are.equal(plain.text, res.text)
    assert.are.equal("Echo: " .. TEXT, res.text)
    assert.are.equal(table.concat(deltas), res.text)
    assert.is_true(#deltas > 5)
    assert.are.equal("stop", res.finish_reason)
    assert.are.equal("assistant", res.message.role)
    assert.are.same(plain.usage.prompt_tokens, res.usage.prompt_tokens)
    assert.are.same(plain.usage.completion_tokens, res.usage.completion_tokens)
    assert.is_true(res.cost > 0)
    assert.are.equal(plain.cost, res.cost)
    assert.are.equal("gpt-4o-mini", res.model)
    assert.is_number(res.ttft)
    assert.is_true(res.ttft <= res.latency)
    assert.are.equal(1, res.attempts)
  end)

  it("streams when on_delta is given without stream = true; stream = false with it raises", function()
    local deltas = {}
    local res = assert(client():chat{ messages = msgs(), on_delta = function(t) deltas[#deltas + 1] = t end })
    assert.is_true(H.last(up).body.stream)
    assert.is_true(#deltas > 5)
    assert.are.equal(res.text, table.concat(deltas))
    local ok, why = pcall(client().chat, client(), { messages = msgs(), stream = false, on_delta = print })
    assert.is_false(ok)
    assert.matches("client:chat: 'on_delta' needs a stream", why)
  end)

  it("asks for usage unless the caller set stream_options", function()
    stream(nil)
    assert.are.same({ include_usage = true }, H.last(up).body.stream_options)
    assert.is_true(H.last(up).body.stream)
    assert.are.equal("text/event-stream", H.last(up).headers.accept)
    local res = stream(nil, { stream_options = { include_usage = false } })
    assert.are.same({ include_usage = false }, H.last(up).body.stream_options)
    -- no usage from the provider: counted by us (the budget and cost need it), and flagged
    assert.is_true(res.usage.estimated)
    assert.matches("no usage", res.usage_problem)
    local tok = slm.tokenizer("gpt-4o-mini")
    assert.are.equal(tok:count(res.text), res.usage.completion_tokens)
    assert.are.equal(slm.count({ messages = msgs() }, "gpt-4o-mini"), res.usage.prompt_tokens)
    assert.is_true(res.cost > 0)
  end)

  for _, sc in ipairs{ "bytewise", "cr", "crlf", "comments", "bom", "multiline", "slow_chunks=5" } do
    it("handles " .. sc .. " framing", function()
      local res, err, deltas = stream(sc)
      assert.is_nil(err)
      assert.are.equal("Echo: " .. TEXT, res.text)
      assert.are.equal(res.text, table.concat(deltas))
      assert.is_table(res.usage)
    end)
  end

  it("accumulates parallel tool calls", function()
    local res = assert(stream("tools_parallel", { tools = {
      { type = "function", ["function"] = { name = "get_order", parameters = { type = "object" } } },
      { type = "function", ["function"] = { name = "get_refund", parameters = { type = "object" } } } } }))
    assert.are.equal("tool_calls", res.finish_reason)
    assert.are.equal(2, #res.tool_calls)
    for _, tc in ipairs(res.tool_calls) do
      assert.is_string(tc.id); assert.are.equal("function", tc.type)
      assert.is_table(require("cjson").decode(tc["function"].arguments))
    end
    assert.are_not.equal(res.tool_calls[1].id, res.tool_calls[2].id)
  end)

  it("accumulates tool calls sent without an index", function()
    local res = assert(stream("tools_noindex", { tools = {
      { type = "function", ["function"] = { name = "a", parameters = { type = "object" } } },
      { type = "function", ["function"] = { name = "b", parameters = { type = "object" } } } } }))
    assert.are.equal(2, #res.tool_calls)
    for _, tc in ipairs(res.tool_calls) do
      assert.is_table(require("cjson").decode(tc["function"].arguments))
    end
  end)

  it("interleaves n = 3 choices", function()
    local res = assert(stream("n3", { n = 3 }))
    assert.are.equal(3, #res.choices)
    assert.are.equal(res.choices[1].text, res.text)
    for i = 1, 3 do
      assert.are.equal(i - 1, res.choices[i].index)
      assert.is_true(#res.choices[i].text > 0)
      assert.are.equal("stop", res.choices[i].finish_reason)
    end
  end)

  it("accumulates a refusal", function()
    local res = assert(stream("refusal"))
    assert.is_string(res.refusal)
    assert.is_true(#res.refusal > 0)
    assert.are.equal("", res.text)
  end)

  it("keeps usage sent with null choices", function()
    local res = assert(stream("usage_null_choices"))
    assert.is_true(res.usage.total_tokens > 0)
  end)

  it("takes a single 1 MB delta", function()
    local res, err, deltas = stream("big=1048576")
    assert.is_nil(err)
    assert.are.equal(1048576, #res.text)
    assert.are.equal(res.text, table.concat(deltas))
  end)
end)

describe("stream errors keep what arrived", function()
  local function check_partial(err, kind)
    assert.are.equal(kind, err.kind)
    assert.is_table(err.partial)
    assert.is_true(#err.partial.text > 0, "partial text kept")
  end
  it("an error chunk ends the request with the partial", function()
    local res, err, deltas = stream("error_chunk")
    assert.is_nil(res)
    check_partial(err, "server")
    assert.are.equal(table.concat(deltas), err.partial.text)
  end)
  it("an OpenRouter-style finish_reason 'error' ends the request", function()
    local res, err = stream("openrouter_error")
    assert.is_nil(res)
    check_partial(err, err.kind)
    assert.is_truthy(err.message)
  end)
  it("an 'event: error' ends the request", function()
    local res, err = stream("event_error")
    assert.is_nil(res)
    assert.is_truthy(err.kind)
    assert.is_table(err.partial)
  end)
  it("EOF without [DONE] after finish_reason is fine", function()
    local res, err = stream("no_done")
    assert.is_nil(err)
    assert.are.equal("Echo: " .. TEXT, res.text)
  end)
  it("EOF mid-stream is a protocol error with the partial", function()
    local res, err = stream("eof_mid", nil, { max_retries = 0 })
    assert.is_nil(res)
    check_partial(err, "protocol")
  end)
  it("a reset mid-stream is an error with the partial, never retried after deltas", function()
    local res, err, deltas = stream("reset")
    assert.is_nil(res)
    check_partial(err, "connect")
    assert.are.equal(1, err.attempts)
    assert.are.equal(table.concat(deltas), err.partial.text)
  end)
  it("a stall past stall_timeout is a timeout with the partial", function()
    local t0 = core.now()
    local res, err = stream("stall=3000", nil, { stall_timeout = 0.3 })
    assert.is_nil(res)
    check_partial(err, "timeout")
    assert.is_true(core.now() - t0 < 2.5)
  end)
  it("keep-alive comments reset the stall timer", function()
    -- comments every ~100 ms during a 600 ms pause, stall timeout 0.4 s
    local res, err = stream("comments,slow_chunks=100", nil, { stall_timeout = 0.4 })
    assert.is_nil(err)
    assert.are.equal("Echo: " .. TEXT, res.text)
  end)
  it("no first byte within timeout is a timeout", function()
    local res, err = stream("delay=3000", nil, { timeout = 0.3, max_retries = 0 })
    assert.is_nil(res)
    assert.are.equal("timeout", err.kind)
  end)
  it("an HTTP error status is read as the JSON error body", function()
    local res, err = stream("status=429,retry_after=0.1,fail=9", nil, { max_retries = 0 })
    assert.is_nil(res)
    assert.are.equal("rate_limit", err.kind)
    assert.matches("[Rr]ate limit", err.message)
  end)
  it("retries before the first delta", function()
    local res, err = stream("status=503,retry_after_ms=10,fail=1", { headers = { ["X-Sim-Key"] = "s503" } })
    assert.is_nil(err)
    assert.are.equal(2, res.attempts)
    assert.are.equal("Echo: " .. TEXT, res.text)
  end)
end)

describe("client:stream iterator", function()
  it("yields the deltas and then the Response", function()
    local s = client():stream{ messages = msgs() }
    local parts = {}
    for text, chunk in s do
      parts[#parts + 1] = text
      assert.is_table(chunk)
    end
    local res, err = s:result()
    assert.is_nil(err)
    assert.are.equal("Echo: " .. TEXT, table.concat(parts))
    assert.are.equal(res.text, table.concat(parts))
  end)

  it("leaving the loop early aborts the transfer and frees the connection", function()
    local c = client()
    local n = 0
    local s, a, b, closing = c:stream{ messages = msgs(), model = "sim:slow_chunks=50" }
    for _ in s, a, b, closing do
      n = n + 1
      if n == 3 then break end
    end
    -- the generic for closed the stream (its to-be-closed value); LuaJIT's
    -- generic for has none: there the caller closes it (README, Limits)
    if _VERSION == "Lua 5.1" then s:close() end
    assert.are.equal(3, n)
    H.wait_idle(up, function() slm.sleep(0.05) end)
    assert.are.equal(0, up:stats().in_flight)
    assert.are.equal(1, up:stats().aborted)
  end)

  it("s:close() aborts a stream held in a variable; result() returns the partial", function()
    local c = client()
    local s = c:stream{ messages = msgs(), model = "sim:slow_chunks=50" }
    local got = {}
    for text in s do
      got[#got + 1] = text
      if #got == 3 then break end
    end
    s:close()
    local res, err = s:result()
    assert.is_nil(res)
    assert.are.equal("cancelled", err.kind)
    assert.are.equal(table.concat(got), err.partial.text)
    H.wait_idle(up, function() slm.sleep(0.05) end)
    assert.are.equal(0, up:stats().in_flight)
    assert.are.equal(1, up:stats().aborted)
  end)

  it("works inside tasks, many streams at once", function()
    local c = client()
    local res = slm.map({ "a", "b", "c", "d" }, function(x)
      -- (300 ms before the first piece: all four are in flight together
      -- even on a loaded machine)
      local s = c:stream{ messages = msgs(x), model = "sim:delay=300,slow_chunks=20" }
      local t = {}
      for text in s do t[#t + 1] = text end
      return table.concat(t)
    end, { concurrency = 4 })
    assert.are.same({ "Echo: a", "Echo: b", "Echo: c", "Echo: d" }, res)
    assert.are.equal(4, up:stats().max_in_flight)
  end)
end)

describe("on_delta control", function()
  it("returning false cancels at once and returns what arrived", function()
    local got = {}
    local res, err = client():chat{ messages = msgs(), stream = true, model = "sim:slow_chunks=50",
      on_delta = function(t) got[#got + 1] = t; if #got == 4 then return false end end }
    assert.is_nil(res)
    assert.are.equal("cancelled", err.kind)
    assert.are.equal(table.concat(got), err.partial.text)
    H.wait_idle(up, function() slm.sleep(0.05) end)
    assert.are.equal(0, up:stats().in_flight)
  end)

  it("an error thrown in on_delta aborts that request and is raised in the caller", function()
    local c = client()
    local ok_other
    local okr, err = pcall(slm.run, function()
      local other = slm.spawn(function()
        return c:chat{ messages = msgs("other"), stream = true, model = "sim:slow_chunks=20" }
      end)
      local ok, e = pcall(c.chat, c, { messages = msgs(), stream = true, model = "sim:slow_chunks=20",
        on_delta = function(t) if #t > 0 then error("consumer broke") end end })
      ok_other = other:wait()
      assert.is_false(ok)
      error(e, 0)
    end)
    assert.is_false(okr)
    assert.matches("consumer broke", tostring(err))
    assert.are.equal("Echo: other", ok_other.text)
  end)
end)

describe("recorded OpenAI streams through the client", function()
  local json = require "cjson"
  local f = assert(io.open("tests/fixtures/openai-streams/expected.json"))
  local expected = json.decode(f:read("a"))
  f:close()
  local names = {}
  for name in pairs(expected) do names[#names + 1] = name end
  table.sort(names)
  local function nn(v) if v == json.null then return nil end return v end

  for _, file in ipairs(names) do
    it("replays " .. file .. " into the expected Response", function()
      local want = expected[file]
      local res, err = client():chat{ messages = msgs(), stream = true,
        model = "sim:replay=" .. file:gsub("%.sse$", "") }
      assert.is_nil(err)
      assert.are.equal(want.id, res.id)
      assert.are.equal(want.model, res.model)
      assert.are.same(nn(want.usage), res.usage)
      assert.are.equal(#want.choices, #res.choices)
      for i, wc in ipairs(want.choices) do
        local rc = res.choices[i]
        assert.are.equal(wc.index, rc.index)
        assert.are.equal(nn(wc.content) or "", rc.text)
        assert.are.equal(nn(wc.refusal), rc.refusal)
        assert.are.equal(nn(wc.finish_reason), rc.finish_reason)
        assert.are.equal(#wc.tool_calls, #rc.tool_calls)
        for j, wt in ipairs(wc.tool_calls) do
          local rt = rc.tool_calls[j]
          assert.are.equal(wt.id, rt.id)
          assert.are.equal(wt.name, rt["function"].name)
          assert.are.equal(wt.arguments, rt["function"].arguments)
        end
      end
      assert.are.equal(nn(want.choices[1].content) or "", res.text)
    end)
  end
end)

describe("logprobs", function()
  for _, stream in ipairs{ false, true } do
    it("are part of the Response, for choice 0 and each choice (" .. (stream and "streamed" or "plain") .. ")",
        function()
      local res = assert(client():chat{ messages = msgs("hello there"), stream = stream, logprobs = true,
        top_logprobs = 2, n = 2 })
      local lp = res.logprobs
      assert.is_table(lp)
      assert.is_true(#lp.content > 2)
      -- one entry per piece of text, in order: together they spell the reply
      local spelled = {}
      for i, e in ipairs(lp.content) do
        spelled[i] = e.token
        assert.is_number(e.logprob)
        assert.are.equal(2, #e.top_logprobs)
      end
      assert.are.equal(res.text, table.concat(spelled))
      assert.are.equal(2, #res.choices)
      assert.are.same(lp, res.choices[1].logprobs)
      local second = {}
      for i, e in ipairs(res.choices[2].logprobs.content) do second[i] = e.token end
      assert.are.equal(res.choices[2].text, table.concat(second))
    end)
  end
  it("survive the stream's fast path (one choice: its content chunks skip JSON decoding)", function()
    -- events 5 ms apart: read one by one, the chunks after the first go the fast way
    local res = assert(client():chat{ messages = msgs("hello there, a longer text to stream"), stream = true,
      logprobs = true, headers = { ["X-Sim-Scenario"] = "slow_chunks=5" } })
    local spelled = {}
    for i, e in ipairs(res.logprobs.content) do spelled[i] = e.token end
    assert.are.equal(res.text, table.concat(spelled))
  end)
  it("are absent when not asked for", function()
    for _, stream in ipairs{ false, true } do
      local res = assert(client():chat{ messages = msgs(), stream = stream })
      assert.is_nil(res.logprobs)
      assert.is_nil(res.choices[1].logprobs)
    end
  end)
end)

describe("on_delta's chunk", function()
  it("is given to a callback that takes it, or takes '...' (one that takes only the text is spared making it)", function()
    for _, form in ipairs{ "two", "vararg" } do
      local got = 0
      local cb = form == "two" and function(_, chunk) if type(chunk) == "table" and chunk.choices then got = got + 1 end end
        or function(...) local _, chunk = ...; if type(chunk) == "table" and chunk.choices then got = got + 1 end end
      -- events 5 ms apart: after the first, content chunks take the fast path
      local res = assert(client():chat{ messages = msgs(), stream = true, on_delta = cb,
        headers = { ["X-Sim-Scenario"] = "slow_chunks=5" } })
      assert.is_true(got > 5, form)
      assert.are.equal("Echo: " .. TEXT, res.text)
    end
  end)
end)
