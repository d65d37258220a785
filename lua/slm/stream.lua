-- slm.stream: a streamed call.  A Stream pulls the SSE body from the
-- runtime's connection in slices, feeds the C parser's chat fast path, and
-- hands out deltas; its attempts (retries, fallback models, rate limits,
-- the slot, the budget) are a pipeline Call's, the same as a plain call's.
--
--   local s = stream.new(call)
--   for text, chunk in s do ... end    -- or s:next()
--   local res, err = s:result()
--   s:close()                          -- also from another task: the one
--                                      -- blocked in s:next() wakes, "cancelled"
--
-- A stream is retried (or moves to a fallback model) only while nothing
-- has reached the caller.  Deltas received before an error are handed out
-- before the error is reported, so err.partial.text is what the caller saw.
local core = require "slm.core"
local json = require "slm.json"
local errors = require "slm.errors"
local decode = require "slm.decode"
local accumulate = require "slm.accumulate"

local type, pairs, pcall, setmetatable, rawget, next = type, pairs, pcall, setmetatable, rawget, next
local nn = decode.nn

local M = {}

local Stream = {}
Stream.__index = Stream
Stream.__name = "slm.Stream"
M.Stream = Stream

-- The chunk handed out with a fast-path delta (feed) is decoded only when
-- the caller reads it: core's feed_chat makes it as
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

-- chunks: whether the consumer gets the decoded chunk of a fast-path delta
-- (false: an on_delta that takes only the text; it gets false there).
function M.new(call, chunks)
  local s = setmetatable({ call = call, client = call.client, queue = {}, qhead = 1, qtail = 0,
    chunk_mt = chunks ~= false and LazyChunk or nil }, Stream)
  local track = call.rt.track_stream -- (slm.ngx.relay closes the streams of a push source)
  if track then track(s) end
  return s
end

--- The stream itself, or, when its call has a cached reply, a finished
-- stream that hands out the reply's text as one delta (and a chunk made
-- like a provider's), then gives the cached Response as its result.
function M.cached(s)
  local res = s.call:cached()
  if not res then return s end
  s.finished, s.res = true, res
  if res.text ~= "" then
    local chunk = s.chunk_mt and { id = res.id, model = res.model, object = "chat.completion.chunk",
      choices = { { index = 0, delta = { role = "assistant", content = res.text },
        finish_reason = res.finish_reason } } } or false
    s.queue[1], s.queue[2], s.qtail = res.text, chunk, 2
  end
  return s
end

-- A stream that failed before it could start (an error known up front).
function M.failed(call, err)
  local s = M.new(call)
  s.finished, s.err = true, err
  return s
end

local read_all = require("slm.pipeline").read_all

local function secrets(s) return s.call:secrets() end

-- Forget the attempt in progress (its connection is cancelled).
local function reset(s)
  if s.conn then s.conn:cancel() end
  s.conn, s.parser, s.acc, s.whole, s.billed_partial = nil, nil, nil, nil, nil
  s.queue, s.qhead, s.qtail, s.evs = {}, 1, 0, nil
  s.rbuf, s.rpos = nil, nil
  s.saw_done, s.saw_finish, s.saw_chunk = nil, nil, nil
end

-- The attempt failed with err: retry, fall back, or fail the stream (the
-- undelivered deltas before the error stay queued for the caller).
local function fail(s, err, keep_queue)
  if s.finished then return end
  local call = s.call
  if s.conn then s.conn:cancel() end
  local partial = s.billed_partial
  if s.acc then
    -- a 2xx stream was under way: what arrived is billed, and kept.  Once:
    -- a close() from another task during the backoff that follows comes
    -- here again for the same attempt
    partial = decode.stream_response(s.acc:result())
    partial.partial = true
    partial.headers = s.headers
    s.acc, s.billed_partial = nil, partial
    call:bill_failed(partial)
  end
  local again = call:failed(err, s.delivered)
  if s.finished then return end -- closed by another task during the backoff
  if again then
    reset(s)
    return
  end
  if partial then err.partial = partial end
  s.finished = true
  s.conn = nil
  if not keep_queue then s.evs = nil end
  s.err = call:error()
end

