-- slm.csv: the RFC 4180 rules as a table of cases (input bytes -> records,
-- line numbers and faults), replayed whole and in blocks of 1, 2, 3, 5 and
-- 7 bytes so that every block boundary falls inside a quoted field, inside
-- a CRLF and inside a doubled quote; then the reader on files, the writer,
-- a round trip of random fields, by_name and misuse.
local slm = require "slm"
local csv = slm.csv
local core = require "slm.core"

local concat, format, random = table.concat, string.format, math.random
local unpack = table.unpack or unpack

-- A temporary file holding s; its path.
local function temp_file(s)
  local path = os.tmpname()
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
  return path
end

local function show(s) return (format("%q", s):gsub("\\\n", "\\n")) end

-- { input, { expected records } }: a record is a list of fields with
-- line =, or { err = reason, at = fault line, line = record line }
local CASES = {
  { "plain", "a,b,c\n1,2,3\n", { { "a", "b", "c", line = 1 }, { "1", "2", "3", line = 2 } } },
  { "CRLF record ends", "a,b\r\n1,2\r\n", { { "a", "b", line = 1 }, { "1", "2", line = 2 } } },
  { "mixed LF and CRLF", "a\r\nb\nc\r\n", { { "a", line = 1 }, { "b", line = 2 }, { "c", line = 3 } } },
  { "final record without a line end", "a,b\n1,2", { { "a", "b", line = 1 }, { "1", "2", line = 2 } } },
  { "final record ending in CR", "a,b\r", { { "a", "b", line = 1 } } },
  { "empty fields", ",a,,\n,\n", { { "", "a", "", "", line = 1 }, { "", "", line = 2 } } },
  { "empty lines are skipped", "a\n\n\r\nb\n\n", { { "a", line = 1 }, { "b", line = 4 } } },
  { "leading empty lines", "\n\nx\n", { { "x", line = 3 } } },
  { "empty input", "", {} },
  { "only line ends", "\n\r\n\n", {} },
  { "quoted fields", '"a","b c"\n', { { "a", "b c", line = 1 } } },
  { "quoted separator", '"a,b",c\n', { { "a,b", "c", line = 1 } } },
  { "quoted LF", '"a\nb",c\nd\n', { { "a\nb", "c", line = 1 }, { "d", line = 3 } } },
  { "quoted CRLF kept", '"a\r\nb"\r\nx\r\n', { { "a\r\nb", line = 1 }, { "x", line = 3 } } },
  { "doubled quotes", '"say ""hi""",""""\n', { { 'say "hi"', '"', line = 1 } } },
  { "empty quoted field", '"",""\n', { { "", "", line = 1 } } },
  { "quoted empty line is a record", '""\n', { { "", line = 1 } } },
  { "quoted field at the end of input", 'a,"b"', { { "a", "b", line = 1 } } },
  { "quoted then CRLF", '"a"\r\n"b"\r\n', { { "a", line = 1 }, { "b", line = 2 } } },
  { "bare CR inside an unquoted field is data", "a\rb,c\n", { { "a\rb", "c", line = 1 } } },
  { "CR CR LF", "a\r\r\nb\n", { { "a\r", line = 1 }, { "b", line = 2 } } },
  { "a record starting with a bare CR", "\rx\n", { { "\rx", line = 1 } } },
  { "spaces kept", " a , b \n", { { " a ", " b ", line = 1 } } },
  { "NUL and UTF-8 bytes", "\0a,\xC3\xA9t\xC3\xA9\n", { { "\0a", "\xC3\xA9t\xC3\xA9", line = 1 } } },
  { "multi-line record numbering", '1,"x\n\ny"\n2,z\n',
    { { "1", "x\n\ny", line = 1 }, { "2", "z", line = 4 } } },
  -- malformed records: false, err; reading goes on at the next line
  { "quote inside an unquoted field", 'ab"c,d\ne,f\n',
    { { err = "quote", at = 1, line = 1 }, { "e", "f", line = 2 } } },
  { "text after a closing quote", '"ab"c,d\r\ne,f\r\n',
    { { err = "after_quote", at = 1, line = 1 }, { "e", "f", line = 2 } } },
  { "CR then text after a closing quote", '"ab"\rx\ne\n',
    { { err = "after_quote", at = 1, line = 1 }, { "e", line = 2 } } },
  { "fault on the last line without a line end", 'a\nb"', { { "a", line = 1 }, { err = "quote", at = 2, line = 2 } } },
  { "fault after a multi-line field", '"a\nb"x,1\nok\n',
    { { err = "after_quote", at = 2, line = 1 }, { "ok", line = 3 } } },
  { "unterminated quote at the end of input", 'a\n"b\nc,d\n',
    { { "a", line = 1 }, { err = "unterminated", at = 2, line = 2 } } },
  { "two faults in a row", 'x"\ny"\nz\n',
    { { err = "quote", at = 1, line = 1 }, { err = "quote", at = 2, line = 2 }, { "z", line = 3 } } },
}

