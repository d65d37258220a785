-- The client against hostile and third-party servers (the simulator's
-- echo_key, usage, raw, llama_error, choices_empty, reply_model
-- directives): secrets never shown, untrusted numbers never counted, cut
-- replies classified as the connection failures they are, llama.cpp's and
-- Azure's ways of answering understood.
local slm = require "slm"
local H = require "tests.helpers"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

local SECRET = "sk-proj-very-secret-0123456789abcdefXYZ"

local function client(opts) return H.sim_client(up, opts, { api_key = SECRET, max_retries = 0 }) end
local function msgs(text) return H.msgs(text, "hello there") end

-- A chat with simulator directives in the X-Sim-Scenario header (the
-- model stays the client's, priced).
local function call(c, sc, extra)
  local req = { messages = msgs(), headers = { ["X-Sim-Scenario"] = sc } }
  for k, v in pairs(extra or {}) do
    if k == "headers" then
      for hk, hv in pairs(v) do req.headers[hk] = hv end
    else
      req[k] = v
    end
  end
  return c:chat(req)
end

-- Every string reachable from v (keys too), with the path to it.
local function strings(v, path, out, seen)
  out, seen, path = out or {}, seen or {}, path or "err"
  if type(v) == "string" then
    out[#out + 1] = { path, v }
  elseif type(v) == "table" and not seen[v] then
    seen[v] = true
    for k, x in pairs(v) do
      strings(k, path .. "[key]", out, seen)
      strings(x, path .. "." .. tostring(k), out, seen)
    end
  end
  return out
end

-- No piece of the secret (6 bytes or more) anywhere in the error.
local function assert_clean(err)
  assert.is_table(err)
  local texts = strings(err)
  texts[#texts + 1] = { "tostring(err)", tostring(err) }
  for _, t in ipairs(texts) do
    for i = 1, #SECRET - 5 do
      local piece = SECRET:sub(i, i + 5)
      assert.is_nil(t[2]:find(piece, 1, true), ("%s holds %q of the key: %s"):format(t[1], piece, t[2]))
    end
  end
end

describe("the API key never shows", function()
  it("in a JSON error that echoes it (message, param, a header, the body)", function()
    local res, err = call(client(), "echo_key=json")
    assert.is_nil(res)
    assert.are.equal("auth", err.kind)
    assert.matches("<redacted>", err.message)
    assert.is_table(err.body)
    assert.is_string(err.headers["x-echo-key"])
    assert_clean(err)
  end)

  it("in a non-JSON error body, half of the key at the cut included", function()
    local _, err = call(client(), "echo_key=text")
    assert.are.equal("server", err.kind)
    assert.matches("<redacted>", err.message)
    assert_clean(err)
  end)

  for _, form in ipairs{ "event", "chunk", "llama" } do
    it("in a stream's " .. form .. " error, and in err.partial", function()
      local deltas = {}
      local res, err = call(client(), "echo_key=" .. form, { stream = true,
        on_delta = function(t) deltas[#deltas + 1] = t end })
      assert.is_nil(res)
      assert.is_table(err.partial)
      assert.are.equal(table.concat(deltas), err.partial.text)
      assert_clean(err)
    end)
  end

  it("with fallback models: in every model's error", function()
    local c = client{ model = "sim:echo_key=text", fallback = { "sim:echo_key=json,status=503" } }
    local _, err = c:chat{ messages = msgs() }
    assert.are.equal(2, #err.fallback_errors)
    assert_clean(err)
  end)

  it("with fallback models that succeed: in res.fallback_errors", function()
    local c = client{ model = "sim:echo_key=json,status=503", fallback = { "gpt-4o-mini" } }
    local res = assert(c:chat{ messages = msgs() })
    assert.are.equal(1, #res.fallback_errors)
    assert.is_table(res.fallback_errors[1].body)
    assert_clean(res.fallback_errors)
    local s = c:stream{ messages = msgs() }
    res = assert(s:result())
    assert.are.equal(1, #res.fallback_errors)
    assert_clean(res.fallback_errors)
  end)

  it("nor a password inside base_url, in tostring(client) and errors", function()
    local url = up.url:gsub("^http://", "http://user:" .. SECRET .. "@")
    local c = client{ base_url = url }
    assert.is_nil(tostring(c):find(SECRET, 1, true))
    assert.matches("user:<redacted>@", tostring(c))
    assert.is_nil(c.base_url:find(SECRET, 1, true))
    local res = assert(c:chat{ messages = msgs() }) -- the password still goes to the server
    assert.are.equal("Echo: hello there", res.text)
    local _, err = call(c, "echo_key=text")
    assert_clean(err)
    -- a token as the user, no password
    local c2 = client{ base_url = up.url:gsub("^http://", "http://" .. SECRET .. "@") }
    assert.matches("http://<redacted>@", tostring(c2))
    assert.is_nil(tostring(c2):find(SECRET, 1, true))
  end)

  it("nor the base64 of base_url's user:password, which a server echoing Authorization shows", function()
    -- no API key: the transport sends the URL's credentials as Basic auth
    for _, form in ipairs{ { "user:" .. SECRET, "user:" .. SECRET }, { "us%65r:pa%73s-" .. SECRET, "user:pass-" .. SECRET },
      { SECRET, SECRET .. ":" } } do
      local b64 = require("slm.core").base64_encode(form[2])
      local c = slm.client{ base_url = "http://" .. form[1] .. "@" .. up.url:sub(8), max_retries = 0 }
      for _, sc in ipairs{ "echo_key=json", "echo_key=text" } do
        local _, err = call(c, sc)
        assert.is_table(err)
        assert.are.equal(sc == "echo_key=json" and "auth" or "server", err.kind)
        for _, t in ipairs(strings(err)) do
          assert.is_nil(t[2]:find(b64:sub(1, 12), 1, true), t[1] .. " holds the Basic credential: " .. t[2])
        end
        assert.is_nil(tostring(err):find(b64:sub(1, 12), 1, true))
        assert.matches("<redacted>", err.message)
      end
    end
  end)

  it("nor a request's own secret-looking header, the client knowing nothing of it", function()
    local c = slm.client{ base_url = up.url, max_retries = 0 } -- no key of its own
    local _, err = c:chat{ messages = msgs(), model = "sim:echo_key=json",
      headers = { Authorization = "Bearer " .. SECRET } }
    assert.are.equal("auth", err.kind)
    assert_clean(err)
    _, err = c:stream{ messages = msgs(), model = "sim:echo_key=event",
      headers = { Authorization = "Bearer " .. SECRET } }:result()
    assert_clean(err)
  end)

  it("nor a secret header's value in the client table", function()
    local c = slm.client{ base_url = up.url, headers = { ["api-key"] = SECRET } }
    assert_clean(c)
  end)

  it("nor a secret-looking header value (Azure's api-key)", function()
    local c = slm.client{ base_url = up.url, headers = { ["api-key"] = SECRET }, max_retries = 0 }
    local _, err = c:chat{ messages = msgs(), model = "sim:echo_key=json",
      headers = { Authorization = "Bearer " .. SECRET } }
    assert_clean(err)
  end)
end)

describe("usage reported by the provider is untrusted", function()
  for _, form in ipairs{ "nan", "inf", "neg", "float", "huge", "string" } do
    for _, stream in ipairs{ false, true } do
      it(("%s usage (%s) never reaches the cost, the stats or a budget"):format(form,
          stream and "streamed" or "plain"), function()
        local b = slm.budget{ usd = 1, tokens = 100000 }
        local c = client{ budget = b }
        local res = assert(call(c, "usage=" .. form, { stream = stream }))
        local u = res.usage
        for _, k in ipairs{ "prompt_tokens", "completion_tokens", "total_tokens" } do
          assert.are.equal("integer", math.type(u[k]), k)
          assert.is_true(u[k] >= 0 and u[k] < 1000, k .. " = " .. tostring(u[k]))
        end
        assert.are.equal(u.prompt_tokens + u.completion_tokens, u.total_tokens)
        assert.is_true(u.estimated)
        assert.matches("not used", res.usage_problem)
        -- the own count: the prompt as slm.count counts it
        assert.are.equal(slm.count({ messages = msgs() }, "gpt-4o-mini"), u.prompt_tokens)
        assert.is_true(res.cost > 0 and res.cost < 1e-3)
        assert.are.equal(res.cost, slm.cost("gpt-4o-mini", u))
        local st = c.stats
        assert.are.equal(u.prompt_tokens, st.prompt_tokens)
        assert.are.equal(res.cost, st.cost)
        local usd, tok = b:spent()
        assert.are.equal(res.cost, usd)
        assert.are.equal(u.total_tokens, tok)
        local ru, rt = b:remaining()
        assert.is_true(ru == ru and ru < 1 and rt < 100000)
      end)
    end
  end

  it("token counts are Lua integers", function()
    local res = assert(client():chat{ messages = msgs() })
    for _, k in ipairs{ "prompt_tokens", "completion_tokens", "total_tokens" } do
      assert.are.equal("integer", math.type(res.usage[k]), k)
    end
    assert.is_nil(res.usage.estimated)
    assert.are.equal(res.usage.total_tokens .. "", tostring(res.usage.total_tokens)) -- prints 27, not 27.0
  end)

  it("a NaN or negative provider cost is not taken", function()
    local c = slm.client{ base_url = up.url, api_key = SECRET, model = "my-own-model", max_retries = 0 }
    local res = assert(c:chat{ messages = msgs(), model = "sim:usage_cost=0.25" })
    assert.are.equal(0.25, res.cost) -- unknown model, the provider's own figure
    for _, bad in ipairs{ "nan", "neg" } do
      res = assert(c:chat{ messages = msgs(), model = "sim:usage_cost=" .. bad })
      assert.is_nil(res.cost)
      assert.matches("cost", res.usage_problem)
    end
  end)
end)

describe("prices", function()
  it("a model with no known price costs nil (unknown), never 0", function()
    local c = slm.client{ base_url = up.url, api_key = SECRET, model = "my-self-hosted-model", max_retries = 0 }
    local res = assert(c:chat{ messages = msgs() })
    assert.is_nil(res.cost)
    assert.are.equal(0, c.stats.cost)
    assert.are.equal(1, c.stats.unpriced)
  end)

  it("follow the model that answered when the table knows it (a dated snapshot)", function()
    local res = assert(client():chat{ messages = msgs(), model = "sim:reply_model=gpt-4o-mini-2024-07-18" })
    assert.are.equal("gpt-4o-mini-2024-07-18", res.model)
    assert.are.equal(slm.cost("gpt-4o-mini", res.usage), res.cost)
    -- gpt-4o-mini asked, Hermes answered (a gateway's routing): Hermes' prices
    res = assert(call(client(), "reply_model=nousresearch/hermes-3-llama-3.1-405b"))
    assert.are.equal("nousresearch/hermes-3-llama-3.1-405b", res.model)
    assert.are.equal(slm.cost("nousresearch/hermes-3-llama-3.1-405b", res.usage), res.cost)
    assert.are_not.equal(slm.cost("gpt-4o-mini", res.usage), res.cost)
  end)

  it("else the requested model's", function()
    local c = client{ model = "nousresearch/hermes-3-llama-3.1-405b" }
    local res = assert(c:chat{ messages = msgs(), headers = { ["X-Sim-Scenario"] = "reply_model=some-unknown-name" } })
    assert.are.equal(slm.cost("nousresearch/hermes-3-llama-3.1-405b", res.usage), res.cost)
  end)
end)

describe("replies cut by the connection are connection failures", function()
  it("a reset after 'HTTP/1.1 401' and one header is connect (retried), not auth", function()
    for _, stream in ipairs{ false, true } do
      local _, err = call(client{ max_retries = 1 }, "raw=401_cut", { stream = stream,
        headers = { ["X-Sim-Key"] = "cut401" .. tostring(stream) } })
      assert.are.equal("connect", err.kind)
      assert.are.equal(2, err.attempts)
    end
  end)

  it("a JSON reply to a stream request cut by a reset is connect, not protocol", function()
    local _, err = call(client(), "raw=json_cut", { stream = true })
    assert.are.equal("connect", err.kind)
  end)
end)

describe("what third-party servers send", function()
  it("llama.cpp: a 200 stream with only an error line and [DONE] is that error", function()
    local res, err = call(client(), "llama_error=server", { stream = true })
    assert.is_nil(res)
    assert.are.equal("server", err.kind)
    assert.are.equal("slot unavailable", err.message)
  end)

  it("a stream that reaches [DONE] without a single chunk is a protocol error", function()
    local res, err = call(client(), "done_only", { stream = true })
    assert.is_nil(res)
    assert.are.equal("protocol", err.kind)
    assert.matches("without a single chunk", err.message)
  end)

  for _, stream in ipairs{ false, true } do
    it("llama.cpp's context overflow is context_length, so fallback moves on (" ..
        (stream and "streamed" or "plain") .. ")", function()
      local c = client{ model = "sim:llama_error=context", fallback = { "gpt-4o-mini" } }
      local res = assert(c:chat{ messages = msgs(), stream = stream })
      assert.are.equal("gpt-4o-mini", res.model)
      assert.are.equal("context_length", res.fallback_errors[1].kind)
    end)
  end

  it("every known form of 'context too long' is context_length", function()
    local forms = {
      "status=400,code=context_length_exceeded",                               -- OpenAI
      "status=400,type=exceed_context_size_error,message=the request exceeds the available context size",
      "status=400,message=This model's maximum context length is 4096 tokens",  -- vLLM
    }
    for _, sc in ipairs(forms) do
      local _, err = call(client(), sc)
      assert.are.equal("context_length", err.kind, sc)
    end
  end)

  it("err.code keeps the provider's type: 400, not '400.0'", function()
    local _, err = call(client(), "llama_error=context")
    assert.are.equal(400, err.code)
    assert.are.equal("integer", math.type(err.code))
    assert.are.equal("exceed_context_size_error", err.type)
    local _, e2 = call(client(), "status=429")
    assert.are.equal("rate_limit_exceeded", e2.code)
  end)

  for _, stream in ipairs{ false, true } do
    it("choices: [] (Azure's content filter) is a Response with no choices (" ..
        (stream and "streamed" or "plain") .. ")", function()
      local res, err = call(client(), "choices_empty", { stream = stream })
      assert.is_nil(err)
      assert.are.same({}, res.choices)
      assert.are.equal("", res.text)
      assert.are.same({}, res.tool_calls)
      assert.are.equal("assistant", res.message.role)
    end)
  end

  for _, stream in ipairs{ false, true } do
    it("message.content is nil, never cjson.null (" .. (stream and "streamed" or "plain") .. ")", function()
      local res = assert(call(client(), "refusal", { stream = stream }))
      assert.is_nil(res.message.content)
      assert.is_string(res.refusal)
      res = assert(client():chat{ messages = msgs("weather"), stream = stream, tools = { {
        type = "function", ["function"] = { name = "get_weather", parameters = { type = "object" } } } } })
      assert.is_nil(res.message.content)
      assert.are.equal("get_weather", res.tool_calls[1]["function"].name)
    end)
  end
end)
