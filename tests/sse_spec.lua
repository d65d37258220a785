-- core.sse_parser: the conformance table (tests/sse_cases.lua) replayed
-- whole, one byte at a time and split at every offset, plus limits,
-- finish/reset, binary data, misuse and garbage collection.
local core = require "slm.core"

local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
local cases = dofile(here .. "sse_cases.lua")

local concat, sub, rep, char = table.concat, string.sub, string.rep, string.char

-- Feeds chunks to a fresh parser; returns the events, the first error and
-- what finish() reported.  Checks on the way that a failed parser stays
-- failed with the same message.
local function replay(case, chunks)
  local p = core.sse_parser(case.max_event and { max_event = case.max_event } or nil)
  local got, err = {}, nil
  for i = 1, #chunks do
    local evs, e, partial = p:feed(chunks[i])
    if err then
      assert(evs == nil and e == err, "failed parser must keep failing")
    elseif evs then
      for j = 1, #evs do got[#got + 1] = evs[j] end
    else
      err = e
      assert(type(partial) == "table", "third return holds the events before the failure")
      for j = 1, #partial do got[#got + 1] = partial[j] end
    end
  end
  local last_id, retry = p:last_id(), p:retry()
  local finished = p:finish()
  return got, err, last_id, retry, finished
end

local function show(s)
  return (string.format("%q", s):gsub("\\\n", "\\n"))
end

