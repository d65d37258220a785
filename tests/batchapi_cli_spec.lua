-- tests/batchapi_cli_spec.lua: `slm classify|batch ... --via batch` and
-- `slm batch status|resume|cancel ID`, the real bin/slm against the
-- simulator's Batch API: the same result rows as the direct path, the usage
-- log marked via = "batch", partial failure, expiry and resume, and the
-- job submitted by one process and collected by another.  The simulator's
-- batch counters (lines run per custom_id, those answered 200) prove that no
-- row that succeeded was sent twice.
local H = require "tests.helpers"
local json = require "cjson"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)

local dir
before_each(function()
  up:reset()
  up:post("/__sim/batch_mode", "{}")
  dir = H.tmpdir()
end)
after_each(function() if dir then os.execute("rm -rf " .. H.q(dir)) end end)

local function env()
  return ("SLM_BASE_URL=%s SLM_API_KEY=sk-batch-secret-123 SLM_STATE_DIR=%s "):format(up.url, H.q(dir .. "/state"))
end

-- bin/slm in the foreground: stdout, stderr, exit status.
local function run(cmdline) return H.run_slm(env(), dir, cmdline) end

-- bin/slm in the background (tests/helpers.lua)
local function spawn(cmdline) return H.spawn_slm(env(), dir, cmdline) end

-- Wait until a file holds the pattern.
local function wait_for(path, pattern)
  for _ = 1, 1000 do
    local f = io.open(path, "rb")
    local text = f and f:read("a")
    if f then f:close() end
    if text and text:find(pattern) then return text end
    os.execute("sleep 0.01")
  end
  error(path .. " never held " .. pattern)
end

