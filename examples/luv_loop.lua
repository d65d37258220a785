-- examples/luv_loop.lua: lua-slm inside a program that already has an event
-- loop (luv, Debian's lua-luv).  The loop owns the process: it watches
-- lua-slm's descriptor and timeout and calls slm.loop.step() when either
-- fires, and lua-slm's requests, retries and streams run as tasks in
-- between, while the program's own luv work (here a ticker) goes on.
--
--   lua5.4 examples/luv_loop.lua            # against the bundled simulator
--   SLM_BASE_URL=... SLM_API_KEY=... lua5.4 examples/luv_loop.lua
--
-- Backend as in the other examples (examples/lib/backend.lua): with
-- OPENAI_API_KEY, SLM_API_KEY or SLM_BASE_URL set, that endpoint; with none
-- of them the bundled simulator, stopped at the end whatever happens
-- (Ctrl-C or SIGTERM: exit 130; an error: exit 1). Exit 0 when every
-- request succeeded.
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
  package.path = here .. "/../?.lua;" .. here .. "/../lua/?.lua;" .. here .. "/../lua/?/init.lua;" .. package.path
  package.cpath = here .. "/../build/?.so;" .. package.cpath
end

local uv = require "luv"
local slm = require "slm"
local backend = require "examples.lib.backend"

local questions = {
  "Where is my parcel? Order #58177 was due Monday.",
  "Списали деньги дважды за заказ 58213, верните, пожалуйста.",
  "How do I reset my password?",
  "Can I change the delivery address after ordering?",
}

local function run(b, argv)
  if argv[1] then error("unknown argument " .. argv[1] .. " (try --help)", 0) end
  local client = slm.client{ base_url = b.base_url, api_key = b.api_key, model = b.model }

  -- The program's own luv work: a ticker every 10 ms.
  local ticks, ticks_during = 0, 0
  local ticker = uv.new_timer()
  ticker:start(10, 10, function() ticks = ticks + 1 end)

  -- lua-slm's work, as tasks: the questions concurrently, then one streamed reply.
  local answers, streamed, failures, notes = {}, {}, 0, {}
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
    if not res then failures = failures + 1; notes[#notes + 1] = "luv_loop: stream failed: " .. tostring(err) end
    ticks_during = ticks - before
  end)

  -- The bridge: lua-slm's descriptor and timeout in luv's loop.
  local fd = slm.loop.fd()
  if not fd then error("luv_loop: this build of slm.core waits with poll(): it has no descriptor for an outer loop", 0) end
  local poll, timer = uv.new_poll(fd), uv.new_timer()
  -- luv ends the process on an error in a callback, and Ctrl-C would stop
  -- it inside one: both would skip the simulator's stop. So the callbacks
  -- catch errors, SIGINT and SIGTERM are luv's signals, and either of them
  -- unhooks everything and leaves uv.run; the error is raised after it.
  local signals, stopped_by = {}, nil
  local function unhook()
    for _, h in ipairs({ poll, timer, ticker, signals[1], signals[2] }) do
      if not h:is_closing() then h:close() end
    end
  end
  local function quit(why)
    stopped_by = stopped_by or why
    unhook()
    uv.stop()
  end
  local steps = 0
  local function pump()
    local ok, err = pcall(function()
      steps = steps + 1
      if slm.loop.step() == 0 then -- no task left: unhook
        unhook()
        return
      end
      local t = slm.loop.timeout()
      timer:stop()
      if t then timer:start(math.ceil(t * 1000), 0, pump) end
    end)
    if not ok then quit(tostring(err)) end
  end
  for i, name in ipairs({ "sigint", "sigterm" }) do
    signals[i] = uv.new_signal()
    signals[i]:start(name, function() quit("interrupted!") end)
  end
  poll:start("r", pump)
  pump()
  uv.run()
  if stopped_by then error(stopped_by, 0) end

  local elapsed = slm.core.now() - t0
  local report = {}
  for i, q in ipairs(questions) do report[#report + 1] = ("Q%d %s\n   -> %s"):format(i, q, answers[i]) end
  report[#report + 1] = "streamed: " .. table.concat(streamed)
  for _, n in ipairs(notes) do report[#report + 1] = n end
  report[#report + 1] = ("luv_loop: %d requests + 1 stream in %.2f s, %d luv ticks meanwhile, %d steps, %d failed, %d tokens")
    :format(#questions, elapsed, ticks_during, steps, failures, client.stats.prompt_tokens + client.stats.completion_tokens)
  return failures == 0, table.concat(report, "\n") .. "\n"
end

os.exit(backend.main("luv_loop", { "usage: lua5.4 examples/luv_loop.lua" }, run, arg))
