-- slm.ngx: lua-slm inside an nginx request: a model's stream relayed to the
-- browser as server-sent events, and the access log's variables.  The
-- metrics of the calls are slm.ngx.metrics (a lua_shared_dict and a
-- Prometheus endpoint).
--
--   location /chat {
--     lua_check_client_abort on;          -- so that a browser leaving is seen at once
--     content_by_lua_block {
--       local s = client:stream{ messages = ... }
--       slm.ngx.relay(s, { max_bytes = 20000, max_seconds = 60 })
--     }
--   }
--
-- What goes to the browser (Content-Type: text/event-stream, Cache-Control:
-- no-cache, X-Accel-Buffering: no), each event flushed (ngx.flush(true)):
--
--   data: {"delta":"Hel"}                  -- one per piece of text, in order: the
--                                          -- pieces joined are the model's text
--   event: done
--   data: {"model":..,"finish_reason":..,"usage":{..},"cost":..,"latency":..,"ttft":..,"bytes":..}
--
-- or, when the stream fails after output has started, `event: error` with
-- data {"error":{"kind","message"},"usage","cost",...} instead of done.  A
-- failure before any output is an HTTP error status (502, 504, 429, 400,
-- ...) with a JSON body {"error":{"kind","message"}}: nothing has been
-- streamed yet, so the browser gets a plain answer.  Retries and fallback
-- models are the stream's own and happen only while nothing has been
-- relayed (slm.stream); once the first piece is out, never.
--
-- The browser going away (ngx.on_abort, with lua_check_client_abort on; or
-- a print/flush that fails) closes the stream at once: the upstream
-- request is stopped, the tokens already produced are billed and charged
-- to the budget (slm.stream's close settles the partial reply), and the
-- abort is logged at WARN.  Caps: max_bytes (of relayed text: the piece
-- that crosses it is cut at a UTF-8 boundary) and max_seconds (a watchdog
-- light thread, and a check at each piece) close the stream the same way
-- and end it with the done event, "capped": "bytes" | "duration".
-- HTTP/1.0 clients are streamed only with `lua_http10_buffering off;`
-- (otherwise nginx buffers their whole reply to send a Content-Length).
local json = require "slm.json"

local type, pairs, tostring, tonumber, error, pcall, format, setmetatable, concat =
  type, pairs, tostring, tonumber, error, pcall, string.format, setmetatable, table.concat
local floor = math.floor
local byte, getmetatable = string.byte, getmetatable
local valid_utf8 = require("slm.redact").utf8

local M = {}

M.metrics = require "slm.ngx.metrics"

------------------------------------------------------------------ SSE

-- v with every string in it (keys too) made valid UTF-8, U+FFFD for bad
-- bytes (a reply's model name, an upstream's error message, a callback's
-- fields): JSON cannot carry them, and slm.json refuses to encode them.
local function valid_deep(v, depth)
  if type(v) == "string" then return valid_utf8(v) end
  if type(v) ~= "table" or depth > 20 then return v end
  local t = {}
  for k, x in pairs(v) do t[valid_deep(k, depth + 1)] = valid_deep(x, depth + 1) end
  return setmetatable(t, getmetatable(v))
end

-- JSON of data; its strings made valid UTF-8 first when they are not.
local function encode(data)
  local ok, d = pcall(json.encode, data)
  if ok then return d end
  return json.encode(valid_deep(data, 0))
end

--- The bytes of one server-sent event: `data:` (and `event:`) lines and
-- the blank line that ends it.  data is a table (sent as JSON on one line;
-- bytes that are not valid UTF-8 in its strings as U+FFFD).
function M.event(name, data)
  local d = encode(data)
  if name then return "event: " .. name .. "\ndata: " .. d .. "\n\n" end
  return "data: " .. d .. "\n\n"
end
local event = M.event

-- HTTP status of an error that ended a call before any output.
local STATUS = {
  timeout = 504, connect = 502, server = 502, protocol = 502, http = 502, auth = 502,
  rate_limit = 429, budget = 429, invalid_request = 400, context_length = 400, cancelled = 499,
  validation = 502, length = 502,
}
M.STATUS = STATUS

local function error_body(err)
  return { kind = err and err.kind or "unknown", message = err and err.message or tostring(err),
    status = err and type(err.status) == "number" and err.status ~= 0 and err.status or nil }
end

--- Answer the request with an error before any output: the status for its
-- kind (opts.status overrides) and {"error":{"kind","message"}}.
function M.error_response(err, status)
  ngx.status = status or STATUS[err and err.kind] or 502
  ngx.header["Content-Type"] = "application/json"
  ngx.header["Cache-Control"] = "no-store"
  ngx.print(encode{ error = error_body(err) })
end

------------------------------------------------------------------ access log

-- name in ngx.var -> field of the request's totals
local VARS = {
  slm_model = "model", slm_consumer = "consumer", slm_outcome = "outcome", slm_kind = "kind",
  slm_prompt_tokens = "prompt_tokens", slm_completion_tokens = "completion_tokens",
  slm_tokens = "tokens", slm_cost = "cost", slm_ttft = "ttft", slm_latency = "latency",
  slm_attempts = "attempts", slm_calls = "calls",
}
M.VARS = VARS

local function set_var(name, value)
  -- a variable the config did not declare (`set $slm_tokens "";`) cannot
  -- be written: skipped
  pcall(function() ngx.var[name] = value end)
end

--- slm.ngx.log_vars(event [, consumer]): add one call (an observe event)
-- to this request's totals (ngx.ctx.slm) and write them to the access
-- log's variables that the config declares (VARS: $slm_tokens, $slm_cost,
-- $slm_ttft, $slm_consumer, ...).  slm.ngx.metrics' observer calls it.
function M.log_vars(ev, consumer)
  local ctx = ngx.ctx
  local t = ctx.slm
  if not t then
    t = { prompt_tokens = 0, completion_tokens = 0, tokens = 0, cost = 0, attempts = 0, calls = 0 }
    ctx.slm = t
  end
  local p, c = tonumber(ev.prompt_tokens) or 0, tonumber(ev.completion_tokens) or 0
  t.prompt_tokens = t.prompt_tokens + p
  t.completion_tokens = t.completion_tokens + c
  t.tokens = t.tokens + p + c
  t.cost = t.cost + (tonumber(ev.cost) or 0)
  t.attempts = t.attempts + (tonumber(ev.attempts) or 0)
  t.calls = t.calls + 1
  t.model = ev.model
  t.consumer = consumer or ev.consumer or t.consumer
  t.outcome, t.kind = ev.outcome, ev.kind
  if ev.ttft and not t.ttft then t.ttft = ev.ttft end -- the first stream's
  t.latency = ev.latency
  for name, field in pairs(VARS) do
    local v = t[field]
    if v ~= nil then
      if field == "cost" then v = format("%.8f", v)
      elseif field == "ttft" or field == "latency" then v = format("%.3f", v) end
      set_var(name, tostring(v))
    end
  end
