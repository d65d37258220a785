-- report.lua RESULTS - the table of bench/batch/csv: one line per process
-- in RESULTS (JSON lines of bench.lua and bench.mjs, labels "NAME ROUND").
-- Per round: MB/s of each parser and the ratios lua-slm / csv-parse (above
-- 1: lua-slm is faster); then per column the median (the lower middle one
-- for an even count), min and max over the rounds. Also checks that every
-- process counted the same records, fields and field bytes.
local cjson = require "cjson"
local path = assert(arg[1], "usage: report.lua RESULTS")

local by_round, rounds, counts = {}, {}, nil
for line in io.lines(path) do
  if line:sub(1, 1) == "{" then
    local r = cjson.decode(line)
    local who, n = r.lib:match("^(%S+) (%d+)$")
    n = tonumber(n)
    if not by_round[n] then
      by_round[n] = {}
      rounds[#rounds + 1] = n
    end
    by_round[n][who] = r
    local c = string.format("%d records, %d fields, %d bytes of fields", r.rows, r.fields, r.bytes)
    if counts and counts ~= c then error("the parsers disagree: " .. counts .. " against " .. c .. " (" .. r.lib .. ")") end
    counts = c
  end
end
table.sort(rounds)

local COLS = {
  { "lua-slm 5.4 MB/s", function(t) return t.slm and t.slm.mb_s end },
  { "lua-slm LuaJIT MB/s", function(t) return t["slm-jit"] and t["slm-jit"].mb_s end },
  { "csv-parse MB/s", function(t) return t["csv-parse"] and t["csv-parse"].mb_s end },
  { "ratio 5.4", function(t) return t.slm and t["csv-parse"] and t.slm.mb_s / t["csv-parse"].mb_s end },
  { "ratio LuaJIT", function(t) return t["slm-jit"] and t["csv-parse"] and t["slm-jit"].mb_s / t["csv-parse"].mb_s end },
}

local function cell(v) return v and string.format("%.2f", v) or "-" end

print("all processes agree: " .. tostring(counts))
local head = { "round" }
for _, c in ipairs(COLS) do head[#head + 1] = c[1] end
print("| " .. table.concat(head, " | ") .. " |")
print("|" .. string.rep("---|", #head))
local values = {}
for _, n in ipairs(rounds) do
  local row = { tostring(n) }
  for i, c in ipairs(COLS) do
    local v = c[2](by_round[n])
    row[#row + 1] = cell(v)
    values[i] = values[i] or {}
    if v then values[i][#values[i] + 1] = v end
  end
  print("| " .. table.concat(row, " | ") .. " |")
end
for _, what in ipairs({ "median", "min", "max" }) do
  local row = { what }
  for i = 1, #COLS do
    local v = values[i] or {}
    table.sort(v)
    local x
    if #v > 0 then
      if what == "median" then x = v[(#v + 1) // 2] elseif what == "min" then x = v[1] else x = v[#v] end
    end
    row[#row + 1] = cell(x)
  end
  print("| " .. table.concat(row, " | ") .. " |")
end
