-- slm.transport.sched: a small scheduler running Lua coroutines over one
-- libcurl multi handle (slm.core).  Part of the libcurl runtime
-- (slm.transport.curl): nothing above lua/slm/transport/ requires it; the
-- client, rate limits, budgets and slm.map get its functions through the
-- runtime.
--
-- A blocking-looking call made inside a task (started by run/spawn/map)
-- yields to the scheduler while its bytes are in flight; made outside any
-- task it drives the loop itself until it is done.  So one piece of user
-- code works in a plain script and in a batch job.
--
-- The loop is not re-entrant at the C level (slm.core refuses that), and
-- no Lua code runs inside libcurl: step() returns the requests that had
-- activity and the scheduler wakes the tasks that wait on them.
local core = require "slm.core"

local co_create, co_resume, co_yield, co_running, co_status =
  coroutine.create, coroutine.resume, coroutine.yield, coroutine.running, coroutine.status
local now = core.now
local type, select, error, tostring, setmetatable, unpack =
  type, select, error, tostring, setmetatable, table.unpack or unpack
local remove, insert = table.remove, table.insert
local traceback = debug.traceback

local M = {}

local multi            -- created on first use
local ready = {}       -- FIFO of tasks to resume: ready[head..tail]
local rhead, rtail = 1, 0
local waiting = {}     -- Request -> task (or MAIN) waiting for its activity
local nwaiting = 0
local timers = {}      -- sorted by .at: { at = t, task = task }
local by_co = setmetatable({}, { __mode = "k" }) -- coroutine -> task
local live = 0         -- tasks spawned and not finished
local MAIN = {}        -- stands for "code outside any task"
local main_woken = false
local next_id = 0
local orphans = {}     -- failed tasks, reported by run() unless waited for

local function report_orphans()
  for i = 1, #orphans do
    local t = orphans[i]
    if not t.observed then
      io.stderr:write("slm: task #", t.id, " failed: ", t.traceback or tostring(t.error), "\n")
    end
  end
  orphans = {}
end

local Task = {}
Task.__index = Task
Task.__name = "slm.Task"

function Task.__tostring(t)
  return "slm.Task #" .. t.id .. " (" .. t.status .. ")"
end

local function pack(...) return { n = select("#", ...), ... } end

function M.multi()
  if not multi then multi = core.multi() end
  return multi
end

local function make_ready(t)
  if t == MAIN then main_woken = true; return end
  if t.queued or t.status == "done" then return end
  t.queued = true
  rtail = rtail + 1
  ready[rtail] = t
end

--- The task running now, or nil outside any task.
function M.current()
  local co, ismain = co_running()
  if not co or ismain then return nil end
  return by_co[co]
end

