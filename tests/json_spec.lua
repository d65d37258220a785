-- slm.json: the C encoder (csrc/json.c, core.json_encode) and the module
-- around it.  Exact integers, floats that round-trip, every escape, UTF-8
-- accepted and refused, [] through json.array, sorted keys, nested values
-- equal to lua-cjson's decode of our output, and every error with its path.
local json = require "slm.json"
local core = require "slm.core"
local cjson = require "cjson"

local enc, dec = json.encode, cjson.decode
local char, byte, format, rep = string.char, string.byte, string.format, string.rep
local concat = table.concat

-- Lua 5.4 has integers and string.pack; LuaJIT (numbers are doubles) runs
-- the parts that do not need them.
local has_int = math.type ~= nil
local seed = tonumber(os.getenv("SLM_JSON_SEED")) or os.time()
math.randomseed(seed)
-- under valgrind (bin/test sets SLM_TEST_VALGRIND) the random loops run a
-- tenth as long
local ROUNDS = os.getenv("SLM_TEST_VALGRIND") and 0.1 or 1
local function rounds(n) return math.floor(n * ROUNDS) end

-- A non-NULL light userdata without a C module of our own.
local upv = 0
local function holder() return upv end
local LIGHT = debug.upvalueid(holder, 1)

local function err_of(v, opts)
  local ok, e = pcall(enc, v, opts)
  assert(not ok, "expected an error, got " .. tostring(e))
  return e
end

-- byte order, which is what the encoder sorts by
local function bytes_lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = byte(a, i), byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- The shortest of %.15g, %.16g, %.17g that reads back equal (the rule the
-- encoder documents), for non-integral or huge finite doubles.
local function shortest(x)
  for p = 15, 17 do
    local s = format("%." .. p .. "g", x)
    if p == 17 or tonumber(s) == x then return s end
  end
end

