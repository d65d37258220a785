-- Hostile inputs for slm.count, slm.image and the tokenizer's Lua API:
-- headers that lie, huge data: URLs, cyclic tool schemas, response formats
-- that were not counted, and limits given as math.huge or NaN.
local slm = require "slm"
local T = require "slm.tokenizer"
local image = require "slm.image"
local make = require "tests.fixtures.images.make"

local o200k = T.get("o200k_base")

local function data_url(bytes, mime)
  return "data:" .. (mime or "image/png") .. ";base64," .. image.base64_encode(bytes)
end

local function image_msg(url, detail)
  return { role = "user", content = { { type = "image_url", image_url = { url = url, detail = detail } } } }
end

local WORST = 2833 + 8 * 5667

describe("hostile images", function()
  it("counts a lossy WebP whose header says 0 x N as the worst case instead of raising", function()
    for _, s in ipairs{ { 0, 16 }, { 16, 0 }, { 0, 0 } } do
      local bytes = make.webp_lossy(s[1], s[2])
      local w, err, code = image.size(bytes)
      assert.is_nil(w)
      assert.are.equal("corrupt", code)
      assert.matches("zero", err)
      local n, info = slm.count({ image_msg(data_url(bytes, "image/webp")) }, "gpt-4o-mini")
      assert.are.equal(3 + o200k:count("user") + 3 + WORST, n)
      assert.is_true(info.estimate)
    end
  end)

  it("reads a header from a huge data: URL decoding only a prefix, whitespace and URL alphabet included", function()
    local real = image.base64_decode
    local longest = 0
    image.base64_decode = function(s, max)
      if #s > longest then longest = #s end
      return real(s, max)
    end
    local ok, err = pcall(function()
      local b64 = image.base64_encode(make.png(1000, 500))
      -- a valid image followed by 16 MB more base64, every 76 chars a CRLF
      local tail = string.rep("QUFB", 4 * 1024 * 1024)
      local body = (b64:gsub("=", "") .. tail):gsub("+", "-"):gsub("/", "_")
      body = body:gsub(("."):rep(76), "%0\r\n")
      local url = "data:image/png;base64," .. body
      local w, h, f = image.size_of_url(url)
      assert.are.same({ 1000, 500, "png" }, { w, h, f })
      assert.is_true(longest < 2 * 1024 * 1024, "decoded " .. longest .. " chars of base64 for a header")
      -- a JPEG whose frame header follows 3 MB of APP1 segments: still found
      local seg = "\255\225\255\255" .. string.rep("E", 65533)
      local jpg = make.jpeg(64, 32)
      local bytes = "\255\216" .. string.rep(seg, 48) .. jpg:sub(3)
      assert.are.same({ 64, 32, "jpeg" }, { image.size_of_url(data_url(bytes, "image/jpeg")) })
      -- whitespace-heavy base64: the prefix is grown, the header still read
      local spaced = image.base64_encode(make.png(300, 200)):gsub(".", "%0" .. string.rep(" ", 3000))
      assert.are.same({ 300, 200, "png" }, { image.size_of_url("data:image/png;base64," .. spaced) })
      -- a truncated file stays truncated, invalid base64 stays invalid
      local _, _, code = image.size_of_url(data_url(make.png(10, 10):sub(1, 20)))
      assert.are.equal("truncated", code)
      local _, msg2, code2 = image.size_of_url("data:image/png;base64,iVBO*w0KGgo=")
      assert.are.equal("corrupt", code2)
      assert.matches("base64", msg2)
    end)
    image.base64_decode = real
    assert(ok, err)
  end)
end)

