-- slm.redis inside nginx (resty.redis from Debian's lua-nginx-redis, its
-- keepalive pool) against a real redis-server: two nginx instances of two
-- workers each on one Redis, a batch job sharing their budget, a killed
-- worker's reservation returning after its expiry, session store and cache
-- round-trips, one Redis seen alike from nginx and from plain Lua.
--
-- The handlers use the budget backend directly and reach the simulator
-- through a proxied subrequest: the request is sent only when the
-- reservation was granted, so the simulator's `requests` counts exactly
-- the reservations that passed.
local slm = require "slm"
local H = require "tests.helpers"
local json = require "slm.json"
local upstream = require "tests.upstream.launch"
local redis_launch = require "tests.redis_launch"
local R = require "slm.shared.redis"

local PASSWORD = "ngx-Secret-Pw-77"
local srv, sim
local apps = {}

local function app_conf()
  return {
    http = ([[
      init_by_lua_block {
        REDIS = { host = "127.0.0.1", port = %d, password = %q, timeout = 1 }
        SIM_URL = %q
        require("slm").models["sim:delay=150"] = { context = 128000, max_output = 1000,
          input_per_m = 0.15, output_per_m = 0.60, tokenizer = "o200k_base", format = "openai" }
      }]]):format(srv.port, PASSWORD, sim.url),
    server = ([[
      location = /sim {
        internal;
        proxy_pass http://127.0.0.1:%d/v1/chat/completions;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
      }
      location = /reserve {
        content_by_lua_block {
          local cjson = require "cjson"
          local budget = require "slm.budget"
          local R = require "slm.shared.redis"
          local a = ngx.req.get_uri_args()
          local usd = tonumber(a.usd)
          local b = budget.new{ usd = tonumber(a.limit), backend = R.budget{ redis = REDIS, name = a.name,
            hold_ttl = tonumber(a.ttl) or 300 } }
          local r, err = b:reserve(usd, 10)
          if not r then
            ngx.say(cjson.encode{ kind = err.kind, message = tostring(err) })
            return
          end
          if a.hold then
            -- the holder "dies" holding it: the spec kills this worker
            ngx.say(cjson.encode{ pid = ngx.worker.pid() })
            ngx.flush(true)
            ngx.sleep(60)
            return
          end
          local res = ngx.location.capture("/sim", { method = ngx.HTTP_POST,
            body = cjson.encode{ model = "sim:delay=150", max_tokens = 5,
              messages = { { role = "user", content = "hello" } } } })
          b:settle(r, tonumber(a.spend) or usd / 2, 5)
          ngx.say(cjson.encode{ ok = true, status = res.status, pid = ngx.worker.pid() })
        }
      }
      location = /chat {
        content_by_lua_block {
          local cjson = require "cjson"
          local slm = require "slm"
          local a = ngx.req.get_uri_args()
          local c = slm.client{ base_url = SIM_URL, api_key = "sk-test", model = "sim:delay=150",
            max_retries = 0, timeout = 10,
            budget = slm.budget{ usd = tonumber(a.limit), backend = slm.redis.budget{ redis = REDIS, name = a.name } } }
          local res, err = c:chat{ max_tokens = 50,
            messages = { { role = "user", content = "My parcel arrived damaged, I want a refund." } } }
          ngx.say(cjson.encode{ ok = res ~= nil, kind = err and err.kind, message = err and tostring(err),
            cost = res and res.cost })
        }
      }
      location = /kv {
        content_by_lua_block {
          local cjson = require "cjson"
          local R = require "slm.shared.redis"
          local a = ngx.req.get_uri_args()
          local out = {}
          if a.what == "store" then
            local st = R.store{ redis = REDIS }
            local hist = { { role = "user", content = a.text }, { role = "assistant", content = "ok" } }
            out.saved = st:save(a.id, hist)
            local back = st:load(a.id)
            out.same = back ~= nil and back[1].content == a.text and #back == 2
            local none, nerr = st:load("nobody-" .. a.id)
            out.absent = none == nil and nerr == nil
          else
            local c = R.cache{ redis = REDIS, ttl = 60 }
            out.miss = c:get(a.id) == nil
            out.set = c:set(a.id, a.text)
            out.hit = c:get(a.id) == a.text
          end
          local down = R.cache{ redis = { port = 1, password = REDIS.password } }
          local v, err = down:get("x")
          out.down_kind = err and err.kind
          out.down_msg = err and tostring(err)
          ngx.say(cjson.encode(out))
        }
      }]]):format(sim.port),
  }
end

