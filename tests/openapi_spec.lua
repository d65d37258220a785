-- OpenAPI conformance: every kind of request body the client builds, and
-- every reply shape the simulator sends, validated against OpenAI's own
-- schemas (tests/fixtures/openapi/chat.json, extracted from OpenAI's
-- openapi.yaml by tests/tools/openapi/extract.mjs) with ajv, in one node
-- run (tests/tools/openapi/validate.mjs). Skipped only when node is not
-- installed (bin/setup-deps installs it); the npm packages are installed
-- on first use (npm ci, pinned by the package-lock.json).
local slm = require "slm"
local cjson = require "cjson"
local H = require "tests.helpers"

-- the ASan stage preloads sanitizer runtimes into this process: node, npm
-- and curl must not inherit them
local CLEAN = "unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS; "
local TOOLS = H.FIXTURES .. "../tools/openapi/"
local SCHEMAS = H.FIXTURES .. "openapi/chat.json"
local OPENAPI_YAML = "../shared/openai-openapi/openapi.yaml" -- beside the repository, when there

-- Runs a shell command; returns its output (stdout, and stderr unless
-- `stdout_only`), whether it exited 0, and its exit status.
local function sh(cmd, stdout_only)
  local p = assert(io.popen(CLEAN .. cmd .. (stdout_only and " 2>/dev/null" or " 2>&1")))
  local out = p:read("a")
  local ok, _, code = p:close()
  return out, ok == true, code
end

local write_tmp = H.write_tmp

local HAVE_NODE = select(2, sh("command -v node"))

if not HAVE_NODE then
  describe("OpenAPI conformance", function()
    pending("node is not installed (bin/setup-deps installs nodejs and npm): request bodies and replies not checked")
  end)
  return
end

-- Runs validate.mjs over items {name, schema, json_text}; returns a table
-- name -> { ok = bool, errors = "..." }, and the whole output.
local function validate(items)
  local names = {}
  for _, it in ipairs(items) do
    assert(not it.name:find(": ", 1, true) and not it.name:find("\n"), "item names must not hold ': ': " .. it.name)
    assert(not names[it.name], "duplicate item name " .. it.name)
    names[it.name] = true
  end
  local file = write_tmp(cjson.encode(items))
  local out, _, code = sh("node " .. H.q(TOOLS .. "validate.mjs") .. " " .. H.q(file))
  os.remove(file)
  if code ~= 0 and code ~= 1 then error("validate.mjs failed (exit " .. tostring(code) .. "):\n" .. out, 0) end
  local res = {}
  for line in out:gmatch("[^\n]+") do
    local name = line:match("^ok (.*)$")
    if name then
      res[name] = { ok = true }
    else
      local n, errs = line:match("^fail (.-): (.*)$")
      if n then res[n] = { ok = false, errors = errs } end
    end
  end
  for _, it in ipairs(items) do
    if not res[it.name] then error("validate.mjs said nothing about " .. it.name .. ":\n" .. out, 0) end
  end
  return res, out
end