describe("hostile tool schemas", function()
  it("counts a cyclic tool schema without a stack overflow, and warns", function()
    local node = { type = "object", description = "a node", properties = {} }
    node.properties.child = node
    node.properties.items = { type = "array", items = node }
    local req = { messages = { { role = "user", content = "x" } },
      tools = { { type = "function", ["function"] = { name = "walk", parameters = node } } } }
    local ok, n, info = pcall(slm.count, req, "gpt-4o-mini")
    assert.is_true(ok, tostring(n))
    assert.is_number(n)
    assert.is_true(n > slm.count(req.messages, "gpt-4o-mini"))
    assert.is_table(info.warnings)
    assert.matches("cycl", table.concat(info.warnings, "\n"))
  end)

  it("writes a self-referencing table once per level for Hermes 3 (no 2^64 walk)", function()
    local node = { type = "object" }
    node.left, node.right = node, node
    local req = { messages = { { role = "user", content = "x" } },
      tools = { { type = "function", ["function"] = { name = "walk", parameters = node } } } }
    local t0 = os.clock()
    local n = slm.count(req, "nousresearch/hermes-3-llama-3.1-405b")
    assert.is_true(os.clock() - t0 < 2)
    assert.is_true(n > slm.count(req.messages, "nousresearch/hermes-3-llama-3.1-405b"))
    assert.are.equal('{"left": null, "right": null, "type": "object"}', require("slm.count").pyjson(node))
  end)
end)

describe("response formats", function()
  local SCHEMA = { type = "object", additionalProperties = false, required = { "label", "reason" },
    properties = {
      label = { type = "string", enum = { "billing", "tech", "other" },
        description = "the queue the ticket goes to" },
      reason = { type = "string", description = string.rep("why the ticket belongs there ", 40) },
    } }

  it("counts a json_schema response format as prompt tokens", function()
    local msgs = { { role = "user", content = "My card was charged twice." } }
    local plain = slm.count({ messages = msgs }, "gpt-4o-mini")
    local rf = { type = "json_schema", json_schema = { name = "triage", strict = true, schema = SCHEMA } }
    local n, info = slm.count({ messages = msgs, response_format = rf }, "gpt-4o-mini")
    local schema_text = require("cjson").encode(SCHEMA)
    assert.is_true(n - plain >= o200k:count(schema_text),
      ("response format counted as %d tokens, its schema alone is %d"):format(n - plain, o200k:count(schema_text)))
    assert.are.equal(n - plain, info.response_format)
    assert.are.equal(n, info.min) -- no images: the least is the count, so the context check sees it
    -- json_object and text formats cost (almost) nothing but are not errors
    local j = slm.count({ messages = msgs, response_format = { type = "json_object" } }, "gpt-4o-mini")
    assert.is_true(j >= plain and j < plain + 10)
    assert.are.equal(plain, (slm.count({ messages = msgs, response_format = { type = "text" } }, "gpt-4o-mini")))
    -- Hermes 3 (ChatML) too
    local hp = slm.count({ messages = msgs }, "nousresearch/hermes-3-llama-3.1-405b")
    local hn = slm.count({ messages = msgs, response_format = rf }, "nousresearch/hermes-3-llama-3.1-405b")
    assert.is_true(hn - hp >= o200k:count(schema_text) / 2)
  end)

  it("refuses a response_format that is not a table clearly", function()
    assert.error_matches(function()
      slm.count({ messages = {}, response_format = "json" }, "gpt-4o-mini")
    end, "slm.count: request.response_format must be a table, got string", 1, true)
  end)
end)

describe("tokenizer limits", function()
  it("truncate and chunks take math.huge as no limit and refuse NaN clearly", function()
    local s = "hello world, " .. string.rep("again ", 10)
    assert.are.equal(s, o200k:truncate(s, math.huge))
    assert.are.equal(s, o200k:truncate(s, 2 ^ 63))
    assert.are.same({ s }, (o200k:chunks(s, math.huge)))
    assert.are.same({ s }, (o200k:chunks(s, 1e300, 0)))
    assert.has_error(function() o200k:truncate(s, 0 / 0) end, "truncate: n must be a number >= 0")
    assert.has_error(function() o200k:chunks(s, 0 / 0) end, "chunks: n must be a number >= 1")
    assert.has_error(function() o200k:chunks(s, 5, 0 / 0) end, "chunks: overlap must be a number >= 0 and < n")
  end)
end)

