-- tests/upstream_spec.lua: the test upstream (tests/upstream/) itself:
-- launcher, protocol, scenarios and counters, checked with the curl CLI.
--
--   lua5.4 /usr/bin/busted tests/upstream_spec.lua

local cjson = require "cjson.safe"
local upstream = require "tests.upstream.launch"

-- Helpers ---------------------------------------------------------------------

local q = require("tests.helpers").q

-- The ASan stage of bin/test preloads sanitizer runtimes into the Lua
-- process; curl and nginx must not inherit them (curl hangs under them).
local CLEAN = "unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS; "

local function sh(cmd)
  local p = assert(io.popen(CLEAN .. cmd, "r"))
  local out = p:read("a")
  local _, _, code = p:close()
  return out, code
end

local write_tmp = require("tests.helpers").write_tmp

local function curl_args(up, opts)
  local args = { "curl -s -N --max-time " .. (opts.max_time or 10) }
  for k, v in pairs(opts.headers or {}) do args[#args + 1] = "-H " .. q(k .. ": " .. v) end
  if opts.scenario then args[#args + 1] = "-H " .. q("X-Sim-Scenario: " .. opts.scenario) end
  if opts.key then args[#args + 1] = "-H " .. q("X-Sim-Key: " .. opts.key) end
  local body_file
  if opts.body then
    local body = type(opts.body) == "table" and assert(cjson.encode(opts.body)) or opts.body
    body_file = write_tmp(body)
    args[#args + 1] = "-H 'Content-Type: application/json' --data-binary @" .. q(body_file)
  end
  if opts.method then args[#args + 1] = "-X " .. opts.method end
  args[#args + 1] = q(up.base .. (opts.path or "/v1/chat/completions"))
  return table.concat(args, " "), body_file
end

-- One request. Returns { status, headers (lowercase names), body, code (curl's exit status) }.
local function request(up, opts)
  local hfile = os.tmpname()
  local cmd, body_file = curl_args(up, opts)
  local body, code = sh(cmd .. " -D " .. q(hfile))
  local f = io.open(hfile, "rb")
  local raw = f and f:read("a") or ""
  if f then f:close() end
  os.remove(hfile)
  if body_file then os.remove(body_file) end
  local res = { body = body, code = code, headers = {} }
  res.status = tonumber(raw:match("^HTTP/%S+ (%d+)"))
  for name, value in raw:gmatch("\n([^:\r\n]+):%s*([^\r\n]*)") do
    res.headers[name:lower()] = value
  end
  return res
end

local function chat_body(text, extra)
  local body = { model = "gpt-4o-mini", messages = { { role = "user", content = text } } }
  for k, v in pairs(extra or {}) do body[k] = v end
  return body
end

local function json(res)
  local v, err = cjson.decode(res.body)
  assert(v ~= nil, "not JSON (" .. tostring(err) .. "): " .. res.body)
  return v
end

-- Split an SSE body into the data payloads of its events.
local function sse_data(body)
  local events = {}
  body = body:gsub("\r\n", "\n"):gsub("\r", "\n")
  for block in (body .. "\n\n"):gmatch("(.-)\n\n") do
    local lines = {}
    for line in block:gmatch("[^\n]+") do
      local d = line:match("^data: ?(.*)$")
      if d then lines[#lines + 1] = d end
    end
    if #lines > 0 then events[#events + 1] = table.concat(lines, "\n") end
  end
  return events
end

local function is_utf8(s)
  return utf8.len(s) ~= nil
end

-- Poll the stats until pred(stats) holds or `secs` pass; returns the last stats.
local function wait_stats(up, pred, secs)
  local s
  for _ = 1, math.ceil(secs / 0.05) do
    s = up:stats()
    if pred(s) then return s end
    os.execute("sleep 0.05")
  end
  return s
end

-- Start curl in the background; returns the path its exit status lands in.
local function background(up, opts)
  local cmd, body_file = curl_args(up, opts)
  local rc_file = os.tmpname()
  os.execute(CLEAN .. "(" .. cmd .. " >/dev/null 2>&1; echo $? > " .. q(rc_file) .. "; rm -f " .. q(body_file or "")
    .. ") >/dev/null 2>&1 &")
  return rc_file
end

local function wait_rc(rc_file, secs)
  for _ = 1, math.ceil(secs / 0.05) do
    local f = io.open(rc_file, "rb")
    local s = f and f:read("a")
    if f then f:close() end
    if s and s:match("%d") then
      os.remove(rc_file)
      return tonumber(s:match("%d+"))
    end
    os.execute("sleep 0.05")
  end
  os.remove(rc_file)
  return nil
end

-- Specs -------------------------------------------------------------------------

describe("test upstream", function()
  local up

  setup(function() up = upstream.start { quiet = true } end)
  teardown(function() if up then up:stop() end end)
  before_each(function() up:reset() end)

  describe("launcher", function()
    it("reports url, port and prefix", function()
      assert.is_true(up.port >= 20000 and up.port <= 45000)
      assert.equal("http://127.0.0.1:" .. up.port .. "/v1", up.url)
      assert.truthy(io.open(up.prefix .. "/nginx.pid", "rb"))
      local s = up:stats()
      assert.same({ requests = 0, in_flight = 0, max_in_flight = 0, connections = 0, aborted = 0, by_key = {} }, s)
    end)

    it("starts and stops ten instances in a row without leftovers", function()
      local seen = {}
      for _ = 1, 10 do
        local u = upstream.start { quiet = true }
        assert.equal(0, u:stats().requests)
        local pid, prefix = u.pid, u.prefix
        assert.is_number(pid)
        u:stop()
        local stat = io.open("/proc/" .. pid .. "/stat", "rb")
        local state = stat and stat:read("a"):match("^%d+ %b() (%a)")
        if stat then stat:close() end
        assert.is_true(state == nil or state == "Z", "nginx " .. pid .. " still running")
        assert.is_nil(io.open(prefix .. "/nginx.conf", "rb"))
        seen[#seen + 1] = u.port
      end
      assert.equal(10, #seen)
    end)

    it("fails clearly when the port is taken", function()
      local ok, err = pcall(upstream.start, { port = up.port, quiet = true })
      assert.is_false(ok)
      assert.matches("did not start", err)
      assert.matches("Address already in use", err)
    end)

    it("works as a CLI", function()
      local root = sh("pwd -P"):gsub("%s+$", "")
      local out, code = sh("cd " .. q(up.prefix) .. "/.. && lua5.4 " .. q(root .. "/tests/upstream/launch.lua")
        .. " start 2>/dev/null")
      assert.equal(0, code)
      local url, prefix = out:match("^(%S+)\n(%S+)\n")
      assert.matches("^http://127%.0%.0%.1:%d+/v1$", url)
      local res = request({ base = url:gsub("/v1$", "") }, { body = chat_body("cli") })
      assert.equal(200, res.status)
      local _, stop_code = sh("lua5.4 tests/upstream/launch.lua stop " .. q(prefix) .. " 2>&1")
      assert.equal(0, stop_code)
      assert.is_nil(io.open(prefix .. "/.slm-upstream", "rb"))
      local _, bad = sh("lua5.4 tests/upstream/launch.lua stop /tmp 2>&1")
      assert.equal(1, bad)
      local msg, usage = sh("lua5.4 tests/upstream/launch.lua start --workers none 2>&1")
      assert.equal(2, usage)
      assert.matches("--workers needs a positive integer", msg, 1, true)
      assert.has_error(function() upstream.start { workers = 0 } end, "upstream.start: workers must be an integer in 1..64")
    end)
  end)

  describe("chat completions", function()
    it("echoes the last user message with deterministic usage", function()
      local res = request(up, { body = {
        model = "gpt-4o-mini",
        messages = { { role = "system", content = "be brief" }, { role = "user", content = "hello world" } },
      } })
      assert.equal(200, res.status)
      assert.matches("application/json", res.headers["content-type"])
      local r = json(res)
      assert.equal("chat.completion", r.object)
      assert.matches("^chatcmpl%-sim%-%d+$", r.id)
      assert.equal("gpt-4o-mini", r.model)
      assert.equal(1, #r.choices)
      assert.equal(0, r.choices[1].index)
      assert.equal("assistant", r.choices[1].message.role)
      assert.equal("Echo: hello world", r.choices[1].message.content)
      assert.equal("stop", r.choices[1].finish_reason)
      -- ceil((8 + 11) / 4) + 3 * 2 + 3 = 14; ceil(17 / 4) = 5
      assert.same({ prompt_tokens = 14, completion_tokens = 5, total_tokens = 19 }, r.usage)
      assert.equal(1, up:stats().requests)
    end)

    it("is reachable without /v1 and joins text parts", function()
      local res = request(up, { path = "/chat/completions", body = chat_body({
        { type = "text", text = "one" }, { type = "image_url", image_url = { url = "data:," } },
        { type = "text", text = "two" },
      }) })
      assert.equal(200, res.status)
      assert.equal("Echo: one\ntwo", json(res).choices[1].message.content)
    end)

    it("rejects bodies that are not chat requests", function()
      local res = request(up, { body = "{not json" })
      assert.equal(400, res.status)
      assert.equal("invalid_request_error", json(res).error.type)
      res = request(up, { body = { model = "gpt-4o-mini" } })
      assert.equal(400, res.status)
      assert.equal("messages", json(res).error.param)
      res = request(up, { body = { messages = { { role = "user", content = "x" } } } })
      assert.equal(400, res.status)
      assert.equal("model", json(res).error.param)
    end)

    it("returns n choices and cuts at max_tokens", function()
      local r = json(request(up, { body = chat_body("hi", { n = 2 }) }))
      assert.equal(2, #r.choices)
      assert.equal("Echo: hi [choice 1]", r.choices[1].message.content)
      assert.equal("Echo: hi [choice 2]", r.choices[2].message.content)
      assert.equal(1, r.choices[2].index)
      r = json(request(up, { body = chat_body("a fairly long sentence to cut", { max_tokens = 2 }) }))
      assert.equal("Echo: a ", r.choices[1].message.content)
      assert.equal("length", r.choices[1].finish_reason)
      assert.equal(2, r.usage.completion_tokens)
    end)

    it("calls the first tool with the user text", function()
      local tools = {
        { type = "function", ["function"] = { name = "search_kb", parameters = { type = "object" } } },
        { type = "function", ["function"] = { name = "create_ticket", parameters = { type = "object" } } },
      }
      local r = json(request(up, { body = chat_body("printer on fire", { tools = tools }) }))
      local c = r.choices[1]
      assert.equal("tool_calls", c.finish_reason)
      assert.equal(cjson.null, c.message.content)
      assert.equal(1, #c.message.tool_calls)
      assert.equal("search_kb", c.message.tool_calls[1]["function"].name)
      assert.equal("function", c.message.tool_calls[1].type)
      assert.same({ query = "printer on fire" }, cjson.decode(c.message.tool_calls[1]["function"].arguments))
      -- tool_choice "none" and a tool result both give text
      r = json(request(up, { body = chat_body("x", { tools = tools, tool_choice = "none" }) }))
      assert.equal("Echo: x", r.choices[1].message.content)
    end)

    it("fills a JSON schema from the text", function()
      local schema = {
        type = "object", additionalProperties = false,
        required = { "category", "priority", "language", "summary", "confidence" },
        properties = {
          category = { type = "string", enum = { "billing", "technical", "account", "other" } },
          priority = { type = "string", enum = { "urgent", "high", "medium", "low" } },
          language = { type = "string", enum = { "ru", "en" } },
          summary = { type = "string" },
          confidence = { type = "number", minimum = 0, maximum = 1 },
        },
      }
      local rf = { type = "json_schema", json_schema = { name = "t", strict = true, schema = schema } }
      local r = json(request(up, { body = chat_body("Срочно! Деньги списали дважды, верните оплату",
        { response_format = rf }) }))
      local v = assert(cjson.decode(r.choices[1].message.content))
      assert.same({ category = "billing", priority = "urgent", language = "ru",
        summary = "Срочно! Деньги списали дважды, верните оплату", confidence = 0.9 }, v)
      r = json(request(up, { body = chat_body("The app shows error 500 when I open settings",
        { response_format = rf }) }))
      v = assert(cjson.decode(r.choices[1].message.content))
      assert.equal("technical", v.category)
      assert.equal("en", v.language)
    end)

    it("records the last request", function()
      request(up, { body = chat_body("remember me"), headers = { Authorization = "Bearer sk-x", ["X-Title"] = "t" } })
      local last = up:last()
      assert.equal("Bearer sk-x", last.headers.authorization)
      assert.equal("t", last.headers["x-title"])
      assert.equal("remember me", last.body.messages[1].content)
      assert.same(chat_body("remember me"), cjson.decode(last.raw_body))
    end)
  end)

  describe("scenarios", function()
    it("returns OpenAI-shaped errors with retry headers", function()
      local res = request(up, { body = chat_body("x"), scenario = "status=429,retry_after_ms=150" })
      assert.equal(429, res.status)
      assert.equal("150", res.headers["retry-after-ms"])
      local e = json(res).error
      assert.equal("rate_limit_exceeded", e.code)
      assert.equal("requests", e.type)
      assert.is_string(e.message)
      assert.equal(cjson.null, e.param)

      res = request(up, { body = chat_body("x"), scenario = "status=503,retry_after=1.5,should_retry=false" })
      assert.equal(503, res.status)
      assert.equal("1.5", res.headers["retry-after"])
      assert.equal("false", res.headers["x-should-retry"])
      assert.equal("server_error", json(res).error.type)

      res = request(up, { body = chat_body("x"), scenario = "status=429,retry_after_date=30" })
      assert.matches("^%a%a%a, %d%d %a%a%a %d%d%d%d %d%d:%d%d:%d%d GMT$", res.headers["retry-after"])

      res = request(up, { body = chat_body("x"), scenario = "status=400,code=context_length_exceeded" })
      assert.equal(400, res.status)
      e = json(res).error
      assert.equal("context_length_exceeded", e.code)
      assert.matches("maximum context length is 128000 tokens", e.message)

      res = request(up, { body = chat_body("x"), scenario = "status=404" })
      assert.equal("model_not_found", json(res).error.code)
      res = request(up, { body = chat_body("x"), scenario = "status=402" })
      assert.matches("Insufficient credits", json(res).error.message)
    end)

    it("reads directives from a sim: model name", function()
      local res = request(up, { body = { model = "sim:status=502", messages = { { role = "user", content = "x" } } } })
      assert.equal(502, res.status)
      assert.equal("server_error", json(res).error.type)
    end)

    it("checks the key only under auth", function()
      local res = request(up, { body = chat_body("x"), scenario = "auth", headers = { Authorization = "Bearer sk-nope" } })
      assert.equal(401, res.status)
      assert.equal("invalid_api_key", json(res).error.code)
      res = request(up, { body = chat_body("x"), scenario = "auth", headers = { Authorization = "Bearer sk-test-good" } })
      assert.equal(200, res.status)
      res = request(up, { body = chat_body("x"), headers = { Authorization = "Bearer sk-nope" } })
      assert.equal(200, res.status)
    end)

    it("fails the first N attempts of a key, then succeeds", function()
      local statuses = {}
      for i = 1, 4 do
        local res = request(up, { body = chat_body("x"), scenario = "status=503,fail=2", key = "k1" })
        statuses[i] = res.status
      end
      assert.same({ 503, 503, 200, 200 }, statuses)
      -- without a key the scenario string and body make one
      local a = request(up, { body = chat_body("y"), scenario = "status=500,fail=1" })
      local b = request(up, { body = chat_body("y"), scenario = "status=500,fail=1" })
      assert.same({ 500, 200 }, { a.status, b.status })
      local s = up:stats()
      assert.equal(4, s.by_key.k1)
      assert.equal(6, s.requests)
    end)

    it("breaks replies on request", function()
      local res = request(up, { body = chat_body("x"), scenario = "close" })
      assert.equal(52, res.code) -- empty reply from server
      res = request(up, { body = chat_body("x"), scenario = "malformed" })
      assert.equal(200, res.status)
      assert.is_nil(cjson.decode(res.body))
      res = request(up, { body = chat_body("x"), scenario = "empty" })
      assert.same({ 200, "" }, { res.status, res.body })
      res = request(up, { body = chat_body("x"), scenario = "html" })
      assert.matches("text/html", res.headers["content-type"])
      res = request(up, { body = chat_body("x"), scenario = "wrong_shape" })
      assert.same({ foo = 1 }, json(res))
      assert.equal(0, up:stats().in_flight)
    end)
  end)

  describe("streaming", function()
    local function stream(text, scenario, extra)
      local body = chat_body(text, extra)
      body.stream = true
      return request(up, { body = body, scenario = scenario })
    end

    it("sends role, ~4-byte pieces, finish, usage and [DONE]", function()
      local res = stream("Привет, мир and more", nil, { stream_options = { include_usage = true } })
      assert.equal(200, res.status)
      assert.matches("^text/event%-stream", res.headers["content-type"])
      local events = sse_data(res.body)
      assert.equal("[DONE]", events[#events])
      local first = assert(cjson.decode(events[1]))
      assert.equal("chat.completion.chunk", first.object)
      assert.same({ role = "assistant", content = "" }, first.choices[1].delta)
      local text, finish, usage = {}, nil, nil
      for i = 2, #events - 1 do
        local c = assert(cjson.decode(events[i]))
        if c.usage then
          usage = c.usage
          assert.same({}, c.choices) -- `choices: []`
        elseif c.choices[1].finish_reason ~= cjson.null then
          finish = c.choices[1].finish_reason
        else
          local piece = c.choices[1].delta.content
          assert.is_true(#piece <= 5 and is_utf8(piece), "bad piece " .. piece)
          text[#text + 1] = piece
        end
      end
      assert.equal("Echo: Привет, мир and more", table.concat(text))
      assert.equal("stop", finish)
      assert.equal(9, usage.completion_tokens) -- ceil(35 bytes / 4)
    end)

    it("frames with CRLF, BOM and comments when asked", function()
      local res = stream("hi", "crlf")
      assert.matches("^data: {[^\n]*}\r\n\r\ndata:", res.body)
      assert.equal("[DONE]", sse_data(res.body)[#sse_data(res.body)])
      res = stream("hi", "bom")
      assert.equal("\239\187\191data: ", res.body:sub(1, 9))
      res = stream("hi", "comments")
      assert.matches(": OPENROUTER PROCESSING\n\n", res.body, 1, true)
      res = stream("hi", "multiline")
      local events = sse_data(res.body)
      assert.equal("Echo", cjson.decode(events[2]).choices[1].delta.content)
    end)

    it("streams parallel tool calls interleaved by index", function()
      local events = sse_data(stream("weather and time", "tools_parallel").body)
      local args, names = { [0] = {}, [1] = {} }, {}
      local order = {}
      for i = 1, #events - 1 do
        local c = assert(cjson.decode(events[i]))
        local d = c.choices[1].delta
        for _, tc in ipairs(d.tool_calls or {}) do
          if tc.id then names[tc.index] = tc["function"].name end
          table.insert(args[tc.index], tc["function"].arguments)
          order[#order + 1] = tc.index
        end
      end
      assert.same({ [0] = "get_weather", [1] = "get_time" }, names)
      assert.same({ query = "weather and time" }, cjson.decode(table.concat(args[0])))
      assert.same({ query = "weather and time" }, cjson.decode(table.concat(args[1])))
      assert.same({ 0, 1, 0, 1 }, { order[1], order[2], order[3], order[4] })
      assert.equal("tool_calls", cjson.decode(events[#events - 1]).choices[1].finish_reason)
    end)

    it("ends streams early on request", function()
      local res = stream("some words to stream", "no_done")
      local events = sse_data(res.body)
      assert.equal("stop", cjson.decode(events[#events]).choices[1].finish_reason)
      res = stream("some words to stream", "eof_mid")
      events = sse_data(res.body)
      assert.equal(3, #events)
      assert.equal(cjson.null, cjson.decode(events[3]).choices[1].finish_reason)
      res = stream("some words to stream", "reset")
      assert.equal(18, res.code) -- transfer closed with outstanding read data
      assert.equal(3, #sse_data(res.body))
      res = stream("some words to stream", "error_chunk")
      events = sse_data(res.body)
      assert.equal("server_error", cjson.decode(events[#events]).error.type)
      assert.equal(0, up:stats().in_flight)
    end)

    it("sends exactly N content chunks", function()
      local events = sse_data(stream("x", "chunks=2000").body)
      -- role + 2000 content + finish + [DONE]
      assert.equal(2003, #events)
      assert.equal("tok ", cjson.decode(events[2001]).choices[1].delta.content)
    end)
  end)

  describe("counters", function()
    it("counts concurrent requests", function()
      local rcs = {}
      for i = 1, 4 do rcs[i] = background(up, { body = chat_body("p" .. i), scenario = "delay=1500" }) end
      local s = wait_stats(up, function(st) return st.in_flight == 4 end, 3)
      assert.equal(4, s.in_flight)
      assert.equal(4, s.max_in_flight)
      assert.equal(4, s.requests)
      for i = 1, 4 do assert.equal(0, wait_rc(rcs[i], 5)) end
      s = up:stats()
      assert.equal(0, s.in_flight)
      assert.equal(4, s.max_in_flight)
      assert.equal(0, s.aborted)
    end)

    it("stops counting a client that went away", function()
      local rc = background(up, { body = chat_body("bye"), scenario = "delay=5000", max_time = 0.3 })
      assert.equal(28, wait_rc(rc, 3)) -- curl: operation timed out
      local s = wait_stats(up, function(st) return st.aborted == 1 and st.in_flight == 0 end, 1)
      assert.equal(1, s.aborted)
      assert.equal(0, s.in_flight)
      assert.equal(1, s.requests)
    end)

    it("counts right with several workers, and refuses /__sim/last there", function()
      local multi = upstream.start { quiet = true, workers = 2 }
      local ok, err = pcall(function()
        local kids = io.open("/proc/" .. multi.pid .. "/task/" .. multi.pid .. "/children", "rb")
        local list = kids and kids:read("a") or ""
        if kids then kids:close() end
        local n = 0
        for _ in list:gmatch("%d+") do n = n + 1 end
        assert.equal(2, n, "nginx worker processes")
        local rcs = {}
        for i = 1, 8 do rcs[i] = background(multi, { body = chat_body("w" .. i), scenario = "delay=1500" }) end
        local st = wait_stats(multi, function(x) return x.in_flight == 8 end, 3)
        assert.equal(8, st.max_in_flight)
        for i = 1, 8 do assert.equal(0, wait_rc(rcs[i], 5)) end
        st = multi:stats()
        assert.same({ 0, 8, 8 }, { st.in_flight, st.max_in_flight, st.requests })
        local res = request(multi, { path = "/__sim/last", method = "GET" })
        assert.equal(409, res.status)
        assert.equal("sim_many_workers", cjson.decode(res.body).error.code)
        multi:reset()
        assert.same({ 0, 0 }, { multi:stats().max_in_flight, multi:stats().requests })
      end)
      multi:stop()
      assert(ok, err)
    end)

    it("/reset-reused/ reads a request on a reused connection, then drops the connection", function()
      -- two requests in one curl run: the first opens a connection and is
      -- answered; the second reuses it and is read and dropped, and the
      -- curl CLI (libcurl) silently sends it again on a new connection
      local body = write_tmp(assert(cjson.encode(chat_body("again"))))
      local url = up.base .. "/reset-reused/v1/chat/completions"
      local out, code = sh("curl -s --max-time 10 -o /dev/null -o /dev/null -w '%{http_code}\\n' -H 'Content-Type: application/json' --data-binary @"
        .. q(body) .. " " .. q(url) .. " " .. q(url))
      os.remove(body)
      assert.equal(0, code)
      assert.equal("200\n200\n", out)
      local s = up:stats()
      assert.equal(3, s.requests) -- the second one twice
      assert.equal(2, s.connections)
      assert.equal(0, s.in_flight)
      assert.equal("again", up:last().body.messages[1].content)
    end)

    it("reset zeroes the counters", function()
      request(up, { body = chat_body("x"), key = "z" })
      assert.equal(1, up:stats().requests)
      up:reset()
      assert.same({ requests = 0, in_flight = 0, max_in_flight = 0, connections = 0, aborted = 0, by_key = {} }, up:stats())
    end)
  end)
end)
