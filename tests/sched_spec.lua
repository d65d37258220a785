-- The scheduler: tasks, ordering, per-item errors, waiting and sleeping.
local slm = require "slm"

describe("slm.run / slm.spawn", function()
  it("returns the task's results", function()
    local a, b = slm.run(function(x) return x + 1, "two" end, 1)
    assert.are.equal(2, a); assert.are.equal("two", b)
  end)

  it("runs every spawned task to completion", function()
    local seen = {}
    slm.run(function()
      for i = 1, 5 do slm.spawn(function() slm.sleep(0.01 * (6 - i)); seen[#seen + 1] = i end) end
    end)
    assert.are.same({ 5, 4, 3, 2, 1 }, seen)
  end)

  it("interleaves sleeping tasks instead of running them one after another", function()
    local asleep, peak, order = 0, 0, {}
    slm.run(function()
      local ts = {}
      for i = 1, 10 do
        ts[i] = slm.spawn(function()
          asleep = asleep + 1
          if asleep > peak then peak = asleep end
          slm.sleep(0.01 * (11 - i))
          asleep = asleep - 1
          order[#order + 1] = i
        end)
      end
      for i = 1, 10 do ts[i]:wait() end
    end)
    -- all ten were asleep at once, and woke by deadline, not by start order
    assert.are.equal(10, peak)
    assert.are.same({ 10, 9, 8, 7, 6, 5, 4, 3, 2, 1 }, order)
  end)

  it("t:wait() returns results and re-raises the task's error", function()
    slm.run(function()
      local ok = slm.spawn(function(a, b) return a * b end, 6, 7)
      local bad = slm.spawn(function() error("kaput", 0) end)
      assert.are.equal(42, ok:wait())
      local good, err = bad:join()
      assert.is_false(good)
      assert.are.equal("kaput", err)
      assert.has_error(function() bad:wait() end, "kaput")
    end)
  end)

  it("an error in one task does not kill the others", function()
    local finished = false
    local stderr = io.stderr
    local captured = {}
    io.stderr = { write = function(_, ...) for _, s in ipairs{ ... } do captured[#captured + 1] = tostring(s) end end }
    local ok, err = pcall(slm.run, function()
      slm.spawn(function() slm.sleep(0.01); error("first task broke") end)
      slm.spawn(function() slm.sleep(0.03); finished = true end)
    end)
    io.stderr = stderr
    assert.is_true(ok, err)
    assert.is_true(finished)
    assert.matches("first task broke", table.concat(captured))
  end)

  it("run raises the main function's error", function()
    assert.has_error(function() slm.run(function() error("main failed", 0) end) end, "main failed")
  end)

  it("waiting on a task from outside any task drives the loop", function()
    local t = slm.spawn(function() slm.sleep(0.01); return "done" end)
    assert.are.equal("done", t:wait())
  end)

  it("detects a task waiting on itself", function()
    assert.has_error(function()
      slm.run(function()
        local me
        me = slm.spawn(function() slm.sleep(0.001); return me:wait() end)
        me:wait()
      end)
    end)
  end)

  it("rejects wrong arguments at once", function()
    assert.has_error(function() slm.run(42) end, "slm.run: expected a function, got number")
    assert.has_error(function() slm.spawn("x") end, "slm.spawn: expected a function, got string")
    assert.has_error(function() slm.sleep("1") end)
  end)
end)

describe("slm.map", function()
  it("returns results in input order whatever the finishing order", function()
    local list = {}
    for i = 1, 20 do list[i] = i end
    local res, errs = slm.map(list, function(x) slm.sleep((21 - x) * 0.002); return x * x end, { concurrency = 8 })
    for i = 1, 20 do assert.are.equal(i * i, res[i]) end
    assert.are.same({}, errs)
  end)

  it("reports per-item errors, raised or returned, and keeps going", function()
    local res, errs, nerr = slm.map({ 1, 2, 3, 4 }, function(x)
      if x == 2 then error("two is bad", 0) end
      if x == 3 then return nil, "three failed" end
      return x
    end)
    assert.are.equal(1, res[1]); assert.is_nil(res[2]); assert.is_nil(res[3]); assert.are.equal(4, res[4])
    assert.are.equal("two is bad", errs[2])
    assert.are.equal("three failed", errs[3])
    assert.are.equal(2, nerr)
  end)

  it("an error raised with no value still lands in errs", function()
    local res, errs, nerr = slm.map({ 1, 2, 3 }, function(x) if x == 2 then error(nil) end return x end)
    assert.are.equal(1, res[1]); assert.is_nil(res[2]); assert.are.equal(3, res[3])
    assert.are.equal("error raised with no value", errs[2])
    assert.are.equal(1, nerr)
  end)

  it("never runs more than `concurrency` items at once", function()
    local active, peak = 0, 0
    local list = {}
    for i = 1, 30 do list[i] = i end
    slm.map(list, function()
      active = active + 1
      if active > peak then peak = active end
      slm.sleep(0.005)
      active = active - 1
      return true
    end, { concurrency = 4 })
    assert.are.equal(4, peak)
  end)

  it("works inside a task too", function()
    local r = slm.run(function()
      local res = slm.map({ "a", "b" }, function(s) return s:upper() end)
      return table.concat(res)
    end)
    assert.are.equal("AB", r)
  end)

  it("draws a progress bar with count, rate and ETA", function()
    local out = {}
    local sink = { write = function(_, ...) for _, s in ipairs{ ... } do out[#out + 1] = s end end, flush = function() end }
    slm.map({ 1, 2, 3 }, function(x) return x end, { progress = { out = sink, width = 10 } })
    local s = table.concat(out)
    assert.matches("%[##########%] 3/3 100%%", s)
    assert.matches("/s", s)
    assert.matches("ETA", s)
  end)

  it("rejects bad arguments", function()
    assert.has_error(function() slm.map(nil, print) end)
    assert.has_error(function() slm.map({}, print, { concurrency = 0 }) end,
      "slm.map: option 'concurrency' must be a positive integer")
    assert.has_error(function() slm.map({ 1 }, print, { concurency = 4 }) end,
      "slm.map: unknown option 'concurency'")
  end)
end)

describe("the libcurl runtime's loop, outside any task", function()
  -- A sleep's timer that comes due between the loop's check of the
  -- sleeper and its firing of timers, with nothing in flight: the loop
  -- once concluded "nothing left to run" and raised (seen in CI as a
  -- flaky spec).  A clock that jumps past the deadline exactly when
  -- fire_timers reads it makes that instant happen every time.
  it("a timer fired just after the wait was checked ends the wait, not the run", function()
    local real = require "slm.core"
    local late = false
    local fake = setmetatable({
      now = function()
        if not late then
          local info = debug.getinfo(2, "n")
          if info and info.name == "fire_timers" then late = true end
        end
        return late and 1000 or 0
      end,
    }, { __index = real })
    local saved_core, saved_sched = package.loaded["slm.core"], package.loaded["slm.transport.sched"]
    package.loaded["slm.core"], package.loaded["slm.transport.sched"] = fake, nil
    local ok, sched = pcall(require, "slm.transport.sched")
    package.loaded["slm.core"], package.loaded["slm.transport.sched"] = saved_core, saved_sched
    assert(ok, sched)
    local done, err = pcall(sched.sleep, 1)
    assert.is_true(late)
    assert.is_true(done, err)
  end)
end)
