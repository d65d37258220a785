-- The cosocket runtime (slm.transport.ngx) inside a real nginx: an app
-- nginx running lua-slm (tests/ngx_transport_app.lua) calls the simulator
-- over cosockets; every answer is compared with what the libcurl path
-- gives for the same request from this process.
local launch = require "tests.upstream.launch"
local H = require "tests.helpers"
local cjson = require "cjson"
local core = require "slm.core"

local sim, app

local function http_get(base, path, timeout)
  local f = assert(io.popen(("env -u LD_PRELOAD curl -s --max-time %d %s"):format(timeout or 20,
    H.q(base .. path))))
  local s = f:read("a")
  f:close()
  return s
end

local function get_json(path, timeout)
  local s = http_get(app.base, path, timeout)
  local ok, v = pcall(cjson.decode, s)
  if not ok then error("not JSON from " .. path .. ": " .. s .. "\n" .. app:error_log(), 2) end
  return v
end

local function esc(s) return (s:gsub("[^%w%-_.~]", function(ch) return ("%%%02X"):format(ch:byte()) end)) end

local APP_HTTP = [[
    lua_shared_dict slm_test_notes 1m;
    init_by_lua_block {
      local app = require "ngx_transport_app"
      app.sim_url = "@SIM_URL@"
      -- the vocabulary loaded before fork: every worker shares its pages
      app.preloaded = require("slm").tokenizer("gpt-4o-mini")
      app.try("init")
    }
    init_worker_by_lua_block {
      local app = require "ngx_transport_app"
      app.try("init_worker")
      ngx.timer.at(0, function()
        local res, err = app.client("default"):chat{ messages = { { role = "user", content = "from a timer" } } }
        app.notes.timer = res and res.text or tostring(err)
      end)
    }
]]

local APP_SERVER = [[
        location = /chat { content_by_lua_block { require("ngx_transport_app").chat() } }
        location = /many { content_by_lua_block { require("ngx_transport_app").many() } }
        location = /fresh { content_by_lua_block { require("ngx_transport_app").fresh() } }
        location = /cancel { content_by_lua_block { require("ngx_transport_app").cancel() } }
        location = /cancel_other { content_by_lua_block { require("ngx_transport_app").cancel_other() } }
        location = /backpressure { content_by_lua_block { require("ngx_transport_app").backpressure() } }
        location = /abandoned { content_by_lua_block { require("ngx_transport_app").abandoned() } }
        location = /left_open { content_by_lua_block { require("ngx_transport_app").left_open() } }
        location = /v6 {
          content_by_lua_block {
            local app = require "ngx_transport_app"
            -- the simulator by an IPv6 literal: its IPv4-mapped address (the packets go to 127.0.0.1)
            app.chat{ base_url = app.sim_url:gsub("^http://127%.0%.0%.1:", "http://[::ffff:127.0.0.1]:") }
          }
        }
        location = /core { content_by_lua_block { require("ngx_transport_app").core_state() } }
        location = /access {
          access_by_lua_block { require("ngx_transport_app").try("access") }
          content_by_lua_block { ngx.say(require("ngx_transport_app").notes.access) }
        }
        location = /rewrite {
          rewrite_by_lua_block { require("ngx_transport_app").try("rewrite") }
          content_by_lua_block { ngx.say(require("ngx_transport_app").notes.rewrite) }
        }
        location = /header_filter {
          content_by_lua_block { ngx.say("body") }
          header_filter_by_lua_block {
            local ok, err = require("ngx_transport_app").try("header_filter")
            ngx.header["X-Slm-Error"] = ngx.escape_uri(tostring(err))
          }
        }
        location = /body_filter {
          content_by_lua_block { ngx.say("body") }
          body_filter_by_lua_block { require("ngx_transport_app").try("body_filter") }
        }
        location = /log {
          content_by_lua_block { ngx.say("body") }
          log_by_lua_block { require("ngx_transport_app").try("log") }
        }
        location = /set {
          set_by_lua_block $slm_set {
            local ok, err = require("ngx_transport_app").try("set")
            return "done"
          }
          content_by_lua_block { ngx.say(ngx.var.slm_set) }
        }
]]

