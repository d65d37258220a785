-- slm.jsonl: lines in blocks of any size (a line over many blocks, a CRLF
-- cut between two), blank lines, a bad line in the middle (its number,
-- reading goes on), the BOM, the writer (one line, keys sorted, errors).
local slm = require "slm"
local jsonl = slm.jsonl
local fileio = require "slm.fileio"

local function source(s) return fileio.string_source(s) end

local function read_all(s, block, name)
  local r = assert(jsonl.reader(source(s), { block_size = block, name = name }))
  local out = {}
  for obj, err, line in r:rows() do out[#out + 1] = { obj = obj, err = err, line = line } end
  return out
end

describe("slm.jsonl reader", function()
  local DOC = '\239\187\191{"id":1,"text":"a"}\r\n\n   \r\n{"id":2,"tags":["x","y"]}\n'
    .. 'not json\n{"id":3,\n{"id":4}\n[1,2]\n{"id":5,"text":"last, no LF"}'

  it("decodes each line, skips blank ones, reports bad lines with their number and goes on", function()
    for _, block in ipairs({ 1, 2, 3, 7, 64, 1048576 }) do
      local out = read_all(DOC, block, "req.jsonl")
      assert.equal(7, #out, "block " .. block)
      assert.same({ id = 1, text = "a" }, out[1].obj)
      assert.equal(1, out[1].line)
      assert.same({ 2, { "x", "y" } }, { out[2].obj.id, out[2].obj.tags })
      assert.equal(4, out[2].line)
      assert.is_false(out[3].obj)
      assert.equal(5, out[3].line)
      assert.equal("input", out[3].err.kind)
      assert.equal("json", out[3].err.reason)
      assert.equal(5, out[3].err.line)
      assert.matches("req.jsonl:5: expected a JSON object", tostring(out[3].err), 1, true)
      assert.is_false(out[4].obj)
      assert.matches("req.jsonl:6: not valid JSON", tostring(out[4].err), 1, true)
      assert.same({ id = 4 }, out[5].obj)
      assert.equal(7, out[5].line)
      assert.is_false(out[6].obj)
      assert.equal(8, out[6].line)
      assert.same({ id = 5, text = "last, no LF" }, out[7].obj)
      assert.equal(9, out[7].line)
    end
  end)

  it("reads ids and counts as integers, exactly beyond 2^53", function()
    local out = read_all('{"id":3,"order":12345678901234567,"qty":2,"price":2.5}\n', 7)
    local o = out[1].obj
    assert.equal(2.5, o.price)
    if math.type then
      assert.equal("integer", math.type(o.id))
      assert.equal("integer", math.type(o.qty))
      assert.equal(math.tointeger(12345678901234567), o.order)
      assert.equal('{"id":3,"order":12345678901234567,"price":2.5,"qty":2}', require("slm.json").encode(o))
    end
  end)

  it("reads very long lines", function()
    local big = ("x"):rep(3 * 1024 * 1024)
    local out = read_all('{"a":1}\n{"big":"' .. big .. '"}\n{"b":2}\n', 65536)
    assert.equal(3, #out)
    assert.equal(#big, #out[2].obj.big)
    assert.same({ b = 2 }, out[3].obj)
  end)

  it("never puts more than an excerpt of a bad line in the error", function()
    local out = read_all(("z"):rep(500) .. "SECRET\n", 16, "x.jsonl")
    local msg = tostring(out[1].err)
    assert.is_nil(msg:find("SECRET", 1, true))
    assert.is_true(#msg < 160, msg)
  end)

  it("reads a path, closes it at the end; a missing file is nil, err", function()
    local path = os.tmpname()
    local f = io.open(path, "wb")
    f:write('{"a":1}\n')
    f:close()
    local r = assert(jsonl.reader(path))
    local fh, n = r._f, 0
    for obj in r:rows() do n = n + 1; assert.equal(1, obj.a) end
    assert.equal(1, n)
    assert.equal("closed file", io.type(fh))
    os.remove(path)
    local r2, err = jsonl.reader(path)
    assert.is_nil(r2)
    assert.equal("open", err.reason)
    assert.matches(path, tostring(err), 1, true)
  end)

  it("an empty input gives nothing", function()
    assert.same({}, read_all("", 4))
    assert.same({}, read_all("\n\n \n", 1))
  end)

  it("a read failure is false, err and the end", function()
    local calls = 0
    local r = jsonl.reader({ read = function()
      calls = calls + 1
      if calls == 1 then return '{"a":1}\n{"b"' end
      return nil, "Input/output error"
    end }, { name = "d.jsonl" })
    local out = {}
    for obj, err in r:rows() do out[#out + 1] = obj or err end
    assert.equal(2, #out)
    assert.same({ a = 1 }, out[1])
    assert.matches("d.jsonl: cannot read: Input/output error", tostring(out[2]), 1, true)
  end)

  it("raises on bad options", function()
    assert.has_error(function() jsonl.reader(source(""), { block = 4 }) end, "slm.jsonl.reader: unknown option 'block'")
    assert.has_error(function() jsonl.reader(true) end)
  end)
end)

describe("slm.jsonl writer", function()
  it("writes one line per row, keys sorted; the reader reads it back", function()
    local f = io.tmpfile()
    local w = jsonl.writer(f)
    assert.is_true(w:row({ z = 1, a = "multi\nline", m = { 3, 2, 1 } }))
    assert.is_true(w:row({ id = 2, ok = true, none = slm.json.null }))
    assert.is_true(w:close())
    f:seek("set")
    local text = f:read("a")
    assert.equal('{"a":"multi\\nline","m":[3,2,1],"z":1}\n{"id":2,"none":null,"ok":true}\n', text)
    f:seek("set")
    local out = {}
    for obj, err in jsonl.reader(f):rows() do
      assert.is_nil(err)
      out[#out + 1] = obj
    end
    assert.equal(2, #out)
    assert.equal("multi\nline", out[1].a)
    f:close()
  end)

  it("a row that cannot be encoded is nil, err and nothing is written", function()
    local f = io.tmpfile()
    local w = jsonl.writer(f, { name = "out.jsonl" })
    local ok, err = w:row({ f = print })
    assert.is_nil(ok)
    assert.equal("input", err.kind)
    assert.equal("encode", err.reason)
    assert.matches("out.jsonl: cannot encode the row", tostring(err), 1, true)
    assert.is_nil(select(1, w:row({ bad = "\255" })))
    assert.is_true(w:row({ good = 1 }))
    w:close()
    f:seek("set")
    assert.equal('{"good":1}\n', f:read("a"))
    f:close()
  end)

  it("misuse raises", function()
    local w = jsonl.writer(io.tmpfile())
    assert.has_error(function() w:row("text") end, "slm.jsonl.writer: row must be a table, got string")
    w:close()
    assert.has_error(function() w:row({}) end, "slm.jsonl.writer: row after close")
  end)
end)
