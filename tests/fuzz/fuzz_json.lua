-- fuzz_json.lua - the Lua half of fuzz_json.c: turns fuzz bytes into a Lua
-- value, encodes it with core.json_encode and with a reference encoder
-- written here from the documented rules (README, csrc/json.c), and
-- raises when they disagree or when accepted output is not strict JSON
-- that lua-cjson decodes back to the input.
--
-- Called once with (this directory, valid_json, a non-NULL light userdata);
-- returns run(bytes).
local dir, valid_json, LIGHT = ...
package.path = dir .. "/../../lua/?.lua;" .. package.path

local core = require "slm.core"
local json = require "slm.json"
local cjson = require "cjson"

local enc = core.json_encode
local byte, sub, format, char = string.byte, string.sub, string.format, string.char
local unpack = string.unpack
local mtype, tointeger = math.type, math.tointeger
local concat, sort = table.concat, table.sort

local ARRAY_MT, EMPTY_MT = {}, {} -- the cjson-fork markers, passed as opts
local OPTS = { empty_array = LIGHT, array_mt = ARRAY_MT, empty_array_mt = EMPTY_MT }

---------------------------------------------------------------------------
-- The reference encoder: slow, plain, written from the rules.

local Refuse = {} -- error marker: the reference refuses the value

local function refuse() error(Refuse, 0) end

-- strict UTF-8 by decoding: the code point must need the bytes it used
local function utf8_ok(s)
  local i, n = 1, #s
  while i <= n do
    local b = byte(s, i)
    if b < 0x80 then
      i = i + 1
    else
      local need, cp, min
      if b >= 0xF0 and b <= 0xF4 then need, cp, min = 3, b - 0xF0, 0x10000
      elseif b >= 0xE0 and b <= 0xEF then need, cp, min = 2, b - 0xE0, 0x800
      elseif b >= 0xC2 and b <= 0xDF then need, cp, min = 1, b - 0xC0, 0x80
      else return false end
      if i + need > n then return false end
      for j = 1, need do
        local c = byte(s, i + j)
        if c < 0x80 or c > 0xBF then return false end
        cp = cp * 64 + (c - 0x80)
      end
      if cp < min or cp > 0x10FFFF or (cp >= 0xD800 and cp <= 0xDFFF) then return false end
      i = i + need + 1
    end
  end
  return true
end

local ESC = { [0x22] = '\\"', [0x5C] = "\\\\", [8] = "\\b", [9] = "\\t", [10] = "\\n", [12] = "\\f", [13] = "\\r" }

local function ref_string(s)
  if not utf8_ok(s) then refuse() end
  local out = {}
  for i = 1, #s do
    local b = byte(s, i)
    out[i] = ESC[b] or (b < 0x20 and format("\\u%04x", b)) or char(b)
  end
  return '"' .. concat(out) .. '"'
end

local function ref_number(x)
  if mtype(x) == "integer" then return format("%d", x) end
  if x ~= x or x == math.huge or x == -math.huge then refuse() end
  if x >= -2 ^ 63 and x < 2 ^ 63 and math.floor(x) == x then
    if x == 0 and 1 / x < 0 then return "-0" end
    return format("%d", tointeger(x))
  end
  for p = 15, 17 do
    local s = format("%." .. p .. "g", x)
    if p == 17 or tonumber(s) == x then return s end
  end
end

local ref_value

