-- examples/lib/table_fmt.lua: aligned plain-text tables that are UTF-8 aware.
--
--   local tf = require "examples.lib.table_fmt"
--   tf.print({
--     { key = "id",      title = "ID", align = "right" },
--     { key = "summary", title = "Summary", max = 40 },
--   }, rows)
--
-- Column widths are measured in UTF-8 characters (code points), not bytes,
-- so Cyrillic text lines up with ASCII. Cells longer than a column's `max`
-- are cut and end in "…". Line breaks and tabs inside a cell become spaces.
-- Bytes that are not valid UTF-8 count one column each.
--
-- Functions:
--   tf.width(s)          -> number of display columns of s
--   tf.truncate(s, n)    -> s cut to at most n columns, "…" marking a cut
--   tf.pad(s, n, align)  -> s padded with spaces to n columns
--   tf.render(cols, rows, opts) -> the table as one string
--   tf.print(cols, rows, opts)  -> writes it to opts.out or io.stdout
-- opts: sep (column separator, default "  "), header (default true),
--       rule (draw a line under the header, default true).

local M = {}

local ELLIPSIS = "…"

-- Iterate over the characters of s: yields each character as a string.
-- Valid UTF-8 sequences are one character; any other byte is one on its own.
local function chars(s)
  local out, i, n = {}, 1, #s
  while i <= n do
    local c = s:byte(i)
    local len = 1
    if c >= 0xC2 and c <= 0xDF then len = 2
    elseif c >= 0xE0 and c <= 0xEF then len = 3
    elseif c >= 0xF0 and c <= 0xF4 then len = 4 end
    if len > 1 then
      -- all continuation bytes must be present and be 10xxxxxx
      for k = i + 1, i + len - 1 do
        local b = s:byte(k)
        if not b or b < 0x80 or b > 0xBF then len = 1; break end
      end
    end
    out[#out + 1] = s:sub(i, i + len - 1)
    i = i + len
  end
  return out
end

-- Display width of s: utf8.len when s is valid UTF-8, else a per-character
-- count that takes stray bytes one column each.
function M.width(s)
  s = tostring(s)
  return utf8.len(s) or #chars(s)
end

-- Cut s to at most n columns. When a cut is made the result ends in "…",
-- which takes one of the n columns.
function M.truncate(s, n)
  s = tostring(s)
  if M.width(s) <= n then return s end
  if n <= 0 then return "" end
  local cs = chars(s)
  return table.concat(cs, "", 1, n - 1) .. ELLIPSIS
end

function M.pad(s, n, align)
  s = tostring(s)
  local fill = string.rep(" ", math.max(0, n - M.width(s)))
  if align == "right" then return fill .. s end
  return s .. fill
end

-- One line per cell: line breaks, tabs and other control characters become
-- spaces, runs of spaces collapse, surrounding spaces go.
local function clean(v)
  if v == nil then return "" end
  local s = tostring(v):gsub("[%c]+", " "):gsub("  +", " ")
  return (s:gsub("^ ", ""):gsub(" $", ""))
end

function M.render(cols, rows, opts)
  opts = opts or {}
  local sep = opts.sep or "  "
  local show_header = opts.header ~= false
  local cells, widths = {}, {}
  for c, col in ipairs(cols) do
    widths[c] = show_header and M.width(col.title or col.key) or 0
    if col.max then widths[c] = math.min(widths[c], col.max) end
  end
  for r, row in ipairs(rows) do
    cells[r] = {}
    for c, col in ipairs(cols) do
      local v = row[col.key]
      if col.format then v = col.format(v, row) end
      local s = clean(v)
      if col.max then s = M.truncate(s, col.max) end
      cells[r][c] = s
      widths[c] = math.max(widths[c], M.width(s))
    end
  end

  local lines = {}
  local function emit(parts)
    -- no trailing spaces on the last column
    lines[#lines + 1] = (table.concat(parts, sep):gsub("%s+$", ""))
  end
  if show_header then
    local head, rule = {}, {}
    for c, col in ipairs(cols) do
      head[c] = M.pad(M.truncate(col.title or col.key, widths[c]), widths[c], col.align)
      rule[c] = string.rep("-", widths[c])
    end
    emit(head)
    if opts.rule ~= false then emit(rule) end
  end
  for r = 1, #rows do
    local parts = {}
    for c, col in ipairs(cols) do parts[c] = M.pad(cells[r][c], widths[c], col.align) end
    emit(parts)
  end
  return table.concat(lines, "\n") .. "\n"
end

function M.print(cols, rows, opts)
  local out = opts and opts.out or io.stdout
  out:write(M.render(cols, rows, opts))
end

return M
