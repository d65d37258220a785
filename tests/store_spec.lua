-- slm.store: one contract for the memory, file and SQLite stores; then what
-- each of the last two owes on its own: persistence across processes,
-- hostile ids kept inside the directory / out of the SQL, atomic writes,
-- two processes on one database, corrupt data reported, misuse raising.
-- Everything is written under one temporary directory per test, removed
-- after it.
local helpers = require "tests.helpers"
local store = require "slm.store"
local json = require "slm.json"
local core = require "slm.core"

local q = helpers.q
local have_sqlite = pcall(require, "luasql.sqlite3")
local NEEDS_SQLITE = "needs lua-sql-sqlite3 (bin/setup-deps --test installs it)"

local function sh(cmd)
  local p = assert(io.popen(cmd .. " 2>&1"))
  local out = p:read("a")
  p:close()
  return out
end

local function mktemp()
  local d = sh("mktemp -d " .. q((os.getenv("TMPDIR") or "/tmp") .. "/slm-store.XXXXXX")):gsub("%s+$", "")
  assert(d:match("^/.*slm%-store%.%w+$"), "mktemp -d failed: " .. d)
  return d
end

local function rmrf(d)
  if d and d:match("slm%-store%.%w+$") then os.execute("rm -rf " .. q(d)) end
end

