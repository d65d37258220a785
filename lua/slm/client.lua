-- slm.client: request building, retries, fallback, budgets, rate limits,
-- usage and cost.  Knows nothing of how bytes move (slm.transport.*) and
-- nothing of prompts (slm.tasks).
local core = require "slm.core"
local json = require "slm.json"
local errors = require "slm.errors"
local models = require "slm.models"
local retry = require "slm.retry"
local sched = require "slm.sched"

local type, pairs, ipairs, tostring, tonumber, setmetatable, error, pcall =
  type, pairs, ipairs, tostring, tonumber, setmetatable, error, pcall
local concat, now, format = table.concat, core.now, string.format
local null = json.null
local getenv = os.getenv

local VERSION = "0.1.0"

local M = { VERSION = VERSION }

local Client = {}
Client.__index = Client
Client.__name = "slm.Client"

local Response = {}
Response.__index = Response
Response.__name = "slm.Response"
function Response.__tostring(r) return r.text or "" end
M.Response = Response

-- API keys live here, not in the client table: they never show up in
-- tostring(client), a dump of the client, an error or a log line.
local secrets = setmetatable({}, { __mode = "k" })

-- Option name -> checker.  Unknown options and wrong types raise at once.
local function is_list_of_strings(v)
  if type(v) ~= "table" then return false end
  for i = 1, #v do if type(v[i]) ~= "string" then return false end end
  for k in pairs(v) do if type(k) ~= "number" then return false end end
  return true
end
local function is_header_map(v)
  if type(v) ~= "table" then return false end
  for k, x in pairs(v) do
    if type(k) ~= "string" or (type(x) ~= "string" and type(x) ~= "number") then return false end
    if k:find("[\r\n:]") or tostring(x):find("[\r\n]") then return false end
  end
  return true
end
local function positive(v) return type(v) == "number" and v > 0 end
local function nonneg_int(v) return type(v) == "number" and v >= 0 and v % 1 == 0 end
local function pos_int(v) return type(v) == "number" and v >= 1 and v % 1 == 0 end

local CLIENT_OPTIONS = {
  base_url = { function(v) return type(v) == "string" and v:match("^https?://") end, "an http(s) URL string" },
  api_key = { function(v) return type(v) == "string" end, "a string" },
  model = { function(v) return type(v) == "string" and v ~= "" end, "a model name string" },
  timeout = { positive, "a positive number of seconds" },
  connect_timeout = { positive, "a positive number of seconds" },
  stall_timeout = { positive, "a positive number of seconds" },
  max_retries = { nonneg_int, "a non-negative integer" },
  fallback = { is_list_of_strings, "a list of model names" },
  budget = { function(v) return type(v) == "table" and type(v.reserve) == "function" end, "a slm.budget" },
  max_concurrency = { pos_int, "a positive integer" },
  rpm = { positive, "a positive number (requests per minute)" },
  tpm = { positive, "a positive number (tokens per minute)" },
  headers = { is_header_map, "a table of header name -> string value" },
  organization = { function(v) return type(v) == "string" end, "a string" },
  project = { function(v) return type(v) == "string" end, "a string" },
  user_agent = { function(v) return type(v) == "string" end, "a string" },
  check_context = { function(v) return type(v) == "boolean" end, "a boolean" },
  max_body = { pos_int, "a positive integer (bytes)" },
  ca_file = { function(v) return type(v) == "string" and v ~= "" end, "a path string (PEM CA certificates)" },
  http_version = { function(v) return v == "1.1" or v == "2" end, '"1.1" or "2"' },
  transport = { function(v) return type(v) == "table" and type(v.open) == "function" end, "a transport module" },
}
M.OPTIONS = CLIENT_OPTIONS

-- Request options that are ours, not part of the chat-completions body.
local REQUEST_OPTIONS = {
  stream = { function(v) return type(v) == "boolean" end, "a boolean" },
  on_delta = { function(v) return type(v) == "function" end, "a function" },
  timeout = { positive, "a positive number of seconds" },
  budget = { function(v) return type(v) == "table" and type(v.reserve) == "function" end, "a slm.budget" },
  max_retries = { nonneg_int, "a non-negative integer" },
  fallback = { function(v) return v == false or is_list_of_strings(v) end, "a list of model names or false" },
  check_context = { function(v) return type(v) == "boolean" end, "a boolean" },
  headers = { is_header_map, "a table of header name -> string value" },
}

local function check_option(where, spec, k, v, level)
  local c = spec[k]
  if not c then error(format("%s: unknown option '%s'", where, tostring(k)), level + 1) end
  if not c[1](v) then
    error(format("%s: option '%s' must be %s, got %s", where, k, c[2], type(v)), level + 1)
  end
end