-- The records of s read in blocks of `block` bytes, as comparable tables.
local function read_all(s, block, opts)
  local o = { block_size = block, header = false }
  for k, v in pairs(opts or {}) do o[k] = v end
  local r = assert(csv.reader({ read = function(self, n)
    self.pos = self.pos or 1
    if self.pos > #s then return nil end
    local piece = s:sub(self.pos, self.pos + n - 1)
    self.pos = self.pos + n
    return piece
  end }, o))
  local got = {}
  for row, err in r:rows() do
    if row then
      local t = { line = row.line }
      for i = 1, #row do t[i] = row[i] end
      got[#got + 1] = t
    else
      got[#got + 1] = { err = err.reason, at = err.line, line = err.record_line }
      assert.equal("input", err.kind)
    end
  end
  return got
end

describe("slm.csv reader: the RFC 4180 cases", function()
  for _, case in ipairs(CASES) do
    it(case[1] .. " " .. show(case[2]), function()
      for _, block in ipairs({ 1, 2, 3, 5, 7, 1048576 }) do
        local got = read_all(case[2], block)
        assert.same(case[3], got, "block size " .. block)
      end
    end)
  end

  it("numbers records from 1, bad ones included", function()
    local rows, errs = csv.parse('a\nb"\nc\n')
    assert.equal(1, rows[1].record)
    assert.equal(2, errs[1].record)
    assert.equal(3, rows[2].record)
  end)

  it("a block boundary at every offset of a file with every construct", function()
    local s = '\239\187\191id,"te""xt",n\r\n1,"a\r\nb, ""c""",\r\n\r\n2,"",x\n"3","""",\r\n4,end'
    local want = read_all(s, 1048576)
    assert.same({ "id", 'te"xt', "n", line = 1 }, want[1])
    assert.same({ "1", 'a\r\nb, "c"', "", line = 2 }, want[2])
    assert.same({ "2", "", "x", line = 5 }, want[3])
    assert.same({ "3", '"', "", line = 6 }, want[4])
    assert.same({ "4", "end", line = 7 }, want[5])
    for cut = 1, #s - 1 do
      local parts = { s:sub(1, cut), s:sub(cut + 1) }
      local i = 0
      local r = csv.reader({ read = function() i = i + 1; return parts[i] end }, { header = false })
      local got = {}
      for row in r:rows() do
        local t = { line = row.line }
        for k = 1, #row do t[k] = row[k] end
        got[#got + 1] = t
      end
      assert.same(want, got, "cut at " .. cut)
    end
  end)
end)

describe("slm.csv reader: BOM, separator, header, ragged rows", function()
  it("strips a UTF-8 BOM at the start, split over blocks too", function()
    for _, block in ipairs({ 1, 2, 4 }) do
      assert.same({ { "a", "b", line = 1 } }, read_all("\239\187\191a,b\n", block))
    end
  end)

  it("keeps the BOM with bom = false, and a BOM elsewhere always", function()
    assert.same({ { "\239\187\191a", line = 1 } }, read_all("\239\187\191a\n", 1, { bom = false }))
    assert.same({ { "a", line = 1 }, { "\239\187\191b", line = 2 } }, read_all("a\n\239\187\191b\n", 2))
  end)

  it("keeps a partial BOM as data", function()
    assert.same({ { "\239\187x", line = 1 } }, read_all("\239\187x\n", 1))
    assert.same({ { "\239", line = 1 } }, read_all("\239", 1))
  end)

  it("reads with another separator", function()
    assert.same({ { "a,b", "c", '"', line = 1 } }, read_all('a,b;c;""""\n', 2, { separator = ";" }))
    assert.same({ { "a", "b c", line = 1 } }, read_all('a\t"b c"\n', 1, { separator = "\t" }))
  end)

  it("gives the header and the data rows after it; ragged rows are marked, never padded", function()
    local path = temp_file('\239\187\191id,text\r\n1,hello\r\n2\r\n3,a,b\r\n4,"multi\r\nline"\r\n')
    local r = assert(csv.reader(path, { block_size = 3 }))
    assert.same({ "id", "text" }, { unpack(r:header()) })
    local rows = {}
    for row, err in r:rows() do
      assert.is_nil(err)
      rows[#rows + 1] = row
    end
    assert.equal(4, #rows)
    assert.same({ "1", "hello" }, { rows[1][1], rows[1][2] })
    assert.is_nil(rows[1].ragged)
    assert.equal(2, rows[1].line)
    assert.equal(2, rows[1].record)
    assert.is_true(rows[2].ragged)
    assert.equal(1, #rows[2])
    assert.is_true(rows[3].ragged)
    assert.equal(3, #rows[3])
    assert.is_nil(rows[4].ragged)
    assert.equal("multi\r\nline", rows[4][2])
    assert.equal(5, rows[4].line)
    os.remove(path)
  end)

  it("without a header, rows are compared with the first row", function()
    local rows = csv.parse("a,b\nc\nd,e\n")
    assert.is_nil(rows[1].ragged)
    assert.is_true(rows[2].ragged)
    assert.is_nil(rows[3].ragged)
  end)

  it("an empty file has an empty header and no rows", function()
    local r = csv.reader({ read = function() return nil end })
    assert.same({}, r:header())
    local n = 0
    for _ in r:rows() do n = n + 1 end
    assert.equal(0, n)
  end)

  it("rows() reads the header first when header() was not called", function()
    local r = csv.reader(require("slm.fileio").string_source("h1,h2\nv1,v2\n"))
    local rows = {}
    for row in r:rows() do rows[#rows + 1] = row end
    assert.equal(1, #rows)
    assert.equal("v1", rows[1][1])
    assert.same({ "h1", "h2" }, { unpack(r:header()) })
  end)

  it("a malformed header is an error (from header(), else from rows() first), then the rows follow", function()
    local src = 'a"b,c\n1,2\n'
    local r = csv.reader(require("slm.fileio").string_source(src), { name = "in.csv" })
    local h, err = r:header()
    assert.is_nil(h)
    assert.equal("quote", err.reason)
    local got = {}
    for row, e in r:rows() do got[#got + 1] = row or e end
    assert.equal(1, #got)
    assert.equal("1", got[1][1])
    r = csv.reader(require("slm.fileio").string_source(src), { name = "in.csv" })
    got = {}
    for row, e in r:rows() do got[#got + 1] = row or e end
    assert.equal(2, #got)
    assert.equal("quote", got[1].reason)
    assert.equal("1", got[2][1])
  end)
end)

describe("slm.csv reader: errors", function()
  it("name the file, the line, the record and the fault, with a short excerpt only", function()
    local secret = ("x"):rep(200) .. "SECRET-TAIL" .. ("y"):rep(200)
    local r = csv.reader(require("slm.fileio").string_source("h\nok\n" .. secret .. '"zz\nnext\n'),
      { name = "tickets.csv" })
    r:header()
    local out = {}
    for row, err in r:rows() do out[#out + 1] = row or err end
    assert.equal(3, #out)
    local err = out[2]
    assert.equal("input", err.kind)
    assert.equal("quote", err.reason)
    assert.equal("tickets.csv", err.file)
    assert.equal(3, err.line)
    assert.equal(3, err.record)
    assert.equal(1, err.field)
    local msg = tostring(err)
    assert.matches("tickets.csv:3: record 3, field 1: a quote inside an unquoted field", msg, 1, true)
    assert.matches("reading goes on at the next line", msg, 1, true)
    assert.is_nil(msg:find("SECRET", 1, true))
    assert.is_true(#msg < 200, msg)
    assert.equal("next", out[3][1])
  end)

  it("quote the field up to the fault, the byte at fault included", function()
    local _, errs = csv.parse('id\nabc"def\n"x"yz\n', { name = "e.csv" })
    assert.matches('(near "abc\\x22")', tostring(errs[1]), 1, true)
    assert.matches('(near "xy")', tostring(errs[2]), 1, true)
  end)

  it("say that nothing after an unterminated quote can be read", function()
    local _, errs = csv.parse('a\n"b,c\nd\ne\n', { name = "f.csv" })
    assert.equal(1, #errs)
    assert.equal("unterminated", errs[1].reason)
    assert.equal(2, errs[1].line)
    assert.matches("f.csv:2: record 2, field 1: the quoted field opened on line 2 is not closed by the end of the file; nothing after its opening quote could be read", tostring(errs[1]), 1, true)
  end)

  it("a record over max_record is an error and reading goes on after it", function()
    local rows, errs = csv.parse('a,b\n"' .. ("z"):rep(100) .. '\n",c\nd\n', { max_record = 50, block_size = 7 })
    assert.equal(1, #errs)
    assert.equal("too_long", errs[1].reason)
    assert.matches("longer than max_record (50 bytes)", tostring(errs[1]), 1, true)
    assert.equal(2, #rows)
    assert.equal("d", rows[2][1])
    assert.equal(4, rows[2].line)
  end)

  it("a file that cannot be opened is nil, err naming it", function()
    local r, err = csv.reader("/nonexistent/dir/x.csv")
    assert.is_nil(r)
    assert.equal("input", err.kind)
    assert.equal("open", err.reason)
    assert.matches("/nonexistent/dir/x.csv", tostring(err), 1, true)
  end)

  it("a read failure is false, err and the end", function()
    local calls = 0
    local r = csv.reader({ read = function()
      calls = calls + 1
      if calls == 1 then return "a,b\n1," end
      return nil, "Input/output error"
    end }, { name = "disk.csv" })
    assert.same({ "a", "b" }, { unpack(r:header()) })
    local out = {}
    for row, err in r:rows() do out[#out + 1] = row or err end
    assert.equal(1, #out) -- the record the failure cut ("1,") is not reported
    assert.equal("io", out[1].reason)
    assert.matches("disk.csv: cannot read: Input/output error", tostring(out[1]), 1, true)
  end)
end)

describe("slm.csv reader: streaming", function()
  it("reads block by block, never the whole file", function()
    local rows = {}
    for i = 1, 2000 do rows[i] = format('%d,"line one\nline two, ""%d""",x', i, i) end
    local s = concat(rows, "\r\n") .. "\r\n"
    local asked, pos, most = 0, 1, 0
    local r = csv.reader({ read = function(_, n)
      asked = asked + 1
      most = math.max(most, n)
      if pos > #s then return nil end
      local piece = s:sub(pos, pos + n - 1)
      pos = pos + n
      return piece
    end }, { header = false, block_size = 4096 })
    local n = 0
    for row in r:rows() do
      n = n + 1
      assert.equal(tostring(n), row[1])
      assert.equal(format('line one\nline two, "%d"', n), row[2])
      assert.equal(2 * n - 1, row.line)
    end
    assert.equal(2000, n)
    assert.equal(4096, most)
    assert.is_true(asked > math.floor(#s / 4096))
  end)

  it("closes the file it opened at the end, and on close()", function()
    local path = temp_file("a\nb\n")
    local r = assert(csv.reader(path))
    local fh = r._f
    local next_row = r:rows() -- by hand: a for loop would also close it (__close, Lua 5.4)
    while next_row() do end
    assert.equal("closed file", io.type(fh))
    r = assert(csv.reader(path))
    fh = r._f
    r:header()
    r:close()
    assert.equal("closed file", io.type(fh))
    os.remove(path)
  end)
end)

describe("slm.csv reader: a 50 MB file", function()
  it("streams in bounded memory", function()
    -- 5 MB under valgrind (bin/test's valgrind stage), else 50 MB
    local mb = os.getenv("SLM_TEST_VALGRIND") and 5 or 50
    local block = {}
    for i = 1, 10 do
      block[i] = format('%d,"multi\r\nline, with ""quotes"" and commas",%s\r\n', i, ("x"):rep(60))
    end
    block = concat(block)
    local copies = math.ceil(mb * 1048576 / #block)
    local path = os.tmpname()
    local f = assert(io.open(path, "wb"))
    local piece = block:rep(1000)
    for _ = 1, math.ceil(copies / 1000) do f:write(piece) end
    local size = f:seek("end")
    f:close()
    piece = nil
    collectgarbage()
    local base = collectgarbage("count")
    local r = assert(csv.reader(path, { header = false }))
    local n, most = 0, 0
    for row, err in r:rows() do
      assert(row, err)
      n = n + 1
      -- what the reader keeps alive (collected first: how far the
      -- collector lags behind depends on the heap the other specs left)
      if n % 5000 == 0 then collectgarbage(); most = math.max(most, collectgarbage("count") - base) end
    end
    os.remove(path)
    assert.equal(math.ceil(copies / 1000) * 10000, n)
    assert.is_true(size >= mb * 1048576)
    -- the rows of a block (256 KiB) and the reader's buffers: far below the file
    assert.is_true(most < 8 * 1024, format("%.1f MB in use while reading %.0f MB", most / 1024, size / 1048576))
  end)
end)

describe("slm.csv writer", function()
  it("quotes only when needed", function()
    assert.equal("a,b,c", csv.format_row({ "a", "b", "c" }))
    assert.equal('"a,b","say ""hi""","x\ny","x\ry"', csv.format_row({ "a,b", 'say "hi"', "x\ny", "x\ry" }))
    assert.equal('" a","b ","\tc",d e', csv.format_row({ " a", "b ", "\tc", "d e" }))
    assert.equal(',,', csv.format_row({ "", "", "" }))
    assert.equal('""', csv.format_row({ "" }))
    assert.equal("1,2.5,-3", csv.format_row({ 1, 2.5, -3 }))
    assert.equal("\0,\xC3\xA9", csv.format_row({ "\0", "\xC3\xA9" }))
  end)

  it("with another separator quotes that one", function()
    assert.equal('a;"b;c";d,e', csv.format_row({ "a", "b;c", "d,e" }, { separator = ";" }))
  end)

  it("writes CRLF by default, LF when asked, a BOM when asked", function()
    local path = os.tmpname()
    local w = assert(csv.writer(path))
    assert.is_true(w:row({ "id", "text" }))
    assert.is_true(w:row({ 1, "two\nlines" }))
    assert.is_true(w:close())
    assert.is_true(w:close())
    local f = io.open(path, "rb")
    assert.equal('id,text\r\n1,"two\nlines"\r\n', f:read("a"))
    f:close()
    w = assert(csv.writer(path, { eol = "\n", bom = true }))
    w:row({ "a" })
    w:close()
    f = io.open(path, "rb")
    assert.equal("\239\187\191a\n", f:read("a"))
    f:close()
    os.remove(path)
  end)

  it("leaves a file it did not open open, flushed", function()
    local f = io.tmpfile()
    local w = csv.writer(f)
    w:row({ "x" })
    w:close()
    assert.equal("file", io.type(f))
    f:seek("set")
    assert.equal("x\r\n", f:read("a"))
    f:close()
  end)

  it("refuses what is not a field, an empty row and rows after close", function()
    assert.has_error(function() csv.format_row({ "a", {} }) end, "csv: field 2 is a table (strings and numbers only)")
    assert.has_error(function() csv.format_row({ "a", true }) end)
    assert.has_error(function() csv.format_row({}) end)
    local w = csv.writer(io.tmpfile())
    w:close()
    assert.has_error(function() w:row({ "a" }) end, "slm.csv.writer: row after close")
  end)

  it("returns nil, err when the file cannot be written", function()
    local w = csv.writer({ write = function() return nil, "No space left on device" end }, { name = "out.csv" })
    local ok, err = w:row({ "a" })
    assert.is_nil(ok)
    assert.equal("input", err.kind)
    assert.matches("out.csv: cannot write: No space left on device", tostring(err), 1, true)
  end)
end)

describe("slm.csv round trip", function()
  local ALPHABET = { "a", "b", ",", ";", '"', "\r", "\n", "\r\n", " ", "\t", "\0", "\xC3\xA9", "\xE2\x82\xAC", "x", "1" }

  local function field()
    local n = random(0, 6)
    local t = {}
    for i = 1, n do t[i] = ALPHABET[random(#ALPHABET)] end
    return concat(t)
  end

  it("writer -> reader gives the same fields, whatever they hold", function()
    math.randomseed(14)
    for _, sep in ipairs({ ",", ";", "\t" }) do
      for _, eol in ipairs({ "\r\n", "\n" }) do
        local want = {}
        local f = io.tmpfile()
        local w = csv.writer(f, { separator = sep, eol = eol })
        for i = 1, 300 do
          local row = {}
          for j = 1, random(1, 5) do row[j] = field() end
          want[i] = row
          assert.is_true(w:row(row))
        end
        w:close()
        f:seek("set")
        local r = csv.reader(f, { separator = sep, header = false, block_size = random(1, 64) })
        local i = 0
        for row, err in r:rows() do
          assert.is_nil(err)
          i = i + 1
          assert.same(want[i], { unpack(row) }, "row " .. i)
        end
        assert.equal(300, i)
        f:close()
      end
    end
  end)

  it("core.csv_format and the parser agree on every single-field value", function()
    for _, v in ipairs({ "", " ", '"', '""', "\r", "\n", "\r\n", ",", "a\rb" }) do
      local p = core.csv_parser()
      local recs = p:feed(core.csv_format({ v }))
      for _, r in ipairs(p:finish()) do recs[#recs + 1] = r end
      assert.equal(1, #recs, show(v))
      assert.equal(v, recs[1][1])
    end
  end)
end)

describe("slm.csv.by_name", function()
  it("maps names to values; the first of duplicate names wins", function()
    local t = csv.by_name({ "id", "text", "id" }, { "1", "hello", "2" })
    assert.same({ id = "1", text = "hello" }, t)
  end)

  it("leaves missing fields absent and extra fields out", function()
    assert.same({ a = "1" }, csv.by_name({ "a", "b" }, { "1" }))
    assert.same({ a = "1", b = "2" }, csv.by_name({ "a", "b" }, { "1", "2", "3" }))
  end)
end)

describe("slm.csv misuse", function()
  it("raises on unknown or bad options", function()
    assert.has_error(function() csv.reader(io.tmpfile(), { sep = ";" }) end, "slm.csv.reader: unknown option 'sep'")
    assert.has_error(function() csv.reader(io.tmpfile(), { separator = ";;" }) end)
    assert.has_error(function() csv.reader(io.tmpfile(), { separator = '"' }) end)
    assert.has_error(function() csv.reader(io.tmpfile(), { block_size = 0 }) end)
    assert.has_error(function() csv.writer(io.tmpfile(), { eol = "\r" }) end)
    assert.has_error(function() csv.reader(42) end, "slm.csv.reader: expected a path or a file, got number")
    assert.has_error(function() csv.parse(nil) end)
    assert.has_error(function() core.csv_parser("ab") end)
  end)

  it("is reachable as slm.csv and slm.jsonl", function()
    assert.equal(require("slm.csv"), slm.csv)
    assert.equal(require("slm.jsonl"), slm.jsonl)
  end)
end)
