-- slm.mask: a client's personal-data masking (slm.client{ mask_pii = ... },
-- or per request req.mask_pii).  The request's messages are masked with a
-- fresh slm.pii masker before anything is counted, reserved or sent; what
-- comes back (the text, every choice's text and message content, tool call
-- arguments, a refusal, an error's partial reply, and streamed deltas) is
-- unmasked with the same masker, and res.masked holds its counts
-- ({ email = 1, phone = 0, ... }: distinct values replaced).  A streamed
-- delta that ends in what could be the start of a placeholder is held back
-- until the next one completes or clears it (slm.pii's unmasker), so a
-- caller never sees "[EMA" or half a value; a stream that breaks keeps
-- such a tail back, and err.partial.text is what the caller was given.
-- Chunks handed to an on_delta(text, chunk) are as the provider sent
-- them: masked.
local type, ipairs, pairs, setmetatable, concat = type, ipairs, pairs, setmetatable, table.concat

local M = {}

--- A masker for this request (nil when masking is off): req.mask_pii
--- wins over the client's; true = every kind, a table = slm.pii options.
function M.masker(client_opt, req_opt)
  local o = req_opt
  if o == nil then o = client_opt end
  if not o then return nil end
  return require("slm.pii").new(type(o) == "table" and o or nil)
end

--- body.messages masked (a new list; the caller's is left alone).
function M.request(body, m)
  body.messages = m:mask_messages(body.messages)
end

local function counts(m)
  local c = {}
  for k, v in pairs(m.counts) do c[k] = v end
  return c
end

local function unmask_message(m, msg)
  if type(msg) ~= "table" then return end
  if type(msg.content) == "string" then msg.content = m:unmask(msg.content)
  elseif type(msg.content) == "table" then
    for _, p in ipairs(msg.content) do
      if type(p) == "table" and type(p.text) == "string" then p.text = m:unmask(p.text) end
    end
  end
  if type(msg.refusal) == "string" then msg.refusal = m:unmask(msg.refusal) end
end

local function unmask_calls(m, calls, seen)
  if type(calls) ~= "table" or seen[calls] then return end
  seen[calls] = true
  for _, call in ipairs(calls) do
    local f = type(call) == "table" and call["function"]
    if type(f) == "table" and type(f.arguments) == "string" and not seen[f] then
      seen[f] = true
      f.arguments = m:unmask(f.arguments)
    end
  end
end

--- A Response (or an error's partial one) unmasked in place, with res.masked.
function M.response(res, m)
  if type(res) ~= "table" then return res end
  local seen = {}
  if type(res.text) == "string" then res.text = m:unmask(res.text) end
  if type(res.refusal) == "string" then res.refusal = m:unmask(res.refusal) end
  local msgs = {}
  if type(res.message) == "table" then msgs[res.message] = true; unmask_message(m, res.message) end
  unmask_calls(m, res.tool_calls, seen)
  for _, c in ipairs(type(res.choices) == "table" and res.choices or {}) do
    if type(c) == "table" then
      if type(c.text) == "string" then c.text = m:unmask(c.text) end
      if type(c.refusal) == "string" then c.refusal = m:unmask(c.refusal) end
      if type(c.message) == "table" and not msgs[c.message] then
        msgs[c.message] = true
        unmask_message(m, c.message)
      end
      unmask_calls(m, c.tool_calls, seen)
      if type(c.message) == "table" then unmask_calls(m, c.message.tool_calls, seen) end
    end
  end
  if type(res.message) == "table" then unmask_calls(m, res.message.tool_calls, seen) end
  res.masked = counts(m)
  return res
end

--- chat's result (res | nil, err) unmasked; `given`: for a stream, the
--- text the caller was handed (an error's partial text is that).
function M.result(m, res, err, given)
  if res then return M.response(res, m) end
  if type(err) == "table" then
    local p = err.partial
    if type(p) == "table" then
      M.response(p, m)
      if given then
        p.text = given
        if type(p.choices) == "table" and type(p.choices[1]) == "table" then p.choices[1].text = given end
      end
    end
    err.masked = counts(m)
  end
  return res, err
end

--- An on_delta that unmasks: the caller's gets whole text only.  -> the
--- wrapper, flush() (hands the caller what was held, at a clean end) and
--- given() (the text the caller was handed so far).
function M.on_delta(m, on_delta, wants_chunk)
  local feed = m:unmasker()
  local stopped, given = false, {}
  local function deliver(text, chunk)
    if text == "" and not chunk then return end
    if text ~= "" then given[#given + 1] = text end
    if on_delta(text, chunk) == false then stopped = true; return false end
  end
  local wrapper
  if wants_chunk then
    wrapper = function(text, chunk) return deliver(feed(text), chunk) end
  else
    wrapper = function(text)
      local t = feed(text)
      if t ~= "" then return deliver(t) end
    end
  end
  local function flush()
    if stopped then return end
    local rest = feed(nil)
    if rest ~= "" then given[#given + 1] = rest; on_delta(rest, nil) end
  end
  return wrapper, flush, function() return concat(given) end
end

-- A stream whose pieces are unmasked: for text, chunk in s; s:result();
-- s:close(); <close>.
local Masked = {}
Masked.__index = Masked
Masked.__name = "slm.Stream"

function Masked:next()
  while true do
    if self.done then return nil end
    local text, chunk = self.inner:next()
    if text == nil then
      self.done = true
      -- the held tail only at a clean end: a broken stream keeps it back
      local rest = not self.inner.err and self.feed(nil) or ""
      if rest ~= "" then self.given[#self.given + 1] = rest; return rest, nil end
      return nil
    end
    local t = self.feed(text)
    if t ~= "" then self.given[#self.given + 1] = t; return t, chunk end
  end
end
function Masked:__call() return self:next() end
function Masked:close() return self.inner:close() end
Masked.__close = Masked.close
function Masked:result()
  while self:next() ~= nil do end
  local res, err = self.inner:result()
  return M.result(self.m, res, err, concat(self.given))
end

function M.stream(inner, m)
  return setmetatable({ inner = inner, m = m, feed = m:unmasker(), done = false, given = {} }, Masked)
end

return M
