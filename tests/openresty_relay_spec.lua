-- slm.ngx.relay and slm.ngx.metrics in a real nginx over cosockets: an app
-- nginx (tests/openresty_relay_app.lua) relays client:stream from the
-- simulator to a "browser" (curl, or a luv socket that leaves mid-stream).
-- Byte-for-byte relay and exact SSE framing, the browser leaving stopping
-- the upstream (the simulator's aborted / in_flight) with the budget
-- charged for what was produced, the caps, the final usage event, the
-- error paths, and the metrics text against the requests made.
local H = require "tests.helpers"
local cjson = require "cjson"
local core = require "slm.core"
local rt = require("slm.runtime").get("curl")

local sim, app

local APP_HTTP = [[
    lua_shared_dict slm_metrics 2m;
    lua_shared_dict slm_metrics_tiny 12k;
    init_by_lua_block { require("openresty_relay_app").sim_url = "@SIM_URL@" }
]]

local APP_SERVER = [[
        location = /relay {
          lua_check_client_abort on;
          content_by_lua_block { require("openresty_relay_app").relay() }
        }
        location = /budget { content_by_lua_block { require("openresty_relay_app").budget() } }
        location = /metrics { content_by_lua_block { require("openresty_relay_app").metrics() } }
        location = /fill { content_by_lua_block { require("openresty_relay_app").fill() } }
]]

-- POST path with a JSON body through curl: status, headers (lowercase
-- names), body (de-chunked)
local function post(path, t, headers)
  local hf = os.tmpname()
  local extra = ""
  for k, v in pairs(headers or {}) do extra = extra .. " -H " .. H.q(k .. ": " .. v) end
  local f = assert(io.popen(("env -u LD_PRELOAD curl -sN --max-time 20 -D %s -H 'Content-Type: application/json'%s "
    .. "--data-binary %s %s"):format(H.q(hf), extra, H.q(cjson.encode(t)), H.q(app.base .. path))))
  local body = f:read("a")
  f:close()
  local raw = H.read_file(hf)
  os.remove(hf)
  local status = tonumber(raw:match("^HTTP/%S+ (%d+)"))
  local hs = {}
  for k, v in raw:gmatch("\n([^:\r\n]+): ([^\r\n]*)") do hs[k:lower()] = v end
  return status, hs, body
end

local function get(path)
  local f = assert(io.popen(("env -u LD_PRELOAD curl -s --max-time 10 %s"):format(H.q(app.base .. path))))
  local s = f:read("a")
  f:close()
  return s
end

-- A browser over lua-slm's own libcurl runtime (HTTP/1.1, chunked): the
-- body as it arrives; with `leave` it closes the connection once it has
-- seen that many delta events.  -> body, seconds to the first bytes
local function browse(t, leave)
  local conn = rt.open{ url = app.base .. "/relay", method = "POST", headers = { "Content-Type: application/json" },
    body = cjson.encode(t), connect_timeout = 5, first_byte_timeout = 15, idle_timeout = 15, max_body = 1e8 }
  local t0 = core.now()
  local status = conn:response()
  assert.equal(200, status)
  local got, first = {}, nil
  while true do
    local b = conn:read()
    if not b then break end
    first = first or core.now() - t0
    got[#got + 1] = b
    if leave and select(2, table.concat(got):gsub('data: {"delta":', "")) >= leave then
      conn:cancel()
      break
    end
  end
  return table.concat(got), first
end
local function leave_after(t, n) return (browse(t, n)) end

-- The events of an SSE body: { event, data (decoded), raw }, and the deltas joined.
local function events(body)
  local list, texts = {}, {}
  local rest = body:gsub("(.-)\n\n", function(block)
    local name, data = block:match("^event: ([^\n]*)\ndata: (.*)$")
    if not name then data = block:match("^data: (.*)$") end
    assert(data, "not an SSE event: " .. block)
    local v = cjson.decode(data)
    list[#list + 1] = { event = name, data = v, raw = block }
    if not name then texts[#texts + 1] = v.delta end
    return ""
  end)
  assert.equal("", rest) -- nothing outside the events
  return list, table.concat(texts)
end

local function wait_sim(pred)
  local st
  for _ = 1, 250 do
    st = sim:stats()
    if pred(st) then return st end
    os.execute("sleep 0.02")
  end
  return st
end

local function budget() return cjson.decode(get("/budget")) end

describe("slm.ngx.relay in nginx", function()
  setup(function() sim, app = H.sim_and_app(APP_HTTP, APP_SERVER) end)
  teardown(function()
    if app then app:stop() end
    if sim then sim:stop() end
  end)
  before_each(function() sim:reset() end)

  it("relays the deltas byte for byte, one exact SSE event each, then usage and cost", function()
    local msg = "Привет,\nмир — \"quoted\" \\ back\r\n\tend ✓ " .. ("word "):rep(30)
    local direct = H.sim_client(sim):chat{ messages = H.msgs(msg) }
    for _, form in ipairs{ "stream", "request", "push" } do
      local status, hs, body = post("/relay", { message = msg, form = form })
      assert.equal(200, status)
      assert.equal("text/event-stream", hs["content-type"])
      assert.equal("no-cache", hs["cache-control"])
      assert.equal("no", hs["x-accel-buffering"])
      local list, text = events(body)
      assert.equal(direct.text, text) -- byte for byte
      for i = 1, #list - 1 do
        assert.is_nil(list[i].event)
        assert.equal("data: " .. cjson.encode{ delta = list[i].data.delta }, list[i].raw)
      end
      local final = list[#list]
      assert.equal("done", final.event)
      assert.same(direct.usage, final.data.usage)
      assert.near(direct.cost, final.data.cost, 1e-15)
      assert.equal("gpt-4o-mini", final.data.model)
      assert.equal("stop", final.data.finish_reason)
      assert.equal(#text, final.data.bytes)
    end
  end)

  it("sends each piece as it arrives (several events for a slow stream, the first before the last is made)", function()
    local body, first = browse({ message = "x", scenario = "chunks=6,slow_chunks=400" }, 1)
    assert.matches('^data: {"delta":', body)
    assert.is_true(first < 1.5, "the first piece came after " .. first .. " s") -- 6 x 400 ms would be 2.4 s
    wait_sim(function(st) return st.in_flight == 0 end)
  end)

  it("stops the upstream at once when the browser leaves, charges the budget for what was produced, logs it", function()
    local before = budget()
    local logged = select(2, app:error_log():gsub("client went away", ""))
    local body = leave_after({ message = "x", scenario = "chunks=2000,slow_chunks=5" }, 3)
    local list = events(body:match("^(.*\n\n)") or "")
    assert.is_true(#list >= 3, body)
    local st = wait_sim(function(s) return s.aborted == 1 and s.in_flight == 0 end)
    assert.equal(1, st.aborted)
    assert.equal(0, st.in_flight)
    assert.equal(1, st.requests) -- no retry
    local after
    for _ = 1, 100 do
      after = budget()
      if after.reserved_tokens == 0 and after.spent_tokens > before.spent_tokens then break end
      os.execute("sleep 0.02")
    end
    assert.equal(0, after.reserved_tokens)
    local charged = after.spent_tokens - before.spent_tokens
    -- the prompt and what arrived before the stop: at least the pieces the
    -- browser saw, far from the 2000 the whole reply would have been
    local billed
    for _ = 1, 50 do
      local log = app:error_log()
      if select(2, log:gsub("client went away", "")) > logged then
        for n in log:gmatch("upstream request stopped; (%d+) tokens") do billed = tonumber(n) end -- the last
        break
      end
      os.execute("sleep 0.02")
    end
    assert.equal(charged, billed)
    local prompt = H.sim_client(sim):chat{ messages = H.msgs("x") }.usage.prompt_tokens
    assert.is_true(charged - prompt >= #list, "completion billed " .. (charged - prompt))
    assert.is_true(charged - prompt < 1000, "completion billed " .. (charged - prompt))
    assert.is_true(after.spent_usd > before.spent_usd)
  end)

  -- Leave after the first piece of a stream whose pieces are 4 s apart:
  -- only the abort handler can stop the upstream sooner.
  local function stopped_on_abort(form)
    leave_after({ message = "x", scenario = "chunks=3,slow_chunks=4000", form = form }, 1)
    local t0 = core.now() -- the browser has just left, the next piece is 4 s away
    local st = wait_sim(function(s) return s.aborted == 1 and s.in_flight == 0 end)
    assert.equal(1, st.aborted)
    assert.is_true(core.now() - t0 < 2.5, "the upstream was stopped after " .. (core.now() - t0) .. " s")
  end

  it("stops the upstream from ngx.on_abort, without waiting for the next piece", function()
    stopped_on_abort(nil)
  end)

  it("stops a push source (client:chat's on_delta) when the browser leaves", function()
    leave_after({ message = "x", scenario = "chunks=2000,slow_chunks=5", form = "push" }, 2)
    local st = wait_sim(function(s) return s.aborted == 1 and s.in_flight == 0 end)
    assert.equal(1, st.aborted)
    assert.equal(0, st.in_flight)
  end)

  it("stops a push source from ngx.on_abort too, without waiting for its next piece", function()
    stopped_on_abort("push")
  end)

  it("caps a push source's duration while it waits for a piece", function()
    local t0 = core.now()
    local _, _, body = post("/relay", { message = "x", scenario = "chunks=3,slow_chunks=4000", max_seconds = 0.4,
      form = "push" })
    local secs = core.now() - t0
    local list = events(body)
    assert.equal("done", list[#list].event, body)
    assert.equal("duration", list[#list].data.capped)
    assert.is_true(secs < 2.5, secs) -- the next piece was 4 s away
    assert.equal(1, wait_sim(function(s) return s.aborted == 1 end).aborted)
  end)

  it("caps the bytes and the duration, stops the upstream, ends with the done event", function()
    local _, _, body = post("/relay", { message = "x", scenario = "chunks=2000,slow_chunks=2", max_bytes = 30 })
    local list, text = events(body)
    assert.equal(("tok "):rep(8):sub(1, 30), text)
    assert.equal("done", list[#list].event)
    assert.equal("bytes", list[#list].data.capped)
    assert.is_true(list[#list].data.usage.completion_tokens >= 8)
    assert.equal(1, wait_sim(function(s) return s.aborted == 1 end).aborted)

    sim:reset()
    local t0 = core.now()
    _, _, body = post("/relay", { message = "x", scenario = "chunks=2000,slow_chunks=50", max_seconds = 1 })
    local secs = core.now() - t0
    list = events(body)
    assert.equal("duration", list[#list].data.capped)
    assert.is_true(secs < 3, secs) -- the whole reply would take 100 s
    assert.is_true(#list > 2 and #list < 40)
    assert.equal(1, wait_sim(function(s) return s.aborted == 1 end).aborted)

    -- a stalled upstream is cut by the watchdog too: no piece needed
    sim:reset()
    t0 = core.now()
    _, _, body = post("/relay", { message = "x", scenario = "delay=3000", max_seconds = 0.3 })
    secs = core.now() - t0
    assert.is_true(secs < 2, secs)
    list = events(body)
    assert.equal(1, #list)
    assert.equal("duration", list[1].data.capped)
  end)

  it("stops the watchdog, the upstream and the budget's hold when on_delta or final raises", function()
    for _, raise in ipairs{ "on_delta", "final" } do
      sim:reset()
      local before = budget()
      local t0 = core.now()
      local status, _, body = post("/relay", { message = "x", max_seconds = 4, raise = raise,
        scenario = raise == "on_delta" and "chunks=2000,slow_chunks=5" or "chunks=5" })
      local secs = core.now() - t0
      assert.equal(200, status)
      assert.matches('event: raised\ndata: {"error":"boom in ' .. raise .. '"}', body, 1, true)
      -- the request ends at once: no watchdog left to wait for its 4 s
      assert.is_true(secs < 2, raise .. ": the request took " .. secs .. " s")
      local st = wait_sim(function(s) return s.in_flight == 0 end)
      assert.equal(0, st.in_flight)
      assert.equal(1, st.requests)
      if raise == "on_delta" then assert.equal(1, st.aborted) end
      local after = budget()
      assert.equal(0, after.reserved_tokens, raise)
      assert.is_true(after.spent_tokens > before.spent_tokens, raise)
    end
  end)

  it("never evicts a series from a full lua_shared_dict: the new ones are dropped, counted, logged", function()
    local logged = select(2, app:error_log():gsub("increment%(s%) dropped", ""))
    local r = cjson.decode(get("/fill?n=2000"))
    assert.equal(2, r.first) -- the first series is still there, and still counts
    assert.equal(cjson.null, r.last) -- the 2000th found no room
    assert.is_true(r.dropped > 0 and r.dropped < 2000, r.dropped)
    assert.is_true(r.series > 10 and r.series < 2000, r.series)
    local log = app:error_log()
    assert.equal(logged + 1, select(2, log:gsub("increment%(s%) dropped", ""))) -- once, not per drop
    assert.matches("%[warn%][^\n]*slm.ngx.metrics: %d+ increment%(s%) dropped", log)
  end)

  it("answers an error before output with an HTTP status and JSON, after output with an error event", function()
    local status, hs, body = post("/relay", { message = "x", scenario = "status=503", retries = 0 })
    assert.equal(502, status)
    assert.equal("application/json", hs["content-type"])
    local e = cjson.decode(body).error
    assert.equal("server", e.kind)
    assert.equal(503, e.status)

    status, _, body = post("/relay", { message = "x", scenario = "status=429" })
    assert.equal(429, status)
    assert.equal("rate_limit", cjson.decode(body).error.kind)

    sim:reset()
    -- a reset mid-stream is a "connect" error, which is retried before output
    status, _, body = post("/relay", { message = "x", scenario = "chunks=50,reset", retries = 3 })
    assert.equal(200, status)
    local list = events(body)
    local last = list[#list]
    assert.equal("error", last.event)
    assert.is_string(last.data.error.kind)
    assert.is_number(last.data.usage.completion_tokens)
    assert.equal(1, sim:stats().requests) -- never retried after output
  end)

  it("counts every call in the metrics text, per model and consumer", function()
    local made = { ok = 0, prompt = 0, completion = 0, cost = 0 }
    for i = 1, 3 do
      local _, _, body = post("/relay", { message = "metrics " .. i, consumer = "acme" })
      local list = events(body)
      local d = list[#list].data
      made.ok = made.ok + 1
      made.prompt = made.prompt + d.usage.prompt_tokens
      made.completion = made.completion + d.usage.completion_tokens
      made.cost = made.cost + d.cost
    end
    post("/relay", { message = "x", scenario = "status=500", consumer = "acme" })
    post("/relay", { message = "x" }, { ["X-Consumer"] = "from-header" })
    local text = get("/metrics")
    local t = {}
    for line in text:gmatch("[^\n]+") do
      if not line:find("^#") then
        local k, v = line:match("^(%S+) (%S+)$")
        assert(k, line)
        t[k] = tonumber(v)
      end
    end
    local acme = 'consumer="' .. require("slm.quotas").display("acme") .. '",model="gpt-4o-mini"'
    assert.equal(3, t['slm_requests_total{' .. acme .. ',outcome="ok"}'])
    assert.equal(1, t['slm_requests_total{' .. acme .. ',outcome="error"}'])
    assert.equal(1, t['slm_errors_total{consumer="' .. require("slm.quotas").display("acme") .. '",kind="server",model="gpt-4o-mini"}'])
    assert.equal(1, t['slm_requests_total{consumer="from-header",model="gpt-4o-mini",outcome="ok"}'])
    assert.equal(made.prompt, t["slm_prompt_tokens_total{" .. acme .. "}"])
    assert.equal(made.completion, t["slm_completion_tokens_total{" .. acme .. "}"])
    assert.near(made.cost, t["slm_cost_usd_total{" .. acme .. "}"], 1e-12)
    assert.equal(4, t["slm_request_duration_seconds_count{" .. acme .. "}"])
    assert.equal(3, t["slm_ttft_seconds_count{" .. acme .. "}"])
    assert.is_true(t['slm_ttft_seconds_bucket{' .. acme .. ',le="+Inf"}'] == 3)
    assert.matches("# TYPE slm_ttft_seconds histogram", text, 1, true)
  end)
end)
