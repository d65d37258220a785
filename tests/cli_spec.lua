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