describe("tool schemas beyond the published formula", function()
  local function tool(params)
    return { messages = { { role = "user", content = "hi" } },
      tools = { { type = "function", ["function"] = { name = "f", description = "d", parameters = params } } } }
  end
  local base = { type = "object", properties = { a = { type = "string", description = "the a" } } }

  it("count anyOf, $defs, $ref and items without properties for the budget, not for the context check", function()
    local plain, pinfo = slm.count(tool(base), "gpt-4o-mini")
    assert.is_false(pinfo.estimate) -- what the formula covers stays exact
    assert.are.equal(plain, pinfo.min)
    local words = {}
    for i = 1, 300 do words[i] = "value-" .. i end
    local big = { type = "object", properties = {
        a = { type = "string", description = "the a" },
        b = { anyOf = { { type = "string" }, { type = "null" } } },
        c = { type = "array", items = { type = "string", enum = words } },
        d = { ["$ref"] = "#/$defs/Thing" } },
      ["$defs"] = { Thing = { type = "object", properties = { x = { type = "integer" } } } } }
    local n, info = slm.count(tool(big), "gpt-4o-mini")
    assert.is_true(info.estimate)
    assert.matches("outside the published formula", info.reason)
    -- the 300 enum values alone are some 900 tokens: all of them in the worst case
    assert.is_true(n - plain > 900, ("only %d more tokens"):format(n - plain))
    assert.is_true(info.min < n)
    assert.is_true(info.min >= plain)
  end)
end)

