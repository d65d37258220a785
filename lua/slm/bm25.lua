-- slm.bm25: knowledge search for the support bot.  A BM25 index over one
-- text field, with an analysis written for Russian and English, in plain
-- Lua (5.4 and LuaJIT; no slm.core needed).
--
--   local bm25 = require "slm.bm25"
--   local idx = bm25.new{ k1 = 1.2, b = 0.75 }        -- options optional
--   idx:add(id, text [, meta])    -- id: string or number; re-adding an id replaces it
--   idx:remove(id) -> true | false
--   idx:search(query [, k]) -> { { id = , score = , meta = }, ... }  best first, at most k (5), score > 0
--   idx:size() -> n
--   bm25.terms(text) -> { "term", ... }           what add() and search() index
--   bm25.passages(text [, { max_chars = 600, merge = true }]) -> { "passage", ... }
--
-- Analysis (bm25.terms), in this order:
--   1. Words: runs of ASCII letters and digits, apostrophes and bytes >= 0x80
--      (gmatch "[0-9A-Za-z'\128-\255]+"); every other ASCII byte separates.
--      Inside such a run these characters separate too: U+0080-U+00BF
--      (no-break space, guillemets, signs), the multiplication and division
--      signs, U+2000-U+2FFF (dashes, quotes, ellipsis, bullets, arrows,
--      symbols), U+3000-U+303F, U+FFF0-U+FFFF and U+1F000-U+1FFFF (emoji).
--      The apostrophes ' U+2018 U+2019 U+02BC, the soft hyphen, combining
--      accents (U+0300-U+036F), variation selectors and the BOM are deleted,
--      so "don't" -> "dont", "customer's" -> "customers".
--   2. Folding: A-Z -> a-z; Latin-1 and Latin Extended-A letters -> their
--      ASCII base letters (é -> e, ß -> ss, ł -> l, œ -> oe); Cyrillic
--      U+0400-U+042F -> lower case, and Ё ё Ѐ ѐ -> е.  Other scripts' letters
--      are kept as they are (unfolded, unstemmed).
--   3. Stop words: the folded word is dropped when it is in our English or
--      Russian list (bm25.stop_words() lists them: pronouns, prepositions,
--      conjunctions, auxiliaries, question words, courtesy words).
--   4. Stemming, by script: a word of letters a-z goes through the English
--      stemmer, a word of Cyrillic letters through the Russian one, anything
--      else (numbers like 58213, codes like a1b2, mixed words) is kept as it
--      is.  Both stemmers are light suffix strippers of ours (see
--      stem_en/stem_ru below for the rules):
--        deliveries, delivery, delivered -> deliver; refunded, refunds ->
--        refund; passwords -> password; cancelled, canceled, cancellation ->
--        cancel; charges, charged, charging -> charg;
--        доставки, доставка, доставку, доставкой -> доставк; заказов,
--        заказа, заказ, заказал, заказать -> заказ; оплатил, оплата,
--        оплатить -> оплат (but оплачен -> оплачен: no т/ч alternation);
--        списались, списали -> спис.
--   The result of steps 1-4 for each distinct raw word is cached (module
--   wide, up to 100,000 raw words, then the cache starts again), so a text
--   costs one gmatch and one table look-up per word once its words are known.
--
-- Scoring: BM25 over the one field, for query terms q (distinct terms of
-- terms(query)) and an entry D:
--   score(D) = sum over q of  idf(q) * f(q,D) * (k1 + 1) / (f(q,D) + k1 * (1 - b + b * |D| / avgdl))
--   idf(q)   = ln(1 + (N - n(q) + 0.5) / (n(q) + 0.5))
-- f(q,D): occurrences of q in D; |D|: D's number of terms; avgdl: the mean
-- |D|; N: entries in the index; n(q): entries that contain q.  The +1 in
-- the idf keeps every score positive (a term in every entry still counts a
-- little).  Ties: the entry added first ranks first (a replaced entry
-- counts as added when it was replaced).
--
-- The index: term -> one postings array { entry, f, entry, f, ... }; per
-- entry its id, meta, |D| and its distinct terms (one string, for remove).
-- search() touches only the query terms' postings, adds into a scratch
-- array and keeps the best k in a small sorted array.  remove() marks the
-- entry dead and fixes n(q), N and avgdl at once; dead postings are skipped
-- and dropped when they outnumber the live ones.
local byte, char, find, gmatch, gsub, sub = string.byte, string.char, string.find, string.gmatch, string.gsub, string.sub
local concat, sort = table.concat, table.sort
local log, floor, huge = math.log, math.floor, math.huge
local type, pairs, ipairs, error, tostring, setmetatable, getmetatable =
  type, pairs, ipairs, error, tostring, setmetatable, getmetatable
