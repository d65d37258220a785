-- examples/openresty as documented: `examples/openresty/run start` from the
-- checkout (no API key: it starts the simulator and says so), the
-- classification, the streamed support chat, the metrics endpoint and the
-- access log's tokens, cost, ttft and consumer; `run stop` stops nginx and
-- the simulator.  (The page in a browser: openresty_browser_spec.lua.)
local H = require "tests.helpers"
local cjson = require "cjson"

local CLEAN = "env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS -u SLM_BASE_URL -u SLM_API_KEY -u OPENAI_API_KEY "

local sh = H.sh
local ROOT = H.root()
local RUN = ROOT .. "/examples/openresty/run"
local LOGS = ROOT .. "/examples/openresty/logs"

local function curl(args)
  return sh("env -u LD_PRELOAD curl -s --max-time 10 " .. args)
end

describe("examples/openresty/run", function()
  local port = 20000 + math.random(0, 20000)
  local base = "http://127.0.0.1:" .. port
  local started, already
  setup(function()
    already = select(2, sh(H.q(RUN) .. " status"))
  end)
  teardown(function()
    if started then sh(CLEAN .. H.q(RUN) .. " stop") end
  end)

  it("starts from the checkout with the simulator, serves every endpoint, stops", function()
    if already then
      pending("the example is already running here (examples/openresty/run stop first)")
      return
    end
    local out, ok = sh(CLEAN .. "SLM_EXAMPLE_PORT=" .. port .. " " .. H.q(RUN) .. " start")
    started = ok
    assert(ok, out)
    assert.matches("no OPENAI_API_KEY/SLM_BASE_URL set — using the local simulator at http://127%.0%.0%.1:%d+/v1", out)
    local sim_prefix = H.read_file(LOGS .. "/sim.prefix"):gsub("%s+$", "")

    local info = cjson.decode((curl(base .. "/info")))
    assert.is_true(info.simulated)
    assert.equal("gpt-4o-mini", info.model)

    local page = curl(base .. "/")
    assert.matches("<title>Voltamart support chat", page, 1, true)

    local c = cjson.decode((curl("-H 'X-Consumer: team-a' --data-binary " .. H.q(cjson.encode{
      text = "Subject: charged twice\n\nMy card was charged twice for one order, please refund" }) .. " "
      .. base .. "/classify")))
    assert.equal("billing", c.label)
    assert.is_true(c.cost > 0)
    local bad = curl("-o /dev/null -w '%{http_code}' --data-binary '{}' " .. base .. "/classify")
    assert.equal("400", bad)

    local body = curl("-N -H 'X-Consumer: team-a' --data-binary " .. H.q(cjson.encode{ session = "s1",
      message = "How long does delivery take?" }) .. " " .. base .. "/chat")
    local text, final = require("slm.ngx").parse_events(body)
    assert.matches("%[faq%-delivery%-%d%]$", text)
    assert.equal("faq-delivery-2", final.sources[1].id)
    assert.is_true(final.cost > 0)
    assert.is_true(final.simulated)

    assert.equal("s1", final.session)

    local metrics = curl(base .. "/metrics")
    assert.matches('slm_requests_total{consumer="team-a",model="gpt-4o-mini",outcome="ok"} 2', metrics, 1, true)
    assert.matches('slm_ttft_seconds_count{consumer="team-a",model="gpt-4o-mini"} 1', metrics, 1, true)

    local line -- this run's: the last /chat line of the log
    for _ = 1, 50 do
      for l in (H.read_file(LOGS .. "/access.log") or ""):gmatch('[^\n]*"POST /chat[^\n]*') do line = l end
      if line and line:find("team-a", 1, true) then break end
      os.execute("sleep 0.02")
    end
    assert.matches(("consumer=team%%-a tokens=%d cost=0%%.%%d+ ttft=%%d+%%.%%d%%d%%d"):format(final.usage.total_tokens), line)
    assert.matches("model=gpt%-4o%-mini", line)

    -- no session, or one that is not ours: a fresh random id each (header and done event), never a
    -- conversation shared with other users
    local sim_port = assert(tonumber(info.backend:match("^http://127%.0%.0%.1:(%d+)/")), info.backend)
    local function chat(t)
      local hf = os.tmpname()
      local b = curl("-N -D " .. H.q(hf) .. " --data-binary " .. H.q(cjson.encode(t)) .. " " .. base .. "/chat")
      local head = H.read_file(hf)
      os.remove(hf)
      local _, fin = require("slm.ngx").parse_events(b)
      return fin, head:match("\n[Xx]%-[Ss]ession%-[Ii]d: ([^\r\n]+)"), b
    end
    local seen = {}
    for i, t in ipairs{ { message = "my card number is 4111, can I pay in instalments?" },
        { message = "second user here", session = "bad id!" }, { message = "third", session = "" },
        { message = "fourth", session = 42 } } do
      local fin, header = chat(t)
      assert.is_table(fin, i)
      assert.matches("^s%-%x+$", fin.session)
      assert.equal(34, #fin.session)
      assert.equal(fin.session, header)
      assert.is_nil(seen[fin.session], "a session id given twice")
      seen[fin.session] = true
      if i > 1 then
        -- the model saw none of the first user's conversation
        local last = H.last{ port = sim_port }
        assert.is_nil(last.raw_body:find("4111", 1, true), "another user's history was sent")
      end
    end
    -- an id too long is refused, never cut (two long ids sharing their first 64 characters would
    -- share a conversation); 64 characters are fine
    local long = ("a"):rep(64)
    assert.equal("400", curl("-o /dev/null -w '%{http_code}' --data-binary " .. H.q(cjson.encode{
      session = long .. "x", message = "hi" }) .. " " .. base .. "/chat"))
    assert.equal(long, (chat{ session = long, message = "hi" }).session)

    out, ok = sh(CLEAN .. H.q(RUN) .. " stop")
    assert(ok, out)
    started = false
    assert.is_false(select(2, sh(H.q(RUN) .. " status")))
    assert.is_false(select(2, curl(base .. "/info")))
    assert.is_nil(io.open(sim_prefix .. "/nginx.conf")) -- the simulator is gone too
  end)
end)
