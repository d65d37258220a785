-- bench/sse/client_slm.lua: contender (1) of the streaming client benchmark,
-- lua-slm consuming one long stream from the simulator (run by run.sh; see
-- README.md).
--
--   LUA_PATH="lua/?.lua;lua/?/init.lua;./?.lua;;" LUA_CPATH="build/?.so;;" \
--     lua5.4 bench/sse/client_slm.lua URL chat|iter
--
--   chat: client:chat{ stream = true, on_delta = function(text) ... end }
--   iter: for text in client:stream{ ... } do ... end; s:result()
--   breakdown: where chat's CPU goes (see breakdown() below); run.sh runs
--              it unless BENCH_BREAKDOWN=0
--
-- env: BENCH_N (100000 chunks), BENCH_RUNS (3 timed runs),
--      BENCH_WARMUP_N (10000), BENCH_WARMUP_RUNS (3)
--
-- Each run asks for model "sim:chunks=N": the simulator sends a role chunk,
-- exactly N content chunks of "tok ", a finish chunk, a usage chunk (lua-slm
-- always asks for stream_options.include_usage; the other contenders ask
-- for it too, so every contender reads the same bytes) and [DONE].  A run
-- counts only when every content chunk arrived, the final res.text is
-- exactly N x "tok ", finish_reason is "stop" and usage says N tokens.
--
-- CPU is core.cputime() (clock_gettime(CLOCK_PROCESS_CPUTIME_ID): user+sys
-- of this process) from just before the call until the verified result;
-- wall is core.now().  Prints one line per timed run to stderr and one
-- RESULT line (the run with the least CPU) to stdout.
local slm = require "slm"
local core = require "slm.core"

local url, mode = arg[1], arg[2] or "chat"
if not url or (mode ~= "chat" and mode ~= "iter" and mode ~= "breakdown") then
  io.stderr:write("usage: lua5.4 bench/sse/client_slm.lua URL chat|iter|breakdown\n")
  os.exit(2)
end
local N = tonumber(os.getenv("BENCH_N") or "100000")
local RUNS = tonumber(os.getenv("BENCH_RUNS") or "3")
local WARMUP_N = tonumber(os.getenv("BENCH_WARMUP_N") or "10000")
local WARMUP_RUNS = tonumber(os.getenv("BENCH_WARMUP_RUNS") or "3")
local cputime, now = core.cputime, core.now

local client = slm.client{ base_url = url, api_key = "sk-bench", max_retries = 0 }
local messages = { { role = "user", content = "Stream a long answer, please." } }

-- The user's code ------------------------------------------------------------

local function with_callback(n)
  local count = 0
  local res, err = client:chat{
    model = "sim:chunks=" .. n,
    messages = messages,
    stream = true,
    on_delta = function(text)
      if text ~= "" then count = count + 1 end
    end,
  }
  return res, err, count
end

local function with_iterator(n)
  local count = 0
  local s = client:stream{ model = "sim:chunks=" .. n, messages = messages }
  for text in s do
    if text ~= "" then count = count + 1 end
  end
  local res, err = s:result()
  return res, err, count
end

local consume = mode == "chat" and with_callback or with_iterator

