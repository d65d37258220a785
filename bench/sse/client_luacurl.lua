-- bench/sse/client_luacurl.lua: contender (2) of the streaming client
-- benchmark, what a Lua user writes without lua-slm: lua-curl + lua-cjson
-- under Lua 5.1 (Debian builds lua-curl for Lua 5.1 and 5.2 only), with the
-- SSE lines split in Lua (run by run.sh; see README.md).
--
--   lua5.1 bench/sse/client_luacurl.lua URL
--   env: BENCH_N (100000 chunks), BENCH_RUNS (3 timed runs),
--        BENCH_WARMUP_N (10000), BENCH_WARMUP_RUNS (3)
--
-- The binding: Lua-cURLv3 (`require "cURL"`) when installed, else Debian's
-- lua-curl 0.3.0 (`require "curl"`, Enrico Tassi's binding: easy_init,
-- setopt(curl.OPT_*), perform).  Both run one blocking easy handle whose
-- WRITEFUNCTION gets the body as libcurl reads it (pieces of up to 16 KB).
--
-- The user's code is written the way a competent Lua programmer would: the
-- write callback appends to a pending buffer, cuts complete lines with
-- string.find("\n", pos, true) and string.sub (a trailing "\r" dropped),
-- keeps only the unfinished tail, collects "data: " lines and dispatches an
-- event at each blank line: "[DONE]" ends the stream, anything else is
-- cjson.decode'd and choices[1].delta.content goes into a table that is
-- concatenated at the end.  No re-scanning of the buffer and no quadratic
-- string building, so this peer is not made slow on purpose.
--
-- CPU is os.clock() (clock(3): user+sys CPU of this process) from just before
-- the request until the verified text; wall is LuaSocket's gettime when
-- installed, else /proc/uptime (10 ms).  Same output as client_slm.lua.
local cjson = require "cjson"

local url = arg[1]
if not url then
  io.stderr:write("usage: lua5.1 bench/sse/client_luacurl.lua URL\n")
  os.exit(2)
end
local N = tonumber(os.getenv("BENCH_N") or "100000")
local RUNS = tonumber(os.getenv("BENCH_RUNS") or "3")
local WARMUP_N = tonumber(os.getenv("BENCH_WARMUP_N") or "10000")
local WARMUP_RUNS = tonumber(os.getenv("BENCH_WARMUP_RUNS") or "3")

local wall
do
  local oks, socket = pcall(require, "socket")
  if oks and socket.gettime then
    wall = socket.gettime
  else
    wall = function()
      local u = assert(io.open("/proc/uptime"))
      local s = u:read("*n")
      u:close()
      return s
    end
  end
end

-- post(url, headers, body, on_bytes) -> true | nil, message: one blocking
-- POST whose reply body goes to on_bytes(s) as it arrives.
local post, binding
do
  local okv3, cURL = pcall(require, "cURL")
  if okv3 and type(cURL) == "table" and cURL.easy then
    binding = "Lua-cURLv3"
    local easy = cURL.easy()
    post = function(u, headers, body, on_bytes)
      easy:setopt{ url = u, httpheader = headers, postfields = body, timeout = 120 }
      easy:setopt_writefunction(on_bytes)
      local ok, err = pcall(easy.perform, easy)
      if not ok then return nil, tostring(err) end
      local code = easy:getinfo_response_code()
      if code ~= 200 then return nil, "HTTP " .. tostring(code) end
      return true
    end
  else
    local curl = require "curl"
    binding = "lua-curl " .. tostring(curl._VERSION)
    local easy = curl.easy_init() -- one handle: libcurl keeps the connection alive
    local status = 0
    easy:setopt(curl.OPT_HEADERFUNCTION, function(s)
      local code = s:match("^HTTP/%S+ (%d+)")
      if code then status = tonumber(code) end
      return #s
    end)
    easy:setopt(curl.OPT_TIMEOUT, 120)
    post = function(u, headers, body, on_bytes)
      easy:setopt(curl.OPT_URL, u)
      easy:setopt(curl.OPT_HTTPHEADER, headers)
      easy:setopt(curl.OPT_POSTFIELDS, body)
      easy:setopt(curl.OPT_WRITEFUNCTION, function(s)
        on_bytes(s)
        return #s
      end)
      status = 0
      local rc, msg = easy:perform()
      if rc ~= 0 then return nil, "curl error " .. tostring(rc) .. ": " .. tostring(msg) end
      if status ~= 200 then return nil, "HTTP " .. status end
      return true
    end
  end
end

-- The user's code ------------------------------------------------------------

