-- slm.schema: the JSON-schema subset validator, its pattern matcher, the
-- lenient reader of model replies and the OpenAI strict-mode copy.
-- Every keyword accepted and refused, error paths and messages, values as
-- lua-cjson decodes them, every unsupported keyword and malformed schema
-- raising at compile, patterns that would make a backtracking matcher run
-- for ever, replies in fences and prose, strict copies of nested schemas.
-- Runs unchanged under Lua 5.4 and LuaJIT (bin/test runs it under both).
local schema = require "slm.schema"
local json = require "slm.json"

local NULL = json.null
local dec = json.decode
local compile = schema.compile

-- true, or the errors as "path: message" lines
local function verdict(s, v)
  local ok, errs = schema.validate(s, v)
  if ok then return true end
  return schema.format_errors(errs)
end

local function assert_ok(s, v)
  local r = verdict(s, v)
  assert(r == true, "expected the value to pass, got:\n" .. tostring(r))
end

-- The errors must be exactly these lines (in order).
local function assert_errors(s, v, ...)
  local want = table.concat({ ... }, "\n")
  local r = verdict(s, v)
  assert(r ~= true, "expected errors, the value passed:\n" .. want)
  assert.equal(want, r)
end

-- compile must raise, with this text in the message
local function assert_raises(s, text)
  local ok, e = pcall(compile, s)
  assert(not ok, "expected compile to raise '" .. text .. "'")
  assert(tostring(e):find(text, 1, true), "expected '" .. text .. "' in: " .. tostring(e))
end

-- f must raise, with this text in the message
local function assert_raises_in(f, text)
  local ok, e = pcall(f)
  assert(not ok, "expected an error with '" .. text .. "'")
  assert(tostring(e):find(text, 1, true), "expected '" .. text .. "' in: " .. tostring(e))
end

local function clock_of(f)
  local t = os.clock()
  f()
  return os.clock() - t
end

