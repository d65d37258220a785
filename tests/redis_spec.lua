-- slm.redis from plain Lua 5.4 against a real redis-server (started here on
-- a random 127.0.0.1 port, nothing saved, stopped after) and the nginx
-- simulator: budgets exact under concurrency, holds that expire, periods,
-- a Redis that is down, killed mid-job or stalled (fails closed, clear
-- errors, no password), a Redis call that yields to other tasks (proved by
-- order, not time), rate limits, semaphores, session stores and the cache.
local slm = require "slm"
local H = require "tests.helpers"
local redis_launch = require "tests.redis_launch"
local R = require "slm.shared.redis"

local PASSWORD = "pw-Very-Secret-42"
local SIM = "sim:delay=100"
local PRICE = { context = 128000, max_output = 1000, input_per_m = 0.15, output_per_m = 0.60,
  tokenizer = "o200k_base", format = "openai" }

local srv, up
local n = 0
setup(function()
  srv = redis_launch.start{ quiet = true, password = PASSWORD }
  up = H.upstream()
  slm.models[SIM] = PRICE
end)
teardown(function()
  slm.models[SIM] = nil
  if srv then srv:stop() end
  if up then up:stop() end
end)
before_each(function() up:reset() end)

local function conf(extra)
  local c = { host = srv.host, port = srv.port, password = PASSWORD, timeout = 2 }
  for k, v in pairs(extra or {}) do c[k] = v end
  return c
end
-- a fresh budget name per test
local function name()
  n = n + 1
  return "t" .. n .. "-" .. os.time()
end

local function no_secret(err)
  assert.is_nil(tostring(err):find(PASSWORD, 1, true))
  for _, v in pairs(err) do assert.is_nil(tostring(v):find(PASSWORD, 1, true)) end
end

local function request(text)
  return { model = SIM, max_tokens = 50,
    messages = { { role = "user", content = text or "My parcel arrived damaged, I want a refund." } } }
end
local function worst(req)
  local prompt = slm.count(req, req.model)
  return slm.cost(req.model, { prompt_tokens = prompt, completion_tokens = req.max_tokens })
end
local function client(b)
  return slm.client{ base_url = up.url, api_key = "sk-test", timeout = 10, max_retries = 0, budget = b }
end

