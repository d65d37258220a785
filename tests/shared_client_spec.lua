-- The client's side of shared limits, in plain Lua against the simulator,
-- with in-process fakes of the shared objects (slm.shdict's and slm.redis'
-- interfaces): limiter objects for rpm/tpm, semaphore objects for
-- max_concurrency (given back on every exit path), the response cache,
-- per-consumer quotas, a budget whose storage fails, and slm.shdict
-- outside nginx.
local slm = require "slm"
local budget_mod = require "slm.budget"
local core = require "slm.core"
local H = require "tests.helpers"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

local function client(opts) return H.sim_client(up, opts, { max_retries = 0 }) end
local function req(t)
  local r = { messages = H.msgs("hello shared"), max_tokens = 16 }
  for k, v in pairs(t or {}) do r[k] = v end
  return r
end

-- a limiter: records its takes; `fail` makes it fail
local function limiter(fail)
  local l = { takes = {} }
  function l:take(n, rt)
    self.takes[#self.takes + 1] = n
    self.rt = rt
    if fail then return nil, "the store is down" end
    return true
  end
  return l
end

-- a semaphore of n slots: counts what is held; `fail` makes acquire fail
local function semaphore(n, fail)
  local s = { held = 0, max = 0, acquired = 0, released = 0, n = n }
  function s:acquire(rt, timeout)
    self.timeout = timeout
    if fail then return nil, "the store is down" end
    if self.held >= self.n then return nil, "all taken" end
    self.held = self.held + 1
    self.acquired = self.acquired + 1
    if self.held > self.max then self.max = self.held end
    return { id = self.acquired }
  end
  function s:release(tok)
    if tok.done then return end
    tok.done = true
    self.held = self.held - 1
    self.released = self.released + 1
  end
  return s
end

local function memory_cache()
  local c = { data = {}, sets = 0, gets = 0 }
  function c:get(k) self.gets = self.gets + 1; return self.data[k] end
  function c:set(k, v) self.sets = self.sets + 1; self.data[k] = v; return true end
  return c
end

describe("shared limiter objects as rpm / tpm", function()
  it("are taken once per attempt, with the runtime, rpm 1 and tpm the worst case", function()
    local rpm, tpm = limiter(), limiter()
    local c = client{ rpm = rpm, tpm = tpm }
    local res, err = c:chat(req())
    assert.is_table(res, tostring(err))
    assert.same({ 1 }, rpm.takes)
    assert.equal(1, #tpm.takes)
    assert.is_true(tpm.takes[1] > 16)
    assert.equal(c.runtime, rpm.rt)
  end)

  it("a limiter that fails stops the request before it is sent (kind storage)", function()
    local b = slm.budget{ tokens = 10000 }
    local c = client{ rpm = limiter(true), budget = b }
    local res, err = c:chat(req())
    assert.is_nil(res)
    assert.equal("storage", err.kind)
    assert.matches("the store is down", err.message)
    assert.equal(0, up:stats().requests)
    local _, held = b:reserved()
    assert.equal(0, held)
  end)

  it("a number is still the client's own bucket; other values raise", function()
    assert.is_table(client{ rpm = 600, tpm = 100000 })
    assert.has_error(function() client{ rpm = {} } end,
      "slm.client: option 'rpm' must be a positive number (requests per minute) or a limiter (take), got table")
    assert.has_error(function() client{ max_concurrency = { acquire = print } } end,
      "slm.client: option 'max_concurrency' must be a positive integer or a semaphore (acquire, release), got table")
  end)
end)

describe("a shared semaphore as max_concurrency", function()
  it("caps concurrent requests and gives every slot back, on every exit path", function()
    local sem = semaphore(100)
    local c = client{ max_concurrency = sem, timeout = 5 }
    slm.run(function()
      local tasks = {}
      for i = 1, 6 do tasks[i] = slm.spawn(function() return c:chat(req{ model = "sim:delay=100" }) end) end
      for _, t in ipairs(tasks) do assert.is_table((t:wait())) end
    end)
    assert.equal(6, sem.max)
    -- an HTTP error, a stream closed early, an error raised in on_delta
    assert.is_nil((c:chat(req{ model = "sim:status=400" })))
    local s = c:stream(req())
    s:next()
    s:close()
    assert.has_error(function() c:chat(req{ stream = true, on_delta = function() error("boom") end }) end)
    local _, cerr = c:chat(req{ stream = true, on_delta = function() return false end })
    assert.equal("cancelled", cerr.kind)
    assert.equal(sem.acquired, sem.released)
    assert.equal(0, sem.held)
    assert.equal(5, sem.timeout)
  end)

  it("no slot: nothing is sent, the budget is given back", function()
    local b = slm.budget{ tokens = 10000 }
    local c = client{ max_concurrency = semaphore(0), budget = b, timeout = 1 }
    local res, err = c:chat(req())
    assert.is_nil(res)
    assert.equal("storage", err.kind)
    assert.equal(0, up:stats().requests)
    local _, held = b:reserved()
    assert.equal(0, held)
    assert.equal(0, select(2, b:spent()))
  end)
end)

describe("the response cache", function()
  it("serves a deterministic request again without sending it or touching the budget", function()
    local cache, b = memory_cache(), slm.budget{ tokens = 100000 }
    local c = client{ cache = cache, budget = b }
    local r1 = assert(c:chat(req{ temperature = 0 }))
    assert.is_nil(r1.cached)
    local spent = select(2, b:spent())
    local r2 = assert(c:chat(req{ temperature = 0 }))
    assert.is_true(r2.cached)
    assert.equal(r1.text, r2.text)
    assert.same({ prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cached = true }, r2.usage)
    assert.equal(r1.usage.total_tokens, r2.cached_usage.total_tokens)
    assert.equal(0, r2.cost)
    assert.equal(1, up:stats().requests)
    assert.equal(spent, select(2, b:spent()))
    assert.equal(1, b.requests)
    assert.equal(1, c.stats.cached)
    -- a seed is deterministic too; key order does not matter
    assert(c:chat(req{ seed = 7, top_p = 1, n = 1 }))
    assert.is_true(assert(c:chat(req{ n = 1, top_p = 1, seed = 7 })).cached)
    assert.equal(2, up:stats().requests)
  end)

  it("keys on the model and the whole body", function()
    local c = client{ cache = memory_cache() }
    assert(c:chat(req{ temperature = 0 }))
    assert.is_nil(assert(c:chat(req{ temperature = 0, model = "gpt-4.1-mini" })).cached)
    assert.is_nil(assert(c:chat(req{ temperature = 0, max_tokens = 17 })).cached)
    assert.is_nil(assert(c:chat(req{ temperature = 0, messages = H.msgs("other") })).cached)
    assert.equal(4, up:stats().requests)
  end)

  it("stores nothing for non-deterministic requests, errors, cut or stopped streams", function()
    local cache = memory_cache()
    local c = client{ cache = cache }
    assert(c:chat(req()))
    assert(c:chat(req{ temperature = 0.5 }))
    assert.is_nil((c:chat(req{ temperature = 0, model = "sim:status=500" })))
    local _, err = c:chat(req{ temperature = 0, model = "sim:eof_mid", stream = true })
    assert.equal("protocol", err.kind)
    local s = c:stream(req{ temperature = 0, model = "sim:slow_chunks=20" })
    s:next()
    s:close()
    assert.is_true(assert(c:chat(req{ temperature = 0, max_tokens = 2 })).finish_reason == "length")
    assert.equal(0, cache.sets)
  end)

  it("a stream is stored once it completed and replayed through on_delta and the iterator", function()
    local c = client{ cache = memory_cache() }
    local n1 = 0
    local r1 = assert(c:chat(req{ temperature = 0, stream = true, on_delta = function() n1 = n1 + 1 end }))
    assert.is_true(n1 > 1)
    local got = {}
    local r2 = assert(c:chat(req{ temperature = 0, stream = true, on_delta = function(t, chunk)
      got[#got + 1] = t
      assert.equal(t, chunk.choices[1].delta.content)
    end }))
    assert.is_true(r2.cached)
    assert.same({ r1.text }, got)
    local s = c:stream(req{ temperature = 0 })
    local parts = {}
    for t in s do parts[#parts + 1] = t end
    assert.same({ r1.text }, parts)
    assert.is_true(s:result().cached)
    assert.equal(1, up:stats().requests)
  end)

  it("a cache that fails is passed by", function()
    local bad = { get = function() error("down") end, set = function() error("down") end }
    local c = client{ cache = bad }
    local r = assert(c:chat(req{ temperature = 0 }))
    assert.is_nil(r.cached)
    assert.equal(2, c.stats.cache_errors)
  end)
end)

describe("per-consumer quotas", function()
  -- an in-process storage factory, recording the names it was given
  local function storage()
    local F = { names = {} }
    function F.budget(o) F.names[#F.names + 1] = o.name; return budget_mod.memory() end
    function F.ratelimit(o) F.names[#F.names + 1] = o.name; local l = limiter(); F[o.name] = l; return l end
    function F.semaphore(o) F.names[#F.names + 1] = o.name; local s = semaphore(o.n); F[o.name] = s; return s end
    return F
  end
  local KEY_A, KEY_B = "sk-live-AAAA-very-secret", "sk-live-BBBB-very-secret"

  it("give each consumer its own budget, limits and slots, named by a hash of the key", function()
    local F = storage()
    local probe = client()
    local W = require("slm.guard").prompt_tokens(req{ model = "gpt-4o-mini" }, "gpt-4o-mini") + 16
    local c = client{ quotas = slm.quotas{ storage = F, tokens = W, rpm = 100, tpm = 100000, concurrency = 2 } }
    probe = nil
    local a1 = assert(c:chat(req{ consumer = KEY_A }))
    local hex = core.sha256(KEY_A)
    assert.equal("consumer:" .. hex:sub(1, 12), a1.consumer)
    local _, err = c:chat(req{ consumer = KEY_A })
    assert.equal("budget", err.kind)
    assert.equal(a1.consumer, err.consumer)
    assert.matches("the consumer's budget exhausted", err.message)
    assert.is_table((c:chat(req{ consumer = KEY_B })))
    assert.equal(2, up:stats().requests)
    for _, n in ipairs(F.names) do
      assert.is_nil(n:find("AAAA", 1, true))
      assert.is_nil(n:find("BBBB", 1, true))
    end
    assert.equal("quota:" .. hex:sub(1, 24), F.names[1])
    local slots = F["quota:" .. hex:sub(1, 24) .. ":slots"]
    assert.equal(1, slots.acquired) -- the refused request never took a slot
    assert.equal(0, slots.held)
    assert.same({ 1 }, F["quota:" .. hex:sub(1, 24) .. ":rpm"].takes)
    assert.is_nil(tostring(err):find("AAAA", 1, true))
    assert.is_nil(probe)
  end)

  it("apply on top of the client's own budget; a refusal there holds nothing", function()
    local own = slm.budget{ tokens = 100000 }
    local c = client{ budget = own, quotas = slm.quotas{ storage = storage(), tokens = 1 } }
    local _, err = c:chat(req{ consumer = KEY_A })
    assert.equal("budget", err.kind)
    assert.equal(0, select(2, own:reserved()))
    assert.equal(0, select(2, own:spent()))
    assert.equal(0, up:stats().requests)
  end)

  it("a request without a consumer is refused; a consumer without quotas is only shown", function()
    local c = client{ quotas = slm.quotas{ storage = storage(), tokens = 1000 } }
    local _, err = c:chat(req())
    assert.equal("auth", err.kind)
    assert.equal(0, up:stats().requests)
    local r = assert(client():chat(req{ consumer = KEY_B }))
    assert.equal("consumer:" .. core.sha256(KEY_B):sub(1, 12), r.consumer)
  end)

  describe("beyond the consumers kept per worker", function()
    local Q = require "slm.quotas"
    local saved
    before_each(function() saved = Q.MAX_CACHED; Q.MAX_CACHED = 3 end)
    after_each(function() Q.MAX_CACHED = saved end)

    it("keep every consumer's objects when the storage is one's own (they are the state)", function()
      local q = slm.quotas{ storage = storage(), tokens = 1000 }
      local a = q:consumer(KEY_A)
      local id = assert(a.budget:reserve(0, 600))
      a.budget:settle(id, 0, 600)
      for i = 1, 10 do q:consumer("sk-other-" .. i) end
      local again = q:consumer(KEY_A)
      assert.equal(a, again)
      assert.equal(600, select(2, again.budget:spent()))
      assert.is_nil((again.budget:reserve(0, 600)))
    end)

    it("let go of idle ones with a storage that shares state, but not a budget's kept settles", function()
      local made = 0
      local F = { shares_state = true }
      function F.budget()
        made = made + 1
        local b = budget_mod.memory()
        b.unsettled = {}
        return b
      end
      local q = slm.quotas{ storage = F, tokens = 1000 }
      local a, b = q:consumer(KEY_A), q:consumer(KEY_B)
      a.budget.backend.unsettled[1] = { "kept", 0, 5 } -- a settle waiting for its storage
      for i = 1, 10 do q:consumer("sk-other-" .. i) end
      assert.equal(a, q:consumer(KEY_A))
      assert.are_not.equal(b, q:consumer(KEY_B))
      assert.is_true(q.ncached <= 3 + 1)
      assert.equal(13, made)
    end)
  end)

  it("raise on bad options", function()
    assert.has_error(function() slm.quotas{ storage = {}, tokens = 5 } end,
      "slm.quotas: the storage has no 'budget' constructor (needed for usd/tokens)")
    assert.has_error(function() slm.quotas{ storage = storage(), usdd = 5 } end, "slm.quotas: unknown option 'usdd'")
    assert.has_error(function() slm.quotas{ storage = storage(), period = "week" } end)
    assert.has_error(function() client():chat(req{ consumer = "" }) end)
  end)
end)

describe("a budget whose storage fails", function()
  it("refuses (kind budget, storage = true): nothing is sent", function()
    local backend = { reserve = function()
        return nil, slm.error("budget", "budget unavailable, request refused: slm.shdict.budget 'x': the shared "
          .. "dict failed: no memory", { storage = "shdict" })
      end,
      settle = function() end, totals = function() return 0, 0, 0, 0 end }
    local c = client{ budget = slm.budget{ tokens = 1000, backend = backend } }
    local _, err = c:chat(req())
    assert.equal("budget", err.kind)
    assert.equal("shdict", err.storage)
    assert.matches("no memory", err.message)
    assert.equal(0, up:stats().requests)
  end)
end)

describe("slm.shdict outside nginx", function()
  it("raises a clear error on construction", function()
    local OPTS = { budget = { name = "x" }, ratelimit = { name = "x", limit = 1 }, semaphore = { name = "x", n = 1 },
      store = {}, cache = {} }
    for ctor, o in pairs(OPTS) do
      o.dict = "slm"
      assert.has_error(function() slm.shdict[ctor](o) end,
        "slm.shdict." .. ctor .. ": slm.shdict works inside nginx only (lua_shared_dict); outside it "
          .. "use the in-process defaults or slm.redis")
    end
    assert.has_error(function() slm.shdict{ dict = "slm" } end)
  end)
end)

describe("the cache and quotas together", function()
  it("a request without its consumer is refused even when its reply is cached", function()
    local cache = memory_cache()
    local c = client{ cache = cache, quotas = slm.quotas{ storage = { budget = function() return budget_mod.memory() end },
      tokens = 100000 } }
    assert(c:chat(req{ temperature = 0, consumer = "sk-live-CCCC" }))
    assert.is_true(assert(c:chat(req{ temperature = 0, consumer = "sk-live-DDDD" })).cached)
    local _, err = c:chat(req{ temperature = 0 })
    assert.equal("auth", err.kind)
    assert.equal(1, up:stats().requests)
  end)
end)
