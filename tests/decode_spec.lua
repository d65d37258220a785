-- slm.decode and slm.redact without a server: error kinds (every entry of
-- the context table on its own), the one provider-error constructor on
-- every shape servers send, untrusted usage, Responses; secrets in text.
local decode = require "slm.decode"
local redact = require "slm.redact"
local json = require "slm.json"
local helpers = require "tests.helpers"

describe("slm.decode.kind", function()
  it("maps statuses", function()
    assert.are.equal("auth", decode.kind(401))
    assert.are.equal("auth", decode.kind(403))
    assert.are.equal("rate_limit", decode.kind(429))
    assert.are.equal("invalid_request", decode.kind(400))
    assert.are.equal("invalid_request", decode.kind(404))
    assert.are.equal("invalid_request", decode.kind(422))
    assert.are.equal("server", decode.kind(500))
    assert.are.equal("server", decode.kind(503))
    assert.are.equal("http", decode.kind(402))
    assert.are.equal("http", decode.kind(418))
  end)
  it("knows every way a server says the context is too small, each on its own", function()
    assert.are.equal("context_length", decode.kind(400, "context_length_exceeded"))
    assert.are.equal("context_length", decode.kind(400, nil, "exceed_context_size_error", "no"))
    assert.are.equal("context_length", decode.kind(400, 400, nil,
      "the request exceeds the available context size, try increasing it"))
    assert.are.equal("context_length", decode.kind(400, nil, nil,
      "This model's maximum context length is 4096 tokens. However, you requested 5000 tokens"))
    assert.are.equal("context_length", decode.kind(500, nil, nil, "Context length exceeded for this model"))
    assert.are.equal("context_length", decode.kind(413, nil, nil, "input exceeds the context window"))
    -- not every 400 is one
    assert.are.equal("invalid_request", decode.kind(400, "invalid_request", nil, "bad temperature"))
    -- an auth error mentioning it stays auth
    assert.are.equal("auth", decode.kind(401, nil, nil, "maximum context length"))
  end)
  it("keeps the patterns in one table users can extend", function()
    decode.CONTEXT.phrases[#decode.CONTEXT.phrases + 1] = "prompt is too long"
    assert.are.equal("context_length", decode.kind(400, nil, nil, "prompt is too long: 9000 tokens"))
    table.remove(decode.CONTEXT.phrases)
    assert.are.equal("invalid_request", decode.kind(400, nil, nil, "prompt is too long: 9000 tokens"))
  end)
end)

describe("slm.decode.provider_error", function()
  local set = redact.set{ "sk-secret-123456" }
  it("reads OpenAI's shape", function()
    local e = decode.provider_error(429, json.encode{ error = { message = "slow down", type = "requests",
      code = "rate_limit_exceeded", param = json.null } }, { ["retry-after"] = "2", ["x-request-id"] = "r1" },
      "gpt-4o-mini", set)
    assert.are.equal("rate_limit", e.kind)
    assert.are.equal("slow down", e.message)
    assert.are.equal("rate_limit_exceeded", e.code)
    assert.are.equal("requests", e.type)
    assert.is_nil(e.param)
    assert.are.equal(2, e.retry_after)
    assert.are.equal("r1", e.request_id)
    assert.are.equal(429, e.status)
  end)
  it("reads llama.cpp's shape, fields at the top of an `error:` line", function()
    local e = decode.provider_error(200, '{"code":500,"message":"slot unavailable","type":"server_error"}', {},
      "m", set)
    assert.are.equal("server", e.kind)
    assert.are.equal(500, e.code)
    assert.are.equal("integer", helpers.math_type(e.code))
    e = decode.provider_error(200, '{"code":400,"message":"x","type":"exceed_context_size_error"}', {}, "m", set)
    assert.are.equal("context_length", e.kind)
  end)
  it("takes the status of an error inside a 200 reply from a numeric code (OpenRouter)", function()
    local e = decode.provider_error(200, { error = { code = 429, message = "upstream rate limited" } }, {}, "m", set)
    assert.are.equal("rate_limit", e.kind)
    assert.are.equal(200, e.status)
    e = decode.provider_error(200, { error = { message = "boom" } }, {}, "m", set)
    assert.are.equal("server", e.kind)
    e = decode.provider_error(200, { error = { message = "gone", status = 404, code = "model_not_found" } }, {}, "m", set)
    assert.are.equal("invalid_request", e.kind)
  end)
  it("takes a plain string error and a non-JSON body", function()
    assert.are.equal("quota", decode.provider_error(402, '{"error":"quota"}', {}, "m", set).message)
    local e = decode.provider_error(502, "<html>Bad  gateway\n</html>", {}, "m", set)
    assert.are.equal("HTTP 502: <html>Bad gateway </html>", e.message)
    assert.are.equal("server", e.kind)
  end)
  it("a body that is not UTF-8 (a proxy's page in windows-1251) gives a message that is", function()
    local page = "<html><body>\207\240\238\234\241\232 \238\248\232\225\234\224</body></html>"
    local e = decode.provider_error(502, page, {}, "m", set)
    assert.are.equal("server", e.kind)
    assert.are.equal("HTTP 502: <html><body>" .. string.rep("\u{FFFD}", 6) .. " " .. string.rep("\u{FFFD}", 6)
      .. "</body></html>", e.message)
    assert.is_string(json.encode{ error = tostring(e) }) -- it can be logged as JSON
    -- a JSON error whose message carries such bytes
    e = decode.provider_error(400, '{"error":{"message":"bad \255 byte","type":"invalid_request_error"}}', {}, "m", set)
    assert.are.equal("bad \u{FFFD} byte", e.message)
  end)
  it("a 3xx reply (redirects are not followed) is kind http with its status", function()
    for _, st in ipairs{ 300, 301, 302, 307, 308 } do
      local e = decode.provider_error(st, "", { location = "http://127.0.0.1:9/elsewhere" }, "m", set)
      assert.are.equal("http", e.kind)
      assert.are.equal("HTTP " .. st, e.message)
      assert.are.equal(st, e.status)
    end
  end)
  it("redacts the secret before it cuts a long message", function()
    local body = string.rep("y", 290) .. "sk-secret-123456" .. string.rep("z", 50)
    local e = decode.provider_error(500, body, {}, "m", set)
    assert.is_nil(e.message:find("sk-secr", 1, true))
    assert.matches("<redacted>", e.message)
  end)
end)

describe("slm.decode.usage", function()
  it("takes no more completion tokens than the request allowed (max_tokens x n)", function()
    local u, problem = decode.usage({ prompt_tokens = 10, completion_tokens = 1000000, total_tokens = 1000010 },
      128000, 20)
    assert.is_nil(u.completion_tokens)
    assert.are.equal(10, u.prompt_tokens)
    assert.matches("completion_tokens = 1000000", problem)
    u, problem = decode.usage({ prompt_tokens = 10, completion_tokens = 20, total_tokens = 30 }, 128000, 20)
    assert.are.equal(20, u.completion_tokens)
    assert.is_nil(problem)
    u, problem = decode.usage({ prompt_tokens = 10, completion_tokens = 1000000 }, 128000, nil) -- no cap asked
    assert.are.equal(1000000, u.completion_tokens)
    assert.is_nil(problem)
  end)
  it("returns integers, total = prompt + completion, the details kept", function()
    local u, problem = decode.usage(json.decode('{"prompt_tokens":10,"completion_tokens":5,"total_tokens":15,'
      .. '"prompt_tokens_details":{"cached_tokens":4,"audio_tokens":0},"completion_tokens_details":'
      .. '{"reasoning_tokens":2}}'), 128000)
    assert.is_nil(problem)
    assert.are.equal("integer", helpers.math_type(u.prompt_tokens))
    assert.are.equal(15, u.total_tokens)
    assert.are.equal(4, u.prompt_tokens_details.cached_tokens)
    assert.are.equal(0, u.prompt_tokens_details.audio_tokens)
    assert.are.equal(2, u.completion_tokens_details.reasoning_tokens)
  end)
  it("names what it rejects and leaves those counts to the caller", function()
    local nan = 0 / 0
    local cases = {
      { { prompt_tokens = nan, completion_tokens = 5 }, "prompt_tokens" },
      { { prompt_tokens = 1, completion_tokens = math.huge }, "completion_tokens" },
      { { prompt_tokens = -1, completion_tokens = 5 }, "prompt_tokens" },
      { { prompt_tokens = 1.5, completion_tokens = 5 }, "prompt_tokens" },
      { { prompt_tokens = "12", completion_tokens = 5 }, "prompt_tokens" },
      { { prompt_tokens = 128000 * 10 + 1, completion_tokens = 5 }, "prompt_tokens" },
      { { completion_tokens = 5 }, "prompt_tokens" },
    }
    for _, c in ipairs(cases) do
      local u, problem = decode.usage(c[1], 128000)
      assert.matches(c[2], problem)
      assert.is_nil(u[c[2]])
    end
    -- within 10x the context is believed
    assert.is_nil(select(2, decode.usage({ prompt_tokens = 128000 * 10, completion_tokens = 0 }, 128000)))
    -- unknown context: 100 million
    assert.is_nil(select(2, decode.usage({ prompt_tokens = 99999999, completion_tokens = 0 })))
    assert.is_string(select(2, decode.usage({ prompt_tokens = 100000001, completion_tokens = 0 })))
  end)
  it("rejects cached tokens beyond the prompt and hostile costs", function()
    local u, p = decode.usage({ prompt_tokens = 3, completion_tokens = 1, prompt_tokens_details = { cached_tokens = 9 } })
    assert.matches("cached", p)
    assert.is_nil(u.prompt_tokens_details.cached_tokens)
    for _, bad in ipairs{ 0 / 0, -1, math.huge, 1e6, "1" } do
      u, p = decode.usage({ prompt_tokens = 3, completion_tokens = 1, cost = bad })
      assert.matches("cost", p)
      assert.is_nil(u.cost)
    end
    u, p = decode.usage({ prompt_tokens = 3, completion_tokens = 1, cost = 0.002 })
    assert.is_nil(p)
    assert.are.equal(0.002, u.cost)
  end)
  it("is nil without usage", function()
    assert.is_nil(decode.usage(nil))
    assert.is_nil(decode.usage(json.null))
  end)
end)

describe("slm.decode.response", function()
  it("has no JSON nulls in message, integers where JSON had them", function()
    local res = decode.response(json.decode('{"id":"x","created":1700000000,"choices":[{"index":0,'
      .. '"message":{"role":"assistant","content":null,"refusal":null,"tool_calls":[{"id":"c",'
      .. '"type":"function","function":{"name":"f","arguments":"{}"}}]},"logprobs":null,"finish_reason":"tool_calls"}]}'))
    assert.is_nil(res.message.content)
    assert.is_nil(res.message.refusal)
    assert.is_nil(res.logprobs)
    assert.are.equal("", res.text)
    assert.are.equal("f", res.tool_calls[1]["function"].name)
    assert.are.equal("integer", helpers.math_type(res.created))
    assert.are.equal("integer", helpers.math_type(res.choices[1].index))
  end)
  it("keeps logprobs, for the first choice and each one", function()
    local res = decode.response(json.decode('{"choices":[{"index":1,"message":{"content":"b"},"logprobs":'
      .. '{"content":[{"token":"b","logprob":-1}]}},{"index":0,"message":{"content":"a"},"logprobs":'
      .. '{"content":[{"token":"a","logprob":-0.5}]}}]}'))
    assert.are.equal("a", res.text)
    assert.are.equal(-0.5, res.logprobs.content[1].logprob)
    assert.are.equal(-1, res.choices[2].logprobs.content[1].logprob)
  end)
  it("takes choices: [] as a Response with no choices", function()
    local res = decode.response(json.decode('{"id":"x","choices":[],"prompt_filter_results":[]}'))
    assert.are.same({}, res.choices)
    assert.are.equal("", res.text)
  end)
  it("refuses a choice without a message", function()
    local res, why = decode.response(json.decode('{"choices":[{"index":0}]}'))
    assert.is_nil(res)
    assert.matches("no message", why)
  end)
  it("refuses choices that are an object, not a list", function()
    local res, why = decode.response(json.decode('{"choices":{"0":{"index":0,"message":{"content":"a"}}}}'))
    assert.is_nil(res)
    assert.matches("'choices' is not a list", why)
  end)
  it("leaves out fields of the wrong type (id, model, created, fingerprint, finish_reason, role, refusal)", function()
    local res = assert(decode.response(json.decode('{"id":5,"model":{"x":1},"created":"soon","system_fingerprint":7,'
      .. '"choices":[{"index":0,"finish_reason":9,"message":{"role":[1],"content":"a","refusal":{"no":1}}}]}')))
    assert.is_nil(res.id)
    assert.is_nil(res.model)
    assert.is_nil(res.created)
    assert.is_nil(res.system_fingerprint)
    assert.is_nil(res.finish_reason)
    assert.is_nil(res.refusal)
    assert.are.equal("assistant", res.message.role)
    assert.are.equal("a", res.text)
    res = assert(decode.response(json.decode('{"model":"","choices":[]}')))
    assert.is_nil(res.model)
  end)
end)

describe("slm.redact", function()
  local KEY = "sk-abcdefghijklmnop"
  local set = redact.set{ KEY, "pw/with/slash", "abc", nil }
  it("replaces every secret, and its JSON-escaped form", function()
    assert.are.equal("key <redacted> and <redacted>.", redact.string("key " .. KEY .. " and " .. KEY .. ".", set))
    assert.are.equal("<redacted>", redact.string("pw\\/with\\/slash", set))
  end)
  it("ignores secrets shorter than 4 bytes (they would hide ordinary text)", function()
    assert.are.equal("abc", redact.string("abc", set))
  end)
  it("hides a piece of a secret left at either end of a text by a cut", function()
    assert.are.equal("error for <redacted>", redact.string("error for " .. KEY:sub(1, 9), set))
    assert.are.equal("<redacted> went wrong", redact.string(KEY:sub(-10) .. " went wrong", set))
    -- too short a piece to tell from ordinary text stays
    assert.are.equal("the sk-ab", redact.string("the sk-ab", set))
  end)
  it("cuts a snippet only after redacting, never inside a UTF-8 character", function()
    local s = redact.snippet(string.rep("a", 8) .. KEY, 12, set)
    assert.are.equal("aaaaaaaa<red…", s)
    assert.are.equal("ab…", redact.snippet("ab\u{444}\u{444}", 3, set))
  end)
  it("replaces what is not UTF-8 by U+FFFD, and leaves valid text as it is", function()
    local R = "\u{FFFD}"
    local valid = "plain \u{444}\u{20AC}\u{10FFFF}\u{1F600} \u{7FF}\u{800}\u{FFFF}\u{10000}"
    assert.are.equal(valid, redact.utf8(valid))
    assert.are.equal("a" .. R .. "b", redact.utf8("a\255b"))
    assert.are.equal(R .. R, redact.utf8("\192\128")) -- overlong NUL
    assert.are.equal(R .. R .. R, redact.utf8("\237\160\128")) -- a surrogate, U+D800
    assert.are.equal(R .. R .. R .. R, redact.utf8("\244\144\128\128")) -- above U+10FFFF
    assert.are.equal(R .. R .. R, redact.utf8("\224\128\128")) -- overlong, 3 bytes
    assert.are.equal("x" .. R .. R, redact.utf8("x\226\130")) -- cut at the end: each byte
    assert.are.equal(R .. "a", redact.utf8("\128a")) -- a lone continuation byte
    assert.are.equal(7, redact.utf8(7))
  end)
  it("walks tables in place, keys and cycles too", function()
    local t = { msg = KEY, nested = { [KEY] = "v", list = { "x " .. KEY } } }
    t.nested.up = t
    redact.deep(t, set)
    assert.are.equal("<redacted>", t.msg)
    assert.are.equal("v", t.nested["<redacted>"])
    assert.is_nil(t.nested[KEY])
    assert.are.equal("x <redacted>", t.nested.list[1])
  end)
end)
