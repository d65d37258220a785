-- Budgets and the context check against the real nginx simulator: a
-- request whose worst case does not fit is refused before anything is
-- sent (the simulator sees nothing), reservations hold under concurrency,
-- settlement uses the real usage, a budget can be shared by clients.
local slm = require "slm"
local H = require "tests.helpers"

-- Priced test models the simulator serves ("sim:" directives ride in the
-- model name).  Registered so that the client knows their prices.
local SIM = "sim:delay=200"
local FAST = "sim:fast"        -- an unknown directive: ignored, served at once
local TINY = "tiny-ctx"        -- a 200-token context
local PRICE = { context = 128000, max_output = 1000, input_per_m = 0.15, output_per_m = 0.60,
  tokenizer = "o200k_base", format = "openai" }

local up
setup(function()
  up = H.upstream()
  slm.models[SIM] = PRICE
  slm.models[FAST] = PRICE
  slm.models[TINY] = { context = 200, max_output = 100, input_per_m = 1, output_per_m = 2,
    tokenizer = "o200k_base", format = "openai" }
end)
teardown(function()
  slm.models[SIM], slm.models[FAST], slm.models[TINY] = nil, nil, nil
  if up then up:stop() end
end)
before_each(function() up:reset() end)

local function client(opts)
  local o = { base_url = up.url, api_key = "sk-test", timeout = 10, max_retries = 0 }
  for k, v in pairs(opts or {}) do o[k] = v end
  return slm.client(o)
end

local MAX = 50
local function request(model, text)
  return { model = model, max_tokens = MAX,
    messages = { { role = "system", content = "Classify the ticket." },
                 { role = "user", content = text or "My parcel arrived damaged, I want a refund." } } }
end

-- The worst case the client reserves: counted prompt + max_tokens at the
-- model's prices (the same count the client uses).
local function worst(req)
  local prompt = slm.count(req, req.model)
  return slm.cost(req.model, { prompt_tokens = prompt, completion_tokens = req.max_tokens }), prompt + req.max_tokens
end

local function close(a, b) return math.abs(a - b) < 1e-12 end

describe("budget", function()
  it("refuses a request whose worst case exceeds what is left, sending nothing", function()
    local req = request(FAST)
    local usd = worst(req)
    local b = slm.budget{ usd = usd * 0.99 }
    local c = client{ budget = b }
    local res, err = c:chat(req)
    assert.is_nil(res)
    assert.are.equal("budget", err.kind)
    assert.matches("budget", tostring(err))
    assert.are.equal(0, up:stats().requests)
    assert.are.same({ 0, 0 }, { b:spent() })
    assert.are.same({ 0, 0 }, { b:reserved() })
    -- streamed requests are refused the same way
    local s = c:stream(req)
    local n = 0
    for _ in s do n = n + 1 end
    local sres, serr = s:result()
    assert.is_nil(sres)
    assert.are.equal("budget", serr.kind)
    assert.are.equal(0, n)
    assert.are.equal(0, up:stats().requests)
  end)

  it("refuses on a token limit too", function()
    local req = request(FAST)
    local _, tokens = worst(req)
    local b = slm.budget{ tokens = tokens - 1 }
    local res, err = client{ budget = b }:chat(req)
    assert.is_nil(res)
    assert.are.equal("budget", err.kind)
    assert.are.equal(0, up:stats().requests)
    local ok = client{ budget = slm.budget{ tokens = tokens } }:chat(req)
    assert.is_truthy(ok)
  end)

  it("settles with the real usage: spent is the sum of res.cost", function()
    local b = slm.budget{ usd = 1 }
    local c = client{ budget = b }
    local sum, toks = 0, 0
    for i = 1, 3 do
      local res = assert(c:chat(request(FAST, "ticket number " .. i .. " about a late delivery")))
      assert.is_true(res.cost > 0)
      local w = worst(request(FAST, "ticket number " .. i .. " about a late delivery"))
      assert.is_true(res.cost <= w) -- the reservation was the worst case
      sum = sum + res.cost
      toks = toks + res.usage.total_tokens
    end
    -- a streamed request settles too
    local sreq = request(FAST, "streamed ticket")
    sreq.stream = true
    local res = assert(c:chat(sreq))
    sum, toks = sum + res.cost, toks + res.usage.total_tokens
    local spent, spent_tokens = b:spent()
    assert.is_true(close(sum, spent))
    assert.are.equal(toks, spent_tokens)
    assert.are.same({ 0, 0 }, { b:reserved() })
    local left = b:remaining()
    assert.is_true(close(1 - sum, left))
    assert.are.equal(4, up:stats().requests)
  end)

  it("lets only the requests whose worst cases fit through when 30 run at once", function()
    local req = request(SIM)
    local usd = worst(req)
    local b = slm.budget{ usd = 8 * usd }
    local c = client{ budget = b, max_concurrency = 30 }
    local list = {}
    for i = 1, 30 do list[i] = i end
    local results, errs = slm.map(list, function()
      return c:chat(request(SIM))
    end, { concurrency = 30 })
    local ok, refused, sum = 0, 0, 0
    for i = 1, 30 do
      if results[i] then ok = ok + 1; sum = sum + results[i].cost end
      if errs[i] then
        assert.are.equal("budget", errs[i].kind)
        refused = refused + 1
      end
    end
    assert.are.equal(8, ok)
    assert.are.equal(22, refused)
    local st = up:stats()
    assert.are.equal(8, st.requests)
    assert.are.equal(8, st.max_in_flight) -- they really ran at once
    assert.is_true(close(sum, (b:spent())))
    assert.is_true(b:spent() <= 8 * usd + 1e-12)
    assert.are.same({ 0, 0 }, { b:reserved() })
    assert.are.equal(22, b.refused)
  end)

  it("is shared by two clients", function()
    local req = request(SIM)
    local usd = worst(req)
    local b = slm.budget{ usd = 3 * usd }
    local c1, c2 = client{ budget = b }, client{ budget = b }
    local res, errs = {}, {}
    slm.run(function()
      local tasks = {}
      for i, c in ipairs{ c1, c2, c1, c2 } do
        tasks[i] = slm.spawn(function() return c:chat(request(SIM)) end)
      end
      for i, t in ipairs(tasks) do res[i], errs[i] = t:wait() end
    end)
    local ok, sum = 0, 0
    for i = 1, 4 do
      if res[i] then ok = ok + 1; sum = sum + res[i].cost
      else assert.are.equal("budget", errs[i].kind) end
    end
    assert.are.equal(3, ok)
    assert.are.equal("budget", errs[4].kind) -- the fourth in line found the budget held
    assert.are.equal(3, up:stats().requests)
    assert.is_true(close(sum, (b:spent())))
    -- what one client spent is gone for the other
    local left = b:remaining()
    assert.is_true(close(3 * usd - sum, left))
    assert.is_true(close(c1.stats.cost + c2.stats.cost, sum))
  end)
end)

