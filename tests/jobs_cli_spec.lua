-- The batch commands of bin/slm (classify, extract, generate, summarize,
-- batch) and their runner (lua/slm/jobs.lua), end to end against the
-- simulator: outputs, resume, dry runs, budgets, signals, the usage log.
-- The simulator's counters (requests, aborted, by_key: attempts per
-- request body) prove what was sent and that nothing was paid twice.
local H = require "tests.helpers"
local json = require "cjson"

local up
setup(function() up = H.upstream() end)
teardown(function() if up then up:stop() end end)
before_each(function() up:reset() end)

local dir
before_each(function() dir = H.tmpdir() end)
after_each(function() if dir then os.execute("rm -rf '" .. dir .. "'") end end)

local function env() return ("SLM_BASE_URL=%s SLM_API_KEY=sk-jobs "):format(up.url) end

-- Runs bin/slm in the foreground: stdout, stderr, exit status.
local function run(cmdline, stdin) return H.run_slm(env(), dir, cmdline, stdin or "") end

-- bin/slm in the background (tests/helpers.lua)
local function spawn(cmdline) return H.spawn_slm(env(), dir, cmdline) end

local lines_of = H.lines_of

local function jsonl_rows(path)
  local rows = {}
  for _, line in ipairs(lines_of(path)) do rows[#rows + 1] = json.decode(line) end
  return rows
end

-- n JSONL tickets, each its own text (so each its own request body)
local function tickets(n, path)
  local t = {}
  local words = { "refund charged twice", "parcel courier late", "thanks great service" }
  for i = 1, n do t[i] = json.encode{ id = i, text = ("ticket %d: %s"):format(i, words[i % 3 + 1]) } end
  H.write_file(path, table.concat(t, "\n") .. "\n")
  return path
end

-- by_key counts of the simulator: how many keys were sent more than once
local function doubled()
  local n, total = 0, 0
  for _, count in pairs(up:stats().by_key) do
    total = total + 1
    if count > 1 then n = n + 1 end
  end
  return n, total
end

local LABELS = "--labels billing,delivery,other"

describe("slm classify", function()
  it("keeps the input columns, appends the results, and reruns nothing that is done", function()
    local input = tickets(6, dir .. "/in.jsonl")
    local out = dir .. "/out.jsonl"
    local _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(0, code, err)
    local rows = jsonl_rows(out)
    assert.are.equal(6, #rows)
    for i, r in ipairs(rows) do
      assert.are.equal(i, r.id)
      assert.matches("^ticket " .. i .. ":", r.text)
      assert.are.equal("ok", r.status)
      assert.truthy(({ billing = true, delivery = true, other = true })[r.label], r.label)
      assert.is_number(r.cost)
      assert.is_true(r.tokens > 0)
    end
    assert.are.equal("billing", rows[3].label) -- "refund charged twice"
    assert.are.equal(6, up:stats().requests)
    assert.matches("6 rows: 6 succeeded, 0 failed", err)
    -- a dry run now prices nothing: every row is done
    local dry = run(("classify %s --dry-run -o %s %s"):format(LABELS, out, input))
    assert.matches("\ngpt%-4o%-mini +0 +0 ", dry)
    -- the same command again: nothing sent, the same output
    local before = H.read_file(out)
    _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(0, code, err)
    assert.are.equal(6, up:stats().requests)
    assert.matches("6 done before", err)
    assert.are.equal(before, H.read_file(out))
    -- another label set, another model: every row again
    _, err, code = run(("classify --labels billing,delivery,other,spam --no-progress -o %s %s"):format(out, input))
    assert.are.equal(0, code, err)
    assert.are.equal(12, up:stats().requests)
    _, err, code = run(("classify %s -m nousresearch/hermes-3-llama-3.1-405b --no-progress -o %s %s")
      :format(LABELS, out, input))
    assert.are.equal(0, code, err)
    assert.are.equal(18, up:stats().requests)
    -- the first label set and model again: all in the ledger still
    _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(0, code, err)
    assert.are.equal(18, up:stats().requests)
    assert.are.equal(before, H.read_file(out))
  end)

  it("a rerun of a finished job reads neither input rows nor ledger, unless the input or output changed", function()
    local input = tickets(4, dir .. "/in.jsonl")
    local out = dir .. "/out.jsonl"
    local cmd = ("classify %s --no-progress -o %s %s"):format(LABELS, out, input)
    local _, err, code = run(cmd)
    assert.are.equal(0, code, err)
    local ledger = lines_of(out .. ".ledger")
    assert.are.equal(5, #ledger)
    local mark = json.decode(ledger[5])
    assert.is_string(mark.complete)
    assert.is_nil(mark.key)
    assert.are.equal(#H.read_file(out), mark.output_size)
    _, err, code = run(cmd)
    assert.are.equal(0, code, err)
    assert.matches("4 rows: 0 succeeded, 0 failed, 4 done before", err)
    assert.are.equal(5, #lines_of(out .. ".ledger"))
    -- the output cut short: rebuilt from the ledger, nothing sent
    H.write_file(out, "")
    _, err, code = run(cmd)
    assert.are.equal(0, code, err)
    assert.are.equal(4, #jsonl_rows(out))
    -- a row added to the input: only it is sent
    H.write_file(input, H.read_file(input) .. '{"id":5,"text":"refund once more"}\n')
    _, err, code = run(cmd)
    assert.are.equal(0, code, err)
    assert.are.equal(5, #jsonl_rows(out))
    assert.are.equal(5, up:stats().requests)
    -- a torn last record (a kill in the middle of a write) is skipped, and
    -- the next record starts on a line of its own
    local fh = assert(io.open(out .. ".ledger", "ab"))
    fh:write('{"cost":0,"key":"00ff')
    fh:close()
    H.write_file(input, H.read_file(input) .. '{"id":6,"text":"refund the rest"}\n')
    _, err, code = run(cmd)
    assert.are.equal(0, code, err)
    assert.are.equal(6, up:stats().requests)
    H.write_file(input, H.read_file(input) .. '{"id":7,"text":"late again"}\n')
    _, err, code = run(cmd)
    assert.are.equal(0, code, err)
    assert.are.equal(7, up:stats().requests) -- row 6 was read back from the ledger: only row 7 sent
    assert.are.equal(7, #jsonl_rows(out))
  end)

  it("an output that cannot be written loses nothing: exit 1, and a rerun writes it from the ledger", function()
    local input = tickets(3, dir .. "/in.jsonl")
    local out = dir .. "/sub/out.jsonl"
    H.write_file(dir .. "/sub", "a file where the output's directory should be")
    local cmd = ("classify %s --no-progress --ledger %s --usage-log %s -o %s %s"):format(LABELS, dir .. "/l",
      dir .. "/u", out, input)
    local _, err, code = run(cmd)
    os.remove(dir .. "/sub")
    os.execute("mkdir '" .. dir .. "/sub'")
    assert.are.equal(1, code, err)
    assert.matches("cannot write the output", err)
    assert.are.equal(3, #lines_of(dir .. "/l"))
    _, err, code = run(cmd)
    assert.are.equal(0, code, err)
    assert.are.equal(3, #jsonl_rows(out))
    assert.are.equal(3, up:stats().requests)
  end)

  it("sends one request for rows with the same input, and gives each the reply", function()
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"id":1,"text":"refund please"}\n{"id":2,"text":"refund please"}\n')
    local out = dir .. "/out.jsonl"
    local _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(0, code, err)
    local rows = jsonl_rows(out)
    assert.are.equal(2, #rows)
    assert.are.equal(rows[1].label, rows[2].label)
    assert.are.equal(1, up:stats().requests)
  end)

  it("turns a bad JSONL line and a row without the column into error rows and goes on (exit 1)", function()
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"text":"refund"}\n{"text": broken\n{"body":"no text column"}\n[1,2]\n{"text":"late parcel"}\n')
    local out = dir .. "/out.jsonl"
    local _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(1, code, err)
    local rows = jsonl_rows(out)
    assert.are.equal(5, #rows)
    assert.are.same({ "ok", "error", "error", "error", "ok" },
      { rows[1].status, rows[2].status, rows[3].status, rows[4].status, rows[5].status })
    assert.are.same({ "parse", "missing_column", "parse" }, { rows[2].error_kind, rows[3].error_kind, rows[4].error_kind })
    assert.matches(":2: ", rows[2].error)
    assert.are.equal("no text column", rows[3].body)
    assert.are.equal(2, up:stats().requests)
    assert.matches("5 rows: 2 succeeded, 3 failed %(missing_column 1, parse 2%)", err)
  end)

  it("a row over the model's context is an error row, priced as such by --dry-run, and never sent", function()
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"text":"refund"}\n{"text":"' .. ("word "):rep(140000) .. '"}\n{"text":"late parcel"}\n')
    local out, err, code = run(("classify %s --dry-run -o %s %s"):format(LABELS, dir .. "/out.jsonl", input))
    assert.are.equal(0, code, err)
    assert.matches("\ngpt%-4o%-mini +3 +%d+ +%S+ +[%d.]+ +[%d.]+ +1", out)
    _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, dir .. "/out.jsonl", input))
    assert.are.equal(1, code, err)
    local rows = jsonl_rows(dir .. "/out.jsonl")
    assert.are.same({ "ok", "error", "ok" }, { rows[1].status, rows[2].status, rows[3].status })
    assert.are.equal("context_length", rows[2].error_kind)
    assert.matches("context of 128000", rows[2].error)
    assert.are.equal(2, up:stats().requests)
    assert.matches("3 rows: 2 succeeded, 1 failed %(context_length 1%)", err)
    assert.matches("\nslm classify: 2 requests", err)
    local log = jsonl_rows(dir .. "/out.jsonl.usage.jsonl")
    assert.are.equal(3, #log)
    local sums = json.decode((run("usage --json " .. dir .. "/out.jsonl.usage.jsonl")))
    assert.are.equal(2, sums.requests)
    assert.are.equal(1, sums.failed)
  end)

  it("--column and --id-column pick the text and the id; --limit the first rows", function()
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"ref":"A","msg":"refund"}\n{"ref":"B","msg":"parcel late"}\n{"ref":"C","msg":"thanks"}\n')
    local out = dir .. "/out.jsonl"
    local _, err, code = run(("classify %s --column msg --id-column ref --limit 2 --no-progress -o %s %s")
      :format(LABELS, out, input))
    assert.are.equal(0, code, err)
    local rows = jsonl_rows(out)
    assert.are.equal(2, #rows)
    assert.are.equal("A", rows[1].ref)
    local log = jsonl_rows(out .. ".usage.jsonl")
    assert.are.equal(2, #log)
    assert.are.equal("A", log[1].id == "A" and "A" or log[2].id)
    _, err, code = run(("classify %s --column nope --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(1, code)
    assert.are.equal("missing_column", jsonl_rows(out)[1].error_kind)
    _, err, code = run(("classify %s --column msg --id-column nope --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(1, code)
    assert.are.equal("missing_column", jsonl_rows(out)[1].error_kind)
    assert.matches("no column 'nope'", jsonl_rows(out)[1].error)
    -- an input column named like a result column: the result's is slm_<name>
    H.write_file(input, '{"text":"refund","label":"gold"}\n')
    _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(0, code, err)
    local r = jsonl_rows(out)[1]
    assert.are.equal("gold", r.label)
    assert.are.equal("billing", r.slm_label)
  end)

  it("keeps a JSONL input's numbers as they were: ids beyond 2^53 exact, integers not turned into floats", function()
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"id":12345678901234567,"n":3,"price":2.5,"text":"refund"}\n')
    local out = dir .. "/out.jsonl"
    local _, err, code = run(("classify %s --id-column id --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(0, code, err)
    local line = H.read_file(out)
    assert.matches('"id":12345678901234567,', line, 1, true)
    assert.matches('"n":3,', line, 1, true)
    assert.matches('"price":2.5,', line, 1, true)
    assert.matches('"id":12345678901234567,', H.read_file(out .. ".usage.jsonl"), 1, true)
    -- and into a CSV: every digit of a float kept (not tostring's 14)
    H.write_file(input, '{"id":12345678901234567,"x":0.1234567890123456,"text":"refund"}\n')
    local csv = dir .. "/out.csv"
    _, err, code = run(("classify %s --id-column id --no-progress -o %s %s"):format(LABELS, csv, input))
    assert.are.equal(0, code, err)
    assert.matches("\n12345678901234567,refund,0.1234567890123456,", H.read_file(csv), 1, true)
  end)

  it("--dry-run counts and prices per model and sends nothing", function()
    local input = tickets(5, dir .. "/in.jsonl")
    local out, err, code = run(("classify %s --dry-run -m gpt-4o-mini,nousresearch/hermes-3-llama-3.1-405b -o %s %s")
      :format(LABELS, dir .. "/out.jsonl", input))
    assert.are.equal(0, code, err)
    assert.matches("\ngpt%-4o%-mini +5 +%d+ +5%-320 +[%d.]+ +[%d.]+ +0", out) -- 1 to 64 reply tokens a row
    assert.matches("\nnousresearch/hermes%-3%-llama%-3%.1%-405b +5 ", out)
    assert.matches("nothing was sent", err)
    local low, high = out:match("\ngpt%-4o%-mini +5 +%d+ +%S+ +([%d.]+) +([%d.]+)")
    assert.is_true(tonumber(low) < tonumber(high))
    assert.are.equal(0, up:stats().requests)
    assert.is_nil(io.open(dir .. "/out.jsonl"))
    assert.is_nil(io.open(dir .. "/out.jsonl.ledger"))
  end)

  it("stops at the budget with exit 3, and a rerun with more budget does the rest, none twice", function()
    local input = tickets(20, dir .. "/in.jsonl")
    local out = dir .. "/out.jsonl"
    -- a row costs about 1.3e-5 USD and reserves about 4.9e-5 (64 reply tokens): room for a few rows only
    local _, err, code = run(("classify %s -c 1 --budget 0.00015 --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(3, code, err)
    assert.matches("budget", err)
    local done = #jsonl_rows(out)
    assert.is_true(done >= 1 and done < 20, tostring(done))
    assert.are.equal(done, up:stats().requests)
    assert.are.equal(done, #lines_of(out .. ".ledger"))
    _, err, code = run(("classify %s -c 4 --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(0, code, err)
    assert.are.equal(20, #jsonl_rows(out))
    assert.are.equal(20, up:stats().requests)
    local twice, keys = doubled()
    assert.are.equal(0, twice)
    assert.are.equal(0, keys) -- no scenario: by_key has no entries; the request count above is the proof
  end)
end)

describe("CSV through the CLI", function()
  local csv = require "slm.csv"

  local function read_csv(path)
    local r = assert(csv.reader(path))
    local header = r:header()
    local rows = {}
    for row, err in r:rows() do
      assert(row, tostring(err))
      rows[#rows + 1] = csv.by_name(header, row)
    end
    r:close()
    return header, rows
  end

  it("quotes, embedded newlines and quotes, a BOM, CRLF; ragged rows and a bad record as error rows", function()
    local input = dir .. "/in.csv"
    H.write_file(input, "\239\187\191id,text,note\r\n"
      .. '1,"refund, charged ""twice""",a\r\n'
      .. '2,"parcel\r\nlate, line two",b\r\n'
      .. "3,thanks\r\n"                        -- ragged: 2 fields
      .. "4,refund again,c,extra\r\n"          -- ragged: 4 fields
      .. '5,bad "quote" here,d\r\n'             -- a quote inside an unquoted field
      .. "6,the courier is late,e\r\n")
    local out = dir .. "/out.csv"
    local _, err, code = run(("classify %s --id-column id --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(1, code, err)
    local header, rows = read_csv(out)
    assert.are.same({ "id", "text", "note", "label", "confidence", "review", "status", "error_kind", "error", "cost",
      "tokens" }, { table.unpack(header) })
    assert.are.equal(6, #rows)
    assert.are.equal('refund, charged "twice"', rows[1].text)
    assert.are.equal("billing", rows[1].label)
    assert.are.equal("parcel\r\nlate, line two", rows[2].text)
    assert.are.equal("ok", rows[2].status)
    assert.are.same({ "ragged", "ragged", "parse" }, { rows[3].error_kind, rows[4].error_kind, rows[5].error_kind })
    assert.are.equal("3", rows[3].id)
    assert.are.equal("ok", rows[6].status)
    assert.are.equal(3, up:stats().requests)
    assert.matches("6 rows: 3 succeeded, 3 failed %(parse 1, ragged 2%)", err)
    -- CSV in, JSONL out by --format
    _, err, code = run(("classify %s --format jsonl --no-progress -o %s %s"):format(LABELS, dir .. "/o.txt", input))
    assert.are.equal(1, code, err)
    local first = json.decode(lines_of(dir .. "/o.txt")[1])
    assert.are.equal('refund, charged "twice"', first.text)
    assert.are.equal("1", first.id)
  end)

  it("a row whose text is not UTF-8 is an error row, the others run, in CSV and in JSONL output", function()
    local input = dir .. "/latin1.csv"
    H.write_file(input, "id,text\n1,caf\233 billing\n2,the parcel is late\n")
    local out = dir .. "/latin1.out.csv"
    local _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(1, code, err)
    local _, rows = read_csv(out)
    assert.are.equal(2, #rows)
    assert.are.equal("error", rows[1].status)
    assert.are.equal("invalid_request", rows[1].error_kind)
    assert.matches("line 2 cannot be sent: invalid UTF%-8", rows[1].error)
    assert.are.equal("caf\233 billing", rows[1].text) -- CSV carries the bytes as they were
    assert.are.equal("ok", rows[2].status)
    assert.are.equal(1, up:stats().requests)
    -- JSON cannot carry the bytes: U+FFFD in their place, and the output is written
    local o = dir .. "/latin1.out.jsonl"
    _, err, code = run(("classify %s --format jsonl --no-progress -o %s %s"):format(LABELS, o, input))
    assert.are.equal(1, code, err)
    local lines = lines_of(o)
    assert.are.equal(2, #lines, err)
    local first = json.decode(lines[1])
    assert.are.equal("caf\u{FFFD} billing", first.text)
    assert.are.equal("invalid_request", first.error_kind)
  end)

  it("an unterminated quoted field is an error row, and the rows before it run", function()
    local input = dir .. "/in.csv"
    H.write_file(input, 'text\nrefund please\n"never closed\nmore\n')
    local out = dir .. "/out.csv"
    local _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(1, code, err)
    local _, rows = read_csv(out)
    assert.are.equal(2, #rows)
    assert.are.equal("ok", rows[1].status)
    assert.are.equal("parse", rows[2].error_kind)
    assert.matches("not closed", rows[2].error)
    assert.are.equal(1, up:stats().requests)
  end)
end)

describe("slm classify interrupted", function()
  local N = 24
  local SLOW = "--header 'X-Sim-Scenario: delay=400' -c 4 --no-progress"

  -- An uninterrupted run's output, to compare with.
  local function reference(input)
    local ref = dir .. "/ref.jsonl"
    local _, err, code = run(("classify %s %s -o %s %s"):format(LABELS, SLOW, ref, input))
    assert.are.equal(0, code, err)
    local text = H.read_file(ref)
    up:reset()
    return text
  end

  -- Wait until the ledger has at least n finished rows.
  local function wait_rows(path, n) H.wait_lines(path, n, "the ledger") end

  for _, sig in ipairs({ "INT", "TERM" }) do
    it("SIG" .. sig .. ": stops sending, finishes the rows in flight, exits 130; a rerun completes it", function()
      local input = tickets(N, dir .. "/in.jsonl")
      local want = reference(input)
      local out = dir .. "/out.jsonl"
      local h = spawn(("classify %s %s -o %s %s"):format(LABELS, SLOW, out, input))
      wait_rows(out .. ".ledger", 5)
      h.kill(sig)
      assert.are.equal(130, h.wait(), h.stderr())
      assert.matches("interrupted", h.stderr())
      local done = #jsonl_rows(out)
      assert.is_true(done >= 5 and done < N, tostring(done))
      local st = up:stats()
      assert.are.equal(done, st.requests)   -- the rows in flight were waited for, and recorded
      assert.are.equal(0, st.aborted)
      local _, err, code = run(("classify %s %s -o %s %s"):format(LABELS, SLOW, out, input))
      assert.are.equal(0, code, err)
      assert.are.equal(want, H.read_file(out))
      st = up:stats()
      assert.are.equal(N, st.requests)
      local twice, keys = doubled()
      assert.are.equal(0, twice)
      assert.are.equal(N, keys)
    end)
  end

  it("SIGKILL at several points: no row lost or doubled, only the rows in flight sent again", function()
    local input = tickets(N, dir .. "/in.jsonl")
    local want = reference(input)
    local out = dir .. "/out.jsonl"
    local function finished()
      local keys, n = {}, 0
      for _, line in ipairs(lines_of(out .. ".ledger")) do
        local ok, rec = pcall(json.decode, line)
        if ok and type(rec) == "table" and rec.key and not keys[rec.key] then keys[rec.key] = true; n = n + 1 end
      end
      return n
    end
    local kills = 0
    for _, at in ipairs({ 1, 9, 17 }) do
      local sent_before, done_before = up:stats().requests, finished()
      local h = spawn(("classify %s %s -o %s %s"):format(LABELS, SLOW, out, input))
      wait_rows(out .. ".ledger", at)
      h.kill("KILL")
      h.wait()
      kills = kills + 1
      -- this run sent only rows not finished before it, and each once: at
      -- most the 4 it had in flight when killed are not in the ledger
      local sent, done = up:stats().requests - sent_before, finished() - done_before
      assert.is_true(sent >= done and sent <= done + 4, ("sent %d, finished %d"):format(sent, done))
      -- the output of a killed run is the last complete one: never torn
      for _, line in ipairs(lines_of(out)) do json.decode(line) end
    end
    local sent_before, done_before = up:stats().requests, finished()
    local _, err, code = run(("classify %s %s -o %s %s"):format(LABELS, SLOW, out, input))
    assert.are.equal(0, code, err)
    assert.are.equal(want, H.read_file(out))
    -- the last run sent exactly the rows no run had finished
    assert.are.equal(N - done_before, up:stats().requests - sent_before)
    local st = up:stats()
    assert.is_true(st.requests - N <= kills * 4, tostring(st.requests))
    local twice, keys = doubled()
    assert.are.equal(N, keys)
    assert.is_true(twice <= kills * 4)
    -- the ledger holds each row once: a row is never finished twice
    local seen = {}
    for _, line in ipairs(lines_of(out .. ".ledger")) do
      local ok, rec = pcall(json.decode, line)
      if ok and type(rec) == "table" and rec.key then
        assert.is_nil(seen[rec.key], "a row finished twice")
        seen[rec.key] = true
      end
    end
  end)
end)

describe("the usage log", function()
  it("has one line per request, no key, and sums to the summary; slm usage sums it", function()
    local input = tickets(7, dir .. "/in.jsonl")
    H.write_file(dir .. "/in.jsonl", H.read_file(input) .. '{"text":"bad","model":"x"}\n')
    local out = dir .. "/out.jsonl"
    local log = dir .. "/usage.jsonl"
    local _, err, code = run(("classify %s --no-progress --usage-log %s -o %s %s"):format(LABELS, log, out, input))
    assert.are.equal(0, code, err)
    local lines = jsonl_rows(log)
    assert.are.equal(8, #lines)
    local cost, tokens = 0, 0
    for _, l in ipairs(lines) do
      assert.is_nil(l.key)
      assert.is_nil(l.prompt)
      assert.are.equal("classify", l.task)
      assert.are.equal("gpt-4o-mini", l.model)
      assert.are.equal("ok", l.outcome)
      assert.matches("^%d%d%d%d%-%d%d%-%d%dT", l.time)
      assert.is_number(l.latency)
      cost, tokens = cost + l.cost, tokens + l.tokens
    end
    local s_tokens, s_cost = err:match("8 requests, (%d+) tokens .-, %$([%d.]+),")
    assert.are.equal(tonumber(s_tokens), tokens)
    assert.are.equal(tonumber(s_cost), tonumber(("%.6f"):format(cost)))
    local sums, uerr, ucode = run("usage --json --by model " .. log)
    assert.are.equal(0, ucode, uerr)
    local g = json.decode(sums)
    assert.are.equal("gpt-4o-mini", g.model)
    assert.are.equal(8, g.requests)
    assert.are.equal(tokens, g.tokens)
    assert.is_true(math.abs(cost - g.cost) < 1e-12)
    local by_day = run("usage --by day " .. log)
    assert.matches(os.date("!%Y-%m-%d"):gsub("%-", "%%-") .. " +8 +0 ", by_day)
    -- --log-prompts puts the text in; the default usage log sits beside the output
    run(("classify %s --no-progress --log-prompts -o %s %s"):format(LABELS, dir .. "/o2.jsonl", input))
    local l2 = jsonl_rows(dir .. "/o2.jsonl.usage.jsonl")
    assert.are.equal(8, #l2)
    assert.matches("^ticket", l2[1].prompt)
  end)
end)

describe("the usage log of a task that makes several requests", function()
  it("writes one line per request, numbered, each with its own cost, summing to the row's", function()
    local schema = dir .. "/s.json"
    H.write_file(schema, H.ORDER_SCHEMA)
    local input = dir .. "/in.jsonl"
    -- row 1: the first reply lacks `order`, the repair re-ask answers (2 requests);
    -- row 2: both replies lack it, the row fails validation (2 requests, each "ok")
    H.write_file(input, '{"id":"r1","text":"Order 58213 is late"}\n')
    local out, log = dir .. "/e.jsonl", dir .. "/u.jsonl"
    local key = ("--header 'X-Sim-Key: usage-%d-%d' "):format(os.time(), math.random(1e9))
    local _, err, code = run(("extract --schema %s --id-column id " .. key .. "--header 'X-Sim-Scenario: missing_field,fail=1' --no-progress"
      .. " --usage-log %s -o %s %s"):format(schema, log, out, input))
    assert.are.equal(0, code, err)
    H.write_file(input, '{"id":"r2","text":"Order 4 is late"}\n')
    key = ("--header 'X-Sim-Key: usage2-%d-%d' "):format(os.time(), math.random(1e9))
    _, err, code = run(("extract --schema %s --id-column id " .. key .. "--header 'X-Sim-Scenario: missing_field,fail=2' --no-progress"
      .. " --usage-log %s -o %s %s"):format(schema, log, dir .. "/e2.jsonl", input))
    assert.are.equal(1, code, err)
    assert.are.equal(4, up:stats().requests)
    local lines = jsonl_rows(log)
    assert.are.equal(4, #lines)
    local want = { { "r1", 1, "ok" }, { "r1", 2, "ok" }, { "r2", 1, "validation" }, { "r2", 2, "validation" } }
    for i, l in ipairs(lines) do
      assert.are.same(want[i], { l.id, l.call, l.row_outcome })
      assert.are.equal(2, l.calls)
      assert.are.equal("ok", l.outcome)
      assert.are.equal(1, l.attempts)
      assert.is_true(l.cost > 0 and l.prompt_tokens > 0, json.encode(l))
      assert.are.equal(l.prompt_tokens + l.completion_tokens, l.tokens)
    end
    -- the repair re-ask carries the first reply and the errors: it costs more
    assert.is_true(lines[2].prompt_tokens > lines[1].prompt_tokens)
    local row1, row2 = jsonl_rows(out)[1], jsonl_rows(dir .. "/e2.jsonl")[1]
    assert.is_true(math.abs(row1.cost - (lines[1].cost + lines[2].cost)) < 1e-12)
    assert.are.equal(row1.tokens, lines[1].tokens + lines[2].tokens)
    assert.is_true(math.abs(row2.cost - (lines[3].cost + lines[4].cost)) < 1e-12)
    local g = json.decode((run("usage --json " .. log)))
    assert.are.equal(4, g.requests)
    assert.are.equal(0, g.failed)
  end)
end)

describe("the other batch tasks", function()
  it("extract writes the JSON, generate the text, summarize the summary", function()
    local schema = dir .. "/s.json"
    H.write_file(schema, H.ORDER_SCHEMA)
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"text":"Order 58213 is late","name":"Kettle","features":"steel, 1.7 l"}\n')
    local _, err, code = run(("extract --schema %s --no-progress -o %s %s"):format(schema, dir .. "/e.jsonl", input))
    assert.are.equal(0, code, err)
    local r = jsonl_rows(dir .. "/e.jsonl")[1]
    assert.are.equal("table", type(r.data))
    assert.is_string(r.data.order)
    local tpl = dir .. "/t.txt"
    H.write_file(tpl, "Describe {{name}}: {{features}}")
    _, err, code = run(("generate --template %s --max-words 30 --no-progress -o %s %s"):format(tpl, dir .. "/g.jsonl", input))
    assert.are.equal(0, code, err)
    assert.is_string(jsonl_rows(dir .. "/g.jsonl")[1].text)
    _, err, code = run(("summarize --max-words 20 --no-progress -o %s %s"):format(dir .. "/m.jsonl", input))
    assert.are.equal(0, code, err)
    assert.is_string(jsonl_rows(dir .. "/m.jsonl")[1].summary)
    -- documents: each file one row
    local doc = dir .. "/contract.txt"
    H.write_file(doc, "Order 777 ships on Monday.")
    _, err, code = run(("extract --schema %s --no-progress -o %s %s"):format(schema, dir .. "/d.jsonl", doc))
    assert.are.equal(0, code, err)
    r = jsonl_rows(dir .. "/d.jsonl")[1]
    assert.are.equal(doc, r.file)
    assert.is_string(r.data.order)
    -- a template variable the row lacks: an error row
    H.write_file(input, '{"name":"Kettle"}\n')
    _, err, code = run(("generate --template %s --no-progress -o %s %s"):format(tpl, dir .. "/g2.jsonl", input))
    assert.are.equal(1, code)
    assert.are.equal("missing_column", jsonl_rows(dir .. "/g2.jsonl")[1].error_kind)
  end)
end)

describe("progress", function()
  it("plain lines when stderr is no terminal, a bar with the running cost with --progress", function()
    local input = tickets(8, dir .. "/in.jsonl")
    local _, err, code = run(("classify %s --header 'X-Sim-Scenario: delay=60' -c 2 --progress-every 0.05 -o %s %s")
      :format(LABELS, dir .. "/o1.jsonl", input))
    assert.are.equal(0, code, err)
    assert.matches("slm classify: %d/8 rows, 0 failed, %d+ tokens, %$[%d.]+, [%d.]+ s\n", err)
    _, err, code = run(("classify %s --progress -o %s %s"):format(LABELS, dir .. "/o2.jsonl", input))
    assert.are.equal(0, code, err)
    assert.matches("8/8 100%%.-ETA 0s  %$0%.%d%d%d%d", err)
  end)
end)

describe("slm compare", function()
  it("prices a file's rows per model, counts what does not fit, and measures speed when asked", function()
    local input = tickets(5, dir .. "/in.jsonl")
    local out, err, code = run("compare -m gpt-4o-mini,nousresearch/hermes-3-llama-3.1-405b --output-tokens 50 " .. input)
    assert.are.equal(0, code, err)
    assert.matches("\ngpt%-4o%-mini +5 +%d+ +250 +[%d.]+ +[%d.]+ +0\n", out)
    assert.are.equal(0, up:stats().requests)
    out, err, code = run("compare --json -m gpt-4o-mini --prompt-tokens 200000 --output-tokens 10")
    assert.are.equal(0, code, err)
    local row = json.decode(out)
    assert.are.equal(1, row.over_context)
    assert.is_true(math.abs(row.cost - (200000 * 0.15 + 10 * 0.6) / 1e6) < 1e-9)
    out, err, code = run("compare --json --measure 2 -m gpt-4o-mini,nousresearch/hermes-3-llama-3.1-405b " .. input)
    assert.are.equal(0, code, err)
    assert.are.equal(4, up:stats().requests)
    for line in out:gmatch("[^\n]+") do
      local r = json.decode(line)
      assert.are.equal(2, r.measured)
      assert.is_number(r.p50)
      assert.is_number(r.tokens_per_s)
    end
  end)
end)

describe("slm chat on a terminal", function()
  it("is interactive: streamed replies, the history kept, /reset forgets it", function()
    local f = io.popen(("printf 'first question\\nsecond one\\n/reset\\nthird\\n/exit\\n' | %s script -qec 'bin/slm chat' /dev/null 2>&1")
      :format(env()))
    local out = f:read("a")
    f:close()
    assert.matches("Echo: first question", out)
    assert.matches("Echo: second one", out)
    assert.matches("Echo: third", out)
    assert.are.equal(3, up:stats().requests)
    local body = H.last(up).body
    assert.are.equal(1, #body.messages)   -- after /reset: the new turn alone
    assert.is_true(body.stream)
    f = io.popen(("printf 'one\\ntwo\\n' | %s script -qec 'bin/slm chat -s terse' /dev/null 2>&1"):format(env()))
    out = f:read("a")
    f:close()
    assert.matches("Echo: two", out)
    body = H.last(up).body
    assert.are.same({ "system", "user", "assistant", "user" }, { body.messages[1].role, body.messages[2].role,
      body.messages[3].role, body.messages[4].role })
    assert.are.equal("Echo: one", body.messages[3].content)
  end)
end)

describe("usage errors and help", function()
  it("exit 2 with the command's usage; --help per command; completion scripts", function()
    local _, err, code = run("classify " .. dir .. "/none.jsonl")
    assert.are.equal(2, code)
    assert.matches("labels", err)
    _, err, code = run("classify --labels a,b --concurrency zero x.jsonl")
    assert.are.equal(2, code)
    assert.matches("^Usage: slm classify", err)
    assert.matches("'zero' is not a positive integer", err)
    _, err, code = run("classify --labels a,b --rpm=-5 x.jsonl")
    assert.are.equal(2, code)
    assert.matches("'%-5' is not a number >= 0", err)
    _, err, code = run("classify --labels a,b --header nocolon x.jsonl")
    assert.are.equal(2, code)
    assert.matches("%-%-header must be 'Name: value'", err)
    _, err, code = run("classify --labels a,b -m a,b x.jsonl")
    assert.are.equal(2, code)
    assert.matches("one model", err)
    _, err, code = run("classify --labels a,b -o same.jsonl same.jsonl")
    assert.are.equal(2, code)
    assert.matches("is also an input", err)
    _, err, code = run("extract x.txt")
    assert.are.equal(2, code)
    assert.matches("missing option '%-%-schema'", err)
    _, err, code = run("nope")
    assert.are.equal(2, code)
    local out
    out, _, code = run("classify --help")
    assert.are.equal(0, code)
    assert.matches("%-%-budget", out)
    assert.matches("%-%-dry%-run", out)
    out, _, code = run("--help")
    assert.are.equal(0, code)
    assert.matches("Exit codes: 0", out)
    for _, shell in ipairs({ "bash", "zsh", "fish" }) do
      out, _, code = run("completion " .. shell)
      assert.are.equal(0, code)
      assert.matches("classify", out)
    end
    assert.are.equal(0, up:stats().requests)
    -- the limits reach the client: a job within them runs
    H.write_file(dir .. "/in.jsonl", '{"text":"refund"}\n')
    _, err, code = run(("classify --labels a,b --rpm 600 --tpm 100000 --timeout 5 --max-retries 0 --no-progress -o %s %s")
      :format(dir .. "/o.jsonl", dir .. "/in.jsonl"))
    assert.are.equal(0, code, err)
  end)
end)

describe("what README's command-line section promises", function()
  it("extract and summarize read JSON lines from stdin with no file, as the other batch commands do", function()
    local schema = dir .. "/s.json"
    H.write_file(schema, H.ORDER_SCHEMA)
    local out, err, code = run(("extract --schema %s --no-progress"):format(schema), '{"text":"Order 58213 is late"}\n')
    assert.are.equal(0, code, err)
    local r = json.decode(out)
    assert.are.equal("ok", r.status)
    assert.is_string(r.data.order)
    out, err, code = run("summarize --max-words 20 --no-progress", '{"text":"The parcel came late and damaged."}\n')
    assert.are.equal(0, code, err)
    assert.is_string(json.decode(out).summary)
  end)

  it("a raw request's usage line and a refused row's carry call and row_outcome like a task's", function()
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"prompt":"hello"}\n{"prompt":"' .. ("word "):rep(140000) .. '"}\n')
    local log = dir .. "/u.jsonl"
    local _, err, code = run(("batch --no-progress --usage-log %s -o %s %s"):format(log, dir .. "/o.jsonl", input))
    assert.are.equal(1, code, err)
    local lines = jsonl_rows(log)
    assert.are.equal(2, #lines)
    local sent, refused = lines[1], lines[2]
    if sent.outcome ~= "ok" then sent, refused = refused, sent end
    assert.are.same({ 1, 1, "ok", "ok" }, { sent.call, sent.calls, sent.outcome, sent.row_outcome })
    -- refused before sending: calls 0, no call number, the row's outcome
    assert.are.same({ 0, "context_length", "context_length" }, { refused.calls, refused.outcome, refused.row_outcome })
    assert.is_nil(refused.call)
    local g = json.decode((run("usage --json " .. log)))
    assert.are.equal(1, g.requests)
  end)

  it("a raw request with a malformed message is an error row, refused here: nothing sent, no request counted", function()
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"messages":[{"role":"user"}]}\n{"prompt":"hi"}\n')
    local _, err, code = run(("batch --no-progress -o %s %s"):format(dir .. "/o.jsonl", input))
    assert.are.equal(1, code, err)
    local rows = jsonl_rows(dir .. "/o.jsonl")
    assert.are.equal("invalid_request", rows[1].error_kind)
    assert.matches("messages%[1%] %(user%) needs 'content'", rows[1].error)
    assert.are.equal("ok", rows[2].status)
    assert.are.equal(1, up:stats().requests)
    assert.matches("\nslm batch: 1 requests", err)
  end)

  it("a ledger or usage log that cannot be written (a full disk) stops the job: an error naming it, exit 1, the rows done kept", function()
    local input = tickets(6, dir .. "/in.jsonl")
    local out = dir .. "/out.jsonl"
    assert(os.execute("ln -s /dev/full " .. out .. ".ledger"))
    local _, err, code = run(("classify %s -c 1 --no-progress -o %s %s"):format(LABELS, out, input))
    assert.are.equal(1, code, err)
    assert.truthy(err:find("cannot write the ledger " .. out .. ".ledger: No space left on device", 1, true), err)
    assert.matches("5 not attempted", err)
    assert.falsy(err:find("the ledger has every finished row", 1, true), err)
    assert.are.equal(1, up:stats().requests) -- stopped at the first row it could not record
    assert.are.equal(1, #jsonl_rows(out))      -- that row's result is kept
    -- the usage log
    local out2, log = dir .. "/out2.jsonl", dir .. "/u.jsonl"
    assert(os.execute("ln -s /dev/full " .. log))
    _, err, code = run(("classify %s -c 1 --no-progress --usage-log %s -o %s %s"):format(LABELS, log, out2, input))
    assert.are.equal(1, code, err)
    assert.truthy(err:find("cannot write the usage log " .. log .. ": No space left on device", 1, true), err)
    assert.are.equal(2, up:stats().requests)
    -- its ledger has the row: a rerun sends only the others
    _, err, code = run(("classify %s --no-progress --usage-log %s -o %s %s"):format(LABELS, dir .. "/u2.jsonl", out2, input))
    assert.are.equal(0, code, err)
    assert.are.equal(7, up:stats().requests)
    assert.are.equal(6, #jsonl_rows(out2))
  end)

  it("the summary counts every row, a repeated input too, and every request, a task's re-asks too", function()
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"id":1,"text":"same words"}\n{"id":2,"text":"same words"}\n{"id":3,"text":"other words"}\n')
    local _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, dir .. "/c.jsonl", input))
    assert.are.equal(0, code, err)
    assert.matches("3 rows: 3 succeeded, 0 failed\n", err)
    assert.matches("\nslm classify: 2 requests", err)
    assert.are.equal(2, up:stats().requests)
    -- an extract whose first reply lacks a field: the repair re-ask is a second request
    local schema = dir .. "/s.json"
    H.write_file(schema, H.ORDER_SCHEMA)
    H.write_file(input, '{"id":"r1","text":"Order 58213 is late"}\n')
    local key = ("--header 'X-Sim-Key: count-%d-%d' "):format(os.time(), math.random(1e9))
    _, err, code = run(("extract --schema %s " .. key .. "--header 'X-Sim-Scenario: missing_field,fail=1' --no-progress"
      .. " -o %s %s"):format(schema, dir .. "/e.jsonl", input))
    assert.are.equal(0, code, err)
    assert.matches("1 rows: 1 succeeded, 0 failed\n", err)
    assert.matches("\nslm extract: 2 requests", err)
  end)

  it("a task that raises (a template variable that is no text) is a final invalid_request row: no request counted, none sent again", function()
    local tpl, input, out = dir .. "/t.txt", dir .. "/in.jsonl", dir .. "/g.jsonl"
    H.write_file(tpl, "Write to {{name}}")
    H.write_file(input, '{"name":{"first":"Al"}}\n{"name":"Bo"}\n')
    local _, err, code = run(("generate --template %s --no-progress -o %s %s"):format(tpl, out, input))
    assert.are.equal(1, code, err)
    assert.matches("2 rows: 1 succeeded, 1 failed %(invalid_request 1%)", err)
    assert.matches("\nslm generate: 1 requests", err)
    local rows = jsonl_rows(out)
    assert.are.equal("invalid_request", rows[1].error_kind)
    assert.matches("template variable 'name' must be a string", rows[1].error)
    assert.are.equal(1, up:stats().requests)
    _, err, code = run(("generate --template %s --no-progress -o %s %s"):format(tpl, out, input))
    assert.are.equal(1, code, err)
    assert.are.equal(1, up:stats().requests) -- not tried again
  end)

  it("a CSV header that names a column twice is refused, naming it", function()
    local input = dir .. "/in.csv"
    H.write_file(input, "id,text,text\n1,first text,second text\n")
    local _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, dir .. "/o.csv", input))
    assert.are.equal(2, code, err)
    assert.matches("the CSV header names the column 'text' twice %(columns 2 and 3%)", err)
    assert.are.equal(0, up:stats().requests)
  end)

  it("an input column named like a result column's slm_ name is kept: the result goes to slm_slm_<name>", function()
    local input = dir .. "/in.jsonl"
    H.write_file(input, '{"text":"my invoice","label":"mine","slm_label":"also mine","slm_status":"x","status":"y"}\n')
    local _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, dir .. "/o.jsonl", input))
    assert.are.equal(0, code, err)
    local r = jsonl_rows(dir .. "/o.jsonl")[1]
    assert.are.same({ "mine", "also mine", "x", "y" }, { r.label, r.slm_label, r.slm_status, r.status })
    assert.is_string(r.slm_slm_label)
    assert.are.equal("ok", r.slm_slm_status)
    -- CSV: every column once, in order
    local csv_in = dir .. "/in.csv"
    H.write_file(csv_in, "text,label,slm_label\nmy invoice,mine,also mine\n")
    _, err, code = run(("classify %s --no-progress -o %s %s"):format(LABELS, dir .. "/o.csv", csv_in))
    assert.are.equal(0, code, err)
    local header = H.read_file(dir .. "/o.csv"):match("^[^\r\n]*")
    assert.are.equal("text,label,slm_label,slm_slm_label,confidence,review,status,error_kind,error,cost,tokens", header)
    assert.matches("\nmy invoice,mine,also mine,", H.read_file(dir .. "/o.csv"))
  end)

  it("an output, ledger or usage log that is the input by another path (./x, a symlink) is refused; the input is left alone", function()
    local input = tickets(2, dir .. "/in.jsonl")
    local before = H.read_file(input)
    assert(os.execute("ln -s in.jsonl " .. dir .. "/link.jsonl"))
    local cases = {
      { "-o " .. dir .. "/./in.jsonl", "output" },
      { "-o " .. dir .. "/link.jsonl", "output" },
      { "-o " .. dir .. "/o.jsonl --usage-log " .. dir .. "/link.jsonl", "usage log" },
      { "-o " .. dir .. "/o.jsonl --ledger " .. dir .. "//in.jsonl", "ledger" },
    }
    for _, c in ipairs(cases) do
      local _, err, code = run(("classify %s --no-progress %s %s"):format(LABELS, c[1], input))
      assert.are.equal(2, code, c[1] .. ": " .. err)
      assert.matches("the " .. c[2] .. " .- is also an input", err)
    end
    assert.are.equal(before, H.read_file(input))
    assert.are.equal(0, up:stats().requests)
  end)

  it("a missing_column error names the input line, as a ragged row's does (a CSV record may span lines)", function()
    local input = dir .. "/in.csv"
    H.write_file(input, 'id,text\n1,"two\nlines"\n2,three\n')
    local out, err, code = run(("classify %s --id-column nope --format jsonl %s"):format(LABELS, input))
    assert.are.equal(1, code, err)
    local rows = {}
    for line in out:gmatch("[^\n]+") do rows[#rows + 1] = json.decode(line) end
    assert.are.same({ "line 2 has no column 'nope'", "line 4 has no column 'nope'" }, { rows[1].error, rows[2].error })
  end)
end)
