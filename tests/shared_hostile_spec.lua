-- Budgets, rate limits and semaphores under a hostile user, from plain Lua
-- 5.4 (and LuaJIT for the parts that need no Redis): fractional limits,
-- reservations settled in the wrong budget or not at all, clocks going
-- backwards, and a real redis-server (127.0.0.1, random port, nothing
-- saved) restarted under reservations and slots that are still held.
local slm = require "slm"
local ratelimit = require "slm.ratelimit"

local has_redis = os.execute("command -v redis-server >/dev/null 2>&1")

describe("slm.budget, hostile", function()
  it("refuses a request over a fractional token limit with a message, not a format error", function()
    local b = slm.budget{ tokens = 10.5 }
    local r, err = b:reserve(0, 11)
    assert.is_nil(r)
    assert.are.equal("budget", err.kind)
    assert.truthy(tostring(err):find("worst case 11 tokens exceeds the 10.5 left", 1, true))
    local r2 = assert(b:reserve(0, 10))
    b:settle(r2, 0, 2.5)
    assert.truthy(tostring(b):find("2.5 tokens; remaining $inf, 8 tokens", 1, true))
  end)

  it("refuses to settle a reservation of another budget (it would settle a hold of the same id)", function()
    local a, b = slm.budget{ usd = 1 }, slm.budget{ usd = 1 }
    local ra = assert(a:reserve(0.5, 0))
    local rb = assert(b:reserve(0.5, 0))
    assert.are.equal(ra.id, rb.id) -- ids are per backend
    local ok, msg = pcall(b.settle, b, ra, 0.1, 0)
    assert.is_false(ok)
    assert.truthy(tostring(msg):find("settle needs a reservation that this budget's reserve returned", 1, true))
    -- b's own hold is untouched, and settles for what it really cost
    assert.are.equal(0.5, (b:reserved()))
    b:settle(rb, 0.3, 0)
    assert.are.equal(0.3, (b:spent()))
    a:settle(ra, 0.2, 0)
    assert.are.equal(0.2, (a:spent()))
    assert.is_false(pcall(b.settle, b, nil, 1, 1))
    assert.is_false(pcall(b.settle, b, { id = 1, usd = 0, tokens = 0 }, 1, 1))
    assert.are.equal(0.3, (b:spent()))
  end)
end)

describe("slm.ratelimit, hostile", function()
  it("does not drain the bucket when the clock goes back", function()
    local t, slept = 1000, {}
    local rt = { now = function() return t end, sleep = function(s) slept[#slept + 1] = s; t = t + s end }
    local b = ratelimit.new(60, 60, rt) -- one a second
    for _ = 1, 60 do assert(b:take(1)) end
    assert.are.equal(0, #slept)
    t = t - 3600 -- the wall clock is set back an hour
    assert(b:take(1))
    assert.are.equal(1, #slept)
    assert.is_true(slept[1] <= 1 + 1e-9, "waited " .. slept[1] .. " s for one unit of a one-a-second limit")
    -- and after a long idle time it is full again, never more than full
    t = t + 86400 * 365
    for _ = 1, 60 do assert(b:take(1)) end
    assert.are.equal(1, #slept)
    assert(b:take(1))
    assert.are.equal(2, #slept)
  end)
end)

local function redis_describe(name, fn)
  if has_redis and not jit then describe(name, fn) else pending(name .. " (needs redis-server and Lua 5.4)") end
end

redis_describe("slm.redis, hostile", function()
  local redis_launch = require "tests.redis_launch"
  local R = require "slm.shared.redis"
  local PASSWORD = "pw-Hostile-Secret-7"
  local srv

  setup(function() srv = redis_launch.start{ quiet = true, password = PASSWORD } end)
  teardown(function() if srv then srv:stop() end end)

  local function conf() return { host = srv.host, port = srv.port, password = PASSWORD, timeout = 2 } end
  -- a crash and a restart on the same port, with nothing saved (as a
  -- restart from an older snapshot: the counters start again from before)
  local function restart()
    local port = srv.port
    srv:kill()
    srv:stop()
    srv = redis_launch.start{ quiet = true, password = PASSWORD, port = port }
  end

  it("a settle from before a Redis restart does not settle a new hold of the same number", function()
    local b1 = slm.budget{ usd = 10, backend = R.budget{ redis = R.connect(conf()), name = "restart" } }
    local old = assert(b1:reserve(1, 10))
    restart()
    local b2 = slm.budget{ usd = 10, backend = R.budget{ redis = R.connect(conf()), name = "restart" } }
    local new = assert(b2:reserve(2, 20))
    assert.are_not.equal(old.id, new.id)
    assert(b1:settle(old, 0.5, 5)) -- the old holder's reply comes in late
    assert.are.same({ 2, 20 }, { b2:reserved() }) -- the new hold is still held
    assert(b2:settle(new, 1.5, 15))
    -- the new spend is recorded (the old hold went with the Redis that held
    -- it: its late settle finds nothing to settle)
    assert.are.same({ 1.5, 15 }, { b2:spent() })
    assert.are.same({ 0, 0 }, { b2:reserved() })
  end)

  it("a slot released from before a Redis restart does not free a new holder's slot", function()
    local sem = R.semaphore{ redis = R.connect(conf()), name = "restart", n = 1 }
    local old = assert(sem:acquire(nil, 0.2))
    restart()
    local new = assert(sem:acquire(nil, 0.2))
    assert.are_not.equal(old, new)
    assert(sem:release(old))
    local third, err = sem:acquire(nil, 0.2)
    assert.is_nil(third, "two holders of a semaphore of one slot")
    assert.are.equal("timeout", err.kind)
    assert(sem:release(new))
    assert(sem:release(assert(sem:acquire(nil, 0.2))))
  end)

  it("a rate limit does not make takers wait as long as Redis' clock went back", function()
    local lim = R.ratelimit{ redis = R.connect(conf()), name = "clockback", limit = 60, per = 60 }
    assert(lim:take(60))
    -- the last take happened an hour "later" than Redis' clock says it is now
    local secs = tonumber(srv:cli("TIME"):match("^(%d+)"))
    srv:cli("HSET", "slm:ratelimit:clockback", "level", "0", "at", tostring((secs + 3600) * 1000))
    local slept = {}
    local rt = { now = os.time, sleep = function(s)
      slept[#slept + 1] = s
      if s > 5 then error("asked to sleep " .. s .. " s", 0) end
      os.execute("sleep " .. s)
    end }
    assert(lim:take(1, rt))
    assert.is_true(#slept >= 1)
    for _, s in ipairs(slept) do assert.is_true(s <= 1.001, "slept " .. s .. " s") end
  end)
end)
