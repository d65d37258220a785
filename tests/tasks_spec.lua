-- The task layer against the simulator's scripted model, over real HTTP:
-- classification (confidence from logprobs and its absence, multi-label,
-- the repair re-ask, lenient parsing, replies cut by the limit), images
-- sent to a model that reads them, budgets refusing a task's call, usage
-- and cost summed over every call, slm.route and slm.evaluate.
local H = require "tests.helpers"
local slm = require "slm"
local json = require "slm.json"

local HERMES = "nousresearch/hermes-3-llama-3.1-405b"
local LABELS = {
  billing = "payments, invoices, refunds, charged", delivery = "parcels, couriers, tracking",
  technical = "the app, errors, crashes", account = "login, password, profile", other = "anything else",
}
local CHARGED = "Subject: double charge\nI was charged twice for order 58213, please refund one payment."

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)

-- A client of the simulator; `scenario` (directives) applies to it with a
-- key of its own, so fail=N counts this client's attempts only.
local function client(opts, scenario) return H.scenario_client(up, opts, scenario) end

local function near(a, b, eps) return math.abs(a - b) <= (eps or 1e-9) end

local function price(model, u)
  local m = slm.models[model]
  return (u.prompt_tokens * m.input_per_m + u.completion_tokens * m.output_per_m) / 1e6
end

