-- bench.lua DATADIR LABEL [REPS] - slm.bm25 on the benchmark's passages and
-- queries (gen_data.lua); prints one JSON line (the same fields as
-- bench.mjs) and writes the top 5 ids of every query to DATADIR/top-LABEL.json.
--   build_ms      wall time of bm25.new() + idx:add() for every passage
--   build_cpu_ms  CPU time of the same
--   p50_us, p95_us, mean_us  wall time of one idx:search(query, 5), each
--                 query timed over REPS (5) calls after one warm-up pass
--   heap_mb       memory the index holds (collectgarbage("count") after a
--                 full collection, before and after the build)
-- Runs under Lua 5.4 and LuaJIT (LUA_CPATH: a slm.core built for that engine).
local cjson = require "cjson"
local core = require "slm.core"
local bm25 = require "slm.bm25"
local data, label, reps = arg[1], arg[2], tonumber(arg[3] or "5")
assert(data and label, "usage: bench.lua DATADIR LABEL [REPS]")
local now, cputime = core.now, core.cputime

local docs = {}
for line in io.lines(data .. "/passages.jsonl") do docs[#docs + 1] = cjson.decode(line) end
local f = assert(io.open(data .. "/queries.json", "rb"))
local queries = cjson.decode(f:read("*a"))
f:close()

collectgarbage()
collectgarbage()
local mem0 = collectgarbage("count")
local t0, c0 = now(), cputime()
local idx = bm25.new { k1 = 1.2, b = 0.75 }
for i = 1, #docs do
  local d = docs[i]
  idx:add(d.id, d.text, d.lang)
end
local build_ms, build_cpu_ms = (now() - t0) * 1e3, (cputime() - c0) * 1e3
collectgarbage()
collectgarbage()
local heap_mb = (collectgarbage("count") - mem0) / 1024

local top = {}
for i, q in ipairs(queries) do -- warm-up, and the results
  local ids = {}
  for j, r in ipairs(idx:search(q, 5)) do ids[j] = r.id end
  top[i] = ids
end
local times = {}
for i, q in ipairs(queries) do
  local t = now()
  for _ = 1, reps do idx:search(q, 5) end
  times[i] = (now() - t) / reps * 1e6
end
local sum = 0
for i = 1, #times do sum = sum + times[i] end
table.sort(times)
local function pct(p) return times[math.max(1, math.ceil(#times * p))] end

f = assert(io.open(data .. "/top-" .. label .. ".json", "wb"))
f:write(cjson.encode(top), "\n")
f:close()
print(cjson.encode {
  lib = label, passages = idx:size(), queries = #queries,
  build_ms = build_ms, build_cpu_ms = build_cpu_ms, heap_mb = heap_mb,
  p50_us = pct(0.5), p95_us = pct(0.95), mean_us = sum / #times,
})