setup(function()
  sim = launch.start{ quiet = true }
  app = launch.start{ quiet = true, app = { http = APP_HTTP:gsub("@SIM_URL@", sim.url), server = APP_SERVER } }
end)
teardown(function()
  if app then app:stop() end
  if sim then sim:stop() end
end)
before_each(function() sim:reset() end)

local function curl_fields(query)
  -- the same call as tests/ngx_transport_app.lua's chat(), through libcurl
  local app_mod = dofile("tests/ngx_transport_app.lua")
  local o = app_mod.client_options(query)
  o.max_retries = 0
  local res, err = H.sim_client(sim, o):chat(app_mod.request(query))
  return cjson.decode(cjson.encode(app_mod.fields(res, err)))
end

local function ngx_fields(query)
  local parts = {}
  for k, v in pairs(query) do parts[#parts + 1] = k .. "=" .. esc(tostring(v)) end
  table.sort(parts)
  return get_json("/chat?" .. table.concat(parts, "&"))
end

-- ids, request ids and tool call ids differ per request: compare their
-- shape, then the rest; a transport's own failure message is its own
-- (libcurl's words or ours), its kind must be the same
local function same_fields(query)
  local a, b = curl_fields(query), ngx_fields(query)
  for _, t in ipairs{ a, b } do
    if t.id then t.id = t.id:match("^chatcmpl%-") and "chatcmpl-*" or t.id end
    if t.request_id then t.request_id = #t.request_id > 0 and "req-*" or t.request_id end
    for _, tc in ipairs(t.tool_calls or {}) do tc.id = tc.id:match("^call_") and "call_*" or tc.id end
    if t.error and t.error.status == 0 then t.error.message = nil end
    if t.error and t.error.message then t.error.message = t.error.message:gsub("chatcmpl%-sim%-%d+", "chatcmpl-*") end
  end
  assert.same(a, b)
  return b
end

describe("slm.transport.ngx inside nginx", function()
  it("gives a plain chat the same Response fields as the libcurl path", function()
    local r = same_fields{ prompt = "hello there" }
    assert.equal("Echo: hello there", r.text)
    assert.equal("stop", r.finish_reason)
    assert.is_number(r.cost)
    assert.is_true(r.usage.total_tokens > 0)
    assert.equal("req-*", r.request_id)
  end)

  it("gives a streamed chat the same Response fields as the libcurl path", function()
    local r = same_fields{ prompt = "stream this please", stream = 1 }
    assert.equal("Echo: stream this please", r.text)
    same_fields{ prompt = "byte by byte", stream = 1, scenario = "bytewise" }
    same_fields{ prompt = "crlf lines", stream = 1, scenario = "crlf" }
  end)

  it("gives tool calls, plain and streamed, as the libcurl path does", function()
    local r = same_fields{ prompt = "weather in Paris", tools = 1 }
    assert.equal(1, #r.tool_calls)
    same_fields{ prompt = "weather in Paris", tools = 1, stream = 1, scenario = "tools_parallel" }
  end)

  it("maps provider errors to the same err.kind and status", function()
    for _, sc in ipairs{ "status=429", "status=500", "status=401", "status=400", "status=404",
        "code=context_length_exceeded,status=400" } do
      local r = same_fields{ prompt = "err " .. sc, scenario = sc }
      assert.is_table(r.error, sc)
      r = same_fields{ prompt = "err " .. sc, scenario = sc, stream = 1 }
      assert.is_table(r.error, sc)
    end
  end)

  it("maps resets, closed connections and malformed replies to the same err.kind", function()
    for _, q in ipairs{
      { scenario = "close" }, { scenario = "malformed" }, { scenario = "empty" }, { scenario = "html" },
      { scenario = "wrong_shape" }, { scenario = "reset", stream = 1 }, { scenario = "eof_mid", stream = 1 },
      { scenario = "error_chunk", stream = 1 }, { scenario = "close", stream = 1 },
    } do
      q.prompt = "broken " .. q.scenario
      local r = same_fields(q)
      assert.is_table(r.error, q.scenario)
    end
  end)

  -- each query fails the same way on both paths, with this kind
  local function same_kind(kind, queries)
    local last
    for _, q in ipairs(queries) do
      last = same_fields(q)
      assert.equal(kind, last.error and last.error.kind, q.prompt)
    end
    return last
  end

  it("maps timeouts to kind timeout, as libcurl does", function()
    local r = same_kind("timeout", {
      { prompt = "slow", scenario = "delay=1500", timeout = 0.5 },
      { prompt = "slow stream", scenario = "delay=1500", timeout = 0.5, stream = 1 },
      { prompt = "slow body", scenario = "body_delay=1500", timeout = 0.5 },
      -- a stream that stalls longer than stall_timeout
      { prompt = "a stream that stalls", scenario = "stall=1500", stream = 1, stall_timeout = 0.4 },
    })
    assert.matches("^Echo", r.error.partial_text)
  end)

  it("refuses a reply above max_body with kind protocol, as libcurl does", function()
    same_kind("protocol", {
      { prompt = "big", scenario = "big=200000", max_body = 50000 },
      { prompt = "big stream", scenario = "big=200000", stream = 1, max_body = 50000 },
    })
    same_fields{ prompt = "small enough", max_body = 50000 }
  end)

  it("serves http_version = \"2\" over HTTP/1.1 inside nginx", function()
    local r = ngx_fields{ prompt = "over one point one", http_version = "2" }
    assert.equal("Echo: over one point one", r.text)
  end)

  it("connects to an IPv6 literal base_url ([::ffff:127.0.0.1]), the brackets kept in the Host header", function()
    local r = get_json("/v6?prompt=over%20v6&client=v6")
    assert.equal("Echo: over v6", r.text, cjson.encode(r))
    r = get_json("/v6?prompt=over%20v6%20stream&client=v6&stream=1")
    assert.equal("Echo: over v6 stream", r.text, cjson.encode(r))
    assert.matches("^%[::ffff:127%.0%.0%.1%]:%d+$", H.last(sim).headers.host)
  end)

  it("keeps connections alive: sequential calls reuse one connection", function()
    for i = 1, 5 do ngx_fields{ prompt = "keepalive " .. i } end
    for i = 1, 3 do ngx_fields{ prompt = "keepalive stream " .. i, stream = 1 } end
    local st = sim:stats()
    assert.equal(8, st.requests)
    assert.equal(1, st.connections)
  end)

  it("does not pool a connection whose body was not read in full", function()
    ngx_fields{ prompt = "reset", scenario = "reset", stream = 1 }
    ngx_fields{ prompt = "after the reset" }
    ngx_fields{ prompt = "after the reset again" }
    local st = sim:stats()
    assert.equal(3, st.requests)
    assert.equal(2, st.connections)
  end)

  it("retries on a new connection, not another pooled one, after a kept-alive one died (fresh_connect)", function()
    local r = get_json("/fresh")
    assert.equal("Echo: on a fresh one", r.text, cjson.encode(r))
    -- the first attempt went out on a pooled connection and was lost; the
    -- retry passed over the other pooled ones (each would lose it too)
    assert.equal(2, r.attempts)
  end)

  it("runs 100 requests at once in one worker, which keeps answering meanwhile", function()
    local p = assert(io.popen(("env -u LD_PRELOAD curl -s --max-time 30 %s"):format(H.q(app.base
      .. "/many?n=100&scenario=" .. esc("delay=6000")))))
    -- wait until the simulator holds all 100 (it cannot answer before 6 s)
    local st
    for _ = 1, 200 do
      st = sim:stats()
      if st.in_flight == 100 then break end
      os.execute("sleep 0.02")
    end
    assert.equal(100, st.in_flight)
    -- the same (only) worker answers while all 100 are in flight
    assert.equal("ok\n", http_get(app.base, "/__health", 2))
    assert.equal(100, sim:stats().in_flight)
    local r = cjson.decode(p:read("a"))
    p:close()
    assert.equal(100, r.ok, r.first_error)
    for i = 1, 100 do assert.equal("Echo: many " .. i, r.texts[i]) end
    assert.equal(100, sim:stats().max_in_flight)
  end)

  it("wakes a reader blocked in a stream when another light thread closes it", function()
    local r = get_json("/cancel")
    assert.is_true(r.ok)
    assert.equal("cancelled", r.kind)
    assert.is_true(r.seconds < 3, "woke at once, not after the 5 s stall")
    assert.is_string(r.partial)
    -- the simulator saw the connection go away
    local st = H.wait_idle(sim, function() os.execute("sleep 0.05") end, 3)
    assert.equal(0, st.in_flight)
  end)

  it("closes the upstream connection at once when a stream opened in another light thread is closed", function()
    local t0 = core.now()
    local r = get_json("/cancel_other")
    -- the request ends when its last light thread does: the exchange's, at once, not after the 5 s stall
    local secs = core.now() - t0
    assert.is_true(r.ok, cjson.encode(r))
    assert.equal("cancelled", r.kind)
    assert.is_true(r.seconds < 2, "the reader woke after " .. r.seconds .. " s")
    assert.is_true(secs < 2, "the request took " .. secs .. " s")
    local st = H.wait_idle(sim, function() os.execute("sleep 0.02") end, 0.5)
    assert.equal(0, st.in_flight)
    assert.equal(1, st.aborted)
  end)

  it("reads only a bounded amount ahead of a slow consumer, then the whole reply", function()
    local r = get_json("/backpressure")
    assert.equal(200, r.status, cjson.encode(r))
    assert.is_true(r.ok, cjson.encode(r))
    assert.is_true(r.total > 2e6, r.total) -- megabytes of events
    assert.equal(r.received, r.total)
    -- read_ahead (128 KiB) and at most one read (64 KiB) beyond it, never the megabytes
    for i = 1, 3 do assert.is_true(r.ahead[i] <= 196608, "read ahead: " .. r.ahead[i]) end
  end)

  it("ends a reply that nobody reads at the call's deadline, not waiting for its consumer for good", function()
    local r = get_json("/abandoned")
    assert.equal(200, r.status, cjson.encode(r))
    assert.equal("timeout", r.kind, cjson.encode(r))
    assert.is_true(r.seconds < 5, "ended after " .. r.seconds .. " s")
  end)

  it("a stream left open keeps its slot: the next call times out within its timeout, not for ever", function()
    local r = get_json("/left_open")
    assert.is_string(r.first, cjson.encode(r))
    assert.is_false(r.sent, cjson.encode(r))
    assert.equal("timeout", r.kind)
    assert.matches("concurrency slot: none free within", r.message)
    assert.is_true(r.seconds >= 0.9 and r.seconds < 3, tostring(r.seconds))
    assert.equal("Echo: after close", r.again)
  end)

  it("never initialises libcurl in a worker that counted tokens and made calls", function()
    ngx_fields{ prompt = "one call first" }
    local r = get_json("/core")
    assert.is_false(r.http_initialized)
    assert.equal("ngx", r.runtime)
    assert.is_true(r.tokens > 0)
    assert.is_true(r.memory > 1000000, "the o200k vocabulary takes megabytes")
    assert.is_true(r.preloaded, "the worker uses the vocabulary init_by_lua loaded before fork")
  end)

  it("makes calls from a timer started in init_worker_by_lua", function()
    local r = get_json("/core")
    assert.equal("Echo: from a timer", r.notes.timer)
  end)

  it("works in rewrite and access phases", function()
    assert.equal("no error\n", http_get(app.base, "/access"))
    assert.equal("no error\n", http_get(app.base, "/rewrite"))
  end)

  it("raises a clear error in phases without cosockets, naming the phase and where it works", function()
    local r = get_json("/core")
    for _, phase in ipairs{ "init", "init_worker" } do
      assert.matches("cannot run in " .. phase .. "_by_lua", r.notes[phase], 1, true)
      assert.matches("content_by_lua", r.notes[phase], 1, true)
    end
    local f = assert(io.popen("env -u LD_PRELOAD curl -s -D - --max-time 5 " .. H.q(app.base .. "/header_filter")))
    local head = f:read("a")
    f:close()
    assert.matches("cannot%%20run%%20in%%20header_filter_by_lua", head)
    http_get(app.base, "/body_filter")
    http_get(app.base, "/log")
    assert.equal("done\n", http_get(app.base, "/set"))
    r = get_json("/core")
    assert.matches("cannot run in body_filter_by_lua", r.notes.body_filter, 1, true)
    assert.matches("cannot run in log_by_lua", r.notes.log, 1, true)
    assert.matches("cannot run in set_by_lua", r.notes.set, 1, true)
    assert.equal(0, sim:stats().requests)
    assert.is_nil(app:error_log():find("sk-test-good", 1, true))
  end)
end)

describe("slm.transport.ngx over TLS", function()
  local tsim, good, wrong, dir, bundle, echo_port

  local function sh(cmd)
    local f = assert(io.popen(cmd .. " 2>&1"))
    local out = f:read("a")
    local ok = f:close()
    assert(ok, cmd .. ": " .. out)
    return out
  end

  -- an HTTPS server of our own: a certificate for "localhost" and a chat
  -- completion whose text is the server name (SNI) the client sent
  local ECHO = [[
    server {
      listen 127.0.0.1:@ECHO_PORT@ ssl;
      ssl_certificate @DIR@/localhost.pem;
      ssl_certificate_key @DIR@/localhost.key;
      location / {
        content_by_lua_block {
          ngx.req.read_body()
          ngx.header["Content-Type"] = "application/json"
          ngx.header["X-Request-Id"] = "req-echo"
          ngx.say(require("cjson").encode{ id = "chatcmpl-echo", object = "chat.completion", model = "gpt-4o-mini",
            choices = { { index = 0, message = { role = "assistant", content = "sni=" .. (ngx.var.ssl_server_name or "") },
              finish_reason = "stop" } }, usage = { prompt_tokens = 3, completion_tokens = 2, total_tokens = 5 } })
        }
      }
    }
  ]]

  local function tls_app(trusted, declared, echo)
    local http = ([[
      lua_ssl_trusted_certificate %s;
      lua_ssl_verify_depth 2;
      init_by_lua_block {
        local app = require "ngx_transport_app"
        app.sim_url = "%s"
        require("slm.transport.ngx").configure{ trusted_certificate = %s,
          resolve = { localhost = "127.0.0.1" } }
      }
    ]]):format(trusted, tsim.tls_url, declared and ("%q"):format(declared) or "false")
      .. (echo and ECHO:gsub("@ECHO_PORT@", tostring(echo_port)):gsub("@DIR@", dir) or "")
    return launch.start{ quiet = true, app = { http = http, server = ([[
        location = /chat { content_by_lua_block { require("ngx_transport_app").chat() } }
        location = /chat_ca {
          content_by_lua_block { require("ngx_transport_app").chat{ ca_file = ngx.unescape_uri(ngx.var.arg_ca) } }
        }
        location = /echo {
          content_by_lua_block {
            require("ngx_transport_app").chat{ base_url = "https://" .. ngx.var.arg_host .. ":@ECHO_PORT@/v1" }
          }
        }
    ]]):gsub("@ECHO_PORT@", tostring(echo_port)) } }
  end

  setup(function()
    tsim = launch.start{ quiet = true, tls = true }
    dir = sh("mktemp -d"):match("^[^\n]+")
    sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout %s/localhost.key"
      .. " -out %s/localhost.pem -days 2 -subj /CN=localhost -addext subjectAltName=DNS:localhost"):format(dir, dir))
    sh(("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout %s/other.key"
      .. " -out %s/other.pem -days 2 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1"):format(dir, dir))
    bundle = dir .. "/bundle.pem"
    sh(("cat %s %s/localhost.pem > %s"):format(H.q(tsim.ca_file), dir, bundle))
    -- the echo server's port is fixed in the config: when another run took
    -- it (busted seeds math.random with the time, so runs started in the
    -- same second pick the same number), try another
    for _ = 1, 20 do
      echo_port = 46000 + (math.random(0, 6000) + tonumber(tostring({}):match("0x(%x+)") or "0", 16)) % 6000
      local ok, app = pcall(tls_app, bundle, bundle, true)
      if ok then good = app; break end
      if not tostring(app):find("Address already in use", 1, true) then error(app, 0) end
    end
    assert(good, "no free port for the TLS echo server")
    wrong = tls_app(dir .. "/other.pem", nil)
  end)
  teardown(function()
    if good then good:stop() end
    if wrong then wrong:stop() end
    if tsim then tsim:stop() end
    if dir then os.execute("rm -rf " .. H.q(dir)) end
  end)
  before_each(function() tsim:reset() end)

  local function call(inst, path)
    local s = http_get(inst.base, path)
    local ok, v = pcall(cjson.decode, s)
    assert(ok, "not JSON from " .. path .. ": " .. s .. "\n" .. inst:error_log())
    return v
  end

  it("passes with the right CA, with the same Response as libcurl with ca_file", function()
    local r = call(good, "/chat?prompt=secure")
    assert.equal("Echo: secure", r.text, cjson.encode(r))
    local c = H.sim_client(tsim, { base_url = tsim.tls_url, ca_file = tsim.ca_file, max_retries = 0 })
    local res = assert(c:chat{ messages = H.msgs("secure") })
    assert.equal(res.text, r.text)
    assert.same(res.usage, r.usage)
    assert.equal(res.cost, r.cost)
  end)

  it("keeps TLS connections alive: one handshake for several calls", function()
    for i = 1, 4 do assert.equal("Echo: again " .. i, call(good, "/chat?prompt=again%20" .. i).text) end
    assert.equal(1, tsim:stats().connections)
  end)

  it("fails with kind connect, nothing sent, when nginx does not trust the server's CA", function()
    local r = call(wrong, "/chat?prompt=insecure")
    assert.equal("connect", r.error.kind, cjson.encode(r))
    assert.matches("TLS handshake", r.error.message)
    assert.equal(0, tsim:stats().requests)
  end)

  it("sends the host name as SNI and checks the certificate against it", function()
    assert.equal("sni=localhost", call(good, "/echo?host=localhost&client=echo_name").text)
    -- the same server by IP: its certificate names localhost only
    local r = call(good, "/echo?host=127.0.0.1&client=echo_ip")
    assert.equal("connect", r.error.kind, cjson.encode(r))
  end)

  it("takes a ca_file that is the trusted file, refuses any other before sending", function()
    assert.equal("Echo: with ca", call(good, "/chat_ca?prompt=with%20ca&client=ca_ok&ca=" .. esc(bundle)).text)
    local r = call(good, "/chat_ca?prompt=other%20ca&client=ca_bad&ca=" .. esc(dir .. "/other.pem"))
    assert.equal("connect", r.error.kind)
    assert.matches("lua_ssl_trusted_certificate", r.error.message)
    -- not declared at all: refused too, never silently ignored
    r = call(wrong, "/chat_ca?prompt=undeclared&client=ca_undeclared&ca=" .. esc(dir .. "/other.pem"))
    assert.equal("connect", r.error.kind)
    assert.matches("configure", r.error.message)
    assert.equal(1, tsim:stats().requests)
  end)
end)
