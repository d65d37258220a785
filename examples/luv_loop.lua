-- examples/luv_loop.lua: lua-slm inside a program that already has an event
-- loop (luv, Debian's lua-luv).  The loop owns the process: it watches
-- lua-slm's descriptor and timeout and calls slm.loop.step() when either
-- fires, and lua-slm's requests, retries and streams run as tasks in
-- between, while the program's own luv work (here a ticker) goes on.
--
--   lua5.4 examples/luv_loop.lua            # against the bundled simulator
--   SLM_BASE_URL=... SLM_API_KEY=... lua5.4 examples/luv_loop.lua
--
-- The pattern (slm.loop is the libcurl runtime's hook for outer loops):
--   local poll  = uv.new_poll(slm.loop.fd())       -- readable: step
--   local timer = uv.new_timer()                    -- slm.loop.timeout(): step
--   slm.spawn(function() ... client:chat{...} ... end)  -- work starts as tasks
--   pump()                                          -- step once, re-arm the timer
--   uv.run()
-- Inside luv callbacks start lua-slm work with slm.spawn: a client:chat
-- made directly there would drive lua-slm's loop itself and stall luv's.
do -- run from a checkout without installing
  local here = (arg and arg[0] or ""):match("^(.*)/[^/]*$") or "."
  package.path = here .. "/../lua/?.lua;" .. here .. "/../lua/?/init.lua;" .. here .. "/../?.lua;" .. package.path
  package.cpath = here .. "/../build/?.so;" .. package.cpath
end

local uv = require "luv"
local slm = require "slm"

local function getenv(k)
  local v = os.getenv(k)
  return v ~= "" and v or nil
end

-- The backend: the caller's endpoint, else the bundled simulator.
local up
local opts = { model = getenv("SLM_MODEL") or "gpt-4o-mini" }
if not (getenv("SLM_BASE_URL") or getenv("OPENAI_BASE_URL")) then
  up = require("tests.upstream.launch").start{ quiet = true }
  opts.base_url, opts.api_key = up.url, "sk-local-simulator"
  print("luv_loop: using the local simulator at " .. up.url)
end
local client = slm.client(opts)

local questions = {
  "Where is my parcel? Order #58177 was due Monday.",
  "Списали деньги дважды за заказ 58213, верните, пожалуйста.",
  "How do I reset my password?",
  "Can I change the delivery address after ordering?",
}

-- The program's own luv work: a ticker every 10 ms.
local ticks, ticks_during = 0, 0
local ticker = uv.new_timer()
ticker:start(10, 10, function() ticks = ticks + 1 end)

-- lua-slm's work, as tasks: the questions concurrently, then one streamed reply.
local answers, streamed, failures = {}, {}, 0
local t0 = slm.core.now()
slm.spawn(function()
  local before = ticks
  local results, errs = slm.map(questions, function(q)
    return client:chat{ messages = { { role = "user", content = q } }, max_tokens = 80 }
  end, { concurrency = #questions })
  for i = 1, #questions do
    if results[i] then answers[i] = results[i].text else failures = failures + 1; answers[i] = tostring(errs[i]) end
  end
  local res, err = client:chat{ messages = { { role = "user", content = "Thank the customer in one sentence." } },
    stream = true, on_delta = function(text) streamed[#streamed + 1] = text end }
  if not res then failures = failures + 1; print("luv_loop: stream failed: " .. tostring(err)) end
  ticks_during = ticks - before
end)

-- The bridge: lua-slm's descriptor and timeout in luv's loop.
local fd = slm.loop.fd()
if not fd then error("luv_loop: this build of slm.core waits with poll(): it has no descriptor for an outer loop") end
local poll, timer = uv.new_poll(fd), uv.new_timer()
local steps = 0
local function pump()
  steps = steps + 1
  if slm.loop.step() == 0 then -- no task left: unhook
    poll:stop(); timer:stop(); ticker:stop()
    poll:close(); timer:close(); ticker:close()
    return
  end
  local t = slm.loop.timeout()
  timer:stop()
  if t then timer:start(math.ceil(t * 1000), 0, pump) end
end
poll:start("r", pump)
pump()
uv.run()

local elapsed = slm.core.now() - t0
for i, q in ipairs(questions) do print(("Q%d %s\n   -> %s"):format(i, q, answers[i])) end
print("streamed: " .. table.concat(streamed))
print(("luv_loop: %d requests + 1 stream in %.2f s, %d luv ticks meanwhile, %d steps, %d failed, %d tokens"):format(
  #questions, elapsed, ticks_during, steps, failures, client.stats.prompt_tokens + client.stats.completion_tokens))
if up then up:stop() end
os.exit(failures == 0 and 0 or 1)
