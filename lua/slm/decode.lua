-- slm.decode: what a provider sends back, made into lua-slm's Responses and
-- Errors.  One constructor for provider errors (HTTP error bodies, errors
-- inside a 200 reply, `event: error` and in-stream error chunks, llama.cpp's
-- `error:` lines), one table of the ways servers say "context too long",
-- and the untrusted numbers (usage, cost) checked before anything counts
-- them.  Used by the plain and the streamed paths alike.
local json = require "slm.json"
local errors = require "slm.errors"
local retry = require "slm.retry"
local redact = require "slm.redact"

local type, pairs, ipairs, next, tostring, tonumber, setmetatable, pcall =
  type, pairs, ipairs, next, tostring, tonumber, setmetatable, pcall
local concat, sort, floor, huge = table.concat, table.sort, math.floor, math.huge
local null = json.null

local M = {}

local Response = {}
Response.__index = Response
Response.__name = "slm.Response"
function Response.__tostring(r) return r.text or "" end
M.Response = Response

local function nn(v) if v == null then return nil end return v end
M.nn = nn

-- An integer from a JSON number (lua-cjson decodes every number as a float),
-- or nil when it is not an integral finite number.
local tointeger = math.tointeger or function(x)
  if x == floor(x) and x > -2 ^ 53 and x < 2 ^ 53 then return x end
end
local function int(v)
  if type(v) ~= "number" or v ~= v or v == huge or v == -huge then return nil end
  return tointeger(v)
end
M.int = int

-- A provider's error code keeps its type: 400 (not 400.0), "rate_limit_exceeded".
local function code_of(v)
  v = nn(v)
  if type(v) == "number" then return int(v) or v end
  if type(v) == "string" then return v end
  return nil
end

------------------------------------------------------------------ kinds

--- How servers say a request does not fit the context: codes/types, and
-- phrases of their messages (lowercased).  One table, so that fallback can
-- move to a bigger model whatever the server.
M.CONTEXT = {
  codes = {
    context_length_exceeded = true,     -- OpenAI
    exceed_context_size_error = true,   -- llama.cpp's llama-server (error type)
  },
  phrases = {
    "maximum context length",           -- OpenAI's message, vLLM, many gateways
    "exceeds the available context size", -- llama.cpp
    "context length exceeded",
    "exceeds the context window",
  },
}

local function is_context(code, etype, message)
  local C = M.CONTEXT
  if (type(code) == "string" and C.codes[code]) or (type(etype) == "string" and C.codes[etype]) then
    return true
  end
  if type(message) == "string" then
    local m = message:lower()
    for _, p in ipairs(C.phrases) do
      if m:find(p, 1, true) then return true end
    end
  end
  return false
end

--- The kind of a provider's error: its HTTP status, code, type and message.
function M.kind(status, code, etype, message)
  if status == 401 or status == 403 then return "auth" end
  if status == 429 then return "rate_limit" end
  if (status >= 400 or status == 0) and is_context(code, etype, message) then return "context_length" end
  if status == 400 or status == 404 or status == 422 then return "invalid_request" end
  if status >= 500 then return "server" end
  return "http"
end

------------------------------------------------------------------ errors

local MAX_MESSAGE = 2000 -- bytes of a provider's message kept in err.message

