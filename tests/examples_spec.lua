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
    assert.matches("succeeded:    52    failed: 0", out)
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
