-- tests/upstream/sim.lua: an OpenAI-compatible chat-completions simulator
-- for lua-nginx-module (content_by_lua). Deterministic replies derived from
-- the request (see mockmodel.lua), failure scenarios chosen per request
-- with the X-Sim-Scenario header or a "sim:<directives>" model name, and
-- counters for tests (GET /__sim/stats). Documented in README.md.
--
-- Runs in one nginx worker: the record of the last request lives in this
-- module; counters live in the `sim` shared dict.

local cjson = require "cjson.safe"
local mock = require "mockmodel"
local scenarios = require "scenarios"

local ngx = ngx
local byte, sub, find, rep, gsub = string.byte, string.sub, string.find, string.rep, string.gsub
local concat, ceil, floor, tonumber, tostring, type, ipairs, pairs =
  table.concat, math.ceil, math.floor, tonumber, tostring, type, ipairs, pairs
local encode, decode, null = cjson.encode, cjson.decode, cjson.null

local M = {}

local raw_reply, echo_key_error, llama_error, filtered_stream -- defined below

local CREATED = 1700000000          -- fixed, so replies are reproducible
local FINGERPRINT = "fp_sim"
local REFUSAL = "I'm sorry, but I can't help with that request."
local BOM = "\239\187\191"
local PIECE = 4                      -- bytes per streamed content piece
local BATCH_BYTES = 65536            -- chunks=N: bytes per write

local repo_root = "."
local dict                           -- ngx.shared.sim
local last_request                   -- { method, uri, headers, body, raw_body }
local replay_cache = {}

function M.init(opts)
  repo_root = opts and opts.root or repo_root
end

local function shared()
  if not dict then dict = ngx.shared.sim end
  return dict
end

-- Counters ------------------------------------------------------------------

-- max_in_flight must stay right with several workers (launch.lua's
-- `workers`), and the shared dict has no compare-and-set: a get-then-set
-- could lower the maximum another worker has just raised. So every level
-- in_flight reaches is marked ("lvl:<n>", added once): in_flight moves in
-- steps of one, so the highest level marked is the maximum.
local function mark_level(d, n)
  if n > 0 then d:add("lvl:" .. n, true) end
end

local function enter(ctx)
  local d = shared()
  d:incr("requests", 1, 0)
  -- the connections chat requests came on (HTTP/2 streams share one)
  d:add("c:" .. ngx.var.connection, true)
  mark_level(d, d:incr("in_flight", 1, 0))
  ctx.sim_in_flight = true
end

-- Idempotent: called on every way out (normal end, 444, abort, error via
-- the log phase); only the first call counts.
local function leave(ctx)
  if ctx.sim_in_flight then
    ctx.sim_in_flight = false
    shared():incr("in_flight", -1, 0)
  end
end

local function mark_aborted(ctx)
  if not ctx.sim_aborted then
    ctx.sim_aborted = true
    shared():incr("aborted", 1, 0)
  end
  leave(ctx)
end

-- The client went away: stop here.
local function client_gone()
  mark_aborted(ngx.ctx)
  return ngx.exit(444)
end

local function on_abort()
  mark_aborted(ngx.ctx)
  return ngx.exit(499)
end

-- Output ----------------------------------------------------------------------

local function sleep_ms(ms)
  ms = tonumber(ms)
  if ms and ms > 0 then ngx.sleep(ms / 1000) end
end

local function out(s)
  local ok = ngx.print(s)
  if not ok then return client_gone() end
  ok = ngx.flush(true)
  if not ok then return client_gone() end
end

-- A whole reply. With body_delay (ms) the headers go first, the body later.
local function respond(status, ctype, body, headers, body_delay)
  ngx.status = status
  ngx.header["Content-Type"] = ctype
  if headers then
    for k, v in pairs(headers) do ngx.header[k] = v end
  end
  ngx.header["Content-Length"] = #body
  if body_delay then
    if not ngx.send_headers() or not ngx.flush(true) then return client_gone() end
    sleep_ms(body_delay)
  end
  local ok = ngx.print(body)
  if not ok then return client_gone() end
end

local function send_json(status, body, headers)
  return respond(status, "application/json", body, headers)
end

-- Errors --------------------------------------------------------------------

local function error_body(message, etype, code, param)
  return encode({ error = {
    message = message, type = etype or null, param = param or null, code = code or null,
  } })
end