describe("slm.classify against the simulator", function()
  it("gives the label, its confidence from the reply's logprobs and the alternatives", function()
    local res = assert(slm.classify{ client = client(), text = CHARGED, labels = LABELS })
    assert.equal("billing", res.label)
    local body = H.last(up).body
    assert.is_true(body.logprobs)
    assert.equal(5, body.top_logprobs)
    assert.equal("json_schema", body.response_format.type)
    assert.same({ "account", "billing", "delivery", "other", "technical" },
      body.response_format.json_schema.schema.properties.label.enum)
    -- "billing" is spelled by two tokens ("bill", "ing" at -0.0001): the
    -- confidence is the probability of both, not of the first alone
    local alts = res.alternatives
    assert.equal(5, #alts)
    assert.equal("billing", alts[1].label)
    assert.is_true(near(res.confidence, alts[1].p * math.exp(-0.0001)))
    assert.is_true(res.confidence > 0.9)
    for i = 2, #alts do assert.is_true(alts[i].p <= alts[i - 1].p) end
    local sum = 0
    for _, a in ipairs(alts) do sum = sum + a.p end
    assert.is_true(near(sum, 1, 1e-6))
    assert.is_false(res.review)
    assert.is_false(res.repaired)
    assert.equal(1, res.calls)
    assert.is_true(near(res.cost, price("gpt-4o-mini", res.usage)))
  end)

  it("marks a result below the threshold for review", function()
    local res = assert(slm.classify{ client = client(), text = CHARGED, labels = LABELS, threshold = 0.99 })
    assert.is_true(res.review)
    -- no keyword at all: p = 1/5 for the fallback label
    res = assert(slm.classify{ client = client(), text = "Hello there.", labels = LABELS })
    assert.equal("other", res.label)
    assert.is_true(near(res.confidence, 0.2 * math.exp(-0.0001), 1e-6))
    assert.is_true(res.review)
  end)

  it("the short form returns the label, then the result", function()
    local label, res = slm.classify(CHARGED, LABELS, { client = client() })
    assert.equal("billing", label)
    assert.equal("billing", res.label)
  end)

  it("a model without logprobs: none asked for, no confidence invented, JSON mode with the schema in the prompt", function()
    local res = assert(slm.classify{ client = client{ model = HERMES }, text = "My parcel is lost, the courier never came.",
      labels = LABELS })
    assert.equal("delivery", res.label)
    assert.is_nil(res.confidence)
    assert.is_nil(res.alternatives)
    assert.is_nil(res.review)
    local body = H.last(up).body
    assert.is_nil(body.logprobs)
    assert.is_nil(body.top_logprobs)
    assert.equal("json_object", body.response_format.type)
    assert.truthy(body.messages[1].content:find("```json", 1, true))
    assert.equal(HERMES, res.model)
    assert.is_true(near(res.cost, price(HERMES, res.usage)))
  end)

  it("multi-label: every label that applies, each with its confidence", function()
    local res = assert(slm.classify{ client = client(), text = "The app crashes when I log in with my password.",
      labels = LABELS, multi = true })
    assert.same({ "technical", "account" }, res.labels)
    assert.equal("technical", res.label)
    assert.is_true(res.confidences.technical > res.confidences.account)
    assert.equal(res.confidences.technical, res.confidence)
    assert.equal("array", H.last(up).body.response_format.json_schema.schema.properties.labels.type)
  end)

  it("few-shot examples go in as turns, the label set as the schema's enum", function()
    local res = assert(slm.classify{ client = client(), text = CHARGED, labels = { "billing", "delivery", "other" },
      examples = { { text = "Where is my parcel?", label = "delivery" }, { text = "Refund me", label = "billing" } } })
    assert.equal("billing", res.label)
    local m = H.last(up).body.messages
    assert.equal(6, #m)
    assert.same({ "user", "Where is my parcel?" }, { m[2].role, m[2].content })
    assert.same({ "assistant", '{"label":"delivery"}' }, { m[3].role, m[3].content })
  end)

  it("a label outside the set is repaired by one re-ask; both calls are paid for", function()
    local res = assert(slm.classify{ client = client(nil, "bad_label,fail=1"), text = CHARGED, labels = LABELS })
    assert.is_true(res.repaired)
    assert.equal(2, res.calls)
    assert.equal(2, res.attempts)
    assert.truthy(LABELS[res.label])
    local body = H.last(up).body
    -- the re-ask carries the bad reply and what was wrong with it
    assert.equal(4, #body.messages)
    assert.truthy(body.messages[3].content:find("miscellaneous", 1, true))
    assert.truthy(body.messages[4].content:find("$.label", 1, true))
    local single = assert(slm.classify{ client = client(), text = CHARGED, labels = LABELS })
    assert.is_true(res.usage.prompt_tokens > single.usage.prompt_tokens)
    assert.is_true(near(res.cost, price("gpt-4o-mini", res.usage)))
  end)

  it("a reply still invalid after the repair fails with kind validation, the errors and what was spent", function()
    local res, err = slm.classify{ client = client(nil, "invalid_json"), text = CHARGED, labels = LABELS }
    assert.is_nil(res)
    assert.equal("validation", err.kind)
    assert.equal(2, err.calls)
    assert.equal(2, err.attempts)
    assert.truthy(err.raw:find('{"label":"', 1, true))
    assert.truthy(err.errors[1].message:find("not JSON", 1, true))
    assert.is_true(err.usage.total_tokens > 0)
    assert.is_true(err.cost > 0)
  end)

  it("JSON in prose or with a trailing comma is read without a re-ask", function()
    for _, d in ipairs{ "prose_json", "trailing_comma" } do
      local res = assert(slm.classify{ client = client(nil, d), text = CHARGED, labels = LABELS })
      assert.equal("billing", res.label, d)
      assert.is_false(res.repaired, d)
      assert.equal(1, res.calls, d)
    end
  end)

  it("a reply cut by the output limit is asked again once with a higher limit, never unchanged", function()
    local res = assert(slm.classify{ client = client(nil, "cut,fail=1"), text = CHARGED, labels = LABELS, max_tokens = 40 })
    assert.equal("billing", res.label)
    assert.equal(2, res.calls)
    assert.equal(296, H.last(up).body.max_tokens) -- max(2 * 40, 40 + 256)
    local _, err = slm.classify{ client = client(nil, "cut"), text = CHARGED, labels = LABELS, max_tokens = 40 }
    assert.equal("length", err.kind)
    assert.equal(2, err.calls)
    assert.truthy(err.message:find("raised", 1, true))
  end)

  it("errors of the client come back as they are, with the task's totals", function()
    local _, err = slm.classify{ client = client(nil, "status=503"), text = CHARGED, labels = LABELS }
    assert.equal("server", err.kind)
    assert.equal(503, err.status)
    assert.equal(1, err.calls)
  end)

  it("a labels table changed between calls is prepared again", function()
    local labels = { billing = "payments", other = "anything else" }
    assert.equal("billing", (slm.classify(CHARGED, labels, { client = client() })))
    labels.delivery = "parcels"
    local _, res = slm.classify("Where is my parcel?", labels, { client = client() })
    assert.equal("delivery", res.label)
    assert.same({ "billing", "delivery", "other" }, H.last(up).body.response_format.json_schema.schema.properties.label.enum)
    -- the same labels, another description
    labels.delivery = "couriers and tracking numbers"
    slm.classify("Where is my parcel?", labels, { client = client() })
    assert.truthy(H.last(up).body.messages[1].content:find("- delivery: couriers and tracking numbers", 1, true))
  end)
end)

describe("images in a task", function()
  local PNG = H.read_file("examples/data/receipt.png")

  it("go to a vision fallback when the model does not read images", function()
    local c = client{ model = HERMES, fallback = { "gpt-4o-mini" } }
    local res = assert(slm.classify{ client = c, text = "What kind of document is this? Subject: payment receipt",
      labels = { receipt = "a shop receipt, payment", contract = "an agreement", other = "anything else" },
      images = { "examples/data/receipt.png" } })
    assert.equal("gpt-4o-mini", res.model)
    local body = H.last(up).body
    assert.equal("gpt-4o-mini", body.model)
    local parts = body.messages[#body.messages].content
    assert.equal("image_url", parts[2].type)
    assert.truthy(parts[2].image_url.url:find("^data:image/png;base64,"))
  end)

  it("are refused before anything is sent when no model reads them", function()
    local before = up:stats().requests
    local res, err = slm.classify{ client = client{ model = HERMES }, text = "this", labels = LABELS,
      images = { { bytes = PNG } } }
    assert.is_nil(res)
    assert.equal("invalid_request", err.kind)
    assert.truthy(err.message:find("does not read images", 1, true))
    assert.equal(before, up:stats().requests)
  end)
end)

describe("a budget under a task", function()
  it("refuses the call that does not fit, and the task fails with kind budget, nothing sent", function()
    local b = slm.budget{ usd = 0.000001 }
    local before = up:stats().requests
    local res, err = slm.classify{ client = client{ budget = b }, text = CHARGED, labels = LABELS }
    assert.is_nil(res)
    assert.equal("budget", err.kind)
    assert.equal(0, err.attempts)
    assert.equal(before, up:stats().requests)
  end)

  it("a repair re-ask the budget cannot cover stops the task with what the first call cost", function()
    -- room for one classification (worst case: the prompt + max_tokens), not
    -- for the longer re-ask
    local b = slm.budget{ tokens = 500 }
    local res, err = slm.classify{ client = client({ budget = b }, "bad_label"), text = CHARGED, labels = LABELS,
      max_tokens = 300 }
    assert.is_nil(res)
    assert.equal("budget", err.kind)
    assert.equal(1, err.calls - 1) -- the refused call counts as a call with no attempts
    assert.equal(1, err.attempts)
    assert.is_true(err.usage.total_tokens > 0)
    local _, spent = b:spent()
    assert.equal(err.usage.total_tokens, spent)
  end)
end)

describe("slm.route", function()
  local MODELS = { "gpt-4o-mini", HERMES }
  local function req(text) return { messages = { { role = "user", content = text } } } end

  it("picks the cheapest model that fits: gpt-4o-mini for a prompt-heavy call, Hermes for bulk output", function()
    local m, report = slm.route{ request = req(string.rep("word ", 2000)), output_tokens = 100, models = MODELS }
    assert.equal("gpt-4o-mini", m)
    assert.equal(2, #report)
    assert.is_true(report[1].cost < report[2].cost)
    m = slm.route{ request = req("Write a long product description."), output_tokens = 3000, models = MODELS }
    assert.equal(HERMES, m)
  end)

  it("leaves out a model whose context the request does not fit, and one that cannot read its images", function()
    local m, report = slm.route{ request = req(string.rep("word ", 70000)), output_tokens = 3000, models = MODELS }
    assert.equal("gpt-4o-mini", m)
    local hermes
    for _, r in ipairs(report) do if r.model == HERMES then hermes = r end end
    assert.is_false(hermes.fits)
    assert.truthy(hermes.why:find("context 65536", 1, true))
    -- output-heavy, so Hermes would be the cheaper, but the request has an image
    local png = "data:image/png;base64," .. slm.core.base64_encode(H.read_file("examples/data/receipt.png"))
    local r = { messages = { { role = "user", content = { { type = "text", text = "Describe this." },
      { type = "image_url", image_url = { url = png } } } } } }
    assert.equal(HERMES, (slm.route{ request = req("Describe this."), output_tokens = 10000, models = MODELS }))
    m, report = slm.route{ request = r, output_tokens = 10000, models = MODELS }
    assert.equal("gpt-4o-mini", m)
    assert.equal("does not read images", report[2].why)
  end)

  it("none fits: nil and a context_length error", function()
    local m, err = slm.route{ request = req(string.rep("word ", 140000)), models = MODELS }
    assert.is_nil(m)
    assert.equal("context_length", err.kind)
  end)

  it("defaults to the client's model and fallbacks", function()
    local c = client{ model = HERMES, fallback = { "gpt-4o-mini" } }
    local _, report = slm.route{ request = req("hi"), client = c }
    assert.equal(2, #report)
  end)
end)

describe("slm.evaluate", function()
  local dataset = {}
  for line in io.lines("examples/data/support_tickets.jsonl") do
    local t = json.decode(line)
    if t.split == "test" and #dataset < 40 and LABELS[t.label] then
      dataset[#dataset + 1] = { text = "Subject: " .. t.subject .. "\n" .. t.body, label = t.label }
    end
  end

  it("runs a labelled set through each model and gives the decision table", function()
    assert.is_true(#dataset >= 20)
    local rows = slm.evaluate{ task = "classify", dataset = dataset, models = { "gpt-4o-mini", HERMES },
      client = client(), labels = LABELS, concurrency = 4 }
    assert.equal(2, #rows)
    for _, r in ipairs(rows) do
      assert.equal(#dataset, r.n)
      assert.equal(0, r.failed)
      assert.is_true(r.accuracy > 0.3 and r.accuracy <= 1)
      assert.is_true(near(r.cost_per_1000, r.cost / r.n * 1000))
      assert.is_true(r.p50 <= r.p95)
      -- accuracy is what the results say it is
      local right = 0
      for _, x in ipairs(r.report.results) do if x.label == x.gold then right = right + 1 end end
      assert.is_true(near(r.accuracy, right / r.n))
    end
    assert.equal("gpt-4o-mini", rows[1].model)
    -- Hermes' input costs more than gpt-4o-mini's, and classification is all input
    assert.is_true(rows[2].cost_per_1000 > rows[1].cost_per_1000)
    local out = {}
    slm.evaluate.print(rows, function(s) out[#out + 1] = s end)
    local text = table.concat(out)
    assert.truthy(text:find("gpt-4o-mini", 1, true))
    assert.truthy(text:find(HERMES, 1, true))
    assert.truthy(text:find("$ per 1,000", 1, true))
  end)

  it("counts an item that failed, with its error kind", function()
    local rows = slm.evaluate{ task = "classify", dataset = { dataset[1], dataset[2] }, models = { "gpt-4o-mini" },
      client = client(nil, "invalid_json"), labels = LABELS }
    assert.equal(2, rows[1].failed)
    assert.equal(2, rows[1].report.errors.validation)
  end)
end)