describe("slm.redis budget", function()
  it("lets exactly k of 40 concurrent reservations through, from several connections", function()
    local nm = name()
    -- four connections: four hosts as far as Redis can tell
    local budgets = {}
    for i = 1, 4 do
      budgets[i] = slm.budget{ usd = 1, backend = R.budget{ redis = R.connect(conf()), name = nm } }
    end
    local passed, refused = 0, 0
    slm.run(function()
      local ts = {}
      for i = 1, 40 do
        ts[i] = slm.spawn(function()
          local r, err = budgets[i % 4 + 1]:reserve(0.1, 10)
          if r then passed = passed + 1 else
            assert.are.equal("budget", err.kind)
            refused = refused + 1
          end
        end)
      end
      for i = 1, 40 do ts[i]:wait() end
    end)
    assert.are.equal(10, passed)
    assert.are.equal(30, refused)
    local su, st, hu, ht = budgets[1].backend:totals()
    assert.are.equal(0, su); assert.are.equal(0, st)
    assert.is_true(math.abs(hu - 1) < 1e-9); assert.are.equal(100, ht)
  end)

  it("settles a hold into the real spend, and the freed part is usable again", function()
    local b = slm.budget{ usd = 1, tokens = 1000, backend = R.budget{ redis = conf(), name = name() } }
    local r1 = assert(b:reserve(0.6, 100))
    assert.is_nil(b:reserve(0.6, 100))
    b:settle(r1, 0.25, 40)
    local su, st = b:spent()
    assert.is_true(math.abs(su - 0.25) < 1e-12); assert.are.equal(40, st)
    local r2 = assert(b:reserve(0.7, 100))
    local lu, lt = b:remaining()
    assert.is_true(math.abs(lu - 0.05) < 1e-9); assert.are.equal(860, lt)
    b:settle(r2, 0.7, 100)
    assert.is_nil(b:reserve(0.1, 1))
  end)

  it("with client:chat, of 24 concurrent requests against a budget covering 7, exactly 7 reach the simulator", function()
    local req = request()
    local usd = worst(req)
    local nm = name()
    local c1 = client(slm.budget{ usd = 7 * usd, backend = R.budget{ redis = conf(), name = nm } })
    local c2 = client(slm.budget{ usd = 7 * usd, backend = R.budget{ redis = conf(), name = nm } })
    local list = {}
    for i = 1, 24 do list[i] = i end
    local results, errs = slm.map(list, function(i)
      return (i % 2 == 0 and c1 or c2):chat(request())
    end, { concurrency = 24 })
    local ok = 0
    for i = 1, 24 do
      if results[i] then ok = ok + 1 else assert.are.equal("budget", errs[i].kind, tostring(errs[i])) end
    end
    assert.are.equal(7, ok)
    assert.are.equal(7, up:stats().requests)
  end)

  it("bounds tokens alone as well", function()
    local b = slm.budget{ tokens = 250, backend = R.budget{ redis = conf(), name = name() } }
    local r1 = assert(b:reserve(0, 200))
    local no, err = b:reserve(0, 100)
    assert.is_nil(no)
    assert.matches("100 tokens exceeds the 50 left", err.message)
    b:settle(r1, 0, 120)
    assert(b:reserve(0, 130))
    assert.is_nil(b:reserve(0, 1))
  end)

  it("survives a Redis restart: a dead pooled connection is replaced once", function()
    local own = redis_launch.start{ quiet = true }
    local conn = R.connect{ port = own.port }
    assert.are.equal("OK", conn:command("SET", "a", "1"))
    own:stop()
    local again = redis_launch.start{ quiet = true, port = own.port }
    assert.are.equal("OK", conn:command("SET", "a", "2"))
    again:stop()
  end)

  it("returns the hold of a holder that died once hold_ttl has passed", function()
    local nm = name()
    -- (hold_ttl 1.5 s: the reserves before the sleep fit in it on a loaded machine)
    local dead = slm.budget{ usd = 1, backend = R.budget{ redis = conf(), name = nm, hold_ttl = 1.5 } }
    assert(dead:reserve(1, 1)) -- never settled: its holder "dies"
    local live = slm.budget{ usd = 1, backend = R.budget{ redis = conf(), name = nm, hold_ttl = 1.5 } }
    assert.is_nil(live:reserve(0.5, 1))
    slm.sleep(1.7)
    local r = assert(live:reserve(0.5, 1))
    local hu = live:reserved()
    assert.is_true(math.abs(hu - 0.5) < 1e-12)
    live:settle(r, 0.5, 1)
  end)

  -- The budget's totals: `usd` and `tokens` spent, nothing held.
  local function assert_settled(be, usd, tokens)
    local su, st, hu = be:totals()
    assert.is_true(math.abs(su - usd) < 1e-12, "spent " .. su)
    assert.are.equal(tokens, st)
    assert.are.equal(0, hu)
  end

  it("charges a hold once: a settle sent again (its reply lost) is not charged twice", function()
    local be = R.budget{ redis = conf(), name = name() }
    local id = assert(be:reserve(0.4, 10, 1, 1000))
    assert.is_true(be:settle(id, 0.3, 8))
    assert.is_true(be:settle(id, 0.3, 8))
    assert_settled(be, 0.3, 8)
  end)

  it("a late settle of a hold that expired and was reaped still charges it, once", function()
    local nm = name()
    local slow = R.budget{ redis = conf(), name = nm, hold_ttl = 0.2 }
    local id = assert(slow:reserve(0.6, 1, 1, 1000))
    slm.sleep(0.3)
    -- another holder's reserve reaps the expired hold: its room is back
    local other = R.budget{ redis = conf(), name = nm }
    local id2 = assert(other:reserve(0.9, 1, 1, 1000))
    assert(other:settle(id2, 0, 0))
    -- the slow holder's reply came after all: the money was spent
    assert.is_true(slow:settle(id, 0.5, 7))
    assert.is_true(slow:settle(id, 0.5, 7))
    assert_settled(other, 0.5, 7)
  end)

  it("keeps a reaped hold for a late settle for a day, then forgets it (a budget without a period)", function()
    local nm = name()
    local now = 1.8e9
    local be = R.budget{ redis = conf(), name = nm, hold_ttl = 1, clock = function() return now end }
    local key = "slm:budget:" .. nm
    local ids = {}
    for i = 1, 3 do ids[i] = assert(be:reserve(0.1, 1, 1, 1000)) end
    now = now + 2
    be:totals() -- reaps the three
    assert.equal("3", srv:cli("HLEN", key .. ":reaped"))
    -- a late settle within the day still charges, and leaves no trace
    assert.is_true(be:settle(ids[1], 0.05, 1))
    assert.equal("2", srv:cli("HLEN", key .. ":reaped"))
    assert.equal("2", srv:cli("ZCARD", key .. ":reapedz"))
    now = now + 86400 + 1
    local su = be:totals()
    assert.equal(0.05, su)
    assert.equal("0", srv:cli("HLEN", key .. ":reaped"))
    assert.equal("0", srv:cli("ZCARD", key .. ":reapedz"))
  end)

  it("a settle while Redis stalls is tried again, then kept and sent with the next call: charged once", function()
    local be = R.budget{ redis = conf{ timeout = 0.15 }, name = name() }
    -- a short stall: the third try (after 0.15 + 0.05 + 0.15 + 0.1 s) gets through
    local id0 = assert(be:reserve(0.1, 1, 1, 1000))
    srv:pause(0.25)
    assert.is_true(be:settle(id0, 0.05, 1))
    assert.are.equal(0, #be.unsettled)
    -- a long one: kept
    local id = assert(be:reserve(0.4, 10, 1, 1000))
    srv:pause(1.2)
    local ok, err = be:settle(id, 0.25, 9)
    assert.is_nil(ok)
    assert.are.equal("timeout", err.kind)
    assert.matches("the settle is kept and sent again", err.message)
    assert.are.equal(1, #be.unsettled)
    slm.sleep(1.3)
    -- the next call sends the kept settle first
    assert_settled(be, 0.3, 10)
    assert.are.equal(0, #be.unsettled)
  end)

  it("keeps day and month totals apart, from zero at the UTC boundary", function()
    local t = os.time{ year = 2026, month = 12, day = 31, hour = 23, min = 59, sec = 58 }
    -- os.time reads local time; the UTC epoch of that wall clock:
    local utc = t - (os.time(os.date("*t", t)) - os.time(os.date("!*t", t)))
    local now = utc
    local clock = function() return now end
    local nm = name()
    local day = slm.budget{ usd = 1, backend = R.budget{ redis = conf(), name = nm, period = "day", clock = clock } }
    local month = slm.budget{ usd = 1, backend = R.budget{ redis = conf(), name = nm .. "m", period = "month", clock = clock } }
    day:settle(assert(day:reserve(0.8, 1)), 0.8, 1)
    month:settle(assert(month:reserve(0.8, 1)), 0.8, 1)
    assert.is_nil(day:reserve(0.5, 1))
    assert.is_nil(month:reserve(0.5, 1))
    now = utc + 3 -- 2027-01-01 00:00:01: a new day and a new month
    assert.are.equal(0, (day:spent()))
    assert.are.equal(0, (month:spent()))
    assert(day:reserve(0.9, 1))
    assert(month:reserve(0.9, 1))
    -- the keys carry the UTC date
    assert.matches("2026%-12%-31", srv:cli("--scan", "--pattern", "slm:budget:" .. nm .. ":*"))
    assert.matches("2027%-01", srv:cli("--scan", "--pattern", "slm:budget:" .. nm .. "m:*"))
    -- without a test clock: Redis' own, today in UTC
    local real = slm.budget{ usd = 1, backend = R.budget{ redis = conf(), name = nm .. "r", period = "day" } }
    real:settle(assert(real:reserve(0.1, 1)), 0.1, 1)
    assert.matches((os.date("!%Y-%m-%d"):gsub("%-", "%%-")), srv:cli("--scan", "--pattern", "slm:budget:" .. nm .. "r:*"))
    local ok, err = pcall(R.budget, { redis = conf(), name = "x", period = "week" })
    assert.is_false(ok); assert.matches("period", err)
  end)

  it("loads its scripts again when Redis lost them (NOSCRIPT: EVAL)", function()
    local b = slm.budget{ usd = 1, backend = R.budget{ redis = conf(), name = name() } }
    assert(b:reserve(0.2, 1))
    srv:cli("SCRIPT", "FLUSH")
    assert(b:reserve(0.2, 1))
    assert.is_true(math.abs(b:reserved() - 0.4) < 1e-12)
  end)
end)

describe("slm.redis failures", function()
  it("a Redis that is not there: kind connect, the request is never sent, no password", function()
    local b = slm.budget{ usd = 1, backend = R.budget{ redis = { port = 1, password = PASSWORD }, name = "down" } }
    local r, err = b:reserve(0.1, 1)
    assert.is_nil(r)
    assert.are.equal("connect", err.kind)
    assert.are.equal("redis", err.storage)
    assert.matches("127.0.0.1:1", tostring(err))
    no_secret(err)
    local res, cerr = client(b):chat(request())
    assert.is_nil(res)
    assert.are.equal("connect", cerr.kind)
    no_secret(cerr)
    assert.are.equal(0, up:stats().requests)
  end)

  it("a wrong password: kind auth, and the password is not in the message", function()
    local b = R.budget{ redis = conf{ password = "wrong-" .. PASSWORD }, name = "x" }
    local r, err = b:reserve(0.1, 1, 1, 10)
    assert.is_nil(r)
    assert.are.equal("auth", err.kind)
    no_secret(err)
    assert.is_nil(tostring(err):find("wrong-", 1, true))
  end)

  it("a stalled Redis: kind timeout after the connection's timeout #transport", function()
    local b = slm.budget{ usd = 1, backend = R.budget{ redis = conf{ timeout = 0.2 }, name = name() } }
    assert(b:reserve(0.1, 1)) -- connected and the scripts loaded
    srv:pause(0.8)
    local r, err = b:reserve(0.1, 1)
    assert.is_nil(r)
    assert.are.equal("timeout", err.kind)
    no_secret(err)
    slm.sleep(0.8)
    assert(b:reserve(0.1, 1))
  end)

  it("a Redis killed mid-job: later requests fail closed with kind connect", function()
    local own = redis_launch.start{ quiet = true, password = PASSWORD }
    local req = request()
    local usd = worst(req)
    local b = slm.budget{ usd = 100 * usd, backend = R.budget{
      redis = { port = own.port, password = PASSWORD, timeout = 1 }, name = "job" } }
    local c = client(b)
    local list = {}
    for i = 1, 20 do list[i] = i end
    local ok, kinds = 0, {}
    local results, errs = slm.map(list, function(i)
      if i == 6 then own:kill() end
      return c:chat(request())
    end, { concurrency = 1 })
    own:stop()
    for i = 1, 20 do
      if results[i] then ok = ok + 1 else
        kinds[errs[i].kind] = (kinds[errs[i].kind] or 0) + 1
        no_secret(errs[i])
      end
    end
    assert.are.equal(5, ok)
    assert.are.equal(15, kinds.connect)
    -- the five before the kill reached the simulator, none after
    assert.are.equal(5, up:stats().requests)
  end)
end)

describe("slm.redis does not block the event loop", function()
  it("while one task's Redis call is stalled, another task's HTTP request completes #transport", function()
    local conn = R.connect(conf{ timeout = 5 })
    assert(conn:command("PING"))
    local order = {}
    local redis_done, http_done_while_stalled = false, nil
    slm.run(function()
      -- DEBUG SLEEP would stall every connection; CLIENT PAUSE stalls
      -- this one's commands on the server for 1.5 s
      srv:pause(1.5)
      local a = slm.spawn(function()
        local r, err = conn:command("SET", "k", "v")
        assert(r, tostring(err))
        redis_done = true
        order[#order + 1] = "redis"
      end)
      local b = slm.spawn(function()
        local res, err = client():chat(request("hello"))
        assert(res, tostring(err))
        http_done_while_stalled = not redis_done
        order[#order + 1] = "http"
      end)
      a:wait(); b:wait()
    end)
    assert.is_true(http_done_while_stalled)
    assert.are.same({ "http", "redis" }, order)
    assert.are.equal(1, up:stats().requests)
  end)

  it("outside any task a Redis call drives the loop itself (blocking-looking) #transport", function()
    local conn = R.connect(conf())
    assert.are.equal("PONG", conn:command("PING"))
    assert.are.equal("OK", conn:command("SET", "plain", "x"))
    assert.are.equal("x", conn:command("GET", "plain"))
    assert.is_false(conn:command("GET", "absent-key"))
  end)
end)

describe("slm.redis ratelimit", function()
  it("takes up to the limit at once, then waits through rt.sleep", function()
    local rt = slm.runtime.get("curl")
    local slept = {}
    local fake = setmetatable({ sleep = function(s) slept[#slept + 1] = s; rt.sleep(s) end }, { __index = rt })
    -- (3 per 3 s: a token a second, so the first three takes have a second
    -- before the bucket refills, even on a loaded machine)
    local lim = R.ratelimit{ redis = conf(), name = name(), limit = 3, per = 3 }
    for _ = 1, 3 do assert.is_true(lim:take(1, fake)) end
    assert.are.equal(0, #slept)
    assert.is_true(lim:take(1, fake))
    assert.is_true(#slept >= 1)
    assert.is_true(slept[1] > 0 and slept[1] <= 1.01)
    local bad = R.ratelimit{ redis = { port = 1 }, name = "x", limit = 1 }
    local ok, err = bad:take(1)
    assert.is_nil(ok); assert.are.equal("connect", err.kind)
  end)

  it("is shared by two connections", function()
    local nm = name()
    local a = R.ratelimit{ redis = conf(), name = nm, limit = 2, per = 10 }
    local b = R.ratelimit{ redis = conf(), name = nm, limit = 2, per = 10 }
    local slept = 0
    local rt = setmetatable({ sleep = function() slept = slept + 1; error("would wait") end },
      { __index = slm.runtime.get("curl") })
    assert.is_true(a:take(1, rt)); assert.is_true(b:take(1, rt))
    assert.has_error(function() a:take(1, rt) end, "would wait")
    assert.are.equal(1, slept)
  end)
end)

describe("slm.redis semaphore", function()
  it("holds n slots, times out, frees on release and when a holder dies", function()
    local nm = name()
    -- (a 2 s ttl: the acquires before it runs out fit in it on a loaded machine)
    local s1 = R.semaphore{ redis = conf(), name = nm, n = 2, ttl = 2 }
    local s2 = R.semaphore{ redis = conf(), name = nm, n = 2, ttl = 2 }
    local t1 = assert(s1:acquire(nil, 0.1))
    local t2 = assert(s2:acquire(nil, 0.1))
    local no, err = s1:acquire(nil, 0.1)
    assert.is_nil(no); assert.are.equal("timeout", err.kind)
    assert.is_true(s1:release(t1))
    local t3 = assert(s2:acquire(nil, 0.1))
    assert.are_not.equal(t2, t3)
    -- t2 and t3 are never released: after ttl (2 s) they are gone, well
    -- before the key itself would expire (twice the ttl after t3)
    local t4 = assert(s1:acquire(nil, 3))
    assert.truthy(t4)
  end)

  it("keeps a holder's slot 300 s by default, longer than a call's default timeout with its retries", function()
    local nm = name()
    local s = R.semaphore{ redis = conf(), name = nm, n = 1 }
    local tok = assert(s:acquire(nil, 0.1))
    local now = tonumber((srv:cli("TIME"):match("^(%d+)")))
    local deadline = tonumber(srv:cli("ZSCORE", "slm:semaphore:" .. nm, tok)) / 1000
    assert.is_true(deadline - now > 290 and deadline - now <= 301, "a slot held for " .. (deadline - now) .. " s")
    assert.is_true(s:release(tok))
  end)
end)

describe("slm.redis behind the client", function()
  it("max_concurrency = a Redis semaphore: two clients never have more than n in flight, and every slot comes back", function()
    local nm = name()
    local function c() return slm.client{ base_url = up.url, api_key = "sk-test", timeout = 10, max_retries = 0,
      model = "sim:delay=200", max_concurrency = R.semaphore{ redis = conf(), name = nm, n = 3 } } end
    local c1, c2 = c(), c()
    local list = {}
    for i = 1, 10 do list[i] = i end
    local results, errs = slm.map(list, function(i)
      return (i % 2 == 0 and c1 or c2):chat(request("slot " .. i))
    end, { concurrency = 10 })
    for i = 1, 10 do assert.truthy(results[i], errs[i] and tostring(errs[i])) end
    local st = up:stats()
    assert.are.equal(10, st.requests)
    assert.are.equal(3, st.max_in_flight)
    assert.are.equal("0", srv:cli("ZCARD", "slm:semaphore:" .. nm))
  end)

  it("rpm = a Redis rate limit, shared by two clients", function()
    local nm = name()
    local lim = R.ratelimit{ redis = conf(), name = nm, limit = 3, per = 3 }
    local takes, waited = 0, false
    -- the limit as the clients see it, counting the takes and the waits
    local seen = { take = function(_, n, rt)
      takes = takes + 1
      local spy = setmetatable({ sleep = function(s) waited = true; return rt.sleep(s) end }, { __index = rt })
      return lim:take(n, spy)
    end }
    local function c() return slm.client{ base_url = up.url, api_key = "sk-test", timeout = 10, max_retries = 0,
      model = SIM, rpm = seen } end
    local c1, c2 = c(), c()
    for i = 1, 5 do assert((i % 2 == 0 and c1 or c2):chat(request("rpm " .. i))) end
    assert.are.equal(5, up:stats().requests)
    assert.are.equal(5, takes)
    assert.is_true(waited) -- the bucket of 3 ran dry: a later take waited for it
    assert.truthy(srv:cli("HGET", "slm:ratelimit:" .. nm, "level"):match("^[%d.e-]+$"))
  end)

  it("cache = a Redis cache: a deterministic request is sent once for two clients", function()
    local cache = R.cache{ redis = conf(), ttl = 60 }
    local function c() return slm.client{ base_url = up.url, api_key = "sk-test", timeout = 10, max_retries = 0,
      model = SIM, cache = cache } end
    local r = request("cache me " .. name())
    r.temperature = 0
    local a = assert(c():chat(r))
    local b = assert(c():chat(r))
    assert.is_falsy(a.cached)
    assert.is_true(b.cached)
    assert.are.equal(a.text, b.text)
    assert.are.equal(1, up:stats().requests)
  end)

  it("quotas on Redis: each consumer its own budget, shared by two clients", function()
    local usd = worst(request())
    local qname = "q-" .. name()
    local function cl()
      return slm.client{ base_url = up.url, api_key = "sk-test", timeout = 10, max_retries = 0, model = SIM,
        quotas = slm.quotas{ storage = R, storage_options = { redis = conf() }, name = qname, usd = 2.5 * usd } }
    end
    local c1, c2 = cl(), cl()
    local function ask(cli, who)
      local rq = request()
      rq.consumer = who
      return cli:chat(rq)
    end
    local list = {}
    for i = 1, 6 do list[i] = i end
    local results, errs = slm.map(list, function(i) return ask(i % 2 == 0 and c1 or c2, "key-alice") end,
      { concurrency = 6 })
    local ok = 0
    for i = 1, 6 do
      if results[i] then ok = ok + 1 else assert.are.equal("budget", errs[i].kind, tostring(errs[i])) end
    end
    assert.are.equal(2, ok) -- alice's budget covers two worst cases at a time
    assert(ask(c2, "key-bob"))
    assert.are.equal(3, up:stats().requests)
  end)

  it("a Redis semaphore that cannot be reached: nothing is sent, no password", function()
    local cl = slm.client{ base_url = up.url, api_key = "sk-test", timeout = 2, max_retries = 0, model = SIM,
      max_concurrency = R.semaphore{ redis = { port = 1, password = PASSWORD }, name = "x", n = 1 } }
    local res, err = cl:chat(request())
    assert.is_nil(res)
    assert.are.equal("connect", err.kind)
    assert.are.equal("redis", err.storage)
    no_secret(err)
    assert.are.equal(0, up:stats().requests)
  end)
end)

describe("slm.redis store and cache", function()
  it("round-trips a session and deletes it", function()
    local st = R.store{ redis = conf(), ttl = 60 }
    local hist = { { role = "user", content = "Où est mon colis ?" }, { role = "assistant", content = "En route.", n = 3 } }
    assert.is_true(st:save("alice@example.com", hist))
    local back = assert(st:load("alice@example.com"))
    assert.are.same(hist, back)
    assert.is_nil(st:load("bob@example.com"))
    -- the key is the id's hash, never the id
    assert.are.equal("", srv:cli("--scan", "--pattern", "*alice*"))
    assert.is_true(st:delete("alice@example.com"))
    assert.is_nil(st:load("alice@example.com"))
    assert.is_true(require("slm.store").is_store(st))
    local down = R.store{ redis = { port = 1, password = PASSWORD } }
    local no, err = down:load("x")
    assert.is_nil(no)
    assert.matches("^slm.store: redis 127.0.0.1:1: cannot load: connect", err)
    assert.is_nil(err:find(PASSWORD, 1, true))
  end)

  it("caches strings with a time to live", function()
    local c = R.cache{ redis = conf(), ttl = 60 }
    assert.is_nil(c:get("req-1"))
    assert.is_true(c:set("req-1", "{\"answer\":42}"))
    assert.are.equal("{\"answer\":42}", c:get("req-1"))
    assert.is_true(c:set("short", "x", 1))
    assert.are.equal("x", c:get("short"))
    slm.sleep(1.15)
    assert.is_nil(c:get("short"))
    local down = R.cache{ redis = { port = 1 } }
    local v, err = down:get("req-1")
    assert.is_nil(v); assert.are.equal("connect", err.kind)
  end)

  it("refuses bad options at once", function()
    assert.has_error(function() R.budget{ redis = conf() } end)
    assert.has_error(function() R.budget{ redis = conf(), name = "x", bogus = 1 } end)
    assert.has_error(function() R.connect{ port = "x" } end)
    assert.has_error(function() R.connect{ pool_size = 0 } end, "slm.redis: option 'pool_size' must be a positive integer")
    assert.has_error(function() R.semaphore{ redis = conf(), name = "x", n = 0 } end)
    assert.has_error(function() R.ratelimit{ redis = conf(), name = "x" } end)
    assert.are.equal(R, slm.redis)
  end)
end)
