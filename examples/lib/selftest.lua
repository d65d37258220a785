-- examples/lib/selftest.lua: checks for the CSV reader and table formatter.
-- Run from anywhere:  lua5.4 examples/lib/selftest.lua
-- Prints "ok" lines and exits 0, or stops at the first failed assertion.

local script_dir = (arg and arg[0] or ""):match("^(.*)[/\\]") or "."
local repo_root = script_dir .. "/../.."
package.path = repo_root .. "/?.lua;" .. package.path

local csv = require "examples.lib.csv"
local tf = require "examples.lib.table_fmt"

local passed = 0
local function check(name, fn)
  local ok, err = pcall(fn)
  if not ok then
    io.stderr:write("FAIL ", name, ": ", tostring(err), "\n")
    os.exit(1)
  end
  passed = passed + 1
  print("ok   " .. name)
end

local function eq(a, b, what)
  if a ~= b then
    error(("%s: expected %q, got %q"):format(what or "value", tostring(b), tostring(a)), 2)
  end
end

local function same_records(got, want)
  eq(#got, #want, "record count")
  for r = 1, #want do
    eq(#got[r], #want[r], "field count in record " .. r)
    for f = 1, #want[r] do eq(got[r][f], want[r][f], ("record %d field %d"):format(r, f)) end
  end
end

local function raises(fn, pattern)
  local ok, err = pcall(fn)
  assert(not ok, "expected an error")
  assert(tostring(err):find(pattern), "error " .. tostring(err) .. " does not match " .. pattern)
end

-- CSV -----------------------------------------------------------------------

check("csv: plain fields, LF", function()
  same_records(csv.parse_records("a,b,c\n1,2,3\n"), { { "a", "b", "c" }, { "1", "2", "3" } })
end)

check("csv: CRLF and no final line break", function()
  same_records(csv.parse_records("a,b\r\n1,2\r\n3,4"), { { "a", "b" }, { "1", "2" }, { "3", "4" } })
end)

check("csv: lone CR as a record separator", function()
  same_records(csv.parse_records("a,b\r1,2\r"), { { "a", "b" }, { "1", "2" } })
end)

check("csv: quoted fields with commas", function()
  same_records(csv.parse_records('x,"hello, world",y\n'), { { "x", "hello, world", "y" } })
end)

check("csv: doubled quotes", function()
  same_records(csv.parse_records('"say ""hi""","""",""""""\n'), { { 'say "hi"', '"', '""' } })
end)

check("csv: embedded LF and CRLF stay as written", function()
  same_records(csv.parse_records('id,body\r\n1,"line one\nline two"\r\n2,"a\r\nb"\r\n'),
    { { "id", "body" }, { "1", "line one\nline two" }, { "2", "a\r\nb" } })
end)

check("csv: empty fields, quoted and unquoted", function()
  same_records(csv.parse_records(',,\n"",x,""\n'), { { "", "", "" }, { "", "x", "" } })
end)

check("csv: trailing comma at end of input", function()
  same_records(csv.parse_records("a,"), { { "a", "" } })
end)

check("csv: blank lines are skipped, a quoted empty line is not", function()
  same_records(csv.parse_records('a\n\n\nb\n""\n'), { { "a" }, { "b" }, { "" } })
end)

check("csv: UTF-8 BOM is dropped and Cyrillic passes through", function()
  local rows, header = csv.parse("\239\187\191имя,текст\nАнна,\"Привет, мир\"\n")
  eq(header[1], "имя", "first header")
  eq(rows[1]["имя"], "Анна")
  eq(rows[1]["текст"], "Привет, мир")
end)

check("csv: empty input", function()
  same_records(csv.parse_records(""), {})
  local rows, header = csv.parse("")
  eq(#rows, 0); eq(#header, 0)
end)

check("csv: rows keyed by header, short rows padded", function()
  local rows, header = csv.parse("id,name,note\n1,Ann\n2,Bob,x\n")
  eq(#header, 3); eq(#rows, 2)
  eq(rows[1].id, "1"); eq(rows[1].name, "Ann"); eq(rows[1].note, "")
  eq(rows[2].note, "x")
end)

check("csv: malformed input is reported with a line number", function()
  raises(function() csv.parse_records('a,"open\n') end, "unterminated")
  raises(function() csv.parse_records('a,b\nc,d"e\n') end, "line 2: quote inside")
  raises(function() csv.parse_records('"a"b\n') end, "after closing quote")
  raises(function() csv.parse_records('"x\ny",1\n"z"q\n') end, "line 3")
  raises(function() csv.parse("a\n1,2\n") end, "has 2 fields")
  raises(function() csv.parse("a,a\n1,2\n") end, "duplicate column")
end)

check("csv: custom separator", function()
  same_records(csv.parse_records('a;"b;c"\n', { sep = ";" }), { { "a", "b;c" } })
end)

check("csv: the bundled catalogue", function()
  local path = script_dir .. "/../data/catalogue.csv"
  local rows, header = assert(csv.read_file(path))
  eq(table.concat(header, ","), "sku,name,category,price_rub,price_eur,features,audience,lang", "header")
  assert(#rows >= 40, "expected about 50 rows, got " .. #rows)
  local keys, ru, commas = {}, 0, 0
  for i, r in ipairs(rows) do
    assert(r.sku:match("^%u+%-%d+$"), "bad sku in row " .. i)
    local k = r.sku .. "/" .. r.lang
    assert(not keys[k], "duplicate " .. k); keys[k] = true
    assert(utf8.len(r.features), "features are not valid UTF-8 in row " .. i)
    if r.lang == "ru" then ru = ru + 1 end
    if r.features:find(",") then commas = commas + 1 end
  end
  assert(ru >= 10, "expected Russian rows, got " .. ru)
  assert(commas >= 5, "expected quoted fields with commas")
  assert(csv.read_file(script_dir .. "/../data/no-such-file.csv") == nil, "missing file")
end)

-- table_fmt -----------------------------------------------------------------

check("table_fmt: width counts characters, not bytes", function()
  eq(tf.width("abc"), 3); eq(tf.width("привет"), 6); eq(tf.width("…"), 1)
  eq(tf.width(""), 0); eq(tf.width("日本"), 2); eq(tf.width(42), 2)
  eq(tf.width("a\255b"), 3, "invalid byte counts one column")
  eq(tf.width("\208"), 1, "truncated sequence counts one column")
end)

check("table_fmt: truncate never splits a character", function()
  eq(tf.truncate("привет мир", 5), "прив…")
  eq(tf.truncate("привет", 6), "привет")
  eq(tf.truncate("hello", 1), "…")
  eq(tf.truncate("hello", 0), "")
  eq(tf.width(tf.truncate("Двойное списание за заказ", 10)), 10)
  for n = 1, 12 do
    local s = tf.truncate("ёжик в тумане", n)
    assert(utf8.len(s), "invalid UTF-8 after truncate to " .. n)
    assert(tf.width(s) <= n)
  end
end)

check("table_fmt: pad", function()
  eq(tf.pad("ок", 4), "ок  "); eq(tf.pad("7", 3, "right"), "  7"); eq(tf.pad("long", 2), "long")
end)

check("table_fmt: columns line up with mixed scripts", function()
  local out = tf.render({
    { key = "id", title = "ID", align = "right" },
    { key = "lang", title = "Lang" },
    { key = "text", title = "Text", max = 12 },
    { key = "n", title = "N", align = "right" },
  }, {
    { id = 1, lang = "ru", text = "Двойное списание", n = 7 },
    { id = 22, lang = "en", text = "Where is my parcel?", n = 123 },
    { id = 333, lang = "ru", text = "ок\nвторая строка", n = 0 },
    { id = 4, lang = nil, text = "", n = 5 },
  })
  local lines = {}
  for l in out:gmatch("([^\n]*)\n") do lines[#lines + 1] = l end
  eq(#lines, 6, "header + rule + 4 rows")
  eq(lines[1], " ID  Lang  Text            N")
  eq(lines[2], "---  ----  ------------  ---")
  eq(lines[3], "  1  ru    Двойное спи…    7")
  eq(lines[4], " 22  en    Where is my…  123")
  eq(lines[5], "333  ru    ок вторая с…    0")
  eq(lines[6], "  4" .. string.rep(" ", 24) .. "5")
end)

check("table_fmt: no trailing spaces, format hook, no header", function()
  local out = tf.render({ { key = "a" }, { key = "b", format = function(v) return v and "yes" or "" end } },
    { { a = "x", b = false }, { a = "yy", b = true } }, { header = false })
  eq(out, "x\nyy  yes\n")
end)

print(("%d checks passed"):format(passed))