local function rows_of(path)
  local rows = {}
  local f = io.open(path, "rb")
  if not f then return rows end
  for line in f:lines() do rows[#rows + 1] = json.decode(line) end
  f:close()
  return rows
end

-- n tickets; extra[i] is appended to ticket i's text (directives)
local function tickets(n, extra)
  local lines = {}
  for i = 1, n do
    lines[i] = json.encode({ id = i, text = ("ticket %d: my invoice %d is wrong%s"):format(i, i, extra and extra[i] or "") })
  end
  local path = dir .. "/in.jsonl"
  H.write_file(path, table.concat(lines, "\n") .. "\n")
  return path
end

local function mode(directives)
  up:post("/__sim/batch_mode", json.encode({ directives = directives }))
end

local CLASSIFY = "classify --labels billing,tech,other --poll-interval 0.02 "

describe("slm --via batch", function()
  it("writes the same rows as the direct path, at half the price, the usage log marked via = batch", function()
    local input = tickets(6)
    local _, err, code = run(CLASSIFY .. "-o " .. dir .. "/direct.jsonl " .. input)
    assert.equal(0, code, err)
    assert.equal(0, up:batch_stats().creates)
    _, err, code = run(CLASSIFY .. "--via batch -o " .. dir .. "/batch.jsonl " .. input)
    assert.equal(0, code, err)
    assert.matches("batch batch_sim%d+: completed, 6 of 6 done, 0 failed", err)
    local bs = up:batch_stats()
    assert.equal(1, bs.creates)
    assert.equal(6, bs.lines)
    local direct, batch = rows_of(dir .. "/direct.jsonl"), rows_of(dir .. "/batch.jsonl")
    assert.equal(6, #batch)
    for i = 1, 6 do
      local d, b = direct[i], batch[i]
      local dk, bk = {}, {}
      for k in pairs(d) do dk[#dk + 1] = k end
      for k in pairs(b) do bk[#bk + 1] = k end
      table.sort(dk); table.sort(bk)
      assert.same(dk, bk)
      assert.equal(d.id, b.id)
      assert.equal(d.label, b.label)
      assert.equal("ok", b.status)
      assert.equal(d.tokens, b.tokens)
      assert.near(d.cost / 2, b.cost, 1e-12)
    end
    local usage = rows_of(dir .. "/batch.jsonl.usage.jsonl")
    assert.equal(6, #usage)
    local sum = 0
    for _, u in ipairs(usage) do
      assert.equal("batch", u.via)
      sum = sum + u.cost
    end
    for _, u in ipairs(rows_of(dir .. "/direct.jsonl.usage.jsonl")) do assert.is_nil(u.via) end
    assert.matches(("%.6f"):format(sum):gsub("%.", "%%."), err)
    -- the key never in anything written
    for _, f in ipairs{ "batch.jsonl", "batch.jsonl.usage.jsonl", "batch.jsonl.batch/ledger.json",
      "batch.jsonl.batch/requests.jsonl", "batch.jsonl.batch/results.jsonl" } do
      assert.falsy(H.read_file(dir .. "/" .. f):find("sk-batch-secret", 1, true), f)
    end
  end)

  it("the summary's time is the whole run's: the submission and the wait included", function()
    mode("step_ms=150") -- one stage per 150 ms: the batch takes a few hundred ms
    local input = tickets(2)
    local t0 = os.time()
    local _, err, code = run(CLASSIFY .. "--via batch -o " .. dir .. "/b.jsonl " .. input)
    assert.equal(0, code, err)
    local secs = tonumber(err:match("requests, %d+ tokens .-, %$[%d.]+, ([%d.]+) s"))
    assert.is_true(secs >= 0.3, err)
    assert.is_true(secs <= os.time() - t0 + 1, err)
  end)

  it("a follow-up request (a repair re-ask) goes out directly: its usage-log line says via = direct", function()
    local schema = dir .. "/s.json"
    H.write_file(schema, H.ORDER_SCHEMA)
    local input = dir .. "/in.jsonl"
    -- the batch's reply lacks `order` ([sim:...] in a line's text is the batch simulator's);
    -- the repair re-ask is a direct request, which answers in full
    H.write_file(input, '{"id":"a","text":"Order 12 is late [sim:missing_field]"}\n{"id":"b","text":"Order 13 is late"}\n')
    local _, err, code = run("extract --schema " .. schema .. " --id-column id --poll-interval 0.02 --via batch -o "
      .. dir .. "/e.jsonl " .. input)
    assert.equal(0, code, err)
    local lines = rows_of(dir .. "/e.jsonl.usage.jsonl")
    local got = {}
    for _, l in ipairs(lines) do got[#got + 1] = { l.id, l.call, l.calls, l.via } end
    table.sort(got, function(x, y) return x[1] .. x[2] < y[1] .. y[2] end)
    assert.same({ { "a", 1, 2, "batch" }, { "a", 2, 2, "direct" }, { "b", 1, 1, "batch" } }, got)
    local rows = rows_of(dir .. "/e.jsonl")
    local sum = 0
    for _, l in ipairs(lines) do if l.id == "a" then sum = sum + l.cost end end
    assert.near(rows[1].cost, sum, 1e-12)
  end)

  it("CSV in and out: the direct path's file but for the cost column", function()
    local input = dir .. "/in.csv"
    H.write_file(input, '\239\187\191id,text\r\n1,"my invoice, it is ""wrong"""\r\n2,"the app\ncrashes"\r\n3,refund please\r\n')
    local _, err, code = run(CLASSIFY .. "-o " .. dir .. "/direct.csv " .. input)
    assert.equal(0, code, err)
    _, err, code = run(CLASSIFY .. "--via batch -o " .. dir .. "/batch.csv " .. input)
    assert.equal(0, code, err)
    local csv = require "slm.csv"
    local function rows(path)
      local list = {}
      for rec in csv.reader(path):rows() do list[#list + 1] = rec end
      return list
    end
    local d, b = rows(dir .. "/direct.csv"), rows(dir .. "/batch.csv")
    assert.equal(3, #b)
    local cost_col
    local r = csv.reader(dir .. "/batch.csv")
    r:rows()()
    for i, name in ipairs(r:header()) do if name == "cost" then cost_col = i end end
    assert.truthy(cost_col)
    for i = 1, 3 do
      for j = 1, #d[i] do
        if j == cost_col then
          assert.near(tonumber(d[i][j]) / 2, tonumber(b[i][j]), 1e-12)
        else
          assert.equal(d[i][j], b[i][j])
        end
      end
    end
    assert.equal("the app\ncrashes", b[2][2])
  end)

  it("keeps failed rows as error rows, then resume sends only them", function()
    local input = tickets(5, { [2] = " [sim:status=500,fail=1]", [4] = " [sim:status=503,fail=1]" })
    local out = dir .. "/out.jsonl"
    local _, err, code = run(CLASSIFY .. "--via batch -o " .. out .. " " .. input)
    assert.equal(1, code, err)
    local rows = rows_of(out)
    assert.equal("error", rows[2].status)
    assert.equal("server", rows[2].error_kind)
    assert.equal("error", rows[4].status)
    assert.equal("ok", rows[1].status)
    local id = assert(H.read_file(dir .. "/out.jsonl.batch/ledger.json"):match('"id":"(%x+)"'))
    local st
    st, err, code = run("batch status " .. id)
    assert.equal(0, code, err)
    assert.matches("rows 5: 3 succeeded, 2 failed %(server 2%)", st)
    assert.matches("^batch job " .. id .. " %(.-%): slm classify\n", st)
    -- by its directory: the same job, its record found through the ledger's id
    local by_dir = run("batch status " .. out .. ".batch")
    assert.matches("^batch job " .. id .. " %(.-%): slm classify\n", by_dir)
    _, err, code = run("batch resume " .. id)
    assert.equal(0, code, err)
    rows = rows_of(out)
    for i = 1, 5 do assert.equal("ok", rows[i].status, "row " .. i) end
    local bs = up:batch_stats()
    assert.equal(2, bs.creates)
    local per_row = {}
    for cid, n in pairs(bs.ok_by_custom_id) do per_row[#per_row + 1] = n; assert.equal(1, n, cid) end
    assert.equal(5, #per_row)
    assert.equal(7, bs.lines) -- 5, then the 2 that failed
  end)

  it("resumes an expired batch with its unfinished rows only", function()
    mode("expire=2")
    local input = tickets(6)
    local out = dir .. "/out.jsonl"
    local _, err, code = run(CLASSIFY .. "--via batch -o " .. out .. " " .. input)
    assert.equal(1, code, err)
    assert.matches("expired", err)
    local rows = rows_of(out)
    local ok, timeouts = 0, 0
    for _, r in ipairs(rows) do
      if r.status == "ok" then ok = ok + 1 elseif r.error_kind == "timeout" then timeouts = timeouts + 1 end
    end
    assert.same({ 2, 4 }, { ok, timeouts })
    mode(nil)
    -- the same command again resumes
    _, err, code = run(CLASSIFY .. "--via batch -o " .. out .. " " .. input)
    assert.equal(0, code, err)
    assert.matches("4 succeeded, 0 failed, 2 done before", err)
    local bs = up:batch_stats()
    assert.equal(6, bs.lines)
    for cid, n in pairs(bs.lines_by_custom_id) do assert.equal(1, n, cid) end
  end)

  it("submits in one process and collects in another; status and cancel by ID", function()
    mode("polls=3")
    local input = tickets(4)
    local out = dir .. "/out.jsonl"
    local id, err, code = run(CLASSIFY .. "--via batch --no-wait --header 'X-Api-Key: sk-hdr-secret-999' "
      .. "--header 'X-Title: tickets' -o " .. out .. " " .. input)
    assert.equal(0, code, err)
    id = id:match("^(%x+)\n$")
    assert.truthy(id, err)
    assert.matches("4 rows submitted in 1 batches", err)
    assert.matches("a secret %-%-header is not recorded", err)
    local record = H.read_file(dir .. "/state/batches/" .. id .. ".json")
    assert.falsy(record:find("sk-hdr-secret", 1, true))
    assert.truthy(record:find("X-Title: tickets", 1, true))
    assert.is_nil(io.open(out))
    local st
    st, err, code = run("batch status " .. id)
    assert.equal(0, code, err)
    assert.matches("batch job " .. id, st)
    assert.matches("4 not collected", st)
    assert.matches("batch_sim%d+  validating", st)
    _, err, code = run("batch resume " .. id)
    assert.equal(0, code, err)
    local rows = rows_of(out)
    assert.equal(4, #rows)
    for _, r in ipairs(rows) do assert.equal("ok", r.status) end
    assert.equal(1, up:batch_stats().creates)
    local lines = up:batch_stats().lines
    -- cancel: a second job, cancelled before it ran
    H.write_file(dir .. "/in2.jsonl", '{"prompt":"hello"}\n{"prompt":"again"}\n')
    mode("polls=100")
    id = run("batch --via batch --no-wait --poll-interval 0.02 -o " .. dir .. "/raw.jsonl " .. dir .. "/in2.jsonl")
    id = assert(id:match("^(%x+)\n$"))
    st, err, code = run("batch cancel " .. id)
    assert.equal(0, code, err)
    assert.matches("cancelling", st)
    st = run("batch status " .. id)
    assert.matches("cancelled", st)
    assert.equal(lines, up:batch_stats().lines)
    assert.equal(1, up:batch_stats().cancels)
  end)

  it("a changed label set sends every row again, and only this run's rows", function()
    local input = tickets(3, { [2] = " [sim:status=500]" })
    local out = dir .. "/out.jsonl"
    local _, err, code = run(CLASSIFY .. "--via batch -o " .. out .. " " .. input)
    assert.equal(1, code, err)
    _, err, code = run("classify --labels billing,tech --poll-interval 0.02 --via batch -o " .. out .. " " .. input)
    assert.equal(1, code, err)
    local bs = up:batch_stats()
    assert.equal(2, bs.creates)
    assert.equal(6, bs.lines) -- 3 rows twice: the first run's failed row is not sent for the second run
  end)

  it("a --budget submits the rows whose worst case fits, exit 3, and a rerun does the rest", function()
    local input = tickets(5)
    local out = dir .. "/out.jsonl"
    local _, err, code = run(CLASSIFY .. "--via batch --budget 0.00005 -o " .. out .. " " .. input)
    assert.equal(3, code, err)
    assert.matches("budget", err)
    local first = up:batch_stats().lines
    assert.is_true(first >= 1 and first < 5, tostring(first))
    assert.equal(first, #rows_of(out))
    _, err, code = run(CLASSIFY .. "--via batch --budget 1 -o " .. out .. " " .. input)
    assert.equal(0, code, err)
    assert.equal(5, #rows_of(out))
    local bs = up:batch_stats()
    assert.equal(5, bs.lines)
    for cid, n in pairs(bs.lines_by_custom_id) do assert.equal(1, n, cid) end
  end)

  it("splits a job at --batch-max-requests, and says what is wrong with bad usage", function()
    local input = tickets(5)
    local _, err, code = run(CLASSIFY .. "--via batch --batch-max-requests 2 -o " .. dir .. "/o.jsonl " .. input)
    assert.equal(0, code, err)
    assert.equal(3, up:batch_stats().creates)
    _, err, code = run(CLASSIFY .. "--via batch " .. input)
    assert.equal(2, code)
    assert.matches("needs %-o OUTPUT", err)
    _, err, code = run("batch status nosuchjob")
    assert.equal(1, code)
    assert.matches("no batch job 'nosuchjob'", err)
    -- a usage error names the command as typed (README: `slm batch status|resume|cancel ID`)
    _, err, code = run("batch cancel")
    assert.equal(2, code)
    assert.matches("^Usage: slm batch {status,resume,cancel} <id>", err)
    assert.falsy(err:find("batch-job", 1, true), err)
  end)

  it("a batch whose creation was cut off (the process killed before the batch id was saved) is adopted by the rerun, not made again", function()
    mode("polls=2")
    local input = tickets(4)
    local out = dir .. "/out.jsonl"
    local _, err, code = run(CLASSIFY .. "--via batch --no-wait -o " .. out .. " " .. input)
    assert.equal(0, code, err)
    assert.equal(1, up:batch_stats().creates)
    -- the ledger as a process killed inside the create left it: the file, no batch id
    local lpath = out .. ".batch/ledger.json"
    local text = H.read_file(lpath)
    local cut, n = text:gsub('"id":"batch_sim%d+",', "")
    assert.equal(1, n)
    cut = cut:gsub('"status":"[%w_]+"', '"status":"uploading"')
    H.write_file(lpath, cut)
    _, err, code = run(CLASSIFY .. "--via batch -o " .. out .. " " .. input)
    assert.equal(0, code, err)
    local rows = rows_of(out)
    assert.equal(4, #rows)
    for _, r in ipairs(rows) do assert.equal("ok", r.status) end
    local bs = up:batch_stats()
    assert.equal(1, bs.creates) -- found by its input file, not made a second time
    assert.equal(4, bs.lines)
  end)

  for _, sig in ipairs({ "INT", "TERM" }) do
    it("SIG" .. sig .. " while waiting for the batches: the summary, exit 130, and a rerun collects them", function()
      mode("step_ms=300") -- the batch takes over a second
      local input = tickets(3)
      local out = dir .. "/out.jsonl"
      local h = spawn(CLASSIFY .. "--via batch --no-progress -o " .. out .. " " .. input)
      wait_for(out .. ".batch/ledger.json", '"id":"batch_sim%d+"')
      os.execute("sleep 0.1")
      h.kill(sig)
      local code = h.wait()
      local err = h.stderr()
      assert.equal(130, code, err)
      assert.matches("3 rows: 0 succeeded, 0 failed, 3 not attempted", err)
      assert.matches("interrupted; rerun the same command", err)
      assert.falsy(err:find("traceback", 1, true), err)
      local _
      _, err, code = run(CLASSIFY .. "--via batch -o " .. out .. " " .. input)
      assert.equal(0, code, err)
      assert.equal(3, #rows_of(out))
      local bs = up:batch_stats()
      assert.equal(1, bs.creates)
      assert.equal(3, bs.lines)
    end)
  end

  it("two jobs over the same rows have IDs of their own: one job's ID never resumes the other", function()
    mode("polls=100")
    local input = tickets(2)
    local ids = {}
    for _, name in ipairs({ "a", "b" }) do
      local id, err, code = run(CLASSIFY .. "--via batch --no-wait -o " .. dir .. "/" .. name .. ".jsonl " .. input)
      assert.equal(0, code, err)
      ids[name] = assert(id:match("^(%x+)\n$"), id)
    end
    assert.are_not.equal(ids.a, ids.b)
    for name, id in pairs(ids) do
      local st = run("batch status " .. id)
      assert.matches("^batch job " .. id .. " %(.-/" .. name .. "%.jsonl%.batch%)", st)
    end
  end)

  it("a --budget cannot bound a model with no price: its rows are refused, exit 3, nothing sent", function()
    local input = tickets(3)
    local out = dir .. "/out.jsonl"
    local _, err, code = run(CLASSIFY .. "-m sim-unpriced-model --budget 1 --via batch -o " .. out .. " " .. input)
    assert.equal(3, code, err)
    assert.matches("model sim%-unpriced%-model has no price, so a USD budget cannot bound it", err)
    assert.matches("3 not attempted", err)
    local bs = up:batch_stats()
    assert.equal(0, bs.lines)
    assert.equal(0, bs.creates)
    -- the direct path refuses it the same way
    _, err, code = run(CLASSIFY .. "-m sim-unpriced-model --budget 1 -o " .. dir .. "/direct.jsonl " .. input)
    assert.equal(3, code, err)
    assert.matches("has no price", err)
  end)

  it("a registry record that cannot be written (a full disk) never replaces a good one with a torn one", function()
    local code = [[package.path = "lua/?.lua;lua/?/init.lua;" .. package.path
      package.cpath = "build/?.so;" .. package.cpath
      local vb = require "slm.viabatch"
      assert(vb.register{ id = "job1", dir = "/x", argv = { "classify" }, task = "classify" })
      os.execute("ln -s /dev/full " .. vb.state_dir() .. "/batches/job1.json.tmp")
      local ok, err = vb.register{ id = "job1", dir = "/y", argv = { "classify" }, task = "classify" }
      print(ok, err, vb.lookup("job1").dir)]]
    local f = assert(io.open(dir .. "/reg.lua", "w"))
    f:write(code)
    f:close()
    local p = io.popen(("SLM_STATE_DIR=%s lua5.4 %s 2>&1"):format(H.q(dir .. "/state"), H.q(dir .. "/reg.lua")))
    local out = p:read("a")
    p:close()
    assert.matches("^nil\t[^\n]*No space left on device\t/x\n$", out)
  end)

  it("the stand-ins: the batched request is answered by its body, any other goes to the real client", function()
    local viabatch = require "slm.viabatch"
    local sent = {}
    local real = { model = "gpt-4o-mini", chat = function(_, req)
      sent[#sent + 1] = req.messages[1].content
      return { text = "direct " .. req.messages[1].content }
    end }
    local sink = {}
    local cap = viabatch.capturing(real, sink)
    local res, err = cap:chat{ messages = { { role = "user", content = "first" } }, max_tokens = 5 }
    assert.is_nil(res)
    assert.equal("cancelled", err.kind)
    cap:chat{ messages = { { role = "user", content = "second" } } }
    assert.same({ model = "gpt-4o-mini", max_tokens = 5, messages = { { role = "user", content = "first" } } }, sink.body)
    assert.same({}, sent)
    local rep = viabatch.replaying(real, sink.text, { text = "from the batch" })
    -- a task that makes its calls in another order: "second" first
    assert.equal("direct second", rep:chat{ messages = { { role = "user", content = "second" } } }.text)
    assert.equal("from the batch", rep:chat{ messages = { { role = "user", content = "first" } }, max_tokens = 5 }.text)
    assert.equal("direct first", rep:chat{ messages = { { role = "user", content = "first" } }, max_tokens = 5 }.text)
    assert.same({ "second", "first" }, sent)
  end)
end)