describe("context check", function()
  local function long_request(check)
    local words = {}
    for i = 1, 120 do words[i] = "parcel" end
    local req = { model = TINY, max_tokens = 100,
      messages = { { role = "user", content = table.concat(words, " ") } } }
    if check ~= nil then req.check_context = check end
    return req
  end

  it("refuses prompt + max_tokens beyond the context before sending", function()
    local req = long_request()
    local prompt = slm.count(req, TINY)
    assert.is_true(prompt < 200 and prompt + 100 > 200)
    local res, err = client():chat(req)
    assert.is_nil(res)
    assert.are.equal("context_length", err.kind)
    assert.are.equal(prompt, err.prompt_tokens)
    assert.are.equal(0, up:stats().requests)
  end)

  it("lets the request through with check_context = false (request or client)", function()
    local res = client():chat(long_request(false))
    assert.is_truthy(res)
    assert.are.equal(1, up:stats().requests)
    res = client{ check_context = false }:chat(long_request())
    assert.is_truthy(res)
    assert.are.equal(2, up:stats().requests)
  end)

  it("counts with the model the request is sent to (client default and fallbacks)", function()
    -- a model with a ChatML format and a small context, chosen as the client's default model
    slm.models["tiny-chatml"] = { context = 200, max_output = 100, input_per_m = 1, output_per_m = 1,
      tokenizer = "llama3", format = "chatml" }
    local req = long_request()
    req.model = nil
    local res, err = client{ model = "tiny-chatml" }:chat(req)
    slm.models["tiny-chatml"] = nil
    assert.is_nil(res)
    assert.are.equal("context_length", err.kind)
    assert.are.equal((slm.count(req.messages, "nousresearch/hermes-3-llama-3.1-405b")), err.prompt_tokens)
    assert.are.equal(0, up:stats().requests)
  end)
end)

