-- report.lua DATADIR - the benchmark's tables from DATADIR/results.jsonl
-- (one line per process: bench.lua and bench.mjs) and the top-5 files.
--
-- Each round ran lua-slm (Lua 5.4), minisearch and lua-slm (LuaJIT, when
-- built) one right after the other; ratios are minisearch / lua-slm within
-- a round (above 1: lua-slm is faster), then their median (the lower
-- middle one for an even count), min and max over the rounds.
-- Overlap of the top 5 per query, lua-slm against minisearch, averaged over
-- the queries: |A n B| / max(|A|, |B|) (1 when both are empty), and the
-- Jaccard index |A n B| / |A u B|.
local cjson = require "cjson"
local data = assert(arg[1], "usage: report.lua DATADIR")
local rows = {}
for line in io.lines(data .. "/results.jsonl") do
  if line:sub(1, 1) == "{" then rows[#rows + 1] = cjson.decode(line) end
end

local function load(name)
  local f = io.open(data .. "/top-" .. name .. ".json", "rb")
  if not f then return nil end
  local t = cjson.decode(f:read("*a"))
  f:close()
  return t
end

-- rounds: "slm 3", "minisearch 3", "slm-jit 3"
local rounds, order = {}, {}
for _, r in ipairs(rows) do
  local who, n = r.lib:match("^(%S+) (%d+)$")
  if who then
    n = tonumber(n)
    if not rounds[n] then rounds[n] = {}; order[#order + 1] = n end
    rounds[n][who] = r
  end
end
table.sort(order)

local function median(t)
  local s = {}
  for i, v in ipairs(t) do s[i] = v end
  table.sort(s)
  return s[math.floor((#s + 1) / 2)], s[1], s[#s]
end

print(string.format("%-6s %-12s %10s %10s %10s %10s %10s %8s", "round", "library", "build ms", "build cpu", "p50 us", "p95 us", "mean us", "heap MB"))
local ratios = { slm = { build = {}, p50 = {}, p95 = {} }, ["slm-jit"] = { build = {}, p50 = {}, p95 = {} } }
local raw = { slm = { build = {}, p50 = {}, p95 = {} }, minisearch = { build = {}, p50 = {}, p95 = {} }, ["slm-jit"] = { build = {}, p50 = {}, p95 = {} } }
for _, n in ipairs(order) do
  local R = rounds[n]
  for _, who in ipairs { "slm", "minisearch", "slm-jit" } do
    local r = R[who]
    if r then
      print(string.format("%-6d %-12s %10.1f %10.1f %10.1f %10.1f %10.1f %8.1f", n, who,
        r.build_ms, r.build_cpu_ms, r.p50_us, r.p95_us, r.mean_us, r.heap_mb))
      local x = raw[who]
      x.build[#x.build + 1], x.p50[#x.p50 + 1], x.p95[#x.p95 + 1] = r.build_ms, r.p50_us, r.p95_us
    end
  end
  local m = R.minisearch
  for _, who in ipairs { "slm", "slm-jit" } do
    local r = R[who]
    if r and m then
      local t = ratios[who]
      t.build[#t.build + 1] = m.build_ms / r.build_ms
      t.p50[#t.p50 + 1] = m.p50_us / r.p50_us
      t.p95[#t.p95 + 1] = m.p95_us / r.p95_us
    end
  end
end

print()
print(string.format("%d rounds; median (min-max)", #order))
for _, who in ipairs { "slm", "minisearch", "slm-jit" } do
  local x = raw[who]
  if #x.build > 0 then
    local function f(t) local a, b, c = median(t) return string.format("%.1f (%.1f-%.1f)", a, b, c) end
    print(string.format("  %-11s build %s ms, query p50 %s us, p95 %s us", who, f(x.build), f(x.p50), f(x.p95)))
  end
end
local GOAL = { build = 1, p50 = 2 }
for _, who in ipairs { "slm", "slm-jit" } do
  local t = ratios[who]
  if #t.build > 0 then
    local function f(name)
      local a, b, c = median(t[name])
      local met = 0
      for _, v in ipairs(t[name]) do if GOAL[name] and v >= GOAL[name] then met = met + 1 end end
      local goal = GOAL[name] and string.format(", goal %gx met in %d/%d rounds", GOAL[name], met, #t[name]) or ""
      return string.format("%.2fx (%.2f-%.2f)%s", a, b, c, goal)
    end
    print(string.format("  minisearch / %s: build %s", who, f("build")))
    print(string.format("  %s   query p50 %s", string.rep(" ", #who), f("p50")))
    print(string.format("  %s   query p95 %s", string.rep(" ", #who), f("p95")))
  end
end

-- overlap
local function overlap(a, b)
  local n, inter, seen = #a, 0, {}
  for _, id in ipairs(a) do seen[id] = true end
  local union = n
  for _, id in ipairs(b) do
    if seen[id] then inter = inter + 1 else union = union + 1 end
  end
  local m = math.max(#a, #b)
  if m == 0 then return 1, 1 end
  return inter / m, inter / union
end
local function mean_overlap(x, y)
  local s1, s2 = 0, 0
  for i = 1, #x do
    local o, j = overlap(x[i], y[i])
    s1, s2 = s1 + o, s2 + j
  end
  return s1 / #x, s2 / #x
end
local n = order[#order]
local slm, ms = load("slm " .. n), load("minisearch " .. n)
if slm and ms then
  -- topic precision: the share of the top 5 (5 places, empty ones count as
  -- misses) whose passage is about the question's topic (gen_data.lua)
  local topic_of = {}
  for line in io.lines(data .. "/passages.jsonl") do
    local p = cjson.decode(line)
    topic_of[p.id] = p.topic
  end
  local f = assert(io.open(data .. "/query_topics.json", "rb"))
  local qtopic = cjson.decode(f:read("*a"))
  f:close()
  local function precision(top)
    local s = 0
    for i, ids in ipairs(top) do
      for _, id in ipairs(ids) do
        if topic_of[id] == qtopic[i] then s = s + 1 end
      end
    end
    return s / (5 * #top)
  end
  print()
  print(string.format("topic precision of the top 5 (share of passages about the question's topic): lua-slm %.2f", precision(slm)))
  local variants = {
    { "", "minisearch (its default BM25+, no stemming)" },
    { "-plain", "minisearch (plain BM25, k1 1.2, b 0.75, no stemming)" },
    { "-same", "minisearch fed slm.bm25's terms (plain BM25: the scoring alone)" },
  }
  for _, v in ipairs(variants) do
    local top = load("minisearch " .. n .. v[1])
    if top then
      local o, j = mean_overlap(slm, top)
      print(string.format("  %-64s precision %.2f; overlap with lua-slm: mean |A n B|/5 %.2f, Jaccard %.2f",
        v[2], precision(top), o, j))
    end
  end
  local jit = load("slm-jit " .. n)
  if jit then
    print(string.format("  lua-slm under LuaJIT: the same top 5 as under Lua 5.4 for %.0f%% of the queries", 100 * mean_overlap(slm, jit)))
  end
  local none_s, none_m = 0, 0
  for i = 1, #slm do
    if #slm[i] == 0 then none_s = none_s + 1 end
    if #ms[i] == 0 then none_m = none_m + 1 end
  end
  print(string.format("  queries with no result: lua-slm %d, minisearch %d (of %d)", none_s, none_m, #slm))
end