describe("local image paths that are not regular files", function()
  local H = require "tests.helpers"
  local core = require "slm.core"
  local dir
  before_each(function() dir = H.tmpdir() end)
  after_each(function() if dir then os.execute("rm -rf " .. H.q(dir)) end end)

  -- a shell command that must succeed (true in Lua 5.4, 0 in LuaJIT)
  local function sh(cmd)
    local r = os.execute(cmd)
    assert(r == true or r == 0, cmd)
  end

  -- Run `code` in a child interpreter (the one running this spec, with its
  -- package paths) under `timeout 10`: a count that blocks makes the spec
  -- fail with rc 124 instead of hanging the suite.  -> output, rc
  local function child(code, ...)
    local lua = jit and "luajit" or "lua5.4"
    local script = dir .. "/child.lua"
    H.write_file(script, code)
    local args = {}
    for i, a in ipairs{ ... } do args[i] = H.q(a) end
    local cmd = ("LUA_PATH=%s LUA_CPATH=%s timeout 10 %s %s %s </dev/null 2>&1; echo \"rc=$?\""):format(
      H.q(package.path), H.q(package.cpath), lua, H.q(script), table.concat(args, " "))
    local p = io.popen(cmd)
    local out = p:read("*a")
    p:close()
    local rc = tonumber(out:match("rc=(%d+)%s*$"))
    return out:gsub("rc=%d+%s*$", ""), rc
  end

  it("counts a FIFO, /dev/zero and a directory as the worst case without opening or reading them", function()
    sh("mkfifo " .. H.q(dir .. "/pipe.png"))
    local out, rc = child([[
      local slm = require "slm"
      local image = require "slm.image"
      local dir = arg[1]
      for _, p in ipairs{ dir .. "/pipe.png", "file://" .. dir .. "/pipe.png", "/dev/zero",
          "file://localhost/dev/zero", dir } do
        local w, err, code = image.size_of_url(p)
        local n, info = slm.count({ { role = "user", content = {
          { type = "image_url", image_url = { url = p } } } } }, "gpt-4o-mini")
        print(table.concat({ tostring(w), code, n, tostring(info.estimate), err,
          table.concat(info.warnings or {}, ";") }, "|"))
      end
    ]], dir)
    assert.are.equal(0, rc, "the child did not finish (124: it blocked):\n" .. out)
    local rows = {}
    for line in out:gmatch("[^\n]+") do rows[#rows + 1] = line end
    assert.are.equal(5, #rows, out)
    local kinds = { "fifo", "fifo", "character device", "character device", "directory" }
    for i, line in ipairs(rows) do
      local w, code, n, est, err, warns = line:match("^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$")
      assert.are.equal("nil", w, line)
      assert.are.equal("not_regular", code, line)
      assert.are.equal(3 + o200k:count("user") + 3 + WORST, tonumber(n), line)
      assert.are.equal("true", est, line)
      assert.truthy(err:find("is a " .. kinds[i] .. ", not a regular file: not read", 1, true), line)
      assert.truthy(warns:find("a local image could not be read", 1, true), line)
    end
  end)

  it("a client's context check and budget go past a FIFO image without blocking", function()
    sh("mkfifo " .. H.q(dir .. "/pipe.jpg"))
    local up = H.upstream()
    local out, rc = child([[
      local slm = require "slm"
      local c = slm.client{ base_url = arg[1], api_key = "sk-test-good", model = "gpt-4o-mini", timeout = 5,
        max_retries = 0, budget = slm.budget{ tokens = 100000 } }
      local res, err = c:chat{ max_tokens = 20, messages = { { role = "user", content = {
        { type = "text", text = "what is this?" },
        { type = "image_url", image_url = { url = arg[2] } } } } } }
      print(res and "sent" or ("refused " .. tostring(err)))
    ]], up.url, dir .. "/pipe.jpg")
    up:stop()
    assert.are.equal(0, rc, "the child did not finish (124: it blocked):\n" .. out)
    assert.matches("^sent", out)
  end)

  it("core.file_type names the kind without opening; core.read_head reads regular files only", function()
    sh("mkfifo " .. H.q(dir .. "/p"))
    H.write_file(dir .. "/f", "12345")
    assert.are.same({ "file", 5 }, { core.file_type(dir .. "/f") })
    assert.are.equal("fifo", (core.file_type(dir .. "/p")))
    assert.are.equal("directory", (core.file_type(dir)))
    assert.are.equal("character device", (core.file_type("/dev/zero")))
    local none, msg = core.file_type(dir .. "/none")
    assert.is_nil(none)
    assert.is_string(msg)
    assert.are.equal("123", core.read_head(dir .. "/f", 3))
    assert.are.equal("12345", core.read_head(dir .. "/f", 65536))
    assert.are.same({ nil, "a character device, not a regular file", "character device" },
      { core.read_head("/dev/zero", 10) })
    assert.has_error(function() core.read_head("a\0b", 1) end)
    -- a NUL byte in an image path is an error of the path, not a raise of slm.count
    local w, err, code = image.size_of_url("x\0y.png")
    assert.is_nil(w)
    assert.are.equal("unreadable", code)
    assert.matches("NUL", err)
  end)

  it("reads a late JPEG frame header from a regular file, up to image.MAX_FILE_HEAD", function()
    local seg = "\255\225\255\255" .. string.rep("E", 65533)
    local bytes = "\255\216" .. string.rep(seg, 48) .. make.jpeg(64, 32):sub(3) -- 3 MB before the frame
    H.write_file(dir .. "/late.jpg", bytes)
    assert.are.same({ 64, 32, "jpeg" }, { image.size_of_url(dir .. "/late.jpg") })
    local keep = image.MAX_FILE_HEAD
    image.MAX_FILE_HEAD = 1048576
    local w, _, code = image.size_of_url(dir .. "/late.jpg")
    image.MAX_FILE_HEAD = keep
    assert.is_nil(w)
    assert.are.equal("truncated", code) -- counted as the worst case, never read to its end
    local _, _, missing = image.size_of_url(dir .. "/none.png")
    assert.are.equal("unreadable", missing)
  end)
end)

describe("content parts that are not counted (input_audio, file)", function()
  local H = require "tests.helpers"
  local MODEL = "sim:audio"   -- an unknown directive: served as usual
  local TINY = "sim:audio-tiny"
  local CONTEXT = 128000
  local up
  setup(function()
    up = H.upstream()
    slm.models[MODEL] = { context = CONTEXT, max_output = 1000, input_per_m = 0.15, output_per_m = 0.60,
      tokenizer = "o200k_base", format = "openai" }
    slm.models[TINY] = { context = 300, max_output = 100, input_per_m = 1, output_per_m = 2,
      tokenizer = "o200k_base", format = "openai" }
  end)
  teardown(function()
    slm.models[MODEL], slm.models[TINY] = nil, nil
    if up then up:stop() end
  end)
  before_each(function() up:reset() end)

  local AUDIO = { type = "input_audio", input_audio = { data = image.base64_encode(("\0"):rep(3000)), format = "wav" } }
  local FILE = { type = "file", file = { filename = "a.pdf", file_data = "data:application/pdf;base64,JVBERi0=" } }
  local function request(model, part, max_tokens)
    return { model = model, max_tokens = max_tokens or 50, messages = {
      { role = "user", content = { { type = "text", text = "Transcribe and summarize this." }, part } } } }
  end
  local function text_only(model)
    return { model = model, messages = { { role = "user", content = { { type = "text",
      text = "Transcribe and summarize this." } } } } }
  end

  it("count 0 and at least 0, at most the model's context, flagged an estimate", function()
    for _, part in ipairs{ AUDIO, FILE } do
      local plain = slm.count(text_only(MODEL), MODEL)
      local n, info = slm.count(request(MODEL, part), MODEL)
      assert.are.equal(plain, n)
      assert.are.equal(plain, info.min)
      assert.are.equal(CONTEXT, info.max)
      assert.are.equal(1, info.unbounded)
      assert.is_true(info.estimate)
      assert.matches("not counted", info.reason)
      -- Hermes 3 (ChatML): its own context; an unknown model: no bound at all
      local _, hinfo = slm.count(request(MODEL, part), "nousresearch/hermes-3-llama-3.1-405b")
      assert.are.equal(65536, hinfo.max)
      local _, uinfo = slm.count(request(MODEL, part), "no-such-model")
      assert.is_nil(uinfo.max)
      assert.are.equal(1, uinfo.unbounded)
    end
    -- without such parts max is the count (images of unknown size at their largest)
    local n, info = slm.count(text_only(MODEL), MODEL)
    assert.are.equal(n, info.max)
    assert.are.equal(0, info.unbounded)
  end)

  it("a budget that pays for the text but not for a context's worth of input refuses, sending nothing", function()
    for _, part in ipairs{ AUDIO, FILE } do
      local req = request(MODEL, part)
      local text = slm.count(req, MODEL) + 50
      local b = slm.budget{ tokens = CONTEXT + 50 - 1 }
      assert.is_true(text < CONTEXT / 100)
      local res, err = H.sim_client(up, { model = MODEL, budget = b, max_retries = 0 }):chat(req)
      assert.is_nil(res)
      assert.are.equal("budget", err.kind)
      assert.are.equal(CONTEXT + 50, err.needed_tokens)
      -- a USD budget ten times the text's worst case, far below a context's worth
      local usd = slm.cost(MODEL, { prompt_tokens = text - 50, completion_tokens = 50 })
      local ub = slm.budget{ usd = usd * 10 }
      local _, uerr = H.sim_client(up, { model = MODEL, budget = ub, max_retries = 0 }):chat(req)
      assert.are.equal("budget", uerr.kind)
      assert.are.equal(0, up:stats().requests)
      assert.are.same({ 0, 0 }, { b:spent() })
      assert.are.same({ 0, 0 }, { b:reserved() })
    end
  end)

  it("a budget with room reserves a context's worth and settles with the simulator's usage", function()
    local b = slm.budget{ tokens = CONTEXT + 50 }
    local res = assert(H.sim_client(up, { model = MODEL, budget = b, max_retries = 0 }):chat(request(MODEL, AUDIO)))
    assert.are.equal(1, up:stats().requests)
    assert.is_false(res.usage.estimated == true)
    assert.are.same({ 0, 0 }, { b:reserved() })
    local usd, tokens = b:spent()
    assert.are.equal(res.usage.total_tokens, tokens)
    assert.is_true(tokens < 1000)
    assert.is_true(math.abs(usd - res.cost) < 1e-12)
  end)

  it("the context check passes them (counted at 0); a model's context bounds the reservation", function()
    -- 300-token context: the text + 100 output fits, the audio counted at 0
    local req = request(TINY, AUDIO, 100)
    local res = assert(H.sim_client(up, { model = TINY, max_retries = 0 }):chat(req))
    assert.truthy(res)
    local b = slm.budget{ tokens = 300 + 100 }
    assert(H.sim_client(up, { model = TINY, budget = b, max_retries = 0 }):chat(req))
    local _, err = H.sim_client(up, { model = TINY, budget = slm.budget{ tokens = 300 + 100 - 1 },
      max_retries = 0 }):chat(req)
    assert.are.equal("budget", err.kind)
    assert.are.equal(400, err.needed_tokens)
    -- a model whose context is not known cannot be bounded: refused, clearly
    local _, uerr = H.sim_client(up, { model = "gpt-4o", budget = slm.budget{ tokens = 1e9 },
      max_retries = 0 }):chat(request("gpt-4o", FILE))
    assert.are.equal("budget", uerr.kind)
    assert.matches("cannot be counted", uerr.message)
    assert.matches("context of model gpt%-4o is not known", uerr.message)
    assert.are.equal(2, up:stats().requests)
  end)

  it("a reply without usage is charged the bound, never the text alone", function()
    local b = slm.budget{ tokens = CONTEXT + 50 }
    local req = request(MODEL, AUDIO)
    req.headers = { ["X-Sim-Scenario"] = "usage=missing" }
    local res = assert(H.sim_client(up, { model = MODEL, budget = b, max_retries = 0 }):chat(req))
    assert.is_true(res.usage.estimated)
    assert.are.equal(CONTEXT, res.usage.prompt_tokens)
    local _, tokens = b:spent()
    assert.are.equal(res.usage.total_tokens, tokens)
    assert.is_true(tokens >= CONTEXT)
  end)
end)

describe("guard.worst_prompt (the budgets' bound of a prompt, the direct and the --via batch path's)", function()
  local guard = require "slm.guard"
  it("is the count without uncounted parts, the context with them, nothing without a known context", function()
    local text = { { role = "user", content = "hello" } }
    local audio = { { role = "user", content = { { type = "text", text = "hello" },
      { type = "input_audio", input_audio = { data = "AAAA", format = "wav" } } } } }
    local n, info = guard.prompt_tokens({ messages = text }, "gpt-4o-mini")
    assert.equal(n, guard.worst_prompt(n, info, "gpt-4o-mini"))
    n, info = guard.prompt_tokens({ messages = audio }, "gpt-4o-mini")
    assert.equal(128000, guard.worst_prompt(n, info, "gpt-4o-mini"))
    n, info = guard.prompt_tokens({ messages = audio }, "self-hosted-model")
    local none, why = guard.worst_prompt(n, info, "self-hosted-model")
    assert.is_nil(none)
    assert.matches("1 content part%(s%) that cannot be counted %(audio, files%) and the context of model "
      .. "self%-hosted%-model is not known", why)
  end)
end)
