-- examples/: the ticket-triage demo that bin/quickstart runs, end to end
-- against the simulator.
local H = require "tests.helpers"

local NO_KEYS = "env -u OPENAI_API_KEY -u SLM_API_KEY -u SLM_BASE_URL -u OPENAI_BASE_URL -u SLM_MODEL "

local function triage(env)
  local p = assert(io.popen(NO_KEYS .. (env or "") .. " lua5.4 examples/ticket_triage.lua 2>&1"))
  local out = p:read("a")
  local ok = p:close()
  return out, ok
end

describe("examples/ticket_triage.lua", function()
  it("without a key it starts the bundled simulator, and says the cost is simulated", function()
    local out, ok = triage()
    assert.is_true(ok, out)
    assert.matches("^ticket_triage: no OPENAI_API_KEY/SLM_BASE_URL set", out)
    assert.matches("ticket_triage: 248 tickets from [^\n]*support_tickets%.jsonl, 56 knowledge entries, 9 examples", out)
    assert.matches("succeeded:    248    failed: 0", out)
    -- 248 tickets less the 9 used as examples are scored against their labels
    assert.matches("\naccuracy:     %d+ of 239 = %d+%.%d%% against the labels", out)
    assert.matches("\nreplies:      %d+ drafts, %d+ handed over %(user_request %d+", out)
    -- a draft cites the FAQ entry it came from; a handover names why
    assert.matches("\nT%-%d+ +%a%a +[%a_]+ +%d%.%d%d%?? +[%a_]+ +draft faq%-[%w-]+", out)
    assert.matches("handover: user_request", out)
    assert.matches("\ncost:         %$%d+%.%d+ simulated %(the simulator's token counts at gpt%-4o%-mini's prices", out)
  end)

  it("against a simulator named by SLM_BASE_URL (slm sim start) the cost is simulated too", function()
    local up = H.upstream()
    finally(function() up:stop() end)
    local out, ok = triage("SLM_BASE_URL=" .. up.url)
    assert.is_true(ok, out)
    assert.matches("^ticket_triage: using " .. up.url:gsub("%p", "%%%0"), out)
    assert.matches("\ncost:         %$%d+%.%d+ simulated ", out)
  end)
end)

describe("examples/luv_loop.lua", function()
  it("drives lua-slm from luv's loop: requests in flight together while luv's own timer ticks", function()
    if not pcall(require, "luv") then return pending("needs lua-luv (bin/setup-deps --test installs it)") end
    if not require("slm.core").multi():fd() then return pending("the poll() backend has no descriptor") end
    local up = H.upstream()
    finally(function() up:stop() end)
    -- 300 ms per reply, and the stream's events 20 ms apart: long enough for luv's 10 ms ticker
    local p = assert(io.popen(NO_KEYS .. "SLM_BASE_URL=" .. up.url
      .. " SLM_MODEL='sim:delay=300,slow_chunks=20' timeout 30 lua5.4 examples/luv_loop.lua 2>&1"))
    local out = p:read("a")
    local ok = p:close()
    assert.is_true(ok, out)
    assert.matches("\n   %-> Echo: Where is my parcel%?", out)
    assert.matches("\nstreamed: Echo: Thank the customer in one sentence%.\n", out)
    local elapsed, ticks, steps, failed = out:match("in ([%d.]+) s, (%d+) luv ticks meanwhile, (%d+) steps, (%d+) failed")
    assert.are.equal("0", failed)
    -- the four requests were in flight at once: one 300 ms wait, not four
    assert.are.equal(4, up:stats().max_in_flight)
    assert.is_true(tonumber(elapsed) < 1.2, out)
    -- luv kept running its own work meanwhile
    assert.is_true(tonumber(ticks) >= 15, out)
    -- and lua-slm's loop did not spin in luv's: a few steps per event, not thousands
    assert.is_true(tonumber(steps) < 200, out)
  end)
end)