-- Open the HTTP exchange of an attempt; true, or nil, err.
local function connect(s)
  local call = s.call
  local conn, err = call:open()
  if not conn then return nil, err end
  s.conn = conn
  local model, set = call:model(), secrets(s)
  local status, headers, msg = conn:response()
  if s.finished then return true end -- closed meanwhile
  if not status then return nil, decode.transport_error(headers, msg, model, set) end
  s.headers = headers
  if status < 200 or status >= 300 then
    -- an HTTP error on a stream request: the usual JSON error body
    local body = read_all(conn)
    local ok, kind, m = conn:result()
    if not ok then return nil, decode.transport_error(kind, m, model, set) end
    return nil, decode.provider_error(status, body, headers, model, set)
  end
  local ctype = headers["content-type"] or ""
  if ctype:find("application/json", 1, true) then
    -- the server ignored stream=true: take the whole reply
    local body = read_all(conn)
    local ok, kind, m = conn:result()
    if not ok then
      call:bill_failed(nil)
      return nil, decode.transport_error(kind, m, model, set)
    end
    local dok, obj = pcall(json.decode, body)
    if dok and type(obj) == "table" and nn(obj.error) ~= nil then
      return nil, decode.provider_error(status, obj, headers, model, set)
    end
    if dok and type(obj) == "table" and type(obj.choices) == "table" then
      local res = decode.response(obj)
      if res then
        res.headers = headers
        s.whole = res
        return true
      end
    end
    call:bill_failed(nil)
    return nil, decode.protocol_error("stream reply is not an event stream", body, status, headers, model, set)
  end
  s.parser = core.sse_parser{ error_field = true }
  s.acc = accumulate.new()
  s.known = 0 -- chunk fields the accumulator has (parser:feed_chat)
  return true
end

-- The bytes of the body in slices of at most SLICE bytes: one read can hold
-- megabytes when the server outruns us, and feeding them at once would
-- queue thousands of deltas; slices keep that working set in cache, and let
-- the fast path start soon after the first chunk (see feed).
local SLICE = 65536
local function read_slice(s)
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

local function note_ttft(s)
  if not s.ttft then
    local call = s.call
    s.ttft = call.rt.now() - call.t0
    call.ttft = s.ttft
  end
end

-- Fold one SSE event (an event table) into the stream: returns true and,
-- for a chunk with choices, the delta to hand out (text, chunk); nil, err on
-- an in-stream error.
local function event(s, ev)
  local data = ev.data
  local call = s.call
  if data == "[DONE]" then
    s.acc:done()
    s.saw_done = true
    return true
  end
  if ev.event == "error" then -- `event: error`, or llama.cpp's `error:` lines
    return nil, decode.provider_error(200, data, s.headers, call:model(), secrets(s))
  end
  local ok, chunk = pcall(json.decode, data)
  if not ok or type(chunk) ~= "table" then
    return nil, decode.protocol_error("stream chunk is not valid JSON", data, 200, s.headers, call:model(), secrets(s))
  end
  s.saw_chunk = true
  local text, serr = s.acc:add(chunk)
  if serr then
    return nil, decode.provider_error(200, { error = serr }, s.headers, call:model(), secrets(s))
  end
  local chs = chunk.choices
  if type(chs) == "table" and chs[1] ~= nil then
    for i = 1, #chs do
      local ch = chs[i]
      if type(ch) == "table" then
        if nn(ch.finish_reason) ~= nil then s.saw_finish = true end
        if not s.ttft then
          local d = nn(ch.delta)
          if type(d) == "table" and ((type(d.content) == "string" and d.content ~= "")
              or nn(d.tool_calls) ~= nil or (type(d.refusal) == "string" and d.refusal ~= "")) then
            note_ttft(s)
          end
        end
      end
    end
    return true, text or "", chunk
  end
  return true
end

