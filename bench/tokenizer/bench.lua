-- bench.lua DATADIR LABEL [ENC FILE] - slm.tokenizer throughput, one JSON
-- line per measurement (run.sh collects them; report.lua prints the table).
-- With ENC and FILE: only `encode` of that file with that encoding (the
-- head-to-head rounds of run.sh).  Needs slm.tokenizer and slm.core on
-- LUA_PATH / LUA_CPATH.
local data, label = arg[1], arg[2] or ("slm (" .. (jit and jit.version or _VERSION) .. ")")
local only_enc, only_file = arg[3], arg[4]
local T = require "slm.tokenizer"
local clock = os.clock -- CPU time of this process

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

local function best(reps, fn)
  local b, r = math.huge, nil
  for _ = 1, reps do
    r = nil -- the previous result must not stay alive (and be traversed by the GC) during the next run
    collectgarbage()
    local t0 = clock()
    r = fn()
    local t = clock() - t0
    if t < b then b = t end
  end
  return b, r
end

if only_enc then
  local tok = T.get(only_enc)
  local s = slurp(only_file)
  local t, ids = best(3, function() return tok:encode(s) end)
  emit { lib = label, enc = only_enc, case = only_file, op = "encode", ms = t * 1e3, bytes = #s, tokens = #ids }
  return
end

for _, enc in ipairs { "o200k_base", "cl100k_base" } do
  collectgarbage()
  local t0 = clock()
  local tok = T.get(enc)
  emit { lib = label, enc = enc, case = "load", ms = (clock() - t0) * 1e3 }
  for _, file in ipairs { "english.txt", "mixed.txt" } do
    local s = slurp(file)
    local t, ids = best(3, function() return tok:encode(s) end)
    emit { lib = label, enc = enc, case = file, op = "encode", ms = t * 1e3, bytes = #s, tokens = #ids }
    ids = nil
    local tc, n = best(3, function() return tok:count(s) end)
    emit { lib = label .. " count", enc = enc, case = file, op = "count", ms = tc * 1e3, bytes = #s, tokens = n }
  end
  for _, file in ipairs { "a200k.txt", "spaces200k.txt", "letters100k.txt" } do
    local s = slurp(file)
    local t, ids = best(3, function() return tok:encode(s) end)
    emit { lib = label, enc = enc, case = file, op = "encode", ms = t * 1e3, bytes = #s, tokens = #ids }
  end
end
