-- slm.json: JSON for lua-slm.
--   encode: our C encoder (csrc/json.c, core.json_encode): integers exact,
--           floats that round-trip, object keys sorted, [] through
--           json.array, strict UTF-8, errors that name the path.
--   decode: the project's own lua-cjson instance (cjson.new(), so our
--           settings never change the caller's cjson module).
local core = require "slm.core"
local cjson_module = require "cjson"

local type, next, getmetatable, setmetatable, error = type, next, getmetatable, setmetatable, error
local json_encode = core.json_encode

local cjson = cjson_module.new()
cjson.decode_max_depth(128)

local M = {
  decode = cjson.decode,
  null = cjson_module.null, -- a NULL light userdata: encodes as null
}

-- Tables with these metatables encode as an array / an object whatever
-- their content; json.array() is the only way to send an empty array.
local ARRAY = { __jsontype = "array" }
local OBJECT = { __jsontype = "object" }
M.array_mt, M.object_mt = ARRAY, OBJECT

local function mark(name, mt)
  return function(t)
    if t == nil then return setmetatable({}, mt) end
    if type(t) ~= "table" then
      error("slm.json." .. name .. ": expected a table or nothing, got " .. type(t), 2)
    end
    local old = getmetatable(t)
    if old ~= nil and old ~= mt then
      error("slm.json." .. name .. ": the table already has a metatable", 2)
    end
    return setmetatable(t, mt)
  end
end
M.array = mark("array", ARRAY)
M.object = mark("object", OBJECT)

-- lua-cjson forks (OpenResty's lua-cjson 2.1.0.x) mark arrays with
-- cjson.empty_array, cjson.array_mt and cjson.empty_array_mt; Debian's
-- 2.1.0 has none of them.  Honour whichever this cjson has.
local compat = {}
if type(cjson_module.empty_array) == "userdata" then compat.empty_array = cjson_module.empty_array end
if type(cjson_module.array_mt) == "table" then compat.array_mt = cjson_module.array_mt end
if type(cjson_module.empty_array_mt) == "table" then compat.empty_array_mt = cjson_module.empty_array_mt end

if next(compat) == nil then
  M.encode = json_encode
else
  M.encode = function(v) return json_encode(v, compat) end
end

-- decode_exact(text): decode, with every integral number as a Lua integer
-- (lua-cjson reads every number as a float: {"id": 3} gives 3.0), those
-- beyond +-2^53 that fit in 64 bits exactly (as a float 12345678901234567
-- would be 12345678901234568).  For data that carries ids and counts (JSON
-- Lines inputs, stored histories), not for replies.  A float with an
-- integral value (2.0) comes back as the integer 2, as JSON writes both
-- as 2; -0.0 stays a float.  Text with a run of 16 digits (the least such
-- an integer has) has its big integer literals outside strings handed to
-- lua-cjson as marked strings, turned back after.  Under LuaJIT (no
-- integers) it is decode.
local math_type, tointeger, tonumber = math.type, math.tointeger, tonumber
local find, sub, byte, concat = string.find, string.sub, string.byte, table.concat
local MARK = "\0slm-int:" -- as it reads decoded ("\u0000slm-int:" in the text)
local LIMIT = 9007199254740992 -- 2^53

-- The text with its big integer literals as marked strings, or nil when it
-- has none (or cannot be scanned: lua-cjson then says what is wrong).
local function mark_big(text)
  local out, n, from, pos = nil, 0, 1, 1
  while true do
    local s = find(text, '[%-%d"]', pos)
    if not s then break end
    if byte(text, s) == 34 then -- a string: to its closing quote
      local j = s + 1
      while true do
        local q = find(text, '["\\]', j)
        if not q then return nil end
        if byte(text, q) == 92 then j = q + 2 else pos = q + 1; break end
      end
    else -- a number: the whole token
      local _, e = find(text, "^[%-%+%.%deE]+", s)
      if e - s >= 15 then
        local tok = sub(text, s, e)
        local v = find(tok, "^%-?%d+$") and tointeger(tonumber(tok))
        if v and (v >= LIMIT or v <= -LIMIT) then
          out = out or {}
          out[n + 1], out[n + 2] = sub(text, from, s - 1), '"\\u0000slm-int:' .. tok .. '"'
          n, from = n + 2, e + 1
        end
      end
      pos = e + 1
    end
  end
  if not out then return nil end
  out[n + 1] = sub(text, from)
  return concat(out)
end

-- Integral floats within +-2^53 (where the float is the number written)
-- and, when `marked`, marked strings to integers, in place.
local function integers(t, marked)
  for k, v in next, t do
    local tv = type(v)
    if tv == "number" then
      if v % 1 == 0 and v > -LIMIT and v < LIMIT and (v ~= 0 or 1 / v > 0) then t[k] = tointeger(v) end
    elseif tv == "table" then
      integers(v, marked)
    elseif marked and tv == "string" and sub(v, 1, #MARK) == MARK then
      t[k] = tointeger(tonumber(sub(v, #MARK + 1)))
    end
  end
end

local decode = cjson.decode
if not tointeger or math_type(LIMIT) ~= "integer" then
  M.decode_exact = decode
else
  function M.decode_exact(text)
    local v, marked
    if type(text) == "string" and find(text, "%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d")
        and not find(text, "u0000slm-int:", 1, true) then
      marked = mark_big(text)
      if marked then
        local ok, r = pcall(decode, marked)
        if ok then v = r else marked = nil end -- lua-cjson's error below, at the text's own positions
      end
    end
    if v == nil then v = decode(text) end
    local tv = type(v)
    if tv == "table" then
      integers(v, marked ~= nil)
    elseif tv == "number" and v % 1 == 0 and v > -LIMIT and v < LIMIT and (v ~= 0 or 1 / v > 0) then
      v = tointeger(v)
    elseif marked and tv == "string" then -- the text was one big integer
      v = tointeger(tonumber(sub(v, #MARK + 1)))
    end
    return v
  end
end

return M
