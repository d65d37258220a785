-- bench/concurrency/slm_bench.lua: lua-slm contenders of the concurrency
-- benchmark (run by bench/concurrency/run.sh; see README.md there).
--
--   lua5.4 bench/concurrency/slm_bench.lua MODE URL
--     MODE  map  slm.map over the requests, concurrency BENCH_CONC (50)
--           seq  the same requests one at a time (a plain loop)
--     URL   the simulator's base URL, e.g. http://127.0.0.1:PORT/v1
--   env: BENCH_N (1000 timed requests), BENCH_WARMUP (50), BENCH_CONC (50)
--
-- Prints one line:
--   RESULT name=... mode=... n=... conc=... seconds=... cpu=... rss_kb=... ok=... errors=... mean_ms=...
-- seconds: wall time of the timed requests; cpu: user+sys CPU seconds of
-- this process over the same span (core.cputime, CLOCK_PROCESS_CPUTIME_ID);
-- rss_kb: VmHWM (peak RSS) at the end; ok: replies with the expected
-- content; errors: everything else; mean_ms: mean time a client:chat call
-- took (core.now before and after it), the figure to hold against the
-- curl CLI calibration's mean latency.
local slm = require "slm"
local json = require "slm.json"
local core = slm.core

local mode, url = arg[1], arg[2]
if (mode ~= "map" and mode ~= "seq") or not url then
  io.stderr:write("usage: lua5.4 bench/concurrency/slm_bench.lua map|seq URL\n")
  os.exit(2)
end
local N = math.tointeger(tonumber(os.getenv("BENCH_N") or "1000"))
local WARMUP = math.tointeger(tonumber(os.getenv("BENCH_WARMUP") or "50"))
local CONC = math.tointeger(tonumber(os.getenv("BENCH_CONC") or "50"))

local here = debug.getinfo(1, "S").source:match("^@(.*[/\\])") or "./"
local f = assert(io.open(here .. "prompt.json", "rb"))
local P = json.decode(f:read("a"))
f:close()

local client = slm.client{
  base_url = url,
  api_key = "sk-bench",
  max_concurrency = CONC,
  headers = { ["X-Sim-Scenario"] = P.scenario },
}

local system, user_tpl, model, max_tokens = P.system, P.user, P.model, P.max_tokens

-- One request: what a user of lua-slm writes.
local function ask(i)
  return client:chat{
    model = model,
    max_tokens = max_tokens,
    messages = {
      { role = "system", content = system },
      { role = "user", content = (user_tpl:gsub("{i}", tostring(i))) },
    },
  }
end

local ok, errors, first_err = 0, 0, nil
local lat_sum = 0.0

local function check(i, res, err)
  local want = "Echo: Ticket #" .. i .. ":"
  if res and type(res.text) == "string" and res.text:sub(1, #want) == want then
    ok = ok + 1
  else
    errors = errors + 1
    first_err = first_err or (err and tostring(err) or ("unexpected reply: " .. tostring(res and res.text)))
  end
end

local function batch(first, count)
  if mode == "map" then
    local list = {}
    for k = 1, count do list[k] = first + k - 1 end
    slm.map(list, function(i)
      local t = core.now()
      local res, err = ask(i)
      lat_sum = lat_sum + (core.now() - t)
      check(i, res, err)
      return true
    end, { concurrency = CONC })
  else
    for i = first, first + count - 1 do
      local t = core.now()
      local res, err = ask(i)
      lat_sum = lat_sum + (core.now() - t)
      check(i, res, err)
    end
  end
end

local function peak_rss_kb()
  local s = io.open("/proc/self/status")
  if not s then return 0 end
  local t = s:read("a")
  s:close()
  return tonumber(t:match("VmHWM:%s*(%d+)")) or 0
end

-- warm-up: connections, allocator, lazily loaded modules
batch(1, WARMUP)
local wok, werr = ok, errors
ok, errors, lat_sum = 0, 0, 0.0
collectgarbage()

local t0, c0 = core.now(), core.cputime()
batch(WARMUP + 1, N)
local secs, cpu = core.now() - t0, core.cputime() - c0

if first_err then io.stderr:write("slm_bench: first error: ", first_err, "\n") end
if werr > 0 then io.stderr:write("slm_bench: warm-up had ", werr, " errors (", wok, " ok)\n") end
print(("RESULT name=%s mode=%s n=%d conc=%d seconds=%.4f cpu=%.4f rss_kb=%d ok=%d errors=%d mean_ms=%.3f"):format(
  mode == "map" and "lua-slm" or "lua-slm-seq", mode, N, mode == "map" and CONC or 1,
  secs, cpu, peak_rss_kb(), ok, errors, lat_sum / N * 1000))
