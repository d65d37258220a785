-- slm.redact: keeps secrets (API keys, passwords in URLs, secret-looking
-- header values) out of everything a user can see or log.
--
--   local set = redact.set{ "sk-...", "hunter2" }   -- strings shorter than 4 are ignored
--   redact.string(s, set)    -> s with every secret replaced by "<redacted>"
--   redact.snippet(s, n, set) -> at most n bytes of s, redacted BEFORE cutting
--   redact.deep(v, set)      -> v, every string in it (tables walked, keys too) redacted in place
--   redact.utf8(s)           -> s with the bytes that are not valid UTF-8 replaced by U+FFFD
--   redact.prefix(s, n)      -> at most n bytes of s, never cutting a UTF-8 character
--
-- Replaced: each secret itself, its JSON-escaped form ("/" as "\/"), and a
-- piece of it left at either end of a text by a cut elsewhere (a prefix of
-- the secret ending the text, a suffix starting it; at least 6 bytes or a
-- quarter of the secret), so that half a key never shows either.
local type, pairs, find, sub, gsub, byte, concat, min, max, floor =
  type, pairs, string.find, string.sub, string.gsub, string.byte, table.concat, math.min, math.max, math.floor
local setmetatable = setmetatable

local M = {}
M.MARK = "<redacted>"
local MARK = M.MARK

local Set = {}
Set.__index = Set

--- A set of secrets (a list of strings; nil and short entries are skipped).
function M.set(list)
  local s = setmetatable({ n = 0 }, Set)
  for _, v in pairs(list or {}) do
    if type(v) == "string" and #v >= 4 then
      s.n = s.n + 1
      s[s.n] = v
      local esc = gsub(v, "/", "\\/")
      if esc ~= v then s.n = s.n + 1; s[s.n] = esc end
    end
  end
  return s
end

local function replace_all(s, secret)
  local i = 1
  while true do
    local a, b = find(s, secret, i, true)
    if not a then return s end
    s = sub(s, 1, a - 1) .. MARK .. sub(s, b + 1)
    i = a + #MARK
  end
end

-- The shortest fragment of a secret worth hiding at a text's edge.
local function edge_min(secret) return max(6, min(#secret, floor(#secret / 4))) end

-- A prefix of `secret` that ends `s`, or a suffix that starts it.
local function hide_edges(s, secret)
  local lo = edge_min(secret)
  for k = min(#secret - 1, #s), lo, -1 do
    if sub(s, -k) == sub(secret, 1, k) then s = sub(s, 1, #s - k) .. MARK; break end
  end
  for k = min(#secret - 1, #s), lo, -1 do
    if sub(s, 1, k) == sub(secret, -k) then s = MARK .. sub(s, k + 1); break end
  end
  return s
end

--- s with every secret of `set` replaced; anything else is returned as is.
function M.string(s, set)
  if type(s) ~= "string" or not set or set.n == 0 then return s end
  for i = 1, set.n do
    local k = set[i]
    if find(s, k, 1, true) then s = replace_all(s, k) end
  end
  for i = 1, set.n do s = hide_edges(s, set[i]) end
  return s
end

-- Cut at most n bytes, never inside a UTF-8 character.
--- At most n bytes of s, never cutting a UTF-8 character.
function M.prefix(s, n)
  if #s <= n then return s end
  local j = n
  while j > 0 do
    local c = s:byte(j + 1)
    if not c or c < 0x80 or c >= 0xC0 then break end
    j = j - 1
  end
  return sub(s, 1, j)
end

local function cut(s, n)
  if #s <= n then return s end
  return M.prefix(s, n) .. "…"
end

--- A short excerpt of untrusted text for a message: whitespace runs
-- collapsed, secrets replaced, then cut to n bytes.
-- Is byte i of s a UTF-8 continuation byte (within lo..hi, 0x80..0xBF by default)?
local function cont(s, i, lo, hi)
  local c = byte(s, i)
  return c ~= nil and c >= (lo or 0x80) and c <= (hi or 0xBF)
end

--- s with every byte that does not start a valid UTF-8 sequence (RFC 3629:
-- no overlong forms, surrogates or code points above U+10FFFF) replaced by
-- U+FFFD: an error message quoting a reply in windows-1251, or a gzip body,
-- must still be text a user can print and log as JSON.
function M.utf8(s)
  if type(s) ~= "string" or not find(s, "[\128-\255]") then return s end
  local out, n, i, start, len = {}, 0, 1, 1, #s
  while i <= len do
    local c, k = byte(s, i), 0
    if c < 0x80 then k = 1
    elseif c >= 0xC2 and c <= 0xDF then k = cont(s, i + 1) and 2 or 0
    elseif c >= 0xE0 and c <= 0xEF then
      local lo, hi = (c == 0xE0) and 0xA0 or 0x80, (c == 0xED) and 0x9F or 0xBF
      k = (cont(s, i + 1, lo, hi) and cont(s, i + 2)) and 3 or 0
    elseif c >= 0xF0 and c <= 0xF4 then
      local lo, hi = (c == 0xF0) and 0x90 or 0x80, (c == 0xF4) and 0x8F or 0xBF
      k = (cont(s, i + 1, lo, hi) and cont(s, i + 2) and cont(s, i + 3)) and 4 or 0
    end
    if k == 0 then
      n = n + 1; out[n] = sub(s, start, i - 1) .. "\239\191\189"
      i = i + 1; start = i
    else
      i = i + k
    end
  end
  if n == 0 then return s end
  out[n + 1] = sub(s, start)
  return concat(out)
end

function M.snippet(s, n, set)
  if type(s) ~= "string" then return s end
  s = gsub(s, "%s+", " ")
  s = M.string(s, set)
  if #s > n + 8 then s = sub(s, 1, n + 8) end -- what the cut below keeps, and a little more
  return cut(M.utf8(s), n)
end

--- Walk v (tables, including keys; cycles are visited once) and redact
-- every string in place; returns v (or the redacted string).
function M.deep(v, set, seen)
  if type(v) == "string" then return M.string(v, set) end
  if type(v) ~= "table" or not set or set.n == 0 then return v end
  seen = seen or {}
  if seen[v] then return v end
  seen[v] = true
  local fix
  for k, x in pairs(v) do
    local nx = M.deep(x, set, seen)
    if nx ~= x then v[k] = nx end
    if type(k) == "string" then
      local nk = M.string(k, set)
      if nk ~= k then fix = fix or {}; fix[k] = nk end
    end
  end
  if fix then
    for k, nk in pairs(fix) do v[nk] = v[k]; v[k] = nil end
  end
  return v
end

return M
