-- bin/slm, the command line, against the simulator.
local H = require "tests.helpers"
local json = require "cjson"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

local function run(cmdline, stdin)
  local tmp = os.tmpname()
  local errf = os.tmpname()
  if stdin then local f = io.open(tmp, "w"); f:write(stdin); f:close() end
  local cmd = ("SLM_BASE_URL=%s SLM_API_KEY=sk-cli bin/slm %s <%s 2>%s"):format(up.url, cmdline,
    stdin and tmp or "/dev/null", errf)
  local p = io.popen(cmd)
  local out = p:read("a")
  local ok, _, code = p:close()
  local ef = io.open(errf); local err = ef:read("a"); ef:close()
  os.remove(tmp); os.remove(errf)
  return out, err, ok and 0 or code
end

describe("bin/slm", function()
  it("chat prints the reply and a usage line", function()
    local out, err, code = run("chat 'Where is my order?'")
    assert.are.equal(0, code)
    assert.are.equal("Echo: Where is my order?\n", out)
    assert.matches("tokens, %$%d", err)
  end)

  it("chat --stream prints the same text", function()
    local out, _, code = run("chat --stream -m gpt-4o-mini 'stream me'")
    assert.are.equal(0, code)
    assert.are.equal("Echo: stream me\n", out)
  end)

  it("chat reads the prompt from stdin and reports errors with exit 1", function()
    local out = run("chat", "from stdin")
    assert.are.equal("Echo: from stdin\n", out)
    local _, err, code = run("chat -m sim:status=401 hi")
    assert.are.equal(1, code)
    assert.matches("slm: auth %(HTTP 401%)", err)
  end)

  it("batch answers every line in input order, concurrently", function()
    local lines = {}
    for i = 1, 12 do lines[i] = json.encode{ prompt = "ticket " .. i } end
    lines[13] = json.encode{ messages = { { role = "user", content = "raw messages" } }, model = "sim:delay=100" }
    local out, err, code = run("batch -c 6 -m sim:delay=100 --no-progress", table.concat(lines, "\n"))
    assert.are.equal(0, code, err)
    local i = 0
    for line in out:gmatch("[^\n]+") do
      i = i + 1
      local o = json.decode(line)
      assert.are.equal(i, o.index)
      assert.are.equal(i <= 12 and ("Echo: ticket " .. i) or "Echo: raw messages", o.text)
    end
    assert.are.equal(13, i)
    assert.are.equal(6, up:stats().max_in_flight)
    assert.matches("13 requests, 0 failed", err)
  end)

  it("batch reports failed items as error lines and exits 1", function()
    local input = json.encode{ prompt = "ok" } .. "\n" .. json.encode{ prompt = "bad", model = "sim:status=400" }
    local out, _, code = run("batch --no-progress", input)
    assert.are.equal(1, code)
    local l1, l2 = out:match("([^\n]+)\n([^\n]+)")
    assert.are.equal("Echo: ok", json.decode(l1).text)
    assert.are.equal("invalid_request", json.decode(l2).error.kind)
  end)

  it("batch --progress draws a progress bar on stderr", function()
    local _, err = run("batch --progress", json.encode{ prompt = "a" } .. "\n" .. json.encode{ prompt = "b" })
    assert.matches("2/2 100%%", err)
    assert.matches("ETA", err)
  end)

  it("rejects bad usage", function()
    local _, err, code = run("chat --bogus x")
    assert.are.equal(2, code)
    assert.matches("unknown option %-%-bogus", err)
    local _, err2, code2 = run("batch", "not json\n")
    assert.are.equal(2, code2)
    assert.matches("line 1 is not a JSON object", err2)
  end)

  it("models lists the seed models", function()
    local out = run("models")
    assert.matches("gpt%-4o%-mini%s+128000%s+16384%s+0%.15%s+0%.60%s+yes%s+o200k_base", out)
    assert.matches("nousresearch/hermes%-3%-llama%-3%.1%-405b%s+65536", out)
  end)
end)
