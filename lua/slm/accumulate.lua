-- slm.accumulate: folds streamed chat.completion.chunk objects (decoded by
-- lua-cjson) into the fields of a final Response.
--
--   local acc = require("slm.accumulate").new()
--   local text, err = acc:add(chunk) -- text: choice 0 content delta or nil
--   acc:add_text(s)                   -- content-only chunks of choice 0 (see
--   acc:add_texts(list, i, j)         --   below): one, or many at a time
--   local bits = acc:known()          -- top-level fields add() now ignores
--   acc:done()                        -- on `data: [DONE]`
--   local r = acc:result()
--
-- add() is the streaming hot path: it allocates only when a new choice or a
-- new tool call appears; text pieces go into arrays that result() joins
-- once, so a stream of any length is linear.  An in-stream error (a chunk
-- with a top-level `error`, or OpenRouter's finish_reason "error") makes
-- add() return nil, err with err = { message, code, type, status }; what the
-- chunk carried besides is still accumulated, and result() keeps working.
-- Works unchanged under Lua 5.4 and LuaJIT.

local type, pairs, pcall, setmetatable, concat, sort, tostring, tonumber =
  type, pairs, pcall, setmetatable, table.concat, table.sort, tostring, tonumber
local floor = math.floor
-- an integral number as an integer (LuaJIT: as it is); nil for any other
local tointeger = math.tointeger or function(x)
  if x == floor(x) and x > -2 ^ 53 and x < 2 ^ 53 then return x end
end

local ok_cjson, cjson = pcall(require, "cjson")
local null = ok_cjson and cjson.null or nil -- JSON null as lua-cjson decodes it

local M = {}
local Acc = {}
local ipairs = ipairs
local LOGPROB_LISTS = { "content", "refusal" }
Acc.__index = Acc

function M.new()
  return setmetatable({
    _choices = {},   -- choice index -> state
    _done = false,
  }, Acc)
end

local function new_choice(self, index)
  local st = {
    index = index,
    role = nil,
    content = {}, nc = 0,   -- content pieces (nil pieces never stored)
    refusal = {}, nr = 0,
    reasoning = {}, nz = 0,
    calls = nil,            -- tool call index -> call
    max_call = -1,          -- highest tool call index seen
    last_call = nil,        -- target of deltas that carry no index
    finish_reason = nil,
  }
  self._choices[index] = st
  return st
end

-- One tool call: id, type and name are set once (the first non-empty value
-- wins); argument pieces are joined at result time.
local function new_call(st, index)
  local call = { index = index, id = nil, type = nil, name = nil, args = {}, na = 0 }
  local calls = st.calls
  if not calls then
    calls = {}
    st.calls = calls
  end
  calls[index] = call
  if index > st.max_call then st.max_call = index end
  return call
end

local function merge_tool_calls(st, list)
  for j = 1, #list do
    local t = list[j]
    if type(t) == "table" then
      local index, id = t.index, t.id
      if type(id) ~= "string" or id == "" then id = nil end
      local call
      if type(index) == "number" then
        call = st.calls and st.calls[index] or new_call(st, index)
      else
        -- No index (some providers): an id opens a new call unless it is
        -- the current call's own id repeated; a delta without id continues
        -- the current call.
        call = st.last_call
        if not call or (id and call.id ~= id) then
          call = new_call(st, st.max_call + 1)
        end
      end
      st.last_call = call
      if id and not call.id then call.id = id end
      local ty = t.type
      if type(ty) == "string" and ty ~= "" and not call.type then call.type = ty end
      local f = t["function"]
      if type(f) == "table" then
        local name = f.name
        if type(name) == "string" and name ~= "" and not call.name then call.name = name end
        local a = f.arguments
        if type(a) == "string" and a ~= "" then
          local n = call.na + 1
          call.args[n] = a
          call.na = n
        end
      end
    end
  end
end

-- Logprobs arrive per chunk as { content = {token entries}, refusal = {...} }:
-- the entries of each list are appended in order.
local function merge_logprobs(st, lp)
  local acc = st.logprobs
  if not acc then
    acc = {}
    st.logprobs = acc
  end
  for _, k in ipairs(LOGPROB_LISTS) do
    local list = lp[k]
    if type(list) == "table" then
      local into = acc[k]
      if not into then into = {}; acc[k] = into end
      for j = 1, #list do into[#into + 1] = list[j] end
    end
  end
end

local function str_or_nil(v)
  if v == nil or v == null then return nil end
  if type(v) == "string" then return v end
  return tostring(v)
end

local StreamError = {
  __tostring = function(e)
    local s = "stream error: " .. tostring(e.message)
    if e.code ~= nil then s = s .. " (" .. tostring(e.code) .. ")" end
    return s
  end,
}

-- Builds the error table of an in-stream error from an `error` value
-- (object or string) of a chunk or a choice.
local function make_error(e, fallback)
  local err = setmetatable({}, StreamError)
  if type(e) == "table" then
    err.message = str_or_nil(e.message)
    local code = e.code
    if code ~= null then err.code = code end
    err.type = str_or_nil(e.type)
    local status = e.status
    if type(status) == "number" then
      err.status = status
    elseif type(code) == "number" then
      err.status = code -- OpenRouter puts the HTTP-like status in code
    end
    local meta = e.metadata
    if type(meta) == "table" and meta ~= null then err.metadata = meta end
  elseif type(e) == "string" then
    err.message = e
  end
  if not err.message then err.message = fallback end
  return err
end

-- Folds one decoded chunk.  Returns the content delta of choice 0 (nil when
-- the chunk has none or it is empty), or nil, err for an in-stream error.
-- Hot path: plain field reads and comparisons, type() only where a wrong
-- shape would raise; pieces are validated once, in result().
function Acc:add(chunk)
  if type(chunk) ~= "table" then
    error("accumulate: chunk must be a table, got " .. type(chunk), 2)
  end
  local err
  local e = chunk.error
  if e ~= nil and e ~= null then
    err = make_error(e, "error in stream")
  end

  local v
  -- a hostile server's fields of the wrong type are left out, not passed on
  if self.id == nil then
    v = chunk.id
    if type(v) == "string" and v ~= "" then self.id = v end
    v = chunk.created
    if type(v) == "number" then self.created = v end
  end
  if self.model == nil then
    v = chunk.model
    if type(v) == "string" and v ~= "" then self.model = v end
  end
  if self.system_fingerprint == nil then
    v = chunk.system_fingerprint
    if type(v) == "string" then self.system_fingerprint = v end
  end
  v = chunk.usage
  if v ~= nil and v ~= null then self.usage = v end

  local text
  local choices = chunk.choices
  if type(choices) == "table" then
    local all = self._choices
    for i = 1, #choices do
      local c = choices[i]
      if type(c) == "table" then
        -- an integer (JSON numbers may come as floats: 0.0 is 0; "1" is 1);
        -- anything else (absent, null, 1.5) is the choice's place in the list
        local index = c.index
        if type(index) == "string" then index = tonumber(index) end
        index = type(index) == "number" and tointeger(index) or i - 1
        local st = all[index] or new_choice(self, index)
        local d = c.delta
        if d == nil or d == null then
          d = c.message -- a few servers send a whole message in the last chunk
        end
        if type(d) == "table" then
          local s = d.role
          if type(s) == "string" then st.role = s end
          s = d.content
          if s ~= nil and s ~= null then
            local n = st.nc + 1
            st.content[n] = s
            st.nc = n
            -- the delta handed on is a string, as joined() makes the text:
            -- a number as its text, any other piece dropped
            if type(s) == "number" then s = tostring(s) end
            if index == 0 and type(s) == "string" and s ~= "" then
              if text == nil then
                text = s
              else
                text = text .. s -- two entries for choice 0 in one chunk
              end
            end
          end
          s = d.refusal
          if s ~= nil and s ~= null then
            local n = st.nr + 1
            st.refusal[n] = s
            st.nr = n
          end
          s = d.reasoning
          if s == nil or s == null then s = d.reasoning_content end
          if s ~= nil and s ~= null then
            local n = st.nz + 1
            st.reasoning[n] = s
            st.nz = n
          end
          s = d.tool_calls
          if s ~= nil and s ~= null and type(s) == "table" then merge_tool_calls(st, s) end
        end
        local lp = c.logprobs
        if lp ~= nil and lp ~= null and type(lp) == "table" then merge_logprobs(st, lp) end
        local fr = c.finish_reason
        if type(fr) == "string" then
          st.finish_reason = fr
          if fr == "error" and not err then
            local ce = c.error
            if ce == nil or ce == null then ce = e end
            err = make_error(ce, "stream finished with finish_reason \"error\"")
          end
        end
      end
    end
  end

  if err then
    self.error = err
    return nil, err
  end
  return text
end

-- Bits of the top-level chunk fields that add() ignores from now on
-- (core's feed_chat takes them as `known`): 1 id, 2 created, 4 model,
-- 8 system_fingerprint.  add() keeps the first non-empty id, model and
-- system_fingerprint, and reads created only along with the id it keeps.
function Acc:known()
  local k = 0
  if self.id ~= nil then k = 3 end
  if self.model ~= nil then k = k + 4 end
  if self.system_fingerprint ~= nil then k = k + 8 end
  return k
end

-- The cheap form of add() for chunks that core's feed_chat recognised as
-- plain content-only chunks of choice 0 (everything else in them null,
-- absent, or a field that add() ignores given known()): add_text(s)
-- appends their content s (a string) to choice 0 exactly as add() would;
-- add_texts(list, i, j) appends list[i], list[i + 2], ..., list[j] (the
-- texts of feed_chat's pairs) in one call.
function Acc:add_text(s)
  local st = self._choices[0] or new_choice(self, 0)
  local n = st.nc + 1
  st.content[n] = s
  st.nc = n
end

function Acc:add_texts(list, i, j)
  local st = self._choices[0] or new_choice(self, 0)
  local content, n = st.content, st.nc
  for k = i, j, 2 do
    n = n + 1
    content[n] = list[k]
  end
  st.nc = n
end

-- `data: [DONE]` was seen.
function Acc:done()
  self._done = true
end

-- Joins pieces once and keeps the joined string, so repeated result()
-- calls (and add() after result()) stay cheap.
local function joined(pieces, n)
  if n == 0 then return nil, 0 end
  local ok, s = pcall(concat, pieces, "", 1, n)
  if not ok or type(s) ~= "string" then -- a piece was not a string: drop it
    local k = 0
    for j = 1, n do
      local p = pieces[j]
      pieces[j] = nil
      if type(p) == "string" then
        k = k + 1
        pieces[k] = p
      elseif type(p) == "number" then
        k = k + 1
        pieces[k] = tostring(p)
      end
    end
    if k == 0 then return nil, 0 end
    n = k
    s = concat(pieces, "", 1, n)
  end
  for k = n, 2, -1 do pieces[k] = nil end
  pieces[1] = s
  return s, 1
end

local function by_string(a, b)
  return tostring(a) < tostring(b)
end

local function sorted_keys(t)
  local keys, n = {}, 0
  for k in pairs(t) do
    n = n + 1
    keys[n] = k
  end
  if not pcall(sort, keys) then sort(keys, by_string) end -- odd non-numeric index
  return keys, n
end

local function choice_result(st)
  local content, refusal, reasoning
  content, st.nc = joined(st.content, st.nc)
  refusal, st.nr = joined(st.refusal, st.nr)
  reasoning, st.nz = joined(st.reasoning, st.nz)

  local tool_calls = {}
  if st.calls then
    local keys, n = sorted_keys(st.calls)
    for k = 1, n do
      local call = st.calls[keys[k]]
      local args
      args, call.na = joined(call.args, call.na)
      tool_calls[k] = {
        id = call.id,
        type = call.type or "function",
        ["function"] = { name = call.name, arguments = args or "" },
      }
    end
  end
  local has_calls = #tool_calls > 0

  local msg_content = content
  if (msg_content == nil or msg_content == "") and (has_calls or refusal) then
    msg_content = nil
  elseif msg_content == nil then
    msg_content = ""
  end
  local message = {
    role = st.role or "assistant",
    content = msg_content,
    refusal = refusal,
    tool_calls = has_calls and tool_calls or nil,
    reasoning = reasoning,
  }
  return {
    index = st.index,
    text = content or "",
    message = message,
    tool_calls = tool_calls,
    finish_reason = st.finish_reason,
    refusal = refusal,
    reasoning = reasoning,
    logprobs = st.logprobs,
  }
end

-- The Response fields gathered so far (also valid for a broken stream).
function Acc:result()
  local choices = {}
  local keys, n = sorted_keys(self._choices)
  for k = 1, n do
    choices[k] = choice_result(self._choices[keys[k]])
  end
  local first
  for k = 1, n do
    if choices[k].index == 0 then
      first = choices[k]
      break
    end
  end
  local r = {
    id = self.id,
    model = self.model,
    created = self.created,
    system_fingerprint = self.system_fingerprint,
    usage = self.usage,
    done = self._done,
    choices = choices,
    error = self.error,
  }
  if first then
    r.text = first.text
    r.refusal = first.refusal
    r.finish_reason = first.finish_reason
    r.message = first.message
    r.tool_calls = first.tool_calls
    r.reasoning = first.reasoning
    r.logprobs = first.logprobs
  else
    r.text = ""
    r.message = { role = "assistant", content = "" }
    r.tool_calls = {}
  end
  return r
end

M.Accumulator = Acc
return M
