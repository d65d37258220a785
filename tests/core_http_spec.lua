-- slm.core's libcurl multi driver, against the real nginx simulator.
local core = require "slm.core"
local json = require "cjson"
local H = require "tests.helpers"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

local function body(extra)
  local b = { model = "gpt-4o-mini", messages = { { role = "user", content = "ping" } } }
  for k, v in pairs(extra or {}) do b[k] = v end
  return json.encode(b)
end

local function add(m, opts)
  opts = opts or {}
  local hdrs = { "Content-Type: application/json" }
  for _, h in ipairs(opts.headers or {}) do hdrs[#hdrs + 1] = h end
  return m:add{
    url = opts.url or (up.url .. "/chat/completions"), body = opts.body or body(),
    headers = hdrs, timeout = opts.timeout, idle_timeout = opts.idle_timeout,
    first_byte_timeout = opts.first_byte_timeout, connect_timeout = opts.connect_timeout,
    fresh_connect = opts.fresh_connect,
  }
end

-- A request whose reply names it: "Echo: <text>".
local function echo(m, text, scenario)
  return add(m, { body = body{ messages = { { role = "user", content = text } } },
    headers = scenario and { "X-Sim-Scenario: " .. scenario } or nil })
end

local function reply_text(b)
  return json.decode(b).choices[1].message.content
end

-- The event backend this build of slm.core should have: what the runner
-- says (SLM_EXPECT_EVENTS), else poll when the build tree it was loaded
-- from was configured with -DSLM_EVENTS=poll, else epoll on Linux.
local function expected_events()
  local want = os.getenv("SLM_EXPECT_EVENTS")
  if want then return want end
  local so = package.searchpath("slm.core", package.cpath)
  local dir = so and so:match("^(.*)/slm/core%.so$")
  local f = dir and io.open(dir .. "/CMakeCache.txt", "rb")
  if f then
    local cache = f:read("a")
    f:close()
    if cache:match("\nSLM_EVENTS:STRING=poll\n") then return "poll" end
  end
  f = io.open("/proc/sys/kernel/ostype", "rb")
  local os_name = f and f:read("l")
  if f then f:close() end
  return os_name == "Linux" and "epoll" or "poll"
end


local function drain(m, reqs, limit)
  local deadline = core.now() + (limit or 10)
  local bodies = {}
  while core.now() < deadline do
    local all = true
    for i, r in ipairs(reqs) do
      local b = r:read()
      if b then bodies[i] = (bodies[i] or "") .. b end
      if not r:done() then all = false end
    end
    if all then break end
    m:step(0.05)
  end
  for i, r in ipairs(reqs) do
    local b = r:read()
    if b then bodies[i] = (bodies[i] or "") .. b end
  end
  return bodies
end

describe("slm.core multi", function()
  it("makes a request and returns status, headers and body", function()
    local m = core.multi()
    local r = add(m)
    local b = drain(m, { r })[1]
    assert.is_true(r:result())
    assert.are.equal(200, r:status())
    assert.matches("application/json", r:headers()["content-type"])
    assert.are.equal("Echo: ping", json.decode(b).choices[1].message.content)
    m:close()
  end)

  it("reports every request with activity from step()", function()
    local m = core.multi()
    local r = add(m)
    local seen = false
    local deadline = core.now() + 5
    while not r:done() and core.now() < deadline do
      for _, x in ipairs(m:step(0.1)) do if x == r then seen = true end end
    end
    assert.is_true(seen)
  end)

  it("step() returns as soon as a request finishes, not at its timeout", function()
    local m = core.multi()
    local r = add(m)
    local t0 = core.now()
    local steps = 0
    while not r:done() do m:step(30); steps = steps + 1 end
    -- the regression this guards: a request finished inside
    -- curl_multi_perform left step() sleeping for its whole timeout
    assert.is_true(core.now() - t0 < 10)
    assert.is_true(steps <= 5)
    assert.is_true(r:result())
  end)

  it("keeps many requests in flight on one multi handle", function()
    local m = core.multi()
    local reqs = {}
    for i = 1, 12 do reqs[i] = add(m, { headers = { "X-Sim-Scenario: delay=300" } }) end
    assert.are.equal(12, m:count())
    local bodies = drain(m, reqs)
    for i = 1, 12 do
      assert.is_true(reqs[i]:result())
      assert.are.equal("Echo: ping", json.decode(bodies[i]).choices[1].message.content)
    end
    assert.are.equal(12, up:stats().max_in_flight)
    assert.are.equal(0, m:count())
  end)

  it("reuses connections (keep-alive)", function()
    local m = core.multi()
    local r1 = add(m); drain(m, { r1 })
    local r2 = add(m); drain(m, { r2 })
    assert.are.equal(1, r1:info().new_connections)
    assert.are.equal(0, r2:info().new_connections)
  end)

  it("a reused easy handle carries nothing over from its previous request", function()
    -- finished requests give their libcurl handle back to the multi, which
    -- resets it for the next add: options set for one request (timeout,
    -- method, headers) must not leak into the next one
    local m = core.multi()
    local r1 = m:add{ url = up.url .. "/chat/completions", method = "PUT", timeout = 2,
      headers = { "Content-Type: application/json", "X-Leak: yes", "X-Sim-Scenario: delay=50" }, body = body() }
    drain(m, { r1 })
    assert.is_true(r1:result())
    assert.are.equal(405, r1:status()) -- the simulator answers only POST
    local r2 = m:add{ url = up.url .. "/chat/completions",
      headers = { "Content-Type: application/json", "X-Sim-Scenario: delay=2300" }, body = body() }
    local b = drain(m, { r2 })[1]
    assert.is_true(r2:result()) -- no 2 s timeout left over
    assert.are.equal(200, r2:status())
    assert.are.equal("Echo: ping", json.decode(b).choices[1].message.content)
    local last = H.last(up)
    assert.are.equal("POST", last.method)
    assert.is_nil(last.headers["x-leak"])
    -- libcurl's figures outlive the handle
    local info = r1:info()
    assert.is_number(info.total_time)
    assert.are.equal("1.1", info.http_version)
    assert.are.equal("127.0.0.1", info.ip)
    m:close()
    assert.is_true(r2:info().total_time >= 0.7)
  end)

  it("step(0) does not wait and reports requests finished since the last step", function()
    local m = core.multi()
    local reqs = {}
    for i = 1, 5 do reqs[i] = add(m, { headers = { "X-Sim-Scenario: delay=" .. (100 * i) } }) end
    local seen, order = {}, {}
    local deadline = core.now() + 10
    while #order < 5 and core.now() < deadline do
      for _, r in ipairs(m:step(0)) do
        if r:done() and not seen[r] then seen[r] = true; order[#order + 1] = r end
      end
    end
    assert.are.equal(5, #order)
    for i = 1, 5 do assert.are.equal(reqs[i], order[i]) end
    -- nothing left: an empty report, at once
    assert.are.same({}, m:step(0))
  end)

  it("sends no Expect header and sends the body intact", function()
    local m = core.multi()
    local big = string.rep("x", 200000)
    local r = add(m, { body = body{ messages = { { role = "user", content = big } } } })
    drain(m, { r })
    assert.is_true(r:result())
    local last = H.last(up)
    assert.is_nil(last.headers.expect)
    assert.are.equal(big, last.body.messages[1].content)
  end)

  it("reports a refused connection as kind 'connect'", function()
    local m = core.multi()
    local r = add(m, { url = "http://127.0.0.1:1/v1/chat/completions" })
    drain(m, { r })
    local ok, kind, msg = r:result()
    assert.is_nil(ok)
    assert.are.equal("connect", kind)
    assert.matches("onnect", msg)
    assert.are.equal(0, r:status())
  end)

  it("enforces the total timeout", function()
    local m = core.multi()
    local r = add(m, { timeout = 0.3, headers = { "X-Sim-Scenario: delay=3000" } })
    local t0 = core.now()
    drain(m, { r })
    local ok, kind = r:result()
    assert.is_nil(ok); assert.are.equal("timeout", kind)
    assert.is_true(core.now() - t0 < 2.5)
  end)

  it("enforces the first-byte and idle timeouts", function()
    local m = core.multi()
    local r1 = add(m, { first_byte_timeout = 0.3, headers = { "X-Sim-Scenario: delay=3000" } })
    local r2 = add(m, { idle_timeout = 0.3,
      body = body{ stream = true }, headers = { "X-Sim-Scenario: stall=3000" } })
    drain(m, { r1, r2 })
    local ok1, k1, m1 = r1:result()
    local ok2, k2, m2 = r2:result()
    assert.is_nil(ok1); assert.are.equal("timeout", k1); assert.matches("first byte", m1)
    assert.is_nil(ok2); assert.are.equal("timeout", k2); assert.matches("stalled", m2)
  end)

  it("cancels a request: the server sees the client go away", function()
    local m = core.multi()
    local r = add(m, { headers = { "X-Sim-Scenario: delay=3000" } })
    local deadline = core.now() + 3
    while up:stats().in_flight < 1 and core.now() < deadline do m:step(0.05) end
    r:cancel()
    r:cancel() -- idempotent
    local ok, kind = r:result()
    assert.is_nil(ok); assert.are.equal("cancelled", kind)
    H.wait_idle(up, function() m:step(0.05) end)
    assert.are.equal(0, up:stats().in_flight)
    assert.are.equal(0, m:count())
  end)

  it("cancels a request that is garbage-collected while in flight", function()
    local m = core.multi()
    do add(m, { headers = { "X-Sim-Scenario: delay=3000" } }) end
    local deadline = core.now() + 3
    while up:stats().in_flight < 1 and core.now() < deadline do m:step(0.05) end
    assert.are.equal(1, m:count())
    collectgarbage(); collectgarbage()
    assert.are.equal(0, m:count())
    H.wait_idle(up, function() m:step(0.05) end)
    assert.are.equal(0, up:stats().in_flight)
  end)

  it("closing the multi cancels what is in flight; close is idempotent", function()
    local m = core.multi()
    local r = add(m, { headers = { "X-Sim-Scenario: delay=3000" } })
    m:close(); m:close()
    local ok, kind = r:result()
    assert.is_nil(ok); assert.are.equal("cancelled", kind)
    assert.has_error(function() m:step(0) end)
    r:close(); r:close()
  end)

  it("rejects wrong options at once", function()
    local m = core.multi()
    assert.has_error(function() m:add{ url = 42 } end, "slm.core: option 'url' must be a string")
    assert.has_error(function() m:add{ url = "http://x", timeout = "1" } end,
      "slm.core: option 'timeout' must be a number")
    assert.has_error(function() m:add{ url = "http://x", headers = { "A: b\r\nEvil: 1" } } end)
    assert.has_error(function() m:add("x") end)
  end)

  it("names the socket event backend compiled in", function()
    assert.are.equal(expected_events(), core.events)
  end)

  it("keeps a few hundred requests in flight at once, each with its own reply", function()
    -- more sockets than one batch of events: replies that arrive together
    -- take several rounds of the event loop, each must reach its request
    local m = core.multi()
    local n, reqs = 300, {}
    for i = 1, n do reqs[i] = echo(m, "many " .. i, "delay=2500") end
    assert.are.equal(n, m:count())
    local bodies = drain(m, reqs, 60)
    for i = 1, n do
      assert.is_true(reqs[i]:result())
      assert.are.equal("Echo: many " .. i, reply_text(bodies[i]))
    end
    assert.are.equal(n, up:stats().max_in_flight)
    assert.are.equal(0, m:count())
    m:close()
  end)

  it("reuses connections round after round: libcurl stops and starts watching their sockets", function()
    -- libcurl stops watching a finished request's connection (the epoll
    -- backend keeps the socket in its set, marked unwanted); a later request
    -- on it must be watched again, whether driven by step(0) or step(t)
    local m = core.multi{ max_connections = 200 }
    local function round(n, tag, busy)
      local reqs = {}
      for i = 1, n do reqs[i] = echo(m, tag .. i, "delay=200") end
      local bodies, new = {}, 0
      if busy then
        local deadline = core.now() + 10
        local left = n
        while left > 0 and core.now() < deadline do
          for _, r in ipairs(m:step(0)) do if r:done() then left = left - 1 end end
        end
        for i = 1, n do bodies[i] = reqs[i]:read() end
      else
        bodies = drain(m, reqs)
      end
      for i = 1, n do
        assert.is_true(reqs[i]:result())
        assert.are.equal("Echo: " .. tag .. i, reply_text(bodies[i]))
        new = new + reqs[i]:info().new_connections
      end
      return new
    end
    assert.are.equal(20, round(20, "a"))
    assert.are.equal(0, round(20, "b", true))
    assert.are.equal(20, round(40, "c")) -- 20 reused, 20 new
    assert.are.equal(0, round(40, "d", true))
    assert.are.equal(0, m:count())
    m:close()
  end)

  it("runs more requests on a multi after some were cancelled in flight", function()
    -- a cancelled transfer's socket is closed and leaves the set; the new
    -- requests' sockets get the same descriptor numbers again
    local m = core.multi()
    local slow = {}
    for i = 1, 10 do slow[i] = echo(m, "slow " .. i, "delay=1500") end
    local deadline = core.now() + 5
    while up:stats().in_flight < 10 and core.now() < deadline do m:step(0.05) end
    assert.are.equal(10, up:stats().in_flight)
    for i = 1, 10, 2 do slow[i]:cancel() end
    assert.are.equal(5, m:count())
    local fast = {}
    for i = 1, 10 do fast[i] = echo(m, "fast " .. i, "delay=50") end
    local fb = drain(m, fast)
    for i = 1, 10 do
      assert.is_true(fast[i]:result())
      assert.are.equal("Echo: fast " .. i, reply_text(fb[i]))
    end
    local kept = {}
    for i = 2, 10, 2 do kept[#kept + 1] = slow[i] end
    local sb = drain(m, kept)
    for k, r in ipairs(kept) do
      assert.is_true(r:result())
      assert.are.equal("Echo: slow " .. (2 * k), reply_text(sb[k]))
    end
    for i = 1, 10, 2 do
      local ok, kind = slow[i]:result()
      assert.is_nil(ok)
      assert.are.equal("cancelled", kind)
    end
    assert.are.equal(0, m:count())
    m:close()
  end)

  it("an idle multi: step(0) returns at once, step(t) sleeps", function()
    local m = core.multi()
    local t0 = core.now()
    assert.are.same({}, m:step(0))
    assert.is_true(core.now() - t0 < 0.1)
    t0 = core.now()
    assert.are.same({}, m:step(0.2))
    local dt = core.now() - t0
    assert.is_true(dt >= 0.19 and dt < 1.5, "slept " .. dt .. " s")
    -- and again once a request has come and gone
    local r = add(m)
    drain(m, { r })
    assert.is_true(r:result())
    t0 = core.now()
    assert.are.same({}, m:step(0.2))
    dt = core.now() - t0
    assert.is_true(dt >= 0.19 and dt < 1.5, "slept " .. dt .. " s")
    m:close()
  end)

  it("an idle connection the server closes: no busy loop, and the next request reconnects", function()
    -- the epoll backend keeps a finished request's socket in its set while
    -- libcurl keeps the connection for reuse; when the server closes it the
    -- socket turns readable for good, and a step that kept reporting it
    -- would never sleep again
    local m = core.multi()
    local url = up.url:gsub("/v1$", "/short-keepalive/v1") .. "/chat/completions"
    local r = add(m, { url = url })
    drain(m, { r })
    assert.is_true(r:result())
    assert.are.equal(1, r:info().new_connections)
    -- nginx closes it after 300 ms (1.5 s leaves room for a loaded
    -- machine); then every step(t) must really wait
    local t0 = core.now()
    while core.now() - t0 < 1.5 do m:step(0.1) end
    local waits = {}
    for i = 1, 3 do
      local t1 = core.now()
      assert.are.same({}, m:step(0.15))
      waits[i] = core.now() - t1
    end
    for i = 1, 3 do assert.is_true(waits[i] >= 0.14, "step(0.15) returned after " .. waits[i] .. " s") end
    -- the closed connection is not reused: a new one is made
    local r2 = add(m, { url = url, body = body{ messages = { { role = "user", content = "again" } } } })
    local b = drain(m, { r2 })
    assert.is_true(r2:result())
    assert.are.equal("Echo: again", reply_text(b[1]))
    assert.are.equal(1, r2:info().new_connections)
    m:close()
  end)

  it("never lets libcurl send a request twice by itself: kind 'reused', then fresh_connect", function()
    if not core.resend_guard then
      pending("libcurl before 7.80 re-sends a request on a dead reused connection by itself")
      return
    end
    -- the simulator drops every request that comes on a reused connection
    -- after reading it; libcurl used to send it again on the next pooled
    -- connection, and the next (6 POSTs for one request, then failed)
    local m = core.multi()
    local url = up.base .. "/reset-reused/v1/chat/completions"
    local warm = {}
    for i = 1, 6 do warm[i] = add(m, { url = url, headers = { "X-Sim-Scenario: delay=200" } }) end
    drain(m, warm)
    for i = 1, 6 do
      assert.is_true(warm[i]:result())
      assert.are.equal(1, warm[i]:info().new_connections)
    end
    up:reset()
    local r = add(m, { url = url, body = body{ messages = { { role = "user", content = "once" } } } })
    drain(m, { r })
    local ok, kind, msg, code = r:result()
    assert.are.equal(1, up:stats().requests, "POSTs the server saw")
    assert.are.equal("once", H.last(up).body.messages[1].content)
    assert.is_nil(ok)
    assert.are.equal("reused", kind)
    assert.are.equal("the reused connection closed before replying; libcurl's re-send was stopped", msg)
    assert.are.equal(42, code) -- CURLE_ABORTED_BY_CALLBACK
    assert.are.equal(0, r:status())
    -- the caller's own retry, on a connection of its own
    up:reset()
    local r2 = add(m, { url = url, fresh_connect = true, body = body{ messages = { { role = "user", content = "once" } } } })
    local b = drain(m, { r2 })
    assert.is_true(r2:result())
    assert.are.equal("Echo: once", reply_text(b[1]))
    assert.are.equal(1, r2:info().new_connections)
    assert.are.equal(1, up:stats().requests)
    -- a connection that dies on its first request is "broken", as before:
    -- libcurl re-sends only on reused connections
    up:reset()
    local r3 = add(m, { fresh_connect = true, headers = { "X-Sim-Scenario: close" } })
    drain(m, { r3 })
    local ok3, kind3 = r3:result()
    assert.is_nil(ok3)
    assert.are.equal("broken", kind3)
    assert.are.equal(1, up:stats().requests)
    assert.has_error(function() add(m, { fresh_connect = "yes" }) end, "slm.core: option 'fresh_connect' must be a boolean")
    m:close()
  end)

  it("gives back its descriptors when closed or collected", function()
    local proc = io.open("/proc/self/stat", "rb")
    if not proc then
      pending("needs /proc")
      return
    end
    proc:close()
    -- in a fresh process: in this one, descriptors that earlier specs left
    -- behind may come and go while it runs (seen once each way).  Counted:
    -- what a multi owns (sockets, its epoll instance); a library may open a
    -- file of its own on first use (a CI run once saw 20 -> 21 descriptors
    -- in all), which is not the multi's to give back.
    local out = H.run_lua(([[
      local core = require "slm.core"
      local function fds() -- "fd -> target" of every descriptor
        local f = assert(io.open("/proc/self/stat", "rb"))
        local pid = f:read("a"):match("^(%%d+)")
        f:close()
        local p, list = io.popen("env -u LD_PRELOAD ls -l /proc/" .. pid .. "/fd"), {}
        for line in p:lines() do
          local fd, target = line:match("(%%d+) %%-> (.*)$")
          if fd then list[#list + 1] = fd .. " -> " .. target end
        end
        p:close()
        return list
      end
      collectgarbage(); collectgarbage()
      local before = fds()
      for i = 1, 20 do
        local m = core.multi()
        if i %% 3 == 0 then -- a connection left in libcurl's cache
          local r = m:add{ url = %q, method = "POST", body = %q, headers = { "Content-Type: application/json" } }
          local t = core.now() + 10
          while not r:done() and core.now() < t do m:step(0.5) end
          assert(r:result())
        end
        if i %% 2 == 0 then m:close() end
      end
      collectgarbage(); collectgarbage()
      io.write(table.concat(before, "\n"), "\n--\n", table.concat(fds(), "\n"))]]):format(
      up.url .. "/chat/completions", body()))
    local before, after = out:match("^(.-)\n%-%-\n(.*)$")
    assert(before, "child process said: " .. out)
    local function owned(list) -- the descriptors a multi could have left open
      local n = 0
      for line in list:gmatch("[^\n]+") do
        if line:find("-> socket:", 1, true) or line:find("-> anon_inode:", 1, true) then n = n + 1 end
      end
      return n
    end
    assert.are.equal(owned(before), owned(after), "descriptors before:\n" .. before .. "\nafter:\n" .. after)
    assert.is_true(#before > 0)
    assert.are.equal(6, up:stats().requests) -- the child really made its requests (i = 3, 6, ... 18)
  end)

  it("timeout() says when step() is due without socket activity", function()
    local m = core.multi()
    assert.is_nil(m:timeout()) -- nothing at all
    local r = add(m)
    assert.are.equal(0, m:timeout()) -- libcurl starts it from its timer
    drain(m, { r })
    assert.is_true(r:result())
    assert.is_nil(m:timeout()) -- done and reported: nothing pending
    -- a first-byte deadline is step()'s own: timeout() counts it
    local slow = add(m, { first_byte_timeout = 5, headers = { "X-Sim-Scenario: delay=10000" } })
    local deadline = core.now() + 3
    while up:stats().in_flight < 1 and core.now() < deadline do m:step(0.02) end
    local t = m:timeout()
    assert.is_number(t)
    assert.is_true(t > 0 and t <= 5, "timeout " .. tostring(t))
    -- cancelled: nothing is pending any more, and step() does not report
    -- it (the caller knows); step(t) then really waits
    slow:cancel()
    assert.is_nil(m:timeout())
    local t0 = core.now()
    assert.are.same({}, m:step(0.2))
    local dt = core.now() - t0
    assert.is_true(dt >= 0.19, "step(0.2) after a cancel returned after " .. dt .. " s")
    m:close()
    assert.has_error(function() m:timeout() end)
  end)

  it("names its descriptor for an outer loop: the epoll set, or nil on the poll() backend", function()
    local m = core.multi()
    if expected_events() == "epoll" then
      assert.is_true(math.type(m:fd()) == "integer" and m:fd() >= 0)
      assert.are.equal(m:fd(), m:fd())
    else
      assert.is_nil(m:fd())
    end
    m:close()
    assert.has_error(function() m:fd() end)
  end)

  it("an outer event loop (luv) drives plain requests and SSE streams to completion without spinning", function()
    local ok, uv = pcall(require, "luv")
    if not ok then
      pending("needs lua-luv")
      return
    end
    local m = core.multi()
    if not m:fd() then
      pending("the poll() backend has no descriptor for an outer loop")
      return
    end
    local reqs, want = {}, {}
    local t0 = core.now() -- before the adds: the deadlines count from there
    for i = 1, 4 do -- replies after a silent 300 ms
      reqs[#reqs + 1] = echo(m, "plain " .. i, "delay=300")
      want[#reqs] = "plain"
    end
    for i = 1, 3 do -- events 20 ms apart, each flushed on its own
      reqs[#reqs + 1] = add(m, { body = body{ stream = true,
        messages = { { role = "user", content = "stream " .. i .. " one two three four five" } } },
        headers = { "X-Sim-Scenario: slow_chunks=20" } })
      want[#reqs] = "stream"
    end
    -- deadlines with no socket activity: libcurl's timer, and step()'s own
    -- (the last thing to happen: nothing else would wake the loop for it)
    reqs[#reqs + 1] = add(m, { first_byte_timeout = 1.0, headers = { "X-Sim-Scenario: delay=3000" } })
    want[#reqs] = "first_byte"
    reqs[#reqs + 1] = add(m, { timeout = 0.5, headers = { "X-Sim-Scenario: delay=3000" } })
    want[#reqs] = "total"
    local n = #reqs
    local index, bodies, done_at = {}, {}, {}
    for i, r in ipairs(reqs) do index[r] = i; bodies[i] = "" end

    local wakeups, idle, reported, finished, timers = 0, 0, 0, 0, 0
    local poll, timer, guard = uv.new_poll(m:fd()), uv.new_timer(), uv.new_timer()
    local function stop()
      for _, h in ipairs({ poll, timer, guard }) do if not h:is_closing() then h:close() end end
    end
    local function wake()
      wakeups = wakeups + 1
      local got = m:step(0)
      if #got == 0 then idle = idle + 1 end
      for _, r in ipairs(got) do
        reported = reported + 1
        local i = index[r]
        bodies[i] = bodies[i] .. (r:read() or "")
        if r:done() then finished = finished + 1; done_at[i] = core.now() end
      end
      if finished == n then return stop() end
      timer:stop()
      local t = m:timeout()
      if t then timer:start(math.ceil(t * 1000), 0, function() timers = timers + 1; wake() end) end
    end
    poll:start("r", function(err)
      assert.is_nil(err)
      wake()
    end)
    -- just added: due at once, from the timer
    assert.are.equal(0, m:timeout())
    timer:start(0, 0, wake)
    guard:start(10000, 0, stop) -- a lost wake-up fails the spec instead of hanging it
    uv.run()
    local took = core.now() - t0
    for i = 1, n do done_at[i] = done_at[i] and done_at[i] - t0 end

    assert.are.equal(n, finished, "requests finished by the outer loop")
    -- the deadlines (0.5 s, 1 s) were met on time, not when the server
    -- finally answered at 3 s
    assert.is_true(took >= 0.99 and took < 2.5, "the outer loop took " .. took .. " s")
    for i = 1, n do
      local r, ok2, kind, msg = reqs[i], reqs[i]:result()
      if want[i] == "plain" then
        assert.is_true(ok2, msg)
        assert.are.equal("Echo: plain " .. i, reply_text(bodies[i]))
      elseif want[i] == "stream" then
        assert.is_true(ok2, msg)
        local text = {}
        for data in bodies[i]:gmatch("data: (%b{})") do
          local c = json.decode(data).choices[1]
          text[#text + 1] = c and c.delta and c.delta.content or ""
        end
        assert.are.equal("Echo: stream " .. (i - 4) .. " one two three four five", table.concat(text))
        assert.matches("data: %[DONE%]", bodies[i])
      else
        assert.is_nil(ok2)
        assert.are.equal("timeout", kind)
        if want[i] == "first_byte" then
          assert.matches("first byte", msg)
        else -- libcurl's own timeout, woken by its timer
          assert.is_true(done_at[i] >= 0.49 and done_at[i] < 1.5, "timed out at " .. done_at[i] .. " s")
        end
      end
      assert.are.equal("number", type(r:id()))
    end
    -- no busy loop: a wake-up that reports nothing happens for a socket
    -- event libcurl handles by itself (connected, request sent) or a
    -- timer; a loop that spun through the silent 300 ms-3 s would count
    -- them by the thousand
    assert.is_true(idle <= 2 * n + 4, ("%d wake-ups, %d of them idle, %d timers, %d reports")
      :format(wakeups, idle, timers, reported))
    assert.is_true(wakeups <= reported + idle)
    assert.is_nil(m:timeout())
    m:close()
  end)

  it("sets libcurl up on first use, not when slm.core loads", function()
    -- in a fresh process: this one made multis long ago.  A worker that
    -- only counts tokens or parses streams must never initialise libcurl
    -- (nor, through it, OpenSSL); the first multi does.
    local out = H.run_lua([[
      local core = require "slm.core"
      local said = {}
      local function note(what) said[#said + 1] = what .. "=" .. tostring(core.http_initialized()) end
      note("loaded")
      local p = core.sse_parser()
      assert(#p:feed("data: {\"x\":1}\n\n") == 1)
      local slm = require "slm"
      assert(slm.tokenizer("gpt-4o-mini"):count("hello world") == 2)
      assert(core.events == "epoll" or core.events == "poll")
      note("parsed+counted")
      local m = core.multi()
      note("multi")
      m:close()
      io.write(table.concat(said, " "))]])
    assert.are.equal("loaded=false parsed+counted=false multi=true", out)
    -- reading a field that describes libcurl is a use of it, too
    out = H.run_lua([[
      local core = require "slm.core"
      local before = core.http_initialized()
      local v = core.curl_version
      io.write(tostring(before), " ", tostring(core.http_initialized()), " ", type(v), " ",
        type(core.h2c_reuse), " ", type(core.http2), " ", tostring(core.no_such_field))]])
    assert.are.equal("false true string boolean boolean nil", out)
  end)

  it("has a monotonic clock", function()
    local a = core.now()
    local b = core.now()
    assert.is_true(b >= a)
    assert.is_number(core.cputime())
  end)
end)