-- Every path below root, relative to it, sorted.
local function tree(root)
  local out = {}
  for line in sh("cd " .. q(root) .. " && find . -mindepth 1 | sort"):gmatch("[^\n]+") do
    out[#out + 1] = line:sub(3)
  end
  return out
end

local write = helpers.write_file

-- The realistic history, as Lua source, so that other processes build the
-- same one: a system prompt, a user turn with a parts list (text + image),
-- a tool call and its result, unicode, JSON null, empty lists (a parts
-- list, tool_calls, nested), an empty object, integers and floats.
local HISTORY_SRC = [==[
local json = require "slm.json"
return {
  { role = "system", content = "You are the support bot of «Ромашка» Ltd. Answer in the user's language." },
  { role = "user", name = "ivan_p", content = {
      { type = "text", text = "Мой заказ №4471 не пришёл 📦 — где он?" },
      { type = "image_url", image_url = { url = "data:image/png;base64,iVBORw0KGgo=", detail = "low" } },
  } },
  { role = "assistant", content = json.null, refusal = json.null, tool_calls = {
      { id = "call_Ab1", type = "function",
        ["function"] = { name = "order_status", arguments = "{\"order_id\":4471}" } },
      { id = "call_Ab2", type = "function",
        ["function"] = { name = "customer", arguments = "{}" } },
  } },
  { role = "tool", tool_call_id = "call_Ab1", content = "{\"status\":\"shipped\",\"carrier\":\"CDEK\"}" },
  { role = "tool", tool_call_id = "call_Ab2", content = "" },
  { role = "assistant", content = "Ваш заказ отправлен.\n\tTracking: \"RU123\" \\ ok \0 end",
    tool_calls = json.array() },
  { role = "user", content = json.array() },
  { role = "assistant", content = "日本語も大丈夫です 😀", meta = {
      tokens = 42, cost = 0.000105, ratio = 0.1, ts = 1717000000123, neg = -7, zero = 0,
      max_exact = 9007199254740991, half = 0.5, flags = { true, false }, none = {},
      nested = { json.array(), { json.array(), "x" }, { deeper = json.array() } },
      ["key with spaces"] = "v", ["1"] = "a string key",
  } },
}
]==]

local function history() return assert(load(HISTORY_SRC))() end

-- What `a` holds, in canonical JSON, plus every number's Lua type: equal
-- for equal histories ([] stays [], integers stay integers).
local function fingerprint(h)
  local types = {}
  local function walk(t, path)
    local keys = {}
    for k in pairs(t) do keys[#keys + 1] = k end
    table.sort(keys, function(x, y) return tostring(x) < tostring(y) end)
    for _, k in ipairs(keys) do
      local v = t[k]
      if type(v) == "number" then types[#types + 1] = path .. "." .. tostring(k) .. "=" .. helpers.math_type(v)
      elseif type(v) == "table" then walk(v, path .. "." .. tostring(k)) end
    end
  end
  walk(h, "$")
  return json.encode(h) .. "\n" .. table.concat(types, " ")
end

local function assert_same_history(want, got)
  assert.is_table(got)
  assert.same(want, got)
  assert.equal(fingerprint(want), fingerprint(got))
end

-- Saved by one process, loaded by another, and the other way round (with
-- the integer types checked over there); `make` is Lua source for a new
-- store on the same files as `s`.
local function check_persistence(make, s)
  local code = "local s = assert(" .. make .. ")\n" ..
    "local history = (function() " .. HISTORY_SRC .. " end)()\n"
  local ids = { "ticket-4471", "a\0b", "o'brien", "../../etc/passwd", "ユーザー" }
  local out = helpers.run_lua(code .. [[
    for _, id in ipairs{ "ticket-4471", "a\0b", "o'brien", "../../etc/passwd", "ユーザー" } do
      assert(s:save(id, history))
    end
    s:close()
    print("saved")
  ]])
  assert.equal("saved\n", out)
  for _, id in ipairs(ids) do assert_same_history(history(), assert(s:load(id))) end
  assert.is_nil(s:load("a"))
  assert.is_true(s:save("from-parent", history()))
  out = helpers.run_lua(code .. [[
    local h = assert(s:load("from-parent"))
    print(require("tests.helpers").math_type(h[8].meta.tokens), require("slm.json").encode(h) == require("slm.json").encode(history))
    assert(s:delete("ユーザー"))
    s:close()
  ]])
  assert.equal("integer\ttrue\n", out)
  assert.is_nil(s:load("ユーザー"))
end

-- Ids that must each be a session of their own and come back as they went.
local HOSTILE = {
  "../../etc/passwd", "/etc/passwd", "a/b/c", ".", "..", "./.", "~root",
  "a\0b", "a\0c", "a", "\0", "nul at end\0",
  "o'brien", "x'); DROP TABLE slm_sessions; --", "\"double\"", "back\\slash",
  "%s%d%%", "\n\r\t", " ", "CON", "NUL.txt",
  "ユーザー@例え.jp", "😀", "user@example.com", "550e8400-e29b-41d4-a716-446655440000",
  "\255\254 not UTF-8 \192\128", ("long id "):rep(12500), -- 100 KB
}

------------------------------------------------------------------ the contract

local STORES = {
  memory = function() return store.memory() end,
  file = function(root)
    local dir = root .. "/sessions"
    assert(os.execute("mkdir " .. q(dir)))
    return assert(store.file{ dir = dir })
  end,
  sqlite = function(root) return assert(store.sqlite{ path = root .. "/sessions.db" }) end,
}

for _, kind in ipairs{ "memory", "file", "sqlite" } do
  if kind == "sqlite" and not have_sqlite then
    describe("store.sqlite keeps the contract:", function() it("", function() pending(NEEDS_SQLITE) end) end)
    break
  end
  describe("store." .. kind .. " keeps the contract:", function()
    local root, s
    before_each(function()
      root = mktemp()
      s = STORES[kind](root)
    end)
    after_each(function()
      if s then s:close() end
      rmrf(root)
    end)

    it("load of an id never saved is nil, with no error", function()
      local h, err = s:load("nobody")
      assert.is_nil(h)
      assert.is_nil(err)
    end)

    it("a realistic history comes back equal: parts lists, tool calls, unicode, null, [], integers", function()
      assert.is_true(s:save("ticket-4471", history()))
      local got = assert(s:load("ticket-4471"))
      assert_same_history(history(), got)
      assert.equal("integer", helpers.math_type(got[8].meta.tokens))
      assert.equal("integer", helpers.math_type(got[8].meta.ts))
      assert.equal("float", helpers.math_type(got[8].meta.cost))
      assert.equal(json.null, got[3].content)
      assert.equal("[]", json.encode(got[7].content))
      assert.equal("[]", json.encode(got[6].tool_calls))
      assert.equal("{}", json.encode(got[8].meta.none))
      assert.equal("Ваш заказ отправлен.\n\tTracking: \"RU123\" \\ ok \0 end", got[6].content)
    end)

    it("a history of zero messages comes back as an empty list", function()
      assert.is_true(s:save("empty", {}))
      local got = assert(s:load("empty"))
      assert.same({}, got)
      assert.equal(0, #got)
      assert.equal("[]", json.encode(got))
      assert.is_true(s:save("empty-marked", json.array()))
      assert.equal("[]", json.encode(assert(s:load("empty-marked"))))
    end)

    it("what JSON cannot tell apart comes back as documented", function()
      local marked = json.object({ a = 1 })
      assert.is_true(s:save("u", { { role = "user", n = 2.0, big = 2^60, huge = 9007199254740993,
        negzero = -0.0, obj = json.object(), marked = marked, lua_nil = nil } }))
      local got = assert(s:load("u"))[1]
      assert.equal(2, got.n)
      assert.equal("integer", helpers.math_type(got.n))    -- an integral float: an integer
      -- beyond 2^53, within 64 bits: exact integers (JSON writes 2^60 as
      -- the integer it is); under LuaJIT every number is a double, rounded
      assert.equal(2^60, got.big)
      if helpers.float_subtype then
        assert.equal("integer", math.type(got.big))
        assert.equal(9007199254740993, got.huge)
        assert.equal("integer", math.type(got.huge))
      else
        assert.equal(9007199254740992, got.huge)
      end
      if helpers.float_subtype then assert.equal("float", math.type(got.negzero)) end
      assert.equal(-math.huge, 1 / got.negzero)            -- -0 stays a float -0
      assert.same({}, got.obj)                             -- an empty object: a plain empty table ({} again)
      assert.equal("{}", json.encode(got.obj))
      assert.is_nil(getmetatable(got.marked))              -- object marks are not kept (not needed)
      assert.same({ a = 1 }, got.marked)
      assert.is_nil(got.lua_nil)
      -- loaded lists carry slm.json's array mark only where they are empty, and at the top
      local h = assert(s:load("u"))
      assert.equal(json.array_mt, getmetatable(h))
    end)

    it("a save replaces the history; a shorter one leaves nothing of the longer", function()
      assert.is_true(s:save("u", history()))
      assert.is_true(s:save("u", { { role = "user", content = "short" } }))
      assert.same({ { role = "user", content = "short" } }, assert(s:load("u")))
      assert.is_true(s:save("u", {}))
      assert.same({}, assert(s:load("u")))
    end)

    it("what was saved is a copy: changing the tables afterwards changes nothing stored", function()
      local h = history()
      assert.is_true(s:save("u", h))
      h[1].content = "changed"
      h[#h + 1] = { role = "user", content = "more" }
      local got = assert(s:load("u"))
      assert_same_history(history(), got)
      got[1].content = "changed too"
      assert_same_history(history(), assert(s:load("u")))
    end)

    it("delete removes the session; deleting one that does not exist is fine", function()
      assert.is_true(s:save("u", history()))
      assert.is_true(s:save("other", { { role = "user", content = "stays" } }))
      assert.is_true(s:delete("u"))
      assert.is_nil(s:load("u"))
      assert.is_true(s:delete("u"))
      assert.is_true(s:delete("never-saved"))
      assert.same({ { role = "user", content = "stays" } }, assert(s:load("other")))
    end)

    it("many ids are as many sessions", function()
      for i = 1, 300 do
        assert.is_true(s:save("user-" .. i, { { role = "user", content = "message " .. i, n = i } }))
      end
      for i = 1, 300, 2 do assert.is_true(s:delete("user-" .. i)) end
      for i = 1, 300 do
        local got = s:load("user-" .. i)
        if i % 2 == 1 then
          assert.is_nil(got)
        else
          assert.same({ { role = "user", content = "message " .. i, n = i } }, got)
          assert.equal("integer", helpers.math_type(got[1].n))
        end
      end
    end)

    it("hostile ids (traversal, NUL, quotes, unicode, bytes, 100 KB) are sessions of their own", function()
      for i, id in ipairs(HOSTILE) do
        assert.is_true(s:save(id, { { role = "user", content = "session " .. i } }), "save #" .. i)
      end
      for i, id in ipairs(HOSTILE) do
        assert.same({ { role = "user", content = "session " .. i } }, s:load(id), "load #" .. i)
      end
      for i = 1, #HOSTILE, 3 do assert.is_true(s:delete(HOSTILE[i])) end
      for i, id in ipairs(HOSTILE) do
        if i % 3 == 1 then assert.is_nil(s:load(id)) else assert.is_table(s:load(id)) end
      end
    end)

    it("a history JSON cannot carry is nil, err naming the place, never a raise, and nothing is stored", function()
      local h, err = s:save("u", { { role = "user", content = "bad \255 byte" } })
      assert.is_nil(h)
      assert.matches("^slm%.store: ", err)
      assert.matches("cannot save: the history cannot be written as JSON %(invalid UTF%-8 at byte 5 of the string at %$%[1%]%.content%)", err)
      assert.not_matches("bad", err)
      h, err = s:save("u", { { role = "user", content = "x", f = print } })
      assert.is_nil(h)
      assert.matches("cannot encode a function at %$%[1%]%.f", err)
      h, err = s:save("u", { { role = "user", n = 0 / 0 } })
      assert.is_nil(h)
      assert.matches("NaN", err)
      assert.is_nil(s:load("u"))
    end)

    it("misuse raises naming the argument", function()
      assert.error_matches(function() s:load() end, "slm.store: load: the session id must be a string, got nil", 1, true)
      assert.error_matches(function() s:load(42) end, "slm.store: load: the session id must be a string, got number", 1, true)
      assert.error_matches(function() s:load("") end, "slm.store: load: the session id must not be empty", 1, true)
      assert.error_matches(function() s:delete({}) end, "slm.store: delete: the session id must be a string, got table", 1, true)
      assert.error_matches(function() s:save(1, {}) end, "slm.store: save: the session id must be a string", 1, true)
      assert.error_matches(function() s:save("u") end,
        "slm.store: save: the history must be a list of message tables, got nil", 1, true)
      assert.error_matches(function() s:save("u", "hello") end,
        "slm.store: save: the history must be a list of message tables, got string", 1, true)
      assert.error_matches(function() s:save("u", { "hello" }) end,
        "slm.store: save: the history must be a list of message tables (history[1] is a string)", 1, true)
      assert.error_matches(function() s:save("u", { role = "user", content = "hi" }) end,
        "slm.store: save: the history must be a list of message tables (it has the key \"", 1, true)
      assert.error_matches(function() s:save("u", { [1] = {}, [3] = {} }) end,
        "slm.store: save: the history must be a list of message tables (history[2] is missing)", 1, true)
      assert.error_matches(function() s:save("u", { [0] = {} }) end,
        "(it has the key 0)", 1, true)
      -- the error is the caller's line, not the store's
      local ok, err = pcall(function() s:save("u", 5) end)
      assert.is_false(ok)
      assert.matches("store_spec%.lua:%d+: slm%.store: save:", err)
      assert.is_nil(s:load("u"))
    end)

    it("close is idempotent; a closed store raises", function()
      assert.is_true(s:save("u", {}))
      s:close()
      s:close()
      assert.error_matches(function() s:load("u") end, "slm.store: load on a closed " .. kind .. " store", 1, true)
      assert.error_matches(function() s:save("u", {}) end, "slm.store: save on a closed", 1, true)
      assert.error_matches(function() s:delete("u") end, "slm.store: delete on a closed", 1, true)
      -- and a to-be-closed variable closes it (Lua 5.4)
      assert(os.execute("mkdir " .. q(root .. "/second")))
      local other = STORES[kind](root .. "/second")
      if _VERSION == "Lua 5.4" then
        assert(load("local s = ...; do local c <close> = s end"))(other)
      else
        other:close() -- LuaJIT has no to-be-closed variables
      end
      assert.error_matches(function() other:load("u") end, "on a closed", 1, true)
    end)
  end)
end

------------------------------------------------------------------ the interface

describe("slm.store", function()
  it("loads without luasql (the SQLite store needs it only when made)", function()
    local out = helpers.run_lua([[
      -- cjson and slm.core loaded, then only slm.core's directory on the C
      -- path: luasql is not found
      require "cjson"
      package.cpath = package.searchpath("slm.core", package.cpath):gsub("slm/core%.so$", "?.so")
      local store = require "slm.store"
      local s = store.memory()
      assert(s:save("u", {}))
      local db, err = store.sqlite{ path = "/nonexistent/x.db" }
      print(db, err)
    ]])
    assert.matches("^nil\tslm%.store: sqlite store /nonexistent/x%.db: needs luasql%.sqlite3 %(Debian package lua%-sql%-sqlite3%): module 'luasql%.sqlite3' not found", out)
  end)

  it("is_store tells a store apart: any table with load, save and delete", function()
    assert.is_true(store.is_store(store.memory()))
    local mine = { load = function() end, save = function() end, delete = function() end }
    assert.is_true(store.is_store(mine))
    assert.is_false(store.is_store({ load = print, save = print }))
    assert.is_false(store.is_store("memory"))
    assert.is_false(store.is_store(nil))
  end)

  it("encode and decode give a store of one's own the same document and rules", function()
    local text = assert(store.encode("user@example.com", history()))
    assert.is_string(text)
    assert.matches('^{"empty_arrays":%[', text)
    assert.matches('"id":"user@example%.com","slm_store":1}$', text)
    assert_same_history(history(), assert(store.decode(text, "user@example.com")))
    -- the document names its session: another id's is refused
    local h, err = store.decode(text, "someone else")
    assert.is_nil(h)
    assert.equal("corrupt: the document belongs to another session id", err)
    -- an id that is not UTF-8 is kept as hex
    text = assert(store.encode("\255id", {}))
    assert.equal('{"history":[],"id_hex":"ff6964","slm_store":1}', text)
    assert.same({}, store.decode(text, "\255id"))
    -- the same content gives the same bytes (keys and empty-array paths sorted)
    assert.equal(store.encode("u", history()), store.encode("u", history()))
    assert.error_matches(function() store.encode("u", "x") end, "slm.store: encode: the history must be a list", 1, true)
    assert.error_matches(function() store.decode("{}", nil) end, "slm.store: decode: the session id must be a string", 1, true)
  end)

  it("decode reports every kind of damage as corrupt, never as an empty history", function()
    local good = assert(store.encode("u", history()))
    local cases = {
      [""] = "corrupt: not JSON",
      [good:sub(1, math.floor(#good / 2))] = "corrupt: not JSON",
      ["null"] = "corrupt: not a session document",
      ["[]"] = "corrupt: not a session document",
      ['{"history":[]}'] = "corrupt: not a session document",
      ['{"history":[],"id":"u","slm_store":2}'] = "format this version does not read",
      ['{"history":{"a":1},"id":"u","slm_store":1}'] = "corrupt: the history is not a list",
      ['{"history":[1],"id":"u","slm_store":1}'] = "corrupt: the history is not a list",
      ['{"history":"x","id":"u","slm_store":1}'] = "corrupt: no history list",
      ['{"id":"u","slm_store":1}'] = "corrupt: no history list",
      ['{"empty_arrays":[[1,"x"]],"history":[{}],"id":"u","slm_store":1}'] = "corrupt: bad empty_arrays",
      ['{"empty_arrays":[[]],"history":[{}],"id":"u","slm_store":1}'] = "corrupt: bad empty_arrays",
      ['{"history":[],"id_hex":"zz","slm_store":1}'] = "belongs to another session",
    }
    for text, why in pairs(cases) do
      local h, err = store.decode(text, "u")
      assert.is_nil(h, text)
      assert.matches(why, err, 1, true)
    end
  end)

  it("options are checked: unknown ones and bad values raise", function()
    assert.error_matches(function() store.memory{ size = 1 } end, "slm.store: store.memory: unknown option 'size'", 1, true)
    assert.error_matches(function() store.file() end, "slm.store: store.file: option 'dir' must be a non-empty string", 1, true)
    assert.error_matches(function() store.file{ dir = 1 } end, "option 'dir' must be a non-empty string", 1, true)
    assert.error_matches(function() store.file{ dir = "/tmp", mode = "x" } end, "slm.store: store.file: unknown option 'mode'", 1, true)
    assert.error_matches(function() store.file("/tmp") end, "slm.store: store.file: expected an options table", 1, true)
    assert.error_matches(function() store.sqlite{} end, "slm.store: store.sqlite: option 'path' must be a non-empty string", 1, true)
    assert.error_matches(function() store.sqlite{ path = "x.db", busy_timeout = -1 } end,
      "option 'busy_timeout' must be a number of seconds", 1, true)
    assert.error_matches(function() store.sqlite{ path = "x.db", busy_timeout = "5" } end,
      "option 'busy_timeout' must be a number of seconds", 1, true)
  end)
end)

describe("core.sha256", function()
  it("matches FIPS 180-4's and sha256sum's digests, at every padding boundary", function()
    local sha = core.sha256
    assert.equal("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855", sha(""))
    assert.equal("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", sha("abc"))
    assert.equal("248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1",
      sha("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"))
    assert.equal("cf5b16a778af8380036ce59e7b0492370b249b11e8f07a51afac45037afee9d1",
      sha("abcdefghbcdefghicdefghijdefghijkefghijklfghijklmghijklmnhijklmnoijklmnopjklmnopqklmnopqrlmnopqrsmnopqrstnopqrstu"))
    assert.equal("59b271ae1bbcb1d31d41929817f4b16fb439eb4f31520b5ad1d5ce98920a7138", sha("a\0b"))
    local want = {
      [55] = "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318",
      [56] = "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a",
      [63] = "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34",
      [64] = "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb",
      [65] = "635361c48bb9eab14198e76ea8ab7f1a41685d6ad62aa9146d301d4f17eb0ae0",
      [119] = "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb",
      [120] = "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c",
      [1000000] = "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0",
    }
    for n, digest in pairs(want) do assert.equal(digest, sha(("a"):rep(n)), n .. " bytes") end
    assert.error_matches(function() sha(nil) end, "bad argument #1 to '[%w.]+' %(string expected, got nil%)")
  end)
end)

------------------------------------------------------------------ files

-- Lua code for another process that makes io.open's files for writing
-- misbehave once `ARMED = true`: `how` is "crash" (write half the data,
-- then the process dies) or "full" (a write fails with ENOSPC).
local function sabotage(how)
  return ([[
    local real_open, how = io.open, %q
    ARMED = false
    io.open = function(path, mode)
      local f, e, c = real_open(path, mode)
      if not (ARMED and f and mode and mode:find("w")) then return f, e, c end
      return {
        write = function(self, s)
          if how == "full" then return nil, path .. ": No space left on device", 28 end
          f:write(s:sub(1, math.floor(#s / 2))); f:flush()
          os.exit(3, false)
        end,
        flush = function() return f:flush() end,
        close = function() return f:close() end,
      }
    end
  ]]):format(how)
end

-- What another process prints when its save("u", a message whose content
-- is the Lua expression `content`) into `dir` meets sabotage(how).
local function sabotaged_save(how, dir, content)
  return helpers.run_lua(sabotage(how) .. ([[
    local s = assert(require("slm.store").file{ dir = %q })
    ARMED = true
    print(s:save("u", { { role = "user", content = %s } }))
  ]]):format(dir, content))
end

describe("store.file", function()
  local root, dir, s
  before_each(function()
    root = mktemp()
    dir = root .. "/sessions"
    assert(os.execute("mkdir " .. q(dir)))
    s = assert(store.file{ dir = dir })
  end)
  after_each(function()
    s:close()
    rmrf(root)
  end)

  local function file_of(id) return dir .. "/" .. core.sha256(id) .. ".json" end

  it("names each file by the SHA-256 of its id and keeps the id inside", function()
    assert.is_true(s:save("user@example.com", history()))
    assert.same({ "sessions", "sessions/" .. core.sha256("user@example.com") .. ".json" }, tree(root))
    local doc = json.decode(helpers.read_file(file_of("user@example.com")))
    assert.equal("user@example.com", doc.id)
    assert.equal(1, doc.slm_store)
    assert.equal(8, #doc.history)
  end)

  it("hostile ids never leave the directory: only <64 hex>.json files appear, in it", function()
    for i, id in ipairs(HOSTILE) do assert.is_true(s:save(id, { { role = "user", content = "s" .. i } })) end
    local files = tree(root)
    assert.equal(1 + #HOSTILE, #files)
    assert.equal("sessions", files[1])
    for i = 2, #files do assert.matches("^sessions/%x+%.json$", files[i]) end
    for _, id in ipairs(HOSTILE) do
      local f = io.open(file_of(id), "rb")
      assert.is_not_nil(f, "no file for a hostile id")
      f:close()
    end
    -- nothing was written next to the directory or outside root
    assert.is_nil(io.open(root .. "/etc/passwd"))
    assert.is_nil(io.open(dir .. "/../../etc/passwd.json"))
  end)

  it("persists across processes: saved by one, loaded by another, deleted by a third", function()
    check_persistence(("require('slm.store').file{ dir = %q }"):format(dir), s)
  end)

  it("a crash in the middle of a save leaves the old session whole (write, then rename)", function()
    assert.is_true(s:save("u", history()))
    assert.equal("", sabotaged_save("crash", dir, '("new "):rep(50000)'))
    assert_same_history(history(), assert(s:load("u")))
    -- the temporary file the crash left is ignored, and is not the session
    local files = tree(root)
    assert.equal(3, #files)
    assert.matches("^sessions/%." .. core.sha256("u") .. "%.%x+%.tmp$", files[2])
    assert.is_true(s:save("u", { { role = "user", content = "after the crash" } }))
    assert.same({ { role = "user", content = "after the crash" } }, assert(s:load("u")))
  end)

  it("a reader never sees half a save: loads while another process saves big histories", function()
    local big = { { role = "user", content = ("A"):rep(400000) } }
    assert.is_true(s:save("u", big))
    local done = root .. "/writer-done"
    local p = helpers.spawn_lua(([[
      local s = assert(require("slm.store").file{ dir = %q })
      for i = 1, 40 do
        local c = (i %% 2 == 0 and "A" or "B"):rep(400000 + i)
        assert(s:save("u", { { role = "user", content = c } }))
      end
      io.open(%q, "w"):close()
      print("wrote")
    ]]):format(dir, done))
    local loads, errs = 0, {}
    local deadline = core.now() + 30
    repeat
      local h, err = s:load("u")
      loads = loads + 1
      if not h then errs[#errs + 1] = err
      else assert.matches("^[AB]+$", h[1].content) end
      local f = io.open(done)
      if f then f:close() end
    until f or core.now() > deadline
    assert.equal("wrote\n", p:read("a"))
    p:close()
    assert.same({}, errs)
    assert.is_true(loads > 1)
  end)

  it("leftover temporary files (a crash before the rename) are ignored", function()
    assert.is_true(s:save("u", history()))
    local good = helpers.read_file(file_of("u"))
    write(dir .. "/." .. core.sha256("u") .. ".deadbeef.tmp", good:sub(1, 100))
    write(dir .. "/." .. core.sha256("v") .. ".deadbeef.tmp", good)
    assert_same_history(history(), assert(s:load("u")))
    assert.is_nil(s:load("v"))
    assert.is_true(s:save("v", {}))
    assert.same({}, assert(s:load("v")))
  end)

  it("a truncated, empty or foreign session file is reported, never read as empty", function()
    assert.is_true(s:save("u", { { role = "user", content = "secret text 12345" } }))
    local good = helpers.read_file(file_of("u"))
    local function check(data, why)
      write(file_of("u"), data)
      local h, err = s:load("u")
      assert.is_nil(h)
      local want = "slm.store: file store " .. file_of("u") .. ": " .. why
      assert.equal(want, err:sub(1, #want))
      assert.not_matches("secret", err)
    end
    check(good:sub(1, #good - 10), "corrupt: not JSON")   -- cut by a writer of an older version
    check("", "corrupt: not JSON")                         -- cut to nothing (power loss)
    check("\0\0\0\0", "corrupt: not JSON")
    check('{"a":1}', "corrupt: not a session document")
    -- another session's file copied over this one's
    assert.is_true(s:save("w", { { role = "user", content = "secret of w" } }))
    check(helpers.read_file(file_of("w")), "corrupt: the document belongs to another session id")
    -- the damage is reported until the session is saved or deleted
    assert.is_true(s:save("u", {}))
    assert.same({}, assert(s:load("u")))
  end)

  it("a write that fails (disk full) is nil, err; the old session stays, no temporary file is left", function()
    assert.is_true(s:save("u", history()))
    assert.equal("nil\tslm.store: file store " .. file_of("u") .. ": cannot save: No space left on device\n",
      sabotaged_save("full", dir, '"secret new text"'))
    assert_same_history(history(), assert(s:load("u")))
    assert.same({ "sessions", "sessions/" .. core.sha256("u") .. ".json" }, tree(root))
  end)

  it("a missing directory is a clear error, at creation and later", function()
    local none, err = store.file{ dir = root .. "/nope" }
    assert.is_nil(none)
    assert.equal("slm.store: file store " .. root .. "/nope: no such directory (create it first: the file store does not)", err)
    local f = root .. "/plain-file"
    write(f, "x")
    none, err = store.file{ dir = f }
    assert.is_nil(none)
    assert.matches("^slm%.store: file store " .. f:gsub("%p", "%%%0") .. ": cannot create files there: Not a directory$", err)
    -- the directory goes away under a store
    assert.is_true(s:save("u", {}))
    os.execute("rm -rf " .. q(dir))
    local h
    h, err = s:load("u")
    assert.is_nil(h)
    assert.equal("slm.store: file store " .. file_of("u") .. ": cannot load: the directory " .. dir .. " has gone", err)
    h, err = s:save("u", {})
    assert.is_nil(h)
    assert.matches("^slm%.store: file store .*: cannot save: No such file or directory$", err)
    h, err = s:delete("u")
    assert.is_true(h) -- nothing to delete
  end)

  it("a trailing slash in dir changes nothing", function()
    local s2 = assert(store.file{ dir = dir .. "//" })
    assert.is_true(s2:save("u", { { role = "user", content = "x" } }))
    assert.same({ { role = "user", content = "x" } }, s:load("u"))
    assert.equal(file_of("u"), s2:path("u"))
  end)
end)

------------------------------------------------------------------ SQLite

describe("store.sqlite", function()
  if not have_sqlite then it("", function() pending(NEEDS_SQLITE) end) return end
  local root, path, s
  before_each(function()
    root = mktemp()
    path = root .. "/sessions.db"
    s = assert(store.sqlite{ path = path })
  end)
  after_each(function()
    if s then s:close() end
    rmrf(root)
  end)

  -- Another connection to the database, straight through luasql.
  local function raw()
    local env = require("luasql.sqlite3").sqlite3()
    local conn = assert(env:connect(path))
    return conn, function() conn:close(); env:close() end
  end

  local function rows(conn, sql)
    local cur = assert(conn:execute(sql))
    local out = {}
    local r = cur:fetch({}, "a")
    while r do
      local copy = {}
      for k, v in pairs(r) do copy[k] = v end
      out[#out + 1] = copy
      r = cur:fetch(r, "a")
    end
    cur:close()
    return out
  end

  it("keeps slm_sessions(id TEXT PRIMARY KEY, data TEXT NOT NULL, updated_at INTEGER NOT NULL), in WAL mode", function()
    assert.is_true(s:save("user@example.com", history()))
    local conn, close = raw()
    local cols = rows(conn, "PRAGMA table_info(slm_sessions)")
    assert.same({
      { cid = 0, name = "id", type = "TEXT", notnull = 0, pk = 1 },
      { cid = 1, name = "data", type = "TEXT", notnull = 1, pk = 0 },
      { cid = 2, name = "updated_at", type = "INTEGER", notnull = 1, pk = 0 },
    }, (function()
      for _, c in ipairs(cols) do c.dflt_value = nil end
      return cols
    end)())
    assert.equal("wal", rows(conn, "PRAGMA journal_mode")[1].journal_mode)
    local r = rows(conn, "SELECT id, typeof(id) AS t, data, updated_at FROM slm_sessions")
    assert.equal(1, #r)
    assert.equal("user@example.com", r[1].id)
    assert.equal("text", r[1].t)
    assert.equal(assert(store.encode("user@example.com", history())), r[1].data)
    assert.is_true(math.abs(r[1].updated_at - os.time()) < 60)
    close()
  end)

  it("ids reach SQL only as hex: quotes, NUL bytes and an injection are stored as they are", function()
    for i, id in ipairs(HOSTILE) do assert.is_true(s:save(id, { { role = "user", content = "s" .. i } })) end
    local conn, close = raw()
    assert.equal(#HOSTILE, rows(conn, "SELECT count(*) AS n FROM slm_sessions")[1].n)
    local ids = {}
    for _, r in ipairs(rows(conn, "SELECT id FROM slm_sessions")) do ids[r.id] = true end
    for _, id in ipairs(HOSTILE) do assert.is_true(ids[id], "the id column holds the id's bytes") end
    close()
    assert.same({ { role = "user", content = "s14" } }, s:load("x'); DROP TABLE slm_sessions; --"))
    assert.same({ { role = "user", content = "s8" } }, s:load("a\0b"))
    assert.same({ { role = "user", content = "s10" } }, s:load("a"))
  end)

  it("persists across processes: saved by one, loaded by another, deleted by a third", function()
    check_persistence(("require('slm.store').sqlite{ path = %q }"):format(path), s)
  end)

  it("processes writing one database at once all succeed: the busy timeout waits out the lock", function()
    s:close()
    s = nil
    os.remove(path) -- the writers create it together, too
    local go = root .. "/go"
    local code = [[
      local now = require("slm.core").now
      local deadline = now() + 20
      while not io.open(%q) and now() < deadline do end
      local store = require "slm.store"
      local s, err = store.sqlite{ path = %q }
      if not s then print("open: " .. err) return end
      local errs, text = 0, ("x"):rep(20000)
      for i = 1, 150 do
        local ok, e = s:save(%q .. (i %% 3), { { role = "user", content = text .. i } })
        if not ok then errs = errs + 1; if errs == 1 then print(e) end end
        local h, le = s:load("w1-" .. (i %% 3))
        if le then errs = errs + 1; if errs == 1 then print(le) end end
      end
      s:close()
      print("errors " .. errs)
    ]]
    local procs = {}
    for w = 1, 3 do procs[w] = helpers.spawn_lua(code:format(go, path, "w" .. w .. "-")) end
    write(go, "")
    local outs = {}
    for w = 1, 3 do
      outs[w] = procs[w]:read("a")
      procs[w]:close()
    end
    assert.same({ "errors 0\n", "errors 0\n", "errors 0\n" }, outs)
    s = assert(store.sqlite{ path = path })
    for w = 1, 3 do
      for i = 0, 2 do
        local h = assert(s:load("w" .. w .. "-" .. i))
        assert.matches("^x+%d+$", h[1].content)
      end
    end
  end)

  it("processes opening a new database at the same moment all get a store (the switch to WAL is retried)", function()
    s:close()
    s = nil
    for round = 1, 4 do
      local db, go = root .. "/fresh" .. round .. ".db", root .. "/go" .. round
      local procs = {}
      for w = 1, 6 do
        procs[w] = helpers.spawn_lua(([[
          local now = require("slm.core").now
          local deadline = now() + 20
          while not io.open(%q) and now() < deadline do end
          local s, err = require("slm.store").sqlite{ path = %q }
          if not s then print(err) return end
          local ok, serr = s:save("w%d", {})
          print(ok or serr)
        ]]):format(go, db, w))
      end
      write(go, "")
      for w = 1, 6 do
        assert.equal("true\n", procs[w]:read("a"), "round " .. round .. ", process " .. w)
        procs[w]:close()
      end
    end
  end)

  it("a lock held longer than the busy timeout is nil, err; readers are not held up (WAL)", function()
    s:close()
    s = assert(store.sqlite{ path = path, busy_timeout = 0.2 })
    assert.is_true(s:save("u", history()))
    local conn, close = raw()
    assert(conn:execute("BEGIN EXCLUSIVE"))
    local t0 = core.now()
    local ok, err = s:save("u", { { role = "user", content = "secret" } })
    local waited = core.now() - t0
    assert.is_nil(ok)
    assert.equal("slm.store: sqlite store " .. path .. ": cannot save: database is locked", err)
    assert.is_true(waited >= 0.15, "waited " .. waited .. " s")
    assert.is_true(waited < 5, "waited " .. waited .. " s")
    assert_same_history(history(), assert(s:load("u")))
    ok, err = s:delete("u")
    assert.is_nil(ok)
    assert.matches("cannot delete: database is locked$", err)
    assert(conn:execute("ROLLBACK"))
    close()
    assert.is_true(s:save("u", {}))
    assert.same({}, assert(s:load("u")))
  end)

  it("a corrupt row is reported, never read as empty", function()
    assert.is_true(s:save("u", { { role = "user", content = "secret text 12345" } }))
    assert.is_true(s:save("w", { { role = "user", content = "secret of w" } }))
    local conn, close = raw()
    local function check(set, why)
      assert(conn:execute("UPDATE slm_sessions SET data = " .. set .. " WHERE id = 'u'"))
      local h, err = s:load("u")
      assert.is_nil(h)
      local want = "slm.store: sqlite store " .. path .. ": " .. why
      assert.equal(want, err:sub(1, #want))
      assert.not_matches("secret", err)
    end
    check("substr(data, 1, 30)", "corrupt: not JSON")
    check("''", "corrupt: not JSON")
    check("42", "corrupt: not a session document") -- (TEXT affinity: the number is stored as text)
    check("X'00ff'", "corrupt: not JSON")
    check("'[]'", "corrupt: not a session document")
    check("(SELECT data FROM slm_sessions WHERE id = 'w')", "corrupt: the document belongs to another session id")
    close()
  end)

  it("a file that is not a database, or a path that cannot be opened, is nil, err at creation", function()
    local bad = root .. "/garbage.db"
    write(bad, ("this is not a database "):rep(100))
    local db, err = store.sqlite{ path = bad }
    assert.is_nil(db)
    assert.equal("slm.store: sqlite store " .. bad .. ": cannot open: file is not a database", err)
    db, err = store.sqlite{ path = root .. "/no/such/dir/x.db" }
    assert.is_nil(db)
    assert.equal("slm.store: sqlite store " .. root .. "/no/such/dir/x.db: cannot open: unable to open database file", err)
  end)

  it("close closes the connection (the last one out removes the WAL file), once", function()
    assert.is_true(s:save("u", {}))
    assert.is_not_nil(io.open(path .. "-wal"))
    s:close()
    s:close()
    assert.is_nil(io.open(path .. "-wal"))
    s = assert(store.sqlite{ path = path })
    assert.same({}, assert(s:load("u")))
  end)
end)
