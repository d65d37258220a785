-- slm.jsonl: JSON Lines for batch jobs: one JSON object per line.
--
--   local r = assert(slm.jsonl.reader("requests.jsonl"))
--   for obj, err, line in r:rows() do   -- obj: false, err for a bad line
--     ...
--   end
--   local w = assert(slm.jsonl.writer("out.jsonl"))
--   w:row{ id = 1, label = "billing" }   -- slm.json: one line, keys sorted
--   w:close()
--
-- Lines end with LF (a CR before it is JSON whitespace); blank lines are skipped;
-- a UTF-8 BOM at the start is dropped; a line may be of any length (it is
-- put together from the blocks it spans). A line that is not a JSON object
-- gives false, err (kind "input", with its line number) and reading goes on.
local json = require "slm.json"
local fileio = require "slm.fileio"

local pcall, tostring = pcall, tostring
local find, sub, concat = string.find, string.sub, table.concat
local is = fileio.is

local M = {}

M.BLOCK_SIZE = 256 * 1024

local READER_OPTS = { block_size = is.pos_int, name = is.string }

local Reader = fileio.class("slm.jsonl.Reader")

--- slm.jsonl.reader(file_or_path [, opts]) -> reader | nil, err
function M.reader(src, opts)
  local self, o = fileio.new(Reader, src, "rb", opts, READER_OPTS, "slm.jsonl.reader")
  if not self then return nil, o end
  self._block = o.block_size or M.BLOCK_SIZE
  self._chunk, self._pos, self._pieces, self._n, self._eof, self._line = nil, 1, {}, 0, false, 0
  return self
end

-- The next physical line (without its LF), nil at the end, false, err when
-- the file cannot be read.
function Reader:_next_line()
  local pieces = self._pieces
  while true do
    local chunk, pos = self._chunk, self._pos
    if chunk then
      local nl = find(chunk, "\n", pos, true)
      if nl then
        self._pos = nl + 1
        local s = sub(chunk, pos, nl - 1)
        if self._n > 0 then
          pieces[self._n + 1] = s
          s = concat(pieces, "", 1, self._n + 1)
          for i = self._n + 1, 1, -1 do pieces[i] = nil end
          self._n = 0
        end
        return s
      end
      if pos <= #chunk then
        self._n = self._n + 1
        pieces[self._n] = sub(chunk, pos)
      end
      self._chunk = nil
    end
    if self._eof then
      if self._n == 0 then return nil end
      local s = concat(pieces, "", 1, self._n)
      for i = self._n, 1, -1 do pieces[i] = nil end
      self._n = 0
      return s
    end
    local data, err = self._f:read(self._block)
    if data then
      self._chunk, self._pos = data, 1
    else
      self._eof = true
      fileio.close_reader(self)
      if err then -- the line the failure cut is not reported
        for i = self._n, 1, -1 do pieces[i] = nil end
        self._n = 0
        return false, fileio.read_error(self, err)
      end
    end
  end
end

--- for obj, err, line in r:rows() do ... end: each non-blank line decoded
-- (slm.json.decode_exact: integers exact), or false, err for a line that is not a JSON object; line is
-- its 1-based line number either way.
function Reader:rows()
  return function()
    while true do
      local s, err = self:_next_line()
      if not s then return s, err, err and self._line or nil end
      local n = self._line + 1
      self._line = n
      if n == 1 and sub(s, 1, 3) == "\239\187\191" then s = sub(s, 4) end
      local first = find(s, "[^ \t\r]")
      if first then
        if sub(s, first, first) ~= "{" then
          return false, fileio.input_error("json", self._name, n,
            "expected a JSON object (near " .. fileio.excerpt(sub(s, first)) .. ")"), n
        end
        local ok, obj = pcall(json.decode_exact, s)
        if ok then return obj, nil, n end
        local why = tostring(obj):gsub("^.-:%d+: ", "")
        return false, fileio.input_error("json", self._name, n, "not valid JSON: " .. why), n
      end
    end
  end, nil, nil, self
end

--- r:close(): stops reading; closes the file when the reader opened it.
function Reader:close()
  fileio.close_reader(self)
  self._eof, self._chunk, self._n = true, nil, 0
end
Reader.__close = Reader.close
Reader.__gc = Reader.close

local Writer = fileio.class("slm.jsonl.Writer")

--- slm.jsonl.writer(file_or_path [, opts]) -> writer | nil, err
function M.writer(dst, opts)
  return fileio.new(Writer, dst, "wb", opts, { name = is.string }, "slm.jsonl.writer")
end

--- w:row(value) -> true | nil, err: one line of slm.json (keys sorted); a
-- value that cannot be encoded (a function, invalid UTF-8, ...) is an error
-- of kind "input" and nothing is written.
function Writer:row(v)
  fileio.check_row(self, v, "slm.jsonl.writer", "table")
  local ok, s = pcall(json.encode, v)
  if not ok then
    return nil, fileio.input_error("encode", self._name, nil,
      "cannot encode the row: " .. tostring(s):gsub("^.-:%d+: ", ""))
  end
  return fileio.write(self._f, self._name, s .. "\n")
end

--- w:close() -> true | nil, err: flushes; closes the file if it opened it.
Writer.close = fileio.close_writer
Writer.__close = fileio.close_writer

return M
