-- slm.csv: RFC 4180 CSV for batch jobs: a streaming reader (blocks of the
-- file, never the whole of it), a writer, and helpers. The per-byte work
-- (the parser, the quoting) is in C (csrc/csv.c); this layer opens files,
-- numbers records, marks ragged rows and turns malformed records into
-- errors. The rules are in README "CSV and JSONL".
--
--   local r = assert(slm.csv.reader("tickets.csv"))
--   local names = r:header()
--   for row, err in r:rows() do          -- row: false, err for a bad record
--     if row then print(row.line, slm.csv.by_name(names, row).subject) end
--   end
local core = require "slm.core"
local fileio = require "slm.fileio"

local type, format, error, pairs, tostring = type, string.format, error, pairs, tostring
local csv_parser, csv_format = core.csv_parser, core.csv_format
local is = fileio.is

local M = {}

M.BLOCK_SIZE = 256 * 1024        -- bytes read at a time
M.MAX_RECORD = 64 * 1024 * 1024  -- default bytes of field data per record

local function separator(v)
  return type(v) == "string" and #v == 1 and v ~= '"' and v ~= "\r" and v ~= "\n",
    "must be one byte, not a quote, CR or LF"
end

local READER_OPTS = {
  separator = separator, bom = is.boolean, header = is.boolean,
  block_size = is.pos_int, max_record = is.nonneg_int, name = is.string,
}

-- What each fault is, and where reading goes on.
local FAULTS = {
  quote = "a quote inside an unquoted field",
  after_quote = "text after the closing quote of a field",
  too_long = "a record longer than max_record (%d bytes)",
}

local function record_error(self, rec)
  local reason = rec.error
  local what
  if reason == "unterminated" then
    what = format("record %d, field %d: the quoted field opened on line %d is not closed by the end of "
      .. "the file; nothing after its opening quote could be read", rec.record, rec.field, rec.err_line)
  else
    what = format("record %d, field %d: " .. FAULTS[reason], rec.record, rec.field, self._max_record)
    if rec.excerpt ~= "" then what = what .. " (near " .. fileio.excerpt(rec.excerpt) .. ")" end
    what = what .. (reason == "too_long" and "; reading goes on after that record"
      or "; reading goes on at the next line")
  end
  return fileio.input_error(reason, self._name, rec.err_line, what,
    { record = rec.record, field = rec.field, record_line = rec.line })
end

local Reader = fileio.class("slm.csv.Reader")

--- slm.csv.reader(file_or_path [, opts]) -> reader | nil, err
function M.reader(src, opts)
  local self, o = fileio.new(Reader, src, "rb", opts, READER_OPTS, "slm.csv.reader")
  if not self then return nil, o end
  local max_record = o.max_record or M.MAX_RECORD
  self._p = csv_parser(o.separator or ",", o.bom ~= false, max_record)
  self._max_record = max_record
  self._block = o.block_size or M.BLOCK_SIZE
  self._q, self._i, self._done = {}, 1, false
  self._want_header = o.header ~= false
  self._width = nil -- fields a row should have: the header's, else the first row's
  return self
end

-- The next record table from the parser, nil at the end, or false, err
-- when the file cannot be read.
function Reader:_next()
  while true do
    local i = self._i
    local rec = self._q[i]
    if rec then
      self._i = i + 1
      return rec
    end
    if self._done then return nil end
    local chunk, err = self._f:read(self._block)
    if chunk then
      self._q = self._p:feed(chunk)
    else
      -- at a read failure, the record cut by it is not reported
      self._q = err and {} or self._p:finish()
      self._i = 1
      self._done = true
      fileio.close_reader(self)
      if err then
        return false, fileio.read_error(self, err)
      end
    end
    self._i = 1
  end
end

-- A row, false, err for a bad record, or nil at the end.
function Reader:_row()
  local rec, err = self:_next()
  if not rec then return rec, err end
  if rec.error then return false, record_error(self, rec) end
  local width = self._width
  if not width then
    self._width = #rec
  elseif #rec ~= width then
    rec.ragged = true
  end
  return rec