end

------------------------------------------------------------------ relay

-- At most n bytes of s, never cutting a UTF-8 character.
local function utf8_prefix(s, n)
  if n <= 0 then return "" end
  if #s <= n then return s end
  local b = s:byte(n + 1)
  while n > 0 and b and b >= 0x80 and b < 0xC0 do
    n = n - 1
    b = s:byte(n + 1)
  end
  return s:sub(1, n)
end
M.utf8_prefix = utf8_prefix

-- How many bytes of s end with a whole character: a character cut short
-- at its end (its first bytes, the rest in the next piece) is not counted.
local function whole_len(s)
  local n = #s
  for i = n, n > 3 and n - 2 or 1, -1 do
    local b = byte(s, i)
    if b < 0x80 then return n end
    if b >= 0xF8 then return n end -- never a character's first byte: nothing to wait for
    if b >= 0xC0 then
      local need = b >= 0xF0 and 4 or b >= 0xE0 and 3 or 2
      return n - i + 1 < need and i - 1 or n
    end
  end
  return n
end
M.whole_len = whole_len

local OPTIONS = {
  client = true, on_delta = true, max_bytes = true, max_seconds = true, metrics = true, consumer = true,
  final = true, headers = true, status = true, log = true,
}

local function check_opts(opts)
  if type(opts) ~= "table" then error("slm.ngx.relay: options must be a table", 3) end
  for k, v in pairs(opts) do
    if not OPTIONS[k] then error(format("slm.ngx.relay: unknown option '%s'", tostring(k)), 3) end
    if (k == "on_delta" or k == "final") and type(v) ~= "function" then
      error(format("slm.ngx.relay: option '%s' must be a function", k), 3)
    end
    if (k == "max_bytes" or k == "max_seconds") and not (type(v) == "number" and v > 0 and v < math.huge) then
      error(format("slm.ngx.relay: option '%s' must be a positive number", k), 3)
    end
    if k == "headers" and type(v) ~= "table" then error("slm.ngx.relay: option 'headers' must be a table", 3) end
  end
