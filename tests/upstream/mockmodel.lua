-- tests/upstream/mockmodel.lua: the simulator's "model". Deterministic
-- heuristics that turn a request's text into a plausible answer: JSON that
-- conforms to a JSON schema (enum values picked by keyword scoring, English
-- and Russian), a generic {label, summary} object, short summaries.
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
-- of distinct phrases found.
local function score_value(v, text, desc_phrases, subject)
  local seen, score = {}, 0
  local function try(phrase)
    local key = M.lower(phrase)
    if seen[key] then return end
    seen[key] = true
    if phrase_hits(text, phrase) then
      score = score + 1
      if subject and phrase_hits(subject, phrase) then score = score + 1 end
    end
  end
  try(gsub(tostring(v), "[_%-]", " "))
  for _, p in ipairs(desc_phrases or {}) do try(p) end
  for _, cat in ipairs(categories_of(v)) do
    for _, p in ipairs(cat.keywords) do try(p) end
  end
  return score
end

local function fallback_value(values)
  for _, f in ipairs(FALLBACK) do
    for _, v in ipairs(values) do
      if M.lower(tostring(v)) == f then return v end
    end
  end
  return values[1]
end

-- Pick the enum value whose keywords best match the text. `desc` is free
-- text (a schema description, a system prompt) that may say which words
-- point to which value. Returns value, score (0 when nothing matched).
function M.choose(values, text, desc, extra)
  if #values == 0 then return nil, 0 end
  local t = prepare_text(text)
  local subject = subject_of(text)
  if subject then subject = prepare_text(subject) end
  local dk = description_keywords(desc, values)
  local best, best_score = nil, 0
  for _, v in ipairs(values) do
    local phrases = dk[v]
    if extra and extra[v] then
      local merged = {}
      for i, p in ipairs(phrases or {}) do merged[i] = p end
      phrases = split_phrases(extra[v], merged)
    end
    local s = score_value(v, t, phrases, subject)
    if s > best_score then best, best_score = v, s end
  end
  if not best then return fallback_value(values), 0 end
  return best, best_score
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

local function gen_string(name, schema, ctx)
  local text = ctx.text
  local fmt = schema.format
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

local fill

local function gen_object(schema, ctx)
  local props = schema.properties
  local out = {}
  if type(props) ~= "table" then return out end
  -- order: `required` first (as listed), then the rest sorted by name;
  -- numbers last so that a confidence can depend on the labels chosen
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
  local deferred = {}
  for _, k in ipairs(order) do
    local sub_schema = flatten_choice(resolve(props[k], ctx.root), ctx.root)
    local t = main_type(sub_schema)
    if (t == "number" or t == "integer") and not sub_schema.enum then
      deferred[#deferred + 1] = { k, sub_schema }
    else
      out[k] = fill(sub_schema, ctx, k)
    end
  end
  for _, d in ipairs(deferred) do out[d[1]] = fill(d[2], ctx, d[1]) end
  return out
end

function fill(schema, ctx, name)
  schema = flatten_choice(resolve(schema, ctx.root), ctx.root)
  if schema.const ~= nil then return schema.const end
  if type(schema.enum) == "table" and #schema.enum > 0 then
    local values = schema.enum
    if name_has(name, { "language", "lang", "locale" }) then return pick_language(values, ctx.text) end
    local desc = schema.description
    if ctx.system ~= "" then desc = (type(desc) == "string" and desc .. "\n" or "") .. ctx.system end
    local v, score = M.choose(values, ctx.text, desc, schema.const_descriptions)
    if score > 0 then
      ctx.hit = true
      ctx.matched[#ctx.matched + 1] = tostring(v)
    end
    return v
  end
  local t = main_type(schema)
  if t == "object" then
    return gen_object(schema, ctx)
  elseif t == "array" then
    local items = schema.items or { type = "string" }
    local n = (type(schema.minItems) == "number" and schema.minItems > 1) and schema.minItems or 1
    local list = {}
    for i = 1, n do list[i] = fill(items, ctx, name) end
    return list
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
-- free text whose "value: keywords" lines guide enum choices.
function M.generate(schema, text, system)
  local ctx = { text = text or "", system = type(system) == "string" and system or "", root = schema,
    hit = false, matched = {} }
  return fill(schema or {}, ctx, nil)
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

-- `response_format = {type = "json_object"}`: {label, summary}, the label
-- from the system prompt's "Labels: ..." line when it has one.
function M.json_object(text, system)
  local labels = labels_from(system) or DEFAULT_LABELS
  local label = M.choose(labels, text or "", system)
  return { label = label, summary = M.summary(text or "", 12) }
end

return M
