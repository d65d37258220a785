-- HTTPS, HTTP/2 multiplexing and private CAs, against the simulator's TLS
-- listener (tests/upstream: launch.lua's tls, a fresh self-signed
-- certificate per instance).  What DESIGN.md's "connection reuse (keep-alive,
-- and HTTP/2 multiplexing with PIPEWAIT when the server offers it)" means,
-- proven by the server's own count of connections.
local core = require "slm.core"
local slm = require "slm"
local json = require "cjson"
local launch = require "tests.upstream.launch"

local up
setup(function() up = launch.start{ quiet = true, tls = true } end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

local function body(text)
  return json.encode{ model = "gpt-4o-mini", messages = { { role = "user", content = text or "ping" } } }
end

-- n requests at once on one multi; returns them when all are done.
local function batch(n, opts)
  local m = core.multi{}
  local reqs = {}
  for i = 1, n do
    reqs[i] = m:add{
      url = (opts.url or up.tls_url) .. "/chat/completions", method = "POST", body = body("r" .. i),
      headers = { "Content-Type: application/json", "X-Sim-Scenario: " .. (opts.scenario or "delay=0") },
      ca_file = opts.ca_file, http_version = opts.http_version, timeout = 10,
    }
  end
  local deadline = core.now() + 15
  while m:count() > 0 and core.now() < deadline do m:step(0.5) end
  assert.equal(0, m:count(), "requests still in flight")
  return reqs, m
end

describe("slm.core over HTTPS", function()
  it("verifies the server against ca_file and multiplexes on one HTTP/2 connection", function()
    local reqs = batch(6, { ca_file = up.ca_file, scenario = "delay=300" })
    for i, r in ipairs(reqs) do
      assert.same({ true }, { r:result() }, "request " .. i)
      assert.equal(200, r:status())
      assert.equal("2", r:info().http_version)
      assert.matches('"content":"Echo: r' .. i .. '"', r:read(), 1, true)
    end
    local st = up:stats()
    assert.equal(6, st.requests)
    assert.equal(6, st.max_in_flight) -- all six at once...
    assert.equal(1, st.connections) -- ...on one connection
  end)

  it("refuses a server its CAs do not vouch for", function()
    local reqs = batch(1, {})
    local ok, kind, msg = reqs[1]:result()
    assert.is_nil(ok)
    assert.equal("transport", kind)
    assert.matches("certificate", msg)
    assert.equal(0, up:stats().requests)
  end)

  it("speaks HTTP/1.1 when asked, one connection per request in flight, none waiting", function()
    local reqs = batch(4, { ca_file = up.ca_file, http_version = "1.1", scenario = "delay=300" })
    for _, r in ipairs(reqs) do
      assert.same({ true }, { r:result() })
      assert.equal("1.1", r:info().http_version)
    end
    local st = up:stats()
    assert.equal(4, st.max_in_flight) -- no PIPEWAIT: nobody waited for the first connection
    assert.equal(4, st.connections)
  end)

  it("speaks cleartext HTTP/2 with prior knowledge, round after round", function()
    -- libcurl before 8.0 cannot reuse such a connection (core.h2c_reuse):
    -- then each request has one of its own, and none fails
    local m = core.multi{}
    for round = 1, 3 do
      local reqs = {}
      for i = 1, 3 do
        reqs[i] = m:add{ url = up.h2c_url .. "/chat/completions", method = "POST", body = body("h" .. round .. i),
          headers = { "Content-Type: application/json" }, http_version = "2", timeout = 10 }
      end
      local deadline = core.now() + 10
      while m:count() > 0 and core.now() < deadline do m:step(0.5) end
      for i, r in ipairs(reqs) do
        assert.same({ true }, { r:result() }, "round " .. round .. ", request " .. i)
        assert.equal("2", r:info().http_version)
        assert.matches('"content":"Echo: h' .. round .. i .. '"', r:read(), 1, true)
      end
    end
    local st = up:stats()
    assert.equal(9, st.requests)
    if core.h2c_reuse then
      assert.is_true(st.connections <= 3)
    else
      assert.equal(9, st.connections)
    end
  end)

  it("checks http_version and ca_file", function()
    local m = core.multi{}
    local url = up.tls_url .. "/chat/completions"
    assert.has_error(function() m:add{ url = url, http_version = "3" } end,
      'slm.core: option \'http_version\' must be "1.1" or "2"')
    assert.has_error(function() m:add{ url = url, http_version = 2 } end,
      'slm.core: option \'http_version\' must be "1.1" or "2"')
    assert.has_error(function() m:add{ url = url, ca_file = true } end,
      "slm.core: option 'ca_file' must be a string")
    assert.equal(0, m:count())
  end)
end)

describe("slm.client over HTTPS", function()
  it("takes ca_file, and its concurrent calls share one HTTP/2 connection", function()
    local client = slm.client{ base_url = up.tls_url, api_key = "sk-tls-secret", ca_file = up.ca_file,
      headers = { ["X-Sim-Scenario"] = "delay=300" } }
    local results, errs, nerr = slm.map({ "a", "b", "c", "d", "e" }, function(x)
      local res, err = client:chat{ messages = { { role = "user", content = x } } }
      if not res then return nil, err end
      return res.text
    end, { concurrency = 5 })
    if nerr > 0 then error("map errors: " .. tostring(select(2, next(errs)))) end
    assert.same({ "Echo: a", "Echo: b", "Echo: c", "Echo: d", "Echo: e" }, results)
    local st = up:stats()
    assert.equal(5, st.max_in_flight)
    assert.equal(1, st.connections)
  end)

  it("streams over HTTP/2, several streams on one connection, and a stream left early frees its own", function()
    local client = slm.client{ base_url = up.tls_url, api_key = "k", ca_file = up.ca_file }
    local texts = slm.map({ "one two three", "four five", "six" }, function(x)
      -- (300 ms before the first piece: all three in flight together even
      -- on a loaded machine)
      local s = client:stream{ messages = { { role = "user", content = x } }, model = "sim:delay=300,slow_chunks=20" }
      local parts = {}
      for text in s do parts[#parts + 1] = text end
      local res = assert(s:result())
      assert.equal(res.text, table.concat(parts))
      return table.concat(parts)
    end, { concurrency = 3 })
    assert.same({ "Echo: one two three", "Echo: four five", "Echo: six" }, texts)
    local st = up:stats()
    assert.equal(3, st.max_in_flight)
    assert.equal(1, st.connections)
    -- leaving a stream early cancels its transfer at once (an HTTP/2
    -- RST_STREAM: nginx's lua module does not report that as an abort, so
    -- the server's count cannot show it), and the connection lives on
    local n = 0
    for _ in client:stream{ messages = { { role = "user", content = "a b c d e f g h" } }, model = "sim:slow_chunks=50" } do
      n = n + 1
      if n == 2 then break end
    end
    assert.equal(2, n)
    assert.equal(0, require("slm.transport.sched").stats().inflight)
    local res = assert(client:chat{ messages = { { role = "user", content = "after" } } })
    assert.equal("Echo: after", res.text)
    assert.equal(1, up:stats().connections)
  end)

  it("reports an unknown certificate as a connect error without the key", function()
    local client = slm.client{ base_url = up.tls_url, api_key = "sk-tls-secret", max_retries = 0 }
    local res, err = client:chat{ messages = { { role = "user", content = "hi" } } }
    assert.is_nil(res)
    assert.equal("connect", err.kind)
    assert.matches("certificate", err.message)
    assert.is_nil(tostring(err):find("sk-tls-secret", 1, true))
    assert.equal(1, err.attempts)
  end)

  it("forces HTTP/1.1 with http_version", function()
    local client = slm.client{ base_url = up.tls_url, api_key = "k", ca_file = up.ca_file, http_version = "1.1" }
    local res = assert(client:chat{ messages = { { role = "user", content = "hi" } } })
    assert.equal("Echo: hi", res.text)
    assert.equal(1, up:stats().connections)
  end)

  it("checks the options", function()
    assert.has_error(function() slm.client{ http_version = "3" } end,
      "slm.client: option 'http_version' must be \"1.1\" or \"2\", got string")
    assert.has_error(function() slm.client{ ca_file = "" } end,
      "slm.client: option 'ca_file' must be a path string (PEM CA certificates), got string")
  end)
end)
