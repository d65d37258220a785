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

return M