end

-- ngx.exit ends the request without returning to its caller: called in
-- on_delta, in a push source, in an on_abort handler of the application's
-- or in any light thread of the request while a relay runs, nothing after
-- it in the relay runs, and nginx only kills the light threads (the
-- upstream connection goes with them).  The stream's concurrency slot and
-- its budget hold would stay taken for the worker's life.  So while a relay
-- runs, ngx.exit (wrapped once, the first time a relay runs) first closes
-- the streams of the relays of its request (ngx.ctx.slm_relays): the slot
-- and the hold are given back, what arrived is billed; then it exits.
local real_exit, exit_wrapper
local function get_ctx() return ngx.ctx end
exit_wrapper = function(...)
  local ok, ctx = pcall(get_ctx) -- (a phase without ngx.ctx: no relay there)
  local list = ok and type(ctx) == "table" and ctx.slm_relays
  if list then
    ctx.slm_relays = nil
    for i = #list, 1, -1 do pcall(list[i]) end
  end
  return real_exit(...)
end
local function wrap_exit()
  local e = ngx.exit
  if e ~= exit_wrapper and type(e) == "function" then
    real_exit = e
    ngx.exit = exit_wrapper
  end
end

-- A raised value that stops a push source (the browser left, a cap).
local STOP = setmetatable({}, { __tostring = function() return "slm.ngx.relay: stopped" end })

local function usage_of(res, ctx_totals)
  if res and type(res.usage) == "table" then
    local u = res.usage
    return { prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens,
      total_tokens = u.total_tokens, estimated = u.estimated or nil }, res.cost
  end
  if ctx_totals then
    return { prompt_tokens = ctx_totals.prompt_tokens, completion_tokens = ctx_totals.completion_tokens,
      total_tokens = ctx_totals.tokens }, ctx_totals.cost
  end
  return nil, nil
end

local function round(x, d)
  if type(x) ~= "number" then return nil end
  local m = 10 ^ d
  return floor(x * m + 0.5) / m
end

