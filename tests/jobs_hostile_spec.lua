-- tests/jobs_hostile_spec.lua: the batch jobs of bin/slm under a hostile
-- user, second round: two runs of one job at once, outputs that are no
-- file, option values the task or the client refuses, and a Batch API
-- whose output lines lie about their usage.  The simulator's counters
-- prove what was sent.
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
  return ("SLM_BASE_URL=%s SLM_API_KEY=sk-hostile-secret-42 SLM_STATE_DIR=%s "):format(up.url, H.q(dir .. "/state"))
end

-- bin/slm in the foreground: stdout, stderr, exit status.
local function run(cmdline, envx) return H.run_slm(envx or env(), dir, cmdline) end

local function spawn(cmdline) return H.spawn_slm(env(), dir, cmdline) end

local lines_of = H.lines_of

local function tickets(n, path, extra)
  local t = {}
  for i = 1, n do
    t[i] = json.encode{ id = i, text = ("ticket %d: my invoice %d is wrong%s"):format(i, i, extra and extra[i] or "") }
  end
  H.write_file(path, table.concat(t, "\n") .. "\n")
  return path
end

local function wait_rows(path, n) H.wait_lines(path, n, "the ledger") end

local LABELS = "--labels billing,delivery,other"

describe("slm batch jobs, hostile round 2", function()
  it("two runs of one job at once: the second is refused before it sends anything; a killed run's lock is taken over", function()
    local N = 8
    local input = tickets(N, dir .. "/in.jsonl")
    local out = dir .. "/out.jsonl"
    local cmd = ("classify %s --header 'X-Sim-Scenario: delay=300' -c 1 --no-progress -o %s %s"):format(LABELS, out,
      input)
    local h = spawn(cmd)
    wait_rows(out .. ".ledger", 1)
    local _, err, code = run(cmd)
    assert.are.equal(2, code, err)
    assert.matches("another run of this job %(pid %d+%) holds " .. out:gsub("%p", "%%%0") .. "%.ledger%.lock", err)
    assert.are.equal(0, h.wait(), h.stderr())
    assert.are.equal(N, up:stats().requests)   -- every row once: the second run sent none
    for _, n in pairs(up:stats().by_key) do assert.are.equal(1, n) end
    assert.is_nil(io.open(out .. ".ledger.lock/pid"))  -- released at the end
    assert.are.equal(N, #lines_of(out))
    -- a run killed with SIGKILL leaves its lock; the next run takes it over
    local out2 = dir .. "/out2.jsonl"
    local cmd2 = cmd:gsub(out:gsub("%p", "%%%0"), out2)
    h = spawn(cmd2)
    wait_rows(out2 .. ".ledger", 1)
    h.kill("KILL")
    h.wait()
    assert.truthy(io.open(out2 .. ".ledger.lock/pid"))
    _, err, code = run(cmd2)
    assert.are.equal(0, code, err)
    assert.are.equal(N, #lines_of(out2))
    assert.is_nil(io.open(out2 .. ".ledger.lock/pid"))
  end)

  it("an option the client refuses (--rpm 0, --tpm 0, --timeout 0) is exit 2, never 0", function()
    local input = tickets(2, dir .. "/in.jsonl")
    for _, opt in ipairs({ "--rpm 0", "--tpm 0", "--timeout 0" }) do
      local _, err, code = run(("classify %s %s -o %s %s"):format(LABELS, opt, dir .. "/o.jsonl", input))
      assert.are.equal(2, code, opt .. ": " .. err)
      assert.matches("must be a positive", err)
    end
    assert.are.equal(0, up:stats().requests)
    -- `slm batch status` with a malformed endpoint: exit 2 too
    local _, err, code = run("batch status abc", "SLM_BASE_URL='ftp://x' SLM_API_KEY=sk-hostile-secret-42 ")
    assert.are.equal(2, code, err)
    assert.falsy(err:find("sk-hostile-secret-42", 1, true))
  end)

  it("an output that is a directory or a device is refused (exit 2) before anything is sent", function()
    local input = tickets(2, dir .. "/in.jsonl")
    os.execute("mkdir " .. H.q(dir .. "/outdir") .. " " .. H.q(dir .. "/o2.jsonl.tmp"))
    local _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, dir .. "/outdir", input))
    assert.are.equal(2, code, err)
    assert.matches("is a directory, not a regular file", err)
    _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, dir .. "/o2.jsonl", input))
    assert.are.equal(2, code, err)
    assert.matches("o2%.jsonl%.tmp is a directory", err)
    -- a FIFO (as /dev/null, a device, it would be replaced by a regular file by the rename)
    local fifo = dir .. "/fifo.jsonl"
    assert(os.execute("mkfifo " .. H.q(fifo)))
    _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, fifo, input))
    assert.are.equal(2, code, err)
    assert.matches("is a fifo, not a regular file", err)
    assert.are.equal("fifo", require("slm.core").file_type(fifo))
    -- /dev/stdout, /proc/self/fd/1: paths under /dev and /proc are refused
    -- as such (/dev/stdout redirected to a file stats as a file); this one
    -- is harmless to try without the check (nothing can be made in /proc)
    _, err, code = run(("classify %s --no-progress -o /proc/self/fd/1 %s"):format(LABELS, input))
    assert.are.equal(2, code, err)
    assert.matches("a device or a process file", err)
    assert.are.equal(0, up:stats().requests)
    assert.falsy(err:find("traceback", 1, true))
  end)

  it("a --threshold over 1, no labels, a --temperature over 2: exit 2, nothing sent, no error rows kept", function()
    local input = tickets(2, dir .. "/in.jsonl")
    local out = dir .. "/o.jsonl"
    local tpl = dir .. "/t.txt"
    H.write_file(tpl, "Write about {{text}}")
    for _, c in ipairs({ LABELS .. " --threshold 7", "--labels ' , '" }) do
      local _, err, code = run(("classify %s --no-progress -o %s %s"):format(c, out, input))
      assert.are.equal(2, code, c .. ": " .. err)
    end
    local _, err, code = run(("generate --template %s --temperature 5 --no-progress -o %s %s"):format(tpl, out, input))
    assert.are.equal(2, code, err)
    assert.matches("between 0 and 2", err)
    assert.are.equal(0, up:stats().requests)
    assert.are.same({}, lines_of(out .. ".ledger"))
  end)

  it("--via batch: output lines whose usage lies (-1, 1e15, a string, none) are counted, never priced as free", function()
    local input = tickets(5, dir .. "/in.jsonl", { " [sim:usage=neg]", " [sim:usage=huge]", " [sim:usage=string]",
      " [sim:usage=missing]", "" })
    local out = dir .. "/b.jsonl"
    local _, err, code = run(("classify %s --poll-interval 0.02 --no-progress --via batch -o %s %s"):format(LABELS, out,
      input))
    assert.are.equal(0, code, err)
    local rows = {}
    for _, l in ipairs(lines_of(out)) do rows[#rows + 1] = json.decode(l) end
    assert.are.equal(5, #rows)
    local sum, honest = 0, rows[5].cost
    for i, r in ipairs(rows) do
      assert.are.equal("ok", r.status)
      -- a counted prompt is at least the honest row's size, never 0
      assert.is_true(r.cost >= honest * 0.8, ("row %d: %s"):format(i, tostring(r.cost)))
      assert.is_true(r.cost < honest * 10, ("row %d: %s"):format(i, tostring(r.cost)))
    end
    for _, l in ipairs(lines_of(out .. ".usage.jsonl")) do
      local u = json.decode(l)
      assert.is_true(u.prompt_tokens > 0 and u.completion_tokens > 0, l)
      sum = sum + u.cost
    end
    local total = tonumber(err:match("%$([%d.]+)"))
    assert.near(total, sum, 1e-6)
  end)
end)

describe("slm batch jobs, hostile round 2: secrets", function()
  it("a --header without a colon is refused without quoting it: it may be a key", function()
    local input = tickets(1, dir .. "/in.jsonl")
    local out, err, code = run(("classify %s --header 'Authorization Bearer sk-live-0123456789' -o %s %s")
      :format(LABELS, dir .. "/o.jsonl", input))
    assert.are.equal(2, code, err)
    assert.matches("%-%-header 1 has no ':'", err)
    assert.falsy((out .. err):find("sk-live-0123456789", 1, true), err)
    assert.are.equal(0, up:stats().requests)
  end)
end)

describe("a model with no price", function()
  it("has an unknown cost in the rows, the usage log, the summary and slm usage, never $0", function()
    local input = tickets(2, dir .. "/in.jsonl")
    local out, log = dir .. "/out.jsonl", dir .. "/usage.jsonl"
    local _, err, code = run("classify --labels billing,tech -m sim-unpriced-model --usage-log " .. log
      .. " -o " .. out .. " " .. input)
    assert.equal(0, code, err)
    for _, line in ipairs(lines_of(out)) do
      local row = json.decode(line)
      assert.equal(json.null, row.cost, line)
    end
    for _, line in ipairs(lines_of(log)) do
      local u = json.decode(line)
      assert.is_nil(u.cost, line)
      assert.is_true(u.cost_unknown, line)
    end
    assert.matches("%+ the unknown cost of 2 row%(s%) of a model with no price", err)
    local text, uerr, ucode = run("usage " .. log)
    assert.equal(0, ucode, uerr)
    assert.matches("2 line%(s%) of models with no price: their cost is unknown", text)
  end)
end)

describe("an error of the --via batch path", function()
  it("has one slm: prefix", function()
    local input = tickets(2, dir .. "/in.jsonl")
    local envx = ("SLM_BASE_URL=http://127.0.0.1:%d/v1 SLM_API_KEY=sk-x SLM_STATE_DIR=%s "):format(H.dead_port(),
      H.q(dir .. "/state"))
    local _, err, code = run("classify --labels billing,tech --via batch -o " .. dir .. "/out.jsonl " .. input, envx)
    assert.equal(1, code, err)
    assert.matches("^slm: classify: submitting: connect: ", err)
    assert.is_nil(err:find("slm: slm:", 1, true))
    assert.is_nil(err:find(": slm: ", 1, true), err)
  end)
end)
