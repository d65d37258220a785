-- mutate_pii.lua - can every spec of tests/pii_spec.lua fail?
--
--   lua5.4 tests/tools/mutate_pii.lua         # every mutation
--   lua5.4 tests/tools/mutate_pii.lua 1 7     # these only
--
-- Each mutation breaks lua/slm/pii.lua in one way (literal replacements,
-- each of a text found exactly once), written to a scratch copy of lua/
-- and tests/ under $TMPDIR where the spec then runs (pure Lua: nothing to
-- build). Prints the specs each mutation made fail, then those that none
-- did. Exits 1 when a mutation no longer applies (update it), fails no
-- spec, or a spec never fails. A dev tool, not run by bin/test (about ten
-- seconds).
local root = debug.getinfo(1, "S").source:match("^@(.*)/tests/tools/") or "."
package.path = root .. "/?.lua;" .. package.path
local H = require "tests.helpers"
local q = H.q

local MUTATIONS = {
  { "Luhn skipped", "if f < 50 or f > 54 or not luhn(d) then", "if f < 50 or f > 54 then" },
  { "Luhn doubles the wrong digits", "    if dbl then\n      x = x * 2", "    if not dbl then\n      x = x * 2" },
  { "mod 97 on the whole number at once (a double)",
    "    r = (r * POW10[#piece] + tonumber(piece)) % 97", "    r = tonumber(d) % 97" },
  { "IBAN check digits 00, 01, 99 taken", "if check < 2 or check > 98 then return false end", "" },
  { "IBAN groups: only the longest tried", "  for k = n, 1, -1 do\n    local v = concat(parts",
    "  for k = n, n, -1 do\n    local v = concat(parts" },
  { "iban dropped", "if want.iban and s > iban_end + 2", "if false and s > iban_end + 2" },
  { "email dropped", "  if want.email then emails(text, c) end\n", "" },
  { "phone dropped", 'local NUMERIC = { "card", "passport", "snils", "inn", "phone" }',
    'local NUMERIC = { "card", "passport", "snils", "inn" }' },
  { "numeric kinds in reverse rank", 'local NUMERIC = { "card", "passport", "snils", "inn", "phone" }',
    'local NUMERIC = { "phone", "inn", "snils", "passport", "card" }' },
  { "INN: the 12th digit unchecked", "return inn_digit(d, W11, 10) and inn_digit(d, W12, 11)",
    "return inn_digit(d, W11, 10)" },
  { "INN: a weight wrong", "local W10 = { 2, 4, 10, 3, 5, 9, 4, 6, 8 }", "local W10 = { 2, 4, 10, 3, 5, 9, 4, 6, 9 }" },
  { "INN: / after it refused", '  if c == SLASH and kind == "inn" then return true end\n', "" },
  { "SNILS: sums 100, 101 not 00", "elseif sum <= 101 then c = 0", "elseif sum <= 101 then c = sum" },
  { "SNILS: mod 101 = 100 not 00", "    if c == 100 then c = 0 end\n", "" },
  { "SNILS: no check at all", "  return c == tonumber(sub(d, 10, 11))", "  return true" },
  { "SNILS: old numbers taken plain", "return formatted == true and num > 0", "return num > 0" },
  { "SNILS: old numbers checked", "if num <= 1001998 then return formatted == true and num > 0 end", "" },
  { "SNILS: spaces not a separator", 'if rg[t] ~= "sp" and rg[t] ~= "dash" then return nil end',
    'if rg[t] ~= "dash" then return nil end' },
  { "passport: no context needed", "  if context and not has_context(text, rs[i]) then return nil end\n", "" },
  { "passport: no number signs", '      or find(gap, "^%s*номер%s*$") or find(gap, "^%s*Номер%s*$")) and "no" or false',
    '      or find(gap, "^%s*номер%s*$") or find(gap, "^%s*Номер%s*$")) and false or false' },
  { "passport: series 00 taken", 'if sub(d, 1, 2) == "00" or sub(d, 5) == "000000" then return nil end', "" },
  { "phone: after # taken", "    if x == HASH or (x == 150", "    if x == 0 or (x == 150" },
  { "phone: country lengths ignored", "if #key < lo or #key > hi then return nil end",
    "if #key < 10 or #key > 15 then return nil end" },
  { "phone: the digit after 8 unchecked", "or not NATIONAL2[byte(d, 2)] then return nil end", "then return nil end" },
  { "phone: nothing may follow after a space", 'if kind == "phone" or relaxed then return true end',
    "if relaxed then return true end" },
  { "phone: 8 not the same as +7", 'key = "7" .. sub(d, 2)', "key = d" },
  { "a space always parts values", "right_ok(text, re[j] + 1, kind, pk[j + 1] ~= nil)", "right_ok(text, re[j] + 1, kind, true)",
    "if kind and (after == t - 1 and t > 1 or left_ok", "if kind and (true or left_ok" },
  { "a space never parts values", "right_ok(text, re[j] + 1, kind, pk[j + 1] ~= nil)", "right_ok(text, re[j] + 1, kind, false)" },
  { "overlaps: the lower kind wins", "if rx < rl or (rx == rl", "if rx > rl or (rx == rl" },
  { "email: URL paths masked", "  if not find(pre, \"://\", 1, true) then return false end",
    "  do return false end" },
  { "email: a URL's query left alone", "  return not find(rest, \"[?#]\", p + 1)             -- in the path",
    "  return true" },
  { "email: double dots taken", ' and not find(lp, "..", 1, true)', "" },
  { "email: case kept in the key", "key = lower(value) }", "key = value }" },
  { "bytes of other scripts are letters", "WORD[95] = true\n", "WORD[95] = true\nfor b = 128, 255 do WORD[b] = true end\n" },
  { "detect: offsets one off", "start = x.s, stop = x.e", "start = x.s - 1, stop = x.e" },
  { "placeholders without brackets", 'return "[" .. LABEL[kind] .. "_" .. n .. "]"', 'return LABEL[kind] .. "_" .. n' },
  { "a new number for every occurrence", "  local n = nums[key]\n", "  local n\n" },
  { "counts not kept", "    m.counts[kind] = m.counts[kind] + 1\n", "" },
  { "unmask: exact placeholders only", "      if open and close then", "      if open and close and sep == \"_\" and word == label then",
    "      elseif sep == \"_\" and word == label and not WORD", "      elseif false and not WORD" },
  { "unmask: bare names inside words", "elseif sep == \"_\" and word == label and not WORD[byte(text, p - 1) or 0]",
    "elseif sep == \"_\" and word == label" },
  { "no reservation", "  if not may_hold(text) then return end\n", "  do return end\n" },
  { "kinds option ignored", 'local want = kind_set(opts.kinds, "slm.pii.new")', 'local want = kind_set(nil, "slm.pii.new")' },
  { "unknown options accepted", '    if k ~= "kinds" then error(', '    if false then error(' },
  { "tool call arguments not masked", "  f.arguments = m:mask(fn.arguments)\n", "" },
  { "messages masked in place", "      local c = copy(msg)\n", "      local c = msg\n" },
  { "metatables dropped", "  local mt = getmetatable(t)\n  if mt ~= nil then setmetatable(c, mt) end\n", "" },
  { "unmask_value: keys left", '    if type(k) == "string" then k = m:unmask(k) end\n', "" },
  { "unmask_value: no memo", "  if seen[v] then return seen[v] end\n", "" },
}

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  return p:close(), out
end