describe("slm.json", function()
  describe("integers", function()
    it("prints Lua 5.4 integers exactly over the whole 64-bit range", function()
      if not has_int then return pending("Lua 5.4 integers") end
      assert.equal("9223372036854775807", enc(math.maxinteger))
      assert.equal("-9223372036854775808", enc(math.mininteger))
      assert.equal("4944116822809979520", enc(4944116822809979520))
      assert.equal('{"seed":4944116822809979520}', enc{ seed = 4944116822809979520 })
      assert.equal("0", enc(0))
      assert.equal("-1", enc(-1))
      for _ = 1, rounds(2000) do
        local i = math.random(math.mininteger, math.maxinteger)
        assert.equal(format("%d", i), enc(i))
        assert.equal(format("[%d]", i), enc{ i })
      end
    end)

    it("prints integral floats as integers: 2^53-1, 2^53, 1.0, -0.0", function()
      assert.equal("9007199254740991", enc(2 ^ 53 - 1))
      assert.equal("9007199254740992", enc(2 ^ 53))
      assert.equal("-9007199254740991", enc(-(2 ^ 53 - 1)))
      assert.equal("1", enc(1.0))
      assert.equal("250", enc(500 / 2))
      assert.equal("-0", enc(-0.0))
      assert.equal("0", enc(0.0))
      -- integral doubles up to 2^63 print their exact value (what LuaJIT
      -- holds for an integer literal above 2^53)
      assert.equal("4611686018427387904", enc(2 ^ 62))
      assert.equal("-9223372036854775808", enc(-(2 ^ 63)))
      assert.equal("4944116822809979904", enc(4944116822809979520.0))
    end)
  end)

  describe("decode_exact", function()
    local H = require "tests.helpers"
    local I = H.float_subtype -- Lua 5.4: integers of their own

    it("gives integral numbers as integers, exactly over 64 bits, and leaves the rest", function()
      local t = json.decode_exact('{"id":12345678901234567,"n":3,"two":2.0,"f":0.5,"neg":-9223372036854775808,'
        .. '"max":9223372036854775807,"edge":[9007199254740992,9007199254740993,-9007199254740993],'
        .. '"frac":0.12345678901234567,"exp":1.2345678901234567e16,"huge":123456789012345678901,'
        .. '"s":"12345678901234567 \\"99999999999999999\\"","deep":{"a":[{"b":-12345678901234567}]},"z":-0.0}')
      assert.equal(0.5, t.f)
      assert.equal(-math.huge, 1 / t.z) -- -0 stays -0
      assert.equal('12345678901234567 "99999999999999999"', t.s) -- strings untouched
      assert.equal(1.2345678901234567e16, t.exp) -- a float literal stays a float
      assert.equal(0.12345678901234567, t.frac)
      assert.equal(123456789012345678901, t.huge) -- beyond 64 bits: a double
      if not I then return end
      assert.equal("integer", math.type(t.n)); assert.equal(3, t.n)
      assert.equal("integer", math.type(t.two))
      assert.equal("float", math.type(t.z))
      assert.equal("float", math.type(t.huge))
      assert.equal(math.tointeger(12345678901234567), t.id); assert.equal("integer", math.type(t.id))
      assert.equal(math.mininteger, t.neg)
      assert.equal(math.maxinteger, t.max)
      assert.same({ 9007199254740992, 9007199254740993, -9007199254740993 }, t.edge)
      for _, v in ipairs(t.edge) do assert.equal("integer", math.type(v)) end
      assert.equal(-12345678901234567, t.deep.a[1].b)
      -- and back: the same digits (lua-cjson's decode rounds them)
      assert.equal('{"id":12345678901234567}', json.encode({ id = json.decode_exact('{"id":12345678901234567}').id }))
      assert.equal(12345678901234568, json.decode('{"id":12345678901234567}').id)
    end)

    it("reports bad JSON as decode does, at the text's own positions", function()
      local ok1, e1 = pcall(json.decode, '{"id":12345678901234567,}')
      local ok2, e2 = pcall(json.decode_exact, '{"id":12345678901234567,}')
      assert.is_false(ok1); assert.is_false(ok2)
      assert.equal((tostring(e1):gsub("^.-:%d+: ", "")), (tostring(e2):gsub("^.-:%d+: ", "")))
      -- a string that holds the mark itself is read as it is
      if I then
        local t = json.decode_exact('{"a":"\\u0000slm-int:12345678901234567","b":12345678901234567}')
        assert.equal("\0slm-int:12345678901234567", t.a)
        assert.equal("float", math.type(t.b)) -- the exact path is skipped for such a text
      end
      assert.equal(json.null, json.decode_exact("null"))
      assert.equal(7, json.decode_exact("7"))
      assert.equal("integer", H.math_type(json.decode_exact("7")))
      if I then assert.equal(math.tointeger(12345678901234567), json.decode_exact(" 12345678901234567 ")) end
      assert.equal("a 12345678901234567", json.decode_exact('"a 12345678901234567"'))
    end)
  end)

  describe("floats", function()
    it("prints the shortest form that reads back equal", function()
      assert.equal("0.25", enc(0.25))
      assert.equal("0.1", enc(0.1))
      assert.equal("0.7", enc(0.7))
      assert.equal("0.30000000000000004", enc(0.1 + 0.2))
      assert.equal("0.3333333333333333", enc(1 / 3))
      assert.equal("-1.5", enc(-1.5))
      assert.equal("1e+300", enc(1e300))
      assert.equal("9.223372036854776e+18", enc(2 ^ 63))
      assert.equal("1.7976931348623157e+308", enc(1.7976931348623157e308))
      assert.equal("1e-05", enc(1e-5))
      assert.equal(1e300, dec(enc{ 1e300 })[1])
    end)

    it("round-trips random doubles: decode(encode(x)) == x", function()
      if not has_int then return pending("string.pack") end
      local n = 0
      while n < rounds(20000) do
        local x = string.unpack("<d", string.pack("<i8", math.random(math.mininteger, math.maxinteger)))
        if x == x and x ~= math.huge and x ~= -math.huge then
          n = n + 1
          local s = enc(x)
          assert(dec(s) == x, format("seed %d: %s reads back as %.17g, not %.17g", seed, s, dec(s), x))
          if not (x >= -2 ^ 63 and x < 2 ^ 63 and math.floor(x) == x) then
            assert.equal(shortest(x), s)
          end
        end
      end
      -- decimal-looking values and the subnormal edge
      for _ = 1, rounds(5000) do
        local x = math.random(-1e6, 1e6) / 10 ^ math.random(0, 12)
        assert.equal(x, dec(enc(x)))
      end
      assert.equal(5e-324, dec(enc(5e-324)))
      assert.equal(2.2250738585072014e-308, dec(enc(2.2250738585072014e-308)))
    end)

    -- With a locale whose decimal point is a comma.  When the machine has
    -- none installed, one is compiled from glibc's definitions (Debian's
    -- `locales`, installed with the test tools) into a folder of the spec's
    -- own, and the check runs in a child process pointed at it by LOCPATH:
    -- this spec runs in CI, and the system's locales are left alone.
    it("writes '.' whatever LC_NUMERIC says", function()
      local H = require "tests.helpers"
      local check = [[
        local loc
        for _, l in ipairs{ "de_DE.UTF-8", "de_DE.utf8", "fr_FR.UTF-8", "fr_FR.utf8", "ru_RU.UTF-8" } do
          if os.setlocale(l, "numeric") then loc = l break end
        end
        if not loc then print("NOLOCALE") return end
        -- (LuaJIT formats numbers itself, whatever the locale; C's snprintf, which the encoder uses, does not)
        assert(jit or string.format("%.2f", 0.25) == "0,25", "the locale's decimal point is not a comma")
        local ok, s = pcall(require("slm.json").encode, { 0.25, 1e300, 1 / 3, -2.5e-7 })
        print(ok and "OUT " .. s or "ERR " .. tostring(s))
      ]]
      local out = H.run_lua(check)
      local dir
      if out:find("NOLOCALE", 1, true) then
        dir = os.tmpname()
        os.remove(dir)
        local built = H.sh("mkdir -p " .. H.q(dir) .. " && localedef -i de_DE -f UTF-8 " .. H.q(dir .. "/de_DE.UTF-8"))
        out = H.run_lua(check, "LOCPATH=" .. H.q(dir))
        H.sh("rm -rf " .. H.q(dir))
        if out:find("NOLOCALE", 1, true) then
          return pending("no locale with a decimal comma, and localedef could not build one: " .. built)
        end
      end
      assert.equal("OUT [0.25,1e+300,0.3333333333333333,-2.5e-07]", out:match("[^\n]*OUT [^\n]*") or out)
    end)
  end)

  describe("strings", function()
    it("escapes every control character, quote and backslash; not / or DEL", function()
      local short = { [8] = "\\b", [9] = "\\t", [10] = "\\n", [12] = "\\f", [13] = "\\r" }
      for c = 0, 31 do
        assert.equal('"' .. (short[c] or format("\\u%04x", c)) .. '"', enc(char(c)))
        -- inside a longer string, past the 8-byte scan, at every offset
        for pre = 0, 9 do
          assert.equal('"' .. rep("a", pre) .. (short[c] or format("\\u%04x", c)) .. 'z"',
            enc(rep("a", pre) .. char(c) .. "z"))
        end
      end
      assert.equal([["\""]], enc('"'))
      assert.equal([["\\"]], enc("\\"))
      assert.equal([["/"]], enc("/"))
      assert.equal('"\127"', enc("\127"))
      assert.equal('"a\\"b\\\\c/d"', enc('a"b\\c/d'))
      local all = {}
      for c = 0, 127 do all[#all + 1] = char(c) end
      all = concat(all)
      assert.equal(all, dec(enc(all)))
      local long = rep("line one\n\t\"quoted\" \\ path/to\0x ", 4000)
      assert.equal(long, dec(enc(long)))
      assert.equal('""', enc(""))
    end)

    it("passes valid UTF-8 through unchanged, at the edges of each form", function()
      local valid = {
        "\194\128", "\223\191",                  -- U+0080, U+07FF
        "\224\160\128", "\237\159\191",          -- U+0800, U+D7FF
        "\238\128\128", "\239\191\191",          -- U+E000, U+FFFF
        "\239\191\190", "\226\128\168",          -- U+FFFE (noncharacter), U+2028
        "\240\144\128\128", "\244\143\191\191",  -- U+10000, U+10FFFF
        "h\195\169llo w\195\182rld \230\151\165\230\156\172 \240\159\152\128",
      }
      for _, s in ipairs(valid) do
        assert.equal('"' .. s .. '"', enc(s))
        for pre = 0, 9 do
          assert.equal('"' .. rep("a", pre) .. s .. '"', enc(rep("a", pre) .. s))
          -- inside the UTF-8 loop: after other characters, around escapes and ASCII runs
          local t = rep("\195\169", pre) .. s .. "\n" .. s .. rep("a", pre) .. '"' .. s .. "\1"
          assert.equal('"' .. rep("\195\169", pre) .. s .. "\\n" .. s .. rep("a", pre) .. '\\"' .. s .. '\\u0001"', enc(t))
        end
      end
      local mixed = {}
      for i = 1, 2000 do mixed[i] = valid[i % #valid + 1] .. rep(" ", i % 11) .. (i % 7 == 0 and "\t" or "") end
      mixed = concat(mixed)
      assert.equal(mixed, dec(enc(mixed)))
    end)

    it("refuses invalid UTF-8, naming the byte: overlong, surrogates, > U+10FFFF, truncated, stray", function()
      local invalid = {
        { "\128", 1 }, { "\191", 1 },                          -- stray continuation bytes
        { "\192\128", 1 }, { "\193\191", 1 },                  -- overlong 2-byte (C0, C1)
        { "\224\128\128", 1 }, { "\224\159\191", 1 },          -- overlong 3-byte
        { "\237\160\128", 1 }, { "\237\191\191", 1 },          -- surrogates U+D800, U+DFFF
        { "\240\128\128\128", 1 }, { "\240\143\191\191", 1 },  -- overlong 4-byte
        { "\244\144\128\128", 1 }, { "\245\128\128\128", 1 },  -- above U+10FFFF
        { "\248\136\128\128\128", 1 }, { "\255", 1 }, { "\254", 1 },
        { "\226\130", 1 }, { "\226", 1 }, { "\240\159\152", 1 }, -- truncated at the end
        { "\226\130A", 1 }, { "\195(", 1 },                     -- continuation missing
        { "ok\195\169\233", 5 },
        { "\195\n", 1 }, { "\226\130\"", 1 },              -- an escape inside a sequence
      }
      for _, c in ipairs(invalid) do
        local s, at = c[1], c[2]
        assert.equal(format("slm.json: invalid UTF-8 at byte %d of the string at $", at), err_of(s))
        for pre = 0, 9 do
          assert.equal(format("slm.json: invalid UTF-8 at byte %d of the string at $.k[2]", at + pre),
            err_of{ k = { "fine", rep("a", pre) .. s .. "z" } })
          -- after other non-ASCII text (the UTF-8 loop, not the ASCII one)
          assert.equal(format("slm.json: invalid UTF-8 at byte %d of the string at $", at + 2 * pre + 3),
            err_of(rep("\195\169", pre) .. "\226\130\172" .. s .. "\195\169"))
          assert.equal(format("slm.json: invalid UTF-8 at byte %d of the string at $", at + 2 * pre + 1),
            err_of(rep("\195\169", pre) .. " " .. s .. " x"))
        end
      end
    end)

    it("checks object keys the same way", function()
      assert.equal('{"\195\169t\195\169":1}', enc{ ["\195\169t\195\169"] = 1 })
      assert.equal('{"a\\nb\\"":1}', enc{ ['a\nb"'] = 1 })
      assert.equal([[slm.json: invalid UTF-8 at byte 2 of the key "k\xff" at $.a]], err_of{ a = { ["k\255"] = 1 } })
    end)
  end)

  describe("tables", function()
    it("writes sequences as arrays and string-keyed tables as objects, keys sorted by bytes", function()
      assert.equal("[1,2,3]", enc{ 1, 2, 3 })
      assert.equal('{"a":1,"b":2}', enc{ b = 2, a = 1 })
      local keys = { "b", "a", "B", "A", "aa", "ab", "a\0b", "", "_", "\195\169", "Z", "z9", "z10", "~" }
      local t = {}
      for i, k in ipairs(keys) do t[k] = i end
      local want = {}
      for _, k in ipairs(keys) do want[#want + 1] = k end
      table.sort(want, bytes_lt)
      local parts = {}
      for _, k in ipairs(want) do parts[#parts + 1] = enc(k) .. ":" .. t[k] end
      assert.equal("{" .. concat(parts, ",") .. "}", enc(t))
    end)

    it("gives the same text for the same content whatever the insertion order (large objects too)", function()
      for _, n in ipairs{ 3, 16, 17, 200 } do
        local names = {}
        for i = 1, n do names[i] = format("k%05d_%s", math.random(0, 99999), char(math.random(97, 122))) end
        local a, b = {}, {}
        for i = 1, n do a[names[i]] = i end
        for i = n, 1, -1 do b[names[i]] = i end
        local s = enc(a)
        assert.equal(s, enc(b))
        local last, count = nil, 0
        for k in s:gmatch('"([^"]*)":') do
          if last then assert(bytes_lt(last, k), "not sorted: " .. last .. " before " .. k) end
          last, count = k, count + 1
        end
        local distinct = 0
        for _ in pairs(a) do distinct = distinct + 1 end
        assert.equal(distinct, count)
      end
    end)

    it("writes arrays whatever order their keys were stored in", function()
      local t = {}
      for i = 50, 1, -1 do t[i] = i end
      local want = {}
      for i = 1, 50 do want[i] = tostring(i) end
      assert.equal("[" .. concat(want, ",") .. "]", enc(t))
      -- a constructor keeps [k] = keys in the hash part, which Lua 5.4
      -- traverses out of order: the encoder must look at every key first,
      -- and forget what it wrote when key 1 came first (h2: 1, 3, 2)
      local h = { [3] = "c", [1] = "a", [2] = "b" }
      local h2 = { "a", [3] = "c", [2] = "b" }
      assert.equal('["a","b","c"]', enc(h))
      assert.equal('["a","b","c"]', enc(h2))
      assert.equal('{"x":["a","b","c"]}', enc{ x = h2 })
      local order, order2 = {}, {}
      for k in next, h do order[#order + 1] = k end
      for k in next, h2 do order2[#order2 + 1] = k end
      if has_int then
        assert.are_not.same({ 1, 2, 3 }, order)
        assert.same({ 1, 3, 2 }, order2)
      end
      assert.equal("slm.json: cannot encode a sparse array (2 elements, largest key 4) at $",
        err_of{ [4] = "d", [1] = "a" })
      -- (which key the message names depends on the hash order)
      assert.truthy(err_of{ [2] = "b", [1] = "a", x = 1 }:find(
        "^slm%.json: cannot encode a table with both integer and string keys %(.*%) at %$$"))
    end)

    it("writes an empty plain table as {}, json.array() as [], json.object() as {}", function()
      assert.equal("{}", enc{})
      assert.equal("[]", enc(json.array()))
      assert.equal("[]", enc(json.array{}))
      assert.equal("[1,2]", enc(json.array{ 1, 2 }))
      assert.equal("{}", enc(json.object()))
      assert.equal('{"messages":[],"tools":[]}', enc{ tools = json.array(), messages = json.array{} })
      local t = {}
      assert.equal(t, json.array(t))
      assert.equal(json.array_mt, getmetatable(t))
      assert.equal(t, json.array(t)) -- marking twice is fine
      assert.equal("[]", enc(setmetatable({}, { __jsontype = "array" })))
      assert.equal("{}", enc(setmetatable({}, { __jsontype = "object" })))
      assert.equal('{"a":1}', enc(setmetatable({ a = 1 }, { __jsontype = "object" })))
      -- other metatables are ignored, and so are __index and __len
      assert.equal("{}", enc(setmetatable({}, { __index = { a = 1 }, __len = function() return 3 end })))
      assert.has_error(function() json.array("x") end, "slm.json.array: expected a table or nothing, got string")
      assert.has_error(function() json.array(setmetatable({}, {})) end, "slm.json.array: the table already has a metatable")
      assert.has_error(function() json.object(json.array()) end, "slm.json.object: the table already has a metatable")
    end)

    it("honours lua-cjson fork markers passed as opts: empty_array, array_mt, empty_array_mt", function()
      local amt, emt = {}, {}
      local o = { empty_array = LIGHT, array_mt = amt, empty_array_mt = emt }
      assert.equal('{"a":[],"b":[],"c":[],"d":{"x":1},"e":[1]}', core.json_encode({
        a = LIGHT, b = setmetatable({}, amt), c = setmetatable({}, emt),
        d = setmetatable({ x = 1 }, emt), e = setmetatable({ 1 }, amt) }, o))
      assert.equal("{}", core.json_encode(setmetatable({}, amt))) -- not without the option
      assert.equal("slm.json: cannot encode the string key \"x\" of a table marked as an array at $",
        err_of(setmetatable({ x = 1 }, amt), o))
      local function arg_err(opts, msg)
        local ok, e = pcall(core.json_encode, {}, opts)
        assert.is_false(ok)
        assert.truthy(e:find("bad argument #2 to '[^']*' %(" .. msg .. "%)$"), e)
      end
      arg_err({ emtpy_array = LIGHT }, "unknown option 'emtpy_array'")
      arg_err({ array_mt = 1 }, "option 'array_mt' must be a table")
      arg_err({ empty_array = {} }, "option 'empty_array' must be a light userdata")
      arg_err({ [1] = true }, "unknown option 'number'")
      arg_err("x", "table expected, got string")
    end)

    it("nests: a chat request equals lua-cjson's decode of our output", function()
      local req = {
        model = "gpt-4o-mini", temperature = 0.7, top_p = 0.95, max_tokens = 500, seed = 42, n = 1,
        stream = false, stop = { "\n\n", "END" },
        messages = {
          { role = "system", content = "You are a support bot for \"ACME\".\nBe brief." },
          { role = "user", content = { { type = "text", text = "my printer \226\128\148 it's on fire" },
            { type = "image_url", image_url = { url = "data:image/png;base64,iVBORw0KGgo=", detail = "low" } } } },
          { role = "assistant", content = json.null, tool_calls = { { id = "call_1", type = "function",
            ["function"] = { name = "lookup", arguments = '{"q":"printer"}' } } } },
          { role = "tool", tool_call_id = "call_1", content = "{}" },
        },
        tools = { { type = "function", ["function"] = { name = "lookup", description = "search the KB",
          parameters = { type = "object", properties = { q = { type = "string" }, k = { type = "integer", minimum = 1 } },
            required = { "q" }, additionalProperties = false } } } },
        response_format = { type = "json_schema", json_schema = { name = "x", strict = true,
          schema = { type = "object", properties = {}, required = json.array() } } },
        metadata = { ["user id"] = "u-1", [""] = "empty key" },
      }
      local s = enc(req)
      local back = dec(s)
      assert.same(req, back)
      assert.equal(cjson.null, back.messages[3].content)
      assert.truthy(s:find('"required":[]', 1, true))
      -- canonical: the same text again, except that lua-cjson 2.1.0 decodes
      -- [] as a plain empty table, which goes out as {}
      assert.equal((s:gsub("%[%]", "{}")), enc(back))
    end)

    it("round-trips random nested values through lua-cjson", function()
      local function rnd_string()
        local parts = {}
        for i = 1, math.random(0, 12) do
          local r = math.random(1, 6)
          parts[i] = r == 1 and char(math.random(0, 31)) or r == 2 and "\195\169" or r == 3 and "\240\159\152\128"
            or r == 4 and '"\\/' or char(math.random(32, 126))
        end
        return concat(parts)
      end
      local function rnd(depth)
        local r = math.random(1, depth > 4 and 5 or 8)
        if r == 1 then return rnd_string()
        elseif r == 2 then return math.random(-1e9, 1e9)
        elseif r == 3 then return math.random() * 10 ^ math.random(-20, 20)
        elseif r == 4 then return math.random(0, 1) == 1
        elseif r == 5 then return json.null
        elseif r <= 6 then
          local t = {}
          for i = 1, math.random(0, 6) do t[i] = rnd(depth + 1) end
          return t
        else
          local t = {}
          for _ = 1, math.random(0, 6) do t[rnd_string()] = rnd(depth + 1) end
          return t
        end
      end
      for _ = 1, rounds(500) do
        local v = rnd(0)
        local s = enc(v)
        assert.same(v, dec(s))
        assert.equal(s, enc(dec(s)))
      end
    end)

    it("allows the same table twice when it does not contain itself", function()
      local shared = { 1, 2 }
      assert.equal('{"a":[1,2],"b":[1,2],"c":[[1,2],[1,2]]}', enc{ a = shared, b = shared, c = { shared, shared } })
    end)

    it("allows 64 levels of nesting, not 65", function()
      local function nest(n)
        local t = {}
        for _ = 2, n do t = { t } end
        return t
      end
      assert.equal(rep("[", 63) .. "{}" .. rep("]", 63), enc(nest(64)))
      assert.equal("slm.json: cannot encode tables nested more than 64 deep at $" .. rep("[1]", 64), err_of(nest(65)))
    end)
  end)

  describe("scalars", function()
    it("writes nil, null, booleans and top-level scalars", function()
      assert.equal("null", enc(nil))
      assert.equal("null", enc(json.null))
      assert.equal("[true,false,null]", enc{ true, false, json.null })
      assert.equal('"x"', enc("x"))
      local ok, e = pcall(enc)
      assert.is_false(ok)
      assert.truthy(e:find("bad argument #1 to '[^']*' %(value expected%)$"), e)
    end)
  end)

  describe("errors name the path", function()
    local fn = function() end
    local cases = {
      { { tools = { { parameters = fn } } }, "cannot encode a function at $.tools[1].parameters" },
      { { a = { 1, 2, { b = io.stdout } } }, "cannot encode a userdata at $.a[3].b" },
      { { co = coroutine.create(fn) }, "cannot encode a thread at $.co" },
      { { x = LIGHT }, "cannot encode a light userdata other than slm.json.null at $.x" },
      { { temperature = 0 / 0 }, "cannot encode NaN (JSON has no NaN) at $.temperature" },
      { { 1, math.huge }, "cannot encode inf (JSON has no infinities) at $[2]" },
      { { x = { -math.huge } }, "cannot encode -inf (JSON has no infinities) at $.x[1]" },
      { { m = { 1, 2, x = 3 } }, 'cannot encode a table with both integer and string keys (string key "x") at $.m' },
      { { m = { x = 3, [1] = 1 } }, nil, "cannot encode a table with both integer and string keys" },
      { { s = { [1] = 1, [3] = 3 } }, "cannot encode a sparse array (2 elements, largest key 3) at $.s" },
      { { s = { [2] = "b" } }, "cannot encode a sparse array (1 elements, largest key 2) at $.s" },
      { { s = { [0] = "z", "a" } }, "cannot encode a sparse array (key 0; arrays are 1..n) at $.s" },
      { { s = { [-1] = 1 } }, "cannot encode a sparse array (key -1; arrays are 1..n) at $.s" },
      { { k = { [true] = 1 } }, "cannot encode a table with a boolean key at $.k" },
      { { k = { [fn] = 1 } }, "cannot encode a table with a function key at $.k" },
      { { k = { [{}] = 1 } }, "cannot encode a table with a table key at $.k" },
      { { k = { [1.5] = 1 } }, "cannot encode a table with the number key 1.5 at $.k" },
      { { k = { a = 1, [1.5] = 1 } }, "cannot encode a table with the number key 1.5 at $.k" },
      { { t = setmetatable({}, { __jsontype = "list" }) }, '__jsontype must be "array" or "object", not "list" at $.t' },
      { { t = setmetatable({}, { __jsontype = true }) }, '__jsontype must be "array" or "object", not a boolean at $.t' },
      { { t = setmetatable({ 1 }, { __jsontype = "object" }) }, "cannot encode the integer key 1 of a table marked as an object at $.t" },
      { { t = json.object{ a = 1, [2] = 1 } }, "cannot encode the integer key 2 of a table marked as an object at $.t" },
      { { t = json.array{ 1, x = 1 } }, 'cannot encode the string key "x" of a table marked as an array at $.t' },
      { { ["a b"] = { ['q"\\'] = { fn } } }, [[cannot encode a function at $["a b"]["q\"\\"][1] ]] },
      { { [rep("k", 50)] = fn }, [[cannot encode a function at $["kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk..."] ]] },
      { { ["\1\127"] = fn }, [[cannot encode a function at $["\x01\x7f"] ]] },
      { { ["1abc"] = fn }, [[cannot encode a function at $["1abc"] ]] },
      { { ["\195\169"] = fn }, [[cannot encode a function at $["]] .. "\195\169" .. [["] ]] },
      { fn, "cannot encode a function at $" },
    }
    for i, c in ipairs(cases) do
      it(format("case %d: %s", i, c[2] or c[3]), function()
        local e = err_of(c[1])
        if c[2] then
          assert.equal("slm.json: " .. c[2]:gsub(" $", ""), e)
        else
          assert.truthy(e:find("slm.json: " .. c[3], 1, true), e)
        end
      end)
    end

    it("names cycles and where the table was first seen", function()
      local t = {}
      t.self = t
      assert.equal("slm.json: cannot encode a cycle at $.self (the same table as at $)", err_of(t))
      local a = { b = { c = {} } }
      a.b.c.d = { a.b }
      assert.equal("slm.json: cannot encode a cycle at $.b.c.d[1] (the same table as at $.b)", err_of(a))
      local arr = {}
      arr[1] = arr
      assert.equal("slm.json: cannot encode a cycle at $[1] (the same table as at $)", err_of(arr))
    end)

    it("leaves the encoder usable after an error, and after large values", function()
      for _ = 1, 3 do
        err_of{ a = { b = fn } }
        assert.equal('{"a":1}', enc{ a = 1 })
      end
      local big = rep("x", 3 * 1024 * 1024)
      assert.equal(#big + 2, #enc(big))
      assert.equal('["' .. big .. '",1]', enc{ big, 1 })
      local many = {}
      for i = 1, 50000 do many["k" .. i] = i end
      local s = enc(many)
      assert.equal(50000, select(2, s:gsub(":", "")))
      assert.same(many, dec(s))
      assert.equal("[1]", enc{ 1 })
    end)

    it("encodes objects past the pairs kept on the Lua stack, nested 64 deep", function()
      -- 32 pairs of an object stay on the stack, the keys after them go
      -- to an anchor table: 64 levels of 100-key objects fit either way
      -- (LuaJIT gives a C function 8000 stack slots)
      local function level(inner)
        local t = {}
        for i = 1, 100 do t[format("k%03d", i)] = i end
        t.k050 = inner
        return t
      end
      local v = {}
      for _ = 2, 64 do v = level(v) end
      local s = enc(v)
      assert.same(v, dec(s))
      local want = {}
      for i = 1, 100 do want[i] = format('"k%03d":%s', i, i == 50 and "{}" or i) end
      assert.equal("{" .. concat(want, ",") .. "}", enc(level({})))
      -- an error in a value past the 32 names its key
      local t = level({})
      t.k099 = print
      assert.equal("slm.json: cannot encode a function at $.k099", err_of(t))
      t.k099, t.k002 = 1, print
      assert.equal("slm.json: cannot encode a function at $.k002", err_of(t))
    end)
  end)

  it("gives a finalizer that encodes during an encode its own buffer", function()
    if not has_int then return pending("Lua 5.4 GC control") end
    -- In a fresh process: with this process's heap a collection cycle
    -- spans more encodes than the loop makes, and finalizers rarely run.
    -- An object of more than 32 keys allocates its anchor table half-way
    -- through the output; with steps of 2^0 bytes the collector takes a
    -- step there, and runs finalizers in it once a cycle is done.
    local out = require("tests.helpers").run_lua([=[
      local enc = require("slm.json").encode
      local inside, bad, outer_bad = 0, 0, 0
      local function fin()
        for level = 2, 50 do
          local info = debug.getinfo(level, "f")
          if not info then break end
          if info.func == enc then inside = inside + 1 break end
        end
        if enc{ fin = { 1, 2, 3 } } ~= '{"fin":[1,2,3]}' then bad = bad + 1 end
      end
      local meta = {}
      for i = 1, 40 do meta["k" .. i] = i end
      local body = { messages = { { role = "user", content = ("text "):rep(200) } }, meta = meta, n = { 1, 2, 3 } }
      local want = enc(body)
      collectgarbage("incremental", 10, 100, 0)
      for _ = 1, 2000 do
        setmetatable({}, { __gc = fin })
        local ok, s = pcall(enc, body)
        if s ~= want then outer_bad = outer_bad + 1 end
      end
      collectgarbage("incremental", 200, 100, 13)
      collectgarbage()
      print("inside " .. inside .. " bad " .. bad .. " outer_bad " .. outer_bad)
    ]=])
    local inside, bad, outer_bad = out:match("inside (%d+) bad (%d+) outer_bad (%d+)")
    assert(inside, out)
    assert.equal("0", outer_bad, "the outer encode's output changed: " .. out)
    assert.equal("0", bad, "a finalizer's encode went wrong: " .. out)
    -- a finalizer must have run inside an encode, or this spec proved nothing
    assert(tonumber(inside) > 0, "no finalizer ran inside json_encode: " .. out)
  end)
end)
