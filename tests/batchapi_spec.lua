-- tests/batchapi_spec.lua: slm.batchapi and client:request against the
-- simulator's Batch API (tests/upstream/batches.lua): upload, create,
-- poll, collect, results matched by custom_id, the error file, expiry and
-- resume, cancel, split, the batch price, the ledger across processes.
--
--   lua5.4 /usr/bin/busted tests/batchapi_spec.lua

local slm = require "slm"
local json = require "slm.json"
local H = require "tests.helpers"
local batchapi = slm.batchapi

local up
local dirs = {}

local function tmpdir()
  local p = os.tmpname()
  os.remove(p)
  dirs[#dirs + 1] = p
  return p
end

local function client(opts)
  return H.sim_client(up, opts, { max_retries = 0 })
end

local function req(id, text, model)
  return { custom_id = id, body = { model = model, messages = H.msgs(text) } }
end

-- n requests "row 1" ... "row n", with directives spliced in by index
local function requests(n, extra)
  local list = {}
  for i = 1, n do list[i] = req("row-" .. i, "row " .. i .. ((extra and extra[i]) or "")) end
  return list
end

local function batch_stats() return up:batch_stats() end

-- the directives of every batch created from now on
local function batch_mode(directives)
  up:post("/__sim/batch_mode", json.encode({ directives = directives }))
end

setup(function() up = H.upstream() end)
teardown(function()
  if up then up:stop() end
  for _, d in ipairs(dirs) do os.execute("rm -rf " .. H.q(d)) end
end)
before_each(function()
  up:reset()
  batch_mode(nil)
end)

describe("client:request", function()
  it("uploads multipart/form-data and reads the file back", function()
    local c = client()
    local res, err = c:request{ method = "POST", path = "/files", multipart = {
      { name = "purpose", value = "batch" },
      { name = "file", filename = "x.jsonl", value = "line one\r\n--not a boundary\n", type = "application/jsonl" },
    } }
    assert.is_nil(err)
    assert.equal(200, res.status)
    assert.equal("file", res.json.object)
    assert.equal("batch", res.json.purpose)
    assert.equal("x.jsonl", res.json.filename)
    assert.equal(#"line one\r\n--not a boundary\n", res.json.bytes)
    local body = assert(c:request{ path = "/files/" .. res.json.id .. "/content", raw = true })
    assert.equal("line one\r\n--not a boundary\n", body.body)
    assert.is_nil(body.json)
  end)

  it("turns an error reply into a lua-slm Error with its kind, the key never in it", function()
    local c = client{ api_key = "sk-secret-key-123456" }
    local res, err = c:request{ path = "/batches/batch_nope" }
    assert.is_nil(res)
    assert.is_true(slm.is_error(err))
    assert.equal("invalid_request", err.kind)
    assert.equal(404, err.status)
    assert.matches("No such Batch", err.message)
    local dead = H.sim_client({ url = "http://127.0.0.1:1/v1" }, { api_key = "sk-secret-key-123456", max_retries = 0 })
    res, err = dead:request{ path = "/batches" }
    assert.is_nil(res)
    assert.equal("connect", err.kind)
    assert.falsy(tostring(err):find("sk-secret", 1, true))
  end)

  it("raises on misuse", function()
    local c = client()
    assert.has_error(function() c:request{ path = "files" } end)
    assert.has_error(function() c:request{ path = "/x", body = {}, multipart = {} } end)
    assert.has_error(function() c:request{ path = "/x", bogus = 1 } end)
  end)
end)

describe("the simulator's Batch API", function()
  it("moves a batch validating -> in_progress -> finalizing -> completed, one stage per poll", function()
    local c = client()
    local f = assert(batchapi.upload(c, json.encode({ custom_id = "a", method = "POST", url = "/v1/chat/completions",
      body = { model = "gpt-4o-mini", messages = H.msgs("hi") } }) .. "\n"))
    local b = assert(batchapi.create(c, f.id, { metadata = { team = "ops" } }))
    assert.equal("validating", b.status)
    assert.equal("24h", b.completion_window)
    assert.equal("ops", b.metadata.team)
    local seen = {}
    for _ = 1, 3 do seen[#seen + 1] = assert(batchapi.retrieve(c, b.id)).status end
    assert.same({ "in_progress", "finalizing", "completed" }, seen)
    local last = assert(batchapi.retrieve(c, b.id))
    assert.same({ total = 1, completed = 1, failed = 0 }, last.request_counts)
    local list = assert(batchapi.list(c, { limit = 5 }))
    assert.equal("list", list.object)
    assert.equal(b.id, list.data[1].id)
  end)

  it("moves by time with step_ms, and keeps files within the size limit", function()
    local c = client()
    batch_mode("step_ms=1000") -- a stage a second: far more than a retrieve takes on a loaded machine
    local line = json.encode({ custom_id = "a", method = "POST", url = "/v1/chat/completions",
      body = { model = "gpt-4o-mini", messages = H.msgs("hi") } }) .. "\n"
    local f = assert(batchapi.upload(c, line))
    local meta = assert(c:request{ path = "/files/" .. f.id }).json
    assert.same({ f.id, "batch", #line }, { meta.id, meta.purpose, meta.bytes })
    local b = assert(batchapi.create(c, f.id))
    assert.equal("validating", assert(batchapi.retrieve(c, b.id)).status) -- a poll alone does not move it
    slm.sleep(1.1)
    assert.equal("in_progress", assert(batchapi.retrieve(c, b.id)).status)
    up:post("/__sim/batch_mode", json.encode({ max_file_bytes = 100 }))
    local big, err = batchapi.upload(c, string.rep("x", 200))
    assert.is_nil(big)
    assert.equal(413, err.status)
  end)

  it("serves the same batches from every worker", function()
    local launch = require "tests.upstream.launch"
    local many = launch.start{ quiet = true, workers = 4 }
    local ok, why = pcall(function()
      local c = H.sim_client(many, { max_retries = 0 })
      local job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(6), poll_interval = 0.01 }
      local results = assert(job:run())
      for i = 1, 6 do assert.equal("Echo: row " .. i, results["row-" .. i].text) end
      assert.equal(6, many:batch_stats().lines)
    end)
    many:stop()
    assert(ok, why)
  end)

  it("rejects a wrong endpoint and completion window at once, and bad lines at validation", function()
    local c = client()
    local f = assert(batchapi.upload(c, '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{}}\n'))
    local b, err = batchapi.create(c, f.id, { endpoint = "/v1/nothing" })
    assert.is_nil(b)
    assert.equal("invalid_request", err.kind)
    assert.equal("endpoint", err.param)
    local bad = table.concat({
      '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}',
      "not json",
      '{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}',
      '{"custom_id":"b","method":"POST","url":"/v1/embeddings","body":{"messages":[]}}',
    }, "\n")
    f = assert(batchapi.upload(c, bad))
    b = assert(batchapi.create(c, f.id))
    b = assert(batchapi.retrieve(c, b.id))
    assert.equal("failed", b.status)
    local codes = {}
    for _, e in ipairs(b.errors.data) do codes[#codes + 1] = ("%s@%d"):format(e.code, e.line) end
    assert.same({ "invalid_json_line@2", "duplicate_custom_id@3", "mismatched_endpoint@4" }, codes)
  end)
end)

describe("slm.batchapi jobs", function()
  it("submits, polls, collects: every row's Response matched by custom_id, at half the price", function()
    local c = client()
    local n = 12
    local job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(n), poll_interval = 0.01 }
    local progress = {}
    local results = assert(job:run{ on_progress = function(b) progress[#progress + 1] = b.status end })
    assert.same({ "in_progress", "finalizing", "completed" }, progress)
    for i = 1, n do
      local r = results["row-" .. i]
      assert.is_false(slm.is_error(r))
      assert.equal("Echo: row " .. i, r.text)
      assert.equal("batch", r.via)
      assert.equal("row-" .. i, r.custom_id)
      local full = slm.cost("gpt-4o-mini", r.usage)
      assert.is_true(full > 0)
      assert.near(full * 0.5, r.cost, 1e-15)
    end
    -- the output file really was out of order
    local b = job.ledger.batches[1]
    local text = assert(batchapi.content(c, b.output_file_id))
    local order = {}
    for line in text:gmatch("[^\n]+") do order[#order + 1] = json.decode(line).custom_id end
    assert.equal(n, #order)
    local same = true
    for i = 1, n do if order[i] ~= "row-" .. i then same = false end end
    assert.is_false(same)
    local st = job:status()
    assert.equal(n, st.succeeded)
    assert.equal(0, st.failed)
    assert.equal(1, #st.batches)
  end)

  it("an option or the model's data sets the price factor", function()
    local c = client()
    local job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(2), poll_interval = 0.01,
      price_factor = 0.25 }
    local results = assert(job:run())
    local r = results["row-1"]
    assert.near(slm.cost("gpt-4o-mini", r.usage) * 0.25, r.cost, 1e-15)
    assert.equal(0.5, slm.models["gpt-4o-mini"].batch_factor)
    -- a model without a batch_factor of its own: slm.batchapi.BATCH_FACTOR
    slm.models["sim-priced"] = { context = 8000, input_per_m = 2, output_per_m = 4, tokenizer = "o200k_base" }
    job = batchapi.job{ client = c, dir = tmpdir(), requests = { req("p", "priced", "sim-priced") },
      poll_interval = 0.01 }
    r = assert(job:run())["p"]
    assert.equal(0.5, batchapi.BATCH_FACTOR)
    assert.near((r.usage.prompt_tokens * 2 + r.usage.completion_tokens * 4) / 1e6 * 0.5, r.cost, 1e-15)
    slm.models["sim-priced"] = nil
  end)

  it("makes Errors of the error file's lines, per row, with their kinds", function()
    local c = client()
    local list = requests(5, { [2] = " [sim:status=500]", [4] = " [sim:status=400]" })
    local job = batchapi.job{ client = c, dir = tmpdir(), requests = list, poll_interval = 0.01 }
    local results = assert(job:run())
    assert.equal("server", results["row-2"].kind)
    assert.equal(500, results["row-2"].status)
    assert.equal("invalid_request", results["row-4"].kind)
    for _, i in ipairs{ 1, 3, 5 } do assert.equal("Echo: row " .. i, results["row-" .. i].text) end
    local st = job:status()
    assert.equal(3, st.succeeded)
    assert.equal(2, st.failed)
    assert.same({ "invalid_request", "server" }, st.kinds)
  end)

  it("resumes an expired batch with only its unfinished rows, never a finished one again", function()
    local c = client()
    batch_mode("expire=3")
    local list = requests(8, { [2] = " [sim:status=503,fail=1]", [5] = " [sim:status=400]" })
    local job = batchapi.job{ client = c, dir = tmpdir(), requests = list, poll_interval = 0.01 }
    assert(job:run())
    assert.equal("expired", job.ledger.batches[1].status)
    local st = job:status()
    assert.equal(2, st.succeeded)     -- rows 1 and 3 ran
    assert.equal(6, st.failed)        -- row 2 (503) and 4..8 (expired)
    assert.equal(5, st.by_kind.timeout)
    batch_mode(nil)
    assert(job:resume())
    st = job:status()
    -- row 2 succeeded the second time; row 5 stays invalid
    assert.equal(7, st.succeeded)
    assert.equal(1, st.failed)
    assert.equal("invalid_request", job:results()["row-5"].kind)
    assert.equal(2, #job.ledger.batches)
    assert.equal(6, #job.ledger.batches[2].rows)
    -- server side: no row that had succeeded ran again
    local bs = batch_stats()
    for i = 1, 8 do
      assert.is_true((bs.ok_by_custom_id["row-" .. i] or 0) <= 1, "row-" .. i)
    end
    assert.equal(1, bs.lines_by_custom_id["row-1"])
    assert.equal(2, bs.lines_by_custom_id["row-2"])
    -- and a second resume sends nothing more
    local creates = bs.creates
    assert(job:resume())
    assert.equal(creates, batch_stats().creates)
    -- all = true: the invalid row too, and still nothing that succeeded
    assert(job:resume{ all = true })
    bs = batch_stats()
    assert.equal(creates + 1, bs.creates)
    assert.equal(2, bs.lines_by_custom_id["row-5"])
    for i = 1, 8 do assert.equal(1, bs.ok_by_custom_id["row-" .. i] or 1, "row-" .. i) end
  end)

  it("waits through failed polls, and gives up after max_failures in a row", function()
    batch_mode("flaky_polls=3")
    local c = client()
    local job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(2), poll_interval = 0.01 }
    assert(job:run())
    assert.equal(2, job:status().succeeded)
    job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(2), poll_interval = 0.01 }
    assert(job:submit())
    local ok, err = job:wait{ max_failures = 2 }
    assert.is_nil(ok)
    assert.equal("server", err.kind)
    assert(job:wait()) -- the ledger still has it: the next wait goes on
    assert(job:collect())
    assert.equal(2, job:status().succeeded)
  end)

  it("never makes a batch twice when the reply to its creation is lost", function()
    for n, retries in ipairs{ 0, 2 } do
      up:post("/__sim/batch_mode", json.encode({ lose_reply = n })) -- the next create's reply is lost
      local c = client{ max_retries = retries }
      local job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(3), poll_interval = 0.01 }
      assert(job:run())
      assert.equal(3, job:status().succeeded)
    end
    local bs = batch_stats()
    assert.equal(2, bs.creates) -- one per job: the lost one was found by its input file
    assert.equal(6, bs.lines)
  end)

  it("cancels: cancelling, then cancelled; its rows are cancelled errors, sent again on resume", function()
    local c = client()
    batch_mode("polls=100")
    local job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(3), poll_interval = 0.01 }
    assert(job:submit())
    assert.is_false(job:poll())
    assert.equal("validating", job.ledger.batches[1].status)
    assert(job:cancel())
    assert.equal("cancelling", job.ledger.batches[1].status)
    assert(job:wait())
    assert.equal("cancelled", job.ledger.batches[1].status)
    assert(job:collect())
    local st = job:status()
    assert.equal(3, st.by_kind.cancelled)
    assert.equal(0, batch_stats().lines)
    batch_mode(nil)
    assert(job:resume())
    assert.equal(3, job:status().succeeded)
  end)

  it("splits a job over the request or byte limit into several batches", function()
    local c = client()
    local job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(7), poll_interval = 0.01,
      max_requests = 3 }
    assert(job:run())
    local sizes = {}
    for i, b in ipairs(job.ledger.batches) do sizes[i] = #b.rows end
    assert.same({ 3, 3, 1 }, sizes)
    assert.equal(7, job:status().succeeded)
    local line = #json.encode({ custom_id = "row-1", method = "POST", url = "/v1/chat/completions",
      body = { model = "gpt-4o-mini", messages = H.msgs("row 1") } }) + 1
    job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(4), poll_interval = 0.01,
      max_bytes = line * 2 + 1 }
    local made = assert(job:submit())
    assert.equal(2, #made)
    assert.equal(3 + 2, batch_stats().uploads)
  end)

  it("keeps everything in the ledger: submitted in one process, collected in another", function()
    local dir = tmpdir()
    local code = ([[
      local slm = require "slm"
      local c = slm.client{ base_url = %q, api_key = "sk-test-good", model = "gpt-4o-mini", max_retries = 0 }
      local list = {}
      for i = 1, 4 do list[i] = { custom_id = "row-" .. i, body = { messages = {{ role = "user", content = "row " .. i }} } } end
      local job = slm.batchapi.job{ client = c, dir = %q, requests = list }
      assert(job:submit())
      print("submitted " .. job.ledger.batches[1].id)
    ]]):format(up.url, dir)
    local out = H.run_lua(code)
    assert.matches("submitted batch_sim", out)
    local c = client()
    local job = assert(batchapi.open(c, dir))
    assert.equal(1, #job.ledger.batches)
    assert.equal(4, job:status().pending)
    assert(job:run{ interval = 0.01 })
    local st = job:status()
    assert.equal(4, st.succeeded)
    assert.equal("Echo: row 3", job:results()["row-3"].text)
    assert.equal(1, batch_stats().creates)
    -- the same requests given again find the same job, nothing re-sent
    local list = {}
    for i = 1, 4 do list[i] = { custom_id = "row-" .. i, body = { messages = H.msgs("row " .. i) } } end
    local again = batchapi.job{ client = c, dir = dir, requests = list, poll_interval = 0.01 }
    assert(again:run())
    assert.equal(1, batch_stats().creates)
    -- new requests in the same directory join the job; only they are sent
    list[5] = { custom_id = "row-5", body = { messages = H.msgs("row 5") } }
    local more = batchapi.job{ client = c, dir = dir, requests = list, poll_interval = 0.01 }
    assert.equal(5, #more.ledger.order)
    assert(more:run())
    assert.equal(2, batch_stats().creates)
    assert.equal(1, #more.ledger.batches[2].rows)
    assert.equal("Echo: row 5", assert(batchapi.open(c, dir)):results()["row-5"].text)
  end)

  it("reads output lines by custom_id only: garbage and unknown rows are left out, a crash before the ledger is saved collects again harmlessly", function()
    local c = client()
    local job = batchapi.job{ client = c, dir = tmpdir(), requests = requests(3), poll_interval = 0.01 }
    local text = table.concat({
      '{"custom_id":"row-2","response":{"status_code":200,"body":{"id":"x","object":"chat.completion","created":1,'
        .. '"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"two"},'
        .. '"finish_reason":"stop"}],"usage":{"prompt_tokens":-5,"completion_tokens":2,"total_tokens":-3}}},"error":null}',
      "not json at all",
      '{"custom_id":"row-1","response":{"status_code":429,"body":{"error":{"message":"slow down","type":"requests",'
        .. '"code":"rate_limit_exceeded"}}},"error":null}',
      '{"custom_id":"row-3","response":null,"error":{"code":"batch_expired","message":"too late"}}',
    }, "\n")
    local out, bad = batchapi.parse(text, job)
    assert.equal(1, bad)
    assert.equal("two", out["row-2"].text)
    assert.is_true(out["row-2"].usage.estimated) -- a negative count is not believed
    assert.is_true(out["row-2"].cost >= 0)
    assert.equal("rate_limit", out["row-1"].kind)
    assert.equal("timeout", out["row-3"].kind)
    assert.equal("batch_expired", out["row-3"].code)
    -- collected, then the ledger "lost" the fact: collecting again gives the same results
    assert(job:run())
    job.ledger.batches[1].collected = false
    job:save()
    local again = assert(batchapi.open(c, job.dir))
    assert(again:collect())
    local st = again:status()
    assert.same({ 3, 3, 0 }, { st.rows, st.succeeded, st.failed })
    assert.equal(1, batch_stats().creates)
  end)

  -- A process killed (SIGKILL, Ctrl-C) after the upload and before the
  -- batch's id was saved leaves an entry with its input file and no batch:
  -- the ledger as that process left it, then another process goes on.
  local function cut_off(n, made)
    local c = client()
    local dir = tmpdir()
    local job = batchapi.job{ client = c, dir = dir, requests = requests(n), poll_interval = 0.01 }
    local file = assert(batchapi.upload(c, table.concat(job:request_lines(), "\n") .. "\n", "cut.jsonl"))
    local L = job.ledger
    local rows = {}
    for i, id in ipairs(L.order) do rows[i] = id end
    L.batches[1] = { rows = json.array(rows), status = "uploading", collected = false, submitted_at = os.time(),
      part = 1, input_file_id = file.id }
    job:save()
    if made then assert(batchapi.create(c, file.id)) end -- the provider made it; its reply never arrived
    return c, dir
  end

  it("adopts a batch whose creation was cut off: found by its input file, polled and collected, not made again", function()
    local c, dir = cut_off(3, true)
    assert.equal(1, batch_stats().creates)
    local job = assert(batchapi.open(c, dir, { poll_interval = 0.01 }))
    assert(job:run())
    local st = job:status()
    assert.same({ 3, 3, 0 }, { st.rows, st.succeeded, st.pending })
    assert.equal(1, #job.ledger.batches)
    assert.truthy(job.ledger.batches[1].id)
    local bs = batch_stats()
    assert.equal(1, bs.creates)
    assert.equal(3, bs.lines)
  end)

  it("creates the batch again from the uploaded file when the cut-off creation made none", function()
    local c, dir = cut_off(3, false)
    assert.equal(0, batch_stats().creates)
    local job = assert(batchapi.open(c, dir, { poll_interval = 0.01 }))
    assert(job:resume())
    assert.equal(3, job:status().succeeded)
    local bs = batch_stats()
    assert.equal(1, bs.creates)
    assert.equal(1, bs.uploads) -- the file uploaded before is the one used
    assert.equal(3, bs.lines)
  end)

  it("gives two jobs over the same custom_ids with other requests other IDs", function()
    local c = client()
    local a = batchapi.job{ client = c, dir = tmpdir(), requests = requests(2) }
    local b = batchapi.job{ client = c, dir = tmpdir(), requests = requests(2, { " [other prompt]", " [other prompt]" }) }
    local a2 = batchapi.job{ client = c, dir = tmpdir(), requests = requests(2) }
    assert.same(a.ledger.order, b.ledger.order)
    assert.are_not.equal(a.ledger.id, b.ledger.id)
    assert.equal(a.ledger.id, a2.ledger.id) -- the same requests: the same ID
    local list = requests(2)
    for _, r in ipairs(list) do r.body.model = "nousresearch/hermes-3-llama-3.1-405b" end
    local m = batchapi.job{ client = c, dir = tmpdir(), requests = list }
    assert.are_not.equal(a.ledger.id, m.ledger.id)
  end)

  it("derives stable custom_ids and refuses duplicates", function()
    assert.equal("slm-abc", batchapi.custom_id("abc"))
    assert.is_true(#batchapi.custom_id(string.rep("k", 100)) <= 64)
    assert.equal(batchapi.custom_id(string.rep("k", 100)), batchapi.custom_id(string.rep("k", 100)))
    local c = client()
    assert.has_error(function()
      batchapi.job{ client = c, dir = tmpdir(), requests = { req("x", "a"), req("x", "b") } }
    end)
  end)
end)
