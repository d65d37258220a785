-- The client under a hostile user, round 2: many tasks sharing one client
-- (streams closed from other tasks, callbacks raising, retries and
-- fallback interleaved) must give back every slot, budget hold and
-- rate-limit unit; every attempt is billed once; options that are hostile
-- values (huge numbers, tables whose metamethods raise) are refused with
-- an error naming the option, never a traceback from inside.
local slm = require "slm"
local H = require "tests.helpers"
local json = require "slm.json"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)

local HERMES = "nousresearch/hermes-3-llama-3.1-405b"

local keys = 0
local function key()
  keys = keys + 1
  return ("h2-%d-%d-%d"):format(keys, os.time(), math.random(1e9))
end

-- A runtime that is the libcurl one except for open(): every attempt gets
-- the same scripted SSE body, in one read, with `headers`.
local function scripted_runtime(body, headers)
  local curl = require("slm.runtime").get("curl")
  local rt = setmetatable({}, { __index = curl })
  rt.opened = 0
  rt.open = function()
    rt.opened = rt.opened + 1
    local n = 0
    return {
      response = function() return 200, headers end,
      read = function() n = n + 1; if n == 1 then return body end return nil end,
      result = function() return true end,
      cancel = function() end,
    }
  end
  return rt
end

local function chunk_event(text)
  return "data: " .. json.encode{ id = "chatcmpl-x", object = "chat.completion.chunk", model = "gpt-4o-mini",
    choices = { { index = 0, delta = { role = "assistant", content = text } } } } .. "\n\n"
end

