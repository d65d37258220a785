-- slm.core's non-blocking TCP socket (core.tcp_connect) and Multi:watch,
-- which puts a descriptor of ours in the multi's event set next to
-- libcurl's sockets (epoll, or poll() in the -DSLM_EVENTS=poll build): a
-- watched descriptor that becomes ready is returned by step(), once.
local core = require "slm.core"
local H = require "tests.helpers"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)

-- step until fd is among the events (or give up after `tries` steps)
local function wait_for(m, fd, tries)
  for _ = 1, tries or 50 do
    local evs = m:step(0.1)
    for i = 1, #evs do if evs[i] == fd then return true end end
  end
  return false
end

describe("core.tcp_connect and Multi:watch", function()
  it("connects, sends, and step() reports the socket when the reply is there", function()
    local m = core.multi()
    local s = assert(core.tcp_connect("127.0.0.1", up.port))
    local fd = s:fd()
    assert.is_true(fd >= 0)
    m:watch(fd, "w")
    assert.are.equal(1, m:count()) -- an armed descriptor counts as work in flight
    assert.is_true(wait_for(m, fd))
    assert.are.equal(0, m:count()) -- one-shot: disarmed once reported
    assert.is_true(s:connected())
    local req = "GET /__sim/stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    assert.are.equal(#req, s:send(req))
    assert.are.equal(#req, s:send(req, #req + 1)) -- nothing left to send
    m:watch(fd, "r")
    assert.is_true(wait_for(m, fd))
    local got = {}
    while true do
      local b, err = s:recv(7)
      if b then got[#got + 1] = b; assert.is_true(#b <= 7)
      elseif b == false then
        m:watch(fd, "r")
        assert.is_true(wait_for(m, fd))
      else
        assert.are.equal("closed", err)
        break
      end
    end
    assert.matches("^HTTP/1.1 200", table.concat(got))
    m:watch(fd, nil)
    s:close()
    s:close() -- idempotent
    assert.are.equal(-1, s:fd())
    assert.has_error(function() s:recv() end, "slm.core: the socket is closed")
    m:close()
  end)

  it("reports nothing to read as false, not as the end", function()
    local m = core.multi()
    local s = assert(core.tcp_connect("127.0.0.1", up.port))
    m:watch(s:fd(), "w")
    assert.is_true(wait_for(m, s:fd()))
    assert.is_false(s:recv())
    -- an armed watch that is forgotten no longer counts
    m:watch(s:fd(), "r")
    assert.are.equal(1, m:count())
    m:watch(s:fd(), nil)
    assert.are.equal(0, m:count())
    s:close()
    m:close()
  end)

  it("a refused connection is reported by connected()", function()
    local m = core.multi()
    local s = assert(core.tcp_connect("127.0.0.1", 1))
    m:watch(s:fd(), "w")
    assert.is_true(wait_for(m, s:fd()))
    local ok, err = s:connected()
    assert.is_nil(ok)
    assert.matches("connect: Connection refused", err)
    m:watch(s:fd(), nil)
    s:close()
    m:close()
  end)

  it("works next to libcurl's own requests on the same multi", function()
    local m = core.multi()
    local r = m:add{ url = up.url .. "/models" }
    local s = assert(core.tcp_connect("127.0.0.1", up.port))
    m:watch(s:fd(), "w")
    local saw_fd, done = false, false
    for _ = 1, 100 do
      for _, e in ipairs(m:step(0.1)) do
        if e == s:fd() then saw_fd = true elseif e == r and r:done() then done = true end
      end
      if saw_fd and done then break end
    end
    assert.is_true(saw_fd and done)
    assert.is_true(r:result())
    m:watch(s:fd(), nil)
    s:close()
    m:close()
  end)

  it("refuses misuse", function()
    local m = core.multi()
    assert.has_error(function() m:watch(-1, "r") end)
    assert.has_error(function() m:watch(0, "x") end)
    assert.has_error(function() core.tcp_connect("127.0.0.1", 0) end)
    local s, err = core.tcp_connect("no such host.invalid", 80)
    assert.is_nil(s)
    assert.matches("cannot resolve", err)
    m:close()
    assert.has_error(function() m:watch(5, "r") end, "calling 'watch' on bad self (multi is closed)")
  end)
end)
