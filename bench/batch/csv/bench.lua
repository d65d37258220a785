-- bench.lua FILE LABEL - one measurement: slm.csv.reader reads FILE (its
-- header, then every row), counting records, fields and field bytes.
-- Prints one JSON line: lib, seconds (wall, monotonic), cpu, mb_s, rows,
-- fields, bytes (the counts let report.lua check both parsers agree).
local slm = require "slm"
local core = require "slm.core"
local path, label = assert(arg[1]), arg[2] or "slm"

local f = assert(io.open(path, "rb"))
local size = f:seek("end")
f:close()

local t0, c0 = core.now(), os.clock()
local r = assert(slm.csv.reader(path))
local header = assert(r:header())
local rows, fields, bytes = 1, #header, 0
for i = 1, #header do bytes = bytes + #header[i] end
for row, err in r:rows() do
  if not row then error(tostring(err)) end
  rows = rows + 1
  local n = #row
  fields = fields + n
  for i = 1, n do bytes = bytes + #row[i] end
end
local secs, cpu = core.now() - t0, os.clock() - c0
print(string.format('{"lib":"%s","engine":"%s","seconds":%.4f,"cpu":%.4f,"mb_s":%.2f,"rows":%d,"fields":%d,"bytes":%d}',
  label, jit and jit.version or _VERSION, secs, cpu, size / 1048576 / secs, rows, fields, bytes))
