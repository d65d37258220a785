-- slm.generate: copy from a template, in a brand's voice, within a length.
--
--   local text, res = slm.generate(template, vars)
--   local res, err = slm.generate{ client = c, template = "Describe {{name}}: {{features}}", vars = {...},
--     tone = "warm, precise", brand = { name =, tone =, audience =, ["do"] = {...}, dont = {...},
--     banned = { "cheap", ... } }, max_words = 80, n = 1, language = "en", instructions = "...",
--     temperature = 0.7, model = ..., timeout = ... }
--   res: { text, texts (n > 1), flags (per text: { banned = {...}, too_long = true, cut = true }),
--          regenerated, error (the regeneration's failure), usage, cost, attempts, calls, latency, model }
--   local req = slm.generate.request{ ... }   -- the request it would send first, nothing sent
--
-- `{{var}}` in the template is replaced by vars.var (numbers as text); a
-- variable the template names but vars lacks raises, naming it.  A reply
-- that contains a word of brand.banned (whole words, case folded, Cyrillic
-- too) is regenerated once, with the words named; if it still contains
-- one it is returned with res.flags; if the regeneration call fails (a
-- budget run out, an error) the first texts, paid for, are returned as
-- they are, flagged, with res.error the failure.  brand's name, tone and
-- audience are strings, its do, dont and banned a string or a list of
-- strings (raises naming the field otherwise).  max_words bounds the reply through
-- max_tokens (from the model's tokenizer on the prompt's own words) and is
-- checked afterwards (flag too_long).
local models = require "slm.models"
local common = require "slm.tasks.common"

local type, pairs, ipairs, tostring, error, pcall, format, concat, min, next =
  type, pairs, ipairs, tostring, error, pcall, string.format, table.concat, math.min, next

local M = {}

local OPTIONS = {
  client = { common.is_client, "a slm.client" },
  template = { common.is_string, "a string" },
  vars = { common.is_table, "a table of name = value" },
  tone = { common.is_string, "a string" },
  brand = { common.is_table, "a table { name, tone, audience, do, dont, banned }" },
  max_words = { common.pos_int, "a positive integer" },
  n = { function(v) return common.pos_int(v) and v <= 16 end, "an integer from 1 to 16" },
  language = { common.nonempty_string, "a language code or name" },
  instructions = { common.is_string, "a string" },
  temperature = { function(v) return type(v) == "number" and v >= 0 and v <= 2 end, "a number from 0 to 2" },
  model = { common.nonempty_string, "a model name" },
  timeout = { common.number, "a number of seconds" },
}
M.OPTIONS = OPTIONS

--- Render "{{name}}" placeholders (spaces inside the braces allowed) from
-- vars; raises naming the first variable vars does not have.
function M.render(template, vars)
  vars = vars or {}
  return (template:gsub("{{%s*([%w_%.%-]+)%s*}}", function(name)
    local v = vars[name]
    if v == nil then error(format("slm.generate: template variable '%s' is missing from vars", name), 0) end
    if type(v) ~= "string" and type(v) ~= "number" and type(v) ~= "boolean" then
      error(format("slm.generate: template variable '%s' must be a string or a number, got %s", name, type(v)), 0)
    end
    return tostring(v)
  end))
end

-- brand's fields that the prompt and the banned-word check read: strings,
-- or (do, dont, banned) a string or a list of strings; other fields (a
-- tagline, ...) are the caller's.  Raises naming the field.
local BRAND_TEXT = { "name", "tone", "audience" }
local BRAND_LISTS = { "do", "dont", "banned" }
local function check_brand(b, level)
  if b == nil then return end
  for _, k in ipairs(BRAND_TEXT) do
    local v = b[k]
    if v ~= nil and type(v) ~= "string" and type(v) ~= "number" then
      error(format("slm.generate: brand.%s must be a string, got %s", k, type(v)), level + 1)
    end
  end
  for _, k in ipairs(BRAND_LISTS) do
    local v = b[k]
    if v ~= nil and type(v) ~= "string" then
      if type(v) ~= "table" then
        error(format("slm.generate: brand.%s must be a string or a list of strings, got %s", k, type(v)), level + 1)
      end
      local n = 0
      for key in pairs(v) do
        n = n + 1
        if type(key) ~= "number" or type(v[key]) ~= "string" then
          error(format("slm.generate: brand.%s must be a list of strings; its entry %s is a %s", k, tostring(key),
            type(v[key])), level + 1)
        end
      end
      if n ~= #v then error(format("slm.generate: brand.%s must be a list of strings (no holes)", k), level + 1) end
    end
  end
end

local function list(v)
  if type(v) == "string" then return { v } end
  return type(v) == "table" and v or {}
end

local function system_for(o, language, banned)
  local b = o.brand or {}
  local lines = { "You write marketing copy: product descriptions, announcements, replies."
    .. (b.name and (" You write for " .. tostring(b.name) .. ".") or "") }
  if b.tone or o.tone then lines[#lines + 1] = "Tone: " .. tostring(o.tone or b.tone) .. "." end
  if b.audience then lines[#lines + 1] = "Audience: " .. tostring(b.audience) .. "." end
  for _, d in ipairs(list(b["do"])) do lines[#lines + 1] = "Do: " .. tostring(d) end
  for _, d in ipairs(list(b.dont)) do lines[#lines + 1] = "Don't: " .. tostring(d) end
  if banned[1] then lines[#lines + 1] = "Never use these words: " .. concat(banned, ", ") .. "." end
  if o.max_words then lines[#lines + 1] = format("Write at most %d words.", o.max_words) end
  lines[#lines + 1] = "Write in " .. common.language_name(language) .. ". Reply with the text only, no preamble."
  if o.instructions then lines[#lines + 1] = o.instructions end
  return concat(lines, "\n")
end

-- The first request of a generation (model, messages, n, max_tokens,
-- temperature), and what run needs besides.
local function prepare(o, model)
  local prompt = M.render(o.template, o.vars)
  local language = o.language or common.language_of(prompt)
  local banned = list(o.brand and o.brand.banned)
  local n = o.n or 1
  local info = models.find(model)
  local max_tokens
  if o.max_words then
    max_tokens = common.max_tokens_for_words(o.max_words, model, prompt)
    if info and info.max_output then max_tokens = min(max_tokens, info.max_output) end
  end
  local system = system_for(o, language, banned)
  return { model = model, n = n > 1 and n or nil, max_tokens = max_tokens, temperature = o.temperature or 0.7,
    messages = { { role = "system", content = system }, { role = "user", content = prompt } } }, banned
end

local function run(o)
  local client = o.client or common.default_client()
  local model = o.model or client.model
  local ledger = common.ledger()
  local first, banned = prepare(o, model)
  local n = o.n or 1
  local system, prompt, max_tokens = first.messages[1].content, first.messages[2].content, first.max_tokens
  local function ask(count, reminder)
    local res, err = ledger:chat(client, {
      model = model, n = count > 1 and count or nil, max_tokens = max_tokens,
      temperature = first.temperature, timeout = o.timeout,
      messages = { { role = "system", content = system .. (reminder or "") }, { role = "user", content = prompt } },
    })
    if not res then return nil, err end
    local out = {}
    for i, ch in ipairs(res.choices) do out[i] = { text = ch.text, cut = ch.finish_reason == "length" } end
    if #out == 0 then out[1] = { text = res.text, cut = res.finish_reason == "length" } end
    return out
  end
  local texts, err = ask(n)
  if not texts then return ledger:fail(err) end
  -- a reply with a banned word is written again, once, with the words named
  local regenerated, regen_err = false, nil
  if banned[1] then
    local bad = {}
    for i, t in ipairs(texts) do
      if common.find_words(t.text, banned)[1] then bad[#bad + 1] = i end
    end
    if bad[1] then
      regenerated = true
      local found = {}
      for _, i in ipairs(bad) do
        for _, w in ipairs(common.find_words(texts[i].text, banned)) do found[w] = true end
      end
      local names = {}
      for w in pairs(found) do names[#names + 1] = w end
      table.sort(names)
      local again, err2 = ask(#bad, "\nYour previous text used " .. concat(names, ", ")
        .. ": those words are not allowed. Write it again without them.")
      -- the regeneration failing (a budget run out, an error) leaves the
      -- texts already paid for, flagged, with res.error saying why
      if again then
        for k, i in ipairs(bad) do if again[k] then texts[i] = again[k] end end
      else
        regenerated, regen_err = false, err2
      end
    end
  end
  local flags, any = {}, false
  for i, t in ipairs(texts) do
    local f = {}
    local b = banned[1] and common.find_words(t.text, banned) or {}
    if b[1] then f.banned = b end
    if o.max_words and common.word_count(t.text) > o.max_words then f.too_long = true end
    if t.cut then f.cut = true end
    if next(f) then flags[i] = f; any = true end
  end
  local res = ledger:into({ text = texts[1].text, model = model, regenerated = regenerated, error = regen_err })
  if n > 1 then
    res.texts = {}
    for i, t in ipairs(texts) do res.texts[i] = t.text end
    res.flags = any and flags or nil
  else
    res.flags = flags[1]
  end
  return res
end

--- slm.generate.request{ ... } -> the chat request the generation sends
-- first (model, messages, n, max_tokens, temperature), sending nothing:
-- for slm.route, slm.count or a cost estimate.  The model is opts.model,
-- else opts.client's (nil without either).
function M.request(o)
  common.check("generate", OPTIONS, o, 2)
  if type(o.template) ~= "string" then error("slm.generate: option 'template' is required (a string)", 2) end
  check_brand(o.brand, 2)
  local ok, req = pcall(prepare, o, o.model or (o.client and o.client.model))
  if not ok then error(req, 2) end
  return req
end

--- slm.generate(template, vars [, opts]) -> text (or texts for n > 1), res | nil, err
--- slm.generate{ ... } -> res | nil, err
function M.generate(a, vars, extra)
  if type(a) == "table" then
    common.check("generate", OPTIONS, a, 2)
    if type(a.template) ~= "string" then error("slm.generate: option 'template' is required (a string)", 2) end
    check_brand(a.brand, 2)
    M.render(a.template, a.vars) -- a missing variable raises here, in the caller
    return run(a)
  end
  if type(a) ~= "string" then error("slm.generate: expected a template or an options table, got " .. type(a), 2) end
  local o = { template = a, vars = vars }
  for k, v in pairs(extra or {}) do o[k] = v end
  common.check("generate", OPTIONS, o, 2)
  check_brand(o.brand, 2)
  local ok, e = pcall(M.render, o.template, o.vars)
  if not ok then error(e, 2) end
  local res, err = run(o)
  if not res then return nil, err end
  return res.texts or res.text, res
end

return setmetatable(M, { __call = function(_, ...) return M.generate(...) end })
