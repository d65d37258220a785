-- slm.core used by a hostile caller: Lua code that runs in the middle of a
-- C call without being called by it (__gc finalizers run by a collection
-- step inside one of the call's own allocations, __index metamethods of an
-- options table), numbers beyond every range, NUL bytes, descriptors that
-- are not open.  Most of what these catch is a memory error: they are meant
-- for the ASan+UBSan stage too, where a use after free aborts the run.
local core = require "slm.core"
local H = require "tests.helpers"

local rep, concat = string.rep, table.concat

-- Finalizers that ran while a call wrapped in feeding() was running.
local infeed, inside = false, 0

local function pack(...) return { n = select("#", ...), ... } end

local function feeding(f, ...)
  infeed = true
  local r = pack(f(...))
  infeed = false
  return (table.unpack or unpack)(r, 1, r.n)
end

-- An object whose finalizer calls f: a table in Lua 5.4, a userdata in
-- LuaJIT (whose tables have no __gc).  Dropped at once: it runs at some
-- collection step, typically inside an allocation of whatever runs then.
local function bomb(f)
  local function fin()
    if infeed then inside = inside + 1 end
    f()
  end
  if newproxy then
    local u = newproxy(true)
    getmetatable(u).__gc = fin
  else
    setmetatable({}, { __gc = fin })
  end
end

