-- slm.bm25: the analysis (words, folding, stop words, the English and
-- Russian stemmers, numbers), BM25 scores against the formula, ranking on a
-- small FAQ in both languages, remove and replace, passages() boundaries,
-- and misuse.  Pure Lua: bin/test runs it under Lua 5.4 and LuaJIT.
local bm25 = require "slm.bm25"

local terms = bm25.terms
local concat = table.concat

local function T(s) return concat(terms(s), " ") end

-- the one term of a word
local function stem(w)
  local t = terms(w)
  assert(#t == 1, "expected one term for " .. w .. ", got {" .. concat(t, ",") .. "}")
  return t[1]
end

local function same_stem(words)
  local first = stem(words[1])
  for i = 2, #words do
    assert.are.equal(first, stem(words[i]), words[i] .. " vs " .. words[1])
  end
  return first
end

local function ids(results)
  local out = {}
  for i, r in ipairs(results) do out[i] = r.id end
  return out
end

local function err_of(fn, ...)
  local ok, e = pcall(fn, ...)
  assert(not ok, "expected an error")
  return tostring(e)
end

-- Valid UTF-8 (RFC 3629 shapes; enough to see nothing was cut).
local function valid_utf8(s)
  local i, n = 1, #s
  while i <= n do
    local b = s:byte(i)
    local len = b < 0x80 and 1 or (b >= 0xC2 and b < 0xE0) and 2 or (b >= 0xE0 and b < 0xF0) and 3
      or (b >= 0xF0 and b < 0xF5) and 4 or nil
    if not len or i + len - 1 > n then return false end
    for j = i + 1, i + len - 1 do
      local c = s:byte(j)
      if c < 0x80 or c > 0xBF then return false end
    end
    i = i + len
  end
  return true
end

local function nchars(s)
  local _, c = s:gsub("[\128-\191]", "")
  return #s - c
end

describe("slm.bm25.terms", function()
  describe("English", function()
    it("folds case and drops stop words", function()
      assert.are.equal("reset password", T("How do I reset my password?"))
      assert.are.same({}, terms("Where is it? What can I do, and why?"))
      assert.are.same({}, terms("THE and OF"))
    end)

    it("stems the inflected forms of the issue onto one term", function()
      assert.are.equal("deliver", same_stem { "deliveries", "delivery", "delivered", "delivering", "Deliveries" })
      assert.are.equal("refund", same_stem { "refunded", "refund", "refunds", "refunding", "refundable" })
      assert.are.equal("password", same_stem { "passwords", "password", "Passwords" })
      same_stem { "cancelled", "canceled", "cancel", "cancellation", "cancels" }
      same_stem { "charges", "charged", "charging", "charge" }
      same_stem { "shipping", "shipped", "ships", "ship" }
      same_stem { "addresses", "address" }
      same_stem { "applied", "apply", "applies", "applying" }
      same_stem { "activation", "activate", "activated" }
      same_stem { "invoices", "invoice", "invoiced" }
      same_stem { "quickly", "quick" }
    end)

    it("leaves words whose s is not a plural, and short words, alone", function()
      assert.are.equal("status", stem("status"))
      assert.are.equal("class", stem("class"))
      assert.are.equal("bus", stem("bus"))
      assert.are.equal("add", stem("add"))
      assert.are.equal("need", stem("need"))
      assert.are_not.equal(stem("city"), stem("cit"))
    end)

    it("removes apostrophes inside words and folds accents", function()
      assert.are.same({ "customer" }, terms("customer's"))
      assert.are.same({ "customer" }, terms("customers\226\128\153")) -- customers’
      assert.are.same({}, terms("don't won\226\128\153t it's")) -- dont, wont, its: stop words
      assert.are.equal(T("cafe naive facade"), T("Café naïve façade"))
      assert.are.equal(T("strasse"), T("Straße"))
      assert.are.equal(T("lodz"), T("Łódź"))
      assert.are.equal(T("creme"), T("cre\204\128me")) -- e + combining grave accent
    end)

    it("keeps numbers as terms, and splits at punctuation", function()
      assert.are.same({ "order", "58213" }, terms("Order #58213"))
      assert.are.same({ "12", "5", "1", "500" }, terms("12.5% of 1,500"))
      assert.are.same({ "a1b2", "sku", "77" }, terms("a1b2 SKU-77"))
    end)
  end)

  describe("Russian", function()
    it("folds case and ё into е", function()
      assert.are.equal(T("елка ежик счет"), T("Ёлка ЁЖИК счёт"))
      assert.are.equal(T("заказ"), T("ЗАКАЗ"))
      assert.are.equal(T("доставка"), T("Доставка"))
    end)

    it("drops stop words", function()
      assert.are.same({}, terms("Где мой? Как это, если его нет, и что же мне?"))
      assert.are.equal(T("заказ"), T("Где мой заказ?"))
      assert.are.equal(T("заказ"), T("А где же её заказ?"))
    end)

    it("stems the inflected forms of the issue onto one term", function()
      assert.are.equal("доставк", same_stem { "доставки", "доставка", "доставку", "доставкой", "доставке" })
      assert.are.equal("заказ", same_stem { "заказов", "заказа", "заказ", "заказу", "заказом", "заказы", "заказал", "заказать", "заказали" })
      assert.are.equal("оплат", same_stem { "оплатил", "оплата", "оплаты", "оплатить", "оплатила", "оплатой" })
      same_stem { "списались", "списали", "списал" }
      same_stem { "работает", "работа", "работать" }
      same_stem { "пароль", "пароля", "пароли", "паролем" }
      same_stem { "приложение", "приложения", "приложении" }
      same_stem { "оплачен", "оплаченный", "оплачена", "оплаченные" }
    end)

    it("does not join what the stemmer cannot see", function()
      -- the т/ч alternation and a fleeting vowel: documented limits
      assert.are_not.equal(stem("оплата"), stem("оплачен"))
      assert.are_not.equal(stem("доставка"), stem("доставок"))
    end)

    it("keeps nouns that end like verbs whole", function()
      same_stem { "кредит", "кредита", "кредиту", "кредитом" }
      same_stem { "канал", "канала", "каналу" }
      same_stem { "проблема", "проблем", "проблемы" }
      assert.are.equal("пакет", stem("пакет"))
      assert.are.equal(stem("пакета"), stem("пакет"))
    end)

    it("keeps numbers and splits at Russian punctuation", function()
      assert.are.same({ "заказ", "58213" }, terms("Заказ №58213"))
      assert.are.same({ "доставк", "быстр" }, terms("«Доставка»\226\128\148быстро\226\128\166"))
      assert.are.same({ "10", "000", "руб" }, terms("10\194\160000 руб."))
    end)
  end)

  it("separates at emoji and symbols, and deletes soft hyphens", function()
    assert.are.same({ "order", "ship" }, terms("order\240\159\147\166shipped"))
    assert.are.same({ "payment" }, terms("pay\194\173ment"))
    assert.are.same({ "deliver", "refund" }, terms("delivery\226\134\146refund"))
  end)

  it("gives the same terms with a cache that starts again", function()
    local text = "Доставка\226\128\148заказа refunded—deliveries Ёлка 58213 customer's"
    local want = terms(text)
    bm25._cache_max(3)
    for _ = 1, 5 do assert.are.same(want, terms(text)) end
    local idx = bm25.new()
    idx:add("a", text)
    idx:add("b", "something else entirely")
    assert.are.equal("a", idx:search("доставки заказов")[1].id)
    bm25._cache_max()
    assert.are.same(want, terms(text))
  end)

  it("lists its stop words", function()
    local list = bm25.stop_words()
    assert.is_true(#list >= 250)
    local set = {}
    for _, w in ipairs(list) do set[w] = true end
    assert.is_true(set.the and set["и"] and set["ее"] and set.dont)
    assert.is_nil(set.order)
    assert.is_nil(set["заказ"])
  end)
end)

describe("slm.bm25 index", function()
  local faq = {
    { "en-delivery", "Delivery takes 2 to 5 business days. Deliveries to remote areas may take longer, and the courier calls before arriving." },
    { "en-refund", "Refunds are issued to the original payment method within 10 days after we receive the returned item." },
    { "en-password", "To reset your password, open Settings, choose Security and follow the link we email you." },
    { "en-charge", "If you were charged twice, the second charge is a card authorization that disappears within a week." },
    { "en-order", "Order 58213 was shipped from the Berlin warehouse on Monday." },
    { "en-stop", "Where is it, and how? What can I do about it, and when?" },
    { "ru-delivery", "Доставка по Москве занимает один день, в другие города доставляем за 3–7 дней." },
    { "ru-orders", "Историю заказов можно посмотреть в личном кабинете: там видны все заказы и их статусы." },
    { "ru-payment", "Оплата картой подтверждается сразу. Если оплата не прошла, проверьте лимит по карте." },
    { "ru-password", "Чтобы сменить пароль, откройте настройки профиля и нажмите «Изменить пароль»." },
    { "ru-refund", "Деньги за возвращённый товар возвращаются на карту в течение 10 дней." },
    { "ru-stop", "Где и как? Что же нам с этим делать, если оно так?" },
  }
  local idx
  before_each(function()
    idx = bm25.new()
    for i, e in ipairs(faq) do idx:add(e[1], e[2], { n = i }) end
  end)

  it("counts its entries", function()
    assert.are.equal(#faq, idx:size())
    assert.are.equal(0, bm25.new():size())
  end)

  it("puts the right English passage first", function()
    assert.are.equal("en-delivery", idx:search("When will my deliveries arrive?")[1].id)
    assert.are.equal("en-refund", idx:search("I was refunded only partly")[1].id)
    assert.are.equal("en-password", idx:search("how do I reset passwords")[1].id)
    assert.are.equal("en-charge", idx:search("Why was I charged two times?")[1].id)
    assert.are.equal("en-order", idx:search("where is 58213")[1].id)
  end)

  it("puts the right Russian passage first", function()
    assert.are.equal("ru-delivery", idx:search("Сколько дней идёт доставки в Москву?")[1].id)
    assert.are.equal("ru-orders", idx:search("где посмотреть мои заказа")[1].id)
    assert.are.equal("ru-payment", idx:search("я оплатил картой, что дальше")[1].id)
    assert.are.equal("ru-password", idx:search("Как поменять ПАРОЛЯ?")[1].id)
    assert.are.equal("ru-refund", idx:search("когда вернутся деньги")[1].id)
  end)

  it("does not find a passage that shares only stop words", function()
    for _, q in ipairs { "Where and how can I reset my password?", "Где и как мне сменить пароль?" } do
      local r = idx:search(q, 20)
      assert.is_true(#r >= 1)
      for _, x in ipairs(r) do
        assert.are_not.equal("en-stop", x.id, q)
        assert.are_not.equal("ru-stop", x.id, q)
      end
    end
    assert.are.same({}, idx:search("Where is it? What, and when?"))
    assert.are.same({}, idx:search("где и как это"))
  end)

  it("returns at most k results, best first, all with a score above 0 and their meta", function()
    local r = idx:search("delivery refund password charged order доставка заказы оплата пароль деньги")
    assert.are.equal(5, #r)
    for i, x in ipairs(r) do
      assert.is_true(x.score > 0)
      if i > 1 then assert.is_true(r[i - 1].score >= x.score) end
      assert.are.equal("table", type(x.meta))
      assert.are.equal(x.id, faq[x.meta.n][1])
    end
    assert.are.equal(2, #idx:search("delivery refund password", 2))
    assert.are.equal(3, #idx:search("delivery refund password", 100))
    assert.are.equal(10, #idx:search("delivery refund password charged order доставка заказы оплата пароль деньги", 10))
    assert.are.same({}, idx:search("zebra"))
    assert.are.same({}, idx:search(""))
  end)

  it("scores by the documented BM25 formula", function()
    local k1, b = 1.2, 0.75
    local ix = bm25.new { k1 = k1, b = b }
    ix:add(1, "apple banana apple")
    ix:add(2, "banana cherry")
    ix:add(3, "cherry cherry cherry durian")
    local N, avgdl = 3, (3 + 2 + 4) / 3
    local function part(f, n, len)
      local idf = math.log(1 + (N - n + 0.5) / (n + 0.5))
      return idf * f * (k1 + 1) / (f + k1 * (1 - b + b * len / avgdl))
    end
    local r = ix:search("apple banana")
    assert.are.same({ 1, 2 }, ids(r))
    assert.is_true(math.abs(r[1].score - (part(2, 1, 3) + part(1, 2, 3))) < 1e-12)
    assert.is_true(math.abs(r[2].score - part(1, 2, 2)) < 1e-12)
    -- a term in every entry still scores above 0 (the +1 in the idf)
    local all = bm25.new()
    all:add("x", "refund")
    all:add("y", "refund policy")
    for _, x in ipairs(all:search("refund")) do assert.is_true(x.score > 0) end
    -- a query term counts once however often it is repeated
    assert.are.equal(ix:search("apple")[1].score, ix:search("apple apple apples")[1].score)
  end)

  it("weights rare terms above common ones (idf)", function()
    local ix = bm25.new()
    for i = 1, 20 do ix:add("common" .. i, "order status order update order") end
    ix:add("rare", "order 58213")
    -- "order" is in every entry, 58213 in one: the entry with the rare term wins
    local r = ix:search("order 58213", 3)
    assert.are.equal("rare", r[1].id)
    assert.is_true(r[1].score > 2 * r[2].score)
  end)

  it("ranks ties by insertion order", function()
    local ix = bm25.new()
    ix:add("b", "same words here")
    ix:add("a", "same words here")
    ix:add("c", "same words here")
    assert.are.same({ "b", "a", "c" }, ids(ix:search("words")))
    assert.are.same({ "b", "a", "c" }, ids(ix:search("words", 100)))
    -- equal scores met in another order than added (alpha's entries first)
    ix = bm25.new()
    ix:add(1, "beta x")
    ix:add(2, "beta x")
    ix:add(3, "alpha x")
    ix:add(4, "alpha x")
    assert.are.same({ 1, 2 }, ids(ix:search("alpha beta", 2)))
    assert.are.same({ 1, 2, 3, 4 }, ids(ix:search("alpha beta", 4)))
    assert.are.same({ 1, 2, 3, 4 }, ids(ix:search("alpha beta", 65)))
  end)

  it("removes entries and rescores without them", function()
    assert.is_true(idx:remove("en-order"))
    assert.is_false(idx:remove("en-order"))
    assert.is_false(idx:remove("never added"))
    assert.are.equal(#faq - 1, idx:size())
    assert.are.same({}, idx:search("58213"))
    -- the same scores as an index that never had it
    local fresh = bm25.new()
    for i, e in ipairs(faq) do
      if e[1] ~= "en-order" then fresh:add(e[1], e[2], { n = i }) end
    end
    local q = "delivery shipped warehouse доставка заказы"
    local a, f = idx:search(q, 10), fresh:search(q, 10)
    assert.are.same(ids(f), ids(a))
    for i = 1, #a do assert.is_true(math.abs(a[i].score - f[i].score) < 1e-12) end
    -- remove everything, add again
    for _, e in ipairs(faq) do idx:remove(e[1]) end
    assert.are.equal(0, idx:size())
    assert.are.same({}, idx:search("delivery"))
    idx:add("again", "delivery")
    assert.are.equal("again", idx:search("deliveries")[1].id)
  end)

  it("stays right through many removals (compaction)", function()
    local ix = bm25.new()
    for i = 1, 3000 do ix:add(i, "parcel number " .. i .. (i % 2 == 0 and " even" or " odd")) end
    for i = 1, 3000 do if i % 3 ~= 0 then ix:remove(i) end end
    assert.are.equal(1000, ix:size())
    assert.is_true(ix.dead < 1024) -- the dead postings were dropped on the way
    assert.are.same({}, ix:search("1"))
    assert.are.same({ 3 }, ids(ix:search("3")))
    local fresh = bm25.new()
    for i = 1, 3000 do if i % 3 == 0 then fresh:add(i, "parcel number " .. i .. (i % 2 == 0 and " even" or " odd")) end end
    local a, f = ix:search("even parcel 2997", 10), fresh:search("even parcel 2997", 10)
    assert.are.equal(2997, a[1].id)
    assert.are.same(ids(f), ids(a))
    for i = 1, #a do assert.is_true(math.abs(a[i].score - f[i].score) < 1e-9) end
  end)

  it("replaces an entry added again under the same id (idempotent)", function()
    local before = idx:search("delivery доставка", 10)
    idx:add("en-delivery", faq[1][2], { n = 1 })
    idx:add("en-delivery", faq[1][2], { n = 1 })
    assert.are.equal(#faq, idx:size())
    local after = idx:search("delivery доставка", 10)
    assert.are.equal(#before, #after)
    for i = 1, #before do
      assert.are.equal(before[i].id, after[i].id)
      assert.is_true(math.abs(before[i].score - after[i].score) < 1e-12)
    end
    -- new text and meta
    idx:add("en-delivery", "Gift cards never expire.", "new meta")
    assert.are.equal(#faq, idx:size())
    assert.are.same({}, idx:search("deliveries remote courier"))
    local r = idx:search("gift card")
    assert.are.equal("en-delivery", r[1].id)
    assert.are.equal("new meta", r[1].meta)
  end)

  it("takes numbers as ids, and keeps an id's type", function()
    local ix = bm25.new()
    ix:add(7, "refund")
    ix:add("7", "refund policy")
    assert.are.equal(2, ix:size())
    local r = ix:search("refund")
    assert.are.equal(7, r[1].id)
    assert.are.equal("7", r[2].id)
  end)
end)

describe("slm.bm25.passages", function()
  local function check_all(list, max)
    for _, p in ipairs(list) do
      assert.is_true(#p > 0)
      assert.is_nil(p:find("^%s"))
      assert.is_nil(p:find("%s$"))
      assert.is_true(valid_utf8(p), p)
      assert.is_true(nchars(p) <= max, ("%d > %d: %s"):format(nchars(p), max, p))
    end
  end

  -- every word of the text, in order, in the passages (none cut, none lost)
  local function words_of(list)
    local out = {}
    for _, p in ipairs(list) do for w in p:gmatch("%S+") do out[#out + 1] = w end end
    return out
  end

  it("keeps short paragraphs whole and merges them up to max_chars", function()
    local text = "First paragraph.\n\nSecond one.\n\n\n  \nThird."
    assert.are.same({ "First paragraph.\n\nSecond one.\n\nThird." }, bm25.passages(text))
    assert.are.same({ "First paragraph.", "Second one.", "Third." }, bm25.passages(text, { merge = false }))
    assert.are.same({ "First paragraph.", "Second one.\n\nThird." }, bm25.passages(text, { max_chars = 20 }))
  end)

  it("splits a long paragraph at sentence ends, never inside a word", function()
    local s = {}
    for i = 1, 40 do
      s[#s + 1] = ("Sentence number %d tells about deliveries and refunds%s"):format(i, i % 3 == 0 and "!" or ".")
    end
    local text = concat(s, " ")
    local list = bm25.passages(text, { max_chars = 200 })
    assert.is_true(#list > 5)
    check_all(list, 200)
    assert.are.same(words_of { text }, words_of(list))
    for _, p in ipairs(list) do assert.is_truthy(p:find("[%.!]$"), p) end -- whole sentences
  end)

  it("handles Russian text without cutting a character", function()
    local s = {}
    for i = 1, 30 do
      s[#s + 1] = ("Доставка заказа №%d в Казань занимает «три» дня, т.е. примерно %d часов…"):format(i, 72)
    end
    local text = concat(s, " ") .. "\n\nЁлка."
    for _, max in ipairs { 50, 77, 120, 333, 600 } do
      local list = bm25.passages(text, { max_chars = max })
      check_all(list, max)
      assert.are.same(words_of { text }, words_of(list))
    end
    -- "т.е." followed by a lower-case word is not a sentence end
    for _, p in ipairs(bm25.passages(text, { max_chars = 120 })) do
      assert.is_nil(p:find("т%.е%.$"), p)
    end
  end)

  it("does not end a sentence at an abbreviation followed by a lower-case word", function()
    local s0 = "Коротко о доставке."
    local s1 = "Сроки указаны в днях, т.е. без учёта выходных и праздников."
    assert.is_true(nchars(s0) + 1 + nchars(s1) > 60 and nchars(s1) <= 60)
    assert.are.same({ s0, s1 }, bm25.passages(s0 .. " " .. s1, { max_chars = 60 }))
    -- ... but at one followed by a capital
    assert.are.same({ "Done, e.g.", "Then more." }, bm25.passages("Done, e.g. Then more.", { max_chars = 12 }))
  end)

  it("splits a sentence longer than max_chars between words", function()
    local text = ("word "):rep(100) .. "end"
    local list = bm25.passages(text, { max_chars = 42 })
    check_all(list, 42)
    assert.are.same(words_of { text }, words_of(list))
  end)

  it("cuts a word longer than max_chars only at character boundaries", function()
    local long = ("ж"):rep(25) .. ("x"):rep(10)
    local list = bm25.passages("Короткое начало. " .. long .. " конец.", { max_chars = 10 })
    check_all(list, 10)
    assert.are.same({ "Короткое", "начало.", ("ж"):rep(10), ("ж"):rep(10), ("ж"):rep(5) .. ("x"):rep(5),
      ("x"):rep(5), "конец." }, list)
  end)

  it("gives no passage for empty or blank text", function()
    assert.are.same({}, bm25.passages(""))
    assert.are.same({}, bm25.passages(" \n\n \t\r\n "))
  end)

  it("takes linear time over long runs of white space and of closing quotes", function()
    local pad = (" "):rep(100000)
    local t = os.clock()
    local a = bm25.passages("Начало" .. pad .. "конец.")           -- one paragraph, padded
    local b = bm25.passages("Начало.\n" .. pad .. "\nконец.")       -- a blank line of spaces
    local c = bm25.passages("Раз. " .. ('"'):rep(100000) .. " Два.", { max_chars = 10 })
    local d = bm25.passages("Раз. " .. ("»"):rep(50000) .. " Два.", { max_chars = 10 })
    t = os.clock() - t
    assert(t < 1, "passages over 100 KB runs took " .. t .. " s")
    assert.are.same({ "Начало", "конец." }, a)
    assert.are.same({ "Начало.\n\nконец." }, b)
    assert.equal("Раз.", c[1])
    assert.equal("Два.", c[#c])
    assert.equal("Раз.", d[1])
    assert.equal("Два.", d[#d])
    -- the closers before a sentence's end still end it
    assert.are.same({ "Он сказал: «Да.»", "Потом ушёл." }, bm25.passages("Он сказал: «Да.» Потом ушёл.", { max_chars = 20 }))
    assert.are.same({ "(See “this.”)", "Then more." }, bm25.passages("(See “this.”) Then more.", { max_chars = 14 }))
  end)

  it("reads \\r\\n line ends", function()
    assert.are.same({ "One.", "Two." }, bm25.passages("One.\r\n\r\nTwo.", { merge = false }))
  end)
end)

it("is slm.bm25 too", function()
  assert.are.equal(bm25, require("slm").bm25)
end)

describe("slm.bm25 misuse", function()
  local idx = bm25.new()

  it("raises with the name of the argument", function()
    assert.matches("opts must be a table", err_of(bm25.new, "k1"))
    assert.matches("unknown option 'k'", err_of(bm25.new, { k = 1 }))
    assert.matches("option 'k1'", err_of(bm25.new, { k1 = -1 }))
    assert.matches("option 'k1'", err_of(bm25.new, { k1 = 0 / 0 }))
    assert.matches("option 'b'", err_of(bm25.new, { b = 1.5 }))
    assert.matches("id must be a string or a number, got nil", err_of(idx.add, idx, nil, "text"))
    assert.matches("id must be a string or a number, got table", err_of(idx.add, idx, {}, "text"))
    assert.matches("id must not be NaN", err_of(idx.add, idx, 0 / 0, "text"))
    assert.matches("text must be a string, got number", err_of(idx.add, idx, 1, 5))
    assert.matches("as idx:add%(", err_of(idx.add, 1, "text"))
    assert.matches("id must be a string or a number", err_of(idx.remove, idx, true))
    assert.matches("query must be a string, got nil", err_of(idx.search, idx))
    assert.matches("k must be a whole number >= 1, got 0", err_of(idx.search, idx, "x", 0))
    assert.matches("k must be a whole number", err_of(idx.search, idx, "x", 1.5))
    assert.matches("k must be a whole number", err_of(idx.search, idx, "x", "5"))
    assert.matches("as idx:size%(", err_of(idx.size))
    assert.matches("terms%(text%): text must be a string, got nil", err_of(bm25.terms))
    assert.matches("passages%(text, opts%): text must be a string", err_of(bm25.passages, 5))
    assert.matches("option 'max_chars'", err_of(bm25.passages, "x", { max_chars = 0 }))
    assert.matches("option 'merge'", err_of(bm25.passages, "x", { merge = "yes" }))
    assert.matches("unknown option 'max'", err_of(bm25.passages, "x", { max = 10 }))
    assert.equal(0, idx:size()) -- nothing was added by the failed calls
  end)

  it("points at the caller's line", function()
    local ok, e = pcall(function() idx:add(nil, "x") end)
    assert.is_false(ok)
    assert.matches("bm25_spec%.lua:%d+:", e)
  end)
end)
