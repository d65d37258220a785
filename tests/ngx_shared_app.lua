-- tests/ngx_shared_app.lua: the handlers of tests/ngx_shared_spec.lua's
-- nginx (two workers, lua_shared_dict slm): slm.client with shared
-- budgets, limits, slots, a cache and quotas from slm.shdict, talking to
-- the simulator ($sim_port) over the cosocket transport.  Each worker
-- makes its own client per configuration; what they share lives in the
-- dict.
local slm = require "slm"
local json = require "slm.json"

local F = slm.shdict
local T = ngx.shared.slm_test
local A = {}

-- the clock of the specs' periods: the dict's "clock" when set
local function clock() return T:get("clock") or ngx.now() end

local clients = {}

local function num(v) return v and tonumber(v) end

-- a client of the simulator, `o` on top
local function sim_client(o)
  local all = { base_url = "http://127.0.0.1:" .. ngx.var.sim_port .. "/v1", api_key = "sk-test-app-0001",
    max_retries = 0, timeout = 30 }
  for k, v in pairs(o or {}) do all[k] = v end
  return slm.client(all)
end

local function client_for(a)
  local key = ngx.var.arg_client or "plain"
  local c = clients[key]
  if c then return c end
  local o = {}
  if a.tokens or a.usd then
    o.budget = slm.budget{ tokens = num(a.tokens), usd = num(a.usd),
      backend = F.budget{ dict = "slm", name = a.name, hold_ttl = num(a.hold_ttl), period = a.period, now = clock } }
  end
  if a.rpm then o.rpm = F.ratelimit{ dict = "slm", name = a.name .. ":rpm", limit = num(a.rpm), per = num(a.per) } end
  if a.slots then o.max_concurrency = F.semaphore{ dict = "slm", name = a.name .. ":slots", n = num(a.slots),
    ttl = num(a.ttl) } end
  if a.cache then o.cache = F.cache{ dict = "slm" } end
  if a.quota_tokens or a.quota_slots then
    o.quotas = slm.quotas{ storage = F, storage_options = { dict = "slm", now = clock }, name = a.name,
      tokens = num(a.quota_tokens), concurrency = num(a.quota_slots) }
  end
  c = sim_client(o)
  clients[key] = c
  return c
end

local function reply(t)
  ngx.header["Content-Type"] = "application/json"
  ngx.say(json.encode(t))
end

-- GET /chat?client=..&name=..&tokens=..&delay=ms&...: one chat call
function A.chat()
  local a = ngx.req.get_uri_args()
  local c = client_for(a)
  local req = { model = "sim:delay=" .. (a.delay or "0") .. (a.extra and ("," .. a.extra) or ""), max_tokens = num(a.max_tokens) or 16,
    messages = { { role = "user", content = a.text or "hello there" } } }
  if a.temperature then req.temperature = num(a.temperature) end
  if a.consumer then req.consumer = a.consumer end
  if a.mark then T:set("holder", ngx.worker.pid()) end
  if not slm.models[req.model] then -- priced, for USD budgets
    slm.models[req.model] = { context = 128000, max_output = 1000, input_per_m = 0.15, output_per_m = 0.60,
      tokenizer = "o200k_base", format = "openai" }
  end
  ngx.update_time()
  local t0 = ngx.now()
  local deltas = 0
  local res, err
  if a.stream then
    req.stream = true
    req.on_delta = function()
      deltas = deltas + 1
      if a.stop then return false end
    end
  end
  res, err = c:chat(req)
  ngx.update_time()
  reply{ ok = res ~= nil, kind = err and err.kind or nil, message = err and tostring(err) or nil,
    text = res and res.text or nil, cached = res and res.cached or false, deltas = deltas,
    consumer = (res or err).consumer, t0 = t0, t1 = ngx.now(), pid = ngx.worker.pid(),
    tokens = res and res.usage.total_tokens or nil }
end

-- GET /worst?max_tokens=..&text=..: the worst case a chat reserves
function A.worst()
  local a = ngx.req.get_uri_args()
  local body = { model = "sim:delay=0", messages = { { role = "user", content = a.text or "hello there" } } }
  local n = require("slm.guard").prompt_tokens(body, body.model)
  local out = num(a.max_tokens) or 16
  reply{ worst = n + out, worst_usd = (n * 0.15 + out * 0.60) / 1e6 }
end

-- GET /totals?name=..&period=..: the shared budget's figures
function A.totals()
  local a = ngx.req.get_uri_args()
  local b = F.budget{ dict = "slm", name = a.name, period = a.period, hold_ttl = num(a.hold_ttl), now = clock }
  local su, st, hu, ht = b:totals()
  reply{ spent_usd = su, spent_tokens = st, held_usd = hu, held_tokens = ht }
end

-- POST /clock?t=..: move the specs' clock (no t: back to ngx.now)
function A.clock()
  local t = num(ngx.var.arg_t)
  if t then T:set("clock", t) else T:delete("clock") end
  reply{ ok = true }
end