local function check(case, chunks, how)
  local got, err, last_id, retry, finished = replay(case, chunks)
  local want = case.events
  local where = case.name .. " [" .. how .. "]"
  for i = 1, math.max(#got, #want) do
    local g, w = got[i], want[i]
    assert(g, where .. ": missing event " .. i .. " " .. (w and show(w.data) or ""))
    assert(w, where .. ": unexpected event " .. i .. " " .. show(g.data))
    assert(g.data == w.data, where .. ": event " .. i .. " data " .. show(g.data)
      .. " ~= " .. show(w.data))
    assert(g.event == (w.event or "message"), where .. ": event " .. i .. " type "
      .. show(g.event))
    assert(g.id == w.id, where .. ": event " .. i .. " id " .. tostring(g.id)
      .. " ~= " .. tostring(w.id))
    for k in pairs(g) do
      assert(k == "data" or k == "event" or k == "id", where .. ": stray field " .. tostring(k))
    end
  end
  if case.error then
    assert(err and err:find(case.error, 1, true), where .. ": expected error "
      .. case.error .. ", got " .. tostring(err))
  else
    assert(err == nil, where .. ": unexpected error " .. tostring(err))
  end
  if case.last_id ~= nil then
    assert(last_id == (case.last_id or nil), where .. ": last_id " .. tostring(last_id))
  end
  if case.retry ~= nil then
    assert(retry == (case.retry or nil), where .. ": retry " .. tostring(retry))
  end
  if case.finish ~= nil and not case.error then
    assert(finished == case.finish, where .. ": finish() " .. tostring(finished)
      .. " ~= " .. case.finish)
  end
end

local function bytes_of(s)
  local t = {}
  for i = 1, #s do t[i] = sub(s, i, i) end
  return t
end

describe("sse conformance table", function()
  it("has at least 60 cases, each naming its source", function()
    assert.is_true(#cases >= 60)
    for _, c in ipairs(cases) do
      assert.is_string(c.name)
      assert.is_string(c.from)
      assert.is_true((c.input ~= nil) ~= (c.chunks ~= nil), c.name)
    end
  end)

  for _, case in ipairs(cases) do
    local input = case.input or concat(case.chunks)
    describe(case.name, function()
      it("whole", function() check(case, { input }, "whole") end)
      if case.chunks then
        it("explicit chunks", function() check(case, case.chunks, "chunks") end)
      end
      it("one byte at a time", function() check(case, bytes_of(input), "bytes") end)
      it("split at every offset", function()
        local n = #input
        local step = n <= 8192 and 1 or math.floor(n / 257)
        for i = 0, n, step do
          check(case, { sub(input, 1, i), sub(input, i + 1) }, "split at " .. i)
        end
        if n > 8192 then -- the tail offsets too, near the line ends
          for i = n - 16, n do check(case, { sub(input, 1, i), sub(input, i + 1) }, "split at " .. i) end
        end
      end)
      if #input <= 128 then
        it("split in three at every pair of offsets", function()
          for i = 0, #input do
            for j = i, #input do
              check(case, { sub(input, 1, i), sub(input, i + 1, j), sub(input, j + 1) },
                "split at " .. i .. "," .. j)
            end
          end
        end)
      end
    end)
  end
end)

describe("core.sse_parser", function()
  it("returns an empty list when nothing is complete", function()
    local p = core.sse_parser()
    assert.same({}, p:feed(""))
    assert.same({}, p:feed("data: x"))
    assert.same({}, p:feed("\n"))
    assert.same({ { data = "x", event = "message" } }, p:feed("\n"))
  end)

  it("default max_event is 16 MB", function()
    local p = core.sse_parser()
    local ok = rep("a", 16 * 1024 * 1024)
    local evs = assert(p:feed("data: " .. ok .. "\n\n"))
    assert.equal(1, #evs)
    assert.equal(#ok, #evs[1].data)
    evs = nil
    local r, err = p:feed("data: " .. ok .. "b\n\n")
    assert.is_nil(r)
    assert.equal("sse: event exceeds max_event (16777216 bytes)", err)
    ok = nil
    collectgarbage()
  end)

  it("stays failed after max_event until reset", function()
    local p = core.sse_parser{ max_event = 4 }
    local r, err = p:feed("data: 12345")
    assert.is_nil(r)
    assert.equal("sse: event exceeds max_event (4 bytes)", err)
    local r2, err2, partial = p:feed("data: a\n\n")
    assert.is_nil(r2)
    assert.equal(err, err2)
    assert.is_nil(partial)
    p:reset()
    assert.same({ { data = "a", event = "message" } }, p:feed("data: a\n\n"))
  end)

  it("never truncates: the limit error comes before any oversized event", function()
    local p = core.sse_parser{ max_event = 1000 }
    for i = 1, 999 do
      local r, err = p:feed(i == 1 and "data: x" or "x")
      assert(r, err)
    end
    local r, err = p:feed("xx\n\n")
    assert.is_nil(r)
    assert.truthy(err:find("max_event"))
  end)

  it("finish() discards the unterminated event and starts a new stream", function()
    local p = core.sse_parser()
    assert.same({ { data = "a", event = "message", id = "1" } },
      p:feed("id: 1\ndata: a\n\nid: 2\nevent: e\ndata: b"))
    assert.equal(#"id: 2\nevent: e\ndata: b", p:finish())
    assert.equal("1", p:last_id()) -- the uncommitted id 2 is dropped
    -- a new stream: its BOM is stripped again, the event type was reset
    assert.same({ { data = "c", event = "message", id = "1" } },
      p:feed("\239\187\191data: c\n\n"))
    assert.equal(0, p:finish())
    assert.equal(0, p:finish())
  end)

  it("finish() after a CR at the very end counts nothing", function()
    local p = core.sse_parser()
    assert.same({ { data = "a", event = "message" } }, p:feed("data: a\r\r"))
    assert.equal(0, p:finish())
    assert.same({ { data = "b", event = "message" } }, p:feed("\ndata: b\n\n"))
  end)

  it("reset() forgets the last id, retry and buffered input", function()
    local p = core.sse_parser()
    p:feed("id: 9\nretry: 50\n\ndata: half")
    assert.equal("9", p:last_id())
    assert.equal(50, p:retry())
    assert.equal(p, p:reset())
    assert.is_nil(p:last_id())
    assert.is_nil(p:retry())
    assert.equal(0, p:finish())
    assert.same({ { data = "b", event = "message" } }, p:feed("data: b\n\n"))
  end)

  it("is binary-safe: every byte but CR and LF survives in data", function()
    local t = {}
    for b = 0, 255 do
      if b ~= 10 and b ~= 13 then t[#t + 1] = char(b) end
    end
    local all = concat(t)
    local stream = "data:" .. all .. "\ndata:" .. all .. "\n\n"
    local want = (all:sub(1, 1) == " " and all:sub(2) or all)
    want = want .. "\n" .. want
    for _, step in ipairs{ #stream, 1, 3, 7, 64 } do
      local p, got = core.sse_parser(), {}
      for i = 1, #stream, step do
        for _, e in ipairs(assert(p:feed(sub(stream, i, i + step - 1)))) do got[#got + 1] = e end
      end
      assert.equal(1, #got)
      assert.equal(want, got[1].data)
    end
  end)

  it("handles an 8 MB data line fed in 16 KB chunks", function()
    local line = rep("0123456789abcdef", 512 * 1024)
    local stream = "data: " .. line .. "\n\n"
    local p, got = core.sse_parser(), {}
    for i = 1, #stream, 16384 do
      for _, e in ipairs(assert(p:feed(sub(stream, i, i + 16383)))) do got[#got + 1] = e end
    end
    assert.equal(1, #got)
    assert.is_true(got[1].data == line)
  end)

  it("keeps many events of one chunk in order", function()
    local parts = {}
    for i = 1, 5000 do parts[i] = "id: " .. i .. "\ndata: " .. i .. "\n\n" end
    local evs = assert(core.sse_parser():feed(concat(parts)))
    assert.equal(5000, #evs)
    for i = 1, 5000 do
      assert(evs[i].data == tostring(i) and evs[i].id == tostring(i))
    end
  end)

  it("raises on misuse", function()
    local p = core.sse_parser()
    assert.has_error(function() p:feed(42) end)
    assert.has_error(function() p:feed() end)
    assert.has_error(function() p:feed({}) end)
    assert.has_error(function() p.feed({}, "x") end)
    assert.has_error(function() p.last_id("x") end)
    assert.has_error(function() core.sse_parser("x") end)
    assert.has_error(function() core.sse_parser{ max_events = 1 } end)
    assert.has_error(function() core.sse_parser{ max_event = 0 } end)
    assert.has_error(function() core.sse_parser{ max_event = -5 } end)
    assert.has_error(function() core.sse_parser{ max_event = 1.5 } end)
    assert.has_error(function() core.sse_parser{ max_event = "10" } end)
    assert.has_error(function() core.sse_parser{ max_event = 0 / 0 } end)
    assert.has_error(function() core.sse_parser{ [1] = true } end)
    local ok, msg = pcall(p.feed, p, 42)
    assert.is_false(ok)
    assert.truthy(msg:find("string expected", 1, true))
  end)

  it("has the slm.SSEParser metatable", function()
    local p = core.sse_parser()
    assert.truthy(tostring(p):find("slm.SSEParser", 1, true))
    assert.equal(getmetatable(p), getmetatable(core.sse_parser{ max_event = 10 }))
  end)

  it("is collected with buffered input, and close() is idempotent", function()
    for i = 1, 200 do
      local p = core.sse_parser()
      p:feed("id: " .. i .. "\nevent: e\ndata: " .. rep("z", 1000 + i))
      if i % 2 == 0 then p:close(); p:close() end
      if i % 3 == 0 then
        -- a closed parser is an empty one
        p:close()
        assert.same({ { data = "x", event = "message" } }, p:feed("data: x\n\n"))
      end
    end
    collectgarbage()
    collectgarbage()
  end)

  if _VERSION == "Lua 5.4" then
    it("supports to-be-closed variables", function()
      local f = assert(load([[
        local core = ...
        local p <close> = core.sse_parser()
        p:feed("data: pending")
        return p
      ]]))
      local p = f(core)
      assert.equal(0, p:finish()) -- closed: nothing left buffered
    end)
  end
end)
