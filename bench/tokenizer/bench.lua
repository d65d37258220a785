-- bench.lua DATADIR LABEL [ENC FILE] - slm.tokenizer throughput, one JSON
-- line per measurement (run.sh collects them; report.lua prints the tables).
-- Three operations on each text, CPU time, best of 3:
--   count          tok:count(s)                      -> a number
--   encode_packed  tok:encode(s, { packed = true })  -> an slm.IdList
--   encode         tok:encode(s)                     -> a Lua table of integers
-- With ENC and FILE: only those three on that file with that encoding (the
-- head-to-head rounds of run.sh).  Needs slm.tokenizer and slm.core on
-- LUA_PATH / LUA_CPATH.
local data, label = arg[1], arg[2] or ("slm (" .. (jit and jit.version or _VERSION) .. ")")
local only_enc, only_file = arg[3], arg[4]
local T = require "slm.tokenizer"
local clock = os.clock -- CPU time of this process

local PACKED = { packed = true }
local OPS = {
  { "count", function(tok, s) return tok:count(s) end },
  { "encode_packed", function(tok, s) return tok:encode(s, PACKED) end },
  { "encode", function(tok, s) return tok:encode(s) end },
}

local function slurp(name)
  local f = assert(io.open(data .. "/" .. name, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function emit(t)
  local parts = {}
  for k, v in pairs(t) do
    parts[#parts + 1] = string.format("%q:%s", k, type(v) == "string" and string.format("%q", v) or
      string.format("%.6f", v))
  end
  io.write("{", table.concat(parts, ","), "}\n")
  io.flush()
end

-- Best CPU time of `reps` runs of fn(), and how many tokens it gave.
local function best(reps, fn)
  local b, n = math.huge, nil
  for _ = 1, reps do
    collectgarbage() -- the previous result is garbage by now: not traversed during the next run
    local t0 = clock()
    local r = fn()
    local t = clock() - t0
    if t < b then b = t end
    n = type(r) == "number" and r or #r
  end
  return b, n
end

local function measure(tok, enc, file, ops)
  local s = slurp(file)
  for _, op in ipairs(ops) do
    local t, n = best(3, function() return op[2](tok, s) end)
    emit { lib = label, enc = enc, case = file, op = op[1], ms = t * 1e3, bytes = #s, tokens = n }
  end
end

if only_enc then
  measure(T.get(only_enc), only_enc, only_file, OPS)
  return
end

for _, enc in ipairs { "o200k_base", "cl100k_base" } do
  collectgarbage()
  local t0 = clock()
  local tok = T.get(enc)
  emit { lib = label, enc = enc, case = "load", ms = (clock() - t0) * 1e3 }
  for _, file in ipairs { "english.txt", "mixed.txt" } do measure(tok, enc, file, OPS) end
  for _, file in ipairs { "a200k.txt", "spaces200k.txt", "letters100k.txt" } do
    measure(tok, enc, file, { OPS[3] })
  end
end