-- GET /holder: the pid marked by a handler holding something (clear=1: forget it)
-- GET /hold?name=..&period=..: a reservation never settled (as a dead holder leaves it)
function A.hold()
  local a = ngx.req.get_uri_args()
  local b = slm.budget{ tokens = 1000, backend = F.budget{ dict = "slm", name = a.name, period = a.period,
    now = clock } }
  reply{ held = b:reserve(0, 1) ~= nil }
end

-- GET /ttl?key=..: the seconds a key of the dict has left (0: for ever)
function A.ttl() reply{ ttl = ngx.shared.slm:ttl(ngx.var.arg_key) } end

function A.holder()
  if ngx.var.arg_clear then T:delete("holder") end
  reply{ pid = T:get("holder") }
end

-- GET /keys: every key of the dict and every string value (queues too), to look for secrets
function A.keys()
  local keys = ngx.shared.slm:get_keys(0)
  local items = {}
  for _, k in ipairs(keys) do
    local v = ngx.shared.slm:get(k)
    if type(v) == "string" then items[#items + 1] = v end
  end
  local q = ngx.shared.slm
  for _, k in ipairs(keys) do
    if k:sub(-1) == "q" then
      for _ = 1, q:llen(k) or 0 do
        local v = q:rpop(k)
        items[#items + 1] = v
        q:lpush(k, v)
      end
    end
  end
  reply{ keys = keys, values = items }
end

-- GET /store: a session store's round trip and errors in this worker
function A.store()
  local s = F.store{ dict = "slm", prefix = "t:s:" }
  local tiny = F.store{ dict = "slm_tiny" }
  local h = { { role = "user", content = "héllo" }, { role = "assistant", content = "hi", extra = { 1, 2 } } }
  local out = {}
  out.saved = s:save("ann@example.com", h)
  local back = s:load("ann@example.com")
  out.same = back and back[1].content == "héllo" and back[2].extra[2] == 2 and #back == 2
  out.missing = s:load("nobody") == nil
  out.deleted = s:delete("ann@example.com")
  out.gone = s:load("ann@example.com") == nil
  ngx.shared.slm_tiny:flush_all()
  local _, err = tiny:save("big", { { role = "user", content = string.rep("x", 200 * 1024) } })
  out.full_error = err
  -- sessions until the dict is full: every one saved still loads (none evicted)
  local saved, ferr = 0, nil
  for i = 1, 1000 do
    local ok, e = tiny:save("user-" .. i, { { role = "user", content = string.rep("y", 2000) } })
    if not ok then ferr = e; break end
    saved = i
  end
  local loaded = 0
  for i = 1, saved do if tiny:load("user-" .. i) then loaded = loaded + 1 end end
  out.saved_n, out.loaded_n, out.fill_error = saved, loaded, ferr
  ngx.shared.slm_tiny:flush_all()
  reply(out)
end

-- GET /full: with slm_tiny full, a shared budget refuses (fails closed),
-- a limiter and a semaphore report the dict's error
function A.full()
  local d = ngx.shared.slm_tiny
  d:flush_all()
  local i = 0
  for _, size in ipairs{ 4096, 512, 64, 8, 0 } do -- every slab size full
    repeat i = i + 1 until not d:safe_set("f" .. i, string.rep("x", size))
  end
  local c = sim_client{ budget = slm.budget{ tokens = 100000, backend = F.budget{ dict = "slm_tiny", name = "full" } } }
  local res, err = c:chat{ model = "sim:delay=0", messages = { { role = "user", content = "hi" } }, max_tokens = 8 }
  local lok, lerr = F.ratelimit{ dict = "slm_tiny", name = "full", limit = 5 }:take(1)
  local tok, serr = F.semaphore{ dict = "slm_tiny", name = "full", n = 5 }:acquire(nil, 1)
  d:flush_all()
  reply{ sent = res ~= nil, kind = err and err.kind, storage = err and err.storage, message = err and err.message,
    limiter = lok or tostring(lerr), semaphore = tok and "token" or tostring(serr) }
end

-- GET /cache_full?evict=1: a budget and a cache in one small dict; the
-- budget records a spend, then the cache is filled far beyond the dict's
-- size.  What the budget still knows it spent, and what the cache did.
function A.cache_full()
  local d = ngx.shared.slm_tiny
  d:flush_all()
  local t = 1.7e9
  local be = F.budget{ dict = "slm_tiny", name = "cf", now = function() return t end }
  local r = assert(be:reserve(0.5, 50, 10, 1000))
  be:settle(r, 0.25, 20)
  local c = F.cache{ dict = "slm_tiny", evict = ngx.var.arg_evict == "1" or nil }
  local stored, failed, last = 0, 0, nil
  for i = 1, 400 do
    local ok, err = c:set("k" .. i, string.rep("v", 1000))
    if ok then stored = stored + 1 else failed, last = failed + 1, err end
  end
  local su, st = be:totals()
  local newest = c:get("k" .. stored) ~= nil
  d:flush_all()
  reply{ spent_usd = su, spent_tokens = st, stored = stored, failed = failed, err = last, newest = newest }
end

-- GET /sem_hold?name=..&ttl=..: take the only slot and keep it (the spec
-- kills this worker meanwhile); GET /sem_try: try for a moment
function A.sem_hold()
  local a = ngx.req.get_uri_args()
  local s = F.semaphore{ dict = "slm", name = a.name, n = 1, ttl = num(a.ttl) }
  local tok = s:acquire(nil, 1)
  T:set("holder", ngx.worker.pid())
  ngx.sleep(30)
  s:release(tok)
  reply{ ok = true }
end
function A.sem_try()
  local a = ngx.req.get_uri_args()
  local s = F.semaphore{ dict = "slm", name = a.name, n = 1, ttl = num(a.ttl) }
  local tok, err = s:acquire(nil, 0.2)
  if tok then s:release(tok) end
  reply{ ok = tok ~= nil, err = err and tostring(err), taken = s:taken() }
end

-- GET /zero: amounts of 0 (a free model under a USD budget, take(0))
function A.zero()
  local b = slm.budget{ usd = 1, tokens = 100, backend = F.budget{ dict = "slm", name = "zero" } }
  local r, err = b:reserve(0, 10)
  if r then b:settle(r, 0, 10) end
  local lim = F.ratelimit{ dict = "slm", name = "zero", limit = 1 }
  reply{ reserved = r ~= nil, err = err and tostring(err), take = lim:take(0), spent = select(2, b:spent()) }
end

-- GET /clockback?name=..: a rate limit's window and a semaphore's slot
-- whose holder died, on a clock that goes back an hour after they were
-- taken: how long (on that clock) until the window lets one more through
-- and the slot comes back
function A.clockback()
  local name = ngx.var.arg_name
  local t = 1.7e9
  local rt = { now = function() return t end, sleep = function(s) t = t + s end }
  local lim = F.ratelimit{ dict = "slm", name = name .. ":rpm", limit = 3, per = 10, now = rt.now }
  for _ = 1, 3 do assert(lim:take(1, rt)) end
  local sem = F.semaphore{ dict = "slm", name = name .. ":slots", n = 1, ttl = 10, now = rt.now }
  assert(sem:acquire(rt, 0)) -- its holder dies with it
  t = t - 3600
  local t0 = t
  -- (the loops stop a little after an hour: what the clock went back)
  local rt_stop = { now = rt.now, sleep = function(s)
    if t - t0 > 4000 then error("still waiting after " .. (t - t0) .. " s", 0) end
    t = t + s
  end }
  local ok, taken = pcall(lim.take, lim, 1, rt_stop)
  local rate_wait, errs = t - t0, {}
  if not ok or taken ~= true then errs[#errs + 1] = "take: " .. tostring(taken) end
  t0 = t
  local tok
  ok, tok = pcall(sem.acquire, sem, rt_stop, nil)
  local sem_wait = t - t0
  if ok and type(tok) == "table" then sem:release(tok) else errs[#errs + 1] = "acquire: " .. tostring(tok) end
  reply{ rate_wait = rate_wait, sem_wait = sem_wait, err = errs[1] and table.concat(errs, "; ") or nil }
end

-- GET /settle_twice?name=..: the backend's own settle, twice (a caller
-- retrying it), once for a live hold and once for one that expired
function A.settle_twice()
  local name = ngx.var.arg_name
  local t = 1.7e9
  local be = F.budget{ dict = "slm", name = name, hold_ttl = 10, now = function() return t end }
  local r1 = assert(be:reserve(0.5, 50, 10, 1000))
  be:settle(r1, 0.25, 20)
  be:settle(r1, 0.25, 20)
  local r2 = assert(be:reserve(0.5, 50, 10, 1000))
  t = t + 11
  be:totals() -- the sweep gives r2's hold back
  be:settle(r2, 0.25, 20) -- its late settle still charges it, once
  be:settle(r2, 0.25, 20)
  local su, st, hu, ht = be:totals()
  reply{ spent_usd = su, spent_tokens = st, held_usd = hu, held_tokens = ht }
end

-- GET /support?sid=..&text=..: one turn of a support bot whose sessions
-- live in the dict (each worker has its own bot)
local bot
function A.support()
  local a = ngx.req.get_uri_args()
  if not bot then
    bot = slm.support.new{
      client = sim_client{ model = "gpt-4o-mini" },
      knowledge = { { id = "faq-1", title = "Delivery", text = "Parcels arrive within 3 working days." },
        { id = "faq-2", title = "Returns", text = "You can return an item within 30 days." } },
      store = F.store{ dict = "slm", prefix = "t:sup:" },
    }
  end
  local res = bot:reply(a.sid, a.text)
  local h = bot:history(a.sid)
  reply{ text = res.text, error = res.error and tostring(res.error) or nil, history = h and #h or nil,
    pid = ngx.worker.pid(), sid = a.sid, first = h and h[1] and h[1].content or nil }
end

return A