local format = string.format

local M = {}

-- Character folding ---------------------------------------------------------

-- UTF-8 of a code point below U+0800 (all the table needs).
local function u2(cp)
  return char(0xC0 + floor(cp / 64), 0x80 + cp % 64)
end

-- Two-byte sequences -> their folded form ("" deletes, " " separates);
-- a sequence that is not a key stays as it is (gsub with a table).
local FOLD2 = {}
for cp = 0x80, 0xBF do FOLD2[u2(cp)] = " " end -- Latin-1 punctuation and signs
FOLD2[u2(0xAD)] = ""                             -- soft hyphen
do
  -- U+00C0-U+00FF, "_" separates (x and the division sign)
  local latin1 = [[a a a a a a ae c e e e e i i i i d n o o o o o _ o u u u u y th ss
                   a a a a a a ae c e e e e i i i i d n o o o o o _ o u u u u y th y]]
  local cp = 0xC0
  for f in gmatch(latin1, "%S+") do
    FOLD2[u2(cp)] = f == "_" and " " or f
    cp = cp + 1
  end
  -- U+0100-U+017F in runs: letter, how many code points
  local exta = [[a 6 c 8 d 4 e 10 g 8 h 4 i 10 ij 2 j 2 k 3 l 10 n 9 o 6 oe 2 r 6
                 s 8 t 6 u 12 w 2 y 3 z 6 s 1]]
  cp = 0x100
  for f, count in gmatch(exta, "(%a+) (%d+)") do
    for _ = 1, count + 0 do
      FOLD2[u2(cp)] = f
      cp = cp + 1
    end
  end
  for c = 0x300, 0x36F do FOLD2[u2(c)] = "" end -- combining accents
  FOLD2[u2(0x2BC)] = ""                         -- modifier letter apostrophe
  -- Cyrillic capitals: U+0400-U+040F -> U+0450-U+045F, U+0410-U+042F -> U+0430-U+044F
  for c = 0x400, 0x40F do FOLD2[u2(c)] = u2(c + 0x50) end
  for c = 0x410, 0x42F do FOLD2[u2(c)] = u2(c + 0x20) end
  local ie = u2(0x435)                          -- е
  FOLD2[u2(0x400)], FOLD2[u2(0x401)], FOLD2[u2(0x450)], FOLD2[u2(0x451)] = ie, ie, ie, ie
end

-- Three-byte sequences (only on a cache miss, so a function will do).
local function fold3(c)
  local b1, b2, b3 = byte(c, 1, 3)
  if b1 == 0xE2 then
    if b2 == 0x80 and (b3 == 0x98 or b3 == 0x99) then return "" end -- ‘ ’
    return " "                                                      -- U+2000-U+2FFF
  elseif b1 == 0xE3 then
    if b2 == 0x80 then return " " end                               -- U+3000-U+303F
  elseif b1 == 0xEF then
    if b2 == 0xB8 and b3 < 0x90 then return "" end                  -- variation selectors
    if b2 == 0xBB and b3 == 0xBF then return "" end                 -- BOM
    if b2 == 0xBF and b3 >= 0xB0 then return " " end                -- U+FFF0-U+FFFF
  end
  return nil
end

local function fold4(c)
  if byte(c, 2) == 0x9F then return " " end -- U+1F000-U+1FFFF: emoji, symbols
  return nil
end

local ASCII_LOWER = {}
for b = 65, 90 do ASCII_LOWER[char(b)] = char(b + 32) end

-- Stop words ----------------------------------------------------------------
-- Our own lists, folded (ё as е, apostrophes gone).

