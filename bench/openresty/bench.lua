-- bench/openresty/bench.lua: lua-slm inside nginx against a plain nginx
-- proxy_pass to the same simulator, in one run (run.sh starts it).
--
-- 1. Classification: wrk POSTs {"text": ...} to the example's /classify
--    (slm.classify over cosockets, examples/openresty/app.lua), and the
--    very request body slm.classify sent (taken from the simulator's
--    /__sim/last) to /proxy/v1/chat/completions (proxy_pass with
--    keepalive).  Throughput ratio and p99 difference.
-- 2. Streaming: N-chunk streams relayed by slm.ngx.relay (/stream) and by
--    proxy_pass with proxy_buffering off (/proxy_stream/...): the
--    gateway worker's CPU time (utime + stime from /proc) per chunk.
--
-- Environment: BENCH_SECONDS (5 per measurement), BENCH_CONC (16),
-- BENCH_CHUNKS (200), REPEAT (3: rounds, the contenders alternating
-- which goes first; the median of each figure).  127.0.0.1 only.
package.path = "./?.lua;./lua/?.lua;./lua/?/init.lua;" .. package.path
local launch = require "tests.upstream.launch"
local H = require "tests.helpers"
local cjson = require "cjson"

local SECONDS = tonumber(os.getenv("BENCH_SECONDS") or "5")
local CONC = tonumber(os.getenv("BENCH_CONC") or "16")
local CHUNKS = tonumber(os.getenv("BENCH_CHUNKS") or "200")
local REPEAT = tonumber(os.getenv("REPEAT") or "3")
local ROOT = H.root()
local TEXT = "Subject: charged twice\n\nHello, my card was charged twice for order VM-4817235 yesterday. "
  .. "Please refund the second payment."

local sim = launch.start{ quiet = true }
local HTTP = ([[
    lua_shared_dict slm_metrics 4m;
    upstream sim { server 127.0.0.1:%d; keepalive 64; }
    init_by_lua_block {
      package.path = "%s/?.lua;" .. package.path
      require("examples.openresty.app").init{ base_url = "%s", api_key = "sk-bench", simulated = true,
        budget_usd = 1e9 }
    }
]]):format(sim.port, ROOT, sim.url)
local SERVER = ([[
        include %s/examples/openresty/locations.conf;
        location /proxy/ {
          proxy_pass http://sim/;
          proxy_http_version 1.1;
          proxy_set_header Connection "";
        }
        location /proxy_stream/ {
          proxy_pass http://sim/;
          proxy_http_version 1.1;
          proxy_set_header Connection "";
          proxy_set_header X-Sim-Scenario "chunks=%d";
          proxy_buffering off;
        }
        location = /stream {
          content_by_lua_block {
            local slm = require "slm"
            local c = _G.bench_stream_client or slm.client{ base_url = "%s", api_key = "sk-bench",
              max_retries = 0, headers = { ["X-Sim-Scenario"] = "chunks=%d" } }
            _G.bench_stream_client = c
            slm.ngx.relay(c:stream{ messages = { { role = "user", content = "stream" } } })
          }
        }
]]):format(ROOT, CHUNKS, sim.url, CHUNKS)
local ok, app = pcall(launch.start, { quiet = true, app = { http = HTTP, server = SERVER } })
if not ok then sim:stop(); error(app, 0) end

local function cleanup()
  app:stop()
  sim:stop()
end

local function sh(cmd) return H.sh(cmd) end

-- wrk POSTing body to url: requests/s, p99 ms, requests, errors
local function wrk(url, body, secs)
  local script = os.tmpname()
  H.write_file(script, ("wrk.method = \"POST\"\nwrk.body = %q\nwrk.headers[\"Content-Type\"] = \"application/json\"\n")
    :format(body))
  local out = sh(("wrk -t1 -c%d -d%ds --latency -s %s %s"):format(CONC, secs, H.q(script), H.q(url)))
  os.remove(script)
  local rps = tonumber(out:match("Requests/sec:%s*([%d.]+)"))
  local v, unit = out:match("\n%s*99%%%s+([%d.]+)(%a+)")
  local p99 = tonumber(v)
  if unit == "us" then p99 = p99 / 1000 elseif unit == "s" then p99 = p99 * 1000 end
  local n = tonumber(out:match("(%d+) requests in"))
  local bad = tonumber(out:match("Non%-2xx or 3xx responses: (%d+)") or "0")
  local serr = out:match("Socket errors: ([^\n]+)")
  if not rps or not p99 then cleanup(); error("wrk output not understood:\n" .. out, 0) end
  return { rps = rps, p99 = p99, n = n, bad = bad, socket_errors = serr }
end