local function pick_transport()
  if ngx and ngx.socket and ngx.get_phase and ngx.get_phase() ~= "init" then
    local ok, t = pcall(require, "slm.transport.ngx")
    if ok then return t end
    -- libcurl would block the nginx worker: refuse rather than stall it
    error("slm.client: inside OpenResty lua-slm needs its cosocket transport "
      .. "(slm.transport.ngx), which this version does not have yet", 3)
  end
  return require "slm.transport.curl"
end

--- slm.client(opts) -> client
function M.new(opts)
  opts = opts or {}
  if type(opts) ~= "table" then error("slm.client: expected an options table, got " .. type(opts), 2) end
  for k, v in pairs(opts) do check_option("slm.client", CLIENT_OPTIONS, k, v, 2) end
  local base = opts.base_url or getenv("SLM_BASE_URL") or getenv("OPENAI_BASE_URL") or "https://api.openai.com/v1"
  base = base:gsub("/+$", "")
  local c = setmetatable({
    base_url = base,
    model = opts.model or getenv("SLM_MODEL") or "gpt-4o-mini",
    timeout = opts.timeout or 60,
    connect_timeout = opts.connect_timeout or 10,
    stall_timeout = opts.stall_timeout or 30,
    max_retries = opts.max_retries or 2,
    fallback = opts.fallback or {},
    budget = opts.budget,
    max_concurrency = opts.max_concurrency or 16,
    rpm = opts.rpm, tpm = opts.tpm,
    check_context = opts.check_context ~= false,
    max_body = opts.max_body or 64 * 1024 * 1024,
    ca_file = opts.ca_file, http_version = opts.http_version,
    transport = opts.transport or pick_transport(),
    user_agent = opts.user_agent or ("lua-slm/" .. VERSION),
    stats = { requests = 0, attempts = 0, prompt_tokens = 0, completion_tokens = 0, cost = 0, errors = 0 },
  }, Client)
  secrets[c] = opts.api_key or getenv("SLM_API_KEY") or getenv("OPENAI_API_KEY")
  c.sem = sched.semaphore(c.max_concurrency)
  local hdrs = {
    "Content-Type: application/json",
    "User-Agent: " .. c.user_agent,
  }
  if opts.organization then hdrs[#hdrs + 1] = "OpenAI-Organization: " .. opts.organization end
  if opts.project then hdrs[#hdrs + 1] = "OpenAI-Project: " .. opts.project end
  if opts.headers then
    local names = {}
    for k in pairs(opts.headers) do names[#names + 1] = k end
    table.sort(names)
    for _, k in ipairs(names) do hdrs[#hdrs + 1] = k .. ": " .. tostring(opts.headers[k]) end
  end
  c.header_list = hdrs
  if c.rpm then c.rpm_bucket = require("slm.ratelimit").new(c.rpm, 60) end
  if c.tpm then c.tpm_bucket = require("slm.ratelimit").new(c.tpm, 60) end
  return c
end

function Client:__tostring()
  local k = secrets[self]
  return format("slm.client(%s, model=%s, api_key=%s)", self.base_url, self.model,
    k and k ~= "" and "<redacted>" or "<none>")
end

function Client:has_api_key()
  local k = secrets[self]
  return k ~= nil and k ~= ""
end

-- Remove the API key from any text that might echo it (provider messages).
local function redact(self, s)
  local k = secrets[self]
  if type(s) ~= "string" or not k or #k < 4 then return s end
  local i = 1
  while true do
    local a, b = s:find(k, i, true)
    if not a then return s end
    s = s:sub(1, a - 1) .. "<redacted>" .. s:sub(b + 1)
    i = a + 10
  end
end

-- client -> its header lists (plain and streamed) with Authorization: built
-- once, kept out of the client table for the same reason as the key itself
local full_headers = setmetatable({}, { __mode = "k" })

local function request_headers(self, extra, stream)
  local lists = full_headers[self]
  if not lists then
    local own, k = self.header_list, secrets[self]
    lists = {}
    for _, accept in ipairs{ "application/json", "text/event-stream" } do
      local l = {}
      for i = 1, #own do l[i] = own[i] end
      l[#l + 1] = "Accept: " .. accept
      if k and k ~= "" then l[#l + 1] = "Authorization: Bearer " .. k end
      lists[#lists + 1] = l
    end
    full_headers[self] = lists
  end
  local base = lists[stream and 2 or 1]
  if not extra then return base end -- shared, never modified
  local h = {}
  for i = 1, #base do h[i] = base[i] end
  for i = 1, #extra do h[#h + 1] = extra[i] end
  return h
end

---------------------------------------------------------------------------
-- Responses and errors
---------------------------------------------------------------------------

local function nn(v) if v == null then return nil end return v end

local function message_text(content)
  content = nn(content)
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

-- Build a Response from a decoded non-streamed chat.completion.
local function response_from_json(obj)
  local choices = {}
  for i, ch in ipairs(obj.choices) do
    local msg = type(ch) == "table" and nn(ch.message) or nil
    if type(msg) ~= "table" then return nil, "choice " .. i .. " has no message" end
    local tcs = nn(msg.tool_calls)
    choices[#choices + 1] = {
      index = nn(ch.index) or (i - 1),
      text = message_text(msg.content),
      message = msg,
      tool_calls = type(tcs) == "table" and tcs or {},
      finish_reason = nn(ch.finish_reason),
      refusal = nn(msg.refusal),
    }
  end
  if choices[2] then table.sort(choices, function(a, b) return a.index < b.index end) end
  local first = choices[1]
  if not first then return nil, "reply has no choices" end
  local usage = nn(obj.usage)
  return setmetatable({
    id = nn(obj.id), model = nn(obj.model), created = nn(obj.created),
    system_fingerprint = nn(obj.system_fingerprint),
    text = first.text, message = first.message, tool_calls = first.tool_calls,
    finish_reason = first.finish_reason, refusal = first.refusal,
    usage = type(usage) == "table" and usage or nil, choices = choices, raw = obj,
  }, Response)
end
M.response_from_json = response_from_json

-- Decode an error body in OpenAI's shape; returns message, code, type, param.
local function parse_error_body(body)
  if type(body) ~= "string" or body == "" then return nil end
  local ok, obj = pcall(json.decode, body)
  if ok and type(obj) == "table" then
    local e = nn(obj.error)
    if type(e) == "table" then
      local code = nn(e.code)
      return nn(e.message), code ~= nil and tostring(code) or nil, nn(e.type), nn(e.param), e
    elseif type(e) == "string" then
      return e
    end
    if type(obj.message) == "string" then return obj.message end
  end
  local s = body:gsub("%s+", " ")
  if #s > 300 then s = s:sub(1, 300) .. "…" end
  return s
end

local function http_error(self, status, headers, body, model)
  local msg, code, etype, param, raw = parse_error_body(body)
  local kind = errors.kind_for_status(status, code)
  if status == 400 and not code and msg and msg:find("maximum context length", 1, true) then
    kind = "context_length"
  end
  return errors.new(kind, redact(self, msg or ("HTTP " .. status)), {
    status = status, code = code, type = etype, param = param, headers = headers,
    retry_after = retry.retry_after(headers), request_id = headers and headers["x-request-id"],
    model = model, body = raw,
  })
end

-- kinds reported by transports -> error kinds
local TRANSPORT_KIND = {
  timeout = "timeout", connect = "connect", broken = "connect", cancelled = "cancelled",
  protocol = "protocol", transport = "connect", memory = "protocol",
}

local function transport_error(self, kind, msg, model, got_reply)
  local k = TRANSPORT_KIND[kind] or "connect"
  local e = errors.new(k, redact(self, msg), { status = 0, model = model, transport_kind = kind })
  if kind == "broken" and got_reply then e.message = "connection broken mid-reply: " .. tostring(msg) end
  return e
end

---------------------------------------------------------------------------
-- Counting, budgets and limits (prompt estimate used before sending)
---------------------------------------------------------------------------

local count_mod -- slm.count, loaded lazily (it loads tokenizers)
local function prompt_tokens(body, model)
  if count_mod == nil then
    local ok, m = pcall(require, "slm.count")
    count_mod = ok and m or false
  end
  if count_mod then
    local ok, n, info = pcall(count_mod.count, body, model or body.model)
    if ok and n then return n, info end
  end
  -- conservative fallback: one token per 3 bytes of JSON
  local ok, s = pcall(json.encode, body.messages or {})
  return ok and math.ceil(#s / 3) or 0, { estimate = true }
end
M.prompt_tokens = prompt_tokens

---------------------------------------------------------------------------
-- One attempt, non-streamed
---------------------------------------------------------------------------

local function read_all(conn)
  local first = conn:read()
  if not first then return "" end
  local b = conn:read()
  if not b then return first end -- the usual case: the whole body at once
  local parts, n = { first, b }, 2
  while true do
    b = conn:read()
    if not b then break end
    n = n + 1
    parts[n] = b
  end
  return concat(parts, "", 1, n)
end

local function open_conn(self, payload, stream, timeout, extra)
  return self.transport.open{
    url = self.base_url .. "/chat/completions",
    method = "POST",
    headers = request_headers(self, extra, stream),
    body = payload,
    connect_timeout = self.connect_timeout,
    timeout = (not stream) and timeout or nil,
    first_byte_timeout = stream and timeout or nil,
    idle_timeout = stream and self.stall_timeout or nil,
    max_body = self.max_body,
    ca_file = self.ca_file,
    http_version = self.http_version,
  }
end

local function attempt_plain(self, payload, model, timeout, extra)
  local conn = open_conn(self, payload, false, timeout, extra)
  local status, headers, msg = conn:response()
  if not status then return nil, transport_error(self, headers, msg, model, false) end
  local body = read_all(conn)
  local ok, kind, m = conn:result()
  if not ok then return nil, transport_error(self, kind, m, model, true) end
  if status < 200 or status >= 300 then return nil, http_error(self, status, headers, body, model) end
  local dok, obj = pcall(json.decode, body)
  if not dok or type(obj) ~= "table" then
    return nil, errors.new("protocol", "reply is not valid JSON: " .. (body:sub(1, 120):gsub("%s+", " ")),
      { status = status, model = model, headers = headers })
  end
  if nn(obj.error) ~= nil then
    -- some gateways answer 200 with an error object
    local e = http_error(self, tonumber(type(obj.error) == "table" and obj.error.code) or 502, headers, body, model)
    e.status = status
    return nil, e
  end
  if type(obj.choices) ~= "table" then
    return nil, errors.new("protocol", "reply is not a chat completion (no 'choices')",
      { status = status, model = model, headers = headers })
  end
  local res, perr = response_from_json(obj)
  if not res then
    return nil, errors.new("protocol", "malformed chat completion: " .. perr, { status = status, model = model })
  end
  res.headers = headers
  res.request_id = headers["x-request-id"]
  return res
end

---------------------------------------------------------------------------
-- Streaming: a Stream object reads the SSE body incrementally.
---------------------------------------------------------------------------

local Stream = {}
Stream.__index = Stream
Stream.__name = "slm.Stream"
M.Stream = Stream

local function finish_response(self, res, ctx)
  res.attempts = ctx.attempts
  res.latency = now() - ctx.t0
  res.requested_model = ctx.model
  if res.usage then
    local provider_cost = tonumber(nn(res.usage.cost))
    if provider_cost then res.provider_cost = provider_cost end
    res.cost = models.cost(ctx.model, res.usage) or models.cost(res.model, res.usage)
      or provider_cost or 0
  else
    res.cost = 0
  end
  local st = self.stats
  if res.usage then
    st.prompt_tokens = st.prompt_tokens + (tonumber(res.usage.prompt_tokens) or 0)
    st.completion_tokens = st.completion_tokens + (tonumber(res.usage.completion_tokens) or 0)
  end
  st.cost = st.cost + res.cost
  return res
end

local function stream_partial(s)
  local r = s.acc:result()
  local res = setmetatable(r, Response)
  res.partial = true
  return finish_response(s.client, res, s.ctx)
end

-- Open the HTTP exchange for a stream attempt; returns true or nil, err.
local function stream_connect(s)
  local self, ctx = s.client, s.ctx
  local conn = open_conn(self, ctx.payload, true, ctx.timeout, ctx.headers)
  s.conn = conn
  local status, headers, msg = conn:response()
  if not status then return nil, transport_error(self, headers, msg, ctx.model, false) end
  s.headers = headers
  if status < 200 or status >= 300 then
    -- an HTTP error on a stream request is the usual JSON error body
    local body = read_all(conn)
    return nil, http_error(self, status, headers, body, ctx.model)
  end
  local ctype = headers["content-type"] or ""
  if ctype:find("application/json", 1, true) then
    -- the server ignored stream=true: take the whole reply
    local body = read_all(conn)
    local dok, obj = pcall(json.decode, body)
    if dok and type(obj) == "table" and type(obj.choices) == "table" then
      local res = response_from_json(obj)
      if res then s.whole = res; return true end
    end
    if dok and type(obj) == "table" and nn(obj.error) ~= nil then
      return nil, http_error(self, 502, headers, body, ctx.model)
    end
    return nil, errors.new("protocol", "stream reply is not an event stream", { status = status, model = ctx.model })
  end
  s.parser = core.sse_parser()
  s.acc = require("slm.accumulate").new()
  s.known = 0 -- chunk fields the accumulator has (parser:feed_chat)
  s.rbuf, s.rpos, s.evs = nil, nil, nil
  return true
end

-- The bytes of the body in slices of at most SLICE bytes: one read can hold
-- megabytes when the server outruns us, and feeding them at once would
-- queue thousands of deltas; slices keep that working set in cache, and let
-- the fast path start soon after the first chunk (see stream_feed).
local SLICE = 65536
local function stream_read(s)
  local buf, pos = s.rbuf, s.rpos
  if not buf then
    buf = s.conn:read()
    if buf == nil or #buf <= SLICE then return buf end
    pos = 1
  end
  local last = pos + SLICE - 1
  if last >= #buf then
    s.rbuf, s.rpos = nil, nil
    return buf:sub(pos)
  end
  s.rbuf, s.rpos = buf, last + 1
  return buf:sub(pos, last)
end

-- The chunk handed out with a fast-path delta (stream_feed) is decoded only
-- when the caller reads it: core's feed_chat makes it as
-- setmetatable({ __slm_raw = json }, LazyChunk), and the first read of any
-- field (or pairs() where __pairs works) decodes it in place and drops the
-- metatable, leaving a plain table equal to what json.decode returns.
local RAW = "__slm_raw"
local LazyChunk = {}
local function materialize(t)
  local raw = rawget(t, RAW)
  setmetatable(t, nil)
  t[RAW] = nil
  for k, v in pairs(json.decode(raw)) do t[k] = v end
  return t
end
LazyChunk.__index = function(t, k) return materialize(t)[k] end
LazyChunk.__newindex = function(t, k, v) materialize(t)[k] = v end
LazyChunk.__pairs = function(t) return next, materialize(t), nil end

-- Fold one SSE event (an event table) into the stream: returns true and,
-- for a chunk with choices, the delta to hand out (text, chunk); nil, err on
-- an in-stream error.
local function stream_event(s, ev)
  local data = ev.data
  if data == "[DONE]" then
    s.acc:done()
    s.saw_done = true
    return true
  end
  if ev.event == "error" then
    local msg, code, etype = parse_error_body(data)
    local e = errors.new(code and errors.kind_for_status(500, code) or "server", msg or "stream error event",
      { status = 200, code = code, type = etype, model = s.ctx.model })
    return nil, e
  end
  local ok, chunk = pcall(json.decode, data)
  if not ok or type(chunk) ~= "table" then
    return nil, errors.new("protocol", "stream chunk is not valid JSON: " .. data:sub(1, 120),
      { status = 200, model = s.ctx.model })
  end
  local text, serr = s.acc:add(chunk)
  local chs = chunk.choices
  if serr then
    local code = serr.code ~= nil and tostring(serr.code) or nil
    local kind = "server"
    local st = tonumber(serr.code) or tonumber(serr.status)
    if st and st >= 400 then kind = errors.kind_for_status(st, code) end
    if code == "context_length_exceeded" then kind = "context_length"
    elseif code == "rate_limit_exceeded" then kind = "rate_limit" end
    return nil, errors.new(kind, redact(s.client, serr.message or "error inside the stream"),
      { status = 200, code = code, type = serr.type, model = s.ctx.model })
  end
  if type(chs) == "table" and chs[1] ~= nil then
    for i = 1, #chs do
      local ch = chs[i]
      if type(ch) == "table" then
        if nn(ch.finish_reason) ~= nil then s.saw_finish = true end
        if not s.ttft then
          local d = nn(ch.delta)
          if type(d) == "table" and ((type(d.content) == "string" and d.content ~= "")
              or nn(d.tool_calls) ~= nil or (type(d.refusal) == "string" and d.refusal ~= "")) then
            s.ttft = now() - s.ctx.t0
          end
        end
      end
    end
    return true, text or "", chunk
  end
  return true
end

-- Fail the stream: record err with the partial response.
local function stream_fail(s, err)
  if s.conn then s.conn:cancel() end
  s.finished = true
  if s.acc then err.partial = stream_partial(s) end
  err.attempts = s.ctx.attempts
  s.err = err
  return nil
end

-- Retry the stream from scratch when nothing reached the caller yet.
local function stream_retry(s, err)
  local ctx = s.ctx
  if s.delivered or ctx.attempts > ctx.max_retries or not retry.should_retry(err) then
    return false
  end
  if s.conn then s.conn:cancel() end
  s.conn, s.parser, s.acc, s.queue, s.qhead, s.qtail = nil, nil, nil, {}, 1, 0
  if s.release then s.release() ; s.release = nil end
  sched.sleep(retry.delay(err, ctx.attempts - 1))
  return true
end

-- Feed one slice of the body.  core's feed_chat returns a pair per event:
-- (text, lazy chunk) for a plain content-only chunk of choice 0, which
-- needs no JSON decoding, or (false, event table) for any other event, which
-- goes through stream_event and is replaced in place by its delta (or by
-- false, false when it has none).  The pairs array then serves as the delta
-- queue (s.evs, read by Stream:next); the accumulator gets the texts of a
-- whole run of content chunks in one add_texts call.
local function stream_feed(s, bytes)
  local events, nslow, before = s.parser:feed_chat(bytes, s.known, LazyChunk)
  local ferr
  if not events then
    -- an oversized event: what completed before it is still delivered
    ferr = errors.new("protocol", nslow, { status = 200, model = s.ctx.model })
    events, nslow = before or {}, nil
  end
  local acc, n = s.acc, #events
  if not s.ttft then
    for i = 1, n, 2 do
      local text = events[i]
      if text and text ~= "" then
        s.ttft = now() - s.ctx.t0
        break
      end
    end
  end
  if nslow == 0 then
    if n > 0 then acc:add_texts(events, 1, n - 1) end
  else
    local from = 1 -- first content pair not yet in the accumulator
    for i = 1, n, 2 do
      if not events[i] then
        if from < i then acc:add_texts(events, from, i - 2) end
        from = i + 2
        local ok, text, chunk = stream_event(s, events[i + 1])
        if not ok then
          -- the deltas before it are still delivered before the error
          if not stream_retry(s, text) then
            stream_fail(s, text)
            s.evs, s.ei, s.en = events, 1, i - 1
          end
          return
        end
        events[i], events[i + 1] = text or false, chunk or false
        s.known = acc:known()
      end
    end
    if from < n then acc:add_texts(events, from, n - 1) end
  end
  if ferr and stream_retry(s, ferr) then return end
  s.evs, s.ei, s.en = events, 1, n
  if ferr then stream_fail(s, ferr) end
end

-- Pull the next delta: returns text, chunk; nil at the end (or on error).
function Stream:next()
  while true do
    local evs = self.evs
    if evs then
      local i, n = self.ei, self.en
      while i < n do
        local text = evs[i]
        i = i + 2
        if text then
          self.ei = i
          self.delivered = true
          return text, evs[i - 1]
        end
      end
      self.evs = nil
    end
    local q, h = self.queue, self.qhead
    if q[h] ~= nil then
      local text, chunk = q[h], q[h + 1]
      q[h], q[h + 1] = nil, nil
      self.qhead = h + 2
      self.delivered = true
      return text, chunk
    end
    if self.finished then return nil end
    if not self.conn then
      local ctx = self.ctx
      ctx.attempts = ctx.attempts + 1
      self.client.stats.attempts = self.client.stats.attempts + 1
      if not self.release then
        self.client.sem:acquire()
        self.release = function() self.client.sem:release() end
      end
      local ok, err = stream_connect(self)
      if not ok then
        if not stream_retry(self, err) then stream_fail(self, err) end
      elseif self.whole then
        -- non-streamed reply to a stream request: deliver it as one delta
        local res = self.whole
        self.result_res = res
        self.finished = true
        local t = self.qtail
        self.queue[t + 1] = res.text
        self.queue[t + 2] = res.raw
        self.qtail = t + 2
      end
    else
      local bytes = stream_read(self)
      if bytes then
        stream_feed(self, bytes)
      else
        -- end of body
        local ok, kind, msg = self.conn:result()
        local err
        if not ok then
          err = transport_error(self.client, kind, msg, self.ctx.model, true)
          if kind == "timeout" and msg then err.message = "stream " .. msg end
        elseif not self.saw_done and not self.saw_finish then
          err = errors.new("protocol", "stream ended before [DONE] or a finish_reason",
            { status = 200, model = self.ctx.model })
        end
        if err then
          if not stream_retry(self, err) then stream_fail(self, err) end
        else
          self.finished = true
          self.conn = nil
        end
      end
    end
  end
end

-- generic-for protocol: `for text, chunk in stream do ... end`
function Stream:__call() return self:next() end

--- Cancel the stream: the transfer stops at once; result() returns what
-- had arrived, as an error of kind "cancelled" with err.partial.
function Stream:close()
  if not self.finished then
    local e = errors.new("cancelled", "stream cancelled by the caller", { status = 0, model = self.ctx.model })
    stream_fail(self, e)
  end
  if self.release then self.release(); self.release = nil end
  if not self.settled then self:_settle() end
end
Stream.__close = Stream.close
Stream.__gc = Stream.close

function Stream:_settle()
  self.settled = true
  local ctx = self.ctx
  if self.release then self.release(); self.release = nil end
  local res = self.result_res
  if not res and not self.err and self.acc then
    res = finish_response(self.client, setmetatable(self.acc:result(), Response), ctx)
    res.ttft = self.ttft
    res.headers = self.headers
    self.result_res = res
  elseif res and not res.latency then
    finish_response(self.client, res, ctx)
  end
  local partial = self.err and self.err.partial
  local usage = res and res.usage or (partial and partial.usage)
  if ctx.settle then ctx.settle(usage, partial and partial.text) end
end

--- The final Response (after the loop), or nil, err.
function Stream:result()
  while self:next() ~= nil do end -- nil: finished, nothing left to hand out
  if not self.settled then self:_settle() end
  if self.err then return nil, self.err end
  return self.result_res
end

---------------------------------------------------------------------------
-- The public calls
---------------------------------------------------------------------------

local function split_request(req, level)
  if type(req) ~= "table" then
    error("slm: client:chat expects a request table, got " .. type(req), level + 1)
  end
  local body, opts = {}, {}
  for k, v in pairs(req) do
    if REQUEST_OPTIONS[k] then
      check_option("slm: client:chat", REQUEST_OPTIONS, k, v, level + 1)
      opts[k] = v
    else
      body[k] = v
    end
  end
  local msgs = body.messages
  if type(msgs) ~= "table" or msgs[1] == nil then
    error("slm: client:chat: 'messages' must be a non-empty list of messages", level + 1)
  end
  for i, m in ipairs(msgs) do
    if type(m) ~= "table" or type(m.role) ~= "string" then
      error(format("slm: client:chat: messages[%d] must be a table with a string 'role'", i), level + 1)
    end
  end
  if body.model ~= nil and type(body.model) ~= "string" then
    error("slm: client:chat: 'model' must be a string", level + 1)
  end
  if body.max_tokens ~= nil and not pos_int(body.max_tokens) then
    error("slm: client:chat: 'max_tokens' must be a positive integer", level + 1)
  end
  if opts.headers then
    local names, list = {}, {}
    for k in pairs(opts.headers) do names[#names + 1] = k end
    table.sort(names)
    for i, k in ipairs(names) do list[i] = k .. ": " .. tostring(opts.headers[k]) end
    opts.header_list = list
  end
  return body, opts
end

-- A byte-level BPE token covers at least one byte, so when the message
-- strings plus the per-message overhead plus max_tokens fit in the context
-- the exact count is not needed.  Images and tools (counted by formula, not
-- by bytes) always take the exact path.
local function cheap_fits(body, context)
  if body.tools ~= nil or body.functions ~= nil then return false end
  local n = 3 + (body.max_tokens or body.max_completion_tokens or 0)
  local msgs = body.messages
  for i = 1, #msgs do
    local m = msgs[i]
    n = n + 4
    for k, v in pairs(m) do
      local tv = type(v)
      if tv == "string" then
        n = n + #v
      elseif k == "tool_calls" and tv == "table" then
        local ok, js = pcall(json.encode, v)
        if not ok then return false end
        n = n + #js
      elseif tv == "table" then
        -- content parts: text only; anything else (images) counts exactly
        for j = 1, #v do
          local part = v[j]
          if type(part) ~= "table" or part.type ~= "text" or type(part.text) ~= "string" then return false end
          n = n + #part.text + 1
        end
      elseif v ~= null and tv ~= "number" and tv ~= "boolean" then
        return false
      end
    end
    if n > context then return false end
  end
  return n <= context
end

-- Check context and budget before anything is sent.  Returns a settle
-- function (to call with the real usage) or nil, err.
local function precheck(self, body, opts, model)
  local info = models.find(model)
  local budget = opts.budget or self.budget
  local check = opts.check_context
  if check == nil then check = self.check_context end
  if not budget and not (check and info and info.context) then return function() end end
  if not budget and cheap_fits(body, info.context) then return function() end end
  local prompt, cinfo = prompt_tokens(body, model)
  local max_out = body.max_tokens or body.max_completion_tokens or (info and info.max_output) or 4096
  if check and info and info.context then
    local need = prompt + (body.max_tokens or body.max_completion_tokens or 0)
    if need > info.context then
      return nil, errors.new("context_length", format(
        "request needs %d tokens (%d prompt%s + %d max_tokens) but %s has a context of %d",
        need, prompt, cinfo and cinfo.estimate and " (estimated)" or "",
        body.max_tokens or body.max_completion_tokens or 0, model, info.context),
        { status = 0, model = model, prompt_tokens = prompt, local_check = true })
    end
  end
  if not budget then return function() end end
  -- every choice of n > 1 can produce max_tokens
  local choices = tonumber(body.n) or 1
  if choices < 1 then choices = 1 end
  local worst_out = max_out * choices
  local worst_usage = { prompt_tokens = prompt, completion_tokens = worst_out, total_tokens = prompt + worst_out }
  local usd = models.cost(info or model, worst_usage)
  if not usd and budget.usd and budget.usd ~= math.huge then
    return nil, errors.new("budget", format("model %s has no price, so a USD budget cannot bound it "
      .. "(add its prices to slm.models, or use a token budget)", model), { status = 0, model = model })
  end
  local resv, berr = budget:reserve(usd or 0, prompt + worst_out, model)
  if not resv then
    berr.model = model
    return nil, berr
  end
  -- settle(usage, partial_text): with no usage (a broken or cancelled
  -- stream) charge the counted prompt plus the tokens of what arrived,
  -- since the provider bills them.
  return function(usage, partial_text)
    if not usage and partial_text then
      local completion = 0
      if partial_text ~= "" then
        local ok, tok = pcall(function() return require("slm.tokenizer").get(info and info.tokenizer or model) end)
        completion = ok and tok and tok:count(partial_text) or math.ceil(#partial_text / 4)
      end
      usage = { prompt_tokens = prompt, completion_tokens = completion, total_tokens = prompt + completion,
        estimated = true }
    end
    local real_usd = usage and models.cost(info or model, usage) or 0
    if usage and tonumber(nn(usage.cost)) and not usd then real_usd = tonumber(usage.cost) end
    budget:settle(resv, real_usd, usage and tonumber(usage.total_tokens) or 0)
  end
end

local function payload_for(body, model)
  body.model = model
  return json.encode(body)
end

local function fallback_ok(err)
  local k = err.kind
  return k == "rate_limit" or k == "server" or k == "timeout" or k == "connect" or k == "protocol"
    or k == "http" or k == "context_length" or k == "budget"
    or (k == "invalid_request" and (err.status == 404 or err.code == "model_not_found"))
end

local function rate_wait(self, tokens)
  if self.rpm_bucket then self.rpm_bucket:take(1) end
  if self.tpm_bucket then self.tpm_bucket:take(tokens or 1) end
end

-- Non-streamed call over one model with retries.
local function chat_model(self, body, opts, model, t0)
  local settle, perr = precheck(self, body, opts, model)
  if not settle then return nil, perr end
  local payload = payload_for(body, model)
  local max_retries = opts.max_retries or self.max_retries
  local timeout = opts.timeout or self.timeout
  local attempts = 0
  while true do
    attempts = attempts + 1
    self.stats.attempts = self.stats.attempts + 1
    if self.tpm_bucket or self.rpm_bucket then
      rate_wait(self, (body.max_tokens or 0) + math.ceil(#payload / 4))
    end
    self.sem:acquire()
    local ok, res, err = pcall(attempt_plain, self, payload, model, timeout, opts.header_list)
    self.sem:release()
    if not ok then settle(nil); error(res, 0) end
    if res then
      settle(res.usage)
      return finish_response(self, res, { attempts = attempts, t0 = t0, model = model })
    end
    err.attempts = attempts
    if attempts > max_retries or not retry.should_retry(err) then
      settle(nil)
      return nil, err
    end
    sched.sleep(retry.delay(err, attempts - 1))
  end
end

local function new_stream(self, body, opts, model, t0, settle)
  if type(body.stream_options) ~= "table" then
    body.stream_options = { include_usage = true }
  end
  body.stream = true
  local ctx = {
    model = model, payload = payload_for(body, model), attempts = 0,
    max_retries = opts.max_retries or self.max_retries,
    timeout = opts.timeout or self.timeout, t0 = t0, settle = settle,
    headers = opts.header_list,
  }
  return setmetatable({ client = self, ctx = ctx, queue = {}, qhead = 1, qtail = 0 }, Stream)
end

local function stream_model(self, body, opts, model, t0)
  local settle, perr = precheck(self, body, opts, model)
  if not settle then return nil, perr end
  local s = new_stream(self, body, opts, model, t0, settle)
  local on_delta = opts.on_delta
  while true do
    local text, chunk = s:next()
    if text == nil then break end
    if on_delta then
      local ok, r = pcall(on_delta, text, chunk)
      if not ok then
        s:close()
        error(r, 0)
      end
      if r == false then
        s:close()
        break
      end
    end
  end
  local res, err = s:result()
  if res then res.ttft = s.ttft end
  return res, err
end

--- client:chat(req) -> Response | nil, err
function Client:chat(req)
  local body, opts = split_request(req, 2)
  local t0 = now()
  self.stats.requests = self.stats.requests + 1
  local chain = { body.model or self.model }
  local fb = opts.fallback
  if fb == nil then fb = self.fallback end
  if fb then for i = 1, #fb do if fb[i] ~= chain[1] then chain[#chain + 1] = fb[i] end end end
  local errs = {}
  for i = 1, #chain do
    local res, err
    if opts.stream then
      res, err = stream_model(self, body, opts, chain[i], t0)
    else
      res, err = chat_model(self, body, opts, chain[i], t0)
    end
    if res then
      if i > 1 then res.fallback_errors = errs end
      return res
    end
    errs[#errs + 1] = err
    if err.kind == "cancelled" or not fallback_ok(err) or (err.partial and err.partial.text ~= "") then
      break
    end
  end
  local last = errs[#errs]
  if #errs > 1 then last.fallback_errors = errs end
  self.stats.errors = self.stats.errors + 1
  return nil, last
end

--- client:stream(req) -> Stream (iterate with `for text, chunk in s do`),
-- then s:result() -> Response | nil, err.  Fallback models are tried when
-- the first one fails before anything arrived.
function Client:stream(req)
  local body, opts = split_request(req, 2)
  if opts.on_delta then error("slm: client:stream: use the iterator, not 'on_delta'", 2) end
  local t0 = now()
  self.stats.requests = self.stats.requests + 1
  local model = body.model or self.model
  local settle, perr = precheck(self, body, opts, model)
  local s
  if not settle then
    s = setmetatable({ client = self, ctx = { model = model, attempts = 0, t0 = t0 },
      queue = {}, qhead = 1, qtail = 0, finished = true, err = perr, settled = true }, Stream)
  else
    s = new_stream(self, body, opts, model, t0, settle)
  end
  return s, nil, nil, s
end

M.Client = Client
return M
