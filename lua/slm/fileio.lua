-- slm.fileio: what slm.csv and slm.jsonl share: opening a path or taking
-- a file, checking their options, and the `input` errors that name the
-- file and quote at most a short excerpt of its content; and read_all, the
-- whole-file read of the tokenizer, the tasks' images and slm.batchapi.
local errors = require "slm.errors"

local type, error, format, tostring, pairs, byte, setmetatable =
  type, error, string.format, tostring, pairs, string.byte, setmetatable
local io_type, io_open = io.type, io.open

local M = {}

-- A short excerpt of untrusted bytes, quoted and printable: control bytes,
-- quotes and backslashes as \xHH; a UTF-8 sequence cut at the start dropped.
function M.excerpt(s, max)
  max = max or 24
  if #s > max then s = s:sub(1, max) .. "..." end
  s = s:gsub("^[\128-\191]+", "")
  return '"' .. s:gsub('[%z\1-\31\127"\\]', function(c) return format("\\x%02X", byte(c)) end) .. '"'
end

--- A whole regular file's bytes: -> string | nil, err (io.open's message,
-- or what the path is instead).  Anything but a regular file is refused
-- before it is opened: a FIFO's open blocks for ever without a writer, and
-- a device (/dev/zero) never ends.  max (bytes): a larger file is refused.
function M.read_all(path, max)
  if type(path) ~= "string" or path:find("\0", 1, true) then
    return nil, format("%s: not a file path", M.excerpt(tostring(path), 80))
  end
  local kind, size = require("slm.core").file_type(path)
  if kind == nil then return nil, path .. ": " .. tostring(size) end
  if kind ~= "file" then return nil, format("%s: a %s, not a regular file: not read", path, kind) end
  if max and size > max then
    return nil, format("%s: %d bytes, more than the %d taken: not read", path, size, max)
  end
  local f, err = io_open(path, "rb")
  if not f then return nil, err end
  local s = f:read(max and max + 1 or "*a")
  f:close()
  if max and s and #s > max then return nil, format("%s: more than the %d bytes taken: not read", path, max) end
  return s or ""
end

-- An error of kind "input": message "FILE:LINE: what", the fields given.
function M.input_error(reason, file, line, what, fields)
  fields = fields or {}
  fields.reason, fields.file, fields.line = reason, file, line
  local where = line and format("%s:%d", file, line) or file
  return errors.new("input", where .. ": " .. what, fields)
end

-- Options: spec maps a name to a checker returning true or nil, "why";
-- misuse raises at `level` (default: the caller's caller).
function M.check_opts(opts, spec, who, level)
  level = level or 3
  if opts == nil then return {} end
  if type(opts) ~= "table" then error(who .. ": options must be a table, got " .. type(opts), level) end
  for k, v in pairs(opts) do
    local check = spec[k]
    if not check then error(format("%s: unknown option '%s'", who, tostring(k)), level) end
    local ok, why = check(v)
    if not ok then error(format("%s: option '%s' %s", who, k, why), level) end
  end
  return opts
end

M.is = {
  boolean = function(v) return type(v) == "boolean", "must be a boolean" end,
  string = function(v) return type(v) == "string", "must be a string" end,
  pos_int = function(v)
    return type(v) == "number" and v >= 1 and v % 1 == 0 and v < 2^53, "must be a positive integer"
  end,
  nonneg_int = function(v)
    return type(v) == "number" and v >= 0 and v % 1 == 0 and v < 2^53, "must be 0 or a positive integer"
  end,
}

-- src: a path (opened here, "rb"/"wb"), a Lua file, or any object with the
-- methods used (read; write). Returns file, name, owned | nil, err.
function M.open(src, mode, name, who, level)
  if type(src) == "string" then
    local f, err = io_open(src, mode)
    if not f then return nil, M.input_error("open", name or src, nil, (tostring(err):gsub("^.-: ", ""))) end
    return f, name or src, true
  end
  local method = mode:sub(1, 1) == "r" and "read" or "write"
  if io_type(src) == "file" or (type(src) == "table" and type(src[method]) == "function") then
    return src, name or "<" .. (method == "read" and "input" or "output") .. ">", false
  end
  error(format("%s: expected a path or a file, got %s", who, io_type(src) or type(src)), level or 3)
end

-- A class of readers or writers (methods via __index, close as __close).
function M.class(name)
  local c = { __name = name }
  c.__index = c
  return c
end

-- The constructors' common part: options checked (spec), the file opened
-- (mode). Returns the object { _f, _name, _owned, _closed = false } with
-- class as metatable and the options | nil, err. Misuse raises at the
-- constructor's caller.
function M.new(class, src, mode, opts, spec, who)
  opts = M.check_opts(opts, spec, who, 4)
  local f, name, owned = M.open(src, mode, opts.name, who, 4)
  if not f then return nil, name end
  return setmetatable({ _f = f, _name = name, _owned = owned, _closed = false }, class), opts
end

-- Readers' close: the file is closed when the reader opened it.
function M.close_reader(self)
  if self._owned then self._f:close() end
  self._owned = false
end

-- Writers' close -> true | nil, err: idempotent; flushes a file given by
-- the caller, closes one opened here.
function M.close_writer(self)
  if self._closed then return true end
  self._closed = true
  return M.close(self._f, self._name, self._owned)
end

-- Writers' guard against misuse: raises at the caller of w:row.
function M.check_row(self, v, who, what)
  if self._closed then error(who .. ": row after close", 3) end
  if type(v) ~= "table" then error(format("%s: row must be a %s, got %s", who, what, type(v)), 3) end
end

-- A source over a string (slm.csv.parse, specs): read(n) as a file's.
function M.string_source(s)
  local pos = 1
  return {
    read = function(_, n)
      if pos > #s then return nil end
      local piece = s:sub(pos, pos + n - 1)
      pos = pos + n
      return piece
    end,
  }
end

-- A reader's file failing: the error naming it.
function M.read_error(self, err)
  return M.input_error("io", self._name, nil, "cannot read: " .. tostring(err))
end

-- Sinks: write(bytes) -> true | nil, err naming the file.
function M.write(f, name, bytes)
  local ok, err = f:write(bytes)
  if not ok then return nil, M.input_error("io", name, nil, "cannot write: " .. tostring(err)) end
  return true
end

-- close(owned): flushes a file given by the caller, closes one opened here.
function M.close(f, name, owned)
  local ok, err
  if owned then ok, err = f:close() elseif f.flush then ok, err = f:flush() else ok = true end
  if not ok then return nil, M.input_error("io", name, nil, "cannot close: " .. tostring(err)) end
  return true
end

return M
