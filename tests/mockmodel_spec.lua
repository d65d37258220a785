-- tests/mockmodel_spec.lua: the simulator's scripted model
-- (tests/upstream/mockmodel.lua) as plain Lua, without nginx. It runs
-- inside nginx under LuaJIT (tests/upstream_spec.lua drives it there);
-- this checks the pieces under Lua 5.4, and also runs under LuaJIT:
--   lua5.4 /usr/bin/busted tests/mockmodel_spec.lua
--   luajit /usr/bin/busted tests/mockmodel_spec.lua
local cjson = require "cjson"
local mock = require "tests.upstream.mockmodel"

local enc = cjson.encode
local function decode(s)
  local ok, v = pcall(cjson.decode, s)
  if ok then return v end
end

describe("mockmodel", function()
  it("turns keyword scores into probabilities: (s + 0.1) / sum (s + 0.1)", function()
    local p = mock.probabilities({ 2, 1, 0 })
    assert.is_true(math.abs(p[1] - 2.1 / 3.3) < 1e-12)
    assert.is_true(math.abs(p[3] - 0.1 / 3.3) < 1e-12)
    assert.same({ 0.25, 0.25, 0.25, 0.25 }, mock.probabilities({ 0, 0, 0, 0 }))
  end)

  it("writes JSON in the filling order with lua-cjson's bytes", function()
    local schema = { type = "object", required = { "b", "a" }, properties = {
      a = { type = "string", enum = { "x/y", "z" } }, b = { type = "string" }, c = { type = "number" } } }
    local v, meta = mock.generate(schema, 'say "x/y" now')
    local text, spans = mock.render(v, meta, enc)
    assert.equal('{"b":"say \\"x\\/y\\" now","a":"x\\/y","c":0}', text)
    assert.equal(#enc(v), #text)
    assert.same(v, cjson.decode(text))
    assert.equal(1, #spans)
    assert.equal("x\\/y", text:sub(spans[1].s, spans[1].e))
  end)

  it("splits enum values into pieces of at most 4 bytes, never inside a character", function()
    local schema = { type = "object", required = { "lang", "label" }, properties = {
      lang = { type = "string", enum = { "en", "ru" } },
      label = { type = "string", enum = { "оплата", "другое" }, description = "оплата: деньги" } } }
    local v, meta = mock.generate(schema, "Верните деньги")
    local text, spans = mock.render(v, meta, enc)
    local tokens = {}
    for i, pc in ipairs(mock.json_pieces(text, spans)) do tokens[i] = pc.piece end
    assert.same({ '{"', "lang", '":"', "ru", '","', "label", '":"', "оп", "ла", "та", '"}' }, tokens)
    -- the language pick scores 1, the other value 0
    local lp = mock.json_logprobs(text, spans, 2, enc)
    assert.is_true(math.abs(lp[4].logprob - math.log(1.1 / 1.2)) < 1e-12)
    assert.same({ "оп", "др" }, { lp[8].top[1].token, lp[8].top[2].token })
    -- a prefix (max_tokens) keeps the pieces that fit
    tokens = {}
    for i, pc in ipairs(mock.json_pieces(text:sub(1, 5), spans)) do tokens[i] = pc.piece end
    assert.same({ '{"', "lan" }, tokens)
  end)

  it("finds sentences, and summarises within a word limit", function()
    local s = "First one here. Second: «quoted»! Third?\n\nFourth… and fifth"
    local out = {}
    for i, r in ipairs(mock.sentences(s)) do out[i] = s:sub(r[1], r[2]) end
    assert.same({ "First one here.", "Second: «quoted»!", "Third?", "Fourth…", "and fifth" }, out)
    assert.equal("First one here. Second: «quoted»!", mock.summarize(s, 5))
    assert.equal("First one", mock.summarize(s, 2))
    assert.equal(12, mock.word_limit("Summarize in 20 words, at most 12 words please"))
    assert.equal(7, mock.word_limit("Кратко, не более 7 слов."))
    assert.equal(40, mock.word_limit("Summarize.", 40))
    assert.is_true(mock.wants_summary("Сделай резюме"))
    assert.is_false(mock.wants_summary("Be brief and helpful"))
  end)

  it("matches questions to passages by stems, in English and Russian", function()
    local passages = mock.passages({ "intro", '<knowledge><passage id="a" title="Returns">Items can be returned'
      .. ' within 30 days.</passage><passage id="b">Доставка по Москве занимает один день.</passage></knowledge>' })
    assert.equal(2, #passages)
    assert.equal("Items can be returned within 30 days. [a]", (mock.knowledge_answer(passages, "Can I return it?")))
    assert.equal("Доставка по Москве занимает один день. [b]",
      (mock.knowledge_answer(passages, "Сколько идёт доставка в Москву?")))
    assert.equal("I'm not sure about that. [no-source]", (mock.knowledge_answer(passages, "How are you?")))
    assert.is_nil(mock.passages({ "no block here" }))
    assert.same({}, mock.passages({ "<knowledge></knowledge>" }))
  end)

  it("knows when a person is asked for", function()
    for _, t in ipairs({ "I need a HUMAN", "real person please", "позовите Оператора", "живым людям",
      "хочу поговорить с менеджером" }) do
      assert.is_true(mock.asks_for_human(t), t)
    end
    for _, t in ipairs({ "my personal data", "the operation failed", "hello" }) do
      assert.is_false(mock.asks_for_human(t), t)
    end
    local params = { type = "object", properties = { category = { anyOf = {
      { const = "billing", description = "payments" }, { const = "other" } } } } }
    assert.equal('{"reason":"user_request","category":"billing","summary":"payments went wrong, a human please"}',
      mock.escalation_arguments(params, "payments went wrong, a human please", enc))
  end)

  it("finds a schema in a prompt, and leaves other JSON alone", function()
    local schema, rest = mock.find_schema("Use this.\n```JSON\n{\"type\":\"object\"}\n```\nThanks", decode)
    assert.same({ type = "object" }, schema)
    assert.equal("Use this.\n\nThanks", rest)
    schema, rest = mock.find_schema('Text. JSON schema: {"properties":{"a":{"type":"string","description":"{}"}}} end',
      decode)
    assert.same({ properties = { a = { type = "string", description = "{}" } } }, schema)
    assert.equal("Text.  end", rest)
    assert.is_nil(mock.find_schema('```json\n{"label": "x"}\n```', decode))
    assert.is_nil(mock.find_schema('JSON schema: {broken', decode))
  end)

  it("quotes verbatim runs of the text", function()
    local text = "one two three\nfour five six seven eight nine ten eleven twelve thirteen fourteen"
    assert.equal("one two three\nfour five six seven eight nine ten eleven twelve", mock.quote(text))
    assert.equal("three\nfour five six seven eight nine ten eleven twelve thirteen fourteen",
      mock.quote(text, text:find("five")))
    assert.equal("nine ten eleven twelve thirteen fourteen", mock.quote(text, text:find("fourteen")))
    assert.equal("a b", mock.quote("  a b  "))
    assert.equal("one banned two", mock.insert_word("one two", "banned"))
  end)
end)