describe("slm.schema", function()
  describe("type", function()
    it("accepts each JSON type and refuses the others, with what it got", function()
      local values = {
        string = "x", number = 1.5, integer = 2, boolean = false, null = NULL,
        object = { a = 1 }, array = { 1, 2 },
      }
      for t, good in pairs(values) do
        assert_ok({ type = t }, good)
        for t2, other in pairs(values) do
          local admitted = t2 == t or (t == "number" and t2 == "integer")
          if not admitted then
            assert.equal(false, (schema.validate({ type = t }, other)), t .. " took a " .. t2)
          end
        end
      end
      assert_errors({ type = "number" }, "12.50", '$: must be a number, got string "12.50"')
      assert_errors({ type = "string" }, 42, "$: must be a string, got number 42")
      assert_errors({ type = "boolean" }, NULL, "$: must be a boolean, got null")
      assert_errors({ type = "object" }, { 1 }, "$: must be an object, got array")
      assert_errors({ type = "array" }, { a = 1 }, "$: must be an array, got object")
      assert_errors({ type = "null" }, true, "$: must be null, got boolean true")
      assert_errors({ type = "string" }, nil, "$: must be a string, got nothing")
    end)

    it("takes a list of types, and OpenAPI's nullable beside type", function()
      local s = { type = { "string", "null" } }
      assert_ok(s, "a")
      assert_ok(s, NULL)
      assert_errors(s, 1, "$: must be a string or null, got number 1")
      assert_errors({ type = { "integer", "string", "boolean" } }, 1.5,
        "$: must be an integer, a string or a boolean, got number 1.5")
      local n = { type = "string", nullable = true, enum = { "a", "b" } }
      assert_ok(n, NULL)        -- a null nullable accepts is checked no further
      assert_ok(n, "a")
      assert_errors(n, "c", '$: must be one of "a", "b", got "c"')
      assert_errors(n, 3, "$: must be a string or null, got number 3")
      assert_errors({ type = "string", nullable = false }, NULL, "$: must be a string, got null")
    end)

    it("integer means integral and finite, whatever cjson's floats look like", function()
      local s = { type = "integer" }
      assert_ok(s, dec("3"))
      assert_ok(s, dec("3.0"))
      assert_ok(s, dec("-0"))
      assert_ok(s, dec("1e3"))
      assert_ok(s, 2 ^ 53)
      assert_errors(s, dec("3.5"), "$: must be an integer, got number 3.5")
      assert_errors(s, 0.1 + 0.2, "$: must be an integer, got number 0.30000000000000004")
      assert_ok({ type = "number" }, dec("3"))
      assert_ok({ type = "number" }, dec("-1.25e-3"))
      if math.type then assert_ok(s, math.tointeger(7)) end -- a Lua 5.4 integer
    end)

    it("NaN and the infinities are not numbers", function()
      for _, t in ipairs({ "number", "integer" }) do
        assert_errors({ type = t }, 0 / 0, "$: must be " .. (t == "number" and "a number" or "an integer")
          .. ", got NaN (not a JSON number)")
        assert_errors({ type = t }, math.huge, "$: must be " .. (t == "number" and "a number" or "an integer")
          .. ", got inf (not a JSON number)")
        assert.equal(false, (schema.validate({ type = t }, -math.huge)))
      end
      assert.equal(false, (schema.validate({ enum = { 1 } }, 0 / 0)))
    end)

    it("{} is an empty array and an empty object; marked tables are only what they are marked", function()
      assert_ok({ type = "array" }, dec("[]"))
      assert_ok({ type = "object" }, dec("{}"))
      assert_ok({ type = "array", items = { type = "string" } }, {})
      assert_ok({ type = { "array", "null" } }, {})
      assert_errors({ type = "string" }, {}, "$: must be a string, got {}")
      -- the keywords of the type it is taken for apply
      assert_errors({ type = "array", minItems = 1 }, {}, "$: must have at least 1 item, got 0")
      assert_errors({ type = "object", required = { "a" } }, {}, "$.a: is required")
      assert_errors({ type = "object", minItems = 1, required = { "a" } }, {}, "$.a: is required")
      -- slm.json.array / slm.json.object settle it
      assert_ok({ type = "array" }, json.array())
      assert_errors({ type = "object" }, json.array(), "$: must be an object, got array")
      assert_errors({ type = "array" }, json.object(), "$: must be an array, got object")
      assert_ok({ type = "object" }, json.object())
    end)

    it("a table with both kinds of keys, or a sparse one, is neither array nor object", function()
      local mixed = { 1, 2, a = 3 }
      assert_errors({ type = "array" }, mixed, "$: must be an array, got a table with both array and object keys")
      assert_errors({ type = "object" }, mixed, "$: must be an object, got a table with both array and object keys")
      assert.equal(false, (schema.validate({ type = "array" }, { [1] = 1, [3] = 3 })))
      local holed = { 1, 2, 3, 4, 5, 6, 7, 8 }
      holed[4] = nil -- # still says 8 (Lua 5.4 and LuaJIT)
      assert.equal(false, (schema.validate({ type = "array" }, holed)))
      assert.equal(false, (schema.validate({ type = "object" }, holed)))
      assert.equal(false, (schema.validate({ type = "object" }, { [2] = "x" })))
      assert.equal(false, (schema.validate({ type = "array" }, { [1.5] = 1 })))
      assert_ok({ type = "array" }, { "a", "b", "c" })
      assert_errors({ type = "string" }, print, "$: must be a string, got a function")
    end)
  end)

  describe("objects", function()
    local person = {
      type = "object",
      properties = {
        name = { type = "string" },
        age = { type = "integer", minimum = 0 },
        ["user id"] = { type = "string" },
        address = {
          type = "object",
          properties = { city = { type = "string" }, zip = { type = "string" } },
          required = { "city" },
          additionalProperties = false,
        },
      },
      required = { "name", "age" },
    }

    it("checks properties, required and nested objects, reporting every error with its path", function()
      assert_ok(person, { name = "Ann", age = 30 })
      assert_ok(person, dec('{"name":"Ann","age":30,"address":{"city":"Oslo"},"extra":true}'))
      assert_errors(person, dec('{"age":-3,"user id":5,"address":{"zip":1,"street":"x"}}'),
        "$.name: is required",
        "$.address.city: is required",
        "$.address.zip: must be a string, got number 1",
        '$.address.street: is not allowed: unknown property (allowed: city, zip)',
        "$.age: must be >= 0, got -3",
        '$["user id"]: must be a string, got number 5')
    end)

    it("additionalProperties: true by default, false, or a schema", function()
      local open = { type = "object", properties = { a = { type = "number" } } }
      assert_ok(open, { a = 1, b = "x" })
      local closed = { type = "object", properties = { a = { type = "number" } }, additionalProperties = false }
      assert_errors(closed, { a = 1, b = "x", c = 2 },
        "$.b: is not allowed: unknown property (allowed: a)",
        "$.c: is not allowed: unknown property (allowed: a)")
      assert_errors({ type = "object", additionalProperties = false }, { z = 1 },
        "$.z: is not allowed: this object takes no properties")
      local map = { type = "object", additionalProperties = { type = "integer" } }
      assert_ok(map, { x = 1, y = 2 })
      assert_errors(map, { x = 1, ["a b"] = 2.5 }, '$["a b"]: must be an integer, got number 2.5')
      assert_ok({ type = "object", additionalProperties = true }, { q = 1 })
      -- properties that are declared are not additional
      assert_ok({ properties = { a = {} }, additionalProperties = false }, { a = NULL })
    end)

    it("a present null is present: required is satisfied, the property schema decides", function()
      local s = { type = "object", properties = { a = { type = "string" } }, required = { "a" } }
      assert_errors(s, dec('{"a":null}'), "$.a: must be a string, got null")
      assert_ok({ type = "object", required = { "a" } }, dec('{"a":null}'))
    end)

    it("stops at max_errors and says it did", function()
      local props = {}
      for i = 1, 30 do props["p" .. string.format("%02d", i)] = { type = "string" } end
      local s = { type = "object", properties = props }
      local bad = {}
      for k in pairs(props) do bad[k] = 1 end
      local ok, errs = schema.validate(s, bad)
      assert.is_false(ok)
      assert.equal(20, #errs)
      assert.is_true(errs.truncated)
      assert.equal("$.p01", errs[1].path)
      assert.equal("$.p20", errs[20].path)
      assert.equal("type", errs[1].keyword)
      assert.matches("%(and more errors%)$", schema.format_errors(errs))
      local ok3, errs3 = compile(s, { max_errors = 3 }):validate(bad)
      assert.is_false(ok3)
      assert.equal(3, #errs3)
      local ok30, errs30 = compile(s, { max_errors = 30 }):validate(bad)
      assert.is_false(ok30)
      assert.equal(30, #errs30)
      assert.is_nil(errs30.truncated)
    end)

    it("paths: 0-based indices, identifiers after a dot, other keys quoted", function()
      local s = {
        type = "object",
        properties = {
          items = { type = "array", items = {
            type = "object", properties = { price = { type = "number" } }, required = { "price" } } },
          ["weird\"key"] = { type = "array", items = { type = "integer" } },
          _ok9 = { type = "string" }, ["9lives"] = { type = "string" }, ["ключ"] = { type = "string" },
        },
      }
      assert_errors(s, dec('{"items":[{"price":1},{"price":2},{"price":"3"},{}],' ..
        '"weird\\"key":[1,2.5],"_ok9":1,"9lives":1,"ключ":1}'),
        '$["9lives"]: must be a string, got number 1',
        "$._ok9: must be a string, got number 1",
        '$.items[2].price: must be a number, got string "3"',
        "$.items[3].price: is required",
        '$["weird\\"key"][1]: must be an integer, got number 2.5',
        '$["ключ"]: must be a string, got number 1')
    end)
  end)

  describe("enum and const", function()
    it("enum: strings, numbers by value, null, booleans, arrays and objects by content", function()
      local s = { enum = { "billing", "tech", 1, NULL, false, { 1, 2 }, { a = "x" } } }
      for _, v in ipairs({ "billing", "tech", 1.0, NULL, false, dec("[1,2]"), dec('{"a":"x"}') }) do
        assert_ok(s, v)
      end
      for _, v in ipairs({ "sales", 2, true, dec("[2,1]"), dec('{"a":"y"}'), dec('{"a":"x","b":1}'), {} }) do
        assert.equal(false, (schema.validate(s, v)), tostring(v))
      end
      assert_errors({ type = "string", enum = { "billing", "tech", "other" } }, "sales",
        '$: must be one of "billing", "tech", "other", got "sales"')
      local many = {}
      for i = 1, 12 do many[i] = i end
      assert_errors({ enum = many }, 13, "$: must be one of 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... (12 values), got 13")
    end)

    it("const: one value, compared as JSON", function()
      assert_ok({ const = "v1" }, "v1")
      assert_errors({ const = "v1" }, "v2", '$: must be "v1", got "v2"')
      assert_ok({ const = 3 }, dec("3.0"))
      assert_ok({ const = NULL }, NULL)
      assert_errors({ const = NULL }, false, "$: must be null, got false")
      assert_ok({ const = { a = { 1, 2 } } }, dec('{"a":[1,2]}'))
      assert_errors({ const = { a = { 1, 2 } } }, dec('{"a":[1,3]}'), '$: must be {"a":[1,2]}, got {"a":[1,3]}')
      assert_ok({ const = {} }, dec("[]"))
    end)
  end)

  describe("arrays", function()
    it("items, minItems, maxItems, with the index of each bad item", function()
      local s = { type = "array", items = { type = "number", minimum = 0 }, minItems = 1, maxItems = 3 }
      assert_ok(s, { 1, 2, 3 })
      assert_errors(s, {}, "$: must have at least 1 item, got 0")
      assert_errors(s, { 1, -2, "x", 4 }, "$: must have at most 3 items, got 4",
        "$[1]: must be >= 0, got -2", '$[2]: must be a number, got string "x"')
      assert_errors({ type = "array", minItems = 2 }, { 1 }, "$: must have at least 2 items, got 1")
      assert_ok({ type = "array", minItems = 2 }, { 1, 2 })
      assert_errors({ type = "array", maxItems = 1 }, { 1, 2 }, "$: must have at most 1 item, got 2")
      assert_ok({ type = "array", maxItems = 2 }, { 1, 2 })
      assert_errors({ type = "array", items = false }, { 1 }, "$[0]: is not allowed here")
      assert_ok({ type = "array", items = false }, {})
      -- without a type, array keywords say nothing about other values
      assert_ok({ items = { type = "string" }, minItems = 5 }, "not an array")
    end)

    it("nested arrays of objects: $.items[2].price", function()
      local order = dec([[{"type":"object","properties":{"items":{"type":"array","items":{"type":"object",
        "properties":{"sku":{"type":"string"},"price":{"type":"number","exclusiveMinimum":0}},
        "required":["sku","price"]}}},"required":["items"]}]])
      assert_ok(order, dec('{"items":[{"sku":"a","price":1}]}'))
      assert_errors(order, dec('{"items":[{"sku":"a","price":1},{"sku":"b","price":2},{"sku":"c","price":0},{"price":5}]}'),
        "$.items[2].price: must be > 0, got 0",
        "$.items[3].sku: is required")
    end)
  end)

  describe("numbers", function()
    it("minimum, maximum, exclusiveMinimum, exclusiveMaximum (draft 2020 numbers)", function()
      local s = { type = "number", minimum = 0, maximum = 100 }
      assert_ok(s, 0)
      assert_ok(s, 100)
      assert_errors(s, -3, "$: must be >= 0, got -3")
      assert_errors(s, 150, "$: must be <= 100, got 150")
      local x = { exclusiveMinimum = 0, exclusiveMaximum = 1 }
      assert_ok(x, 0.5)
      assert_errors(x, 0, "$: must be > 0, got 0")
      assert_errors(x, 1, "$: must be < 1, got 1")
      assert_errors({ minimum = 0.1 }, 0.05, "$: must be >= 0.1, got 0.05")
      -- minimum says nothing about a string
      assert_ok({ minimum = 5 }, "abc")
    end)

    it("multipleOf, within float rounding", function()
      assert_ok({ multipleOf = 0.01 }, 19.99)
      assert_ok({ multipleOf = 0.1 }, 0.3)
      assert_ok({ multipleOf = 5 }, -15)
      assert_errors({ multipleOf = 5 }, 12, "$: must be a multiple of 5, got 12")
      assert_errors({ multipleOf = 0.01 }, 1.005, "$: must be a multiple of 0.01, got 1.005")
    end)
  end)

  describe("strings", function()
    it("minLength and maxLength count characters of UTF-8, not bytes", function()
      local s = { type = "string", minLength = 2, maxLength = 5 }
      assert_ok(s, "héllo")        -- 6 bytes, 5 characters
      assert_ok(s, "日本")          -- 6 bytes, 2 characters
      assert_ok(s, "😀😀😀😀😀")    -- 20 bytes, 5 characters
      assert_errors(s, "😀😀😀😀😀😀", "$: must be at most 5 characters long, got 6")
      assert_errors(s, "é", "$: must be at least 2 characters long, got 1")
      assert_errors({ minLength = 1 }, "", "$: must be at least 1 character long, got 0")
      assert_errors({ maxLength = 1 }, "ab", "$: must be at most 1 character long, got 2")
    end)

    it("pattern: unanchored search, as JSON Schema has it", function()
      assert_ok({ pattern = "b" }, "abc")
      assert_ok({ pattern = "^[A-Z]{3}-\\d{4}$" }, "ABC-1234")
      assert_errors({ pattern = "^[A-Z]{3}-\\d{4}$" }, "ABC-12345",
        '$: must match the pattern "^[A-Z]{3}-\\\\d{4}$", got "ABC-12345"')
      assert_ok({ pattern = "^x" }, 5) -- not a string: not checked
      local long = string.rep("y", 60)
      assert_errors({ pattern = "^x" }, long,
        '$: must match the pattern "^x", got "' .. string.rep("y", 40) .. '"...')
    end)
  end)

  describe("patterns", function()
    -- { pattern, string, matches? }
    local cases = {
      { "abc", "xxabcxx", true }, { "abc", "ab", false }, { "", "anything", true },
      { "^abc$", "abc", true }, { "^abc$", "abcd", false }, { "^abc$", "xabc", false },
      { "a$", "a\n", false }, { "^b", "a\nb", false },          -- no multiline
      { "a.c", "abc", true }, { "a.c", "a\nc", false }, { "a.c", "a\rc", false }, { "a.c", "aéc", true },
      { "^.$", "😀", true }, { "^..$", "😀", false },             -- code points, not bytes
      { "[a-z0-9_]+$", "ok_9", true }, { "^[a-z0-9_]+$", "no-9", false },
      { "^[^0-9]+$", "abc", true }, { "^[^0-9]+$", "ab1", false }, { "^[^a]$", "é", true },
      { "^[-a]+$", "-a-", true }, { "^[a-]+$", "a-", true }, { "^[\\]\\\\]+$", "]\\", true },
      { "^[é-ë]$", "ê", true }, { "^[é-ë]$", "e", false }, { "^[\\d\\s]+$", "1 2\t3", true },
      { "^\\d+$", "0123456789", true }, { "^\\d$", "٣", false },   -- \d is ASCII
      { "^\\w+$", "a_Z9", true }, { "^\\w$", "é", false }, { "^\\s$", "\u{A0}", true },
      { "^\\s$", "\u{2003}", true }, { "^\\D\\W\\S$", "1 b", false }, { "^\\D\\W\\S$", "a-b", true },
      { "^[\\D]$", "x", true }, { "^[\\D]$", "5", false },
      { "^\\.\\*\\+\\?\\(\\)\\[\\]\\{\\}\\|\\^\\$\\/\\-$", ".*+?()[]{}|^$/-", true },
      { "^\\n\\t\\r\\f\\v\\0$", "\n\t\r\f\v\0", true }, { "^\\x41\\u00e9$", "Aé", true },
      { "^[\\x41-\\x43]+$", "ABCA", true }, { "^[\\b]$", "\b", true },
      { "^a*$", "", true }, { "^a*$", "aaa", true }, { "^a+$", "", false }, { "^ab?c$", "ac", true },
      { "^ab?c$", "abbc", false }, { "^a{3}$", "aaa", true }, { "^a{3}$", "aaaa", false },
      { "^a{2,}$", "a", false }, { "^a{2,}$", "aaaaa", true }, { "^a{2,3}$", "aaa", true },
      { "^a{2,3}$", "aaaa", false }, { "^a{0,1}$", "", true }, { "^(ab)+$", "ababab", true },
      { "^(ab)+$", "aba", false }, { "^(?:cat|dog)s?$", "dogs", true }, { "^(?:cat|dog)s?$", "cow", false },
      { "^(?<year>\\d{4})-(\\d\\d)$", "2024-05", true }, { "cat|dog", "hotdog", true },
      { "^(a|b|c)*$", "abcabc", true }, { "^(a|)+$", "aaa", true }, { "^()$", "", true },
      { "^a+?b*?c??$", "aab", true }, { "^(a{2}){2}$", "aaaa", true }, { "^(a{2}){2}$", "aaa", false },
      { "^[a-c]{2}(x|yz){1,2}$", "abyzx", true }, { "^[a-c]{2}(x|yz){1,2}$", "abyzxx", false },
      { "^\\+?[0-9 ()-]{7,}$", "+47 (22) 12-34", true }, { "^\\S+@\\S+\\.\\S+$", "a@b.co", true },
      { "^\\S+@\\S+\\.\\S+$", "a b@c.de", false },
      -- invalid UTF-8 in the string: a byte of its own, matched by . and [^...] only
      { "^.$", "\255", true }, { "^[^a]$", "\255", true }, { "^[\1-\127]$", "\255", false },
    }

    it("matches as ECMA-262 without flags does, on code points", function()
      for _, c in ipairs(cases) do
        local re, msg = schema.regex(c[1])
        assert(re, "pattern " .. c[1] .. " refused: " .. tostring(msg))
        assert(re:test(c[2]) == c[3], string.format("%q on %q: expected %s", c[1], c[2], tostring(c[3])))
      end
    end)

    it("refuses what is outside the subset, with the character where it is", function()
      local refused = {
        { "(?=a)", 1, "lookaround" }, { "a(?!b)", 2, "lookaround" }, { "(?<=a)b", 1, "lookaround" },
        { "(a)\\1", 4, "backreferences" }, { "\\bword", 1, "word boundaries" }, { "x\\B", 2, "word boundaries" },
        { "\\p{L}", 1, "Unicode property" }, { "\\u{1F600}", 1, "\\u{...}" }, { "\\k<n>", 1, "unknown escape" },
        { "\\cA", 1, "unknown escape" }, { "a{", 2, "lone {" }, { "a}", 2, "lone }" }, { "]", 1, "lone ]" },
        { "a{2", 2, "unterminated {n,m}" }, { "a{3,2}", 2, "m < n" }, { "a{1001}", 3, "above 1000" },
        { "*a", 1, "nothing to repeat" }, { "a|+", 3, "nothing to repeat" }, { "^*", 1, "an anchor" },
        { "a**", 3, "after a quantifier" }, { "a+{2}", 3, "after a quantifier" }, { "(a", 1, "unterminated group" },
        { "a)", 2, "unmatched )" }, { "[a-", 1, "unterminated character class" }, { "[]", 1, "empty character class" },
        { "[z-a]", 3, "out of order" }, { "[a-\\d]", 3, "class escape" }, { "\\", 1, "backslash" },
        { "\\x4", 1, "hex digits" }, { "\\07", 1, "octal" }, { "(?i)a", 1, "(?...)" }, { "(?<n", 1, "group name" },
        { "\255", 1, "not valid UTF-8" }, { ("("):rep(60) .. (")"):rep(60), 51, "nested deeper" },
        { "(a{1000}){1000}", 1, "too large" },
      }
      for _, c in ipairs(refused) do
        local re, msg, pos = schema.regex(c[1])
        assert(re == nil, "pattern " .. c[1] .. " accepted")
        assert(msg:find(c[3], 1, true), c[1] .. ": " .. msg)
        assert(pos == c[2], c[1] .. ": position " .. tostring(pos) .. ", expected " .. c[2])
      end
      assert_raises({ properties = { code = { type = "string", pattern = "^a(?=b)" } } },
        'slm.schema: unsupported pattern "^a(?=b)" (character 3): lookaround and other (?...) groups are not supported'
        .. " at $.properties.code")
      assert_raises({ pattern = 5 }, "'pattern' must be a string at $")
    end)

    it("takes time linear in the string: patterns that make backtracking matchers explode finish at once", function()
      local evil = {
        { "^(a+)+$", ("a"):rep(20000) .. "!" },
        { "(a|aa)*b", ("a"):rep(20000) },
        { "^(a|a)*$", ("a"):rep(20000) .. "b" },
        { "^(\\w+\\s?)*$", ("word "):rep(4000) .. "!" },
        { "(.*a){12}x", ("a"):rep(5000) },
        { "^([a-z]+)*[0-9]$", ("abcdefghij"):rep(2000) .. "!" },
        { "^(a*)*b$", ("a"):rep(20000) },
      }
      local t = clock_of(function()
        for _, c in ipairs(evil) do
          assert.is_false(schema.regex(c[1]):test(c[2]))
        end
      end)
      -- a backtracking matcher needs 2^20000 steps on the first; this one
      -- a few million at most
      assert(t < 5, "the pathological patterns took " .. t .. " s")
      -- and through the validator
      local s = { type = "string", pattern = "^(a+)+$" }
      t = clock_of(function() assert.equal(false, (schema.validate(s, ("a"):rep(20000) .. "!"))) end)
      assert(t < 5, "validation took " .. t .. " s")
    end)
  end)

  describe("anyOf, oneOf, allOf", function()
    it("anyOf: one match is enough; a type mismatch everywhere says what would do", function()
      local s = { anyOf = { { type = "string" }, { type = "null" } } }
      assert_ok(s, "x")
      assert_ok(s, NULL)
      assert_errors(s, 3, "$: must be a string or null, got number 3")
      assert_errors({ anyOf = { { type = "integer" }, { type = "array" } } }, 1.5,
        "$: must be an integer or an array, got number 1.5")
    end)

    it("anyOf: when one alternative takes the value's type, its own errors", function()
      local s = { anyOf = {
        { type = "object", properties = { city = { type = "string" } }, required = { "city" } },
        { type = "null" } } }
      assert_ok(s, { city = "Oslo" })
      assert_errors({ type = "object", properties = { address = s } }, { address = { town = "Oslo" } },
        "$.address.city: is required")
    end)

    it("anyOf and oneOf: several alternatives of the value's type, the first error of each", function()
      local pay = { oneOf = {
        { type = "object", properties = { kind = { const = "card" }, number = { type = "string" } },
          required = { "kind", "number" } },
        { type = "object", properties = { kind = { const = "iban" }, iban = { type = "string" } },
          required = { "kind", "iban" } },
      } }
      assert_ok(pay, { kind = "card", number = "4242" })
      assert_ok(pay, { kind = "iban", iban = "NO93" })
      assert_errors({ type = "object", properties = { payment = pay } }, { payment = { kind = "iban" } },
        '$.payment: must match exactly one of 2 alternatives (oneOf): #1: $.payment.number: is required; ' ..
        "#2: $.payment.iban: is required")
      assert_errors({ anyOf = { { type = "number", minimum = 10 }, { type = "number", multipleOf = 2 } } }, 3,
        "$: must match one of 2 alternatives (anyOf): #1: must be >= 10, got 3; #2: must be a multiple of 2, got 3")
    end)

    it("oneOf: exactly one must match", function()
      local s = { oneOf = { { type = "integer" }, { type = "number", minimum = 2 } } }
      assert_ok(s, 1)
      assert_ok(s, 2.5)
      assert_errors(s, 3, "$: must match exactly one of 2 alternatives (oneOf), but matches #1 and #2")
      assert_errors(s, "x", '$: must be an integer or a number, got string "x"')
    end)

    it("allOf: every schema applies, all errors reported", function()
      local s = { allOf = { { type = "string", minLength = 3 }, { pattern = "^a" } } }
      assert_ok(s, "abc")
      assert_errors(s, "b", "$: must be at least 3 characters long, got 1", '$: must match the pattern "^a", got "b"')
    end)

    it("inside an object, a failing anyOf adds to the other errors", function()
      local s = { type = "object", properties = {
        a = { anyOf = { { type = "string" }, { type = "number" } } }, b = { type = "boolean" } } }
      assert_errors(s, { a = true, b = 1 }, "$.a: must be a string or a number, got boolean true",
        "$.b: must be a boolean, got number 1")
    end)
  end)

  describe("$ref", function()
    it("#/$defs/... and #/definitions/..., with siblings applying too", function()
      local s = {
        ["$defs"] = { money = { type = "number", minimum = 0 } },
        definitions = { code = { type = "string", pattern = "^[A-Z]{3}$" } },
        type = "object",
        properties = {
          total = { ["$ref"] = "#/$defs/money" },
          currency = { ["$ref"] = "#/definitions/code", description = "ISO 4217" },
          tip = { ["$ref"] = "#/$defs/money", maximum = 10 },
        },
      }
      assert_ok(s, { total = 3, currency = "EUR", tip = 1 })
      assert_errors(s, { total = -3, currency = "eur", tip = 11 },
        '$.currency: must match the pattern "^[A-Z]{3}$", got "eur"',
        "$.tip: must be <= 10, got 11",
        "$.total: must be >= 0, got -3")
    end)

    it("recursive schemas: a tree, through $defs and through #", function()
      local tree = {
        ["$defs"] = { node = { type = "object", properties = {
          value = { type = "integer" },
          children = { type = "array", items = { ["$ref"] = "#/$defs/node" } } }, required = { "value" } } },
        ["$ref"] = "#/$defs/node",
      }
      assert_ok(tree, dec('{"value":1,"children":[{"value":2},{"value":3,"children":[{"value":4,"children":[]}]}]}'))
      assert_errors(tree, dec('{"value":1,"children":[{"value":2},{"value":3,"children":[{"value":"4"},{}]}]}'),
        '$.children[1].children[0].value: must be an integer, got string "4"',
        "$.children[1].children[1].value: is required")
      local list = { type = "object", properties = { head = { type = "string" },
        tail = { anyOf = { { ["$ref"] = "#" }, { type = "null" } } } }, required = { "head", "tail" } }
      assert_ok(list, dec('{"head":"a","tail":{"head":"b","tail":null}}'))
      assert_errors(list, dec('{"head":"a","tail":{"head":"b","tail":{"head":2,"tail":null}}}'),
        "$.tail.tail.head: must be a string, got number 2")
      -- a very deep value stops at the depth limit instead of the C stack
      local deep = NULL
      for i = 1, 300 do deep = { head = "x" .. i, tail = deep } end
      local ok, errs = schema.validate(list, deep)
      assert.is_false(ok)
      assert.matches("nested deeper than 200", errs[1].message)
    end)

    it("JSON pointers: escapes, indices into lists, the root", function()
      local v = compile({
        ["$defs"] = { ["a/b"] = { type = "string" }, ["t~"] = { type = "number" }, ["sp ce"] = { type = "boolean" } },
        type = "object",
        properties = {
          v = { anyOf = { { type = "null" }, { type = "integer" } } },
          w = { ["$ref"] = "#/properties/v/anyOf/1" },
          x = { ["$ref"] = "#/$defs/a~1b" }, y = { ["$ref"] = "#/$defs/t~0" }, z = { ["$ref"] = "#/$defs/sp%20ce" },
        },
      })
      assert.is_true((v:validate({ x = "s", y = 1, z = true, w = 2 })))
      local ok, errs = v:validate({ x = 1, y = "s", z = 1, w = 2.5 })
      assert.is_false(ok)
      assert.equal(4, #errs)
      assert.equal("$.w: must be an integer, got number 2.5", errs[1].path .. ": " .. errs[1].message)
    end)
  end)

  describe("annotations", function()
    it("are accepted and ignored; format is not checked", function()
      local s = {
        ["$schema"] = "https://json-schema.org/draft/2020-12/schema", ["$id"] = "urn:x", name = "result", strict = true,
        title = "T", description = "D", ["$comment"] = "c", type = "object",
        properties = {
          when = { type = "string", format = "date-time", default = "now", examples = { "2024-01-01T00:00:00Z" },
                   deprecated = false, readOnly = true, writeOnly = false, title = "When" },
        },
      }
      assert_ok(s, { when = "not a date at all" })
      assert_errors(s, { when = 5 }, "$.when: must be a string, got number 5")
    end)

    it("true, false and {} as schemas", function()
      assert_ok(true, { anything = 1 })
      assert_ok({}, "anything")
      assert_errors(false, 1, "$: is not allowed here")
      assert_errors({ properties = { no = false } }, { no = 1 }, "$.no: is not allowed here")
    end)
  end)

  describe("compile refuses", function()
    it("every keyword outside the subset, naming it and where it stands", function()
      local unsupported = {
        "patternProperties", "dependentRequired", "dependentSchemas", "if", "then", "else", "not", "uniqueItems",
        "contains", "minContains", "maxContains", "propertyNames", "minProperties", "maxProperties", "prefixItems",
        "unevaluatedItems", "unevaluatedProperties", "additionalItems", "$anchor", "$dynamicRef", "$dynamicAnchor",
        "$recursiveRef", "$vocabulary", "dependencies", "contentMediaType", "contentEncoding", "discriminator",
        "xml", "externalDocs", "example", "maxLenght", "requried", "x-custom",
      }
      for _, k in ipairs(unsupported) do
        assert_raises({ [k] = true }, "slm.schema: unsupported keyword '" .. k .. "' at $")
        assert_raises({ type = "object", properties = { tags = { type = "array", [k] = 1 } } },
          "slm.schema: unsupported keyword '" .. k .. "' at $.properties.tags")
      end
      assert_raises({ type = "array", items = { anyOf = { { type = "string" }, { type = "object", not_ = 1 } } } },
        "unsupported keyword 'not_' at $.items.anyOf[1]")
      assert_raises({ ["$defs"] = { ["my def"] = { uniqueItems = true } } },
        "unsupported keyword 'uniqueItems' at $[\"$defs\"][\"my def\"]")
      assert_raises({ additionalProperties = { contains = {} } }, "unsupported keyword 'contains' at $.additionalProperties")
      -- several: the first in byte order, whatever the hash order
      for _, first in ipairs({ "a", "k", "t" }) do
        local s = { type = "string" }
        for c = first:byte(), first:byte() + 8 do s[string.char(c) .. "x"] = 1 end
        assert_raises(s, "unsupported keyword '" .. first .. "x' at $")
      end
      -- root-only annotations elsewhere
      for _, k in ipairs({ "$schema", "$id", "name", "strict" }) do
        assert_raises({ properties = { x = { [k] = "v" } } }, "keyword '" .. k .. "' is accepted at the root only at $.properties.x")
      end
      -- unused definitions are checked too
      assert_raises({ type = "string", definitions = { unused = { not_a_keyword = 1 } } },
        "unsupported keyword 'not_a_keyword' at $.definitions.unused")
    end)

    it("malformed schemas, saying what is wrong and where", function()
      local malformed = {
        { { type = 5 }, "'type' must be a type name or a non-empty list of them at $" },
        { { type = {} }, "'type' must be a type name or a non-empty list of them at $" },
        { { type = "str" }, 'unknown type "str" at $' },
        { { type = { "string", 1 } }, "unknown type 1 at $" },
        { { required = "a" }, "'required' must be a list of strings at $" },
        { { required = { "a", 2 } }, "'required' must be a list of strings at $" },
        { { required = { a = true } }, "'required' must be a list of strings at $" },
        { { properties = { "a" } }, "'properties' must be an object of schemas at $" },
        { { properties = { a = "string" } }, "a schema must be an object or a boolean, got string at $.properties.a" },
        { { properties = { a = { "string" } } }, "a schema must be an object (a table with string keys) at $.properties.a" },
        { { additionalProperties = "no" }, "'additionalProperties' must be a boolean or a schema at $" },
        { { enum = {} }, "'enum' must be a non-empty list at $" },
        { { enum = "a" }, "'enum' must be a non-empty list at $" },
        { { enum = { print } }, "'enum' holds a value JSON does not have" },
        { { const = 0 / 0 }, "'const' holds a value JSON does not have" },
        { { items = { { type = "string" } } }, "'items' as a list (the tuple form) is not supported" },
        { { items = 1 }, "'items' must be a schema at $" },
        { { minItems = -1 }, "'minItems' must be a non-negative integer at $" },
        { { maxItems = 1.5 }, "'maxItems' must be a non-negative integer at $" },
        { { minLength = "3" }, "'minLength' must be a non-negative integer at $" },
        { { maxLength = math.huge }, "'maxLength' must be a non-negative integer at $" },
        { { minimum = "0" }, "'minimum' must be a finite number at $" },
        { { maximum = 0 / 0 }, "'maximum' must be a finite number at $" },
        { { exclusiveMinimum = true },
          "'exclusiveMinimum' must be a number (draft 2020); the boolean form of draft 4 is not supported at $" },
        { { exclusiveMaximum = false }, "'exclusiveMaximum' must be a number (draft 2020)" },
        { { multipleOf = 0 }, "'multipleOf' must be greater than 0 at $" },
        { { anyOf = {} }, "'anyOf' must be a non-empty list of schemas at $" },
        { { oneOf = { type = "string" } }, "'oneOf' must be a non-empty list of schemas at $" },
        { { allOf = { 1 } }, "a schema must be an object or a boolean, got number at $.allOf[0]" },
        { { ["$ref"] = 1 }, "'$ref' must be a string at $" },
        { { ["$ref"] = "#/$defs/missing" }, '$ref "#/$defs/missing" points to nothing at $' },
        { { ["$ref"] = "other.json#/a" }, 'unsupported $ref "other.json#/a"' },
        { { ["$ref"] = "https://example.com/s.json" }, "unsupported $ref" },
        { { ["$ref"] = "#node" }, 'unsupported $ref "#node"' },
        { { ["$ref"] = "#/type", type = "string" }, '$ref "#/type" points to no schema at $' },
        { { ["$defs"] = { "a" } }, "'$defs' must be an object of schemas at $" },
        { { format = 1 }, "'format' must be a string at $" },
        { { nullable = "yes" }, "'nullable' must be a boolean at $" },
        { { ["$ref"] = "#" }, "a $ref cycle that never reaches a value's contents" },
        { { ["$defs"] = { a = { ["$ref"] = "#/$defs/b" }, b = { ["$ref"] = "#/$defs/a" } } },
          "a $ref cycle that never reaches a value's contents" },
        { { ["$defs"] = { a = { anyOf = { { type = "null" }, { ["$ref"] = "#/$defs/a" } } } } },
          "a $ref cycle that never reaches a value's contents (the schema refers to itself without going through" ..
          " properties or items) at $[\"$defs\"].a" },
        { { allOf = { { ["$ref"] = "#" } } }, "a $ref cycle" },
      }
      for _, c in ipairs(malformed) do assert_raises(c[1], "slm.schema: " .. c[2]) end
    end)

    it("misuse: not a schema, unknown options; the error names the caller's line", function()
      local ok, e = pcall(compile, "string")
      assert.is_false(ok)
      assert.matches("slm.schema.compile: expected a schema %(a table or a boolean%), got string", e)
      assert.has_error(function() compile(nil) end)
      assert_raises_in(function() compile({}, { max_errs = 3 }) end, "slm.schema.compile: unknown option 'max_errs'")
      assert.has_error(function() compile({}, { max_errors = 0 }) end)
      assert.has_error(function() schema.validate(nil, 1) end)
      -- the position is the caller's, not somewhere inside slm.schema
      local _, where = pcall(function() compile({ uniqueItems = true }) end)
      assert.matches("^[^:]*schema_spec%.lua:%d+: slm%.schema: unsupported keyword 'uniqueItems' at %$$", where)
      local _, where2 = pcall(function() schema.validate({ if_ = 1 }, 1) end)
      assert.matches("^[^:]*schema_spec%.lua:%d+: slm%.schema: unsupported keyword 'if_' at %$$", where2)
    end)
  end)

  describe("compiled validators", function()
    it("schema.validate compiles once per schema table; a validator is reusable", function()
      local s = { type = "string" }
      local a, b = schema.validate(s, "x"), schema.validate(s, 1)
      assert.is_true(a)
      assert.is_false(b)
      -- compiled once: a change to the table afterwards is not seen
      s.type = "number"
      assert.is_false((schema.validate(s, 1)))
      local v = compile({ type = "object", properties = { n = { type = "number" } } })
      for i = 1, 3 do
        assert.is_true((v:validate({ n = i })))
        local ok, errs = v:validate({ n = "x" })
        assert.is_false(ok)
        assert.equal(1, #errs) -- nothing left over from the previous call
        ok, errs = v:validate({ n = "x", extra = 1 })
        assert.is_false(ok)
        assert.equal(1, #errs)
        assert.is_true(v:check({ n = 1 }))
        assert.is_false(v:check({ n = "y" }))
      end
    end)

    it("errors carry path, message and keyword", function()
      local ok, errs = schema.validate({ type = "object", properties = { total = { minimum = 0 } } }, { total = -3 })
      assert.is_false(ok)
      assert.same({ { path = "$.total", message = "must be >= 0, got -3", keyword = "minimum" } }, errs)
    end)
  end)

  describe("parse_lenient", function()
    local P = schema.parse_lenient

    it("takes a reply that is JSON alone, scalars too", function()
      assert.same({ a = 1 }, P('{"a": 1}'))
      assert.same({ 1, 2 }, P("  [1, 2]\n"))
      assert.equal("tech", P('"tech"'))
      assert.equal(42, P("42"))
      assert.equal(NULL, P("null"))
    end)

    it("takes the JSON in ```json and ``` fences", function()
      assert.same({ a = 1 }, P('```json\n{"a": 1}\n```'))
      assert.same({ a = 1 }, P('Sure! [as asked]:\n```JSON\n{"a": 1}\n```\nAnything else?'))
      assert.same({ 1 }, P("```\n[1]\n```"))
      assert.equal("billing", P('```json\n"billing"\n```'))
      assert.equal("billing", P('Sure:\n```JSON\n"billing"\n```'))
      assert.same({ b = 2 }, P('```json\nHere: {"b": 2}\n```'))
      assert.same({ c = 3 }, P('```python\nprint(1)\n```\n```json\n{"c": 3}\n```'))
      assert.same({ d = 4 }, P('```json\n{"d": 4}')) -- the closing fence never came
    end)

    it("takes the first complete object or array amid prose", function()
      assert.same({ total = 3 }, P('Here is the result: {"total": 3} Hope this helps!'))
      assert.same({ "a", "b" }, P('The labels are ["a", "b"].'))
      assert.same({ x = { y = { 1, { z = "}" } } } }, P('prose {"x": {"y": [1, {"z": "}"}]}} more prose'))
    end)

    it("matches brackets outside strings only, escaped quotes included", function()
      assert.same({ s = "a}b]c{d[" }, P('Result: {"s": "a}b]c{d["} done'))
      assert.same({ s = 'say "hi" }' }, P('x {"s": "say \\"hi\\" }"} y'))
      assert.same({ s = "back\\" }, P('x {"s": "back\\\\"} y }'))
      assert.same({ s = 'a"}' }, P('x {"s": "a\\"}"} y'))
    end)

    it("two JSON values in one reply: the first", function()
      assert.same({ a = 1 }, P('{"a": 1}\n{"b": 2}'))
      assert.same({ first = true }, P('First: {"first": true}. Second: {"second": true}.'))
    end)

    it("drops trailing commas before } and ], never inside strings", function()
      assert.same({ a = { 1, 2 }, b = { c = 1 } }, P('{"a": [1, 2, ], "b": {"c": 1,\n},}'))
      assert.same({ s = "x,}" }, P('{"s": "x,}",}'))
      assert.same({ s = ", ]" }, P('```json\n{"s": ", ]",\n}\n```'))
      local v, err = P('{"a": 1,,}')
      assert.is_nil(v)
      assert.matches("does not parse", err)
    end)

    it("takes linear time over a reply of blank lines and spaces (a small model's runaway output)", function()
      local junk = (" \n"):rep(100000)
      local v, err
      local t = clock_of(function() v, err = P("ok" .. junk .. "done") end)
      assert.is_nil(v)
      assert.equal("no JSON object in the reply", err)
      assert(t < 1, "200 KB of white space took " .. t .. " s")
      t = clock_of(function() v = P(junk .. '{"a": 1}' .. junk) end)
      assert.same({ a = 1 }, v)
      t = t + clock_of(function() v = P('```json\n{"a": 2}' .. junk .. "```") end)
      assert.same({ a = 2 }, v)
      assert(t < 1, "JSON amid 400 KB of white space took " .. t .. " s")
      assert.same({ a = 1 }, P(' \t\r\n{"a": 1} \t\r\n'))
      assert.equal(3, P("\n3\n"))
    end)

    it("skips a UTF-8 byte order mark", function()
      assert.same({ a = 1 }, P('\239\187\191{"a": 1}'))
      assert.same({ a = 1 }, P('\239\187\191Result: {"a": 1}'))
      assert.equal("tech", P('\239\187\191"tech"'))
    end)

    it("never turns what is not JSON into JSON", function()
      local refused = {
        { "", "no JSON object in the reply (it is empty)" },
        { "   \n", "no JSON object in the reply (it is empty)" },
        { "I cannot help with that.", "no JSON object in the reply" },
        { "{'a': 1}", "does not parse" },                          -- single quotes
        { "{a: 1}", "does not parse" },                            -- unquoted keys
        { '{"a": 1', "never ends (was the reply cut off?)" },     -- a cut reply
        { '{"a": [1, 2}', "mismatched brackets" },
        { "```json\n{'a': 1}\n```", "does not parse" },
      }
      for _, c in ipairs(refused) do
        local v, err = P(c[1])
        assert(v == nil, string.format("%q gave a value", c[1]))
        assert(err:find(c[2], 1, true), string.format("%q: %s", c[1], err))
      end
      -- a piece of a broken or cut value is never taken for the answer
      assert.is_nil((P('{"a": {"b": 1}, c: 2}')))
      assert.is_nil((P('{"a": {"b": 1}, "c": [1, 2')))
      assert.is_nil((P('Here {"x": {"y": 1}')))
      -- the decoder's message, and where the value started
      local _, err = P('Result: {"a": tru}')
      assert.matches("^the JSON value at character 9 of the reply does not parse: ", err)
      assert_raises_in(function() P(nil) end, "slm.schema.parse_lenient: expected a string, got nil")
    end)

    it("a balanced stretch of prose that is not JSON is skipped whole", function()
      assert.same({ a = 1 }, P('As [noted above], the answer is {"a": 1}'))
      assert.same({ a = 1 }, P('Use {placeholders} like {"a": 1}'))
    end)
  end)

  describe("for_openai_strict", function()
    -- What OpenAI's strict mode asks of every object of a schema.
    local function assert_strict(s)
      local function walk(x, path)
        if type(x) ~= "table" then return end
        local is_obj = x.type == "object" or (type(x.type) == "table" and x.type[1] == "object")
        if is_obj then
          assert(x.additionalProperties == false, path .. ": additionalProperties is not false")
          local names = {}
          for k in pairs(x.properties) do names[#names + 1] = k end
          table.sort(names)
          assert.same(names, x.required, path .. ": required is not every property")
        end
        assert(x.oneOf == nil, path .. ": oneOf")
        assert(x.allOf == nil, path .. ": allOf")
        for k, sub in pairs(x) do
          if type(sub) == "table" and k ~= "enum" and k ~= "const" and k ~= "required" and k ~= "type" then
            walk(sub, path .. "." .. tostring(k))
          end
        end
      end
      walk(s, "$")
    end

    local order = {
      type = "object",
      description = "an order",
      properties = {
        id = { type = "string", pattern = "^[A-Z]+$" },
        note = { type = "string", minLength = 1 },
        status = { type = "string", enum = { "open", "closed" } },
        discount = { type = { "number", "null" } },
        customer = {
          type = "object",
          properties = { name = { type = "string" }, email = { type = "string", format = "email" },
                         vip = { type = "boolean" } },
          required = { "name" },
        },
        lines = { type = "array", minItems = 1, items = {
          type = "object", properties = { sku = { type = "string" }, qty = { type = "integer", minimum = 1 },
                                          gift = { ["$ref"] = "#/$defs/gift" } },
          required = { "sku", "qty" } } },
      },
      required = { "id", "lines" },
      ["$defs"] = { gift = { type = "object", properties = { message = { type = "string" } }, required = { "message" } } },
    }

    it("closes every object, requires every property, makes the optional ones nullable", function()
      local before = json.encode(order)
      local s2 = assert(schema.for_openai_strict(order))
      assert.equal(before, json.encode(order)) -- the caller's table is left alone
      assert_strict(s2)
      local p = s2.properties
      assert.same({ type = "string", pattern = "^[A-Z]+$" }, p.id)                 -- required: as it was
      assert.same({ type = { "string", "null" }, minLength = 1 }, p.note)           -- constraints kept
      assert.same({ type = { "string", "null" }, enum = { "open", "closed", NULL } }, p.status)
      assert.same({ type = { "number", "null" } }, p.discount)                      -- accepted null already
      assert.same({ type = { "object", "null" }, additionalProperties = false,
        required = { "email", "name", "vip" },
        properties = { name = { type = "string" }, email = { type = { "string", "null" }, format = "email" },
                       vip = { type = { "boolean", "null" } } } }, p.customer)
      assert.same({ anyOf = { { ["$ref"] = "#/$defs/gift" }, { type = "null" } } }, p.lines.items.properties.gift)
      assert.same({ "id", "lines" }, order.required)
      assert.equal("an order", s2.description)
      assert.equal(false, s2["$defs"].gift.additionalProperties)
      -- what goes on the wire: required lists are arrays, even empty ones
      local empty = assert(schema.for_openai_strict({ type = "object", properties = {} }))
      assert.matches('"required":%[%]', json.encode(empty))
    end)

    it("oneOf becomes anyOf, a $ref with siblings is inlined, allOf merged, unknown formats dropped", function()
      local s = {
        type = "object",
        ["$schema"] = "https://json-schema.org/draft/2020-12/schema", name = "x", strict = true,
        ["$defs"] = { base = { type = "object", properties = { id = { type = "string" } }, required = { "id" } } },
        properties = {
          pay = { oneOf = { { type = "string" }, { type = "integer" } } },
          ref = { ["$ref"] = "#/$defs/base", description = "the base" },
          both = { allOf = { { ["$ref"] = "#/$defs/base" },
            { type = "object", properties = { extra = { type = "number" } } } } },
          when = { type = "string", format = "date-time", examples = { "x" }, default = NULL },
          site = { type = "string", format = "uri", default = "https://example.com" },
        },
        required = { "pay", "ref", "both", "when", "site" },
      }
      local s2 = assert(schema.for_openai_strict(s))
      assert_strict(s2)
      assert.is_nil(s2["$schema"])
      assert.is_nil(s2.name)
      assert.is_nil(s2.strict)
      assert.same({ anyOf = { { type = "string" }, { type = "integer" } } }, s2.properties.pay)
      assert.same({ type = "object", description = "the base", properties = { id = { type = "string" } },
        required = { "id" }, additionalProperties = false }, s2.properties.ref)
      assert.same({ type = "object", additionalProperties = false, required = { "extra", "id" },
        properties = { id = { type = "string" }, extra = { type = { "number", "null" } } } }, s2.properties.both)
      assert.same({ type = "string", format = "date-time" }, s2.properties.when)
      assert.same({ type = "string", default = "https://example.com" }, s2.properties.site)
    end)

    it("OpenAPI nullable, optional anyOf and const properties", function()
      local s2 = assert(schema.for_openai_strict({ type = "object", properties = {
        a = { type = "string", nullable = true },
        b = { anyOf = { { type = "string" }, { type = "integer" } } },
        c = { const = "v1" },
        d = { anyOf = { { type = "string" } }, type = "string" },
      }, required = { "a" } }))
      assert.same({ type = { "string", "null" } }, s2.properties.a)
      assert.same({ anyOf = { { type = "string" }, { type = "integer" }, { type = "null" } } }, s2.properties.b)
      assert.same({ anyOf = { { const = "v1" }, { type = "null" } } }, s2.properties.c)
      assert.same({ anyOf = { { anyOf = { { type = "string" } }, type = "string" }, { type = "null" } } }, s2.properties.d)
    end)

    it("nil and why for what strict mode cannot express", function()
      local cannot = {
        { { type = "string" }, "the root must be an object" },
        { { type = { "object", "null" }, properties = {} }, "the root must be an object" },
        { { anyOf = { { type = "object", properties = {} } } }, "the root must be an object" },
        { { type = "object" }, "an object without properties has no strict form (the model could only send {}) at $" },
        { { type = "object", properties = { m = { type = "object", additionalProperties = { type = "number" } } } },
          "an object with additionalProperties (a map whose keys the model picks) has no strict form at $.properties.m" },
        { { type = "object", properties = {}, additionalProperties = true }, "additionalProperties" },
        { { type = "object", properties = { a = { type = "string" } }, required = { "a", "b" } },
          'the required property "b" is not in properties: strict mode could never send it at $' },
        { { type = "object", properties = { x = true } }, "a boolean schema (true) has no strict form at $.properties.x" },
        { { type = "object", properties = { x = { anyOf = { { type = "string" } }, oneOf = { { type = "string" } } } } },
          "anyOf beside oneOf" },
        { { type = "object", properties = { x = { allOf = { { type = "string" }, { type = "number" } } } } },
          "allOf branches that set 'type' differently have no strict form at $.properties.x.allOf[1]" },
        { true, "a boolean schema has no strict form" },
      }
      for _, c in ipairs(cannot) do
        local s2, why = schema.for_openai_strict(c[1])
        assert.is_nil(s2)
        assert(why:find(c[2], 1, true), why)
      end
      -- a schema outside the subset raises, as compile does
      assert.has_error(function() schema.for_openai_strict({ type = "object", uniqueItems = true }) end)
    end)

    it("keeps recursive schemas recursive", function()
      local tree = { type = "object", properties = { v = { type = "integer" },
        kids = { type = "array", items = { ["$ref"] = "#" } } }, required = { "v", "kids" } }
      local s2 = assert(schema.for_openai_strict(tree))
      assert_strict(s2)
      assert.same({ ["$ref"] = "#" }, s2.properties.kids.items)
      assert.is_true((schema.validate(s2, dec('{"v":1,"kids":[{"v":2,"kids":[]}]}'))))
    end)

    it("keeps a recursive $ref with a description beside it recursive (pydantic's fields)", function()
      -- inlined once, then a bare $ref: inlining it again would never end
      local tree = { type = "object", properties = { v = { type = "integer" },
        kids = { type = "array", items = { ["$ref"] = "#", description = "a child node" } } }, required = { "v", "kids" } }
      local s2, why = schema.for_openai_strict(tree)
      assert(s2, why)
      assert_strict(s2)
      local inner = s2.properties.kids.items
      assert.equal("a child node", inner.description)
      assert.same({ ["$ref"] = "#" }, inner.properties.kids.items)
      local value = dec('{"v":1,"kids":[{"v":2,"kids":[{"v":3,"kids":[]}]}]}')
      assert.is_true((schema.validate(s2, value)))
      assert.is_false((schema.validate(s2, dec('{"v":1,"kids":[{"v":2,"kids":[{"v":"x","kids":[]}]}]}'))))
      local list = { ["$defs"] = { node = { type = "object", properties = { v = { type = "string" },
        next = { anyOf = { { ["$ref"] = "#/$defs/node", title = "Next" }, { type = "null" } } } },
        required = { "v", "next" } } }, ["$ref"] = "#/$defs/node" }
      s2, why = schema.for_openai_strict(list)
      assert(s2, why)
      assert_strict(s2)
      assert.is_true((schema.validate(s2, dec('{"v":"a","next":{"v":"b","next":{"v":"c","next":null}}}'))))
      -- keywords other than annotations beside a recursive $ref: no strict form, said so
      local bad = { type = "object", properties = { v = { type = "integer" },
        kids = { type = "array", items = { ["$ref"] = "#", maxProperties = nil, minimum = 1 } } }, required = { "v", "kids" } }
      s2, why = schema.for_openai_strict(bad)
      assert.is_nil(s2)
      assert.matches("a recursive $ref with keywords beside it", why, 1, true)
    end)

    it("converts schemas with hundreds of $ref-with-description and allOf properties", function()
      local props, props2 = {}, {}
      for i = 1, 250 do
        props["f" .. i] = { ["$ref"] = "#/$defs/money", description = "field " .. i }
        props2["f" .. i] = { allOf = { { ["$ref"] = "#/$defs/money" } }, description = "field " .. i }
      end
      local defs = { money = { type = "number", minimum = 0 } }
      for _, p in ipairs({ props, props2 }) do
        local s2, why = schema.for_openai_strict({ type = "object", properties = p, ["$defs"] = defs })
        assert(s2, why)
        assert_strict(s2)
        assert.equal(250, #s2.required)
        assert.equal("field 7", s2.properties.f7.anyOf and s2.properties.f7.anyOf[1].description
          or s2.properties.f7.description)
      end
    end)

    it("from_openai_strict removes the nulls strict mode sent for optional properties", function()
      local reply = dec([[{"id":"A","note":null,"status":null,"discount":null,
        "customer":{"name":"Ann","email":null,"vip":null},
        "lines":[{"sku":"x","qty":1,"gift":null},{"sku":"y","qty":2,"gift":{"message":"hi"}}]}]])
      assert.is_false((schema.validate(order, reply)))
      local s2 = assert(schema.for_openai_strict(order))
      assert.is_true((schema.validate(s2, reply)))
      local v = schema.from_openai_strict(order, reply)
      assert.equal(reply, v)
      assert.is_nil(v.note)
      assert.is_nil(v.status)
      assert.equal(NULL, v.discount)          -- null is a value this schema takes
      assert.same({ name = "Ann" }, v.customer)
      assert.is_nil(v.lines[1].gift)
      assert.same({ message = "hi" }, v.lines[2].gift)
      assert_ok(order, v)
      -- a required property's null stays, and fails as it should
      local r2 = dec('{"id":null,"lines":[{"sku":"x","qty":1}]}')
      schema.from_openai_strict(order, r2)
      assert_errors(order, r2, "$.id: must be a string, got null")
    end)

    it("from_openai_strict follows $ref, allOf and the anyOf branch that fits", function()
      local s = {
        ["$defs"] = { item = { type = "object", properties = { a = { type = "string" }, b = { type = "string" } },
          required = { "a" } } },
        type = "object",
        properties = {
          one = { ["$ref"] = "#/$defs/item" },
          all = { allOf = { { type = "object", properties = { c = { type = "integer" } } } } },
          alt = { anyOf = {
            { type = "object", properties = { kind = { const = "x" }, x = { type = "number" } }, required = { "kind" } },
            { type = "object", properties = { kind = { const = "y" }, y = { type = "number" } }, required = { "kind" } },
          } },
        },
      }
      local v = schema.from_openai_strict(s, dec([[{"one":{"a":"s","b":null},"all":{"c":null},
        "alt":{"kind":"y","x":null,"y":null}}]]))
      -- x is no property of the branch that fits: an additional one, left as it is
      assert.same({ one = { a = "s" }, all = {}, alt = { kind = "y", x = NULL } }, v)
      assert_ok(s, v)
      local w = schema.from_openai_strict(s, dec('{"alt":{"kind":"y","y":null}}'))
      assert.same({ alt = { kind = "y" } }, w)
      assert_ok(s, w)
    end)
  end)
end)
