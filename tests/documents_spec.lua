-- The document tasks against the simulator over real HTTP: slm.extract
-- (one request or chunks in flight together, merging, conflicts, evidence
-- quotes, the repair and length paths, images, personal data, budgets),
-- slm.summarize (one call or map-reduce over levels, word limits and the
-- flags that say when a reply broke them) and slm.generate (templates from
-- the catalogue, the brand voice, banned words regenerated once, n > 1).
-- The simulator's model fills schemas, quotes and summaries from the text
-- it is sent (tests/upstream/README.md, "The mock model" and "The scripted
-- model"); what is checked here is what the library does with that.
local H = require "tests.helpers"
local slm = require "slm"
local json = require "slm.json"
local csv = require "examples.lib.csv"
local common = require "slm.tasks.common"

local HERMES = "nousresearch/hermes-3-llama-3.1-405b"
local CONTRACT = H.read_file("examples/data/contract.txt")
local BRAND = json.decode(H.read_file("examples/data/brand.json"))
local CATALOGUE = assert(csv.read_file("examples/data/catalogue.csv"))

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)

local function client(opts, scenario) return H.task_client(up, opts, scenario) end

-- A client that records every call the task makes through it (request,
-- Response, error), and refuses calls beyond `cap` (a task that loops
-- fails instead of hanging the spec).
local function spy(c, cap)
  local s = setmetatable({ seen = {} }, { __index = c })
  function s:chat(req)
    if cap and #self.seen >= cap then return nil, slm.error("server", "spy: more than " .. cap .. " calls") end
    local res, err = c:chat(req)
    self.seen[#self.seen + 1] = { req = req, res = res, err = err }
    return res, err
  end
  return s
end

-- The totals of what a spy's calls returned.
local function spent(s)
  local t = { prompt_tokens = 0, completion_tokens = 0, total_tokens = 0, cost = 0, attempts = 0 }
  for _, x in ipairs(s.seen) do
    local r = x.res or (x.err and x.err.partial)
    if r then
      for k in pairs{ prompt_tokens = 1, completion_tokens = 1, total_tokens = 1 } do t[k] = t[k] + r.usage[k] end
      t.cost = t.cost + r.cost
    end
    t.attempts = t.attempts + (x.res and x.res.attempts or x.err and x.err.attempts or 0)
  end
  return t
end

local function near(a, b, eps) return math.abs(a - b) <= (eps or 1e-12) end
local function norm(s) return (s:lower():gsub("%s+", " ")) end
local function user_text(req)
  local c = req.messages[#req.messages].content
  if type(c) == "table" then return c[1].text end
  return c
end
local function system_text(req) return req.messages[1].content end
local function requests() return up:stats().requests end

------------------------------------------------------------------ extract

-- A schema the mock fills from the text it is sent: a title from the
-- first words, agreement_number from the first "ABC-123" (so chunks
-- disagree), parties with the name "Customer" everywhere and an excerpt of
-- the chunk's own words.
local CONTRACT_SCHEMA = {
  type = "object", required = { "title", "agreement_number" },
  properties = {
    title = { type = "string" },
    agreement_number = { type = "string" },
    liability_cap_eur = { type = "number" },
    parties = { type = "array", items = { type = "object", required = { "name", "excerpt" },
      properties = { name = { type = "string" }, excerpt = { type = "string" } } } },
  },
}

local SHORT = "Agreement No. KF-VM-2025-017 between Kestrel Fulfilment B.V. and Voltamart Europe SIA. "
  .. "Invoices are payable within thirty (30) days of the date of the invoice."

describe("slm.extract against the simulator", function()
  it("a document that fits is one request, and the data is valid against the schema", function()
    local before = requests()
    local c = spy(client())
    local res = assert(slm.extract{ client = c, document = SHORT, schema = CONTRACT_SCHEMA })
    assert.equal(1, requests() - before)
    assert.equal(1, res.chunks)
    assert.equal(1, res.calls)
    assert.is_true(slm.schema.validate(CONTRACT_SCHEMA, res.data))
    assert.equal("VM-2025", res.data.agreement_number)
    -- the whole document went in one user message, the schema in the response format
    local req = c.seen[1].req
    assert.equal(SHORT, user_text(req))
    assert.equal("json_schema", req.response_format.type)
    assert.is_nil(res.conflicts)
    local t = spent(c)
    assert.same({ t.prompt_tokens, t.completion_tokens, t.total_tokens },
      { res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.total_tokens })
    -- the short form: the data, then the result
    local data, res2 = slm.extract(SHORT, CONTRACT_SCHEMA, { client = client() })
    assert.same(res.data, data)
    assert.equal(1, res2.chunks)
  end)

  it("the contract in small chunks: one request per chunk, in flight together, covering the document", function()
    up:reset()
    local c = spy(client(nil, "delay=150"))
    local res = assert(slm.extract{ client = c, document = CONTRACT, schema = CONTRACT_SCHEMA,
      chunk_tokens = 4000, overlap = 100, concurrency = 3 })
    assert.is_true(res.chunks >= 4, tostring(res.chunks))
    assert.equal(res.chunks, #c.seen)
    assert.equal(res.chunks, up:stats().requests)
    -- three at a time, never more
    assert.equal(3, up:stats().max_in_flight)
    -- each request carries one piece of the document, at most chunk_tokens
    -- long; together they cover it, neighbours sharing the overlap
    local tok = slm.tokenizer("gpt-4o-mini")
    local pieces = {}
    for _, x in ipairs(c.seen) do pieces[#pieces + 1] = user_text(x.req) end
    table.sort(pieces, function(a, b) return CONTRACT:find(a, 1, true) < CONTRACT:find(b, 1, true) end)
    for i, p in ipairs(pieces) do
      assert.truthy(CONTRACT:find(p, 1, true), "chunk " .. i .. " is not a piece of the document")
      assert.is_true(tok:count(p) <= 4000)
      if i > 1 then
        local prev = pieces[i - 1]
        local s = CONTRACT:find(p, 1, true)
        assert.is_true(s <= CONTRACT:find(prev, 1, true) + #prev - 1, "chunks " .. i - 1 .. " and " .. i .. " do not overlap")
      end
    end
    assert.equal(1, CONTRACT:find(pieces[1], 1, true))
    assert.equal(#CONTRACT, CONTRACT:find(pieces[#pieces], 1, true) + #pieces[#pieces] - 1)
    assert.is_true(slm.schema.validate(CONTRACT_SCHEMA, res.data))
  end)

  it("usage, cost and attempts are summed over every chunk call and every repair", function()
    -- the first request of the key loses its first required field: that
    -- chunk is repaired, the others are not
    local c = spy(client(nil, "missing_field,fail=1"))
    local res = assert(slm.extract{ client = c, document = CONTRACT, schema = CONTRACT_SCHEMA, chunk_tokens = 5000,
      concurrency = 1 })
    assert.equal(res.chunks + 1, #c.seen)
    assert.equal(res.chunks + 1, res.calls)
    assert.equal(1, res.repaired)
    local t = spent(c)
    assert.equal(t.prompt_tokens, res.usage.prompt_tokens)
    assert.equal(t.completion_tokens, res.usage.completion_tokens)
    assert.equal(t.total_tokens, res.usage.total_tokens)
    assert.equal(t.attempts, res.attempts)
    assert.is_true(near(t.cost, res.cost))
    local m = slm.models["gpt-4o-mini"]
    assert.is_true(near(res.cost, (res.usage.prompt_tokens * m.input_per_m + res.usage.completion_tokens * m.output_per_m) / 1e6))
  end)

  it("arrays are merged and de-duplicated: by the key property, else by the whole value", function()
    local names_only = { type = "object", properties = { parties = { type = "array",
      items = { type = "object", properties = { name = { type = "string" } } } } } }
    -- every chunk finds {"name": "Customer"}: the same value once
    local res = assert(slm.extract{ client = client(), document = CONTRACT, schema = names_only, chunk_tokens = 5000 })
    assert.is_true(res.chunks >= 3)
    assert.same({ { name = "Customer" } }, res.data.parties)
    -- with an excerpt of each chunk's own words the values differ: one per chunk
    res = assert(slm.extract{ client = client(), document = CONTRACT, schema = CONTRACT_SCHEMA, chunk_tokens = 5000 })
    assert.equal(res.chunks, #res.data.parties)
    -- the key says what makes a party the same one, whatever else differs
    for _, key in ipairs{ "name", { ["$.parties"] = "name" } } do
      res = assert(slm.extract{ client = client(), document = CONTRACT, schema = CONTRACT_SCHEMA, chunk_tokens = 5000,
        key = key })
      assert.equal(1, #res.data.parties)
      assert.equal("Customer", res.data.parties[1].name)
    end
    -- a key for the arrays inside every item: "[]" stands for any index
    local nested = { type = "object", properties = { parties = { type = "array", items = { type = "object",
      properties = { name = { type = "string" }, aliases = { type = "array", items = { type = "object",
        properties = { name = { type = "string" }, excerpt = { type = "string" } } } } } } } } }
    res = assert(slm.extract{ client = client(), document = CONTRACT, schema = nested, chunk_tokens = 5000,
      key = { ["$.parties"] = "name", ["$.parties[].aliases"] = "name" } })
    assert.equal(1, #res.data.parties)
    assert.equal(1, #res.data.parties[1].aliases)
    res = assert(slm.extract{ client = client(), document = CONTRACT, schema = nested, chunk_tokens = 5000,
      key = { ["$.parties"] = "name" } })
    assert.equal(res.chunks, #res.data.parties[1].aliases)
    -- a key declared for another path leaves this array alone
    res = assert(slm.extract{ client = client(), document = CONTRACT, schema = CONTRACT_SCHEMA, chunk_tokens = 5000,
      key = { ["$.fees"] = "name" } })
    assert.equal(res.chunks, #res.data.parties)
  end)

  it("scalars the chunks disagree on are reported as conflicts; the first chunk's value is kept", function()
    local c = spy(client())
    local res = assert(slm.extract{ client = c, document = CONTRACT, schema = CONTRACT_SCHEMA, chunk_tokens = 5000,
      key = "name", concurrency = 1 })
    local by = {}
    for _, x in ipairs(res.conflicts) do by[x.path] = x end
    -- agreement_number: the first "ABC-123" of each chunk's own text
    local firsts, seen = {}, {}
    for _, x in ipairs(c.seen) do
      local v = json.decode(x.res.text).agreement_number
      if not seen[v] then seen[v] = true; firsts[#firsts + 1] = v end
    end
    assert.is_true(#firsts >= 2)
    assert.same(firsts, by["$.agreement_number"].values)
    assert.equal(firsts[1], res.data.agreement_number)
    assert.truthy(by["$.title"])
    -- the parties merged by name disagree on their excerpt: reported at the merged item
    assert.truthy(by["$.parties[0].excerpt"], json.encode(res.conflicts))
    assert.equal(res.chunks, #by["$.parties[0].excerpt"].values)
    -- a value every chunk agrees on is no conflict (the mock's numbers are all 0)
    assert.is_nil(by["$.liability_cap_eur"])
    assert.is_nil(by["$.parties[0].name"])
  end)

  it("evidence: each field comes with a quote found verbatim in the document, at the field's path", function()
    local c = spy(client())
    local res = assert(slm.extract{ client = c, document = SHORT, schema = CONTRACT_SCHEMA, evidence = true })
    -- every scalar is asked for as { value, quote }
    local sent = c.seen[1].req.response_format.json_schema.schema
    assert.same({ "quote", "value" }, (function() local r = sent.properties.title.required; table.sort(r); return r end)())
    assert.is_string(res.data.title)
    assert.same({}, res.dropped)
    assert.truthy(res.evidence["$.title"])
    for path, q in pairs(res.evidence) do
      assert.truthy(norm(SHORT):find(norm(q), 1, true), path .. ": " .. q)
    end
    -- over chunks: the quotes of each merged array item are its own chunk's,
    -- for items that are objects and items that are strings
    local schema = { type = "object", properties = { parties = CONTRACT_SCHEMA.properties.parties,
      highlights = { type = "array", items = { type = "string" } } } }
    res = assert(slm.extract{ client = client(), document = CONTRACT, schema = schema, chunk_tokens = 5000,
      evidence = true })
    assert.is_true(#res.data.parties >= 3)
    assert.equal(#res.data.parties, #res.data.highlights)
    for i, p in ipairs(res.data.parties) do
      local q = res.evidence[("$.parties[%d].excerpt"):format(i - 1)]
      assert.truthy(q, "no evidence for party " .. i)
      -- the mock's excerpt is the first words of the chunk, and so is its quote
      assert.equal(norm(p.excerpt), norm(q))
      q = res.evidence[("$.highlights[%d]"):format(i - 1)]
      assert.truthy(q, "no evidence for highlight " .. i)
      assert.equal(norm(res.data.highlights[i]), norm(q))
    end
  end)

  it("evidence: a field whose quote is not in the document is dropped and listed", function()
    local res = assert(slm.extract{ client = client(nil, "bad_quote"), document = SHORT, schema = CONTRACT_SCHEMA,
      evidence = true })
    assert.is_nil(res.data.title)
    assert.is_nil(res.data.agreement_number)
    local paths = {}
    for _, d in ipairs(res.dropped) do
      paths[d.path] = d
      assert.is_falsy(SHORT:find(d.quote, 1, true))
    end
    assert.truthy(paths["$.title"])
    assert.truthy(paths["$.agreement_number"])
    assert.is_string(paths["$.agreement_number"].value)
    assert.is_nil(next(res.evidence))
  end)

  it("merged data is validated: more items than the schema allows is a validation error", function()
    local capped = { type = "object", properties = { parties = { type = "array", maxItems = 2,
      items = CONTRACT_SCHEMA.properties.parties.items } } }
    for _, evidence in ipairs{ false, true } do
      local res, err = slm.extract{ client = client(), document = CONTRACT, schema = capped, chunk_tokens = 5000,
        evidence = evidence }
      assert.is_nil(res)
      assert.equal("validation", err.kind)
      assert.equal("$.parties", err.errors[1].path)
      assert.is_true(#err.data.parties > 2)
    end
  end)

  it("repairs: a missing field or broken JSON once is re-asked; always broken is kind validation", function()
    for _, d in ipairs{ "missing_field", "invalid_json" } do
      local c = spy(client(nil, d .. ",fail=1"))
      local res = assert(slm.extract{ client = c, document = SHORT, schema = CONTRACT_SCHEMA })
      assert.equal(2, res.calls, d)
      assert.equal(1, res.repaired, d)
      assert.is_true(slm.schema.validate(CONTRACT_SCHEMA, res.data), d)
      -- the re-ask carries the bad reply and what was wrong with it
      local again = c.seen[2].req.messages
      assert.equal("assistant", again[#again - 1].role)
      assert.truthy(again[#again].content:find(d == "missing_field" and "$.agreement_number" or "not JSON", 1, true), d)
    end
    local res, err = slm.extract{ client = client(nil, "invalid_json"), document = SHORT, schema = CONTRACT_SCHEMA }
    assert.is_nil(res)
    assert.equal("validation", err.kind)
    assert.equal(2, err.calls)
    assert.truthy(err.errors[1].message:find("not JSON", 1, true))
    assert.truthy(err.raw:find('{"', 1, true))
    assert.is_true(err.usage.total_tokens > 0 and err.cost > 0)
    -- over chunks the error says which chunk failed
    res, err = slm.extract{ client = client(nil, "missing_field"), document = CONTRACT, schema = CONTRACT_SCHEMA,
      chunk_tokens = 5000, concurrency = 1 }
    assert.equal("validation", err.kind)
    assert.equal(1, err.chunk)
  end)

  it("a failed chunk stops the chunks not yet sent: nothing more is spent on a task that has failed", function()
    local before = requests()
    local c = spy(client(nil, "status=500"))
    local res, err = slm.extract{ client = c, document = CONTRACT, schema = CONTRACT_SCHEMA, chunk_tokens = 3000,
      concurrency = 1 }
    assert.is_nil(res)
    assert.equal("server", err.kind)
    assert.equal(1, err.chunk)
    assert.equal(1, requests() - before)
    assert.equal(1, #c.seen)
  end)

  it("a reply cut by the output limit is asked again with a higher limit once, else kind length", function()
    local c = spy(client(nil, "cut,fail=1"))
    local res = assert(slm.extract{ client = c, document = SHORT, schema = CONTRACT_SCHEMA, max_tokens = 200 })
    assert.equal(2, res.calls)
    assert.equal(200, c.seen[1].req.max_tokens)
    assert.equal(456, c.seen[2].req.max_tokens) -- max(2 * 200, 200 + 256)
    assert.same(c.seen[1].req.messages, c.seen[2].req.messages)
    local _, err = slm.extract{ client = client(nil, "cut"), document = SHORT, schema = CONTRACT_SCHEMA, max_tokens = 200 }
    assert.equal("length", err.kind)
    assert.equal(2, err.calls)
    -- no max_tokens: the reply hit the model's own limit, which cannot be raised
    _, err = slm.extract{ client = client(nil, "cut"), document = SHORT, schema = CONTRACT_SCHEMA }
    assert.equal("length", err.kind)
    assert.equal(1, err.calls)
  end)

  local RECEIPT_SCHEMA = {
    type = "object", required = { "merchant", "items", "total", "currency" },
    properties = {
      merchant = { type = "string" }, receipt_number = { type = "string" },
      items = { type = "array", items = { type = "object", required = { "name", "qty", "total" },
        properties = { name = { type = "string" }, qty = { type = "number" }, total = { type = "number" } } } },
      total = { type = "number" }, currency = { type = "string", enum = { "EUR", "RUB" } },
    },
  }

  it("images go to a vision model: Hermes with a gpt-4o-mini fallback sends them to gpt-4o-mini", function()
    local c = spy(client{ model = HERMES, fallback = { "gpt-4o-mini" } })
    local res = assert(slm.extract{ client = c, document = "The shop receipt in the image.", schema = RECEIPT_SCHEMA,
      images = { "examples/data/receipt.png" } })
    assert.equal("gpt-4o-mini", res.model)
    local body = H.last(up).body
    assert.equal("gpt-4o-mini", body.model)
    local parts = body.messages[#body.messages].content
    assert.equal("text", parts[1].type)
    assert.equal("image_url", parts[2].type)
    assert.truthy(parts[2].image_url.url:find("^data:image/png;base64,"))
    assert.is_true(slm.schema.validate(RECEIPT_SCHEMA, res.data))
  end)

  it("images are never sent to a fallback model that cannot read them", function()
    -- gpt-4o-mini fails; its fallback, Hermes, reads no images: the task fails
    -- instead of sending the receipt to Hermes
    local c = spy(client({ fallback = { HERMES } }, "status=503,fail=1"))
    local res, err = slm.extract{ client = c, document = "The receipt.", schema = RECEIPT_SCHEMA,
      images = { "examples/data/receipt.png" } }
    assert.is_nil(res)
    assert.equal("server", err.kind)
    assert.equal("gpt-4o-mini", H.last(up).body.model)
  end)

  it("no model that reads images: invalid_request before anything is sent", function()
    local before = requests()
    local res, err = slm.extract{ client = client{ model = HERMES }, document = "The receipt.", schema = RECEIPT_SCHEMA,
      images = { "examples/data/receipt.png" } }
    assert.is_nil(res)
    assert.equal("invalid_request", err.kind)
    assert.truthy(err.message:find("does not read images", 1, true))
    assert.equal(before, requests())
  end)

  it("mask_pii: identifiers never reach the simulator, and come back unmasked in the data", function()
    local doc = "Contact ivan.petrov@example.com or +7 912 345-67-89 about the invoice. "
      .. "Payment to IBAN LV80BANK0000435195001 within thirty days."
    local schema = { type = "object", required = { "contact" }, properties = { contact = { type = "string" } } }
    local res = assert(slm.extract{ client = client(), document = doc, schema = schema, mask_pii = true, evidence = true })
    local raw = H.last(up).raw_body
    for _, secret in ipairs{ "ivan.petrov@example.com", "912 345-67-89", "LV80BANK0000435195001" } do
      assert.is_falsy(raw:find(secret, 1, true), secret .. " reached the simulator")
    end
    assert.truthy(raw:find("[EMAIL_1]", 1, true))
    assert.same({ 1, 1, 1 }, { res.masked.email, res.masked.phone, res.masked.iban })
    assert.truthy(res.data.contact:find("ivan.petrov@example.com", 1, true), res.data.contact)
    assert.truthy(res.data.contact:find("+7 912 345-67-89", 1, true))
    -- the quote is the document's own words, not the placeholders
    local q = res.evidence["$.contact"]
    assert.truthy(q:find("ivan.petrov@example.com", 1, true), q)
    assert.truthy(doc:find(q, 1, true))
    -- and so are the conflicts between chunks
    local long = (doc .. " "):rep(40) .. ("Nothing else here. "):rep(300)
    res = assert(slm.extract{ client = client(), document = long, schema = { type = "object",
      properties = { note = { type = "string" } } }, chunk_tokens = 800, overlap = 0, mask_pii = true })
    assert.is_true(res.chunks >= 2)
    local text = json.encode(res.conflicts)
    assert.is_falsy(text:find("%[EMAIL_%d%]"), text)
    assert.truthy(text:find("ivan.petrov@example.com", 1, true), text)
  end)

  it("a budget that runs out between chunks fails the task with kind budget and the totals of what was spent", function()
    local b = slm.budget{ tokens = 9000 }
    local c = spy(client{ budget = b })
    local before = requests()
    local res, err = slm.extract{ client = c, document = CONTRACT, schema = CONTRACT_SCHEMA, chunk_tokens = 2000,
      max_tokens = 300, concurrency = 1 }
    assert.is_nil(res)
    assert.equal("budget", err.kind)
    assert.is_true(err.chunk >= 2, tostring(err.chunk))
    -- the chunks before it were sent and paid for; none after it was sent
    assert.equal(err.chunk - 1, requests() - before)
    assert.equal(err.chunk, #c.seen)
    local _, tokens = b:spent()
    assert.equal(tokens, err.usage.total_tokens)
    assert.equal(spent(c).total_tokens, err.usage.total_tokens)
    assert.is_true(err.cost > 0)
    assert.equal(err.chunk - 1, err.attempts)
  end)
end)

------------------------------------------------------------------ summarize

local TEXT = "The parcel arrived damaged on Monday. The box was wet and the kettle inside was cracked. "
  .. "The customer wants a refund to the card she paid with. She attached three photos."

describe("slm.summarize against the simulator", function()
  it("mask_pii: the summary has the values back, the simulator saw placeholders", function()
    local doc = "Anna wrote from anna.k@example.org about card 4111 1111 1111 1111. She wants a refund."
    local res = assert(slm.summarize{ client = client(), document = doc, max_words = 40, mask_pii = true })
    local raw = H.last(up).raw_body
    assert.is_falsy(raw:find("anna.k@example.org", 1, true))
    assert.is_falsy(raw:find("4111", 1, true))
    assert.truthy(raw:find("[CARD_1]", 1, true))
    assert.truthy(res.text:find("anna.k@example.org", 1, true), res.text)
    assert.truthy(res.text:find("4111 1111 1111 1111", 1, true), res.text)
    assert.same({ 1, 1 }, { res.masked.email, res.masked.card })
  end)

  it("a short text is one call, within max_words words, the count in res.words", function()
    local c = spy(client())
    local res = assert(slm.summarize{ client = c, document = TEXT, max_words = 16 })
    assert.equal(1, #c.seen)
    assert.equal(1, res.chunks)
    assert.equal(1, res.levels)
    assert.truthy(system_text(c.seen[1].req):find("at most 16 words", 1, true))
    assert.equal(TEXT, user_text(c.seen[1].req))
    assert.equal(common.word_count(res.text), res.words)
    assert.is_true(res.words <= 16 and res.words > 0)
    assert.equal("The parcel arrived damaged on Monday. The box was wet and the kettle inside was cracked.", res.text)
    assert.is_nil(res.flags)
    -- max_tokens bounds the reply, from the tokenizer on the text's own words
    assert.equal(common.max_tokens_for_words(16, "gpt-4o-mini", TEXT), c.seen[1].req.max_tokens)
    local text, res2 = slm.summarize(TEXT, 8, { client = client() })
    assert.equal("The parcel arrived damaged on Monday.", text)
    assert.equal(6, res2.words)
  end)

  it("a long document is summarized map-reduce, level after level, every prompt asking for its limit", function()
    local c = spy(client(), 500)
    local res = assert(slm.summarize{ client = c, document = CONTRACT, max_words = 50, chunk_tokens = 600 })
    assert.is_true(res.chunks >= 20, tostring(res.chunks))
    assert.is_true(res.levels >= 3, tostring(res.levels))
    assert.is_true(res.words <= 50 and res.words > 0)
    assert.equal(#c.seen, res.calls)
    -- the first level is the chunks themselves (pieces of the document),
    -- the later ones the summaries, numbered
    local firsts, later = 0, 0
    for i, x in ipairs(c.seen) do
      local sys, txt = system_text(x.req), user_text(x.req)
      local limit = tonumber(sys:match("at most (%d+) words"))
      assert.truthy(limit, "call " .. i .. " asks for no limit")
      if i == #c.seen then assert.equal(50, limit) else assert.equal(60, limit) end
      if CONTRACT:find(txt, 1, true) then firsts = firsts + 1 else
        later = later + 1
        assert.truthy(txt:find("^Part %d+:\n"), txt:sub(1, 40))
      end
      assert.is_true(common.word_count(x.res.text) <= limit)
    end
    assert.equal(res.chunks, firsts)
    assert.is_true(later >= res.levels - 1)
    assert.equal(res.text, c.seen[#c.seen].res.text)
    local t = spent(c)
    assert.equal(t.total_tokens, res.usage.total_tokens)
    assert.is_true(near(t.cost, res.cost))
  end)

  it("always ends, even when one summary is longer than a chunk", function()
    -- 100-word summaries of 100-token chunks: every group of summaries is
    -- over the chunk size, yet each level must have fewer than the last
    local c = spy(client(), 300)
    local doc = ("The provider ships parcels every working day from the warehouse in Venlo to customers. "):rep(100)
    local res = assert(slm.summarize{ client = c, document = doc, max_words = 100, chunk_tokens = 100 })
    assert.is_true(res.chunks >= 16, tostring(res.chunks))
    assert.is_true(res.words <= 100)
    -- each level at most half the one before (rounded up): n + n/2 + n/4 ... calls
    local n, bound, levels = res.chunks, res.chunks, 1
    while n > 1 do n = math.ceil(n / 2); bound = bound + n; levels = levels + 1 end
    assert.is_true(#c.seen <= bound, ("%d calls for %d chunks"):format(#c.seen, res.chunks))
    assert.is_true(res.levels <= levels and res.levels >= 2, tostring(res.levels))
  end)

  it("a reply longer than max_words is flagged too_long, and kept as it is", function()
    -- chunks=80: eighty words whatever was asked
    local res = assert(slm.summarize{ client = client(nil, "chunks=80"), document = TEXT, max_words = 20 })
    assert.equal(80, res.words)
    assert.is_true(res.flags.too_long)
    assert.is_nil(res.flags.cut)
    assert.equal(("tok "):rep(80), res.text)
  end)

  it("a reply cut by the output limit is flagged cut", function()
    slm.models["tiny-output-test"] = { context = 128000, max_output = 6, input_per_m = 0.15, output_per_m = 0.6,
      tokenizer = "o200k_base" }
    finally(function() slm.models["tiny-output-test"] = nil end)
    local c = spy(client{ model = "tiny-output-test" })
    local res = assert(slm.summarize{ client = c, document = TEXT, max_words = 40 })
    assert.equal(6, c.seen[1].req.max_tokens)
    assert.is_true(res.flags.cut)
    assert.equal(c.seen[1].res.text, res.text)
  end)

  it("banned words are flagged, never hidden", function()
    local res = assert(slm.summarize{ client = client(nil, "banned=delve"), document = TEXT, max_words = 16,
      banned = { "delve", "cheap" } })
    assert.same({ "delve" }, res.flags.banned)
    assert.truthy(res.text:find("delve", 1, true))
    assert.is_true(res.words <= 16)
    -- no banned word: no flag
    res = assert(slm.summarize{ client = client(), document = TEXT, max_words = 16, banned = { "cheap" } })
    assert.is_nil(res.flags)
  end)

  it("asks for the language given, else the document's own", function()
    local c = spy(client())
    assert(slm.summarize{ client = c, document = TEXT, language = "ru" })
    assert.truthy(system_text(c.seen[1].req):find("in Russian", 1, true))
    assert(slm.summarize{ client = c, document = "Посылка пришла повреждённой. Клиент просит вернуть деньги." })
    assert.truthy(system_text(c.seen[2].req):find("in Russian", 1, true))
    assert(slm.summarize{ client = c, document = TEXT })
    assert.truthy(system_text(c.seen[3].req):find("in English", 1, true))
    assert(slm.summarize{ client = c, document = TEXT, language = "German" })
    assert.truthy(system_text(c.seen[4].req):find("in German", 1, true))
  end)

  it("images go with the call that writes the final summary, to a model that reads them", function()
    local function images_in(req)
      local n, c = 0, req.messages[#req.messages].content
      if type(c) == "table" then
        for _, p in ipairs(c) do if p.type == "image_url" then n = n + 1 end end
      end
      return n
    end
    local c = spy(client{ model = HERMES, fallback = { "gpt-4o-mini" } })
    local res = assert(slm.summarize{ client = c, document = TEXT, images = { "examples/data/receipt.png" } })
    assert.equal("gpt-4o-mini", res.model)
    assert.equal(1, images_in(c.seen[1].req))
    assert.equal("gpt-4o-mini", c.seen[1].req.model)
    assert.truthy(system_text(c.seen[1].req):find("the text and images", 1, true))
    -- over chunks: the pieces go without them, the last call with them
    c = spy(client{ model = HERMES, fallback = { "gpt-4o-mini" } })
    res = assert(slm.summarize{ client = c, document = CONTRACT, chunk_tokens = 4000,
      images = { "examples/data/receipt.png" } })
    assert.is_true(res.levels >= 2)
    for i, x in ipairs(c.seen) do
      assert.equal("gpt-4o-mini", x.req.model)
      assert.equal(i == #c.seen and 1 or 0, images_in(x.req), "call " .. i)
    end
  end)

  it("errors come back with the totals of what was spent", function()
    local res, err = slm.summarize{ client = client(nil, "status=503"), document = TEXT }
    assert.is_nil(res)
    assert.equal("server", err.kind)
    assert.equal(1, err.calls)
  end)
end)

------------------------------------------------------------------ generate

local function row(sku, lang)
  for _, r in ipairs(CATALOGUE) do if r.sku == sku and r.lang == lang then return r end end
end
local TEMPLATE = "Write the product description of {{name}} ({{category}}). Features: {{features}}. For: {{audience}}."

describe("slm.generate against the simulator", function()
  it("fills {{var}} templates from catalogue rows, with the brand voice in the system prompt", function()
    for _, lang in ipairs{ "en", "ru" } do
      local r = assert(row("AUD-1042", lang))
      local c = spy(client())
      local res = assert(slm.generate{ client = c, template = TEMPLATE, vars = r, brand = BRAND, max_words = 80 })
      local req = c.seen[1].req
      local prompt = ("Write the product description of %s (%s). Features: %s. For: %s."):format(r.name, r.category,
        r.features, r.audience)
      assert.equal(prompt, user_text(req))
      assert.equal("Echo: ", res.text:sub(1, 6))
      local sys = system_text(req)
      assert.truthy(sys:find("You write for Voltamart.", 1, true))
      assert.truthy(sys:find("Tone: " .. BRAND.tone, 1, true))
      assert.truthy(sys:find("Audience: " .. BRAND.audience, 1, true))
      assert.truthy(sys:find("Do: " .. BRAND["do"][1], 1, true))
      assert.truthy(sys:find("Don't: " .. BRAND.dont[1], 1, true))
      assert.truthy(sys:find("Never use these words: " .. table.concat(BRAND.banned, ", "), 1, true))
      assert.truthy(sys:find("at most 80 words", 1, true))
      assert.truthy(sys:find(lang == "ru" and "Write in Russian" or "Write in English", 1, true))
      assert.is_false(res.regenerated)
      assert.equal(1, res.calls)
      -- what slm.generate.request says the first request is, nothing sent
      local before = requests()
      local planned = slm.generate.request{ client = c, template = TEMPLATE, vars = r, brand = BRAND, max_words = 80 }
      assert.equal(before, requests())
      assert.same(req.messages, planned.messages)
      assert.equal(req.max_tokens, planned.max_tokens)
      assert.equal("gpt-4o-mini", planned.model)
    end
  end)

  it("a reply with a banned word is written again once, with the word named; the second is clean", function()
    local c = spy(client(nil, "banned=revolutionary,fail=1"))
    local res = assert(slm.generate{ client = c, template = TEMPLATE, vars = row("AUD-1051", "en"), brand = BRAND })
    assert.equal(2, #c.seen)
    assert.truthy(c.seen[1].res.text:find("revolutionary", 1, true))
    assert.truthy(system_text(c.seen[2].req):find("Your previous text used revolutionary", 1, true))
    assert.is_true(res.regenerated)
    assert.is_falsy(res.text:find("revolutionary", 1, true))
    assert.is_nil(res.flags)
    assert.equal(2, res.calls)
    local t = spent(c)
    assert.equal(t.total_tokens, res.usage.total_tokens)
    assert.is_true(near(t.cost, res.cost))
  end)

  it("a banned word that comes back again is flagged, and the text is kept", function()
    local c = spy(client(nil, "banned=cheap"))
    local res = assert(slm.generate{ client = c, template = TEMPLATE, vars = row("AUD-1051", "en"), brand = BRAND })
    assert.equal(2, #c.seen)
    assert.is_true(res.regenerated)
    assert.same({ "cheap" }, res.flags.banned)
    assert.truthy(res.text:find("cheap", 1, true))
    -- a word not on the list is no reason to regenerate
    c = spy(client(nil, "banned=sturdy"))
    res = assert(slm.generate{ client = c, template = TEMPLATE, vars = row("AUD-1051", "en"), brand = BRAND })
    assert.equal(1, #c.seen)
    assert.is_false(res.regenerated)
    assert.is_nil(res.flags)
  end)

  it("max_words bounds the reply through max_tokens, and a longer reply is flagged", function()
    local c = spy(client())
    local vars = row("AUD-1042", "en")
    local prompt = require("slm.tasks.generate").render(TEMPLATE, vars)
    local res = assert(slm.generate{ client = c, template = TEMPLATE, vars = vars, max_words = 10 })
    local req = c.seen[1].req
    assert.equal(common.max_tokens_for_words(10, "gpt-4o-mini", prompt), req.max_tokens)
    -- the echo of a long prompt is cut at max_tokens, and still longer than 10 words
    assert.equal("length", c.seen[1].res.finish_reason)
    assert.is_true(res.flags.cut)
    assert.is_true(res.flags.too_long)
    assert.is_true(common.word_count(res.text) > 10)
    -- no max_words: no limit sent
    c = spy(client())
    assert(slm.generate{ client = c, template = TEMPLATE, vars = vars })
    assert.is_nil(c.seen[1].req.max_tokens)
  end)

  it("n > 1 gives n texts in one call; a banned word in them is regenerated for those texts", function()
    local c = spy(client())
    local texts, res = slm.generate("Slogan for {{name}}", { name = "Sonvik Halo" }, { client = c, n = 3 })
    assert.equal(1, #c.seen)
    assert.equal(3, c.seen[1].req.n)
    assert.same({ "Echo: Slogan for Sonvik Halo [choice 1]", "Echo: Slogan for Sonvik Halo [choice 2]",
      "Echo: Slogan for Sonvik Halo [choice 3]" }, texts)
    assert.same(texts, res.texts)
    assert.equal(texts[1], res.text)
    c = spy(client(nil, "banned=hurry,fail=1"))
    res = assert(slm.generate{ client = c, template = "Slogan for {{name}}", vars = { name = "Sonvik Halo" }, n = 2,
      brand = BRAND })
    assert.equal(2, #c.seen)
    assert.equal(2, c.seen[2].req.n)
    assert.is_true(res.regenerated)
    for _, t in ipairs(res.texts) do assert.is_falsy(t:find("hurry", 1, true)) end
    assert.is_nil(res.flags)
  end)
end)
