-- slm.schema: the JSON-schema subset that structured output is checked
-- against, the lenient reader of a model's JSON reply, and the copy of a
-- schema that OpenAI's strict structured outputs accept.
--
--   local v = schema.compile(s)             -- raises at once on what it cannot honour
--   local ok, errs = v:validate(value)      -- true | false, { { path, message, keyword }, ... }
--   local ok, errs = schema.validate(s, value)   -- compiled once per schema table (weak cache)
--   local value, why = schema.parse_lenient(text)
--   local s2, why = schema.for_openai_strict(s)  -- nil, why when s has no strict form
--   schema.from_openai_strict(s, value)     -- the nulls strict mode put for optional properties, removed
--
-- The subset (anything else raises at compile, naming the keyword and
-- where it stands: "slm.schema: unsupported keyword 'uniqueItems' at
-- $.properties.tags"):
--   type            "object" "array" "string" "number" "integer" "boolean"
--                   "null", or a non-empty list of them; `nullable: true`
--                   (OpenAPI) beside it also accepts null, and a null it
--                   accepts is checked no further (enum, const)
--   properties, required, additionalProperties (true | false | a schema;
--                   absent = true)
--   enum (non-empty list), const                 values compared as JSON
--   items (one schema), minItems, maxItems
--   minimum, maximum, exclusiveMinimum, exclusiveMaximum (numbers, draft
--                   2020), multipleOf (> 0; x / m within 1e-9 of an integer)
--   minLength, maxLength                         in characters of UTF-8
--   pattern         the regex subset below; unanchored (search), as in
--                   JSON Schema
--   anyOf, oneOf (exactly one), allOf            non-empty lists of schemas
--   $ref            "#" or "#/..." (a JSON pointer into this schema:
--                   "#/$defs/name", "#/definitions/name"); siblings apply
--                   too (draft 2020). $defs, definitions: tables of schemas
--   true, false     as schemas: anything, nothing
--   ignored (no constraint): title, description, default, examples,
--                   $comment, deprecated, readOnly, writeOnly, format
--                   (NOT checked), and at the root only $schema, $id,
--                   name, strict
-- Type-specific keywords apply only to values of their type (minimum says
-- nothing about a string), as JSON Schema has it.
--
-- Values are what slm.json.decode (lua-cjson) gives: null is slm.json.null,
-- numbers are floats ("integer" means integral and finite; NaN and the
-- infinities are no numbers), `{}` is both an empty array and an empty
-- object (a table marked by slm.json.array / slm.json.object is only that),
-- a non-empty array is a sequence 1..n, and a table with other keys is
-- neither. Error paths use JSON's 0-based indices: $.items[2].price,
-- $["user id"] for a key that is no identifier. All errors of a value are
-- reported, up to max_errors (20; errs.truncated is set when more were
-- found).
--
-- Patterns: literals, ".", classes [a-z0-9_] [^...], \d \w \s \D \W \S,
-- \n \r \t \f \v \0 \xHH \uHHHH, any escaped ASCII punctuation, anchors ^ $,
-- groups ( ) (?: ) (?<name> ), alternation |, and the quantifiers * + ?
-- {n} {n,} {n,m} (n, m <= 1000; a lazy "?" after one is accepted: it does
-- not change whether a string matches). Code points, not bytes; "." matches
-- anything but \n \r U+2028 U+2029, $ only the very end, as ECMA-262 without
-- flags. Anything else (backreferences, lookaround, \b, \p{..}, a lone { } or
-- ]) raises at compile with its position. The matcher simulates the NFA
-- (every state at once, Thompson/Pike): its time is the string's length
-- times the pattern's size at most, and no input makes it backtrack.
-- Counts are capped at 1,000 and programs at 20,000 instructions.
local json = require "slm.json"

local type, pairs, ipairs, next, tostring, tonumber, error, pcall, setmetatable, getmetatable, rawget =
  type, pairs, ipairs, next, tostring, tonumber, error, pcall, setmetatable, getmetatable, rawget
local byte, char, sub, find, format, gsub, lower, gmatch =
  string.byte, string.char, string.sub, string.find, string.format, string.gsub, string.lower, string.gmatch
local floor, huge, abs, min = math.floor, math.huge, math.abs, math.min
local concat, sort = table.concat, table.sort

local NULL = json.null

local M = {}
M.MAX_ERRORS = 20