describe("budget edge cases", function()
  it("reserves max_tokens for every choice when n > 1", function()
    local req = request(FAST)
    local usd = worst(req)
    local b = slm.budget{ usd = usd * 1.5 } -- one worst case fits, three do not
    local c = client{ budget = b }
    req.n = 3
    local res, err = c:chat(req)
    assert.is_nil(res)
    assert.are.equal("budget", err.kind)
    assert.are.equal(0, up:stats().requests)
    req.n = 1
    assert(c:chat(req))
  end)

  it("refuses a model without prices under a USD budget, saying why", function()
    local c = client{ budget = slm.budget{ usd = 1 } }
    local res, err = c:chat{ model = "sim:unpriced", messages = { { role = "user", content = "hi" } } }
    assert.is_nil(res)
    assert.are.equal("budget", err.kind)
    assert.matches("has no price", err.message)
    assert.are.equal(0, up:stats().requests)
    -- a token budget still bounds it
    local c2 = client{ budget = slm.budget{ tokens = 100000 } }
    assert(c2:chat{ model = "sim:unpriced", max_tokens = 20, messages = { { role = "user", content = "hi" } } })
  end)

  it("charges a broken stream for its prompt and the text that arrived", function()
    local b = slm.budget{ usd = 1 }
    local c = client{ budget = b }
    local req = request(FAST .. ",eof_mid")
    slm.models[req.model] = PRICE
    req.stream = true
    local res, err = c:chat(req)
    slm.models[req.model] = nil
    assert.is_nil(res)
    assert.is_true(#err.partial.text > 0)
    local spent_usd, spent_tok = b:spent()
    local prompt = slm.count(req, req.model)
    local completion = slm.tokenizer("o200k_base"):count(err.partial.text)
    assert.are.equal(prompt + completion, spent_tok)
    assert.is_true(close(spent_usd, slm.cost(FAST, { prompt_tokens = prompt, completion_tokens = completion })))
    local held_usd, held_tok = b:reserved()
    assert.are.equal(0, held_usd); assert.are.equal(0, held_tok)
  end)
end)

describe("budget amounts and backends", function()
  it("settles only finite non-negative amounts: a NaN or negative one is charged as the worst case", function()
    for _, bad in ipairs{ 0 / 0, -1, math.huge } do
      local b = slm.budget{ usd = 1, tokens = 1000 }
      local r = assert(b:reserve(0.25, 100, "m"))
      b:settle(r, bad, 40)
      local usd, tok = b:spent()
      assert.are.equal(0.25, usd, tostring(bad))
      assert.are.equal(100, tok, tostring(bad))
      assert.are.equal(1, b.rejected_amounts)
      local left = b:remaining()
      assert.is_true(left == 0.75, tostring(bad))
      b:settle(r, 0, 0) -- settling twice changes nothing
      assert.are.equal(0.25, (b:spent()))
    end
    local b = slm.budget{ usd = 1 }
    assert.has_error(function() b:reserve(0 / 0, 1) end, "slm.budget: reserve needs finite non-negative amounts")
  end)

  it("keeps its numbers in a backend of the caller's choosing, through reserve/settle/totals only", function()
    local log = {}
    local mem = require("slm.budget").memory()
    local backend = {
      reserve = function(_, usd, tokens, lu, lt) log[#log + 1] = "reserve"; return mem:reserve(usd, tokens, lu, lt) end,
      settle = function(_, id, usd, tokens) log[#log + 1] = "settle"; return mem:settle(id, usd, tokens) end,
      totals = function() log[#log + 1] = "totals"; return mem:totals() end,
    }
    local b = slm.budget{ usd = 1, backend = backend }
    local c = slm.client{ base_url = up.url, api_key = "sk-test-good", model = FAST, budget = b }
    local res = assert(c:chat{ messages = { { role = "user", content = "hi" } }, max_tokens = 10 })
    assert.are.same({ "reserve", "settle" }, log)
    assert.are.equal(res.cost, (b:spent()))
    assert.are.same({ 0, 0 }, { b:reserved() })
    assert.has_error(function() slm.budget{ usd = 1, backend = {} } end,
      "slm.budget: option 'backend' must have reserve, settle and totals methods")
  end)
end)

describe("guard.prompt_tokens when slm.count cannot count the request", function()
  it("bounds it from above (a token per byte of the body, the worst case per image) and refuses nothing", function()
    local guard = require "slm.guard"
    local count = require "slm.count"
    local real = count.count
    count.count = function() error("cannot count this") end
    local body = { model = "gpt-4o-mini", messages = { { role = "user", content = {
        { type = "text", text = ("word "):rep(300) },
        { type = "image_url", image_url = { url = "https://example.invalid/a.png" } } } } },
      tools = { { type = "function", ["function"] = { name = "f", description = ("d"):rep(400) } } } }
    local ok, n, info = pcall(guard.prompt_tokens, body, "gpt-4o-mini")
    count.count = real
    assert.is_true(ok, tostring(n))
    local exact = count.count(body, "gpt-4o-mini")
    assert.is_true(n >= exact, ("the bound %d is below the count %d"):format(n, exact))
    assert.is_true(n >= require("slm.image").worst_tokens() + 1500)
    assert.is_true(info.estimate)
    assert.equal(0, info.min)
  end)
end)