local function ref_table(t, open)
  if #open >= 64 then refuse() end
  for i = 1, #open do if open[i] == t then refuse() end end
  local kind = "auto"
  local mt = getmetatable(t)
  if mt ~= nil then
    local jt = rawget(mt, "__jsontype")
    if jt == "array" or jt == "object" then kind = jt
    elseif jt ~= nil then refuse()
    elseif open.opts and mt == ARRAY_MT then kind = "array"
    elseif open.opts and mt == EMPTY_MT then kind = "empty_array" end
  end
  local nint, nstr, max, strs = 0, 0, 0, {}
  for k in next, t do
    if mtype(k) == "integer" then
      if k < 1 then refuse() end
      nint = nint + 1
      if k > max then max = k end
    elseif type(k) == "string" then
      nstr = nstr + 1
      strs[nstr] = k
    else
      refuse()
    end
  end
  if nint == 0 and nstr == 0 then
    return (kind == "array" or kind == "empty_array") and "[]" or "{}"
  end
  if nint > 0 and nstr > 0 then refuse() end
  open[#open + 1] = t
  local out = {}
  if nint > 0 then
    if kind == "object" or max ~= nint then refuse() end
    for i = 1, max do out[i] = ref_value(rawget(t, i), open) end
    open[#open] = nil
    return "[" .. concat(out, ",") .. "]"
  end
  if kind == "array" then refuse() end
  sort(strs) -- byte order: the harness runs in the C locale
  for i, k in ipairs(strs) do out[i] = ref_string(k) .. ":" .. ref_value(rawget(t, k), open) end
  open[#open] = nil
  return "{" .. concat(out, ",") .. "}"
end

function ref_value(v, open, opts)
  local tv = type(v)
  if tv == "nil" then return "null"
  elseif tv == "boolean" then return v and "true" or "false"
  elseif tv == "number" then return ref_number(v)
  elseif tv == "string" then return ref_string(v)
  elseif tv == "table" then return ref_table(v, open)
  elseif v == cjson.null then return "null"
  elseif v == LIGHT and open.opts then return "[]"
  end
  refuse()
end

local function reference(v, with_opts)
  local ok, s = pcall(ref_value, v, { opts = with_opts })
  if ok then return s end
  if s ~= Refuse then error(s, 0) end -- a bug in the reference itself
  return nil
end

---------------------------------------------------------------------------
-- Equality of a value and lua-cjson's decode of its JSON.

local function same(a, b)
  if a == LIGHT then return type(b) == "table" and next(b) == nil end
  if type(a) == "table" then
    if type(b) ~= "table" then return false end
    for k, v in next, a do
      if not same(v, b[k]) then return false end
    end
    for k in next, b do
      if rawget(a, k) == nil then return false end
    end
    return true
  end
  if type(a) == "number" then
    -- cjson 2.1.0 decodes every number as a double; exactness of our
    -- digits is checked against the reference, byte for byte
    return type(b) == "number" and (a + 0.0 == b or (a ~= a and b ~= b))
  end
  return a == b or (a == nil and b == cjson.null)
end

---------------------------------------------------------------------------
-- Bytes -> value.

local function reader(s)
  local pos = 1
  local r = {}
  function r.byte()
    local b = byte(s, pos)
    pos = pos + 1
    return b or 0
  end
  function r.bytes(n)
    local piece = sub(s, pos, pos + n - 1)
    pos = pos + n
    return piece .. string.rep("\0", n - #piece)
  end
  function r.left() return pos <= #s end
  return r
end

local function utf8_string(r)
  local parts = {}
  for i = 1, r.byte() % 8 do
    local a, b, c = r.byte(), r.byte(), r.byte()
    local cp = (a * 65536 + b * 256 + c) % 0x110000
    if a % 4 == 0 then cp = cp % 0x80 end -- plenty of ASCII
    parts[i] = utf8.char(cp) -- surrogates included: the encoder must refuse them
  end
  return concat(parts)
end

local function a_string(r)
  local b = r.byte()
  if b % 3 == 0 then return r.bytes(b % 64) end -- raw bytes (past the 40 an error path shows)
  return utf8_string(r)
end

local build

local SPECIAL = { 1 / 0, -1 / 0, 0 / 0, -0.0, 0.0, 2 ^ 53, 2 ^ 53 - 1, 2 ^ 63, -2 ^ 63, math.maxinteger,
  math.mininteger, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 1e300, 0.1, 0.1 + 0.2, 1 / 3 }

local function weird_table(r, depth, stack)
  local b = r.byte() % 10
  local v = build(r, depth + 1, stack)
  if b == 0 then return { v, x = v } end
  if b == 1 then return { [2] = v } end
  if b == 2 then return { [0] = v, v } end
  if b == 3 then return { [1.5] = v } end
  if b == 4 then return { [true] = v } end
  if b == 5 then return { [{}] = v } end
  if b == 6 then -- a constructor puts [k] = keys in the hash part, out of order
    return { [3] = v, [1] = build(r, depth + 1, stack), [2] = build(r, depth + 1, stack) }
  end
  if b == 7 then return json.object{ [1 + r.byte() % 2] = v } end
  if b == 8 then return { a = v, b = v, c = v, [r.byte() % 3] = v } end
  return { [a_string(r)] = v, [-r.byte()] = v }
end

function build(r, depth, stack)
  if not r.left() or depth > 70 then return r.byte() % 2 == 0 end
  local b = r.byte()
  local op = b % 17
  if op == 0 then return cjson.null
  elseif op == 1 then return b >= 128
  elseif op == 2 then return (unpack("<i8", r.bytes(8)))
  elseif op == 3 then return (unpack("<d", r.bytes(8))) -- NaN and inf too
  elseif op == 4 then
    local x = r.byte()
    if b >= 192 then return SPECIAL[1 + x % #SPECIAL] end
    return b >= 128 and (x - 128) / 4 or x - 128
  elseif op == 5 or op == 6 then return a_string(r)
  elseif op == 7 or op == 8 or op == 9 then -- array / json.array / cjson-fork array_mt
    local t = {}
    stack[#stack + 1] = t
    for i = 1, r.byte() % 6 do t[i] = build(r, depth + 1, stack) end
    stack[#stack] = nil
    if op == 8 then json.array(t) elseif op == 9 then setmetatable(t, b >= 128 and ARRAY_MT or EMPTY_MT) end
    return t
  elseif op == 10 or op == 11 then -- object / json.object
    local t = {}
    stack[#stack + 1] = t
    local n = r.byte()
    n = n >= 240 and n - 220 or n % 6 -- sometimes more keys than the insertion sort takes
    for _ = 1, n do t[a_string(r)] = build(r, depth + 1, stack) end
    stack[#stack] = nil
    if op == 11 then json.object(t) end
    return t
  elseif op == 12 then return weird_table(r, depth, stack)
  elseif op == 13 then -- things JSON cannot carry
    local k = r.byte() % 5
    if k == 0 then return print elseif k == 1 then return io.stdout
    elseif k == 2 then return coroutine.running() elseif k == 3 then return LIGHT
    else return setmetatable({}, { __jsontype = a_string(r) }) end
  elseif op == 14 then -- a table seen before: an ancestor (a cycle) or a sibling (shared)
    if #stack == 0 then return {} end
    return stack[1 + r.byte() % #stack]
  elseif op == 15 then -- a deep nest, around the 64 limit
    local n = 56 + r.byte() % 16
    local t = { build(r, depth + 1, stack) }
    for _ = 2, n do t = { t } end
    return t
  else -- an object whose values are arrays of one shared table (a few
    -- per input: nested, each one triples the output)
    r.shared = (r.shared or 0) + 1
    if r.shared > 3 then return {} end
    local shared = { x = build(r, depth + 1, stack) }
    return { a = { shared }, b = { shared, shared } }
  end
end

---------------------------------------------------------------------------

local function run(s)
  local r = reader(s)
  local with_opts = r.byte() % 2 == 1
  local v = build(r, 0, {})
  local ok, out = pcall(enc, v, with_opts and OPTS or nil)
  local want = reference(v, with_opts)
  if not ok then
    if type(out) ~= "string" or not out:find("^slm%.json: .* at %$") then
      error("unexpected error: " .. tostring(out), 0)
    end
    if want then error("encoder refused what the reference encodes as " .. want .. ": " .. out, 0) end
    return
  end
  if not want then error("encoder accepted what the reference refuses: " .. out, 0) end
  if out ~= want then error("encoder and reference differ:\n  " .. out .. "\n  " .. want, 0) end
  if not valid_json(out) then error("not strict JSON: " .. out, 0) end
  local dok, back = pcall(cjson.decode, out)
  if not dok then error("lua-cjson cannot decode " .. out .. ": " .. tostring(back), 0) end
  if not same(v, back) then error("lua-cjson decodes " .. out .. " to something else", 0) end
  -- the Lua module agrees with the C function it wraps
  if not with_opts and json.encode(v) ~= out then error("slm.json.encode differs", 0) end
end

return run