local STOP = {}
local STOP_EN = [[
a about above after again against ago all almost along already also although
always am among an and another any anybody anyone anything anyway anywhere
are arent around as at be because been before being below between both but by
can cannot cant could couldnt did didnt do does doesnt doing done dont down
during each either else even ever every few for from further get gets getting
got had hadnt has hasnt have havent having he her here hers herself hi him
himself his how however i ie if im in into is isnt it its itself ive just
hello let lets like may maybe me might mine more most much must my myself
neither no nobody none nor not now of off often on once only or other others
otherwise our ours ourselves out over own please quite rather really same
shall she should shouldnt since so some somebody someone something sometimes
still such than thank thanks that thats the their theirs them themselves then
there therefore these they theyre this those though through thus till to too
toward under unless until up upon us very via was wasnt we were werent what
whatever whats when whenever where whether which while who whoever whole whom
whose why will with within without wont would wouldnt yes yet you youd youll
your youre yours yourself yourselves youve s t
]]
local STOP_RU = [[
а без более больше будет будем будете буду будут бы был была были было быть
в вам вами вас весь во вот все всего всей всем всеми всех всю вся вы где да
даже для до его ее ей ему если есть еще же за зачем здесь здравствуйте и из
или им ими их к как какая какие каким какой какое каких ко когда кое кто куда
ли либо лишь между мне меня мной мною мое моего моей моем моему моими моих
мой мою моя мы на над надо нам нами нас наш наша наше нашей наши него нее
ней нем нему нет ни нибудь ним ними них но ну о об обо однако он она они оно
от откуда очень перед по под подскажите пожалуйста после почему при привет
про с сам сама сами само свое своего своей свои свой свою своя себе себя
сейчас сказать скажите сколько со спасибо так также такая такие такой там
твой твоя те тебе тебя тем теми тех то тобой того тоже той только том тот
тут ты у уж уже хотя чего чей чем через что чтоб чтобы чье чья эта эти
этим этими этих это этого этой этом этому этот эту я
ваш ваша ваше вашего вашей вашем вашему вашими ваших ваши вашу
который которая которое которые которого которой котором которых которым
]]
for w in gmatch(STOP_EN .. STOP_RU, "%S+") do STOP[w] = true end

function M.stop_words()
  local list = {}
  for w in pairs(STOP) do list[#list + 1] = w end
  sort(list)
  return list
end

-- English: a light suffix stripper ----------------------------------------
-- Porter's measure m (the number of vowel-consonant runs; y after a
-- consonant is a vowel) decides how much may go.

local function measure(s)
  local v = gsub(s, "[aeiou]", "a")
  v = gsub(v, "([^a])y", "%1a")
  v = gsub(v, "[^a]", "c")
  local _, m = gsub(v, "a+c+", "")
  return m
end

local function has_vowel(s)
  return find(s, "[aeiou]") ~= nil or find(s, "[^aeiou]y") ~= nil
end

-- Derivational suffixes, tried in order (the first that ends the word is
-- the only one considered): suffix, replacement, the measure the rest must
-- exceed.
local EN_DERIV = {
  { "ational", "ate", 0 }, { "ization", "ize", 0 }, { "fulness", "ful", 0 },
  { "iveness", "ive", 0 }, { "ousness", "ous", 0 }, { "ability", "able", 0 },
  { "ation", "ate", 0 }, { "ator", "ate", 0 }, { "ness", "", 0 },
  { "ment", "", 1 }, { "ity", "", 1 }, { "ful", "", 0 },
}
local EN_DERIV2 = { { "able", 1 }, { "ible", 1 }, { "ate", 1 }, { "ize", 1 } }