--- One error of the provider's.  `status` is the HTTP status (200 for an
-- error inside a successful reply or stream); `payload` the body text or
-- an already decoded table; `set` the client's secrets.  The kind comes
-- from the status, or for an error inside a 200 reply from a numeric code
-- (>= 400) the error carries (else "server"), and the context table.
function M.provider_error(status, payload, headers, model, set)
  local obj, text = payload, nil
  if type(payload) == "string" then
    text = payload
    local ok, v = pcall(json.decode, payload)
    obj = ok and v or nil
  end
  local e, message, code, etype, param
  if type(obj) == "table" then
    e = nn(obj.error)
    if type(e) == "string" then
      message, e = e, nil
    elseif type(e) ~= "table" then
      -- llama.cpp's `error:` lines and some gateways: the fields at the top
      e = (obj.message ~= nil or obj.code ~= nil) and obj or nil
    end
    if e then
      message = nn(e.message)
      code, etype, param = code_of(e.code), nn(e.type), nn(e.param)
      if type(message) ~= "string" then message = message ~= nil and tostring(message) or nil end
      if type(etype) ~= "string" then etype = nil end
    end
    if not message and type(obj.message) == "string" then message = obj.message end
  end
  local detail
  if message then
    message = redact.utf8(redact.string(message, set))
    if #message > MAX_MESSAGE then message = redact.snippet(message, MAX_MESSAGE, set) end
  elseif text and text:find("%S") then
    detail = redact.snippet(text, 300, set)
  end
  local st = status
  if st < 300 then -- a 2xx reply carrying an error: its own code, else 500
    local n = type(code) == "number" and code or tonumber(e and nn(e.status))
    st = (n and n >= 400 and n < 600) and floor(n) or 500
  end
  local kind = M.kind(st, code, etype, message)
  return errors.new(kind, message or (status >= 300 and "HTTP " .. status .. (detail and ": " .. detail or "")
    or detail or "error reported by the server"), {
    status = status, code = code, type = etype, param = param, headers = headers,
    retry_after = retry.retry_after(headers),
    request_id = headers and headers["x-request-id"], model = model,
    body = type(obj) == "table" and obj or nil,
  })
end

--- An error of the runtime (kind: timeout, connect, cancelled, protocol).
function M.transport_error(kind, message, model, set)
  return errors.new(errors.KINDS[kind] and kind or "connect", redact.snippet(tostring(message or kind), 600, set),
    { status = 0, model = model })
end

--- A 2xx reply that is not what was asked for.
function M.protocol_error(what, body, status, headers, model, set)
  local msg = what
  if type(body) == "string" then msg = msg .. ": " .. (body == "" and "(empty body)" or redact.snippet(body, 120, set)) end
  return errors.new("protocol", msg, { status = status or 0, model = model, headers = headers })
end

------------------------------------------------------------------ usage

M.MAX_TOKENS_FACTOR = 10   -- a count above 10x the model's context is absurd ...
M.MAX_TOKENS_UNKNOWN = 1e8 -- ... or above 100 million when the context is unknown
M.MAX_COST = 1000          -- a provider-reported cost above $1,000 for one request is absurd

local function count_ok(v, limit)
  if type(v) ~= "number" or not (v >= 0 and v <= limit) then return nil end
  return tointeger(v)
end

local DETAILS = { "prompt_tokens_details", "completion_tokens_details" }