setup(function()
  srv = redis_launch.start{ quiet = true, password = PASSWORD }
  sim = H.upstream()
  for i = 1, 2 do apps[i] = upstream.start{ app = app_conf(), workers = 2, quiet = true } end
end)
teardown(function()
  for i = 1, #apps do apps[i]:stop() end
  if sim then sim:stop() end
  if srv then srv:stop() end
end)
before_each(function() sim:reset() end)

-- GET url from plain Lua through the libcurl runtime (yields inside tasks)
local function get(url)
  local rt = slm.runtime.get("curl")
  local c = rt.open{ url = url, method = "GET", timeout = 20 }
  local status = c:response()
  local parts = {}
  while true do
    local b = c:read()
    if not b then break end
    parts[#parts + 1] = b
  end
  return status, table.concat(parts)
end

local n = 0
local function name() n = n + 1; return "ngx" .. n .. "-" .. os.time() end

local function reserve_url(app, q)
  local parts = {}
  for k, v in pairs(q) do parts[#parts + 1] = k .. "=" .. ngx_escape(tostring(v)) end
  return app.base .. "/reserve?" .. table.concat(parts, "&")
end
function ngx_escape(s) return (s:gsub("[^%w%-%._]", function(c) return ("%%%02X"):format(c:byte()) end)) end

describe("slm.redis inside nginx", function()
  it("2 nginx instances x 2 workers on one Redis: of 30 concurrent requests against a budget covering 9, exactly 9 reach the simulator", function()
    local nm = name()
    local outcomes = {}
    slm.run(function()
      local ts = {}
      for i = 1, 30 do
        ts[i] = slm.spawn(function()
          local status, body = get(reserve_url(apps[i % 2 + 1], { name = nm, usd = 0.1, limit = 0.9 }))
          assert.are.equal(200, status)
          outcomes[i] = json.decode(body)
        end)
      end
      for i = 1, 30 do ts[i]:wait() end
    end)
    local ok, refused, pids = 0, 0, {}
    for i = 1, 30 do
      local o = outcomes[i]
      if o.ok then ok = ok + 1; pids[o.pid] = true else
        assert.are.equal("budget", o.kind, o.message)
        refused = refused + 1
      end
    end
    assert.are.equal(9, ok)
    assert.are.equal(21, refused)
    assert.are.equal(9, sim:stats().requests)
    -- the settled spend, seen from plain Lua on the same Redis
    local be = R.budget{ redis = srv.conf, name = nm }
    local su, _, hu = be:totals()
    assert.is_true(math.abs(su - 0.45) < 1e-9)
    assert.are.equal(0, hu)
  end)

  it("client:chat in 2 nginx instances: of 30 concurrent chats against a budget covering 9, exactly 9 reach the simulator, the rest get kind budget", function()
    local nm = name()
    slm.models["sim:delay=150"] = { context = 128000, max_output = 1000, input_per_m = 0.15, output_per_m = 0.60,
      tokenizer = "o200k_base", format = "openai" }
    local req = { model = "sim:delay=150", max_tokens = 50,
      messages = { { role = "user", content = "My parcel arrived damaged, I want a refund." } } }
    local worst = slm.cost(req.model, { prompt_tokens = slm.count(req, req.model), completion_tokens = 50 })
    slm.models["sim:delay=150"] = nil
    local outcomes = {}
    slm.run(function()
      local ts = {}
      for i = 1, 30 do
        ts[i] = slm.spawn(function()
          local _, body = get(apps[i % 2 + 1].base .. "/chat?name=" .. nm .. "&limit=" .. ("%.17g"):format(9.5 * worst))
          outcomes[i] = json.decode(body)
        end)
      end
      for i = 1, 30 do ts[i]:wait() end
    end)
    local ok, spent = 0, 0
    for i = 1, 30 do
      local o = outcomes[i]
      if o.ok then ok = ok + 1; spent = spent + o.cost else assert.are.equal("budget", o.kind, o.message) end
    end
    assert.are.equal(9, ok)
    assert.are.equal(9, sim:stats().requests)
    -- settled with the real usage: what the clients were charged is what Redis holds
    local su, _, hu = R.budget{ redis = srv.conf, name = nm }:totals()
    assert.is_true(math.abs(su - spent) < 1e-12)
    assert.are.equal(0, hu)
  end)

  it("a batch job and the nginx fleet share one budget: exactly k pass in all", function()
    local nm = name()
    local conf = { host = srv.host, port = srv.port, password = PASSWORD }
    local b = slm.budget{ usd = 0.8, backend = R.budget{ redis = conf, name = nm } }
    local batch_ok, ngx_ok = 0, 0
    -- the batch job takes 4 first; then both race for the other 4 (each
    -- pass is settled at its full reservation, so none comes back)
    for _ = 1, 4 do
      b:settle(assert(b:reserve(0.1, 10)), 0.1, 5)
      batch_ok = batch_ok + 1
    end
    slm.run(function()
      local ts = {}
      for i = 1, 24 do
        ts[i] = slm.spawn(function()
          if i % 2 == 0 then
            local r = b:reserve(0.1, 10)
            if r then
              batch_ok = batch_ok + 1
              slm.sleep(0.1)
              b:settle(r, 0.1, 5)
            end
          else
            local _, body = get(reserve_url(apps[i % 4 == 1 and 1 or 2], { name = nm, usd = 0.1, limit = 0.8, spend = 0.1 }))
            if json.decode(body).ok then ngx_ok = ngx_ok + 1 end
          end
        end)
      end
      for i = 1, 24 do ts[i]:wait() end
    end)
    assert.are.equal(8, batch_ok + ngx_ok)
    assert.is_true(batch_ok >= 4)
    assert.are.equal(ngx_ok, sim:stats().requests)
    -- every pass was charged its whole reservation: nothing came back
    assert.is_true(math.abs(b:spent() - 0.8) < 1e-9)
  end)

  -- n reservations of 0.1 on each instance, against a budget that has room
  local function all_pass(nm, n)
    for _ = 1, n do
      for i = 1, 2 do
        local status, body = get(reserve_url(apps[i], { name = nm, usd = 0.1, limit = 100 }))
        assert.are.equal(200, status)
        local o = json.decode(body)
        assert.is_true(o.ok, o.message)
      end
    end
  end

  it("reloads its scripts when Redis lost them (EVALSHA's NOSCRIPT: EVAL)", function()
    local nm = name()
    all_pass(nm, 4)
    srv:cli("SCRIPT", "FLUSH")
    all_pass(nm, 4)
  end)

  it("survives a Redis restart under nginx's pool: dead pooled connections are replaced", function()
    local nm = name()
    all_pass(nm, 6)
    local port = srv.port
    srv:stop()
    srv = redis_launch.start{ quiet = true, password = PASSWORD, port = port }
    all_pass(nm, 6)
  end)

  it("a killed worker's reservation returns after its expiry", function()
    local nm = name()
    local app = apps[1]
    local rt = slm.runtime.get("curl")
    -- the holder: reserves the whole budget, says its pid, and hangs
    -- (a 3 s hold: the kill, the wait and the next request fit in it on a loaded machine)
    local c = rt.open{ url = reserve_url(app, { name = nm, usd = 1, limit = 1, ttl = 3, hold = 1 }), timeout = 30 }
    assert.are.equal(200, c:response())
    local first = ""
    while not first:find("\n") do first = first .. assert(c:read()) end
    local pid = math.tointeger(json.decode(first).pid)
    assert.is_number(pid)
    assert.is_true(os.execute("kill -KILL " .. pid))
    c:cancel()
    for _ = 1, 100 do
      if not io.open("/proc/" .. pid .. "/stat") then break end
      slm.sleep(0.02)
    end
    assert.is_nil(io.open("/proc/" .. pid .. "/stat"))
    local _, body = get(reserve_url(apps[2], { name = nm, usd = 0.5, limit = 1, ttl = 1 }))
    assert.are.equal("budget", json.decode(body).kind)
    slm.sleep(3.2)
    _, body = get(reserve_url(apps[2], { name = nm, usd = 0.5, limit = 1, ttl = 1 }))
    assert.is_true(json.decode(body).ok)
    -- the master replaced the killed worker: the instance still answers
    local st = get(app.base .. "/__health")
    assert.are.equal(200, st)
  end)

  it("session store and cache round-trip through Redis, and errors carry no password", function()
    local _, body = get(apps[1].base .. "/kv?what=store&id=carol%40example.com&text=Bonjour")
    local o = json.decode(body)
    assert.is_true(o.saved); assert.is_true(o.same); assert.is_true(o.absent)
    assert.are.equal("connect", o.down_kind)
    assert.is_nil(o.down_msg:find(PASSWORD, 1, true))
    -- the session nginx wrote, read from plain Lua
    local st = R.store{ redis = srv.conf }
    local h = assert(st:load("carol@example.com"))
    assert.are.equal("Bonjour", h[1].content)
    _, body = get(apps[2].base .. "/kv?what=cache&id=req-77&text=cached%20answer")
    o = json.decode(body)
    assert.is_true(o.miss); assert.is_true(o.set); assert.is_true(o.hit)
    assert.are.equal("cached answer", R.cache{ redis = srv.conf }:get("req-77"))
  end)
end)
