-- slm.tasks.common: what every task shares.
--
--  * argument forms: a simple form (`slm.classify(text, labels)`, with a
--    default client from the environment) and a table form
--    (`slm.classify{ client = c, text = ..., labels = ... }`), as LuaSocket's
--    http.request has; misuse raises naming the argument;
--  * the ledger: every model call a task makes (re-asks, regenerations,
--    chunks, failed attempts that were billed) is added to it, so the
--    result's usage, cost and attempts are the task's whole, and each call
--    is listed in `requests` (what the batch runner's usage log writes);
--  * images as content parts, checked against the model's vision;
--  * personal data masking around a call (slm.pii).
local models = require "slm.models"
local errors = require "slm.errors"
local image = require "slm.image"

local type, pairs, ipairs, tostring, tonumber, error, format, setmetatable, concat, next =
  type, pairs, ipairs, tostring, tonumber, error, string.format, setmetatable, table.concat, next

local M = {}

------------------------------------------------------------------ clients

local default_client
--- The client of the simple forms: slm.client() configured from the
-- environment (SLM_BASE_URL, SLM_API_KEY, SLM_MODEL, ...), made once.
function M.default_client()
  if not default_client then default_client = require("slm.client").new() end
  return default_client
end

------------------------------------------------------------------ options

-- What a checker of this module stands for in check's message, where it
-- says more than the task's own description of the option.
local WHAT = {}

--- Check a task's option table against spec { name = { check, "what" } };
-- raises "slm.<task>: unknown option 'x'" / "option 'x' must be ...".
function M.check(task, spec, opts, level)
  if type(opts) ~= "table" then error(format("slm.%s: expected an options table, got %s", task, type(opts)), level + 1) end
  for k, v in pairs(opts) do
    local c = spec[k]
    if not c then error(format("slm.%s: unknown option '%s'", task, tostring(k)), level + 1) end
    if not c[1](v) then
      local got = type(v)
      if got == "number" and (v ~= v or v == math.huge or v == -math.huge) then got = tostring(v) end
      error(format("slm.%s: option '%s' must be %s, got %s", task, k, WHAT[c[1]] or c[2], got), level + 1)
    end
  end
end

function M.is_client(v) return type(v) == "table" and type(v.chat) == "function" end
function M.is_string(v) return type(v) == "string" end
function M.nonempty_string(v) return type(v) == "string" and v ~= "" end
function M.is_table(v) return type(v) == "table" end
function M.is_bool(v) return type(v) == "boolean" end
function M.is_function(v) return type(v) == "function" end
function M.pos_int(v) return type(v) == "number" and v >= 1 and v % 1 == 0 and v < math.huge end
function M.nonneg_int(v) return type(v) == "number" and v >= 0 and v % 1 == 0 and v < math.huge end
function M.fraction(v) return type(v) == "number" and v >= 0 and v <= 1 end
-- seconds, as client:chat's `timeout` takes them: positive and finite
-- (math.huge and NaN refused); the tasks' `timeout` options use it.
function M.seconds(v) return type(v) == "number" and v > 0 and v < math.huge end
M.number = M.seconds
WHAT[M.seconds] = "a positive finite number of seconds"
function M.string_list(v)
  if type(v) ~= "table" then return false end
  for i = 1, #v do if type(v[i]) ~= "string" then return false end end
  return next(v) == nil or #v > 0
end

------------------------------------------------------------------ the ledger

local Ledger = {}
Ledger.__index = Ledger

--- A new ledger: the usage, cost and attempts of a task's calls.
function M.ledger()
  return setmetatable({
    usage = { prompt_tokens = 0, completion_tokens = 0, total_tokens = 0 },
    cost = 0, priced = true, attempts = 0, calls = 0, latency = 0, estimated = false,
    requests = {},
  }, Ledger)
end

-- Add the usage and cost of one Response (or of an error's partial
-- Response) to the ledger, and `attempts` HTTP attempts.
function Ledger:add(res, attempts)
  if type(res) == "table" then
    local u = res.usage
    if type(u) == "table" then
      local acc = self.usage
      acc.prompt_tokens = acc.prompt_tokens + (u.prompt_tokens or 0)
      acc.completion_tokens = acc.completion_tokens + (u.completion_tokens or 0)
      acc.total_tokens = acc.total_tokens + (u.total_tokens or 0)
      if u.estimated then self.estimated = true end
    end
    if res.cost then self.cost = self.cost + res.cost elseif u then self.priced = false end
  end
  self.attempts = self.attempts + (attempts or 0)
  self.calls = self.calls + 1
end

-- HTTP attempts an error stands for: its own, or every model's when
-- fallback models were tried.
local function attempts_of(err)
  local list = type(err.fallback_errors) == "table" and err.fallback_errors or { err }
  local n = 0
  for i = 1, #list do n = n + (tonumber(list[i].attempts) or 0) end
  return n
end

-- r.billed (slm.client's totals of a call) as a Response-like table, or nil
-- (a client that does not give them, or nothing was charged).
local function billed_of(r)
  local b = r.billed
  if type(b) ~= "table" then return nil end
  if (b.total_tokens or 0) == 0 and not r.usage then return nil end
  return { usage = { prompt_tokens = b.prompt_tokens or 0, completion_tokens = b.completion_tokens or 0,
    total_tokens = b.total_tokens or 0, estimated = r.usage and r.usage.estimated or nil }, cost = b.cost }
end

local core_now
local function load_now() core_now = require("slm.core").now; return core_now end

--- Call client:chat(req) and enter what it cost: -> res | nil, err (an
-- error's partial Response and its attempts count too).
function Ledger:chat(client, req)
  local now = core_now or load_now()
  local t0 = now()
  local res, err = client:chat(req)
  local dt = now() - t0
  self.latency = self.latency + dt
  -- what the call was charged, every attempt and model included (the
  -- client's `billed`), else the Response's or the partial's own figures
  if res then
    local b = billed_of(res) or res
    self:add(b, res.attempts or 1)
    self:note(req, client, b, res, res.attempts or 1, "ok", dt)
    return res
  end
  if type(err) == "table" then
    local b = billed_of(err) or err.partial
    self:add(b, attempts_of(err))
    self:note(req, client, b, err, attempts_of(err), err.kind or "error", dt)
  end
  return nil, err
end

-- One entry of `requests`: a client call the task made (its retries and
-- fallbacks inside it), what it used and cost, how it ended.  r: the
-- Response, or the error's partial Response (nil: nothing billed).
-- A call refused before sending (a prompt over the context, an exhausted
-- budget) is no request and is not listed.
function Ledger:note(req, client, r, from, attempts, outcome, dt)
  if outcome ~= "ok" and (from.local_check or attempts == 0) then return end
  local u = type(r) == "table" and type(r.usage) == "table" and r.usage or nil
  local list = self.requests
  list[#list + 1] = {
    model = from.model or req.model or client.model,
    prompt_tokens = u and u.prompt_tokens or 0, completion_tokens = u and u.completion_tokens or 0,
    cost = type(r) == "table" and r.cost or nil,
    latency = dt, ttft = from.ttft, attempts = attempts, outcome = outcome, via = from.via,
  }
end

--- Copy the totals into a result or an error table: usage, cost (nil when
-- any call's price is unknown), attempts, calls, latency, and `requests`
-- (a list: each request's model, prompt_tokens, completion_tokens, cost,
-- latency, ttft, attempts, outcome).
function Ledger:into(t)
  t.usage = { prompt_tokens = self.usage.prompt_tokens, completion_tokens = self.usage.completion_tokens,
    total_tokens = self.usage.total_tokens, estimated = self.estimated or nil }
  t.cost = self.priced and self.cost or nil
  t.attempts, t.calls, t.latency = self.attempts, self.calls, self.latency
  local list = {}
  for i, r in ipairs(self.requests) do list[i] = r end
  t.requests = list
  return t
end

--- A task's error: err (a client error) or a new one of `kind`, with the
-- ledger's totals of what was spent before it failed.
function Ledger:fail(err_or_kind, message, fields)
  local err = err_or_kind
  if type(err_or_kind) == "string" then err = errors.new(err_or_kind, message, fields or { status = 0 }) end
  if type(err) == "table" then self:into(err) end
  return nil, err
end

------------------------------------------------------------------ chunks

-- The smallest chunk_tokens extract and summarize take: about 75 English
-- words, a paragraph.  Less would make a request of every few words of the
-- document (bounded only by the budget; summarize's levels double it),
-- each without the context to work from.
M.MIN_CHUNK_TOKENS = 100
M.CHUNK_TOKENS = { function(v) return M.pos_int(v) and v >= M.MIN_CHUNK_TOKENS end,
  "an integer of at least " .. M.MIN_CHUNK_TOKENS
    .. " (tokens of the document per request: smaller chunks cost a request every few words)" }

------------------------------------------------------------------ images

local MIME = { png = "image/png", jpeg = "image/jpeg", gif = "image/gif", webp = "image/webp" }

local read_file = require("slm.fileio").read_all

-- A local image's bytes at most (OpenAI takes 50 MB per request in all);
-- a FIFO or a device is refused unread (slm.fileio.read_all).
M.MAX_IMAGE_BYTES = 50 * 1048576

--- The content parts of `images` (a list of a file path, a URL, or a table
-- { path = | bytes = | url = , detail = "low"|"high"|"auto" }): image_url
-- parts, local images as data: URLs (base64 in C).  -> parts | nil, err
function M.image_parts(images, task)
  if type(images) ~= "table" then error(format("slm.%s: option 'images' must be a list", task), 4) end
  local parts = {}
  for i, img in ipairs(images) do
    if type(img) == "string" then
      img = img:match("^%a[%w+.-]*://") and img:sub(1, 5) ~= "file:" and { url = img } or { path = img }
    end
    if type(img) ~= "table" then error(format("slm.%s: images[%d] must be a path, a URL or a table", task, i), 4) end
    local url = img.url
    if not url then
      local bytes = img.bytes
      if img.path then
        local b, oerr = read_file(img.path, M.MAX_IMAGE_BYTES)
        if not b then return nil, errors.new("invalid_request", format("images[%d]: %s", i, tostring(oerr)),
          { status = 0 }) end
        bytes = b
      end
      if type(bytes) ~= "string" then
        error(format("slm.%s: images[%d] needs one of path, bytes or url", task, i), 4)
      end
      local w, h, fmt = image.size(bytes)
      if not w then
        return nil, errors.new("invalid_request", format("images[%d] is not an image lua-slm can read: %s", i, h),
          { status = 0 })
      end
      url = "data:" .. MIME[fmt] .. ";base64," .. image.base64_encode(bytes)
    end
    parts[#parts + 1] = { type = "image_url", image_url = { url = url, detail = img.detail } }
  end
  return parts
end

--- The model to send images to: `model` when it reads images, else the
-- first of `fallback` that does; nil, err when none does.  Second result:
-- the fallback models to try after it, those not known to lack vision
-- (pass it as the request's `fallback`: a model that cannot read images
-- must never be sent them).
function M.vision_model(model, fallback, task)
  local function reads(m)
    local info = models.find(m)
    return not info or info.vision ~= false
  end
  local chosen
  if reads(model) then
    chosen = model
  else
    for _, m in ipairs(fallback or {}) do
      local fi = models.find(m)
      if fi and fi.vision then chosen = m; break end
    end
  end
  if not chosen then
    return nil, errors.new("invalid_request", format("slm.%s: model %s does not read images, and no fallback "
      .. "model does (send them to a vision model such as gpt-4o-mini)", task, tostring(model)),
      { status = 0, model = model })
  end
  local rest = {}
  for _, m in ipairs(fallback or {}) do
    if m ~= chosen and reads(m) then rest[#rest + 1] = m end
  end
  return chosen, rest
end

--- A user message: text, with image parts after it when there are some.
function M.user_message(text, parts)
  if not parts or #parts == 0 then return { role = "user", content = text } end
  local content = { { type = "text", text = text } }
  for _, p in ipairs(parts) do content[#content + 1] = p end
  return { role = "user", content = content }
end

--- A masker's counts, copied: { email = 1, phone = 0, ... } (res.masked).
function M.counts(masker)
  local c = {}
  for k, v in pairs(masker.counts) do c[k] = v end
  return c
end

------------------------------------------------------------------ words

--- Words of a text (runs of non-space): for max_words checks.
function M.word_count(s)
  local n = 0
  for _ in s:gmatch("%S+") do n = n + 1 end
  return n
end

--- The tokens a reply of `words` words needs, from the model's tokenizer
-- on a sample of the text it will be about: ceil(words x tokens per word x
-- 1.3) + 16 (1.3 for the words' spread; 16 for punctuation at the ends).
function M.max_tokens_for_words(words, model, sample)
  local per_word = 1.6
  local info = models.find(model)
  if type(sample) == "string" and sample:find("%S") then
    local ok, tok = pcall(function() return require("slm.tokenizer").get(info and info.tokenizer or "o200k_base") end)
    if ok and tok and not tok.estimate then
      local wc = M.word_count(sample)
      if wc > 0 then per_word = math.max(1, tok:count(sample) / wc) end
    end
  end
  return math.ceil(words * per_word * 1.3) + 16
end

------------------------------------------------------------------ text

-- Two-byte UTF-8 capitals -> their small letters: Latin-1 (À-Þ), Latin
-- Extended-A (Ā-ž, by its upper/lower pairs), Greek (Α-Ω; final ς as σ),
-- Cyrillic (Ѐ-Я, and Ґ-Ҿ of Ukrainian, Kazakh, ...); Ё/ё read as е.
local FOLD = {}
do
  local function utf8_2(cp) return string.char(0xC0 + math.floor(cp / 64), 0x80 + cp % 64) end
  local function pair(from, to, lower_of) for cp = from, to do FOLD[utf8_2(cp)] = utf8_2(lower_of(cp)) end end
  local function plus(d) return function(cp) return cp + d end end
  pair(0xC0, 0xDE, plus(32))
  FOLD[utf8_2(0xD7)] = nil -- the multiplication sign
  local function evens(a, b) for cp = a, b, 2 do FOLD[utf8_2(cp)] = utf8_2(cp + 1) end end
  evens(0x100, 0x12E); evens(0x132, 0x136); evens(0x139, 0x147); evens(0x14A, 0x176); evens(0x179, 0x17D)
  FOLD[utf8_2(0x178)] = utf8_2(0xFF)
  pair(0x391, 0x3A1, plus(32)); pair(0x3A3, 0x3A9, plus(32))
  FOLD[utf8_2(0x3C2)] = utf8_2(0x3C3)
  pair(0x400, 0x40F, plus(80)); pair(0x410, 0x42F, plus(32))
  evens(0x490, 0x4BE)
  FOLD[utf8_2(0x401)], FOLD[utf8_2(0x451)] = utf8_2(0x435), utf8_2(0x435)
end

--- Lowercase ASCII and the two-byte capitals of Latin-1, Latin
-- Extended-A, Greek and Cyrillic (UTF-8; Ё/ё read as е), for matching words.
function M.lower(s)
  s = s:lower()
  if s:find("[\195-\210]") then s = s:gsub("[\195-\210][\128-\191]", FOLD) end
  return s
end

-- Whether the character that ends just before byte i (before = true) or
-- starts at byte i is a letter or digit: ASCII ones, and the UTF-8 letters
-- of Latin-1, Latin Extended, Greek and Cyrillic (lead bytes C3-C9,
-- CE-CF, D0-D3).
local function letter_at(s, i, before)
  if i < 1 or i > #s then return false end
  local b = s:byte(i)
  if b < 0x80 then return (b >= 48 and b <= 57) or (b >= 65 and b <= 90) or (b >= 97 and b <= 122) end
  if before then
    while i > 1 and b >= 0x80 and b < 0xC0 do i = i - 1; b = s:byte(i) end
  end
  return (b >= 0xC3 and b <= 0xC9) or b == 0xCE or b == 0xCF or (b >= 0xD0 and b <= 0xD3)
end

--- The words of `words` (lowercased phrases) that occur in text as whole
-- words (case folded: Latin, Greek, Cyrillic): -> list (empty when none).
function M.find_words(text, words)
  local low = M.lower(text)
  local found = {}
  for _, w in ipairs(words) do
    local lw = M.lower(w)
    local i = 1
    while lw ~= "" do
      local a, b = low:find(lw, i, true)
      if not a then break end
      if not letter_at(low, a - 1, true) and not letter_at(low, b + 1, false) then
        found[#found + 1] = w
        break
      end
      i = a + 1
    end
  end
  return found
end

--- The text's language guess: "ru" when it has Cyrillic letters, else "en".
function M.language_of(s)
  return s:find("[\208\209][\128-\191]") and "ru" or "en"
end

local LANG_NAMES = { ru = "Russian", en = "English", de = "German", fr = "French", es = "Spanish" }
function M.language_name(code)
  return LANG_NAMES[code] or code
end

function M.join_lines(list) return concat(list, "\n") end

return M
