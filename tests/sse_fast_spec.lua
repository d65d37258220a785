-- The streaming fast path: core.sse_parser():feed_chat, which hands a plain
-- content-only chat.completion.chunk of choice 0 over as its content string
-- (no JSON decoding), Accumulator:add_text(s)/add_texts/known, and the
-- client's use of both (lazily decoded chunks, the pairs queue, slices).
--
-- The rule checked everywhere: feed_chat returns a string only when
-- lua-cjson (slm.json) decodes the same data to a chunk whose only effect on
-- slm.accumulate is appending that very string to choice 0 (the oracle
-- below); everything else comes back as the event table feed() makes.
local core = require "slm.core"
local json = require "slm.json"
local Acc = require "slm.accumulate"
local slm = require "slm"

local null = json.null
local concat, rep, char = table.concat, string.rep, string.char

local H = require "tests.helpers"
local slurp = H.read_file
local dir = H.FIXTURES .. "openai-streams/"

local function show(s)
  if #s > 200 then s = s:sub(1, 200) .. "..." end
  return (string.format("%q", s):gsub("\\\n", "\\n"))
end

local MT = {} -- stands for the client's lazy-chunk metatable

local function absent(v) return v == nil or v == null end
local BITS = { id = 1, created = 2, model = 4, system_fingerprint = 8 }
local NULL_IN_DELTA = { "role", "refusal", "reasoning", "reasoning_content", "tool_calls" }

-- The oracle: the content when data, decoded by slm.json, is a chunk that
-- slm.accumulate (having the fields named by `known` already) would fold by
-- appending exactly that string to choice 0 and nothing else; else nil.
local function oracle(data, known)
  local ok, c = pcall(json.decode, data)
  if not ok or type(c) ~= "table" then return nil end
  if not absent(c.usage) or not absent(c.error) then return nil end
  for k, bit in pairs(BITS) do
    if math.floor(known / bit) % 2 == 0 and not absent(c[k]) then return nil end
  end
  local chs = c.choices
  if type(chs) ~= "table" or chs[1] == nil or next(chs, (next(chs))) ~= nil then return nil end
  local ch = chs[1]
  if type(ch) ~= "table" or ch.index ~= 0 or not absent(ch.finish_reason) or not absent(ch.logprobs) then
    return nil
  end
  local d = ch.delta
  if type(d) ~= "table" or type(d.content) ~= "string" then return nil end
  for _, k in ipairs(NULL_IN_DELTA) do
    if not absent(d[k]) then return nil end
  end
  return d.content
end