-- The mutated source, or nil when a text to replace is missing or not unique.
local function mutate(src, m)
  for j = 2, #m, 2 do
    local a = src:find(m[j], 1, true)
    if not a or src:find(m[j], a + 1, true) then return nil end
    src = src:sub(1, a - 1) .. m[j + 1] .. src:sub(a + #m[j])
  end
  return src
end

local chosen = {}
for _, a in ipairs(arg) do chosen[tonumber(a)] = true end
local every = next(chosen) == nil

local ok, listing = sh("cd " .. q(root) .. " && lua5.4 /usr/bin/busted --list tests/pii_spec.lua")
assert(ok, listing)
local specs, failed = {}, {}
for name in listing:gmatch("[^\n]*:%d+: ([^\n]+)") do specs[#specs + 1] = name end

local tree = (os.getenv("TMPDIR") or "/tmp") .. "/slm-mutate-pii"
local source = H.read_file(root .. "/lua/slm/pii.lua")
local status = 0
for i, m in ipairs(MUTATIONS) do
  if every or chosen[i] then
    local src = mutate(source, m)
    if not src then
      print(("%2d %-46s DOES NOT APPLY"):format(i, m[1]))
      status = 1
    else
      assert(sh("rm -rf " .. q(tree) .. " && mkdir -p " .. q(tree) .. " && cp -r " .. q(root .. "/lua") .. " "
        .. q(root .. "/tests") .. " " .. q(root .. "/.busted") .. " " .. q(tree)))
      local f = assert(io.open(tree .. "/lua/slm/pii.lua", "wb"))
      f:write(src)
      f:close()
      local _, out = sh("cd " .. q(tree) .. " && SLM_PII_SEED=1 lua5.4 /usr/bin/busted -o TAP tests/pii_spec.lua")
      local names = {}
      for name in ("\n" .. out):gmatch("\nnot ok %d+ %- ([^\n]+)") do
        names[#names + 1] = name
        failed[name] = true
      end
      print(("%2d %-46s %2d failing: %s"):format(i, m[1], #names,
        table.concat(names, " | "):gsub("slm%.pii ", ""):sub(1, 150)))
      if #names == 0 then status = 1 end
    end
    io.stdout:flush()
  end
end
sh("rm -rf " .. q(tree))

if every then
  local never = {}
  for _, name in ipairs(specs) do
    if not failed[name] then never[#never + 1] = name end
  end
  print(("\n%d specs, %d never failed%s"):format(#specs, #never, #never > 0 and ":" or ""))
  for _, name in ipairs(never) do print("  " .. name) end
  if #never > 0 then status = 1 end
end
os.exit(status)
