-- Shared limits inside a real nginx with two workers (lua_shared_dict):
-- slm.shdict's budget, rate limit, semaphore, cache and session store
-- under slm.client (the cosocket transport), and per-consumer quotas,
-- against the simulator; what the workers share is only what is in the
-- dict.
local H = require "tests.helpers"
local launch = require "tests.upstream.launch"
local json = require "cjson"

local sim, app

-- (the ASan stage preloads its runtime for the Lua process: not for curl)
local CURL = "env -u LD_PRELOAD curl "

local function app_conf(sim_port)
  return {
    http = [[
    lua_shared_dict slm 16m;
    lua_shared_dict slm_test 1m;
    lua_shared_dict slm_tiny 100k;
    ]],
    server = ([=[
        set $sim_port %d;
        location ~ ^/(chat|worst|totals|clock|holder|keys|store|support|full|sem_hold|sem_try|zero|ttl|hold|clockback|settle_twice|cache_full)$ {
            content_by_lua_block { require("ngx_shared_app")[ngx.var[1]]() }
        }
    ]=]):format(sim_port),
  }
end

setup(function()
  sim = launch.start{ quiet = true }
  app = launch.start{ quiet = true, workers = 2, app = app_conf(sim.port) }
end)
teardown(function()
  if app then app:stop() end
  if sim then sim:stop() end
end)
before_each(function() sim:reset() end)