local find, sub, concat, decode = string.find, string.sub, table.concat, cjson.decode
local URL_CHAT = url .. "/chat/completions"
local HEADERS = { "Content-Type: application/json", "Accept: text/event-stream", "Authorization: Bearer sk-bench" }

-- Streams one chat completion; returns the text, the number of content
-- chunks, the finish_reason and the usage (or nil, message).
local function stream_chat(model)
  local body = cjson.encode({
    model = model,
    messages = { { role = "user", content = "Stream a long answer, please." } },
    stream = true,
    stream_options = { include_usage = true },
  })
  local parts, nparts = {}, 0
  local pending = ""            -- bytes after the last complete line
  local data, ndata = {}, 0     -- data lines of the event being read
  local done, finish, usage, bad = false, nil, nil, nil

  local function dispatch()
    local payload = ndata == 1 and data[1] or concat(data, "\n", 1, ndata)
    ndata = 0
    if payload == "[DONE]" then
      done = true
      return
    end
    local ok, chunk = pcall(decode, payload)
    if not ok or type(chunk) ~= "table" then
      bad = bad or ("bad chunk: " .. sub(payload, 1, 80))
      return
    end
    local choice = chunk.choices and chunk.choices[1]
    if type(choice) == "table" then
      local delta = choice.delta
      local content = type(delta) == "table" and delta.content
      if type(content) == "string" and content ~= "" then
        nparts = nparts + 1
        parts[nparts] = content
      end
      if type(choice.finish_reason) == "string" then finish = choice.finish_reason end
    end
    if type(chunk.usage) == "table" then usage = chunk.usage end
  end

  local function on_bytes(s)
    local buf = pending == "" and s or pending .. s
    local pos = 1
    while true do
      local nl = find(buf, "\n", pos, true)
      if not nl then break end
      local line_end = nl - 1
      if sub(buf, line_end, line_end) == "\r" then line_end = line_end - 1 end
      if line_end < pos then
        if ndata > 0 then dispatch() end      -- blank line: end of event
      elseif sub(buf, pos, pos + 5) == "data: " then
        ndata = ndata + 1
        data[ndata] = sub(buf, pos + 6, line_end)
      end                                      -- comments, other fields: skipped
      pos = nl + 1
    end
    pending = sub(buf, pos)
  end

  local ok, err = post(URL_CHAT, HEADERS, body, on_bytes)
  if not ok then return nil, err end
  if bad then return nil, bad end
  if not done then return nil, "stream ended without [DONE]" end
  return concat(parts, "", 1, nparts), nparts, finish, usage
end

-- The harness ----------------------------------------------------------------

local function one_run(n)
  collectgarbage()
  collectgarbage()
  local c0, t0 = os.clock(), wall()
  local text, count, finish, usage = stream_chat("sim:chunks=" .. n)
  local bad
  if not text then
    bad = "error: " .. tostring(count)
  elseif count ~= n then
    bad = ("%d content chunks, want %d"):format(count, n)
  elseif text ~= ("tok "):rep(n) then
    bad = ("text of %d bytes differs from N x 'tok '"):format(#text)
  elseif finish ~= "stop" then
    bad = "finish_reason " .. tostring(finish)
  elseif not usage or usage.completion_tokens ~= n then
    bad = "usage does not say N tokens"
  end
  local cpu, secs = os.clock() - c0, wall() - t0
  return bad, count or 0, text and #text or 0, secs, cpu
end

for _ = 1, WARMUP_RUNS do
  local bad = one_run(WARMUP_N)
  if bad then
    io.stderr:write("client_luacurl: warm-up run failed: ", bad, "\n")
    print(("RESULT name=lua-curl ok=0 why=%q"):format(bad))
    os.exit(1)
  end
end

local best
for r = 1, RUNS do
  local bad, count, bytes, secs, cpu = one_run(N)
  io.stderr:write(("  lua-curl     run %d: %d chunks, %d bytes, wall %.3f s, cpu %.3f s%s\n"):format(
    r, count, bytes, secs, cpu, bad and ("  FAILED: " .. bad) or ""))
  if bad then
    print(("RESULT name=lua-curl ok=0 why=%q"):format(bad))
    os.exit(1)
  end
  if not best or cpu < best.cpu then
    best = { count = count, bytes = bytes, wall = secs, cpu = cpu }
  end
end

io.stderr:write("  (", binding, ", ", _VERSION, ", cjson ", tostring(cjson._VERSION), ")\n")
print(("RESULT name=lua-curl ok=1 chunks=%d bytes=%d wall=%.4f cpu=%.4f"):format(
  best.count, best.bytes, best.wall, best.cpu))