--- The provider's usage, checked: every count a non-negative integer no
-- larger than the limit (see above), total = prompt + completion; cached
-- tokens within the prompt; no more completion tokens than max_completion
-- (the request's max_tokens x n, when it set one); a reported cost finite, >= 0 and <= MAX_COST.
-- Returns usage (a fresh table of Lua integers), problem (nil, or what was
-- wrong: the counts it names are nil and the caller counts them itself).
function M.usage(raw, context, max_completion)
  if type(raw) ~= "table" then return nil end
  local limit = context and context * M.MAX_TOKENS_FACTOR or M.MAX_TOKENS_UNKNOWN
  local p, c = count_ok(raw.prompt_tokens, limit), count_ok(raw.completion_tokens, limit)
  -- more output than the request allowed (max_tokens x n) cannot have been produced
  if c and max_completion and c > max_completion then c = nil end
  local u = { prompt_tokens = p, completion_tokens = c }
  local problems
  local function bad(name, v)
    if v == null then v = nil end
    problems = problems or {}
    problems[#problems + 1] = name .. " = " .. tostring(v)
  end
  if not p then bad("prompt_tokens", raw.prompt_tokens) end
  if not c then bad("completion_tokens", raw.completion_tokens) end
  if p and c then
    u.total_tokens = p + c
    local total = raw.total_tokens
    if total ~= nil and total ~= null and tointeger(total) ~= p + c and count_ok(total, limit * 2) == nil then
      bad("total_tokens", total)
    end
  end
  -- the details: every valid count is kept; cached tokens within the prompt
  for i = 1, 2 do
    local k = DETAILS[i]
    local d = raw[k]
    if type(d) == "table" then
      local out
      for name, v in pairs(d) do
        local n = count_ok(v, limit)
        if n then
          out = out or {}
          out[name] = n
        end
      end
      u[k] = out
    end
  end
  local pd = u.prompt_tokens_details
  if pd and pd.cached_tokens and p and pd.cached_tokens > p then
    bad("prompt_tokens_details.cached_tokens", pd.cached_tokens)
    pd.cached_tokens = nil
  end
  local cost = raw.cost
  if cost ~= nil and cost ~= null then
    if type(cost) == "number" and cost >= 0 and cost <= M.MAX_COST then
      u.cost = cost
    else
      bad("cost", cost)
    end
  end
  return u, problems and concat(problems, ", ") or nil
end

------------------------------------------------------------------ responses

local function message_text(content)
  if type(content) == "string" then return content end
  if type(content) == "table" then -- content parts
    local parts = {}
    for _, p in ipairs(content) do
      if type(p) == "table" and type(p.text) == "string" then parts[#parts + 1] = p.text end
    end
    return concat(parts)
  end
  return ""
end

-- A copy of a reply's message without JSON nulls at its top level.
local function clean_message(msg)
  local m = {}
  for k, v in pairs(msg) do
    if v ~= null then m[k] = v end
  end
  if type(m.tool_calls) ~= "table" then m.tool_calls = nil end
  if m.role == nil then m.role = "assistant" end
  return m
end

local function by_index(a, b) return a.index < b.index end

--- A Response from a decoded chat.completion (obj.choices is a table; an
-- empty list, which Azure sends when a content filter took every choice,
-- gives a Response with no choices and text "").  -> res | nil, why
function M.response(obj)
  local list = obj.choices
  local choices, first = {}, nil
  -- an object ({"0": {...}}) is not the list it must be; an empty one
  -- cannot be told from [] once decoded
  if list[1] == nil and next(list) ~= nil then return nil, "'choices' is not a list" end
  for i = 1, #list do
    local ch = list[i]
    local msg = type(ch) == "table" and ch.message
    if type(msg) ~= "table" then return nil, "choice " .. i .. " has no message" end
    local m = clean_message(msg)
    local content = m.content
    local lp, index, fr = ch.logprobs, ch.index, ch.finish_reason
    if lp == null or type(lp) ~= "table" then lp = nil end
    if type(fr) ~= "string" then fr = nil end
    if type(m.refusal) ~= "string" then m.refusal = nil end
    if type(m.role) ~= "string" then m.role = "assistant" end
    local c = {
      index = type(index) == "number" and tointeger(index) or (i - 1),
      text = type(content) == "string" and content or message_text(content),
      message = m,
      tool_calls = m.tool_calls or {},
      finish_reason = fr,
      refusal = m.refusal,
      logprobs = lp,
    }
    choices[i] = c
  end
  if choices[2] then sort(choices, by_index) end
  first = choices[1]
  local id, model, created, fp = obj.id, obj.model, obj.created, obj.system_fingerprint
  local usage = obj.usage
  -- fields of the wrong type (a hostile or broken server) are left out
  return setmetatable({
    id = type(id) == "string" and id or nil, model = type(model) == "string" and model ~= "" and model or nil,
    created = int(created),
    system_fingerprint = type(fp) == "string" and fp or nil,
    text = first and first.text or "",
    message = first and first.message or { role = "assistant" },
    tool_calls = first and first.tool_calls or {},
    finish_reason = first and first.finish_reason, refusal = first and first.refusal,
    logprobs = first and first.logprobs,
    choices = choices, raw = obj, raw_usage = usage ~= null and usage or nil,
    -- set by the pipeline; here so that the table is made at its size
    usage = false, cost = false, attempts = 0, latency = 0, requested_model = false, headers = false,
    request_id = false,
  }, Response)
end

--- A Response from what a stream accumulated (slm.accumulate's result).
function M.stream_response(r)
  r.raw_usage = r.usage
  r.usage = nil
  if r.created then r.created = int(r.created) end
  return setmetatable(r, Response)
end

return M