-- HTTP straight to the simulator with the curl CLI: status, body.
local function http(up, body, headers)
  local bfile = write_tmp(type(body) == "table" and cjson.encode(body) or body)
  local ofile = os.tmpname()
  local args = { "curl -s --max-time 10 -o " .. H.q(ofile) .. " -w '%{http_code}'",
    "-H 'Content-Type: application/json'", "--data-binary @" .. H.q(bfile) }
  for k, v in pairs(headers or {}) do args[#args + 1] = "-H " .. H.q(k .. ": " .. v) end
  args[#args + 1] = H.q(up.url .. "/chat/completions")
  local status = sh(table.concat(args, " "))
  local text = H.read_file(ofile)
  os.remove(bfile)
  os.remove(ofile)
  return tonumber(status), text
end

-- The JSON texts of the `data:` lines of an SSE body (without [DONE]),
-- and whether [DONE] came last.
local function sse_data(text)
  local list, done = {}, false
  for line in text:gsub("\r\n", "\n"):gmatch("[^\n]+") do
    local data = line:match("^data: ?(.*)$")
    if data == "[DONE]" then
      done = true
    elseif data then
      list[#list + 1] = data
      done = false
    end
  end
  return list, done
end

-- What the client is made to send ------------------------------------------------

local USER = { role = "user", content = "What is the weather in Paris?" }
local function fn_tool(name, desc, props, required)
  return { type = "function", ["function"] = { name = name, description = desc, strict = true,
    parameters = { type = "object", properties = props, required = required, additionalProperties = false } } }
end
local WEATHER = fn_tool("get_weather", "Current weather in a city", { city = { type = "string" } }, { "city" })
local TIME = fn_tool("get_time", "Local time in a city", { city = { type = "string" } }, { "city" })
-- base64 of tests/fixtures/images/tiny.png (3 x 2 px)
local TINY_PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAMAAAACAQAAAAC1D1u3AAAAD0lEQVR4AQEEAPv/"
  .. "AAAAAAAEAAFlScNgAAAAAElFTkSuQmCC"
local SCHEMA = { type = "object", additionalProperties = false, required = { "label", "summary" },
  properties = { label = { type = "string", enum = { "billing", "technical", "other" } },
    summary = { type = "string" } } }
local BIG_SEED = 4944116822809979520
local MAX_SAFE = (1 << 53) - 1 -- 9007199254740991, the largest integer a double holds exactly

-- { name, request, how }: how = "chat" (default) or "stream" (client:stream)
local REQUESTS = {
  { "plain", { messages = { USER } } },
  { "system and user with sampling options", { messages = { { role = "system", content = "Be brief." }, USER },
    temperature = 0.2, top_p = 0.9, max_tokens = 100, presence_penalty = 0.5, frequency_penalty = -0.5,
    user = "user-42" } },
  { "text content parts", { messages = { { role = "system", content = { { type = "text", text = "Be brief." } } },
    { role = "user", content = { { type = "text", text = "Hello" }, { type = "text", text = "there" } } } } } },
  { "tools with tool_choice auto", { messages = { USER }, tools = { WEATHER, TIME }, tool_choice = "auto",
    parallel_tool_calls = false } },
  { "tools with tool_choice naming a function", { messages = { USER }, tools = { WEATHER, TIME },
    tool_choice = { type = "function", ["function"] = { name = "get_time" } } } },
  { "tools with tool_choice required", { messages = { USER }, tools = { WEATHER }, tool_choice = "required" } },
  { "tool results after an assistant tool_calls message", { tools = { WEATHER, TIME }, messages = { USER,
    { role = "assistant", tool_calls = {
      { id = "call_1", type = "function", ["function"] = { name = "get_weather", arguments = '{"city":"Paris"}' } },
      { id = "call_2", type = "function", ["function"] = { name = "get_time", arguments = '{"city":"Paris"}' } } } },
    { role = "tool", tool_call_id = "call_1", content = '{"temp_c":21}' },
    { role = "tool", tool_call_id = "call_2", content = '{"time":"14:05"}' } } } },
  { "response_format json_schema strict", { messages = { USER }, response_format = { type = "json_schema",
    json_schema = { name = "ticket", description = "A triaged ticket", schema = SCHEMA, strict = true } } } },
  { "response_format json_object", { messages = { { role = "system", content = "Answer in JSON." }, USER },
    response_format = { type = "json_object" } } },
  { "image part with a data URL and detail low", { messages = { { role = "user", content = {
    { type = "text", text = "What is in this image?" },
    { type = "image_url", image_url = { url = TINY_PNG, detail = "low" } } } } } } },
  { "image part with an https URL and detail high", { messages = { { role = "user", content = {
    { type = "text", text = "Describe it." },
    { type = "image_url", image_url = { url = "https://example.com/cat.png", detail = "high" } } } } } } },
  { "stop as a string", { messages = { USER }, stop = "\n\n" } },
  { "stop as a list", { messages = { USER }, stop = { "END", "\n\n", "Observation:" } } },
  { "stream with stream_options", { messages = { USER }, stream = true, stream_options = { include_usage = true } } },
  { "client stream with stream_options", { messages = { USER }, stream_options = { include_usage = true } }, "stream" },
  { "seed 4944116822809979520", { messages = { USER }, seed = BIG_SEED } },
  { "seed 2^53 - 1", { messages = { USER }, seed = MAX_SAFE } },
  { "tools = {} (empty)", { messages = { USER }, tools = {} } },
  { "n, logprobs, top_logprobs, max_completion_tokens", { messages = { USER }, n = 2, logprobs = true,
    top_logprobs = 3, max_completion_tokens = 50 } },
}

-- Reply shapes ----------------------------------------------------------------

local HI = { { role = "user", content = "hello there" } }
local function body(extra)
  local b = { model = "gpt-4o-mini", messages = HI }
  for k, v in pairs(extra or {}) do b[k] = v end
  return b
end
local WEATHER_Q = { { role = "user", content = "weather in Paris" } }
local TOOL_TURN = { { role = "user", content = "weather in Paris" },
  { role = "assistant", content = cjson.null, tool_calls = { { id = "call_1", type = "function",
    ["function"] = { name = "get_weather", arguments = '{"city":"Paris"}' } } } },
  { role = "tool", tool_call_id = "call_1", content = "21 C, sunny" } }
local JSON_SCHEMA_RF = { type = "json_schema", json_schema = { name = "ticket", schema = SCHEMA, strict = true } }
-- the scripted model (tests/upstream/README.md, "The scripted model"): a
-- classification with enum logprobs, a multi-label one, an escalation, an
-- answer from knowledge passages
local CHARGED = { { role = "user", content = "I was charged twice for my order" } }
local LABELS_RF = { type = "json_schema", json_schema = { name = "labels", strict = true, schema = {
  type = "object", additionalProperties = false, required = { "labels" }, properties = {
    labels = { type = "array", items = { type = "string", enum = { "billing", "shipping", "other" } } } } } } }
local ESCALATE = fn_tool("escalate_to_human", "Hand the conversation to a person", {
  reason = { type = "string" }, category = { type = "string", enum = { "billing", "technical", "other" } },
  summary = { type = "string" } }, { "reason", "category", "summary" })
local HUMAN = { { role = "user", content = "My card was charged twice, let me talk to a human" } }
local KNOWLEDGE = { { role = "system", content = "Answer from the passages.\n<knowledge>\n"
  .. '<passage id="faq-12" title="Delivery times">Delivery takes 3-5 business days. Express arrives next day.</passage>\n'
  .. "</knowledge>" }, { role = "user", content = "How long does delivery take?" } }

-- { name, body, scenario header } of non-streamed replies; each content rule
-- of tests/upstream/README.md ("Replies")
local REPLIES = {
  { "plain", body() },
  { "tools", body{ messages = WEATHER_Q, tools = { WEATHER } } },
  { "tools_parallel", body{ tools = { WEATHER, TIME } }, "tools_parallel" },
  { "n=3", body{ n = 3 } },
  { "n3 directive", body(), "n3" },
  { "refusal", body(), "refusal" },
  { "json_schema", body{ response_format = JSON_SCHEMA_RF } },
  { "json_object", body{ response_format = { type = "json_object" } } },
  { "tool result", body{ messages = TOOL_TURN, tools = { WEATHER } } },
  { "length cut", body{ max_tokens = 2 } },
  { "stop cut", body{ stop = { "there" } } },
  { "big", body(), "big=3000" },
  { "logprobs", body{ logprobs = true, top_logprobs = 2 } },
  { "logprobs, none on top", body{ logprobs = true } },
  { "content filter took every choice", body(), "choices_empty" },
  { "answered by a dated snapshot", body(), "reply_model=gpt-4o-mini-2024-07-18" },
  { "logprobs of a json_schema label", body{ messages = CHARGED, response_format = JSON_SCHEMA_RF, logprobs = true,
    top_logprobs = 3 } },
  { "logprobs of a json_object label", body{ messages = CHARGED, response_format = { type = "json_object" },
    logprobs = true, top_logprobs = 2 } },
  { "logprobs of multi-label arrays", body{ messages = CHARGED, response_format = LABELS_RF, logprobs = true,
    top_logprobs = 2 } },
  { "escalate_to_human call", body{ messages = HUMAN, tools = { ESCALATE } } },
  { "answer from knowledge passages", body{ messages = KNOWLEDGE } },
}
-- streamed: every data: line of each
local STREAMS = {
  { "plain", body{ stream = true } },
  { "include_usage", body{ stream = true, stream_options = { include_usage = true } } },
  { "tools", body{ stream = true, messages = WEATHER_Q, tools = { WEATHER } } },
  { "tools_parallel", body{ stream = true, tools = { WEATHER, TIME } }, "tools_parallel" },
  { "n=3", body{ stream = true, n = 3, stream_options = { include_usage = true } } },
  { "refusal", body{ stream = true }, "refusal" },
  { "json_schema", body{ stream = true, response_format = JSON_SCHEMA_RF } },
  { "length cut", body{ stream = true, max_tokens = 2 } },
  { "chunks", body{ stream = true }, "chunks=3" },
  { "big", body{ stream = true }, "big=3000" },
  { "logprobs", body{ stream = true, logprobs = true, top_logprobs = 2 } },
  { "logprobs of a json_schema label", body{ stream = true, messages = CHARGED, response_format = JSON_SCHEMA_RF,
    logprobs = true, top_logprobs = 3 } },
  { "escalate_to_human call", body{ stream = true, messages = HUMAN, tools = { ESCALATE } } },
  { "answer from knowledge passages", body{ stream = true, messages = KNOWLEDGE } },
  { "content filter took every choice", body{ stream = true, stream_options = { include_usage = true } },
    "choices_empty" },
}
-- error replies: { name, body, scenario } (schema ErrorResponse)
local ERRORS = {
  { "missing messages", { model = "gpt-4o-mini" } },
  { "invalid JSON", "{not json" },
  { "auth", body(), "auth" },
  { "context_length_exceeded", body(), "status=400,code=context_length_exceeded" },
  { "insufficient_quota", body(), "status=429,code=insufficient_quota" },
  { "status 418 (no code)", body(), "status=418" },
}
for _, s in ipairs({ 400, 402, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 504 }) do
  ERRORS[#ERRORS + 1] = { "status " .. s, body(), "status=" .. s }
end
-- Directives that imitate other providers' departures from OpenAI's
-- protocol on purpose: the schemas must reject them, where expected (which
-- also proves the check can fail). { name, body, scenario, schema, index of
-- the data line (-1: the last) or nil for a whole reply, expected error }
local OFF_SPEC = {
  { "wrong_shape", body(), "wrong_shape", "response", nil, "/: must have required property 'choices'" },
  { "usage_null_choices", body{ stream = true }, "usage_null_choices", "chunk", -1, "/choices: must be array" },
  { "openrouter_error", body{ stream = true }, "openrouter_error", "chunk", -1,
    "/choices/0/finish_reason: must be equal to one of the allowed values" },
  { "error_chunk", body{ stream = true }, "error_chunk", "chunk", -1, "/: must have required property 'choices'" },
  { "tools_noindex", body{ stream = true, tools = { WEATHER, TIME } }, "tools_noindex", "chunk", 2,
    "/choices/0/delta/tool_calls/0: must have required property 'index'" },
}

local function scenario_headers(sc) return sc and { ["X-Sim-Scenario"] = sc } or nil end

-- The recorded OpenAI streams the simulator replays (`replay=<name>`, the
-- files of tests/fixtures/openai-streams byte for byte): real API output,
-- so a check of the schemas too.
local function recorded_streams()
  local list = {}
  local p = assert(io.popen("ls " .. H.q(H.FIXTURES .. "openai-streams") .. " 2>/dev/null"))
  for f in p:lines() do
    local name = f:match("^(.+)%.sse$")
    if name then list[#list + 1] = name end
  end
  p:close()
  table.sort(list)
  assert(#list > 0, "no recorded streams in tests/fixtures/openai-streams")
  return list
end

-- Collecting and validating ---------------------------------------------------------

local up
-- { items, res (name -> {ok, errors}), out (validate.mjs's output), raw (request
-- name -> raw body), notes (name -> what went wrong collecting it), done
-- (stream name -> ended with [DONE]) }, or { err = msg }
local state

setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)

local function collect()
  local items, raw, notes, done = {}, {}, {}, {}
  local function add(name, schema, text) items[#items + 1] = { name = name, schema = schema, json_text = text } end

  -- request bodies, as the client sends them
  local c = slm.client{ base_url = up.url, api_key = "sk-test-good" }
  local function capture(name, req, how)
    up:reset()
    local ok, res, err = pcall(function()
      if how == "stream" then
        local st = c:stream(req)
        for _ in st do end
        return st:result()
      end
      return c:chat(req)
    end)
    if not ok then notes[name] = "client:chat raised: " .. tostring(res)
    elseif not res then notes[name] = "client:chat returned: " .. tostring(err) end
    local last = H.last(up)
    if type(last.raw_body) == "string" then
      raw[name] = last.raw_body
      add("request " .. name, "request", last.raw_body)
    else
      notes[name] = "the client sent nothing (" .. (notes[name] or "?") .. ")"
    end
  end
  for _, r in ipairs(REQUESTS) do capture(r[1], r[2], r[3]) end

  -- the same request again, with the client's own Response message appended
  -- as the assistant turn (what user code does between tool rounds)
  local first = c:chat{ messages = { USER }, tools = { WEATHER } }
  if first then
    capture("tool results after the client's own Response.message", { tools = { WEATHER }, messages = { USER,
      first.message, { role = "tool", tool_call_id = first.tool_calls[1] and first.tool_calls[1].id or "none",
        content = "21 C, sunny" } } })
  else
    notes["tool results after the client's own Response.message"] = "the first round failed"
  end

  -- deliberately broken bodies, made from the plain one: must be rejected
  local plain = raw.plain or '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
  add("broken request messages renamed", "request", (plain:gsub('"messages":', '"massages":')))
  add("broken request temperature hot", "request", (plain:gsub("^{", '{"temperature":"hot",')))
  add("broken request tools object", "request", (plain:gsub("^{", '{"tools":{},')))

  -- replies of the simulator
  for _, r in ipairs(REPLIES) do
    local status, text = http(up, r[2], scenario_headers(r[3]))
    if status ~= 200 then notes["reply " .. r[1]] = "HTTP " .. tostring(status) .. ": " .. tostring(text) end
    add("reply " .. r[1], "response", text or "")
  end
  for _, r in ipairs(STREAMS) do
    local status, text = http(up, r[2], scenario_headers(r[3]))
    local data, saw_done = sse_data(text or "")
    done["stream " .. r[1]] = status == 200 and saw_done and #data > 0
    for i, d in ipairs(data) do add(("stream %s chunk %d"):format(r[1], i), "chunk", d) end
  end
  for _, r in ipairs(ERRORS) do
    local status, text = http(up, r[2], scenario_headers(r[3]))
    if not status or status < 400 then notes["error " .. r[1]] = "HTTP " .. tostring(status) end
    add("error " .. r[1], "error", text or "")
  end
  for _, r in ipairs(OFF_SPEC) do
    local _, text = http(up, r[2], scenario_headers(r[3]))
    if r[5] then
      local data = sse_data(text or "")
      add("off-spec " .. r[1], r[4], data[r[5] < 0 and #data + 1 + r[5] or r[5]] or "")
    else
      add("off-spec " .. r[1], r[4], text or "")
    end
  end
  for _, name in ipairs(recorded_streams()) do
    local status, text = http(up, body{ stream = true }, scenario_headers("replay=" .. name))
    local data, saw_done = sse_data(text or "")
    done["replay " .. name] = status == 200 and saw_done and #data > 0
    for i, d in ipairs(data) do add(("replay %s chunk %d"):format(name, i), "chunk", d) end
  end

  local res, out = validate(items)
  return { items = items, res = res, out = out, raw = raw, notes = notes, done = done }
end

local function results()
  if not state then
    local ok, npm_out = H.npm_ready(TOOLS, "ajv-formats")
    if not ok then
      state = { err = "npm ci in tests/tools/openapi failed:\n" .. tostring(npm_out) }
    else
      local cok, s = pcall(collect)
      state = cok and s or { err = tostring(s) }
    end
  end
  if state.err then error(state.err, 0) end
  return state
end

-- The failures among the items `pick(name)` selects, one per line, and how
-- many it selected.
local function failures(pick)
  local s, bad, n = results(), {}, 0
  for _, it in ipairs(s.items) do
    if pick(it.name) then
      n = n + 1
      local r = s.res[it.name]
      if not r.ok then bad[#bad + 1] = it.name .. ": " .. r.errors .. "\n    json: " .. it.json_text:sub(1, 400) end
    end
  end
  return bad, n
end

-- `which`: an item's name, or a prefix ending in a space (every item it starts)
local function assert_valid(which, note)
  local pick = which:sub(-1) == " " and function(n) return n:sub(1, #which) == which end
    or function(n) return n == which end
  local bad, n = failures(pick)
  assert(n > 0, "no item " .. which .. (note and " (" .. note .. ")" or ""))
  assert(#bad == 0, (note and note .. "\n" or "") .. #bad .. " of " .. n .. " invalid:\n" .. table.concat(bad, "\n"))
end

describe("OpenAPI conformance: request bodies the client sends (CreateChatCompletionRequest)", function()
  for _, r in ipairs(REQUESTS) do
    it(r[1], function()
      local s = results()
      assert(s.raw[r[1]], s.notes[r[1]])
      assert_valid("request " .. r[1], s.notes[r[1]])
    end)
  end

  it("tool results after the client's own Response.message", function()
    local name = "tool results after the client's own Response.message"
    local s = results()
    assert(s.raw[name], s.notes[name])
    assert_valid("request " .. name, s.notes[name])
  end)

  it("keeps the digits of seed 4944116822809979520 in the raw body", function()
    local raw = assert(results().raw["seed 4944116822809979520"], "no body captured")
    assert(raw:find('"seed"%s*:%s*4944116822809979520%s*[,}]'), "the raw body lost the seed's digits: " .. raw)
  end)

  it("keeps the digits of seed 2^53 - 1 in the raw body", function()
    local raw = assert(results().raw["seed 2^53 - 1"], "no body captured")
    assert(raw:find('"seed"%s*:%s*9007199254740991%s*[,}]'), "the raw body lost the seed's digits: " .. raw)
  end)

  it("rejects deliberately broken bodies (the check can fail)", function()
    local s = results()
    local expect = { ["broken request messages renamed"] = "must have required property 'messages'",
      ["broken request temperature hot"] = "/temperature", ["broken request tools object"] = "/tools: must be array" }
    for name, want in pairs(expect) do
      local r = s.res[name]
      assert(not r.ok, name .. " was accepted")
      assert(r.errors:find(want, 1, true), name .. ": expected '" .. want .. "' among: " .. r.errors)
    end
  end)
end)

describe("OpenAPI conformance: replies the simulator sends", function()
  for _, r in ipairs(REPLIES) do
    it("non-streamed " .. r[1] .. " (CreateChatCompletionResponse)", function()
      local s = results()
      assert_valid("reply " .. r[1], s.notes["reply " .. r[1]])
    end)
  end
  for _, r in ipairs(STREAMS) do
    it("streamed " .. r[1] .. ", every chunk (CreateChatCompletionStreamResponse)", function()
      local s = results()
      assert(s.done["stream " .. r[1]], "the stream did not end with data: [DONE] after its chunks")
      assert_valid("stream " .. r[1] .. " chunk ")
    end)
  end
  it("errors, every status (ErrorResponse)", function()
    local s = results()
    for _, r in ipairs(ERRORS) do assert(not s.notes["error " .. r[1]], s.notes["error " .. r[1]]) end
    assert_valid("error ")
  end)
  it("off-spec directives are rejected (they imitate other providers on purpose)", function()
    local s = results()
    for _, r in ipairs(OFF_SPEC) do
      local v = s.res["off-spec " .. r[1]]
      assert(not v.ok, "off-spec " .. r[1] .. " passed the schema: the check may be skipping it")
      assert(v.errors:find(r[6], 1, true), "off-spec " .. r[1] .. ": expected '" .. r[6] .. "' among: " .. v.errors)
    end
  end)
  it("replayed OpenAI streams, every chunk (the schemas accept real API output)", function()
    local s = results()
    for _, name in ipairs(recorded_streams()) do
      assert(s.done["replay " .. name], "replay=" .. name .. " did not end with data: [DONE] after its chunks")
    end
    assert_valid("replay ")
  end)
end)

describe("OpenAPI conformance: the extracted schemas", function()
  it("tests/fixtures/openapi/chat.json is what extract.mjs makes of openapi.yaml", function()
    if not io.open(OPENAPI_YAML, "rb") then
      pending(OPENAPI_YAML .. " is not beside the repository: the committed chat.json is used as it is")
      return
    end
    results() -- npm packages
    local out, ok = sh("node " .. H.q(TOOLS .. "extract.mjs") .. " " .. H.q(OPENAPI_YAML) .. " -", true)
    assert(ok, "extract.mjs failed: " .. out)
    assert(out == H.read_file(SCHEMAS), "chat.json differs from a fresh extraction: "
      .. "run node tests/tools/openapi/extract.mjs and commit the result")
  end)
end)