-- mask "sk-test-bad-key" as "sk-test-*******key", like OpenAI does
local function mask_key(auth)
  local key = type(auth) == "string" and auth:match("^[Bb]earer%s+(.+)$") or nil
  if not key or key == "" then return "<none>" end
  if #key <= 8 then return rep("*", #key) end
  return sub(key, 1, 7) .. rep("*", #key - 10 > 0 and #key - 10 or 1) .. sub(key, -3)
end

local STATUS_ERRORS = {
  [400] = { "invalid_request_error", "invalid_request", "Invalid request: the request body could not be processed." },
  [401] = { "invalid_request_error", "invalid_api_key", nil },
  [402] = { "insufficient_credits", "insufficient_credits",
    "Insufficient credits. Add more credits to your account to continue." },
  [403] = { "request_forbidden", "unsupported_country_region_territory",
    "Country, region, or territory not supported." },
  [404] = { "invalid_request_error", "model_not_found", nil },
  [408] = { "timeout", "request_timeout", "Request timed out." },
  [409] = { "conflict_error", "conflict", "The request conflicts with the current state of the resource." },
  [413] = { "invalid_request_error", "request_too_large", "Request too large." },
  [422] = { "invalid_request_error", "unprocessable_entity", "Unprocessable entity: the request was well-formed but could not be followed." },
  [429] = { "requests", "rate_limit_exceeded", nil },
  [500] = { "server_error", "server_error", "The server had an error while processing your request. Sorry about that!" },
  [502] = { "server_error", "bad_gateway", "Bad gateway." },
  [503] = { "server_error", "service_unavailable", "The engine is currently overloaded, please try again later." },
  [504] = { "server_error", "gateway_timeout", "Gateway timeout." },
}

-- The error reply for a `status=` directive. `sc` may override code,
-- type and message (code=..., type=..., message=...).
local function scenario_error(status, sc, req, info)
  local model = type(req) == "table" and type(req.model) == "string" and req.model or "gpt-4o-mini"
  local spec = STATUS_ERRORS[status]
  local etype, code, message, param
  if spec then
    etype, code, message = spec[1], spec[2], spec[3]
  else
    etype = status >= 500 and "server_error" or "api_error"
    code = nil
    message = "HTTP " .. status .. " (simulated)."
  end
  if status == 401 then
    message = ("Incorrect API key provided: %s. You can find your API key in your account settings.")
      :format(mask_key(ngx.var.http_authorization))
  elseif status == 404 then
    message = ("The model `%s` does not exist or you do not have access to it."):format(model)
  elseif status == 429 then
    message = ("Rate limit reached for %s in organization org-sim on requests per min (RPM): "
      .. "Limit 500, Used 500, Requested 1. Please try again in %s.")
      :format(model, sc.retry_after_ms and (sc.retry_after_ms .. "ms") or ((sc.retry_after or "1") .. "s"))
  end
  if sc.code then code = sc.code end
  if sc.type then etype = sc.type end
  if code == "context_length_exceeded" then
    local limit = tonumber(sc.context) or 128000
    local used = limit + (info and info.prompt_tokens or 1)
    message = ("This model's maximum context length is %d tokens. However, your messages resulted in %d tokens. "
      .. "Please reduce the length of the messages."):format(limit, used)
    etype, param = "invalid_request_error", "messages"
  elseif code == "insufficient_quota" then
    message = "You exceeded your current quota, please check your plan and billing details."
    etype = "insufficient_quota"
  end
  if type(sc.message) == "string" then message = sc.message end
  local headers = {}
  if sc.retry_after_ms then headers["retry-after-ms"] = tostring(sc.retry_after_ms) end
  if sc.retry_after then headers["retry-after"] = tostring(sc.retry_after) end
  if sc.retry_after_date then
    local secs = tonumber(sc.retry_after_date) or 1
    headers["retry-after"] = ngx.http_time(ngx.time() + ceil(secs))
  end
  if sc.should_retry ~= nil then headers["x-should-retry"] = tostring(sc.should_retry) end
  if status == 429 then
    headers["x-ratelimit-limit-requests"] = "500"
    headers["x-ratelimit-remaining-requests"] = "0"
  end
  return error_body(message, etype, code, param), headers
end

-- Request analysis --------------------------------------------------------

local function tokens(nbytes) return ceil(nbytes / 4) end

-- What the replies need of a request: the last user text, the system
-- text (system and developer messages joined), the texts of every message
-- (`texts`), of the user messages (`users`) and of the system ones
-- (`systems`), and the prompt token count.
local function analyse(req)
  local info = { last_user = "", system = {}, nmsg = 0, images = 0, texts = {}, users = {} }
  local nbytes = 0
  for _, m in ipairs(req.messages) do
    if type(m) == "table" then
      info.nmsg = info.nmsg + 1
      local c = m.content
      if type(c) == "string" then
        nbytes = nbytes + #c
      elseif type(c) == "table" then
        for _, part in ipairs(c) do
          if type(part) == "table" then
            if type(part.text) == "string" then nbytes = nbytes + #part.text
            elseif part.type == "image_url" or part.type == "input_image" then info.images = info.images + 1 end
          end
        end
      end
      if type(m.tool_calls) == "table" then
        for _, tc in ipairs(m.tool_calls) do
          local f = type(tc) == "table" and tc["function"]
          if type(f) == "table" then
            nbytes = nbytes + #tostring(f.name or "") + #tostring(f.arguments or "")
          end
        end
      end
      local text = mock.text_of(c)
      info.texts[#info.texts + 1] = text
      if m.role == "user" then
        info.last_user = text
        info.users[#info.users + 1] = text
      end
      if m.role == "system" or m.role == "developer" then info.system[#info.system + 1] = text end
      info.last_role = m.role
      info.last_content = text
    end
  end
  info.systems = info.system
  info.system = concat(info.system, "\n")
  info.prompt_tokens = tokens(nbytes) + 3 * info.nmsg + 3 + 85 * info.images
  return info
end

-- Replies -------------------------------------------------------------------

local ESCALATE = "escalate_to_human"

-- The tools' function names, and name -> parameters schema.
local function tool_names(req)
  local names, params = {}, {}
  if type(req.tools) == "table" then
    for _, t in ipairs(req.tools) do
      local f = type(t) == "table" and (t["function"] or t) or nil
      if type(f) == "table" and type(f.name) == "string" then
        names[#names + 1] = f.name
        params[f.name] = f.parameters
      end
    end
  end
  return names, params
end

local function wants_tools(req, info)
  if info.last_role == "tool" then return false end
  local tc = req.tool_choice
  if tc == "none" then return false end
  return #tool_names(req) > 0
end

-- Which tools to call (maybe none): the one forced by tool_choice; else
-- escalate_to_human when the request has it and the user asks for a
-- person; else those whose names the user mentions (all of them only when
-- parallel calls are allowed); else the first tool. escalate_to_human is
-- never picked by mention or as the first tool.
local function pick_tools(req, text)
  local names = tool_names(req)
  local tc = req.tool_choice
  if type(tc) == "table" and type(tc["function"]) == "table" and type(tc["function"].name) == "string" then
    return { tc["function"].name }
  end
  local others, has_escalate = {}, false
  for _, name in ipairs(names) do
    if name == ESCALATE then has_escalate = true else others[#others + 1] = name end
  end
  if has_escalate and mock.asks_for_human(text) then return { ESCALATE } end
  local low, mentioned = mock.lower(text), {}
  for _, name in ipairs(others) do
    local n = mock.lower(name)
    if find(low, n, 1, true) or find(low, (gsub(n, "[_%-]", " ")), 1, true) then
      mentioned[#mentioned + 1] = name
    end
  end
  if #mentioned >= 2 and req.parallel_tool_calls ~= false then return mentioned end
  if #mentioned >= 1 then return { mentioned[1] } end
  return { others[1] }
end

-- The user's messages without knowledge blocks, joined.
local function user_text(info)
  local list = {}
  for i, t in ipairs(info.users) do list[i] = mock.strip_knowledge(t) end
  return concat(list, "\n")
end

-- Calls to `names`: arguments {"query": <last user text>}, except for
-- escalate_to_human (mock.escalation_arguments).
local function make_calls(req, info, names, text, seq)
  local calls = {}
  local args = encode({ query = text })
  local _, params = tool_names(req)
  for i, name in ipairs(names) do
    local a = args
    if name == ESCALATE then a = mock.escalation_arguments(params[name], user_text(info), encode) end
    calls[i] = { id = ("call_sim_%d_%d"):format(seq, i - 1), name = name, arguments = a }
  end
  return calls
end

local FILLER = "The quick brown fox jumps over the lazy dog. "

-- json_object: a JSON schema in a system message, else in a user message
-- (mock.find_schema). Returns the schema, and the last user text and the
-- system text with the schema taken out of the one that held it; nil and
-- the texts as they are when there is none.
local function prompt_schema(info)
  local systems = {}
  for i, t in ipairs(info.systems) do systems[i] = t end
  for i, t in ipairs(systems) do
    local schema, rest = mock.find_schema(t, decode)
    if schema then
      systems[i] = rest
      return schema, info.last_user, concat(systems, "\n")
    end
  end
  for i, t in ipairs(info.users) do
    local schema, rest = mock.find_schema(t, decode)
    if schema then
      return schema, i == #info.users and rest or info.last_user, info.system
    end
  end
  return nil, info.last_user, info.system
end

-- The reply a request gets, before n/stop/max_tokens are applied:
-- { kind = "text"|"tools"|"refusal", text = ..., calls = ..., json = bool,
--   spans = enum values of a JSON text (logprobs), finish = forced finish_reason,
--   chunks = N, whole = bool }
local function decide(req, info, sc, seq, raw_body)
  if sc.refusal then return { kind = "refusal", text = REFUSAL } end
  local user = info.last_user
  if sc.tools_parallel or sc.tools_noindex then
    local names = tool_names(req)
    if #names == 0 then names = { "get_weather", "get_time" } end
    return { kind = "tools", calls = make_calls(req, info, { names[1], names[2] or names[1] }, user, seq) }
  end
  if wants_tools(req, info) then
    local names = pick_tools(req, mock.strip_knowledge(user))
    if #names > 0 then return { kind = "tools", calls = make_calls(req, info, names, user, seq) } end
  end
  if sc.big then
    local n = floor(tonumber(sc.big) or 0)
    local s = rep(FILLER, ceil(n / #FILLER))
    return { kind = "text", text = sub(s, 1, n), whole = true }
  end
  if sc.chunks then
    local n = floor(tonumber(sc.chunks) or 0)
    return { kind = "text", text = rep("tok ", n), chunks = n }
  end
  local rf = type(req.response_format) == "table" and req.response_format or nil
  local value, meta, schema
  if rf and rf.type == "json_schema" then
    local js = type(rf.json_schema) == "table" and rf.json_schema or {}
    schema = type(js.schema) == "table" and js.schema or nil
    if schema then
      value, meta = mock.generate(schema, user, info.system)
    else
      value, meta, schema = mock.json_object(user, info.system)
    end
  elseif rf and rf.type == "json_object" then
    schema, user, info.system = prompt_schema(info)
    if schema then
      value, meta = mock.generate(schema, user, info.system)
    else
      value, meta, schema = mock.json_object(user, info.system)
    end
  end
  if meta then
    local r = mock.json_reply(value, meta, schema, sc, encode, raw_body)
    return { kind = "text", text = r.text, json = true, spans = r.spans, finish = r.finish }
  end
  local text
  local passages = mock.passages(info.texts)
  local summary = mock.wants_summary(info.system)
  if passages then
    text = mock.knowledge_answer(passages, mock.strip_knowledge(user))
  elseif info.last_role == "tool" then
    text = "Tool result: " .. (info.last_content or "")
  elseif summary then
    text = mock.summarize(user, mock.word_limit(info.system, 40))
  else
    text = "Echo: " .. user
  end
  if sc.banned then
    text = mock.insert_word(text, sc.banned == true and "banned" or tostring(sc.banned))
    if summary and not passages and info.last_role ~= "tool" then
      text = mock.first_words(text, mock.word_limit(info.system, 40))
    end
  end
  return { kind = "text", text = text }
end

-- Apply `stop` and max_tokens to one choice's text.
local function finish_text(text, req)
  local finish = "stop"
  local stops = req.stop
  if type(stops) == "string" then stops = { stops } end
  if type(stops) == "table" then
    local cut
    for _, s in ipairs(stops) do
      if type(s) == "string" and s ~= "" then
        local at = find(text, s, 1, true)
        if at and (not cut or at < cut) then cut = at end
      end
    end
    if cut then text = sub(text, 1, cut - 1) end
  end
  local max = tonumber(req.max_completion_tokens or req.max_tokens)
  if max and max >= 0 and tokens(#text) > max then
    text = mock.utf8_cut(text, max * 4)
    finish = "length"
  end
  return text, finish
end

-- Choices: list of { index, kind, text, calls, finish }; and the
-- completion token count over all of them.
local function build_choices(req, reply, n)
  local choices, completion = {}, 0
  for i = 1, n do
    local c = { index = i - 1, kind = reply.kind }
    if reply.kind == "tools" then
      c.calls, c.finish = reply.calls, "tool_calls"
      for _, call in ipairs(reply.calls) do completion = completion + tokens(#call.name + #call.arguments) end
    elseif reply.kind == "refusal" then
      c.text, c.finish = reply.text, "stop"
      completion = completion + tokens(#reply.text)
    else
      local text = reply.text
      if n > 1 and not reply.json and not reply.chunks and not reply.whole then
        text = text .. " [choice " .. i .. "]"
      end
      if reply.chunks or reply.whole then
        c.text, c.finish = text, "stop"
      else
        c.text, c.finish = finish_text(text, req)
        if reply.finish then c.finish = reply.finish end
        c.spans = reply.spans
      end
      completion = completion + tokens(#c.text)
    end
    choices[i] = c
  end
  return choices, completion
end

-- Split s into pieces of about `size` bytes, never inside a UTF-8 char.
local function pieces(s, size) return mock.pieces(s, size) end

local function usage_of(prompt, completion)
  return { prompt_tokens = prompt, completion_tokens = completion, total_tokens = prompt + completion }
end

-- The usage member as JSON text; `usage=` makes it hostile (numbers no
-- provider should send: lua-cjson reads NaN and Infinity), `usage_cost=`
-- adds OpenRouter's usage.cost.
local function usage_json(sc, prompt, completion)
  local u = sc.usage
  local p, c, t = tostring(prompt), tostring(completion), tostring(prompt + completion)
  if u == "nan" then p, t = "NaN", "NaN"
  elseif u == "inf" then c, t = "Infinity", "Infinity"
  elseif u == "neg" then p, t = "-1000000", tostring(completion - 1000000)
  elseif u == "float" then p, c, t = "12.5", "3.25", "15.75"
  elseif u == "huge" then p, t = "1e15", "1e15"
  elseif u == "string" then p = '"12"'
  elseif u == "missing" then return nil end
  local extra = ""
  local cost = sc.usage_cost
  if cost == "nan" then extra = ',"cost":NaN'
  elseif cost == "neg" then extra = ',"cost":-5'
  elseif cost then extra = ',"cost":' .. (tonumber(cost) or 0) end
  return '{"prompt_tokens":' .. p .. ',"completion_tokens":' .. c .. ',"total_tokens":' .. t .. extra .. "}"
end

-- The credential the request carried (after "Bearer ", or "Basic " for a
-- password in the URL), for echo_key.
local function the_key()
  local auth = ngx.var.http_authorization
  return type(auth) == "string" and auth:match("^%a+%s+(.+)$") or ""
end

local EMPTY_LIST = "__SIM_EMPTY_LIST__"
local function with_lists(json) return (json:gsub('"__SIM_EMPTY_LIST__"', "[]")) end

-- A deterministic logprob entry for one piece of text (logprobs = true),
-- with `top` alternatives (top_logprobs).
local function logprob_entry(piece, k, top)
  local bytes = {}
  for i = 1, #piece do bytes[i] = byte(piece, i) end
  local lp = -0.01 * ((k * 7) % 13 + 1)
  local alts = {}
  for j = 1, top do
    local tok = j == 1 and piece or (piece .. "~" .. j)
    local tb = {}
    for i = 1, #tok do tb[i] = byte(tok, i) end
    alts[j] = { token = tok, logprob = j == 1 and lp or (lp - j), bytes = tb }
  end
  -- lua-cjson writes an empty table as {}: an empty list goes in as a
  -- marker that the encoding sites turn into []
  return { token = piece, logprob = lp, bytes = bytes, top_logprobs = top > 0 and alts or EMPTY_LIST }
end

local function top_of(req)
  local n = floor(tonumber(req.top_logprobs) or 0)
  if n < 0 then n = 0 elseif n > 20 then n = 20 end
  return n
end

local function bytes_of(s)
  local b = {}
  for i = 1, #s do b[i] = byte(s, i) end
  return b
end

-- The pieces of a text choice and their logprob entries (logprobs =
-- true): a JSON reply split by mock.json_logprobs (enum values in pieces
-- of at most 4 bytes, log p of the chosen value on the first), any other
-- text in ~4-byte pieces with logprob_entry's values.
local function choice_logprobs(c, req)
  if c.lp_pieces then return c.lp_pieces, c.lp_entries end
  local top, ps, es = top_of(req), {}, {}
  if c.spans then
    for k, e in ipairs(mock.json_logprobs(c.text, c.spans, top, encode)) do
      local alts = {}
      for j, a in ipairs(e.top) do alts[j] = { token = a.token, logprob = a.logprob, bytes = bytes_of(a.token) } end
      ps[k] = e.token
      es[k] = { token = e.token, logprob = e.logprob, bytes = bytes_of(e.token),
        top_logprobs = #alts > 0 and alts or EMPTY_LIST }
    end
  else
    for k, piece in ipairs(pieces(c.text, PIECE)) do
      ps[k], es[k] = piece, logprob_entry(piece, k, top)
    end
  end
  c.lp_pieces, c.lp_entries = ps, es
  return ps, es
end

local function completion_body(id, model, choices, usage, req)
  local list = {}
  local want_lp = req and req.logprobs == true
  for i, c in ipairs(choices) do
    local msg = { role = "assistant", content = null, refusal = null }
    if c.kind == "tools" then
      local tcs = {}
      for j, call in ipairs(c.calls) do
        tcs[j] = { id = call.id, type = "function", ["function"] = { name = call.name, arguments = call.arguments } }
      end
      msg.tool_calls = tcs
    elseif c.kind == "refusal" then
      msg.refusal = c.text
    else
      msg.content = c.text
    end
    local lp = null
    if want_lp and c.text and c.kind == "text" then
      local _, content = choice_logprobs(c, req)
      lp = { content = #content > 0 and content or EMPTY_LIST, refusal = null }
    end
    list[i] = { index = c.index, message = msg, logprobs = lp, finish_reason = c.finish }
  end
  -- lua-cjson writes an empty table as {}: the empty choices list goes in as text
  local body = encode({
    id = id, object = "chat.completion", created = CREATED, model = model,
    system_fingerprint = FINGERPRINT, choices = #list > 0 and list or "__SIM_CHOICES__",
    usage = usage and "__SIM_USAGE__" or nil,
  })
  body = with_lists(body:gsub('"__SIM_CHOICES__"', "[]"))
  if usage then body = body:gsub('"__SIM_USAGE__"', function() return usage end) end
  return body
end

-- Streaming -------------------------------------------------------------------

-- Everything of a chunk up to its choices; `extra` is more members.
local function chunk_prefix(id, model, extra)
  return '{"id":' .. encode(id) .. ',"object":"chat.completion.chunk","created":' .. CREATED
    .. ',"model":' .. encode(model) .. ',"system_fingerprint":"' .. FINGERPRINT .. '",'
    .. (extra or "") .. '"choices":'
end

local function choice_chunk(prefix, index, delta, finish, logprobs)
  return prefix .. '[{"index":' .. index .. ',"delta":' .. delta .. ',"logprobs":' .. (logprobs or "null")
    .. ',"finish_reason":' .. (finish and ('"' .. finish .. '"') or "null") .. "}]}"
end

-- The delta sequence of one choice (role first, no finish); with
-- logprobs (`req` given) the pieces and their entries in d.pieces and
-- d.entries, by delta index.
local function choice_deltas(c, reply, noindex, req)
  local d = {}
  if c.kind == "tools" then
    d[1] = '{"role":"assistant","content":null}'
    local calls = c.calls
    local function open(k, call)
      return '{"tool_calls":[{' .. (noindex and "" or ('"index":' .. (k - 1) .. ",")) .. '"id":' .. encode(call.id)
        .. ',"type":"function","function":{"name":' .. encode(call.name) .. ',"arguments":""}}]}'
    end
    local function frag(k, piece)
      return '{"tool_calls":[{' .. (noindex and "" or ('"index":' .. (k - 1) .. ","))
        .. '"function":{"arguments":' .. encode(piece) .. "}}]}"
    end
    if noindex then
      -- without indexes a delta carrying an id opens the next call: one
      -- call after the other
      for k, call in ipairs(calls) do
        d[#d + 1] = open(k, call)
        for _, p in ipairs(pieces(call.arguments, PIECE)) do d[#d + 1] = frag(k, p) end
      end
    else
      -- open every call, then interleave their argument fragments
      local frags, longest = {}, 0
      for k, call in ipairs(calls) do
        d[#d + 1] = open(k, call)
        frags[k] = pieces(call.arguments, PIECE)
        if #frags[k] > longest then longest = #frags[k] end
      end
      for r = 1, longest do
        for k = 1, #calls do
          if frags[k][r] then d[#d + 1] = frag(k, frags[k][r]) end
        end
      end
    end
  elseif c.kind == "refusal" then
    d[1] = '{"role":"assistant","content":null,"refusal":""}'
    for _, p in ipairs(pieces(c.text, PIECE)) do d[#d + 1] = '{"refusal":' .. encode(p) .. "}" end
  else
    d[1] = '{"role":"assistant","content":""}'
    if reply.chunks then
      local same = '{"content":"tok "}'
      for k = 1, reply.chunks do d[k + 1] = same end
    elseif reply.whole then
      if c.text ~= "" then d[2] = '{"content":' .. encode(c.text) .. "}" end
    elseif req then
      d.pieces, d.entries = {}, {}
      local ps, es = choice_logprobs(c, req)
      for k, p in ipairs(ps) do
        d[#d + 1] = '{"content":' .. encode(p) .. "}"
        d.pieces[#d], d.entries[#d] = p, es[k]
      end
    else
      for _, p in ipairs(pieces(c.text, PIECE)) do d[#d + 1] = '{"content":' .. encode(p) .. "}" end
    end
  end
  return d
end

-- Split a JSON text after each comma outside strings, for `multiline`.
local function split_json(s)
  local parts, start = {}, 1
  mock.json_outside_strings(s, 1, function(i, b)
    if b == 44 then
      parts[#parts + 1] = sub(s, start, i)
      start = i + 1
    end
  end)
  parts[#parts + 1] = sub(s, start)
  return parts
end

local function stream_reply(ctx, req, id, model, info, reply, choices, completion, sc)
  local eol = (sc.cr and "\r") or (sc.crlf and "\r\n") or "\n"
  local prefix = chunk_prefix(id, model)
  local noindex = sc.tools_noindex

  -- the events, in order; `cut` is where mid-stream scenarios strike:
  -- after the role chunk(s) and two content chunks
  local events, seqs, longest = {}, {}, 0
  local want_lp = req.logprobs == true
  for i, c in ipairs(choices) do
    seqs[i] = choice_deltas(c, reply, noindex, want_lp and req or nil)
    if #seqs[i] > longest then longest = #seqs[i] end
  end
  local last_content, prev_delta, prev_event = 0, {}, {}
  for r = 1, longest do
    for i, c in ipairs(choices) do
      local delta = seqs[i][r]
      if delta then
        -- a repeated delta (chunks=N) reuses its event string: no new work
        local ev = prev_event[i]
        local entry = seqs[i].entries and seqs[i].entries[r]
        if entry then
          ev = choice_chunk(prefix, c.index, delta, nil,
            with_lists(encode({ content = { entry }, refusal = null })))
          prev_delta[i], prev_event[i] = nil, nil
        elseif delta ~= prev_delta[i] then
          ev = choice_chunk(prefix, c.index, delta, nil)
          prev_delta[i], prev_event[i] = delta, ev
        end
        events[#events + 1] = ev
        if r > 1 then last_content = #events end
      end
    end
  end
  local cut = #choices + 2
  if cut > last_content then cut = last_content end
  if cut < 1 then cut = 1 end

  local tail = {}
  for _, c in ipairs(choices) do
    tail[#tail + 1] = choice_chunk(prefix, c.index, "{}", c.finish)
  end
  local uj = usage_json(sc, info.prompt_tokens, completion)
  local so = type(req.stream_options) == "table" and req.stream_options or {}
  if uj and sc.usage_null_choices then
    tail[#tail + 1] = prefix .. 'null,"usage":' .. uj .. "}"
  elseif uj and so.include_usage == true then
    tail[#tail + 1] = prefix .. '[],"usage":' .. uj .. "}"
  end

  ngx.status = 200
  ngx.header["Content-Type"] = "text/event-stream; charset=utf-8"
  ngx.header["Cache-Control"] = "no-cache"
  ngx.header["X-Accel-Buffering"] = "no"
  if sc.body_delay then
    local ok = ngx.send_headers()
    if not ok or not ngx.flush(true) then return client_gone() end
    sleep_ms(sc.body_delay)
  end

  local batch = reply.chunks and not (sc.bytewise or sc.slow_chunks)
  local buf, buffered = {}, 0
  local first = true
  local last_ev, last_framed

  local function write(s)
    if first then
      first = false
      if sc.bom then s = BOM .. s end
    end
    if sc.bytewise then
      for i = 1, #s do out(sub(s, i, i)) end
    elseif batch then
      buf[#buf + 1] = s
      buffered = buffered + #s
      if buffered >= BATCH_BYTES then
        out(concat(buf))
        buf, buffered = {}, 0
      end
    else
      out(s)
    end
  end

  local function frame(data)
    if data == last_ev then return last_framed end
    local body
    if sc.multiline then
      body = "data: " .. concat(split_json(data), eol .. "data: ")
    else
      body = "data: " .. data
    end
    local framed = body .. eol .. eol
    if sc.comments then framed = ": OPENROUTER PROCESSING" .. eol .. eol .. framed end
    last_ev, last_framed = data, framed
    return framed
  end

  local function flush_batch()
    if #buf > 0 then out(concat(buf)) buf, buffered = {}, 0 end
  end

  local function send_event(data)
    if sc.slow_chunks and not first then sleep_ms(sc.slow_chunks) end
    write(frame(data))
  end

  local function end_stream()
    flush_batch()
    leave(ctx)
    return ngx.eof()
  end

  for i = 1, #events do
    send_event(events[i])
    if i == cut then
      flush_batch()
      if sc.stall then sleep_ms(sc.stall) end
      if sc.error_chunk then
        send_event(error_body("The server had an error while processing your request. Sorry about that!",
          "server_error", "server_error"))
        return end_stream()
      elseif sc.event_error then
        write("event: error" .. eol .. "data: "
          .. error_body("The server had an error while processing your request.", "server_error", "server_error")
          .. eol .. eol)
        return end_stream()
      elseif sc.openrouter_error then
        local p = chunk_prefix(id, model, '"provider":"sim","error":{"code":502,'
          .. '"message":"Provider returned error: upstream disconnected","metadata":{"provider_name":"sim"}},')
        send_event(choice_chunk(p, 0, '{"content":""}', "error"))
        return end_stream()
      elseif sc.echo_key == "event" then
        write("event: error" .. eol .. "data: " .. error_body("upstream rejected key " .. the_key() .. " mid-stream",
          "server_error", "server_error") .. eol .. eol)
        return end_stream()
      elseif sc.echo_key == "chunk" then
        write("data: <html>proxy error for key " .. the_key() .. "</html>" .. eol .. eol)
        return end_stream()
      elseif sc.echo_key == "llama" then
        write("error: " .. encode({ code = 500, message = "slot failed for key " .. the_key(), type = "server_error" })
          .. eol .. eol)
        return end_stream()
      elseif sc.eof_mid then
        return end_stream()
      elseif sc.reset then
        leave(ctx)
        -- close the connection with the chunked body unfinished
        return ngx.exit(444)
      end
    end
  end
  for _, ev in ipairs(tail) do send_event(ev) end
  if not sc.no_done then send_event("[DONE]") end
  return end_stream()
end

local function replay(ctx, name, sc)
  if not name:match("^[%w_%.%-]+$") or name:find("..", 1, true) then
    return send_json(400, error_body("replay: bad fixture name " .. name, "invalid_request_error", "sim_replay"))
  end
  local data = replay_cache[name]
  if not data then
    local path = repo_root .. "/tests/fixtures/openai-streams/" .. name .. ".sse"
    local f = io.open(path, "rb")
    if not f then
      return send_json(404, error_body("replay: no fixture " .. path, "invalid_request_error", "sim_replay"))
    end
    data = f:read("*a")
    f:close()
    replay_cache[name] = data
  end
  ngx.status = 200
  ngx.header["Content-Type"] = "text/event-stream; charset=utf-8"
  ngx.header["Cache-Control"] = "no-cache"
  if sc.bytewise then
    for i = 1, #data do out(sub(data, i, i)) end
  else
    out(data)
  end
  leave(ctx)
end

-- Hostile and third-party servers --------------------------------------------

-- raw=<name>: bytes written on the raw connection, then it is closed: a
-- reply cut inside its header block (401_cut), or a JSON reply to a stream
-- request cut mid-body (json_cut).
local RAW = {
  ["401_cut"] = "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n",
  json_cut = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 400\r\n\r\n"
    .. '{"id":"chatcmpl-sim-raw","object":"chat.completion","choices":[{"index":0,"message":{"role":"assi',
}

raw_reply = function(ctx, name)
  local bytes = RAW[name]
  if not bytes then
    send_json(400, error_body("raw: unknown reply " .. tostring(name), "invalid_request_error", "sim_raw"))
    return leave(ctx)
  end
  local sock, err = ngx.req.socket(true)
  if not sock then
    ngx.log(ngx.ERR, "sim: raw socket: ", err)
    return ngx.exit(500)
  end
  sock:send(bytes)
  leave(ctx)
  return ngx.exit(444)
end

-- echo_key=json|text: an error reply that echoes the request's API key
-- verbatim (json: in the message, param, a header and the body; text: a
-- non-JSON body long enough that the key straddles a 300-byte cut).
echo_key_error = function(ctx, sc)
  local key = the_key()
  local status = tonumber(sc.status) or (sc.echo_key == "json" and 401 or 502)
  if sc.echo_key == "json" then
    send_json(status, encode({ error = { message = "Incorrect API key provided: " .. key .. ".",
      type = "invalid_request_error", param = key, code = "invalid_api_key", detail = { key = key } } }),
      { ["X-Echo-Key"] = key })
  else
    local pad = rep("x", 300 - 20 - floor(#key / 2))
    respond(status, "text/plain", "upstream failure:   " .. pad .. key .. " and more text after the key", nil)
  end
  return leave(ctx)
end

-- llama_error=server|context: llama.cpp's llama-server failing a request:
-- streamed, 200 and an event stream with only an `error:` line, then
-- [DONE]; not streamed, its JSON error with the code as the status.
llama_error = function(ctx, sc)
  local e
  if sc.llama_error == "context" then
    e = { code = 400, message = "the request exceeds the available context size, try increasing it",
      type = "exceed_context_size_error", n_prompt_tokens = 9000, n_ctx = 4096 }
  else
    e = { code = 500, message = "slot unavailable", type = "server_error" }
  end
  local req = ngx.ctx.sim_req
  if not (type(req) == "table" and req.stream == true) then
    -- not streamed: llama-server's JSON error, with the code as status
    send_json(e.code, encode({ error = e }))
    return leave(ctx)
  end
  ngx.status = 200
  ngx.header["Content-Type"] = "text/event-stream"
  out("error: " .. encode(e) .. "\n\n")
  out("data: [DONE]\n\n")
  return leave(ctx)
end

-- choices_empty, streamed: what Azure sends when a content filter took
-- every choice: chunks with `choices: []`, usage, [DONE].
filtered_stream = function(ctx, req, id, model, info, sc)
  ngx.status = 200
  ngx.header["Content-Type"] = "text/event-stream"
  local prefix = chunk_prefix(id, model, '"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}],')
  out("data: " .. prefix .. "[]}\n\n")
  local so = type(req.stream_options) == "table" and req.stream_options or {}
  local uj = usage_json(sc, info.prompt_tokens, 0)
  if uj and so.include_usage == true then out("data: " .. chunk_prefix(id, model) .. '[],"usage":' .. uj .. "}\n\n") end
  out("data: [DONE]\n\n")
  return leave(ctx)
end

-- Chat completions ------------------------------------------------------------

local function header_value(h)
  if type(h) == "table" then return concat(h, ",") end
  return h
end

local function read_body()
  ngx.req.read_body()
  local raw = ngx.req.get_body_data()
  if not raw then
    local path = ngx.req.get_body_file()
    if path then
      local f = io.open(path, "rb")
      if f then raw = f:read("*a") f:close() end
    end
  end
  return raw or ""
end
M.read_body = read_body -- batches.lua's too

-- opts.reset_reused: a request on a reused connection is read, then the
-- connection is dropped without a reply (location /reset-reused/).
local function chat(ctx, opts)
  enter(ctx)
  local ok, err = ngx.on_abort(on_abort)
  if not ok then ngx.log(ngx.WARN, "sim: on_abort: ", err) end

  if ngx.req.get_method() ~= "POST" then
    send_json(405, error_body("Method not allowed: use POST.", "invalid_request_error", "method_not_allowed"))
    return leave(ctx)
  end

  local raw = read_body()
  local headers = ngx.req.get_headers(0)
  local req = decode(raw)
  if type(req) ~= "table" then req = nil end
  last_request = { method = "POST", uri = ngx.var.request_uri, headers = headers, body = req or null, raw_body = raw }
  ctx.sim_req = req
  if opts.reset_reused and (tonumber(ngx.var.connection_requests) or 1) > 1 then
    leave(ctx)
    return ngx.exit(444)
  end

  -- scenario: header directives, then the model name's
  local spec = header_value(headers["x-sim-scenario"]) or ""
  if req and type(req.model) == "string" then
    local from_model = req.model:match("^sim:(.*)$")
    if from_model then spec = spec == "" and from_model or (spec .. "," .. from_model) end
  end
  local sc, unknown = scenarios.parse(spec)
  if #unknown > 0 then ngx.header["X-Sim-Unknown"] = concat(unknown, ",") end
  local key = header_value(headers["x-sim-key"])
  if not key and spec ~= "" then key = spec .. "#" .. sub(ngx.md5(raw), 1, 8) end
  if key then
    local attempt = shared():incr("k:" .. key, 1, 0)
    ngx.header["X-Sim-Attempt"] = attempt
    local fail = tonumber(sc.fail)
    if fail and attempt > fail then sc = {} end
  end

  local seq = shared():incr("ids", 1, 0)
  local id = "chatcmpl-sim-" .. seq
  ngx.header["X-Request-Id"] = "req_sim_" .. seq

  if sc.delay then sleep_ms(sc.delay) end
  if sc.crash then error("sim: simulated crash (the crash directive)") end
  if sc.close then
    leave(ctx)
    return ngx.exit(444)
  end
  if sc.auth and ngx.var.http_authorization ~= "Bearer sk-test-good" then
    local body, h = scenario_error(401, sc, req)
    send_json(401, body, h)
    return leave(ctx)
  end

  if not req then
    send_json(400, error_body("We could not parse the JSON body of your request. The API expects a JSON payload.",
      "invalid_request_error", "invalid_json"))
    return leave(ctx)
  end
  local missing = (type(req.model) ~= "string" or req.model == "") and "model"
    or (type(req.messages) ~= "table" or next(req.messages) == nil) and "messages" or nil
  if missing then
    send_json(400, error_body(("Missing required parameter: '%s'."):format(missing),
      "invalid_request_error", "missing_required_parameter", missing))
    return leave(ctx)
  end

  local info = analyse(req)
  if sc.raw then return raw_reply(ctx, sc.raw) end
  if sc.echo_key == "json" or sc.echo_key == "text" then return echo_key_error(ctx, sc) end
  if sc.llama_error then return llama_error(ctx, sc) end
  if sc.done_only then
    ngx.status = 200
    ngx.header["Content-Type"] = "text/event-stream"
    out("data: [DONE]\n\n")
    return leave(ctx)
  end
  local status = tonumber(sc.status)
  if status and status ~= 200 then
    local body, h = scenario_error(status, sc, req, info)
    respond(status, "application/json", body, h, sc.body_delay)
    return leave(ctx)
  end

  if sc.replay then return replay(ctx, tostring(sc.replay), sc) end

  local function plain(ctype, body)
    respond(200, ctype, body, nil, sc.body_delay)
    return leave(ctx)
  end
  if sc.malformed then
    return plain("application/json",
      '{"id":"' .. id .. '","object":"chat.completion","created":' .. CREATED
      .. ',"choices":[{"index":0,"message":{"role":"assistant","content":"Echo: hel')
  elseif sc.empty then
    return plain("application/json", "")
  elseif sc.html then
    return plain("text/html",
      "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1></center>\r\n"
      .. "<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")
  elseif sc.wrong_shape then
    return plain("application/json", '{"foo":1}')
  end

  local n = floor(tonumber(req.n) or 1)
  if sc.n3 then n = 3 end
  if n < 1 then n = 1 elseif n > 128 then n = 128 end
  local model = sc.reply_model or req.model
  local reply = decide(req, info, sc, seq, raw)
  local choices, completion = build_choices(req, reply, n)
  if sc.choices_empty then choices, completion = {}, 0 end

  if req.stream == true then
    if sc.choices_empty then return filtered_stream(ctx, req, id, model, info, sc) end
    return stream_reply(ctx, req, id, model, info, reply, choices, completion, sc)
  end
  return plain("application/json",
    completion_body(id, model, choices, usage_json(sc, info.prompt_tokens, completion), req))
end

-- One chat request of a batch (batches.lua): the non-streamed reply the
-- chat endpoint would give, without the HTTP exchange.  `sc` holds the
-- line's directives.  -> status, body (JSON text)
function M.batch_reply(req, sc, seq)
  local id = "chatcmpl-sim-b" .. seq
  if type(req) ~= "table" or type(req.messages) ~= "table" or next(req.messages) == nil then
    return 400, error_body("Missing required parameter: 'messages'.", "invalid_request_error",
      "missing_required_parameter", "messages")
  end
  local info = analyse(req)
  local status = tonumber(sc.status)
  if status and status ~= 200 then return status, (scenario_error(status, sc, req, info)) end
  local n = floor(tonumber(req.n) or 1)
  if n < 1 then n = 1 elseif n > 128 then n = 128 end
  local reply = decide(req, info, sc, seq, encode(req))
  local choices, completion = build_choices(req, reply, n)
  return 200, completion_body(id, req.model, choices, usage_json(sc, info.prompt_tokens, completion), req)
end

-- Control endpoints -----------------------------------------------------------

local function stats()
  local d = shared()
  local by_key, max_in_flight, connections = {}, 0, 0
  for _, k in ipairs(d:get_keys(0)) do
    local p = sub(k, 1, 2)
    if p == "k:" then
      by_key[sub(k, 3)] = d:get(k)
    elseif p == "c:" then
      connections = connections + 1
    elseif p == "lv" then
      local n = tonumber(sub(k, 5))
      if n and n > max_in_flight then max_in_flight = n end
    end
  end
  send_json(200, encode({
    requests = d:get("requests") or 0,
    in_flight = d:get("in_flight") or 0,
    max_in_flight = max_in_flight,
    connections = connections,
    aborted = d:get("aborted") or 0,
    by_key = by_key,
  }))
end

-- Zero the counters. in_flight is not a counter but a fact: it is kept, and
-- max_in_flight restarts from it.
local function reset()
  if ngx.req.get_method() ~= "POST" then
    return send_json(405, error_body("Method not allowed: use POST.", "invalid_request_error", "method_not_allowed"))
  end
  local d = shared()
  local in_flight = d:get("in_flight") or 0
  d:flush_all()
  d:flush_expired()
  require("batches").reset()
  d:set("in_flight", in_flight)
  for n = 1, in_flight do mark_level(d, n) end
  last_request = nil
  send_json(200, '{"ok":true}')
end

local function last()
  if ngx.worker.count() > 1 then
    return send_json(409, error_body("/__sim/last needs a simulator with one worker: each of the "
      .. ngx.worker.count() .. " workers only sees its own requests.", "invalid_request_error", "sim_many_workers"))
  end
  if not last_request then
    return send_json(404, error_body("No chat request recorded yet.", "invalid_request_error", "sim_no_request"))
  end
  send_json(200, encode(last_request))
end

local MODELS = { "gpt-4o-mini", "gpt-4o", "nousresearch/hermes-3-llama-3.1-405b" }

local function models()
  local data = {}
  for i, m in ipairs(MODELS) do data[i] = { id = m, object = "model", created = CREATED, owned_by = "sim" } end
  send_json(200, encode({ object = "list", data = data }))
end

-- Entry points ------------------------------------------------------------------

-- opts (optional): { reset_reused = true } (see chat)
function M.handle(opts)
  local uri = ngx.var.uri
  if find(uri, "/chat/completions/?$") then
    return chat(ngx.ctx, opts or {})
  elseif uri == "/__sim/stats" then
    return stats()
  elseif uri == "/__sim/reset" then
    return reset()
  elseif uri == "/__sim/last" then
    return last()
  elseif find(uri, "/models/?$") then
    return models()
  elseif find(uri, "/v1/files", 1, true) or find(uri, "/v1/batches", 1, true) or find(uri, "^/__sim/batch") then
    return require("batches").handle(uri)
  end
  send_json(404, error_body("Unknown endpoint " .. uri, "invalid_request_error", "unknown_url"))
end

-- log_by_lua: runs once for every request however it ended (444, abort,
-- Lua error), so nothing stays counted as in flight.
function M.log()
  local ctx = ngx.ctx
  if ctx.sim_in_flight then leave(ctx) end
end

return M
