-- examples/lib/csv.lua: a small RFC 4180 CSV reader.
--
--   local csv = require "examples.lib.csv"
--   local rows, header = csv.parse(text)        -- rows keyed by header
--   local rows, header = csv.read_file(path)    -- nil, err on I/O failure
--   local records = csv.parse_records(text)     -- raw list of field lists
--
-- Handles quoted fields, doubled quotes inside quotes ("" -> "), commas and
-- line breaks inside quoted fields, LF / CRLF / lone CR record separators,
-- a UTF-8 byte order mark, and a missing final line break. Fields are
-- returned as strings exactly as written (no trimming, no type guessing);
-- a line break inside a quoted field is kept as written (CRLF stays CRLF).
--
-- Malformed input is reported, not guessed at: a quote inside an unquoted
-- field, text after a closing quote, or an unterminated quoted field all
-- raise an error naming the line.

local M = {}

local find, sub, byte = string.find, string.sub, string.byte
local QUOTE, COMMA, CR, LF = 34, 44, 13, 10

--- Parse CSV text into a list of records (each a list of field strings).
-- Blank lines (outside quotes) are skipped.
function M.parse_records(text, opts)
  assert(type(text) == "string", "csv: text must be a string")
  local sep = (opts and opts.sep or ","):byte()
  local records, record = {}, {}
  local pos, n, line = 1, #text, 1
  if sub(text, 1, 3) == "\239\187\191" then pos = 4 end   -- UTF-8 BOM

  local function fail(msg) error(("csv: line %d: %s"):format(line, msg), 0) end

  -- Finish the current record; a blank line (one empty, unquoted field)
  -- is dropped.
  local quoted_any = false
  local function end_record()
    if not (#record == 1 and record[1] == "" and not quoted_any) then
      records[#records + 1] = record
    end
    record, quoted_any = {}, false
  end

  if pos > n then return records end
  while true do
    local c = byte(text, pos)
    local field
    if c == QUOTE then
      -- quoted field: scan to the closing quote, unescaping "" on the way
      quoted_any = true
      local parts, start = {}, pos + 1
      while true do
        local q = find(text, '"', start, true)
        if not q then fail("unterminated quoted field") end
        parts[#parts + 1] = sub(text, start, q - 1)
        if byte(text, q + 1) == QUOTE then
          parts[#parts + 1] = '"'
          start = q + 2
        else
          pos = q + 1
          break
        end
      end
      field = table.concat(parts)
      -- count line breaks inside the field for error messages
      local _, breaks = field:gsub("\r\n", "\n"):gsub("\r", "\n"):gsub("\n", "")
      line = line + breaks
      c = byte(text, pos)
      if c ~= nil and c ~= sep and c ~= CR and c ~= LF then
        fail("unexpected character after closing quote")
      end
    else
      -- unquoted field: up to the next separator or line break
      local stop = pos
      while stop <= n do
        local b = byte(text, stop)
        if b == sep or b == CR or b == LF then break end
        if b == QUOTE then fail("quote inside an unquoted field") end
        stop = stop + 1
      end
      field = sub(text, pos, stop - 1)
      pos = stop
      c = byte(text, pos)
    end
    record[#record + 1] = field

    if c == sep then
      pos = pos + 1
      -- a trailing separator at end of input still yields an empty field
      if pos > n then record[#record + 1] = ""; end_record(); break end
    elseif c == CR or c == LF then
      pos = pos + ((c == CR and byte(text, pos + 1) == LF) and 2 or 1)
      line = line + 1
      end_record()
      if pos > n then break end
    else -- end of input
      end_record()
      break
    end
  end
  return records
end

--- Parse CSV text whose first record is a header. Returns a list of rows
-- keyed by header name, and the header list. Short rows get "" for the
-- missing fields; extra fields raise an error.
function M.parse(text, opts)
  local records = M.parse_records(text, opts)
  local header = table.remove(records, 1)
  if not header then return {}, {} end
  local seen = {}
  for i, name in ipairs(header) do
    if seen[name] then error(("csv: duplicate column %q"):format(name), 0) end
    seen[name] = i
  end
  local rows = {}
  for r, rec in ipairs(records) do
    if #rec > #header then
      error(("csv: record %d has %d fields, header has %d"):format(r, #rec, #header), 0)
    end
    local row = {}
    for i, name in ipairs(header) do row[name] = rec[i] or "" end
    rows[r] = row
  end
  return rows, header
end

--- Read and parse a CSV file. Returns rows, header; or nil, err.
function M.read_file(path, opts)
  local f, err = io.open(path, "rb")
  if not f then return nil, err end
  local text = f:read("a")
  f:close()
  local ok, rows, header = pcall(M.parse, text, opts)
  if not ok then return nil, path .. ": " .. tostring(rows) end
  return rows, header
end

return M
