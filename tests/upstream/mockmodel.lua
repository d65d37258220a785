-- tests/upstream/mockmodel.lua: the simulator's "model". Deterministic
-- heuristics that turn a request's text into a plausible answer: JSON that
-- conforms to a JSON schema (enum values picked by keyword scoring, English
-- and Russian), a generic {label, summary} object, short summaries; and
-- the scripted model the task layer is tested against (README.md, "The
-- scripted model"): knowledge answers with citations, escalation calls,
-- schemas found in prompts, enum logprobs, word-limited summaries,
-- verbatim quotes and the task-failure directives.
--
-- Pure Lua, no I/O, no ngx: runs under LuaJIT (inside nginx) and Lua 5.4
-- (unit tests). Returns plain Lua tables; the caller encodes them.

local M = {}

local byte, char, sub, find, gsub, gmatch, lower =
  string.byte, string.char, string.sub, string.find, string.gsub, string.gmatch, string.lower
local concat, floor, type, ipairs, pairs = table.concat, math.floor, type, ipairs, pairs

-- Text helpers -----------------------------------------------------------

-- Lowercase ASCII and Cyrillic (UTF-8), and fold ё into е so that "счёт"
-- and "счет" compare equal.
function M.lower(s)
  s = lower(s)
  s = gsub(s, "\208([\144-\159])", function(c) return "\208" .. char(byte(c) + 32) end)
  s = gsub(s, "\208([\160-\175])", function(c) return "\209" .. char(byte(c) - 32) end)
  s = gsub(s, "\208\129", "\208\181") -- Ё -> е
  s = gsub(s, "\209\145", "\208\181") -- ё -> е
  return s
end

function M.has_cyrillic(s)
  return find(s, "[\208\209][\128-\191]") ~= nil
end

function M.language(s)
  return M.has_cyrillic(s) and "ru" or "en"
end

-- The text of a message's content: a string, or an array of parts whose
-- text parts are joined with "\n". Images and other parts are skipped.
function M.text_of(content)
  if type(content) == "string" then return content end
  if type(content) ~= "table" then return "" end
  local out = {}
  for _, part in ipairs(content) do
    if type(part) == "table" and type(part.text) == "string" then
      out[#out + 1] = part.text
    elseif type(part) == "string" then
      out[#out + 1] = part
    end
  end
  return concat(out, "\n")
end

-- Cut s to at most n bytes without splitting a UTF-8 character.
function M.utf8_cut(s, n)
  if #s <= n then return s end
  if n <= 0 then return "" end
  local b = byte(s, n + 1)
  while n > 0 and b and b >= 0x80 and b < 0xC0 do
    n = n - 1
    b = byte(s, n + 1)
  end
  return sub(s, 1, n)
end

-- First n whitespace-separated words of s, on one line.
function M.first_words(s, n)
  local out = {}
  for w in gmatch(s, "%S+") do
    out[#out + 1] = w
    if #out >= n then break end
  end
  return concat(out, " ")
end

-- A short deterministic summary: the subject line when the text has one
-- ("Subject: ..."), then the first words of the rest, ~n words in all.
-- The "Subject: ..." line of a ticket-like text, if any.
local function subject_of(text)
  return text:match("[Ss]ubject:%s*([^\n]+)") or text:match("\208\162\208\181\208\188\208\176:%s*([^\n]+)")
end

function M.summary(text, n)
  n = n or 12
  local subject = subject_of(text)
  local body = text
  if subject then
    body = text:match("\n%s*\n(.*)$") or ""
    local s = M.first_words(subject, n)
    local used = select(2, gsub(s, "%S+", ""))
    if used < n and body ~= "" then
      s = s .. ": " .. M.first_words(body, n - used)
    end
    return s
  end
  return M.first_words(body, n)
end

-- Keyword matching -------------------------------------------------------

-- Word characters: ASCII alphanumerics and any byte of a multibyte char.
local WORD = "[%w\128-\255]"
-- Start of a word (the set holds every byte of a multibyte character, so
-- this also works before Cyrillic letters).
local FRONT = "%f[%w\128-\255]"

local function is_cyrillic_start(w)
  local b = byte(w, 1)
  return b == 208 or b == 209
end

local function utf8_len(s)
  return #gsub(s, "[\128-\191]", "")
end

-- Crude stemming so that "списание" finds "списались" and "shipped" finds
-- "shipping": Russian words keep their first max(4, len-3) letters, long
-- English words drop a common suffix. Matching is then "word starting with
-- the stem".
local function stem(w)
  if is_cyrillic_start(w) then
    local len = utf8_len(w)
    if len >= 6 then
      local keep = len - 3
      if keep < 4 then keep = 4 end
      -- keep `keep` characters (each Cyrillic letter is 2 bytes, digits 1)
      local i, count = 1, 0
      while i <= #w and count < keep do
        local b = byte(w, i)
        i = i + ((b >= 0xF0 and 4) or (b >= 0xE0 and 3) or (b >= 0xC0 and 2) or 1)
        count = count + 1
      end
      return sub(w, 1, i - 1)
    end
    return w
  end
  if #w >= 6 then
    for _, suf in ipairs({ "ing", "ed", "es", "s" }) do
      if sub(w, -#suf) == suf then return sub(w, 1, #w - #suf) end
    end
  end
  return w
end

-- Compile a keyword phrase ("charged twice", "не работает", "!!!") into a
-- Lua pattern over lowercased text; nil when it has no usable word.
local function phrase_pattern(phrase)
  phrase = M.lower(phrase)
  if find(phrase, "^%p+$") then
    return (gsub(phrase, "%p", "%%%0")) -- punctuation keyword like "!!!"
  end
  local parts = {}
  for w in gmatch(phrase, WORD .. "+") do
    parts[#parts + 1] = FRONT .. stem(w)
  end
  if #parts == 0 then return nil end
  return concat(parts, WORD .. "*[^%w\128-\255]+")
end

local pattern_cache = {}
local function phrase_hits(text, phrase)
  local p = pattern_cache[phrase]
  if p == nil then
    p = phrase_pattern(phrase) or false
    pattern_cache[phrase] = p
  end
  return p and find(text, p) ~= nil
end

local STOP = {}
for w in gmatch([[the and for with that this from your you are was were not but
  any all its into about what when which who how has have had can our out
  или для что как это при без над под the a an of to in on or is it be by at
  just also only some more most other such very]], "%S+") do STOP[w] = true end

-- Split a free-text keyword list ("payment, charge / оплата; refund") into
-- phrases.
local function split_phrases(s, into)
  into = into or {}
  for piece in gmatch(s, "[^,/;:%(%)%.%?\n|]+") do
    piece = piece:match("^%s*(.-)%s*$")
    if piece ~= "" and #piece >= 2 and not STOP[M.lower(piece)] then
      into[#into + 1] = piece
    end
  end
  return into
end

-- Built-in label knowledge. `aliases` are stems matched against the words
-- of an enum value's name; `keywords` are phrases looked for in the text.
local CATEGORIES = {
  {
    name = "billing",
    aliases = { "bill", "pay", "invoice", "financ", "refund", "charg", "money", "pric", "оплат", "счет", "деньг" },
    keywords = { "invoice", "charge", "charged", "refund", "payment", "paid", "card", "billing", "bill",
      "money", "price", "receipt", "overcharged", "double charge", "subscription fee", "vat",
      "счет", "оплата", "возврат", "списали", "списание", "деньги", "платеж", "карта", "чек", "вернуть деньги" },
  },
  {
    name = "technical",
    aliases = { "tech", "bug", "error", "defect", "incident", "outage", "crash", "техн", "ошибк" },
    keywords = { "error", "crash", "crashes", "bug", "not working", "doesn't work", "does not work", "broken",
      "fails", "failed", "failure", "500", "exception", "freezes", "outage", "website down",
      "ошибка", "не работает", "сбой", "вылетает", "зависает", "глючит", "баг", "приложение", "не загружается" },
  },
  {
    name = "account",
    aliases = { "account", "login", "log", "auth", "access", "password", "signin", "sign", "security",
      "profile", "аккаунт", "вход" },
    keywords = { "password", "login", "log in", "sign in", "2fa", "two-factor", "account", "locked out",
      "username", "verification code", "hacked", "reset link",
      "пароль", "войти", "вход", "аккаунт", "учетная запись", "логин", "заблокирован", "код подтверждения",
      "личный кабинет", "взлом" },
  },
  {
    name = "shipping",
    aliases = { "ship", "deliver", "order", "logistic", "track", "package", "parcel", "доставк" },
    keywords = { "delivery", "delivered", "shipping", "shipped", "package", "parcel", "tracking",
      "courier", "arrive", "arrived", "lost in transit",
      "доставка", "посылка", "курьер", "трек", "отправлен", "привезли", "не пришла", "пункт выдачи" },
  },
  {
    name = "cancellation",
    aliases = { "cancel", "churn", "unsubscri", "terminat", "отмен" },
    keywords = { "cancel", "cancellation", "unsubscribe", "terminate", "close my account", "stop my subscription",
      "отменить", "отмена", "отписаться", "расторгнуть", "удалить аккаунт" },
  },
  {
    name = "feature_request",
    aliases = { "feature", "suggest", "idea", "enhanc", "wish", "предлож" },
    keywords = { "feature", "would be nice", "would love", "please add", "add support", "suggestion", "suggest",
      "could you add", "wish", "dark mode", "integration",
      "добавьте", "хотелось бы", "предложение", "было бы здорово", "было бы удобно", "функция", "возможность" },
  },
  {
    name = "complaint",
    aliases = { "complain", "grievanc", "dissatisf", "жалоб" },
    keywords = { "complaint", "complain", "unacceptable", "terrible", "awful", "worst", "rude", "disappointed",
      "angry", "frustrated", "ridiculous", "never again",
      "жалоба", "ужасно", "безобразие", "недоволен", "хамство", "отвратительно", "возмущен", "нагрубил" },
  },
  {
    name = "negative",
    aliases = { "negativ", "angry", "unhappy" },
    keywords = { "angry", "terrible", "awful", "worst", "disappointed", "unacceptable", "frustrated", "!!!",
      "ужасно", "недоволен", "безобразие", "отвратительно" },
  },
  {
    name = "positive",
    aliases = { "positiv", "happy" },
    keywords = { "thanks", "thank you", "great", "love", "awesome", "excellent", "happy", "perfect",
      "спасибо", "отлично", "здорово", "нравится", "благодар" },
  },
  {
    name = "urgent",
    aliases = { "urgent", "critical", "blocker", "emergenc", "highest", "p0", "срочн" },
    keywords = { "urgent", "asap", "immediately", "emergency", "critical", "right now", "!!!", "today",
      "срочно", "немедленно", "критично", "как можно скорее", "сегодня" },
  },
  {
    name = "high",
    aliases = { "high", "important", "p1" },
    keywords = { "important", "blocked", "cannot", "can't", "unable", "production", "locked out",
      "важно", "не могу", "заблокирован" },
  },
  {
    name = "low",
    aliases = { "low", "minor", "trivial", "lowest", "p3" },
    keywords = { "no rush", "whenever", "minor", "low priority", "when you have time", "question", "just wondering",
      "не срочно", "когда будет время", "мелочь", "вопрос" },
  },
}

-- Values to fall back on when nothing scores.
local FALLBACK = { "other", "general", "unknown", "misc", "none", "neutral", "medium", "normal", "moderate" }

-- Negations that would otherwise read as urgency.
local NEGATIONS = { "not urgent", "no rush", "не срочно", "несрочно" }

local function prepare_text(text)
  local t = M.lower(text)
  for _, neg in ipairs(NEGATIONS) do
    t = gsub(t, (gsub(neg, "%p", "%%%0")), " no rush ")
  end
  return t
end

local function value_words(v)
  local words = {}
  for w in gmatch(M.lower(tostring(v)), WORD .. "+") do words[#words + 1] = w end
  return words
end

local function categories_of(v)
  local found = {}
  local words = value_words(v)
  for _, cat in ipairs(CATEGORIES) do
    local hit = false
    for _, w in ipairs(words) do
      for _, a in ipairs(cat.aliases) do
        if sub(w, 1, #a) == a then hit = true break end
      end
      if hit then break end
    end
    if hit then found[#found + 1] = cat end
  end
  return found
end

-- Which words of a free-text description belong to which value: after
-- "value:" (or "value -", "value =", "value (") up to the next value's
-- marker. Returns { [value] = {phrases} }.
local function description_keywords(desc, values)
  local out = {}
  if type(desc) ~= "string" or desc == "" then return out end
  local d = M.lower(desc)
  local marks = {}
  for _, v in ipairs(values) do
    local lv = M.lower(tostring(v))
    local esc = gsub(lv, "%p", "%%%0")
    local init = 1
    while true do
      local s, e = find(d, FRONT .. esc .. "%s*[:=%(%-]", init)
      if not s then break end
      marks[#marks + 1] = { s = s, e = e, v = v }
      init = e + 1
    end
  end
  table.sort(marks, function(a, b) return a.s < b.s end)
  for i, m in ipairs(marks) do
    local stop = marks[i + 1] and marks[i + 1].s - 1 or #d
    local seg = sub(d, m.e + 1, stop)
    local list = out[m.v] or {}
    split_phrases(seg, list)
    out[m.v] = list
  end
  return out
end

-- Score one value against prepared (lowercased) text. Returns the number
-- of distinct phrases found, and the list of those phrases.
local function score_value(v, text, desc_phrases, subject)
  local seen, score, hits = {}, 0, {}
  local function try(phrase)
    local key = M.lower(phrase)
    if seen[key] then return end
    seen[key] = true
    if phrase_hits(text, phrase) then
      score = score + 1
      hits[#hits + 1] = phrase
      if subject and phrase_hits(subject, phrase) then score = score + 1 end
    end
  end
  try((gsub(tostring(v), "[_%-]", " ")))
  for _, p in ipairs(desc_phrases or {}) do try(p) end
  for _, cat in ipairs(categories_of(v)) do
    for _, p in ipairs(cat.keywords) do try(p) end
  end
  return score, hits
end

local function fallback_value(values)
  for _, f in ipairs(FALLBACK) do
    for _, v in ipairs(values) do
      if M.lower(tostring(v)) == f then return v end
    end
  end
  return values[1]
end

-- Score every enum value against the text. `desc` is free text (a schema
-- description, a system prompt) that may say which words point to which
-- value; `extra` maps values to more keyword text (const descriptions).
-- Returns { value = the choice, score = its score (0: nothing matched, the
-- fallback value), scores = { score of values[i] }, pos = byte offset in
-- `text` of the first keyword that decided the choice, or nil }.
function M.choose_detail(values, text, desc, extra)
  local d = { scores = {}, score = 0 }
  if #values == 0 then return d end
  local t = prepare_text(text)
  local subject = subject_of(text)
  if subject then subject = prepare_text(subject) end
  local dk = description_keywords(desc, values)
  local best, best_score, best_hits = nil, 0, nil
  for i, v in ipairs(values) do
    local phrases = dk[v]
    if extra and extra[v] then
      local merged = {}
      for j, p in ipairs(phrases or {}) do merged[j] = p end
      phrases = split_phrases(extra[v], merged)
    end
    local s, hits = score_value(v, t, phrases, subject)
    d.scores[i] = s
    if s > best_score then best, best_score, best_hits = v, s, hits end
  end
  if not best then
    d.value = fallback_value(values)
    return d
  end
  d.value, d.score = best, best_score
  -- M.lower keeps byte lengths, so offsets in it are offsets in `text`
  local low = M.lower(text)
  for _, phrase in ipairs(best_hits) do
    local p = pattern_cache[phrase]
    local at = p and find(low, p)
    if at and (not d.pos or at < d.pos) then d.pos = at end
  end
  return d
end

-- Pick the enum value whose keywords best match the text (see
-- choose_detail). Returns value, score (0 when nothing matched).
function M.choose(values, text, desc, extra)
  local d = M.choose_detail(values, text, desc, extra)
  return d.value, d.score
end

-- The probabilities of enum values from their keyword scores:
-- p_i = (s_i + a) / sum_j (s_j + a), with a = M.SMOOTHING (0.1). With no
-- keyword hit at all every value gets 1/n.
M.SMOOTHING = 0.1
function M.probabilities(scores)
  local a, total, p = M.SMOOTHING, 0, {}
  for _, s in ipairs(scores) do total = total + s + a end
  for i, s in ipairs(scores) do p[i] = (s + a) / total end
  return p
end

local LANG_VALUES = {
  ru = { "ru", "rus", "russian", "ru-ru", "русский" },
  en = { "en", "eng", "english", "en-us", "en-gb", "английский" },
}

local function pick_language(values, text)
  local want = M.language(text)
  for _, v in ipairs(values) do
    local lv = M.lower(tostring(v))
    for _, name in ipairs(LANG_VALUES[want]) do
      if lv == name then return v end
    end
  end
  return values[1]
end

-- Schema filling ----------------------------------------------------------

local function resolve(schema, root)
  local guard = 0
  while type(schema) == "table" and type(schema["$ref"]) == "string" and guard < 32 do
    local ref = schema["$ref"]
    local node = root
    if ref == "#" then
      node = root
    else
      for key in gmatch(ref:match("^#/(.*)$") or "", "[^/]+") do
        key = gsub(gsub(key, "~1", "/"), "~0", "~")
        node = type(node) == "table" and node[key] or nil
      end
    end
    schema = node
    guard = guard + 1
  end
  return type(schema) == "table" and schema or {}
end

local function main_type(schema)
  local t = schema.type
  if type(t) == "table" then
    for _, x in ipairs(t) do
      if x ~= "null" then return x end
    end
    return "null"
  end
  if t then return t end
  if schema.properties then return "object" end
  if schema.items then return "array" end
  if schema.enum then return "enum" end
  return "string"
end

-- A non-null branch of anyOf/oneOf; or, when every branch is a const with a
-- description, an enum built from them.
local function flatten_choice(schema, root)
  local branches = schema.anyOf or schema.oneOf
  if type(branches) ~= "table" or #branches == 0 then return schema end
  local consts, descs, all_const = {}, {}, true
  for _, b in ipairs(branches) do
    b = resolve(b, root)
    if b.const ~= nil then
      consts[#consts + 1] = b.const
      if b.description then descs[b.const] = b.description end
    elseif b.type ~= "null" then
      all_const = false
    end
  end
  if all_const and #consts > 0 then
    return { enum = consts, description = schema.description, const_descriptions = descs, type = "string" }
  end
  for _, b in ipairs(branches) do
    b = resolve(b, root)
    if b.type ~= "null" then return b end
  end
  return resolve(branches[1], root)
end

local function name_has(name, list)
  local n = M.lower(name or "")
  for _, w in ipairs(list) do
    if find(n, w, 1, true) then return true end
  end
  return false
end

local CANNED_REPLY = {
  en = "Thank you for contacting us. We have received your request and will get back to you shortly.",
  ru = "Спасибо за обращение. Мы получили ваш запрос и скоро ответим.",
}

local function fit_length(s, schema)
  if type(schema.maxLength) == "number" and utf8_len(s) > schema.maxLength then
    -- cut by characters
    local i, count = 1, 0
    while i <= #s and count < schema.maxLength do
      local b = byte(s, i)
      i = i + ((b >= 0xF0 and 4) or (b >= 0xE0 and 3) or (b >= 0xC0 and 2) or 1)
      count = count + 1
    end
    s = sub(s, 1, i - 1)
  end
  if type(schema.minLength) == "number" then
    while utf8_len(s) < schema.minLength do s = s .. "." end
  end
  return s
end

-- Property names whose value is evidence quoted from the document: a word
-- of the name (split at "_", "-" and case changes) is quote(s) or evidence.
local function is_quote_name(name)
  if type(name) ~= "string" then return false end
  local spaced = gsub(name, "(%l)(%u)", "%1 %2")
  for w in gmatch(lower(spaced), "%a+") do
    if w == "quote" or w == "quotes" or w == "evidence" then return true end
  end
  return false
end
M.is_quote_name = is_quote_name

-- A verbatim run of the text: 12 whitespace-separated words (at least 6
-- when the text has that many; all of it when it has fewer), starting two
-- words before the word at byte offset `pos` (nil: the first words). The
-- run is a substring of `text`, white space and punctuation included.
function M.quote(text, pos)
  local words = {}
  for s, e in gmatch(text, "()%S+()") do words[#words + 1] = { s, e - 1 } end
  if #words == 0 then return "" end
  local at = 1
  if pos then
    at = #words
    for i, w in ipairs(words) do
      if w[2] >= pos then at = i break end
    end
  end
  local first = at - 2
  if first < 1 then first = 1 end
  local last = first + 11
  if last > #words then last = #words end
  if last - first + 1 < 6 then
    first = last - 5
    if first < 1 then first = 1 end
  end
  return sub(text, words[first][1], words[last][2])
end

local function gen_string(name, schema, ctx)
  local text = ctx.text
  local fmt = schema.format
  if is_quote_name(name) then return M.quote(text, ctx.near) end
  if fmt == "date" then return text:match("%d%d%d%d%-%d%d%-%d%d") or "2024-01-01" end
  if fmt == "date-time" then
    return text:match("%d%d%d%d%-%d%d%-%d%dT[%d:]+Z?") or "2024-01-01T00:00:00Z"
  end
  if fmt == "email" or name_has(name, { "email", "e_mail" }) then
    return text:match("[%w%._%+%-]+@[%w%.%-]+%.%a+") or "customer@example.com"
  end
  if fmt == "uri" or fmt == "url" then return "https://example.com/" end
  if name_has(name, { "language", "lang", "locale" }) then return M.language(text) end
  if name_has(name, { "summary", "title", "subject", "headline", "gist", "topic" }) then
    return M.summary(text, 12)
  end
  if name_has(name, { "reason", "rationale", "explanation", "justification" }) then
    if ctx.matched and #ctx.matched > 0 then
      return "Matched: " .. concat(ctx.matched, ", ")
    end
    return "No strong keyword match."
  end
  if name_has(name, { "reply", "response", "answer", "draft", "message" }) then
    return CANNED_REPLY[M.language(text)]
  end
  if name_has(name, { "_id", "number", "order", "ticket" }) or M.lower(name or "") == "id" then
    return text:match("%u+%-%d+") or text:match("%d%d%d%d+") or ""
  end
  if name_has(name, { "name", "customer" }) then
    return text:match("[Mm]y name is (%a+)") or "Customer"
  end
  return M.summary(text, 12)
end

local function clamp(x, schema)
  local lo = schema.minimum or schema.exclusiveMinimum
  local hi = schema.maximum or schema.exclusiveMaximum
  if type(lo) == "number" and x < lo then x = lo end
  if type(hi) == "number" and x > hi then x = hi end
  return x
end

local LANG_NAMES = { "language", "lang", "locale" }

-- The free text that guides an enum's choice: its description, then the
-- system prompt.
local function guidance(schema, ctx)
  local desc = schema.description
  if ctx.system ~= "" then desc = (type(desc) == "string" and desc .. "\n" or "") .. ctx.system end
  return desc
end

-- One enum value: the choice, and what the logprobs need of it
-- ({ values, scores, chosen }); third result: where the deciding keyword
-- is in the text (nil without a hit).
local function choose_enum(schema, ctx, name)
  local values = schema.enum
  if name_has(name, LANG_NAMES) then
    -- by script, not keywords: the picked value scores 1, the others 0
    local v = pick_language(values, ctx.text)
    local scores = {}
    for i, x in ipairs(values) do scores[i] = x == v and 1 or 0 end
    return v, { values = values, scores = scores, chosen = v }
  end
  local d = M.choose_detail(values, ctx.text, guidance(schema, ctx), schema.const_descriptions)
  if d.score > 0 then
    ctx.hit = true
    ctx.matched[#ctx.matched + 1] = tostring(d.value)
  end
  return d.value, { values = values, scores = d.scores, chosen = d.value }, d.pos
end

local function register(ctx, parent, key, info)
  if info then
    local t = ctx.meta.enums[parent]
    if not t then t = {} ctx.meta.enums[parent] = t end
    t[key] = info
  end
end

-- An array whose items are an enum (a multi-label field): every value with
-- a keyword hit, best score first (ties in enum order); the fallback value
-- alone when none hits; cut to maxItems, padded to minItems with the next
-- best values. Returns the list and the deciding keyword's position.
local function choose_labels(schema, items, ctx)
  local values = items.enum
  local d = M.choose_detail(values, ctx.text, guidance(items.description and items or schema, ctx),
    items.const_descriptions)
  local idx = {}
  for i = 1, #values do idx[i] = i end
  table.sort(idx, function(a, b)
    if d.scores[a] ~= d.scores[b] then return d.scores[a] > d.scores[b] end
    return a < b
  end)
  local picked, taken = {}, {}
  for _, i in ipairs(idx) do
    if d.scores[i] > 0 then picked[#picked + 1] = i taken[i] = true end
  end
  if #picked == 0 then
    for i, v in ipairs(values) do
      if v == d.value then picked[1] = i taken[i] = true break end
    end
  end
  local maxn, minn = tonumber(schema.maxItems), tonumber(schema.minItems)
  if maxn and maxn >= 1 then
    while #picked > maxn do picked[#picked] = nil end
  end
  if minn then
    for _, i in ipairs(idx) do
      if #picked >= minn then break end
      if not taken[i] then picked[#picked + 1] = i taken[i] = true end
    end
  end
  local list = {}
  for k, i in ipairs(picked) do
    list[k] = values[i]
    register(ctx, list, k, { values = values, scores = d.scores, chosen = values[i] })
    if d.scores[i] > 0 then
      ctx.hit = true
      ctx.matched[#ctx.matched + 1] = tostring(values[i])
    end
  end
  return list, d.pos
end

local fill

local function gen_object(schema, ctx)
  local props = schema.properties
  local out = {}
  if type(props) ~= "table" then
    ctx.meta.orders[out] = {}
    return out
  end
  -- order: `required` first (as listed), then the rest sorted by name;
  -- the text is written in this order. Filled in it too, except quotes
  -- (after their siblings, to quote near the words that decided them) and
  -- numbers (last, so that a confidence can depend on the labels chosen)
  local order, seen = {}, {}
  if type(schema.required) == "table" then
    for _, k in ipairs(schema.required) do
      if props[k] ~= nil and not seen[k] then order[#order + 1] = k seen[k] = true end
    end
  end
  local rest = {}
  for k in pairs(props) do
    if not seen[k] then rest[#rest + 1] = k end
  end
  table.sort(rest)
  for _, k in ipairs(rest) do order[#order + 1] = k end
  ctx.meta.orders[out] = order
  local quotes, numbers, near = {}, {}, nil
  for _, k in ipairs(order) do
    local sub_schema = flatten_choice(resolve(props[k], ctx.root), ctx.root)
    local t = main_type(sub_schema)
    if (t == "number" or t == "integer") and not sub_schema.enum then
      numbers[#numbers + 1] = { k, sub_schema }
    elseif is_quote_name(k) and not sub_schema.enum and sub_schema.const == nil then
      quotes[#quotes + 1] = { k, sub_schema }
    else
      local v, info, pos = fill(sub_schema, ctx, k)
      out[k] = v
      register(ctx, out, k, info)
      if pos and not near then near = pos end
    end
  end
  local saved = ctx.near
  ctx.near = near
  for _, d in ipairs(quotes) do out[d[1]] = fill(d[2], ctx, d[1]) end
  ctx.near = saved
  for _, d in ipairs(numbers) do out[d[1]] = fill(d[2], ctx, d[1]) end
  return out
end

-- The value for `schema`; for an enum also what the logprobs need of it
-- and the position of the keyword that decided it.
function fill(schema, ctx, name)
  schema = flatten_choice(resolve(schema, ctx.root), ctx.root)
  if schema.const ~= nil then return schema.const end
  if type(schema.enum) == "table" and #schema.enum > 0 then
    return choose_enum(schema, ctx, name)
  end
  local t = main_type(schema)
  if t == "object" then
    return gen_object(schema, ctx)
  elseif t == "array" then
    local items = schema.items or { type = "string" }
    local it = flatten_choice(resolve(items, ctx.root), ctx.root)
    if type(it.enum) == "table" and #it.enum > 0 and it.const == nil and not name_has(name, LANG_NAMES) then
      local list, pos = choose_labels(schema, it, ctx)
      return list, nil, pos
    end
    local n = (type(schema.minItems) == "number" and schema.minItems > 1) and schema.minItems or 1
    local list, near = {}, nil
    for i = 1, n do
      local v, info, pos = fill(items, ctx, name)
      list[i] = v
      register(ctx, list, i, info)
      near = near or pos
    end
    return list, nil, near
  elseif t == "number" or t == "integer" then
    local x
    if name_has(name, { "confidence", "probability", "certainty", "score" }) then
      x = ctx.hit and 0.9 or 0.5
      if t == "integer" then x = ctx.hit and 9 or 5 end
    else
      x = schema.minimum or schema.exclusiveMinimum or 0
    end
    x = clamp(x, schema)
    if t == "integer" then x = floor(x + 0.5) end
    return x
  elseif t == "boolean" then
    if name_has(name, { "escalat", "human", "urgent" }) then
      local v = M.choose({ "urgent", "medium" }, ctx.text)
      return v == "urgent"
    end
    local words = value_words(gsub(name or "", "^is_", ""))
    local t_low = prepare_text(ctx.text)
    for _, w in ipairs(words) do
      if #w >= 4 and not STOP[w] and phrase_hits(t_low, w) then return true end
    end
    return false
  elseif t == "null" then
    return nil
  end
  return fit_length(gen_string(name, schema, ctx), schema)
end

-- Fill a JSON schema from the user's text. `system` (optional) is extra
-- free text whose "value: keywords" lines guide enum choices. Returns the
-- value, and `meta` for M.render: { orders = { [object] = key order },
-- enums = { [table] = { [key] = { values, scores, chosen } } } }.
function M.generate(schema, text, system)
  local meta = { orders = {}, enums = {} }
  local ctx = { text = text or "", system = type(system) == "string" and system or "", root = schema,
    hit = false, matched = {}, meta = meta }
  local v, info = fill(schema or {}, ctx, nil)
  if info then meta.root = info end
  return v, meta
end

local DEFAULT_LABELS = { "billing", "technical", "account", "shipping", "cancellation",
  "feature_request", "complaint", "other" }

-- Labels listed in a system prompt: a line like "Labels: a, b, c" or
-- "Categories: a | b | c". Returns a list, or nil.
local function labels_from(system)
  if type(system) ~= "string" then return nil end
  for line in gmatch(system, "[^\n]+") do
    local list = line:match("[Ll]abels?%s*:%s*(.+)$") or line:match("[Cc]ategor[iy]e?s?%s*:%s*(.+)$")
    if list then
      local out = {}
      for w in gmatch(list, "[%w_%-]+") do
        if w ~= "or" and w ~= "and" then out[#out + 1] = w end
      end
      if #out >= 2 then return out end
    end
  end
  return nil
end

-- `response_format = {type = "json_object"}` without a schema in the
-- prompt: {label, summary}, the label from the system prompt's "Labels:
-- ..." line when it has one. Returns the value, its meta (M.generate) and
-- the schema it fills.
function M.json_object(text, system)
  local labels = labels_from(system) or DEFAULT_LABELS
  local schema = { type = "object", required = { "label", "summary" },
    properties = { label = { type = "string", enum = labels }, summary = { type = "string" } } }
  local v, meta = M.generate(schema, text, system)
  return v, meta, schema
end

-- JSON text and its logprob pieces ---------------------------------------

-- Serialise a value made by M.generate as JSON text: objects in the
-- generator's key order (other objects by sorted keys), scalars by `enc`
-- (cjson.encode, so the bytes are lua-cjson's). Returns the text, `spans`
-- (the enum string values: { s, e = byte range of the content between the
-- quotes, info, parent, key }) and `strings` (every string value, same
-- shape), both in text order.
function M.render(value, meta, enc)
  meta = meta or { orders = {}, enums = {} }
  local buf, len, spans, strings = {}, 0, {}, {}
  local function put(s)
    buf[#buf + 1] = s
    len = len + #s
  end
  local walk
  function walk(v, parent, key)
    if type(v) ~= "table" then
      local s = enc(v)
      if type(v) == "string" then
        local r = { s = len + 2, e = len + #s - 1, parent = parent, key = key }
        strings[#strings + 1] = r
        local info
        if parent == nil then info = meta.root else info = meta.enums[parent] and meta.enums[parent][key] end
        if info then
          r.info = info
          spans[#spans + 1] = r
        end
      end
      return put(s)
    end
    local order = meta.orders[v]
    if not order and #v > 0 then
      put("[")
      for i = 1, #v do
        if i > 1 then put(",") end
        walk(v[i], v, i)
      end
      return put("]")
    end
    if not order then
      order = {}
      for k in pairs(v) do order[#order + 1] = k end
      table.sort(order, function(a, b) return tostring(a) < tostring(b) end)
    end
    put("{")
    local first = true
    for _, k in ipairs(order) do
      if v[k] ~= nil then
        if not first then put(",") end
        first = false
        put(enc(tostring(k)))
        put(":")
        walk(v[k], v, k)
      end
    end
    put("}")
  end
  walk(value, nil, nil)
  return concat(buf), spans, strings
end

local function is_cont(b) return b and b >= 0x80 and b < 0xC0 end

-- Split s into pieces of `size` bytes, never inside a UTF-8 character: a
-- piece that would end inside one ends after it (about `size` bytes), or,
-- with `at_most` (size >= 4), before it. Appended to `into` (default: a
-- new list), which is returned.
function M.pieces(s, size, at_most, into)
  into = into or {}
  local i, n = 1, #s
  while i <= n do
    local j = i + size - 1
    if j >= n then
      j = n
    elseif at_most then
      while j > i and is_cont(byte(s, j + 1)) do j = j - 1 end
    else
      while j < n and is_cont(byte(s, j + 1)) do j = j + 1 end
    end
    into[#into + 1] = sub(s, i, j)
    i = j + 1
  end
  return into
end

local function cut_pieces(s, max, into) return M.pieces(s, max, true, into) end

local PUNCT = '^[{}%[%]:,"]'

-- JSON text outside enum values: a run of JSON punctuation ({ } [ ] : , ")
-- is one piece; other text is split before each run of white space
-- (which starts the next piece) and into pieces of at most 8 bytes.
local function plain_pieces(seg, into)
  local i, n = 1, #seg
  while i <= n do
    local j = i
    if find(seg, PUNCT, i) then
      while j < n and find(seg, PUNCT, j + 1) do j = j + 1 end
      into[#into + 1] = sub(seg, i, j)
    else
      while j < n and not find(seg, PUNCT, j + 1) do j = j + 1 end
      local run, k = sub(seg, i, j), 1
      while k <= #run do
        local _, e = find(run, "^%s*[^%s]*", k)
        cut_pieces(sub(run, k, e), 8, into)
        k = e + 1
      end
    end
    i = j + 1
  end
  return into
end

-- The token pieces of a JSON text (or of a prefix of the text `spans`
-- were made for): { piece, span = the enum span on its first piece }.
-- Every enum value starts a piece and is split into pieces of at most 4
-- bytes; the rest as plain_pieces says.
function M.json_pieces(text, spans)
  local out, pos, n = {}, 1, #text
  local function add(list, sp)
    for k, p in ipairs(list) do out[#out + 1] = { piece = p, span = k == 1 and sp or nil } end
  end
  for _, sp in ipairs(spans or {}) do
    if sp.s > n + 1 then break end
    if sp.s > pos then add(plain_pieces(sub(text, pos, sp.s - 1), {})) end
    local e = sp.e < n and sp.e or n
    if e >= sp.s then add(cut_pieces(sub(text, sp.s, e), 4, {}), sp) end
    pos = (e >= sp.s and e or sp.s - 1) + 1
  end
  if pos <= n then add(plain_pieces(sub(text, pos), {})) end
  return out
end

-- The logprob of every piece that is not an enum value's first one.
M.SURE_LOGPROB = -0.0001

-- Logprobs for a JSON reply: { token, logprob, top = { {token, logprob} } }
-- per piece (M.json_pieces). The first piece of an enum value gets log p of
-- the chosen value (M.probabilities over its enum's keyword scores); its
-- `top` holds the first pieces of the best values, the chosen one first,
-- then by p (ties in enum order), each token once, at most `top` of them.
-- Every other piece: M.SURE_LOGPROB, top = the piece itself.
function M.json_logprobs(text, spans, top, enc)
  local list = {}
  for k, pc in ipairs(M.json_pieces(text, spans)) do
    local e = { token = pc.piece, logprob = M.SURE_LOGPROB, top = {} }
    local info = pc.span and pc.span.info
    if info then
      local p = M.probabilities(info.scores)
      local ci = 1
      for i, v in ipairs(info.values) do
        if v == info.chosen then ci = i break end
      end
      e.logprob = math.log(p[ci])
      local idx = {}
      for i = 1, #info.values do if i ~= ci then idx[#idx + 1] = i end end
      table.sort(idx, function(a, b)
        if p[a] ~= p[b] then return p[a] > p[b] end
        return a < b
      end)
      table.insert(idx, 1, ci)
      local seen = {}
      for _, i in ipairs(idx) do
        if #e.top >= top then break end
        local content = sub(enc(tostring(info.values[i])), 2, -2)
        local tok = i == ci and pc.piece or (cut_pieces(content, 4, {})[1] or "")
        if not seen[tok] then
          seen[tok] = true
          e.top[#e.top + 1] = { token = tok, logprob = math.log(p[i]) }
        end
      end
    elseif top > 0 then
      e.top[1] = { token = pc.piece, logprob = M.SURE_LOGPROB }
    end
    list[k] = e
  end
  return list
end

-- Task-failure directives ------------------------------------------------

-- Texts for bad_quote: the first that the request does not contain.
local FAKE_QUOTES = {
  "The customer confirmed the delivery address by phone last Tuesday.",
  "According to the signed contract the late penalty is waived entirely.",
  "Our records show the account was closed at the user's own request.",
}

local function replace_quotes(v, fake)
  if type(v) ~= "table" then return end
  for k, x in pairs(v) do
    if is_quote_name(k) and type(x) == "string" then
      v[k] = fake
    elseif is_quote_name(k) and type(x) == "table" then
      for i, y in ipairs(x) do if type(y) == "string" then x[i] = fake end end
    else
      replace_quotes(x, fake)
    end
  end
end

local function shift(list, by)
  for _, r in ipairs(list) do r.s, r.e = r.s + by, r.e + by end
end

-- The JSON text of a generated reply with the task-failure directives of
-- `sc` applied, in this order: missing_field, bad_quote, bad_label (on the
-- value), trailing_comma, prose_json (on the text), invalid_json or cut.
-- `request` is the raw request body (bad_quote avoids its text). Returns
-- { text, spans (for M.json_logprobs), finish = "length" for cut or nil }.
function M.json_reply(value, meta, schema, sc, enc, request)
  sc = sc or {}
  if sc.missing_field and type(value) == "table" then
    local root = resolve(schema or {}, schema)
    local name = type(root.required) == "table" and root.required[1] or (meta.orders[value] or {})[1]
    if name ~= nil then value[name] = nil end
  end
  if sc.bad_quote then
    local low, fake = M.lower(request or ""), FAKE_QUOTES[#FAKE_QUOTES]
    for _, q in ipairs(FAKE_QUOTES) do
      if not find(low, M.lower(q), 1, true) then fake = q break end
    end
    replace_quotes(value, fake)
  end
  local text, spans, strings = M.render(value, meta, enc)
  if sc.bad_label and spans[1] then
    local sp, bad = spans[1], "miscellaneous"
    local used = {}
    for _, v in ipairs(sp.info.values) do used[v] = true end
    while used[bad] do bad = bad .. "_x" end
    if sp.parent == nil then
      value, meta.root = bad, nil
    else
      sp.parent[sp.key] = bad
      meta.enums[sp.parent][sp.key] = nil
    end
    text, spans, strings = M.render(value, meta, enc)
  end
  if sc.trailing_comma then
    local at = text:match(".*()}")
    if at then text = sub(text, 1, at - 1) .. ",}" .. sub(text, at + 1) end
  end
  if sc.prose_json then
    local pre = "Sure! Here is the JSON:\n```json\n"
    text = pre .. text .. "\n```\nLet me know if you need anything else."
    shift(spans, #pre)
    shift(strings, #pre)
  end
  local finish
  if sc.invalid_json then
    -- cut inside the first string value, half of it kept
    local r, cut = strings[1], floor(#text / 2)
    if r then cut = r.s - 1 + floor((r.e - r.s + 1) / 2) end
    text = M.utf8_cut(text, cut)
  elseif sc.cut then
    text = M.utf8_cut(text, floor(#text / 2))
    finish = "length"
  end
  return { text = text, spans = spans, finish = finish }
end

-- A schema in the prompt (json_object) -----------------------------------

local SCHEMA_TYPES = { object = true, array = true, string = true, number = true, integer = true,
  boolean = true, null = true }

local function looks_like_schema(t)
  if type(t) ~= "table" then return false end
  if t.properties or t["$schema"] or t["$ref"] or t.anyOf or t.oneOf or t.enum or t.items then return true end
  return SCHEMA_TYPES[t.type] == true or (type(t.type) == "table" and #t.type > 0)
end

-- Call fn(j, b) for every byte b (at j >= i) of the JSON text s that is
-- outside strings (their quotes are inside); stop and return what fn
-- returns when that is not nil.
function M.json_outside_strings(s, i, fn)
  local in_str, esc = false, false
  for j = i, #s do
    local b = byte(s, j)
    if in_str then
      if esc then esc = false
      elseif b == 92 then esc = true
      elseif b == 34 then in_str = false end
    elseif b == 34 then
      in_str = true
    else
      local r = fn(j, b)
      if r ~= nil then return r end
    end
  end
end

-- The end of the balanced {...} that starts at byte i of s, or nil.
local function object_end(s, i)
  local depth = 0
  return M.json_outside_strings(s, i, function(j, b)
    if b == 123 then
      depth = depth + 1
    elseif b == 125 then
      depth = depth - 1
      if depth == 0 then return j end
    end
  end)
end

-- A JSON schema in a prompt text: the first ```json fenced block, else
-- the JSON object right after the words "JSON schema:" (a fence between
-- them allowed), that `decode` turns into something schema-like (an object
-- with properties, type, items, enum, anyOf, oneOf, $ref or $schema).
-- Returns the schema and the text without it (nil when there is none).
function M.find_schema(text, decode)
  if type(text) ~= "string" then return nil end
  local low = M.lower(text)
  local init = 1
  while true do
    local s, e = find(low, "```json[^\n]*\n", init)
    if not s then break end
    local close = find(text, "```", e + 1, true)
    local body = sub(text, e + 1, (close or #text + 1) - 1)
    local v = decode(body)
    if looks_like_schema(v) then
      local stop = close and close + 2 or #text
      return v, sub(text, 1, s - 1) .. sub(text, stop + 1)
    end
    init = e + 1
  end
  init = 1
  while true do
    local s, e = find(low, "json schema:", init, true)
    if not s then break end
    local _, f = find(text, "^%s*```[%w]*%s*", e + 1)
    local open = f and f + 1 or (find(text, "^%s*{", e + 1) and find(text, "{", e + 1, true))
    if open and byte(text, open) == 123 then
      local close = object_end(text, open)
      local v = close and decode(sub(text, open, close))
      if looks_like_schema(v) then
        local stop = close
        local _, g = find(text, "^%s*```", close + 1)
        if g then stop = g end
        return v, sub(text, 1, s - 1) .. sub(text, stop + 1)
      end
    end
    init = e + 1
  end
  return nil
end

-- Knowledge passages (support bot) ---------------------------------------

local function xml_unescape(s)
  s = gsub(s, "&lt;", "<")
  s = gsub(s, "&gt;", ">")
  s = gsub(s, "&quot;", '"')
  s = gsub(s, "&#39;", "'")
  s = gsub(s, "&apos;", "'")
  return (gsub(s, "&amp;", "&"))
end

-- The passages of every <knowledge> block in `texts` (a list of message
-- texts): { id, title, text }, in order; nil when no text has a block.
function M.passages(texts)
  local list, found = {}, false
  for _, t in ipairs(texts) do
    if find(t, "<knowledge", 1, true) then
      for block in gmatch(t .. "</knowledge>", "<knowledge[^>]*>(.-)</knowledge>") do
        found = true
        for attrs, body in gmatch(block, "<passage([^>]*)>(.-)</passage>") do
          local a = {}
          for k, _, v in gmatch(attrs, "([%w_%-]+)%s*=%s*([\"'])(.-)%2") do a[lower(k)] = xml_unescape(v) end
          list[#list + 1] = { id = a.id or tostring(#list + 1), title = a.title or "",
            text = (xml_unescape(body):match("^%s*(.-)%s*$")) }
        end
      end
    end
  end
  return found and list or nil
end

-- The text without its <knowledge> blocks.
function M.strip_knowledge(text)
  return (gsub(text, "<knowledge[^>]*>.-</knowledge>", " "))
end

-- Words that never make a question match a passage.
local QSTOP = {}
for w in gmatch([[i me my mine we us our you your he she they them their it its this that these those
  is am are was were be been being do does did done can could would should will shall may might must
  how what when where why who whom which whose there here have has had get got give tell know want
  need like please hello thanks thank any some all just also only very much many more most the a an
  of to in on at by for with from about into and or but not no yes if so then than too
  я мне меня мой моя мое мои мы нас нам наш вы вас вам ваш ваша ваше ваши он она они оно его ее их
  это этот эта эти как что где когда почему зачем кто какой какая какое какие сколько ли не нет да
  и а но или во на со ко по об от до из за для при без над под про можно нужно надо есть быть
  будет могу может хочу хотел хотела пожалуйста здравствуйте привет спасибо подскажите скажите
  еще уже так там тут вот бы же ну то чтобы чем]], "%S+") do QSTOP[w] = true end

-- Crude stems for question/passage matching: English words of 5+ letters
-- lose -ies (-> y), -ing, -ed, -es or -s (at least 4 letters stay);
-- Russian words keep their first max(4, len - 3) letters (from 6 letters).
local function kstem(w)
  if is_cyrillic_start(w) then return stem(w) end
  if #w >= 5 then
    for _, r in ipairs({ { "ies", "y" }, { "ing", "" }, { "ed", "" }, { "es", "" }, { "s", "" } }) do
      if sub(w, -#r[1]) == r[1] and #w - #r[1] + #r[2] >= 4 then return sub(w, 1, #w - #r[1]) .. r[2] end
    end
  end
  return w
end

-- The meaningful words of a text: lowercased, not in QSTOP, at least 3
-- letters (or 2 with a digit); each once, with its stem.
local function meaningful(text)
  local out, seen = {}, {}
  for w in gmatch(M.lower(text), WORD .. "+") do
    if not seen[w] and not QSTOP[w] and not STOP[w] and (utf8_len(w) >= 3 or (#w >= 2 and find(w, "%d"))) then
      seen[w] = true
      out[#out + 1] = { w = w, stem = kstem(w) }
    end
  end
  return out
end
M.meaningful_words = meaningful

-- Two words match when one starts with the other's stem.
local function words_match(a, b)
  return sub(b.w, 1, #a.stem) == a.stem or sub(a.w, 1, #b.stem) == b.stem
end

-- How many meaningful words of the question a passage (title and text) has.
function M.passage_score(question_words, passage)
  local pw = meaningful(passage.title .. "\n" .. passage.text)
  local n = 0
  for _, q in ipairs(question_words) do
    for _, w in ipairs(pw) do
      if words_match(q, w) then n = n + 1 break end
    end
  end
  return n
end

-- Sentences of s as byte ranges { first, last } (verbatim, without the
-- white space around them): a sentence ends after a run of . ! ? (closing
-- quotes and brackets included) or an ellipsis followed by white space or
-- the end, or at a blank line.
function M.sentences(s)
  local out, n = {}, #s
  local i = find(s, "%S")
  while i do
    local j, stop = i, nil
    while j <= n do
      local b = byte(s, j)
      if b == 46 or b == 33 or b == 63 then
        local k = j
        while k < n and find(s, "^[%.!%?\"'%)%]]", k + 1) do k = k + 1 end
        if k == n or find(s, "^%s", k + 1) then stop = k break end
        j = k + 1
      elseif b == 226 and sub(s, j, j + 2) == "\226\128\166" then
        local k = j + 2
        if k == n or find(s, "^%s", k + 1) then stop = k break end
        j = k + 1
      elseif b == 10 and find(s, "^\n[ \t\r]*\n", j) then
        stop = j - 1
        break
      else
        j = j + 1
      end
    end
    stop = stop or n
    local last = stop
    while last >= i and find(s, "^%s", last) do last = last - 1 end
    if last >= i then out[#out + 1] = { i, last } end
    i = find(s, "%S", stop + 1)
  end
  return out
end

local function word_count(s)
  return select(2, gsub(s, "%S+", ""))
end

M.NO_SOURCE = { en = "I'm not sure about that. [no-source]", ru = "Я не уверен. [no-source]" }

-- The answer to `question` from `passages` (M.passages): the best-matching
-- passage's first sentence (and its second when the first has fewer than
-- 10 words), verbatim, then " [<id>]". No passage sharing a meaningful word
-- with the question: M.NO_SOURCE in the question's language. Ties go to
-- the earlier passage. Returns the text and the passage (nil for no-source).
function M.knowledge_answer(passages, question)
  local qw = meaningful(question)
  local best, best_score = nil, 0
  for _, p in ipairs(passages) do
    local sc = M.passage_score(qw, p)
    if sc > best_score then best, best_score = p, sc end
  end
  if not best then return M.NO_SOURCE[M.language(question)] end
  local body = best.text ~= "" and best.text or best.title
  local ss = M.sentences(body)
  local answer = body
  if #ss > 0 then
    local last = ss[1][2]
    if ss[2] and word_count(sub(body, ss[1][1], ss[1][2])) < 10 then last = ss[2][2] end
    answer = sub(body, ss[1][1], last)
  end
  return answer .. " [" .. best.id .. "]", best
end

-- Escalation (support bot) -----------------------------------------------

-- Word starts that ask for a person (case folded); words starting with
-- "personal" do not count.
M.HUMAN_WORDS = { "human", "person", "operator", "agent", "manager", "someone",
  "оператор", "человек", "живой", "живого", "живому", "живым", "менеджер", "специалист", "сотрудник" }

function M.asks_for_human(text)
  for w in gmatch(M.lower(text or ""), WORD .. "+") do
    if sub(w, 1, 8) ~= "personal" then
      for _, h in ipairs(M.HUMAN_WORDS) do
        if sub(w, 1, #h) == h then return true end
      end
    end
  end
  return false
end

-- The arguments of an escalate_to_human call (JSON text, in this key
-- order): reason "user_request"; category: one of the tool's
-- parameters.properties.category enum chosen by keyword scoring of
-- `user_text` (M.choose), "other" when it has none; summary: the first 20
-- words of `user_text`.
function M.escalation_arguments(params, user_text, enc)
  local category = "other"
  local props = type(params) == "table" and type(params.properties) == "table" and params.properties
  if props and type(props.category) == "table" then
    local cat = flatten_choice(resolve(props.category, params), params)
    if type(cat.enum) == "table" and #cat.enum > 0 then
      category = M.choose(cat.enum, user_text, cat.description, cat.const_descriptions)
    end
  end
  return '{"reason":' .. enc("user_request") .. ',"category":' .. enc(category)
    .. ',"summary":' .. enc(M.first_words(user_text, 20)) .. "}"
end

-- Summaries --------------------------------------------------------------

-- Whether a system prompt asks for a summary: a word starting with summar,
-- кратк, резюм or сумм (case folded).
function M.wants_summary(system)
  local low = M.lower(system or "")
  for _, w in ipairs({ "summar", "кратк", "резюм", "сумм" }) do
    if find(low, FRONT .. w) then return true end
  end
  return false
end

local LIMIT_PATTERNS = {
  "at most (%d+) words?", "in (%d+) words?", "no more than (%d+) words?", "up to (%d+) words?",
  "maximum of (%d+) words?", "maximum (%d+) words?", "max%.? (%d+) words?", "(%d+) words? or less",
  "(%d+) words? or fewer", "(%d+) words? max",
  "не более (%d+) слов", "не больше (%d+) слов", "до (%d+) слов", "максимум (%d+) слов", "в (%d+) слов",
}

-- The word limit a system prompt sets ("at most N words", "in N words",
-- "не более N слов", ...: the smallest N named), else `default`.
function M.word_limit(system, default)
  local low, n = M.lower(system or ""), nil
  for _, p in ipairs(LIMIT_PATTERNS) do
    for d in gmatch(low, FRONT .. p) do
      d = tonumber(d)
      if d and (not n or d < n) then n = d end
    end
  end
  return n or default
end

-- The first sentences of `text` that fit in n words (whole sentences; the
-- first one cut to n words when it alone is longer), words joined by one
-- space.
function M.summarize(text, n)
  local words = {}
  for _, r in ipairs(M.sentences(text)) do
    local ws = {}
    for w in gmatch(sub(text, r[1], r[2]), "%S+") do ws[#ws + 1] = w end
    if #words + #ws > n then
      if #words == 0 then
        for k = 1, n do words[k] = ws[k] end
      end
      break
    end
    for _, w in ipairs(ws) do words[#words + 1] = w end
  end
  return concat(words, " ")
end

-- banned=<word>: the word inserted after the first word of a text.
function M.insert_word(text, word)
  local s, e = find(text, "%S+")
  if not s then return word end
  return sub(text, 1, e) .. " " .. word .. sub(text, e + 1)
end

return M
