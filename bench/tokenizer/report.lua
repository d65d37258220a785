-- report.lua RESULTS.jsonl - the benchmark's tables: MB/s (CPU time, best
-- of 3) and ratios against gpt-tokenizer.
--
-- Each lua-slm operation is set against the gpt-tokenizer operation that
-- does the same job on the same text in the same run:
--   count           tok:count(s)                      vs countTokens(s)
--   encode packed   tok:encode(s, { packed = true })  vs encode(s) (a JS array)
--   encode          tok:encode(s) (a Lua table)       vs encode(s)
-- ratio = gpt-tokenizer's CPU time / lua-slm's = lua-slm's MB/s /
-- gpt-tokenizer's MB/s: above 1 is faster than gpt-tokenizer.
local cjson = require "cjson"
local rows = {}
for line in io.lines(arg[1]) do
  if line:sub(1, 1) == "{" then rows[#rows + 1] = cjson.decode(line) end
end
local BASE = "gpt-tokenizer"
local OP_NAME = { count = "count", encode_packed = "encode packed", encode = "encode" }
local OP_ORDER = { "count", "encode_packed", "encode" }
local PEER_OP = { count = "count", encode_packed = "encode", encode = "encode" }
-- what lua-slm aims at in the head-to-head rounds (x gpt-tokenizer)
local GOAL = { count = 8, encode_packed = 6, encode = 4 }

local function find(lib, enc, case, op)
  for _, r in ipairs(rows) do
    if r.lib == lib and r.enc == enc and r.case == case and (op == nil or r.op == op) then return r end
  end
end

local function mbs(r) return r.bytes / 1e3 / r.ms end

-- libraries in the order they ran, and each one's operations
local libs, seen = {}, {}
for _, r in ipairs(rows) do
  if not seen[r.lib] and not r.lib:match("^h2h ") then seen[r.lib] = true; libs[#libs + 1] = r.lib end
end
local function ops_of(lib)
  local list = {}
  for _, op in ipairs(OP_ORDER) do
    for _, r in ipairs(rows) do
      if r.lib == lib and r.op == op then list[#list + 1] = op break end
    end
  end
  return list
end

local function fmt_ratio(x) return x and string.format("%.2fx", x) or "-" end

print("MB/s: bytes of the text / CPU time of the call, best of 3 (lua-slm: os.clock; node: process.cpuUsage).")
print("vs gpt-tokenizer: its CPU time for the same job on the same text / this one's"
  .. " (count vs countTokens, encode and encode packed vs encode).")
for _, enc in ipairs { "o200k_base", "cl100k_base" } do
  for _, case in ipairs { "english.txt", "mixed.txt" } do
    local any
    for _, r in ipairs(rows) do
      if r.enc == enc and r.case == case and r.bytes and not r.lib:match("^h2h ") then any = r break end
    end
    if any then
      print(string.format("\n%s, %s (%.2f MB)", enc, case, any.bytes / 1e6))
      print(string.format("  %-34s %10s %12s %12s %18s", "library, operation", "MB/s", "tokens/s", "tokens",
        "vs " .. BASE))
      for _, lib in ipairs(libs) do
        for _, op in ipairs(ops_of(lib)) do
          local r = find(lib, enc, case, op)
          if r then
            local name = lib .. " " .. OP_NAME[op]
            if r.timeout then
              print(string.format("  %-34s %10s", name, "timeout"))
            else
              local base = find(BASE, enc, case, PEER_OP[op])
              local ratio = base and not base.timeout and lib ~= BASE and (base.ms / r.ms) or nil
              local note = ""
              if base and base.tokens and r.tokens ~= base.tokens then note = "  (token count differs: " .. base.tokens .. ")" end
              -- count is also shown against encode, the job gpt-tokenizer users often do to count
              local enc_base = op == "count" and lib ~= BASE and find(BASE, enc, case, "encode")
              if enc_base and not enc_base.timeout then
                note = string.format(", %s (encode)", fmt_ratio(enc_base.ms / r.ms)) .. note
              end
              print(string.format("  %-34s %10.1f %12.3g %12d %18s%s", name, mbs(r), r.tokens / (r.ms / 1e3),
                r.tokens, ratio and fmt_ratio(ratio) .. " (" .. PEER_OP[op] .. ")" or "", note))
            end
          end
        end
      end
    end
  end
  local cases = { "a200k.txt", "spaces200k.txt", "letters100k.txt" }
  if find(libs[1], enc, cases[1], "encode") then
    print(string.format("\n%s, pathological inputs, encode: ms of CPU (gpt-tokenizer time / this time)", enc))
    print(string.format("  %-26s %18s %18s %18s", "library", "a x 200000", "200000 spaces", "100 KB letters"))
  end
  for _, lib in ipairs(libs) do
    local cells, anyrow = {}, false
    for i, case in ipairs(cases) do
      local r, base = find(lib, enc, case, "encode"), find(BASE, enc, case, "encode")
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
  local any_load = false
  for _, lib in ipairs(libs) do
    local r = find(lib, enc, "load")
    if r then
      if not any_load then print(string.format("\n%s, load / initialisation (ms of CPU)", enc)) end
      any_load = true
      print(string.format("  %-26s %10.1f", lib, r.ms))
    end
  end
end

-- head-to-head rounds (run.sh): lua-slm and gpt-tokenizer alternating
local rounds = 0
for _, r in ipairs(rows) do
  local n = tonumber(r.lib:match("^h2h %a+ (%d+)$"))
  if n and n > rounds then rounds = n end
end
if rounds > 0 then
  print(string.format("\nhead to head, english.txt: lua-slm (Lua 5.4) and gpt-tokenizer run alternately, process"
    .. " by process, %d round%s;", rounds, rounds > 1 and "s" or ""))
  print("MB/s and ratios as above (count vs countTokens; encode packed and encode vs encode)")
  print(string.format("  %-12s %5s %9s %9s %7s | %9s %9s %9s %7s %7s", "encoding", "round", "slm count",
    "gpt count", "ratio", "slm pack", "slm table", "gpt enc", "packed", "table"))
  for _, enc in ipairs { "o200k_base", "cl100k_base" } do
    local ratios = { count = {}, encode_packed = {}, encode = {} }
    local count_vs_encode = {}
    for round = 1, rounds do
      local slm, gpt = "h2h slm " .. round, "h2h gpt " .. round
      local c, p, t = find(slm, enc, "english.txt", "count"), find(slm, enc, "english.txt", "encode_packed"),
        find(slm, enc, "english.txt", "encode")
      local gc, ge = find(gpt, enc, "english.txt", "count"), find(gpt, enc, "english.txt", "encode")
      if c and p and t and gc and ge then
        local rc, rp, rt = mbs(c) / mbs(gc), mbs(p) / mbs(ge), mbs(t) / mbs(ge)
        table.insert(ratios.count, rc)
        table.insert(ratios.encode_packed, rp)
        table.insert(ratios.encode, rt)
        table.insert(count_vs_encode, mbs(c) / mbs(ge))
        print(string.format("  %-12s %5d %9.1f %9.1f %6.2fx | %9.1f %9.1f %9.1f %6.2fx %6.2fx", enc, round, mbs(c),
          mbs(gc), rc, mbs(p), mbs(t), mbs(ge), rp, rt))
      elseif c or gc then
        print(string.format("  %-12s %5d  (incomplete round: a process failed or timed out)", enc, round))
      end
    end
    for _, op in ipairs(OP_ORDER) do
      local list = ratios[op]
      if #list > 0 then
        table.sort(list)
        local met = 0
        for _, x in ipairs(list) do if x >= GOAL[op] then met = met + 1 end end
        print(string.format("  %-12s %-14s median %.2fx (min %.2fx, max %.2fx); goal %dx: met in %d of %d rounds",
          enc, OP_NAME[op], list[(#list + 1) // 2], list[1], list[#list], GOAL[op], met, #list))
      end
    end
    if #count_vs_encode > 0 then
      table.sort(count_vs_encode)
      print(string.format("  %-12s %-14s median %.2fx (min %.2fx, max %.2fx) against gpt-tokenizer's encode",
        enc, "count", count_vs_encode[(#count_vs_encode + 1) // 2], count_vs_encode[1],
        count_vs_encode[#count_vs_encode]))
    end
  end
end
