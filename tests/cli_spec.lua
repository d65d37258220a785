-- bin/slm, the command line, against the simulator.
local H = require "tests.helpers"
local json = require "cjson"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

-- Runs bin/slm; returns stdout, stderr and the exit status. With
-- merged, stderr goes into stdout (one pipe, as in `slm ... 2>&1 | less`).
local function run(cmdline, stdin, merged)
  local tmp = os.tmpname()
  local errf = os.tmpname()
  if stdin then local f = io.open(tmp, "w"); f:write(stdin); f:close() end
  local cmd = ("SLM_BASE_URL=%s SLM_API_KEY=sk-cli bin/slm %s <%s %s"):format(up.url, cmdline,
    stdin and tmp or "/dev/null", merged and "2>&1" or "2>" .. errf)
  local p = io.popen(cmd)
  local out = p:read("a")
  local ok, _, code = p:close()
  local ef = io.open(errf); local err = ef and ef:read("a") or ""; if ef then ef:close() end
  os.remove(tmp); os.remove(errf)
  return out, err, ok and 0 or code
end

-- The keys of every JSON object in `s`, in the order they are written:
-- one list per object (inner objects first).
local function key_orders(s)
  local lists, stack, i = {}, {}, 1
  while i <= #s do
    local c = s:sub(i, i)
    if c == '"' then
      local j = i + 1
      while s:sub(j, j) ~= '"' do j = j + (s:sub(j, j) == "\\" and 2 or 1) end
      if stack[1] and s:find("^%s*:", j + 1) then table.insert(stack[#stack], s:sub(i + 1, j - 1)) end
      i = j + 1
    else
      if c == "{" then stack[#stack + 1] = {} elseif c == "}" then lists[#lists + 1] = table.remove(stack) end
      i = i + 1
    end
  end
  return lists
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
    -- the line end that closes the input is no part of the prompt; inner ones are
    out = run("chat", "two\nlines\n")
    assert.are.equal("Echo: two\nlines\n", out)
    local _, err, code = run("chat -m sim:status=401 hi")
    assert.are.equal(1, code)
    assert.matches("^slm: auth %(HTTP 401%)", err)
    assert.is_nil(err:find("slm: slm:", 1, true), err)
  end)

  it("chat writes the reply before the stats line when both go to one pipe", function()
    for _, flags in ipairs({ "", "--stream " }) do
      local out, _, code = run("chat " .. flags .. "'in order'", nil, true)
      assert.are.equal(0, code)
      assert.matches("^Echo: in order\n%[gpt%-4o%-mini: %d+%+%d+ tokens, %$[%d.]+, [%d.]+ s%]\n$", out)
    end
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
      assert.are.equal(i <= 12 and ("ticket " .. i) or nil, o.prompt)
      assert.are.equal(i <= 12 and ("Echo: ticket " .. i) or "Echo: raw messages", o.text)
      assert.are.equal("ok", o.status)
    end
    assert.are.equal(13, i)
    assert.are.equal(6, up:stats().max_in_flight)
    assert.matches("13 rows: 13 succeeded, 0 failed", err)
    assert.matches("13 requests", err)
  end)

  it("batch reports failed items as error rows and exits 1", function()
    local input = json.encode{ prompt = "ok" } .. "\n" .. json.encode{ prompt = "bad", model = "sim:status=400" }
    local out, _, code = run("batch --no-progress", input)
    assert.are.equal(1, code)
    local l1, l2 = out:match("([^\n]+)\n([^\n]+)")
    assert.are.equal("Echo: ok", json.decode(l1).text)
    assert.are.equal("error", json.decode(l2).status)
    assert.are.equal("invalid_request", json.decode(l2).error_kind)
  end)

  it("batch --progress draws a progress bar on stderr", function()
    local _, err = run("batch --progress", json.encode{ prompt = "a" } .. "\n" .. json.encode{ prompt = "b" })
    assert.matches("2/2 100%%", err)
    assert.matches("ETA", err)
  end)

  it("batch turns a line that is no request into an error row and runs the rest", function()
    local input = table.concat({
      json.encode{ prompt = "first" },
      "not json",
      "",                                   -- blank lines are skipped, not rows
      json.encode{ note = "no prompt" },
      json.encode{ prompt = "last" },
    }, "\n")
    local out, err, code = run("batch --no-progress", input)
    assert.are.equal(1, code)
    local rows = {}
    for line in out:gmatch("[^\n]+") do rows[#rows + 1] = json.decode(line) end
    assert.are.equal(4, #rows)
    assert.are.equal("Echo: first", rows[1].text)
    assert.are.equal("parse", rows[2].error_kind)
    assert.matches(":2: ", rows[2].error)
    assert.are.equal("no prompt", rows[3].note)         -- the input's own column, kept
    assert.are.equal("invalid_request", rows[3].error_kind)
    assert.matches("line 4 has neither", rows[3].error)
    assert.are.equal("Echo: last", rows[4].text)
    assert.are.equal(2, up:stats().requests)
    assert.matches("4 rows: 2 succeeded, 2 failed %(invalid_request 1, parse 1%)", err)
    -- nothing usable at all: still one row per line
    local out2, _, code2 = run("batch --no-progress", "[1, 2]\n42\n")
    assert.are.equal(1, code2)
    local n = 0
    for line in out2:gmatch("[^\n]+") do n = n + 1; assert.are.equal("parse", json.decode(line).error_kind) end
    assert.are.equal(2, n)
  end)

  it("batch writes every object's keys in sorted order", function()
    local input = json.encode{ prompt = "sorted" } .. "\n" .. json.encode{ prompt = "x", model = "sim:status=400" }
      .. "\n" .. json.encode{ prompt = "t", tools = { { type = "function", ["function"] = { name = "lookup",
        parameters = { type = "object", properties = {} } } } } }
    local out = run("batch --no-progress --max-tokens 50", input)
    local lines = {}
    for line in out:gmatch("[^\n]+") do lines[#lines + 1] = line end
    assert.are.equal(3, #lines)
    -- the input has a "model" column too (line 2): the reply's is slm_model
    assert.are.same({ "cost", "error", "error_kind", "finish_reason", "prompt", "slm_model", "status", "text", "tokens",
      "tool_calls" }, key_orders(lines[1])[1])
    for _, line in ipairs(lines) do
      for _, keys in ipairs(key_orders(line)) do
        local sorted = { table.unpack(keys) }
        table.sort(sorted)
        assert.are.same(sorted, keys, line)
      end
    end
  end)

  it("rejects bad usage", function()
    local _, err, code = run("chat --bogus x")
    assert.are.equal(2, code)
    assert.matches("unknown option '%-%-bogus'", err)
    assert.matches("^Usage: slm chat", err)
    local _, err2, code2 = run("sim bogus")
    assert.are.equal(2, code2)
    assert.matches("unknown command 'bogus'", err2)
  end)

  it("sim start prints the URL and a stop command; status lists it; stop stops it", function()
    local out, err, code = run("sim start")
    local prefix = err:match("sim stop (/%S+)\n")
    finally(function() if prefix then require("tests.upstream.launch").stop_prefix(prefix) end end)
    assert.are.equal(0, code, err)
    local url = out:match("^(http://127%.0%.0%.1:%d+/v1)\n$")
    assert.truthy(url, out)
    local stop = err:match("stop it: (/%S+ sim stop /%S+)\n")
    assert.truthy(stop, err)
    local p = io.popen("SLM_BASE_URL=" .. url .. " bin/slm chat 'against the started one' 2>/dev/null")
    assert.are.equal("Echo: against the started one\n", p:read("a"))
    p:close()
    local status = run("sim status")
    assert.truthy(status:find(url .. "  running  " .. prefix, 1, true), status)
    assert.is_true(os.execute(stop .. " 2>/dev/null"))
    assert.is_nil(io.open(prefix .. "/nginx.conf"))
    local after = run("sim status")
    assert.is_nil(after:find(prefix, 1, true))
  end)

  it("models lists the seed models", function()
    local out = run("models")
    assert.matches("gpt%-4o%-mini%s+128000%s+16384%s+0%.15%s+0%.60%s+yes%s+o200k_base", out)
    assert.matches("nousresearch/hermes%-3%-llama%-3%.1%-405b%s+65536", out)
  end)

  describe("eval", function()
    local DATA = table.concat({
      json.encode{ text = "I was charged twice, refund please", label = "billing", split = "test" },
      json.encode{ text = "Where is my parcel? The courier is late", label = "delivery", split = "test" },
      json.encode{ subject = "Refund", body = "The invoice amount is wrong, I was charged too much", label = "billing",
        split = "test" },
      json.encode{ text = "Thanks for the great service", label = "other", split = "dev" },
    }, "\n")

    it("prints the decision table, one row per model, and the split and limit it was given", function()
      local out, err, code = run("eval --no-progress -m gpt-4o-mini,nousresearch/hermes-3-llama-3.1-405b --split test", DATA)
      assert.are.equal(0, code, err)
      assert.matches("^model +items +quality +failed +%$ per 1,000 +p50 s +p95 s\n", out)
      assert.matches("\ngpt%-4o%-mini +3 +[%d.]+%% +0 +[%d.]+ ", out)
      assert.matches("\nnousresearch/hermes%-3%-llama%-3%.1%-405b +3 +[%d.]+%% +0 ", out)
      -- the labels are the dataset's own: all three of the test split reached the model
      local body = H.last(up).body
      local enum = body.response_format and body.response_format.json_schema
        and body.response_format.json_schema.schema.properties.label.enum
        or nil
      assert.is_nil(enum) -- the last request was Hermes': JSON mode, the schema in the prompt
      assert.matches('"enum":%["billing","delivery"%]', body.messages[1].content)
      out = run("eval --no-progress --json --limit 2", DATA)
      local row = json.decode(out)
      assert.are.equal(2, row.n)
      assert.are.equal("gpt-4o-mini", row.model)
      assert.is_true(row.accuracy >= 0 and row.accuracy <= 1)
    end)

    it("takes labels from a comma list or a JSON file of label = description", function()
      local path = H.write_tmp(json.encode{ billing = "payments, refunds", delivery = "parcels", other = "else" })
      finally(function() os.remove(path) end)
      local out, err, code = run("eval --no-progress --labels " .. path, DATA)
      assert.are.equal(0, code, err)
      assert.matches("\ngpt%-4o%-mini +4 ", out)
      assert.matches("%- billing: payments, refunds", H.last(up).body.messages[1].content)
      run("eval --no-progress --labels billing,delivery,other,technical", DATA)
      assert.are.same({ "billing", "delivery", "other", "technical" },
        H.last(up).body.response_format.json_schema.schema.properties.label.enum)
    end)

    it("exits 1 when items failed, 2 on bad usage or a bad dataset", function()
      local _, _, code = run("eval --no-progress -m sim:status=400", DATA)
      assert.are.equal(1, code)
      local _, err
      _, err, code = run("eval", "not json\n")
      assert.are.equal(2, code)
      assert.matches("line 1 is not a JSON object", err)
      _, err, code = run("eval", json.encode{ text = "no label" })
      assert.are.equal(2, code)
      assert.matches("no string 'label'", err)
      _, err, code = run("eval --task extract", json.encode{ document = "x" })
      assert.are.equal(2, code)
      assert.matches("needs %-%-schema", err)
      _, err, code = run("eval --split nope", DATA)
      assert.are.equal(2, code)
      assert.matches("no items", err)
    end)

    it("--task extract reports the schema-valid rate", function()
      local path = H.write_tmp(H.ORDER_SCHEMA)
      finally(function() os.remove(path) end)
      local out, err, code = run("eval --no-progress --json --task extract --schema " .. path,
        json.encode{ document = "Order 58213 is late", expected = { order = "58213" } })
      assert.are.equal(0, code, err)
      local row = json.decode(out)
      assert.are.equal(1, row.valid_rate)
      assert.are.equal(1, row.field_accuracy)
      assert.are.equal(1, row.n)
    end)
  end)
end)

-- The commands besides the batch jobs, from a hostile review.
describe("bin/slm chat, count, models, usage, sim: hostile input", function()
  -- Runs `env ENV bin/slm ARGS` (no key of the caller's): stdout, stderr, exit status.
  local function run_env(env, cmdline, stdin)
    local errf = os.tmpname()
    local inf = stdin and H.write_tmp(stdin)
    local p = io.popen(("env -u SLM_API_KEY -u OPENAI_API_KEY SLM_BASE_URL=%s %s bin/slm %s <%s 2>%s"):format(
      up.url, env or "", cmdline, inf or "/dev/null", errf))
    local out = p:read("a")
    local ok, _, code = p:close()
    local ef = io.open(errf); local err = ef:read("a"); ef:close()
    os.remove(errf); if inf then os.remove(inf) end
    return out, err, ok and 0 or code
  end

  local function no_traceback(err) assert.is_nil(err:find("traceback", 1, true), err) end

  it("sim stop never signals the process a stale nginx.pid names, nor stops what sim start did not start", function()
    local tmp = H.write_tmp("")
    os.remove(tmp)
    assert.is_true(os.execute("mkdir " .. tmp))
    local sleeper
    finally(function()
      if sleeper then os.execute("kill " .. sleeper .. " 2>/dev/null") end
      os.execute("rm -rf " .. tmp)
    end)
    local out, err, code = run_env("TMPDIR=" .. tmp, "sim start")
    assert.are.equal(0, code, err)
    local prefix = err:match("sim stop (/%S+)\n")
    assert.truthy(prefix, err)
    -- its nginx dies without cleaning up (SIGKILL, a reboot) and the pid is
    -- taken by another program
    local master = io.open(prefix .. "/nginx.pid"):read("l")
    -- (its workers from /proc, not ps: ps hangs under the ASan stage's LD_PRELOAD)
    local kids = io.open("/proc/" .. master .. "/task/" .. master .. "/children", "rb")
    local workers = kids and kids:read("a") or ""
    if kids then kids:close() end
    os.execute("kill -KILL " .. workers:gsub("%s+", " ") .. " " .. master .. " 2>/dev/null; sleep 0.3")
    local p = io.popen("sleep 60 >/dev/null 2>&1 & echo $!")
    sleeper = p:read("l")
    p:close()
    local f = io.open(prefix .. "/nginx.pid", "w"); f:write(sleeper, "\n"); f:close()
    out = run_env("TMPDIR=" .. tmp, "sim status")
    assert.truthy(out:find("not running  " .. prefix, 1, true), out)
    out, err, code = run_env("TMPDIR=" .. tmp, "sim stop")
    assert.are.equal(0, code, err)
    assert.matches("process " .. sleeper .. " of its nginx.pid is another program's, left alone", err)
    assert.is_true(os.execute("kill -0 " .. sleeper .. " 2>/dev/null"), "the other program was killed")
    assert.is_nil(io.open(prefix .. "/.slm-upstream"))
    -- twice: nothing there, nothing done
    _, err, code = run_env("TMPDIR=" .. tmp, "sim stop " .. prefix)
    assert.are.equal(1, code)
    assert.matches("no simulator in " .. prefix:gsub("%p", "%%%0") .. " %(stopped already%?%)", err)
    -- a simulator that a test (tests/upstream/launch.lua) started is not `slm sim`'s to stop
    _, err, code = run_env(nil, "sim stop " .. up.prefix)
    assert.are.equal(1, code)
    assert.matches("was not started by `slm sim start`: left alone", err)
    assert.is_table(up:stats())
  end)

  it("chat with a bad SLM_BASE_URL or key says which variable, exit 2, no traceback and no secret", function()
    local _, err, code = run_env("SLM_BASE_URL='http://u:sk-hidden-77@bad host/v1'", "chat hi")
    assert.are.equal(2, code)
    assert.matches("^slm: slm.client: SLM_BASE_URL / OPENAI_BASE_URL must be an http%(s%) URL", err)
    assert.is_nil(err:find("sk-hidden-77", 1, true), err)
    no_traceback(err)
    _, err, code = run_env("SLM_API_KEY=\"$(printf 'sk-hidden-77\\nx')\"", "chat hi")
    assert.are.equal(2, code)
    assert.matches("SLM_API_KEY / OPENAI_API_KEY must be a string without CR, LF or NUL", err)
    assert.is_nil(err:find("sk-hidden-77", 1, true), err)
    no_traceback(err)
  end)

  it("count: a directory, an unknown model, a bad request, an endless input are errors (exit 2), not tracebacks", function()
    local _, err, code = run_env(nil, "count /tmp")
    assert.are.equal(2, code)
    assert.matches("^slm: count: cannot read /tmp: Is a directory\n$", err)
    _, err, code = run_env(nil, "count -m no-such-model", "hello")
    assert.are.equal(2, code)
    assert.matches("^slm: count: unknown model or encoding 'no%-such%-model'\n$", err)
    _, err, code = run_env(nil, "count", '{"messages": 5}')
    assert.are.equal(2, code)
    assert.matches("^slm: count: slm.count: request.messages must be a list\n$", err)
    _, err, code = run_env(nil, "count", '{"messages": [{"role": "user", "content": 5}]}')
    assert.are.equal(2, code)
    no_traceback(err)
    _, err, code = run_env(nil, "count /dev/zero")
    assert.are.equal(2, code)
    assert.matches("^slm: count: /dev/zero is larger than 256 MiB\n$", err)
  end)

  it("count: JSON that is no request is a text; a request's own model counts without -m", function()
    local tok = require("slm").tokenizer("gpt-4o-mini")
    for _, text in ipairs({ '{"a": 1, "b": [1, 2, 3]}', "[1, 2]", '"a string"' }) do
      local out, err, code = run_env(nil, "count", text)
      assert.are.equal(0, code, err)
      assert.are.equal(tok:count(text) .. "\n", out)
    end
    local req = json.encode{ model = "nousresearch/hermes-3-llama-3.1-405b",
      messages = { { role = "user", content = "hello there" } } }
    local slm = require "slm"
    local out = run_env(nil, "count", req)
    local n, info = slm.count(json.decode(req))
    assert.are.equal(n .. (info.estimate and " (estimate)" or "") .. "\n", out)
    assert.are_not.equal(slm.count(json.decode(req), "gpt-4o-mini") .. "\n", out)
    out = run_env(nil, "count -m gpt-4o-mini", req)
    assert.are.equal(slm.count(json.decode(req), "gpt-4o-mini") .. "\n", out)
  end)

  it("usage counts only sane lines and names the others; a directory or /dev/zero is an error, not a hang", function()
    local good = { time = "2026-01-02T10:00:00Z", model = "gpt-4o-mini", task = "classify", outcome = "ok",
      prompt_tokens = 10, completion_tokens = 5, tokens = 15, cost = 0.001, call = 1, calls = 1 }
    local lines = { json.encode(good) }
    for _, bad in ipairs({
      '"prompt_tokens": -10', '"prompt_tokens": 1e308', '"tokens": 1e400', '"prompt_tokens": NaN',
      '"prompt_tokens": "10"', '"cost": "abc"', '"cost": -1', '"calls": "x"', '"completion_tokens": 1.5',
    }) do
      lines[#lines + 1] = '{"time": "2026-01-02T11:00:00Z", "model": "gpt-4o-mini", "outcome": "ok", ' .. bad .. "}"
    end
    lines[#lines + 1] = "[1, 2, 3]"
    lines[#lines + 1] = json.encode{ time = "2026-01-03T00:00:00Z", model = "x\n" .. ("fake row "):rep(3),
      outcome = "ok", prompt_tokens = 1, tokens = 1, cost = 0 }
    lines[#lines + 1] = '{"time": "2026-01-02T10:00:00Z", "model": "gpt-4o-mi' -- torn
    local log = H.write_tmp(table.concat(lines, "\n"))
    finally(function() os.remove(log) end)
    local out, err, code = run_env(nil, "usage --json " .. log)
    assert.are.equal(0, code, err)
    no_traceback(err)
    local row = json.decode(out)
    assert.are.same({ group = "all", requests = 2, failed = 0, prompt_tokens = 11, completion_tokens = 5,
      tokens = 16, cost = 0.001, unpriced = 0 }, row)
    assert.matches(": 11 lines are no usage lines and are not counted %(line 2: prompt_tokens is not a whole number",
      err)
    -- a name with a line end cannot forge a row of the table
    out, err, code = run_env(nil, "usage --by model " .. log)
    assert.are.equal(0, code, err)
    assert.matches("\nx\\x0Afake row fake row fake row ", out)
    local rows = 0
    for _ in out:gmatch("[^\n]+") do rows = rows + 1 end
    assert.are.equal(3, rows, out)
    _, err, code = run_env(nil, "usage /tmp")
    assert.are.equal(2, code)
    assert.matches("^slm: usage: cannot read /tmp: Is a directory\n$", err)
    _, err, code = run_env(nil, "usage /dev/zero")
    assert.are.equal(2, code)
    assert.matches("^slm: usage: /dev/zero: line 1 is longer than 64 MiB: not a usage log\n$", err)
  end)

  it("output to a full disk is exit 1 with the reason, never exit 0 with the output lost", function()
    if not io.open("/dev/full", "w") then return pending("no /dev/full") end
    local log = H.write_tmp(json.encode{ model = "m", outcome = "ok", prompt_tokens = 1 })
    finally(function() os.remove(log) end)
    for _, cmd in ipairs({ "chat hi", "chat --stream hi", "count", "models", "usage " .. log }) do
      local _, err, code = run_env(nil, cmd .. " >/dev/full", "some text")
      assert.are.equal(1, code, cmd .. ": " .. err)
      assert.matches("cannot write .*to stdout: No space left on device", err)
    end
  end)
end)
