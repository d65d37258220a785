-- The task layer's own logic with a scripted client (no network): the
-- structured-output path (lenient parsing, one repair re-ask, length
-- handling, validation errors), the ledger (usage, cost and attempts of
-- every call summed), classification confidence read from logprobs,
-- extraction's merge of chunks (duplicates, conflicts) and evidence,
-- templates and banned words.  Runs under Lua 5.4 and LuaJIT.
local json = require "slm.json"
local slm = require "slm"
local H = require "tests.helpers"

local scripted = H.scripted_client -- replies scripted (tests/helpers.lua)

local LABELS = { "billing", "delivery", "other" }

describe("the structured-output path", function()
  local structured = require "slm.tasks.structured"
  local common = require "slm.tasks.common"
  local SCHEMA = { type = "object", required = { "total" }, additionalProperties = false,
    properties = { total = { type = "number", minimum = 0 }, currency = { type = "string", enum = { "EUR", "RUB" } } } }
  local function ask(c, spec)
    spec = spec or {}
    spec.model = spec.model or c.model
    spec.messages = spec.messages or { { role = "user", content = "receipt" } }
    spec.schema = spec.schema or SCHEMA
    local ledger = common.ledger()
    local v, info = structured.ask(c, ledger, spec)
    return v, info, ledger
  end

  it("asks strict json_schema where the model has it, JSON mode with the schema in the prompt where not", function()
    local c = scripted{ '{"total": 12.5, "currency": "EUR"}' }
    local v = assert(ask(c))
    assert.are.equal(12.5, v.total)
    local rf = c.calls[1].response_format
    assert.are.equal("json_schema", rf.type)
    assert.is_true(rf.json_schema.strict)
    -- strict mode: every property required, the optional one nullable, no extras
    assert.are.same({ "currency", "total" }, (function() local r = rf.json_schema.schema.required; table.sort(r); return r end)())
    local h = scripted({ '{"total": 3}' }, "nousresearch/hermes-3-llama-3.1-405b")
    assert(ask(h))
    assert.are.same({ type = "json_object" }, h.calls[1].response_format)
    assert.matches("```json", h.calls[1].messages[1].content)
  end)

  it("drops the nulls strict mode puts in optional fields before validating", function()
    local v = assert(ask(scripted{ '{"total": 1, "currency": null}' }))
    assert.is_nil(v.currency)
    -- also in an object nested under allOf
    local nested = { type = "object", required = { "a" }, additionalProperties = false,
      properties = { a = { allOf = { { type = "object", additionalProperties = false, required = { "x" },
        properties = { x = { type = "number" }, note = { type = "string" } } } } } } }
    v = assert(ask(scripted{ '{"a": {"x": 1, "note": null}}' }, { schema = nested }))
    assert.is_nil(v.a.note)
  end)

  it("a schema strict mode cannot express (a map) is asked for in JSON mode, with the schema in the prompt", function()
    local map = { type = "object", additionalProperties = { type = "number" } }
    local c = scripted{ '{"eur": 1, "usd": 2}' }
    local v = assert(ask(c, { schema = map }))
    assert.are.equal(2, v.usd)
    assert.are.same({ type = "json_object" }, c.calls[1].response_format)
    assert.matches("```json", c.calls[1].messages[1].content)
  end)

  it("parses leniently before paying for a re-ask: fences, prose, a trailing comma", function()
    for _, text in ipairs{ 'Here you go:\n```json\n{"total": 7}\n```\nThanks!', '{"total": 7,}', 'Result: {"total": 7} ok' } do
      local c = scripted{ text }
      local v = assert(ask(c))
      assert.are.equal(7, v.total)
      assert.are.equal(1, #c.calls, text)
    end
  end)

  it("re-asks once, feeding back the validation errors, and sums both calls", function()
    local c = scripted{ '{"total": -4, "currency": "USD"}', '{"total": 4, "currency": "EUR"}' }
    local v, info, ledger = ask(c)
    assert.are.equal(4, v.total)
    assert.is_true(info.repaired)
    assert.are.equal(2, #c.calls)
    local repair = c.calls[2].messages
    assert.are.equal("assistant", repair[#repair - 1].role)
    assert.matches("%$%.total", repair[#repair].content)
    assert.matches("%$%.currency", repair[#repair].content)
    local t = ledger:into({})
    assert.are.equal(240, t.usage.total_tokens)
    assert.are.equal(2, t.attempts)
    assert.is_true(math.abs(t.cost - 0.0002) < 1e-12)
  end)

  it("fails with kind validation after one repair, with the errors and the raw reply", function()
    local c = scripted{ '{"total": "a lot"}' }
    local v, err = ask(c)
    assert.is_nil(v)
    assert.are.equal("validation", err.kind)
    assert.are.equal(2, #c.calls)
    assert.are.equal("$.total", err.errors[1].path)
    assert.are.equal('{"total": "a lot"}', err.raw)
    assert.are.equal(240, err.usage.total_tokens)
  end)

  it("never re-asks a reply cut by the length limit unchanged: raises the limit once within max_output", function()
    local c = scripted{ { text = '{"total": 1', finish_reason = "length" }, '{"total": 1}' }
    local v, info = ask(c, { max_tokens = 50 })
    assert.are.equal(1, v.total)
    assert.is_true(info.raised_limit)
    assert.are.equal(50, c.calls[1].max_tokens)
    assert.is_true(c.calls[2].max_tokens > 50 and c.calls[2].max_tokens <= 16384)
    assert.are.same(c.calls[1].messages, c.calls[2].messages)
  end)

  it("fails with kind length when the raised limit is cut again, or cannot be raised", function()
    local cut = { text = '{"total": 1', finish_reason = "length" }
    local _, err = ask(scripted{ cut, cut }, { max_tokens = 50 })
    assert.are.equal("length", err.kind)
    local c = scripted{ cut }
    local _, err2 = ask(c, { max_tokens = 16384 })
    assert.are.equal("length", err2.kind)
    assert.are.equal(1, #c.calls)
  end)

  it("wraps a schema whose top is not an object, and unwraps the reply", function()
    local v = assert(ask(scripted{ '{"result": ["a", "b"]}' }, { schema = { type = "array", items = { type = "string" } } }))
    assert.are.same({ "a", "b" }, v)
  end)
end)

describe("slm.classify's confidence", function()
  -- logprobs of the reply {"label":"billing"} spelled as {"  label  ":"  bill  ing  "}
  local function lp(p_first, alts)
    local function e(tok, logprob, top) return { token = tok, logprob = logprob, top_logprobs = top or {} } end
    local top = {}
    for _, a in ipairs(alts or {}) do top[#top + 1] = { token = a[1], logprob = math.log(a[2]) } end
    return { content = { e('{"', -0.0001), e("label", -0.0001), e('":"', -0.0001),
      e("bill", math.log(p_first), top), e("ing", math.log(0.98)), e('"}', -0.0001) } }
  end

  it("is the probability of the tokens that spell the label, alternatives from the first token's top logprobs", function()
    local c = scripted{ { text = '{"label":"billing"}', logprobs = lp(0.8, { { "bill", 0.8 }, { "del", 0.15 }, { "o", 0.05 } }) } }
    local res = assert(slm.classify{ client = c, text = "I was charged twice", labels = LABELS, threshold = 0.9 })
    assert.are.equal("billing", res.label)
    assert.is_true(math.abs(res.confidence - 0.8 * 0.98) < 1e-9, tostring(res.confidence))
    assert.are.same({ "billing", "delivery", "other" }, { res.alternatives[1].label, res.alternatives[2].label,
      res.alternatives[3].label })
    assert.is_true(res.review) -- 0.78 < 0.9
    assert.is_true(c.calls[1].logprobs)
    assert.are.equal(5, c.calls[1].top_logprobs)
  end)

  it("alternatives come most likely first whatever order the endpoint lists them in", function()
    local c = scripted{ { text = '{"label":"billing"}', logprobs = lp(0.6, { { "o", 0.05 }, { "del", 0.35 }, { "bill", 0.6 } }) } }
    local res = assert(slm.classify{ client = c, text = "I was charged twice", labels = LABELS })
    assert.are.same({ "billing", "delivery", "other" }, { res.alternatives[1].label, res.alternatives[2].label,
      res.alternatives[3].label })
  end)

  it("a top token that begins two labels is marked shared", function()
    local c = scripted{ { text = '{"label":"billing"}', logprobs = lp(0.6, { { "bill", 0.6 }, { "b", 0.3 } }) } }
    local res = assert(slm.classify{ client = c, text = "x", labels = { "billing", "bonus", "other" } })
    assert.are.equal("billing", res.alternatives[1].label)
    assert.is_nil(res.alternatives[1].shared)
    -- "b" begins billing (seen already) and bonus
    assert.are.equal("bonus", res.alternatives[2].label)
    assert.is_true(res.alternatives[2].shared)
  end)

  it("is absent when the endpoint gives no logprobs: never invented", function()
    local res = assert(slm.classify{ client = scripted{ '{"label":"delivery"}' }, text = "where is it", labels = LABELS })
    assert.are.equal("delivery", res.label)
    assert.is_nil(res.confidence)
    assert.is_nil(res.alternatives)
    assert.is_nil(res.review)
  end)

  it("is absent, as with no logprobs, when a logprob is not a finite number <= 0; alternatives stay in [0, 1]", function()
    local function with_label_lp(v, top)
      local l = lp(0.8, top or { { "bill", 0.8 } })
      l.content[4].logprob = v
      return l
    end
    for _, v in ipairs{ 5, 0 / 0, math.huge, -math.huge, "NaN" } do
      local c = scripted{ { text = '{"label":"billing"}', logprobs = with_label_lp(v) } }
      local res = assert(slm.classify{ client = c, text = "charged", labels = LABELS, threshold = 0.6 })
      assert.are.equal("billing", res.label)
      assert.is_nil(res.confidence, tostring(v))
      assert.is_nil(res.alternatives, tostring(v))
      assert.is_nil(res.review, tostring(v))
    end
    -- a valid label span, its top logprobs partly out of range: those entries are dropped
    local l = lp(0.8, { { "bill", 0.8 }, { "del", 0.1 }, { "o", 0.05 } })
    local top = l.content[4].top_logprobs
    top[1].logprob, top[2].logprob = 3, 0 / 0
    local res = assert(slm.classify{ client = scripted{ { text = '{"label":"billing"}', logprobs = l } },
      text = "charged", labels = LABELS })
    assert.is_true(math.abs(res.confidence - 0.8 * 0.98) < 1e-9, tostring(res.confidence))
    assert.are.equal(1, #res.alternatives)
    assert.are.equal("other", res.alternatives[1].label)
    for _, a in ipairs(res.alternatives) do assert.is_true(a.p >= 0 and a.p <= 1, tostring(a.p)) end
  end)

  it("is not asked for where the model has none", function()
    local c = scripted({ '{"label":"other"}' }, "nousresearch/hermes-3-llama-3.1-405b")
    assert(slm.classify{ client = c, text = "hi", labels = LABELS })
    assert.is_nil(c.calls[1].logprobs)
  end)

  it("a label outside the set is a validation failure, repaired once", function()
    local c = scripted{ '{"label":"misc"}', '{"label":"other"}' }
    local res = assert(slm.classify{ client = c, text = "hi", labels = LABELS })
    assert.are.equal("other", res.label)
    assert.are.equal(2, res.calls)
    local c2 = scripted{ '{"label":"misc"}' }
    local _, err = slm.classify{ client = c2, text = "hi", labels = LABELS }
    assert.are.equal("validation", err.kind)
  end)

  it("multi-label: every label, each with its confidence", function()
    local c = scripted{ '{"labels":["billing","delivery"]}' }
    local res = assert(slm.classify{ client = c, text = "charged for a parcel that never came", labels = LABELS, multi = true })
    assert.are.same({ "billing", "delivery" }, res.labels)
    assert.are.equal("billing", res.label)
    local schema = c.calls[1].response_format.json_schema.schema
    assert.are.equal("array", schema.properties.labels.type)
  end)

  it("labels with descriptions and few-shot examples go into the prompt", function()
    local c = scripted{ '{"label":"billing"}' }
    assert(slm.classify{ client = c, text = "refund?", labels = { billing = "payments, refunds", other = "anything else" },
      examples = { { text = "my card was charged", label = "billing" } }, instructions = "Prefer billing." })
    local m = c.calls[1].messages
    assert.matches("billing: payments, refunds", m[1].content)
    assert.matches("Prefer billing%.", m[1].content)
    assert.are.equal("my card was charged", m[2].content)
    assert.are.same({ label = "billing" }, json.decode(m[3].content))
    assert.are.equal("refund?", m[4].content)
  end)

  it("raises on misuse, naming the argument", function()
    assert.has_error(function() slm.classify{ text = "x", labels = { "only" } } end,
      "slm.classify: option 'labels' needs at least two labels")
    assert.has_error(function() slm.classify{ text = "x", labels = LABELS, threshold = 2 } end)
    assert.has_error(function() slm.classify{ text = "x", labels = LABELS, colour = "red" } end,
      "slm.classify: unknown option 'colour'")
  end)

  it("every task's 'timeout' must be positive and finite, raised at the call naming the task", function()
    local c = scripted{ '{"label":"billing"}' }
    local calls = {
      classify = function(t) local r = slm.classify{ client = c, text = "x", labels = LABELS, timeout = t }; return r end,
      extract = function(t) local r = slm.extract{ client = c, document = "x", schema = { type = "object" }, timeout = t }; return r end,
      summarize = function(t) local r = slm.summarize{ client = c, document = "x", timeout = t }; return r end,
      generate = function(t) local r = slm.generate{ client = c, template = "x", timeout = t }; return r end,
      ["support.new"] = function(t) local r = slm.support.new{ client = c, timeout = t }; return r end,
    }
    for task, call in pairs(calls) do
      for _, t in ipairs{ 0, -5, math.huge, 0 / 0 } do
        local ok, err = pcall(call, t)
        assert.is_false(ok, task .. " " .. tostring(t))
        assert.matches("^[^:]*tasks_unit_spec%.lua:%d+: slm%." .. task:gsub("%.", "%%.")
          .. ": option 'timeout' must be a positive finite number of seconds, got ", err)
      end
    end
    assert.has_error(function() slm.generate{ client = c, template = "x", timeout = -5 } end,
      "slm.generate: option 'timeout' must be a positive finite number of seconds, got number")
    assert.has_error(function() slm.classify{ client = c, text = "x", labels = LABELS, timeout = math.huge } end,
      "slm.classify: option 'timeout' must be a positive finite number of seconds, got inf")
    assert(slm.classify{ client = c, text = "x", labels = LABELS, timeout = 0.5 })
    assert.are.equal(0.5, c.calls[#c.calls].timeout)
  end)
end)

describe("slm.extract's merging of chunks", function()
  local SCHEMA = { type = "object", properties = {
    party = { type = "string" }, payment_days = { type = "integer" },
    fees = { type = "array", items = { type = "object", properties = { code = { type = "string" }, amount = { type = "number" } } } },
    tags = { type = "array", items = { type = "string" } } } }
  local REPLIES = {
    ['one'] = '{"party":"Acme","payment_days":30,"fees":[{"code":"A","amount":10}],"tags":["x"]}',
    ['two'] = '{"party":"Acme","payment_days":45,"fees":[{"code":"A","amount":10},{"code":"B","amount":5}],"tags":["x","y"]}',
    ['three'] = '{"party":null,"fees":[{"code":"B","amount":5}]}',
  }
  local function by_chunk(req)
    local doc = req.messages[#req.messages].content
    local key = doc:match("one") and "one" or doc:match("two") and "two" or "three"
    return { text = REPLIES[key], usage = { prompt_tokens = 50, completion_tokens = 10, total_tokens = 60 }, cost = 0.001,
      attempts = 1, finish_reason = "stop", choices = {}, tool_calls = {} }
  end
  local DOC = ("section one. "):rep(60) .. ("section two. "):rep(60) .. ("section three. "):rep(60)

  it("concatenates arrays without duplicates, takes scalars from the first non-null, reports conflicts", function()
    local c = scripted{ by_chunk }
    local res = assert(slm.extract{ client = c, document = DOC, schema = SCHEMA, chunk_tokens = 120, overlap = 0,
      key = { ["$.fees"] = "code" } })
    assert.is_true(res.chunks >= 3)
    assert.are.equal(res.chunks, #c.calls)
    assert.are.equal("Acme", res.data.party)
    assert.are.equal(30, res.data.payment_days)
    assert.are.same({ "A", "B" }, { res.data.fees[1].code, res.data.fees[2].code })
    assert.are.equal(2, #res.data.fees)
    assert.are.same({ "x", "y" }, res.data.tags)
    assert.are.equal(1, #res.conflicts)
    assert.are.equal("$.payment_days", res.conflicts[1].path)
    assert.are.same({ 30, 45 }, res.conflicts[1].values)
    assert.are.equal(60 * res.chunks, res.usage.total_tokens)
    assert.is_true(math.abs(res.cost - 0.001 * res.chunks) < 1e-12)
  end)

  it("one request when the document fits", function()
    local c = scripted{ '{"party":"Acme"}' }
    local res = assert(slm.extract{ client = c, document = "Acme signs.", schema = SCHEMA })
    assert.are.equal(1, res.chunks)
    assert.are.equal(1, #c.calls)
  end)

  it("with evidence: fields whose quote is not in the document are dropped and reported", function()
    local c = scripted{ '{"party":{"value":"Acme","quote":"ACME   Logistics signs"},'
      .. '"payment_days":{"value":90,"quote":"within ninety days"}}' }
    local res = assert(slm.extract{ client = c, document = "Acme logistics signs. Payment within 30 days.",
      schema = SCHEMA, evidence = true })
    assert.are.equal("Acme", res.data.party)
    assert.is_nil(res.data.payment_days)
    assert.are.equal("ACME   Logistics signs", res.evidence["$.party"])
    assert.are.equal("$.payment_days", res.dropped[1].path)
    local sent = c.calls[1].response_format.json_schema.schema
    assert.is_table(sent.properties.party.properties.quote) -- { value, quote }
  end)
end)

describe("slm.generate", function()
  local render = require("slm.tasks.generate").render
  it("renders {{var}} templates and raises naming a missing variable", function()
    assert.are.equal("Meet Lumo: 12 h battery", render("Meet {{ name }}: {{features}}", { name = "Lumo", features = "12 h battery" }))
    assert.has_error(function() render("{{name}} at {{price}}", { name = "x" }) end,
      "slm.generate: template variable 'price' is missing from vars")
    assert.has_error(function() slm.generate{ client = scripted{ "x" }, template = "{{x}}", vars = {} } end,
      "slm.generate: template variable 'x' is missing from vars")
  end)

  it("regenerates once a reply with a banned word, then flags what is left", function()
    local c = scripted{ "A cheap lamp.", "A sensible lamp." }
    local res = assert(slm.generate{ client = c, template = "Describe {{x}}", vars = { x = "a lamp" },
      brand = { banned = { "cheap", "дешёвый" } } })
    assert.are.equal("A sensible lamp.", res.text)
    assert.is_true(res.regenerated)
    assert.is_nil(res.flags)
    assert.matches("Never use these words: cheap, дешёвый", c.calls[1].messages[1].content)
    assert.matches("cheap", c.calls[2].messages[1].content)
    local c2 = scripted{ "Дешевый светильник.", "Очень дешёвый светильник." }
    local res2 = assert(slm.generate{ client = c2, template = "Опишите {{x}}", vars = { x = "лампу" },
      brand = { banned = { "дешёвый" } } })
    assert.are.same({ "дешёвый" }, res2.flags.banned)
    assert.are.equal(2, res2.calls)
  end)

  it("bounds the length through max_tokens and checks it afterwards", function()
    local c = scripted{ "one two three four five six" }
    local res = assert(slm.generate{ client = c, template = "Say something about lamps", max_words = 5 })
    assert.is_number(c.calls[1].max_tokens)
    assert.is_true(c.calls[1].max_tokens >= 5 and c.calls[1].max_tokens < 40)
    assert.is_true(res.flags.too_long)
  end)

  it("n > 1 gives a list", function()
    local c = scripted{ { text = "a", choices = { { text = "a" }, { text = "b" } } } }
    local texts, res = slm.generate("Slogan for {{p}}", { p = "lamps" }, { client = c, n = 2 })
    assert.are.same({ "a", "b" }, texts)
    assert.are.equal(2, c.calls[1].n)
    assert.are.same({ "a", "b" }, res.texts)
  end)
end)

describe("slm.classify.evaluate", function()
  -- replies chosen by the ticket's text, whatever order the items run in
  local function by_text(map)
    local c = scripted{ function(req)
      local text = req.messages[#req.messages].content
      local r = map[text]
      if r == nil then return nil, require("slm.errors").new("server", "down", { status = 503 }) end
      return { text = r, finish_reason = "stop", usage = { prompt_tokens = 100, completion_tokens = 5,
        total_tokens = 105 }, cost = 0.0001, attempts = 1, tool_calls = {}, choices = {} }
    end }
    return c
  end

  it("accuracy, per-label precision/recall/F1, macro-F1, the confusion matrix, errors and cost", function()
    local c = by_text{ a = '{"label":"billing"}', b = '{"label":"delivery"}', c = '{"label":"delivery"}',
      d = '{"label":"billing"}' }
    local r = slm.classify.evaluate({ { text = "a", label = "billing" }, { text = "b", label = "billing" },
      { text = "c", label = "delivery" }, { text = "d", label = "other" }, { text = "e", label = "other" } },
      { client = c, labels = { "billing", "delivery", "other", "account" }, concurrency = 2 })
    assert.are.same({ 5, 4, 1 }, { r.n, r.completed, r.failed })
    -- a label neither in the data nor predicted has no F1, and macro-F1 leaves it out
    assert.are.same({ support = 0 }, r.per_label.account)
    assert.are.same({ server = 1 }, r.errors)
    assert.are.equal(2 / 5, r.accuracy)
    local b, d, o = r.per_label.billing, r.per_label.delivery, r.per_label.other
    assert.are.same({ 0.5, 0.5, 0.5, 2 }, { b.precision, b.recall, b.f1, b.support })
    assert.are.same({ 0.5, 1, 1 }, { d.precision, d.recall, d.support })
    assert.is_true(math.abs(d.f1 - 2 / 3) < 1e-12)
    assert.are.same({ 0, 0, 2 }, { o.recall, o.f1, o.support })
    assert.is_nil(o.precision) -- never predicted
    assert.is_true(math.abs(r.macro_f1 - (0.5 + 2 / 3 + 0) / 3) < 1e-12)
    assert.are.same({ billing = { billing = 1, delivery = 1 }, delivery = { delivery = 1 }, other = { billing = 1 } },
      r.confusion)
    assert.is_true(math.abs(r.cost - 0.0004) < 1e-12)
    assert.is_true(math.abs(r.cost_per_1000 - 0.08) < 1e-12)
    assert.are.equal(420, r.usage.total_tokens)
    assert.is_true(r.results[1].ok)
    assert.is_false(r.results[2].ok)
    assert.are.equal("server", r.results[5].err.kind)
  end)

  it("multi-label: exact set match for accuracy, each label counted on its own", function()
    local c = by_text{ a = '{"labels":["billing","delivery"]}', b = '{"labels":["billing"]}' }
    local r = slm.classify.evaluate({ { text = "a", labels = { "delivery", "billing" } },
      { text = "b", labels = { "billing", "other" } } }, { client = c, labels = LABELS, multi = true })
    assert.are.equal(0.5, r.accuracy)
    local b, d, o = r.per_label.billing, r.per_label.delivery, r.per_label.other
    assert.are.same({ 1, 1, 2 }, { b.precision, b.recall, b.support })
    assert.are.same({ 1, 1, 1 }, { d.precision, d.recall, d.support })
    assert.are.same({ 0, 1 }, { o.recall, o.support }) -- b's "other" was missed
    assert.are.same({ ["billing+delivery"] = { ["billing+delivery"] = 1 }, ["billing+other"] = { billing = 1 } },
      r.confusion)
  end)

  it("raises on misuse", function()
    assert.has_error(function() slm.classify.evaluate("x", {}) end, "slm.classify.evaluate: expected a list of examples")
    assert.has_error(function() slm.classify.evaluate({}, {}) end, "slm.classify.evaluate: option 'labels' is required")
  end)
end)

describe("the ledger", function()
  it("a task's cost is unknown (nil) when one call's price is", function()
    local c = scripted{ { text = '{"label":"misc"}', no_price = true }, '{"label":"other"}' }
    local res = assert(slm.classify{ client = c, text = "hi", labels = LABELS })
    assert.is_nil(res.cost)
    assert.are.equal(240, res.usage.total_tokens)
  end)

  it("counts what each call was billed (res.billed / err.billed: unusable replies, fallbacks), not only the answer", function()
    local c = scripted{ function()
      return { text = '{"label":"billing"}', finish_reason = "stop", tool_calls = {}, model = "gpt-4o-mini",
        usage = { prompt_tokens = 100, completion_tokens = 20, total_tokens = 120 }, cost = 0.0001, attempts = 2,
        choices = { { index = 0, text = '{"label":"billing"}', finish_reason = "stop", tool_calls = {} } },
        billed = { prompt_tokens = 1000, completion_tokens = 20, total_tokens = 1020, cost = 0.0009 } }
    end }
    local res = assert(slm.classify{ client = c, text = "hi", labels = LABELS })
    assert.are.equal(0.0009, res.cost)
    assert.are.equal(1020, res.usage.total_tokens)
    assert.are.equal(0.0009, res.requests[1].cost)
    -- a failed call that was billed
    local f = { model = "gpt-4o-mini", fallback = {} }
    function f:chat()
      return nil, setmetatable({ kind = "protocol", message = "no choices", status = 200, attempts = 1,
        billed = { prompt_tokens = 300, completion_tokens = 0, total_tokens = 300, cost = 0.00005 } },
        { __tostring = function(e) return e.message end })
    end
    local _, err = slm.classify{ client = f, text = "hi", labels = LABELS }
    assert.are.equal("protocol", err.kind)
    assert.are.equal(0.00005, err.cost)
    assert.are.equal(300, err.usage.total_tokens)
  end)
end)