local function qs(t)
  local parts = {}
  for k, v in pairs(t) do parts[#parts + 1] = k .. "=" .. tostring(v) end
  table.sort(parts)
  return table.concat(parts, "&")
end

local function get(path, args)
  local url = app.base .. path .. (args and ("?" .. qs(args)) or "")
  local p = io.popen(CURL .. "-s --max-time 30 " .. H.q(url))
  local body = p:read("a")
  p:close()
  local ok, v = pcall(json.decode, body)
  assert(ok, "not JSON from " .. path .. ": " .. body .. "\n" .. app:error_log():sub(-2000))
  return v
end

-- n requests at once (curl --parallel): their decoded replies, in the
-- order of `list`.  Each transfer writes a file of its own: on one shared
-- stdout, a body that arrives in two pieces can be split by another's.
local function get_many(path, list)
  local dir = os.tmpname()
  os.remove(dir)
  assert(os.execute("mkdir -p " .. H.q(dir)))
  local args = {}
  for i, a in ipairs(list) do
    args[#args + 1] = "-o " .. H.q(dir .. "/" .. i) .. " " .. H.q(app.base .. path .. "?" .. qs(a))
  end
  os.execute(CURL .. "-s -Z --parallel-max 200 --max-time 60 " .. table.concat(args, " ") .. " 2>/dev/null")
  local out = {}
  for i = 1, #list do
    local f = io.open(dir .. "/" .. i, "rb")
    local body = f and f:read("a")
    if f then f:close() end
    os.remove(dir .. "/" .. i)
    out[i] = body and body:find("%S") and json.decode(body) or nil
    assert(out[i], "no reply to request " .. i .. " of " .. #list .. "\n" .. app:error_log():sub(-2000))
  end
  os.remove(dir)
  return out
end

local function count(list, f)
  local n = 0
  for _, v in ipairs(list) do if f(v) then n = n + 1 end end
  return n
end

local function worst(args) return get("/worst", args).worst end

-- Wait for the pid a handler marked as holding something, then SIGKILL it.
local function kill_holder(path, args)
  get("/holder", { clear = 1 })
  local bg = io.popen(CURL .. "-s --max-time 40 " .. H.q(app.base .. path .. "?" .. qs(args)) .. " 2>/dev/null; echo")
  local pid
  for _ = 1, 100 do
    pid = get("/holder").pid
    if pid then break end
    os.execute("env -u LD_PRELOAD sleep 0.05")
  end
  assert.is_number(pid)
  os.execute("env -u LD_PRELOAD kill -KILL " .. math.floor(pid))
  bg:close()
end

describe("slm.shdict budget across 2 workers", function()
  it("of N concurrent requests against a budget covering k, exactly k are sent", function()
    local W = worst{}
    -- which worker accepts is the kernel's choice: the cases go round
    -- again (3 rounds at most) until both workers answered and both sent
    local pids, sent_by = {}, {}
    for round = 1, 3 do
      for _, case in ipairs{ { n = 40, k = 7 }, { n = 25, k = 25 }, { n = 30, k = 1 } } do
        sim:reset()
        local name = "b" .. case.k .. "x" .. case.n .. "r" .. round
        local list = {}
        for i = 1, case.n do
          list[i] = { client = name, name = name, tokens = case.k * W, delay = 300 }
        end
        local out = get_many("/chat", list)
        assert.equal(case.k, count(out, function(r) return r.ok end))
        assert.equal(case.n - case.k, count(out, function(r) return r.kind == "budget" end))
        assert.equal(case.k, sim:stats().requests)
        for _, r in ipairs(out) do
          pids[r.pid] = true
          if r.ok then sent_by[r.pid] = true end
        end
        local t = get("/totals", { name = name })
        assert.equal(0, t.held_tokens)
        assert.is_true(t.spent_tokens > 0 and t.spent_tokens <= case.k * W)
      end
      if H.count_keys(sent_by) == 2 then break end
    end
    -- both workers answered, and both sent
    assert.equal(2, H.count_keys(pids))
    assert.equal(2, H.count_keys(sent_by))
  end)

  it("takes amounts of zero (a free model under a USD budget, take(0))", function()
    local r = get("/zero")
    assert.is_true(r.reserved, r.err)
    assert.is_true(r.take)
    assert.equal(10, r.spent)
  end)

  it("a USD budget: exactly k of N concurrent requests are sent, the real cost is spent", function()
    local w = get("/worst", {})
    local k, n = 5, 24
    local list = {}
    for i = 1, n do list[i] = { client = "usd", name = "usd", usd = k * w.worst_usd, delay = 200 } end
    local out = get_many("/chat", list)
    assert.equal(k, count(out, function(r) return r.ok end))
    assert.equal(n - k, count(out, function(r) return r.kind == "budget" end))
    assert.equal(k, sim:stats().requests)
    local t = get("/totals", { name = "usd" })
    assert.equal(0, t.held_usd)
    -- the real cost of k replies: below their worst case, above nothing
    assert.is_true(t.spent_usd > 0 and t.spent_usd < k * w.worst_usd * 0.9, tostring(t.spent_usd))
  end)

  it("a killed worker's reservation returns after hold_ttl", function()
    local W = worst{}
    local name = "killed"
    local args = { client = name, name = name, tokens = W, hold_ttl = 5 }
    -- (a 5 s hold: the kill and the requests that follow fit in it on a
    -- loaded machine)
    -- the holder: a request that waits on the simulator while its worker is killed
    kill_holder("/chat", { client = name, name = name, tokens = W, hold_ttl = 5, delay = 10000, mark = 1 })
    assert.equal(W, get("/totals", { name = name, hold_ttl = 5 }).held_tokens)
    -- still held: the budget refuses
    local r = get("/chat", args)
    assert.equal("budget", r.kind)
    os.execute("env -u LD_PRELOAD sleep 5.2")
    local t = get("/totals", { name = name, hold_ttl = 5 })
    assert.equal(0, t.held_tokens)
    assert.equal(0, t.spent_tokens)
    r = get("/chat", args)
    assert.is_true(r.ok, r.message)
  end)

  it("a period's totals start from zero at the UTC boundary (injected clock)", function()
    local W = worst{}
    local day1 = 1764719990 -- 2025-12-02 23:59:50 UTC
    get("/clock", { t = day1 })
    local args = { client = "daily", name = "daily", tokens = W, period = "day" }
    local r = get("/chat", args)
    assert.is_true(r.ok, r.message)
    local spent = r.tokens -- the real usage, below the worst case W
    assert.equal("budget", get("/chat", args).kind)
    assert.equal(spent, get("/totals", { name = "daily", period = "day" }).spent_tokens)
    get("/clock", { t = day1 + 20 }) -- the next day
    assert.equal(0, get("/totals", { name = "daily", period = "day" }).spent_tokens)
    assert.is_true(get("/chat", args).ok)
    assert.equal("budget", get("/chat", args).kind)
    get("/clock", { t = day1 + 5 }) -- the first day again: still spent
    assert.equal(spent, get("/totals", { name = "daily", period = "day" }).spent_tokens)
    -- a period's keys go a few days after it: its counters, and the queue
    -- and claim key of a hold never settled
    assert.is_true(get("/hold", { name = "daily", period = "day" }).held)
    for _, k in ipairs{ "u", "t", "hu", "q", "c:2" } do
      local ttl = get("/ttl", { key = "slm:b:daily:2025-12-02:" .. k }).ttl
      assert.is_true(ttl > 2 * 86400 and ttl <= 3 * 86400, k .. ": " .. tostring(ttl))
    end
    get("/clock")
  end)
end)

describe("a shared dict that is full", function()
  it("makes a budget refuse (fail closed) and a limiter and a semaphore report it", function()
    local r = get("/full")
    assert.is_false(r.sent)
    assert.equal("budget", r.kind)
    assert.equal("shdict", r.storage)
    assert.equal("budget unavailable, request refused: slm.shdict.budget 'full': the shared dict failed: no memory",
      r.message)
    assert.equal("slm: storage: slm.shdict.ratelimit 'full': the shared dict failed: no memory", r.limiter)
    assert.equal("slm: storage: slm.shdict.semaphore 'full': the shared dict failed: no memory", r.semaphore)
    assert.equal(0, sim:stats().requests)
  end)
end)

describe("a cache in a dict shared with a budget", function()
  it("never evicts the budget's counters: a full dict fails the cache's set instead", function()
    local r = get("/cache_full")
    assert.equal(0.25, r.spent_usd)
    assert.equal(20, r.spent_tokens)
    assert.is_true(r.stored > 0)
    assert.is_true(r.failed > 0)
    assert.equal("slm.shdict.cache: no memory", r.err)
  end)

  it("with evict = true makes room by the least recently used entries", function()
    local r = get("/cache_full", { evict = 1 })
    assert.equal(400, r.stored)
    assert.equal(0, r.failed)
    assert.is_true(r.newest)
    -- what evict = true is for: a dict of the cache's own; shared, it drops the counters
    assert.is_true(r.spent_usd ~= 0.25)
  end)
end)

describe("slm.shdict rate limit and semaphore across 2 workers", function()
  it("a shared rpm limit holds for the requests of both workers", function()
    local list = {}
    for i = 1, 9 do list[i] = { client = "rl", name = "rl", rpm = 3, per = 1 } end
    local out = get_many("/chat", list)
    local t = {}
    for i, r in ipairs(out) do
      assert.is_true(r.ok, r.message)
      t[i] = r.t1
    end
    table.sort(t)
    -- at most 3 sends in any second: the 4th is ~1 s after the 1st (t1 is
    -- when the reply was done, which a loaded machine can delay; without
    -- the limit all 9 are within a few ms)
    for i = 1, #t - 3 do assert.is_true(t[i + 3] - t[i] > 0.5, "too close: " .. (t[i + 3] - t[i])) end
    assert.equal(9, sim:stats().requests)
  end)

  it("a shared concurrency cap holds for both workers", function()
    local list = {}
    for i = 1, 12 do list[i] = { client = "sem", name = "sem", slots = 3, delay = 200 } end
    local out = get_many("/chat", list)
    for _, r in ipairs(out) do assert.is_true(r.ok, r.message) end
    assert.equal(3, sim:stats().max_in_flight)
    assert.equal(12, sim:stats().requests)
  end)

  it("a killed worker's slot comes back after the semaphore's ttl", function()
    -- (a 4 s ttl: the kill and the first try fit in it on a loaded machine)
    kill_holder("/sem_hold", { name = "semkill", ttl = 4 })
    local r = get("/sem_try", { name = "semkill", ttl = 4 })
    assert.is_false(r.ok)
    assert.equal("slm: timeout: slm.shdict.semaphore 'semkill': no slot free within 0.2s (all 1 taken)", r.err)
    os.execute("env -u LD_PRELOAD sleep 4")
    r = get("/sem_try", { name = "semkill", ttl = 4 })
    assert.is_true(r.ok, r.err)
    assert.equal(0, r.taken)
  end)
end)

describe("the response cache in a shared dict", function()
  local function chat(args)
    local a = { client = "cache", cache = 1 }
    for k, v in pairs(args) do a[k] = v end
    return get("/chat", a)
  end

  it("serves a second identical deterministic request without sending it, from either worker", function()
    local first = chat{ temperature = 0, text = "cache-one" }
    assert.is_true(first.ok, first.message)
    assert.is_false(first.cached)
    assert.equal(1, sim:stats().requests)
    local pids = { [first.pid] = true }
    -- batches of 20 at once until both workers answered (which one takes a
    -- connection is the kernel's choice)
    for _ = 1, 20 do
      local list = {}
      for i = 1, 20 do list[i] = { client = "cache", cache = 1, temperature = 0, text = "cache-one" } end
      for _, again in ipairs(get_many("/chat", list)) do
        assert.is_true(again.cached)
        assert.equal(first.text, again.text)
        assert.equal(0, again.tokens)
        pids[again.pid] = true
      end
      if H.count_keys(pids) == 2 then break end
    end
    assert.equal(1, sim:stats().requests)
    assert.equal(2, H.count_keys(pids))
    -- another body is another entry
    assert.is_false(chat{ temperature = 0, text = "cache-two" }.cached)
    assert.equal(2, sim:stats().requests)
  end)

  it("never caches a request that is not deterministic", function()
    for _ = 1, 3 do assert.is_false(chat{ text = "cache-random" }.cached) end
    for _ = 1, 2 do assert.is_false(chat{ temperature = 0.7, text = "cache-random" }.cached) end
    assert.equal(5, sim:stats().requests)
  end)

  it("caches a stream once it completed and replays it, streamed or not", function()
    local s1 = chat{ temperature = 0, text = "cache-stream", stream = 1 }
    assert.is_true(s1.ok, s1.message)
    assert.is_false(s1.cached)
    assert.is_true(s1.deltas > 1)
    local s2 = chat{ temperature = 0, text = "cache-stream", stream = 1 }
    assert.is_true(s2.cached)
    assert.equal(1, s2.deltas)
    assert.equal(s1.text, s2.text)
    local plain = chat{ temperature = 0, text = "cache-stream" }
    assert.is_true(plain.cached)
    assert.equal(s1.text, plain.text)
    assert.equal(1, sim:stats().requests)
  end)

  it("never caches a cut stream, a stream stopped by the caller, or an error", function()
    for _, extra in ipairs{ "eof_mid", "reset", "status=500" } do
      for _ = 1, 2 do
        local r = chat{ temperature = 0, text = "cache-cut", stream = 1, extra = extra }
        assert.is_false(r.ok)
      end
    end
    for _ = 1, 2 do
      local r = chat{ temperature = 0, text = "cache-stopped", stream = 1, stop = 1 }
      assert.is_false(r.cached)
      assert.equal(1, r.deltas)
    end
    assert.equal(8, sim:stats().requests)
  end)
end)

describe("per-consumer quotas", function()
  local core = require "slm.core"
  local KEY_A, KEY_B = "sk-live-consumer-AAAA-0001", "sk-live-consumer-BBBB-0002"

  it("give each consumer its own budget, named by a hash of its key", function()
    local W = worst{}
    local args = { client = "quotas", name = "q1", quota_tokens = W }
    local function with(key)
      local t = { consumer = key }
      for k, v in pairs(args) do t[k] = v end
      return get("/chat", t)
    end
    local a1 = with(KEY_A)
    assert.is_true(a1.ok, a1.message)
    assert.equal("consumer:" .. core.sha256(KEY_A):sub(1, 12), a1.consumer)
    local a2 = with(KEY_A)
    assert.equal("budget", a2.kind)
    assert.equal(a1.consumer, a2.consumer)
    local b1 = with(KEY_B)
    assert.is_true(b1.ok, b1.message)
    assert.equal("consumer:" .. core.sha256(KEY_B):sub(1, 12), b1.consumer)
    assert.equal("budget", with(KEY_B).kind)
    assert.equal(2, sim:stats().requests)
    -- the keys appear nowhere: not in the dict's keys or values, not in errors
    local all = get("/keys")
    local dump = table.concat(all.keys, "\n") .. table.concat(all.values, "\n")
    assert.truthy(dump:find(core.sha256(KEY_A):sub(1, 24), 1, true))
    assert.is_nil(dump:find("consumer-AAAA", 1, true))
    assert.is_nil(dump:find("consumer-BBBB", 1, true))
    assert.is_nil(a2.message:find("AAAA", 1, true))
    assert.is_nil(app:error_log():find("AAAA", 1, true))
    -- no consumer on a client with quotas: refused
    local none = get("/chat", args)
    assert.equal("auth", none.kind)
  end)

  it("give each consumer its own slots, shared by both workers", function()
    local list = {}
    for i = 1, 12 do
      list[i] = { client = "qslots", name = "qslots", quota_slots = 1, delay = 150,
        consumer = i % 2 == 0 and KEY_A or KEY_B }
    end
    local out = get_many("/chat", list)
    for _, r in ipairs(out) do assert.is_true(r.ok, r.message) end
    -- one slot each: two requests in flight at most, one per consumer
    assert.equal(2, sim:stats().max_in_flight)
    assert.equal(12, sim:stats().requests)
  end)
end)

describe("session store in a shared dict", function()
  it("round-trips a history and reports a full dict", function()
    local r = get("/store")
    assert.is_true(r.saved)
    assert.is_true(r.same)
    assert.is_true(r.missing)
    assert.is_true(r.deleted)
    assert.is_true(r.gone)
    assert.equal("slm.store: shdict store 'slm_tiny': cannot save: no memory", r.full_error)
    assert.is_true(r.saved_n > 5)
    assert.equal(r.saved_n, r.loaded_n)
    assert.equal("slm.store: shdict store 'slm_tiny': cannot save: no memory", r.fill_error)
  end)

  it("keeps the support bot's sessions for both workers", function()
    -- 10 sessions, the turns of all sessions at once: the turns of a
    -- session land on either worker. Which worker accepts is the kernel's
    -- choice, so turns go on (3 at least, 10 at most) until some session
    -- has had turns on both.
    local N, by_session, crossed = 10, {}, 0
    for turn = 1, 10 do
      local list = {}
      for i = 1, N do
        list[i] = { sid = "user" .. i .. "@example.com",
          text = turn == 1 and "When%20will%20my%20parcel%20arrive%3F" or "And%20returns%3F" }
      end
      -- (the replies come in the order they finished: each names its session)
      for _, r in ipairs(get_many("/support", list)) do
        assert.is_nil(r.error)
        assert.equal(2 * turn, r.history)
        assert.equal("When will my parcel arrive?", r.first)
        by_session[r.sid] = by_session[r.sid] or {}
        by_session[r.sid][r.pid] = true
      end
      crossed = 0
      for _, pids in pairs(by_session) do if H.count_keys(pids) == 2 then crossed = crossed + 1 end end
      assert.equal(N, H.count_keys(by_session))
      if turn >= 3 and crossed > 0 then break end
    end
    assert.is_true(crossed > 0, "no session had turns on both workers")
    -- sessions are named by a hash of their id (the document inside keeps it)
    local keys = table.concat(get("/keys").keys, "\n")
    assert.truthy(keys:find("t:sup:" .. require("slm.core").sha256("user1@example.com"), 1, true))
    assert.is_nil(keys:find("@example.com", 1, true))
  end)
end)

describe("shared limits on a clock that goes back", function()
  it("keep a rate limit's window and a dead holder's slot for their own time, not the hour the clock went back", function()
    local r = get("/clockback", { name = "clockback" .. os.time() })
    assert.is_nil(r.err)
    -- per = 10 and ttl = 10: from the moment the clock went back, about 10 s
    assert.is_true(r.rate_wait <= 11.5, "the rate limit waited " .. r.rate_wait .. " s")
    assert.is_true(r.sem_wait <= 11.5, "the slot came back after " .. r.sem_wait .. " s")
  end)
end)

describe("a shared-dict budget backend's settle", function()
  it("is idempotent: settled twice, a live or an expired hold is charged once", function()
    local r = get("/settle_twice", { name = "twice" .. os.time() })
    assert.are.same({ spent_usd = 0.5, spent_tokens = 40, held_usd = 0, held_tokens = 0 }, r)
  end)
end)