-- t.results is set by the task's own body (see spawn) when it returns.
local function finish(t, ok, err)
  t.status = "done"
  live = live - 1
  if not ok then
    t.error = err
    t.failed = true
    orphans[#orphans + 1] = t
  end
  for i = 1, #t.waiters do make_ready(t.waiters[i]) end
  t.waiters = nil
end

-- Runs once per wake-up of every task: no tables made here (the first
-- resume passes the spawn arguments; the body stores its own results).
local function resume(t)
  t.queued = false
  t.status = "running"
  local co, args = t.co, t.args
  local ok, err
  if args then
    t.args = nil
    ok, err = co_resume(co, unpack(args, 1, args.n))
  else
    ok, err = co_resume(co)
  end
  if co_status(co) == "dead" then
    if ok then
      finish(t, true)
    else
      t.traceback = traceback(co, tostring(err))
      finish(t, false, err)
    end
  elseif t.status == "running" then
    -- yielded by something other than the scheduler (a user coroutine
    -- yield that leaked out): treat as a plain reschedule
    t.status = "ready"
    make_ready(t)
  end
end

--- Start a task: spawn(fn, ...) -> task; t:wait() -> fn's results.
function M.spawn(fn, ...)
  if type(fn) ~= "function" then error("slm.spawn: expected a function, got " .. type(fn), 2) end
  next_id = next_id + 1
  local t = setmetatable({ id = next_id, status = "ready", waiters = {}, args = pack(...) }, Task)
  t.co = co_create(function(...) t.results = pack(fn(...)) end)
  by_co[t.co] = t
  live = live + 1
  make_ready(t)
  return t
end

local function timer_add(at, who)
  local e = { at = at, who = who }
  local i = #timers
  while i > 0 and timers[i].at > at do i = i - 1 end
  insert(timers, i + 1, e)
  return e
end

local function fire_timers()
  local t = now()
  while timers[1] and timers[1].at <= t do
    local e = remove(timers, 1)
    make_ready(e.who)
  end
end

-- Wake the tasks waiting on requests that had activity.
local function wake(evs)
  for i = 1, #evs do
    local r = evs[i]
    local w = waiting[r]
    if w then
      waiting[r] = nil
      nwaiting = nwaiting - 1
      make_ready(w)
    end
  end
end

local function run_ready()
  while rhead <= rtail do
    local t = ready[rhead]
    ready[rhead] = nil
    rhead = rhead + 1
    resume(t)
    -- with more tasks ready, let libcurl send what this one queued (and
    -- read what arrived) now instead of holding every new request until
    -- the whole batch ran: at 50 in flight that wait, not the CPU, is what
    -- kept throughput from the ideal.  step(0) costs a few microseconds.
    if rhead <= rtail and multi and multi:count() > 0 then
      wake(multi:step(0))
    end
  end
  rhead, rtail = 1, 0
end

--- Drive the loop until pred() is true.
local function drive(pred)
  while true do
    run_ready()
    if pred() then return end
    fire_timers()
    -- a timer that came due between pred() and fire_timers() may be what
    -- the caller waits for (outside tasks it readies nobody): ask again
    -- before concluding that nothing is left
    if rhead <= rtail or pred() then goto continue end
    do
      local m = M.multi()
      local inflight = m:count()
      -- nothing in flight, no timer, nobody ready: whoever waits (on a
      -- task, a semaphore, or a request that ended without a word) waits
      -- for ever
      if inflight == 0 and not timers[1] then
        error("slm: nothing left to run but the awaited work is not done "
          .. "(a task waits on itself, or on work that was never started)", 0)
      end
      local timeout = 1
      if timers[1] then
        timeout = timers[1].at - now()
        if timeout < 0 then timeout = 0 end
        if timeout > 1 then timeout = 1 end
      end
      wake(m:step(timeout))
      fire_timers()
    end
    ::continue::
  end
end
M.drive = drive

-- Suspend the current task until woken; outside tasks drive the loop until
-- `woken()` says so.
local function suspend(t, woken)
  if t then
    t.status = "waiting"
    return co_yield()
  end
  drive(woken)
end

local function is_main_woken() return main_woken end

--- Wait for activity on a slm.core Request (new bytes, headers, or done).
function M.await(req)
  local t = M.current()
  if waiting[req] == nil then nwaiting = nwaiting + 1 end
  if t then
    waiting[req] = t
    return suspend(t)
  end
  waiting[req] = MAIN
  main_woken = false
  drive(is_main_woken)
  main_woken = false
end

-- Wait until over() says so: the task t suspended (woken by whatever it
-- waits on, or a timer), or, outside tasks (t nil), the loop driven.
local function wait_until(t, over)
  if t then
    repeat suspend(t) until over()
  else
    main_woken = false
    drive(over)
    main_woken = false
  end
end

local function timer_cancel(e)
  for i = 1, #timers do if timers[i] == e then remove(timers, i) return end end
end

--- Wait until descriptor fd (a slm.core Tcp's) is ready for want ("r" or
-- "w"), or until the monotonic time deadline (nil: no limit): -> true, or
-- false when the deadline came first.  Yields inside a task; outside, it
-- drives the loop itself.  The descriptor is armed in the multi's event
-- set (Multi:watch), so it wakes the loop as a libcurl socket does.
function M.await_fd(fd, want, deadline)
  local m = M.multi()
  local t = M.current()
  local who = t or MAIN
  m:watch(fd, want)
  waiting[fd] = who
  nwaiting = nwaiting + 1
  local e = deadline and timer_add(deadline, who)
  local function over() return waiting[fd] == nil or (deadline ~= nil and now() >= deadline) end
  wait_until(t, over)
  if e then timer_cancel(e) end
  if waiting[fd] == nil then return true end
  waiting[fd] = nil
  nwaiting = nwaiting - 1
  m:watch(fd, nil) -- disarmed: a late event must not wake anybody
  return false
end

--- Sleep for s seconds (yields inside a task).
function M.sleep(s)
  if type(s) ~= "number" then error("slm.sleep: expected seconds, got " .. type(s), 2) end
  if s <= 0 then return end
  local t = M.current()
  local at = now() + s
  if t then
    timer_add(at, t)
    return suspend(t)
  end
  local e = timer_add(at, MAIN)
  drive(function() return now() >= at end)
  timer_cancel(e)
  main_woken = false
end

--- Wait for a task: returns its results, or raises its error.
function Task:wait()
  local me = M.current()
  if me == self then error("slm: a task cannot wait for itself", 2) end
  if self.status ~= "done" then
    if me then
      self.waiters[#self.waiters + 1] = me
      repeat suspend(me) until self.status == "done"
    else
      drive(function() return self.status == "done" end)
    end
  end
  self.observed = true
  if self.failed then error(self.error, 0) end
  return unpack(self.results, 1, self.results.n)
end

--- Like wait, but returns true, results... or false, err instead of raising.
function Task:join()
  local r = pack(pcall(self.wait, self))
  return unpack(r, 1, r.n)
end

function Task:done() return self.status == "done" end

--- run(fn, ...): run fn as a task, and every task it spawns, to completion;
-- returns fn's results or raises its error.  Errors of spawned tasks that
-- nobody waited for are written to stderr (they do not kill other tasks).
function M.run(fn, ...)
  if type(fn) ~= "function" then error("slm.run: expected a function, got " .. type(fn), 2) end
  if M.current() then
    -- already inside the scheduler: just run it (its children join the loop)
    return fn(...)
  end
  local t = M.spawn(fn, ...)
  t.observed = true
  local ok, err = pcall(drive, function() return live == 0 end)
  report_orphans()
  if not ok then error(err, 0) end
  if t.failed then error(t.error, 0) end
  return unpack(t.results, 1, t.results.n)
end

--- A counting semaphore for concurrency limits.
local Sem = {}
Sem.__index = Sem

function M.semaphore(n)
  return setmetatable({ free = n, queue = {} }, Sem)
end

--- sem:acquire([timeout]) -> true | nil, "timeout": a slot, waiting at
-- most timeout seconds (nil: as long as it takes).  A slot kept by a
-- holder that never gives it back (a stream abandoned without close) then
-- makes the waiter time out instead of waiting for ever.
function Sem:acquire(timeout)
  if self.free > 0 and #self.queue == 0 then
    self.free = self.free - 1
    return true
  end
  local t = M.current()
  local me = { task = t, granted = false }
  local q = self.queue
  q[#q + 1] = me
  local deadline = timeout and timeout < math.huge and now() + timeout or nil
  local e = deadline and timer_add(deadline, t or MAIN)
  local function over() return me.granted or (deadline ~= nil and now() >= deadline) end
  wait_until(t, over)
  if e then timer_cancel(e) end
  if me.granted then return true end
  for i = 1, #q do if q[i] == me then remove(q, i) break end end
  return nil, "timeout"
end

function Sem:release()
  local q = self.queue
  if q[1] then
    local me = remove(q, 1)
    me.granted = true
    if me.task then make_ready(me.task) end
  else
    self.free = self.free + 1
  end
end

--- A request was cancelled (or otherwise finished) outside step(): wake
-- whoever waits on it, so that it sees the request done.  A task blocked in
-- a read of a stream that another task closes must not sleep for ever.
function M.wake(req)
  local w = waiting[req]
  if w ~= nil then
    waiting[req] = nil
    nwaiting = nwaiting - 1
    make_ready(w)
  end
end

--- One turn of the loop that never blocks, for an outer event loop (luv,
-- cqueues, ...) that watches M.fd() and wakes up after M.timeout(): runs
-- the ready tasks, hands libcurl what the sockets have, fires due timers,
-- and runs the tasks that woke.  Returns the number of live tasks.
-- Code running in the outer loop's callbacks (outside any task) starts
-- work with spawn(); a blocking-looking call made there instead would
-- drive this loop itself and block the outer one until it is done.
function M.step()
  run_ready()
  fire_timers()
  if multi and multi:count() > 0 then wake(multi:step(0)) end
  fire_timers()
  run_ready()
  return live
end

--- Seconds until step() has work to do even without socket activity: 0
-- when a task is ready, else the nearest of the scheduler's timers and the
-- multi's own timeout (libcurl's timer, first-byte and stall deadlines);
-- nil when nothing is pending at all.
function M.timeout()
  if rhead <= rtail then return 0 end
  local t
  if timers[1] then
    t = timers[1].at - now()
    if t < 0 then t = 0 end
  end
  if multi then
    local mt = multi:timeout()
    if mt and mt >= 0 and (t == nil or mt < t) then t = mt end
  end
  return t
end

--- The descriptor an outer loop watches for readability (the multi's epoll
-- set), or nil where the core waits with poll() (then poll M.timeout()).
function M.fd()
  return M.multi():fd()
end

function M.stats()
  return { live = live, waiting = nwaiting, timers = #timers,
    inflight = multi and multi:count() or 0 }
end

return M
