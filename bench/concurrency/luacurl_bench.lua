-- bench/concurrency/luacurl_bench.lua: peer (b) of the concurrency benchmark,
-- the way a Lua user calls a chat-completions API without lua-slm, using
-- Debian's packages: lua-curl (require "curl") + lua-cjson, under lua5.1
-- (Debian builds lua-curl for Lua 5.1 and 5.2 only).
--
--   lua5.1 bench/concurrency/luacurl_bench.lua URL
--   env: BENCH_N (1000 timed requests), BENCH_WARMUP (50)
--
-- Debian's lua-curl is Enrico Tassi's binding, version 0.3.0: its whole API
-- is curl.easy_init(), easy:setopt(curl.OPT_*, v) and a blocking
-- easy:perform().  It has no multi interface (and no getinfo), so this peer
-- cannot keep requests in flight concurrently: it does what a competent user
-- of that binding does, one easy handle reused for every request (libcurl
-- keeps the connection alive), one request at a time.  Its CPU per request is
-- comparable; its throughput is bound by the 20 ms server delay.
--
-- Prints the same RESULT line as slm_bench.lua.  CPU: os.clock(), which is
-- clock(3), the process's user+sys CPU time.
local curl = require "curl"
local cjson = require "cjson"

local url = arg[1]
if not url then
  io.stderr:write("usage: lua5.1 bench/concurrency/luacurl_bench.lua URL\n")
  os.exit(2)
end
local N = tonumber(os.getenv("BENCH_N") or "1000")
local WARMUP = tonumber(os.getenv("BENCH_WARMUP") or "50")

local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
local f = assert(io.open(here .. "prompt.json", "rb"))
local P = cjson.decode(f:read("*a"))
f:close()

-- wall clock: LuaSocket's gettime when installed, else /proc/uptime (10 ms)
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

-- The user's code ----------------------------------------------------------

local easy = curl.easy_init()
easy:setopt(curl.OPT_URL, url .. "/chat/completions")
easy:setopt(curl.OPT_HTTPHEADER, {
  "Content-Type: application/json",
  "Authorization: Bearer sk-bench",
  "X-Sim-Scenario: " .. P.scenario,
})
easy:setopt(curl.OPT_TIMEOUT, 60)

local parts, nparts, status = {}, 0, 0
easy:setopt(curl.OPT_WRITEFUNCTION, function(s)
  nparts = nparts + 1
  parts[nparts] = s
  return #s
end)
easy:setopt(curl.OPT_HEADERFUNCTION, function(s)
  local code = s:match("^HTTP/%S+ (%d+)")
  if code then status = tonumber(code) end
  return #s
end)

local system, user_tpl = P.system, P.user

-- returns the reply text, or nil and a message
local function chat(i)
  local body = cjson.encode({
    model = P.model,
    max_tokens = P.max_tokens,
    messages = {
      { role = "system", content = system },
      { role = "user", content = (user_tpl:gsub("{i}", tostring(i))) },
    },
  })
  easy:setopt(curl.OPT_POSTFIELDS, body)
  nparts, status = 0, 0
  local rc, msg = easy:perform()
  if rc ~= 0 then return nil, "curl error " .. tostring(rc) .. ": " .. tostring(msg) end
  local text = table.concat(parts, "", 1, nparts)
  if status ~= 200 then return nil, "HTTP " .. status .. ": " .. text:sub(1, 200) end
  local okd, obj = pcall(cjson.decode, text)
  if not okd or type(obj) ~= "table" or type(obj.choices) ~= "table" or not obj.choices[1] then
    return nil, "bad reply: " .. text:sub(1, 200)
  end
  return obj.choices[1].message.content
end

-- The harness ---------------------------------------------------------------

local ok, errors, first_err = 0, 0, nil

local function batch(first, count)
  for i = first, first + count - 1 do
    local text, err = chat(i)
    local want = "Echo: Ticket #" .. i .. ":"
    if type(text) == "string" and text:sub(1, #want) == want then
      ok = ok + 1
    else
      errors = errors + 1
      first_err = first_err or err or ("unexpected reply: " .. tostring(text))
    end
  end
end

local function peak_rss_kb()
  local s = io.open("/proc/self/status")
  if not s then return 0 end
  local t = s:read("*a")
  s:close()
  return tonumber(t:match("VmHWM:%s*(%d+)")) or 0
end

batch(1, WARMUP)
local werr = errors
ok, errors = 0, 0
collectgarbage()

local t0, c0 = wall(), os.clock()
batch(WARMUP + 1, N)
local secs, cpu = wall() - t0, os.clock() - c0

if first_err then io.stderr:write("luacurl_bench: first error: ", first_err, "\n") end
if werr > 0 then io.stderr:write("luacurl_bench: warm-up had ", werr, " errors\n") end
print(("RESULT name=luacurl mode=seq n=%d conc=1 seconds=%.4f cpu=%.4f rss_kb=%d ok=%d errors=%d"):format(
  N, secs, cpu, peak_rss_kb(), ok, errors))