-- Feed one slice of the body.  core's feed_chat returns a pair per event:
-- (text, lazy chunk) for a plain content-only chunk of choice 0, which
-- needs no JSON decoding, or (false, event table) for any other event, which
-- goes through event() and is replaced in place by its delta (or by
-- false, false when it has none).  The pairs array then serves as the delta
-- queue (s.evs, read by next); the accumulator gets the texts of a whole
-- run of content chunks in one add_texts call.
local function feed(s, bytes)
  local events, nslow, before = s.parser:feed_chat(bytes, s.known, s.chunk_mt)
  local ferr
  if not events then
    -- an oversized event: what completed before it is still delivered
    ferr = errors.new("protocol", nslow, { status = 200, model = s.call:model() })
    events, nslow = before or {}, nil
  end
  local acc, n = s.acc, #events
  if n > 0 and nslow ~= n / 2 then s.saw_chunk = true end
  if not s.ttft then
    for i = 1, n, 2 do
      local text = events[i]
      if text and text ~= "" then
        note_ttft(s)
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
        local ok, text, chunk = event(s, events[i + 1])
        if not ok then
          -- the deltas before it are still delivered before the error
          s.evs, s.ei, s.en = events, 1, i - 1
          fail(s, text, true)
          return
        end
        events[i], events[i + 1] = text or false, chunk or false
        s.known = acc:known()
      end
    end
    if from < n then acc:add_texts(events, from, n - 1) end
  end
  s.evs, s.ei, s.en = events, 1, n
  if ferr then fail(s, ferr, true) end
end

-- The body ended: a complete stream, or the error that cut it.
local function ended(s)
  local ok, kind, msg = s.conn:result()
  local call = s.call
  local err
  if not ok then
    err = decode.transport_error(kind, msg, call:model(), secrets(s))
    if kind == "timeout" then err.message = "stream " .. err.message end
  elseif not s.saw_chunk then
    -- llama.cpp answers 200 and "[DONE]" (or nothing) around an error; an
    -- empty success would lose that the request failed
    err = errors.new("protocol", "the stream ended without a single chunk",
      { status = 200, model = call:model(), headers = s.headers })
  elseif not s.saw_done and not s.saw_finish then
    err = errors.new("protocol", "stream ended before [DONE] or a finish_reason",
      { status = 200, model = call:model(), headers = s.headers })
  end
  if err then return fail(s, err) end
  local res = decode.stream_response(s.acc:result())
  res.headers = s.headers
  res.ttft = s.ttft
  s.conn = nil
  s.finished = true
  s.res = call:succeeded(res)
end

--- The next delta: text, chunk; nil at the end (or on error: see result()).
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
      local ok, err = connect(self)
      if self.finished then return nil end -- closed by another task meanwhile
      if not ok then
        fail(self, err)
      elseif self.whole then
        -- non-streamed reply to a stream request: deliver it as one delta
        local res = self.whole
        self.finished = true
        self.conn = nil
        self.res = self.call:succeeded(res)
        local t = self.qtail
        self.queue[t + 1] = res.text
        self.queue[t + 2] = res.raw
        self.qtail = t + 2
      end
    else
      local bytes = read_slice(self)
      if self.finished then return nil end
      if bytes then feed(self, bytes) else ended(self) end
    end
  end
end

--- Whether next() can return without waiting for the network: a delta, or
-- bytes to parse, from what the last read brought (a relay flushes its
-- output only when nothing more is at hand: slm.ngx).
function Stream:pending()
  local evs = self.evs
  if evs then
    for i = self.ei, self.en - 1, 2 do
      if evs[i] then return true end
    end
  end
  return self.queue[self.qhead] ~= nil or self.rbuf ~= nil
end

-- generic-for protocol: `for text, chunk in stream do ... end`
function Stream:__call() return self:next() end

--- Cancel the stream (idempotent): the transfer stops at once, a task
-- blocked in next() elsewhere wakes; result() returns what had arrived as
-- an error of kind "cancelled" with err.partial.
function Stream:close()
  if self.finished then return end
  self.call.cancelled = true
  fail(self, errors.new("cancelled", "stream cancelled by the caller",
    { status = 0, model = self.call:model() }))
end
Stream.__close = Stream.close
-- A safety net in Lua 5.4 (the paths above never rely on it): a stream
-- dropped unfinished gives back its slot and reservation.  A finalizer may
-- run anywhere, also while the loop runs (where a transfer cannot be
-- cancelled): an error there must not escape.
function Stream:__gc() pcall(Stream.close, self) end

--- The final Response (after the loop), or nil, err.
function Stream:result()
  while self:next() ~= nil do end -- nil: finished, nothing left to hand out
  if self.err then return nil, self.err end
  return self.res
end

return M