local function stem_en(w)
  if #w < 4 then
    if #w == 3 and sub(w, -1) == "e" then return sub(w, 1, 2) end -- use, used -> us
    return w
  end
  -- plurals: addresses -> address, deliveries -> delivery, passwords -> password
  if sub(w, -1) == "s" then
    if sub(w, -4) == "sses" then
      w = sub(w, 1, -3)
    elseif sub(w, -3) == "ies" then
      w = #w > 4 and sub(w, 1, -4) .. "y" or sub(w, 1, -2)
    elseif not find(sub(w, -2, -2), "[sui]") then -- not class, status, analysis
      w = sub(w, 1, -2)
    end
  end
  -- -eed, -ied, -ed, -ing
  if sub(w, -3) == "eed" then
    if measure(sub(w, 1, -4)) > 0 then w = sub(w, 1, -2) end -- agreed -> agree, not need
  elseif sub(w, -3) == "ied" and #w > 4 then
    w = sub(w, 1, -4) .. "y"                                  -- applied -> apply
  else
    local s
    if sub(w, -2) == "ed" then s = sub(w, 1, -3) elseif sub(w, -3) == "ing" then s = sub(w, 1, -4) end
    if s and #s >= 2 and has_vowel(s) then
      local e2, last = sub(s, -2), sub(s, -1)
      if e2 == "at" or e2 == "bl" or e2 == "iz" then
        s = s .. "e"                                          -- activated -> activate
      elseif #s >= 4 and last == sub(s, -2, -2) and not find(last, "[aeioulsz]") then
        s = sub(s, 1, -2)                                     -- shipped -> ship, but add
      end
      w = s
    end
  end
  -- -ly on long words: quickly -> quick (not apply, reply, family)
  if #w >= 7 and sub(w, -2) == "ly" and not find(sub(w, -3, -3), "[lp]") then w = sub(w, 1, -3) end
  for i = 1, #EN_DERIV do
    local r = EN_DERIV[i]
    local suf = r[1]
    if sub(w, -#suf) == suf then
      local s = sub(w, 1, #w - #suf)
      if measure(s) > r[3] then w = s .. r[2] end
      break
    end
  end
  -- final y on longer stems: delivery -> deliver (not city, apply)
  if sub(w, -1) == "y" then
    local s = sub(w, 1, -2)
    if measure(s) > 1 then w = s end
  end
  for i = 1, #EN_DERIV2 do
    local suf = EN_DERIV2[i][1]
    if sub(w, -#suf) == suf then
      local s = sub(w, 1, #w - #suf)
      if measure(s) > EN_DERIV2[i][2] then w = s end
      break
    end
  end
  if #w >= 3 and sub(w, -1) == "e" then w = sub(w, 1, -2) end -- charge, charged -> charg
  if sub(w, -2) == "ll" and measure(w) > 1 then w = sub(w, 1, -2) end -- cancelled -> cancel
  return w
end

-- Russian: a light ending stripper ------------------------------------------
-- The longest ending of our list whose removal leaves a stem of at least two
-- letters with a vowel in it (the stem keeps the word's first vowel: the
-- idea of Snowball's RV region), after the reflexive -ся/-сь; then -нн ->
-- -н.  Verb endings are listed with their stem vowel (-ает, -ала, -ить),
-- so the noun and the verb of one root meet (работает/работа -> работ,
-- оплатил/оплата -> оплат); bare -ет, -ут, -ал-less -л are left out, they
-- eat too many nouns (пакет, маршрут).  A few nouns whose ending looks like
-- a verb's keep their stem (RU_KEEP).

local RU_END = {}
local function ru_endings(list)
  for e in gmatch(list, "%S+") do RU_END[e] = true end
end
-- nouns
ru_endings [[а я о е ь ы и у ю й ам ям ами ями ах ях ов ев ей ой ом ем ью ья
  ье ьи ия ие ий ию ии ией иям иями иях ием ьям ьями ьях ьев]]
-- adjectives and participles' adjective endings
ru_endings [[ый ой ая яя ое ее ые ую юю ого его ому ему ым ых их ыми ими ою ею]]
-- verbs: past, infinitive, present (both conjugations), imperative, perfective gerund
for _, v in ipairs { "а", "я", "и", "ы", "у" } do
  ru_endings(v .. "л " .. v .. "ла " .. v .. "ло " .. v .. "ли")
end
for _, v in ipairs { "а", "я", "е", "у" } do
  ru_endings(v .. "ет " .. v .. "ют " .. v .. "ешь " .. v .. "ем " .. v .. "ете")
end
ru_endings [[ать ять еть ить ыть уть ит ишь ите ят ай айте яй яйте ейте уй уйте
  ьте авши явши ивши ывши]]

local RU_KEEP = {}
for w in gmatch([[кредит лимит депозит визит транзит защит элит орбит канал
  сигнал материал персонал портал журнал терминал интервал оригинал финал
  капитал филиал печат проблем систем программ]], "%S+") do
  RU_KEEP[w] = true
end

local function ru_stem_ok(s)
  return #s >= 4 and (find(s, "\208[\176\181\184\190]") or find(s, "\209[\131\139\141\142\143]")) ~= nil
end

local function stem_ru(w)
  local n = #w
  if n < 6 then return w end -- fewer than three letters
  local refl = sub(w, -4)
  if refl == "ся" or refl == "сь" then
    local s = sub(w, 1, -5)
    if #s >= 6 and ru_stem_ok(s) then w, n = s, #s end
  end
  if RU_KEEP[w] then return w end
  local best
  for len = 8, 2, -2 do
    if n > len and RU_END[sub(w, -len)] then
      local s = sub(w, 1, n - len)
      if RU_KEEP[s] then best = s break end
      if not best and ru_stem_ok(s) then best = s end
    end
  end
  w = best or w
  if sub(w, -4) == "нн" then w = sub(w, 1, -3) end
  return w
end

-- Words -> terms ------------------------------------------------------------

local WORD = "[0-9A-Za-z'\128-\255]+"

-- raw word -> term (a string), false (nothing to index) or true (several
-- terms: MULTI[raw] has them).
local CACHE, MULTI, cached = {}, {}, 0
local CACHE_MAX = 100000

local function term_of(p)
  if STOP[p] then return false end
  if not find(p, "[^a-z]") then return stem_en(p) end
  local b = byte(p)
  if (b == 208 or b == 209) and not find(p, "[\1-\127\224-\255]") then return stem_ru(p) end
  return p
end

local function analyze(raw)
  if cached >= CACHE_MAX then CACHE, MULTI, cached = {}, {}, 0 end
  local w = raw
  if find(w, "[\128-\255]") then
    w = gsub(w, "[\192-\223][\128-\191]", FOLD2)
    w = gsub(w, "[\224-\239][\128-\191][\128-\191]", fold3)
    w = gsub(w, "[\240-\247][\128-\191][\128-\191][\128-\191]", fold4)
  end
  if find(w, "[A-Z]") then w = gsub(w, "[A-Z]", ASCII_LOWER) end
  if find(w, "'", 1, true) then w = gsub(w, "'", "") end
  local result
  if not find(w, " ", 1, true) then
    result = w ~= "" and term_of(w)
  else
    local list = {}
    for p in gmatch(w, "[^ ]+") do
      local t = term_of(p)
      if t then list[#list + 1] = t end
    end
    if #list == 0 then
      result = false
    elseif #list == 1 then
      result = list[1]
    else
      result = true
      MULTI[raw] = list
    end
  end
  CACHE[raw] = result
  cached = cached + 1
  return result
end

-- For the tests: a smaller cache, to see it start again (nil: the default).
function M._cache_max(n)
  CACHE_MAX = n or 100000
  CACHE, MULTI, cached = {}, {}, 0
end

function M.terms(text)
  if type(text) ~= "string" then
    error("slm.bm25.terms(text): text must be a string, got " .. type(text), 2)
  end
  local out, n = {}, 0
  for raw in gmatch(text, WORD) do
    local t = CACHE[raw]
    if t == nil then t = analyze(raw) end
    if t == true then
      local list = MULTI[raw]
      for i = 1, #list do n = n + 1; out[n] = list[i] end
    elseif t then
      n = n + 1
      out[n] = t
    end
  end
  return out
end

-- The index -------------------------------------------------------------

local Index = {}
Index.__index = Index

local function check_index(self, method)
  if getmetatable(self) ~= Index then
    error(format("slm.bm25: call %s as idx:%s(...), not idx.%s(...)", method, method, method), 3)
  end
end

local function check_id(id, method)
  local t = type(id)
  if t ~= "string" and t ~= "number" then
    error(format("slm.bm25: idx:%s(id, ...): id must be a string or a number, got %s", method, t), 3)
  end
  if id ~= id then error(format("slm.bm25: idx:%s(id, ...): id must not be NaN", method), 3) end
end

-- Options: nil or a table whose keys are in spec (name -> { test, what it
-- must be }); the defaults for what it leaves out.
local function read_opts(where, opts, spec, defaults)
  local out = {}
  for key, v in pairs(defaults) do out[key] = v end
  if opts == nil then return out end
  if type(opts) ~= "table" then
    error(format("%s: opts must be a table or nothing, got %s", where, type(opts)), 3)
  end
  for key, v in pairs(opts) do
    local check = spec[key]
    if not check then error(format("%s: unknown option '%s'", where, tostring(key)), 3) end
    if not check[1](v) then error(format("%s: option '%s' must be %s", where, key, check[2]), 3) end
    out[key] = v
  end
  return out
end

local function whole(v) return type(v) == "number" and v >= 1 and v == floor(v) and v < huge end

local NEW_OPTS = {
  k1 = { function(v) return type(v) == "number" and v >= 0 and v < huge end, "a finite number >= 0" },
  b = { function(v) return type(v) == "number" and v >= 0 and v <= 1 end, "a number from 0 to 1" },
}
local NEW_DEFAULTS = { k1 = 1.2, b = 0.75 }

function M.new(opts)
  opts = read_opts("slm.bm25.new(opts)", opts, NEW_OPTS, NEW_DEFAULTS)
  local k1, b = opts.k1, opts.b
  return setmetatable({
    k1 = k1, b = b,
    post = {},   -- term -> { entry, f, entry, f, ... } (entries dead or alive)
    df = {},     -- term -> live entries that contain it
    slot = {},   -- id -> entry number
    ids = {}, metas = {}, lens = {}, dterms = {}, -- by entry; false once removed
    acc = {},    -- scratch scores by entry, 0 between searches
    n = 0, next = 1, total = 0,
    live = 0, dead = 0, -- postings of live / removed entries
  }, Index)
end

-- Scratch tables of add() (it never yields or calls out, so one pair will
-- do): a text's term counts, emptied as they are read, and its terms.
local TF, NAMES = {}, {}

function Index:add(id, text, meta)
  check_index(self, "add")
  check_id(id, "add")
  if type(text) ~= "string" then
    error("slm.bm25: idx:add(id, text, meta): text must be a string, got " .. type(text), 2)
  end
  if self.slot[id] then self:remove(id) end
  local tf, len = TF, 0
  local cache, multi = CACHE, MULTI
  for raw in gmatch(text, WORD) do
    local t = cache[raw]
    if t == nil then
      t = analyze(raw)
      cache, multi = CACHE, MULTI -- analyze may have started the cache again
    end
    if t == true then
      local list = multi[raw]
      for i = 1, #list do
        local x = list[i]
        tf[x] = (tf[x] or 0) + 1
      end
      len = len + #list
    elseif t then
      tf[t] = (tf[t] or 0) + 1
      len = len + 1
    end
  end
  local d = self.next
  self.next = d + 1
  local post, df = self.post, self.df
  local names, k = NAMES, 0
  for t, f in pairs(tf) do
    tf[t] = nil
    local p = post[t]
    if p then
      local m = #p
      p[m + 1] = d
      p[m + 2] = f
      df[t] = df[t] + 1
    else
      post[t] = { d, f }
      df[t] = 1
    end
    k = k + 1
    names[k] = t
  end
  self.ids[d], self.metas[d], self.lens[d], self.dterms[d] = id, meta, len, concat(names, " ", 1, k)
  self.acc[d] = 0
  self.slot[id] = d
  self.n = self.n + 1
  self.total = self.total + len
  self.live = self.live + k
end

-- Drops the postings of removed entries.
local function compact(self)
  local lens = self.lens
  for _, p in pairs(self.post) do
    local j = 0
    for i = 1, #p, 2 do
      local d = p[i]
      if lens[d] then
        p[j + 1], p[j + 2] = d, p[i + 1]
        j = j + 2
      end
    end
    for i = #p, j + 1, -1 do p[i] = nil end
  end
  self.dead = 0
end

function Index:remove(id)
  check_index(self, "remove")
  check_id(id, "remove")
  local d = self.slot[id]
  if not d then return false end
  local post, df = self.post, self.df
  local k = 0
  for t in gmatch(self.dterms[d], "%S+") do
    k = k + 1
    local c = df[t] - 1
    if c == 0 then -- every posting of t is dead now: drop them all
      self.dead = self.dead - (#post[t] / 2 - 1)
      post[t], df[t] = nil, nil
    else
      df[t] = c
      self.dead = self.dead + 1
    end
  end
  self.n = self.n - 1
  self.total = self.total - self.lens[d]
  self.live = self.live - k
  self.ids[d], self.metas[d], self.lens[d], self.dterms[d] = false, nil, false, false
  self.slot[id] = nil
  if self.dead > 1024 and self.dead > self.live then compact(self) end
  return true
end

function Index:size()
  check_index(self, "size")
  return self.n
end

-- k > this: sort every touched entry instead of keeping a sorted array.
local SMALL_K = 64

function Index:search(query, k)
  check_index(self, "search")
  if type(query) ~= "string" then
    error("slm.bm25: idx:search(query, k): query must be a string, got " .. type(query), 2)
  end
  if k == nil then
    k = 5
  elseif not whole(k) then
    error("slm.bm25: idx:search(query, k): k must be a whole number >= 1, got " .. tostring(k), 2)
  end
  local out = {}
  local N = self.n
  if N == 0 or self.total == 0 then return out end
  local post, df, lens, acc = self.post, self.df, self.lens, self.acc
  local k1, b = self.k1, self.b
  local K, Kb, w1 = k1 * (1 - b), k1 * b * N / self.total, k1 + 1
  local terms = M.terms(query)
  local seen, touched, nt = {}, {}, 0
  for i = 1, #terms do
    local t = terms[i]
    local p = post[t]
    if p and not seen[t] then
      seen[t] = true
      local nq = df[t]
      local w = log(1 + (N - nq + 0.5) / (nq + 0.5)) * w1
      for j = 1, #p, 2 do
        local d = p[j]
        local l = lens[d]
        if l then
          local f = p[j + 1]
          local s = acc[d]
          if s == 0 then
            nt = nt + 1
            touched[nt] = d
          end
          acc[d] = s + w * f / (f + K + Kb * l)
        end
      end
    end
  end
  if nt == 0 then return out end
  local ids, metas = self.ids, self.metas
  if k > SMALL_K then
    local scores = {}
    for i = 1, nt do
      local d = touched[i]
      scores[d] = acc[d]
      acc[d] = 0
    end
    sort(touched, function(x, y)
      local sx, sy = scores[x], scores[y]
      if sx ~= sy then return sx > sy end
      return x < y
    end)
    for i = 1, nt < k and nt or k do
      local d = touched[i]
      out[i] = { id = ids[d], score = scores[d], meta = metas[d] }
    end
    return out
  end
  -- the best k so far, best first: scores hs, entries hd
  local hs, hd, h = {}, {}, 0
  for i = 1, nt do
    local d = touched[i]
    local s = acc[d]
    acc[d] = 0
    if h < k or s > hs[h] or (s == hs[h] and d < hd[h]) then
      if h < k then h = h + 1 end
      local j = h
      while j > 1 do
        local ps = hs[j - 1]
        if ps > s or (ps == s and hd[j - 1] < d) then break end
        hs[j], hd[j] = ps, hd[j - 1]
        j = j - 1
      end
      hs[j], hd[j] = s, d
    end
  end
  for i = 1, h do
    local d = hd[i]
    out[i] = { id = ids[d], score = hs[i], meta = metas[d] }
  end
  return out
end

-- Passages --------------------------------------------------------------

local function nchars(s)
  local _, c = gsub(s, "[\128-\191]", "")
  return #s - c
end

-- Trimming by loops over the bytes: a pattern anchored at the end
-- ("%s+$") tries every run of the class in the string, which is quadratic
-- over a long run (a page padded with spaces).
local WS = { [32] = true, [9] = true, [10] = true, [11] = true, [12] = true, [13] = true } -- %s
local function rtrim(s)
  local e = #s
  while e > 0 and WS[byte(s, e)] do e = e - 1 end
  return sub(s, 1, e)
end

local function trim(s)
  local _, a = find(s, "^%s*")
  local e = #s
  while e > a and WS[byte(s, e)] do e = e - 1 end
  return sub(s, a + 1, e)
end

-- Closing quotes and brackets that may follow a sentence's end: " ' ) ] » ”
local CLOSER = { [34] = true, [39] = true, [41] = true, [93] = true }
local function strip_closers(w)
  local e = #w
  while e > 0 do
    local c = byte(w, e)
    if CLOSER[c] then
      e = e - 1
    elseif c == 187 and byte(w, e - 1) == 194 then                          -- »
      e = e - 2
    elseif c == 157 and e > 2 and byte(w, e - 1) == 128 and byte(w, e - 2) == 226 then -- ”
      e = e - 3
    else
      break
    end
  end
  return sub(w, 1, e)
end

local function ends_sentence(w)
  w = strip_closers(w)
  return find(w, "[%.!?]$") ~= nil or sub(w, -3) == "\226\128\166" -- …
end

local function starts_lower(w)
  w = gsub(w, "^[\"'(%[]+", "")
  if sub(w, 1, 2) == "\194\171" then w = sub(w, 3) end                -- «
  if sub(w, 1, 3) == "\226\128\156" or sub(w, 1, 3) == "\226\128\158" then w = sub(w, 4) end -- “ „
  return find(w, "^[a-z]") ~= nil or find(w, "^\208[\176-\191]") ~= nil or find(w, "^\209[\128-\159]") ~= nil
end

-- Greedy packing of pieces (text with its trailing white space) into
-- passages of at most max characters, trailing white space dropped.
local function packer(out, max)
  local parts, np, n, ws = {}, 0, 0, 0
  local pk = {}
  function pk.flush()
    if np > 0 then
      out[#out + 1] = rtrim(concat(parts, "", 1, np))
      np, n, ws = 0, 0, 0
    end
  end
  -- piece: its text; pn: its characters without its trailing white space;
  -- pw: the characters of that white space
  function pk.add(piece, pn, pw)
    if np > 0 and n + ws + pn > max then pk.flush() end
    np = np + 1
    parts[np] = piece
    n = (np == 1) and pn or n + ws + pn
    ws = pw
  end
  return pk
end

-- A word longer than max characters: cut at character boundaries.
local function cut_word(word, max, pk)
  local i, len, start, count = 1, #word, 1, 0
  while i <= len do
    local b = byte(word, i)
    local j = i + 1
    if b >= 0xC0 then
      while j <= len do
        local c = byte(word, j)
        if c < 0x80 or c >= 0xC0 then break end
        j = j + 1
      end
    end
    if count == max then
      pk.add(sub(word, start, i - 1), count, 0)
      pk.flush()
      start, count = i, 0
    end
    count = count + 1
    i = j
  end
  return sub(word, start), count
end

-- A paragraph longer than max: sentences packed greedily; a sentence that
-- does not fit alone goes word by word.
local function split_long(para, max, out)
  local words, spaces, nw = {}, {}, 0
  for w, s in gmatch(para, "(%S+)(%s*)") do
    nw = nw + 1
    words[nw], spaces[nw] = w, s
  end
  local pk = packer(out, max)
  local first = 1
  for i = 1, nw do
    local last = i == nw or find(spaces[i], "\n", 1, true)
      or (ends_sentence(words[i]) and not starts_lower(words[i + 1]))
    if last then
      -- the sentence words[first..i]
      local parts = {}
      for j = first, i do parts[#parts + 1] = words[j] .. spaces[j] end
      local sentence = concat(parts)
      local body = rtrim(sentence)
      local sn = nchars(body)
      if sn <= max then
        pk.add(sentence, sn, #sentence - #body)
      else
        for j = first, i do
          local w = words[j]
          local wn = nchars(w)
          if wn > max then
            pk.flush()
            w, wn = cut_word(w, max, pk)
          end
          pk.add(w .. spaces[j], wn, #spaces[j])
        end
        pk.flush()
      end
      first = i + 1
    end
  end
  pk.flush()
end

local PASSAGE_OPTS = {
  max_chars = { whole, "a whole number >= 1" },
  merge = { function(v) return type(v) == "boolean" end, "a boolean" },
}
local PASSAGE_DEFAULTS = { max_chars = 600, merge = true }

function M.passages(text, opts)
  if type(text) ~= "string" then
    error("slm.bm25.passages(text, opts): text must be a string, got " .. type(text), 2)
  end
  opts = read_opts("slm.bm25.passages(text, opts)", opts, PASSAGE_OPTS, PASSAGE_DEFAULTS)
  local max, merge = opts.max_chars, opts.merge
  text = gsub(text, "\r\n?", "\n")
  local out = {}
  local cur, curn
  local function para(p)
    p = trim(p)
    if p == "" then return end
    local pn = nchars(p)
    if pn > max then
      if cur then out[#out + 1] = cur; cur = nil end
      split_long(p, max, out)
    elseif merge and cur and curn + 2 + pn <= max then
      cur, curn = cur .. "\n\n" .. p, curn + 2 + pn
    else
      if cur then out[#out + 1] = cur end
      cur, curn = p, pn
    end
  end
  local pos = 1
  while true do
    local s, e = find(text, "\n[ \t\f\v]*\n%s*", pos)
    if not s then
      para(sub(text, pos))
      break
    end
    para(sub(text, pos, s - 1))
    pos = e + 1
  end
  if cur then out[#out + 1] = cur end
  return out
end

return M