-- lua-cjson forks mark decoded arrays (OpenResty's decode_array_with_array_mt)
local cjson_module = require "cjson"
local CJ_ARRAY_MT = type(cjson_module.array_mt) == "table" and cjson_module.array_mt or nil
local CJ_EMPTY_ARRAY_MT = type(cjson_module.empty_array_mt) == "table" and cjson_module.empty_array_mt or nil
local CJ_EMPTY_ARRAY = type(cjson_module.empty_array) == "userdata" and cjson_module.empty_array or nil

---------------------------------------------------------------- small helpers

local function is_finite(x) return x == x and x ~= huge and x ~= -huge end

-- A number as a person writes it: integers without ".0", else the shortest
-- of %.15g..%.17g that reads back equal.
local function num_str(x)
  if x ~= x then return "NaN" end
  if x == huge then return "inf" end
  if x == -huge then return "-inf" end
  if floor(x) == x and abs(x) < 1e15 then return format("%d", x) end
  for p = 15, 16 do
    local s = format("%." .. p .. "g", x)
    if tonumber(s) == x then return s end
  end
  return format("%.17g", x)
end

local ESC = { ['"'] = '\\"', ["\\"] = "\\\\", ["\n"] = "\\n", ["\r"] = "\\r", ["\t"] = "\\t" }
local function esc_char(c) return ESC[c] or format("\\u%04x", byte(c)) end

-- A JSON string literal of s (for paths and messages).
local function quote(s)
  return '"' .. gsub(s, '[%c"\\]', esc_char) .. '"'
end

-- A string for a message: quoted, cut to about 40 characters on a
-- character boundary.
local function show_str(s)
  if #s > 40 then
    local cut = 40
    while cut > 30 do
      local b = byte(s, cut + 1)
      if not b or b < 0x80 or b >= 0xC0 then break end
      cut = cut - 1
    end
    return quote(sub(s, 1, cut)) .. "..."
  end
  return quote(s)
end

-- Characters of a UTF-8 string: bytes that do not continue a sequence.
local function utf8_len(s)
  if not find(s, "[\128-\255]") then return #s end
  local n = 0
  for i = 1, #s do
    local b = byte(s, i)
    if b < 0x80 or b >= 0xC0 then n = n + 1 end
  end
  return n
end

local function is_ident(k) return find(k, "^[%a_][%w_]*$") ~= nil end

-- A path step: .name, ["user id"], [3]
local function step_str(k)
  if type(k) == "number" then return "[" .. format("%d", k) .. "]" end
  if is_ident(k) then return "." .. k end
  return "[" .. quote(k) .. "]"
end

-- A table that is a sequence 1..n (n >= 1) and nothing else.
local function is_list(t)
  if type(t) ~= "table" then return false end
  local n = #t
  if n == 0 then return false end
  local c = 0
  for k in pairs(t) do
    if type(k) ~= "number" or k < 1 or k > n or floor(k) ~= k then return false end
    c = c + 1
  end
  return c == n
end

-- What a table value is in JSON: "array", "object", "empty" (either) or
-- "mixed" (neither).
local function table_kind(t)
  local forced
  local mt = getmetatable(t)
  if mt ~= nil then
    local jt = type(mt) == "table" and rawget(mt, "__jsontype") or nil
    if jt == "array" or mt == CJ_ARRAY_MT or mt == CJ_EMPTY_ARRAY_MT then
      forced = "array"
    elseif jt == "object" then
      forced = "object"
    end
  end
  if next(t) == nil then return forced or "empty" end
  local n = #t
  if n > 0 then
    if forced == "object" then return "mixed" end
    local c = 0
    for k in pairs(t) do
      if type(k) ~= "number" or k < 1 or k > n or floor(k) ~= k then return "mixed" end
      c = c + 1
    end
    return c == n and "array" or "mixed"
  end
  if forced == "array" then return "mixed" end
  for k in pairs(t) do
    if type(k) ~= "string" then return "mixed" end
  end
  return "object"
end

-- The JSON kind of any Lua value: "string" "number" "boolean" "null"
-- "array" "object" "empty" "mixed" "nonfinite", or Lua's type name.
local function kind_of(v)
  local tv = type(v)
  if tv == "table" then return table_kind(v) end
  if tv == "number" then return is_finite(v) and "number" or "nonfinite" end
  if v == NULL then return "null" end
  if CJ_EMPTY_ARRAY ~= nil and v == CJ_EMPTY_ARRAY then return "array" end
  return tv
end

-- "got ..." of a type error
local function got(v, kind)
  if kind == "string" then return "string " .. show_str(v) end
  if kind == "number" then return "number " .. num_str(v) end
  if kind == "nonfinite" then return num_str(v) .. " (not a JSON number)" end
  if kind == "boolean" then return "boolean " .. tostring(v) end
  if kind == "null" then return "null" end
  if kind == "empty" then return "{}" end
  if kind == "mixed" then return "a table with both array and object keys" end
  if kind == "array" or kind == "object" then return kind end
  if kind == "nil" then return "nothing" end
  return "a " .. kind
end

-- A value in a message (enum lists, const)
local function show(v)
  local tv = type(v)
  if tv == "string" then return show_str(v) end
  if tv == "number" then return num_str(v) end
  if tv == "boolean" then return tostring(v) end
  if v == NULL then return "null" end
  if tv == "table" then
    local ok, text = pcall(json.encode, v)
    if ok then return #text > 60 and sub(text, 1, 57) .. "..." or text end
    return table_kind(v) == "array" and "an array" or "a table"
  end
  return tostring(v)
end

-- Equality as JSON sees it (numbers by value, tables by content).
local function json_equal(a, b, depth)
  if a == b then return true end
  if type(a) ~= "table" or type(b) ~= "table" then return false end
  depth = (depth or 0) + 1
  if depth > 64 then return false end
  local ka, kb = table_kind(a), table_kind(b)
  if ka ~= kb and not (ka == "empty" or kb == "empty") then return false end
  for k, va in pairs(a) do
    local vb = b[k]
    if vb == nil or not json_equal(va, vb, depth) then return false end
  end
  for k in pairs(b) do
    if a[k] == nil then return false end
  end
  return true
end

local function deep_copy(v, depth)
  if type(v) ~= "table" then return v end
  depth = (depth or 0) + 1
  if depth > 200 then error("slm.schema: a table nested deeper than 200 (a cycle?)", 0) end
  local t = {}
  for k, x in pairs(v) do t[k] = deep_copy(x, depth) end
  local mt = getmetatable(v)
  if mt ~= nil and type(mt) == "table" and rawget(mt, "__jsontype") then setmetatable(t, mt) end
  return t
end

---------------------------------------------------------------- patterns

-- Opcodes of a compiled pattern (parallel arrays op/x/y/cls).
local CHAR, ANY, CLASS, SPLIT, JMP, BOL, EOL, MATCH = 1, 2, 3, 4, 5, 6, 7, 8
local MAX_REPEAT, MAX_PROGRAM = 1000, 20000

-- One character of UTF-8 at i: code point, next index. A byte that does
-- not start a well-formed sequence is the code point -1, alone.
local function utf8_at(s, i, b)
  local n, c
  if b < 0x80 then return b, i + 1
  elseif b < 0xC2 then return -1, i + 1
  elseif b < 0xE0 then n, c = 1, b - 0xC0
  elseif b < 0xF0 then n, c = 2, b - 0xE0
  elseif b < 0xF5 then n, c = 3, b - 0xF0
  else return -1, i + 1 end
  for j = i + 1, i + n do
    local d = byte(s, j)
    if not d or d < 0x80 or d > 0xBF then return -1, i + 1 end
    c = c * 64 + (d - 0x80)
  end
  if (n == 2 and (c < 0x800 or (c >= 0xD800 and c <= 0xDFFF))) or (n == 3 and (c < 0x10000 or c > 0x10FFFF)) then
    return -1, i + 1
  end
  return c, i + n + 1
end

local RANGES = {
  d = { 48, 57 },
  w = { 48, 57, 65, 90, 95, 95, 97, 122 },
  s = { 9, 13, 32, 32, 0xA0, 0xA0, 0x1680, 0x1680, 0x2000, 0x200A, 0x2028, 0x2029,
        0x202F, 0x202F, 0x205F, 0x205F, 0x3000, 0x3000, 0xFEFF, 0xFEFF },
}

local function add_range(dst, lo, hi)
  local n = #dst
  dst[n + 1] = lo
  dst[n + 2] = hi
end

-- sorted, merged ranges
local function normalize(r)
  local pairs_ = {}
  for i = 1, #r, 2 do pairs_[#pairs_ + 1] = { r[i], r[i + 1] } end
  sort(pairs_, function(a, b) return a[1] < b[1] end)
  local out = {}
  for _, p in ipairs(pairs_) do
    local n = #out
    if n > 0 and p[1] <= out[n] + 1 then
      if p[2] > out[n] then out[n] = p[2] end
    else
      out[n + 1], out[n + 2] = p[1], p[2]
    end
  end
  return out
end

local function complement(r)
  r = normalize(r)
  local out, lo = {}, 0
  for i = 1, #r, 2 do
    if r[i] > lo then add_range(out, lo, r[i] - 1) end
    lo = r[i + 1] + 1
  end
  if lo <= 0x10FFFF then add_range(out, lo, 0x10FFFF) end
  return out
end

local function add_ranges(dst, r)
  for i = 1, #r do dst[#dst + 1] = r[i] end
end

-- A class: ranges plus a 128-entry table for ASCII, negation folded in.
local function make_class(ranges, neg)
  ranges = normalize(ranges)
  local ascii = {}
  for c = 0, 127 do
    local inside = false
    for i = 1, #ranges, 2 do
      if c >= ranges[i] and c <= ranges[i + 1] then inside = true; break end
    end
    ascii[c] = inside ~= neg
  end
  return { ranges = ranges, neg = neg, ascii = ascii }
end

local function class_has(cl, c)
  if c >= 0 and c < 128 then return cl.ascii[c] end
  local r = cl.ranges
  local inside = false
  for i = 1, #r, 2 do
    if c < r[i] then break end
    if c <= r[i + 1] then inside = true; break end
  end
  return inside ~= cl.neg
end

-- Parse a pattern into a tree. Raises { re_error = msg, pos = character }.
local function parse_pattern(src)
  local cps = {}
  do
    local i = 1
    while i <= #src do
      local c, ni = utf8_at(src, i, byte(src, i))
      if c < 0 then error({ re_error = "the pattern is not valid UTF-8", pos = #cps + 1 }, 0) end
      cps[#cps + 1] = c
      i = ni
    end
  end
  local pos, n = 1, #cps

  local function fail(msg, at) error({ re_error = msg, pos = at or pos }, 0) end
  local function peek() return cps[pos] end
  local function ch(c) return c and char(c) or "" end -- ASCII only, for comparisons

  local function hex(count, at)
    local v = 0
    for _ = 1, count do
      local c = cps[pos]
      local d = c and (c >= 48 and c <= 57 and c - 48 or c >= 65 and c <= 70 and c - 55 or c >= 97 and c <= 102 and c - 87)
      if not d then fail("expected " .. count .. " hex digits", at) end
      v = v * 16 + d
      pos = pos + 1
    end
    return v
  end

  -- After a backslash: a code point, or a range list (for \d and friends).
  local function escape(in_class)
    local at = pos - 1
    local c = cps[pos]
    if not c then fail("a pattern cannot end with a backslash", at) end
    pos = pos + 1
    if c < 128 then
      local e = char(c)
      local lo = lower(e)
      if RANGES[lo] then
        if e == lo then return nil, RANGES[lo] end
        return nil, complement(RANGES[lo])
      end
      if e == "n" then return 10 elseif e == "r" then return 13 elseif e == "t" then return 9
      elseif e == "f" then return 12 elseif e == "v" then return 11 end
      if e == "0" then
        local d = cps[pos]
        if d and d >= 48 and d <= 57 then fail("octal escapes are not supported", at) end
        return 0
      end
      if e == "x" then return hex(2, at) end
      if e == "u" then
        if cps[pos] == 123 then fail("\\u{...} is not supported (use \\uHHHH)", at) end
        return hex(4, at)
      end
      if e == "b" and in_class then return 8 end
      if e == "b" or e == "B" then fail("word boundaries (\\b, \\B) are not supported", at) end
      if find(e, "%d") then fail("backreferences are not supported", at) end
      if e == "p" or e == "P" then fail("Unicode property escapes (\\p{...}) are not supported", at) end
      if find(e, "%w") then fail("unknown escape \\" .. e, at) end
      return c -- escaped punctuation
    end
    return c
  end

  local function class()
    local start = pos - 1
    local neg = false
    if cps[pos] == 94 then neg = true; pos = pos + 1 end -- ^
    local ranges = {}
    if cps[pos] == 93 then fail("an empty character class [] matches nothing", start) end
    while true do
      local c = cps[pos]
      if not c then fail("unterminated character class", start) end
      if c == 93 then pos = pos + 1; break end -- ]
      local lo, set
      pos = pos + 1
      if c == 92 then lo, set = escape(true) else lo = c end
      if set then
        add_ranges(ranges, set)
      elseif cps[pos] == 45 and cps[pos + 1] and cps[pos + 1] ~= 93 then -- a range a-z
        local dash = pos
        pos = pos + 1
        local c2 = cps[pos]
        pos = pos + 1
        local hi, set2
        if c2 == 92 then hi, set2 = escape(true) else hi = c2 end
        if set2 then fail("a range cannot end with a class escape", dash) end
        if hi < lo then fail("a range out of order", dash) end
        add_range(ranges, lo, hi)
      else
        add_range(ranges, lo, lo)
      end
    end
    return { t = "class", cl = make_class(ranges, neg) }
  end

  local alternation
  local depth = 0

  local function atom()
    local c = cps[pos]
    local e = ch(c < 128 and c or nil)
    local at = pos
    pos = pos + 1
    if e == "(" then
      if cps[pos] == 63 then -- ?
        local k = cps[pos + 1]
        if k == 58 then pos = pos + 2 -- (?:
        elseif k == 60 and cps[pos + 2] ~= 61 and cps[pos + 2] ~= 33 then -- (?<name>
          pos = pos + 2
          while cps[pos] and cps[pos] ~= 62 do pos = pos + 1 end
          if not cps[pos] then fail("unterminated group name", at) end
          pos = pos + 1
        else
          fail("lookaround and other (?...) groups are not supported", at)
        end
      end
      depth = depth + 1
      if depth > 50 then fail("groups nested deeper than 50", at) end
      local inner = alternation()
      if cps[pos] ~= 41 then fail("unterminated group", at) end
      pos = pos + 1
      depth = depth - 1
      return inner
    elseif e == "[" then return class()
    elseif e == "." then return { t = "any" }
    elseif e == "^" then return { t = "bol" }
    elseif e == "$" then return { t = "eol" }
    elseif e == "\\" then
      local cp, set = escape(false)
      if set then return { t = "class", cl = make_class(set, false) } end
      return { t = "char", c = cp }
    elseif e == ")" then fail("unmatched )", at)
    elseif e == "]" or e == "{" or e == "}" then fail("a lone " .. e .. " (escape it as \\" .. e .. ")", at)
    elseif e == "*" or e == "+" or e == "?" then fail("nothing to repeat before " .. e, at)
    end
    return { t = "char", c = c }
  end

  local function number()
    local v, start = 0, pos
    while cps[pos] and cps[pos] >= 48 and cps[pos] <= 57 do
      v = v * 10 + cps[pos] - 48
      pos = pos + 1
      if v > MAX_REPEAT then fail("a repetition count above " .. MAX_REPEAT, start) end
    end
    if pos == start then return nil end
    return v
  end

  local function quantified()
    local at = pos
    local a = atom()
    local c = cps[pos]
    local lo, hi
    if c == 42 then lo, hi = 0, nil; pos = pos + 1
    elseif c == 43 then lo, hi = 1, nil; pos = pos + 1
    elseif c == 63 then lo, hi = 0, 1; pos = pos + 1
    elseif c == 123 then
      local q = pos
      pos = pos + 1
      lo = number()
      if not lo then fail("a lone { (escape it as \\{)", q) end
      hi = lo
      if cps[pos] == 44 then
        pos = pos + 1
        hi = number()
        if hi and hi < lo then fail("{n,m} with m < n", q) end
      end
      if cps[pos] ~= 125 then fail("an unterminated {n,m}", q) end
      pos = pos + 1
    else
      return a
    end
    if a.t == "bol" or a.t == "eol" then fail("nothing to repeat (an anchor)", at) end
    if cps[pos] == 63 then pos = pos + 1 end -- lazy: the same set of matches
    local nc = cps[pos]
    if nc == 42 or nc == 43 or nc == 63 or nc == 123 then fail("a quantifier after a quantifier", pos) end
    return { t = "rep", node = a, min = lo, max = hi }
  end

  local function sequence()
    local list = {}
    while pos <= n and cps[pos] ~= 124 and cps[pos] ~= 41 do
      list[#list + 1] = quantified()
    end
    return { t = "cat", list = list }
  end

  alternation = function()
    local alts = { sequence() }
    while cps[pos] == 124 do
      pos = pos + 1
      alts[#alts + 1] = sequence()
    end
    if #alts == 1 then return alts[1] end
    return { t = "alt", list = alts }
  end

  local tree = alternation()
  if pos <= n then fail("unmatched )") end
  return tree
end

-- Emit the program of a tree.
local function emit(P, node)
  local t = node.t
  local function put(o, a, b)
    local pc = #P.op + 1
    if pc > MAX_PROGRAM then error({ re_error = "the pattern is too large once its repetitions are expanded", pos = 1 }, 0) end
    P.op[pc], P.x[pc], P.y[pc] = o, a or 0, b or 0
    return pc
  end
  if t == "char" then put(CHAR, node.c)
  elseif t == "any" then put(ANY)
  elseif t == "class" then local pc = put(CLASS); P.cls[pc] = node.cl
  elseif t == "bol" then put(BOL)
  elseif t == "eol" then put(EOL)
  elseif t == "cat" then
    for i = 1, #node.list do emit(P, node.list[i]) end
  elseif t == "alt" then
    local jumps = {}
    for i = 1, #node.list do
      if i < #node.list then
        local split = put(SPLIT)
        P.x[split] = split + 1
        emit(P, node.list[i])
        jumps[#jumps + 1] = put(JMP)
        P.y[split] = #P.op + 1
      else
        emit(P, node.list[i])
      end
    end
    for _, j in ipairs(jumps) do P.x[j] = #P.op + 1 end
  elseif t == "rep" then
    for _ = 1, node.min do emit(P, node.node) end
    if node.max == nil then
      local split = put(SPLIT)
      P.x[split] = split + 1
      emit(P, node.node)
      local j = put(JMP)
      P.x[j] = split
      P.y[split] = #P.op + 1
    else
      local splits = {}
      for _ = node.min + 1, node.max do
        local split = put(SPLIT)
        P.x[split] = split + 1
        splits[#splits + 1] = split
        emit(P, node.node)
      end
      for _, s in ipairs(splits) do P.y[s] = #P.op + 1 end
    end
  end
end

local Regex = {}
Regex.__index = Regex

-- Compile a pattern: a Regex, or nil, message, character position.
local function compile_regex(src)
  local ok, res = pcall(function()
    local tree = parse_pattern(src)
    local P = { op = {}, x = {}, y = {}, cls = {} }
    emit(P, tree)
    local last = #P.op + 1
    P.op[last], P.x[last], P.y[last] = MATCH, 0, 0
    -- anchored: every way through starts with ^ (only the whole-tree case)
    P.anchored = (tree.t == "bol") or (tree.t == "cat" and tree.list[1] and tree.list[1].t == "bol") or false
    return P
  end)
  if not ok then
    if type(res) == "table" and res.re_error then return nil, res.re_error, res.pos end
    error(res, 0)
  end
  res.source = src
  res.mark, res.gen, res.l1, res.l2 = {}, 0, { n = 0 }, { n = 0 }
  return setmetatable(res, Regex)
end

-- Follow the empty moves from pc at byte position i (of len), adding the
-- states that read a character to list; true when MATCH is reached.
local function add_state(P, list, pc, i, len)
  local op, mark, gen = P.op, P.mark, P.gen
  while true do
    if mark[pc] == gen then return false end
    mark[pc] = gen
    local o = op[pc]
    if o == JMP then
      pc = P.x[pc]
    elseif o == SPLIT then
      if add_state(P, list, P.x[pc], i, len) then return true end
      pc = P.y[pc]
    elseif o == BOL then
      if i ~= 1 then return false end
      pc = pc + 1
    elseif o == EOL then
      if i <= len then return false end
      pc = pc + 1
    elseif o == MATCH then
      return true
    else
      local n = list.n + 1
      list.n = n
      list[n] = pc
      return false
    end
  end
end

--- Does the pattern match somewhere in s?
function Regex:test(s)
  local len = #s
  local op, x, cls, mark = self.op, self.x, self.cls, self.mark
  local clist, nlist = self.l1, self.l2
  local gen = self.gen + 1
  self.gen = gen
  clist.n = 0
  if add_state(self, clist, 1, 1, len) then return true end
  local anchored = self.anchored
  local first_reads = op[1] <= CLASS
  local i = 1
  while i <= len do
    local cn = clist.n
    if cn == 0 and anchored then return false end
    local c, ni = byte(s, i), i + 1
    if c >= 0x80 then c, ni = utf8_at(s, i, c) end
    gen = gen + 1
    self.gen = gen
    nlist.n = 0
    for k = 1, cn do
      local pc = clist[k]
      local o = op[pc]
      local hit
      if o == CHAR then
        hit = x[pc] == c
      elseif o == ANY then
        hit = c ~= 10 and c ~= 13 and c ~= 0x2028 and c ~= 0x2029
      else
        local cl = cls[pc]
        if c >= 0 and c < 128 then hit = cl.ascii[c] else hit = class_has(cl, c) end
      end
      if hit then
        local nx = pc + 1
        if op[nx] <= CLASS then
          -- a state that reads: no empty moves to follow
          if mark[nx] ~= gen then
            mark[nx] = gen
            local n = nlist.n + 1
            nlist.n = n
            nlist[n] = nx
          end
        elseif add_state(self, nlist, nx, ni, len) then
          return true
        end
      end
    end
    if not anchored then
      if first_reads then
        if mark[1] ~= gen then
          mark[1] = gen
          local n = nlist.n + 1
          nlist.n = n
          nlist[n] = 1
        end
      elseif add_state(self, nlist, 1, ni, len) then
        return true
      end
    end
    clist, nlist = nlist, clist
    i = ni
  end
  return false
end

--- schema.regex(src) -> regex (regex:test(s) -> boolean) | nil, message, position
M.regex = compile_regex

---------------------------------------------------------------- compile

local TYPES = { object = true, array = true, string = true, number = true, integer = true, boolean = true, null = true }
local ARTICLE = { object = "an object", array = "an array", string = "a string", number = "a number",
                  integer = "an integer", boolean = "a boolean", null = "null" }

-- Keywords with a meaning here; annotations ignored anywhere; at the root only.
local HANDLED = {
  type = true, nullable = true, properties = true, required = true, additionalProperties = true,
  enum = true, const = true, items = true, minItems = true, maxItems = true,
  minimum = true, maximum = true, exclusiveMinimum = true, exclusiveMaximum = true, multipleOf = true,
  minLength = true, maxLength = true, pattern = true, anyOf = true, oneOf = true, allOf = true,
  ["$ref"] = true, ["$defs"] = true, definitions = true, format = true,
}
local IGNORED = { title = true, description = true, default = true, examples = true, ["$comment"] = true,
                  deprecated = true, readOnly = true, writeOnly = true }
local ROOT_ONLY = { ["$schema"] = true, ["$id"] = true, name = true, strict = true }

-- A schema we cannot honour: raised inside, re-raised at the caller's level.
local SchemaError = {}
local function bad(path, msg)
  error(setmetatable({ msg = "slm.schema: " .. msg .. " at " .. path }, SchemaError), 0)
end
local function rethrow(e, level)
  if getmetatable(e) == SchemaError then error(e.msg, level + 1) end
  error(e, 0)
end

local EMPTY = {}                  -- true, {}: anything
local NEVER = { never = true }    -- false: nothing

local function type_msg(list)
  local parts = {}
  for i = 1, #list do parts[i] = ARTICLE[list[i]] end
  if #parts == 1 then return parts[1] end
  return concat(parts, ", ", 1, #parts - 1) .. " or " .. parts[#parts]
end

local function string_keys(t)
  for k in pairs(t) do
    if type(k) ~= "string" then return false end
  end
  return true
end

-- Keys in byte order: compile and convert walk tables the same way under
-- every Lua, so the same schema raises the same error everywhere.
local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  sort(keys)
  return keys
end

local function nonneg_int(s, k, path)
  local v = s[k]
  if v ~= nil and (type(v) ~= "number" or not is_finite(v) or v < 0 or floor(v) ~= v) then
    bad(path, "'" .. k .. "' must be a non-negative integer")
  end
  return v
end

local function finite_num(s, k, path)
  local v = s[k]
  if v == nil then return nil end
  if type(v) == "boolean" and (k == "exclusiveMinimum" or k == "exclusiveMaximum") then
    bad(path, "'" .. k .. "' must be a number (draft 2020); the boolean form of draft 4 is not supported")
  end
  if type(v) ~= "number" or not is_finite(v) then bad(path, "'" .. k .. "' must be a finite number") end
  return v
end

-- The schema a "#..." pointer names, and its path.
local function resolve_pointer(root, ref, path)
  if ref == "#" then return root, "$" end
  if sub(ref, 1, 2) ~= "#/" then
    bad(path, "unsupported $ref " .. quote(ref) .. " (only \"#\" and \"#/...\" into this schema)")
  end
  local t, p = root, "$"
  for seg in gmatch(sub(ref, 3) .. "/", "([^/]*)/") do
    seg = gsub(seg, "%%(%x%x)", function(h) return char(tonumber(h, 16)) end)
    seg = gsub(gsub(seg, "~1", "/"), "~0", "~")
    local nxt
    if type(t) == "table" then
      if is_list(t) and find(seg, "^%d+$") then
        nxt = t[tonumber(seg) + 1]
        p = p .. "[" .. seg .. "]"
      else
        nxt = t[seg]
        p = p .. step_str(seg)
      end
    end
    if nxt == nil then bad(path, "$ref " .. quote(ref) .. " points to nothing") end
    t = nxt
  end
  if type(t) ~= "table" and type(t) ~= "boolean" then bad(path, "$ref " .. quote(ref) .. " points to no schema") end
  return t, p
end

local NUM_BOUNDS = {
  { "minimum", ">=", "must be >= %s, got " }, { "maximum", "<=", "must be <= %s, got " },
  { "exclusiveMinimum", ">", "must be > %s, got " }, { "exclusiveMaximum", "<", "must be < %s, got " },
  { "multipleOf", "multiple", "must be a multiple of %s, got " },
}

local build

local function build_list(C, s, k, path)
  local list = s[k]
  if not is_list(list) then bad(path, "'" .. k .. "' must be a non-empty list of schemas") end
  local out = {}
  for i = 1, #list do out[i] = build(C, list[i], path .. "." .. k .. "[" .. (i - 1) .. "]") end
  return out
end

local function build_enum(node, list, path)
  if not is_list(list) then bad(path, "'enum' must be a non-empty list") end
  local set, tables, shown = {}, nil, {}
  for i = 1, #list do
    local x = list[i]
    local tx = type(x)
    if tx == "table" then
      tables = tables or {}
      tables[#tables + 1] = x
    elseif tx == "string" or tx == "boolean" or x == NULL or (tx == "number" and is_finite(x)) then
      set[x] = true
    else
      bad(path, "'enum' holds a value JSON does not have (" .. tostring(x) .. ")")
    end
    if i <= 10 then shown[i] = show(x) end
  end
  local msg = "must be one of " .. concat(shown, ", ")
  if #list > 10 then msg = msg .. ", ... (" .. #list .. " values)" end
  node.enum, node.enum_set, node.enum_tables, node.enum_msg = true, set, tables, msg
end

build = function(C, s, path)
  if s == true then return EMPTY end
  if s == false then return NEVER end
  if type(s) ~= "table" then bad(path, "a schema must be an object or a boolean, got " .. type(s)) end
  local node = C.memo[s]
  if node then return node end
  node = {}
  C.memo[s] = node
  C.paths[node] = path
  C.nodes[#C.nodes + 1] = node

  local unknown
  for k in pairs(s) do
    if type(k) ~= "string" then bad(path, "a schema must be an object (a table with string keys)") end
    if not (HANDLED[k] or IGNORED[k] or (ROOT_ONLY[k] and s == C.root)) then
      unknown = unknown or {}
      unknown[#unknown + 1] = k
    end
  end
  if unknown then
    sort(unknown)
    local k = unknown[1]
    if ROOT_ONLY[k] then bad(path, "keyword '" .. k .. "' is accepted at the root only") end
    bad(path, "unsupported keyword '" .. k .. "'")
  end

  -- type, nullable
  local nullable = s.nullable
  if nullable ~= nil and type(nullable) ~= "boolean" then bad(path, "'nullable' must be a boolean") end
  local t = s.type
  if t ~= nil then
    local names
    if type(t) == "string" then names = { t }
    elseif is_list(t) then names = t
    else bad(path, "'type' must be a type name or a non-empty list of them") end
    local set, list = {}, {}
    for i = 1, #names do
      local name = names[i]
      if type(name) ~= "string" or not TYPES[name] then
        bad(path, "unknown type " .. (type(name) == "string" and quote(name) or tostring(name)))
      end
      if not set[name] then set[name] = true; list[#list + 1] = name end
    end
    if nullable then
      node.nullable = true
      if not set.null then set.null = true; list[#list + 1] = "null" end
    end
    node.types, node.type_list, node.type_msg = set, list, type_msg(list)
  end

  if s.enum ~= nil then build_enum(node, s.enum, path) end
  if s.const ~= nil then
    local c = s.const
    local tc = type(c)
    if not (tc == "table" or tc == "string" or tc == "boolean" or c == NULL or (tc == "number" and is_finite(c))) then
      bad(path, "'const' holds a value JSON does not have (" .. tostring(c) .. ")")
    end
    node.has_const, node.const, node.const_msg = true, c, "must be " .. show(c)
  end

  -- objects
  local props = s.properties
  if props ~= nil then
    if type(props) ~= "table" or not string_keys(props) then bad(path, "'properties' must be an object of schemas") end
    local map, names = {}, sorted_keys(props)
    for i = 1, #names do
      local k = names[i]
      map[k] = build(C, props[k], path .. ".properties" .. step_str(k))
    end
    node.props, node.prop_names = map, names
  end
  local req = s.required
  if req ~= nil then
    if type(req) ~= "table" or (next(req) ~= nil and not is_list(req)) then
      bad(path, "'required' must be a list of strings")
    end
    local list, set = {}, {}
    for i = 1, #req do
      if type(req[i]) ~= "string" then bad(path, "'required' must be a list of strings") end
      if not set[req[i]] then list[#list + 1] = req[i]; set[req[i]] = true end
    end
    if #list > 0 then node.required, node.required_set = list, set end
  end
  local addl = s.additionalProperties
  if addl ~= nil then
    if addl == false then
      node.addl = false
      local names = node.prop_names
      if names and #names > 0 then
        local shown = {}
        for i = 1, min(#names, 12) do shown[i] = names[i] end
        node.addl_msg = "is not allowed: unknown property (allowed: " .. concat(shown, ", ") ..
          (#names > 12 and ", ..." or "") .. ")"
      else
        node.addl_msg = "is not allowed: this object takes no properties"
      end
    elseif addl ~= true then
      if type(addl) ~= "table" then bad(path, "'additionalProperties' must be a boolean or a schema") end
      node.addl = build(C, addl, path .. ".additionalProperties")
    end
  end

  -- arrays
  local items = s.items
  if items ~= nil then
    if type(items) == "table" and next(items) ~= nil and is_list(items) then
      bad(path, "'items' as a list (the tuple form) is not supported: give one schema")
    end
    if type(items) ~= "table" and type(items) ~= "boolean" then bad(path, "'items' must be a schema") end
    node.items = build(C, items, path .. ".items")
  end
  node.min_items, node.max_items = nonneg_int(s, "minItems", path), nonneg_int(s, "maxItems", path)

  -- numbers: { keyword, relation, bound, message up to the value }
  local bounds = {}
  for _, b in ipairs(NUM_BOUNDS) do
    local m = finite_num(s, b[1], path)
    if m then
      if b[2] == "multiple" and m <= 0 then bad(path, "'multipleOf' must be greater than 0") end
      bounds[#bounds + 1] = { keyword = b[1], rel = b[2], value = m, msg = format(b[3], num_str(m)) }
    end
  end
  if #bounds > 0 then node.num_bounds = bounds end

  -- strings
  node.min_len, node.max_len = nonneg_int(s, "minLength", path), nonneg_int(s, "maxLength", path)
  local pat = s.pattern
  if pat ~= nil then
    if type(pat) ~= "string" then bad(path, "'pattern' must be a string") end
    local re, msg, pos = compile_regex(pat)
    if not re then bad(path, format("unsupported pattern %s (character %d): %s", quote(pat), pos, msg)) end
    node.pattern, node.pattern_msg = re, "must match the pattern " .. quote(pat)
  end
  if s.format ~= nil and type(s.format) ~= "string" then bad(path, "'format' must be a string") end

  -- combinations, references, definitions
  if s.allOf ~= nil then node.all_of = build_list(C, s, "allOf", path) end
  if s.anyOf ~= nil then node.any_of = build_list(C, s, "anyOf", path) end
  if s.oneOf ~= nil then node.one_of = build_list(C, s, "oneOf", path) end
  for _, k in ipairs({ "$defs", "definitions" }) do
    local defs = s[k]
    if defs ~= nil then
      if type(defs) ~= "table" or not string_keys(defs) then bad(path, "'" .. k .. "' must be an object of schemas") end
      local names = sorted_keys(defs)
      for i = 1, #names do build(C, defs[names[i]], path .. step_str(k) .. step_str(names[i])) end
    end
  end
  local ref = s["$ref"]
  if ref ~= nil then
    if type(ref) ~= "string" then bad(path, "'$ref' must be a string") end
    local target, tpath = resolve_pointer(C.root, ref, path)
    node.ref = build(C, target, tpath)
  end

  node.has_str = (node.min_len or node.max_len or node.pattern) and true
  node.has_num = node.num_bounds and true
  node.has_obj = (node.props or node.required or node.addl ~= nil) and true
  node.has_arr = (node.items or node.min_items or node.max_items) and true
  node.has_comb = (node.all_of or node.any_of or node.one_of) and true
  local more = (node.enum or node.has_const or node.has_str or node.has_num
    or node.has_obj or node.has_arr or node.has_comb) and true
  node.needs_kind = (node.types or more) and true
  node.only_type = (node.types and not more) and true
  -- {} is both an empty array and an empty object: it gets the keywords of
  -- whichever the type allows
  node.empty_obj = node.has_obj and (not node.types or node.types.object) and true
  node.empty_arr = node.has_arr and (not node.types or node.types.array) and true
  return node
end

-- A schema that reaches itself through $ref/allOf/anyOf/oneOf without
-- descending into a property or an item would make validation loop.
local function check_cycles(C)
  local state = {}
  local function visit(node)
    local st = state[node]
    if st == 2 then return end
    if st == 1 then
      bad(C.paths[node], "a $ref cycle that never reaches a value's contents (the schema refers to itself" ..
        " without going through properties or items)")
    end
    state[node] = 1
    if node.ref then visit(node.ref) end
    for _, list in pairs({ node.all_of or EMPTY, node.any_of or EMPTY, node.one_of or EMPTY }) do
      for i = 1, #list do visit(list[i]) end
    end
    state[node] = 2
  end
  for i = 1, #C.nodes do visit(C.nodes[i]) end
end

---------------------------------------------------------------- validate

local check

local function render(ctx)
  local path, parts = ctx.path, { "$" }
  for i = 1, ctx.depth do parts[i + 1] = step_str(path[i]) end
  return concat(parts)
end

local function add_error(ctx, keyword, message)
  local errs = ctx.errs
  if not errs then errs = {}; ctx.errs = errs end
  local n = #errs + 1
  if n > ctx.max then
    errs.truncated = true
    ctx.stop = true
    return
  end
  errs[n] = { path = render(ctx), message = message, keyword = keyword }
end

-- The types a node allows, following $ref (nil: any), as a set and in
-- the schema's order.
local NO_TYPES = {}
local function eff_types(node)
  for _ = 1, 64 do
    if node.never then return NO_TYPES, NO_TYPES end
    if node.types then return node.types, node.type_list end
    if not node.ref then return nil end
    node = node.ref
  end
end

local function admits(types, v, kind)
  if kind == "number" then return types.number or (types.integer and floor(v) == v) end
  if kind == "empty" then return types.array or types.object end
  return types[kind]
end

-- The first error of node on v, recorded nowhere else.
local function first_error(node, v, ctx)
  local errs, mx, st = ctx.errs, ctx.max, ctx.stop
  ctx.errs, ctx.max, ctx.stop = nil, 1, false
  check(node, v, ctx)
  local e = ctx.errs and ctx.errs[1]
  ctx.errs, ctx.max, ctx.stop = errs, mx, st
  return e
end

-- No branch of anyOf/oneOf matched: say why, briefly.
local function report_union(branches, word, v, kind, ctx)
  local compat = {}
  for i = 1, #branches do
    local et = eff_types(branches[i])
    if not et or admits(et, v, kind) then compat[#compat + 1] = i end
  end
  if #compat == 0 then
    local list, seen = {}, {}
    for i = 1, #branches do
      local _, names = eff_types(branches[i])
      for j = 1, #names do
        if not seen[names[j]] then seen[names[j]] = true; list[#list + 1] = names[j] end
      end
    end
    if #list == 0 then return add_error(ctx, word, "matches none of the alternatives (" .. word .. ")") end
    return add_error(ctx, word, "must be " .. type_msg(list) .. ", got " .. got(v, kind))
  end
  if #compat == 1 then
    -- only one alternative takes a value of this type: its own errors
    return check(branches[compat[1]], v, ctx)
  end
  local here = render(ctx)
  local parts = {}
  for j = 1, #compat do
    local i = compat[j]
    local e = first_error(branches[i], v, ctx)
    local what = e and ((e.path ~= here and e.path .. ": " or "") .. e.message) or "does not match"
    parts[j] = format("#%d: %s", i, what)
  end
  add_error(ctx, word, format("must match %s of %d alternatives (%s): %s",
    word == "oneOf" and "exactly one" or "one", #branches, word, concat(parts, "; ")))
end

local MAX_DEPTH = 200

-- An error at key below the current path.
local function error_at(ctx, key, keyword, message)
  local d = ctx.depth + 1
  ctx.depth, ctx.path[d] = d, key
  add_error(ctx, keyword, message)
  ctx.depth = d - 1
end

-- v, found at key below the current path, against node.
local function descend(node, v, key, ctx)
  local d = ctx.depth + 1
  if d > MAX_DEPTH then
    if ctx.stop then return false end
    add_error(ctx, "depth", "is nested deeper than " .. MAX_DEPTH)
    return false
  end
  ctx.depth, ctx.path[d] = d, key
  local r = check(node, v, ctx)
  ctx.depth = d - 1
  return r
end

-- n against minLength/maxLength or minItems/maxItems: false when outside
-- (recorded unless quiet)
local LENGTHS = { "minLength", "must be at least %d character%s long, got %d",
                  "maxLength", "must be at most %d character%s long, got %d" }
local ITEMS = { "minItems", "must have at least %d item%s, got %d",
                "maxItems", "must have at most %d item%s, got %d" }
local function count_bounds(ctx, n, mn, mx, words)
  local ok = true
  if mn and n < mn then
    if ctx.stop then return false end
    ok = false
    add_error(ctx, words[1], format(words[2], mn, mn == 1 and "" or "s", n))
  end
  if mx and n > mx then
    if ctx.stop then return false end
    add_error(ctx, words[3], format(words[4], mx, mx == 1 and "" or "s", n))
    return false
  end
  return ok
end

check = function(node, v, ctx)
  if node.never then
    if ctx.stop then return false end
    add_error(ctx, "false", "is not allowed here")
    return false
  end
  local ok = true
  local ref = node.ref
  if ref and not check(ref, v, ctx) then
    if ctx.stop then return false end
    ok = false
  end
  if not node.needs_kind then return ok end
  local tv, kind = type(v), nil
  if tv == "string" or tv == "boolean" then kind = tv
  elseif tv == "number" then kind = (v == v and v ~= huge and v ~= -huge) and "number" or "nonfinite"
  elseif tv == "table" then kind = table_kind(v)
  else kind = kind_of(v) end

  local types = node.types
  if types then
    if not types[kind] then
      local pass
      if kind == "number" then pass = types.integer and floor(v) == v
      elseif kind == "empty" then pass = types.array or types.object end
      if not pass then
        if ctx.stop then return false end
        add_error(ctx, "type", "must be " .. node.type_msg .. ", got " .. got(v, kind))
        return false
      end
    end
    if node.only_type or (kind == "null" and node.nullable) then return ok end
  end

  if node.enum then
    local hit
    if type(v) == "table" then
      local list = node.enum_tables
      if list then
        for i = 1, #list do
          if json_equal(list[i], v) then hit = true; break end
        end
      end
    elseif v == v then
      hit = node.enum_set[v]
    end
    if not hit then
      if ctx.stop then return false end
      ok = false
      add_error(ctx, "enum", node.enum_msg .. ", got " .. show(v))
    end
  end
  if node.has_const then
    local c = node.const
    if not (c == v or (type(c) == "table" and json_equal(c, v))) then
      if ctx.stop then return false end
      ok = false
      add_error(ctx, "const", node.const_msg .. ", got " .. show(v))
    end
  end

  if kind == "string" then
    if node.has_str then
      local mn, mx = node.min_len, node.max_len
      local nb = #v
      -- characters <= bytes <= 4 characters: count only when it matters
      if ((mx and nb > mx) or (mn and nb < mn * 4)) and not count_bounds(ctx, utf8_len(v), mn, mx, LENGTHS) then
        if ctx.stop then return false end
        ok = false
      end
      local re = node.pattern
      if re and not re:test(v) then
        if ctx.stop then return false end
        ok = false
        add_error(ctx, "pattern", node.pattern_msg .. ", got " .. show_str(v))
      end
    end
  elseif kind == "number" then
    local bounds = node.num_bounds
    if bounds then
      for i = 1, #bounds do
        local b = bounds[i]
        local m, rel, miss = b.value, b.rel, false
        if rel == ">=" then miss = v < m
        elseif rel == "<=" then miss = v > m
        elseif rel == ">" then miss = v <= m
        elseif rel == "<" then miss = v >= m
        else
          local q = v / m
          miss = not is_finite(q) or abs(q - floor(q + 0.5)) > 1e-9
        end
        if miss then
          if ctx.stop then return false end
          ok = false
          add_error(ctx, b.keyword, b.msg .. num_str(v))
        end
      end
    end
  end

  if node.has_obj and (kind == "object" or (kind == "empty" and node.empty_obj)) then
    local req = node.required
    if req then
      for i = 1, #req do
        local k = req[i]
        if v[k] == nil then
          if ctx.stop then return false end
          ok = false
          error_at(ctx, k, "required", "is required")
        end
      end
    end
    local props = node.props
    if props then
      local names = node.prop_names
      for i = 1, #names do
        local k = names[i]
        local pv = v[k]
        if pv ~= nil and not descend(props[k], pv, k, ctx) then
          if ctx.stop then return false end
          ok = false
        end
      end
    end
    local addl = node.addl
    if addl ~= nil then
      local extra
      for k in pairs(v) do
        if not (props and props[k]) then
          extra = extra or {}
          extra[#extra + 1] = k
        end
      end
      if extra then
        if #extra > 1 then sort(extra, function(a, b) return tostring(a) < tostring(b) end) end
        for i = 1, #extra do
          local k = extra[i]
          if addl == false then
            if ctx.stop then return false end
            ok = false
            error_at(ctx, k, "additionalProperties", node.addl_msg)
          elseif not descend(addl, v[k], k, ctx) then
            if ctx.stop then return false end
            ok = false
          end
        end
      end
    end
  end

  if node.has_arr and (kind == "array" or (kind == "empty" and node.empty_arr)) then
    local n = type(v) == "table" and #v or 0
    if (node.min_items or node.max_items) and not count_bounds(ctx, n, node.min_items, node.max_items, ITEMS) then
      if ctx.stop then return false end
      ok = false
    end
    local items = node.items
    if items then
      for i = 1, n do
        if not descend(items, v[i], i - 1, ctx) then
          if ctx.stop then return false end
          ok = false
        end
      end
    end
  end

  if node.has_comb then
    local list = node.all_of
    if list then
      for i = 1, #list do
        if not check(list[i], v, ctx) then
          if ctx.stop then return false end
          ok = false
        end
      end
    end
    list = node.any_of
    if list then
      local st, hit = ctx.stop, false
      ctx.stop = true
      for i = 1, #list do
        if check(list[i], v, ctx) then hit = true; break end
      end
      ctx.stop = st
      if not hit then
        if st then return false end
        ok = false
        report_union(list, "anyOf", v, kind, ctx)
      end
    end
    list = node.one_of
    if list then
      local st, first, second = ctx.stop, nil, nil
      ctx.stop = true
      for i = 1, #list do
        if check(list[i], v, ctx) then
          if first then second = i; break end
          first = i
        end
      end
      ctx.stop = st
      if not first then
        if st then return false end
        ok = false
        report_union(list, "oneOf", v, kind, ctx)
      elseif second then
        if st then return false end
        ok = false
        add_error(ctx, "oneOf", format("must match exactly one of %d alternatives (oneOf), but matches #%d and #%d",
          #list, first, second))
      end
    end
  end
  return ok
end

local Validator = {}
Validator.__index = Validator
Validator.__name = "slm.schema.Validator"
M.Validator = Validator

--- v:validate(value) -> true | false, errs
function Validator:validate(value)
  local ctx = self.ctx
  ctx.errs, ctx.depth, ctx.stop, ctx.max = nil, 0, false, self.max_errors
  local ok = check(self.root, value, ctx)
  local errs = ctx.errs
  ctx.errs = nil
  if ok then return true end
  return false, errs or { { path = "$", message = "is not valid", keyword = "?" } }
end

--- v:check(value) -> boolean: the same verdict, no messages (faster on failure)
function Validator:check(value)
  local ctx = self.ctx
  ctx.errs, ctx.depth, ctx.stop = nil, 0, true
  return check(self.root, value, ctx)
end

-- A node's verdict on a value, quietly.
local function test(V, node, value)
  local ctx = V.ctx
  ctx.errs, ctx.depth, ctx.stop = nil, 0, true
  return check(node, value, ctx)
end

local function new_validator(s, opts)
  local max = M.MAX_ERRORS
  if opts ~= nil then
    for k, x in pairs(opts) do
      if k == "max_errors" then
        if type(x) ~= "number" or x < 1 or floor(x) ~= x then error("slm.schema.compile: max_errors must be a positive integer", 0) end
        max = x
      else
        error("slm.schema.compile: unknown option '" .. tostring(k) .. "'", 0)
      end
    end
  end
  local C = { root = s, memo = {}, paths = {}, nodes = {} }
  local root = build(C, s, "$")
  check_cycles(C)
  return setmetatable({
    schema = s, root = root, memo = C.memo, max_errors = max,
    ctx = { path = {}, depth = 0, stop = false, max = max },
  }, Validator)
end

local function check_schema_arg(fname, s)
  local ts = type(s)
  if ts ~= "table" and ts ~= "boolean" then
    error("slm.schema." .. fname .. ": expected a schema (a table or a boolean), got " .. ts, 3)
  end
end

--- schema.compile(s, opts) -> validator; raises on a schema it cannot honour.
-- opts.max_errors: how many errors validate reports at most (20).
function M.compile(s, opts)
  check_schema_arg("compile", s)
  if opts ~= nil and type(opts) ~= "table" then error("slm.schema.compile: opts must be a table", 2) end
  local ok, v = pcall(new_validator, s, opts)
  if not ok then
    if type(v) == "string" and find(v, "^slm%.schema%.compile: ") then error(v, 2) end
    rethrow(v, 2)
  end
  return v
end

local cache = setmetatable({}, { __mode = "k" })

-- The validator of s, compiled once per schema table.
local function cached(s)
  local v = type(s) == "table" and cache[s]
  if v then return v end
  v = new_validator(s)
  if type(s) == "table" then cache[s] = v end
  return v
end

--- schema.validate(s, value) -> true | false, errs (compiled once per schema table)
function M.validate(s, value)
  check_schema_arg("validate", s)
  local ok, v = pcall(cached, s)
  if not ok then rethrow(v, 2) end
  return v:validate(value)
end

--- schema.format_errors(errs) -> "$.a: message\n$.b: message" (for a repair prompt)
function M.format_errors(errs)
  local lines = {}
  for i = 1, #errs do lines[i] = errs[i].path .. ": " .. errs[i].message end
  if errs.truncated then lines[#lines + 1] = "(and more errors)" end
  return concat(lines, "\n")
end

---------------------------------------------------------------- lenient parsing

local decode = json.decode

local function try_decode(s)
  local ok, v = pcall(decode, s)
  if ok and v ~= nil then return v end
  return nil, tostring(v)
end

-- (the end found by a loop: a pattern anchored at the end, "[ \t\r\n]+$",
-- would try every run of white space in s, quadratic over a reply of
-- blank lines)
local JSON_WS = { [32] = true, [9] = true, [13] = true, [10] = true }
local function trim(s)
  local _, a = find(s, "^[ \t\r\n]*")
  local b = #s
  while b > a and JSON_WS[byte(s, b)] do b = b - 1 end
  return sub(s, a + 1, b)
end

-- From i (a { or [), where its value ends, matching brackets outside
-- strings: j, trailing commas (positions of commas that only whitespace
-- separates from a closing bracket; nil when none). Or nil, "unclosed" /
-- nil, "mismatch", position.
local function scan_value(s, i)
  local stack, depth, commas = {}, 0, nil
  local p = i
  while true do
    local q = find(s, '[][{}",]', p)
    if not q then return nil, "unclosed" end
    local c = byte(s, q)
    if c == 34 then -- a string: up to its unescaped closing quote
      local r = q + 1
      while true do
        local e = find(s, '["\\]', r)
        if not e then return nil, "unclosed" end
        if byte(s, e) == 92 then
          r = e + 2
        else
          r = e + 1
          break
        end
      end
      p = r
    elseif c == 123 or c == 91 then
      depth = depth + 1
      stack[depth] = c == 123 and 125 or 93
      p = q + 1
    elseif c == 125 or c == 93 then
      if stack[depth] ~= c then return nil, "mismatch", q end
      depth = depth - 1
      if depth == 0 then return q, commas end
      p = q + 1
    else -- a comma
      if depth > 0 and find(s, "^[ \t\r\n]*[}%]]", q + 1) then
        commas = commas or {}
        commas[#commas + 1] = q
      end
      p = q + 1
    end
  end
end

local function without(s, i, j, commas)
  if not commas then return sub(s, i, j) end
  local parts, from = {}, i
  for k = 1, #commas do
    parts[#parts + 1] = sub(s, from, commas[k] - 1)
    from = commas[k] + 1
  end
  parts[#parts + 1] = sub(s, from, j)
  return concat(parts)
end

-- The first complete top-level object or array in s (positions reported
-- off characters later in the reply). A bracketed stretch that does not
-- parse is skipped whole: a piece of it is never taken for the answer; a
-- value that never closes ends the search (a cut reply).
local MAX_STARTS = 64
local function first_json(s, off)
  local p, first_err = 1, nil
  for _ = 1, MAX_STARTS do
    local i = find(s, "[{%[]", p)
    if not i then return nil, first_err end
    local j, commas, at = scan_value(s, i)
    if not j then
      if commas == "unclosed" then
        return nil, first_err or format("the JSON value at character %d of the reply never ends (was the reply cut off?)", i + off)
      end
      first_err = first_err or format("mismatched brackets in the JSON value at character %d of the reply (character %d)",
        i + off, at + off)
      p = at + 1
    else
      local v, err = try_decode(without(s, i, j, commas))
      if v ~= nil then return v end
      first_err = first_err or format("the JSON value at character %d of the reply does not parse: %s", i + off, err)
      p = j + 1
    end
  end
  return nil, first_err
end

local NO_JSON = "no JSON object in the reply"

--- schema.parse_lenient(text) -> value | nil, why
-- What small models send: the JSON alone, in ```json fences, or amid prose;
-- trailing commas before } or ], a UTF-8 BOM. Nothing else is repaired.
function M.parse_lenient(text)
  if type(text) ~= "string" then error("slm.schema.parse_lenient: expected a string, got " .. type(text), 2) end
  local s = text
  if sub(s, 1, 3) == "\239\187\191" then s = sub(s, 4) end
  local body = trim(s)
  if body == "" then return nil, NO_JSON .. " (it is empty)" end
  -- the whole reply is one JSON value (a scalar too)
  local v = try_decode(body)
  if v ~= nil then return v end
  -- fenced blocks marked json, or not marked
  local fence_err
  local p = 1
  while true do
    local a, b = find(s, "```", p, true)
    if not a then break end
    local eol = find(s, "\n", b + 1, true)
    if not eol then break end
    local tag = lower(trim(sub(s, b + 1, eol - 1)))
    local c = find(s, "```", eol + 1, true)
    local content = sub(s, eol + 1, (c or #s + 1) - 1)
    if tag == "" or find(tag, "^json") then
      local fv = try_decode(trim(content))
      if fv ~= nil then return fv end
      local err
      fv, err = first_json(content, eol)
      if fv ~= nil then return fv end
      fence_err = fence_err or err
    end
    if not c then break end
    p = c + 3
  end
  -- the first object or array anywhere
  local err
  v, err = first_json(s, 0)
  if v ~= nil then return v end
  return nil, fence_err or err or NO_JSON
end

---------------------------------------------------------------- OpenAI strict mode

-- OpenAI's strict structured outputs: every object closed
-- (additionalProperties: false) with every property required, optional
-- ones made nullable instead; oneOf becomes anyOf; a $ref with siblings is
-- inlined, allOf merged; formats OpenAI does not know, and annotations it
-- has no use for, dropped. Constraint keywords (pattern, minLength,
-- minimum, ...) stay: the validator enforces them locally either way.
local StrictFail = {}
local function cannot(path, msg) error(setmetatable({ msg = msg .. " at " .. path }, StrictFail), 0) end

local KEEP_ANNOT = { title = true, description = true }
local DROP = { examples = true, ["$comment"] = true, ["$schema"] = true, ["$id"] = true, name = true, strict = true,
               deprecated = true, readOnly = true, writeOnly = true, nullable = true }
local OPENAI_FORMATS = { ["date-time"] = true, time = true, date = true, duration = true, email = true,
                         hostname = true, ipv4 = true, ipv6 = true, uuid = true }

local function has_type(raw, name)
  local t = raw.type
  if t == name then return true end
  if type(t) == "table" then
    for i = 1, #t do if t[i] == name then return true end end
  end
  return false
end

local function is_object_schema(raw)
  if raw.type ~= nil then return has_type(raw, "object") end
  return raw.properties ~= nil or raw.required ~= nil or raw.additionalProperties ~= nil
end

local function accepts_null(X, raw)
  if raw == true then return true end
  if raw == false then return false end
  local node = X.V.memo[raw]
  return node ~= nil and test(X.V, node, NULL)
end

local function inline_ref(raw, path, X)
  X.steps = X.steps + 1
  if X.steps > 200 then cannot(path, "$ref siblings that never end") end
  local target = resolve_pointer(X.root, raw["$ref"], path)
  if type(target) ~= "table" then cannot(path, "a $ref to a boolean schema has no strict form") end
  local merged = {}
  for k, v in pairs(target) do
    if k ~= "$defs" and k ~= "definitions" and not DROP[k] then merged[k] = v end
  end
  for k, v in pairs(raw) do
    if k ~= "$ref" then
      if merged[k] ~= nil and not KEEP_ANNOT[k] and not IGNORED[k] and not json_equal(merged[k], v) then
        cannot(path, "a $ref beside '" .. k .. "', which its target sets too, has no strict form")
      end
      merged[k] = v
    end
  end
  return merged
end

local merge_all_of
merge_all_of = function(raw, path, X)
  X.steps = X.steps + 1
  if X.steps > 200 then cannot(path, "allOf nested too deep") end
  local merged = {}
  for k, v in pairs(raw) do
    if k ~= "allOf" then merged[k] = v end
  end
  for i, b in ipairs(raw.allOf) do
    local bp = path .. ".allOf[" .. (i - 1) .. "]"
    if b == false then cannot(bp, "allOf with false has no strict form") end
    if type(b) == "table" then
      while b["$ref"] ~= nil do b = inline_ref(b, bp, X) end
      if b.allOf then b = merge_all_of(b, bp, X) end
      for k, v in pairs(b) do
        if k == "properties" then
          local p = {}
          for n, x in pairs(merged.properties or EMPTY) do p[n] = x end
          for n, x in pairs(v) do
            if p[n] ~= nil and not json_equal(p[n], x) then
              cannot(bp, "allOf branches that both define the property " .. quote(n) .. " have no strict form")
            end
            p[n] = x
          end
          merged.properties = p
        elseif k == "required" then
          local list, seen = {}, {}
          for _, src in ipairs({ merged.required or EMPTY, v }) do
            for j = 1, #src do
              if not seen[src[j]] then seen[src[j]] = true; list[#list + 1] = src[j] end
            end
          end
          merged.required = list
        elseif k == "$defs" or k == "definitions" then
          cannot(bp, "'" .. k .. "' inside allOf has no strict form")
        elseif merged[k] == nil then
          merged[k] = v
        elseif not (KEEP_ANNOT[k] or IGNORED[k] or DROP[k]) and not json_equal(merged[k], v) then
          cannot(bp, "allOf branches that set '" .. k .. "' differently have no strict form")
        end
      end
    end
  end
  return merged
end

local function nullable_form(out)
  if out["$ref"] or out.const ~= nil or out.allOf or (out.anyOf and out.type) then
    return { anyOf = { out, { type = "null" } } }
  end
  if out.anyOf then
    out.anyOf[#out.anyOf + 1] = { type = "null" }
    return out
  end
  local t = out.type
  if type(t) == "string" then
    if t ~= "null" then out.type = { t, "null" } end
  elseif type(t) == "table" and not has_type(out, "null") then
    t[#t + 1] = "null"
  end
  if out.enum then out.enum[#out.enum + 1] = NULL end
  return out
end

local conv_node
local function has_siblings(raw)
  for k in pairs(raw) do
    if k ~= "$ref" then return true end
  end
  return false
end

-- Only annotations beside the $ref (pydantic's "description" of a field)?
local function annotations_only(raw)
  for k in pairs(raw) do
    if k ~= "$ref" and not IGNORED[k] then return false end
  end
  return true
end

local conv
conv = function(raw, path, X, depth)
  if depth > 200 then cannot(path, "a schema nested deeper than 200") end
  if type(raw) ~= "table" then cannot(path, "a boolean schema (" .. tostring(raw) .. ") has no strict form") end
  -- A $ref with keywords beside it is inlined, except inside its own
  -- inlining (a recursive schema: a tree's "children" items): inlined again
  -- it would never end, so there it stays a $ref and its annotations go
  -- (OpenAI takes no keyword beside a $ref); other keywords have no strict
  -- form there.
  X.steps = 0 -- (inline_ref's and merge_all_of's guard counts per node, not per schema)
  local opened
  while raw["$ref"] ~= nil and has_siblings(raw) do
    local ref = raw["$ref"]
    if X.open[ref] then
      if not annotations_only(raw) then
        cannot(path, "a recursive $ref with keywords beside it (other than annotations) has no strict form")
      end
      raw = { ["$ref"] = ref }
    else
      X.open[ref] = true
      opened = opened or {}
      opened[#opened + 1] = ref
      raw = inline_ref(raw, path, X)
    end
  end
  local out = conv_node(raw, path, X, depth)
  for i = 1, opened and #opened or 0 do X.open[opened[i]] = nil end
  return out
end

conv_node = function(raw, path, X, depth)
  if raw.allOf then raw = merge_all_of(raw, path, X) end
  if raw.anyOf and raw.oneOf then cannot(path, "anyOf beside oneOf has no strict form") end
  local obj = is_object_schema(raw)
  local out = {}
  local keys = sorted_keys(raw)
  for ki = 1, #keys do
    local k = keys[ki]
    local v = raw[k]
    if k == "properties" then
      local p = {}
      local names = sorted_keys(v)
      for i = 1, #names do
        local name = names[i]
        p[name] = conv(v[name], path .. ".properties" .. step_str(name), X, depth + 1)
      end
      out.properties = p
    elseif k == "items" then
      out.items = conv(v, path .. ".items", X, depth + 1)
    elseif k == "anyOf" or k == "oneOf" then
      local list = {}
      for i = 1, #v do list[i] = conv(v[i], path .. "." .. k .. "[" .. (i - 1) .. "]", X, depth + 1) end
      out.anyOf = list
    elseif k == "$defs" or k == "definitions" then
      local d = {}
      local names = sorted_keys(v)
      for i = 1, #names do d[names[i]] = conv(v[names[i]], path .. step_str(k) .. step_str(names[i]), X, depth + 1) end
      out[k] = d
    elseif k == "format" then
      if OPENAI_FORMATS[v] then out.format = v end
    elseif k == "default" then
      if v ~= NULL then out.default = deep_copy(v) end
    elseif k == "required" or k == "additionalProperties" then
      if not obj then out[k] = deep_copy(v) end
    elseif not DROP[k] then
      out[k] = deep_copy(v)
    end
  end
  if raw.nullable == true and out.type ~= nil and not has_type(out, "null") then
    out.type = type(out.type) == "string" and { out.type, "null" } or out.type
    if type(out.type) == "table" and not has_type(out, "null") then out.type[#out.type + 1] = "null" end
  end
  if obj then
    local addl = raw.additionalProperties
    if addl ~= nil and addl ~= false then
      cannot(path, "an object with additionalProperties (a map whose keys the model picks) has no strict form")
    end
    local props = raw.properties
    if props == nil then
      cannot(path, "an object without properties has no strict form (the model could only send {})")
    end
    local names = sorted_keys(props)
    local req = {}
    for _, name in ipairs(raw.required or EMPTY) do
      if props[name] == nil then
        cannot(path, "the required property " .. quote(name) .. " is not in properties: strict mode could never send it")
      end
      req[name] = true
    end
    for _, name in ipairs(names) do
      if not req[name] and not accepts_null(X, props[name]) then
        out.properties[name] = nullable_form(out.properties[name])
      end
    end
    out.properties = out.properties or json.object()
    out.required = json.array(names)
    out.additionalProperties = false
  end
  return out
end

--- schema.for_openai_strict(s) -> a deep copy of s for response_format's
-- json_schema with strict = true | nil, why (s has no strict form).
-- Raises, as compile does, on a schema outside the subset.
function M.for_openai_strict(s)
  check_schema_arg("for_openai_strict", s)
  local ok, V = pcall(cached, s)
  if not ok then rethrow(V, 2) end
  if type(s) ~= "table" then return nil, "a boolean schema has no strict form" end
  local X = { V = V, root = s, steps = 0, open = {} }
  local res
  ok, res = pcall(function()
    local top = s
    while top["$ref"] ~= nil do top = inline_ref(top, "$", X) end
    if top.allOf then top = merge_all_of(top, "$", X) end
    local plain_object = top.type == "object" or (is_list(top.type) and #top.type == 1 and top.type[1] == "object")
      or (top.type == nil and top.properties ~= nil)
    if not plain_object or top.nullable == true then
      cannot("$", "the root must be an object (type \"object\"), as strict mode requires")
    end
    if top.anyOf or top.oneOf then cannot("$", "the root cannot be anyOf/oneOf in strict mode") end
    -- the root's $defs stay where the $refs point
    local out = conv(top, "$", X, 0)
    for _, k in ipairs({ "$defs", "definitions" }) do
      if s[k] ~= nil and out[k] == nil then
        local d = {}
        local names = sorted_keys(s[k])
        for i = 1, #names do d[names[i]] = conv(s[k][names[i]], "$" .. step_str(k) .. step_str(names[i]), X, 1) end
        out[k] = d
      end
    end
    return out
  end)
  if ok then return res end
  if getmetatable(res) == StrictFail then return nil, res.msg end
  rethrow(res, 2)
end

-- The branch of anyOf/oneOf whose reading of v to strip by: none when one
-- already accepts v as it is.
local strip
local function pick_branch(V, list, v, depth)
  for i = 1, #list do
    if test(V, list[i], v) then return nil end
  end
  local kind = kind_of(v)
  for i = 1, #list do
    local b = list[i]
    local et = eff_types(b)
    if not et or admits(et, v, kind) then
      local copy = deep_copy(v)
      strip(V, b, copy, depth + 1)
      if test(V, b, copy) then return b end
    end
  end
  return nil
end

strip = function(V, node, v, depth)
  if type(v) ~= "table" or depth > MAX_DEPTH then return end
  if node.ref then strip(V, node.ref, v, depth + 1) end
  if node.all_of then
    for i = 1, #node.all_of do strip(V, node.all_of[i], v, depth + 1) end
  end
  for _, list in ipairs({ node.any_of or EMPTY, node.one_of or EMPTY }) do
    if #list > 0 then
      local b = pick_branch(V, list, v, depth)
      if b then strip(V, b, v, depth + 1) end
    end
  end
  local kind = table_kind(v)
  if kind == "object" and node.props then
    local rset = node.required_set
    for name, pnode in pairs(node.props) do
      local pv = v[name]
      if pv == NULL then
        if not (rset and rset[name]) and not test(V, pnode, NULL) then v[name] = nil end
      elseif pv ~= nil then
        strip(V, pnode, pv, depth + 1)
      end
    end
  elseif kind == "array" and node.items then
    for i = 1, #v do strip(V, node.items, v[i], depth + 1) end
  end
end

--- schema.from_openai_strict(s, value) -> value: removes, in place, each
-- null that strict mode sent for a property s leaves optional and that
-- does not accept null, so that value can be validated against s.
function M.from_openai_strict(s, value)
  check_schema_arg("from_openai_strict", s)
  local ok, V = pcall(cached, s)
  if not ok then rethrow(V, 2) end
  strip(V, V.root, value, 0)
  return value
end

return M
