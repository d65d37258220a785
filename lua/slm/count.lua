--- slm.count: prompt tokens of a chat request, and fitting a conversation
-- into a model's context.
--
--   local n, info = slm.count(messages_or_request, model)
--   local msgs, dropped = slm.fit(messages, { model = m, reserve = 500 })
--
-- What is counted depends on the model's `format` (slm.models):
--
-- "openai" (o200k_base / cl100k_base models), OpenAI's published rule (the
--   "How to count tokens with tiktoken" cookbook):
--     3 tokens per message, the tokens of its string fields (role, content,
--     name, tool_call_id), +1 per `name`, +3 priming the reply;
--     content parts: text parts as text, image parts per slm.image;
--     an assistant's tool_calls: the tokens of each call's function name
--     and arguments + TOOL_CALL_OVERHEAD (3) per call: OpenAI publishes no
--     rule for these, the 3 stands for the call's framing tokens;
--     tools: the cookbook's num_tokens_for_tools (func_init 7 for o200k,
--     10 for cl100k; prop_init 3, prop_key 3, enum_init -3, enum_item 3,
--     func_end 12; "name:description" per function and
--     "key:type:description" per property, a trailing "." dropped from
--     descriptions).  Nested object properties are counted with the same
--     rule, one level down (the cookbook only covers flat ones).
-- "chatml" (Hermes 3): the ChatML text the model sees (see M.render_chatml),
--   counted with the model's tokenizer, every ChatML marker
--   (<|begin_of_text|>, <|im_start|>, <|im_end|>) one token.  Without
--   Meta's Llama 3 vocabulary the llama3 tokenizer estimates and so does
--   the count (info.estimate).
--
-- response_format (json_schema): the tokens of its name, description and
--   schema as JSON + RESPONSE_FORMAT_OVERHEAD (8), in both formats (no
--   published rule; see response_format_tokens).
--
-- info: { estimate = bool, reason = string (why it is an estimate),
--   model = name, tokenizer = encoding, format = "openai"|"chatml",
--   messages = n, tools = n, images = n (image tokens), image_count = n,
--   response_format = n (tokens of a json_schema response format),
--   warnings = { strings } (nil when none),
--   min = n (the least it can count: the context check's), max = n (the
--   most: a budget's worst case), unbounded = n (content parts not counted) }.
--
-- Content parts without text (input_audio, file, ...) are not counted:
-- they add 0 to the count and to info.min, the count is an estimate, and
-- info.max is the model's context window (the largest prompt a model
-- accepts), or nil when that is not known.
--
-- An unknown model is counted as gpt-4o-mini would count it (o200k_base,
-- the "openai" format) with info.estimate = true and info.reason saying
-- so.  A model that slm.models does not list but whose name the tokenizer
-- knows (e.g. "gpt-4o") is counted exactly with that encoding.
--
-- Pure Lua over slm.tokenizer; 5.1/LuaJIT and 5.4 alike.
local models = require "slm.models"
local errors = require "slm.errors"
local image = require "slm.image"
local T = require "slm.tokenizer"

local type, pairs, ipairs, tostring, tonumber, error, pcall, next =
  type, pairs, ipairs, tostring, tonumber, error, pcall, next
local concat, format, floor, min = table.concat, string.format, math.floor, math.min

local M = {}

M.TOKENS_PER_MESSAGE = 3
M.TOKENS_PER_NAME = 1
M.REPLY_PRIMING = 3
M.TOOL_CALL_OVERHEAD = 3
M.DEFAULT_MODEL = "gpt-4o-mini"

-- The cookbook's constants for tool definitions, per encoding.
M.TOOL_COSTS = {
  o200k_base = { func_init = 7, prop_init = 3, prop_key = 3, enum_init = -3, enum_item = 3, func_end = 12 },
  cl100k_base = { func_init = 10, prop_init = 3, prop_key = 3, enum_init = -3, enum_item = 3, func_end = 12 },
}

-- nil or JSON null (lua-cjson's null is a light userdata)
local function is_null(v)
  return v == nil or type(v) == "userdata"
end

local function str(v)
  if type(v) == "string" then return v end
  return nil
end

------------------------------------------------------------------ model

-- What to count with for a model name: a context table.
local function context_for(model)
  local ctx = { model = model, warnings = nil, estimate = false }
  local entry, canonical = models.find(model)
  local enc = entry and entry.tokenizer
  if entry then ctx.model = canonical or model end
  if not enc then
    local ok, e = pcall(T.encoding_for, model)
    if ok and e then enc = e end
  end
  if not enc or not T.encodings[enc] then
    enc = "o200k_base"
    ctx.estimate = true
    ctx.reason = format("unknown model '%s': counted as %s would be (o200k_base)", tostring(model),
      M.DEFAULT_MODEL)
  end
  ctx.entry = entry
  ctx.tokenizer_name = enc
  ctx.format = (entry and entry.format) or (enc == "llama3" and "chatml" or "openai")
  ctx.tok = T.get(enc)
  if ctx.tok.estimate then
    ctx.estimate = true
    ctx.reason = ctx.reason or format("the %s vocabulary is not loaded: its count is an estimate", enc)
  end
  ctx.image_costs = {
    base = entry and entry.image_base or image.BASE,
    tile = entry and entry.image_tile or image.TILE,
  }
  ctx.vision = entry and entry.vision
  return ctx
end

local function warn(ctx, msg)
  local w = ctx.warnings
  if not w then w = {}; ctx.warnings = w end
  for i = 1, #w do if w[i] == msg then return end end
  w[#w + 1] = msg
end

local function ntok(ctx, s)
  if s == nil or s == "" then return 0 end
  return ctx.tok:count(s)
end

------------------------------------------------------------------ parts

-- Tokens of one image part; adds to ctx's image tallies.
local function image_part(ctx, p)
  local iu = p.image_url
  local url, detail
  if type(iu) == "table" then url, detail = str(iu.url), str(iu.detail)
  else url = str(iu) end
  if p.type == "input_image" then detail = detail or str(p.detail) end
  local n, info = image.count(url, detail, ctx.image_costs)
  if info.estimate then
    ctx.estimate = true
    ctx.reason = ctx.reason or ("image of unknown size counted as the worst case: " .. tostring(info.reason))
    if info.code == "not_regular" or info.code == "unreadable" then
      warn(ctx, "a local image could not be read (counted as the worst case): " .. tostring(info.reason))
    end
  end
  if ctx.vision == false then
    warn(ctx, format("model '%s' does not take images: the image was counted but the request will likely fail",
      tostring(ctx.model)))
  end
  ctx.images = ctx.images + n
  ctx.images_min = ctx.images_min + info.min
  ctx.image_count = ctx.image_count + 1
  return n
end

-- Text of content (string or parts) and the image tokens in it.
-- Returns a list of text pieces (each counted on its own) and image tokens.
local function content_pieces(ctx, content)
  if is_null(content) then return {}, 0 end
  if type(content) == "string" then return { content }, 0 end
  if type(content) ~= "table" then
    error(format("slm.count: message content must be a string or a list of parts, got %s", type(content)), 4)
  end
  local texts, img = {}, 0
  for i, p in ipairs(content) do
    if type(p) == "string" then
      texts[#texts + 1] = p
    elseif type(p) ~= "table" then
      error(format("slm.count: content part %d must be a table, got %s", i, type(p)), 4)
    elseif p.type == "image_url" or p.type == "input_image" or (p.type == nil and p.image_url) then
      img = img + image_part(ctx, p)
    elseif type(p.text) == "string" then
      texts[#texts + 1] = p.text
    elseif type(p.refusal) == "string" then
      texts[#texts + 1] = p.refusal
    else
      -- audio (input_audio), a file (file) or any other part without text:
      -- no rule counts it, so it is 0 in the count and in info.min (the
      -- context check passes it) and has no bound of its own: info.max,
      -- the budget's worst case, is the model's whole context
      ctx.estimate = true
      ctx.unbounded = ctx.unbounded + 1
      ctx.reason = ctx.reason or format("content part of type '%s' not counted (a budget reserves the "
        .. "model's whole context for it)", tostring(p.type))
      warn(ctx, format("content part of type '%s' is not counted", tostring(p.type)))
    end
  end
  return texts, img
end

local function tool_call_fn(tc)
  local f = type(tc) == "table" and tc["function"]
  if type(f) ~= "table" then return nil end
  local args = f.arguments
  if type(args) == "table" then args = M.pyjson(args) end
  return str(f.name) or "", str(args) or ""
end

------------------------------------------------------------------ openai

local function openai_message(ctx, m)
  local n = M.TOKENS_PER_MESSAGE
  n = n + ntok(ctx, str(m.role))
  local texts, img = content_pieces(ctx, m.content)
  for i = 1, #texts do n = n + ntok(ctx, texts[i]) end
  n = n + img
  local name = str(m.name)
  if name then n = n + ntok(ctx, name) + M.TOKENS_PER_NAME end
  n = n + ntok(ctx, str(m.tool_call_id))
  local tcs = m.tool_calls
  if type(tcs) == "table" then
    for _, tc in ipairs(tcs) do
      local fname, args = tool_call_fn(tc)
      if fname then
        n = n + ntok(ctx, fname) + ntok(ctx, args) + M.TOOL_CALL_OVERHEAD
      end
    end
  end
  -- legacy function_call on an assistant message
  if type(m.function_call) == "table" then
    n = n + ntok(ctx, str(m.function_call.name)) + ntok(ctx, str(m.function_call.arguments))
      + M.TOOL_CALL_OVERHEAD
  end
  return n
end

local function strip_dot(s)
  if s:sub(-1) == "." then return s:sub(1, -2) end
  return s
end

local function type_text(t)
  if type(t) == "string" then return t end
  if type(t) == "table" then
    local parts = {}
    for _, x in ipairs(t) do if type(x) == "string" then parts[#parts + 1] = x end end
    return concat(parts, ",")
  end
  return ""
end

-- Sorted keys, so the count never depends on pairs() order (it is a sum,
-- so order changes nothing but readability of traces).
local function sorted_keys(t)
  local ks = {}
  for k in pairs(t) do if type(k) == "string" then ks[#ks + 1] = k end end
  table.sort(ks)
  return ks
end

local pyjson -- below

-- Schema keywords the cookbook's formula leaves out (OpenAI renders them
-- in its tool prompt in a form it does not publish: pydantic's anyOf for
-- an Optional field, $defs and $ref, an array's items without properties).
-- For the budget's worst case they count as their JSON (M.pyjson); the
-- least count (info.min, the context check) leaves them out, and the count
-- is flagged an estimate.
local UNCOUNTED = { "anyOf", "oneOf", "allOf", "not", "$ref", "$defs", "definitions", "const", "default",
  "format", "pattern", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
  "minLength", "maxLength", "minItems", "maxItems", "uniqueItems", "examples", "prefixItems" }

local function uncounted_tokens(ctx, t, whole)
  local rest
  if whole then
    rest = t
  else
    for _, k in ipairs(UNCOUNTED) do
      if t[k] ~= nil then
        rest = rest or {}
        rest[k] = t[k]
      end
    end
  end
  if rest == nil then return 0 end
  local n = ntok(ctx, pyjson(rest))
  ctx.uncounted = (ctx.uncounted or 0) + n
  ctx.estimate = true
  ctx.reason = ctx.reason or "tool schema parts outside the published formula (anyOf, $defs, $ref, items, ...) "
    .. "were counted as their JSON"
  return n
end

-- `path` holds the property tables being counted above this one: a schema
-- that contains itself (a Lua table cycle; JSON cannot carry one, so such
-- a request fails to encode anyway) is counted once per level, not until
-- the stack overflows.
local function count_properties(ctx, c, props, path)
  if type(props) ~= "table" or next(props) == nil then return 0 end
  path = path or {}
  if path[props] then
    warn(ctx, "a tool schema is cyclic (it contains itself): each repetition was counted once")
    return 0
  end
  path[props] = true
  local n = c.prop_init
  for _, key in ipairs(sorted_keys(props)) do
    local p = props[key]
    if type(p) == "table" then
      n = n + c.prop_key
      if type(p.enum) == "table" then
        n = n + c.enum_init
        for _, item in ipairs(p.enum) do
          n = n + c.enum_item + ntok(ctx, tostring(item))
        end
      end
      local desc = strip_dot(str(p.description) or "")
      n = n + ntok(ctx, key .. ":" .. type_text(p.type) .. ":" .. desc)
      if type(p.properties) == "table" then n = n + count_properties(ctx, c, p.properties, path) end
      local items = p.items
      if type(items) == "table" and type(items.properties) == "table" then
        n = n + count_properties(ctx, c, items.properties, path) + uncounted_tokens(ctx, items)
      elseif type(items) == "table" then
        n = n + uncounted_tokens(ctx, items, true) -- an array of strings, of enums, ...: none of it counted
      end
      n = n + uncounted_tokens(ctx, p)
    end
  end
  path[props] = nil
  return n
end

-- The function definitions of a request: tools (type "function") and the
-- legacy `functions` list.
local function functions_of(ctx, req)
  local fns = {}
  if type(req.tools) == "table" then
    for i, t in ipairs(req.tools) do
      if type(t) ~= "table" then error(format("slm.count: tools[%d] must be a table", i), 4) end
      local f = t["function"]
      if type(f) == "table" then
        fns[#fns + 1] = f
      else
        warn(ctx, format("tool of type '%s' is not counted", tostring(t.type)))
        ctx.estimate = true
        ctx.reason = ctx.reason or "a tool that is not a function was not counted"
      end
    end
  end
  if type(req.functions) == "table" then
    for _, f in ipairs(req.functions) do if type(f) == "table" then fns[#fns + 1] = f end end
  end
  return fns
end

local function openai_tools(ctx, fns)
  if #fns == 0 then return 0 end
  local c = M.TOOL_COSTS[ctx.tokenizer_name] or M.TOOL_COSTS.o200k_base
  local n = 0
  for _, f in ipairs(fns) do
    n = n + c.func_init
    local desc = strip_dot(str(f.description) or "")
    n = n + ntok(ctx, (str(f.name) or "") .. ":" .. desc)
    local params = f.parameters
    if type(params) == "table" then
      n = n + count_properties(ctx, c, params.properties) + uncounted_tokens(ctx, params)
    end
  end
  return n + c.func_end
end

------------------------------------------------------------------ chatml

-- ChatML markers: one token each in Hermes 3's vocabulary.
M.CHATML = { bos = "<|begin_of_text|>", start = "<|im_start|>", finish = "<|im_end|>" }

-- JSON as Python's json.dumps writes it (", " and ": " separators), keys
-- sorted so that a count never depends on the order of pairs().  A table
-- with t[1] is an array; an empty table is {}.
local ESC = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t",
  ["\b"] = "\\b", ["\f"] = "\\f" }
local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return ESC[c] or format("\\u%04x", c:byte())
  end) .. '"'
end

-- `path` holds the tables being written above v: a table that contains
-- itself (JSON cannot carry one) is written as null where it recurs, so a
-- cycle costs one pass, not 2^64 of them.
function pyjson(v, depth, path)
  depth = (depth or 0) + 1
  if depth > 64 then return "null" end
  local tv = type(v)
  if tv == "string" then return json_string(v) end
  if tv == "number" then
    if v % 1 == 0 and v > -1e15 and v < 1e15 then return format("%d", v) end
    return format("%.14g", v)
  end
  if tv == "boolean" then return tostring(v) end
  if tv ~= "table" then return "null" end
  path = path or {}
  if path[v] then return "null" end
  path[v] = true
  local out
  if v[1] ~= nil then
    local parts = {}
    for i = 1, #v do parts[i] = pyjson(v[i], depth, path) end
    out = "[" .. concat(parts, ", ") .. "]"
  else
    local ks = {}
    for k in pairs(v) do ks[#ks + 1] = tostring(k) end
    table.sort(ks)
    local parts = {}
    for i, k in ipairs(ks) do
      local x = v[k]
      if x == nil then x = v[tonumber(k)] end
      parts[i] = pyjson(k, depth, path) .. ": " .. pyjson(x, depth, path)
    end
    out = "{" .. concat(parts, ", ") .. "}"
  end
  path[v] = nil
  return out
end
M.pyjson = pyjson

--- The system text Hermes 3 puts before a conversation that has tools
-- (the shape of its tool-use chat template, shortened): the tools as one
-- JSON list inside <tools></tools>.
function M.hermes_tools_text(tools)
  return "You are a function calling AI model. You are provided with function signatures within "
    .. "<tools></tools> XML tags. You may call one or more functions to assist with the user query. "
    .. "Don't make assumptions about what values to plug into functions. Here are the available tools: "
    .. "<tools> " .. pyjson(tools) .. " </tools> "
    .. "For each function call return a json object with function name and arguments within "
    .. "<tool_call></tool_call> XML tags as follows:\n<tool_call>\n"
    .. "{\"name\": <function-name>, \"arguments\": <args-dict>}\n</tool_call>"
end

-- Body text of one message in ChatML (between "<|im_start|>role\n" and
-- "<|im_end|>"); image tokens separately.
local function chatml_body(ctx, m)
  local texts, img = content_pieces(ctx, m.content)
  local body = concat(texts, "\n")
  local tcs = m.tool_calls
  if type(tcs) == "table" then
    local calls = {}
    for _, tc in ipairs(tcs) do
      local fname, args = tool_call_fn(tc)
      if fname then
        if args == "" then args = "{}" end
        calls[#calls + 1] = "<tool_call>\n{\"name\": \"" .. fname .. "\", \"arguments\": " .. args .. "}\n</tool_call>"
      end
    end
    if #calls > 0 then
      body = (body ~= "" and (body .. "\n") or "") .. concat(calls, "\n")
    end
  end
  if m.role == "tool" then
    body = "<tool_response>\n" .. body .. "\n</tool_response>"
  end
  return body, img
end

--- The ChatML text of a conversation as Hermes 3 sees it:
--   <|begin_of_text|>
--   [<|im_start|>system\n<tools text><|im_end|>\n]          -- when tools
--   <|im_start|>{role}\n{content}<|im_end|>\n               -- per message
--   <|im_start|>assistant\n                                  -- priming
-- Tool calls of an assistant message are appended to its content as
-- <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>; a "tool"
-- message's content is wrapped in <tool_response>\n...\n</tool_response>.
-- Text parts of a message are joined with "\n"; images are not text.
function M.render_chatml(messages, tools)
  local ctx = { images = 0, images_min = 0, image_count = 0, unbounded = 0, image_costs = {}, model = "?" }
  local C = M.CHATML
  local out = { C.bos }
  if type(tools) == "table" and tools[1] ~= nil then
    out[#out + 1] = C.start .. "system\n" .. M.hermes_tools_text(tools) .. C.finish .. "\n"
  end
  for _, m in ipairs(messages) do
    local body = chatml_body(ctx, m)
    out[#out + 1] = C.start .. tostring(m.role) .. "\n" .. body .. C.finish .. "\n"
  end
  out[#out + 1] = C.start .. "assistant\n"
  return concat(out)
end

-- Tokens of ChatML text: markers one token each, the text between them
-- counted piece by piece (BPE never merges across a special token).
local function chatml_tokens(ctx, s)
  local C = M.CHATML
  local n, i, len = 0, 1, #s
  while i <= len do
    local a, b = s:find("<|", i, true)
    local marker
    while a do
      local t = s:sub(a, a + 16)
      if t:sub(1, #C.start) == C.start then marker = C.start
      elseif t:sub(1, #C.finish) == C.finish then marker = C.finish
      elseif t:sub(1, #C.bos) == C.bos then marker = C.bos end
      if marker then break end
      a, b = s:find("<|", b + 1, true)
    end
    if not a then
      n = n + ntok(ctx, s:sub(i))
      break
    end
    n = n + ntok(ctx, s:sub(i, a - 1)) + 1
    i = a + #marker
  end
  return n
end
M.chatml_tokens = function(tok, s) return chatml_tokens({ tok = tok }, s) end

local function chatml_message(ctx, m)
  local body, img = chatml_body(ctx, m)
  local C = M.CHATML
  return chatml_tokens(ctx, C.start .. tostring(m.role) .. "\n" .. body .. C.finish .. "\n") + img
end

local function chatml_fixed(ctx, fns)
  local C = M.CHATML
  local n = 1 + chatml_tokens(ctx, C.start .. "assistant\n") -- BOS + priming
  local tools = 0
  if #fns > 0 then
    local list = {}
    for i, f in ipairs(fns) do list[i] = { type = "function", ["function"] = f } end
    tools = chatml_tokens(ctx, C.start .. "system\n" .. M.hermes_tools_text(list) .. C.finish .. "\n")
  end
  return n, tools
end

------------------------------------------------------------------ response formats

-- A json_schema response format goes into the prompt as well (the model is
-- told the schema), but OpenAI publishes no rule for its tokens.  It is
-- counted as the tokens of its name, its description and its schema
-- written as JSON (M.pyjson) + RESPONSE_FORMAT_OVERHEAD for the framing,
-- in both formats: never less than the schema's own text.  "text" and
-- "json_object" formats add nothing.
M.RESPONSE_FORMAT_OVERHEAD = 8

local function response_format_tokens(ctx, rf)
  if is_null(rf) then return 0 end
  if type(rf) ~= "table" then
    error(format("slm.count: request.response_format must be a table, got %s", type(rf)), 3)
  end
  local js = rf.json_schema
  if rf.type ~= "json_schema" or type(js) ~= "table" then return 0 end
  local n = M.RESPONSE_FORMAT_OVERHEAD + ntok(ctx, str(js.name)) + ntok(ctx, str(js.description))
  if type(js.schema) == "table" then n = n + ntok(ctx, pyjson(js.schema)) end
  return n
end

------------------------------------------------------------------ public

local function split_args(x, model, fname)
  if type(x) ~= "table" then
    error(format("%s: expected a list of messages or a request table, got %s", fname, type(x)), 3)
  end
  if model ~= nil and type(model) ~= "string" then
    error(format("%s: model must be a string, got %s", fname, type(model)), 3)
  end
  local req, msgs
  if x.messages ~= nil then
    req, msgs = x, x.messages
    if type(msgs) ~= "table" then error(fname .. ": request.messages must be a list", 3) end
  else
    req, msgs = {}, x
  end
  for i, m in ipairs(msgs) do
    if type(m) ~= "table" then
      error(format("%s: messages[%d] must be a table, got %s", fname, i, type(m)), 3)
    end
  end
  local name = model or (type(req.model) == "string" and req.model) or M.DEFAULT_MODEL
  return req, msgs, name
end

local function new_ctx(name)
  local ctx = context_for(name)
  ctx.images, ctx.images_min, ctx.image_count, ctx.uncounted, ctx.unbounded = 0, 0, 0, 0, 0
  return ctx
end

local function message_tokens(ctx, m)
  if ctx.format == "chatml" then return chatml_message(ctx, m) end
  return openai_message(ctx, m)
end

-- Fixed part of a request: priming (+ BOS) and tools.
local function fixed_tokens(ctx, req)
  local fns = functions_of(ctx, req)
  if ctx.format == "chatml" then return chatml_fixed(ctx, fns) end
  return M.REPLY_PRIMING, openai_tools(ctx, fns)
end

-- The most a request can count: the count itself (images of unknown size
-- at their largest), or, with parts that are not counted (audio, files),
-- the model's context window, the largest prompt it accepts (the count
-- when that is larger); nil when the model's context is not known.
local function max_of(ctx, total)
  if ctx.unbounded == 0 then return total end
  local context = ctx.entry and tonumber(ctx.entry.context)
  if not context then return nil end
  return total > context and total or context
end

local function info_of(ctx, nmsg, ntools, total)
  return {
    estimate = ctx.estimate, reason = ctx.reason, model = ctx.model, tokenizer = ctx.tokenizer_name,
    format = ctx.format, messages = nmsg, tools = ntools, images = ctx.images,
    image_count = ctx.image_count, warnings = ctx.warnings,
    -- the least the request can count: images of unknown size at one tile
    -- and the schema parts outside the formula left out
    min = total - ctx.images + ctx.images_min - (ctx.uncounted or 0),
    -- the most it can count (the budget's worst case) and the content
    -- parts with no bound of their own behind it
    max = max_of(ctx, total), unbounded = ctx.unbounded,
  }
end

--- slm.count(messages_or_request, model) -> n, info
-- Prompt tokens of a list of messages or a request table (messages,
-- tools/functions, model).  The model argument wins over request.model;
-- with neither, gpt-4o-mini.  Raises on misuse (not a table, a message
-- that is not a table).
function M.count(x, model)
  local req, msgs, name = split_args(x, model, "slm.count")
  local ctx = new_ctx(name)
  local nmsg = 0
  for _, m in ipairs(msgs) do nmsg = nmsg + message_tokens(ctx, m) end
  local fixed, ntools = fixed_tokens(ctx, req)
  local nrf = response_format_tokens(ctx, req.response_format)
  local total = nmsg + fixed + ntools + nrf
  local info = info_of(ctx, nmsg, ntools, total)
  info.response_format = nrf
  return total, info
end

------------------------------------------------------------------ fit

-- Units of a conversation: an assistant message with tool_calls and the
-- tool messages that follow it form one unit; every other message is a
-- unit of its own.  Returns a list of { first, last }.
local function units_of(msgs)
  local units, i, n = {}, 1, #msgs
  while i <= n do
    local m = msgs[i]
    local j = i
    if m.role == "assistant" and type(m.tool_calls) == "table" and m.tool_calls[1] ~= nil then
      while j + 1 <= n and msgs[j + 1].role == "tool" do j = j + 1 end
    end
    units[#units + 1] = { first = i, last = j }
    i = j + 1
  end
  return units
end

--- slm.fit(messages, opts) -> messages, dropped | nil, err
-- A new list that fits the model's context minus a reserve for the reply:
-- every system message and the last user message are kept; other
-- messages are dropped oldest first until the rest fits, an assistant
-- message with tool_calls always together with the tool results that
-- follow it.  `dropped` is the list of dropped messages, in their order.
-- opts: model (default gpt-4o-mini), reserve (tokens kept for the reply;
-- default opts.max_tokens, else the model's max_output capped at a
-- quarter of its context), max_tokens, tools (counted as part of the
-- prompt), context (overrides the model's).
-- When the kept messages alone do not fit: nil, err (kind
-- "context_length").
function M.fit(messages, opts)
  if type(messages) ~= "table" then
    error("slm.fit: expected a list of messages, got " .. type(messages), 2)
  end
  if opts ~= nil and type(opts) ~= "table" then error("slm.fit: opts must be a table", 2) end
  opts = opts or {}
  for k in pairs(opts) do
    if k ~= "model" and k ~= "reserve" and k ~= "max_tokens" and k ~= "tools" and k ~= "context" then
      error(format("slm.fit: unknown option '%s'", tostring(k)), 2)
    end
  end
  local name = opts.model or M.DEFAULT_MODEL
  if type(name) ~= "string" then error("slm.fit: option 'model' must be a string", 2) end
  for i, m in ipairs(messages) do
    if type(m) ~= "table" then error(format("slm.fit: messages[%d] must be a table, got %s", i, type(m)), 2) end
  end
  local entry = models.find(name)
  local context = opts.context or (entry and entry.context)
  if type(context) ~= "number" then
    error(format("slm.fit: the context of model '%s' is not known (give opts.context)", name), 2)
  end
  local reserve = opts.reserve or opts.max_tokens
  if reserve == nil then
    local mo = entry and entry.max_output
    reserve = mo and min(mo, floor(context / 4)) or floor(context / 4)
  end
  if type(reserve) ~= "number" or reserve < 0 then error("slm.fit: option 'reserve' must be a number >= 0", 2) end
  local limit = context - reserve

  local ctx = new_ctx(name)
  local fixed, ntools = fixed_tokens(ctx, { tools = opts.tools })
  local cost = {}
  for i, m in ipairs(messages) do cost[i] = message_tokens(ctx, m) end
  local n = #messages

  local last_user = nil
  for i = n, 1, -1 do
    if messages[i].role == "user" then last_user = i; break end
  end
  local units = units_of(messages)
  local keep = {}
  local total = fixed + ntools
  for i = 1, n do keep[i] = true; total = total + cost[i] end

  local function pinned(u)
    for i = u.first, u.last do
      local r = messages[i].role
      if r == "system" or r == "developer" or i == last_user then return true end
    end
    return false
  end

  local k = 1
  while total > limit and k <= #units do
    local u = units[k]
    if not pinned(u) then
      for i = u.first, u.last do keep[i] = false; total = total - cost[i] end
    end
    k = k + 1
  end
  if total > limit then
    return nil, errors.new("context_length", format(
      "the messages that must be kept need %d tokens but %s leaves %d (context %d - reserve %d)",
      total, name, limit, context, reserve),
      { status = 0, model = name, prompt_tokens = total, context = context, reserve = reserve })
  end
  local out, dropped = {}, {}
  for i = 1, n do
    if keep[i] then out[#out + 1] = messages[i] else dropped[#dropped + 1] = messages[i] end
  end
  return out, dropped
end

return M