describe("many tasks sharing one client give back everything they hold", function()
  it("slots, budget holds and rate-limit units, with closes, raises, retries and fallbacks mixed", function()
    local b = slm.budget{ usd = 1 }
    local c = H.sim_client(up, { max_concurrency = 2, budget = b, rpm = 6000, max_retries = 1,
      fallback = { HERMES } })
    local billed = { cost = 0, prompt = 0, completion = 0 }
    local function add(x)
      local bl = x and x.billed
      if bl then
        billed.cost = billed.cost + (bl.cost or 0)
        billed.prompt = billed.prompt + bl.prompt_tokens
        billed.completion = billed.completion + bl.completion_tokens
      end
    end
    local items = {}
    for i = 1, 18 do items[i] = i end
    local results, errs = slm.map(items, function(i)
      local kind = i % 6
      local hdr = { ["X-Sim-Key"] = key() }
      local r, e
      if kind == 0 then -- closed by another task mid-stream
        hdr["X-Sim-Scenario"] = "slow_chunks=30,chunks=20"
        local s = c:stream{ messages = H.msgs("s" .. i), headers = hdr }
        slm.spawn(function() slm.sleep(0.05); s:close() end)
        for _ in s do end
        r, e = s:result()
      elseif kind == 1 then -- retried, then the fallback model
        hdr["X-Sim-Scenario"] = "status=503,fail=2"
        r, e = c:chat{ messages = H.msgs("f" .. i), headers = hdr, stream = (i % 2 == 1) }
      elseif kind == 2 then -- connection dropped mid-stream
        hdr["X-Sim-Scenario"] = "reset"
        r, e = c:chat{ messages = H.msgs("r" .. i), headers = hdr, stream = true, fallback = false }
      elseif kind == 3 then -- on_delta raises: the raise is all the caller gets
        hdr["X-Sim-Scenario"] = "slow_chunks=10"
        local n = 0
        return c:chat{ messages = H.msgs("raise " .. i), headers = hdr,
          on_delta = function() n = n + 1; if n == 2 then error("delta boom") end end }
      elseif kind == 4 then
        hdr["X-Sim-Scenario"] = "error_chunk"
        r, e = c:chat{ messages = H.msgs("e" .. i), headers = hdr, stream = true }
      else
        r, e = c:chat{ messages = H.msgs("ok " .. i), headers = hdr, n = 2 }
      end
      add(r); add(e)
      return r, e
    end, { concurrency = 6 })
    for i = 1, 18 do
      local kind = i % 6
      if kind == 1 or kind == 5 then assert.is_table(results[i], tostring(errs[i])) end
      if kind == 0 then assert.equal("cancelled", errs[i].kind) end
      if kind == 3 then assert.matches("delta boom", tostring(errs[i])) end
    end
    assert.equal(2, c.sem.free)
    assert.equal(0, #c.sem.queue)
    local held_usd, held_tokens = b:reserved()
    assert.equal(0, held_usd)
    assert.equal(0, held_tokens)
    local spent_usd, spent_tokens = b:spent()
    assert.near(c.stats.cost, spent_usd, 1e-12)
    assert.equal(c.stats.prompt_tokens + c.stats.completion_tokens, spent_tokens)
    -- every call that returned accounts for its share; the raised ones (3
    -- of 18) were billed too, so the stats hold at least the sum
    assert.is_true(c.stats.cost >= billed.cost - 1e-12)
    assert.is_true(c.stats.prompt_tokens > billed.prompt)
    assert.is_true(c.rpm_bucket.level >= 0)
  end)

  it("a stream closed while its budget reservation is being made gives the hold back", function()
    local inner = slm.budget{ usd = 1 }
    -- a shared budget's reserve yields (Redis, a shared dict with a lock)
    local slow = {
      reserve = function(_, usd, tokens, model) slm.sleep(0.1); return inner:reserve(usd, tokens, model) end,
      settle = function(_, r, usd, tokens) return inner:settle(r, usd, tokens) end,
    }
    local c = H.sim_client(up, { budget = slow })
    local res, err
    slm.run(function()
      local s = c:stream{ messages = H.msgs("hello") }
      slm.spawn(function() slm.sleep(0.03); s:close() end)
      for _ in s do end
      res, err = s:result()
    end)
    assert.is_nil(res)
    assert.equal("cancelled", err.kind)
    local usd, tokens = inner:reserved()
    assert.equal(0, usd)
    assert.equal(0, tokens)
  end)
end)

describe("every attempt is billed once", function()
  -- an attempt whose stream failed before anything reached the caller is
  -- billed (prompt + what arrived), then retried after a backoff
  local body = chunk_event("Hello world, this is some text")
    .. 'data: {"error":{"message":"boom","type":"server_error"}}\n\n'
  local headers = { ["content-type"] = "text/event-stream", ["x-should-retry"] = "true" }

  local function run(close)
    local b = slm.budget{ usd = 1 }
    local rt = scripted_runtime(body, headers)
    local c = slm.client{ base_url = "http://127.0.0.1:1/v1", api_key = "sk-x", transport = rt, budget = b,
      max_retries = 1 }
    local err
    slm.run(function()
      local s = c:stream{ messages = H.msgs("hello there") }
      if close then slm.spawn(function() slm.sleep(0.1); s:close() end) end
      for _ in s do end
      local _
      _, err = s:result()
    end)
    return err, c, b, rt
  end

  it("a stream closed during the backoff after a billed attempt is not billed for it again", function()
    local whole, c2 = run(false) -- both attempts made: twice one attempt's bill
    assert.equal(2, whole.attempts)
    local one = whole.billed.prompt_tokens / 2
    local err, c, b, rt = run(true)
    assert.equal(1, rt.opened)
    assert.equal("cancelled", err.kind)
    assert.equal(one, err.billed.prompt_tokens)
    assert.equal(whole.billed.completion_tokens / 2, err.billed.completion_tokens)
    assert.near(whole.billed.cost / 2, err.billed.cost, 1e-15)
    assert.equal(one, c.stats.prompt_tokens)
    assert.near(c2.stats.cost / 2, c.stats.cost, 1e-15)
    local usd, tokens = b:spent()
    assert.near(err.billed.cost, usd, 1e-15)
    assert.equal(err.billed.total_tokens, tokens)
  end)

  it("a fallback's answer is priced at the model that answered, each model reserving its own worst case", function()
    local b = slm.budget{ usd = 1 }
    local c = H.sim_client(up, { fallback = { HERMES }, max_retries = 0, budget = b,
      headers = { ["X-Sim-Scenario"] = "status=503,fail=1", ["X-Sim-Key"] = key() } })
    local res = assert(c:chat{ messages = H.msgs("hello there") })
    assert.equal(HERMES, res.model)
    assert.near(slm.cost(HERMES, res.usage), res.cost, 1e-15)
    assert.near(res.cost, res.billed.cost, 1e-15)
    assert.near(res.cost, (b:spent()), 1e-15)
    assert.equal(0, (b:reserved()))
    assert.equal(1, #res.fallback_errors)
  end)

  it("result() twice gives the same Response, counted once", function()
    local c = H.sim_client(up)
    local s = c:stream{ messages = H.msgs("twice") }
    local a = assert(s:result())
    assert.equal(a, s:result())
    assert.equal(1, c.stats.requests)
    assert.near(a.cost, c.stats.cost, 1e-15)
  end)
end)

describe("hostile option values", function()
  local c
  before_each(function() c = H.sim_client(up) end)

  -- a table whose every metamethod raises
  local evil = setmetatable({}, {
    __index = function() error("EVIL INDEX") end, __newindex = function() error("EVIL NEWINDEX") end,
    __pairs = function() error("EVIL PAIRS") end, __len = function() error("EVIL LEN") end,
    __tostring = function() error("EVIL TOSTRING") end,
  })

  -- LuaJIT honours neither __pairs nor __len on tables: there such a table
  -- reads as the empty table it is, and may be taken
  local HONOURS_PAIRS = not pcall(function() for _ in pairs(evil) do end end)

  local function refused(pattern, f, ...)
    local ok, err = pcall(f, ...)
    assert.is_false(ok)
    assert.is_string(err)
    -- raised by us, naming the option: not from inside our code or the user's metamethod
    assert.is_nil(err:find("slm/[%w/]+%.lua:%d+:"), err)
    assert.is_nil(err:find("^[^:]*spec%.lua:%d+: EVIL"), err)
    assert.matches(pattern, err)
    return err
  end

  -- a case that reads the table with pairs() or #
  local function refused_pairs(pattern, f, ...)
    if HONOURS_PAIRS then return refused(pattern, f, ...) end
    local ok, err = pcall(f, ...)
    if not ok then assert.is_nil(tostring(err):find("slm/[%w/]+%.lua:%d+:"), err) end
  end

  for _, k in ipairs{ "max_tokens", "max_completion_tokens", "n" } do
    for _, v in ipairs{ 1e300, 2 ^ 60 } do
      it(("a request's %s = %g is refused, naming it"):format(k, v), function()
        refused("'" .. k .. "' must be a positive integer", c.chat, c, { messages = H.msgs("x"), [k] = v })
      end)
    end
  end

  local BY_PAIRS = { fallback = true, headers = true }

  for _, k in ipairs{ "max_concurrency", "rpm", "tpm", "budget", "cache", "quotas", "fallback", "headers",
      "transport", "mask_pii" } do
    it("slm.client's option '" .. k .. "' as a table whose metamethods raise", function()
      local check = BY_PAIRS[k] and refused_pairs or refused
      check("option '" .. k .. "'", slm.client, { base_url = up.url, [k] = evil })
    end)
  end

  for _, k in ipairs{ "budget", "fallback", "headers" } do
    it("a request's option '" .. k .. "' as a table whose metamethods raise", function()
      local check = BY_PAIRS[k] and refused_pairs or refused
      check("option '" .. k .. "'", c.chat, c, { messages = H.msgs("x"), [k] = evil, max_retries = 0 })
    end)
  end

  it("messages, a message and its content as tables whose metamethods raise", function()
    refused("'messages'", c.chat, c, { messages = evil })
    refused("messages%[1%]", c.chat, c, { messages = { evil } })
    refused("messages%[1%]", c.stream, c, { messages = { { role = "user", content = { evil } } } })
  end)

  it("the request and the client's options as such tables", function()
    refused_pairs("request", c.chat, c, evil)
    refused_pairs("options", slm.client, evil)
  end)

  it("slm.map's list and options as such tables; an item that cannot be read fails alone", function()
    refused_pairs("slm.map: .*list", slm.map, evil, function() end)
    refused_pairs("slm.map: .*option", slm.map, { 1 }, function() end, evil)
    if not HONOURS_PAIRS then return end -- (a proxy list needs __len)
    local list = setmetatable({}, { __len = function() return 3 end,
      __index = function(_, i) if i == 2 then error("no such item") end return i end })
    local results, errs, nfailed = slm.map(list, function(x) return x end)
    assert.same({ [1] = 1, [3] = 3 }, results)
    assert.matches("no such item", tostring(errs[2]))
    assert.equal(1, nfailed)
  end)
end)

describe("a stream left open without close()", function()
  it("keeps its slot: the next call times out within its timeout, outside and inside tasks", function()
    local c = H.sim_client(up, { max_concurrency = 1, timeout = 0.5, max_retries = 0 })
    local s = c:stream{ messages = H.msgs("left open") }
    assert.is_string(s:next())
    local t0 = require("slm.core").now()
    local res, err = c:chat{ messages = H.msgs("waits outside") }
    assert.is_nil(res)
    assert.equal("timeout", err.kind)
    assert.matches("concurrency slot: none free within", err.message)
    assert.is_true(require("slm.core").now() - t0 < 2)
    -- inside a task the same, and the slot is there once the stream is closed
    local r2, e2 = slm.run(function() return c:chat{ messages = H.msgs("waits in a task") } end)
    assert.is_nil(r2)
    assert.equal("timeout", e2.kind)
    s:close()
    assert(c:chat{ messages = H.msgs("after close") })
  end)
end)

describe("the libcurl runtime's semaphore", function()
  local sched = require "slm.transport.sched"
  it("acquire(timeout) gives up after timeout, leaves the queue, and a later release goes on", function()
    local sem = sched.semaphore(1)
    assert.is_true(sem:acquire())
    local got = {}
    slm.run(function()
      local a = slm.spawn(function() return sem:acquire(0.05) end)
      local b = slm.spawn(function() return sem:acquire(5) end)
      got.a = { a:wait() }
      sem:release()
      got.b = { b:wait() }
    end)
    assert.same({ nil, "timeout" }, got.a)
    assert.same({ true }, got.b)
  end)
end)