end

--- r:header() -> names | nil, err: the first record (opts.header ~= false);
-- an empty file has an empty header.
function Reader:header()
  if not self._want_header then return nil end
  if self._header == nil then
    local rec, err = self:_row()
    if rec then
      self._header = rec
    elseif rec == nil and not err then
      self._header = {}
    else
      self._header, self._header_err = false, err
    end
  end
  if self._header == false then return nil, self._header_err end
  return self._header
end

--- for row, err in r:rows() do ... end: each data record (after the
-- header) as a list of strings with row.line, row.record and, when its
-- field count differs from the header's, row.ragged = true; a malformed
-- record (or the file failing) as false, err.
function Reader:rows()
  local header_err
  if self._want_header and self._header == nil then
    local h, err = self:header()
    if not h then header_err = err end
  end
  return function()
    if header_err then
      local e = header_err
      header_err = nil
      return false, e
    end
    return self:_row()
  end, nil, nil, self
end

--- r:close(): stops reading; closes the file when the reader opened it.
function Reader:close()
  fileio.close_reader(self)
  self._done, self._q, self._i = true, {}, 1
end
Reader.__close = Reader.close
Reader.__gc = Reader.close

--- slm.csv.parse(s [, opts]) -> rows, errs: every record of s as a row
-- (the first one included: there is no header here; rows differing in
-- width from the first are ragged), the malformed ones in errs.
function M.parse(s, opts)
  if type(s) ~= "string" then error("slm.csv.parse: expected a string, got " .. type(s), 2) end
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  o.header = false
  o.name = o.name or "<string>"
  local r = M.reader(fileio.string_source(s), o)
  local rows, errs = {}, {}
  for row, err in r:rows() do
    if row then rows[#rows + 1] = row else errs[#errs + 1] = err end
  end
  return rows, errs
end

local WRITER_OPTS = {
  separator = separator, bom = is.boolean, name = is.string,
  eol = function(v) return v == "\r\n" or v == "\n", 'must be "\\r\\n" or "\\n"' end,
}

local Writer = fileio.class("slm.csv.Writer")

--- slm.csv.writer(file_or_path [, opts]) -> writer | nil, err
-- opts: separator (","), eol ("\r\n", RFC 4180; or "\n"), bom (false: a
-- UTF-8 BOM first, for spreadsheets that want one), name (for errors).
function M.writer(dst, opts)
  local w, o = fileio.new(Writer, dst, "wb", opts, WRITER_OPTS, "slm.csv.writer")
  if not w then return nil, o end
  w._sep, w._eol = o.separator or ",", o.eol or "\r\n"
  if o.bom then
    local ok, err = fileio.write(w._f, w._name, "\239\187\191")
    if not ok then return nil, err end
  end
  return w
end

--- w:row(fields) -> true | nil, err (fields: strings or numbers; misuse raises)
function Writer:row(fields)
  fileio.check_row(self, fields, "slm.csv.writer", "list")
  return fileio.write(self._f, self._name, csv_format(fields, self._sep, self._eol))
end

--- w:close() -> true | nil, err: flushes; closes the file if it opened it.
Writer.close = fileio.close_writer
Writer.__close = fileio.close_writer

--- slm.csv.format_row(fields [, opts]) -> the record, without a line end
function M.format_row(fields, opts)
  if type(fields) ~= "table" then error("slm.csv.format_row: expected a list, got " .. type(fields), 2) end
  return csv_format(fields, opts and opts.separator or ",", "")
end

--- slm.csv.by_name(header, row) -> { name = value }: with duplicate names
-- the first column of that name wins (the others stay reachable by
-- position); fields past the header are left out, missing ones are absent.
function M.by_name(header, row)
  local t, seen = {}, {}
  for i = 1, #header do
    local name = header[i]
    if not seen[name] then
      seen[name] = true
      t[name] = row[i]
    end
  end
  return t
end

return M
