-- slm.client against the real nginx simulator: responses, every retry rule,
-- every error kind, option validation, key redaction, concurrency.
local slm = require "slm"
local core = require "slm.core"
local H = require "tests.helpers"
local json = require "slm.json"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

local KEY = "sk-test-good"
local function client(opts)
  local o = { base_url = up.url, api_key = KEY, model = "gpt-4o-mini", timeout = 10 }
  for k, v in pairs(opts or {}) do o[k] = v end
  return slm.client(o)
end

local function msgs(text) return { { role = "user", content = text or "hello" } } end

-- A chat with a scenario; each call gets its own attempt-counting key.
local nkey = 0
local function scenario(c, sc, extra)
  nkey = nkey + 1
  local key = "k" .. nkey
  local req = { messages = msgs(), model = "sim:" .. sc, headers = { ["X-Sim-Key"] = key } }
  for k, v in pairs(extra or {}) do req[k] = v end
  local t0 = core.now()
  local res, err = c:chat(req)
  return res, err, core.now() - t0, key
end

local function seen(key) return (up:stats().by_key or {})[key] or 0 end

describe("client:chat", function()
  it("returns a Response with text, usage, cost and timings", function()
    local c = client()
    local res, err = c:chat{ messages = msgs("Where is my parcel?") }
    assert.is_nil(err)
    assert.are.equal("Echo: Where is my parcel?", res.text)
    assert.are.equal("assistant", res.message.role)
    assert.are.equal("stop", res.finish_reason)
    assert.are.same({}, res.tool_calls)
    assert.are.equal("gpt-4o-mini", res.model)
    assert.matches("^chatcmpl%-", res.id)
    assert.is_true(res.usage.prompt_tokens > 0 and res.usage.completion_tokens > 0)
    local expect = (res.usage.prompt_tokens * 0.15 + res.usage.completion_tokens * 0.60) / 1e6
    assert.is_true(math.abs(res.cost - expect) < 1e-12)
    assert.are.equal(expect, slm.cost("gpt-4o-mini", res.usage))
    assert.are.equal(1, res.attempts)
    assert.is_true(res.latency > 0 and res.latency < 5)
    assert.are.equal("table", type(res.raw))
    assert.are.equal(1, #res.choices)
    assert.are.equal(res.text, tostring(res))
  end)

  it("prices Hermes 3 from the model table", function()
    local c = client{ model = "nousresearch/hermes-3-llama-3.1-405b" }
    local res = assert(c:chat{ messages = msgs() })
    local expect = (res.usage.prompt_tokens * 1.00 + res.usage.completion_tokens * 0.30) / 1e6
    assert.is_true(math.abs(res.cost - expect) < 1e-12)
  end)

  it("returns every choice when n > 1", function()
    local res = assert(client():chat{ messages = msgs("hi"), n = 3 })
    assert.are.equal(3, #res.choices)
    assert.are.equal(res.choices[1].text, res.text)
    assert.are_not.equal(res.choices[1].text, res.choices[2].text)
  end)

  it("returns tool calls", function()
    local res = assert(client():chat{ messages = msgs("weather in Paris"), tools = { {
      type = "function", ["function"] = { name = "get_weather", parameters = { type = "object" } } } } })
    assert.are.equal("tool_calls", res.finish_reason)
    assert.are.equal("get_weather", res.tool_calls[1]["function"].name)
    assert.are.equal("", res.text)
  end)

  it("passes request body fields through untouched and sends our headers", function()
    local c = client{ headers = { ["X-Title"] = "triage bot" } }
    assert(c:chat{ messages = msgs(), temperature = 0.25, seed = 7, provider = { order = { "a", "b" } },
      max_tokens = 100, response_format = { type = "json_object" } })
    local last = H.last(up)
    assert.are.equal(0.25, last.body.temperature)
    assert.are.equal(7, last.body.seed)
    assert.are.same({ order = { "a", "b" } }, last.body.provider)
    assert.are.same({ type = "json_object" }, last.body.response_format)
    assert.are.equal("gpt-4o-mini", last.body.model)
    assert.is_nil(last.body.stream)
    assert.are.equal("Bearer " .. KEY, last.headers.authorization)
    assert.are.equal("lua-slm/" .. slm.VERSION, last.headers["user-agent"])
    assert.are.equal("application/json", last.headers.accept)
    assert.are.equal("triage bot", last.headers["x-title"])
    assert.matches("application/json", last.headers["content-type"])
    assert.is_nil(last.headers.expect)
  end)

  it("works from a plain script, inside slm.run and inside slm.map alike", function()
    local c = client()
    local a = assert(c:chat{ messages = msgs("one") }).text
    local b = slm.run(function() return assert(c:chat{ messages = msgs("two") }).text end)
    local r = slm.map({ "three", "four" }, function(s) return assert(c:chat{ messages = msgs(s) }).text end)
    assert.are.same({ "Echo: one", "Echo: two", "Echo: three", "Echo: four" }, { a, b, r[1], r[2] })
  end)
end)

describe("retries", function()
  it("retries 429 honouring retry-after-ms", function()
    local res, err, dt, key = scenario(client(), "status=429,retry_after_ms=150,fail=2")
    assert.is_nil(err)
    assert.are.equal(3, res.attempts)
    assert.are.equal(3, seen(key))
    assert.is_true(dt >= 0.3)
  end)

  it("retries 429 honouring retry-after in (fractional) seconds", function()
    local res, err, dt = scenario(client(), "status=429,retry_after=0.4,fail=1")
    assert.is_nil(err); assert.are.equal(2, res.attempts)
    assert.is_true(dt >= 0.4)
  end)

  it("retries 429 honouring retry-after as an HTTP date", function()
    local res, err, dt = scenario(client(), "status=429,retry_after_date=1,fail=1")
    assert.is_nil(err); assert.are.equal(2, res.attempts)
    assert.is_true(dt >= 0.2) -- HTTP dates have 1 s resolution
  end)

  it("ignores a retry-after beyond 60 s and uses backoff", function()
    local res, err, dt = scenario(client(), "status=429,retry_after=3600,fail=1")
    assert.is_nil(err); assert.are.equal(2, res.attempts)
    assert.is_true(dt >= 0.375 and dt < 5)
  end)

  for _, st in ipairs{ 408, 409, 500, 502, 503 } do
    it("retries status " .. st, function()
      local res, err, _, key = scenario(client(), "status=" .. st .. ",retry_after_ms=10,fail=1")
      assert.is_nil(err); assert.are.equal(2, res.attempts); assert.are.equal(2, seen(key))
    end)
  end

  for _, st in ipairs{ 400, 401, 402, 403, 404, 422 } do
    it("does not retry status " .. st .. " by default", function()
      local res, err, _, key = scenario(client(), "status=" .. st .. ",retry_after_ms=10,fail=1")
      assert.is_nil(res); assert.are.equal(1, err.attempts); assert.are.equal(1, seen(key))
      assert.are.equal(st, err.status)
    end)
  end

  it("x-should-retry: true retries even a 400 (as openai-python and -node do)", function()
    local res, err, _, key = scenario(client(), "status=400,should_retry=true,retry_after_ms=10,fail=1")
    assert.is_nil(err); assert.are.equal(2, res.attempts); assert.are.equal(2, seen(key))
  end)

  it("a retry-after of 0 or one that is not digits falls back to backoff", function()
    for _, v in ipairs{ "0", "0x3" } do
      local res, err, dt = scenario(client(), "status=429,retry_after=" .. v .. ",fail=1")
      assert.is_nil(err); assert.are.equal(2, res.attempts)
      assert.is_true(dt >= 0.375 and dt < 2.5, v .. " took " .. dt) -- 0.5 s less up to 25 % jitter
    end
  end)

  it("x-should-retry: false stops a retry", function()
    local _, err, _, key = scenario(client(), "status=503,should_retry=false,fail=1")
    assert.are.equal("server", err.kind); assert.are.equal(1, err.attempts); assert.are.equal(1, seen(key))
  end)

  it("x-should-retry: true forces a retry of another status", function()
    local res, err, _, key = scenario(client(), "status=418,should_retry=true,retry_after_ms=10,fail=1")
    assert.is_nil(err); assert.are.equal(2, res.attempts); assert.are.equal(2, seen(key))
  end)

  it("gives up after max_retries + 1 attempts", function()
    local _, err, _, key = scenario(client(), "status=503,retry_after_ms=10,fail=10")
    assert.are.equal("server", err.kind); assert.are.equal(3, err.attempts); assert.are.equal(3, seen(key))
    local _, err2, _, key2 = scenario(client{ max_retries = 0 }, "status=503,fail=10")
    assert.are.equal(1, err2.attempts); assert.are.equal(1, seen(key2))
  end)

  it("retries a connection closed without a reply", function()
    -- libcurl itself retries once when a *reused* keep-alive connection
    -- turns out dead, so the server may see one attempt more than we count
    local res, err, _, key = scenario(client(), "close,fail=2")
    assert.is_nil(err)
    assert.are.equal("Echo: hello", res.text)
    assert.are.equal(3, seen(key))
    assert.is_true(res.attempts >= 1 and res.attempts <= 3)
  end)

  it("retries a refused connection", function()
    local c = slm.client{ base_url = "http://127.0.0.1:1/v1", api_key = KEY, max_retries = 2 }
    local t0 = core.now()
    local _, err = c:chat{ messages = msgs() }
    assert.are.equal("connect", err.kind)
    assert.are.equal(3, err.attempts)
    assert.is_true(core.now() - t0 >= 0.375 + 0.75)
  end)

  it("retries a timeout before the reply", function()
    -- (the retry must answer within the timeout too: 2 s for a loaded machine)
    local res, err = scenario(client{ timeout = 2 }, "delay=10000,fail=1")
    assert.is_nil(err); assert.are.equal(2, res.attempts)
  end)

  it("uses exponential backoff without a retry-after", function()
    local _, err, dt = scenario(client{ max_retries = 2 }, "status=500,fail=10")
    assert.are.equal(3, err.attempts)
    -- 0.5 s and 1 s, each less up to 25 % jitter
    assert.is_true(dt >= 0.375 + 0.75, "took " .. dt)
  end)
end)

describe("error kinds", function()
  local function kind_of(sc, opts)
    local _, err = scenario(client(opts or { max_retries = 0 }), sc)
    return err
  end
  it("401 and 403 are auth", function()
    assert.are.equal("auth", kind_of("status=401").kind)
    assert.are.equal("auth", kind_of("status=403").kind)
    local c = client{ api_key = "sk-wrong-key-123456", max_retries = 0 }
    local _, err = c:chat{ messages = msgs(), model = "sim:auth" }
    assert.are.equal("auth", err.kind)
    assert.are.equal(401, err.status)
  end)
  it("429 is rate_limit with retry_after", function()
    local err = kind_of("status=429,retry_after=2")
    assert.are.equal("rate_limit", err.kind); assert.are.equal(2, err.retry_after)
  end)
  it("400 context_length_exceeded is context_length, with the provider's message", function()
    local err = kind_of("status=400,code=context_length_exceeded")
    assert.are.equal("context_length", err.kind)
    assert.matches("maximum context length", err.message)
    assert.are.equal("context_length_exceeded", err.code)
  end)
  it("other 400, 404 and 422 are invalid_request", function()
    assert.are.equal("invalid_request", kind_of("status=400").kind)
    assert.are.equal("invalid_request", kind_of("status=404").kind)
    assert.are.equal("invalid_request", kind_of("status=422").kind)
  end)
  it(">= 500 is server, other statuses http", function()
    assert.are.equal("server", kind_of("status=500").kind)
    assert.are.equal("server", kind_of("status=503").kind)
    assert.are.equal("http", kind_of("status=402").kind)
    assert.are.equal("http", kind_of("status=418").kind)
  end)
  it("a slow server is timeout", function()
    local err = kind_of("delay=3000", { timeout = 0.3, max_retries = 0 })
    assert.are.equal("timeout", err.kind)
  end)
  it("a dead server is connect", function()
    local c = slm.client{ base_url = "http://127.0.0.1:1/v1", api_key = KEY, max_retries = 0 }
    local res, err = c:chat{ messages = msgs() }
    assert.is_nil(res); assert.are.equal("connect", err.kind)
  end)
  it("a closed connection is connect", function()
    assert.are.equal("connect", kind_of("close").kind)
  end)
  it("garbage replies are protocol errors and are not retried", function()
    for _, sc in ipairs{ "malformed", "empty", "html", "wrong_shape" } do
      local _, err, _, key = scenario(client(), sc)
      assert.are.equal("protocol", err.kind, sc)
      assert.are.equal(1, seen(key), sc)
    end
  end)
  it("errors print their kind, status and message", function()
    local err = kind_of("status=429")
    assert.matches("^slm: rate_limit %(HTTP 429%)", tostring(err))
  end)
end)

describe("fallback", function()
  it("tries the next model when one keeps failing", function()
    local c = client{ fallback = { "gpt-4o-mini" }, max_retries = 1 }
    nkey = nkey + 1
    local res, err = c:chat{ messages = msgs("fb"), model = "sim:status=503,retry_after_ms=10,fail=99",
      headers = { ["X-Sim-Key"] = "fb" .. nkey } }
    assert.is_nil(err)
    assert.are.equal("gpt-4o-mini", res.model)
    assert.are.equal("Echo: fb", res.text)
    assert.are.equal(1, #res.fallback_errors)
    assert.are.equal("server", res.fallback_errors[1].kind)
    assert.are.equal(2, res.fallback_errors[1].attempts)
  end)
  it("does not fall back on auth errors", function()
    local c = client{ fallback = { "gpt-4o-mini" }, max_retries = 0 }
    local _, err = c:chat{ messages = msgs(), model = "sim:status=401" }
    assert.are.equal("auth", err.kind)
    assert.are.equal(1, up:stats().requests)
  end)
end)

describe("options", function()
  it("rejects unknown client options, naming them", function()
    assert.has_error(function() slm.client{ base_url = up.url, timout = 5 } end,
      "slm.client: unknown option 'timout'")
  end)
  it("rejects wrongly typed client options, naming them", function()
    assert.has_error(function() slm.client{ max_retries = "3" } end,
      "slm.client: option 'max_retries' must be a non-negative integer, got string")
    assert.has_error(function() slm.client{ base_url = "ftp://x" } end)
    assert.has_error(function() slm.client{ fallback = "gpt-4o-mini" } end)
    assert.has_error(function() slm.client{ headers = { ["X-A"] = "a\r\nb" } } end)
    assert.has_error(function() slm.client{ max_concurrency = 0 } end)
    assert.has_error(function() slm.client("x") end)
  end)
  it("rejects malformed requests at once", function()
    local c = client()
    assert.has_error(function() c:chat() end, "slm: client:chat expects a request table, got nil")
    assert.has_error(function() c:chat{} end, "slm: client:chat: 'messages' must be a non-empty list of messages")
    assert.has_error(function() c:chat{ messages = { "hi" } } end)
    assert.has_error(function() c:chat{ messages = msgs(), stream = "yes" } end,
      "slm: client:chat: option 'stream' must be a boolean, got string")
    assert.has_error(function() c:chat{ messages = msgs(), max_tokens = -1 } end)
    -- messages as OpenAI's spec requires them (content for system, developer,
    -- user and tool; tool_call_id for tool; content or tool_calls for assistant)
    local function says(m, text)
      assert.has_error(function() c:chat{ messages = { m } } end, "slm: client:chat: messages[1] " .. text)
    end
    local parts = "needs 'content': a string or a non-empty list of content parts"
    says({ role = "user" }, "(user) " .. parts)
    says({ role = "user", content = 5 }, "(user) " .. parts)
    says({ role = "user", content = {} }, "(user) " .. parts)
    says({ role = "system", content = json.null }, "(system) " .. parts)
    -- one part on its own (an object, not a list), parts that are not parts
    says({ role = "user", content = { type = "text", text = "hi" } },
      "(user) " .. parts .. " (a list of content parts, not one part on its own: wrap it in { })")
    says({ role = "user", content = { "hi" } }, "(user) " .. parts .. " (content part 1 is not a table with a string 'type')")
    says({ role = "user", content = { { type = "text" } } }, "(user) " .. parts .. " (content part 1 (text) has no string 'text')")
    says({ role = "user", content = { [1] = { type = "text", text = "a" }, x = 1 } }, "(user) " .. parts)
    says({ role = "tool", content = "42" }, "(tool) needs 'tool_call_id': the id of the tool call it answers")
    says({ role = "assistant" }, "(assistant) needs 'content' or 'tool_calls'")
    says({ role = "assistant", content = true }, "(assistant) has a 'content' that is neither a string nor a list of content parts")
    assert.are.equal(0, up:stats().requests)
    -- and what is valid goes out: an assistant turn of tool calls with null content, its tool reply, parts
    local call = { id = "call_1", type = "function", ["function"] = { name = "f", arguments = "{}" } }
    assert(c:chat{ messages = { { role = "user", content = { { type = "text", text = "hi" } } },
      { role = "assistant", content = json.null, tool_calls = { call } },
      { role = "tool", tool_call_id = "call_1", content = "42" }, { role = "user", content = "and?" } } })
    assert.are.equal(1, up:stats().requests)
  end)
  it("never blocks an nginx worker: inside nginx the cosocket runtime, libcurl only when named", function()
    -- an nginx as far as slm.runtime can tell (tests/ngx_transport_spec.lua runs the real one)
    local phase = "init"
    _G.ngx = { socket = { tcp = function() end }, thread = {}, get_phase = function() return phase end,
      sleep = function() end, log = function() end, ERR = 4 }
    package.loaded["ngx.semaphore"] = { new = function() return {} end }
    local ok, a, b, c = pcall(function()
      local made_in_init = slm.client{ base_url = up.url } -- a client made in init_by_lua
      phase = "content"
      return made_in_init, slm.client{ base_url = up.url }, slm.client{ base_url = up.url, transport = "curl" }
    end)
    _G.ngx = nil
    package.loaded["ngx.semaphore"], package.loaded["slm.transport.ngx"] = nil, nil
    assert.is_true(ok, a)
    assert.equal("ngx", a.runtime.name)
    assert.equal("ngx", b.runtime.name)
    assert.equal("curl", c.runtime.name)
    assert.equal("curl", slm.client{ base_url = up.url }.runtime.name) -- outside nginx
  end)

  it("takes base_url, api_key and model from the environment", function()
    local cmd = ("SLM_BASE_URL=%s SLM_API_KEY=sk-env-key SLM_MODEL=gpt-4o-mini LUA_PATH='lua/?.lua;lua/?/init.lua;;' "
      .. "LUA_CPATH='%s' lua5.4 -e 'local c = require(\"slm\").client(); local r = assert(c:chat{messages={{role=\"user\",content=\"env\"}}}); print(r.text)'")
      :format(up.url, package.cpath)
    local f = io.popen(cmd)
    local out = f:read("a"); f:close()
    assert.are.equal("Echo: env\n", out)
    assert.are.equal("Bearer sk-env-key", H.last(up).headers.authorization)
  end)
end)

describe("the API key", function()
  local SECRET = "sk-very-secret-0123456789"
  it("never appears in tostring(client), a dump of the client, or errors", function()
    local c = client{ api_key = SECRET, max_retries = 0 }
    assert.is_nil(tostring(c):find(SECRET, 1, true))
    for k, v in pairs(c) do
      assert.is_nil(tostring(v):find(SECRET, 1, true), k)
      if type(v) == "table" then
        for k2, v2 in pairs(v) do assert.is_nil(tostring(v2):find(SECRET, 1, true), k .. "." .. tostring(k2)) end
      end
    end
    -- the simulator echoes the key it got in its 401 message; we redact it
    local _, err = c:chat{ messages = msgs(), model = "sim:auth" }
    assert.are.equal("auth", err.kind)
    assert.is_nil(tostring(err):find(SECRET, 1, true))
    assert.is_nil(err.message:find(SECRET, 1, true))
    local _, err2 = slm.client{ base_url = "http://127.0.0.1:1/v1", api_key = SECRET, max_retries = 0 }
      :chat{ messages = msgs() }
    assert.is_nil(tostring(err2):find(SECRET, 1, true))
  end)
end)

describe("concurrency", function()
  it("slm.map keeps `concurrency` requests in flight (seen by the server)", function()
    local c = client{ max_concurrency = 50 }
    local list = {}
    for i = 1, 24 do list[i] = "t" .. i end
    local res, errs = slm.map(list, function(s)
      return c:chat{ messages = msgs(s), model = "sim:delay=200" }
    end, { concurrency = 8 })
    assert.are.same({}, errs)
    for i = 1, 24 do assert.are.equal("Echo: t" .. i, res[i].text) end
    local st = up:stats()
    assert.are.equal(8, st.max_in_flight)
    assert.are.equal(24, st.requests)
  end)
  it("the client's max_concurrency caps requests in flight", function()
    local c = client{ max_concurrency = 3 }
    local list = {}
    for i = 1, 9 do list[i] = i end
    slm.map(list, function() return c:chat{ messages = msgs(), model = "sim:delay=150" } end, { concurrency = 9 })
    assert.are.equal(3, up:stats().max_in_flight)
  end)
  it("one failing item does not disturb the others", function()
    local c = client{ max_retries = 0 }
    local res, errs = slm.map({ "ok1", "bad", "ok2" }, function(s)
      return c:chat{ messages = msgs(s), model = s == "bad" and "sim:status=500" or "gpt-4o-mini" }
    end)
    assert.are.equal("Echo: ok1", res[1].text); assert.are.equal("Echo: ok2", res[3].text)
    assert.is_nil(res[2]); assert.are.equal("server", errs[2].kind)
  end)
  it("rpm takes one unit per request from the client's bucket", function()
    local c = client{ rpm = 3 }
    for _ = 1, 3 do assert(c:chat{ messages = msgs() }) end
    assert.is_true(c.rpm_bucket.level < 1)
  end)
  it("a rate bucket makes callers wait for capacity", function()
    local bucket = require("slm.ratelimit").new(2, 0.5) -- 2 per 0.5 s
    local t0 = core.now()
    for _ = 1, 4 do bucket:take(1) end -- 2 at once, then 2 more at 4/s
    local dt = core.now() - t0
    assert.is_true(dt >= 0.45, "took " .. dt)
  end)
end)