-- n bombs calling f, then `work` (a function), round after round until
-- `want` of them went off inside a call wrapped in feeding(): whatever the
-- collector's pace, the calls are entered by finalizers that many times.
-- (LuaJIT's collector made eager meanwhile: it is slow to finish a cycle)
local function eager(on)
  if jit then
    collectgarbage("setpause", on and 50 or 200)
    collectgarbage("setstepmul", on and 1000 or 200)
  end
end

local function barrage(n, f, want, work)
  inside = 0
  eager(true)
  local ok, err = pcall(function()
    for _ = 1, 20000 do
      for _ = 1, n do bomb(f) end
      work()
      if inside >= want then return end
    end
  end)
  infeed = false
  eager(false)
  collectgarbage()
  assert(ok, err)
  assert(inside >= want, ("only %d finalizers ran inside a feed"):format(inside))
end

describe("slm.core SSE parser, re-entered by finalizers during a feed", function()
  local N = 400
  local function stream()
    local t = {}
    for i = 1, N do t[i] = "id: " .. i .. "\ndata: " .. rep("x", 150) .. i .. "\n\n" end
    return concat(t)
  end

  it("close() during a feed waits for its end: every event intact", function()
    local p = core.sse_parser()
    local s = stream()
    local during, bad = 0, 0
    barrage(100, function() during = during + 1; p:close() end, 50, function()
      local evs = assert(feeding(p.feed, p, s))
      assert.equal(N, #evs)
      for i, ev in ipairs(evs) do
        if ev.data ~= rep("x", 150) .. i or ev.id ~= tostring(i) then bad = bad + 1 end
      end
    end)
    assert.is_true(during > 0)
    assert.equal(0, bad)
    -- closed after the feed, and usable again
    local after = p:feed("data: ok\n\n")
    assert.equal(1, #after)
    assert.equal("ok", after[1].data)
  end)

  it("feed, feed_chat, finish and reset inside a feed raise; the outer feed completes", function()
    local p = core.sse_parser()
    local s = stream()
    local msgs, bad = {}, 0
    local calls = {
      function() return p:feed("data: y\n\n") end,
      function() return p:feed_chat('data: {"choices":[]}\n\n', 0) end,
      function() return p:finish() end,
      function() return p:reset() end,
    }
    local k = 0
    barrage(100, function()
      k = k % #calls + 1
      local ok, err = pcall(calls[k])
      if not ok then msgs[#msgs + 1] = err end
    end, 50, function()
      local evs = assert(feeding(p.feed, p, s))
      assert.equal(N, #evs)
      for i, ev in ipairs(evs) do
        if ev.data ~= rep("x", 150) .. i then bad = bad + 1 end
      end
    end)
    assert.equal(0, bad)
    assert.is_true(#msgs > 0)
    for _, m in ipairs(msgs) do
      assert.matches("during its own feed", m, 1, true)
    end
    local after = p:feed("data: z\n\n")
    assert.equal(1, #after)
    assert.equal("z", after[1].data)
  end)

  it("feed_chat: close() from a finalizer leaves the content strings intact", function()
    local p = core.sse_parser()
    local t = {}
    for i = 1, N do
      t[i] = 'data: {"id":"c","choices":[{"index":0,"delta":{"content":"tok\\n' .. i .. '"}}]}\n\n'
    end
    local s = concat(t)
    local chunk_mt = {}
    local during, bad = 0, 0
    barrage(100, function() during = during + 1; p:close() end, 50, function()
      -- id already known: the fast path; with chunk_mt, lazy chunks
      local pairs_, nslow = assert(feeding(p.feed_chat, p, s, 15, chunk_mt))
      assert.equal(0, nslow)
      assert.equal(2 * N, #pairs_)
      for i = 1, N do
        if pairs_[2 * i - 1] ~= "tok\n" .. i or rawget(pairs_[2 * i], "__slm_raw") ~= t[i]:sub(7, -3) then
          bad = bad + 1
        end
      end
    end)
    assert.is_true(during > 0)
    assert.equal(0, bad)
  end)
end)

describe("slm.core CSV parser, re-entered by finalizers during a feed", function()
  local N = 400
  local function text()
    local t = {}
    for i = 1, N do t[i] = rep("v", 60) .. i .. ',"q""' .. i .. '",' .. i .. "\n" end
    return concat(t)
  end

  it("close() during a feed waits for its end: every record intact", function()
    local p = core.csv_parser()
    local s = text()
    local during, bad = 0, 0
    barrage(100, function() during = during + 1; p:close() end, 50, function()
      local recs = feeding(p.feed, p, s)
      assert.equal(N, #recs)
      for i, r in ipairs(recs) do
        if r[1] ~= rep("v", 60) .. i or r[2] ~= 'q"' .. i or r[3] ~= tostring(i) or r.line ~= i then
          bad = bad + 1
        end
      end
      assert.same({}, p:finish())
    end)
    assert.is_true(during > 0)
    assert.equal(0, bad)
  end)

  it("feed and finish inside a feed raise; the outer feed completes", function()
    local p = core.csv_parser()
    local s = text()
    local msgs, bad = {}, 0
    local k = 0
    barrage(100, function()
      k = k + 1
      local ok, err = pcall(k % 2 == 0 and function() return p:feed("a,b\n") end
                                       or function() return p:finish() end)
      if not ok then msgs[#msgs + 1] = err end
    end, 50, function()
      local recs = feeding(p.feed, p, s)
      assert.equal(N, #recs)
      for i, r in ipairs(recs) do
        if r[1] ~= rep("v", 60) .. i then bad = bad + 1 end
      end
      p:finish()
    end)
    assert.equal(0, bad)
    assert.is_true(#msgs > 0)
    for _, m in ipairs(msgs) do
      assert.matches("during its own feed or finish", m, 1, true)
    end
  end)
end)

describe("slm.core base64_decode with max", function()
  it("allocates for max, not for the whole input", function()
    local s = rep("QUJD", 2 * 1024 * 1024) -- 8 MB of base64, 6 MB decoded
    collectgarbage()
    collectgarbage("stop")
    local before = collectgarbage("count")
    local out = core.base64_decode(s, 5)
    local grew = collectgarbage("count") - before
    collectgarbage("restart")
    assert.equal("ABCABC", out)
    assert.is_true(grew < 64, ("decoding 5 bytes allocated %.0f KB"):format(grew))
  end)

  it("decodes at least max bytes, or all of a shorter input", function()
    local full = core.base64_decode("SGVsbG8sIHdvcmxkIQ") -- "Hello, world!" unpadded
    assert.equal("Hello, world!", full)
    for max = 1, 16 do
      local got = core.base64_decode("SGVsbG8sIHdvcmxkIQ", max)
      assert.is_true(#got >= math.min(max, #full))
      assert.equal(full:sub(1, #got), got)
    end
    assert.equal(full, core.base64_decode("SGVsbG8sIHdvcmxkIQ==", 2 ^ 40))
  end)

  it("refuses a max that is not a non-negative integer", function()
    for _, bad in ipairs{ -1, 0.5, 1e300, math.huge, -math.huge, 0 / 0, 2 ^ 64 } do
      local ok, err = pcall(core.base64_decode, "QUJD", bad)
      assert.is_false(ok)
      assert.matches("bad argument #2 to .*max must be a non%-negative integer", err)
    end
  end)
end)

describe("slm.core multi, hostile options", function()
  local up
  setup(function() up = H.upstream() end)
  teardown(function() if up then up:stop() end end)

  local function wait(m, r)
    local deadline = core.now() + 10
    while not r:done() and core.now() < deadline do m:step(0.05) end
  end

  it("an option string that only an __index returned survives a collection inside add", function()
    local m = core.multi()
    local body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"ping"}]}'
    local opts = setmetatable({ body = body, headers = { "Content-Type: application/json" } }, {
      __index = function(_, k)
        -- fresh strings nothing else holds, then collections while add
        -- reads the next options
        if k == "url" then return up.url .. "/chat/" .. ("completions"):sub(1) end
        if k == "method" then return ("PO") .. ("ST"):sub(1) end
        collectgarbage()
        collectgarbage()
        return nil
      end,
    })
    local r = m:add(opts)
    wait(m, r)
    assert.is_true(r:result())
    assert.equal(200, r:status())
    m:close()
  end)

  it("refuses NUL bytes in the url, the method and the headers", function()
    local m = core.multi()
    assert.has_error(function() m:add{ url = up.url .. "/x\0y" } end,
      "slm.core: option 'url' contains a NUL byte")
    assert.has_error(function() m:add{ url = up.url, method = "GET\0X" } end,
      "slm.core: option 'method' contains a NUL byte")
    assert.has_error(function() m:add{ url = up.url, headers = { "X-A: 1\0\r\nX-B: 2" } } end,
      "slm.core: headers[1] contains a NUL byte")
    assert.equal(0, m:count())
    m:close()
  end)

  it("an __index that closes the multi during add: a clear error, nothing attached", function()
    local m = core.multi()
    local opts = setmetatable({ url = up.url }, {
      __index = function(_, k) if k == "timeout" then m:close() end end,
    })
    assert.has_error(function() m:add(opts) end)
    assert.equal(0, m:count())
  end)
end)

describe("slm.core multi:watch, descriptors that are not open", function()
  -- in a process of its own: before the fix, watch(2^31 - 1) looped for
  -- ever doubling an int (or asked for gigabytes)
  it("refuses them at once, without room made for their number", function()
    local out = H.run_lua([[
      local core = require "slm.core"
      local m = core.multi()
      for _, fd in ipairs{ 2147483647, 1073741825, 999999 } do
        local ok, err = pcall(m.watch, m, fd, "r")
        print(fd, ok, err)
      end
      print("forget", pcall(m.watch, m, 2147483647, nil))
      print("count", m:count())
    ]], "timeout 30")
    for _, fd in ipairs{ "2147483647", "1073741825", "999999" } do
      assert.matches(fd .. "\tfalse\t[^\n]*not an open descriptor", out)
    end
    assert.matches("forget\ttrue", out, 1, true)
    assert.matches("count\t0", out, 1, true)
  end)
end)
