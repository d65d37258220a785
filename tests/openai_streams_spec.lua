-- The twelve recorded OpenAI streams (tests/fixtures/openai-streams)
-- replayed through core.sse_parser + lua-cjson + slm.accumulate: whole, one
-- byte at a time and split in two at every offset; each replay must end in
-- exactly the state recorded in expected.json.
local core = require "slm.core"
local cjson = require "cjson"
local Acc = require "slm.accumulate"

local null = cjson.null
local sub, concat = string.sub, table.concat

local H = require "tests.helpers"
local slurp = H.read_file
local dir = H.FIXTURES .. "openai-streams/"

local expected = cjson.decode(slurp(dir .. "expected.json"))
local names = {}
for name in pairs(expected) do names[#names + 1] = name end
table.sort(names)

-- cjson.decode is pure, so the every-offset replays (tens of thousands per
-- file) may reuse its result for an event text already decoded; the parser
-- and the accumulator still run in full for every replay.
local decoded = {}
local function memo_decode(data)
  local v = decoded[data]
  if v == nil then
    v = cjson.decode(data)
    decoded[data] = v
  end
  return v
end

-- Replays one stream cut into the given chunks.  Returns the result, the
-- streamed choice-0 text and what finish() reported.
local function replay(chunks, decode)
  decode = decode or cjson.decode
  local p, acc, texts = core.sse_parser(), Acc.new(), {}
  for i = 1, #chunks do
    local evs = assert(p:feed(chunks[i]))
    for j = 1, #evs do
      local data = evs[j].data
      if data == "[DONE]" then
        acc:done()
      else
        local text, err = acc:add(decode(data))
        assert(err == nil, "unexpected in-stream error")
        if text then texts[#texts + 1] = text end
      end
    end
  end
  return acc:result(), concat(texts), p:finish()
end

local function deep_equal(a, b)
  if a == null then a = nil end
  if b == null then b = nil end
  if type(a) ~= "table" or type(b) ~= "table" then return a == b end
  for k, v in pairs(a) do
    if not deep_equal(v, b[k]) then return false end
  end
  for k, v in pairs(b) do
    if a[k] == nil and v ~= null then return false end
  end
  return true
end

local function opt(v)
  if v == null then return nil end
  return v
end

-- Field-by-field comparison; returns nil or a message naming the field.
local function mismatch(r, want, streamed, finished)
  if r.id ~= want.id then return "id " .. tostring(r.id) end
  if r.model ~= want.model then return "model " .. tostring(r.model) end
  if r.done ~= want.done then return "done " .. tostring(r.done) end
  if not deep_equal(r.usage, opt(want.usage)) then return "usage" end
  if finished ~= 0 then return "finish() reported " .. finished .. " bytes left over" end
  if #r.choices ~= #want.choices then return "number of choices " .. #r.choices end
  for i, wc in ipairs(want.choices) do
    local c = r.choices[i]
    local where = "choice " .. (i - 1) .. ": "
    if c.index ~= wc.index then return where .. "index " .. tostring(c.index) end
    if c.message.role ~= wc.role then return where .. "role " .. tostring(c.message.role) end
    if c.message.content ~= opt(wc.content) then
      return where .. "content " .. tostring(c.message.content)
    end
    if c.text ~= (opt(wc.content) or "") then return where .. "text" end
    if c.refusal ~= opt(wc.refusal) or c.message.refusal ~= opt(wc.refusal) then
      return where .. "refusal " .. tostring(c.refusal)
    end
    if c.finish_reason ~= opt(wc.finish_reason) then
      return where .. "finish_reason " .. tostring(c.finish_reason)
    end
    if #c.tool_calls ~= #wc.tool_calls then return where .. "number of tool calls" end
    if #wc.tool_calls == 0 then
      if c.message.tool_calls ~= nil then return where .. "message.tool_calls not nil" end
    elseif c.message.tool_calls ~= c.tool_calls then
      return where .. "message.tool_calls"
    end
    for k, wt in ipairs(wc.tool_calls) do
      local t = c.tool_calls[k]
      if t.id ~= wt.id or t.type ~= wt.type or t["function"].name ~= wt.name
        or t["function"].arguments ~= wt.arguments then
        return where .. "tool call " .. k
      end
    end
  end
  local first = want.choices[1]
  if r.text ~= (opt(first.content) or "") then return "r.text" end
  if streamed ~= (opt(first.content) or "") then return "streamed text " .. streamed end
  if r.finish_reason ~= first.finish_reason then return "r.finish_reason" end
  if #r.tool_calls ~= #first.tool_calls then return "r.tool_calls" end
  return nil
end

describe("recorded OpenAI streams", function()
  it("are all there", function()
    assert.equal(12, #names)
  end)

  for _, name in ipairs(names) do
    local want = expected[name]
    local bytes = slurp(dir .. name)

    describe(name, function()
      it("fed whole", function()
        local r, streamed, finished = replay({ bytes })
        local m = mismatch(r, want, streamed, finished)
        assert(m == nil, m)
      end)

      it("fed one byte at a time", function()
        local chunks = {}
        for i = 1, #bytes do chunks[i] = sub(bytes, i, i) end
        local r, streamed, finished = replay(chunks)
        local m = mismatch(r, want, streamed, finished)
        assert(m == nil, m)
      end)

      it("split in two at every offset", function()
        for i = 0, #bytes do
          local r, streamed, finished = replay({ sub(bytes, 1, i), sub(bytes, i + 1) }, memo_decode)
          local m = mismatch(r, want, streamed, finished)
          if m then error("split at " .. i .. ": " .. m) end
        end
      end)
    end)
  end
end)
