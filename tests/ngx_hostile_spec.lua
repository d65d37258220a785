-- A hostile review of the OpenResty layer, round 2: an upstream that
-- misbehaves at the socket level (the app nginx plays it itself, on raw
-- connections: tests/ngx_transport_app.lua's RAW), relays whose callbacks
-- end the request, hostile labels in the metrics.  Everything in a real
-- nginx over cosockets.
local launch = require "tests.upstream.launch"
local H = require "tests.helpers"
local cjson = require "cjson"

local sim, app

local APP_HTTP = [[
    lua_shared_dict slm_test_notes 1m;
    lua_shared_dict slm_test_metrics 1m;
    init_by_lua_block { require("ngx_transport_app").sim_url = "@SIM_URL@" }
]]

local APP_SERVER = [[
        location ~ ^/raw/(?<raw_case>[a-z0-9_]+)/ { content_by_lua_block { require("ngx_transport_app").raw() } }
        location = /hostile { content_by_lua_block { require("ngx_transport_app").hostile() } }
        location = /relay_exit { content_by_lua_block { require("ngx_transport_app").relay_exit() } }
        location = /relay_raw { content_by_lua_block { require("ngx_transport_app").relay_raw() } }
        location = /relay_state { content_by_lua_block { require("ngx_transport_app").relay_state() } }
        location = /metrics_text {
          content_by_lua_block { slm_test_m = slm_test_m or require("slm.ngx.metrics").get{ dict = "slm_test_metrics" }
            slm_test_m:serve() }
        }
]]

local function urlenc(s) return (s:gsub("[^%w%-_.~]", function(ch) return ("%%%02X"):format(ch:byte()) end)) end

local function get(path, timeout)
  local f = assert(io.popen(("env -u LD_PRELOAD curl -s --max-time %d %s"):format(timeout or 20,
    H.q(app.base .. path))))
  local s = f:read("a")
  f:close()
  return s
end

local function get_json(path, timeout)
  local s = get(path, timeout)
  local ok, v = pcall(cjson.decode, s)
  if not ok then error("not JSON from " .. path .. ": " .. s .. "\n" .. app:error_log(), 2) end
  if v.calls then
    for i, c in ipairs(v.calls) do v[i] = c end
  end
  return v
end

setup(function() sim, app = H.sim_and_app(APP_HTTP, APP_SERVER) end)
teardown(function()
  if app then app:stop() end
  if sim then sim:stop() end
end)

describe("slm.transport.ngx against a hostile upstream (socket level)", function()
  it("fails a reply whose headers never end within the head limit with kind protocol, at once", function()
    local r = get_json("/hostile?case=big_head&timeout=4")[1]
    assert.equal("protocol", r.error and r.error.kind, cjson.encode(r))
    assert.matches("headers larger", r.error.message)
    assert.is_true(r.seconds < 2, r.seconds)
  end)

  it("reads header lines ended by a bare LF", function()
    local r = get_json("/hostile?case=lf_only")[1]
    assert.equal("bare LF", r.text, cjson.encode(r))
  end)

  it("decodes chunked over a Content-Length, and never reuses that connection", function()
    local r = get_json("/hostile?case=cl_and_chunked&calls=2")
    assert.equal("chunked wins", r[1].text, cjson.encode(r))
    assert.equal("chunked wins", r[2].text, cjson.encode(r))
    assert.equal(2, r.requests)
  end)

  it("refuses a chunk size of 2^64 with kind protocol", function()
    local r = get_json("/hostile?case=chunk_2_64&timeout=4")[1]
    assert.equal("protocol", r.error and r.error.kind, cjson.encode(r))
    assert.is_true(r.seconds < 1.5, r.seconds)
  end)

  it("skips 100 Continue and 103 Early Hints before the real reply", function()
    local r = get_json("/hostile?case=continue")[1]
    assert.equal("after 100", r.text, cjson.encode(r))
  end)

  it("holds the call's total deadline against an upstream that sends one byte at a time", function()
    for _, q in ipairs{ "case=slow_head&timeout=1.5", "case=slow_body&timeout=1.5" } do
      local r = get_json("/hostile?" .. q)[1]
      assert.equal("timeout", r.error and r.error.kind, q .. ": " .. cjson.encode(r))
      assert.is_true(r.seconds >= 1.3 and r.seconds < 2.5, q .. ": " .. r.seconds)
    end
  end)

  it("never hands a reply the upstream sent unasked on an idle pooled connection to the next call", function()
    -- the unasked reply arrives while the connection waits in the pool
    -- (0.1 s after the first): the next call must not read it as its own
    -- (when it arrives after the next request went out, no HTTP/1.1 client
    -- can tell it from the answer)
    local r = get_json("/hostile?case=late_extra&calls=3&gap=0.3")
    for i = 1, 3 do
      assert.is_nil(r[i].error, cjson.encode(r))
      assert.equal("first", r[i].text, cjson.encode(r))
    end
  end)

  it("does not reuse a connection the reply said Connection: close on", function()
    local r = get_json("/hostile?case=conn_close&calls=2")
    assert.equal("closing", r[1].text, cjson.encode(r))
    assert.equal("closing", r[2].text, cjson.encode(r))
    assert.equal(2, r.requests)
  end)
end)

describe("slm.ngx.metrics with hostile labels", function()
  it("keeps the text format valid for model and consumer names with quotes, newlines, backslashes, bad UTF-8", function()
    local evil = 'evil"model\n# TYPE x counter\nx{a="1"} 1\\'
    local r = get_json("/hostile?case=hostile_model&metrics=1&model=" .. urlenc(evil) .. "&consumer="
      .. urlenc(evil .. "\255\r"))[1]
    assert.equal("labels", r.text, cjson.encode(r))
    local text = get("/metrics_text")
    for line in text:gmatch("[^\n]+") do
      if not line:find("^#") then
        assert.matches('^[%a_:][%w_:]*{?.*}? [%d.e+%-Inf]+$', line)
        assert.is_nil(line:find("^x{"), line)
      end
    end
    local esc = 'evil\\"model\\n# TYPE x counter\\nx{a=\\"1\\"} 1\\\\'
    -- (a consumer is shown as its digest: slm.quotas.display)
    assert.truthy(text:find('slm_requests_total{consumer="consumer:' .. ('%x'):rep(12) .. '",model="'
      .. esc:gsub("%p", "%%%0") .. '",outcome="ok"} 1'), text)
  end)
end)

describe("slm.ngx.relay when the request is ended under it", function()
  before_each(function() sim:reset() end)

  local function wait_sim(pred)
    local st
    for _ = 1, 150 do
      st = sim:stats()
      if pred(st) then return st end
      os.execute("sleep 0.02")
    end
    return st
  end

  for _, how in ipairs{ "on_delta", "push" } do
    it("gives back the slot and the budget's hold, and stops the upstream, on ngx.exit in " .. how, function()
      local body = get("/relay_exit?how=" .. how)
      assert.matches('^data: {"delta"', body)
      local st = wait_sim(function(s) return s.in_flight == 0 end)
      assert.equal(0, st.in_flight)
      local r = get_json("/relay_state")
      assert.equal(0, r.reserved_tokens, cjson.encode(r))
      assert.is_nil(r.kind, cjson.encode(r))
      assert.matches("^Echo", r.text)
      assert.is_true(r.spent_tokens > 0)
    end)
  end
end)

describe("slm.ngx.relay of replies that are not valid UTF-8 piece by piece", function()
  local function valid(s) return require("slm.redact").utf8(s) == s end

  it("sends every event as valid UTF-8: a character split between deltas goes out whole", function()
    local body = get("/relay_raw?case=split_utf8")
    assert.is_nil(body:find("event: raised", 1, true), body)
    local text, final, list = require("slm.ngx").parse_events(body)
    assert.equal("done", list[#list].event, body)
    for _, e in ipairs(list) do assert.is_true(valid(e.raw), e.raw) end
    -- the split euro sign whole; the stray byte, and each byte of the character cut by the end, as U+FFFD
    assert.equal("price: 5 \226\130\172, ok stray \239\191\189 byte end \239\191\189\239\191\189", text)
    assert.equal(#text, final.bytes)
  end)

  it("sends valid UTF-8 when on_delta returns a piece cut inside a character", function()
    local body = get("/relay_raw?case=split_utf8&cut=10")
    assert.is_nil(body:find("event: raised", 1, true), body)
    local _, _, list = require("slm.ngx").parse_events(body)
    assert.equal("done", list[#list].event, body)
    for _, e in ipairs(list) do assert.is_true(valid(e.raw), e.raw) end
  end)

  it("ends with the done event when the reply's model name is not valid UTF-8", function()
    local body = get("/relay_raw?case=bad_model_sse")
    assert.is_nil(body:find("event: raised", 1, true), body)
    local text, final = require("slm.ngx").parse_events(body)
    assert.equal("hello", text)
    assert.is_table(final, body)
    assert.is_true(valid(body), body)
  end)

  it("answers an upstream error whose message is not valid UTF-8 with the JSON error", function()
    local f = assert(io.popen(("env -u LD_PRELOAD curl -s -o /dev/null -w '%%{http_code}' --max-time 10 %s")
      :format(H.q(app.base .. "/relay_raw?case=bad_error"))))
    local code = f:read("a")
    f:close()
    local body = get("/relay_raw?case=bad_error")
    assert.equal("502", code, body)
    local e = cjson.decode(body).error
    assert.equal("server", e.kind)
    assert.is_true(valid(body), body)
  end)
end)
