-- slm.store: where a conversation's history is kept between turns (the
-- support bot keeps one history per session id).  Three stores behind one
-- interface:
--
--   store.memory()                       this Lua state (lost when it ends)
--   store.file{ dir = "/var/lib/app/sessions" }   one file per session
--   store.sqlite{ path = "/var/lib/app/sessions.db" }  one SQLite table
--                                        (Debian's lua-sql-sqlite3)
--
--   s:load(id)          -> history | nil (no such session) | nil, err
--   s:save(id, history) -> true | nil, err
--   s:delete(id)        -> true | nil, err   (a missing session: true)
--   s:close()           idempotent; also __close
--
-- A store of your own (Redis, a shared dict, a database of yours) is any
-- table with those load, save and delete methods, the same returns and the
-- same errors; store.encode and store.decode give it the same document and
-- the same round-trip rules as ours; store.is_store tells one apart.
--
-- A session id is any non-empty string (a user id, an e-mail, a UUID, text
-- with slashes, dots, NUL bytes, any bytes): the file store names a file by
-- the SHA-256 of the id, never by the id, and keeps the id inside the file;
-- the SQLite store puts the id into SQL only as a hex literal.  A history is
-- a list of message tables (role, content as a string or a list of parts,
-- tool_calls, tool_call_id, name, anything else JSON can carry).
--
-- Errors: misuse (an id that is not a non-empty string, a history that is
-- not a list of tables, an unknown option, a closed store) raises, naming
-- the argument.  Anything that fails at run time (I/O, a locked database,
-- a corrupt file or row, a history that JSON cannot carry, as for
-- client:chat) returns nil and a string "slm.store: ..." that says what
-- failed and where (the directory, the file, the database), never the
-- history and never the id (ids are often e-mails): a session file is named
-- by its hash.  A corrupt session is an error, never an empty history.
--
-- The file and SQLite stores do blocking I/O: they are for scripts and
-- batch jobs.  Inside OpenResty they would block the worker: there
-- slm.shdict.store (a lua_shared_dict) and the Redis store, built on
-- M.class below, keep sessions every worker sees.
local core = require "slm.core"
local json = require "slm.json"

local type, next, pairs, tostring, setmetatable, getmetatable, error, pcall, require =
  type, next, pairs, tostring, setmetatable, getmetatable, error, pcall, require
local tonumber, floor = tonumber, math.floor
local format, byte, char, concat, sort = string.format, string.byte, string.char, table.concat, table.sort
local unpack = table.unpack or unpack -- (LuaJIT)
local open, remove, rename, time, random = io.open, os.remove, os.rename, os.time, math.random
local sha256, now = core.sha256, core.now
local encode, decode, null, ARRAY = json.encode, json.decode_exact, json.null, json.array_mt

local PREFIX = "slm.store: "
local FORMAT = 1   -- the document's "slm_store" field
local ENOENT = 2   -- errno of a missing file (Linux, the BSDs, macOS)

local M = {}

------------------------------------------------------------------ misuse

local function check_id(id, method)
  if type(id) ~= "string" then
    error(format("%s%s: the session id must be a string, got %s", PREFIX, method, type(id)), 3)
  end
  if id == "" then error(format("%s%s: the session id must not be empty", PREFIX, method), 3) end
end

-- A list of tables: keys exactly 1..n, every value a table (read raw, as
-- the encoder reads it).
local function check_history(h, method)
  if type(h) ~= "table" then
    error(format("%s%s: the history must be a list of message tables, got %s", PREFIX, method, type(h)), 3)
  end
  local n = 0
  for k, v in next, h do
    if type(k) ~= "number" or k < 1 or k % 1 ~= 0 then
      error(format("%s%s: the history must be a list of message tables (it has the key %s)",
        PREFIX, method, type(k) == "string" and format("%q", k) or tostring(k)), 3)
    end
    if type(v) ~= "table" then
      error(format("%s%s: the history must be a list of message tables (history[%d] is a %s)",
        PREFIX, method, k, type(v)), 3)
    end
    n = n + 1
  end
  for i = 1, n do
    if h[i] == nil then
      error(format("%s%s: the history must be a list of message tables (history[%d] is missing)",
        PREFIX, method, i), 3)
    end
  end
end

local function check_open(self, method)
  if self.closed then error(format("%s%s on a closed %s", PREFIX, method, self.kind), 3) end
end

-- opts: nil or a table whose keys are all in `known`.
local function check_opts(opts, name, known)
  if opts == nil then return {} end
  if type(opts) ~= "table" then error(format("%sstore.%s: expected an options table", PREFIX, name), 3) end
  for k in pairs(opts) do
    if not known[k] then error(format("%sstore.%s: unknown option '%s'", PREFIX, name, tostring(k)), 3) end
  end
  return opts
end

------------------------------------------------------------------ the document

-- What every store keeps for a session, one JSON object (keys sorted):
--   {"empty_arrays":[[2,"content"]],"history":[...],"id":"...","slm_store":1}
-- "id" is the session id, or "id_hex" its bytes in hex when it is not
-- UTF-8.  "empty_arrays" (only when there are some) lists where the history
-- holds an empty array: lua-cjson decodes [] and {} alike, as an empty
-- table, which would then encode as {}; decode marks those places with
-- slm.json.array again.

local function is_empty_array(v)
  local t = type(v)
  if t == "table" then
    if next(v) ~= nil or getmetatable(v) == nil then return false end
  elseif t ~= "userdata" or v == null then
    return false -- (a light userdata: OpenResty's cjson.empty_array)
  end
  local ok, s = pcall(encode, v)
  return ok and s == "[]"
end

-- The JSON texts of the paths to the empty arrays below t, into out.
local function empty_arrays(t, path, depth, out)
  for k, v in next, t do
    local tv = type(v)
    if tv == "table" or tv == "userdata" then
      path[depth] = k
      if is_empty_array(v) then
        out[#out + 1] = encode(json.array({ unpack(path, 1, depth) }))
      elseif tv == "table" then
        empty_arrays(v, path, depth + 1, out)
      end
      path[depth] = nil
    end
  end
  return out
end

local function hex(s)
  return (s:gsub(".", function(c) return format("%02x", byte(c)) end))
end

local function unhex(s)
  if type(s) ~= "string" or #s % 2 ~= 0 or s:find("[^0-9a-f]") then return nil end
  return (s:gsub("..", function(h) return char(tonumber(h, 16)) end))
end

-- The text of id + history, or nil, err when JSON cannot carry the history.
-- (Misuse is the caller's to check: check_id, check_history.)
local function encode_doc(id, history)
  local ok, h = pcall(encode, next(history) == nil and json.array() or history)
  if not ok then
    return nil, "the history cannot be written as JSON (" .. tostring(h):gsub("^slm%.json: ", "") .. ")"
  end
  local idf
  local idok, idj = pcall(encode, id)
  if idok then idf = '"id":' .. idj else idf = '"id_hex":"' .. hex(id) .. '"' end
  local paths = next(history) ~= nil and empty_arrays(history, {}, 1, {}) or {}
  local ea = ""
  if #paths > 0 then
    sort(paths)
    ea = '"empty_arrays":[' .. concat(paths, ",") .. "],"
  end
  return "{" .. ea .. '"history":' .. h .. "," .. idf .. ',"slm_store":' .. FORMAT .. "}"
end

-- The history in `text`, checked to belong to `id`; nil, err (the reason,
-- without prefix or place) when it is not a session document of ours.
local function decode_doc(text, id)
  if type(text) ~= "string" then return nil, "corrupt: not a JSON text" end
  local ok, doc = pcall(decode, text)
  if not ok then
    return nil, "corrupt: not JSON (" .. tostring(doc) .. ")"
  end
  if type(doc) ~= "table" or doc.slm_store == nil then
    return nil, "corrupt: not a session document"
  end
  if doc.slm_store ~= FORMAT then
    return nil, "written in a format this version does not read (slm_store = " .. tostring(doc.slm_store) .. ")"
  end
  local owner = doc.id
  if owner == nil then owner = unhex(doc.id_hex) end
  if owner ~= id then return nil, "corrupt: the document belongs to another session id" end
  local h = doc.history
  if type(h) ~= "table" then return nil, "corrupt: no history list" end
  local n = 0
  for k, v in next, h do
    if type(k) ~= "number" or type(v) ~= "table" then return nil, "corrupt: the history is not a list of messages" end
    n = n + 1
  end
  if n ~= #h then return nil, "corrupt: the history is not a list of messages" end
  local ea = doc.empty_arrays
  if ea ~= nil then
    if type(ea) ~= "table" then return nil, "corrupt: bad empty_arrays" end
    for i = 1, #ea do
      local path, t = ea[i], h
      if type(path) ~= "table" or #path == 0 then return nil, "corrupt: bad empty_arrays" end
      for j = 1, #path - 1 do
        t = type(t) == "table" and t[path[j]] or nil
      end
      local last = path[#path]
      local v = type(t) == "table" and t[last] or nil
      if type(v) ~= "table" or next(v) ~= nil then return nil, "corrupt: bad empty_arrays" end
      setmetatable(v, ARRAY)
    end
  end
  return setmetatable(h, ARRAY)
end

--- store.encode(id, history) -> text | nil, err: the JSON document our stores
-- keep for a session; store.decode(text, id) -> history | nil, err: the
-- history back (err: "corrupt: ...").  For stores of your own.
function M.encode(id, history)
  check_id(id, "encode")
  check_history(history, "encode")
  return encode_doc(id, history)
end

function M.decode(text, id)
  check_id(id, "decode")
  return decode_doc(text, id)
end

--- Whether x can serve as a store: it has load, save and delete methods.
function M.is_store(x)
  local t = type(x)
  if t ~= "table" and t ~= "userdata" then return false end
  local ok, yes = pcall(function()
    return type(x.load) == "function" and type(x.save) == "function" and type(x.delete) == "function"
  end)
  return ok and yes
end

------------------------------------------------------------------ one shape

-- Each store has get(id) -> text | nil | nil, err; put(id, text) -> true |
-- nil, err; drop(id) -> true | nil, err; where(id) for its errors (the
-- file, the database); shut() for close.  These methods do the rest.
local function class(name, kind)
  local C = { kind = kind }
  C.__index = C
  C.__name = name

  function C:load(id)
    check_open(self, "load")
    check_id(id, "load")
    local text, err = self:get(id)
    if text == nil then
      if err == nil then return nil end
      return nil, PREFIX .. self:where(id) .. ": cannot load: " .. err
    end
    local h, why = decode_doc(text, id)
    if h == nil then return nil, PREFIX .. self:where(id) .. ": " .. why end
    return h
  end

  function C:save(id, history)
    check_open(self, "save")
    check_id(id, "save")
    check_history(history, "save")
    local text, err = encode_doc(id, history)
    if text == nil then return nil, PREFIX .. self:where(id) .. ": cannot save: " .. err end
    local ok, perr = self:put(id, text)
    if not ok then return nil, PREFIX .. self:where(id) .. ": cannot save: " .. perr end
    return true
  end

  function C:delete(id)
    check_open(self, "delete")
    check_id(id, "delete")
    local ok, err = self:drop(id)
    if not ok then return nil, PREFIX .. self:where(id) .. ": cannot delete: " .. err end
    return true
  end

  function C:close()
    if self.closed then return end
    self.closed = true
    if self.shut then self:shut() end
  end
  C.__close = C.close

  return C
end
-- For lua-slm's own stores elsewhere (slm.shdict, slm.redis): a class
-- whose instances define get, put, drop, where (and shut) get load, save,
-- delete and close with the checks and errors of the stores here.
M.class = class

------------------------------------------------------------------ memory

local Memory = class("slm.store.memory", "memory store")

--- store.memory() -> store: the documents in a table of this Lua state
-- (kept as JSON text, so that a history comes back as a copy, by the same
-- rules as from the other stores).
function M.memory(opts)
  check_opts(opts, "memory", {})
  return setmetatable({ docs = {} }, Memory)
end

function Memory:get(id) return self.docs[id] end
function Memory:put(id, text) self.docs[id] = text; return true end
function Memory:drop(id) self.docs[id] = nil; return true end
function Memory:where() return "memory store" end
function Memory:shut() self.docs = {} end

------------------------------------------------------------------ files

local File = class("slm.store.file", "file store")

-- The reason in a message of io.open/os.rename/os.remove ("path: reason").
local function reason(msg, path)
  msg = tostring(msg)
  if path and msg:sub(1, #path + 2) == path .. ": " then return msg:sub(#path + 3) end
  return msg
end

-- A name no other writer picks: this state's table address, the clock,
-- random bits (Lua 5.4 seeds math.random per process) and a counter.
local serial = 0
local function unique(self)
  serial = serial + 1
  local t = now()
  return format("%s%x%x%08x%x", tostring(self):match("0x(%x+)") or "",
    time(), floor(t % 1 * 1e9), random(0, 0x7fffffff), serial)
end

--- store.file{ dir = path } -> store | nil, err: one file per session in
-- dir, which must exist (it is not created: nil, err says so).
function M.file(opts)
  opts = check_opts(opts, "file", { dir = true })
  local dir = opts.dir
  if type(dir) ~= "string" or dir == "" then
    error(PREFIX .. "store.file: option 'dir' must be a non-empty string (a directory)", 2)
  end
  if dir:find("%z") then error(PREFIX .. "store.file: option 'dir' must not contain a NUL byte", 2) end
  dir = dir:gsub("(.)/+$", "%1")
  local self = setmetatable({ dir = dir }, File)
  -- can we create files there?  (a probe, removed at once)
  local probe = dir .. "/.slm-probe-" .. unique(self) .. ".tmp"
  local f, msg, code = open(probe, "wb")
  if not f then
    if code == ENOENT then
      return nil, PREFIX .. "file store " .. dir .. ": no such directory (create it first: the file store does not)"
    end
    return nil, PREFIX .. "file store " .. dir .. ": cannot create files there: " .. reason(msg, probe)
  end
  f:close()
  remove(probe)
  return self
end

function File:path(id) return self.dir .. "/" .. sha256(id) .. ".json" end
function File:where(id) return "file store " .. self:path(id) end

function File:get(id)
  local path = self:path(id)
  local f, msg, code = open(path, "rb")
  if not f then
    if code == ENOENT then
      -- no such session, unless the directory itself has gone
      local d = open(self.dir, "rb")
      if d then d:close(); return nil end
      return nil, "the directory " .. self.dir .. " has gone"
    end
    return nil, reason(msg, path)
  end
  local text, rerr = f:read("a")
  f:close()
  if text == nil then return nil, "read failed: " .. reason(rerr, path) end
  return text
end

-- Atomic: the document goes to a temporary file in the same directory,
-- which is then renamed over the session's file (rename(2) replaces it in
-- one step on POSIX), so that a crash at any point leaves either the old
-- document or the new one, never part of one.  A crash before the rename
-- leaves a temporary file (.<hash>.<unique>.tmp) that nothing reads: safe
-- to delete once no save is running (`find DIR -name '.*.tmp' -mmin +10
-- -delete`).  Lua cannot fsync: against power loss we rely on the file
-- system (ext4's default flushes a file renamed over another); a session
-- file cut by one is reported as corrupt, not read as empty.
function File:put(id, text)
  local hash = sha256(id)
  local path = self.dir .. "/" .. hash .. ".json"
  local tmp = self.dir .. "/." .. hash .. "." .. unique(self) .. ".tmp"
  local f, msg = open(tmp, "wb")
  if not f then return nil, reason(msg, tmp) end
  local ok, werr = f:write(text)
  if ok then ok, werr = f:flush() end
  local cok, cerr = f:close()
  if ok and not cok then ok, werr = nil, cerr end
  if ok then ok, werr = rename(tmp, path) end
  if not ok then
    remove(tmp)
    return nil, reason(werr, tmp)
  end
  return true
end

function File:drop(id)
  local path = self:path(id)
  local ok, msg, code = remove(path)
  if ok or code == ENOENT then return true end
  return nil, reason(msg, path)
end

------------------------------------------------------------------ SQLite

local Sqlite = class("slm.store.sqlite", "sqlite store")

local SCHEMA = [[
CREATE TABLE IF NOT EXISTS slm_sessions (
  id TEXT PRIMARY KEY,
  data TEXT NOT NULL,
  updated_at INTEGER NOT NULL
)]]

-- An id as SQL: its bytes as a hex blob literal, read as TEXT.  Debian's
-- luasql 2.6.0 binds no parameters (conn:execute ignores them), and
-- conn:escape stops at a NUL byte ("a\0b" would be the session "a"); hex
-- digits cannot end a literal, whatever the id.
local function sql_id(id)
  return "CAST(X'" .. hex(id) .. "' AS TEXT)"
end

-- conn:execute under pcall: result | nil, err (luasql's "LuaSQL: " cut off).
local function exec(conn, sql)
  local ok, r, err = pcall(conn.execute, conn, sql)
  if not ok then err, r = r, nil end
  if r == nil then return nil, (tostring(err or "unknown error"):gsub("^LuaSQL: ", "")) end
  return r
end

-- The first column of the first row of a query | nil (no row) | nil, err;
-- the cursor is always closed.
local function query1(conn, sql)
  local cur, err = exec(conn, sql)
  if not cur then return nil, err end
  if type(cur) ~= "userdata" then return nil end -- not a query
  local ok, v, ferr = pcall(cur.fetch, cur)
  pcall(cur.close, cur)
  if not ok then return nil, tostring(v) end
  if v == nil and ferr ~= nil then return nil, (tostring(ferr):gsub("^LuaSQL: ", "")) end
  return v
end

local function busy(err) return err:find("locked") or err:find("busy") end

-- The busy timeout, WAL, the table; nil or the error.  Switching a new
-- database to WAL while another process does the same can fail at once
-- with "database is locked" (SQLite's way out of two connections waiting
-- for each other, where no busy handler is called): tried again until the
-- busy timeout has passed.
local function setup(conn, timeout)
  local deadline = now() + timeout
  local _, err = query1(conn, format("PRAGMA busy_timeout = %d", floor(timeout * 1000)))
  if err then return err end
  while true do
    _, err = query1(conn, "PRAGMA journal_mode = WAL")
    if not err then _, err = exec(conn, SCHEMA) end
    if not err or not busy(err) or now() >= deadline then return err end
    local t = now() + 0.002
    while now() < t do end -- (Lua has no sleep; this wait is rare and short)
  end
end

--- store.sqlite{ path = file, busy_timeout = 5 } -> store | nil, err: the
-- table slm_sessions in the SQLite database at path (created when
-- missing), in WAL mode; a write waits up to busy_timeout seconds for
-- another connection's (another process's) to finish.
function M.sqlite(opts)
  opts = check_opts(opts, "sqlite", { path = true, busy_timeout = true })
  local path, timeout = opts.path, opts.busy_timeout
  if type(path) ~= "string" or path == "" or path:find("%z") then
    error(PREFIX .. "store.sqlite: option 'path' must be a non-empty string (a file) without NUL bytes", 2)
  end
  if timeout == nil then timeout = 5 end
  if type(timeout) ~= "number" or timeout ~= timeout or timeout < 0 or timeout > 86400 then
    error(PREFIX .. "store.sqlite: option 'busy_timeout' must be a number of seconds from 0 to 86400", 2)
  end
  local where = "sqlite store " .. path
  local lok, driver = pcall(require, "luasql.sqlite3")
  if not lok then
    return nil, PREFIX .. where .. ": needs luasql.sqlite3 (Debian package lua-sql-sqlite3): "
      .. tostring(driver):match("^[^\n]*")
  end
  local eok, env, eerr = pcall(driver.sqlite3)
  if not eok or not env then return nil, PREFIX .. where .. ": " .. tostring(eok and eerr or env) end
  local cok, conn, cerr = pcall(env.connect, env, path)
  if not cok or not conn then
    pcall(env.close, env)
    return nil, PREFIX .. where .. ": cannot open: " .. (tostring(cok and cerr or conn):gsub("^LuaSQL: ", ""))
  end
  local self = setmetatable({ env = env, conn = conn, path = path }, Sqlite)
  local err = setup(conn, timeout)
  if err then
    self:close()
    return nil, PREFIX .. where .. ": cannot open: " .. err
  end
  return self
end

function Sqlite:where() return "sqlite store " .. self.path end

function Sqlite:get(id)
  local data, err = query1(self.conn, "SELECT data FROM slm_sessions WHERE id = " .. sql_id(id))
  if err then return nil, err end
  if data == nil then return nil end
  if type(data) ~= "string" then return nil, "corrupt: the row's data is not text" end
  return data
end

function Sqlite:put(id, text)
  if text:find("%z") then return nil, "a NUL byte in the document" end -- (our JSON has none)
  local ok, esc = pcall(self.conn.escape, self.conn, text)
  if not ok or type(esc) ~= "string" then return nil, "cannot escape the document" end
  local r, err = exec(self.conn, format(
    "INSERT INTO slm_sessions (id, data, updated_at) VALUES (%s, '%s', %d) " ..
    "ON CONFLICT(id) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
    sql_id(id), esc, time()))
  if r == nil then return nil, err end
  return true
end

function Sqlite:drop(id)
  local r, err = exec(self.conn, "DELETE FROM slm_sessions WHERE id = " .. sql_id(id))
  if r == nil then return nil, err end
  return true
end

function Sqlite:shut()
  local conn, env = self.conn, self.env
  self.conn, self.env = nil, nil
  if conn then pcall(conn.close, conn) end
  if env then pcall(env.close, env) end
end

return M
