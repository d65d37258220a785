-- One attempt pipeline for plain and streamed calls (slm.pipeline): the
-- same limits, fallback and fields either way; resources given back on
-- every exit path without __gc or __close; misuse caught up front.
local slm = require "slm"
local H = require "tests.helpers"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

local function client(opts) return H.sim_client(up, opts) end
local msgs = H.msgs

-- Read a stream to its end with next() only: no generic for, no <close>.
local function drain(s)
  local parts = {}
  while true do
    local t = s:next()
    if t == nil then break end
    parts[#parts + 1] = t
  end
  return table.concat(parts), s:result()
end

describe("streamed calls go through the same pipeline as plain ones", function()
  it("take from the rpm and tpm buckets", function()
    local c = client{ rpm = 5, tpm = 100000 }
    assert(c:chat{ messages = msgs(), stream = true })
    local _, res = drain(c:stream{ messages = msgs() })
    assert(res)
    assert.is_true(c.rpm_bucket.level < 3.5, "rpm level " .. c.rpm_bucket.level)
    assert.is_true(c.tpm_bucket.level < 100000 - 2 * 9, "tpm level " .. c.tpm_bucket.level)
  end)

  it("client:stream tries the fallback models", function()
    local c = client{ fallback = { "gpt-4o-mini" }, max_retries = 0 }
    local text, res, err = drain(c:stream{ messages = msgs("fb"), model = "sim:status=503" })
    assert.is_nil(err)
    assert.are.equal("Echo: fb", text)
    assert.are.equal("gpt-4o-mini", res.model)
    assert.are.equal("server", res.fallback_errors[1].kind)
    assert.are.equal(2, up:stats().requests)
  end)

  it("streamed Responses carry request_id and headers", function()
    local res = assert(client():chat{ messages = msgs(), stream = true })
    assert.matches("^req_sim_%d+$", res.request_id)
    assert.are.equal(res.request_id, res.headers["x-request-id"])
    local _, r2 = drain(client():stream{ messages = msgs() })
    assert.matches("^req_sim_%d+$", r2.request_id)
  end)
end)

describe("resources are given back on every path", function()
  it("a call that raises after taking its slot gives it back", function()
    local rt = {}
    for k, v in pairs(require "slm.transport.curl") do rt[k] = v end
    local raise = true
    local open = rt.open
    rt.open = function(req)
      if raise then raise = false; error("transport exploded") end
      return open(req)
    end
    local b = slm.budget{ usd = 1 }
    local c = client{ transport = rt, max_concurrency = 1, budget = b }
    assert.has_error(function() c:chat{ messages = msgs() } end, "transport exploded")
    assert.are.same({ 0, 0 }, { b:reserved() })
    -- the one slot is free again: this would wait for ever otherwise
    assert(c:chat{ messages = msgs() })
  end)

  it("a rate limiter that raises gives back the reservation (plain and streamed)", function()
    local b = slm.budget{ usd = 1 }
    local c = client{ budget = b, rpm = { take = function() error("limiter down: connection refused") end } }
    assert.has_error(function() c:chat{ messages = msgs() } end, "limiter down: connection refused")
    assert.are.same({ 0, 0 }, { b:reserved() })
    assert.has_error(function() drain(c:stream{ messages = msgs() }) end, "limiter down: connection refused")
    assert.are.same({ 0, 0 }, { b:reserved() })
  end)

  it("a quota's semaphore that raises gives back the client's own slot", function()
    local n = 0
    local sem = { release = function() end,
      acquire = function() n = n + 1; if n == 1 then error("quota semaphore down") end; return "t" end }
    local quotas = { consumer = function() return { display = "consumer:x", sem = sem } end }
    local b = slm.budget{ usd = 1 }
    local c = client{ max_concurrency = 1, quotas = quotas, budget = b }
    assert.has_error(function() c:chat{ messages = msgs(), consumer = "alice" } end, "quota semaphore down")
    assert.are.same({ 0, 0 }, { b:reserved() })
    -- the one slot is free again: this would wait for ever otherwise
    assert(c:chat{ messages = msgs(), consumer = "alice" })
  end)

  it("a budget that raises while reserving gives back what another budget held", function()
    local b = slm.budget{ usd = 1 }
    local qb = { reserve = function() error("quota budget down") end, settle = function() end }
    local quotas = { consumer = function() return { display = "consumer:x", budget = qb } end }
    local c = client{ quotas = quotas, budget = b }
    assert.has_error(function() c:chat{ messages = msgs(), consumer = "alice" } end, "quota budget down")
    assert.are.same({ 0, 0 }, { b:reserved() })
  end)

  it("an on_delta that raises gives back the slot and the reservation", function()
    local b = slm.budget{ usd = 1 }
    local c = client{ max_concurrency = 1, budget = b }
    assert.has_error(function()
      c:chat{ messages = msgs(), stream = true, on_delta = function() error("callback exploded") end }
    end, "callback exploded")
    assert.are.same({ 0, 0 }, { b:reserved() })
    local usd = b:spent()
    assert.is_true(usd > 0) -- the prompt and what arrived were billed
    assert(c:chat{ messages = msgs() })
  end)

  it("a stream read to its end with next() gives its slot back, no __close needed", function()
    local b = slm.budget{ usd = 1 }
    local c = client{ max_concurrency = 1, budget = b }
    local s = c:stream{ messages = msgs() }
    local text, res = drain(s)
    assert.are.equal("Echo: hello", text)
    assert(res)
    assert.are.same({ 0, 0 }, { b:reserved() })
    assert(c:chat{ messages = msgs() })
    -- and one that fails, too
    local _, _, err = drain(c:stream{ messages = msgs(), headers = { ["X-Sim-Scenario"] = "status=400" } })
    assert.are.equal("invalid_request", err.kind)
    assert(c:chat{ messages = msgs() })
  end)

  it("a stream left early and closed gives its slot back", function()
    local c = client{ max_concurrency = 1 }
    local s = c:stream{ messages = msgs("a longer text to stream in pieces") }
    assert.is_string(s:next())
    s:close()
    local res, err = s:result()
    assert.is_nil(res)
    assert.are.equal("cancelled", err.kind)
    assert(c:chat{ messages = msgs() })
  end)

  it("s:close() from another task wakes the task blocked in the stream", function()
    local c = client()
    local got, blocked_err
    slm.run(function()
      local s = c:stream{ messages = msgs(), model = "sim:stall=3000" }
      local parts = {}
      local reader = slm.spawn(function()
        for t in s do parts[#parts + 1] = t end
        got = table.concat(parts)
        local _, err = s:result()
        blocked_err = err
      end)
      -- the reader has text, then blocks in the stall
      for _ = 1, 500 do
        if #parts > 0 then break end
        slm.sleep(0.01)
      end
      slm.sleep(0.1)
      s:close()
      reader:wait()
    end)
    assert.are.equal("cancelled", blocked_err.kind)
    assert.are.equal(got, blocked_err.partial.text)
    assert.is_true(#got > 0)
  end)

  it("s:close() from another task before the stream started", function()
    local c = client{ max_concurrency = 1 }
    local errs = {}
    slm.run(function()
      local hold = c:stream{ messages = msgs(), model = "sim:delay=400" }
      local holder = slm.spawn(function() drain(hold) end)
      local s = c:stream{ messages = msgs() }
      local waiter = slm.spawn(function() local _, _, e = drain(s); errs[1] = e end)
      slm.sleep(0.1) -- waiter waits for the client's one slot
      s:close()
      waiter:wait()
      holder:wait()
    end)
    assert.are.equal("cancelled", errs[1].kind)
    assert.are.equal(1, up:stats().requests) -- the closed one never went out
  end)
end)

describe("usage beyond what the request allowed", function()
  -- a runtime whose every request gets `body` back, 200, from no server
  -- body: a string, or a function of the request's model giving one
  local function canned(body)
    local rt = {}
    for k, v in pairs(require "slm.transport.curl") do rt[k] = v end
    rt.open = function(req)
      local reply = body
      if type(body) == "function" then reply = body(require("slm.json").decode(req.body).model) end
      local sent = false
      return {
        response = function() return 200, { ["content-type"] = "application/json" } end,
        read = function() if sent then return nil end; sent = true; return reply end,
        result = function() return true end,
        cancel = function() end,
        info = function() return {} end,
      }
    end
    return rt
  end

  it("is counted instead, so a budget is not overspent by an inflated completion count", function()
    local body = require("slm.json").encode{ id = "x", object = "chat.completion", model = "gpt-4o-mini",
      choices = { { index = 0, message = { role = "assistant", content = "Fine, thanks." }, finish_reason = "stop" } },
      usage = { prompt_tokens = 12, completion_tokens = 1000000, total_tokens = 1000012 } }
    local b = slm.budget{ usd = 0.1 }
    local c = client{ transport = canned(body), budget = b }
    local res = assert(c:chat{ messages = msgs(), max_tokens = 20 })
    assert.is_true(res.usage.estimated)
    assert.matches("completion_tokens = 1000000", res.usage_problem)
    assert.is_true(res.usage.completion_tokens <= 20, tostring(res.usage.completion_tokens))
    local usd = b:spent()
    assert.is_true(usd < 1e-4, "spent " .. usd)
    assert.is_true(b:remaining() > 0.0999)
  end)

  it("a billed reply that could not be used is in the call's billed totals, not lost", function()
    local json = require "slm.json"
    local answer = function(model)
      if model == "gpt-4o-mini" then -- billed, but no choices: a protocol error, fallback moves on
        return json.encode{ id = "a", object = "chat.completion", model = model,
          usage = { prompt_tokens = 900, completion_tokens = 7, total_tokens = 907 } }
      end
      return json.encode{ id = "b", object = "chat.completion", model = model,
        choices = { { index = 0, message = { role = "assistant", content = "ok" }, finish_reason = "stop" } },
        usage = { prompt_tokens = 12, completion_tokens = 1, total_tokens = 13 } }
    end
    local b = slm.budget{ usd = 1 }
    local c = client{ transport = canned(answer), budget = b, fallback = { "hermes-3-405b" }, max_retries = 0 }
    local res = assert(c:chat{ messages = msgs() })
    assert.are.equal("hermes-3-405b", res.model)
    assert.are.equal("protocol", res.fallback_errors[1].kind)
    local bl = res.billed
    assert.is_table(bl)
    assert.is_true(bl.prompt_tokens > res.usage.prompt_tokens, "billed " .. bl.prompt_tokens)
    assert.are.equal(bl.prompt_tokens + bl.completion_tokens, bl.total_tokens)
    assert.is_true(bl.cost > res.cost)
    assert.are.equal(bl.cost, (b:spent()))
    assert.are.equal(bl.cost, c.stats.cost)
    -- and an error that was billed says so too
    local c2 = client{ transport = canned(answer), max_retries = 0 }
    local _, err = c2:chat{ messages = msgs() }
    assert.are.equal("protocol", err.kind)
    assert.is_true(err.billed.prompt_tokens > 0)
    assert.are.equal(c2.stats.cost, err.billed.cost)
    assert.is_true(err.billed.cost > 0)
  end)
end)

describe("concurrency", function()
  it("slm.map with concurrency 50 over one client puts 50 requests in flight", function()
    local c = client()
    local list = {}
    for i = 1, 50 do list[i] = i end
    local res, errs = slm.map(list, function() return c:chat{ messages = msgs(), model = "sim:delay=1000" } end,
      { concurrency = 50 })
    assert.are.same({}, errs)
    assert.are.equal(50, #res)
    assert.are.equal(50, up:stats().max_in_flight)
  end)
end)

describe("misuse is caught in slm.client(), naming the option", function()
  for _, opt in ipairs{ "api_key", "user_agent", "organization", "project" } do
    for _, bad in ipairs{ "a\r\nX-Injected: 1", "a\nb", "a\0b" } do
      it(("%s with %q"):format(opt, bad), function()
        local ok, err = pcall(slm.client, { base_url = up.url, [opt] = bad })
        assert.is_false(ok)
        assert.matches("option '" .. opt .. "' must be", err)
        assert.is_nil(err:find(bad, 1, true)) -- the value itself is not echoed
      end)
    end
  end
  it("base_url with CR, LF, NUL or spaces", function()
    for _, bad in ipairs{ up.url .. "\r\n", up.url .. "\0x", up.url .. " x" } do
      local ok, err = pcall(slm.client, { base_url = bad })
      assert.is_false(ok)
      assert.matches("option 'base_url' must be", err)
    end
  end)
  it("header values with CR, LF or NUL, and names that are not tokens", function()
    for _, h in ipairs{ { ["X-A"] = "a\0b" }, { ["X-A"] = "a\rb" }, { ["X A"] = "v" }, { ["X:A"] = "v" } } do
      local ok, err = pcall(slm.client, { base_url = up.url, headers = h })
      assert.is_false(ok)
      assert.matches("option 'headers' must be", err)
    end
    local c = client()
    local ok, err = pcall(c.chat, c, { messages = msgs(), headers = { ["X-A"] = "a\0b" } })
    assert.is_false(ok)
    assert.matches("option 'headers' must be", err)
  end)
  it("timeouts of math.huge (or NaN) by their own name", function()
    for _, opt in ipairs{ "timeout", "connect_timeout", "stall_timeout" } do
      for _, bad in ipairs{ math.huge, 0 / 0, -1 } do
        local ok, err = pcall(slm.client, { base_url = up.url, [opt] = bad })
        assert.is_false(ok)
        assert.matches("option '" .. opt .. "' must be a positive finite number of seconds", err)
      end
    end
    local c = client()
    local ok, err = pcall(c.chat, c, { messages = msgs(), timeout = math.huge })
    assert.is_false(ok)
    assert.matches("option 'timeout' must be", err)
    assert.are.equal(0, up:stats().requests)
  end)
  it("an environment variable that is not a valid value, naming it", function()
    local out = H.run_lua([[
      local ok, err = pcall(require("slm").client)
      print(ok, err)]], "SLM_BASE_URL='ftp://x'")
    assert.matches("false", out)
    assert.matches("SLM_BASE_URL", out)
  end)
end)

describe("errors a new user meets", function()
  it("no API key on OpenAI's endpoint: an auth error before any network attempt, naming the variables", function()
    local out = H.run_lua([[
      local slm = require "slm"
      local c = slm.client{}
      local res, err = c:chat{ messages = { { role = "user", content = "hi" } } }
      print(err.kind, err.attempts, c.stats.attempts)
      print(tostring(err))]], "env -u SLM_API_KEY -u OPENAI_API_KEY -u SLM_BASE_URL -u OPENAI_BASE_URL")
    assert.matches("^auth\t0\t0\n", out)
    assert.matches("SLM_API_KEY", out)
    assert.matches("OPENAI_API_KEY", out)
    assert.matches("SLM_BASE_URL", out)
  end)

  it("when every model fails, the error names the requested model and each failure", function()
    local c = client{ max_retries = 0, fallback = { "sim:status=502", "sim:delay=10000" }, timeout = 2 }
    local _, err = c:chat{ messages = msgs(), model = "sim:status=503" }
    assert.are.equal(3, #err.fallback_errors)
    assert.are.equal("sim:status=503", err.requested_model)
    local s = tostring(err)
    assert.matches("^slm: timeout: sim:status=503 and its 2 fallback models failed: ", s)
    assert.matches("sim:status=503: server %(HTTP 503%)", s)
    assert.matches("sim:status=502: server %(HTTP 502%)", s)
    assert.matches("sim:delay=10000: timeout", s)
  end)
end)

describe("max_completion_tokens counts like max_tokens", function()
  it("in the context check", function()
    local c = client()
    local _, err = c:chat{ messages = msgs(), max_completion_tokens = 200000 }
    assert.are.equal("context_length", err.kind)
    assert.are.equal(0, up:stats().requests)
    assert.has_error(function() c:chat{ messages = msgs(), max_completion_tokens = 0 } end)
  end)
  it("in the budget's reservation", function()
    local b = slm.budget{ tokens = 1000 }
    local c = client{ budget = b }
    local _, err = c:chat{ messages = msgs(), max_completion_tokens = 5000 }
    assert.are.equal("budget", err.kind)
    assert(c:chat{ messages = msgs(), max_completion_tokens = 500 })
  end)
end)

describe("images of unknown size", function()
  local function three_urls()
    local content = { { type = "text", text = "compare these" } }
    for i = 1, 3 do
      content[#content + 1] = { type = "image_url", image_url = { url = "https://example.invalid/" .. i .. ".jpg" } }
    end
    return { { role = "user", content = content } }
  end
  it("the context check refuses only what cannot fit at the smallest count", function()
    -- worst case 3 x 48,169 > 128K; at one tile each 3 x 8,500 fits
    local res, err = client():chat{ messages = three_urls(), max_tokens = 100 }
    assert.is_nil(err)
    assert(res)
    local _, e2 = client():chat{ messages = three_urls(), max_tokens = 110000 }
    assert.are.equal("context_length", e2.kind)
    assert.matches("at least", e2.message)
  end)
  it("a budget reserves the largest", function()
    local b = slm.budget{ tokens = 100000 }
    local _, err = client{ budget = b }:chat{ messages = three_urls(), max_tokens = 100 }
    assert.are.equal("budget", err.kind)
    assert.is_true(err.needed_tokens > 3 * 48169)
  end)
  it("counts are flagged as estimates", function()
    local n, info = slm.count({ messages = three_urls() }, "gpt-4o-mini")
    assert.is_true(info.estimate)
    assert.are.equal(n - 3 * (48169 - 8500), info.min)
  end)
end)

describe("a call never sends its body more often than max_retries + 1", function()
  -- /reset-reused/ drops every request that comes on a reused connection
  -- after reading it: the server counts each POST it saw
  local function warm_pool(c, n)
    local list = {}
    for i = 1, n do list[i] = i end
    slm.map(list, function() return c:chat{ messages = msgs(), headers = { ["X-Sim-Scenario"] = "delay=150" } } end,
      { concurrency = n })
  end
  local function reset_reused_client(opts)
    local o = { base_url = up.base .. "/reset-reused/v1" }
    for k, v in pairs(opts or {}) do o[k] = v end
    return client(o)
  end

  it("with max_retries = 0: one POST, one attempt, a connect error", function()
    local c = reset_reused_client{ max_retries = 0 }
    warm_pool(c, 6)
    up:reset()
    local res, err = c:chat{ messages = msgs("once") }
    assert.is_nil(res)
    assert.are.equal(1, up:stats().requests, "POSTs the server saw")
    assert.are.equal("connect", err.kind)
    assert.are.equal(1, err.attempts)
    assert.are.equal(1, c.stats.attempts - 6)
  end)

  for _, stream in ipairs{ false, true } do
    it("with max_retries = 2: the retry goes out on a connection of its own and succeeds (" ..
        (stream and "streamed" or "plain") .. ")", function()
      local c = reset_reused_client{ max_retries = 2 }
      warm_pool(c, 6)
      up:reset()
      local res = assert(c:chat{ messages = msgs("twice"), stream = stream })
      assert.are.equal("Echo: twice", res.text)
      assert.are.equal(2, res.attempts)
      assert.are.equal(2, up:stats().requests, "POSTs the server saw")
    end)
  end
end)

describe("a request body JSON cannot carry", function()
  it("is an invalid_request error naming the place, and nothing is sent", function()
    local c = client()
    local res, err = c:chat{ messages = { { role = "system", content = "ok" },
      { role = "user", content = "caf\xe9 au lait" } } } -- Latin-1, not UTF-8
    assert.is_nil(res)
    assert.are.equal("invalid_request", err.kind)
    assert.matches("invalid UTF%-8 at byte 4 of the string at %$%.messages%[2%]%.content", err.message)
    local _, e2 = c:chat{ messages = msgs(), temperature = 0 / 0 }
    assert.are.equal("invalid_request", e2.kind)
    assert.matches("temperature", e2.message)
    assert.are.equal(0, up:stats().requests)
    assert.are.equal(0, c.stats.attempts)
  end)
  it("an empty array when asked for: slm.array{} goes out as []", function()
    assert(client():chat{ messages = msgs(), stop = slm.array{ "x" }, metadata = slm.json.object() })
    local raw = H.last(up).raw_body
    assert.matches('"stop":%["x"%]', raw)
    assert.matches('"metadata":{}', raw)
    assert(client():chat{ messages = msgs(), logit_bias = {}, modalities = slm.array() })
    raw = H.last(up).raw_body
    assert.is_nil(raw:find('"modalities"', 1, true)) -- empty array fields are not sent at all
    assert.matches('"logit_bias":{}', raw)
  end)
end)
