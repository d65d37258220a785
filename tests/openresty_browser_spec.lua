-- The chat page of examples/openresty in a real browser: Debian's headless
-- chromium driven by playwright-core (tests/tools/browser: package.json
-- and its package-lock.json pin the version; npm ci on first use), against
-- the example's own locations (examples/openresty/locations.conf) in an
-- app nginx, backed by the simulator with slowed streams.  The page is
-- opened, a question sent, the streamed answer seen growing (several
-- distinct lengths before the end) and the answer's cost seen appearing.
--
-- The screenshot is kept as a test artefact: $SLM_ARTEFACTS/openresty-chat.png,
-- by default build/artefacts/openresty-chat.png in the checkout (outside
-- the test run's temporary directory, which bin/test removes).
local H = require "tests.helpers"
local cjson = require "cjson"

local sh = H.sh
local ROOT = H.root()
local TOOLS = ROOT .. "/tests/tools/browser"
local ARTEFACTS = os.getenv("SLM_ARTEFACTS") or (ROOT .. "/build/artefacts")

local function have(cmd) return select(2, sh("command -v " .. cmd)) end

if not have("node") or not (have("chromium") or select(2, sh("test -x /usr/lib/chromium/chromium"))) then
  describe("the chat page in a browser", function()
    pending("node or chromium is not installed (bin/setup-deps installs them): the page not checked")
  end)
  return
end

local APP_HTTP = [[
    lua_shared_dict slm_metrics 1m;
    init_by_lua_block {
      package.path = "@ROOT@/?.lua;" .. package.path
      require("examples.openresty.app").init{ base_url = "@SIM_URL@", api_key = "sk-local-simulator",
        simulated = true, headers = { ["X-Sim-Scenario"] = "slow_chunks=25" } }
    }
]]

describe("the chat page in a browser", function()
  local sim, app
  setup(function()
    sim, app = H.sim_and_app(APP_HTTP:gsub("@ROOT@", ROOT),
      ("include %s/examples/openresty/locations.conf;"):format(ROOT))
  end)
  teardown(function()
    if app then app:stop() end
    if sim then sim:stop() end
  end)

  it("streams the answer as it arrives and shows its cost", function()
    local ok, out = H.npm_ready(TOOLS, "playwright-core")
    assert(ok, "npm ci in tests/tools/browser failed:\n" .. tostring(out))
    sh("mkdir -p " .. H.q(ARTEFACTS))
    local shot = ARTEFACTS .. "/openresty-chat.png"
    os.remove(shot)
    -- node's stderr apart: it could land inside the JSON line on stdout
    local errf = os.tmpname()
    local res, ran = sh(("(node %s/chat.mjs %s %s %s 2>%s)"):format(H.q(TOOLS), H.q(app.base .. "/"), H.q(shot),
      H.q("How long does delivery take?"), H.q(errf)))
    local errs = H.read_file(errf) or ""
    os.remove(errf)
    assert(ran, "chat.mjs failed:\n" .. res .. errs .. "\n" .. app:error_log())
    local r = cjson.decode(res:match("([^\n]+)\n*$"))
    -- the same answer as the bot gives without a browser, grown in steps
    assert.matches("%[faq%-delivery%-%d+%]$", r.text)
    assert.is_true(#r.lengths >= 5, "lengths seen: " .. table.concat(r.lengths, ","))
    for i = 2, #r.lengths do assert.is_true(r.lengths[i] > r.lengths[i - 1]) end
    assert.equal(#r.text, r.lengths[#r.lengths])
    assert.is_true(r.lengths[1] < #r.text) -- seen before it was whole
    -- the cost of the answer, as the done event gave it
    assert.matches("^%$0%.%d%d%d%d%d%d$", r.cost)
    assert.is_true(tonumber(r.cost:sub(2)) > 0)
    assert.matches("sources: faq%-delivery", r.meta)
    assert.is_true(r.banner) -- "No API key: ... simulator"
    assert.equal("gpt-4o-mini (simulated)", r.model)
    local f = assert(io.open(shot, "rb"), "no screenshot at " .. shot)
    assert.equal("\137PNG", f:read(4))
    f:close()
  end)
end)