--- slm.ngx.relay(source, opts) -> res | nil, err; and a report
-- { bytes, pieces, started, aborted, capped }.
-- source: a Stream (client:stream(req)); a request table (opts.client
-- streams it); or a function(emit) that produces the pieces itself, e.g.
-- function(emit) return bot:reply(id, text, { on_delta = emit }) end
-- (a browser that leaves, or a cap, closes the streams it opened at once,
-- and emit raises through the call from then on: the call's stream is
-- billed on the way out).
-- opts: client, on_delta = function(text, chunk) -> text | nil (unchanged)
-- | false (not sent), max_bytes, max_seconds, metrics (a slm.ngx.metrics:
-- aborts and caps counted), consumer (its label there), final =
-- function(res) -> table of extra fields for the done event, headers
-- (extra response headers), status (of an error before output), log
-- (false: no WARN line on an abort).
function M.relay(src, opts)
  opts = opts or {}
  check_opts(opts)
  local stream, push
  if type(src) == "function" then
    push = src
  elseif type(src) == "table" and type(src.next) == "function" and type(src.close) == "function" then
    stream = src
  elseif type(src) == "table" and src.messages ~= nil then
    local c = opts.client
    if type(c) ~= "table" or type(c.stream) ~= "function" then
      error("slm.ngx.relay: a request table needs opts.client", 2)
    end
    stream = c:stream(src)
  else
    error("slm.ngx.relay: expected a stream, a request table or a function(emit), got " .. type(src), 2)
  end

  local on_delta, max_bytes, max_seconds = opts.on_delta, opts.max_bytes, opts.max_seconds
  local st = { bytes = 0, pieces = 0, started = false, aborted = false, capped = nil }
  local t0 = ngx.now()

  local function start()
    st.started = true
    ngx.status = 200
    local h = ngx.header
    h["Content-Type"] = "text/event-stream"
    h["Cache-Control"] = "no-cache"
    h["X-Accel-Buffering"] = "no"
    if opts.headers then for k, v in pairs(opts.headers) do h[k] = v end end
  end
  -- false when the browser has gone.  An HTTP/1.0 request under
  -- lua_http10_buffering (on by default) cannot be streamed: flush says
  -- "buffering" and the events go out at the end, with a Content-Length.
  local function flush()
    local ok, ferr = ngx.flush(true)
    return ok ~= nil or ferr == "buffering"
  end
  -- A piece is flushed at once unless the stream has more at hand from the
  -- same read (stream:pending()): those go out together, with one write,
  -- as soon as it has none, so no piece waits for the network.
  local unflushed = false
  local pending = stream and stream.pending
  local function send(bytes, hold)
    if not ngx.print(bytes) then return false end
    if hold then
      unflushed = true
      return true
    end
    unflushed = false
    return flush()
  end
  -- stop the upstream: the stream's close (from any light thread); for a
  -- push source, the close of every stream it opened (the runtime lists
  -- them in ngx.ctx.slm_relay_streams while it runs), so that it stops at
  -- once instead of at its next piece
  local tracked
  local function stop()
    if stream then stream:close() end
    if tracked then
      for i = 1, #tracked do tracked[i]:close() end
    end
  end

  -- The browser leaving: seen at once with lua_check_client_abort on
  -- (otherwise by the next print that fails).  Registering twice in one
  -- request is refused by nginx: a second relay in a request goes without.
  if ngx.on_abort then
    pcall(ngx.on_abort, function()
      st.aborted = true
      stop()
    end)
  end
  -- ngx.exit while this relay runs: its streams closed first (above)
  local ctx0 = ngx.ctx
  local exits
  local function on_exit()
    st.done, st.exited = true, true
    stop()
  end
  if ctx0 then
    wrap_exit()
    exits = ctx0.slm_relays or {}
    ctx0.slm_relays = exits
    exits[#exits + 1] = on_exit
  end
  local function unregister()
    if not exits then return end
    for i = #exits, 1, -1 do
      if exits[i] == on_exit then table.remove(exits, i) end
    end
    if exits[1] == nil and ctx0.slm_relays == exits then ctx0.slm_relays = nil end
    exits = nil
  end

  local watchdog
  if max_seconds and ngx.thread and ngx.thread.spawn then
    watchdog = ngx.thread.spawn(function()
      ngx.sleep(max_seconds)
      if not st.done then
        st.capped = st.capped or "duration"
        stop()
      end
    end)
  end

  -- One piece from the model: false when the relay must stop.  A
  -- character the model's piece ends inside of (its last bytes in the next
  -- piece) is held back and sent with the next one: every event is valid
  -- UTF-8 (JSON), and the browser's text is the model's, byte for byte.
  -- Bytes that are not UTF-8 (a stray byte, from the model or from
  -- on_delta) go out as U+FFFD.  last: the end, nothing held.
  local carry, last_chunk = "", nil
  local function piece(text, chunk, last)
    if st.aborted or st.capped then return false end
    if carry ~= "" then text, carry = carry .. text, "" end
    if not last then
      last_chunk = chunk
      local n = whole_len(text)
      if n < #text then text, carry = text:sub(1, n), text:sub(n + 1) end
    end
    if text == "" then return true end
    local out = text
    if on_delta then
      local r = on_delta(text, chunk)
      if st.aborted or st.capped then return false end -- meanwhile
      if r == false then return true end
      if r ~= nil then out = tostring(r) end
    end
    out = valid_utf8(out)
    if max_bytes and st.bytes + #out > max_bytes then
      out = utf8_prefix(out, max_bytes - st.bytes)
      st.capped = "bytes"
    end
    if out ~= "" then
      if not st.started then start() end
      -- counted as written to nginx (the last ones may not have reached a
      -- browser that has gone)
      local ok = send(event(nil, { delta = out }), pending and pending(stream))
      st.bytes = st.bytes + #out
      st.pieces = st.pieces + 1
      if not ok then
        st.aborted = true
        return false
      end
    end
    if st.capped then return false end
    if max_seconds and ngx.now() - t0 >= max_seconds then
      st.capped = "duration"
      return false
    end
    return true
  end

  -- A callback (on_delta, final) or anything else that raises: the
  -- watchdog stopped, the streams closed (the upstream request, the
  -- budget's hold and the slot given back; what arrived is billed), then
  -- the error raised again to the relay's caller.
  local function fail(e)
    st.done = true
    unregister()
    if watchdog then ngx.thread.kill(watchdog) end
    pcall(stop)
    error(e, 0)
  end

  local res, err
  if stream then
    local ok, e = pcall(function()
      while true do
        local text, chunk = stream:next()
        if text == nil then
          -- a character the stream ended inside of
          if carry ~= "" then piece("", last_chunk, true) end
          break
        end
        if not piece(text, chunk) then break end
        if unflushed and not pending(stream) then
          unflushed = false
          if not flush() then
            st.aborted = true
            break
          end
        end
      end
    end)
    if not ok then fail(e) end
    if st.aborted or st.capped then stream:close() end
    res, err = stream:result()
  else
    local ctx = ngx.ctx
    local outer = ctx.slm_relay_streams
    tracked = {}
    ctx.slm_relay_streams = tracked
    local ok, r, e = pcall(function()
      local r1, e1 = push(function(text, chunk)
        if not piece(text, chunk) then error(STOP, 0) end
        return true
      end)
      if carry ~= "" then piece("", last_chunk, true) end
      return r1, e1
    end)
    ctx.slm_relay_streams = outer
    if ok then
      res, err = r, e
    elseif r == STOP then
      res, err = nil, { kind = "cancelled", message = st.aborted and "the client went away" or "capped" }
    else
      fail(r)
    end
  end
  st.done = true
  unregister()
  if watchdog then ngx.thread.kill(watchdog) end

  local partial = res or (type(err) == "table" and err.partial) or nil
  local usage, cost = usage_of(partial, ngx.ctx and ngx.ctx.slm)
  local m = opts.metrics
  local labels = m and { consumer = opts.consumer or "-" }

  if st.aborted then
    if m then m:inc("slm_relay_aborts_total", labels) end
    if opts.log ~= false then
      ngx.log(ngx.WARN, format("slm.ngx.relay: the client went away after %d bytes in %d pieces (%.3f s): "
        .. "upstream request stopped; %s tokens ($%s) billed", st.bytes, st.pieces, ngx.now() - t0,
        usage and tostring(usage.total_tokens) or "no", cost and format("%.6f", cost) or "?"))
    end
    return res, err, st
  end

  local final = {
    model = partial and partial.model or nil,
    finish_reason = partial and partial.finish_reason or nil,
    usage = usage, cost = cost,
    latency = round(partial and partial.latency, 4),
    ttft = round(partial and partial.ttft or (ngx.ctx and ngx.ctx.slm and ngx.ctx.slm.ttft), 4),
    bytes = st.bytes, capped = st.capped,
  }
  if opts.final then
    local ok, extra = pcall(opts.final, res, err)
    if not ok then fail(extra) end
    if type(extra) == "table" then for k, v in pairs(extra) do final[k] = v end end
  end

  if st.capped then
    if m then m:inc("slm_relay_capped_total", { consumer = labels.consumer, reason = st.capped }) end
    if not st.started then start() end
    send(event("done", final))
    return res, err, st
  end
  if res then
    if not st.started then start() end
    send(event("done", final))
    return res, err, st
  end
  if not st.started then
    M.error_response(err, opts.status)
    return res, err, st
  end
  final.error = error_body(err)
  send(event("error", final))
  return res, err, st
end

-- Concatenated deltas of an SSE body as the relay writes it (for tests and
-- clients in Lua): text, the done/error event's data (decoded), the events.
function M.parse_events(body)
  local events, texts = {}, {}
  local last
  for block in (body .. "\n\n"):gmatch("(.-)\n\n") do
    if block ~= "" then
      local name, data = block:match("^event: ([^\n]*)\ndata: (.*)$")
      if not name then data = block:match("^data: (.*)$") end
      local ok, v = pcall(json.decode, data or "")
      events[#events + 1] = { event = name, data = ok and v or data, raw = block }
      if not name and ok and type(v) == "table" and v.delta then texts[#texts + 1] = v.delta end
      if name then last = ok and v or nil end
    end
  end
  return concat(texts), last, events
end

return M