-- The breakdown ---------------------------------------------------------------
-- Differential profile of chat{on_delta}: the same N-chunk stream, captured
-- once with the curl CLI, is replayed from memory through a stand-in
-- transport (no libcurl, no scheduler waits); the parser's feed_chat (the C
-- fast path that returns content chunks as text) is timed alone.  The
-- differences in CPU time (best of 5) are what each stage costs per chunk.
local function breakdown()
  local body = '{"model":"sim:chunks=' .. N .. '","stream":true,"stream_options":{"include_usage":true},'
    .. '"messages":[{"role":"user","content":"Stream a long answer, please."}]}'
  local pipe = assert(io.popen("curl -s -N -H 'Content-Type: application/json' --data-binary '"
    .. body .. "' '" .. url .. "/chat/completions'"))
  local all = pipe:read("a")
  pipe:close()
  local pieces = {}
  for i = 1, #all, 65536 do pieces[#pieces + 1] = all:sub(i, i + 65535) end
  -- a runtime: the libcurl one's sleep, semaphore, ..., with connections
  -- that replay the captured stream
  local memory = {}
  for k, v in pairs(require "slm.transport.curl") do memory[k] = v end
  memory.open = function()
    local i = 0
    return {
      response = function() return 200, { ["content-type"] = "text/event-stream" } end,
      read = function() i = i + 1; return pieces[i] end,
      result = function() return true end, cancel = function() end, info = function() return {} end,
    }
  end
  local mem = slm.client{ base_url = "http://memory/v1", transport = memory, max_retries = 0 }
  local function run(c)
    local count = 0
    local res, err = c:chat{ model = "sim:chunks=" .. N, messages = messages, stream = true,
      on_delta = function(text) if text ~= "" then count = count + 1 end end }
    assert(res and count == N, tostring(err))
  end
  local function best(fn)
    fn()
    local b = math.huge
    for _ = 1, 5 do
      collectgarbage()
      collectgarbage()
      local c0 = cputime()
      fn()
      local t = cputime() - c0
      if t < b then b = t end
    end
    return b / N * 1e6
  end
  local net = best(function() run(client) end)
  local inmem = best(function() run(mem) end)
  -- all of id, created, model and system_fingerprint known: what the
  -- stream uses once the first chunk went through the accumulator
  local feed = best(function()
    local p = core.sse_parser()
    for i = 1, #pieces do p:feed_chat(pieces[i], 15) end
  end)
  local function row(what, us) print(("  %-62s %5.2f us  %3.0f%%"):format(what, us, us / net * 100)) end
  print(("lua-slm chat{on_delta}, %d chunks, CPU per chunk (best of 5 each; differences of runs):"):format(N))
  row("whole call over the network", net)
  row("transport: libcurl, multi step, scheduler, body copies", net - inmem)
  row("SSE parser + C content fast path (feed_chat)", feed)
  row("accumulator, lazy chunks, Stream:next, pcall(on_delta), the callback", inmem - feed)
end

if mode == "breakdown" then
  breakdown()
  return
end

-- The harness ----------------------------------------------------------------

-- nil when the run is complete and exact, else what is wrong
local function check(n, res, err, count)
  if not res then return "error: " .. tostring(err) end
  if count ~= n then return ("%d content chunks, want %d"):format(count, n) end
  if #res.text ~= 4 * n then return ("text of %d bytes, want %d"):format(#res.text, 4 * n) end
  if res.text ~= ("tok "):rep(n) then return "text differs from N x 'tok '" end
  if res.finish_reason ~= "stop" then return "finish_reason " .. tostring(res.finish_reason) end
  if not res.usage or res.usage.completion_tokens ~= n then return "usage does not say N tokens" end
  return nil
end

local function one_run(n)
  collectgarbage()
  collectgarbage()
  local c0, t0 = cputime(), now()
  local res, err, count = consume(n)
  local bad = check(n, res, err, count)
  local cpu, wall = cputime() - c0, now() - t0
  return bad, count, res and #res.text or 0, wall, cpu
end

for _ = 1, WARMUP_RUNS do
  local bad = one_run(WARMUP_N)
  if bad then
    io.stderr:write("client_slm ", mode, ": warm-up run failed: ", bad, "\n")
    print(("RESULT name=lua-slm-%s ok=0 why=%q"):format(mode, bad))
    os.exit(1)
  end
end

local best
for r = 1, RUNS do
  local bad, count, bytes, wall, cpu = one_run(N)
  io.stderr:write(("  lua-slm %-4s run %d: %d chunks, %d bytes, wall %.3f s, cpu %.3f s%s\n"):format(
    mode, r, count, bytes, wall, cpu, bad and ("  FAILED: " .. bad) or ""))
  if bad then
    print(("RESULT name=lua-slm-%s ok=0 why=%q"):format(mode, bad))
    os.exit(1)
  end
  if not best or cpu < best.cpu then
    best = { count = count, bytes = bytes, wall = wall, cpu = cpu }
  end
end

print(("RESULT name=lua-slm-%s ok=1 chunks=%d bytes=%d wall=%.4f cpu=%.4f"):format(
  mode, best.count, best.bytes, best.wall, best.cpu))
