-- bench/sse/parser.lua: throughput of core.sse_parser (MB/s).
--
--   LUA_CPATH="build/?.so;;" lua5.4 bench/sse/parser.lua   (or luajit)
--
-- (a) a long stream of small chat-completion events, built by repeating the
--     recorded OpenAI streams (tests/fixtures/openai-streams/*.sse);
-- (b) one 8 MB data line.
-- Both are fed in 16 KB chunks (split before timing); best of 3 runs of CPU
-- time, after one warm-up run (the first touch of fresh heap pages costs
-- page faults that are not the parser's).  Prints the ratio to the goals
-- (>= 500 MB/s and >= 2 GB/s).  Not a test: nothing here fails on a slow
-- machine.
local core = require "slm.core"

local clock = core.cputime or os.clock
local CHUNK = 16 * 1024
local MB = 1024 * 1024

local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
local fixtures = here .. "../../tests/fixtures/openai-streams/"

local function slurp(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function fixture_stream()
  local names = {}
  local ls = io.popen('ls "' .. fixtures .. '"')
  for name in ls:lines() do
    if name:match("%.sse$") then names[#names + 1] = name end
  end
  ls:close()
  table.sort(names)
  assert(#names > 0, "no fixtures in " .. fixtures)
  local parts = {}
  for i, name in ipairs(names) do parts[i] = slurp(fixtures .. name) end
  return table.concat(parts)
end

local function split(s)
  local chunks = {}
  for i = 1, #s, CHUNK do chunks[#chunks + 1] = s:sub(i, i + CHUNK - 1) end
  return chunks
end

local function run(chunks)
  local p = core.sse_parser{ max_event = 64 * MB }
  local events = 0
  local t0 = clock()
  for i = 1, #chunks do
    events = events + #assert(p:feed(chunks[i]))
  end
  local t = clock() - t0
  assert(p:finish() == 0)
  return t, events
end

local function best_of(n, chunks, bytes)
  local best, events = math.huge, 0
  run(chunks) -- warm-up: lets the allocator settle
  for _ = 1, n do
    collectgarbage()
    local t, ev = run(chunks)
    if t < best then best, events = t, ev end
  end
  return bytes / MB / best, events
end

-- (a) ~32 MB of small events
local one = fixture_stream()
local reps = math.ceil(32 * MB / #one)
local small = one:rep(reps)
local a_chunks = split(small)
local a_rate, a_events = best_of(3, a_chunks, #small)

-- (b) one 8 MB data line
local line = ("0123456789abcdef"):rep(8 * MB / 16)
local big = "data: " .. line .. "\n\n"
local b_chunks = split(big)
local b_rate, b_events = best_of(3, b_chunks, #big)
assert(b_events == 1)

print(string.format("engine: %s", jit and jit.version or _VERSION))
print(string.format("(a) small events: %.1f MB in 16 KB chunks, %d events: %8.1f MB/s  (goal 500 MB/s: x%.2f)",
  #small / MB, a_events, a_rate, a_rate / 500))
print(string.format("(b) one 8 MB data line, 16 KB chunks:          %8.1f MB/s  (goal 2048 MB/s: x%.2f)",
  b_rate, b_rate / 2048))
