-- report.lua RESULTS.jsonl - the benchmark table, ratios vs gpt-tokenizer.
local cjson = require "cjson"
local rows = {}
for line in io.lines(arg[1]) do
  if line:sub(1, 1) == "{" then rows[#rows + 1] = cjson.decode(line) end
end
local BASE = "gpt-tokenizer"

local function find(lib, enc, case)
  for _, r in ipairs(rows) do
    if r.lib == lib and r.enc == enc and r.case == case then return r end
  end
end

local libs, seen = {}, {}
for _, r in ipairs(rows) do
  if not seen[r.lib] and not r.lib:match("^h2h ") then seen[r.lib] = true; libs[#libs + 1] = r.lib end
end

local function fmt_ratio(x) return x and string.format("%.2fx", x) or "-" end

for _, enc in ipairs { "o200k_base", "cl100k_base" } do
  for _, case in ipairs { "english.txt", "mixed.txt" } do
    local base = find(BASE, enc, case)
    local any = rows[1]
    for _, r in ipairs(rows) do if r.enc == enc and r.case == case then any = r break end end
    print(string.format("\n%s, %s (%.2f MB)", enc, case, (any.bytes or 0) / 1e6))
    print(string.format("  %-26s %10s %12s %12s %10s", "library", "MB/s", "tokens/s", "tokens", "vs " .. BASE))
    for _, lib in ipairs(libs) do
      local r = find(lib, enc, case)
      if r then
        if r.timeout then
          print(string.format("  %-26s %10s", lib, "timeout"))
        else
          local s = r.ms / 1e3
          local ratio = base and not base.timeout and (base.ms / r.ms) or nil
          local note = ""
          if base and r.tokens ~= base.tokens then note = "  (token count differs: " .. base.tokens .. ")" end
          print(string.format("  %-26s %10.1f %12.3g %12d %10s%s", lib, r.bytes / 1e6 / s, r.tokens / s,
            r.tokens, fmt_ratio(ratio), note))
        end
      end
    end
  end
  print(string.format("\n%s, pathological inputs: ms of CPU (gpt-tokenizer time / this time)", enc))
  local cases = { "a200k.txt", "spaces200k.txt", "letters100k.txt" }
  print(string.format("  %-26s %18s %18s %18s", "library", "a x 200000", "200000 spaces", "100 KB letters"))
  for _, lib in ipairs(libs) do
    local cells, anyrow = {}, false
    for i, case in ipairs(cases) do
      local r, base = find(lib, enc, case), find(BASE, enc, case)
      if r then
        anyrow = true
        if r.timeout then cells[i] = string.format(">%ds", r.timeout)
        else
          local rs
          if base and base.timeout then rs = string.format(">%.0fx", base.timeout * 1e3 / r.ms)
          elseif base then rs = string.format("%.1fx", base.ms / r.ms) end
          cells[i] = string.format("%.1f (%s)", r.ms, rs or "-")
        end
      else
        cells[i] = "-"
      end
    end
    if anyrow then
      print(string.format("  %-26s %18s %18s %18s", lib, cells[1], cells[2], cells[3]))
    end
  end
  print(string.format("\n%s, load / initialisation (ms of CPU)", enc))
  for _, lib in ipairs(libs) do
    local r = find(lib, enc, "load")
    if r then print(string.format("  %-26s %10.1f", lib, r.ms)) end
  end
end

-- head-to-head rounds (run.sh): slm and gpt-tokenizer alternating
local any_h2h = false
for _, r in ipairs(rows) do if r.lib:match("^h2h ") then any_h2h = true break end end
if any_h2h then
  print("\nhead to head, english.txt, encode (lua-slm Lua 5.4 and gpt-tokenizer run alternately)")
  print(string.format("  %-12s %6s %14s %18s %8s", "encoding", "round", "lua-slm MB/s", "gpt-tokenizer MB/s", "ratio"))
  for _, enc in ipairs { "o200k_base", "cl100k_base" } do
    local ratios = {}
    for round = 1, 99 do
      local a, b = find("h2h slm " .. round, enc, "english.txt"), find("h2h gpt " .. round, enc, "english.txt")
      if not a and not b then break end
      if a and b then
        local ra, rb = a.bytes / 1e3 / a.ms, b.bytes / 1e3 / b.ms
        ratios[#ratios + 1] = ra / rb
        print(string.format("  %-12s %6d %14.1f %18.1f %7.2fx", enc, round, ra, rb, ra / rb))
      end
    end
    if #ratios > 0 then
      table.sort(ratios)
      print(string.format("  %-12s median ratio %.2fx (min %.2fx, max %.2fx)", enc,
        ratios[(#ratios + 1) // 2], ratios[1], ratios[#ratios]))
    end
  end
end