-- CPU seconds of the app nginx's worker(s)
local function worker_cpu()
  local pid = H.read_file(app.prefix .. "/nginx.pid"):match("%d+")
  local kids = H.read_file("/proc/" .. pid .. "/task/" .. pid .. "/children") or ""
  local ticks = 0
  for w in kids:gmatch("%d+") do
    local stat = H.read_file("/proc/" .. w .. "/stat") or ""
    local after = stat:match("^%d+ %b() (.*)$")
    local f = {}
    for x in after:gmatch("%S+") do f[#f + 1] = x end
    ticks = ticks + tonumber(f[12]) + tonumber(f[13]) -- utime, stime (fields 14, 15)
  end
  local hz = tonumber((sh("getconf CLK_TCK"))) or 100
  return ticks / hz
end

local function median(list)
  table.sort(list)
  return list[math.ceil(#list / 2)]
end

local function post(path, body)
  return sh(("curl -s --max-time 10 -H 'Content-Type: application/json' --data-binary %s %s"):format(H.q(body),
    H.q(app.base .. path)))
end

-- the request slm.classify sends, for the proxy_pass contender
local classify_body = cjson.encode{ text = TEXT }
local first = cjson.decode((post("/classify", classify_body)))
assert(first.label, "classify failed")
local proxied = sim:last().raw_body
local via_proxy = cjson.decode((post("/proxy/v1/chat/completions", proxied)))
assert(via_proxy.choices, "proxy_pass failed")
local stream_body = cjson.encode{ model = "gpt-4o-mini", stream = true,
  stream_options = { include_usage = true }, messages = { { role = "user", content = "stream" } } }

print(("bench/openresty: %d s per measurement, %d connections, %d rounds, %d-chunk streams; nginx %s, 1 worker each")
  :format(SECONDS, CONC, REPEAT, CHUNKS, (sh("nginx -v 2>&1"):match("nginx/(%S+)") or "?")))

local r = { slm_rps = {}, px_rps = {}, slm_p99 = {}, px_p99 = {}, relay_cpu = {}, px_cpu = {}, slm_cpu = {},
  px_req_cpu = {} }
for round = 1, REPEAT do
  -- the contenders alternate which goes first, round by round
  -- (and the gateway worker's CPU per request, which the machine's other
  -- load moves less than the latencies)
  local function measured(url, body)
    local c0 = worker_cpu()
    local m = wrk(url, body, SECONDS)
    m.cpu = (worker_cpu() - c0) / m.n * 1e6
    return m
  end
  local a, b
  if round % 2 == 1 then
    a = measured(app.base .. "/classify", classify_body)
    b = measured(app.base .. "/proxy/v1/chat/completions", proxied)
  else
    b = measured(app.base .. "/proxy/v1/chat/completions", proxied)
    a = measured(app.base .. "/classify", classify_body)
  end
  r.slm_cpu[round], r.px_req_cpu[round] = a.cpu, b.cpu
  if a.bad > 0 or b.bad > 0 then cleanup(); error(("non-2xx replies: slm %d, proxy %d"):format(a.bad, b.bad), 0) end
  r.slm_rps[round], r.px_rps[round], r.slm_p99[round], r.px_p99[round] = a.rps, b.rps, a.p99, b.p99
  local c0 = worker_cpu()
  local s = wrk(app.base .. "/stream", "{}", SECONDS)
  local c1 = worker_cpu()
  local p = wrk(app.base .. "/proxy_stream/v1/chat/completions", stream_body, SECONDS)
  local c2 = worker_cpu()
  r.relay_cpu[round] = (c1 - c0) / (s.n * CHUNKS) * 1e6
  r.px_cpu[round] = (c2 - c1) / (p.n * CHUNKS) * 1e6
  print(("round %d: classify %.0f req/s p99 %.2f ms %.0f us CPU/req | proxy_pass %.0f req/s p99 %.2f ms %.0f us CPU/req"
    .. " | relay %.2f us/chunk (%d streams) | proxy_pass unbuffered %.2f us/chunk (%d streams)"):format(round,
    a.rps, a.p99, a.cpu, b.rps, b.p99, b.cpu, r.relay_cpu[round], s.n, r.px_cpu[round], p.n))
end
cleanup()

local srps, prps = median(r.slm_rps), median(r.px_rps)
local sp99, pp99 = median(r.slm_p99), median(r.px_p99)
local rc, pc = median(r.relay_cpu), median(r.px_cpu)
print()
print("| figure (median of " .. REPEAT .. ") | lua-slm | proxy_pass | ratio / difference | goal |")
print("|---|---|---|---|---|")
print(("| classification, requests/s | %.0f | %.0f | %.2f | >= 0.70 |"):format(srps, prps, srps / prps))
print(("| classification, p99 latency | %.2f ms | %.2f ms | %+.2f ms | <= 2 ms |"):format(sp99, pp99, sp99 - pp99))
local sc, pcr = median(r.slm_cpu), median(r.px_req_cpu)
print(("| classification, gateway CPU per request | %.0f us | %.0f us | %+.0f us | |"):format(sc, pcr, sc - pcr))
print(("| stream relay, gateway CPU per chunk | %.2f us | %.2f us | %.1fx | |"):format(rc, pc, rc / pc))
