-- slm.ngx (relay, access-log variables) and slm.ngx.metrics in plain Lua:
-- a fake `ngx` (what the relay prints, flushes, logs; a browser that fails
-- a flush; a clock) over real streams from the simulator (client:stream on
-- the libcurl runtime), and the client's observe hook.  The same relay in
-- a real nginx: tests/openresty_relay_spec.lua.
local helpers = require "tests.helpers"
local json = require "slm.json"
local ACME = require("slm.quotas").display("acme") -- what observe and the metrics see of consumer "acme"

-- A fake ngx for one request.  fail_after: the flush after that many
-- successful ones fails (the browser has gone).
local function fake_ngx(o)
  o = o or {}
  local n = {
    out = {}, logs = {}, header = {}, status = 0, ctx = {}, var = {}, flushes = 0, t = 0,
    WARN = 5, ERR = 4, INFO = 7, shared = o.shared or {},
  }
  function n.print(s)
    if n.gone then return nil, "broken pipe" end
    n.out[#n.out + 1] = s
    return 1
  end
  function n.flush(wait)
    assert(wait == true, "flush(true)")
    if o.fail_after and n.flushes >= o.fail_after then
      n.gone = true
      return nil, "broken pipe"
    end
    n.flushes = n.flushes + 1
    return 1
  end
  function n.log(level, ...) n.logs[#n.logs + 1] = { level, table.concat({ ... }) } end
  function n.now() return n.t + os.clock() end
  function n.get_phase() return "content" end
  if o.abort then
    function n.on_abort(fn)
      if n.abort_handler then return nil, "duplicate call" end
      n.abort_handler = fn
      return 1
    end
  end
  -- declared variables only, like nginx: writing another one raises
  if o.declared then
    local store = {}
    n.var = setmetatable({}, {
      __index = function(_, k) return store[k] end,
      __newindex = function(_, k, v)
        if not o.declared[k] then error('variable "' .. k .. '" not found for writing', 2) end
        store[k] = v
      end,
    })
  end
  n.body = function() return table.concat(n.out) end
  return n
end

-- A lua_shared_dict stand-in: incr with init, get, get_keys, delete.
-- A Prometheus text page as { series -> value }.
local function series(text)
  local t = {}
  for line in text:gmatch("[^\n]+") do
    if not line:find("^#") then
      local k, v = line:match("^(%S+) (%S+)$")
      assert(k, "a bad line: " .. line)
      t[k] = tonumber(v)
    end
  end
  return t
end

-- Like a lua_shared_dict of `capacity` keys: incr with an init value adds
-- a missing key by evicting the least recently used ones when full (as
-- nginx does), without one it says "not found"; safe_add never evicts.
local function fake_dict(capacity)
  local d = { data = {}, n = 0, used = {}, clock = 0 }
  local function touch(k)
    d.clock = d.clock + 1
    d.used[k] = d.clock
  end
  local function evict()
    local oldest, at
    for k, t in pairs(d.used) do if not at or t < at then oldest, at = k, t end end
    d:delete(oldest)
  end
  function d:incr(k, v, init)
    if self.data[k] == nil then
      if init == nil then return nil, "not found" end
      while capacity and self.n >= capacity do evict() end
      self.n = self.n + 1
      self.data[k] = init
    end
    self.data[k] = self.data[k] + v
    touch(k)
    return self.data[k]
  end
  function d:safe_add(k, v)
    if self.data[k] ~= nil then return false, "exists" end
    if capacity and self.n >= capacity then return false, "no memory" end
    self.n = self.n + 1
    self.data[k] = v
    touch(k)
    return true
  end
  function d:get(k)
    if self.data[k] ~= nil then touch(k) end
    return self.data[k]
  end
  function d:delete(k)
    if self.data[k] ~= nil then self.n = self.n - 1 end
    self.data[k] = nil
    self.used[k] = nil
  end
  function d:get_keys()
    local ks = {}
    for k in pairs(self.data) do ks[#ks + 1] = k end
    return ks
  end
  return d
end

-- Whether s is valid UTF-8 (RFC 3629), checked here independently of the
-- library's own code.
local function is_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local b = s:byte(i)
    local len, lo, hi = 1, 0x80, 0xBF
    if b >= 0xC2 and b <= 0xDF then len = 2
    elseif b >= 0xE0 and b <= 0xEF then len = 3
      if b == 0xE0 then lo = 0xA0 elseif b == 0xED then hi = 0x9F end
    elseif b >= 0xF0 and b <= 0xF4 then len = 4
      if b == 0xF0 then lo = 0x90 elseif b == 0xF4 then hi = 0x8F end
    elseif b >= 0x80 then return false end
    for k = 1, len - 1 do
      local c = s:byte(i + k)
      if not c or c < lo or c > hi then return false end
      lo, hi = 0x80, 0xBF
    end
    i = i + len
  end
  return true
end

-- Every line of a text exposition well formed (version 0.0.4): comments,
-- or name{label="value",...} number with the label values escaped.
local function assert_exposition(text)
  assert.is_true(is_utf8(text), "the exposition is not valid UTF-8")
  assert.equal("\n", text:sub(-1))
  for line in text:gmatch("([^\n]*)\n") do
    if line:find("^#") then
      assert.is_truthy(line:match("^# HELP [%a_:][%w_:]* .+$") or line:match("^# TYPE [%a_:][%w_:]* %a+$"), line)
    else
      local name, rest = line:match("^([%a_:][%w_:]*)(.*)$")
      assert.is_truthy(name, line)
      if rest:sub(1, 1) == "{" then
        rest = rest:sub(2)
        while true do
          local lname, after = rest:match('^([%a_][%w_]*)="(.*)$')
          assert.is_truthy(lname, line)
          -- the value: anything but a bare \ " or newline, up to the closing quote
          local i = 1
          while true do
            local c = after:sub(i, i)
            assert.is_true(c ~= "" and c ~= "\n", line)
            if c == "\\" then
              assert.is_truthy(after:sub(i + 1, i + 1):match('^[\\"n]$'), line)
              i = i + 2
            elseif c == '"' then break
            else i = i + 1 end
          end
          rest = after:sub(i + 1)
          if rest:sub(1, 1) == "," then rest = rest:sub(2)
          else
            assert.equal("}", rest:sub(1, 1), line)
            rest = rest:sub(2)
            break
          end
        end
      end
      assert.is_truthy(rest:match("^ [-+]?[%d.eE+-]+$") or rest:match("^ [+-]Inf$") or rest == " NaN", line)
    end
  end
end

local slm, relay, parse, metrics

describe("slm.ngx", function()
  local up
  setup(function()
    up = helpers.upstream()
    slm = require "slm"
    relay = require("slm.ngx").relay
    parse = require("slm.ngx").parse_events
    metrics = require "slm.ngx.metrics"
  end)
  teardown(function()
    _G.ngx = nil
    if up then up:stop() end
  end)
  after_each(function() _G.ngx = nil end)

  local function client(opts, scenario)
    local o = { max_retries = 0 }
    for k, v in pairs(opts or {}) do o[k] = v end
    if scenario then o.headers = { ["X-Sim-Scenario"] = scenario } end
    return helpers.sim_client(up, o)
  end

  it("is reachable as slm.ngx, and slm.ngx.metrics as its metrics", function()
    assert.equal(require("slm.ngx"), slm.ngx)
    assert.equal(metrics, slm.ngx.metrics)
  end)

  describe("relay", function()
    it("relays every delta as one SSE event, flushed, and ends with usage and cost", function()
      local n = fake_ngx()
      _G.ngx = n
      local c = client({}, "chunks=12")
      local plain = c:chat{ messages = helpers.msgs("x") }
      local s = c:stream{ messages = helpers.msgs("x") }
      local res, err, rep = relay(s)
      assert.is_nil(err)
      assert.equal(200, n.status)
      assert.equal("text/event-stream", n.header["Content-Type"])
      assert.equal("no-cache", n.header["Cache-Control"])
      assert.equal("no", n.header["X-Accel-Buffering"])
      local body = n.body()
      local text, final, events = parse(body)
      assert.equal(plain.text, text) -- byte for byte
      assert.equal(res.text, text)
      assert.equal(12, rep.pieces)
      assert.equal(13, #events)
      -- the pieces one read brought go out together: fewer writes than events
      assert.is_true(n.flushes >= 2 and n.flushes < #events, n.flushes)
      -- the framing, exactly
      for i = 1, #events - 1 do
        assert.equal("data: " .. json.encode{ delta = events[i].data.delta }, events[i].raw)
      end
      assert.equal("done", events[#events].event)
      assert.matches("^event: done\ndata: {.*}\n\n$", n.out[#n.out])
      assert.same({ prompt_tokens = res.usage.prompt_tokens, completion_tokens = res.usage.completion_tokens,
        total_tokens = res.usage.total_tokens }, final.usage)
      assert.near(res.cost, final.cost, 1e-15)
      assert.equal("gpt-4o-mini", final.model)
      assert.equal("stop", final.finish_reason)
      assert.equal(#text, final.bytes)
    end)

    it("flushes each piece before it waits for the next one", function()
      local n = fake_ngx()
      _G.ngx = n
      local printed_unflushed = 0
      local print0, flush0 = n.print, n.flush
      n.print = function(s) printed_unflushed = printed_unflushed + 1; return print0(s) end
      n.flush = function(w) printed_unflushed = 0; return flush0(w) end
      local s = client({}, "chunks=6,slow_chunks=30"):stream{ messages = helpers.msgs("x") }
      local next0 = s.next
      local waits_with_output = 0
      s.next = function(self)
        if not self:pending() and printed_unflushed > 0 then waits_with_output = waits_with_output + 1 end
        return next0(self)
      end
      local _, _, rep = relay(s)
      assert.equal(6, rep.pieces)
      assert.equal(0, waits_with_output)
      assert.equal(7, n.flushes) -- 30 ms apart: one write each, and the done event
    end)

    it("keeps multi-byte text and newlines exact", function()
      local n = fake_ngx()
      _G.ngx = n
      local c = client()
      local q = "Привет,\nмир — \"quoted\" \\ back\r\n\tend ✓"
      local text = parse(select(1, (function() relay(c:stream{ messages = helpers.msgs(q) }); return n.body() end)()))
      assert.equal("Echo: " .. q, text)
    end)

    it("sends a character split between pieces whole, stray bytes as U+FFFD: every event valid UTF-8", function()
      local valid = require("slm.redact").utf8
      local n = fake_ngx()
      _G.ngx = n
      local seen = {}
      local res, err = relay(function(emit)
        for _, p in ipairs{ "5 \226\130", "\172 ok", "x \255", " \240\159" } do emit(p, { p = p }) end
        return { text = "", model = "model-\255", usage = { prompt_tokens = 1, completion_tokens = 4, total_tokens = 5 } }
      end, { on_delta = function(text) seen[#seen + 1] = text end })
      assert.is_nil(err)
      assert.is_table(res)
      local body = n.body()
      assert.equal(valid(body), body)
      local text, final = parse(body)
      -- on_delta saw whole characters; the end's cut one is sent last, as U+FFFD
      assert.same({ "5 ", "\226\130\172 ok", "x \255", " ", "\240\159" }, seen)
      assert.equal("5 \226\130\172 okx \239\191\189 \239\191\189\239\191\189", text)
      assert.equal("model-\239\191\189", final.model)
      assert.equal(#text, final.bytes)
    end)

    it("streams a request table through opts.client, and on_delta transforms, drops or logs pieces", function()
      local n = fake_ngx()
      _G.ngx = n
      local seen = {}
      local res = relay({ messages = helpers.msgs("a b c") }, { client = client(), on_delta = function(t)
        seen[#seen + 1] = t
        if t:find("b") then return false end
        return t:upper()
      end })
      local text = parse(n.body())
      assert.equal(res.text, table.concat(seen))
      local want = {}
      for _, t in ipairs(seen) do if not t:find("b") then want[#want + 1] = t:upper() end end
      assert.equal(table.concat(want), text)
    end)

    it("answers an error before any output with its HTTP status and a JSON body", function()
      local n = fake_ngx()
      _G.ngx = n
      local res, err, rep = relay(client({}, "status=503"):stream{ messages = helpers.msgs("x") })
      assert.is_nil(res)
      assert.equal("server", err.kind)
      assert.is_false(rep.started)
      assert.equal(502, n.status)
      assert.equal("application/json", n.header["Content-Type"])
      local body = json.decode(n.body())
      assert.equal("server", body.error.kind)
      assert.equal(503, body.error.status)
      assert.is_string(body.error.message)
      -- a budget refusal: 429, nothing sent
      n = fake_ngx()
      _G.ngx = n
      local before = up:stats().requests
      relay(client{ budget = slm.budget{ usd = 1e-9 } }:stream{ messages = helpers.msgs("x") })
      assert.equal(429, n.status)
      assert.equal("budget", json.decode(n.body()).error.kind)
      assert.equal(before, up:stats().requests)
    end)

    it("ends with an error event when the stream breaks after output, and never retries then", function()
      local n = fake_ngx()
      _G.ngx = n
      up:reset()
      -- a reset mid-stream is a "connect" error, which is retried before output
      local c = helpers.sim_client(up, { max_retries = 3, headers = { ["X-Sim-Scenario"] = "chunks=20,reset" } })
      local res, err, rep = relay(c:stream{ messages = helpers.msgs("x") })
      assert.is_nil(res)
      assert.is_true(rep.started)
      assert.equal(1, up:stats().requests) -- no retry after output started
      local text, final, events = parse(n.body())
      assert.equal("error", events[#events].event)
      assert.equal(err.kind, final.error.kind)
      assert.equal(err.partial.text, text)
      assert.is_number(final.usage.completion_tokens)
    end)

    it("retries before output has started (the stream's own rule)", function()
      local n = fake_ngx()
      _G.ngx = n
      up:reset()
      local c = helpers.sim_client(up, { max_retries = 2, headers = { ["X-Sim-Scenario"] = "status=503,fail=1",
        ["X-Sim-Key"] = "relay-retry-" .. os.time() .. math.random(1e9) } })
      local res = relay(c:stream{ messages = helpers.msgs("x") })
      assert.is_table(res)
      assert.equal(2, up:stats().requests)
      assert.equal(200, n.status)
      assert.equal(res.text, (parse(n.body())))
    end)

    it("stops the upstream at once when the browser goes away, charges the budget for what was delivered, logs it",
      function()
        local n = fake_ngx{ fail_after = 3 }
        _G.ngx = n
        up:reset()
        local b = slm.budget{ usd = 1 }
        local c = client({ budget = b }, "chunks=400,slow_chunks=5")
        local res, err, rep = relay(c:stream{ messages = helpers.msgs("x") })
        assert.is_nil(res)
        assert.equal("cancelled", err.kind)
        assert.is_true(rep.aborted)
        -- three flushes went through (a flush takes what one read brought:
        -- one piece or more), the fourth failed
        assert.is_true(rep.pieces >= 4 and rep.pieces < 100, rep.pieces)
        -- the upstream saw the connection closed, long before its 400 chunks
        local st
        for _ = 1, 100 do
          st = up:stats()
          if st.aborted == 1 and st.in_flight == 0 then break end
          os.execute("sleep 0.02")
        end
        assert.equal(1, st.aborted)
        assert.equal(0, st.in_flight)
        -- billed: the prompt and the pieces that arrived, no more; nothing held
        local usd, tokens = b:spent()
        assert.equal(err.partial.usage.total_tokens, tokens)
        assert.is_true(err.partial.usage.completion_tokens >= rep.pieces and err.partial.usage.completion_tokens < 400)
        assert.near(err.partial.cost, usd, 1e-12)
        assert.equal(0, select(2, b:reserved()))
        -- no final event to a browser that is gone; a WARN line
        local _, final, events = parse(n.body())
        assert.is_nil(final)
        assert.equal(rep.pieces, #events) -- every piece written, the last ones' flush failed
        assert.equal(n.WARN, n.logs[1][1])
        assert.matches("client went away after " .. rep.bytes .. " bytes in " .. rep.pieces .. " pieces", n.logs[1][2])
      end)

    it("registers ngx.on_abort, whose handler closes the stream", function()
      local n = fake_ngx{ abort = true }
      _G.ngx = n
      up:reset()
      local b = slm.budget{ tokens = 1e6 }
      local c = client({ budget = b }, "chunks=200,slow_chunks=5")
      local got = 0
      local _, err, rep = relay(c:stream{ messages = helpers.msgs("x") }, { on_delta = function()
        got = got + 1
        if got == 5 then n.abort_handler() end -- the browser leaves here
      end })
      assert.equal("cancelled", err.kind)
      assert.is_true(rep.aborted)
      assert.equal(5, got)
      assert.equal(4, rep.pieces) -- the fifth was not sent: the browser was gone
      local _, tokens = b:spent()
      assert.equal(err.partial.usage.total_tokens, tokens)
      assert.is_true(tokens > 0)
    end)

    it("caps the relayed bytes, cutting at a UTF-8 boundary, and says so in the done event", function()
      local n = fake_ngx()
      _G.ngx = n
      up:reset()
      local b = slm.budget{ usd = 1 }
      local c = client({ budget = b }, "chunks=300,slow_chunks=2")
      local _, err, rep = relay(c:stream{ messages = helpers.msgs("x") }, { max_bytes = 50 })
      assert.equal("bytes", rep.capped)
      assert.equal("cancelled", err.kind)
      local text, final = parse(n.body())
      assert.equal(50, #text)
      assert.equal(("tok "):rep(13):sub(1, 50), text)
      assert.equal("bytes", final.capped)
      assert.equal(err.partial.usage.completion_tokens, final.usage.completion_tokens)
      assert.equal(final.usage.total_tokens, select(2, b:spent()))
      for _ = 1, 100 do
        if up:stats().aborted == 1 then break end
        os.execute("sleep 0.02")
      end
      assert.equal(1, up:stats().aborted)
      assert.equal("абв", require("slm.ngx").utf8_prefix("абвг", 7))
      assert.equal("аб", require("slm.ngx").utf8_prefix("абвг", 5))
    end)

    it("caps the duration", function()
      local n = fake_ngx()
      _G.ngx = n
      local c = client({}, "chunks=300,slow_chunks=20")
      local t0 = os.time()
      local calls = 0
      local _, _, rep = relay(c:stream{ messages = helpers.msgs("x") }, { max_seconds = 0.25,
        on_delta = function()
          calls = calls + 1
          if calls == 4 then n.t = n.t + 1 end -- a second passes on the fake clock
        end })
      assert.equal("duration", rep.capped)
      assert.equal(4, rep.pieces)
      assert.equal("duration", select(2, parse(n.body())).capped)
      assert.is_true(os.time() - t0 < 5)
    end)

    it("relays a push source (bot:reply with on_delta = emit) and stops it when the browser leaves", function()
      local n = fake_ngx()
      _G.ngx = n
      local c = client()
      local res = relay(function(emit)
        return c:chat{ messages = helpers.msgs("push it"), stream = true, on_delta = emit }
      end, { final = function(r) return { extra = r and #r.text } end })
      local text, final = parse(n.body())
      assert.equal("Echo: push it", text)
      assert.equal(res.text, text)
      assert.equal(#text, final.extra)

      n = fake_ngx{ fail_after = 2 }
      _G.ngx = n
      up:reset()
      local b = slm.budget{ tokens = 1e6 }
      c = client({ budget = b }, "chunks=300,slow_chunks=5")
      local r2, err, rep = relay(function(emit)
        return c:chat{ messages = helpers.msgs("x"), stream = true, on_delta = emit }
      end)
      assert.is_nil(r2)
      assert.equal("cancelled", err.kind)
      assert.is_true(rep.aborted)
      local _, tokens = b:spent()
      assert.is_true(tokens > 0)
      assert.equal(0, select(2, b:reserved()))
      for _ = 1, 100 do
        if up:stats().aborted == 1 then break end
        os.execute("sleep 0.02")
      end
      assert.equal(1, up:stats().aborted)
    end)

    it("closes the stream and gives back the budget's hold when on_delta or final raises, then raises it", function()
      for _, where in ipairs{ "on_delta", "final" } do
        local n = fake_ngx()
        _G.ngx = n
        up:reset()
        local b = slm.budget{ usd = 1 }
        local c = client({ budget = b }, where == "on_delta" and "chunks=400,slow_chunks=5" or "chunks=5")
        local s = c:stream{ messages = helpers.msgs("x") }
        local got = 0
        local opts = {}
        opts[where] = function()
          got = got + 1
          if where == "final" or got == 3 then error("boom in " .. where) end
        end
        local ok, why = pcall(relay, s, opts)
        assert.is_false(ok)
        assert.matches("boom in " .. where, tostring(why))
        -- nothing held any more, the pieces that arrived billed
        assert.equal(0, select(2, b:reserved()), where)
        assert.is_true(select(2, b:spent()) > 0, where)
        local _, err = s:result()
        if where == "on_delta" then
          assert.equal("cancelled", err.kind)
          -- the upstream saw the connection closed, long before its 400 chunks
          local st
          for _ = 1, 100 do
            st = up:stats()
            if st.aborted == 1 and st.in_flight == 0 then break end
            os.execute("sleep 0.02")
          end
          assert.equal(1, st.aborted)
          assert.equal(0, st.in_flight)
        end
      end
    end)

    it("refuses misuse at once", function()
      _G.ngx = fake_ngx()
      assert.has_error(function() relay(42) end,
        "slm.ngx.relay: expected a stream, a request table or a function(emit), got number")
      assert.has_error(function() relay({ messages = {} }) end, "slm.ngx.relay: a request table needs opts.client")
      assert.has_error(function() relay(function() end, { max_bytes = 0 }) end,
        "slm.ngx.relay: option 'max_bytes' must be a positive number")
      assert.has_error(function() relay(function() end, { nope = 1 }) end, "slm.ngx.relay: unknown option 'nope'")
    end)
  end)

  describe("observe", function()
    it("is called once per finished call with what it did", function()
      local evs = {}
      local c = client({ observe = function(e) evs[#evs + 1] = e end })
      local res = c:chat{ messages = helpers.msgs("hello"), consumer = "acme" }
      assert.equal(1, #evs)
      local e = evs[1]
      assert.equal("gpt-4o-mini", e.model)
      assert.equal(ACME, e.consumer) -- the display form: a consumer key may be a secret
      assert.equal("ok", e.outcome)
      assert.equal(res.usage.prompt_tokens, e.prompt_tokens)
      assert.equal(res.usage.completion_tokens, e.completion_tokens)
      assert.near(res.cost, e.cost, 1e-15)
      assert.equal(1, e.attempts)
      assert.is_false(e.stream)
      assert.is_nil(e.ttft)
      assert.is_true(e.latency > 0)
      -- the consumer never goes into the body
      assert.is_nil(up:last().body.consumer)

      local s = c:stream{ messages = helpers.msgs("hello") }
      for _ in s do end
      assert.equal(2, #evs)
      assert.is_true(evs[2].stream)
      assert.is_true(evs[2].ttft > 0 and evs[2].ttft <= evs[2].latency)

      local bad = client({ observe = function(e) evs[#evs + 1] = e end }, "status=500")
      assert.is_nil(bad:chat{ messages = helpers.msgs("x") })
      assert.equal(3, #evs)
      assert.equal("error", evs[3].outcome)
      assert.equal("server", evs[3].kind)
      assert.equal(0, evs[3].completion_tokens)
    end)

    it("sees a reply served from the cache, marked cached, with nothing billed; the metrics count it", function()
      _G.ngx = fake_ngx()
      local store = {}
      local cache = { get = function(_, k) return store[k] end, set = function(_, k, v) store[k] = v end }
      local evs = {}
      local m = metrics.new{ dict = fake_dict(), vars = false }
      local c = client({ cache = cache, observe = function(e) evs[#evs + 1] = e; m:record(e) end })
      local req = { messages = helpers.msgs("cache me"), temperature = 0 }
      local sent = up:stats().requests
      local first = c:chat(req)
      assert.is_nil(evs[1].cached)
      local again = c:chat(req)
      assert.is_true(again.cached)
      local s = c:stream(req)
      for _ in s do end
      assert.equal(3, #evs)
      assert.equal(sent + 1, up:stats().requests)
      for i = 2, 3 do
        local e = evs[i]
        assert.is_true(e.cached)
        assert.equal("ok", e.outcome)
        assert.equal(0, e.prompt_tokens)
        assert.equal(0, e.completion_tokens)
        assert.equal(0, e.cost)
        assert.equal(0, e.attempts)
      end
      assert.is_true(evs[3].stream)
      assert.is_true(first.usage.prompt_tokens > 0)
      local t = series(m:text())
      local base = 'consumer="-",model="gpt-4o-mini"'
      assert.equal(2, t["slm_cache_hits_total{" .. base .. "}"])
      assert.equal(3, t['slm_requests_total{consumer="-",model="gpt-4o-mini",outcome="ok"}'])
      assert.equal(1, t["slm_request_duration_seconds_count{" .. base .. "}"])
    end)

    it("reports a cancelled stream with the tokens billed for it", function()
      local evs = {}
      local c = client({ observe = function(e) evs[#evs + 1] = e end }, "chunks=100,slow_chunks=3")
      local s = c:stream{ messages = helpers.msgs("x") }
      for _ = 1, 3 do s:next() end
      s:close()
      local _, err = s:result()
      assert.equal(1, #evs)
      assert.equal("cancelled", evs[1].kind)
      assert.equal(err.partial.usage.completion_tokens, evs[1].completion_tokens)
      assert.is_true(evs[1].completion_tokens >= 3)
    end)

    it("survives an observer that raises, and says so once", function()
      local said = {}
      local real = io.stderr
      io.stderr = { write = function(_, ...) said[#said + 1] = table.concat({ ... }) end }
      local ok, why = pcall(function()
        local c = client({ observe = function() error("boom") end })
        assert.equal("Echo: x", c:chat{ messages = helpers.msgs("x") }.text)
        assert.equal("Echo: y", c:chat{ messages = helpers.msgs("y") }.text)
      end)
      io.stderr = real
      assert(ok, why)
      assert.equal(1, #said)
      assert.matches("observe hook failed %(reported once%): .*boom", said[1])
    end)

    it("refuses a non-function observer and a bad consumer", function()
      assert.has_error(function() slm.client{ observe = 1 } end,
        "slm.client: option 'observe' must be a function (event), got number")
      assert.has_error(function() client():chat{ messages = helpers.msgs("x"), consumer = 5 } end)
    end)
  end)

  describe("metrics", function()

    it("counts requests, errors, tokens, cost and the histograms per model and consumer", function()
      _G.ngx = fake_ngx{ declared = { slm_tokens = true, slm_cost = true, slm_consumer = true, slm_ttft = true } }
      local d = fake_dict()
      local m = metrics.new{ dict = d, consumer = function() return "fallback-co" end }
      local c = client({ observe = m:observer() })
      local r1 = c:chat{ messages = helpers.msgs("one"), consumer = "acme" }
      local s = c:stream{ messages = helpers.msgs("two"), consumer = "acme" }
      for _ in s do end
      local r2 = s:result()
      local r3 = c:chat{ messages = helpers.msgs("three") }
      client({ observe = m:observer() }, "status=429"):chat{ messages = helpers.msgs("x"), consumer = "acme" }
      local text = m:text()
      local t = series(text)
      local acme = 'consumer="' .. ACME .. '",model="gpt-4o-mini"'
      assert.equal(2, t['slm_requests_total{' .. 'consumer="' .. ACME .. '",model="gpt-4o-mini",outcome="ok"}'])
      assert.equal(1, t['slm_requests_total{' .. 'consumer="' .. ACME .. '",model="gpt-4o-mini",outcome="error"}'])
      assert.equal(1, t['slm_requests_total{' .. 'consumer="fallback-co",model="gpt-4o-mini",outcome="ok"}'])
      assert.equal(1, t['slm_errors_total{' .. 'consumer="' .. ACME .. '",kind="rate_limit",model="gpt-4o-mini"}'])
      assert.equal(r1.usage.prompt_tokens + r2.usage.prompt_tokens, t["slm_prompt_tokens_total{" .. acme .. "}"])
      assert.equal(r1.usage.completion_tokens + r2.usage.completion_tokens,
        t["slm_completion_tokens_total{" .. acme .. "}"])
      assert.near(r1.cost + r2.cost, t["slm_cost_usd_total{" .. acme .. "}"], 1e-12)
      assert.equal(3, t["slm_request_duration_seconds_count{" .. acme .. "}"])
      assert.equal(3, t["slm_request_duration_seconds_bucket{" .. acme .. ',le="+Inf"}'])
      assert.equal(1, t["slm_ttft_seconds_count{" .. acme .. "}"])
      assert.near(r2.ttft, t["slm_ttft_seconds_sum{" .. acme .. "}"], 1e-9)
      -- buckets cumulative and in order
      local prev = 0
      for le in text:gmatch('slm_request_duration_seconds_bucket{consumer="' .. ACME .. '",model="gpt%-4o%-mini",le="([^"]+)"}') do
        local v = t['slm_request_duration_seconds_bucket{' .. acme .. ',le="' .. le .. '"}']
        assert.is_true(v >= prev)
        prev = v
      end
      assert.equal(3, prev)
      assert.equal(3, t["slm_request_duration_seconds_bucket{" .. acme .. ',le="60"}'])
      assert.matches("# TYPE slm_request_duration_seconds histogram", text, 1, true)
      assert.matches("# TYPE slm_requests_total counter", text, 1, true)
      -- the access-log variables: the declared ones, for the last call of the request
      assert.equal(tostring(r1.usage.total_tokens + r2.usage.total_tokens + r3.usage.total_tokens
        + 0), ngx.var.slm_tokens)
      assert.equal(ACME, ngx.var.slm_consumer)
      assert.matches("^%d+%.%d+$", ngx.var.slm_cost)
    end)

    it("keeps each histogram bucket as the count of observations at or below it", function()
      _G.ngx = fake_ngx()
      local m = metrics.new{ dict = fake_dict(), vars = false, buckets = { 0.1, 0.25, 1 } }
      for _, v in ipairs{ 0.05, 0.2, 0.25, 3 } do
        m:record{ model = "m", consumer = "c", outcome = "ok", latency = v, ttft = v / 10 }
      end
      local t = series(m:text())
      local l = 'slm_request_duration_seconds_bucket{consumer="c",model="m",le="%s"}'
      assert.equal(1, t[l:format("0.1")])
      assert.equal(3, t[l:format("0.25")])
      assert.equal(3, t[l:format("1")])
      assert.equal(4, t[l:format("+Inf")])
      assert.near(3.5, t['slm_request_duration_seconds_sum{consumer="c",model="m"}'], 1e-12)
      assert.equal(4, t['slm_request_duration_seconds_count{consumer="c",model="m"}'])
      assert.equal(3, t['slm_ttft_seconds_bucket{consumer="c",model="m",le="0.025"}']) -- 0.005, 0.02, 0.025
    end)

    it("escapes label values, drops increments when the dict is full, and serves the text", function()
      local n = fake_ngx()
      _G.ngx = n
      local d = fake_dict(3)
      local m = metrics.new{ dict = d, vars = false }
      m:record{ model = 'we"ird\\m\nodel', consumer = "a\tb", outcome = "ok", prompt_tokens = 1,
        completion_tokens = 2, cost = 0.5, attempts = 1, latency = 0.2 }
      assert.equal(1, #n.logs) -- reported once
      assert.matches("dropped", n.logs[1][2])
      local text = m:text()
      assert.matches('model="we\\"ird\\\\m\\nodel"', text, 1, true)
      assert.matches('consumer="a b"', text, 1, true)
      m:serve()
      assert.equal("text/plain; version=0.0.4; charset=utf-8", n.header["Content-Type"])
      assert.equal(text, n.body())
      m:reset()
      -- only the drop counter's series is left, at 0 (made again so that a full dict can count)
      assert.same({ "slm_metrics_dropped_total\t\t\t" }, d:get_keys())
      assert.equal(0, series(m:text()).slm_metrics_dropped_total)
    end)

    it("never evicts other series when the dict is full: drops the new one's increments, counts them, "
      .. "warns at most once a minute", function()
      local n = fake_ngx()
      _G.ngx = n
      local d = fake_dict(5)
      local m = metrics.new{ dict = d, vars = false }
      for i = 1, 4 do m:inc("app_calls_total", { route = "r" .. i }, i) end
      assert.equal(0, #n.logs)
      -- the dict is full: a new series cannot come in, and takes nothing out
      for _ = 1, 3 do m:inc("app_calls_total", { route = "new" }) end
      m:inc("app_calls_total", { route = "r1" }, 10) -- an existing series still counts
      local t = series(m:text())
      assert.equal(11, t['app_calls_total{route="r1"}'])
      for i = 2, 4 do assert.equal(i, t['app_calls_total{route="r' .. i .. '"}']) end
      assert.is_nil(t['app_calls_total{route="new"}'])
      assert.equal(3, t.slm_metrics_dropped_total)
      -- said once, at WARN, with the way out
      assert.equal(1, #n.logs)
      assert.equal(n.WARN, n.logs[1][1])
      assert.matches("dropped", n.logs[1][2])
      assert.matches("lua_shared_dict is full", n.logs[1][2])
      -- a minute later, the next drop is said again
      n.t = n.t + 61
      m:inc("app_calls_total", { route = "new2" })
      assert.equal(2, #n.logs)
      assert.equal(4, series(m:text()).slm_metrics_dropped_total)
      -- a record on a full dict drops its new series too, without failing
      m:record{ model = "m", consumer = "c", outcome = "ok", latency = 0.2, prompt_tokens = 1 }
      assert.equal(11, series(m:text())['app_calls_total{route="r1"}'])
      assert_exposition(m:text())
    end)

    it("makes label values valid UTF-8, cut at a character's boundary, and escapes them", function()
      local n = fake_ngx()
      _G.ngx = n
      local header -- the raw bytes of an X-Consumer header
      local m = metrics.new{ dict = fake_dict(), consumer = function() return header end, vars = false }
      local R = "\239\191\189" -- U+FFFD
      -- 127 bytes, then a 2-byte character that the 128-byte cut would split
      header = ("a"):rep(127) .. "é"
      m:record{ model = "m", outcome = "ok" }
      -- stray and overlong bytes, a surrogate, a character cut short, quotes, backslash, newline
      header = 'x\255y\192\175z\237\160\128w\226\130' .. '"q"\\\n' .. "ok✓"
      m:record{ model = "m\128\n", outcome = "ok" }
      local text = m:text()
      assert_exposition(text)
      local t = series(text)
      assert.equal(1, t['slm_requests_total{consumer="' .. ("a"):rep(127) .. '",model="m",outcome="ok"}'])
      -- each byte that starts no valid sequence is one U+FFFD (slm.redact.utf8)
      local want = 'x' .. R .. 'y' .. R .. R .. 'z' .. R .. R .. R .. 'w' .. R .. R .. '\\"q\\"\\\\\\n' .. "ok✓"
      assert.matches('consumer="' .. want .. '",model="m' .. R .. '\\n",outcome="ok"', text, 1, true)
      assert.equal("abc", metrics.utf8("abc"))
      assert.equal("é" .. R, metrics.utf8("é\195"))
    end)

    it("renders a histogram of your own (observe_value) with its buckets, _sum and _count, in any worker", function()
      _G.ngx = fake_ngx()
      local d = fake_dict()
      local m = metrics.new{ dict = d, vars = false }
      for _, v in ipairs{ 0.5, 3, 20, 5 } do m:observe_value("app_size_kb", { route = "a" }, v, { 1, 5, 10 }) end
      m:observe_value("app_size_kb", { route = "b" }, 50, { 1, 5, 10 })
      -- another worker's instance over the same dict: it never observed
      for _, inst in ipairs{ m, metrics.new{ dict = d, vars = false } } do
        local text = inst:text()
        assert_exposition(text)
        assert.matches("# TYPE app_size_kb histogram\n", text, 1, true)
        assert.matches(table.concat({
          'app_size_kb_bucket{route="a",le="1"} 1',
          'app_size_kb_bucket{route="a",le="5"} 3',
          'app_size_kb_bucket{route="a",le="10"} 3',
          'app_size_kb_bucket{route="a",le="+Inf"} 4',
          'app_size_kb_sum{route="a"} 28.5',
          'app_size_kb_count{route="a"} 4',
          'app_size_kb_bucket{route="b",le="1"} 0',
          'app_size_kb_bucket{route="b",le="5"} 0',
          'app_size_kb_bucket{route="b",le="10"} 0',
          'app_size_kb_bucket{route="b",le="+Inf"} 1',
          'app_size_kb_sum{route="b"} 50',
          'app_size_kb_count{route="b"} 1',
        }, "\n"), text, 1, true)
        assert.is_nil(text:find("app_size_kb{", 1, true))
        assert.is_nil(text:find("untyped", 1, true))
      end
      -- without labels, and misuse
      m:observe_value("app_wait_seconds", nil, 0.3)
      assert.matches('app_wait_seconds_bucket{le="0.5"} 1\n', m:text(), 1, true)
      assert.matches('app_wait_seconds_count 1\n', m:text(), 1, true)
      assert.has_error(function() m:observe_value("app x", nil, 1) end, 'slm.ngx.metrics: bad metric name "app x"')
      assert.has_error(function() m:observe_value("app_y", nil, 1, { 2, 1 }) end,
        "slm.ngx.metrics: buckets must be increasing finite numbers")
      assert.has_error(function() m:observe_value("app_y", nil, "1") end,
        "slm.ngx.metrics: observe_value needs a number, got 1")
    end)

    it("resolves a lua_shared_dict by name and says which one is missing", function()
      _G.ngx = fake_ngx{ shared = { mine = fake_dict() } }
      assert.is_table(metrics.new{ dict = "mine" })
      assert.has_error(function() metrics.new{ dict = "nope" } end,
        "slm.ngx.metrics: no lua_shared_dict 'nope' (add `lua_shared_dict nope 4m;` to http{})")
      assert.has_error(function() metrics.new{ buckets = { 1, 0.5 } } end,
        "slm.ngx.metrics: option 'buckets' must be increasing finite numbers")
    end)
  end)
end)
