-- A hostile user of model choice, the decision tables, the response cache
-- and model data: slm.route, slm.evaluate, slm.models.compare, slm.cache,
-- slm.models (what tests/tasks_spec.lua, tests/count_spec.lua and
-- tests/shared_client_spec.lua do not try).  Plain Lua; the cache and
-- slm.evaluate against the simulator.
local slm = require "slm"
local json = require "slm.json"
local cache = require "slm.cache"
local H = require "tests.helpers"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)

local REQ = { messages = H.msgs("route me") }
local added = {}
local function add_model(name, entry)
  slm.models[name] = entry
  added[#added + 1] = name
end
after_each(function()
  for _, n in ipairs(added) do slm.models[n] = nil end
  added = {}
end)

describe("slm.route, hostile", function()
  it("refuses an output_tokens of NaN (it fit every context and made every cost NaN)", function()
    assert.has_error(function() slm.route{ request = REQ, output_tokens = 0 / 0, models = { "gpt-4o-mini" } } end)
    local ok, err = pcall(slm.route, { request = REQ, output_tokens = 0 / 0, models = { "gpt-4o-mini" } })
    assert.is_false(ok)
    assert.matches("slm.route: option 'output_tokens' must be a finite number >= 0", err)
    assert.has_error(function() slm.route{ request = REQ, output_tokens = math.huge, models = { "gpt-4o-mini" } } end)
  end)

  it("leaves out a model whose max_output is below the expected output", function()
    -- gpt-4o-mini: context 128,000, max output 16,384
    local model, err = slm.route{ request = REQ, output_tokens = 50000, models = { "gpt-4o-mini" } }
    assert.is_nil(model)
    assert.equal("context_length", err.kind)
    assert.matches("max output 16384", err.message)
    add_model("big-out", { context = 200000, max_output = 100000, input_per_m = 5, output_per_m = 5 })
    local m, report = slm.route{ request = REQ, output_tokens = 50000, models = { "gpt-4o-mini", "big-out" } }
    assert.equal("big-out", m)
    assert.is_false(report[2].fits)
  end)

  it("breaks ties in the order given, and puts a model with broken prices after the priced ones", function()
    local list = {}
    for i = 1, 40 do
      local name = "tie-" .. i
      add_model(name, { context = 10000, input_per_m = 0, output_per_m = 0 })
      list[i] = name
    end
    for _ = 1, 3 do
      local m, report = slm.route{ request = REQ, output_tokens = 10, models = list }
      assert.equal("tie-1", m)
      for i = 1, 40 do assert.equal("tie-" .. i, report[i].model) end
    end
    -- a price changed after the entry was added (it cannot be NaN when added)
    add_model("broken-price", { context = 10000, input_per_m = 0, output_per_m = 0 })
    slm.models["broken-price"].input_per_m = 0 / 0
    local m, report = slm.route{ request = REQ, output_tokens = 10, models = { "broken-price", "gpt-4o-mini" } }
    assert.equal("gpt-4o-mini", m)
    assert.is_nil(report[2].cost)
  end)
end)

describe("slm.models, hostile", function()
  it("takes prices and limits as numeric strings (as numbers), refuses what is not a number", function()
    add_model("str-prices", { context = "32768", input_per_m = "0.5", output_per_m = "1.5" })
    local e = slm.models["str-prices"]
    assert.equal(32768, e.context)
    assert.equal(0.5, e.input_per_m)
    assert.is_true(math.abs(slm.cost("str-prices", { prompt_tokens = 1e6, completion_tokens = 1e6 }) - 2) < 1e-12)
    assert.has_error(function() slm.models["bad"] = { context = 1000, input_per_m = "free" } end,
      [[slm.models['bad'].input_per_m must be a finite number >= 0 (or a string holding one), got "free"]])
    for _, bad in ipairs{ { input_per_m = 0 / 0 }, { output_per_m = -1 }, { context = 0 }, { max_output = math.huge },
        { vision = "yes" } } do
      assert.has_error(function() slm.models["bad"] = bad end)
    end
    assert.is_nil(slm.models["bad"])
    -- default comparison over every priced model still works
    assert.is_true(#slm.models.compare{ tasks = { { prompt_tokens = 1, output_tokens = 1 } } } >= 2)
  end)

  it("gives an unknown cost, not a crash, for an entry whose price was changed to text", function()
    add_model("later-text", { context = 1000, input_per_m = 1, output_per_m = 1 })
    slm.models["later-text"].output_per_m = "ask sales"
    assert.is_nil(slm.cost("later-text", { prompt_tokens = 10, completion_tokens = 10 }))
    -- a dated snapshot resolves to the same entry
    assert.is_nil(slm.cost("later-text-2025-01-01", { prompt_tokens = 10, completion_tokens = 10 }))
  end)
end)

describe("slm.models.compare, hostile", function()
  it("shows a model without prices as unknown, never as free", function()
    add_model("no-prices", { context = 100000, max_output = 1000 })
    local rows = slm.models.compare{ tasks = { { name = "t", prompt_tokens = 100, output_tokens = 10, count = 5 } },
      models = { "no-prices", "gpt-4o-mini" } }
    assert.is_nil(rows[1].tasks[1].cost)
    assert.is_nil(rows[1].tasks[1].per_1000)
    assert.is_nil(rows[1].total)
    assert.is_true(rows[2].total > 0)
    local text = slm.models.print_comparison(rows, function() end)
    assert.truthy(text:find("unknown", 1, true))
    assert.is_nil(text:find("$0.0000", 1, true))
  end)

  it("refuses NaN and infinite token counts, prints huge ones", function()
    for _, t in ipairs{ { prompt_tokens = 0 / 0, output_tokens = 1 }, { prompt_tokens = 1, output_tokens = 0 / 0 },
        { prompt_tokens = 1, output_tokens = 1, count = 0 / 0 }, { prompt_tokens = math.huge, output_tokens = 1 } } do
      assert.has_error(function() slm.models.compare{ tasks = { t }, models = { "gpt-4o-mini" } } end)
    end
    local rows = slm.models.compare{ tasks = { { prompt_tokens = 1e300, output_tokens = 5, count = 1e300 } },
      models = { "gpt-4o-mini" } }
    assert.is_false(rows[1].fits)
    local text = slm.models.print_comparison(rows, function() end)
    assert.truthy(text:find("1e+300", 1, true))
  end)
end)

describe("slm.evaluate, hostile", function()
  local function client(scenario)
    return H.task_client(up, nil, scenario)
  end

  it("refuses a 'model' option (it replaced every row's model) and a per-item input option", function()
    local ds = { { text = "x", label = "a" } }
    local ok, err = pcall(slm.evaluate, { dataset = ds, labels = { "a", "b" }, models = { "gpt-4o-mini",
      "nousresearch/hermes-3-llama-3.1-405b" }, model = "gpt-4o-mini", client = client() })
    assert.is_false(ok)
    assert.matches("option 'model' is not allowed", err)
    ok, err = pcall(slm.evaluate, { task = "extract", dataset = { { document = "d" } }, schema = { type = "object" },
      models = { "gpt-4o-mini" }, document = "the same for all", client = client() })
    assert.is_false(ok)
    assert.matches("option 'document' is not allowed", err)
    assert.has_error(function() slm.evaluate{ dataset = ds, labels = { "a" }, models = { 5 }, client = client() } end,
      "slm.evaluate: models[1] must be a model name (a string)")
  end)

  it("gives an unknown cost for extraction failures billed at unknown prices (not $0)", function()
    local schema = json.decode(H.ORDER_SCHEMA)
    -- a model the simulator serves, unknown to slm.models: no prices
    local rows = slm.evaluate{ task = "extract", dataset = { { document = "order 1" }, { document = "order 2" } },
      schema = schema, models = { "sim-unpriced" }, client = client("invalid_json") }
    assert.equal(2, rows[1].failed)
    assert.is_nil(rows[1].cost)
    assert.is_nil(rows[1].cost_per_1000)
  end)
end)

describe("the response cache, hostile", function()
  local function table_cache()
    local c = { data = {} }
    function c:get(k) return self.data[k] end
    function c:set(k, v) self.data[k] = v; return true end
    return c
  end
  local function det(text) return { messages = H.msgs(text), temperature = 0 } end

  it("never serves another request's entry, whatever the cache answers", function()
    local store = table_cache()
    local a = H.sim_client(up, { cache = store })
    assert.equal("Echo: apple", assert(a:chat(det("apple"))).text)
    local apple
    for _, v in pairs(store.data) do apple = v end
    assert.is_string(apple)
    -- a cache that answers every key with the one entry it holds
    local liar = H.sim_client(up, { cache = { get = function() return apple end, set = function() return true end } })
    local res = assert(liar:chat(det("banana")))
    assert.equal("Echo: banana", res.text)
    assert.is_nil(res.cached)
    assert.equal(1, liar.stats.cache_errors)
    local s = liar:stream(det("banana"))
    for _ in s do end
    res = assert(s:result())
    assert.equal("Echo: banana", res.text)
    assert.is_nil(res.cached)
  end)

  it("passes by an entry that is garbage under the right key, and counts it", function()
    local bad = {
      { choices = {} },
      { choices = { { finish_reason = "stop", message = { content = { a = 1 } } } } },
      { choices = { { finish_reason = "length", message = { content = "cut" } } } },
      { choices = { { finish_reason = "stop", message = 5 } } },
      { choices = { { finish_reason = "tool_calls", message = { content = "no calls" } } } },
      { choices = { foo = 1 } },
    }
    for i, doc in ipairs(bad) do
      local c = H.sim_client(up, { cache = {
        get = function(_, key) doc.v, doc.key = cache.FORMAT or 1, key; return json.encode(doc) end,
        set = function() return true end } })
      local res = assert(c:chat(det("garbage " .. i)))
      assert.equal("Echo: garbage " .. i, res.text)
      assert.is_nil(res.cached)
      assert.equal(1, c.stats.cache_errors)
    end
  end)

  it("counts a cache that answers nil, err (full, down) on get and set", function()
    local c = H.sim_client(up, { cache = {
      get = function() return nil, "slm.shdict.cache: no memory" end,
      set = function() return nil, "slm.shdict.cache: no memory" end } })
    assert.equal("Echo: full", assert(c:chat(det("full"))).text)
    assert.equal(2, c.stats.cache_errors)
  end)

  it("scopes keys by the credentials; the API key is in no key or stored value", function()
    local body = { messages = H.msgs("same"), temperature = 0 }
    local a = H.sim_client(up, { api_key = "sk-tenant-AAAA" })
    local b = H.sim_client(up, { api_key = "sk-tenant-BBBB" })
    local a2 = H.sim_client(up, { api_key = "sk-tenant-AAAA" })
    local sa, sb = cache.scope(a, {}), cache.scope(b, {})
    assert.are_not.equal(sa, sb)
    assert.equal(sa, cache.scope(a2, {}))
    assert.is_nil(sa:find("AAAA", 1, true))
    local ka = cache.key(a.base_url_display, "gpt-4o-mini", body, sa)
    local kb = cache.key(b.base_url_display, "gpt-4o-mini", body, sb)
    assert.are_not.equal(ka, kb)
    -- the request's own credential and organization headers are part of the
    -- scope; other headers (a trace id) are not, or no entry would ever hit
    assert.are_not.equal(sa, cache.scope(a, { header_list = { "X-Api-Key: 2" } }))
    assert.are_not.equal(sa, cache.scope(a, { header_list = { "OpenAI-Organization: org-2" } }))
    assert.equal(sa, cache.scope(a, { header_list = { "X-Request-Id: 17" } }))
    -- through the client: a tenant never gets another's entry; the same key does
    local shared = table_cache()
    local ta = H.sim_client(up, { api_key = "sk-tenant-AAAA", cache = shared })
    local tb = H.sim_client(up, { api_key = "sk-tenant-BBBB", cache = shared })
    local ta2 = H.sim_client(up, { api_key = "sk-tenant-AAAA", cache = shared })
    assert.is_falsy(assert(ta:chat(det("tenant"))).cached)
    assert.is_falsy(assert(tb:chat(det("tenant"))).cached)
    assert.is_true(assert(ta2:chat(det("tenant"))).cached)
    local traced = det("tenant")
    traced.headers = { ["X-Request-Id"] = "9" }
    assert.is_true(assert(ta2:chat(traced)).cached)
    -- a stored value holds no key
    local store = table_cache()
    local c = H.sim_client(up, { api_key = "sk-test-good", cache = store })
    assert(c:chat(det("secret-free")))
    for k, v in pairs(store.data) do
      assert.is_nil(k:find("sk-test-good", 1, true))
      assert.is_nil(v:find("sk-test-good", 1, true))
    end
  end)
end)
