-- slm.tasks.structured: one path for every task that wants JSON back.
--
--   local value, info = structured.ask(client, ledger, spec)   -- or nil, err
--
-- spec: { model, messages, schema (a JSON schema, slm.schema's subset),
--   name, max_tokens, temperature (0), logprobs, top_logprobs, mode, task,
--   timeout, fallback (the request's fallback models; nil: the client's) }
--
-- 1. How the model is asked: mode "json_schema" (OpenAI's structured
--    outputs, strict) where slm.models says the model has it
--    (`structured = "json_schema"`), else "json_object" (JSON mode, the
--    schema in the system message), or "none" (the schema in the prompt
--    only).  A schema whose top is not an object is wrapped in one
--    ({ result = ... }) and unwrapped, since both modes return objects.
-- 2. The reply is parsed leniently (code fences, prose around the JSON, a
--    trailing comma: slm.schema.parse_lenient) and validated against the
--    caller's schema.  In strict mode optional properties are sent as
--    nullable; their nulls are removed before validation.
-- 3. A reply cut by the output limit (finish_reason "length") is never
--    re-asked unchanged: the limit is raised once, within the model's
--    max_output, else the task fails with kind "length".
-- 4. An invalid reply gets ONE repair re-ask that feeds back the errors;
--    still invalid: kind "validation", err.errors (paths and messages),
--    err.raw (the reply).  A refusal is kind "validation" too, with
--    err.refusal.
-- Every call goes through the ledger (usage, cost, attempts summed).
local json = require "slm.json"
local models = require "slm.models"
local schema_mod = require "slm.schema"

local type, pairs, ipairs, tostring, format, concat, min, max, setmetatable =
  type, pairs, ipairs, tostring, string.format, table.concat, math.min, math.max, setmetatable
local null = json.null

local M = {}

-- schema table -> what is sent for it (the strict copy, the prompt text):
-- made once per schema a caller keeps using
local cache = setmetatable({}, { __mode = "k" })

--- How a model is asked for JSON: "json_schema" | "json_object" | "none".
function M.mode_for(model)
  local info = models.find(model)
  return info and info.structured or "json_object"
end

local BRANCHES = { "anyOf", "oneOf", "allOf" }

-- Does a schema have an optional property anywhere (strict mode sends it
-- as nullable, so its nulls are to be removed)?  Cycles through $ref stop.
local function has_optional(s, defs, seen)
  if type(s) ~= "table" or seen[s] then return false end
  seen[s] = true
  if s["$ref"] and defs then
    local name = s["$ref"]:match("^#/%$?%w+/(.+)$")
    if name and defs[name] then return has_optional(defs[name], defs, seen) end
  end
  if type(s.properties) == "table" then
    local req = {}
    for _, k in ipairs(s.required or {}) do req[k] = true end
    for k, ps in pairs(s.properties) do
      if not req[k] or has_optional(ps, defs, seen) then return true end
    end
  end
  if has_optional(s.items, defs, seen) then return true end
  for _, kw in ipairs(BRANCHES) do
    if type(s[kw]) == "table" then
      for _, b in ipairs(s[kw]) do if has_optional(b, defs, seen) then return true end end
    end
  end
  return false
end


local function is_object_schema(s)
  local t = s.type
  return t == "object" or (type(t) == "table" and #t == 1 and t[1] == "object")
end

local function format_errors(errs)
  local lines = {}
  for i, e in ipairs(errs) do
    if i > 12 then lines[#lines + 1] = format("- ... and %d more", #errs - 12); break end
    lines[i] = "- " .. tostring(e.path) .. ": " .. tostring(e.message)
  end
  return concat(lines, "\n")
end

--- Ask for JSON that matches spec.schema: -> value, info | nil, err.
-- info: { res = the last Response, raw = its text, repaired = bool,
--         raised_limit = bool, mode = "json_schema"|"json_object"|"none" }
function M.ask(client, ledger, spec)
  local model = spec.model
  local info = models.find(model)
  local s = spec.schema
  local wrapped = not is_object_schema(s)
  local send_schema = s
  if wrapped then
    local w = cache[s]
    if not w then
      w = { wrapper = { type = "object", properties = { result = s }, required = { "result" },
        additionalProperties = false, ["$defs"] = s["$defs"], definitions = s.definitions } }
      cache[s] = w
    end
    send_schema = w.wrapper
  end
  local mode = spec.mode or M.mode_for(model)
  local prepared = cache[send_schema]
  if not prepared then
    prepared = {}
    cache[send_schema] = prepared
  end
  -- the caller's schema compiled once (an edited schema table is not seen
  -- again: as with slm.schema.validate, pass a new table)
  local validator = spec.validator
  if not validator then
    validator = prepared.validator or schema_mod.compile(s)
    prepared.validator = validator
  end
  local messages = spec.messages
  local rf
  if mode == "json_schema" and prepared.strict == nil then
    -- a schema strict mode cannot express (a map, an object without
    -- properties, ...) is asked for in JSON mode instead
    prepared.strict = schema_mod.for_openai_strict(send_schema) or false
    local defs = send_schema["$defs"] or send_schema.definitions
    prepared.optional = has_optional(send_schema, defs, {})
  end
  if mode == "json_schema" and not prepared.strict then mode = "json_object" end
  if mode == "json_schema" then
    -- the same response_format every time for a schema and a name (the
    -- client reads it, never changes it)
    local name = spec.name or "result"
    prepared.rf = prepared.rf or {}
    rf = prepared.rf[name]
    if not rf then
      rf = { type = "json_schema", json_schema = { name = name, strict = true, schema = prepared.strict } }
      prepared.rf[name] = rf
    end
  else
    messages = {}
    for i, m in ipairs(spec.messages) do messages[i] = m end
    -- the schema goes in the system message (the first one, or a new one)
    prepared.prompt = prepared.prompt or ("Reply with only a JSON object that matches this JSON schema:\n```json\n"
      .. json.encode(send_schema) .. "\n```")
    local text = prepared.prompt
    if messages[1] and messages[1].role == "system" and type(messages[1].content) == "string" then
      messages[1] = { role = "system", content = messages[1].content .. "\n\n" .. text }
    else
      table.insert(messages, 1, { role = "system", content = text })
    end
    if mode == "json_object" then rf = { type = "json_object" } end
  end
  local limit = spec.max_tokens
  local ceiling = info and info.max_output
  local raised, repaired = false, false

  local function call(msgs)
    while true do
      local res, err = ledger:chat(client, {
        model = model, messages = msgs, response_format = rf, max_tokens = limit,
        temperature = spec.temperature or 0,
        logprobs = spec.logprobs or nil, top_logprobs = spec.logprobs and spec.top_logprobs or nil,
        timeout = spec.timeout, fallback = spec.fallback,
      })
      if not res then return nil, err end
      if res.finish_reason ~= "length" then return res end
      -- cut by the output limit: never asked again unchanged
      local cur = limit or ceiling
      if raised or not ceiling or not cur or cur >= ceiling then
        return nil, "length", res
      end
      limit = min(ceiling, max(cur * 2, cur + 256))
      raised = true
    end
  end

  local function check(res)
    if res.refusal then return nil, { { path = "$", message = "the model refused: " .. tostring(res.refusal) } } end
    local v, perr = schema_mod.parse_lenient(res.text or "")
    if v == nil then return nil, { { path = "$", message = "not JSON: " .. tostring(perr) } } end
    if mode == "json_schema" and prepared.optional then
      v = schema_mod.from_openai_strict(send_schema, v)
    end
    if wrapped then
      if type(v) ~= "table" or v.result == nil then
        return nil, { { path = "$", message = "expected an object with the value in 'result'" } }
      end
      v = v.result
    end
    local ok, errs = validator:validate(v)
    if not ok then return nil, errs end
    return v
  end

  local res, err, cut = call(messages)
  if not res then
    if err == "length" then
      return ledger:fail("length", format("the reply was cut by the output limit (%s tokens) and %s",
        tostring(limit or ceiling), raised and "was cut again after the limit was raised"
        or "the limit cannot be raised further"), { status = 0, model = model, raw = cut.text })
    end
    return ledger:fail(err)
  end
  local v, errs = check(res)
  if v == nil then
    -- one repair re-ask, with the errors
    repaired = true
    local again = {}
    for i, m in ipairs(messages) do again[i] = m end
    again[#again + 1] = { role = "assistant", content = res.text or "" }
    again[#again + 1] = { role = "user", content = "Your reply does not match the schema:\n"
      .. format_errors(errs) .. "\nReply with only the corrected JSON object." }
    local res2, err2, cut2 = call(again)
    if not res2 then
      if err2 == "length" then
        return ledger:fail("length", "the repaired reply was cut by the output limit",
          { status = 0, model = model, raw = cut2.text })
      end
      return ledger:fail(err2)
    end
    res = res2
    v, errs = check(res)
    if v == nil then
      return ledger:fail("validation", "the reply does not match the schema after one repair: "
        .. tostring(errs[1].path) .. ": " .. tostring(errs[1].message),
        { status = 0, model = model, errors = errs, raw = res.text, refusal = res.refusal })
    end
  end
  return v, { res = res, raw = res.text, repaired = repaired, raised_limit = raised, mode = mode }
end

return M