-- One event (data lines from data's lines) for the parser.
local function frame(data, fields)
  return (fields or "") .. "data: " .. (data:gsub("\n", "\ndata: ")) .. "\n\n"
end

-- data through feed_chat on parser p (a fresh one when nil): text or false,
-- the chunk or event table, nslow.
local function fast(data, known, p)
  p = p or core.sse_parser()
  local pairs_, nslow = p:feed_chat(frame(data), known, MT)
  assert(pairs_, nslow)
  assert.equal(2, #pairs_)
  return pairs_[1], pairs_[2], nslow
end

-- The differential check of one event; returns what feed_chat said.
local function differential(data, known, p)
  local text, second, nslow = fast(data, known, p)
  local fresh = fast(data, known)
  assert(text == fresh, "a warm parser answered otherwise than a fresh one for " .. show(data))
  local want = oracle(data, known)
  if text then
    assert(want ~= nil, "fast path took a chunk that the accumulator reads otherwise: " .. show(data))
    assert(want == text, "fast path content " .. show(text) .. " ~= cjson's " .. show(want))
    assert.equal(0, nslow)
    assert.equal(MT, getmetatable(second))
    assert.equal(data, rawget(second, "__slm_raw"))
  else
    assert.equal(1, nslow)
    assert.same({ data = data, event = "message" }, second)
  end
  return text
end

local function content_chunk(content, tail)
  return '{"choices":[{"index":0,"delta":{"content":' .. content .. '}' .. (tail or "") .. '}]}'
end

local OPENAI = [[{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1727346172,]]
  .. [["model":"gpt-4o","system_fingerprint":"fp_1","choices":[{"index":0,"delta":{"content":" world"},]]
  .. [["logprobs":null,"finish_reason":null}]}]]

-- { data, known, want }: want is the content the fast path must return, or
-- false when it must decline (the differential check runs on all of them).
local CASES = {
  -- accepted
  { "plain", content_chunk('"hi"'), 0, "hi" },
  { "OpenAI's content chunk", OPENAI, 15, " world" },
  { "captured fields may be null", [[{"id":null,"created":null,"model":null,"system_fingerprint":null,]]
    .. [["choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, "x" },
  { "id and created known, model absent", [[{"id":"c","created":5,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 3, "x" },
  { "id, created, model known", [[{"id":"c","created":5,"model":"m","choices":[{"index":0,"delta":{"content":"x"}}]}]], 7, "x" },
  { "simple escapes", content_chunk([["a\"b\\c\/d\be\ff\ng\rh\ti"]]), 0, 'a"b\\c/d\be\ff\ng\rh\ti' },
  { "\\u escapes", content_chunk([["\u00e9\u20AC\u0041\u007f\u0080\u07ff\u0800\uffff"]]), 0,
    "\xC3\xA9\xE2\x82\xAC\x41\x7F\xC2\x80\xDF\xBF\xE0\xA0\x80\xEF\xBF\xBF" },
  { "surrogate pair", content_chunk([["\ud83d\ude00 \uD83D\uDE00 \udbff\udfff"]]), 0,
    "\xF0\x9F\x98\x80 \xF0\x9F\x98\x80 \xF4\x8F\xBF\xBF" },
  { "\\u0000", content_chunk([["a\u0000b"]]), 0, "a\0b" },
  { "raw UTF-8", content_chunk('"Привет, 世界 😀"'), 0, "Привет, 世界 😀" },
  { "bytes that are not UTF-8 pass through", content_chunk('"\xff\xfe\xc3"'), 0, "\xff\xfe\xc3" },
  { "empty content", content_chunk('""'), 0, "" },
  { "nulls everywhere", [[{"usage":null,"error":null,"choices":[{"index":0,"finish_reason":null,]]
    .. [["delta":{"role":null,"content":"x","refusal":null,"reasoning":null,"reasoning_content":null,]]
    .. [["tool_calls":null}}]}]], 0, "x" },
  { "extra fields at every level", [[{"object":"chat.completion.chunk","service_tier":"default",]]
    .. [["choices":[{"index":0,"delta":{"content":"x","annotations":[],"audio":{"id":"a"}},]]
    .. [["logprobs":null,"native_finish_reason":null,"message":{"content":"zzz"}}],"obfuscation":"Ab3x"}]], 0, "x" },
  { "reordered members", [[{"choices":[{"delta":{"refusal":null,"content":"x","role":null},]]
    .. [["finish_reason":null,"index":0}],"model":"m","id":"c"}]], 15, "x" },
  { "whitespace everywhere", ' \t{ "choices" :\n[ {\t"index"\n:\n0 , "delta" : { "content" : "x" } } ] }\n ',
    0, "x" },
  { "nulls and skipped names may repeat", [[{"usage":null,"usage":null,"object":1,"object":{},]]
    .. [["choices":[{"index":0,"finish_reason":null,"finish_reason":null,"native":1,"native":2,]]
    .. [["delta":{"role":null,"role":null,"content":"x"}}]}]], 0, "x" },
  { "escaped names inside skipped values", [[{"x":{"con\u0074ent":"y","\"":[{"\\":1}]},]]
    .. [["choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, "x" },
  { "numbers and literals in skipped values", [[{"created":-1.5e+10,"a":[0,-0,1E5,2.5e-3,10,0.0,]]
    .. [[true,false,null,"",{}],"choices":[{"index":0,"delta":{"content":"x"}}]}]], 2, "x" },
  { "32 nested levels in a skipped value", '{"choices":[{"index":0,"native":' .. rep("[", 32)
    .. rep("]", 32) .. ',"delta":{"content":"x"}}]}', 0, "x" },
  { "long content", content_chunk('"' .. rep("abc\\n", 25000) .. '"'), 0, rep("abc\n", 25000) },

  -- declined: the accumulator would do more than append to choice 0
  { "logprobs to fold", [[{"choices":[{"index":0,"delta":{"content":"x"},]]
    .. [["logprobs":{"content":[{"token":"x","logprob":-0.25,"bytes":[120],"top_logprobs":[]}]}}]}]], 0, false },
  { "id not known yet", OPENAI, 0, false },
  { "model not known yet", OPENAI, 11, false },
  { "system_fingerprint not known yet", OPENAI, 7, false },
  { "created not known yet", OPENAI, 13, false },
  { "index 1", content_chunk('"x"'):gsub('"index":0', '"index":1'), 0, false },
  { "index 0.0", content_chunk('"x"'):gsub('"index":0', '"index":0.0'), 0, false },
  { "index -0", content_chunk('"x"'):gsub('"index":0', '"index":-0'), 0, false },
  { "index 0e0", content_chunk('"x"'):gsub('"index":0', '"index":0e0'), 0, false },
  { "index \"0\"", content_chunk('"x"'):gsub('"index":0', '"index":"0"'), 0, false },
  { "index null", content_chunk('"x"'):gsub('"index":0', '"index":null'), 0, false },
  { "no index", [[{"choices":[{"delta":{"content":"x"}}]}]], 0, false },
  { "finish_reason stop", content_chunk('"x"', ',"finish_reason":"stop"'), 0, false },
  { "finish_reason length", content_chunk('""', ',"finish_reason":"length"'), 0, false },
  { "role", content_chunk('"x","role":"assistant"'), 0, false },
  { "refusal \"\"", content_chunk('"x","refusal":""'), 0, false },
  { "refusal", content_chunk('null,"refusal":"no"'), 0, false },
  { "tool_calls []", content_chunk('"x","tool_calls":[]'), 0, false },
  { "tool call", content_chunk('null,"tool_calls":[{"index":0,"function":{"arguments":"{"}}]'), 0, false },
  { "reasoning", content_chunk('"x","reasoning":"hm"'), 0, false },
  { "reasoning_content", content_chunk('"x","reasoning_content":"hm"'), 0, false },
  { "usage", [[{"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"total_tokens":1}}]], 0, false },
  { "error object", [[{"error":{"message":"boom"},"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "error string", [[{"error":"boom","choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "two choices", [[{"choices":[{"index":0,"delta":{"content":"x"}},{"index":1,"delta":{"content":"y"}}]}]], 0, false },
  { "no choices", [[{"choices":[]}]], 0, false },
  { "choices null", [[{"choices":null}]], 0, false },
  { "choices object", [[{"choices":{"index":0,"delta":{"content":"x"}}}]], 0, false },
  { "no choices member", [[{"id":null}]], 0, false },
  { "content null", content_chunk("null"), 0, false },
  { "content a number", content_chunk("1"), 0, false },
  { "content an object", content_chunk('{"text":"x"}'), 0, false },
  { "empty delta", [[{"choices":[{"index":0,"delta":{}}]}]], 0, false },
  { "delta null", [[{"choices":[{"index":0,"delta":null,"message":{"content":"x"}}]}]], 0, false },
  { "no delta", [[{"choices":[{"index":0,"message":{"content":"x"}}]}]], 0, false },

  -- declined: doubtful, or not JSON at all
  { "two contents", content_chunk('"x","content":"y"'), 0, false },
  { "two choices members", [[{"choices":[{"index":0,"delta":{"content":"x"}}],]]
    .. [["choices":[{"index":0,"delta":{"content":"y"}}]}]], 0, false },
  { "two indexes", [[{"choices":[{"index":0,"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "two deltas", [[{"choices":[{"index":0,"delta":{"content":"x"},"delta":{"content":"y"}}]}]], 0, false },
  { "escaped name: content", content_chunk('"x"'):gsub('"content"', '"con\\u0074ent"'), 0, false },
  { "escaped name: choices", content_chunk('"x"'):gsub('"choices"', '"\\u0063hoices"'), 0, false },
  { "escaped name: usage", [[{"us\u0061ge":{"total_tokens":1},"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "lone high surrogate", content_chunk([["\ud800"]]), 0, false },
  { "lone low surrogate", content_chunk([["\udc00"]]), 0, false },
  { "high surrogate then a letter", content_chunk([["\ud800\u0041"]]), 0, false },
  { "reversed surrogates", content_chunk([["\ude00\ud83d"]]), 0, false },
  { "high surrogate at the end", content_chunk([["a\ud83d"]]), 0, false },
  { "lone surrogate in a skipped string", [[{"x":"\udc00","choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "unknown escape", content_chunk([["\x41"]]), 0, false },
  { "\\U", content_chunk([["\U0041"]]), 0, false },
  { "short \\u", content_chunk([["\u12"]]), 0, false },
  { "bad hex", content_chunk([["\u12G4"]]), 0, false },
  { "raw tab in content", content_chunk('"a\tb"'), 0, false },
  { "raw control byte in a skipped string", [[{"x":"]] .. char(1) .. [[","choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "raw NUL", content_chunk('"x"') .. "\0", 0, false },
  { "NUL inside", content_chunk('"a\0b"'), 0, false },
  { "truncated", content_chunk('"x"'):sub(1, -3), 0, false },
  { "unterminated string", [[{"choices":[{"index":0,"delta":{"content":"x]], 0, false },
  { "trailing garbage", content_chunk('"x"') .. " x", 0, false },
  { "two objects", content_chunk('"x"') .. content_chunk('"y"'), 0, false },
  { "trailing comma in an object", [[{"choices":[{"index":0,"delta":{"content":"x"},}]}]], 0, false },
  { "trailing comma in a skipped array", [[{"x":[1,],"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "missing colon", [[{"x" 1,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "33 nested levels", '{"choices":[{"index":0,"native":' .. rep("[", 33) .. rep("]", 33)
    .. ',"delta":{"content":"x"}}]}', 0, false },
  { "100000 nested levels", '{"x":' .. rep("[", 100000) .. rep("]", 100000)
    .. ',"choices":[{"index":0,"delta":{"content":"x"}}]}', 0, false },
  { "unbalanced nesting", '{"x":[[[{]]],"choices":[{"index":0,"delta":{"content":"x"}}]}', 0, false },
  { "number 01", [[{"x":01,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "number 1.", [[{"x":1.,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "number .5", [[{"x":.5,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "number +1", [[{"x":+1,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "number 0x10", [[{"x":0x10,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "number 1e", [[{"x":1e,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "number -", [[{"x":-,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "NaN", [[{"x":NaN,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "Infinity", [[{"x":Infinity,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "tru", [[{"x":tru,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "True", [[{"x":True,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "nul", [[{"x":nul,"choices":[{"index":0,"delta":{"content":"x"}}]}]], 0, false },
  { "top-level array", "[" .. content_chunk('"x"') .. "]", 0, false },
  { "BOM before the object", "\xEF\xBB\xBF" .. content_chunk('"x"'), 0, false },
  { "[DONE]", "[DONE]", 15, false },
  { "a string", '"x"', 15, false },
  { "empty data", "", 15, false },
}

describe("p:feed_chat", function()
  for _, case in ipairs(CASES) do
    local name, data, known, want = case[1], case[2], case[3], case[4]
    it((want and "takes " or "declines ") .. name, function()
      local got = differential(data, known)
      if want then
        assert(got == want, "expected " .. show(want) .. ", got " .. show(tostring(got)))
      else
        assert(got == false, "expected the event table, got " .. show(tostring(got)))
      end
    end)
  end

  it("declines events of another type, and ignores the event id", function()
    local data = content_chunk('"x"')
    for _, fields in ipairs{ "event: error\n", "event: foo\n" } do
      local evs = assert(core.sse_parser():feed_chat(frame(data, fields), 0, MT))
      assert.equal(false, evs[1])
      assert.same({ data = data, event = fields:match("event: (%w+)") }, evs[2])
    end
    local evs = assert(core.sse_parser():feed_chat(frame(data, "id: 7\n"), 0, MT))
    assert.equal("x", evs[1])
  end)

  it("reads data split over several lines", function()
    local data = '{"choices":[{"index":0,\n"delta":{"content":"x"}}]\n}'
    assert.equal("x", differential(data, 0))
  end)

  it("gives false for the chunk without a metatable, and checks its arguments", function()
    local evs, nslow = core.sse_parser():feed_chat(frame(content_chunk('"x"')), 0)
    assert.same({ "x", false }, evs)
    assert.equal(0, nslow)
    local p = core.sse_parser()
    assert.has_error(function() p:feed_chat(1, 0) end)
    assert.has_error(function() p:feed_chat("", 16) end)
    assert.has_error(function() p:feed_chat("", -1) end)
    assert.has_error(function() p:feed_chat("") end)
    assert.has_error(function() p:feed_chat("", 0, 1) end)
  end)

  it("gives the same pairs whatever the chunk boundaries", function()
    local stream = frame(OPENAI) .. ": comment\n" .. frame(content_chunk('"y"'), "event: other\n")
      .. frame(content_chunk('"z"')) .. "data: [DONE]\n\n"
    local whole, nslow = assert(core.sse_parser():feed_chat(stream, 15))
    assert.same({ " world", false, false, { data = content_chunk('"y"'), event = "other" },
      "z", false, false, { data = "[DONE]", event = "message" } }, whole)
    assert.equal(2, nslow)
    for _, size in ipairs{ 1, 2, 7 } do
      local p, got, slow = core.sse_parser(), {}, 0
      for i = 1, #stream, size do
        local evs, n = assert(p:feed_chat(stream:sub(i, i + size - 1), 15))
        for _, v in ipairs(evs) do got[#got + 1] = v end
        slow = slow + n
      end
      assert.same(whole, got)
      assert.equal(nslow, slow)
    end
  end)

  it("reports an oversized event with the pairs before it", function()
    local p = core.sse_parser{ max_event = 100 }
    local evs, err, before = p:feed_chat(frame(content_chunk('"x"')) .. frame(rep("y", 200)), 0, MT)
    assert.is_nil(evs)
    assert.matches("max_event", err)
    assert.equal("x", before[1])
  end)

  describe("with the prefix of the last chunk cached", function()
    local prefix = '{"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"'
    local seq = {
      { prefix .. 'a"}}]}', 15, "a" },
      { prefix .. 'b","content":"c"}}]}', 15, false },              -- a second content
      { prefix .. 'b"}}],"obfuscation":"xyz"}', 15, "b" },           -- another tail
      { prefix .. 'b"},"finish_reason":"stop"}]}', 15, false },      -- a finish
      { prefix .. 'c\\"d"}}]}', 15, 'c"d' },                           -- an escaped quote
      { prefix .. 'c"}}]}', 0, false },                              -- fewer known fields
      { prefix .. 'c"}}]}', 5, "c" },
      { prefix .. 'unterminated}}]}', 15, false },
      { prefix .. 'x\\"}}]}', 15, false },                           -- the quote is escaped
      { prefix .. '"}}]} ', 15, "" },
      { prefix .. '"}}]}x', 15, false },
      { prefix, 15, false },
      { prefix .. '\\ud83d\\ude00"}}]}', 15, "\xF0\x9F\x98\x80" },
      { prefix .. '"},"index":1}]}', 15, false },                    -- a second index
      { prefix .. '"}},{"index":1,"delta":{"content":"x"}}]}', 15, false },
    }
    it("answers exactly as without it", function()
      local p = core.sse_parser()
      for i, s in ipairs(seq) do
        local got = differential(s[1], s[2], p)
        assert(got == s[3], "step " .. i .. ": " .. show(s[1]) .. " gave " .. tostring(got))
      end
    end)
  end)
end)

describe("Accumulator fast-path methods", function()
  it("add_text and add_texts append to choice 0 as add() would", function()
    local a, b = Acc.new(), Acc.new()
    local first = json.decode([[{"id":"c","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}]])
    a:add(first)
    b:add(json.decode(json.encode(first)))
    for _, s in ipairs{ "Hel", "", "lo" } do
      a:add(json.decode(content_chunk(json.encode(s))))
    end
    b:add_text("Hel")
    b:add_texts({ "", false, "lo" }, 1, 3)
    b:add_texts({}, 1, 0)
    assert.same(a:result(), b:result())
    assert.equal("Hello", b:result().text)
  end)

  it("add_text opens choice 0 when it is the first thing", function()
    local a = Acc.new()
    a:add_text("x")
    assert.equal("x", a:result().text)
    assert.equal(0, a:result().choices[1].index)
  end)

  it("known() names the fields add() ignores from now on", function()
    local a = Acc.new()
    assert.equal(0, a:known())
    a:add(json.decode([[{"id":"","model":"","created":3,"system_fingerprint":null,"choices":[]}]]))
    assert.equal(0, a:known()) -- "" and null are not kept; created goes with the id
    a:add(json.decode([[{"id":"c","choices":[]}]]))
    assert.equal(3, a:known())
    a:add(json.decode([[{"model":"m","system_fingerprint":"fp","choices":[]}]]))
    assert.equal(15, a:known())
  end)
end)

-- The recorded OpenAI streams ---------------------------------------------

local expected = json.decode(slurp(dir .. "expected.json"))
local names = {}
for name in pairs(expected) do names[#names + 1] = name end
table.sort(names)

describe("the recorded OpenAI streams, event by event", function()
  for _, name in ipairs(names) do
    it(name .. ": every event, and the accumulated result", function()
      local events = assert(core.sse_parser():feed(slurp(dir .. name)))
      local p, quick, ref = core.sse_parser(), Acc.new(), Acc.new()
      local known, taken, plain = 0, 0, 0
      for _, ev in ipairs(events) do
        local data = ev.data
        local text = differential(data, known, p)
        for _, k in ipairs{ 0, 15 } do differential(data, k) end
        if oracle(data, known) then
          plain = plain + 1
          assert(text, "a plain content chunk was declined: " .. show(data))
        end
        if data == "[DONE]" then
          quick:done()
          ref:done()
        else
          local chunk = json.decode(data)
          ref:add(chunk)
          if text then
            taken = taken + 1
            quick:add_text(text)
          else
            quick:add(chunk)
          end
        end
        known = quick:known()
      end
      assert.equal(plain, taken)
      local content = expected[name].choices[1].content
      local r = ref:result()
      if r.logprobs then
        -- chunks with logprobs are folded by the accumulator, never taken fast
        assert.equal(0, taken)
        assert.is_true(#(r.logprobs.content or r.logprobs.refusal) > 0)
      elseif type(content) == "string" and content ~= "" and #expected[name].choices == 1 then
        assert.is_true(taken > 0)
      end
      assert.same(r, quick:result())
    end)
  end
end)

-- Through the client --------------------------------------------------------

-- A runtime whose connections replay body in reads of `piece` bytes (the
-- rest of it is the libcurl runtime's: sleep, semaphore, ...).
local function memory(body, piece)
  local rt = {}
  for k, v in pairs(require "slm.transport.curl") do rt[k] = v end
  rt.open = function()
    local pos = 0
    return {
      response = function() return 200, { ["content-type"] = "text/event-stream" } end,
      read = function()
        if pos >= #body then return nil end
        local s = body:sub(pos + 1, pos + piece)
        pos = pos + piece
        return s
      end,
      result = function() return true end,
      cancel = function() end,
      info = function() return {} end,
    }
  end
  return rt
end

local function client_for(body, piece)
  return slm.client{ base_url = "http://memory/v1", api_key = "sk-test", model = "test-model",
    transport = memory(body, piece or #body), max_retries = 0 }
end

local MSGS = { { role = "user", content = "hi" } }

-- What the client hands out, computed the slow way: every event decoded.
local function reference(body)
  local acc, deltas = Acc.new(), {}
  for _, ev in ipairs(assert(core.sse_parser():feed(body))) do
    if ev.data == "[DONE]" then
      acc:done()
    else
      local chunk = json.decode(ev.data)
      local text = acc:add(chunk)
      if type(chunk.choices) == "table" and chunk.choices[1] ~= nil then
        deltas[#deltas + 1] = { text or "", chunk }
      end
    end
  end
  return deltas, acc:result()
end

-- Compares the (text, chunk) pairs a client handed out with the reference;
-- returns how many chunks came lazily.
local function same_deltas(got, want)
  local lazy = 0
  assert.equal(#want, #got)
  for i, w in ipairs(want) do
    local text, chunk = got[i][1], got[i][2]
    assert.equal(w[1], text)
    if getmetatable(chunk) ~= nil then
      lazy = lazy + 1
      assert.equal(w[2].id, chunk.id) -- the first read decodes it
      assert.is_nil(getmetatable(chunk))
    end
    assert.same(w[2], chunk)
  end
  return lazy
end

local function same_response(res, want)
  assert.equal(want.text, res.text)
  assert.equal(want.id, res.id)
  assert.equal(want.model, res.model)
  assert.same(want.usage, res.usage)
  assert.equal(want.finish_reason, res.finish_reason)
  assert.same(want.choices, res.choices)
  assert.same(want.tool_calls, res.tool_calls)
end

describe("the client's fast path", function()
  for _, name in ipairs(names) do
    local body = slurp(dir .. name)
    it(name .. " gives the same deltas and Response as decoding every chunk", function()
      local want_deltas, want = reference(body)
      for _, piece in ipairs{ #body, 1, 97 } do
        local got = {}
        local res, err = client_for(body, piece):chat{ messages = MSGS, stream = true,
          on_delta = function(text, chunk) got[#got + 1] = { text, chunk } end }
        assert.is_nil(err)
        local lazy = same_deltas(got, want_deltas)
        -- read whole, every chunk is judged before the id is known
        if name == "a491adda08c3.sse" and piece < #body then assert.is_true(lazy > 0) end
        same_response(res, want)

        local s = client_for(body, piece):stream{ messages = MSGS }
        got = {}
        for text, chunk in s do got[#got + 1] = { text, chunk } end
        same_deltas(got, want_deltas)
        same_response(assert(s:result()), want)
      end
    end)
  end

  -- a long stream: reads bigger than a slice, escapes, unicode, and chunks
  -- whose id only shows up late and whose system_fingerprint is always null
  local pieces = { "tok ", "a\\nb", "\\\"q\\\"", "\\u00e9", "Привет", "\\ud83d\\ude00", "", " end" }
  local lines = { 'data: {"object":"chat.completion.chunk","system_fingerprint":null,'
    .. '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n' }
  for i = 1, 6000 do
    local id = i > 3 and '"id":"chatcmpl-late",' or ""
    lines[#lines + 1] = 'data: {' .. id .. '"object":"chat.completion.chunk","created":1,"model":"m",'
      .. '"system_fingerprint":null,"choices":[{"index":0,"delta":{"content":"'
      .. pieces[i % #pieces + 1] .. '"},"logprobs":null,"finish_reason":null}]}\n\n'
  end
  lines[#lines + 1] = 'data: {"id":"chatcmpl-late","choices":[{"index":0,"delta":{"content":"!"},'
    .. '"finish_reason":"stop"}]}\n\ndata: {"id":"chatcmpl-late","choices":[],'
    .. '"usage":{"prompt_tokens":1,"completion_tokens":6001,"total_tokens":6002}}\n\ndata: [DONE]\n\n'
  local long = concat(lines)

  it("handles a long stream read whole (sliced) or in small reads", function()
    assert.is_true(#long > 3 * 65536)
    local want_deltas, want = reference(long)
    for _, piece in ipairs{ #long, 65536, 1000, 4093 } do
      local got = {}
      local res, err = client_for(long, piece):chat{ messages = MSGS, stream = true,
        on_delta = function(text, chunk) got[#got + 1] = { text, chunk } end }
      assert.is_nil(err)
      local lazy = same_deltas(got, want_deltas)
      assert.is_true(lazy > 5000)
      same_response(res, want)
      assert.equal("chatcmpl-late", res.id)
      assert.is_number(res.ttft)
      assert.equal(6001, res.usage.completion_tokens)
    end
  end)

  it("delivers the deltas before an in-stream error, and keeps them in err.partial", function()
    local body = 'data: {"id":"c","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
      .. frame('{"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"a"}}]}')
      .. frame('{"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"b"}}]}')
      .. frame('{"error":{"message":"boom","type":"server_error","code":500}}')
      .. frame('{"id":"c","model":"m","choices":[{"index":0,"delta":{"content":"never"}}]}')
    for _, piece in ipairs{ #body, 1 } do
      local got = {}
      local res, err = client_for(body, piece):chat{ messages = MSGS, stream = true,
        on_delta = function(text) got[#got + 1] = text end }
      assert.is_nil(res)
      assert.equal("server", err.kind)
      assert.matches("boom", err.message)
      assert.same({ "", "a", "b" }, got)
      assert.equal("ab", err.partial.text)
    end
  end)

  it("cancels from on_delta with what arrived in err.partial", function()
    local want_deltas = reference(long)
    local n = 0
    local res, err = client_for(long, #long):chat{ messages = MSGS, stream = true,
      on_delta = function() n = n + 1; if n == 10 then return false end end }
    assert.is_nil(res)
    assert.equal("cancelled", err.kind)
    assert.equal(10, n)
    assert.is_true(#err.partial.text >= #concat((function()
      local t = {}
      for i = 1, 10 do t[i] = want_deltas[i][1] end
      return t
    end)()))
  end)
end)

describe("a lazily decoded chunk", function()
  local body = frame('{"id":"c","model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}')
    .. frame([[{"choices":[{"index":0,"delta":{"content":"x"},"logprobs":null}],"n":[1,2]}]])
    .. frame('{"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
  local function second_chunk()
    local s = client_for(body):stream{ messages = MSGS }
    local chunks = {}
    for _, chunk in s do chunks[#chunks + 1] = chunk end
    assert(s:result())
    assert.equal(3, #chunks)
    assert.equal("table", type(chunks[2]))
    assert.is_table(getmetatable(chunks[2]))
    return chunks[2]
  end
  local want = json.decode([[{"choices":[{"index":0,"delta":{"content":"x"},"logprobs":null}],"n":[1,2]}]])

  it("decodes on the first field read", function()
    local c = second_chunk()
    assert.equal("x", c.choices[1].delta.content)
    assert.is_nil(getmetatable(c))
    assert.same(want, c)
    assert.equal(null, c.choices[1].logprobs)
  end)

  it("decodes on a missing field too", function()
    local c = second_chunk()
    assert.is_nil(c.usage)
    assert.same(want, c)
  end)

  it("decodes on a write, which then sticks", function()
    local c = second_chunk()
    c.mine = 1
    assert.equal(1, rawget(c, "mine"))
    assert.is_table(rawget(c, "choices"))
  end)

  if _VERSION ~= "Lua 5.1" then
    it("decodes on pairs()", function()
      local c = second_chunk()
      local keys = {}
      for k in pairs(c) do keys[#keys + 1] = k end
      table.sort(keys)
      assert.same({ "choices", "n" }, keys)
    end)
  end
end)
