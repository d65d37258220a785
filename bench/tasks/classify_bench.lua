-- bench/tasks/classify_bench.lua: the CPU a slm.classify call costs against
-- a bare client:chat carrying the same request, side by side in one
-- process, against the simulator (run.sh starts it).
--
--   lua5.4 bench/tasks/classify_bench.lua URL
--   env: BENCH_N (2000 calls per round), BENCH_ROUNDS (5), BENCH_CONC (1: one at a time; the
--        task's own work is what is measured, not the waiting)
--
-- Both sides send the same body (captured from classify with a recording
-- client) and decode the reply; classify adds its prompt building, schema
-- validation, confidence from logprobs and the ledger.  CPU is
-- core.cputime() (this process), best round of each side; rounds alternate.
local slm = require "slm"
local core = slm.core
local json = require "slm.json"

local url = arg[1] or error("usage: lua5.4 bench/tasks/classify_bench.lua URL")
local N = tonumber(os.getenv("BENCH_N") or "2000")
local ROUNDS = tonumber(os.getenv("BENCH_ROUNDS") or "5")

local LABELS = { billing = "payments, invoices, refunds", delivery = "parcels, couriers, tracking",
  technical = "the app, errors, devices", account = "login, password, profile", other = "anything else" }
local TEXT = "Hello, I was charged twice for order #58213 yesterday, please refund one of the payments."

local client = slm.client{ base_url = url, api_key = "sk-bench", model = "gpt-4o-mini", max_retries = 0 }

-- the body classify sends, recorded once
local recorded
local recorder = { model = "gpt-4o-mini", fallback = {}, chat = function(_, req)
  recorded = req
  return client:chat(req)
end }
assert(slm.classify{ client = recorder, text = TEXT, labels = LABELS })

local function bare()
  local req = {}
  for k, v in pairs(recorded) do req[k] = v end
  local res = assert(client:chat(req))
  local v = json.decode(res.text)
  assert(v.label)
  return v
end

local function task()
  local res = assert(slm.classify{ client = client, text = TEXT, labels = LABELS })
  assert(res.label)
  return res
end

local function round(fn)
  collectgarbage()
  local c0 = core.cputime()
  for _ = 1, N do fn() end
  return (core.cputime() - c0) / N * 1e6
end

for _ = 1, 50 do bare(); task() end -- warm-up: connections, tokenizer, caches
local best = { bare = math.huge, task = math.huge }
local all = { bare = {}, task = {} }
for r = 1, ROUNDS do
  for _, side in ipairs(r % 2 == 1 and { "bare", "task" } or { "task", "bare" }) do
    local us = round(side == "bare" and bare or task)
    all[side][#all[side] + 1] = string.format("%.1f", us)
    if us < best[side] then best[side] = us end
  end
end
print(("RESULT n=%d rounds=%d bare_us=%.1f task_us=%.1f ratio=%.3f bare_rounds=%s task_rounds=%s"):format(
  N, ROUNDS, best.bare, best.task, best.task / best.bare, table.concat(all.bare, ","), table.concat(all.task, ",")))
