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
